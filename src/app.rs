//! What every command works with: the [`Context`] (the host's root and its settings), the
//! error every command can end with ([`CommandError`]) and the exit codes it maps to
//! ([`exit`]).

use std::path::PathBuf;

use tracing::warn;

use crate::config::Settings;
use crate::config::{self, ConfigError};
use crate::handoff::toolkit::RuntimeError;
use crate::host::{HostError, Root};
use crate::kmod::execute::LoadError;
use crate::kmod::plan::PlanError;
use crate::modinfo::ModinfoError;
use crate::overlay::source::SourceError;
use crate::overlay::verify::VerifyError;
use crate::overlay::{Store, StoreError};

/// Exit codes, documented in docs/usage/status-and-exit-codes.md.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const CONFIG: u8 = 2;
    pub const NO_OVERLAY: u8 = 3;
    pub const INVALID_OVERLAY: u8 = 4;
    pub const HOST_CONFLICT: u8 = 5;
    pub const KERNEL_REFUSED: u8 = 6;
    /// `status`: the driver is loaded, but the kernel booted next has no overlay staged.
    pub const NOT_READY_AFTER_REBOOT: u8 = 7;
    /// `status`: the driver is not loaded (or the fallback policy marked the node not ready).
    pub const NOT_READY: u8 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Module(#[from] ModinfoError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Load(Box<LoadError>),
    #[error("toolkit config: {0}")]
    Toolkit(RuntimeError),
    #[error("no overlay for the running kernel {kernel_release} in {store}; stage one (`nvdriver-agent overlay import DIR`) or boot a kernel that has one")]
    NoOverlay {
        kernel_release: String,
        store: PathBuf,
    },
    #[error(transparent)]
    Source(Box<SourceError>),
    #[error("no driver version to stage for kernel {kernel_release}: pass --driver VERSION or set driver.version in /etc/nvdriver-agent/config.toml")]
    NoDriverVersion { kernel_release: String },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

// By hand, not `#[from]`: the message already says the cause, and a source would repeat it.
impl From<RuntimeError> for CommandError {
    fn from(e: RuntimeError) -> Self {
        CommandError::Toolkit(e)
    }
}

impl From<SourceError> for CommandError {
    fn from(e: SourceError) -> Self {
        CommandError::Source(Box::new(e))
    }
}

impl From<LoadError> for CommandError {
    fn from(e: LoadError) -> Self {
        CommandError::Load(Box::new(e))
    }
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        use CommandError as E;
        match self {
            E::Config(_) | E::NoDriverVersion { .. } => exit::CONFIG,
            E::Source(e) => match &**e {
                SourceError::NoSources => exit::CONFIG,
                _ if e.any_invalid() => exit::INVALID_OVERLAY,
                SourceError::NotFound { .. } => exit::NO_OVERLAY,
                _ => exit::FAILURE,
            },
            E::NoOverlay { .. } => exit::NO_OVERLAY,
            E::Store(StoreError::Io { .. }) | E::Io { .. } | E::Host(_) => exit::FAILURE,
            E::Store(_) | E::Verify(_) | E::Module(_) => exit::INVALID_OVERLAY,
            E::Plan(p) => match p {
                PlanError::Nouveau { .. }
                | PlanError::Unsigned { .. }
                | PlanError::OtherVersionLoaded { .. } => exit::HOST_CONFLICT,
                _ => exit::INVALID_OVERLAY,
            },
            E::Load(e) if matches!(**e, LoadError::Refused { .. } | LoadError::OsModule { .. }) => {
                exit::KERNEL_REFUSED
            }
            E::Load(_) | E::Toolkit(_) => exit::FAILURE,
        }
    }
}

/// What the agent works with: where the host is and how it is configured.
pub struct Context {
    pub root: Root,
    pub settings: Settings,
}

impl Context {
    pub fn new(root: Root, source: &config::ConfigSource) -> Result<Self, CommandError> {
        let settings = config::load(&root, source)?;
        Ok(Context { root, settings })
    }

    pub fn store(&self) -> Store<'_> {
        Store::new(&self.root, &self.settings.store_dir)
    }
}

/// Tell systemd how things stand (a no-op outside a unit).
pub fn notify_status(status: &str, ready: bool) {
    use libsystemd::daemon::{self, NotifyState};
    let mut states = vec![NotifyState::Status(status.to_string())];
    if ready {
        states.push(NotifyState::Ready);
    }
    if let Err(e) = daemon::notify(false, &states) {
        warn!(error = %e, "sd_notify failed");
    }
}

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
    /// Done, or nothing to do.
    pub const OK: u8 = 0;
    /// An unexpected failure: I/O, the driver root or the toolkit config could not be written.
    pub const FAILURE: u8 = 1;
    /// Bad configuration or bad arguments.
    pub const CONFIG: u8 = 2;
    /// No overlay for the running kernel (or, for `stage`, no source has one).
    pub const NO_OVERLAY: u8 = 3;
    /// The overlay is invalid: manifest, digest, unlisted file, module for another kernel, dependencies.
    pub const INVALID_OVERLAY: u8 = 4;
    /// The host conflicts with the load: nouveau, unsigned modules (or modules signed by a key
    /// the kernel does not trust) under enforcement, another driver version loaded.
    pub const HOST_CONFLICT: u8 = 5;
    /// The kernel refused a module (the modules this run loaded were unloaded again).
    pub const KERNEL_REFUSED: u8 = 6;
    /// `status`: the driver is loaded, but the kernel booted next has no overlay staged.
    pub const NOT_READY_AFTER_REBOOT: u8 = 7;
    /// `status`: the driver is not loaded (or the fallback policy marked the node not ready).
    pub const NOT_READY: u8 = 8;
    /// `load`, and `status` after such a boot load: the `nvidia` module's init found no NVIDIA
    /// GPU (`ENODEV`); the overlay is fine, the host has no GPU for it.
    pub const NO_GPU: u8 = 9;
    /// `stage`, `overlay fetch`: a source has the overlay, but the store's file system has no
    /// room for it with `stage.keep-free-*` left free; nothing was written.
    pub const NO_ROOM: u8 = 10;
}

/// The journal's `MESSAGE_ID` of "no NVIDIA GPU on this host" (`journalctl
/// MESSAGE_ID=5b1d3c0e9a7f4e2b8c6d4a2f1e0b9c87`).
pub const NO_GPU_MESSAGE_ID: &str = "5b1d3c0e9a7f4e2b8c6d4a2f1e0b9c87";

/// The error any command can end with; [`CommandError::exit_code`] maps it to an [`exit`] code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The configuration files could not be read, or are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A fact about the host (os-release, the running kernel, its module state) could not be read.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The overlay store could not be read, or holds a malformed overlay.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An overlay's tree does not match its manifest.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A module file's `.modinfo` could not be read or is invalid.
    #[error(transparent)]
    Module(#[from] ModinfoError),
    /// The load was refused while planning: a host conflict or an inconsistent overlay.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Executing the load plan failed (boxed: [`LoadError`] is large).
    #[error(transparent)]
    Load(Box<LoadError>),
    /// The container toolkit's `config.toml` could not be read, parsed or written.
    #[error("toolkit config: {0}")]
    Toolkit(RuntimeError),
    /// The store has no overlay for the running kernel and `missing-overlay = "fail"`.
    #[error("no overlay for the running kernel {kernel_release} in {store}; stage one (`nvdriver-agent overlay import DIR`) or boot a kernel that has one")]
    NoOverlay {
        /// The running kernel (`uname -r`).
        kernel_release: String,
        /// The store directory that was searched, as a host path.
        store: PathBuf,
    },
    /// Staging from the configured sources failed (boxed: [`SourceError`] is large).
    #[error(transparent)]
    Source(Box<SourceError>),
    /// `stage` or `overlay fetch` was given no driver version: neither `--driver` nor
    /// `driver.version` is set.
    #[error("no driver version to stage for kernel {kernel_release}: pass --driver VERSION or set driver.version in /etc/nvdriver-agent/config.toml")]
    NoDriverVersion {
        /// The kernel an overlay was to be staged for.
        kernel_release: String,
    },
    /// A file the command needed (a module file, the driver root mount) could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file, as a host path.
        path: PathBuf,
        /// The underlying I/O error.
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
    /// Whether this is "no NVIDIA GPU on this host" ([`LoadError::NoGpu`]), not a failure of
    /// the overlay or the host.
    pub fn is_no_gpu(&self) -> bool {
        matches!(self, CommandError::Load(e) if matches!(**e, LoadError::NoGpu { .. }))
    }

    /// The process exit code for this error (one of [`exit`]; see
    /// docs/usage/status-and-exit-codes.md).
    pub fn exit_code(&self) -> u8 {
        use CommandError as E;
        match self {
            E::Config(_) | E::NoDriverVersion { .. } => exit::CONFIG,
            E::Source(e) => match &**e {
                SourceError::NoSources => exit::CONFIG,
                _ if e.any_no_room() => exit::NO_ROOM,
                _ if e.any_invalid() => exit::INVALID_OVERLAY,
                SourceError::NotFound { .. } => exit::NO_OVERLAY,
                _ => exit::FAILURE,
            },
            E::NoOverlay { .. } => exit::NO_OVERLAY,
            E::Store(StoreError::Io { .. }) | E::Io { .. } | E::Host(_) => exit::FAILURE,
            E::Store(StoreError::Space(_)) => exit::NO_ROOM,
            E::Store(_) | E::Verify(_) | E::Module(_) => exit::INVALID_OVERLAY,
            E::Plan(p) => match p {
                PlanError::Nouveau { .. }
                | PlanError::Blacklisted { .. }
                | PlanError::Unsigned { .. }
                | PlanError::UntrustedKey { .. }
                | PlanError::OtherVersionLoaded { .. } => exit::HOST_CONFLICT,
                _ => exit::INVALID_OVERLAY,
            },
            E::Load(e) if matches!(**e, LoadError::NoGpu { .. }) => exit::NO_GPU,
            E::Load(e) if matches!(**e, LoadError::Refused { .. } | LoadError::OsModule { .. }) => {
                exit::KERNEL_REFUSED
            }
            E::Load(_) | E::Toolkit(_) => exit::FAILURE,
        }
    }
}

/// What the agent works with: where the host is and how it is configured.
pub struct Context {
    /// The filesystem root every host path is resolved under (`--root`).
    pub root: Root,
    /// The merged, validated configuration.
    pub settings: Settings,
}

impl Context {
    /// Load the configuration from `source` under `root`.
    pub fn new(root: Root, source: &config::ConfigSource) -> Result<Self, CommandError> {
        let settings = config::load(&root, source)?;
        Ok(Context { root, settings })
    }

    /// The overlay store at the configured `store_dir`, under this context's root.
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

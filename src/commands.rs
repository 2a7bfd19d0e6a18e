//! The commands behind the CLI, as library functions: gather facts at the edge, plan purely,
//! execute through [`Kernel`]. `main.rs` only parses arguments and maps [`CommandError`] to an
//! exit code.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::config::{self, ConfigError, MissingOverlayPolicy, Settings};
use crate::host::{HostError, HostFacts, KernelState, Root};
use crate::kmod::load::{self, LoadError, LoadReport, OpenedModule};
use crate::kmod::modinfo::{self, ModinfoError};
use crate::kmod::plan::{self, InspectedModule, LoadPlan, PlanError, PlanInputs, ToolkitState};
use crate::kmod::sys::Kernel;
use crate::overlay::source::{self, OverlayKey, SourceError, StageReport};
use crate::overlay::store::{self, ImportOutcome};
use crate::overlay::verify::{check_digest, sha256_bytes, VerifyError};
use crate::overlay::{Manifest, Store, StoreError, StoredOverlay};
use crate::runtime::{self, RuntimeError};

/// Exit codes, documented in the README.
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
    Toolkit(#[from] RuntimeError),
    #[error("no overlay for the running kernel {kernel_release} in {store}; stage one (`nvdriver-agent overlay import DIR`) or boot a kernel that has one")]
    NoOverlay {
        kernel_release: String,
        store: PathBuf,
    },
    #[error(transparent)]
    Source(Box<SourceError>),
    #[error("no driver version to stage for kernel {kernel_release}: pass --driver VERSION or set driver.version in /etc/nvdriver-agent/config.toml")]
    NoDriverVersion { kernel_release: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// A plan ready to execute, with the module files it verified still open.
pub struct PreparedLoad {
    pub plan: LoadPlan,
    pub opened: BTreeMap<PathBuf, OpenedModule>,
}

/// The result of planning: a plan, or no overlay for this kernel.
pub enum Prepared {
    Ready(Box<PreparedLoad>),
    NoOverlay { kernel_release: String },
}

/// Gather everything and plan the load for the running kernel. Touches nothing.
pub fn prepare_load(ctx: &Context, kernel: &dyn Kernel) -> Result<Prepared, CommandError> {
    let host = HostFacts::read(&ctx.root)?;
    let Some(overlay) = ctx
        .store()
        .select(&host.kernel_release, ctx.settings.driver_version.as_deref())?
    else {
        return Ok(Prepared::NoOverlay {
            kernel_release: host.kernel_release,
        });
    };
    let kernel_state = KernelState::read(&ctx.root, &host.kernel_release)?;
    let (inspected, opened) = inspect_modules(&ctx.root, &overlay)?;
    let toolkit = toolkit_state(&ctx.root, &ctx.settings.toolkit_config)?;
    let driver_root_mount = kernel
        .mount_state(
            &ctx.root.join(&overlay.dir),
            &ctx.root.join(&ctx.settings.driver_root),
        )
        .map_err(|e| CommandError::Io {
            path: ctx.settings.driver_root.clone(),
            source: std::io::Error::from(e.errno),
        })?;
    let plan = plan::plan_load(&PlanInputs {
        settings: &ctx.settings,
        host: &host,
        kernel: &kernel_state,
        overlay: &overlay,
        modules: &inspected,
        toolkit,
        driver_root_mount,
    })?;
    for warning in &plan.warnings {
        warn!(KERNEL_RELEASE = %plan.kernel_release, OVERLAY = %plan.overlay.display(), "{warning}");
    }
    Ok(Prepared::Ready(Box::new(PreparedLoad { plan, opened })))
}

/// Open every module file of the overlay, check it against the manifest, read its `.modinfo`.
fn inspect_modules(
    root: &Root,
    overlay: &StoredOverlay,
) -> Result<(Vec<InspectedModule>, BTreeMap<PathBuf, OpenedModule>), CommandError> {
    let mut inspected = Vec::new();
    let mut opened = BTreeMap::new();
    for entry in overlay.manifest.module_files() {
        let host_path = overlay.dir.join(&entry.path);
        let path = root.join(&host_path);
        let io = |source| CommandError::Io {
            path: host_path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(io)?;
        let mut bytes = Vec::with_capacity(entry.size as usize);
        (&mut file)
            .take(entry.size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
        check_digest(&host_path, entry, bytes.len() as u64, &sha256_bytes(&bytes))?;
        file.rewind().map_err(io)?;
        let info = modinfo::parse_module(&bytes, &host_path)?;
        opened.insert(
            entry.path.clone(),
            OpenedModule {
                file,
                vermagic: info.vermagic.clone(),
                signed: info.signature.is_some(),
            },
        );
        inspected.push(InspectedModule {
            relative_path: entry.path.clone(),
            info,
        });
    }
    Ok((inspected, opened))
}

fn toolkit_state(root: &Root, config: &Path) -> Result<ToolkitState, CommandError> {
    match fs::read_to_string(root.join(config)) {
        Ok(text) => Ok(ToolkitState::Present {
            root: runtime::current_cli_root_in(config, &text)?,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ToolkitState::Absent),
        Err(source) => Err(CommandError::Io {
            path: config.to_path_buf(),
            source,
        }),
    }
}

/// What `load` ended with.
pub enum LoadOutcome {
    Loaded {
        plan: Box<LoadPlan>,
        report: LoadReport,
    },
    /// No overlay, and the policy says carry on.
    NoOverlayWarned { kernel_release: String },
}

/// Plan and execute the load for the running kernel.
pub fn load(ctx: &Context, kernel: &mut dyn Kernel) -> Result<LoadOutcome, CommandError> {
    let started = Instant::now();
    let prepared = match prepare_load(ctx, kernel)? {
        Prepared::Ready(prepared) => prepared,
        Prepared::NoOverlay { kernel_release } => {
            return match ctx.settings.missing_overlay {
                MissingOverlayPolicy::Warn => {
                    warn!(
                        KERNEL_RELEASE = %kernel_release,
                        "no overlay for the running kernel in {}; the NVIDIA driver is not loaded (policy.missing-overlay = warn)",
                        ctx.settings.store_dir.display()
                    );
                    Ok(LoadOutcome::NoOverlayWarned { kernel_release })
                }
                MissingOverlayPolicy::Fail => Err(CommandError::NoOverlay {
                    kernel_release,
                    store: ctx.settings.store_dir.clone(),
                }),
            };
        }
    };
    let PreparedLoad { plan, opened } = *prepared;
    let report = load::execute(&ctx.root, &plan, &opened, kernel)?;
    info!(
        KERNEL_RELEASE = %plan.kernel_release,
        DRIVER_VERSION = %plan.driver_version,
        OVERLAY = %plan.overlay.display(),
        loaded = ?report.loaded,
        // Whole `load` (inspection, verification, syscalls, files) against the part the kernel
        // spent in finit_module: the difference is what the agent adds (bench/load-overhead).
        duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        module_init_us = report.module_init_micros,
        "NVIDIA driver ready"
    );
    if let Some(spec) = &ctx.settings.outputs.cdi_spec {
        // Containers are served without CDI too (the toolkit's legacy mode): a failure is said,
        // not fatal.
        match crate::cdi::regenerate(&ctx.root, spec, &plan.overlay, &plan.driver_root.root()) {
            Ok(outcome) => {
                debug!(OVERLAY = %plan.overlay.display(), "CDI spec {}: {outcome:?}", spec.display())
            }
            Err(e) => warn!(OVERLAY = %plan.overlay.display(), "{e}"),
        }
    }
    Ok(LoadOutcome::Loaded {
        plan: Box::new(plan),
        report,
    })
}

/// Verify an overlay directory (a real path, not under the root) completely.
pub fn overlay_verify(dir: &Path) -> Result<Manifest, CommandError> {
    Ok(store::verify_source(dir)?)
}

/// Verify an overlay directory and check its modules against the manifest's kernel.
pub fn overlay_verify_modules(
    dir: &Path,
    manifest: &Manifest,
) -> Result<Vec<modinfo::ModInfo>, CommandError> {
    Ok(source::check_modules(dir, manifest)?)
}

/// Import an overlay directory into the store, after checking its modules.
pub fn overlay_import(ctx: &Context, dir: &Path) -> Result<ImportOutcome, CommandError> {
    let manifest = overlay_verify(dir)?;
    overlay_verify_modules(dir, &manifest)?;
    let store = ctx.store();
    let lock = store.lock()?;
    // What an interrupted import or stage left goes first, as stage and gc do.
    store.clean_leftovers(&lock)?;
    Ok(store.import(dir)?)
}

/// Stage the overlay for a kernel from the configured sources (`overlay fetch`). The driver
/// version is `driver`, else the pinned `driver.version`; the architecture is the machine's.
pub fn overlay_fetch(
    ctx: &Context,
    kernel_release: &str,
    driver: Option<&str>,
) -> Result<StageReport, CommandError> {
    let Some(driver_version) = driver.or(ctx.settings.driver_version.as_deref()) else {
        return Err(CommandError::NoDriverVersion {
            kernel_release: kernel_release.to_string(),
        });
    };
    let key = OverlayKey {
        kernel_release: kernel_release.to_string(),
        driver_version: driver_version.to_string(),
        arch: crate::host::machine_arch(),
    };
    Ok(source::stage(
        &ctx.root,
        &ctx.store(),
        &ctx.settings.stage,
        &key,
    )?)
}

/// Remove the overlays of kernels other than `keep`, the running kernel's and the
/// `stage.keep-extra` newest others (`overlay gc`).
pub fn overlay_gc(ctx: &Context, keep: &[String]) -> Result<Vec<PathBuf>, CommandError> {
    let mut keep = keep.to_vec();
    // The next boot may well run this kernel again. A fake root without /proc has none.
    if let Ok(running) = crate::host::kernel::read_kernel_release(&ctx.root) {
        keep.push(running);
    }
    Ok(ctx.store().gc(&keep, ctx.settings.stage.keep_extra)?)
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

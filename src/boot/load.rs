//! The boot path for the running kernel: find its overlay in the store, open and check every
//! module file, plan the load (pure, [`crate::kmod::plan`]), execute it
//! ([`crate::kmod::execute`]), and regenerate the CDI spec.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::app::{CommandError, Context};
use crate::config::MissingOverlayPolicy;
use crate::handoff::toolkit;
use crate::host::modprobe::ModprobeConfig;
use crate::host::{HostFacts, KernelState, Root};
use crate::kmod::caps;
use crate::kmod::execute::{self, LoadReport, OpenedModule};
use crate::kmod::plan::{self, InspectedModule, LoadPlan, PlanInputs, ToolkitState};
use crate::kmod::sys::Kernel;
use crate::modinfo;
use crate::overlay::verify::{check_digest, sha256_bytes};
use crate::overlay::StoredOverlay;

/// A plan ready to execute, with the module files it verified still open.
pub struct PreparedLoad {
    /// The plan for the running kernel's overlay.
    pub plan: LoadPlan,
    /// Each module's file, keyed by its manifest path, opened and hashed during inspection.
    pub opened: BTreeMap<PathBuf, OpenedModule>,
}

/// The result of planning: a plan, or no overlay for this kernel.
pub enum Prepared {
    /// The store has an overlay for the running kernel, and the plan for it.
    Ready(Box<PreparedLoad>),
    /// The store has no overlay for the running kernel.
    NoOverlay {
        /// The running kernel's release.
        kernel_release: String,
    },
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
    let modprobe = ModprobeConfig::read(&ctx.root)?;
    let (inspected, opened) = inspect_modules(&ctx.root, &overlay)?;
    let toolkit = toolkit_state(&ctx.root, &ctx.settings.toolkit_config)?;
    let driver_root_mount = kernel
        .mount_state(
            &ctx.root.join(&overlay.dir),
            &ctx.root.join(&ctx.settings.driver_root),
        )
        .map_err(|e| CommandError::Io {
            path: ctx.settings.driver_root.clone(),
            error: std::io::Error::from(e.errno),
        })?;
    let plan = plan::plan_load(&PlanInputs {
        settings: &ctx.settings,
        host: &host,
        kernel: &kernel_state,
        overlay: &overlay,
        modules: &inspected,
        toolkit,
        driver_root_mount,
        modprobe: &modprobe,
        caps_nodes: caps::read_nodes(&ctx.root, &ctx.settings.imex_channels)
            .map_err(|e| e.to_string()),
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
            error: source,
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
            root: toolkit::current_cli_root_in(config, &text)?,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ToolkitState::Absent),
        Err(source) => Err(CommandError::Io {
            path: config.to_path_buf(),
            error: source,
        }),
    }
}

/// What `load` ended with.
pub enum LoadOutcome {
    /// The driver was loaded (or already was): the plan and what executing it did.
    Loaded {
        /// The plan that was executed.
        plan: Box<LoadPlan>,
        /// What executing it changed.
        report: LoadReport,
    },
    /// No overlay, and the policy says carry on.
    NoOverlayWarned {
        /// The running kernel's release.
        kernel_release: String,
    },
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
    let report = match execute::execute(&ctx.root, &plan, &opened, kernel) {
        Ok(report) => report,
        Err(e @ execute::LoadError::NoGpu { .. }) => {
            warn!(
                MESSAGE_ID = crate::app::NO_GPU_MESSAGE_ID,
                KERNEL_RELEASE = %plan.kernel_release,
                DRIVER_VERSION = %plan.driver_version,
                OVERLAY = %plan.overlay.display(),
                "{e}"
            );
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
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
        match crate::handoff::cdi::regenerate(
            &ctx.root,
            spec,
            &plan.overlay,
            &plan.driver_root.root(),
            &caps::workload_nodes(
                &caps::read_nodes(&ctx.root, &ctx.settings.imex_channels).unwrap_or_default(),
            ),
        ) {
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

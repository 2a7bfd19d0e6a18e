//! `nvdriver-agent status`: how things stand now and after the next reboot, from the disk and
//! the state the daemon and `stage` keep (see [`crate::state`]).
//!
//! The JSON form is versioned (`format`) and documented in the README; fields are only added.

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::commands::{CommandError, Context};
use crate::config::MissingNextOverlayPolicy;
use crate::daemon;
use crate::host::{HostFacts, KernelState};
use crate::state::{AgentState, HoldRecord, LoadRecord, StageRecord};
use crate::watch::{self, flatcar::UpdateEngineState, Family, NextBoot};

pub const STATUS_FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatusReport {
    pub format: u32,
    pub running_kernel: String,
    /// The NVIDIA driver version the kernel has loaded now, if any.
    pub loaded_driver: Option<String>,
    /// The daemon's pid, when it runs.
    pub daemon_pid: Option<u32>,
    pub detector: Option<Family>,
    /// The kernel the host boots next, when it differs from the running one: read from disk
    /// now (on Flatcar, as last reported by the daemon, since update_engine's word is needed).
    pub pending: Option<NextBoot>,
    /// Whether the store holds an overlay for the pending kernel.
    pub pending_staged: Option<bool>,
    pub store: Vec<StoredKernel>,
    pub load: Option<LoadRecord>,
    pub last_stage: Option<StageRecord>,
    pub hold: Option<HoldRecord>,
    pub policy: Policy,
    /// Why the pending kernel could not be read, if it could not.
    pub watch_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StoredKernel {
    pub kernel_release: String,
    pub driver_versions: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Policy {
    pub missing_next_overlay: MissingNextOverlayPolicy,
    pub store_dir: PathBuf,
}

/// Read everything; touches nothing.
pub fn gather(ctx: &Context) -> Result<StatusReport, CommandError> {
    let host = HostFacts::read(&ctx.root)?;
    let kernel_state = KernelState::read(&ctx.root, &host.kernel_release)?;
    let state = AgentState::read(&ctx.root);
    let family = watch::choose(ctx.settings.detector, &ctx.root, &host.os);
    let (pending, watch_error) = match family {
        // Flatcar's next kernel depends on update_engine's word, which the daemon heard.
        Some(Family::Flatcar) => (state.pending.clone(), None),
        Some(family) => match watch::next_boot(
            &ctx.root,
            family,
            &host.kernel_release,
            UpdateEngineState::Unknown,
        ) {
            Ok(next) => (next, None),
            Err(e) => (state.pending.clone(), Some(e.to_string())),
        },
        None => (None, None),
    };
    let store = ctx.store();
    let stored: Vec<StoredKernel> = store
        .inventory()?
        .into_iter()
        .map(|(kernel_release, driver_versions)| StoredKernel {
            kernel_release,
            driver_versions,
        })
        .collect();
    let pending_staged = pending.as_ref().map(|next| {
        stored
            .iter()
            .any(|k| k.kernel_release == next.kernel_release && !k.driver_versions.is_empty())
    });
    Ok(StatusReport {
        format: STATUS_FORMAT,
        running_kernel: host.kernel_release,
        loaded_driver: kernel_state
            .is_loaded("nvidia")
            .and_then(|m| m.version.clone()),
        daemon_pid: daemon::running_pid(&ctx.root),
        detector: family,
        pending,
        pending_staged,
        store: stored,
        load: state.load,
        last_stage: state.last_stage,
        hold: state.hold,
        policy: Policy {
            missing_next_overlay: ctx.settings.missing_next_overlay,
            store_dir: ctx.settings.store_dir.clone(),
        },
        watch_error,
    })
}

pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "running kernel:  {}", report.running_kernel);
    let _ = writeln!(
        out,
        "driver loaded:   {}",
        report.loaded_driver.as_deref().unwrap_or("no")
    );
    let _ = writeln!(
        out,
        "daemon:          {}",
        match (report.daemon_pid, report.detector) {
            (Some(pid), Some(family)) => format!("running (pid {pid}), watching ({family:?})"),
            (Some(pid), None) => format!("running (pid {pid}), not watching"),
            (None, _) => "not running".into(),
        }
    );
    let pending = match (&report.pending, report.pending_staged) {
        (None, _) => "none (the next boot runs this kernel)".into(),
        (Some(next), staged) => format!(
            "{} from {}: {}",
            next.kernel_release,
            next.origin,
            if staged == Some(true) {
                "overlay staged"
            } else {
                "NO overlay staged"
            }
        ),
    };
    let _ = writeln!(out, "next kernel:     {pending}");
    if let Some(stage) = &report.last_stage {
        let _ = writeln!(
            out,
            "last stage:      {} for {}{}{}",
            stage.result,
            stage.kernel_release,
            stage
                .source
                .as_deref()
                .map(|s| format!(" from {s}"))
                .unwrap_or_default(),
            stage
                .detail
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        );
    }
    match &report.hold {
        Some(hold) => {
            let _ = writeln!(
                out,
                "update held:     yes, the update to {} ({})",
                hold.kernel_release, hold.mechanism
            );
        }
        None => {
            let _ = writeln!(
                out,
                "update held:     no (policy.missing-next-overlay = {})",
                match report.policy.missing_next_overlay {
                    MissingNextOverlayPolicy::Warn => "warn",
                    MissingNextOverlayPolicy::Hold => "hold",
                }
            );
        }
    }
    if let Some(load) = &report.load {
        let _ = writeln!(
            out,
            "boot load:       {}{}",
            load.result,
            load.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "store:           {}",
        report.policy.store_dir.display()
    );
    for kernel in &report.store {
        let _ = writeln!(
            out,
            "  {}  {}",
            kernel.kernel_release,
            kernel.driver_versions.join(", ")
        );
    }
    if let Some(e) = &report.watch_error {
        let _ = writeln!(out, "warning:         {e}");
    }
    out
}

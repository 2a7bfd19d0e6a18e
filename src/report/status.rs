//! `nvdriver-agent status`: how things stand now and after the next reboot, from the disk and
//! the state the daemon and `stage` keep (see [`crate::state`]).
//!
//! The JSON form is versioned (`format`) and documented in the README; fields are only added.

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::app::{CommandError, Context};
use crate::config::MissingNextOverlayPolicy;
use crate::host::{HostFacts, KernelState};
use crate::report::usable::{self, UsableFacts};
use crate::state::{
    AgentState, HoldRecord, HoldRelease, LoadRecord, LoadResult, StageRecord, StageResult,
};
use crate::update::hold::{self as hold_levers, HoldLever};
use crate::watch::{self, flatcar::UpdateEngineState, Family, NextBoot};

/// The `format` of `status --json`; bumped only if a field changes meaning (fields are only added).
pub const STATUS_FORMAT: u32 = 1;

/// Everything `status` reports; serialized as `status --json`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatusReport {
    /// [`STATUS_FORMAT`].
    pub format: u32,
    /// The running kernel's release (`uname -r`).
    pub running_kernel: String,
    /// The NVIDIA driver version the kernel has loaded now, if any.
    pub loaded_driver: Option<String>,
    /// The daemon's pid, when it runs.
    pub daemon_pid: Option<u32>,
    /// The OS family whose detector watches for the next kernel; `None` when watching is off.
    pub detector: Option<Family>,
    /// The kernel the host boots next, when it differs from the running one: read from disk
    /// now (on Flatcar, as last reported by the daemon, since update_engine's word is needed).
    pub pending: Option<NextBoot>,
    /// Whether the store holds an overlay for the pending kernel.
    pub pending_staged: Option<bool>,
    /// Each kernel release that has overlays in the store, with their driver versions.
    pub store: Vec<StoredKernel>,
    /// The daemon's boot-path load in this boot (from the state file).
    pub load: Option<LoadRecord>,
    /// The last stage pass for the next kernel (from the state file).
    pub last_stage: Option<StageRecord>,
    /// An update the agent holds back, if any (from the state file).
    pub hold: Option<HoldRecord>,
    /// Each lever the hold record names, whether it is in force now, and which reboot
    /// callers it stops; empty when nothing is held.
    pub hold_levers: Vec<LeverStatus>,
    /// The last hold let go before its overlay came (`hold release`, `policy.hold-max-hours`).
    pub hold_released: Option<HoldRelease>,
    /// The policy settings that shape readiness.
    pub policy: Policy,
    /// Why the pending kernel could not be read, if it could not.
    pub watch_error: Option<String>,
    /// Ready now and after the next reboot, now only, or not now (the exit code of `status`).
    pub readiness: Readiness,
    /// Why the node is less than ready, when it is.
    pub readiness_detail: Option<String>,
    /// With the driver loaded: whether the GPU is usable (nodes, driver services, CDI spec,
    /// NVLink fabric); `None` when no driver is loaded.
    pub usable: Option<UsableFacts>,
    /// `ok`, `held: …`, `not-ready-after-reboot: …` or `not-ready: …` (the D-Bus PolicyState).
    pub policy_state: String,
    /// The most recent error: a failed boot load, then a failed or missing stage, then the
    /// watcher's.
    pub last_error: Option<String>,
    /// Stages that failed in this boot (counted by the daemon and `stage`).
    pub stage_failures: u64,
    /// `daemon` when the running daemon answered over D-Bus, `disk` otherwise.
    pub read_from: String,
}

/// What no hold lever stops (shown with every hold).
pub const HOLD_CANNOT_STOP: &str =
    "systemctl reboot --force, reboot -ff, sysrq, a power cut; a poweroff and power-on boots the new kernel";

/// One hold lever as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LeverStatus {
    /// `ostree-finalization-lock`, `logind-shutdown-inhibitor` or `reboot-refusal`.
    pub name: String,
    /// Whether it is in force now: the lock or drop-ins on disk, the inhibitor with a daemon
    /// running to hold it.
    pub in_force: bool,
    /// Which reboot callers it stops, and which not.
    pub stops: String,
}

/// The levers a hold record names, each checked on disk (the inhibitor lives as long as the
/// daemon).
fn lever_status(ctx: &Context, hold: Option<&HoldRecord>, daemon_runs: bool) -> Vec<LeverStatus> {
    let Some(hold) = hold else { return Vec::new() };
    hold.levers
        .iter()
        .map(|name| {
            let lever = HoldLever::from_name(name);
            LeverStatus {
                name: name.clone(),
                in_force: match lever {
                    Some(HoldLever::OstreeFinalizationLock) => {
                        hold_levers::holds_ostree_lock(&ctx.root)
                    }
                    Some(HoldLever::RebootRefusal) => hold_levers::holds_reboot_refusal(&ctx.root),
                    Some(HoldLever::LogindShutdownInhibitor) => daemon_runs,
                    None => false,
                },
                stops: lever
                    .map(HoldLever::stops)
                    .unwrap_or("unknown lever")
                    .into(),
            }
        })
        .collect()
}

/// How ready the node is, now and after the next reboot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// The driver is loaded, and the kernel booted next has its overlay (or is this one).
    Ready,
    /// The driver is loaded, but the pending kernel has no overlay staged.
    NotReadyAfterReboot,
    /// The driver is not loaded now (or the fallback policy marked the node not ready).
    NotReady,
    /// The boot load found no NVIDIA GPU on this host (the `nvidia` module's init returned
    /// `ENODEV`): not ready, and nothing is wrong with the overlay.
    NoGpu,
}

impl Readiness {
    /// `status`'s exit code for it (documented in the README and `status --help`).
    pub fn exit_code(self) -> u8 {
        match self {
            Readiness::Ready => crate::app::exit::OK,
            Readiness::NotReadyAfterReboot => crate::app::exit::NOT_READY_AFTER_REBOOT,
            Readiness::NotReady => crate::app::exit::NOT_READY,
            Readiness::NoGpu => crate::app::exit::NO_GPU,
        }
    }

    /// Whether GPU work can run now (the driver is loaded and the node not marked not ready).
    pub fn ready_now(self) -> bool {
        matches!(self, Readiness::Ready | Readiness::NotReadyAfterReboot)
    }
}

/// The facts readiness is judged on.
#[derive(Clone, Debug, Default)]
pub struct ReadinessFacts<'a> {
    /// The NVIDIA driver version loaded now, if any.
    pub loaded_driver: Option<&'a str>,
    /// The daemon's boot-path load in this boot, if recorded.
    pub load: Option<&'a LoadRecord>,
    /// Set by the fallback policy.
    pub marked_not_ready: Option<&'a str>,
    /// The kernel the host boots next, when it differs from the running one.
    pub pending_kernel: Option<&'a str>,
    /// Whether the store has any overlay for the pending kernel.
    pub pending_staged: bool,
    /// The last stage decision, to see whether the OS covers the pending kernel itself.
    pub last_stage: Option<&'a StageRecord>,
    /// Why the next boot's kernel could not be read (then nothing is promised for it).
    pub next_boot_unknown: Option<&'a str>,
    /// Why the loaded driver is not a usable GPU ([`usable::problems`]); empty when it is.
    pub not_usable: &'a [String],
}

/// Judge readiness; pure.
pub fn assess(facts: &ReadinessFacts) -> (Readiness, Option<String>) {
    if let Some(why) = facts.marked_not_ready {
        return (Readiness::NotReady, Some(why.to_string()));
    }
    if facts.loaded_driver.is_none() {
        if let Some(load) = facts.load.filter(|l| l.result == LoadResult::NoGpu) {
            return (
                Readiness::NoGpu,
                Some(
                    load.error
                        .clone()
                        .unwrap_or_else(|| "no NVIDIA GPU on this host".into()),
                ),
            );
        }
        let why = match facts.load {
            Some(load) if load.result == LoadResult::Failed => format!(
                "loading the driver failed: {}",
                load.error.as_deref().unwrap_or("no detail")
            ),
            Some(load) if load.result == LoadResult::NoOverlay => format!(
                "no overlay for the running kernel {} in the store",
                load.kernel_release
            ),
            _ => "the NVIDIA driver is not loaded".to_string(),
        };
        return (Readiness::NotReady, Some(why));
    }
    if !facts.not_usable.is_empty() {
        return (
            Readiness::NotReady,
            Some(format!(
                "the driver is loaded but the GPU is not usable: {}",
                facts.not_usable.join("; ")
            )),
        );
    }
    match facts.pending_kernel {
        Some(kernel) if !facts.pending_staged => {
            let stood_down = facts
                .last_stage
                .is_some_and(|s| s.kernel_release == kernel && s.result == StageResult::StoodDown);
            if stood_down {
                (Readiness::Ready, None)
            } else {
                (
                    Readiness::NotReadyAfterReboot,
                    Some(format!(
                        "no overlay staged for the next kernel {kernel}; `nvdriver-agent stage --now` tries the sources again"
                    )),
                )
            }
        }
        None => match facts.next_boot_unknown {
            // Not known to be ready after the reboot: say so rather than promise it.
            Some(why) => (
                Readiness::NotReadyAfterReboot,
                Some(format!(
                    "cannot tell which kernel boots next ({why}); set watch.detector = \"off\" if this host boots kernels from outside its disk"
                )),
            ),
            None => (Readiness::Ready, None),
        },
        Some(_) => (Readiness::Ready, None),
    }
}

/// The D-Bus `PolicyState` for a readiness and hold.
pub fn policy_state(
    readiness: Readiness,
    detail: Option<&str>,
    hold: Option<&HoldRecord>,
) -> String {
    let detail = detail.unwrap_or_default();
    match (readiness, hold) {
        (Readiness::NotReady, _) => format!("not-ready: {detail}"),
        (Readiness::NoGpu, _) => format!("no-gpu: {detail}"),
        (_, Some(hold)) if !hold.levers.is_empty() => format!(
            "held: the update to {} waits for its overlay ({})",
            if hold.kernel_release.is_empty() {
                "the next kernel (unknown)"
            } else {
                &hold.kernel_release
            },
            hold.levers.join(", ")
        ),
        (Readiness::NotReadyAfterReboot, _) => format!("not-ready-after-reboot: {detail}"),
        (Readiness::Ready, _) => "ok".into(),
    }
}

fn last_error(
    load: Option<&LoadRecord>,
    stage: Option<&StageRecord>,
    watch_error: Option<&str>,
) -> Option<String> {
    load.and_then(|l| l.error.clone())
        .or_else(|| {
            stage
                .filter(|s| {
                    matches!(
                        s.result,
                        StageResult::Failed | StageResult::Missing | StageResult::NoRoom
                    )
                })
                .and_then(|s| s.detail.clone())
        })
        .or_else(|| watch_error.map(str::to_string))
}

/// One kernel release in the store and the driver versions staged for it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StoredKernel {
    /// The kernel release.
    pub kernel_release: String,
    /// The driver versions with an overlay for it.
    pub driver_versions: Vec<String>,
}

/// The configuration `status` shows next to the state.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Policy {
    /// `policy.missing-next-overlay`: what to do when the next kernel has no overlay.
    pub missing_next_overlay: MissingNextOverlayPolicy,
    /// The overlay store directory, as a host path.
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
    let loaded_driver = kernel_state
        .is_loaded("nvidia")
        .and_then(|m| m.version.clone());
    let usable = kernel_state.is_loaded("nvidia").map(|_| {
        let loaded: Vec<&str> = kernel_state.loaded.keys().map(String::as_str).collect();
        usable::gather(&ctx.root, &ctx.settings, &loaded)
    });
    let not_usable = usable.as_ref().map(usable::problems).unwrap_or_default();
    let (readiness, readiness_detail) = assess(&ReadinessFacts {
        loaded_driver: loaded_driver.as_deref(),
        load: state.load.as_ref(),
        marked_not_ready: state.not_ready.as_deref(),
        pending_kernel: pending.as_ref().map(|n| n.kernel_release.as_str()),
        pending_staged: pending_staged == Some(true),
        last_stage: state.last_stage.as_ref(),
        next_boot_unknown: watch_error.as_deref(),
        not_usable: &not_usable,
    });
    let daemon_pid = crate::state::instance::running_pid(&ctx.root);
    let hold_levers = lever_status(ctx, state.hold.as_ref(), daemon_pid.is_some());
    Ok(StatusReport {
        format: STATUS_FORMAT,
        running_kernel: host.kernel_release,
        policy_state: policy_state(readiness, readiness_detail.as_deref(), state.hold.as_ref()),
        last_error: last_error(
            state.load.as_ref(),
            state.last_stage.as_ref(),
            watch_error.as_deref(),
        ),
        readiness,
        readiness_detail,
        usable,
        stage_failures: state.stage_failures,
        read_from: "disk".into(),
        loaded_driver,
        daemon_pid,
        detector: family,
        pending,
        pending_staged,
        store: stored,
        load: state.load,
        last_stage: state.last_stage,
        hold: state.hold,
        hold_levers,
        hold_released: state.hold_released,
        policy: Policy {
            missing_next_overlay: ctx.settings.missing_next_overlay,
            store_dir: ctx.settings.store_dir.clone(),
        },
        watch_error,
    })
}

/// The `update held:` lines of `status`: the levers in force and what each stops, or why
/// nothing is held.
fn render_hold(out: &mut String, report: &StatusReport) {
    let label = |k: &str| {
        if k.is_empty() {
            "the next kernel (unknown)".to_string()
        } else {
            k.to_string()
        }
    };
    let policy = match report.policy.missing_next_overlay {
        MissingNextOverlayPolicy::Warn => "warn",
        MissingNextOverlayPolicy::Hold => "hold",
    };
    match &report.hold {
        Some(hold) if report.hold_levers.iter().any(|l| l.in_force) => {
            let _ = writeln!(
                out,
                "update held:     yes, the update to {}{}",
                label(&hold.kernel_release),
                hold.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            );
            for lever in &report.hold_levers {
                let _ = writeln!(
                    out,
                    "  {} {}: {}",
                    if lever.in_force {
                        "held by"
                    } else {
                        "NOT in force:"
                    },
                    lever.name,
                    lever.stops
                );
            }
            let _ = writeln!(out, "  no lever stops: {HOLD_CANNOT_STOP}");
            let _ = writeln!(out, "  let it through now: nvdriver-agent hold release");
        }
        Some(hold) => {
            let _ = writeln!(
                out,
                "update held:     NO: the hold on {} has no lever in force (the agent is not running?); `systemctl start nvdriver-agent` takes it again, `nvdriver-agent hold release` lets it go",
                label(&hold.kernel_release)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "update held:     no (policy.missing-next-overlay = {policy})"
            );
        }
    }
    if let Some(released) = &report.hold_released {
        let _ = writeln!(
            out,
            "hold let go:     the update to {} was let through without its overlay by {} (at {})",
            label(&released.kernel_release),
            match released.by.as_str() {
                "deadline" => "policy.hold-max-hours",
                _ => "the administrator (`nvdriver-agent hold release`)",
            },
            released.at
        );
    }
}

/// The `services:` lines: each driver service the host needs, and its unit's state.
fn render_services(out: &mut String, usable: &UsableFacts) {
    for service in usable.services.iter().filter(|s| s.needed) {
        let state = match (&service.state, &service.state_error) {
            (Some(state), _) => state.clone(),
            (None, Some(e)) => format!("unknown ({e})"),
            (None, None) => service.why.clone(),
        };
        let _ = writeln!(out, "service:         {} {state}", service.service.name());
    }
    if !usable.nvswitches.is_empty() {
        let fabric = match &usable.fabric {
            Some(usable::FabricFact::States(states)) => format!("{states:?}"),
            Some(usable::FabricFact::Unreadable(why)) => format!("unknown ({why})"),
            None => "not read".into(),
        };
        let _ = writeln!(
            out,
            "nvlink fabric:   {} NVSwitches; {fabric}",
            usable.nvswitches.len()
        );
    }
}

/// The human form of `status`.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "readiness:       {}{}",
        match report.readiness {
            Readiness::Ready => "ready now and after the next reboot",
            Readiness::NotReadyAfterReboot => "ready now, NOT after the next reboot",
            Readiness::NotReady => "NOT ready",
            Readiness::NoGpu => "NOT ready, no GPU",
        },
        report
            .readiness_detail
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "running kernel:  {}", report.running_kernel);
    let _ = writeln!(
        out,
        "driver loaded:   {}",
        report.loaded_driver.as_deref().unwrap_or("no")
    );
    if let Some(usable) = &report.usable {
        render_services(&mut out, usable);
    }
    let _ = writeln!(
        out,
        "daemon:          {}",
        match (report.daemon_pid, report.detector) {
            (Some(pid), Some(family)) => format!("running (pid {pid}), watching ({family:?})"),
            (Some(pid), None) => format!("running (pid {pid}), not watching"),
            (None, _) => "not running".into(),
        }
    );
    // When the next boot cannot be read, the readiness line says why (once); this line and
    // the warning below must not contradict it.
    let unknown_in_readiness = report.watch_error.as_deref().is_some_and(|e| {
        report
            .readiness_detail
            .as_deref()
            .is_some_and(|d| d.contains(e))
    });
    let pending = render_pending(report, unknown_in_readiness);
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
    render_hold(&mut out, report);
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
    if let Some(e) = report
        .watch_error
        .as_ref()
        .filter(|_| !unknown_in_readiness)
    {
        let _ = writeln!(out, "warning:         {e}");
    }
    out
}

/// The `next kernel:` line's value.
fn render_pending(report: &StatusReport, unknown_in_readiness: bool) -> String {
    match (&report.pending, report.pending_staged) {
        (None, _) if report.watch_error.is_some() => {
            if unknown_in_readiness {
                "unknown (cannot be read, see readiness)".into()
            } else {
                "unknown (cannot be read, see the warning)".into()
            }
        }
        (None, _) => "none (the next boot runs this kernel)".into(),
        (Some(next), staged) => format!(
            "{} from {}{}: {}",
            next.kernel_release,
            next.origin,
            if report.watch_error.is_some() {
                " (last known; reading it now failed, see the warning)"
            } else {
                ""
            },
            if staged == Some(true) {
                "overlay staged"
            } else {
                "NO overlay staged"
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(kernel: &str, result: &str) -> StageRecord {
        StageRecord {
            at: 1,
            kernel_release: kernel.into(),
            driver_version: None,
            result: result.parse().unwrap(),
            overlay: None,
            source: None,
            tried: Vec::new(),
            detail: None,
            duration_ms: 0,
            digest: None,
        }
    }

    #[test]
    fn readiness_now_and_after_the_reboot() {
        let loaded = ReadinessFacts {
            loaded_driver: Some("570.1"),
            ..Default::default()
        };
        assert_eq!(assess(&loaded), (Readiness::Ready, None));
        let pending_missing = ReadinessFacts {
            pending_kernel: Some("6.2"),
            ..loaded.clone()
        };
        let (readiness, why) = assess(&pending_missing);
        assert_eq!(readiness, Readiness::NotReadyAfterReboot);
        assert!(why.unwrap().contains("6.2"));
        assert_eq!(Readiness::NotReadyAfterReboot.exit_code(), 7);
        // Staged, or the OS ships the driver for that kernel.
        let staged = ReadinessFacts {
            pending_staged: true,
            ..pending_missing.clone()
        };
        assert_eq!(assess(&staged).0, Readiness::Ready);
        let os_covers = stage("6.2", "stood-down");
        let stood_down = ReadinessFacts {
            last_stage: Some(&os_covers),
            ..pending_missing.clone()
        };
        assert_eq!(assess(&stood_down).0, Readiness::Ready);
        // Not loaded, or marked by the fallback: not ready, whatever comes next.
        let (readiness, why) = assess(&ReadinessFacts::default());
        assert_eq!(readiness, Readiness::NotReady);
        assert!(why.unwrap().contains("not loaded"));
        let marked = ReadinessFacts {
            marked_not_ready: Some("load failed; to fix: …"),
            ..staged
        };
        assert_eq!(assess(&marked).0, Readiness::NotReady);
        assert_eq!(Readiness::NotReady.exit_code(), 8);
        // Loaded, but the GPU is not usable (a failed Fabric Manager): not ready, reasons named.
        let reasons = ["nv-fabricmanager is not running".to_string()];
        let (readiness, detail) = assess(&ReadinessFacts {
            not_usable: &reasons,
            ..loaded.clone()
        });
        assert_eq!(readiness, Readiness::NotReady);
        assert_eq!(
            detail.as_deref(),
            Some("the driver is loaded but the GPU is not usable: nv-fabricmanager is not running")
        );
        // The boot load found no GPU: its own readiness and exit code, the kernel's words.
        let no_gpu = LoadRecord {
            at: 1,
            kernel_release: "6.1".into(),
            result: LoadResult::NoGpu,
            driver_version: None,
            overlay: None,
            error: Some("no NVIDIA GPU on this host: … ENODEV …".into()),
        };
        let (readiness, why) = assess(&ReadinessFacts {
            load: Some(&no_gpu),
            ..ReadinessFacts::default()
        });
        assert_eq!(readiness, Readiness::NoGpu);
        assert!(why.unwrap().contains("ENODEV"));
        assert!(!readiness.ready_now());
        assert_eq!(Readiness::NoGpu.exit_code(), 9);
        assert!(policy_state(Readiness::NoGpu, Some("x"), None).starts_with("no-gpu: "));
        // The next boot cannot be read: ready now, nothing promised after the reboot.
        let unknown = ReadinessFacts {
            next_boot_unknown: Some("no boot entry"),
            ..loaded.clone()
        };
        let (readiness, why) = assess(&unknown);
        assert_eq!(readiness, Readiness::NotReadyAfterReboot);
        assert!(why.unwrap().contains("no boot entry"));
    }

    fn report(pending: Option<NextBoot>, watch_error: Option<&str>) -> StatusReport {
        let (readiness, readiness_detail) = assess(&ReadinessFacts {
            loaded_driver: Some("570.1"),
            pending_kernel: pending.as_ref().map(|n| n.kernel_release.as_str()),
            pending_staged: true,
            next_boot_unknown: watch_error,
            ..Default::default()
        });
        StatusReport {
            format: STATUS_FORMAT,
            running_kernel: "6.1".into(),
            usable: None,
            loaded_driver: Some("570.1".into()),
            daemon_pid: None,
            detector: Some(Family::Ostree),
            pending_staged: pending.as_ref().map(|_| true),
            pending,
            store: Vec::new(),
            load: None,
            last_stage: None,
            hold: None,
            hold_levers: Vec::new(),
            hold_released: None,
            policy: Policy {
                missing_next_overlay: MissingNextOverlayPolicy::Warn,
                store_dir: "/store".into(),
            },
            watch_error: watch_error.map(str::to_string),
            policy_state: policy_state(readiness, readiness_detail.as_deref(), None),
            readiness,
            readiness_detail,
            last_error: None,
            stage_failures: 0,
            read_from: "disk".into(),
        }
    }

    #[test]
    fn render_never_contradicts_an_unknown_next_boot() {
        let text = render(&report(None, Some("no boot entry")));
        assert!(
            text.contains("ready now, NOT after the next reboot"),
            "{text}"
        );
        assert!(!text.contains("the next boot runs this kernel"), "{text}");
        assert!(text.contains("next kernel:     unknown"), "{text}");
        assert_eq!(text.matches("no boot entry").count(), 1, "{text}");

        // The daemon's last reading stands in for it: readiness is judged on that.
        let last = NextBoot {
            kernel_release: "6.2".into(),
            origin: "ostree staged deployment".into(),
            module_tree: None,
            staged_deployment: true,
        };
        let text = render(&report(Some(last), Some("no boot entry")));
        assert!(
            text.contains("ready now and after the next reboot"),
            "{text}"
        );
        assert!(
            text.contains("6.2 from ostree staged deployment (last known"),
            "{text}"
        );
        assert_eq!(text.matches("no boot entry").count(), 1, "{text}");

        let text = render(&report(None, None));
        assert!(
            text.contains("ready now and after the next reboot"),
            "{text}"
        );
        assert!(
            text.contains("none (the next boot runs this kernel)"),
            "{text}"
        );
        assert!(!text.contains("warning"), "{text}");
    }

    #[test]
    fn policy_state_names_the_hold() {
        let mut hold = HoldRecord {
            levers: vec!["ostree-finalization-lock".into()],
            kernel_release: "6.2".into(),
            since: 1,
            detail: None,
        };
        assert_eq!(policy_state(Readiness::Ready, None, None), "ok");
        assert!(
            policy_state(Readiness::NotReadyAfterReboot, Some("x"), Some(&hold))
                .starts_with("held: the update to 6.2")
        );
        assert_eq!(
            policy_state(Readiness::NotReady, Some("why"), Some(&hold)),
            "not-ready: why"
        );
        // A record without a lever in force claims no hold.
        hold.levers.clear();
        assert_eq!(
            policy_state(Readiness::NotReadyAfterReboot, Some("x"), Some(&hold)),
            "not-ready-after-reboot: x"
        );
    }
}

//! Stage for the next kernel: detect it, decide, hold the update if its overlay is not in the
//! store yet, fetch, and let the hold go once the overlay is published.
//!
//! [`plan_stage`] and [`crate::update::hold::plan_hold`] are pure; [`stage_next`] is the one edge
//! that runs them, shared by the daemon and by `nvdriver-agent stage --now` at shutdown.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::app::Context;
use crate::host::version::version_cmp;
use crate::host::{HostError, HostFacts, KernelState};
use crate::overlay::source::{self, OverlayKey, SourceError};
use crate::overlay::store::ImportOutcome;
use crate::overlay::StoreError;
use crate::overlay::MANIFEST_NAME;
use crate::state::{
    now_unix, AgentState, HoldRecord, HoldRelease, StageRecord, StageResult, StateError,
};
use crate::update::hold::{
    levers_for, plan_hold, HoldAction, HoldError, HoldInputs, HoldLever, HoldLevers, HoldNeed,
    LetThrough,
};
use crate::watch::{self, flatcar::UpdateEngineState, Family, NextBoot, WatchError};

/// Why a stage pass ([`stage_next`]) could not finish; a source that has no overlay is not an
/// error but a [`StageResult::Missing`] record.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The host's facts (os-release, running kernel, loaded modules) could not be read.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The detector could not read which kernel boots next.
    #[error("cannot tell which kernel boots next: {0}")]
    Watch(WatchError),
    /// The overlay store could not be read (its inventory, for choosing a driver version).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A source error; [`stage_next`] never returns it (it records source failures in the stage
    /// record), so only other callers could.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A hold lever could not be taken or released; [`stage_next`] never returns it (it logs
    /// lever failures and records only the levers held), so only other callers could.
    #[error(transparent)]
    Hold(#[from] HoldError),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    /// `stage` without `--kernel` while `watch.detector = "off"`: there is no next kernel to detect.
    #[error(
        "watching is off (watch.detector = \"off\"); pass --kernel to stage for a given kernel"
    )]
    DetectorOff,
}

// By hand, not `#[from]`: the message already says the cause, and a source would repeat it.
impl From<WatchError> for StageError {
    fn from(e: WatchError) -> Self {
        StageError::Watch(e)
    }
}

impl StageError {
    /// The process exit code for this error (one of [`crate::app::exit`]).
    pub fn exit_code(&self) -> u8 {
        use crate::app::exit;
        match self {
            StageError::Source(e) if e.any_no_room() => exit::NO_ROOM,
            StageError::Source(SourceError::NotFound { .. } | SourceError::NoSources) => {
                exit::NO_OVERLAY
            }
            StageError::Source(_) | StageError::Store(_) => exit::INVALID_OVERLAY,
            StageError::DetectorOff => exit::CONFIG,
            _ => exit::FAILURE,
        }
    }
}

/// What to do for the next boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StagePlan {
    /// The next boot runs the running kernel: nothing to stage.
    NothingPending,
    /// The OS ships the driver for that kernel itself; the agent stays out of its way.
    StandDown {
        /// The kernel the next boot runs.
        kernel_release: String,
        /// Why the OS's own driver covers it (shown in the stage record).
        reason: String,
    },
    /// No driver version is pinned, loaded or staged, so the overlay to fetch is unknown.
    NoDriverVersion {
        /// The kernel the next boot runs.
        kernel_release: String,
    },
    /// Stage the overlay for this (kernel, driver version, arch) from the configured sources.
    Fetch(OverlayKey),
}

/// The facts [`plan_stage`] needs.
pub struct StageInputs<'a> {
    /// The kernel the next boot runs, `None` when it is the running one.
    pub next: Option<&'a NextBoot>,
    /// Why the OS's own driver covers the next kernel, if it does.
    pub os_driver: Option<String>,
    /// The driver version to stage (see [`choose_driver_version`]), `None` when there is none.
    pub driver_version: Option<String>,
    /// The host's architecture (`x86_64`, `aarch64`).
    pub arch: &'a str,
}

/// Decide what to stage for the next boot; pure.
pub fn plan_stage(inputs: &StageInputs) -> StagePlan {
    let Some(next) = inputs.next else {
        return StagePlan::NothingPending;
    };
    if let Some(reason) = &inputs.os_driver {
        return StagePlan::StandDown {
            kernel_release: next.kernel_release.clone(),
            reason: reason.clone(),
        };
    }
    match &inputs.driver_version {
        Some(driver_version) => StagePlan::Fetch(OverlayKey {
            kernel_release: next.kernel_release.clone(),
            driver_version: driver_version.clone(),
            arch: inputs.arch.to_string(),
        }),
        None => StagePlan::NoDriverVersion {
            kernel_release: next.kernel_release.clone(),
        },
    }
}

/// The driver version to stage for the next kernel: the pinned one, else the one loaded now,
/// else the newest staged for the running kernel, else the newest in the store at all.
pub fn choose_driver_version(
    pinned: Option<&str>,
    loaded: Option<&str>,
    for_running_kernel: &[String],
    in_store: &[String],
) -> Option<String> {
    let newest = |versions: &[String]| versions.iter().max_by(|a, b| version_cmp(a, b)).cloned();
    pinned
        .or(loaded)
        .map(str::to_string)
        .or_else(|| newest(for_running_kernel))
        .or_else(|| newest(in_store))
}

/// Whether the next boot will have its driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextBootReadiness {
    /// Staged, nothing pending, or the OS covers it.
    Covered,
    /// No overlay for the pending kernel (missing, failed, or unknown driver version).
    Missing,
}

/// What one stage pass found and did.
#[derive(Clone, Debug)]
pub struct StageRun {
    /// The kernel the next boot runs, `None` when it is the running one.
    pub pending: Option<NextBoot>,
    /// The stage record of this pass (`None` when nothing is pending).
    pub record: Option<StageRecord>,
    /// Whether the next boot has its driver.
    pub readiness: NextBootReadiness,
    /// What was done about the hold (already done, through the levers passed in); `None` for a
    /// kernel named on the command line, which never touches the hold.
    pub hold: Option<HoldAction>,
}

/// What to stage for: the detected next boot, or a kernel the user named.
pub enum Target {
    /// Ask the OS family's detector which kernel boots next.
    Detect {
        /// The OS family whose detector to use.
        family: Family,
        /// What the daemon last heard from Flatcar's update_engine (used by the Flatcar detector).
        update_engine: UpdateEngineState,
    },
    /// Stage for this kernel release (`stage --kernel`); nothing is pending if it is the running one.
    Kernel(String),
}

/// Detect, decide, hold, fetch, release. With `policy.missing-next-overlay = "hold"` the update
/// is held through `levers` *before* a fetch starts (a download may take many minutes) and let
/// go only once the overlay is published; when the next kernel cannot be told, what needs no
/// kernel is held ("fail closed") and the error returned. Writes the state file.
pub fn stage_next(
    ctx: &Context,
    target: &Target,
    driver_override: Option<&str>,
    levers: &mut dyn HoldLevers,
) -> Result<StageRun, StageError> {
    let started = Instant::now();
    let family = match target {
        Target::Detect { family, .. } => Some(*family),
        Target::Kernel(_) => None,
    };
    let detected = HostFacts::read(&ctx.root)
        .map_err(StageError::from)
        .and_then(|host| Ok((pending_kernel(ctx, target, &host)?, host)));
    let (pending, host) = match detected {
        Ok(((pending, _), host)) => (pending, host),
        Err(e) => {
            if let Some(family) = family {
                let mut state = AgentState::read(&ctx.root);
                let need = HoldNeed::Unknown(e.to_string());
                settle_hold(ctx, family, None, &need, &mut state, levers);
                state.write(&ctx.root)?;
            }
            return Err(e);
        }
    };
    let mut state = AgentState::read(&ctx.root);
    if state.pending != pending {
        match &pending {
            Some(next) => info!(
                KERNEL_RELEASE = %next.kernel_release,
                "next kernel: {} (from {})", next.kernel_release, next.origin
            ),
            None => info!("no kernel update pending"),
        }
        state.pending = pending.clone();
        // Written before staging so status shows the next kernel as soon as it is known.
        state.write(&ctx.root)?;
    }

    let os_driver = match (&pending, family) {
        (Some(next), Some(family)) => watch::os_ships_driver(&ctx.root, family, next),
        _ => None,
    };
    let driver_version = match driver_override {
        Some(v) => Some(v.to_string()),
        None => driver_version_to_stage(ctx, &host)?,
    };
    let plan = plan_stage(&StageInputs {
        next: pending.as_ref(),
        os_driver,
        driver_version,
        arch: &host.arch,
    });
    if let (Some(family), Some(next)) = (family, &pending) {
        if !in_store_before_fetch(ctx, &plan) {
            // Held before the fetch, and shown: status reads the state during the download.
            let need = HoldNeed::Missing(next.kernel_release.clone());
            settle_hold(ctx, family, Some(next), &need, &mut state, levers);
            state.write(&ctx.root)?;
        }
    }
    let (record, readiness) = carry_out(ctx, plan, pending.as_ref(), &host, &state);
    let record = record.map(|mut r| {
        r.duration_ms = started.elapsed().as_millis() as u64;
        r
    });

    let hold_action = family.map(|family| {
        let need = match (&pending, readiness) {
            (Some(next), NextBootReadiness::Missing) => {
                HoldNeed::Missing(next.kernel_release.clone())
            }
            _ => HoldNeed::Covered,
        };
        settle_hold(ctx, family, pending.as_ref(), &need, &mut state, levers)
    });

    state.pending = pending.clone();
    if let Some(record) = &record {
        remember(&mut state, record);
    }
    state.write(&ctx.root)?;
    Ok(StageRun {
        pending,
        record,
        readiness,
        hold: hold_action,
    })
}

/// Whether the plan's overlay is in the store already (or nothing needs one), judged cheaply
/// before the fetch; the fetch itself verifies.
fn in_store_before_fetch(ctx: &Context, plan: &StagePlan) -> bool {
    match plan {
        StagePlan::Fetch(key) => ctx
            .root
            .join(
                ctx.store()
                    .overlay_dir(&key.kernel_release, &key.driver_version)
                    .join(MANIFEST_NAME),
            )
            .exists(),
        StagePlan::NoDriverVersion { .. } => false,
        StagePlan::NothingPending | StagePlan::StandDown { .. } => true,
    }
}

/// The kernel the next boot runs when it is not the running one, and the OS family that said
/// so (`None` for a kernel named on the command line).
fn pending_kernel(
    ctx: &Context,
    target: &Target,
    host: &HostFacts,
) -> Result<(Option<NextBoot>, Option<Family>), StageError> {
    Ok(match target {
        Target::Detect {
            family,
            update_engine,
        } => (
            watch::next_boot(&ctx.root, *family, &host.kernel_release, *update_engine)?,
            Some(*family),
        ),
        Target::Kernel(kernel_release) => (
            (kernel_release != &host.kernel_release).then(|| NextBoot {
                kernel_release: kernel_release.clone(),
                origin: "named on the command line".into(),
                module_tree: None,
                staged_deployment: false,
            }),
            None,
        ),
    })
}

/// The driver version to stage when none is named: see [`choose_driver_version`].
fn driver_version_to_stage(ctx: &Context, host: &HostFacts) -> Result<Option<String>, StageError> {
    let kernel_state = KernelState::read(&ctx.root, &host.kernel_release)?;
    let loaded = kernel_state
        .is_loaded("nvidia")
        .and_then(|m| m.version.clone());
    let inventory = ctx.store().inventory()?;
    let for_running = inventory
        .iter()
        .find(|(kernel, _)| *kernel == host.kernel_release)
        .map(|(_, drivers)| drivers.clone())
        .unwrap_or_default();
    let all: Vec<String> = inventory.into_iter().flat_map(|(_, d)| d).collect();
    Ok(choose_driver_version(
        ctx.settings.driver_version.as_deref(),
        loaded.as_deref(),
        &for_running,
        &all,
    ))
}

/// Record the pass in the state: count failures, and keep the record of the stage that put the
/// overlay there when a later look only finds it (its source, digest and time say more than
/// "already-staged", and the file events of the stage itself bring such a look at once).
fn remember(state: &mut AgentState, record: &StageRecord) {
    if matches!(record.result, StageResult::Failed | StageResult::NoRoom) {
        state.stage_failures += 1;
    }
    let found_what_was_staged = record.result == StageResult::AlreadyStaged
        && state.last_stage.as_ref().is_some_and(|last| {
            last.result == StageResult::Staged
                && last.kernel_release == record.kernel_release
                && last.driver_version == record.driver_version
        });
    if !found_what_was_staged {
        state.last_stage = Some(record.clone());
    }
}

fn new_record(kernel_release: &str, result: StageResult) -> StageRecord {
    StageRecord {
        at: now_unix(),
        kernel_release: kernel_release.to_string(),
        driver_version: None,
        result,
        overlay: None,
        source: None,
        tried: Vec::new(),
        digest: None,
        detail: None,
        duration_ms: 0,
    }
}

/// Do what the plan says: nothing, stand down, or fetch; the record of it and whether the next
/// boot is covered.
fn carry_out(
    ctx: &Context,
    plan: StagePlan,
    pending: Option<&NextBoot>,
    host: &HostFacts,
    state: &AgentState,
) -> (Option<StageRecord>, NextBootReadiness) {
    let kernel_release = pending
        .map(|n| n.kernel_release.as_str())
        .unwrap_or_default();
    match plan {
        StagePlan::NothingPending => (None, NextBootReadiness::Covered),
        StagePlan::StandDown {
            kernel_release,
            reason,
        } => {
            info!(KERNEL_RELEASE = %kernel_release, "standing down for the next kernel: {reason}; nothing staged");
            let mut r = new_record(&kernel_release, StageResult::StoodDown);
            r.detail = Some(reason);
            (Some(r), NextBootReadiness::Covered)
        }
        StagePlan::NoDriverVersion { kernel_release } => {
            let detail = format!(
                "no driver version to stage for {kernel_release}: none is pinned (driver.version), loaded or in the store; set driver.version in /etc/nvdriver-agent/config.toml"
            );
            warn!(KERNEL_RELEASE = %kernel_release, "{detail}");
            let mut r = new_record(&kernel_release, StageResult::Missing);
            r.detail = Some(detail);
            (Some(r), NextBootReadiness::Missing)
        }
        StagePlan::Fetch(key) => {
            let mut r = new_record(kernel_release, StageResult::Staged);
            r.driver_version = Some(key.driver_version.clone());
            let module_tree = pending.and_then(|n| n.module_tree.as_deref());
            let readiness = fetch(ctx, &key, module_tree, host, state, &mut r);
            (Some(r), readiness)
        }
    }
}

/// Stage `key` from the configured sources into the store, filling in the record.
/// `module_tree` is the next kernel's module tree when it is not the running root's (ostree).
fn fetch(
    ctx: &Context,
    key: &OverlayKey,
    module_tree: Option<&Path>,
    host: &HostFacts,
    state: &AgentState,
    r: &mut StageRecord,
) -> NextBootReadiness {
    match source::stage(
        &ctx.root,
        &ctx.store(),
        &ctx.settings.stage,
        key,
        module_tree,
    ) {
        Ok(report) => {
            r.result = match report.outcome {
                ImportOutcome::AlreadyPresent { .. } => StageResult::AlreadyStaged,
                _ => StageResult::Staged,
            };
            let dir = outcome_dir(&report.outcome);
            r.overlay = Some(dir.clone());
            r.source = Some(report.source.clone());
            r.digest = report.digest.clone();
            r.tried = report.tried.iter().map(|t| t.to_string()).collect();
            if r.result == StageResult::Staged {
                info!(
                    KERNEL_RELEASE = %key.kernel_release,
                    DRIVER_VERSION = %key.driver_version,
                    OVERLAY = %dir.display(),
                    "overlay for the next kernel is in the store (from {})", report.source
                );
            } else {
                // Every later look finds it there: said once, when it was staged.
                debug!(
                    KERNEL_RELEASE = %key.kernel_release,
                    DRIVER_VERSION = %key.driver_version,
                    OVERLAY = %dir.display(),
                    "overlay for the next kernel is already in the store"
                );
            }
            gc(ctx, &host.kernel_release, &key.kernel_release);
            NextBootReadiness::Covered
        }
        Err(e) => {
            r.result = if e.any_no_room() {
                StageResult::NoRoom
            } else if matches!(e, SourceError::NotFound { .. } | SourceError::NoSources) {
                StageResult::Missing
            } else {
                StageResult::Failed
            };
            r.tried = tried_of(&e);
            r.detail = Some(e.to_string());
            // Said once; every later look that finds the same is debug (the retries and each
            // file event would repeat it).
            let repeated = state.last_stage.as_ref().is_some_and(|last| {
                last.kernel_release == r.kernel_release
                    && last.result == r.result
                    && last.detail == r.detail
            });
            if repeated {
                debug!(
                    KERNEL_RELEASE = %key.kernel_release,
                    DRIVER_VERSION = %key.driver_version,
                    "still no overlay staged for the next kernel: {e}"
                );
            } else {
                warn!(
                    KERNEL_RELEASE = %key.kernel_release,
                    DRIVER_VERSION = %key.driver_version,
                    "no overlay staged for the next kernel: {e}"
                );
            }
            NextBootReadiness::Missing
        }
    }
}

fn outcome_dir(outcome: &ImportOutcome) -> PathBuf {
    use ImportOutcome as O;
    match outcome {
        O::Imported { dir } | O::AlreadyPresent { dir } | O::Replaced { dir } => dir.clone(),
    }
}

fn tried_of(error: &SourceError) -> Vec<String> {
    match error {
        SourceError::NotFound { tried, .. } | SourceError::Failed { tried, .. } => {
            tried.iter().map(|t| t.to_string()).collect()
        }
        _ => Vec::new(),
    }
}

/// Keep the running and the pending kernels' overlays (and `keep-extra` more); a failure to
/// collect garbage never fails the stage.
fn gc(ctx: &Context, running: &str, pending: &str) {
    let keep = [running.to_string(), pending.to_string()];
    match ctx.store().gc(&keep, ctx.settings.stage.keep_extra) {
        Ok(removed) => {
            for dir in removed {
                info!(OVERLAY = %dir.display(), "removed an overlay no kernel needs");
            }
        }
        Err(e) => warn!("store garbage collection failed: {e}"),
    }
}

/// Plan the hold for `need` and carry it out through `levers`; the state file records it.
fn settle_hold(
    ctx: &Context,
    family: Family,
    pending: Option<&NextBoot>,
    need: &HoldNeed,
    state: &mut AgentState,
    levers: &mut dyn HoldLevers,
) -> HoldAction {
    let staged = match need {
        HoldNeed::Unknown(_) => None,
        _ => Some(pending.is_some_and(|n| n.staged_deployment)),
    };
    let available = levers_for(family, staged);
    let now = now_unix();
    // `hold release` may have run since this pass read the state (during a download, say):
    // what it wrote counts.
    if let Some(released) = AgentState::read(&ctx.root).hold_released {
        if state
            .hold
            .as_ref()
            .is_some_and(|h| h.kernel_release == released.kernel_release)
        {
            state.hold = None;
        }
        state.hold_released = Some(released);
    }
    let action = plan_hold(&HoldInputs {
        policy: ctx.settings.missing_next_overlay,
        max_hours: ctx.settings.hold_max_hours,
        levers: &available,
        need,
        current: state.hold.as_ref(),
        released: state.hold_released.as_ref(),
        now,
    });
    match &action {
        HoldAction::Take {
            levers: wanted,
            kernel_release,
            since,
        } => take_hold(wanted, kernel_release, *since, need, state, levers),
        HoldAction::Release => {
            levers.release();
            if let Some(hold) = state.hold.take() {
                info!(
                    KERNEL_RELEASE = %hold.kernel_release,
                    "the update is no longer held ({})",
                    match need {
                        HoldNeed::Covered => "the next boot has its driver, or nothing is pending",
                        _ => "policy.missing-next-overlay is no longer hold",
                    }
                );
            }
        }
        HoldAction::LetThrough {
            why,
            kernel_release,
            since,
        } => {
            levers.release();
            let held = state.hold.take().is_some();
            let recorded = state
                .hold_released
                .as_ref()
                .is_some_and(|r| &r.kernel_release == kernel_release);
            if !recorded {
                state.hold_released = Some(HoldRelease {
                    kernel_release: kernel_release.clone(),
                    by: why.as_str().into(),
                    since: *since,
                    at: now,
                });
            }
            if held || !recorded {
                let kernel = kernel_label(kernel_release);
                match why {
                    LetThrough::Deadline => warn!(
                        KERNEL_RELEASE = %kernel_release,
                        "letting the update to {kernel} through WITHOUT its NVIDIA overlay: policy.hold-max-hours = {} has passed since it was first held; the next boot may have no GPU driver unless an overlay is staged before it (`nvdriver-agent stage --kernel {kernel}`)",
                        ctx.settings.hold_max_hours.unwrap_or_default()
                    ),
                    LetThrough::Administrator => warn!(
                        KERNEL_RELEASE = %kernel_release,
                        "the update to {kernel} is let through (`nvdriver-agent hold release`); it is not held again"
                    ),
                }
            }
        }
        HoldAction::Unsupported => warn!(
            "policy.missing-next-overlay = hold, but this host has no way to hold this update (detector off, or no lever for this OS); warning only"
        ),
    }
    action
}

/// Take the levers for `kernel_release` and record what is held.
fn take_hold(
    wanted: &[HoldLever],
    kernel_release: &str,
    since: u64,
    need: &HoldNeed,
    state: &mut AgentState,
    levers: &mut dyn HoldLevers,
) {
    let kernel = kernel_label(kernel_release);
    let why = match need {
        HoldNeed::Unknown(error) => format!("next kernel unknown: {error}"),
        _ => format!("no NVIDIA driver overlay for kernel {kernel} yet"),
    };
    let held = levers.take(wanted, kernel_release, &why);
    let same_kernel = state
        .hold
        .as_ref()
        .filter(|h| h.kernel_release == kernel_release);
    // A one-shot `stage --now` holds fewer levers than the daemon: keep what the record says
    // the daemon holds for the same kernel.
    let mut names: Vec<String> = same_kernel.map(|h| h.levers.clone()).unwrap_or_default();
    for lever in &held {
        if !names.iter().any(|n| n == lever.name()) {
            names.push(lever.name().into());
        }
    }
    if names.is_empty() {
        warn!(
            KERNEL_RELEASE = %kernel_release,
            "policy.missing-next-overlay = hold, but no hold lever could be taken ({why}): the update to {kernel} is NOT held"
        );
        return;
    }
    if same_kernel.is_none() {
        warn!(
            KERNEL_RELEASE = %kernel_release,
            "holding the update to {kernel}: {why} (policy.missing-next-overlay = hold; held by {}); let go when the overlay is staged; to let it through now run `nvdriver-agent hold release`",
            names.join(", ")
        );
    }
    state.hold = Some(HoldRecord {
        levers: names,
        kernel_release: kernel_release.to_string(),
        since,
        detail: matches!(need, HoldNeed::Unknown(_)).then_some(why),
    });
}

/// A kernel release for messages: the unknown one says so.
fn kernel_label(kernel_release: &str) -> &str {
    if kernel_release.is_empty() {
        "the next kernel (unknown)"
    } else {
        kernel_release
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(kver: &str) -> NextBoot {
        NextBoot {
            kernel_release: kver.into(),
            origin: "test".into(),
            module_tree: None,
            staged_deployment: true,
        }
    }

    #[test]
    fn plans_by_what_is_pending() {
        let n = next("6.2.0");
        let inputs = |next, os_driver, driver: Option<&str>| StageInputs {
            next,
            os_driver,
            driver_version: driver.map(str::to_string),
            arch: "x86_64",
        };
        assert_eq!(
            plan_stage(&inputs(None, None, Some("570.1"))),
            StagePlan::NothingPending
        );
        assert_eq!(
            plan_stage(&inputs(Some(&n), Some("distro kmod".into()), Some("570.1"))),
            StagePlan::StandDown {
                kernel_release: "6.2.0".into(),
                reason: "distro kmod".into()
            }
        );
        assert_eq!(
            plan_stage(&inputs(Some(&n), None, None)),
            StagePlan::NoDriverVersion {
                kernel_release: "6.2.0".into()
            }
        );
        assert_eq!(
            plan_stage(&inputs(Some(&n), None, Some("570.1"))),
            StagePlan::Fetch(OverlayKey {
                kernel_release: "6.2.0".into(),
                driver_version: "570.1".into(),
                arch: "x86_64".into()
            })
        );
    }

    #[test]
    fn driver_version_prefers_pinned_then_loaded_then_store() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose_driver_version(Some("550.1"), Some("570.1"), &v(&["580.1"]), &[]),
            Some("550.1".into())
        );
        assert_eq!(
            choose_driver_version(None, Some("570.1"), &v(&["580.1"]), &[]),
            Some("570.1".into())
        );
        assert_eq!(
            choose_driver_version(None, None, &v(&["570.9", "570.10"]), &v(&["999.1"])),
            Some("570.10".into())
        );
        assert_eq!(
            choose_driver_version(None, None, &[], &v(&["550.1", "570.1"])),
            Some("570.1".into())
        );
        assert_eq!(choose_driver_version(None, None, &[], &[]), None);
    }
}

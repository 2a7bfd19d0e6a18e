//! What the daemon does when loading the driver at boot failed (`[fallback] on-load-failure`).
//!
//! [`plan_fallback`] decides from data; [`after_boot_load`] is the thin edge. A rollback is
//! remembered in `/var/lib/nvdriver-agent/fallback.json` (it must survive the reboot it
//! causes) so the agent never rolls back twice away from the same kernel, and never twice in a
//! row without a successful load in between: a host whose old deployment fails too stays put,
//! marked not ready, instead of bouncing between deployments.

use std::path::PathBuf;
use std::process::Command;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::LoadFailureFallback;
use crate::fsutil;
use crate::host::Root;
use crate::state::{now_unix, AgentState, LoadRecord, LoadResult};

/// Host path of the [`FallbackRecord`] (under `/var/lib`, so it survives the reboot a rollback
/// causes).
pub const FALLBACK_RECORD: &str = "/var/lib/nvdriver-agent/fallback.json";

/// Errors acting on a failed boot load.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// [`FALLBACK_RECORD`] could not be written: before a rollback (which is then not attempted),
    /// or when noting a successful load after one.
    #[error("cannot record the rollback attempt in {path}: {error}; not rolling back (without the record the agent could roll back in a loop)")]
    Record {
        /// [`FALLBACK_RECORD`] (host path).
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// `rpm-ostree rollback --reboot` could not be started or exited non-zero; holds the spawn
    /// error or its stderr.
    #[error("`rpm-ostree rollback --reboot` failed: {0}; run it by hand, or fix the driver (`nvdriver-agent doctor`)")]
    Rollback(String),
    /// The agent's state file (where "not ready" is recorded) could not be written.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// What the agent remembers across reboots about its rollbacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FallbackRecord {
    /// Kernel releases the agent rolled back away from, oldest first.
    pub rolled_back_from: Vec<String>,
    /// Whether a boot load succeeded since the last rollback.
    pub loaded_since: bool,
    /// When the last rollback was started, in seconds since the Unix epoch (0 before any).
    pub last_at: u64,
}

impl FallbackRecord {
    /// Absent or unreadable reads as "never rolled back"; an unreadable one is said.
    pub fn read(root: &Root) -> FallbackRecord {
        match std::fs::read(root.join(FALLBACK_RECORD)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!("{FALLBACK_RECORD} is not valid ({e}); treating it as no rollback tried");
                FallbackRecord::default()
            }),
            Err(_) => FallbackRecord::default(),
        }
    }

    /// Write the record atomically to [`FALLBACK_RECORD`] under `root`, creating its directory.
    pub fn write(&self, root: &Root) -> Result<(), FallbackError> {
        let path = root.join(FALLBACK_RECORD);
        let err = |source| FallbackError::Record {
            path: PathBuf::from(FALLBACK_RECORD),
            error: source,
        };
        if let Some(dir) = path.parent() {
            fsutil::create_dir_all_mode(dir, 0o755).map_err(err)?;
        }
        let mut json = serde_json::to_vec_pretty(self).expect("record serializes");
        json.push(b'\n');
        fsutil::write_atomic(&path, &json, 0o644).map_err(err)
    }
}

/// The facts the decision rests on.
#[derive(Clone, Debug)]
pub struct FallbackFacts<'a> {
    /// `[fallback] on-load-failure` from the configuration.
    pub policy: LoadFailureFallback,
    /// What the boot load ended with.
    pub load: &'a LoadRecord,
    /// The host is an rpm-ostree host (it has a previous deployment to roll back to).
    pub rpm_ostree: bool,
    /// The rollbacks remembered across reboots.
    pub record: &'a FallbackRecord,
}

/// What [`plan_fallback`] decides to do about the boot load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FallbackAction {
    /// The load did not fail, or the policy is off.
    Nothing,
    /// Say why and how to fix it; every output says "not ready".
    MarkNotReady {
        /// What failed, and why the agent does not roll back (when that applies).
        why: String,
        /// The commands that fix it.
        fix: String,
    },
    /// `rpm-ostree rollback --reboot`, away from `kernel_release`.
    Rollback {
        /// The running (failing) kernel, recorded in [`FallbackRecord::rolled_back_from`].
        kernel_release: String,
        /// What failed.
        why: String,
    },
}

/// Decide; pure.
pub fn plan_fallback(facts: &FallbackFacts) -> FallbackAction {
    let load = facts.load;
    let kernel = &load.kernel_release;
    let why = match load.result {
        LoadResult::Failed => format!(
            "loading the NVIDIA driver for kernel {kernel} failed: {}",
            load.error.as_deref().unwrap_or("no detail")
        ),
        LoadResult::NoOverlay => {
            format!("the store has no driver overlay for the running kernel {kernel}")
        }
        // No GPU is no fault of the kernel or the overlay: nothing to roll back or mark.
        LoadResult::Loaded | LoadResult::NoGpu => return FallbackAction::Nothing,
    };
    let fix = match load.result {
        LoadResult::NoOverlay => format!(
            "stage one (`nvdriver-agent stage --now --kernel {kernel}`, or `nvdriver-agent overlay import DIR`), then `systemctl restart nvdriver-agent`"
        ),
        _ => "`nvdriver-agent doctor` names what is wrong; fix it, then `systemctl restart nvdriver-agent`".into(),
    };
    match facts.policy {
        LoadFailureFallback::Off => FallbackAction::Nothing,
        LoadFailureFallback::MarkNotReady => FallbackAction::MarkNotReady { why, fix },
        LoadFailureFallback::Rollback if !facts.rpm_ostree => FallbackAction::MarkNotReady {
            why: format!("{why}; no rollback: not an rpm-ostree host"),
            fix,
        },
        LoadFailureFallback::Rollback => {
            let record = facts.record;
            if record.rolled_back_from.iter().any(|k| k == kernel) {
                FallbackAction::MarkNotReady {
                    why: format!("{why}; the agent rolled back away from {kernel} once already"),
                    fix: format!("{fix}; or `rpm-ostree rollback --reboot` by hand"),
                }
            } else if !record.rolled_back_from.is_empty() && !record.loaded_since {
                FallbackAction::MarkNotReady {
                    why: format!(
                        "{why}; the agent rolled back from {} in the last boot and the driver has not loaded since, so it does not roll back again",
                        record.rolled_back_from.last().map(String::as_str).unwrap_or_default()
                    ),
                    fix,
                }
            } else {
                FallbackAction::Rollback {
                    kernel_release: kernel.clone(),
                    why,
                }
            }
        }
    }
}

/// After the boot path: remember a success, or act on a failure. Returns the action taken.
pub fn after_boot_load(
    root: &Root,
    policy: LoadFailureFallback,
    load: &LoadRecord,
    rpm_ostree: bool,
) -> Result<FallbackAction, FallbackError> {
    let mut record = FallbackRecord::read(root);
    if load.result == LoadResult::Loaded {
        if !record.rolled_back_from.is_empty() && !record.loaded_since {
            record.loaded_since = true;
            record.write(root)?;
        }
        clear_not_ready(root)?;
        return Ok(FallbackAction::Nothing);
    }
    let action = plan_fallback(&FallbackFacts {
        policy,
        load,
        rpm_ostree,
        record: &record,
    });
    execute(root, &action, &mut record, &load.kernel_release)?;
    Ok(action)
}

fn clear_not_ready(root: &Root) -> Result<(), FallbackError> {
    let mut state = AgentState::read(root);
    if state.not_ready.is_some() {
        state.not_ready = None;
        state.write(root)?;
    }
    Ok(())
}

fn execute(
    root: &Root,
    action: &FallbackAction,
    record: &mut FallbackRecord,
    running_kernel: &str,
) -> Result<(), FallbackError> {
    match action {
        FallbackAction::Nothing => Ok(()),
        FallbackAction::MarkNotReady { why, fix } => {
            error!(KERNEL_RELEASE = %running_kernel, "the node is not ready for GPU work: {why}. To fix: {fix}");
            let mut state = AgentState::read(root);
            state.not_ready = Some(format!("{why}; to fix: {fix}"));
            state.write(root)?;
            Ok(())
        }
        FallbackAction::Rollback {
            kernel_release,
            why,
        } => {
            // Recorded first: whatever happens next, this kernel is never rolled back from again.
            record.rolled_back_from.push(kernel_release.clone());
            record.loaded_since = false;
            record.last_at = now_unix();
            record.write(root)?;
            let mut state = AgentState::read(root);
            state.not_ready = Some(format!(
                "{why}; rolling back to the previous deployment (fallback.on-load-failure = rollback)"
            ));
            state.write(root)?;
            error!(KERNEL_RELEASE = %kernel_release, "{why}; rolling back to the previous deployment and rebooting (fallback.on-load-failure = rollback)");
            if !root.is_host() {
                // A fake root (tests): the host's rpm-ostree is not ours to run.
                info!("not running `rpm-ostree rollback --reboot`: --root is not /");
                return Ok(());
            }
            let output = Command::new("rpm-ostree")
                .args(["rollback", "--reboot"])
                .output()
                .map_err(|e| FallbackError::Rollback(e.to_string()))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(FallbackError::Rollback(
                    String::from_utf8_lossy(&output.stderr).trim().to_string(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(result: &str) -> LoadRecord {
        LoadRecord {
            at: 1,
            kernel_release: "6.11.3-200.fc40.x86_64".into(),
            result: result.parse().unwrap(),
            driver_version: None,
            overlay: None,
            error: (result == "failed").then(|| "Invalid module format".into()),
        }
    }

    fn plan(
        policy: LoadFailureFallback,
        result: &str,
        rpm_ostree: bool,
        record: &FallbackRecord,
    ) -> FallbackAction {
        plan_fallback(&FallbackFacts {
            policy,
            load: &load(result),
            rpm_ostree,
            record,
        })
    }

    #[test]
    fn success_or_policy_off_does_nothing() {
        let none = FallbackRecord::default();
        for policy in [
            LoadFailureFallback::Off,
            LoadFailureFallback::MarkNotReady,
            LoadFailureFallback::Rollback,
        ] {
            assert_eq!(plan(policy, "loaded", true, &none), FallbackAction::Nothing);
            // No GPU is not the overlay's or the kernel's fault: no rollback, no marking.
            assert_eq!(plan(policy, "no-gpu", true, &none), FallbackAction::Nothing);
        }
        for result in ["failed", "no-overlay"] {
            assert_eq!(
                plan(LoadFailureFallback::Off, result, true, &none),
                FallbackAction::Nothing
            );
        }
    }

    #[test]
    fn mark_not_ready_says_why_and_the_fix() {
        let none = FallbackRecord::default();
        match plan(LoadFailureFallback::MarkNotReady, "failed", true, &none) {
            FallbackAction::MarkNotReady { why, fix } => {
                assert!(why.contains("Invalid module format"), "{why}");
                assert!(fix.contains("nvdriver-agent doctor"), "{fix}");
            }
            other => panic!("{other:?}"),
        }
        match plan(
            LoadFailureFallback::MarkNotReady,
            "no-overlay",
            false,
            &none,
        ) {
            FallbackAction::MarkNotReady { fix, .. } => assert!(
                fix.contains("stage --now --kernel 6.11.3-200.fc40.x86_64"),
                "{fix}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rollback_only_on_rpm_ostree() {
        let none = FallbackRecord::default();
        assert_eq!(
            plan(LoadFailureFallback::Rollback, "failed", true, &none),
            FallbackAction::Rollback {
                kernel_release: "6.11.3-200.fc40.x86_64".into(),
                why: "loading the NVIDIA driver for kernel 6.11.3-200.fc40.x86_64 failed: Invalid module format".into()
            }
        );
        match plan(LoadFailureFallback::Rollback, "failed", false, &none) {
            FallbackAction::MarkNotReady { why, .. } => {
                assert!(why.contains("not an rpm-ostree host"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn never_rolls_back_twice_from_one_kernel_nor_twice_in_a_row() {
        // Rolled back away from this kernel before (it came back with a later update).
        let from_this = FallbackRecord {
            rolled_back_from: vec!["6.11.3-200.fc40.x86_64".into()],
            loaded_since: true,
            last_at: 1,
        };
        assert!(matches!(
            plan(LoadFailureFallback::Rollback, "failed", true, &from_this),
            FallbackAction::MarkNotReady { .. }
        ));
        // The deployment rolled back to fails too: stay, do not bounce back.
        let bounced = FallbackRecord {
            rolled_back_from: vec!["6.12.0-100.fc41.x86_64".into()],
            loaded_since: false,
            last_at: 1,
        };
        match plan(LoadFailureFallback::Rollback, "no-overlay", true, &bounced) {
            FallbackAction::MarkNotReady { why, .. } => {
                assert!(why.contains("not loaded since"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // After a good boot, a different kernel may be rolled back from once.
        let recovered = FallbackRecord {
            loaded_since: true,
            ..bounced
        };
        assert!(matches!(
            plan(LoadFailureFallback::Rollback, "failed", true, &recovered),
            FallbackAction::Rollback { .. }
        ));
    }

    #[test]
    fn a_rollback_is_recorded_before_anything_else_and_a_success_noted() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let action =
            after_boot_load(&root, LoadFailureFallback::Rollback, &load("failed"), true).unwrap();
        assert!(matches!(action, FallbackAction::Rollback { .. }));
        let record = FallbackRecord::read(&root);
        assert_eq!(record.rolled_back_from, ["6.11.3-200.fc40.x86_64"]);
        assert!(!record.loaded_since);
        assert!(AgentState::read(&root).not_ready.is_some());
        // The same failure in the next boot: no second rollback.
        let again =
            after_boot_load(&root, LoadFailureFallback::Rollback, &load("failed"), true).unwrap();
        assert!(matches!(again, FallbackAction::MarkNotReady { .. }));
        // A good load clears the mark and notes the success.
        let ok =
            after_boot_load(&root, LoadFailureFallback::Rollback, &load("loaded"), true).unwrap();
        assert_eq!(ok, FallbackAction::Nothing);
        assert!(FallbackRecord::read(&root).loaded_since);
        assert_eq!(AgentState::read(&root).not_ready, None);
    }
}

//! What the agent last saw and did, kept in `/run/nvdriver-agent/state.json` so that `status`,
//! the next daemon start and the shutdown-time `stage --now` all see the same facts.
//!
//! The file is rewritten atomically on every change and is versioned (`format`); a file this
//! version cannot read is treated as absent (it lives in `/run`: a reboot clears it anyway).

pub mod instance;

use crate::failpoints::failpoint;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::fsutil;
use crate::host::Root;
use crate::watch::flatcar::{self, UpdateEngineState};
use crate::watch::NextBoot;

/// The state file, as a host path.
pub const STATE_FILE: &str = "/run/nvdriver-agent/state.json";
/// The `format` this agent writes and reads; a file with another one is ignored.
pub const STATE_FORMAT: u32 = 1;

/// Why the state file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating `/run/nvdriver-agent` or the atomic write failed.
    #[error("cannot write the agent state {path}: {error}; is /run mounted and writable?")]
    Write {
        /// The state file, as a host path ([`STATE_FILE`]).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
}

/// Seconds since the epoch, for records (the journal has the precise times).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Everything in the state file; [`AgentState::read`] and [`AgentState::write`] move it to and
/// from disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentState {
    /// The file's version; always [`STATE_FORMAT`] once read.
    pub format: u32,
    /// The boot path's result in this boot.
    pub load: Option<LoadRecord>,
    /// The kernel the host boots next, when it differs from the running one.
    pub pending: Option<NextBoot>,
    /// The last decision or stage for the pending kernel.
    pub last_stage: Option<StageRecord>,
    /// An update the agent is holding back (policy `hold`).
    pub hold: Option<HoldRecord>,
    /// The last hold let go before its overlay came (`hold release`, `policy.hold-max-hours`):
    /// not taken again for that kernel.
    #[serde(default)]
    pub hold_released: Option<HoldRelease>,
    /// Flatcar: update_engine's last reported `current_operation`, as the daemon heard it
    /// (so the shutdown-time `stage --now` knows whether an update waits for the reboot).
    #[serde(default)]
    pub update_engine_operation: Option<String>,
    /// Stages that failed (an overlay found but unusable, or a fetch error) in this boot; a
    /// Prometheus counter, so it only grows.
    #[serde(default)]
    pub stage_failures: u64,
    /// Set by the `[fallback]` policy after a failed boot load: why the node is not ready and
    /// what fixes it. Every output says "not ready" while it is set.
    #[serde(default)]
    pub not_ready: Option<String>,
}

/// How the boot path's load ended (the state file and `status --json` spell it in kebab-case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadResult {
    /// The driver is loaded from the overlay.
    Loaded,
    /// No overlay for the running kernel, and the policy said carry on.
    NoOverlay,
    /// The load failed; the record's `error` says why.
    Failed,
    /// The `nvidia` module's own init found no NVIDIA GPU (`ENODEV`): the overlay is fine, the
    /// host has nothing for it to drive. The record's `error` has the kernel's answer.
    NoGpu,
}

impl LoadResult {
    /// The word the state file and `status` use.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadResult::Loaded => "loaded",
            LoadResult::NoOverlay => "no-overlay",
            LoadResult::Failed => "failed",
            LoadResult::NoGpu => "no-gpu",
        }
    }
}

impl std::str::FromStr for LoadResult {
    type Err = String;

    /// The word [`LoadResult::as_str`] gives; anything else is named back in the error.
    fn from_str(word: &str) -> Result<Self, Self::Err> {
        [
            LoadResult::Loaded,
            LoadResult::NoOverlay,
            LoadResult::Failed,
            LoadResult::NoGpu,
        ]
        .into_iter()
        .find(|r| r.as_str() == word)
        .ok_or_else(|| format!("not a load result: {word:?}"))
    }
}

impl std::fmt::Display for LoadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a stage pass for the next kernel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageResult {
    /// This pass put the overlay into the store.
    Staged,
    /// The overlay was in the store already.
    AlreadyStaged,
    /// The OS ships the driver for that kernel itself; nothing staged.
    StoodDown,
    /// No source has the overlay (or no driver version to look for).
    Missing,
    /// A source had it but staging failed.
    Failed,
    /// A source had it, but the store's file system has no room for it with its reserve
    /// (`stage.keep-free-*`) left free.
    NoRoom,
}

impl StageResult {
    /// The word the state file and `status` use.
    pub fn as_str(self) -> &'static str {
        match self {
            StageResult::Staged => "staged",
            StageResult::AlreadyStaged => "already-staged",
            StageResult::StoodDown => "stood-down",
            StageResult::Missing => "missing",
            StageResult::Failed => "failed",
            StageResult::NoRoom => "no-room",
        }
    }
}

impl std::str::FromStr for StageResult {
    type Err = String;

    /// The word [`StageResult::as_str`] gives; anything else is named back in the error.
    fn from_str(word: &str) -> Result<Self, Self::Err> {
        [
            StageResult::Staged,
            StageResult::AlreadyStaged,
            StageResult::StoodDown,
            StageResult::Missing,
            StageResult::Failed,
            StageResult::NoRoom,
        ]
        .into_iter()
        .find(|r| r.as_str() == word)
        .ok_or_else(|| format!("not a stage result: {word:?}"))
    }
}

impl std::fmt::Display for StageResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The daemon's boot-path load in this boot, as the state file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LoadRecord {
    /// When it happened, in seconds since the epoch.
    pub at: u64,
    /// The running kernel (empty when it could not be read).
    pub kernel_release: String,
    /// How it ended.
    pub result: LoadResult,
    /// The driver version loaded, when it was.
    pub driver_version: Option<String>,
    /// The store directory of the overlay loaded, when it was.
    pub overlay: Option<PathBuf>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// One stage pass for the next kernel, as the state file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StageRecord {
    /// When it happened, in seconds since the epoch.
    pub at: u64,
    /// The kernel staged for.
    pub kernel_release: String,
    /// The driver version staged, when one was chosen.
    pub driver_version: Option<String>,
    /// A look that finds the overlay a `staged` record names already in the store leaves that
    /// record as it is.
    pub result: StageResult,
    /// The store directory of the overlay, when there is one.
    pub overlay: Option<PathBuf>,
    /// The source it came from, when it was fetched.
    pub source: Option<String>,
    /// Every source tried, with why it did not give the overlay.
    pub tried: Vec<String>,
    /// For an `oci://` source: the digest its reference resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Why it stood down, or why the overlay is missing or failed.
    pub detail: Option<String>,
    /// How long the pass took, in milliseconds.
    pub duration_ms: u64,
}

/// An update the agent holds back (policy `hold`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HoldRecord {
    /// The levers held: `ostree-finalization-lock`, `logind-shutdown-inhibitor`,
    /// `reboot-refusal` (`crate::update::hold::HoldLever`).
    #[serde(default)]
    pub levers: Vec<String>,
    /// The kernel whose update is held; empty when the next kernel could not be told.
    pub kernel_release: String,
    /// When the hold for this kernel was first taken, in seconds since the epoch.
    pub since: u64,
    /// Why, when it is not simply "no overlay yet": `next kernel unknown: <error>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A hold let go before its overlay came.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HoldRelease {
    /// The kernel let through (empty: the unknown next kernel).
    pub kernel_release: String,
    /// `administrator` (`nvdriver-agent hold release`) or `deadline` (`policy.hold-max-hours`).
    pub by: String,
    /// When the hold for that kernel was first taken.
    pub since: u64,
    /// When it was let go, in seconds since the epoch.
    pub at: u64,
}

impl AgentState {
    /// Read the state under `root`; absent or unreadable means a fresh start.
    pub fn read(root: &Root) -> AgentState {
        let path = root.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<AgentState>(&bytes) {
                Ok(state) if state.format == STATE_FORMAT => state,
                Ok(state) => {
                    warn!(
                        "{} has format {}, this agent writes {}; starting afresh",
                        path.display(),
                        state.format,
                        STATE_FORMAT
                    );
                    AgentState::fresh()
                }
                Err(e) => {
                    warn!("{} is not valid ({e}); starting afresh", path.display());
                    AgentState::fresh()
                }
            },
            Err(_) => AgentState::fresh(),
        }
    }

    /// An empty state at the current [`STATE_FORMAT`].
    pub fn fresh() -> AgentState {
        AgentState {
            format: STATE_FORMAT,
            ..AgentState::default()
        }
    }

    /// Write the state under `root` atomically, creating `/run/nvdriver-agent` if needed.
    pub fn write(&self, root: &Root) -> Result<(), StateError> {
        let path = root.join(STATE_FILE);
        let write = |source| StateError::Write {
            path: PathBuf::from(STATE_FILE),
            error: source,
        };
        if let Some(dir) = path.parent() {
            fsutil::create_dir_all_mode(dir, 0o755).map_err(write)?;
        }
        let mut json = serde_json::to_vec_pretty(self).expect("state serializes");
        json.push(b'\n');
        failpoint!("state::write");
        fsutil::write_atomic(&path, &json, 0o644).map_err(write)
    }
}

/// Where the state file is, under a root (for tests and messages).
pub fn state_path(root: &Root) -> PathBuf {
    root.join(Path::new(STATE_FILE))
}

/// update_engine's state as the daemon last heard it (`Unknown` without a daemon).
pub fn last_update_engine_state(root: &Root) -> UpdateEngineState {
    AgentState::read(root)
        .update_engine_operation
        .as_deref()
        .map(flatcar::update_engine_state)
        .unwrap_or(UpdateEngineState::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_foreign_formats() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        assert_eq!(AgentState::read(&root), AgentState::fresh());
        let mut state = AgentState::fresh();
        state.hold = Some(HoldRecord {
            levers: vec!["ostree-finalization-lock".into()],
            kernel_release: "6.1.0-29-cloud-amd64".into(),
            since: 7,
            detail: None,
        });
        state.write(&root).unwrap();
        assert_eq!(AgentState::read(&root), state);

        std::fs::write(state_path(&root), r#"{"format": 99}"#).unwrap();
        assert_eq!(AgentState::read(&root), AgentState::fresh());
        std::fs::write(state_path(&root), "{not json").unwrap();
        assert_eq!(AgentState::read(&root), AgentState::fresh());
    }
}

//! The `hold` policy's edges: keep an OS update from taking effect while no overlay exists for
//! its kernel, and let it go the moment one is staged.
//!
//! - ostree: `/run/ostree/staged-deployment-locked` makes `ostree admin finalize-staged` (run at
//!   shutdown) leave the staged deployment unfinalized, so the next boot is the current
//!   deployment again. The same file is what `rpm-ostree deploy --lock-finalization` creates, so
//!   the agent marks the locks it made (`/run/nvdriver-agent/ostree-hold`) and never removes a
//!   lock an administrator took.
//! - Flatcar: a logind `shutdown` block inhibitor, held by the daemon process (closing its fd
//!   releases it). See [`crate::watch::dbus::inhibit_shutdown`].

use crate::failpoints::failpoint;
use crate::fsutil::{PathIoError, WithPath};
use std::io;

use tracing::info;

use crate::fsutil;
use crate::host::Root;

/// ostree's finalization lock: while it exists, the staged deployment is not finalized at
/// shutdown (the same file `rpm-ostree deploy --lock-finalization` creates).
pub const OSTREE_FINALIZATION_LOCK: &str = "/run/ostree/staged-deployment-locked";
/// Our mark that the lock above is ours; holds the kernel release it was taken for.
pub const OSTREE_HOLD_MARK: &str = "/run/nvdriver-agent/ostree-hold";

/// Why the ostree hold could not be taken or released.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Creating or removing the lock, the mark or their directories failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// How a pending update can be held on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldMechanism {
    /// `/run/ostree/staged-deployment-locked` (a staged ostree deployment).
    OstreeFinalizationLock,
    /// A logind `shutdown` block inhibitor held by the daemon (Flatcar).
    LogindShutdownInhibitor,
}

impl HoldMechanism {
    /// The kebab-case name, as in the state file and on D-Bus.
    pub fn name(self) -> &'static str {
        match self {
            HoldMechanism::OstreeFinalizationLock => "ostree-finalization-lock",
            HoldMechanism::LogindShutdownInhibitor => "logind-shutdown-inhibitor",
        }
    }
}

/// What taking the ostree lock found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OstreeLockOutcome {
    /// We created the lock.
    Taken,
    /// Ours was already there.
    AlreadyOurs,
    /// Someone else (an administrator, `--lock-finalization`) holds it; we leave it alone.
    HeldByOther,
}

/// Keep the staged ostree deployment from being finalized.
pub fn take_ostree_lock(root: &Root, kernel_release: &str) -> Result<OstreeLockOutcome, HoldError> {
    let lock = root.join(OSTREE_FINALIZATION_LOCK);
    let mark = root.join(OSTREE_HOLD_MARK);
    if mark.exists() && lock.exists() {
        return Ok(OstreeLockOutcome::AlreadyOurs);
    }
    if lock.exists() {
        return Ok(OstreeLockOutcome::HeldByOther);
    }
    // Mark first: a crash between the two writes leaves a mark without a lock, which the next
    // release cleans up; the reverse order could leave a lock nobody knows is ours.
    if let Some(dir) = mark.parent() {
        fsutil::create_dir_all_mode(dir, 0o755).with_action("create", "/run/nvdriver-agent")?;
    }
    fsutil::write_atomic(&mark, format!("{kernel_release}\n").as_bytes(), 0o644)
        .with_action("write", OSTREE_HOLD_MARK)?;
    if let Some(dir) = lock.parent() {
        fsutil::create_dir_all_mode(dir, 0o755).with_action("create", "/run/ostree")?;
    }
    failpoint!("hold::take");
    fsutil::write_atomic(&lock, b"", 0o644).with_action("create", OSTREE_FINALIZATION_LOCK)?;
    info!(KERNEL_RELEASE = %kernel_release, "holding the staged deployment: created {OSTREE_FINALIZATION_LOCK}");
    Ok(OstreeLockOutcome::Taken)
}

/// Release our ostree lock, if we hold one. Returns whether a lock was released.
pub fn release_ostree_lock(root: &Root) -> Result<bool, HoldError> {
    let lock = root.join(OSTREE_FINALIZATION_LOCK);
    let mark = root.join(OSTREE_HOLD_MARK);
    if !mark.exists() {
        return Ok(false);
    }
    let released = match std::fs::remove_file(&lock) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(PathIoError::doing("remove", OSTREE_FINALIZATION_LOCK, e).into()),
    };
    match std::fs::remove_file(&mark) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PathIoError::doing("remove", OSTREE_HOLD_MARK, e).into()),
    }
    if released {
        info!("released the staged deployment: removed {OSTREE_FINALIZATION_LOCK}");
    }
    Ok(released)
}

/// Whether we hold the ostree lock now.
pub fn holds_ostree_lock(root: &Root) -> bool {
    root.join(OSTREE_HOLD_MARK).exists() && root.join(OSTREE_FINALIZATION_LOCK).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_and_releases_only_its_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        assert_eq!(
            take_ostree_lock(&root, "6.1.0-29").unwrap(),
            OstreeLockOutcome::Taken
        );
        assert!(holds_ostree_lock(&root));
        assert_eq!(
            take_ostree_lock(&root, "6.1.0-29").unwrap(),
            OstreeLockOutcome::AlreadyOurs
        );
        assert!(release_ostree_lock(&root).unwrap());
        assert!(!root.join(OSTREE_FINALIZATION_LOCK).exists());
        assert!(!release_ostree_lock(&root).unwrap());

        // An administrator's lock (rpm-ostree --lock-finalization) is never ours to remove.
        std::fs::write(root.join(OSTREE_FINALIZATION_LOCK), "").unwrap();
        assert_eq!(
            take_ostree_lock(&root, "6.1.0-29").unwrap(),
            OstreeLockOutcome::HeldByOther
        );
        assert!(!release_ostree_lock(&root).unwrap());
        assert!(root.join(OSTREE_FINALIZATION_LOCK).exists());
    }
}

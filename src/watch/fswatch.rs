//! The inotify edge: watch the directories a detector names and say "something changed".
//!
//! A watched path that does not exist yet (no staged deployment, no `/efi`) is covered by a
//! watch on its nearest existing ancestor, and the watches are armed again after every batch of
//! events, so a directory created later is watched from then on. The thread blocks in `read()`:
//! no timers, no polling.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use inotify::{Inotify, WatchMask};
use tracing::debug;

use crate::host::Root;

/// Why the file-system watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum FsWatchError {
    /// `inotify_init1` failed, most often because the per-user limit on inotify instances is
    /// reached.
    #[error("cannot start inotify: {0}; is fs.inotify.max_user_instances exhausted?")]
    Init(std::io::Error),
}

/// Changes that say "look again".
fn target_mask() -> WatchMask {
    // ATTRIB: ostree announces every deployment change by bumping the mtime of /ostree/deploy
    // itself (`_ostree_sysroot_bump_mtime`, a `utimensat` on the directory), not by an entry.
    WatchMask::ATTRIB
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::CLOSE_WRITE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// The nearest existing directory at or above `host_path` under the root.
fn nearest_existing(root: &Root, host_path: &Path) -> Option<PathBuf> {
    let mut candidate = Some(host_path);
    while let Some(path) = candidate {
        let resolved = root.join(path);
        if resolved.is_dir() {
            return Some(resolved);
        }
        candidate = path.parent();
    }
    None
}

fn arm(inotify: &mut Inotify, root: &Root, host_paths: &[PathBuf]) {
    for host_path in host_paths {
        let resolved = root.join(host_path);
        let (target, mask) = if resolved.exists() {
            (resolved, target_mask())
        } else {
            match nearest_existing(root, host_path) {
                // Only creation matters on an ancestor: it is where the target will appear.
                Some(ancestor) => (ancestor, WatchMask::CREATE | WatchMask::MOVED_TO),
                None => continue,
            }
        };
        // Adding the same inode again returns the same descriptor: re-arming is idempotent. The
        // masks of a target and an ancestor that are the same directory combine.
        if let Err(e) = inotify.watches().add(&target, mask | WatchMask::MASK_ADD) {
            debug!(path = %target.display(), error = %e, "cannot watch");
        }
    }
}

/// Start watching; `on_change` runs on the watcher thread after each batch of events.
/// `host_paths` is asked again after every batch, since what to watch can depend on what exists
/// (an ostree stateroot appears, a new deployment directory is made).
pub fn spawn(
    root: Root,
    host_paths: impl Fn() -> Vec<PathBuf> + Send + 'static,
    on_change: impl Fn(Vec<PathBuf>) + Send + 'static,
) -> Result<JoinHandle<()>, FsWatchError> {
    let mut inotify = Inotify::init().map_err(FsWatchError::Init)?;
    arm(&mut inotify, &root, &host_paths());
    Ok(std::thread::Builder::new()
        .name("fs-watch".into())
        .spawn(move || {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let events = match inotify.read_events_blocking(&mut buffer) {
                    Ok(events) => events,
                    Err(e) => {
                        debug!(error = %e, "inotify read failed; the file-system watcher stops");
                        return;
                    }
                };
                let mut changed: Vec<PathBuf> = events
                    .filter_map(|event| event.name.map(PathBuf::from))
                    .collect();
                changed.dedup();
                arm(&mut inotify, &root, &host_paths());
                on_change(changed);
            }
        })
        .expect("spawning a thread"))
}

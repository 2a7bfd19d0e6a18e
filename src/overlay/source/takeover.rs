//! The daemon's side of staging through the unprivileged fetcher: ask it
//! ([`crate::overlay::fetcher::exchange`], which returns once its processes are gone), then take
//! over what it left. Nothing the fetcher wrote is trusted before it is out of its reach, owned
//! by root, free of hard links and of anything the manifest does not list, and verified against
//! the manifest and its signature here.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::info;

use super::{Attempt, AttemptError, SourceAttempt, SourceError, StageReport, MAX_ENTRIES};
use crate::overlay::fetcher::{self, FailureKind, FetchReply, FetchRequest};
use crate::overlay::manifest::GENERATED_FILES;
use crate::overlay::store::ImportOutcome;

/// The registry credentials the daemon hands on (`overlay::source::oci::AUTH_FILE`, a path
/// that exists whether or not the `oci` feature is built).
const REGISTRY_AUTH: &str = "/etc/nvdriver-agent/auth.json";

impl Attempt<'_> {
    /// Stage through the fetcher at `socket`; when it ran out of room, remove the overlays no
    /// kernel needs (which it cannot) and ask once more.
    pub(super) fn stage_through(&self, socket: &Path) -> Result<StageReport, SourceError> {
        let reply = self.ask(socket)?;
        let no_room = reply.tried.iter().any(|a| a.kind == FailureKind::NoRoom);
        let reply = if reply.staged_from.is_none() && no_room && self.collect_garbage() {
            self.ask(socket)?
        } else {
            reply
        };
        self.take_reply(reply)
    }

    fn ask(&self, socket: &Path) -> Result<FetchReply, SourceError> {
        let settings = self.settings;
        let request = FetchRequest {
            key: self.key.clone(),
            settings: settings.clone(),
            module_tree: self.module_tree.map(Path::to_path_buf),
            registry_auth: fs::read_to_string(self.root.join(REGISTRY_AUTH)).ok(),
        };
        // Every source may take its whole download time; then some slack for unpacking.
        let sources = u32::try_from(settings.sources.len()).unwrap_or(u32::MAX);
        let timeout =
            settings.download_timeout.saturating_mul(sources.max(1)) + Duration::from_secs(120);
        fetcher::exchange(self.root, socket, &request, timeout).map_err(|e| SourceError::Failed {
            key: self.key.clone(),
            tried: vec![SourceAttempt {
                source: socket.display().to_string(),
                error: AttemptError::Fetcher(e),
            }],
        })
    }

    fn take_reply(&self, reply: FetchReply) -> Result<StageReport, SourceError> {
        let mut tried: Vec<SourceAttempt> = reply
            .tried
            .into_iter()
            .map(|a| SourceAttempt {
                source: a.source,
                error: AttemptError::Fetched {
                    message: a.message,
                    kind: a.kind,
                },
            })
            .collect();
        if let Some(message) = reply.error {
            tried.push(SourceAttempt {
                source: fetcher::UNIT.into(),
                error: AttemptError::Fetched {
                    message,
                    kind: FailureKind::Other,
                },
            });
        }
        let key = self.key.clone();
        let Some(source) = reply.staged_from else {
            return Err(if tried.iter().all(|a| a.error.is_not_found()) {
                SourceError::NotFound { key, tried }
            } else {
                SourceError::Failed { key, tried }
            });
        };
        match self.adopt(&source) {
            Ok(outcome) => Ok(StageReport {
                source,
                outcome,
                tried,
                digest: reply.digest,
            }),
            Err(error) => {
                tried.push(SourceAttempt { source, error });
                Err(SourceError::Failed { key, tried })
            }
        }
    }

    /// Move the fetcher's overlay into a staging directory of the store, make it root's, check
    /// it as any source's, and publish it.
    fn adopt(&self, origin: &str) -> Result<ImportOutcome, AttemptError> {
        let (store, lock, key) = (self.store, self.lock, self.key);
        let fetched = self.fetched_dir()?;
        let staging = store.begin_staging(lock, &key.kernel_release, &key.driver_version)?;
        fs::remove_dir(&staging).map_err(|e| io_at(&staging, e))?;
        if let Err(e) = fs::rename(&fetched, &staging) {
            store.abandon_staging(&staging);
            return Err(if e.raw_os_error() == Some(libc::EXDEV) {
                AttemptError::Takeover {
                    path: fetched,
                    problem: "is on another file system than the store; the fetcher's state directory and the store must share one (both under /var)".into(),
                }
            } else {
                io_at(&fetched, e)
            });
        }
        if let Some(kernel_dir) = fetched.parent() {
            // Empty now, unless the fetcher keeps another driver for this kernel.
            let _ = fs::remove_dir(kernel_dir);
        }
        let result = self.check_adopted(&staging, origin);
        if result.is_err() {
            store.abandon_staging(&staging);
        }
        result
    }

    fn check_adopted(&self, staging: &Path, origin: &str) -> Result<ImportOutcome, AttemptError> {
        let key = self.key;
        take_ownership(staging)?;
        for generated in GENERATED_FILES {
            // Made by the fetcher's store; this store makes its own when publishing.
            let _ = fs::remove_file(staging.join(generated));
        }
        let manifest = self.check_tree(staging, origin)?;
        crate::fsutil::sync_tree(staging).map_err(|e| io_at(staging, e))?;
        let outcome = self.store.publish_staged(self.lock, staging, &manifest)?;
        info!(
            KERNEL_RELEASE = %key.kernel_release,
            DRIVER_VERSION = %key.driver_version,
            source = %origin,
            "took over the overlay the fetcher staged"
        );
        Ok(outcome)
    }

    /// `<state>/store/<kernel>/<driver>` of the fetcher, each part a real directory (not a link
    /// the fetcher left to send the rename elsewhere).
    fn fetched_dir(&self) -> Result<PathBuf, AttemptError> {
        let key = self.key;
        let mut dir = self.root.join(fetcher::STATE_DIR);
        for part in [
            fetcher::STORE_SUBDIR,
            key.kernel_release.as_str(),
            key.driver_version.as_str(),
        ] {
            dir.push(part);
            let meta = fs::symlink_metadata(&dir).map_err(|e| io_at(&dir, e))?;
            if !meta.file_type().is_dir() {
                return Err(AttemptError::Takeover {
                    path: dir,
                    problem: "is not a directory".into(),
                });
            }
        }
        Ok(dir)
    }
}

/// Make every entry under `dir` this process's (root's, in the unit) and drop group and other
/// write and the set-id bits, refusing hard links (a link to a file elsewhere would have that
/// file's owner and mode changed) and anything but directories, files and symlinks. Checked with
/// `lstat` before each change; nothing else writes here any more (the fetcher's processes are
/// gone and the directory is in the root-owned store).
fn take_ownership(dir: &Path) -> Result<(), AttemptError> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let mut pending = vec![dir.to_path_buf()];
    let mut entries = 0u64;
    while let Some(path) = pending.pop() {
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(AttemptError::Takeover {
                path: dir.to_path_buf(),
                problem: format!("holds more than {MAX_ENTRIES} entries"),
            });
        }
        let meta = fs::symlink_metadata(&path).map_err(|e| io_at(&path, e))?;
        let kind = meta.file_type();
        if kind.is_file() && meta.nlink() > 1 {
            return Err(AttemptError::Takeover {
                path,
                problem: format!(
                    "has {} hard links; an overlay's files have one",
                    meta.nlink()
                ),
            });
        }
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(AttemptError::Takeover {
                path,
                problem: "is neither a file, a directory nor a symlink".into(),
            });
        }
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| io_at(&path, e))?;
        if kind.is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o755;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| io_at(&path, e))?;
        if kind.is_dir() {
            for entry in fs::read_dir(&path).map_err(|e| io_at(&path, e))? {
                pending.push(entry.map_err(|e| io_at(&path, e))?.path());
            }
        }
    }
    Ok(())
}

fn io_at(path: &Path, error: io::Error) -> AttemptError {
    AttemptError::Io {
        path: path.to_path_buf(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_and_odd_files_are_refused_before_any_change() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let outside = dir.path().join("shadow");
        fs::write(&outside, "secret").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
        fs::hard_link(&outside, tree.join("nvidia.ko")).unwrap();
        let err = take_ownership(&tree).unwrap_err();
        assert!(err.to_string().contains("hard links"), "{err}");
        let mode = fs::metadata(&outside).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o600, "the linked file's mode was changed");

        fs::remove_file(tree.join("nvidia.ko")).unwrap();
        nix::unistd::mkfifo(
            &tree.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let err = take_ownership(&tree).unwrap_err();
        assert!(err.to_string().contains("neither a file"), "{err}");
    }

    #[test]
    fn write_and_set_id_bits_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("usr/bin")).unwrap();
        fs::write(tree.join("usr/bin/tool"), "x").unwrap();
        fs::set_permissions(
            tree.join("usr/bin/tool"),
            fs::Permissions::from_mode(0o6777),
        )
        .unwrap();
        fs::set_permissions(tree.join("usr"), fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink("tool", tree.join("usr/bin/link")).unwrap();
        take_ownership(&tree).unwrap();
        let mode = |p: &str| fs::metadata(tree.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("usr/bin/tool"), 0o755);
        assert_eq!(mode("usr"), 0o755);
    }
}

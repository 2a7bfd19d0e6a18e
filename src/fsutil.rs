//! Small filesystem helpers shared by every module that changes the host: atomic replacement
//! (temporary sibling, fsync, rename, fsync of the directory), so a crash leaves the old file
//! or the new one and never half of either.

use crate::failpoints::failpoint;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Prefix of every temporary sibling this crate creates; the store and GC skip and clean them.
pub const TEMP_PREFIX: &str = ".nvdriver-agent-tmp.";
/// Chunk size for copying and hashing files: large enough that syscalls cost nothing next to
/// SHA-256, small enough that the idle daemon's peak memory stays low (bench/idle-cost).
pub const IO_CHUNK: usize = 256 << 10;

/// An I/O error together with the path it happened on and, where it helps, what was being
/// done. Its message says all three, the OS error once: "cannot create directory /a/b: No such
/// file or directory (os error 2)", or "/a/b: …" without an action. The OS error is part of
/// the message and deliberately not also a [`std::error::Error::source`]: the library prints
/// errors with `{}` and `main` prints the chain with anyhow's `{:#}`, so a message that also
/// exposed its cause as a source would show it twice.
#[derive(Debug)]
pub struct PathIoError {
    /// The path the operation was on, as the caller gave it.
    pub path: PathBuf,
    /// What was being done, as a verb phrase ("create directory", "write"); `None` when the
    /// path alone says enough.
    pub action: Option<&'static str>,
    /// What the OS said.
    pub error: io::Error,
}

impl PathIoError {
    /// An error on `path`, shown as `<path>: <error>`.
    pub fn new(path: impl Into<PathBuf>, error: io::Error) -> Self {
        PathIoError {
            path: path.into(),
            action: None,
            error,
        }
    }

    /// An error while doing `action` on `path`, shown as `cannot <action> <path>: <error>`.
    pub fn doing(action: &'static str, path: impl Into<PathBuf>, error: io::Error) -> Self {
        PathIoError {
            path: path.into(),
            action: Some(action),
            error,
        }
    }

    /// The kind of the OS error, e.g. to tell `NotFound` apart.
    pub fn kind(&self) -> io::ErrorKind {
        self.error.kind()
    }
}

impl std::fmt::Display for PathIoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.action {
            Some(action) => write!(f, "cannot {action} {}: {}", self.path.display(), self.error),
            None => write!(f, "{}: {}", self.path.display(), self.error),
        }
    }
}

impl std::error::Error for PathIoError {}

/// Attach a path (and an action) to an `io::Result`: `fs::read(p).with_path(p)?`.
pub trait WithPath<T> {
    /// Turn the error into a [`PathIoError`] on `path`, without an action.
    fn with_path(self, path: impl AsRef<Path>) -> Result<T, PathIoError>;
    /// Turn the error into a [`PathIoError`] while doing `action` (a verb phrase) on `path`.
    fn with_action(self, action: &'static str, path: impl AsRef<Path>) -> Result<T, PathIoError>;
}

impl<T> WithPath<T> for io::Result<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T, PathIoError> {
        self.map_err(|error| PathIoError::new(path.as_ref(), error))
    }

    fn with_action(self, action: &'static str, path: impl AsRef<Path>) -> Result<T, PathIoError> {
        self.map_err(|error| PathIoError::doing(action, path.as_ref(), error))
    }
}

/// fsync every file and directory under `dir` (children before parents), so a tree written
/// without syncing is durable before it is renamed into place.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fsync_dir(dir)
}

/// fsync a directory so a rename inside it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A temporary sibling path of `path` in the same directory (so rename is atomic).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = format!(
        "{TEMP_PREFIX}{}.{}.{}",
        name,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    path.with_file_name(unique)
}

/// Replace `path` with `contents` atomically. `mode` is used when the file is new; an existing
/// file keeps its permission bits.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(_) => mode,
    };
    remove_stale_temps(path);
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // Half the contents first, so a crash here leaves a torn temporary file behind.
        let (first, rest) = contents.split_at(contents.len() / 2);
        file.write_all(first)?;
        failpoint!("write-atomic::temp-written");
        file.write_all(rest)?;
        // create_new honours the umask; set the mode we meant explicitly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        failpoint!("write-atomic::fsynced");
        fs::rename(&tmp, path)?;
        failpoint!("write-atomic::renamed");
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Remove the temporary siblings of `path` that a process which has since died left behind
/// (a crash between writing one and renaming it). Those of live processes are theirs to
/// finish. Best effort: a leftover that cannot be removed only costs space.
pub fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!("{TEMP_PREFIX}{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name();
        let entry_name = entry_name.to_string_lossy();
        let Some(pid) = entry_name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<i32>().ok())
            .filter(|pid| *pid > 0)
        else {
            continue;
        };
        let dead = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if dead && fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed a temporary file a crashed run left");
        }
    }
}

/// Create `dir` and any missing parents, each new one with exactly `mode` (whatever the umask);
/// directories that already exist are left as they are.
pub fn create_dir_all_mode(dir: &Path, mode: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(path) = cursor {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", path.display()),
                ))
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => missing.push(path),
            Err(err) => return Err(err),
        }
        cursor = path.parent().filter(|p| !p.as_os_str().is_empty());
    }
    for path in missing.into_iter().rev() {
        match fs::create_dir(path) {
            Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(mode))?,
            // Someone else made it meanwhile: fine, it is theirs.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The mounted directories of `/proc/self/mountinfo` text (field 4: the path of the mount's root
/// within its file system, octal escapes undone). The kernel computes it from the directory
/// itself, so a bind mount's source that was renamed shows its new name.
pub fn mount_roots(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect()
}

/// Undo mountinfo's octal escapes (`\\040` for a space).
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn create_dir_all_mode_sets_the_mode_of_new_dirs_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all_mode(&deep, 0o755).unwrap();
        for path in [dir.path().join("a"), dir.path().join("a/b"), deep.clone()] {
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
                0o755
            );
        }
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o7777,
            0o711
        );
        create_dir_all_mode(&deep, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&deep).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        fs::write(dir.path().join("file"), "").unwrap();
        assert!(create_dir_all_mode(&dir.path().join("file/x"), 0o755).is_err());
    }

    #[test]
    fn path_io_error_names_path_and_action_and_the_os_error_once() {
        let err = fs::read("/nonexistent/x")
            .with_action("read", "/nonexistent/x")
            .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("cannot read /nonexistent/x: "), "{text}");
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
        assert!(std::error::Error::source(&err).is_none());
        let err = fs::read("/nonexistent/x")
            .with_path("/nonexistent/x")
            .unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/x: "));
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn write_atomic_into_missing_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/f");
        assert!(write_atomic(&path, b"x", 0o644).is_err());
        assert!(!dir.path().join("missing").exists());
    }
}

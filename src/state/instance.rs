//! One daemon per host: the instance lock `/run/nvdriver-agent/run.lock` holds the running
//! daemon's pid, so `status` can find it and `stage` can poke it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;

use crate::fsutil;
use crate::host::Root;

/// Where the running daemon's pid is kept, under its lock.
pub const INSTANCE_LOCK: &str = "/run/nvdriver-agent/run.lock";

/// The instance lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// Another process holds the instance lock.
    #[error("another `nvdriver-agent run` is already running on this host{}; stop it first (`systemctl stop nvdriver-agent`), or use `nvdriver-agent stage` to ask it to look again", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning {
        /// That daemon's pid, when the lock file could be read.
        pid: Option<u32>,
    },
    /// The lock file could not be created, opened, locked or written.
    #[error("cannot take the instance lock {path}: {error}; is /run writable?")]
    Lock {
        /// The lock file, as a host path ([`INSTANCE_LOCK`]).
        path: PathBuf,
        /// The underlying I/O error.
        error: std::io::Error,
    },
}

/// Held for the daemon's lifetime; records its pid.
pub struct InstanceLock {
    _lock: Flock<File>,
}

impl InstanceLock {
    /// Take the lock (without waiting) and write this process's pid into it.
    pub fn acquire(root: &Root) -> Result<InstanceLock, InstanceError> {
        let path = root.join(INSTANCE_LOCK);
        let lock_err = |source| InstanceError::Lock {
            path: PathBuf::from(INSTANCE_LOCK),
            error: source,
        };
        if let Some(dir) = path.parent() {
            fsutil::create_dir_all_mode(dir, 0o755).map_err(lock_err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(InstanceError::AlreadyRunning {
                    pid: running_pid(root),
                })
            }
            Err((_, errno)) => return Err(lock_err(std::io::Error::from(errno))),
        };
        lock.set_len(0).map_err(lock_err)?;
        lock.rewind().map_err(lock_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(lock_err)?;
        Ok(InstanceLock { _lock: lock })
    }
}

/// The pid of the running daemon, if one holds the instance lock.
pub fn running_pid(root: &Root) -> Option<u32> {
    let file = File::open(root.join(INSTANCE_LOCK)).ok()?;
    // If we can take the lock, nobody holds it: the pid in the file is stale.
    let mut file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => return None,
        Err((file, _)) => file,
    };
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Ask the running daemon to look again now (`stage` without `--now`).
pub fn poke(pid: u32) -> Result<(), nix::Error> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(Signal::SIGUSR1),
    )
}

/// Tell the running daemon that `hold release` let the held update go: it drops its logind
/// inhibitor at once (SIGUSR2, taken by its signal thread) and looks again.
pub fn poke_hold_released(pid: u32) -> Result<(), nix::Error> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(Signal::SIGUSR2),
    )
}

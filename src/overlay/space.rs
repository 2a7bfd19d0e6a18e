//! Room on the store's file system. Staging never fills the disk: before a download, an
//! archive or a copy starts, what it needs plus a reserve (`stage.keep-free-percent`,
//! `stage.keep-free-bytes`) must fit in what the file system has free; while it writes, a
//! [`SpaceGuard`] looks again (one `statvfs` per [`LOOK_EVERY`] bytes while there is plenty of
//! room, more often near the reserve) and stops it before the reserve would be crossed.
//!
//! [`shortfall`] and [`write_budget`] decide, as pure functions; [`statvfs`] is the one edge.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// While the free space is far above the reserve, the guard looks once per this many bytes
/// written: about 64 `statvfs` calls for 1 GiB, each a few microseconds.
pub const LOOK_EVERY: u64 = 16 << 20;

/// The reserve (`stage.keep-free-*`) is part of the configuration.
pub use crate::config::DiskReserve as Reserve;

/// What `statvfs` says of a file system, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsSpace {
    /// Its size.
    pub total: u64,
    /// Free for unprivileged writers (`f_bavail`): root's own reserve (ext4's 5 %) is left to
    /// the rest of the system.
    pub available: u64,
}

/// Why something does not fit: the numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// Bytes it needs.
    pub need: u64,
    /// Bytes free.
    pub available: u64,
    /// Bytes that must stay free.
    pub reserve: u64,
    /// The file system's size.
    pub total: u64,
}

/// `None` when `need` bytes fit in `space` with `reserve` left free; else the numbers.
pub fn shortfall(need: u64, space: FsSpace, reserve: Reserve) -> Option<Shortfall> {
    let keep = reserve.of(space.total);
    let fits = space
        .available
        .checked_sub(keep)
        .is_some_and(|room| room >= need);
    (!fits).then_some(Shortfall {
        need,
        available: space.available,
        reserve: keep,
        total: space.total,
    })
}

/// How many bytes may be written before the next look: half the room above the reserve (so
/// another writer on the same file system cannot push us over it between two looks), at most
/// [`LOOK_EVERY`].
pub fn write_budget(space: FsSpace, reserve: Reserve) -> u64 {
    let room = space.available.saturating_sub(reserve.of(space.total));
    (room / 2).min(LOOK_EVERY)
}

/// The file system holding `path` (a real path), as [`FsSpace`].
pub fn statvfs(path: &Path) -> io::Result<FsSpace> {
    let vfs = rustix::fs::statvfs(path)?;
    let unit = if vfs.f_frsize > 0 {
        vfs.f_frsize
    } else {
        vfs.f_bsize
    };
    Ok(FsSpace {
        total: vfs.f_blocks.saturating_mul(unit),
        available: vfs.f_bavail.saturating_mul(unit),
    })
}

/// Bytes as people read them, with the exact number: `1.5 GiB (1610612736 bytes)`.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} bytes", self.0)
        } else {
            write!(f, "{value:.1} {} ({} bytes)", UNITS[unit], self.0)
        }
    }
}

/// Why staging stopped or was refused for lack of room.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// Before writing: `need` bytes plus the reserve do not fit in what is free.
    #[error("not enough room on the file system of {fs} for {what}: it needs {need}, {available} is free and {reserve} must stay free (stage.keep-free-percent, stage.keep-free-bytes; file system size {total}); free space there or lower the reserve", need = Bytes(.shortfall.need), available = Bytes(.shortfall.available), reserve = Bytes(.shortfall.reserve), total = Bytes(.shortfall.total))]
    NoRoom {
        /// The store directory (host path) whose file system is meant.
        fs: PathBuf,
        /// What needed the room (`the download`, `the unpacked overlay`, …).
        what: &'static str,
        /// The numbers.
        shortfall: Shortfall,
    },
    /// While writing: the free space came down to the reserve; what was written is removed.
    #[error("stopped writing {what} on the file system of {fs} after {written}: {available} is left free and {reserve} must stay free (stage.keep-free-percent, stage.keep-free-bytes; file system size {total}); free space there or lower the reserve", written = Bytes(*.written), available = Bytes(.space.available), reserve = Bytes(.reserve.of(.space.total)), total = Bytes(.space.total))]
    ReserveReached {
        /// The store directory (host path).
        fs: PathBuf,
        /// What was being written.
        what: &'static str,
        /// Bytes written before stopping.
        written: u64,
        /// The file system when it stopped.
        space: FsSpace,
        /// The reserve in force.
        reserve: Reserve,
    },
    /// `statvfs` failed.
    #[error("{path}: cannot tell the free space of its file system: {error}")]
    Statvfs {
        /// The real path asked about.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
}

/// Watches the free space while one thing (a download, an unpack, a copy) is written.
#[derive(Debug)]
pub struct SpaceGuard {
    /// The real path looked at; `None`: never look (tools that write to scratch directories).
    real: Option<PathBuf>,
    /// The store directory as the host names it, for messages.
    host: PathBuf,
    reserve: Reserve,
    what: &'static str,
    /// Bytes that may still be written before the next look.
    budget: u64,
    written: u64,
}

impl SpaceGuard {
    /// A guard over the file system of `real` (shown as `host`), keeping `reserve` free.
    pub fn new(real: &Path, host: &Path, reserve: Reserve, what: &'static str) -> SpaceGuard {
        SpaceGuard {
            real: Some(real.to_path_buf()),
            host: host.to_path_buf(),
            reserve,
            what,
            budget: 0,
            written: 0,
        }
    }

    /// A guard that never looks (`overlay inspect` unpacks into a temporary directory).
    pub fn unchecked() -> SpaceGuard {
        SpaceGuard {
            real: None,
            host: PathBuf::new(),
            reserve: Reserve::NONE,
            what: "",
            budget: u64::MAX,
            written: 0,
        }
    }

    /// The same file system and reserve, for writing something else.
    pub fn for_what(&self, what: &'static str) -> SpaceGuard {
        match &self.real {
            Some(real) => SpaceGuard::new(real, &self.host, self.reserve, what),
            None => SpaceGuard::unchecked(),
        }
    }

    fn look(&self) -> Result<Option<FsSpace>, SpaceError> {
        let Some(real) = &self.real else {
            return Ok(None);
        };
        statvfs(real)
            .map(Some)
            .map_err(|error| SpaceError::Statvfs {
                path: real.clone(),
                error,
            })
    }

    /// Before writing: refuse unless `need` more bytes fit with the reserve left free.
    pub fn ensure(&self, need: u64, what: &'static str) -> Result<(), SpaceError> {
        let Some(space) = self.look()? else {
            return Ok(());
        };
        match shortfall(need, space, self.reserve) {
            None => Ok(()),
            Some(shortfall) => Err(SpaceError::NoRoom {
                fs: self.host.clone(),
                what,
                shortfall,
            }),
        }
    }

    /// Call before writing `n` bytes: looks at the file system when the budget of the last
    /// look is spent, and refuses once the write would bring the free space near the reserve.
    pub fn before_write(&mut self, n: u64) -> Result<(), SpaceError> {
        if self.budget < n {
            if let Some(space) = self.look()? {
                self.budget = write_budget(space, self.reserve);
                if self.budget < n {
                    return Err(SpaceError::ReserveReached {
                        fs: self.host.clone(),
                        what: self.what,
                        written: self.written,
                        space,
                        reserve: self.reserve,
                    });
                }
            }
        }
        self.budget = self.budget.saturating_sub(n);
        self.written += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const DEFAULT: Reserve = Reserve {
        percent: 10,
        bytes: GIB,
    };

    #[test]
    fn the_reserve_is_the_larger_of_share_and_bytes() {
        assert_eq!(DEFAULT.of(100 * GIB), 10 * GIB);
        assert_eq!(DEFAULT.of(5 * GIB), GIB);
        assert_eq!(Reserve::NONE.of(100 * GIB), 0);
        // A nonsense percent cannot reserve more than the whole file system.
        let all = Reserve {
            percent: 200,
            bytes: 0,
        };
        assert_eq!(all.of(7), 7);
        // No overflow at the top.
        assert_eq!(DEFAULT.of(u64::MAX), u64::MAX / 10);
    }

    #[test]
    fn fits_only_with_the_reserve_left() {
        let space = FsSpace {
            total: 100 * GIB,
            available: 14 * GIB,
        };
        assert_eq!(shortfall(4 * GIB, space, DEFAULT), None);
        assert_eq!(
            shortfall(4 * GIB + 1, space, DEFAULT),
            Some(Shortfall {
                need: 4 * GIB + 1,
                available: 14 * GIB,
                reserve: 10 * GIB,
                total: 100 * GIB,
            })
        );
        // Already below the reserve: nothing fits, not even zero bytes.
        let full = FsSpace {
            total: 100 * GIB,
            available: 9 * GIB,
        };
        assert!(shortfall(0, full, DEFAULT).is_some());
        assert_eq!(shortfall(9 * GIB, full, Reserve::NONE), None);
    }

    #[test]
    fn the_budget_is_half_the_room_capped() {
        let plenty = FsSpace {
            total: 100 * GIB,
            available: 50 * GIB,
        };
        assert_eq!(write_budget(plenty, DEFAULT), LOOK_EVERY);
        let near = FsSpace {
            total: 100 * GIB,
            available: 10 * GIB + (4 << 20),
        };
        assert_eq!(write_budget(near, DEFAULT), 2 << 20);
        let below = FsSpace {
            total: 100 * GIB,
            available: GIB,
        };
        assert_eq!(write_budget(below, DEFAULT), 0);
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(Bytes(512).to_string(), "512 bytes");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5 GiB (1610612736 bytes)");
    }

    #[test]
    fn an_unchecked_guard_never_refuses() {
        let mut guard = SpaceGuard::unchecked();
        guard.ensure(u64::MAX, "x").unwrap();
        for _ in 0..4 {
            guard.before_write(u64::MAX / 8).unwrap();
        }
    }

    #[test]
    fn a_guard_on_a_real_file_system_looks() {
        let dir = tempfile::tempdir().unwrap();
        let space = statvfs(dir.path()).unwrap();
        assert!(space.total >= space.available && space.total > 0);
        let everything = Reserve {
            percent: 100,
            bytes: 0,
        };
        let mut guard = SpaceGuard::new(dir.path(), Path::new("/store"), everything, "a test");
        let err = guard.ensure(1, "a test").unwrap_err();
        assert!(err.to_string().contains("/store"), "{err}");
        let err = guard.before_write(1).unwrap_err();
        assert!(
            matches!(err, SpaceError::ReserveReached { written: 0, .. }),
            "{err}"
        );
    }
}

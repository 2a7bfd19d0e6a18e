//! Facts about the host, every one read under a [`Root`]: os-release, the running kernel, the
//! architecture, and the kernel's module/device state.

pub mod kernel;
pub mod keyring;
pub mod modprobe;
pub mod os_release;
pub mod version;

use std::path::{Component, Path, PathBuf};

pub use kernel::KernelState;
pub use os_release::{OsFamily, OsRelease};

/// The filesystem root every host path is resolved under (`--root`, `/` on a real host).
///
/// Paths handed around in plans and configs are *host* paths (absolute, as the host's own
/// processes and the kernel see them); only the edges that touch the disk join them onto the
/// root. That keeps plans identical on a real host and on a fake one in a temp dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    path: PathBuf,
}

impl Root {
    /// A root at `path` (a directory on this machine; `/` for the real host).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Root { path: path.into() }
    }

    /// The real host.
    pub fn host() -> Self {
        Root::new("/")
    }

    /// The root's own directory on this machine.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is the real host's root (`/`), not a fake one.
    pub fn is_host(&self) -> bool {
        self.path == Path::new("/")
    }

    /// Resolve a host path under the root. `..` is clamped at the root (as `chroot` would), so
    /// no host path can name anything outside it.
    ///
    /// ```
    /// use nvdriver_agent::host::Root;
    /// let root = Root::new("/tmp/fake-host");
    /// assert_eq!(root.join("/etc/os-release"), std::path::Path::new("/tmp/fake-host/etc/os-release"));
    /// assert_eq!(root.join("/../../etc/shadow"), std::path::Path::new("/tmp/fake-host/etc/shadow"));
    /// ```
    pub fn join(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let mut out = self.path.clone();
        let base_len = out.components().count();
        for component in host_path.as_ref().components() {
            match component {
                Component::Normal(part) => out.push(part),
                Component::ParentDir => {
                    if out.components().count() > base_len {
                        out.pop();
                    }
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        out
    }

    /// The host path of a path under the root (the inverse of [`Root::join`]), if it is under it.
    pub fn host_path_of(&self, resolved: &Path) -> Option<PathBuf> {
        resolved
            .strip_prefix(&self.path)
            .ok()
            .map(|rest| Path::new("/").join(rest))
    }
}

/// Everything the planners need to know about the host, gathered once at the edge.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostFacts {
    /// The parsed os-release of the host.
    pub os: OsRelease,
    /// The running kernel's release (`uname -r`), from `/proc/sys/kernel/osrelease` under the root.
    pub kernel_release: String,
    /// This machine's architecture (`uname -m` spelling, e.g. `x86_64`), never read from the root.
    pub arch: String,
}

/// Errors reading facts about the host under a [`Root`].
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The running kernel release could not be read (typically no `/proc` under the root).
    #[error("cannot read the running kernel release from {path}: {error}; is /proc mounted under the root?")]
    KernelRelease {
        /// The file that was read, resolved under the root.
        path: PathBuf,
        /// The I/O error from the read.
        error: std::io::Error,
    },
    /// os-release was missing, unreadable or malformed.
    #[error(transparent)]
    OsRelease(#[from] os_release::OsReleaseError),
    /// A kernel-state file (`/proc`, `/sys`, the OS's `modules.dep`) exists but could not be read;
    /// a missing one is not an error.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file that was read, resolved under the root.
        path: PathBuf,
        /// The I/O error from the read.
        error: std::io::Error,
    },
}

impl HostFacts {
    /// Read os-release and the running kernel release under `root`; the architecture is the
    /// machine's own (a fake root cannot change what the CPU is).
    pub fn read(root: &Root) -> Result<Self, HostError> {
        let os = OsRelease::read(root)?;
        let kernel_release = kernel::read_kernel_release(root)?;
        Ok(HostFacts {
            os,
            kernel_release,
            arch: machine_arch(),
        })
    }
}

/// The running machine's architecture in `uname -m` spelling.
pub fn machine_arch() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_else(|_| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_clamps_at_root() {
        let root = Root::new("/tmp/fake");
        assert_eq!(
            root.join("/etc/os-release"),
            Path::new("/tmp/fake/etc/os-release")
        );
        assert_eq!(root.join("/../../etc/x"), Path::new("/tmp/fake/etc/x"));
        assert_eq!(root.join("/a/b/../../../c"), Path::new("/tmp/fake/c"));
        assert_eq!(Root::host().join("/etc"), Path::new("/etc"));
    }

    #[test]
    fn host_path_of_inverts_join() {
        let root = Root::new("/tmp/fake");
        let resolved = root.join("/run/nvidia/driver");
        assert_eq!(
            root.host_path_of(&resolved).unwrap(),
            Path::new("/run/nvidia/driver")
        );
        assert!(root.host_path_of(Path::new("/elsewhere")).is_none());
    }
}

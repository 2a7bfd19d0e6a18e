//! Watch: learn which kernel the host boots next, before the reboot.
//!
//! One module per OS family turns what is on disk into a [`NextBoot`] (or `None`: the next boot
//! runs the kernel that runs now). Events (inotify, D-Bus signals) only say "look again": every
//! detector re-reads the state from disk, so a missed or repeated event changes nothing.

pub mod arm64_image;
pub mod dbus;
pub mod flatcar;
pub mod fswatch;
pub mod generic;
pub mod ostree;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The kernel the host will boot next, as read from disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NextBoot {
    /// `uname -r` of the kernel the next boot runs.
    pub kernel_release: String,
    /// Where it was read from, for the journal and status, e.g.
    /// `ostree staged deployment fedora-coreos 3f2c….0` or `/boot/flatcar/vmlinuz-b`.
    pub origin: String,
    /// Host path of the next boot's module tree for that kernel
    /// (`…/usr/lib/modules/<kver>`), when it can be read now. Used to stand down when the OS
    /// ships NVIDIA modules for that kernel itself.
    pub module_tree: Option<PathBuf>,
    /// ostree only: the pending deployment is staged (finalized at shutdown), so the `hold`
    /// policy can keep it from finalizing with `/run/ostree/staged-deployment-locked`.
    pub staged_deployment: bool,
}

use std::path::Path;

use crate::config::Detector;
use crate::host::{OsFamily, OsRelease, Root};

/// The detector families, one module each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// rpm-ostree and other ostree hosts: the staged or default deployment (`watch::ostree`).
    Ostree,
    /// Flatcar: the kernel in the inactive USR slot (`watch::flatcar`).
    Flatcar,
    /// Any other systemd host: the default boot entry, else the newest installed kernel
    /// (`watch::generic`).
    Generic,
}

/// Why the next boot's kernel could not be read: the error of the detector that ran.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The ostree detector failed.
    #[error(transparent)]
    Ostree(#[from] ostree::OstreeError),
    /// The Flatcar detector failed.
    #[error(transparent)]
    Flatcar(#[from] flatcar::FlatcarError),
    /// The generic detector failed.
    #[error(transparent)]
    Generic(#[from] generic::GenericError),
}

/// Pick the detector for this host; `None` when watching is switched off.
pub fn choose(detector: Detector, root: &Root, os: &OsRelease) -> Option<Family> {
    match detector {
        Detector::Off => None,
        Detector::Ostree => Some(Family::Ostree),
        Detector::Flatcar => Some(Family::Flatcar),
        Detector::Generic => Some(Family::Generic),
        Detector::Auto if os.family.is_rpm_ostree() || ostree::is_ostree_host(root) => {
            Some(Family::Ostree)
        }
        Detector::Auto if os.family == OsFamily::Flatcar => Some(Family::Flatcar),
        Detector::Auto => Some(Family::Generic),
    }
}

/// The kernel the host boots next, or `None` when that is the running one.
pub fn next_boot(
    root: &Root,
    family: Family,
    running_kernel: &str,
    update_engine: flatcar::UpdateEngineState,
) -> Result<Option<NextBoot>, WatchError> {
    Ok(match family {
        Family::Ostree => ostree::next_boot(root, running_kernel)?,
        Family::Flatcar => flatcar::next_boot(root, running_kernel, update_engine)?,
        Family::Generic => generic::next_boot(root, running_kernel)?,
    })
}

/// Host paths whose changes mean "look again".
pub fn watch_paths(root: &Root, family: Family) -> Vec<PathBuf> {
    match family {
        Family::Ostree => ostree::watch_paths(root),
        Family::Flatcar => flatcar::watch_paths(),
        Family::Generic => generic::watch_paths(),
    }
}

/// Module file names that mean "the NVIDIA driver itself".
const NVIDIA_MODULE_FILES: [&str; 4] =
    ["nvidia.ko", "nvidia.ko.xz", "nvidia.ko.zst", "nvidia.ko.gz"];

/// Why the agent should stand down for `next` (the OS ships the driver itself), if it should.
pub fn os_ships_driver(root: &Root, family: Family, next: &NextBoot) -> Option<String> {
    if family == Family::Flatcar {
        if let Some(sysext) = flatcar::os_nvidia_sysext(root) {
            return Some(format!(
                "Flatcar's own NVIDIA driver sysext is configured ({})",
                sysext.display()
            ));
        }
    }
    let tree = next.module_tree.as_ref()?;
    find_nvidia_module(&root.join(tree), 8).map(|found| {
        let shown = root.host_path_of(&found).unwrap_or(found);
        format!(
            "the OS ships an NVIDIA module for {} ({})",
            next.kernel_release,
            shown.display()
        )
    })
}

/// A bounded walk (depth, and no symlinks followed) for an NVIDIA module file.
fn find_nvidia_module(dir: &Path, depth: u32) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_file() && NVIDIA_MODULE_FILES.iter().any(|n| name == *n) {
            return Some(entry.path());
        }
        if kind.is_dir() {
            subdirs.push(entry.path());
        }
    }
    if depth == 0 {
        return None;
    }
    subdirs
        .iter()
        .find_map(|sub| find_nvidia_module(sub, depth - 1))
}

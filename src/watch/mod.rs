//! Watch: learn which kernel the host boots next, before the reboot.
//!
//! One module per OS family turns what is on disk into a [`NextBoot`] (or `None`: the next boot
//! runs the kernel that runs now). Events (inotify, D-Bus signals) only say "look again": every
//! detector re-reads the state from disk, so a missed or repeated event changes nothing.

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

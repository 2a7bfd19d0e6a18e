//! Which overlay: the (kernel release, driver version, architecture) triple every source,
//! archive and store entry is named by.

use std::fmt;

use serde::Serialize;

use crate::overlay::manifest::Manifest;

/// Which overlay to stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OverlayKey {
    /// The target kernel's release, as `uname -r` prints it (e.g. `5.14.0-427.el9.x86_64`).
    pub kernel_release: String,
    /// The NVIDIA driver version (e.g. `550.54.15`).
    pub driver_version: String,
    /// The machine architecture (e.g. `x86_64`, `aarch64`); compared verbatim with the
    /// manifest's `arch`.
    pub arch: String,
}

impl fmt::Display for OverlayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel {}, driver {}, {}",
            self.kernel_release, self.driver_version, self.arch
        )
    }
}

impl OverlayKey {
    /// The first field where `manifest` is not for this key: (field, expected, found).
    pub fn mismatch(&self, manifest: &Manifest) -> Option<(&'static str, String, String)> {
        [
            (
                "kernel-release",
                &self.kernel_release,
                &manifest.kernel_release,
            ),
            (
                "driver-version",
                &self.driver_version,
                &manifest.driver_version,
            ),
            ("arch", &self.arch, &manifest.arch),
        ]
        .into_iter()
        .find(|(_, expected, found)| expected != found)
        .map(|(field, expected, found)| (field, expected.clone(), found.clone()))
    }
}

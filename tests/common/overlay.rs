//! Builds overlay directories (tree + `overlay.toml`) from fixture modules.

use std::fs;
use std::path::{Path, PathBuf};

use nvdriver_agent::overlay::manifest::{
    FileEntry, Flavor, Manifest, SymlinkEntry, FORMAT_VERSION,
};
use nvdriver_agent::overlay::verify::sha256_bytes;

use super::modules::FixtureModule;

pub const DRIVER: &str = "570.124.06";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    Plain,
    Xz,
    Zstd,
}

pub struct OverlayBuilder {
    pub kernel_release: String,
    pub driver_version: String,
    pub arch: String,
    pub modules: Vec<(FixtureModule, Packing)>,
    pub firmware: bool,
    pub userspace: bool,
}

impl OverlayBuilder {
    /// The usual NVIDIA set: nvidia, nvidia-modeset and nvidia-uvm (both on nvidia), nvidia-drm
    /// (on nvidia-modeset and the OS's drm), with firmware. Each calls what it depends on, as
    /// the real modules do (the symbols are NVIDIA's), so the simulated kernel, which resolves
    /// symbols and never reads `depends=`, refuses a wrong order.
    pub fn nvidia(kernel_release: &str) -> Self {
        let m = |name: &str| FixtureModule::new(name, kernel_release, DRIVER);
        OverlayBuilder {
            kernel_release: kernel_release.into(),
            driver_version: DRIVER.into(),
            arch: std::env::consts::ARCH.into(),
            modules: vec![
                (
                    m("nvidia-drm")
                        .depends(&["nvidia-modeset", "drm", "drm_kms_helper"])
                        .imports(&[
                            "nvKmsKapiGetFunctionsTable",
                            "drm_dev_register",
                            "drm_kms_helper_poll_init",
                            "_printk",
                        ]),
                    Packing::Zstd,
                ),
                (
                    m("nvidia-uvm")
                        .depends(&["nvidia"])
                        .imports(&["nvUvmInterfaceRegisterGpu", "__register_chrdev"]),
                    Packing::Xz,
                ),
                (
                    m("nvidia-modeset")
                        .depends(&["nvidia"])
                        .exports(&["nvKmsKapiGetFunctionsTable"])
                        .imports(&["nvidia_get_rm_ops"]),
                    Packing::Plain,
                ),
                (
                    m("nvidia")
                        .depends(&[])
                        .exports(&["nvidia_get_rm_ops", "nvUvmInterfaceRegisterGpu"])
                        .imports(&["pci_register_driver", "__register_chrdev"]),
                    Packing::Zstd,
                ),
            ],
            firmware: true,
            userspace: false,
        }
    }

    pub fn module(mut self, module: FixtureModule, packing: Packing) -> Self {
        self.modules.retain(|(m, _)| m.name != module.name);
        self.modules.push((module, packing));
        self
    }

    pub fn with_userspace(mut self) -> Self {
        self.userspace = true;
        self
    }

    /// Write the overlay into `dir`; returns its manifest.
    pub fn build(&self, dir: &Path) -> Manifest {
        let mut files = Vec::new();
        let mut symlinks = Vec::new();
        let mut add = |path: String, body: Vec<u8>, mode: u32| {
            let abs = dir.join(&path);
            fs::create_dir_all(abs.parent().unwrap()).unwrap();
            fs::write(&abs, &body).unwrap();
            files.push(FileEntry {
                path: PathBuf::from(path),
                size: body.len() as u64,
                sha256: sha256_bytes(&body),
                mode,
            });
        };
        for (module, packing) in &self.modules {
            let (suffix, body) = match packing {
                Packing::Plain => ("ko", module.elf_bytes()),
                Packing::Xz => ("ko.xz", module.bytes_xz()),
                Packing::Zstd => ("ko.zst", module.bytes_zstd()),
            };
            add(
                format!(
                    "usr/lib/modules/{}/extra/nvidia/{}.{suffix}",
                    self.kernel_release, module.name
                ),
                body,
                0o644,
            );
        }
        if self.firmware {
            add(
                format!(
                    "usr/lib/firmware/nvidia/{}/gsp_ga10x.bin",
                    self.driver_version
                ),
                b"GSP firmware fixture".to_vec(),
                0o644,
            );
        }
        if self.userspace {
            add(
                "usr/bin/nvidia-smi".into(),
                b"#!/bin/sh\necho fixture\n".to_vec(),
                0o755,
            );
            add(
                format!("usr/lib64/libnvidia-ml.so.{}", self.driver_version),
                b"not really a library".to_vec(),
                0o644,
            );
            add(
                format!("usr/lib64/libcuda.so.{}", self.driver_version),
                b"not really a library either".to_vec(),
                0o644,
            );
            for name in ["libnvidia-ml", "libcuda"] {
                let link = PathBuf::from(format!("usr/lib64/{name}.so.1"));
                let target = PathBuf::from(format!("{name}.so.{}", self.driver_version));
                std::os::unix::fs::symlink(&target, dir.join(&link)).unwrap();
                symlinks.push(SymlinkEntry { path: link, target });
            }
        }
        let manifest = Manifest {
            format: FORMAT_VERSION,
            kernel_release: self.kernel_release.clone(),
            driver_version: self.driver_version.clone(),
            arch: self.arch.clone(),
            flavor: Flavor::Open,
            files,
            symlinks,
        };
        fs::write(dir.join("overlay.toml"), manifest.to_toml()).unwrap();
        manifest
    }
}

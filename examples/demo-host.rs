//! Builds a demo host under DIR: a Fedora CoreOS-like fake root whose store holds an overlay of
//! fixture NVIDIA modules (built here, not real drivers) for its kernel, booted from an ostree
//! deployment with its bootloader entry as on a real FCOS host (so `status` can tell which
//! kernel boots next: this one). Then try:
//!
//! ```text
//! nvdriver-agent --root DIR plan
//! nvdriver-agent --root DIR --simulate-kernel load
//! cat DIR/run/nvdriver-agent/simulated-kernel.log
//! nvdriver-agent --root DIR status
//! ```
//!
//! `--simulate-kernel` makes no syscall: it records them and shows their effects inside DIR.

// The examples use a few of the test fixtures, not all of them.
#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::overlay::OverlayBuilder;
use nvdriver_agent::host::Root;
use nvdriver_agent::overlay::Store;

const KERNEL_RELEASE: &str = "6.1.0-28-cloud-amd64";
/// Fedora CoreOS's ostree stateroot.
const STATEROOT: &str = "fedora-coreos";
/// The booted deployment's commit and its kernel's boot checksum (made up, well-formed).
const COMMIT: &str = "3c1e4ba1a5d4b7c5f0e2d8a9b6c3f1e0d2a4b6c8e0f1a3b5c7d9e1f3a5b7c9d1";
const BOOTCSUM: &str = "9f0e8d7c6b5a49382716a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4";

fn write(path: &Path, contents: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// What an installed, booted Fedora CoreOS host has and the ostree detector reads (see
/// `src/watch/ostree/`): the physical root at `/sysroot` (`/ostree` and `/boot` lead into it),
/// one deployment of the stateroot with the kernel under `usr/lib/modules/<kver>/`, its boot
/// link, and the bootloader entry naming that link in `options ostree=`.
fn ostree_boot(root: &Path) {
    let sysroot = root.join("sysroot");
    let deployment = format!("{COMMIT}.0");
    let deploy = sysroot.join(format!("ostree/deploy/{STATEROOT}/deploy"));
    let modules = deploy
        .join(&deployment)
        .join("usr/lib/modules")
        .join(KERNEL_RELEASE);
    write(&modules.join("vmlinuz"), "kernel\n");
    write(&modules.join("initramfs.img"), "initramfs\n");
    write(
        &deploy.join(format!("{deployment}.origin")),
        "[origin]\ncontainer-image-reference=ostree-remote-registry:fedora:quay.io/fedora/fedora-coreos:stable\n",
    );
    fs::create_dir_all(sysroot.join(format!("ostree/deploy/{STATEROOT}/var"))).unwrap();
    // /ostree/boot.1 -> boot.1.1; boot.1.1/<stateroot>/<bootcsum>/0 -> the deployment.
    let bootlinks = sysroot.join(format!("ostree/boot.1.1/{STATEROOT}/{BOOTCSUM}"));
    fs::create_dir_all(&bootlinks).unwrap();
    symlink(
        format!("../../../deploy/{STATEROOT}/deploy/{deployment}"),
        bootlinks.join("0"),
    )
    .unwrap();
    symlink("boot.1.1", sysroot.join("ostree/boot.1")).unwrap();
    // /boot/loader -> loader.1, with the one entry ostree writes for the deployment.
    let boot = sysroot.join("boot");
    let kernel_dir = format!("/ostree/{STATEROOT}-{BOOTCSUM}");
    write(
        &boot.join(format!("{}/vmlinuz-{KERNEL_RELEASE}", &kernel_dir[1..])),
        "kernel\n",
    );
    write(
        &boot.join(format!(
            "{}/initramfs-{KERNEL_RELEASE}.img",
            &kernel_dir[1..]
        )),
        "initramfs\n",
    );
    write(
        &boot.join("loader.1/entries/ostree-1.conf"),
        &format!(
            "title Fedora CoreOS 41.20241109.3.0 (ostree:0)\n\
             version 1\n\
             options root=UUID=0b5b2c8e-2f1c-4f0a-9d3e-1c2b3a4d5e6f rw ostree=/ostree/boot.1/{STATEROOT}/{BOOTCSUM}/0\n\
             linux {kernel_dir}/vmlinuz-{KERNEL_RELEASE}\n\
             initrd {kernel_dir}/initramfs-{KERNEL_RELEASE}.img\n"
        ),
    );
    symlink("loader.1", boot.join("loader")).unwrap();
    symlink("sysroot/ostree", root.join("ostree")).unwrap();
    symlink("sysroot/boot", root.join("boot")).unwrap();
    write(&root.join("run/ostree-booted"), "");
}

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: cargo run --example demo-host -- DIR");
        std::process::exit(2);
    };
    if dir.exists()
        && std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        eprintln!(
            "{}: exists and is not empty; give a new directory",
            dir.display()
        );
        std::process::exit(2);
    }
    let host = common::host::FakeHost::new(KERNEL_RELEASE);
    ostree_boot(host.dir.path());
    let overlay = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KERNEL_RELEASE)
        .with_userspace()
        .build(overlay.path());
    Store::new(
        &Root::new(host.dir.path()),
        "/var/lib/nvdriver-agent/overlays",
    )
    .import(overlay.path())
    .unwrap();
    // Keep the fake root: move it to DIR.
    let built = host.dir.keep();
    std::fs::create_dir_all(dir.parent().unwrap_or(Path::new("."))).unwrap();
    if dir.exists() {
        std::fs::remove_dir(&dir).unwrap();
    }
    if std::fs::rename(&built, &dir).is_err() {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&built)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "copy to {}", dir.display());
        std::fs::remove_dir_all(&built).unwrap();
    }
    println!(
        "demo host ready in {} (kernel {KERNEL_RELEASE})",
        dir.display()
    );
}

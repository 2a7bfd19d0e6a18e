//! Builds a demo host under DIR: a Fedora CoreOS-like fake root whose store holds an overlay of
//! fixture NVIDIA modules (built here, not real drivers) for its kernel. Then try:
//!
//! ```text
//! nvdriver-agent --root DIR plan
//! nvdriver-agent --root DIR --simulate-kernel load
//! cat DIR/run/nvdriver-agent/simulated-kernel.log
//! ```
//!
//! `--simulate-kernel` makes no syscall: it records them and shows their effects inside DIR.

// The examples use a few of the test fixtures, not all of them.
#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use common::overlay::OverlayBuilder;
use nvdriver_agent::host::Root;
use nvdriver_agent::overlay::Store;

const KERNEL_RELEASE: &str = "6.1.0-28-cloud-amd64";

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
    std::fs::create_dir_all(dir.parent().unwrap_or(std::path::Path::new("."))).unwrap();
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

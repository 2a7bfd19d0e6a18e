//! The static aarch64 release binary (`packaging/build`'s `nvdriver-agent-VERSION-aarch64-linux-musl`)
//! run as a user would on an arm64 host, under qemu-user on this x86_64 machine: `--version`,
//! `overlay pack` of arm64 modules, `overlay verify`, `overlay import`, `plan` and a simulated
//! `load` on a fake host. qemu-user gives the binary `aarch64` as `uname -m`, so the planner
//! sees an arm64 machine, as it would on a GH200.
//!
//! Ignored in a plain `cargo test`: it needs that release binary. scripts/test builds it and runs
//! `NVDRIVER_AGENT_AARCH64=<binary> cargo test --test it -- --ignored arm64_qemu::`.

use std::fs;
use std::path::Path;
use std::process::Output;

use crate::common::agent::{aarch64_command, text};
use crate::common::host::FakeHost;
use crate::common::modules::FixtureModule;
use crate::common::overlay::{OverlayBuilder, DRIVER};
use crate::common::Compression;

const KVER: &str = "6.12.117+deb12-cloud-arm64";

fn agent(root: &Path, args: &[&str]) -> Output {
    aarch64_command(root, args).output().unwrap()
}

/// The three modules `plan` loads by default, built for arm64, packed by the aarch64 binary.
fn packed_aarch64_overlay(work: &Path) -> std::path::PathBuf {
    let modules = work.join("kernel-open");
    fs::create_dir_all(&modules).unwrap();
    for name in ["nvidia", "nvidia-modeset", "nvidia-uvm"] {
        let module = FixtureModule::new(name, KVER, DRIVER).aarch64();
        fs::write(
            modules.join(module.file_name(Compression::None)),
            module.bytes(Compression::None),
        )
        .unwrap();
    }
    let tree = work.join("tree");
    let args = ["overlay", "pack", "--modules", modules.to_str().unwrap()];
    let out = agent(
        Path::new("/nonexistent"),
        &[
            &args[..],
            &["--arch", "aarch64", "--out-dir", tree.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out));
    tree
}

#[test]
#[ignore = "needs the static aarch64 binary and qemu-user; scripts/test runs it"]
fn version_runs_under_qemu_user() {
    let out = agent(Path::new("/nonexistent"), &["--version"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("nvdriver-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
#[ignore = "needs the static aarch64 binary and qemu-user; scripts/test runs it"]
fn packs_verifies_imports_plans_and_loads_an_aarch64_overlay() {
    let work = tempfile::tempdir().unwrap();
    let tree = packed_aarch64_overlay(work.path());
    let host = FakeHost::new(KVER);
    let root = host.dir.path();

    let verify = agent(root, &["overlay", "verify", tree.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("valid overlay"),
        "{}",
        text(&verify)
    );

    let import = agent(root, &["overlay", "import", tree.to_str().unwrap()]);
    assert!(import.status.success(), "{}", text(&import));

    let plan = agent(root, &["plan", "--json"]);
    assert!(plan.status.success(), "{}", text(&plan));
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["arch"], "aarch64", "{plan:#}");
    assert_eq!(plan["kernel_release"], KVER, "{plan:#}");
    let names: Vec<&str> = crate::common::str_fields(&plan["modules"], "name");
    assert_eq!(names, ["nvidia", "nvidia_modeset", "nvidia_uvm"]);

    let load = agent(root, &["load"]);
    assert!(load.status.success(), "{}", text(&load));
    let log = host.read("/run/nvdriver-agent/simulated-kernel.log");
    assert_eq!(log.matches("finit-module").count(), 3, "{log}");
}

/// An x86_64 overlay imports (the store holds any architecture) but the arm64 host's plan
/// refuses it, naming both architectures, with exit code 4.
#[test]
#[ignore = "needs the static aarch64 binary and qemu-user; scripts/test runs it"]
fn an_x86_64_overlay_is_refused_on_an_aarch64_host() {
    let host = FakeHost::new(KVER);
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(src.path());
    let root = host.dir.path();
    let import = agent(root, &["overlay", "import", src.path().to_str().unwrap()]);
    assert!(import.status.success(), "{}", text(&import));
    let plan = agent(root, &["plan"]);
    assert_eq!(plan.status.code(), Some(4), "{}", text(&plan));
    assert!(
        String::from_utf8_lossy(&plan.stderr)
            .contains("is for x86_64 but this machine is aarch64; stage the aarch64 build"),
        "{}",
        text(&plan)
    );
}

//! The `nvdriver-agent` binary as a user runs it, on a fake host (`--root`) with the kernel
//! simulated: import, plan, load, exit codes.

use crate::common::agent::text;
use crate::common::host::FakeHost;
use crate::common::overlay::{OverlayBuilder, DRIVER};

const KVER: &str = "6.1.0-28-cloud-amd64";

fn agent(host: &FakeHost, args: &[&str]) -> std::process::Output {
    crate::common::agent::run(host.dir.path(), args)
}

fn imported_host() -> FakeHost {
    let host = FakeHost::new(KVER);
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(src.path());
    let out = agent(&host, &["overlay", "import", src.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("imported"),
        "{}",
        text(&out)
    );
    host
}

#[test]
fn plan_json_orders_modules() {
    let host = imported_host();
    host.write(
        "/etc/nvdriver-agent/config.d/50-drm.toml",
        "[driver]\nmodules = [\"nvidia-drm\", \"nvidia-uvm\", \"nvidia-modeset\", \"nvidia\"]\n",
    );
    let out = agent(&host, &["plan", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = crate::common::str_fields(&plan["modules"], "name");
    let pos = |n: &str| names.iter().position(|m| *m == n).unwrap();
    assert_eq!(pos("nvidia"), 0, "{names:?}");
    assert!(
        pos("nvidia_modeset") < pos("nvidia_drm") && pos("nvidia_uvm") < pos("nvidia_drm"),
        "{names:?}"
    );
    assert_eq!(plan["driver_version"], DRIVER);
    assert_eq!(plan["kernel_release"], KVER);
}

#[test]
fn load_twice_then_plan_says_loaded() {
    let host = imported_host();
    let first = agent(&host, &["load"]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("loaded for"),
        "{}",
        text(&first)
    );
    let log_after_first = host.read("/run/nvdriver-agent/simulated-kernel.log");
    assert!(
        log_after_first.contains("finit-module"),
        "{log_after_first}"
    );
    let second = agent(&host, &["load"]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("already loaded"),
        "{}",
        text(&second)
    );
    assert_eq!(
        host.read("/run/nvdriver-agent/simulated-kernel.log"),
        log_after_first,
        "no new syscalls"
    );
    let plan = agent(&host, &["plan"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("nvidia already loaded"),
        "{}",
        text(&plan)
    );
}

#[test]
fn exit_codes() {
    let host = FakeHost::new(KVER);
    // No overlay: warn policy → 0; plan says so with 3.
    assert_eq!(agent(&host, &["load"]).status.code(), Some(0));
    assert_eq!(agent(&host, &["plan"]).status.code(), Some(3));
    host.write(
        "/etc/nvdriver-agent/config.toml",
        "[policy]\nmissing-overlay = \"fail\"\n",
    );
    let out = agent(&host, &["load"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    // A typo in the config → 2, naming file and line.
    host.write(
        "/etc/nvdriver-agent/config.d/10-typo.toml",
        "[store]\ndri = \"/x\"\n",
    );
    let out = agent(&host, &["load"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config.d/10-typo.toml:2"),
        "{}",
        text(&out)
    );
}

#[test]
fn overlay_verify_reports_and_refuses() {
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(src.path());
    let host = FakeHost::new(KVER);
    let out = agent(&host, &["overlay", "verify", src.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("valid overlay"),
        "{}",
        text(&out)
    );
    std::fs::write(src.path().join("usr/lib/stray"), "x").unwrap();
    let out = agent(&host, &["overlay", "verify", src.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not listed in the manifest"),
        "{}",
        text(&out)
    );
}

#[test]
fn escaping_manifest_is_refused_on_import() {
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(src.path());
    let manifest = std::fs::read_to_string(src.path().join("overlay.toml")).unwrap();
    let evil = manifest.replacen(
        "path = \"usr/lib/firmware",
        "path = \"usr/../../../etc/firmware",
        1,
    );
    std::fs::write(src.path().join("overlay.toml"), evil).unwrap();
    let host = FakeHost::new(KVER);
    let before = host.snapshot();
    let out = agent(&host, &["overlay", "import", src.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(".."),
        "{}",
        text(&out)
    );
    assert_eq!(host.snapshot(), before);
}

#[test]
fn modinfo_prints_like_modinfo() {
    let dir = tempfile::tempdir().unwrap();
    let module = crate::common::modules::FixtureModule::new("nvidia-uvm", KVER, DRIVER)
        .depends(&["nvidia"])
        .signed();
    let path = dir.path().join("nvidia-uvm.ko.xz");
    std::fs::write(&path, module.bytes_xz()).unwrap();
    let host = FakeHost::new(KVER);
    let out = agent(&host, &["modinfo", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("name:") && stdout.contains("nvidia_uvm"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("vermagic:       {KVER}")) || stdout.contains(KVER),
        "{stdout}"
    );
    assert!(
        stdout.contains("depends:") && stdout.contains("nvidia"),
        "{stdout}"
    );
    assert!(stdout.contains("signer:"), "{stdout}");
}

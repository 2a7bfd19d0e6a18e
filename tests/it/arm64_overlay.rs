//! `arch = "aarch64"` overlays end to end on this (x86_64) test machine: `overlay pack --arch
//! aarch64` of arm64 modules (`EM_AARCH64` ELF objects), the archive staged for an aarch64 key,
//! and the load planned for an aarch64 host: the pure planner given the host facts an arm64
//! machine's `uname -m` gives (the binary itself cannot run as aarch64 here). Modules built for
//! the other architecture are refused by pack and by staging, as the kernel's `elf_check_arch`
//! would refuse them at load ("Invalid module format").

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::common::agent;
use crate::common::host::{FakeHost, STORE};
use crate::common::modules::FixtureModule;
use crate::common::overlay::DRIVER;
use crate::common::Compression;
use nvdriver_agent::config::{self, ConfigSource, StageSettings};
use nvdriver_agent::host::modprobe::ModprobeConfig;
use nvdriver_agent::host::{HostFacts, KernelState};
use nvdriver_agent::kmod::plan::{
    plan_load, InspectedModule, MountState, PlanError, PlanInputs, ToolkitState,
};
use nvdriver_agent::overlay::source::{stage, OverlayKey, SourceError};
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.12.117+deb12-cloud-arm64";

fn write_modules(dir: &Path, aarch64: bool) {
    fs::create_dir_all(dir).unwrap();
    for name in ["nvidia", "nvidia-modeset", "nvidia-uvm"] {
        let mut module = FixtureModule::new(name, KVER, DRIVER);
        if aarch64 {
            module = module.aarch64();
        }
        fs::write(
            dir.join(module.file_name(Compression::None)),
            module.bytes(Compression::None),
        )
        .unwrap();
    }
}

/// `overlay pack` of `modules` for `arch`, to `out` given as `out_flag` (`--out-archive` or
/// `--out-dir`).
fn pack(modules: &Path, arch: &str, out_flag: &str, out: &Path) -> std::process::Output {
    agent::run(
        Path::new("/nonexistent"),
        &[
            "overlay",
            "pack",
            "--modules",
            modules.to_str().unwrap(),
            "--arch",
            arch,
            out_flag,
            out.to_str().unwrap(),
        ],
    )
}

fn settings(source: &str) -> StageSettings {
    StageSettings {
        sources: vec![source.to_string()],
        max_download_bytes: 64 << 20,
        download_timeout: Duration::from_secs(20),
        allow_http: false,
        keep_extra: 1,
        signatures: Default::default(),
        oci: Default::default(),
        keep_free: nvdriver_agent::overlay::space::Reserve::NONE,
        fetcher: None,
    }
}

fn key(arch: &str) -> OverlayKey {
    OverlayKey {
        kernel_release: KVER.into(),
        driver_version: DRIVER.into(),
        arch: arch.into(),
    }
}

#[test]
fn an_aarch64_overlay_packs_stages_and_plans() {
    let work = tempfile::tempdir().unwrap();
    let modules = work.path().join("kernel-open");
    write_modules(&modules, true);
    let archive = work.path().join("nvidia-aarch64.tar.zst");
    let out = pack(&modules, "aarch64", "--out-archive", &archive);
    assert!(out.status.success(), "{}", agent::text(&out));

    // Packed for the wrong architecture: refused, naming both.
    let wrong = pack(
        &modules,
        "x86_64",
        "--out-archive",
        &work.path().join("wrong.tar.zst"),
    );
    assert!(!wrong.status.success());
    assert!(
        agent::text(&wrong).contains("was built for aarch64 but the overlay is for x86_64"),
        "{}",
        agent::text(&wrong)
    );

    // Staged for an aarch64 key into a host's store.
    let host = FakeHost::new(KVER);
    host.write_bytes("/srv/nvidia-aarch64.tar.zst", &fs::read(&archive).unwrap());
    let store = Store::new(&host.root, STORE);
    let report = stage(
        &host.root,
        &store,
        &settings("/srv/nvidia-{arch}.tar.zst"),
        &key("aarch64"),
        None,
    )
    .unwrap();
    assert!(
        report.source.ends_with("nvidia-aarch64.tar.zst"),
        "{}",
        report.source
    );
    assert!(store.verified(KVER, DRIVER, "aarch64").is_some());

    // Planned for an aarch64 host, as the boot load would; an x86_64 host refuses it.
    let overlay = store.select(KVER, None).unwrap().unwrap();
    assert_eq!(overlay.manifest.arch, "aarch64");
    let inspected: Vec<InspectedModule> = overlay
        .manifest
        .module_files()
        .map(|entry| InspectedModule {
            relative_path: entry.path.clone(),
            info: nvdriver_agent::modinfo::read_module_file(
                &host.root.join(overlay.dir.join(&entry.path)),
            )
            .unwrap(),
        })
        .collect();
    let settings = config::load(&host.root, &ConfigSource::Layered).unwrap();
    let kernel = KernelState::read(&host.root, KVER).unwrap();
    let modprobe = ModprobeConfig::read(&host.root).unwrap();
    let facts = |arch: &str| HostFacts {
        arch: arch.into(),
        ..HostFacts::read(&host.root).unwrap()
    };
    let plan_for = |host: &HostFacts| {
        plan_load(&PlanInputs {
            settings: &settings,
            host,
            kernel: &kernel,
            overlay: &overlay,
            modules: &inspected,
            toolkit: ToolkitState::Absent,
            driver_root_mount: MountState::NotMounted,
            modprobe: &modprobe,
            caps_nodes: Ok(Vec::new()),
        })
    };
    let plan = plan_for(&facts("aarch64")).unwrap();
    assert_eq!(plan.arch, "aarch64");
    let loaded: Vec<String> = plan.modules.iter().map(|m| m.name.clone()).collect();
    assert_eq!(loaded, ["nvidia", "nvidia_modeset", "nvidia_uvm"]);
    let err = plan_for(&facts("x86_64")).unwrap_err();
    assert!(matches!(err, PlanError::WrongArch { .. }), "{err}");
}

#[test]
fn x86_modules_in_an_aarch64_archive_are_refused_at_stage() {
    let work = tempfile::tempdir().unwrap();
    let modules = work.path().join("kernel-open");
    write_modules(&modules, false);
    // Packed honestly for x86_64, then the manifest's arch rewritten, as a wrong build script
    // would: staging reads the modules' ELF headers, not only the manifest.
    let tree = work.path().join("tree");
    let out = pack(&modules, "x86_64", "--out-dir", &tree);
    assert!(out.status.success(), "{}", agent::text(&out));
    let manifest = tree.join("overlay.toml");
    let text = fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("arch = \"x86_64\""), "{text}");
    fs::write(
        &manifest,
        text.replace("arch = \"x86_64\"", "arch = \"aarch64\""),
    )
    .unwrap();

    let host = FakeHost::new(KVER);
    host.mkdir("/srv");
    let source = host.path("/srv/tree");
    fs::rename(&tree, &source).unwrap();
    let store = Store::new(&host.root, STORE);
    let err = stage(
        &host.root,
        &store,
        &settings("/srv/tree"),
        &key("aarch64"),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, SourceError::Failed { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("was built for x86_64 but the overlay is for aarch64"),
        "{err}"
    );
    assert!(store.kernel_releases().unwrap().is_empty());
}

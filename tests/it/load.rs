//! The boot path on whole fake hosts: overlay in the store → plan → load through the
//! simulated kernel, asserting the exact syscall sequence and the files it leaves; and every
//! kind of bad input refused with nothing changed.

use std::fs;
use std::path::PathBuf;

use crate::common::host::FakeHost;
use crate::common::modules::FixtureModule;
use crate::common::overlay::{OverlayBuilder, Packing, DRIVER};
use nvdriver_agent::app::{exit, CommandError, Context};
use nvdriver_agent::boot::load::{self, LoadOutcome, Prepared};
use nvdriver_agent::cli::overlay as overlay_cmd;
use nvdriver_agent::config::ConfigSource;
use nvdriver_agent::kmod::plan::{LoadPlan, ModuleAction, PlanError};
use nvdriver_agent::kmod::sys::{Call, SimulatedKernel};
use pretty_assertions::assert_eq;

const KVER: &str = "6.1.0-28-cloud-amd64";
const STORE: &str = "/var/lib/nvdriver-agent/overlays";

fn overlay_dir() -> String {
    format!("{STORE}/{KVER}/{DRIVER}")
}

/// A host whose store holds `overlay` (imported through the real store code).
fn host_with(overlay: &OverlayBuilder) -> FakeHost {
    let host = FakeHost::new(KVER);
    host.import(overlay);
    host
}

fn ctx(host: &FakeHost) -> Context {
    Context::new(host.root.clone(), &ConfigSource::Layered).unwrap()
}

fn plan(host: &FakeHost) -> Result<LoadPlan, CommandError> {
    let kernel = SimulatedKernel::new(host.root.clone());
    match load::prepare_load(&ctx(host), &kernel)? {
        Prepared::Ready(p) => Ok(p.plan),
        Prepared::NoOverlay { .. } => panic!("no overlay"),
    }
}

fn load(host: &FakeHost) -> (Result<LoadOutcome, CommandError>, Vec<Call>) {
    let mut kernel = SimulatedKernel::new(host.root.clone());
    let result = load::load(&ctx(host), &mut kernel);
    (result, kernel.calls)
}

fn module_names(plan: &LoadPlan) -> Vec<&str> {
    plan.modules.iter().map(|m| m.name.as_str()).collect()
}

fn enable_drm(host: &FakeHost) {
    host.write(
        "/etc/nvdriver-agent/config.d/50-drm.toml",
        "[driver]\nmodules = [\"nvidia\", \"nvidia-modeset\", \"nvidia-uvm\", \"nvidia-drm\"]\n",
    );
}

#[test]
fn plan_orders_modules_by_dependencies() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    assert_eq!(
        module_names(&plan(&host).unwrap()),
        ["nvidia", "nvidia_modeset", "nvidia_uvm"]
    );
    enable_drm(&host);
    let plan = plan(&host).unwrap();
    assert_eq!(
        module_names(&plan),
        ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]
    );
    let os: Vec<_> = plan.os_modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(os, ["i2c_core", "ipmi_msghandler", "drm", "drm_kms_helper"]);
}

/// What real NVIDIA builds look like (measured on the 580 open modules): nvidia-drm and
/// nvidia-peermem carry an empty `depends=` while calling into nvidia-modeset and nvidia. The
/// plan follows the symbols, as depmod does: asked for nvidia-drm alone, listed in any order,
/// it loads nvidia and nvidia-modeset first.
#[test]
fn plan_derives_dependencies_from_symbols_when_depends_is_empty() {
    let m = |name: &str| FixtureModule::new(name, KVER, DRIVER);
    let overlay = OverlayBuilder::nvidia(KVER)
        .module(
            m("nvidia").exports(&["nvidia_get_rm_ops", "nvidia_p2p_get_pages"]),
            Packing::Zstd,
        )
        .module(
            m("nvidia-modeset")
                .depends(&["nvidia"])
                .exports(&["nvKmsKapiGetFunctionsTable"])
                .imports(&["nvidia_get_rm_ops"]),
            Packing::Plain,
        )
        .module(
            m("nvidia-drm").imports(&["nvKmsKapiGetFunctionsTable", "printk"]),
            Packing::Zstd,
        )
        .module(
            m("nvidia-peermem").imports(&["nvidia_p2p_get_pages"]),
            Packing::Plain,
        );
    let host = host_with(&overlay);
    host.write(
        "/etc/nvdriver-agent/config.d/50-drm.toml",
        "[driver]\nmodules = [\"nvidia-peermem\", \"nvidia-drm\"]\n",
    );
    let plan = plan(&host).unwrap();
    // The simulated kernel resolves symbols and ignores depends=: a plan that followed
    // depends= alone fails here with the kernel's "Unknown symbol".
    let (result, _) = load(&host);
    if let Err(e) = result {
        panic!("load failed: {e}");
    }
    assert_eq!(
        module_names(&plan),
        ["nvidia", "nvidia_modeset", "nvidia_drm", "nvidia_peermem"]
    );
    let drm = plan
        .modules
        .iter()
        .find(|m| m.name == "nvidia_drm")
        .unwrap();
    assert_eq!(drm.depends, ["nvidia_modeset"], "derived, shown in plan");
}

/// What modprobe would do, done by the agent: nvidia-drm built against a kernel with DRM
/// imports drm_dev_register, which the OS's `modules.symbols` says drm exports, so drm is
/// modprobed before it (nothing in `depends=` says so); nvidia's parameters reach
/// `finit_module` as modprobe would pass them: `modprobe.d` options (files sorted by name,
/// /etc hiding /usr/lib), then `nvidia.<param>=` of /proc/cmdline, then the agent's
/// `[parameters]`, the kernel keeping the last value of each.
#[test]
fn modprobe_semantics_reach_the_kernel() {
    let m = |name: &str| FixtureModule::new(name, KVER, DRIVER);
    let overlay = OverlayBuilder::nvidia(KVER)
        .module(
            m("nvidia")
                .exports(&["nvidia_get_rm_ops"])
                .parameter("NVreg_A", "int")
                .parameter("NVreg_B", "charp"),
            Packing::Plain,
        )
        .module(
            m("nvidia-drm")
                .depends(&["nvidia-modeset"])
                .imports(&["drm_dev_register", "printk"]),
            Packing::Plain,
        );
    let host = host_with(&overlay);
    host.write(
        &format!("/usr/lib/modules/{KVER}/modules.symbols"),
        "# Aliases for symbols, used by symbol_request().\nalias symbol:drm_dev_register drm\n",
    );
    host.write(
        "/usr/lib/modprobe.d/nvidia.conf",
        "options nvidia NVreg_A=usr-hidden\n",
    );
    host.write("/etc/modprobe.d/nvidia.conf", "options nvidia NVreg_A=1\n");
    host.write(
        "/usr/lib/modprobe.d/10-nvidia.conf",
        "options nvidia NVreg_B=\"a b\"\n",
    );
    host.write(
        "/proc/cmdline",
        "BOOT_IMAGE=/vmlinuz root=/dev/vda1 nvidia.NVreg_A=2 quiet\n",
    );
    host.write(
        "/etc/nvdriver-agent/config.toml",
        "[driver]\nmodules = [\"nvidia\", \"nvidia-drm\"]\nos-modules = []\n[parameters.nvidia]\nNVreg_A = 3\n",
    );
    let params = "NVreg_B=\"a b\" NVreg_A=1 NVreg_A=2 NVreg_A=3";
    let plan = plan(&host).unwrap();
    let os: Vec<_> = plan
        .os_modules
        .iter()
        .map(|m| (m.name.as_str(), m.reason.as_str()))
        .collect();
    assert_eq!(os, [("drm", "symbol drm_dev_register of nvidia_drm")]);
    let sources: Vec<_> = plan.modules[0]
        .parameter_sources
        .iter()
        .map(|p| p.source.as_str())
        .collect();
    assert_eq!(
        sources,
        [
            "/usr/lib/modprobe.d/10-nvidia.conf",
            "/etc/modprobe.d/nvidia.conf",
            "/proc/cmdline",
            "config"
        ]
    );

    let (result, calls) = load(&host);
    result.unwrap();
    let modules = format!("{}/usr/lib/modules/{KVER}/extra/nvidia", overlay_dir());
    let loads: Vec<_> = calls
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Call::Modprobe { .. } | Call::FinitModule { .. } | Call::InitModule { .. }
            )
        })
        .collect();
    assert_eq!(
        loads,
        [
            Call::Modprobe { name: "drm".into() },
            Call::FinitModule {
                name: "nvidia".into(),
                path: format!("{modules}/nvidia.ko").into(),
                params: params.into(),
                kernel_decompresses: false,
            },
            Call::FinitModule {
                name: "nvidia_modeset".into(),
                path: format!("{modules}/nvidia-modeset.ko").into(),
                params: "".into(),
                kernel_decompresses: false,
            },
            Call::FinitModule {
                name: "nvidia_drm".into(),
                path: format!("{modules}/nvidia-drm.ko").into(),
                params: "".into(),
                kernel_decompresses: false,
            },
        ]
    );
}

/// `modprobe.blacklist=nvidia` on the kernel command line: the operator does not want the
/// driver; `load` refuses with what to do, and changes nothing.
#[test]
fn driver_blacklisted_on_the_kernel_command_line_is_refused() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    host.write("/proc/cmdline", "quiet modprobe.blacklist=nouveau,nvidia\n");
    let before = host.snapshot();
    let (result, calls) = load(&host);
    let err = match result {
        Err(e) => e,
        Ok(_) => panic!("loaded a blacklisted driver"),
    };
    assert!(
        matches!(err, CommandError::Plan(PlanError::Blacklisted { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("modprobe.blacklist= in /proc/cmdline"),
        "{err}"
    );
    assert_eq!(err.exit_code(), exit::HOST_CONFLICT);
    assert!(calls.is_empty(), "{calls:?}");
    assert_eq!(host.snapshot(), before);
}

#[test]
fn plan_touches_nothing() {
    let host = host_with(&OverlayBuilder::nvidia(KVER).with_userspace());
    let before = host.snapshot();
    plan(&host).unwrap();
    assert_eq!(host.snapshot(), before);
}

#[test]
fn load_makes_the_exact_syscalls_and_files() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    host.write(
        "/etc/nvdriver-agent/config.toml",
        "[parameters.nvidia]\nNVreg_OpenRmEnableUnsupportedGpus = 1\n",
    );
    let (result, calls) = load(&host);
    let LoadOutcome::Loaded { report, .. } = result.unwrap() else {
        panic!("not loaded")
    };
    let modules = format!("{}/usr/lib/modules/{KVER}/extra/nvidia", overlay_dir());
    let expected = vec![
        Call::WriteSysfs {
            path: "/sys/module/firmware_class/parameters/path".into(),
            value: format!("{}/usr/lib/firmware", overlay_dir()),
        },
        Call::Modprobe {
            name: "i2c_core".into(),
        },
        Call::Modprobe {
            name: "ipmi_msghandler".into(),
        },
        // zstd: the kernel decompresses it (/sys/module/compression says zstd).
        Call::FinitModule {
            name: "nvidia".into(),
            path: format!("{modules}/nvidia.ko.zst").into(),
            params: "NVreg_OpenRmEnableUnsupportedGpus=1".into(),
            kernel_decompresses: true,
        },
        Call::FinitModule {
            name: "nvidia_modeset".into(),
            path: format!("{modules}/nvidia-modeset.ko").into(),
            params: "".into(),
            kernel_decompresses: false,
        },
        // xz: this kernel cannot, so the agent decompresses it and hands over the image
        // (init_module: SELinux refuses a memfd's label, see ModuleImage::Decompressed).
        Call::InitModule {
            name: "nvidia_uvm".into(),
            path: format!("{modules}/nvidia-uvm.ko.xz").into(),
            params: "".into(),
        },
        Call::Mknod {
            path: "/dev/nvidiactl".into(),
            major: 195,
            minor: 255,
            mode: 0o666,
        },
        Call::Mknod {
            path: "/dev/nvidia0".into(),
            major: 195,
            minor: 0,
            mode: 0o666,
        },
        Call::Mknod {
            path: "/dev/nvidia-modeset".into(),
            major: 195,
            minor: 254,
            mode: 0o666,
        },
        Call::Mknod {
            path: "/dev/nvidia-uvm".into(),
            major: 507,
            minor: 0,
            mode: 0o666,
        },
        Call::Mknod {
            path: "/dev/nvidia-uvm-tools".into(),
            major: 507,
            minor: 1,
            mode: 0o666,
        },
    ];
    assert_eq!(calls, expected);
    assert_eq!(report.loaded, ["nvidia", "nvidia_modeset", "nvidia_uvm"]);

    // The files it leaves.
    assert_eq!(
        fs::read_link(host.path("/dev/char/195:255")).unwrap(),
        PathBuf::from("../nvidiactl")
    );
    assert_eq!(
        fs::read_link(host.path("/dev/char/507:1")).unwrap(),
        PathBuf::from("../nvidia-uvm-tools")
    );
    let toolkit = host.read("/etc/nvidia-container-runtime/config.toml");
    assert!(
        toolkit.contains("[nvidia-container-cli]") && toolkit.contains("root = \"/\""),
        "{toolkit}"
    );
    let ready = host.read("/run/nvidia/validations/driver-ready");
    assert!(
        ready.contains("IS_HOST_DRIVER=true") && ready.contains("NVIDIA_DRIVER_ROOT=/\n"),
        "{ready}"
    );
    assert!(host.read("/proc/modules").contains("nvidia_uvm"));
}

#[test]
fn second_load_is_a_noop() {
    let host = host_with(&OverlayBuilder::nvidia(KVER).with_userspace());
    let (first, _) = load(&host);
    first.unwrap();
    let after_first = host.snapshot();
    let (second, calls) = load(&host);
    let LoadOutcome::Loaded { report, plan } = second.unwrap() else {
        panic!()
    };
    assert!(report.is_noop(), "{report:?}");
    assert!(plan
        .modules
        .iter()
        .all(|m| m.action == ModuleAction::AlreadyLoaded));
    assert_eq!(calls, vec![], "no syscall the second time");
    assert_eq!(
        host.snapshot(),
        after_first,
        "no file changed the second time"
    );
}

#[test]
fn userspace_overlay_is_mounted_and_toolkit_pointed_at_it() {
    let host = host_with(&OverlayBuilder::nvidia(KVER).with_userspace());
    fs::create_dir_all(host.path("/etc/nvidia-container-runtime")).unwrap();
    let shipped = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/toolkit/flatcar-sysext-bakery.nvidia-runtime.config.toml"
    ))
    .unwrap();
    host.write("/etc/nvidia-container-runtime/config.toml", &shipped);
    let (result, calls) = load(&host);
    result.unwrap();
    assert!(calls.contains(&Call::BindMount {
        source: overlay_dir().into(),
        target: "/run/nvidia/driver".into(),
    }));
    let toolkit = host.read("/etc/nvidia-container-runtime/config.toml");
    assert!(
        toolkit.contains("root = \"/run/nvidia/driver\""),
        "{toolkit}"
    );
    for comment in shipped.lines().filter(|l| l.trim_start().starts_with('#')) {
        assert!(toolkit.contains(comment), "comment {comment:?} kept");
    }
    assert!(host
        .read("/run/nvidia/validations/driver-ready")
        .contains("NVIDIA_DRIVER_ROOT=/run/nvidia/driver"));
    // The store made an ld.so.cache for the toolkit when ldconfig is there.
    if std::path::Path::new("/sbin/ldconfig").exists() {
        assert!(host.exists(&format!("{}/etc/ld.so.cache", overlay_dir())));
    }
}

/// Run `load` on a host expected to refuse; assert the exit code and that nothing changed.
fn refused(host: &FakeHost, code: u8) -> String {
    let before = host.snapshot();
    let (result, calls) = load(host);
    let err = match result {
        Err(e) => e,
        Ok(_) => panic!("load succeeded"),
    };
    assert_eq!(err.exit_code(), code, "{err}");
    assert_eq!(calls, vec![], "no syscall made: {err}");
    assert_eq!(host.snapshot(), before, "host unchanged: {err}");
    err.to_string()
}

#[test]
fn digest_mismatch_is_refused() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    let path = host.path(format!(
        "{}/usr/lib/modules/{KVER}/extra/nvidia/nvidia-modeset.ko",
        overlay_dir()
    ));
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let msg = refused(&host, exit::INVALID_OVERLAY);
    assert!(
        msg.contains("sha256") && msg.contains("nvidia-modeset.ko"),
        "{msg}"
    );
}

#[test]
fn truncated_module_is_refused() {
    let host = FakeHost::new(KVER);
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(src.path());
    // Truncate the file and re-sign the manifest for it: the digest matches, the ELF does not.
    let rel = format!("usr/lib/modules/{KVER}/extra/nvidia/nvidia-modeset.ko");
    let bytes = fs::read(src.path().join(&rel)).unwrap();
    let cut = &bytes[..bytes.len() / 3];
    fs::write(src.path().join(&rel), cut).unwrap();
    let manifest_path = src.path().join("overlay.toml");
    let mut manifest = nvdriver_agent::overlay::Manifest::parse(
        &fs::read_to_string(&manifest_path).unwrap(),
        &manifest_path,
    )
    .unwrap();
    let entry = manifest
        .files
        .iter_mut()
        .find(|f| f.path.as_os_str() == rel.as_str())
        .unwrap();
    entry.size = cut.len() as u64;
    entry.sha256 = nvdriver_agent::overlay::verify::sha256_bytes(cut);
    fs::write(&manifest_path, manifest.to_toml()).unwrap();
    // The importer refuses it...
    let err = overlay_cmd::overlay_import(&ctx(&host), src.path()).unwrap_err();
    assert_eq!(err.exit_code(), exit::INVALID_OVERLAY, "{err}");
    assert!(!host.exists(STORE), "store untouched");
    // ...and so does the loader if such a thing is in the store anyway.
    let dir = host.path(overlay_dir());
    fs::create_dir_all(dir.parent().unwrap()).unwrap();
    copy_tree(src.path(), &dir);
    let msg = refused(&host, exit::INVALID_OVERLAY);
    assert!(msg.contains("nvidia-modeset.ko"), "{msg}");
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn module_for_another_kernel_is_refused() {
    let other = "6.1.0-27-cloud-amd64";
    let overlay = OverlayBuilder::nvidia(KVER).module(
        FixtureModule::new("nvidia-uvm", other, DRIVER).depends(&["nvidia"]),
        Packing::Xz,
    );
    let host = host_with(&overlay);
    let msg = refused(&host, exit::INVALID_OVERLAY);
    assert!(msg.contains(other) && msg.contains(KVER), "{msg}");
}

#[test]
fn dependency_cycle_is_refused() {
    let overlay = OverlayBuilder::nvidia(KVER).module(
        FixtureModule::new("nvidia", KVER, DRIVER).depends(&["nvidia-uvm"]),
        Packing::Plain,
    );
    let host = host_with(&overlay);
    let msg = refused(&host, exit::INVALID_OVERLAY);
    assert!(msg.contains("cycle") && msg.contains("nvidia_uvm"), "{msg}");
}

#[test]
fn missing_dependency_is_refused() {
    let overlay = OverlayBuilder::nvidia(KVER).module(
        FixtureModule::new("nvidia", KVER, DRIVER).depends(&["nvidia-missing"]),
        Packing::Plain,
    );
    let host = host_with(&overlay);
    let msg = refused(&host, exit::INVALID_OVERLAY);
    assert!(msg.contains("nvidia_missing"), "{msg}");
}

#[test]
fn configured_module_absent_from_overlay_is_refused() {
    let mut overlay = OverlayBuilder::nvidia(KVER);
    overlay.modules.retain(|(m, _)| m.name != "nvidia-uvm");
    let host = host_with(&overlay);
    let msg = refused(&host, exit::INVALID_OVERLAY);
    assert!(msg.contains("nvidia-uvm"), "{msg}");
}

#[test]
fn module_claiming_another_name_is_refused() {
    let mut impostor = FixtureModule::new("nvidia-modeset", KVER, DRIVER).depends(&["nvidia"]);
    impostor = impostor.extra("name=evil");
    impostor = impostor.without_key("name");
    let host = host_with(&OverlayBuilder::nvidia(KVER).module(impostor, Packing::Plain));
    let msg = refused(&host, exit::INVALID_OVERLAY);
    assert!(msg.contains("evil"), "{msg}");
}

#[test]
fn config_typo_is_refused() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    host.write(
        "/etc/nvdriver-agent/config.toml",
        "[driver]\nmodlues = [\"nvidia\"]\n",
    );
    let before = host.snapshot();
    let err = Context::new(host.root.clone(), &ConfigSource::Layered)
        .err()
        .expect("config error");

    assert_eq!(err.exit_code(), exit::CONFIG);
    let msg = err.to_string();
    assert!(
        msg.contains("/etc/nvdriver-agent/config.toml:2") && msg.contains("modlues"),
        "{msg}"
    );
    assert_eq!(host.snapshot(), before);
}

#[test]
fn driver_root_that_is_not_a_directory_is_refused() {
    let host = host_with(&OverlayBuilder::nvidia(KVER).with_userspace());
    host.write(
        "/run/nvidia/driver",
        "a file where the driver root should be",
    );
    let msg = refused(&host, exit::FAILURE);
    assert!(
        msg.contains("/run/nvidia/driver") && msg.contains("not a directory"),
        "{msg}"
    );
}

#[test]
fn unwritable_toolkit_config_is_refused() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    // A directory where the file should be: unwritable even for root.
    fs::create_dir_all(host.path("/etc/nvidia-container-runtime/config.toml")).unwrap();
    let msg = refused(&host, exit::FAILURE);
    assert!(msg.contains("config.toml"), "{msg}");
}

#[test]
fn nouveau_bound_is_refused() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    fs::create_dir_all(host.path("/sys/bus/pci/drivers/nouveau/0000:01:00.0")).unwrap();
    let msg = refused(&host, exit::HOST_CONFLICT);
    assert!(
        msg.contains("nouveau") && msg.contains("0000:01:00.0"),
        "{msg}"
    );
}

#[test]
fn unsigned_modules_refused_when_signatures_enforced() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    host.write("/sys/module/module/parameters/sig_enforce", "Y\n");
    let msg = refused(&host, exit::HOST_CONFLICT);
    assert!(msg.contains("unsigned") && msg.contains("nvidia"), "{msg}");
}

#[test]
fn signed_modules_load_when_signatures_enforced() {
    let mut overlay = OverlayBuilder::nvidia(KVER);
    overlay.modules = overlay
        .modules
        .into_iter()
        .map(|(m, p)| (m.signed(), p))
        .collect();
    let host = host_with(&overlay);
    host.write("/sys/module/module/parameters/sig_enforce", "Y\n");
    host.write(
        "/sys/kernel/security/lockdown",
        "none [integrity] confidentiality\n",
    );
    let (result, _) = load(&host);
    result.unwrap();
}

/// The real GPU host's trusted keys (tests/fixtures/keys/): the kernel's build key in
/// `.builtin_trusted_keys`, shown by its subject key id.
fn with_h200_keys(host: &FakeHost) {
    host.write("/sys/module/module/parameters/sig_enforce", "Y\n");
    host.write(
        "/proc/keys",
        include_str!("../fixtures/keys/h200-proc-keys.txt"),
    );
    host.write(
        "/run/nvdriver-agent/simulated-keyrings",
        include_str!("../fixtures/keys/h200-simulated-keyrings"),
    );
}

const H200_SKID: [u8; 20] = [
    0x4d, 0x51, 0x6c, 0x58, 0xe5, 0x25, 0x77, 0x6e, 0x0d, 0xf5, 0x12, 0xe5, 0xa9, 0xf5, 0x03, 0x3c,
    0x9d, 0x0b, 0xab, 0xe8,
];

fn signed_overlay(sign: impl Fn(FixtureModule) -> FixtureModule) -> OverlayBuilder {
    let mut overlay = OverlayBuilder::nvidia(KVER);
    overlay.modules = overlay
        .modules
        .into_iter()
        .map(|(m, p)| (sign(m), p))
        .collect();
    overlay
}

/// Signed, but by a key none of the kernel's trusted keys can be: refused before any
/// finit_module, naming the module's key id and the kernel's.
#[test]
fn module_signed_by_an_untrusted_key_is_refused_with_both_ids() {
    let host = host_with(&signed_overlay(|m| {
        m.signed_by_skid(&[0xDE, 0xAD, 0xBE, 0xEF])
    }));
    with_h200_keys(&host);
    let msg = refused(&host, exit::HOST_CONFLICT);
    assert!(msg.contains("does not trust"), "{msg}");
    assert!(
        msg.contains("nvidia_uvm") && msg.contains("DE:AD:BE:EF"),
        "{msg}"
    );
    assert!(
        msg.contains(
            "Build time autogenerated kernel key: 4d516c58e525776e0df512e5a9f5033c9d0babe8"
        ),
        "{msg}"
    );
    assert!(msg.contains(".builtin_trusted_keys"), "{msg}");
}

#[test]
fn module_signed_by_a_trusted_key_loads() {
    let host = host_with(&signed_overlay(|m| m.signed_by_skid(&H200_SKID)));
    with_h200_keys(&host);
    assert!(plan(&host).unwrap().warnings.is_empty());
    let (result, _) = load(&host);
    result.unwrap();
    assert!(host.read("/proc/modules").contains("nvidia_uvm"));
}

/// What the real NVIDIA modules on the GPU host look like: signed by issuer CN and serial,
/// against a key shown by subject key id. The agent cannot tell, says so, and loads.
#[test]
fn module_key_that_proc_keys_cannot_decide_is_a_warning() {
    let host = host_with(&signed_overlay(|m| {
        m.signed_by("Build time autogenerated kernel key", &[0x01, 0x03, 0x93])
    }));
    with_h200_keys(&host);
    let plan = plan(&host).unwrap();
    assert_eq!(plan.warnings.len(), 3, "{:?}", plan.warnings);
    assert!(
        plan.warnings[0].contains("cannot tell") && plan.warnings[0].contains("01:03:93"),
        "{:?}",
        plan.warnings
    );
    let (result, _) = load(&host);
    result.unwrap();
}

#[test]
fn other_driver_version_loaded_is_refused() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    host.write("/proc/modules", "nvidia 1 0 - Live 0x0 (OE)\n");
    host.write("/sys/module/nvidia/version", "550.54.15\n");
    let msg = refused(&host, exit::HOST_CONFLICT);
    assert!(msg.contains("550.54.15") && msg.contains(DRIVER), "{msg}");
}

#[test]
fn kernel_refusal_unloads_what_this_run_loaded() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    let mut kernel = SimulatedKernel::new(host.root.clone());
    kernel.refuse = Some(("nvidia_uvm".into(), nix::errno::Errno::ENOEXEC));
    let err = load::load(&ctx(&host), &mut kernel).err().expect("refused");
    assert_eq!(err.exit_code(), exit::KERNEL_REFUSED, "{err}");
    assert!(
        err.to_string().contains("nvidia_uvm") && err.to_string().contains("another kernel"),
        "{err}"
    );
    let undo: Vec<_> = kernel
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::DeleteModule { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(undo, ["nvidia_modeset", "nvidia"], "newest first");
    assert!(!host.read("/proc/modules").contains("nvidia"));
    assert!(!host.exists("/run/nvidia/validations/driver-ready"));
    assert!(!host.exists("/etc/nvidia-container-runtime/config.toml"));
}

/// Without a GPU the real nvidia.ko links and its init returns ENODEV ("NVRM: No NVIDIA GPU
/// found.", open-gpu-kernel-modules kernel-open/nvidia/nv.c): its own state and exit code,
/// not a broken overlay; what this run loaded is unloaded, nothing says ready.
#[test]
fn no_gpu_is_its_own_state_not_a_failure() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    let mut kernel = SimulatedKernel::new(host.root.clone());
    kernel.gpus = 0;
    let err = load::load(&ctx(&host), &mut kernel).err().expect("no GPU");
    assert_eq!(err.exit_code(), exit::NO_GPU, "{err}");
    assert!(err.is_no_gpu());
    assert!(err.to_string().contains("no NVIDIA GPU"), "{err}");
    assert!(err.to_string().contains("ENODEV"), "{err}");
    let calls: Vec<_> = kernel
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::FinitModule { name, .. } | Call::InitModule { name, .. } => {
                Some(format!("load {name}"))
            }
            Call::DeleteModule { name } => Some(format!("delete {name}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        calls,
        ["load nvidia"],
        "no module after nvidia's failed init"
    );
    assert!(!host.read("/proc/modules").contains("nvidia"));
    assert!(!host.exists("/run/nvidia/validations/driver-ready"));
    assert!(!host.exists("/etc/nvidia-container-runtime/config.toml"));
}

/// ENODEV from a module other than nvidia is a refusal like any other, and what was loaded
/// before it is unloaded.
#[test]
fn enodev_from_another_module_is_a_kernel_refusal() {
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    let mut kernel = SimulatedKernel::new(host.root.clone());
    kernel.refuse = Some(("nvidia_uvm".into(), nix::errno::Errno::ENODEV));
    let err = load::load(&ctx(&host), &mut kernel).err().expect("refused");
    assert_eq!(err.exit_code(), exit::KERNEL_REFUSED, "{err}");
    assert!(!err.is_no_gpu());
    assert!(kernel.calls.contains(&Call::DeleteModule {
        name: "nvidia".into()
    }));
}

/// The daemon on a host whose PCI bus has no NVIDIA device: the boot load records `no-gpu`,
/// `status` says so (text, JSON, exit 9), the NFD labels and metrics do not say ready.
#[test]
fn no_gpu_host_status_says_so_with_its_exit_code() {
    use crate::common::agent::{self, Daemon};
    let host = host_with(&OverlayBuilder::nvidia(KVER));
    host.write("/etc/os-release", "ID=gardenlinux\nNAME=\"Garden Linux\"\n");
    host.write(&format!("/boot/vmlinuz-{KVER}"), "kernel image");
    host.write("/sys/bus/pci/devices/0000:00:01.0/vendor", "0x8086\n");
    host.mkdir("/etc/kubernetes/node-feature-discovery/features.d");
    host.mkdir("/var/lib/node_exporter/textfile_collector");
    let mut daemon = Daemon::start(host.dir.path(), |_| {});
    assert_eq!(
        agent::state(host.dir.path())["load"]["result"],
        "no-gpu",
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("no NVIDIA GPU"), "{}", daemon.log());

    let out = agent::run(host.dir.path(), &["status"]);
    assert_eq!(
        out.status.code(),
        Some(exit::NO_GPU as i32),
        "{}",
        agent::text(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NOT ready, no GPU"), "{text}");
    let out = agent::run(host.dir.path(), &["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(exit::NO_GPU as i32),
        "{}",
        agent::text(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["readiness"], "no-gpu");
    assert_eq!(report["load"]["result"], "no-gpu");
    assert!(report["policy-state"]
        .as_str()
        .unwrap()
        .starts_with("no-gpu: "));
    assert!(!host.exists("/run/nvidia/validations/driver-ready"));
    let nfd = host.read("/etc/kubernetes/node-feature-discovery/features.d/nvdriver-agent");
    assert!(nfd.contains("nvdriver-agent.ready=false"), "{nfd}");
    assert!(nfd.contains("nvdriver-agent.no-gpu=true"), "{nfd}");
    let prom = host.read("/var/lib/node_exporter/textfile_collector/nvdriver_agent.prom");
    assert!(prom.contains("nvdriver_agent_ready 0"), "{prom}");
    assert!(prom.contains("nvdriver_agent_no_gpu 1"), "{prom}");
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn no_overlay_follows_policy() {
    let host = FakeHost::new(KVER);
    let (result, calls) = load(&host);
    assert!(matches!(
        result.unwrap(),
        LoadOutcome::NoOverlayWarned { .. }
    ));
    assert!(calls.is_empty());
    host.write(
        "/etc/nvdriver-agent/config.toml",
        "[policy]\nmissing-overlay = \"fail\"\n",
    );
    let (result, _) = load(&host);
    let err = result.err().unwrap();
    assert_eq!(err.exit_code(), exit::NO_OVERLAY);
    assert!(err.to_string().contains(KVER));
}

#[test]
fn plan_error_types_are_specific() {
    let overlay = OverlayBuilder::nvidia(KVER).module(
        FixtureModule::new("nvidia", KVER, DRIVER).depends(&["nvidia-uvm"]),
        Packing::Plain,
    );
    let host = host_with(&overlay);
    assert!(matches!(
        plan(&host),
        Err(CommandError::Plan(PlanError::DependencyCycle { .. }))
    ));
}

/// The simulated kernel judges a module by its symbols, as a real one does, not by the
/// `depends=` the plan read: nvidia-drm with an empty `depends=` (as real builds carry) loaded
/// before nvidia-modeset is refused with the kernel's "Unknown symbol"; once nvidia-modeset is
/// loaded it goes in; unloading nvidia-modeset takes its symbols away again.
#[test]
fn simulated_kernel_resolves_symbols_not_depends() {
    use nvdriver_agent::kmod::sys::{Kernel, ModuleImage, ModuleLoad};
    let host = FakeHost::new(KVER);
    let m = |name: &str| FixtureModule::new(name, KVER, DRIVER);
    let modeset = m("nvidia-modeset").exports(&["nvKmsKapiGetFunctionsTable"]);
    let drm = m("nvidia-drm").imports(&["nvKmsKapiGetFunctionsTable", "_printk"]);
    let mut kernel = SimulatedKernel::new(host.root.clone());
    let finit = |kernel: &mut SimulatedKernel, module: &FixtureModule| {
        let path = host.path(format!("/tmp/{}.ko", module.name));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, module.bytes(crate::common::Compression::None)).unwrap();
        let file = fs::File::open(&path).unwrap();
        kernel.load_module(&ModuleLoad {
            name: &module.kernel_name(),
            path: &path,
            image: ModuleImage::File {
                file: &file,
                compressed: false,
            },
            params: "",
            version: Some(DRIVER),
            vermagic: &format!("{KVER} SMP preempt mod_unload modversions "),
            signed: false,
        })
    };
    let err = finit(&mut kernel, &drm).expect_err("nvidia-modeset is not loaded");
    assert_eq!(err.errno, nix::errno::Errno::ENOENT);
    assert!(
        err.to_string()
            .contains("nvidia_drm: Unknown symbol nvKmsKapiGetFunctionsTable"),
        "{err}"
    );
    finit(&mut kernel, &modeset).unwrap();
    finit(&mut kernel, &drm).unwrap();
    assert!(host
        .read("/proc/kallsyms")
        .contains("nvKmsKapiGetFunctionsTable\t[nvidia_modeset]"));
    kernel.delete_module("nvidia_drm").unwrap();
    kernel.delete_module("nvidia_modeset").unwrap();
    assert!(!host
        .read("/proc/kallsyms")
        .contains("nvKmsKapiGetFunctionsTable"));
    let err = finit(&mut kernel, &drm).expect_err("its provider is gone");
    assert_eq!(err.errno, nix::errno::Errno::ENOENT);
}

/// A module that needs a symbol nothing exports (neither the kernel image, nor the overlay,
/// nor an OS module) is refused by the kernel mid-load: the load is undone and the host is
/// left as it was.
#[test]
fn unresolved_symbol_is_refused_and_rolled_back() {
    let m = |name: &str| FixtureModule::new(name, KVER, DRIVER);
    let overlay = OverlayBuilder::nvidia(KVER).module(
        m("nvidia-uvm")
            .depends(&["nvidia"])
            .imports(&["nvUvmInterfaceRegisterGpu", "hmm_range_fault"]),
        Packing::Xz,
    );
    let host = host_with(&overlay);
    let kallsyms_before = host.read("/proc/kallsyms");
    let (result, calls) = load(&host);
    let err = result.err().expect("refused");
    assert_eq!(err.exit_code(), exit::KERNEL_REFUSED, "{err}");
    assert!(err.to_string().contains("hmm_range_fault"), "{err}");
    assert!(calls
        .iter()
        .any(|c| matches!(c, Call::DeleteModule { name } if name == "nvidia")));
    // Nothing of the overlay's is left in the kernel's symbol table (the OS prerequisites
    // modprobed first stay loaded, as modprobe leaves them).
    let kallsyms = host.read("/proc/kallsyms");
    assert!(kallsyms.starts_with(&kallsyms_before), "{kallsyms}");
    assert!(!kallsyms.contains("[nvidia"), "{kallsyms}");
}

//! The MIG and IMEX capability nodes on fake hosts built from the GPU machine's real
//! `/proc/driver/nvidia/capabilities` (tests/fixtures/nvidia-caps/): the agent must make
//! exactly the nodes NVIDIA's nvidia-modprobe made there, with its rules
//! (NVIDIA/nvidia-modprobe `modprobe-utils/nvidia-modprobe-utils.c`: `nvidia_cap_mknod`,
//! `mknod_helper`, `init_device_file_parameters`, `nvidia_cap_imex_channel_mknod`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::host::FakeHost;
use crate::common::overlay::OverlayBuilder;
use nvdriver_agent::app::Context;
use nvdriver_agent::boot::load::{self, Prepared};
use nvdriver_agent::config::ConfigSource;
use nvdriver_agent::kmod::sys::{Call, SimulatedKernel};
use pretty_assertions::assert_eq;

const KVER: &str = "6.1.0-28-cloud-amd64";
const FIXTURE: &str = "tests/fixtures/nvidia-caps/h200-580.159.04";

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(FIXTURE)
        .join(rel)
}

/// One `stat -c '%n|%F|%t|%T|%a|%U|%G'` line of the listing.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    path: String,
    major: u32,
    minor: u32,
    mode: u32,
}

fn listing() -> String {
    fs::read_to_string(fixture("listing.txt")).unwrap()
}

/// The nodes the real machine has under /dev/nvidia-caps (hex numbers, octal mode), root:root.
fn real_cap_nodes() -> Vec<Stat> {
    listing()
        .lines()
        .filter(|l| l.starts_with("/dev/nvidia-caps/"))
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            assert_eq!(
                (f[1], f[5], f[6]),
                ("character special file", "root", "root")
            );
            Stat {
                path: f[0].into(),
                major: u32::from_str_radix(f[2], 16).unwrap(),
                minor: u32::from_str_radix(f[3], 16).unwrap(),
                mode: u32::from_str_radix(f[4], 8).unwrap(),
            }
        })
        .collect()
}

/// A fake host whose procfs holds the real tree: directories from the listing's `find`
/// section, files from `capabilities/`, the nvidia lines of `/proc/devices`.
fn real_host() -> FakeHost {
    let host = FakeHost::new(KVER);
    host.import(&OverlayBuilder::nvidia(KVER));
    for line in listing().lines() {
        if let Some(rel) = line.strip_prefix("/proc/driver/nvidia/capabilities") {
            let rel = rel.trim_start_matches('/');
            let src = fixture(&format!("capabilities/{rel}"));
            let dst = host.path(format!("/proc/driver/nvidia/capabilities/{rel}"));
            if src.is_file() {
                fs::create_dir_all(dst.parent().unwrap()).unwrap();
                fs::copy(&src, &dst).unwrap();
            } else {
                fs::create_dir_all(&dst).unwrap();
            }
        }
    }
    host.write(
        "/proc/devices",
        &fs::read_to_string(fixture("proc-devices")).unwrap(),
    );
    host
}

fn ctx(host: &FakeHost) -> Context {
    Context::new(host.root.clone(), &ConfigSource::Layered).unwrap()
}

fn load(host: &FakeHost) -> Vec<Call> {
    let mut kernel = SimulatedKernel::new(host.root.clone());
    load::load(&ctx(host), &mut kernel).unwrap();
    kernel.calls
}

/// The simulated nodes under `dir` as `Stat`s (the simulated kernel writes `c MAJOR:MINOR` with
/// the node's permission bits).
fn made_nodes(host: &FakeHost, dir: &str) -> Vec<Stat> {
    let mut out: Vec<Stat> = fs::read_dir(host.path(dir))
        .unwrap()
        .flatten()
        .map(|e| {
            let text = fs::read_to_string(e.path()).unwrap();
            let (major, minor) = text
                .lines()
                .next()
                .unwrap()
                .strip_prefix("c ")
                .unwrap()
                .split_once(':')
                .unwrap();
            assert!(!text.contains("owner"), "{text}");
            Stat {
                path: format!("{dir}/{}", e.file_name().to_string_lossy()),
                major: major.parse().unwrap(),
                minor: minor.parse().unwrap(),
                mode: e.metadata().unwrap().permissions().mode() & 0o777,
            }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn mode_of(host: &FakeHost, path: &str) -> u32 {
    fs::metadata(host.path(path)).unwrap().permissions().mode() & 0o777
}

#[test]
fn real_h200_tree_gives_exactly_the_real_nodes() {
    let host = real_host();
    let calls = load(&host);
    let expected = real_cap_nodes();
    assert_eq!(
        expected,
        [
            Stat {
                path: "/dev/nvidia-caps/nvidia-cap1".into(),
                major: 241,
                minor: 1,
                mode: 0o400
            },
            Stat {
                path: "/dev/nvidia-caps/nvidia-cap2".into(),
                major: 241,
                minor: 2,
                mode: 0o444
            },
        ]
    );
    assert_eq!(made_nodes(&host, "/dev/nvidia-caps"), expected);
    // The directory as nvidia_cap_mknod makes it: 0755, root:root (the listing's line).
    assert!(listing().contains("/dev/nvidia-caps|directory|0|0|755|root|root"));
    assert_eq!(mode_of(&host, "/dev/nvidia-caps"), 0o755);
    let cap_calls: Vec<&Call> = calls
        .iter()
        .filter(|c| match c {
            Call::Mknod { path, .. } | Call::SetOwnerMode { path, .. } => {
                path.starts_with("/dev/nvidia-caps")
            }
            _ => false,
        })
        .collect();
    let owner = |path: &str, mode| Call::SetOwnerMode {
        path: path.into(),
        uid: 0,
        gid: 0,
        mode,
    };
    let mknod = |path: &str, minor, mode| Call::Mknod {
        path: path.into(),
        major: 241,
        minor,
        mode,
    };
    assert_eq!(
        cap_calls,
        [
            &owner("/dev/nvidia-caps", 0o755),
            &mknod("/dev/nvidia-caps/nvidia-cap1", 1, 0o400),
            &owner("/dev/nvidia-caps/nvidia-cap1", 0o400),
            &mknod("/dev/nvidia-caps/nvidia-cap2", 2, 0o444),
            &owner("/dev/nvidia-caps/nvidia-cap2", 0o444),
        ]
    );
    // fabric-imex-mgmt (minor 4323) is not made without IMEX, and no IMEX directory.
    assert!(!host.exists("/dev/nvidia-caps/nvidia-cap4323"));
    assert!(!host.exists("/dev/nvidia-caps-imex-channels"));
    // nvidia-modprobe's symlink_char_dev.
    assert_eq!(
        fs::read_link(host.path("/dev/char/241:1")).unwrap(),
        PathBuf::from("../nvidia-caps/nvidia-cap1")
    );

    // Again: nothing to do.
    let again = load(&host);
    assert!(
        !again
            .iter()
            .any(|c| matches!(c, Call::Mknod { .. } | Call::SetOwnerMode { .. })),
        "{again:?}"
    );
}

#[test]
fn plan_lists_the_cap_nodes_procfs_has_now() {
    let host = real_host();
    let kernel = SimulatedKernel::new(host.root.clone());
    let Prepared::Ready(prepared) = load::prepare_load(&ctx(&host), &kernel).unwrap() else {
        panic!("no overlay")
    };
    let got: Vec<String> = prepared
        .plan
        .caps_nodes
        .iter()
        .map(|n| {
            format!(
                "{} {}:{} {:o} {}",
                n.path.display(),
                n.major,
                n.minor,
                n.mode,
                n.source
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "/dev/nvidia-caps/nvidia-cap1 241:1 400 mig/config",
            "/dev/nvidia-caps/nvidia-cap2 241:2 444 mig/monitor",
        ]
    );
    assert!(!host.exists("/dev/nvidia-caps"), "plan touched /dev");
}

#[test]
fn imex_channels_when_configured() {
    let host = real_host();
    host.write(
        "/etc/nvdriver-agent/config.d/50-imex.toml",
        "[driver]\nimex-channels = [0]\n",
    );
    // What the open 580 driver's /proc/driver/nvidia/params starts with.
    host.write(
        "/proc/driver/nvidia/params",
        "ResmanDebugLevel: 4294967295\nRmLogonRC: 1\nModifyDeviceFiles: 1\nDeviceFileUID: 0\nDeviceFileGID: 0\nDeviceFileMode: 438\n",
    );
    load(&host);
    let caps = made_nodes(&host, "/dev/nvidia-caps");
    assert_eq!(
        caps.last().unwrap(),
        &Stat {
            path: "/dev/nvidia-caps/nvidia-cap4323".into(),
            major: 241,
            minor: 4323,
            mode: 0o400
        }
    );
    assert_eq!(
        made_nodes(&host, "/dev/nvidia-caps-imex-channels"),
        [Stat {
            path: "/dev/nvidia-caps-imex-channels/channel0".into(),
            major: 242,
            minor: 0,
            mode: 0o666
        }]
    );
    assert_eq!(mode_of(&host, "/dev/nvidia-caps-imex-channels"), 0o755);
}

#[test]
fn modify_zero_leaves_a_node_alone_and_wrong_ones_are_fixed() {
    let host = real_host();
    // mig/config says DeviceFileModify: 0: an administrator's node stays as it is.
    host.write(
        "/proc/driver/nvidia/capabilities/mig/config",
        "DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 0\n",
    );
    host.write("/dev/nvidia-caps/nvidia-cap1", "c 241:1\nowner 0:44\n");
    fs::set_permissions(
        host.path("/dev/nvidia-caps/nvidia-cap1"),
        fs::Permissions::from_mode(0o660),
    )
    .unwrap();
    // nvidia-cap2 exists with the wrong mode and owner: chmod and chown, no new node.
    host.write("/dev/nvidia-caps/nvidia-cap2", "c 241:2\nowner 1000:1000\n");
    fs::set_permissions(
        host.path("/dev/nvidia-caps/nvidia-cap2"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let calls = load(&host);
    assert_eq!(
        host.read("/dev/nvidia-caps/nvidia-cap1"),
        "c 241:1\nowner 0:44\n"
    );
    assert_eq!(mode_of(&host, "/dev/nvidia-caps/nvidia-cap1"), 0o660);
    assert_eq!(host.read("/dev/nvidia-caps/nvidia-cap2"), "c 241:2\n");
    assert_eq!(mode_of(&host, "/dev/nvidia-caps/nvidia-cap2"), 0o444);
    assert!(!calls
        .iter()
        .any(|c| matches!(c, Call::Mknod { path, .. } if path.starts_with("/dev/nvidia-caps"))));

    // A node with other numbers (a stale one) is replaced.
    host.write("/dev/nvidia-caps/nvidia-cap2", "c 240:9\n");
    let calls = load(&host);
    assert!(calls.contains(&Call::Mknod {
        path: "/dev/nvidia-caps/nvidia-cap2".into(),
        major: 241,
        minor: 2,
        mode: 0o444
    }));
}

/// After MIG reconfiguration the driver lists new caps (`gpu0/mig/gi1/access`, …); procfs has no
/// inotify, so the nodes come with the next `load`, which is a no-op for everything else.
#[test]
fn load_again_after_mig_reconfiguration_makes_the_new_nodes() {
    let host = real_host();
    load(&host);
    host.write(
        "/proc/driver/nvidia/capabilities/gpu0/mig/gi1/access",
        "DeviceFileMinor: 12\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
    );
    host.write(
        "/proc/driver/nvidia/capabilities/gpu0/mig/gi1/ci0/access",
        "DeviceFileMinor: 13\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
    );
    let calls = load(&host);
    let made: Vec<&PathBuf> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Mknod { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    assert_eq!(
        made,
        [
            &PathBuf::from("/dev/nvidia-caps/nvidia-cap12"),
            &PathBuf::from("/dev/nvidia-caps/nvidia-cap13")
        ]
    );
}

#[test]
fn caps_without_their_major_fail_the_load_with_the_reason() {
    let host = real_host();
    host.write("/proc/devices", "Character devices:\n  1 mem\n");
    let mut kernel = SimulatedKernel::new(host.root.clone());
    let err = load::load(&ctx(&host), &mut kernel)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("\"nvidia-caps\"") && err.contains("/proc/devices"),
        "{err}"
    );
}

/// The NVSwitch nodes: none on the real H200 host (its `nvidia-nvswitch` major is registered,
/// no switch probed); with two switches in `/proc/driver/nvidia-nvswitch/devices` (as
/// procfs_nvswitch.c's `nvswitch_procfs_device_add` lists them), the control node and one per
/// switch with the major `/proc/devices` names, mode 0666 (its `permissions` file), and
/// readiness names a missing one.
#[test]
fn nvswitch_nodes_follow_the_probed_switches() {
    let host = real_host();
    load(&host);
    assert!(!host.exists("/dev/nvidia-nvswitchctl"));

    for bdf in ["0000:05:00.0", "0000:06:00.0"] {
        host.write(
            &format!("/proc/driver/nvidia-nvswitch/devices/{bdf}/information"),
            "BIOS Version: 96.10.6d.00.01\n",
        );
    }
    load(&host);
    // Only the switch nodes: a scratch copy of them in a directory of their own.
    let scratch = "/run/scratch-nvswitch-nodes";
    fs::create_dir_all(host.path(scratch)).unwrap();
    for entry in fs::read_dir(host.path("/dev")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("nvidia-nvswitch") {
            let dest = host.path(format!("{scratch}/{name}"));
            fs::copy(entry.path(), &dest).unwrap();
            fs::set_permissions(&dest, entry.metadata().unwrap().permissions()).unwrap();
        }
    }
    let made: Vec<Stat> = made_nodes(&host, scratch)
        .into_iter()
        .map(|n| Stat {
            path: n.path.replace(scratch, "/dev"),
            ..n
        })
        .collect();
    let node = |path: &str, minor| Stat {
        path: path.into(),
        major: 239,
        minor,
        mode: 0o666,
    };
    assert_eq!(
        made,
        [
            node("/dev/nvidia-nvswitch0", 0),
            node("/dev/nvidia-nvswitch1", 1),
            node("/dev/nvidia-nvswitchctl", 255),
        ]
    );

    fs::remove_file(host.path("/dev/nvidia-nvswitch1")).unwrap();
    let facts = nvdriver_agent::report::usable::gather(
        &host.root,
        &ctx(&host).settings,
        &["nvidia", "nvidia_modeset", "nvidia_uvm"],
    );
    assert_eq!(
        facts.missing_nodes,
        [PathBuf::from("/dev/nvidia-nvswitch1")]
    );
}

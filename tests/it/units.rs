//! The systemd integration files in `units/` and `dist/`: the unit passes systemd's own
//! verifier, stays in the host's mount namespace and orders itself before the container
//! runtimes; the tmpfiles.d, preset and modprobe.d files do what they say when systemd's and
//! kmod's own tools read them.
//!
//! Each check that runs a host tool builds a throwaway root and points the tool at it with
//! `--root=`, so nothing on the machine running the tests is touched. A missing tool skips its
//! test with a notice, except under CI (`CI` set), where `scripts/setup` must have installed it
//! (`tests/common/tools.rs`).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::tools::{root_or_skip, tool_or_skip};

const UNIT: &str = "nvdriver-agent.service";
/// The driver services' units and the overlay binaries their `ExecStart=` runs.
const SERVICE_UNITS: [&str; 2] = [
    "nvdriver-agent-persistenced.service",
    "nvdriver-agent-fabricmanager.service",
];
const DRIVER_SERVICE_BINARIES: [&str; 2] = [
    "/run/nvidia/driver/usr/bin/nvidia-persistenced",
    "/run/nvidia/driver/usr/bin/nv-fabricmanager",
];
/// What every line the verifier prints about our units or our binary contains.
const NAME: &str = "nvdriver-agent";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?}\n  exit: {}\n  stdout: {}\n  stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    output
}

/// Copy a directory tree, recreating symlinks as they are (systemd's unit directories hold
/// `*.wants/` links and `/dev/null` masks).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

/// A root in which `systemd-analyze verify --root=` can check our unit as systemd would load it
/// on a host: the agent binary at its ExecStart path (the verifier checks that it exists and is
/// executable), our units in /etc/systemd/system, and the host's own vendor units so the default
/// dependencies (sysinit.target, ...) resolve and the start transaction is built against the
/// real targets and services we order ourselves after.
fn verify_root(unit_files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("usr/bin/nvdriver-agent");
    fs::create_dir_all(bin.parent().unwrap()).unwrap();
    fs::copy(env!("CARGO_BIN_EXE_nvdriver-agent"), &bin).unwrap();
    // The driver services' binaries, from the overlay exposed at the driver root.
    for binary in DRIVER_SERVICE_BINARIES {
        let path = root.path().join(binary.trim_start_matches('/'));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    copy_tree(
        Path::new("/usr/lib/systemd/system"),
        &root.path().join("usr/lib/systemd/system"),
    );
    let units = root.path().join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for (name, text) in unit_files {
        fs::write(units.join(name), text).unwrap();
    }
    root
}

/// The systemd units in `units/`, by name (the D-Bus policy beside them is checked in
/// tests/it/operate.rs, on a bus).
fn our_units() -> Vec<(String, String)> {
    const UNIT_SUFFIXES: [&str; 6] = [
        ".service", ".socket", ".timer", ".path", ".target", ".mount",
    ];
    let mut units: Vec<_> = fs::read_dir(repo_path("units"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (name, e.path())
        })
        .filter(|(name, _)| UNIT_SUFFIXES.iter().any(|s| name.ends_with(s)))
        .map(|(name, path)| (name, fs::read_to_string(path).unwrap()))
        .collect();
    units.sort();
    units
}

/// `systemd-analyze verify --root=<root> <unit>`: the exit status and the lines that name our
/// units or binary. The verifier exits 0 on unknown keys and unparsable values (it only logs and
/// ignores them, as systemd does at boot), so those lines are the real verdict.
fn verify(analyze: &Path, root: &Path, unit: &str) -> (bool, Vec<String>) {
    let output = run(Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit));
    let complaints = String::from_utf8_lossy(&output.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&output.stdout).lines())
        .filter(|line| line.contains(NAME))
        .map(str::to_owned)
        .collect();
    (output.status.success(), complaints)
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some(analyze) = tool_or_skip("systemd-analyze", "unit_passes_systemd_analyze_verify")
    else {
        return;
    };
    let units = our_units();
    let files: Vec<_> = units
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let root = verify_root(&files);
    for (name, _) in &units {
        let (ok, complaints) = verify(&analyze, root.path(), name);
        assert!(
            ok,
            "systemd-analyze verify failed for {name}: {complaints:#?}"
        );
        assert!(
            complaints.is_empty(),
            "systemd-analyze verify complains about {name}: {complaints:#?}"
        );
    }
}

/// The harness above must be able to fail: a typo in a key and a bad value are reported in
/// lines naming the unit, even though the verifier's exit status stays 0.
#[test]
fn verify_harness_catches_a_broken_unit() {
    let Some(analyze) = tool_or_skip("systemd-analyze", "verify_harness_catches_a_broken_unit")
    else {
        return;
    };
    let text = fs::read_to_string(repo_path("units").join(UNIT)).unwrap();
    let broken = text
        .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
        .replace("Type=notify", "Type=notifyy");
    assert_ne!(
        broken, text,
        "the unit no longer has the lines this test breaks"
    );
    let root = verify_root(&[(UNIT, &broken)]);
    let (_, complaints) = verify(&analyze, root.path(), UNIT);
    assert!(
        complaints.iter().any(|l| l.contains("NoNewPrivilege")),
        "unknown key not reported: {complaints:#?}"
    );
    assert!(
        complaints.iter().any(|l| l.contains("notifyy")),
        "bad Type= not reported: {complaints:#?}"
    );

    // And without the binary at its ExecStart path, verify fails outright.
    let root = verify_root(&[(UNIT, &text)]);
    fs::remove_file(root.path().join("usr/bin/nvdriver-agent")).unwrap();
    let (ok, complaints) = verify(&analyze, root.path(), UNIT);
    assert!(
        !ok,
        "verify passed without the ExecStart binary: {complaints:#?}"
    );
}

/// `(section, key, value)` for every assignment in a unit file, in order. Enough of systemd's
/// syntax for our own files: `[Section]` headers, `#`/`;` comments, trailing-backslash
/// continuation lines.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut entries = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        } else {
            panic!("not a unit file line: {raw:?}");
        }
    }
    entries
}

fn agent_unit() -> Vec<(String, String, String)> {
    parse_unit(&fs::read_to_string(repo_path("units").join(UNIT)).unwrap())
}

/// Every whitespace-separated value assigned to `key` in `section`.
fn values(entries: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .flat_map(|(_, _, v)| v.split_whitespace().map(str::to_owned))
        .collect()
}

#[test]
fn unit_stays_in_the_host_mount_namespace() {
    // Each of these gives the service a private mount namespace (or, for the last group, an
    // allow-list of devices fixed before the nvidia majors exist): the driver-root bind mount
    // would then be invisible to the host and the container runtimes, or mknod /dev/nvidia*
    // would fail. See the comment block in the unit.
    const FORBIDDEN: &[&str] = &[
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "PrivateIPC",
        "PrivateNetwork",
        "PrivatePIDs",
        "PrivateUsers",
        "DynamicUser",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "ExecPaths",
        "NoExecPaths",
        "TemporaryFileSystem",
        "BindPaths",
        "BindReadOnlyPaths",
        "MountImages",
        "ExtensionImages",
        "ExtensionDirectories",
        "RootDirectory",
        "RootImage",
        "MountAPIVFS",
        "MountFlags",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "LogNamespace",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",
    ];
    let found: Vec<_> = agent_unit()
        .into_iter()
        .filter(|(_, key, _)| FORBIDDEN.contains(&key.as_str()))
        .collect();
    assert!(
        found.is_empty(),
        "mount-namespace or device-policy options in {UNIT}: {found:?}"
    );
}

#[test]
fn unit_loads_the_driver_before_the_container_runtimes() {
    let unit = agent_unit();
    let before = values(&unit, "Unit", "Before");
    for runtime in [
        "containerd.service",
        "crio.service",
        "docker.service",
        "kubelet.service",
    ] {
        assert!(
            before.contains(&runtime.to_owned()),
            "Before= lacks {runtime}: {before:?}"
        );
    }
    let after = values(&unit, "Unit", "After");
    for dep in [
        "local-fs.target",
        "systemd-modules-load.service",
        "systemd-udevd.service",
    ] {
        assert!(
            after.contains(&dep.to_owned()),
            "After= lacks {dep}: {after:?}"
        );
    }
    assert_eq!(
        values(&unit, "Unit", "RequiresMountsFor"),
        ["/var/lib/nvdriver-agent"]
    );

    // Units ordered after us wait for READY=1, which comes after the load; neither the start nor
    // the shutdown-time stage can hold the machine forever.
    assert_eq!(values(&unit, "Service", "Type"), ["notify"]);
    assert_eq!(
        values(&unit, "Service", "ExecStart"),
        ["/usr/bin/nvdriver-agent", "run"]
    );
    assert!(values(&unit, "Service", "RemainAfterExit").is_empty());
    for key in ["TimeoutStartSec", "TimeoutStopSec"] {
        let timeout = values(&unit, "Service", key);
        assert!(
            timeout.len() == 1 && !["infinity", "0"].contains(&timeout[0].as_str()),
            "{key}= must bound it: {timeout:?}"
        );
    }
    // An idle daemon makes no wakeups: no watchdog unless an administrator asks for one.
    assert!(values(&unit, "Service", "WatchdogSec").is_empty());
    // We order runtimes; nothing may come to depend on us through our own file.
    for key in ["Requires", "RequiredBy", "BindsTo", "Requisite"] {
        let found: Vec<_> = unit.iter().filter(|(_, k, _)| k == key).collect();
        assert!(found.is_empty(), "{key}= in {UNIT}: {found:?}");
    }
    assert_eq!(values(&unit, "Install", "WantedBy"), ["multi-user.target"]);
}

/// systemd stops units in the reverse order of starting them, so `After=` ostree's finalize unit
/// makes our ExecStop (the last stage) run before ostree finalizes the staged deployment.
#[test]
fn shutdown_stage_runs_before_ostree_finalizes() {
    let unit = agent_unit();
    assert!(
        values(&unit, "Unit", "After").contains(&"ostree-finalize-staged.service".to_owned()),
        "After= lacks ostree-finalize-staged.service"
    );
    assert_eq!(
        values(&unit, "Service", "ExecStop"),
        ["/usr/bin/nvdriver-agent", "stage", "--now"]
    );
    // The shutdown stage may download: the network and the resolver stop after it. Not
    // network-online.target: that would hold the boot load (and containerd) for the network.
    let after = values(&unit, "Unit", "After");
    for target in ["network.target", "nss-lookup.target"] {
        assert!(
            after.contains(&target.to_owned()),
            "After= lacks {target}: {after:?}"
        );
    }
    assert!(
        !after.contains(&"network-online.target".to_owned()),
        "{after:?}"
    );
    // It pulls in only the fetcher, which does the downloading (ordered Before= us itself, so it
    // stops after our ExecStop); the daemon itself has no network families.
    assert_eq!(
        values(&unit, "Unit", "Wants"),
        [
            "nvdriver-agent-fetch.socket",
            "nvdriver-agent-fetch.service"
        ]
    );
    let families = values(&unit, "Service", "RestrictAddressFamilies");
    assert_eq!(families, ["AF_UNIX"]);
}

#[test]
fn tmpfiles_creates_the_agent_directories() {
    let test = "tmpfiles_creates_the_agent_directories";
    let Some(tmpfiles) = tool_or_skip("systemd-tmpfiles", test) else {
        return;
    };
    // The entries name root as owner; only root can chown to it.
    if !root_or_skip(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // The config path is read from the host, not from under --root; it must be absolute.
    let output = run(Command::new(tmpfiles)
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo_path("dist/tmpfiles.d/nvdriver-agent.conf")));
    assert!(output.status.success(), "systemd-tmpfiles failed");
    assert!(output.stderr.is_empty(), "systemd-tmpfiles complained");
    for dir in [
        "var/lib/nvdriver-agent",
        "var/lib/nvdriver-agent/overlays",
        "run/nvidia",
        "run/nvidia/driver",
        "run/nvidia/validations",
        "etc/nvdriver-agent/config.d",
    ] {
        let meta = fs::metadata(root.path().join(dir))
            .unwrap_or_else(|e| panic!("/{dir} not created: {e}"));
        assert!(meta.is_dir(), "/{dir} is not a directory");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755, "/{dir} mode");
    }
}

#[test]
fn preset_enables_the_unit() {
    let Some(systemctl) = tool_or_skip("systemctl", "preset_enables_the_unit") else {
        return;
    };
    // A root laid out like a distribution that disables everything it is not told to enable
    // (Debian, Fedora and Flatcar all end their presets with `disable *`).
    let root = tempfile::tempdir().unwrap();
    let vendor = root.path().join("usr/lib/systemd/system");
    let presets = root.path().join("usr/lib/systemd/system-preset");
    fs::create_dir_all(&vendor).unwrap();
    fs::create_dir_all(&presets).unwrap();
    fs::copy(repo_path("units").join(UNIT), vendor.join(UNIT)).unwrap();
    fs::write(
        vendor.join("multi-user.target"),
        "[Unit]\nDescription=stub\n",
    )
    .unwrap();
    fs::write(presets.join("99-default.preset"), "disable *\n").unwrap();
    let wants = root
        .path()
        .join("etc/systemd/system/multi-user.target.wants")
        .join(UNIT);
    let preset = || {
        let output = run(Command::new(&systemctl)
            .arg(format!("--root={}", root.path().display()))
            .args(["preset", UNIT]));
        assert!(output.status.success(), "systemctl preset failed");
    };

    preset();
    assert!(
        wants.symlink_metadata().is_err(),
        "enabled without our preset file"
    );

    fs::copy(
        repo_path("dist/systemd-preset/80-nvdriver-agent.preset"),
        presets.join("80-nvdriver-agent.preset"),
    )
    .unwrap();
    preset();
    assert_eq!(
        fs::read_link(&wants).expect("preset did not enable the unit"),
        Path::new("/usr/lib/systemd/system").join(UNIT)
    );
}

#[test]
fn modprobe_config_keeps_nouveau_off() {
    let Some(modprobe) = tool_or_skip("modprobe", "modprobe_config_keeps_nouveau_off") else {
        return;
    };
    // -C reads only this file; --showconfig prints what kmod parsed from it.
    let output = run(Command::new(modprobe)
        .arg("-C")
        .arg(repo_path("dist/modprobe.d/nvdriver-agent.conf"))
        .arg("--showconfig"));
    assert!(output.status.success(), "modprobe --showconfig failed");
    assert!(
        output.stderr.is_empty(),
        "modprobe complained about the file"
    );
    let shown = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<_> = shown.lines().collect();
    assert!(lines.contains(&"blacklist nouveau"), "{shown}");
    assert!(lines.contains(&"options nouveau modeset=0"), "{shown}");
}

/// The driver services run the overlay's binaries from the driver root, start after the agent
/// (so they stop before it, and before anything it unloads), and are pulled in by nothing but
/// the agent's `RestartUnit` (no `[Install]`, no `WantedBy=`).
#[test]
fn driver_service_units_run_from_the_driver_root_after_the_agent() {
    for (name, binary) in SERVICE_UNITS.iter().zip(DRIVER_SERVICE_BINARIES) {
        let text = fs::read_to_string(repo_path("units").join(name)).unwrap();
        let unit = parse_unit(&text);
        let after: Vec<String> = values(&unit, "Unit", "After")
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        assert!(
            after.contains(&UNIT.to_owned()),
            "{name}: After= lacks {UNIT}: {after:?}"
        );
        let exec = values(&unit, "Service", "ExecStart");
        assert!(
            exec.first().map(String::as_str) == Some(binary),
            "{name}: ExecStart= is not {binary}: {exec:?}"
        );
        assert!(
            !unit.iter().any(|(section, _, _)| section == "Install"),
            "{name}: has an [Install] section; only the agent starts it"
        );
        // Never the other way round: the agent must not wait for its own services.
        let agent = agent_unit();
        assert!(!values(&agent, "Unit", "After")
            .iter()
            .any(|v| v.contains(name)));
    }
    // Fabric Manager after persistenced, as NVIDIA's units order them.
    let fm = parse_unit(&fs::read_to_string(repo_path("units").join(SERVICE_UNITS[1])).unwrap());
    assert!(values(&fm, "Unit", "After")
        .iter()
        .any(|v| v.contains(SERVICE_UNITS[0])));
}

/// `systemd-analyze security` of the two units that matter, printed: the fetcher (network and
/// archive code, no privileges) below 2.0, the root daemon below the 4.7 it had while it also
/// downloaded. `packaging/check` prints the same for the installed files.
#[test]
fn fetcher_and_daemon_security_exposure() {
    let Some(analyze) = tool_or_skip("systemd-analyze", "fetcher_and_daemon_security_exposure")
    else {
        return;
    };
    for (unit, limit) in [
        ("nvdriver-agent-fetch.service", 2.0),
        ("nvdriver-agent.service", 4.7),
    ] {
        let out = run(Command::new(&analyze)
            .args(["security", "--offline=true"])
            .arg(repo_path("units").join(unit)));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let score: f64 = stdout
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")?
                    .1
                    .split_once(": ")
            })
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {unit}: {stdout}"));
        println!("systemd-analyze security: {unit}: {score}");
        assert!(score < limit, "{unit}: exposure {score}, not below {limit}");
    }
}

/// The fetch unit runs as no one in particular with nothing to spare, and the root daemon has no
/// network of its own.
#[test]
fn fetch_unit_is_unprivileged_and_the_daemon_has_no_network() {
    let text = fs::read_to_string(repo_path("units/nvdriver-agent-fetch.service")).unwrap();
    let fetch = parse_unit(&text);
    let one = |entries: &[(String, String, String)], key: &str| values(entries, "Service", key);
    assert_eq!(one(&fetch, "DynamicUser"), ["yes"]);
    assert!(one(&fetch, "CapabilityBoundingSet").is_empty());
    assert!(fetch
        .iter()
        .any(|(s, k, _)| s == "Service" && k == "CapabilityBoundingSet"));
    assert_eq!(one(&fetch, "ProtectSystem"), ["strict"]);
    assert_eq!(one(&fetch, "StateDirectory"), ["nvdriver-agent-fetch"]);
    assert_eq!(
        one(&fetch, "ExecStart"),
        ["/usr/bin/nvdriver-agent", "fetch-serve"]
    );
    assert_eq!(values(&fetch, "Unit", "Before"), ["nvdriver-agent.service"]);
    let agent = agent_unit();
    assert_eq!(one(&agent, "RestrictAddressFamilies"), ["AF_UNIX"]);
    assert_eq!(one(&agent, "IPAddressDeny"), ["any"]);
    assert_eq!(
        one(&agent, "Environment"),
        ["NVDRIVER_AGENT_FETCHER=/run/nvdriver-agent/fetch.sock"]
    );
    let socket =
        parse_unit(&fs::read_to_string(repo_path("units/nvdriver-agent-fetch.socket")).unwrap());
    assert_eq!(
        values(&socket, "Socket", "ListenStream"),
        [nvdriver_agent::overlay::fetcher::SOCKET]
    );
    assert_eq!(values(&socket, "Socket", "SocketMode"), ["0600"]);
}

//! Operating the agent: its D-Bus object on a real bus, `status` exit codes, the metrics and
//! NFD files, the CDI spec, the load-failure fallback and `doctor`, all through the real binary
//! on fake hosts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::agent::{self, state, wait_for, Daemon};
use crate::common::bus::{SystemdPeer, TestBus};
use crate::common::host::FakeHost;
use crate::common::overlay::{OverlayBuilder, DRIVER};
use crate::common::tools::{root_or_skip, tool_or_skip};
use zbus::blocking::{Connection, MessageIterator};
use zbus::zvariant::OwnedValue;

const OLD: &str = "6.1.0-27-cloud-amd64";
const NEW: &str = "6.1.0-28-cloud-amd64";
const WAIT: Duration = Duration::from_secs(20);
const NAME: &str = "org.nvdriveragent.Agent1";
const PATH: &str = "/org/nvdriveragent/Agent1";
const METRICS: &str = "/var/lib/node_exporter/textfile_collector/nvdriver_agent.prom";
const NFD: &str = "/etc/kubernetes/node-feature-discovery/features.d/nvdriver-agent";
const CDI: &str = "/var/run/cdi/nvidia.json";

const GARDEN_OS_RELEASE: &str = "ID=gardenlinux\nNAME=\"Garden Linux\"\nPRETTY_NAME=\"Garden Linux 1592.4\"\nGARDENLINUX_VERSION=1592.4\n";

/// A Garden Linux host booted on OLD, its overlay in the store when `stored`, an empty source
/// directory, and the directories node_exporter and NFD would have made.
fn host(stored: bool, extra_config: &str) -> FakeHost {
    let host = FakeHost::new(OLD);
    host.write("/etc/os-release", GARDEN_OS_RELEASE);
    host.write(&format!("/boot/vmlinuz-{OLD}"), "kernel image");
    if stored {
        let src = tempfile::tempdir().unwrap();
        OverlayBuilder::nvidia(OLD)
            .with_userspace()
            .build(src.path());
        let out = agent::run(
            host.dir.path(),
            &["overlay", "import", src.path().to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", agent::text(&out));
    }
    host.mkdir("/srv/overlays");
    host.mkdir("/var/lib/node_exporter/textfile_collector");
    host.mkdir("/etc/kubernetes/node-feature-discovery/features.d");
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!("[stage]\nsources = [\"/srv/overlays/{{kernel}}/{{driver}}\"]\n{extra_config}"),
    );
    host
}

fn install_kernel(host: &FakeHost, kver: &str) {
    host.write(&format!("/usr/lib/modules/{kver}/modules.dep"), "");
    host.write(&format!("/boot/vmlinuz-{kver}"), "kernel image");
}

fn publish_source_overlay(host: &FakeHost, kver: &str) {
    let dir = host.path(format!("/srv/overlays/{kver}/{DRIVER}"));
    std::fs::create_dir_all(&dir).unwrap();
    OverlayBuilder::nvidia(kver).build(&dir);
}

/// `status --json` with the bus (if any) in reach: (exit code, report).
fn status(host: &FakeHost, bus: Option<&TestBus>) -> (i32, serde_json::Value) {
    let mut command = agent::command(host.dir.path(), &["status", "--json"]);
    if let Some(bus) = bus {
        bus.env(&mut command);
    }
    let out = command.output().unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", agent::text(&out)));
    (out.status.code().unwrap(), report)
}

fn properties(conn: &Connection) -> HashMap<String, String> {
    let proxy = zbus::blocking::fdo::PropertiesProxy::builder(conn)
        .destination(NAME)
        .unwrap()
        .path(PATH)
        .unwrap()
        .build()
        .unwrap();
    match proxy.get_all(zbus::names::InterfaceName::from_static_str(NAME).unwrap()) {
        Ok(all) => all
            .into_iter()
            .map(|(k, v)| (k, String::try_from(v).unwrap()))
            .collect(),
        Err(_) => HashMap::new(),
    }
}

fn call(conn: &Connection, method: &str) -> zbus::Result<()> {
    conn.call_method(Some(NAME), PATH, Some(NAME), method, &())
        .map(drop)
}

/// The metrics file as (name, labels) → value, checking the exposition format on the way:
/// every sample has HELP and TYPE lines before it, names have the agent's prefix, counters end
/// in `_total`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.is_empty(), "{line}");
            helped.push(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(matches!(kind, "gauge" | "counter"), "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            types.insert(name.to_string(), kind.to_string());
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(name.starts_with("nvdriver_agent_"), "{line}");
            assert!(
                types.contains_key(name) && helped.iter().any(|h| h == name),
                "{line}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                }
            }
            samples.insert(series.to_string(), value.parse::<f64>().unwrap());
        }
    }
    samples
}

fn metric(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {samples:#?}"))
}

fn nfd(host: &FakeHost) -> BTreeMap<String, String> {
    host.read(NFD)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The next PropertiesChanged from the agent that changes `property`, as its new value.
fn next_change(signals: &mut MessageIterator, property: &str) -> String {
    for message in signals.by_ref() {
        let message = message.unwrap();
        let (interface, changed, _): (String, HashMap<String, OwnedValue>, Vec<String>) =
            message.body().deserialize().unwrap();
        assert_eq!(interface, NAME);
        if let Some(value) = changed.get(property) {
            return String::try_from(value.clone()).unwrap();
        }
    }
    panic!("the signal stream ended");
}

#[test]
fn the_dbus_object_tells_how_things_stand_and_takes_stage_and_reload() {
    let host = host(true, "");
    let bus = TestBus::start();
    let mut daemon = Daemon::start(host.dir.path(), |c| bus.env(c));
    let conn = bus.connect();
    let props = wait_for(
        "the agent's D-Bus object",
        WAIT,
        || properties(&conn),
        |p| p.get("RunningKernel").is_some_and(|k| k == OLD),
    );
    assert_eq!(props["LoadedDriverVersion"], DRIVER, "{}", daemon.log());
    assert_eq!(props["PendingKernel"], "");
    assert_eq!(props["StagedOverlay"], "");
    assert_eq!(props["PolicyState"], "ok");
    assert_eq!(props["LastError"], "");

    // Introspection lists the properties and methods.
    let xml: String = conn
        .call_method(
            Some(NAME),
            PATH,
            Some("org.freedesktop.DBus.Introspectable"),
            "Introspect",
            &(),
        )
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    let node = zbus_xml::Node::from_reader(xml.as_bytes()).unwrap();
    let interface = node
        .interfaces()
        .iter()
        .find(|i| i.name() == NAME)
        .expect("the agent's interface");
    let mut names: Vec<String> = interface
        .properties()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "LastError",
            "LoadedDriverVersion",
            "PendingKernel",
            "PolicyState",
            "RunningKernel",
            "StagedOverlay"
        ]
    );
    let mut methods: Vec<String> = interface
        .methods()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    methods.sort();
    assert_eq!(methods, ["Reload", "Stage"]);

    // Ready now and after the reboot: exit 0, read from the daemon; files agree.
    let (code, report) = status(&host, Some(&bus));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["readiness"], "ready");
    assert_eq!(report["read-from"], "daemon");
    assert_eq!(report["policy-state"], "ok");
    let m = parse_metrics(&host.read(METRICS));
    assert_eq!(metric(&m, "nvdriver_agent_driver_loaded"), 1.0);
    assert_eq!(metric(&m, "nvdriver_agent_ready"), 1.0);
    assert_eq!(metric(&m, "nvdriver_agent_update_pending"), 0.0);
    assert_eq!(metric(&m, "nvdriver_agent_stage_failures_total"), 0.0);
    assert_eq!(metric(&m, "nvdriver_agent_update_held"), 0.0);
    assert_eq!(
        metric(
            &m,
            &format!("nvdriver_agent_info{{running_kernel=\"{OLD}\",driver_version=\"{DRIVER}\",pending_kernel=\"\"}}")
        ),
        1.0
    );
    let labels = nfd(&host);
    assert_eq!(labels["nvdriver-agent.driver-version"], DRIVER);
    assert_eq!(labels["nvdriver-agent.ready"], "true");
    assert_eq!(labels["nvdriver-agent.next-boot-ready"], "true");

    // A kernel lands with no overlay anywhere: ready now, not after the reboot.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .unwrap()
        .member("PropertiesChanged")
        .unwrap()
        .path(PATH)
        .unwrap()
        .build();
    let mut signals = MessageIterator::for_match_rule(rule, &conn, None).unwrap();
    install_kernel(&host, NEW);
    assert_eq!(next_change(&mut signals, "PendingKernel"), NEW);
    wait_for(
        "the policy state to say not ready after the reboot",
        WAIT,
        || properties(&conn),
        |p| p["PolicyState"].starts_with("not-ready-after-reboot:"),
    );
    let (code, report) = status(&host, Some(&bus));
    assert_eq!(code, 7, "{report:#}");
    let m = parse_metrics(&host.read(METRICS));
    assert_eq!(metric(&m, "nvdriver_agent_update_pending"), 1.0);
    assert_eq!(metric(&m, "nvdriver_agent_pending_overlay_staged"), 0.0);
    assert_eq!(metric(&m, "nvdriver_agent_next_boot_ready"), 0.0);
    assert_eq!(nfd(&host)["nvdriver-agent.staged-for-next-kernel"], "false");

    // The overlay is published; Stage() makes the daemon look again.
    publish_source_overlay(&host, NEW);
    call(&conn, "Stage").unwrap();
    let staged = next_change(&mut signals, "StagedOverlay");
    assert!(
        staged.ends_with(&format!("/overlays/{NEW}/{DRIVER}")),
        "{staged}"
    );
    let (code, _) = status(&host, Some(&bus));
    assert_eq!(code, 0);
    let m = parse_metrics(&host.read(METRICS));
    assert_eq!(metric(&m, "nvdriver_agent_pending_overlay_staged"), 1.0);
    assert!(metric(&m, "nvdriver_agent_last_stage_duration_seconds") >= 0.0);
    assert_eq!(nfd(&host)["nvdriver-agent.next-boot-ready"], "true");

    // Reload(): an invalid config is refused with the reason, a valid one taken.
    host.write(
        "/etc/nvdriver-agent/config.d/50-typo.toml",
        "[stage]\nsorces = []\n",
    );
    let err = call(&conn, "Reload").unwrap_err().to_string();
    assert!(err.contains("50-typo.toml"), "{err}");
    host.write(
        "/etc/nvdriver-agent/config.d/50-typo.toml",
        "[policy]\nmissing-next-overlay = \"hold\"\n",
    );
    call(&conn, "Reload").unwrap();
    wait_for(
        "the daemon to take the new configuration",
        WAIT,
        || daemon.log(),
        |log| log.contains("configuration read again"),
    );
    // SIGHUP does the same.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for(
        "SIGHUP to re-read the configuration",
        WAIT,
        || daemon.log().matches("configuration read again").count(),
        |n| *n >= 2,
    );
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn without_a_bus_the_daemon_goes_on_and_status_reads_the_disk() {
    let host = host(true, "");
    // common::agent points the system bus where no bus listens.
    let daemon = Daemon::start(host.dir.path(), |_| {});
    wait_for(
        "the metrics file",
        WAIT,
        || host.exists(METRICS),
        |exists| *exists,
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("cannot serve org.nvdriveragent.Agent1").count(),
        1,
        "{log}"
    );
    let (code, report) = status(&host, None);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["read-from"], "disk");
}

#[test]
fn a_failed_boot_load_marks_the_node_not_ready_everywhere() {
    // No overlay for the running kernel.
    let host = host(false, "[fallback]\non-load-failure = \"mark-not-ready\"\n");
    let daemon = Daemon::start(host.dir.path(), |_| {});
    let s = wait_for(
        "the fallback to mark the node not ready",
        WAIT,
        || state(host.dir.path()),
        |s| s["not-ready"].is_string(),
    );
    let why = s["not-ready"].as_str().unwrap();
    assert!(
        why.contains(&format!("stage --now --kernel {OLD}")),
        "{why}"
    );
    assert!(daemon.log().contains("To fix:"), "{}", daemon.log());
    wait_for("the NFD file", WAIT, || host.exists(NFD), |e| *e);
    assert_eq!(nfd(&host)["nvdriver-agent.ready"], "false");
    assert!(!nfd(&host).contains_key("nvdriver-agent.driver-version"));
    let m = parse_metrics(&host.read(METRICS));
    assert_eq!(metric(&m, "nvdriver_agent_ready"), 0.0);
    assert_eq!(metric(&m, "nvdriver_agent_driver_loaded"), 0.0);
    let (code, report) = status(&host, None);
    assert_eq!(code, 8, "{report:#}");
    assert_eq!(report["readiness"], "not-ready");
    assert!(report["policy-state"]
        .as_str()
        .unwrap()
        .starts_with("not-ready: "));
}

#[test]
fn load_writes_a_valid_cdi_spec_of_the_overlay() {
    let host = host(true, "");
    // The agent's own spec runs nvidia-cdi-hook (tests/it/cdi.rs: none, no spec).
    host.write("/usr/bin/nvidia-cdi-hook", "#!/bin/sh\n");
    // Two GPUs, as /proc/driver/nvidia/gpus would list them.
    for (i, bus_id) in ["0000:3b:00.0", "0000:86:00.0"].iter().enumerate() {
        host.write(
            &format!("/proc/driver/nvidia/gpus/{bus_id}/information"),
            &format!("Model: \t\t NVIDIA H100\nDevice Minor: \t {i}\n"),
        );
    }
    let out = agent::run(host.dir.path(), &["load"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    let spec: serde_json::Value = serde_json::from_str(&host.read(CDI)).unwrap();
    assert_eq!(spec["cdiVersion"], "0.6.0");
    assert_eq!(spec["kind"], "nvidia.com/gpu");
    let devices = spec["devices"].as_array().unwrap();
    let names: Vec<&str> = devices
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["0", "1", "all"]);
    for device in devices {
        let nodes = device["containerEdits"]["deviceNodes"].as_array().unwrap();
        assert!(!nodes.is_empty());
        for node in nodes {
            let path = node["path"].as_str().unwrap();
            assert!(host.exists(path), "{path} does not exist");
        }
    }
    let edits = &spec["containerEdits"];
    let control: Vec<&str> = crate::common::str_fields(&edits["deviceNodes"], "path");
    assert!(control.contains(&"/dev/nvidiactl"), "{control:?}");
    assert!(control.contains(&"/dev/nvidia-uvm"), "{control:?}");
    let mounts = edits["mounts"].as_array().unwrap();
    let containers: Vec<&str> = mounts
        .iter()
        .map(|m| m["containerPath"].as_str().unwrap())
        .collect();
    assert!(
        containers.contains(&format!("/usr/lib64/libnvidia-ml.so.{DRIVER}").as_str())
            && containers.contains(&"/usr/bin/nvidia-smi"),
        "{containers:?}"
    );
    for mount in mounts {
        let host_path = mount["hostPath"].as_str().unwrap();
        assert!(host_path.starts_with("/run/nvidia/driver/"), "{host_path}");
        assert_eq!(
            mount["options"],
            serde_json::json!(["ro", "nosuid", "nodev", "bind"])
        );
    }
}

fn doctor(host: &FakeHost) -> (i32, String) {
    let before = host.snapshot();
    let out = agent::run(host.dir.path(), &["doctor"]);
    assert_eq!(before, host.snapshot(), "doctor changed the host");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn line<'a>(report: &'a str, what: &str) -> &'a str {
    report
        .lines()
        .find(|l| l[6..].starts_with(&format!("{what}:")))
        .unwrap_or_else(|| panic!("no {what} line in\n{report}"))
}

#[test]
fn doctor_judges_a_fake_host_without_touching_it() {
    let host = host(true, "");
    host.write(
        "/etc/modprobe.d/blacklist-nouveau.conf",
        "blacklist nouveau\n",
    );
    host.write(
        "/sys/kernel/security/lockdown",
        "[none] integrity confidentiality\n",
    );
    let out = agent::run(host.dir.path(), &["load"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    let (code, report) = doctor(&host);
    assert_eq!(code, 0, "{report}");
    for l in report.lines() {
        assert!(
            l.starts_with("ok  ") || l.starts_with("warn") || l.starts_with("fail"),
            "{l}"
        );
    }
    assert!(line(&report, "nouveau").starts_with("ok"), "{report}");
    assert!(line(&report, "driver").starts_with("ok"), "{report}");
    assert!(line(&report, "store").starts_with("ok"), "{report}");
    assert!(
        line(&report, "module signing").contains("lockdown none"),
        "{report}"
    );
    assert!(
        line(&report, "toolkit config").starts_with("ok"),
        "{report}"
    );

    // nouveau holds the GPU, lockdown is on and a source is unreachable: fails, with the fixes.
    host.write(
        "/proc/modules",
        "nouveau 2478080 0 - Live 0x0000000000000000\n",
    );
    host.write(
        "/sys/kernel/security/lockdown",
        "none [integrity] confidentiality\n",
    );
    let http = crate::common::http::HttpServer::start();
    host.write(
        "/etc/nvdriver-agent/config.d/50-http.toml",
        &format!(
            "[stage]\nallow-http = true\nsources = [\"{}\", \"http://127.0.0.1:1/x.tar\"]\n",
            http.url("/{kernel}.tar")
        ),
    );
    http.route(
        &format!("/{OLD}.tar"),
        crate::common::http::Route::file(b"x".to_vec()),
    );
    let (code, report) = doctor(&host);
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "nouveau").starts_with("fail"), "{report}");
    assert!(line(&report, "nouveau").contains("blacklist"), "{report}");
    assert!(
        line(&report, "module signing").starts_with("warn"),
        "{report}"
    );
    let sources: Vec<&str> = report
        .lines()
        .filter(|l| l[6..].starts_with("source:"))
        .collect();
    assert!(
        sources[0].starts_with("ok") && sources[0].contains("answers 200"),
        "{report}"
    );
    assert!(
        sources[1].starts_with("fail") && sources[1].contains("unreachable"),
        "{report}"
    );
    let served = http.requests(&format!("/{OLD}.tar"));
    assert_eq!(served.len(), 1, "one request");
    assert_eq!(served[0].method, "HEAD", "no download");
}

#[test]
fn doctor_fails_without_an_overlay_for_the_running_kernel() {
    let host = host(false, "");
    let (code, report) = doctor(&host);
    assert_eq!(code, 1, "{report}");
    let store = line(&report, "store");
    assert!(
        store.starts_with("fail") && store.contains("stage --now --kernel"),
        "{report}"
    );
    assert!(line(&report, "driver").starts_with("warn"), "{report}");
    assert!(line(&report, "source").starts_with("warn"), "{report}");
}

/// The `setpriv` and `busctl` to run.
struct Tools {
    setpriv: PathBuf,
    busctl: PathBuf,
}

/// `busctl` as user `nobody` against `bus`.
fn busctl_as_nobody(tools: &Tools, bus: &TestBus, args: &[&str]) -> std::process::Output {
    std::process::Command::new(&tools.setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&tools.busctl)
        .arg(format!("--address={}", bus.address))
        .args(args)
        .output()
        .unwrap()
}

/// The shipped policy file on a bus with the system bus's default policy: root's daemon owns
/// the name; any user reads the properties and introspects, but only root calls the methods.
#[test]
fn the_dbus_policy_lets_anyone_read_and_only_root_act() {
    let test = "the_dbus_policy_lets_anyone_read_and_only_root_act";
    let (Some(setpriv), Some(busctl)) =
        (tool_or_skip("setpriv", test), tool_or_skip("busctl", test))
    else {
        return;
    };
    let tools = Tools { setpriv, busctl };
    // Root, to be both root and nobody on the bus.
    if !root_or_skip(test) {
        return;
    }
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("units/org.nvdriveragent.Agent1.conf");
    let bus = TestBus::system_like(&policy);
    let host = host(true, "");
    let daemon = Daemon::start(host.dir.path(), |c| bus.env(c));
    let conn = bus.connect();
    wait_for(
        "the agent's D-Bus object",
        WAIT,
        || properties(&conn),
        |p| p.get("RunningKernel").is_some_and(|k| k == OLD),
    );
    assert!(!daemon.log().contains("cannot serve"), "{}", daemon.log());

    let read = busctl_as_nobody(
        &tools,
        &bus,
        &["get-property", NAME, PATH, NAME, "LoadedDriverVersion"],
    );
    assert!(read.status.success(), "{}", agent::text(&read));
    assert_eq!(
        String::from_utf8_lossy(&read.stdout).trim(),
        format!("s \"{DRIVER}\"")
    );
    let introspect = busctl_as_nobody(&tools, &bus, &["introspect", NAME, PATH]);
    assert!(introspect.status.success(), "{}", agent::text(&introspect));
    for method in ["Stage", "Reload"] {
        let call = busctl_as_nobody(&tools, &bus, &["call", NAME, PATH, NAME, method]);
        assert!(!call.status.success(), "{}", agent::text(&call));
        assert!(
            String::from_utf8_lossy(&call.stderr).contains("denied"),
            "{}",
            agent::text(&call)
        );
    }
    // Root may.
    call(&conn, "Stage").unwrap();
}

const PERSISTENCED_UNIT: &str = "nvdriver-agent-persistenced.service";
const DRIVER_READY: &str = "/run/nvidia/validations/driver-ready";

/// The daemon starts the overlay's nvidia-persistenced through systemd's `RestartUnit` on the
/// bus after its boot load, and says ready (status, D-Bus, driver-ready file) only once the
/// unit is active; a unit that fails is a not-ready node with the unit named. The stand-in
/// systemd answers as src/core/dbus-manager.c `method_restart_unit` and `method_load_unit` do
/// (a job path; the unit's object path), the unit's `ActiveState` as dbus-unit.c has it.
#[test]
fn the_daemon_starts_persistenced_and_is_ready_only_when_it_runs() {
    for (result, ready) in [("failed", false), ("active", true)] {
        let host = host(true, "");
        // The fake kernel records the bind mount of the driver root but copies nothing: put
        // the overlay's binary where the mount would show it.
        host.write(
            "/run/nvidia/driver/usr/bin/nvidia-persistenced",
            "#!/bin/sh\n",
        );
        let bus = TestBus::start();
        let systemd = SystemdPeer::start_with_units(
            &bus,
            "running",
            Vec::new(),
            &[PERSISTENCED_UNIT],
            result,
        );
        let daemon = Daemon::start(host.dir.path(), |c| bus.env(c));
        wait_for(
            "RestartUnit of the persistenced unit",
            WAIT,
            || systemd.unit_calls(),
            |calls| calls.contains(&("RestartUnit".into(), PERSISTENCED_UNIT.into())),
        );
        // No Fabric Manager on a host without NVSwitches.
        assert!(
            !systemd
                .unit_calls()
                .iter()
                .any(|(_, u)| u.contains("fabricmanager")),
            "{:?}",
            systemd.unit_calls()
        );
        let (code, report) = wait_for(
            "status with the unit's state",
            WAIT,
            || status(&host, Some(&bus)),
            |(_, r)| r["usable"]["services"][0]["state"] == result,
        );
        if ready {
            assert_eq!(code, 0, "{report:#}");
            wait_for(
                "the driver-ready file written back",
                WAIT,
                || host.exists(DRIVER_READY),
                |&exists| exists,
            );
        } else {
            assert_eq!(code, 8, "{report:#}");
            let detail = report["readiness-detail"].as_str().unwrap();
            assert!(
                detail.contains(
                    "nvidia-persistenced is not running (nvdriver-agent-persistenced.service is failed"
                ),
                "{detail}\n{}",
                daemon.log()
            );
            assert!(!host.exists(DRIVER_READY), "driver-ready says ready");
        }
        drop(daemon);
    }
}

const FABRICMANAGER_UNIT: &str = "nvdriver-agent-fabricmanager.service";

/// On a host with an NVSwitch on its PCI bus (vendor 0x10de, class 0x068000) the daemon starts
/// the overlay's Fabric Manager, and the node is ready only with the unit active and every
/// GPU's fabric `Completed` (read from the overlay's `nvidia-smi -q`; here a stand-in script
/// printing nvidia-smi's layout, as tests/fixtures/nvidia-smi/h200-single.txt has it). Fabric
/// Manager is started with the overlay's `fabricmanager.cfg`, its topology path moved into the
/// overlay.
#[test]
fn a_switch_host_waits_for_fabric_manager_and_the_trained_fabric() {
    for (unit_result, fabric, expect) in [
        (
            "failed",
            "Completed",
            Some("nv-fabricmanager is not running (nvdriver-agent-fabricmanager.service is failed"),
        ),
        (
            "active",
            "In Progress",
            Some("the NVLink fabric is not trained (GPU 0: In Progress)"),
        ),
        ("active", "Completed", None),
    ] {
        let host = host(true, "");
        host.write("/sys/bus/pci/devices/0000:05:00.0/vendor", "0x10de\n");
        host.write("/sys/bus/pci/devices/0000:05:00.0/class", "0x068000\n");
        host.write("/run/nvidia/driver/usr/bin/nv-fabricmanager", "#!/bin/sh\n");
        host.write(
            "/run/nvidia/driver/usr/share/nvidia/nvswitch/fabricmanager.cfg",
            "DAEMONIZE=1\nTOPOLOGY_FILE_PATH=/usr/share/nvidia/nvswitch\n",
        );
        let smi = host.path("/run/nvidia/driver/usr/bin/nvidia-smi");
        std::fs::write(
            &smi,
            format!("#!/bin/sh\nprintf 'GPU 00000000:18:00.0\\n    Fabric\\n        State                : {fabric}\\n        Status               : N/A\\n'\n"),
        )
        .unwrap();
        std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let bus = TestBus::start();
        let systemd = SystemdPeer::start_with_units(
            &bus,
            "running",
            Vec::new(),
            &[FABRICMANAGER_UNIT],
            unit_result,
        );
        let daemon = Daemon::start(host.dir.path(), |c| bus.env(c));
        wait_for(
            "RestartUnit of the Fabric Manager unit",
            WAIT,
            || systemd.unit_calls(),
            |calls| calls.contains(&("RestartUnit".into(), FABRICMANAGER_UNIT.into())),
        );
        // Started with the overlay's configuration, its topology path moved into the overlay.
        let config =
            std::fs::read_to_string(host.path("/run/nvdriver-agent/fabricmanager.cfg")).unwrap();
        assert!(
            config.contains(
                "\nDAEMONIZE=1\nTOPOLOGY_FILE_PATH=/run/nvidia/driver/usr/share/nvidia/nvswitch\n"
            ),
            "{config}"
        );
        let (code, report) = wait_for(
            "status with the unit's state",
            WAIT,
            || status(&host, Some(&bus)),
            |(_, r)| r["usable"]["services"][2]["state"] == unit_result,
        );
        assert_eq!(
            report["usable"]["nvswitches"],
            serde_json::json!(["0000:05:00.0"])
        );
        match expect {
            Some(reason) => {
                assert_eq!(code, 8, "{report:#}");
                let detail = report["readiness-detail"].as_str().unwrap();
                assert!(detail.contains(reason), "{detail}\n{}", daemon.log());
                assert!(!host.exists(DRIVER_READY));
            }
            None => {
                assert_eq!(code, 0, "{report:#}\n{}", daemon.log());
                wait_for("driver-ready", WAIT, || host.exists(DRIVER_READY), |&e| e);
            }
        }
        drop(daemon);
    }
}

//! The event sources for `bench/detect-latency` that need more than files in a directory: a real
//! ostree sysroot (made by the `ostree` CLI) and a D-Bus update_engine peer on a private
//! `dbus-daemon`. Runs `nvdriver-agent run` on the fake host, makes TRIALS events, and prints one
//! line per trial: `TRIAL <agent ms> <baseline ms>`, where the agent's figure runs from the event
//! to "next kernel = kver" in its state file, and the baseline's to the least a watcher can do:
//! an inotify watch seeing the staged record replaced, or a bare D-Bus client receiving the
//! signal.
//!
//! ```text
//! cargo run --release --example bench-events -- ostree|update-engine AGENT TRIALS
//! ```

// The examples use a few of the test fixtures, not all of them.
#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::boot::bzimage_with_release;
use common::bus::{TestBus, UpdateEnginePeer};
use common::host::{FakeHost, FCOS_OS_RELEASE};
use common::ostree::{staged_record, OstreeSysroot, StagedRecord};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

const RUNNING: &str = "6.11.3-200.fc40.x86_64";
const CONFIG: &str =
    "[driver]\nversion = \"570.124.06\"\n[stage]\nsources = [\"/srv/none/{kernel}/{driver}\"]\n";
const NEED_REBOOT: &str = "UPDATE_STATUS_UPDATED_NEED_REBOOT";
const IDLE: &str = "UPDATE_STATUS_IDLE";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, agent, trials] = &args[..] else {
        eprintln!("usage: bench-events ostree|update-engine AGENT TRIALS");
        std::process::exit(2);
    };
    let trials: u32 = trials.parse().expect("TRIALS is a whole number");
    match kind.as_str() {
        "ostree" => ostree(agent, trials),
        "update-engine" => update_engine(agent, trials),
        _ => {
            eprintln!("unknown event kind {kind:?}: ostree or update-engine");
            std::process::exit(2);
        }
    }
}

/// A Fedora CoreOS host booted into RUNNING. Per trial: a commit with a new kernel is checked
/// out as a deployment directory (untimed; the agent sees the directory, but nothing boots it
/// yet), then libostree's last staging step, `/run/ostree/staged-deployment` replaced, starts the
/// clock.
fn ostree(agent: &str, trials: u32) {
    let sysroot = OstreeSysroot::booted_layout("fedora-coreos");
    let commit = sysroot.commit_kernel(RUNNING);
    sysroot.deploy(&commit);
    let write = |host_path: &str, text: &str| {
        let path = sysroot.path(host_path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("/run/ostree-booted", "");
    write("/etc/os-release", FCOS_OS_RELEASE);
    write("/proc/sys/kernel/osrelease", &format!("{RUNNING}\n"));
    write("/proc/modules", "");
    write("/etc/nvdriver-agent/config.toml", CONFIG);
    std::fs::create_dir_all(sysroot.path("/run/ostree")).unwrap();
    let root = sysroot.dir.path();
    let mut daemon = start(agent, root, |_| {});

    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).unwrap();
    inotify
        .add_watch(&sysroot.path("/run/ostree"), AddWatchFlags::IN_MOVED_TO)
        .unwrap();
    for trial in 0..trials {
        let kver = format!("6.11.{}-200.fc40.x86_64", trial + 4);
        let next = sysroot.commit_kernel(&kver);
        let name = format!("{next}.0");
        let dir = sysroot.deploy_dir().join(&name);
        sysroot.ostree(&[
            &format!("--repo={}", sysroot.path("/ostree/repo").display()),
            "checkout",
            &next,
            &dir.display().to_string(),
        ]);
        std::fs::write(
            sysroot.deploy_dir().join(format!("{name}.origin")),
            "[origin]\nrefspec=fedora-coreos/stable\n",
        )
        .unwrap();
        // Let the agent absorb the new directory before the timed event.
        std::thread::sleep(Duration::from_millis(150));
        let record = staged_record(&StagedRecord {
            name,
            osname: "fedora-coreos".into(),
            bootcsum: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(next.as_bytes())),
            locked: None,
        });
        let started = Instant::now();
        sysroot.write_staged_record(&record);
        // The rename is done when write_staged_record returns; the event is already queued.
        inotify.read_events().unwrap();
        let baseline = started.elapsed();
        let agent_seen = wait_pending(root, &kver, started, &mut daemon);
        report(agent_seen, baseline);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(daemon);
}

/// A Flatcar host booted from USR-B. Per trial: update_engine goes idle, a new kernel lands in slot A (untimed), then `StatusUpdate` with
/// NEED_REBOOT starts the clock.
fn update_engine(agent: &str, trials: u32) {
    let bus = TestBus::start();
    let peer = UpdateEnginePeer::start(&bus, IDLE);
    let host = FakeHost::new("6.6.60-flatcar");
    host.write(
        "/etc/os-release",
        "NAME=\"Flatcar Container Linux by Kinvolk\"\nID=flatcar\nVERSION_ID=4081.2.0\n",
    );
    host.write("/proc/cmdline", "BOOT_IMAGE=/flatcar/vmlinuz-b mount.usr=/dev/mapper/usr verity.usr=PARTUUID=e03dd35c-7c2d-4a47-b3fe-27f15780a57c root=LABEL=ROOT\n");
    host.write_bytes(
        "/boot/flatcar/vmlinuz-b",
        &bzimage_with_release("6.6.60-flatcar"),
    );
    host.write("/etc/nvdriver-agent/config.toml", CONFIG);
    let root = host.dir.path();
    let mut daemon = start(agent, root, |c| bus.env(c));

    // The baseline: a bare client with a match rule for the same signal.
    let (heard_tx, heard) = mpsc::channel();
    let listener = bus.connect();
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("com.coreos.update1.Manager")
        .unwrap()
        .member("StatusUpdate")
        .unwrap()
        .build();
    let signals = zbus::blocking::MessageIterator::for_match_rule(rule, &listener, None).unwrap();
    std::thread::spawn(move || {
        for message in signals {
            if message.is_ok() && heard_tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });

    for trial in 0..trials {
        let kver = format!("6.6.{}-flatcar", trial + 61);
        peer.set_status(IDLE, "");
        wait_state(root, &mut daemon, |s| s["update-engine-operation"] == IDLE);
        heard.recv().unwrap();
        host.write_bytes("/boot/flatcar/vmlinuz-a", &bzimage_with_release(&kver));
        std::thread::sleep(Duration::from_millis(150));
        let started = Instant::now();
        peer.set_status(NEED_REBOOT, &format!("4152.{trial}.0"));
        let baseline = heard.recv().unwrap().duration_since(started);
        let agent_seen = wait_pending(root, &kver, started, &mut daemon);
        report(agent_seen, baseline);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(daemon);
}

fn start(agent: &str, root: &Path, extra: impl FnOnce(&mut Command)) -> Child {
    let mut command = Command::new(agent);
    command
        .arg("--root")
        .arg(root)
        .args(["--simulate-kernel", "run"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    extra(&mut command);
    let mut child = command.spawn().expect("start the agent");
    wait_state(root, &mut child, |s| !s["load"].is_null());
    // Watches and bus subscriptions armed.
    std::thread::sleep(Duration::from_millis(300));
    child
}

fn state(root: &Path) -> serde_json::Value {
    common::agent::state(root)
}

fn wait_state(root: &Path, daemon: &mut Child, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = state(root);
        if check(&seen) {
            return;
        }
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!("the agent exited ({status})");
        }
        assert!(Instant::now() < deadline, "timed out; state: {seen:#}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Poll the state file (every 0.5 ms) until the next kernel is `kver`; the time since `started`.
fn wait_pending(root: &Path, kver: &str, started: Instant, daemon: &mut Child) -> Duration {
    loop {
        if state(root)["pending"]["kernel-release"] == kver {
            return started.elapsed();
        }
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!("the agent exited ({status})");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the agent never reported {kver}; state: {:#}",
            state(root)
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn report(agent: Duration, baseline: Duration) {
    println!(
        "TRIAL {:.3} {:.3}",
        agent.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3
    );
}

fn stop(mut daemon: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
}

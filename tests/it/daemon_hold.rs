//! `policy.missing-next-overlay = "hold"` with the daemon running on a fake Flatcar host, with
//! update_engine, logind and systemd served on a real private bus: the levers (reboot.target
//! refusal + systemd `Reload()`, the logind inhibitor) are taken before the download starts and
//! let go once the overlay is published; `hold release`, the deadline, a detection error and a
//! stopped agent.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::agent::{self, state, wait_for, Daemon};
use crate::common::archive::{overlay_archive, Compression, ManifestAt};
use crate::common::bus::{LogindPeer, SystemdPeer, TestBus, UpdateEnginePeer};
use crate::common::host::FakeHost;
use crate::common::http::{HttpServer, Route};
use crate::common::overlay::{OverlayBuilder, DRIVER};

const RUNNING: &str = "6.6.60-flatcar";
const NEXT: &str = "6.6.95-flatcar";
const WAIT: Duration = Duration::from_secs(30);
const NEED_REBOOT: &str = "UPDATE_STATUS_UPDATED_NEED_REBOOT";
const DROPINS: [&str; 2] = [
    "/run/systemd/system/reboot.target.d/50-nvdriver-agent-hold.conf",
    "/run/systemd/system/kexec.target.d/50-nvdriver-agent-hold.conf",
];
const METRICS: &str = "/var/lib/node_exporter/textfile_collector/nvdriver_agent.prom";

/// Booted from USR-B on RUNNING; update_engine wrote NEXT's kernel to slot A. `extra` is added
/// to the configuration (sources, policy keys).
fn flatcar_host(extra: &str) -> FakeHost {
    FakeHost::flatcar(
        RUNNING,
        NEXT,
        &format!("[driver]\nversion = \"{DRIVER}\"\n{extra}"),
    )
}

/// An HTTP server that dribbles NEXT's overlay out in `chunks` pieces, 100 ms apart, and a
/// Flatcar host under `hold` whose only source it is.
fn paced_source_host(chunks: usize) -> (HttpServer, FakeHost) {
    let server = HttpServer::start();
    let (archive, _) = overlay_archive(
        &OverlayBuilder::nvidia(NEXT),
        Compression::Zstd,
        ManifestAt::First,
    );
    let chunk = archive.len() / chunks + 1;
    server.route(
        &paced_path(),
        Route {
            pace: Some((chunk, Duration::from_millis(100))),
            ..Route::file(archive)
        },
    );
    let host = flatcar_host(&format!(
        "[stage]\nallow-http = true\nsources = [\"{}\"]\n[policy]\nmissing-next-overlay = \"hold\"\n",
        server.url("/{kernel}/{driver}.tar.zst")
    ));
    (server, host)
}

/// Where [`paced_source_host`] serves the overlay.
fn paced_path() -> String {
    format!("/{NEXT}/{DRIVER}.tar.zst")
}

fn dir_sources(policy_extra: &str) -> String {
    format!("[stage]\nsources = [\"/opt/overlays/{{kernel}}/{{driver}}\"]\n[policy]\nmissing-next-overlay = \"hold\"\n{policy_extra}")
}

fn dropins(host: &FakeHost) -> Vec<PathBuf> {
    DROPINS.iter().map(|d| host.path(d)).collect()
}

fn refusing(host: &FakeHost) -> bool {
    DROPINS.iter().all(|d| host.exists(d))
}

struct World {
    bus: TestBus,
    update_engine: UpdateEnginePeer,
    logind: LogindPeer,
    systemd: SystemdPeer,
}

fn world(host: &FakeHost, system_state: &str) -> World {
    let bus = TestBus::start();
    let update_engine = UpdateEnginePeer::start(&bus, "UPDATE_STATUS_IDLE");
    let logind = LogindPeer::start(&bus);
    let systemd = SystemdPeer::start(&bus, system_state, dropins(host));
    World {
        bus,
        update_engine,
        logind,
        systemd,
    }
}

/// Held by both levers, as the state, logind and the drop-ins say; returns the state.
fn wait_held(w: &World, host: &FakeHost, kernel: &str) -> serde_json::Value {
    let root = host.dir.path();
    let (held, s) = wait_for(
        "the hold: an inhibitor, the reboot refusal and the state record",
        WAIT,
        || (w.logind.active_inhibitors(), state(root)),
        |(held, s)| held.len() == 1 && refusing(host) && !s["hold"].is_null(),
    );
    assert!(
        held[0].starts_with("shutdown|nvdriver-agent|") && held[0].ends_with("|block"),
        "{held:?}"
    );
    assert_eq!(s["hold"]["kernel-release"], kernel, "{s:#}");
    assert_eq!(
        s["hold"]["levers"],
        serde_json::json!(["reboot-refusal", "logind-shutdown-inhibitor"]),
        "{s:#}"
    );
    // systemd was reloaded with both drop-ins in place.
    assert!(
        w.systemd.reloads().contains(&vec![true, true]),
        "{:?}",
        w.systemd.reloads()
    );
    s
}

fn wait_released(w: &World, host: &FakeHost) -> serde_json::Value {
    let root = host.dir.path();
    let (_, s) = wait_for(
        "every lever let go",
        WAIT,
        || (w.logind.active_inhibitors(), state(root)),
        |(held, s)| held.is_empty() && !refusing(host) && s["hold"].is_null(),
    );
    // The last reload saw the drop-ins gone.
    assert_eq!(
        w.systemd.reloads().last(),
        Some(&vec![false, false]),
        "{:?}",
        w.systemd.reloads()
    );
    s
}

#[test]
fn levers_are_taken_before_the_download_and_let_go_after_publish() {
    // Dribbled out over about three seconds: the download is under way long enough to look.
    let (server, host) = paced_source_host(30);
    let w = world(&host, "running");
    let root = host.dir.path();
    let daemon = Daemon::start(root, |c| w.bus.env(c));

    w.update_engine.set_status(NEED_REBOOT, "4152.2.0");
    wait_for(
        "the download to start",
        WAIT,
        || server.requests(&paced_path()),
        |r| !r.is_empty(),
    );
    // The body is still dribbling in: every lever must be in force already.
    let s = state(root);
    assert!(s["last-stage"]["result"] != "staged", "{s:#}");
    assert!(refusing(&host), "{}", daemon.log());
    assert_eq!(w.logind.active_inhibitors().len(), 1, "{}", daemon.log());
    assert!(!s["hold"].is_null(), "{s:#}");
    let status = agent::status(root);
    assert_eq!(status["hold"]["kernel-release"], NEXT, "{status:#}");

    let s = wait_released(&w, &host);
    assert_eq!(s["last-stage"]["result"], "staged", "{}", daemon.log());
    for dropin in DROPINS {
        assert!(!host.exists(dropin));
    }
}

#[test]
fn hold_release_lets_that_kernel_through_for_good() {
    let host = flatcar_host(&dir_sources(""));
    let w = world(&host, "running");
    let root = host.dir.path();
    let daemon = Daemon::start(root, |c| w.bus.env(c));
    w.update_engine.set_status(NEED_REBOOT, "4152.2.0");
    wait_held(&w, &host, NEXT);
    let text = agent::text(&agent::run(root, &["status"]));
    assert!(
        text.contains("held by reboot-refusal: systemctl reboot"),
        "{text}"
    );
    assert!(
        text.contains("no lever stops: systemctl reboot --force"),
        "{text}"
    );

    let mut release = agent::command(root, &["hold", "release"]);
    w.bus.env(&mut release);
    let out = release.output().unwrap();
    assert!(out.status.success(), "{}", agent::text(&out));
    assert!(agent::text(&out).contains(&format!("released the hold on the update to {NEXT}")));
    let s = wait_released(&w, &host);
    assert_eq!(s["hold-released"]["kernel-release"], NEXT, "{s:#}");
    assert_eq!(s["hold-released"]["by"], "administrator", "{s:#}");

    // Asked to look again, the daemon does not hold that kernel again.
    let reloads = w.systemd.reloads().len();
    let out = agent::run(root, &["stage"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    wait_for(
        "the daemon to look again",
        WAIT,
        || daemon.log(),
        |log| log.matches("asked to look again").count() >= 1,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(w.logind.active_inhibitors().is_empty(), "{}", daemon.log());
    assert!(!refusing(&host));
    // The daemon may reload once more to let its own refusal go; never with a drop-in back.
    assert!(
        w.systemd.reloads()[reloads..]
            .iter()
            .all(|r| r == &vec![false, false]),
        "{:?}",
        w.systemd.reloads()
    );
    let text = agent::text(&agent::run(root, &["status"]));
    assert!(
        text.contains("let through without its overlay by the administrator"),
        "{text}"
    );
}

#[test]
fn the_deadline_lets_the_update_through_loudly() {
    let host = flatcar_host(&dir_sources("hold-max-hours = 1\n"));
    // Held for two hours already (a restarted daemon keeps the record in /run).
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 2 * 3600;
    host.write(
        "/run/nvdriver-agent/state.json",
        &serde_json::json!({
            "format": 1,
            "hold": {"levers": ["reboot-refusal"], "kernel-release": NEXT, "since": since}
        })
        .to_string(),
    );
    // Metrics are written only where node_exporter's directory exists.
    host.mkdir("/var/lib/node_exporter/textfile_collector");
    let w = world(&host, "running");
    let root = host.dir.path();
    // update_engine already waits for the reboot when the daemon starts, as after a restart: a
    // first look that found nothing pending would rightly drop the old hold record.
    w.update_engine.set_status(NEED_REBOOT, "4152.2.0");
    let daemon = Daemon::start(root, |c| w.bus.env(c));
    let s = wait_for(
        "the deadline to let the update through",
        WAIT,
        || state(root),
        |s| !s["hold-released"].is_null(),
    );
    assert_eq!(s["hold-released"]["by"], "deadline", "{s:#}");
    assert_eq!(s["hold-released"]["since"], since, "{s:#}");
    assert!(s["hold"].is_null(), "{s:#}");
    assert!(w.logind.active_inhibitors().is_empty());
    assert!(!refusing(&host));
    assert!(
        daemon
            .log()
            .contains("WITHOUT its NVIDIA overlay: policy.hold-max-hours = 1"),
        "{}",
        daemon.log()
    );
    let metrics = wait_for(
        "the metric",
        WAIT,
        || std::fs::read_to_string(host.path(METRICS)).unwrap_or_default(),
        |m| m.contains("nvdriver_agent_hold_let_through{by=\"deadline\"} 1"),
    );
    assert!(
        metrics.contains("nvdriver_agent_update_held 0"),
        "{metrics}"
    );
}

#[test]
fn a_detection_error_under_hold_fails_closed() {
    let host = flatcar_host(&dir_sources(""));
    // update_engine says an update waits, but slot A's kernel cannot be read.
    host.write("/boot/flatcar/vmlinuz-a", "not a kernel");
    let w = world(&host, "running");
    let root = host.dir.path();
    let daemon = Daemon::start(root, |c| w.bus.env(c));
    w.update_engine.set_status(NEED_REBOOT, "4152.2.0");
    let s = wait_held(&w, &host, "");
    let detail = s["hold"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("next kernel unknown: "),
        "{s:#}\n{}",
        daemon.log()
    );
    let text = agent::text(&agent::run(root, &["status"]));
    assert!(
        text.contains(
            "update held:     yes, the update to the next kernel (unknown) (next kernel unknown:"
        ),
        "{text}"
    );
}

#[test]
fn a_stopped_agent_leaves_no_reboot_refusal_but_a_shutdown_keeps_it() {
    for (system_state, kept) in [("running", false), ("stopping", true)] {
        let host = flatcar_host(&dir_sources(""));
        let w = world(&host, system_state);
        let root = host.dir.path();
        let mut daemon = Daemon::start(root, |c| w.bus.env(c));
        w.update_engine.set_status(NEED_REBOOT, "4152.2.0");
        wait_held(&w, &host, NEXT);
        let reloads = w.systemd.reloads().len();
        assert!(daemon.stop().success(), "{}", daemon.log());
        assert_eq!(refusing(&host), kept, "{system_state}: {}", daemon.log());
        let s = state(root);
        if kept {
            // Shutting down: no reload (the refusal leaves with /run at the reboot).
            assert_eq!(w.systemd.reloads().len(), reloads);
            assert_eq!(
                s["hold"]["levers"],
                serde_json::json!(["reboot-refusal"]),
                "{s:#}"
            );
        } else {
            assert_eq!(w.systemd.reloads().last(), Some(&vec![false, false]));
            // The record stays (its deadline clock with it); it names no lever in force.
            assert_eq!(s["hold"]["levers"], serde_json::json!([]), "{s:#}");
            let text = agent::text(&agent::run(root, &["status"]));
            assert!(text.contains("update held:     NO: the hold on"), "{text}");
        }
    }
}

/// `hold release` while the daemon is busy downloading: its signal thread drops the inhibitor
/// at once (rpm-ostreed and logind see it gone), not when the download ends.
#[test]
fn hold_release_drops_the_inhibitor_at_once_even_mid_download() {
    // About fifteen seconds of download.
    let (server, host) = paced_source_host(150);
    let w = world(&host, "running");
    let root = host.dir.path();
    let daemon = Daemon::start(root, |c| w.bus.env(c));
    w.update_engine.set_status(NEED_REBOOT, "4152.2.0");
    wait_held(&w, &host, NEXT);
    wait_for(
        "the download to start",
        WAIT,
        || server.requests(&paced_path()),
        |r| !r.is_empty(),
    );

    let mut release = agent::command(root, &["hold", "release"]);
    w.bus.env(&mut release);
    let out = release.output().unwrap();
    assert!(out.status.success(), "{}", agent::text(&out));
    let started = std::time::Instant::now();
    wait_for(
        "the inhibitor and the refusal to go",
        Duration::from_secs(5),
        || (w.logind.active_inhibitors(), refusing(&host)),
        |(held, refusing)| held.is_empty() && !refusing,
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Still downloading: the release did not wait for it.
    assert!(
        state(root)["last-stage"]["result"] != "staged",
        "{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("the logind shutdown inhibitor is dropped"),
        "{}",
        daemon.log()
    );
    // The download ends (the daemon answers SIGTERM between looks, not during one).
    wait_for(
        "the download to end",
        WAIT,
        || state(root),
        |s| s["last-stage"]["result"] == "staged",
    );
}

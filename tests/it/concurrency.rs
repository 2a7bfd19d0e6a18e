//! Commands racing each other on one host, as the real binary: two `stage --now` at once (the
//! store lock makes them take turns, and the overlay is staged once), and `load` while a slow
//! stage holds the store lock (load does not wait for it and loads the running kernel's
//! overlay).

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::agent::text;
use crate::common::host::FakeHost;
use crate::common::http::{serve_overlay_source, HttpServer, Route};
use crate::common::overlay::{OverlayBuilder, DRIVER};
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";
const NEXT: &str = "6.1.0-29-cloud-amd64";
const STORE: &str = "/var/lib/nvdriver-agent/overlays";

/// A host running KVER with its overlay stored; NEXT's is served over HTTP, `pace` slowing it.
/// A fake host whose one source is `server`; with `download_time`, the archive is sent in 50
/// paced chunks that take about that long in all (the archive is a few KB: a fixed chunk size
/// would send it in one or two pieces).
fn host(server: &HttpServer, download_time: Option<Duration>) -> FakeHost {
    let host = FakeHost::new(KVER);
    const PIECES: u32 = 50;
    let pace = |route: &mut Route, length: usize| {
        let chunk = length.div_ceil(PIECES as usize).max(1);
        route.pace = download_time.map(|total| (chunk, total / PIECES));
    };
    serve_overlay_source(&host, server, NEXT, pace, "");
    host.import(&OverlayBuilder::nvidia(KVER));
    host
}

#[test]
fn two_stage_now_at_once_stage_the_kernel_once() {
    let server = HttpServer::start();
    let host = host(&server, None);
    let stage = || {
        crate::common::agent::command(host.dir.path(), &["stage", "--now", "--kernel", NEXT])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (stage(), stage());
    let outputs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    for out in &outputs {
        assert!(out.status.success(), "{}", text(out));
    }
    // One download, one import; the other found it in the store.
    let downloads = server.requests(&format!("/{NEXT}.tar.zst"));
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    let stderr: String = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert_eq!(
        // The stager that downloaded names the URL; the other found it in the store.
        stderr
            .matches("overlay for the next kernel is in the store (from http")
            .count(),
        1,
        "{stderr}"
    );
    let store = Store::new(&host.root, STORE);
    let overlay = store.open(NEXT, DRIVER).unwrap();
    store.verify(&overlay).unwrap();
}

#[test]
fn load_while_a_slow_stage_holds_the_store() {
    let server = HttpServer::start();
    // About two seconds of download.
    let host = host(&server, Some(Duration::from_secs(2)));
    let mut stage =
        crate::common::agent::command(host.dir.path(), &["stage", "--now", "--kernel", NEXT])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    // Wait until the stage is downloading (it holds the store lock by then).
    let started = Instant::now();
    while server.requests(&format!("/{NEXT}.tar.zst")).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "stage never fetched"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let load_started = Instant::now();
    let load = crate::common::agent::run(host.dir.path(), &["load"]);
    let load_took = load_started.elapsed();
    assert!(load.status.success(), "{}", text(&load));
    let still_staging = stage.try_wait().unwrap().is_none();
    let stage_out = stage.wait_with_output().unwrap();
    assert!(stage_out.status.success(), "{}", text(&stage_out));
    assert!(
        still_staging,
        "the stage finished before load did (load took {load_took:?}); the race was not tested"
    );
    let log = host.read("/run/nvdriver-agent/simulated-kernel.log");
    assert!(log.contains("finit-module"), "{log}");
    let store = Store::new(&host.root, STORE);
    for kernel in [KVER, NEXT] {
        store.verify(&store.open(kernel, DRIVER).unwrap()).unwrap();
    }
}

/// A storm of update_engine signals at the daemon on a fake Flatcar host (booted from USR-B,
/// the next kernel written to slot A): it stages the next kernel once, keeps its memory
/// bounded, and still answers a `stage` poke at once.
#[test]
fn signal_storm_stages_once_and_stays_responsive() {
    use crate::common::agent::{state, wait_for, Daemon};
    use crate::common::bus::{TestBus, UpdateEnginePeer};

    const RUNNING: &str = "6.6.60-flatcar";
    const FLATCAR_NEXT: &str = "6.6.95-flatcar";
    const SIGNALS: usize = 5000;
    const RSS_LIMIT_KB: u64 = 64 << 10;
    let bus = TestBus::start();
    let update_engine = UpdateEnginePeer::start(&bus, "UPDATE_STATUS_IDLE");
    let host = FakeHost::flatcar(
        RUNNING,
        FLATCAR_NEXT,
        &format!("[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"/opt/overlays/{{kernel}}/{{driver}}\"]\n"),
    );
    let dir = host.path(format!("/opt/overlays/{FLATCAR_NEXT}/{DRIVER}"));
    std::fs::create_dir_all(&dir).unwrap();
    OverlayBuilder::nvidia(FLATCAR_NEXT).build(&dir);
    let root = host.dir.path();
    let mut daemon = Daemon::start(root, |c| bus.env(c));
    let rss_kb = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let before = rss_kb(daemon.pid());

    let storm_started = Instant::now();
    let mut peak = before;
    for i in 0..SIGNALS {
        let op = if i % 2 == 0 {
            "UPDATE_STATUS_UPDATED_NEED_REBOOT"
        } else {
            "UPDATE_STATUS_FINALIZING"
        };
        update_engine.set_status(op, "4152.2.0");
        if i % 500 == 0 {
            peak = peak.max(rss_kb(daemon.pid()));
        }
    }
    update_engine.set_status("UPDATE_STATUS_UPDATED_NEED_REBOOT", "4152.2.0");
    let storm_took = storm_started.elapsed();
    wait_for(
        "the overlay for slot A's kernel to be staged",
        Duration::from_secs(30),
        || state(root),
        |s| s["last-stage"]["result"] == "staged" || s["last-stage"]["result"] == "already-staged",
    );
    // Responsive: a poke is answered at once, while the signals may still be draining.
    let poke_started = Instant::now();
    let poke = crate::common::agent::run(root, &["stage"]);
    assert!(poke.status.success(), "{}", text(&poke));
    assert!(
        poke_started.elapsed() < Duration::from_secs(10),
        "the poke took {:?}",
        poke_started.elapsed()
    );
    peak = peak.max(rss_kb(daemon.pid()));
    assert!(daemon.stop().success(), "{}", daemon.log());
    let log = daemon.log();
    // Each stage from a source logs where it came from; finding it already in the store names
    // the store itself.
    let staged = log
        .lines()
        .filter(|l| {
            l.contains("overlay for the next kernel is in the store (from ")
                && !l.contains("(from /var/lib/nvdriver-agent/overlays/")
        })
        .count();
    eprintln!(
        "{SIGNALS} signals in {storm_took:?}; VmRSS {before} kB before, peak {peak} kB; staged {staged} time(s)"
    );
    assert_eq!(staged, 1, "{log}");
    assert!(peak < RSS_LIMIT_KB, "VmRSS peaked at {peak} kB");
}

//! Commands racing each other on one host, as the real binary: two `stage --now` at once (the
//! store lock makes them take turns, and the overlay is staged once), and `load` while a slow
//! stage holds the store lock (load does not wait for it and loads the running kernel's
//! overlay).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::agent::text;
use common::archive::{overlay_archive, Compression, ManifestAt};
use common::host::FakeHost;
use common::http::{HttpServer, Route};
use common::overlay::{OverlayBuilder, DRIVER};
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";
const NEXT: &str = "6.1.0-29-cloud-amd64";
const STORE: &str = "/var/lib/nvdriver-agent/overlays";

/// A host running KVER with its overlay stored; NEXT's is served over HTTP, `pace` slowing it.
fn host(server: &HttpServer, pace: Option<(usize, Duration)>) -> FakeHost {
    let host = FakeHost::new(KVER);
    let (archive, _) = overlay_archive(
        &OverlayBuilder::nvidia(NEXT),
        Compression::Zstd,
        ManifestAt::Last,
    );
    let mut route = Route::file(archive);
    route.pace = pace;
    server.route(&format!("/{NEXT}.tar.zst"), route);
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!(
            "[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"{}\"]\nallow-http = true\n",
            server.url("/{kernel}.tar.zst")
        ),
    );
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(src.path());
    Store::new(&host.root, STORE).import(src.path()).unwrap();
    host
}

#[test]
fn two_stage_now_at_once_stage_the_kernel_once() {
    let server = HttpServer::start();
    let host = host(&server, None);
    let stage = || {
        common::agent::command(host.dir.path(), &["stage", "--now", "--kernel", NEXT])
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
        stderr.matches("overlay staged into the store").count(),
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
    let host = host(&server, Some((4096, Duration::from_millis(40))));
    let mut stage = common::agent::command(host.dir.path(), &["stage", "--now", "--kernel", NEXT])
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
    let load = common::agent::run(host.dir.path(), &["load"]);
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

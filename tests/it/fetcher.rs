//! Staging through the unprivileged fetcher (`--fetcher`, `fetch-serve`), as the real binaries:
//! the daemon's side takes over what the fetcher staged only once the fetcher is gone, and trusts
//! none of it before its own checks.
//!
//! systemd and the kernel are emulated here where they cannot run: the fetch unit's cgroup is
//! named in `<root>/proc/<pid>/cgroup` and its `cgroup.events` says `populated 1` until the
//! fetcher process has exited, then `populated 0`, as the kernel keeps it
//! (kernel/cgroup/cgroup.c `cgroup_update_populated`, `cgroup_file_notify`). The real unit, socket
//! and sandbox run in the QEMU guest (tests/vm/run, scenario `late-update-https` and the
//! `fetch-sandbox` checks of `services`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::agent::{self, text};
use crate::common::host::{snapshot_dir, FakeHost};
use crate::common::http::{serve_overlay_source, HttpServer};
use crate::common::overlay::{OverlayBuilder, DRIVER};
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";
const NEXT: &str = "6.1.0-29-cloud-amd64";
const STORE: &str = "/var/lib/nvdriver-agent/overlays";
const SOCKET: &str = "/run/nvdriver-agent/fetch.sock";
const STATE: &str = "/var/lib/private/nvdriver-agent-fetch";
const UNIT_CGROUP: &str = "/system.slice/nvdriver-agent-fetch.service";

fn host(server: &HttpServer) -> FakeHost {
    let host = FakeHost::new(KVER);
    serve_overlay_source(&host, server, NEXT, |_, _| {}, "");
    host.import(&OverlayBuilder::nvidia(KVER));
    host.mkdir("/run/nvdriver-agent");
    host.mkdir(STATE);
    host
}

/// Name `pid`'s cgroup the fetch unit's, populated until [`unit_gone`].
fn unit_running(host: &FakeHost, pid: u32) {
    host.write(
        &format!("/proc/{pid}/cgroup"),
        &format!("0::{UNIT_CGROUP}\n"),
    );
    host.write(
        &format!("/sys/fs/cgroup{UNIT_CGROUP}/cgroup.events"),
        "populated 1\nfrozen 0\n",
    );
}

fn unit_gone(root: &Path) {
    let events = root.join(format!("sys/fs/cgroup{UNIT_CGROUP}/cgroup.events"));
    std::fs::write(events, "populated 0\nfrozen 0\n").unwrap();
}

/// The real fetcher (`fetch-serve`) on `host`'s socket, as the unit runs it.
fn spawn_fetcher(host: &FakeHost) -> Child {
    let child = agent::command(
        host.dir.path(),
        &["fetch-serve", "--listen", SOCKET, "--state-dir", STATE],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let socket = host.path(SOCKET);
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the fetcher never listened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    unit_running(host, child.id());
    child
}

fn stage_now(host: &FakeHost) -> std::process::Output {
    agent::run(
        host.dir.path(),
        &["--fetcher", SOCKET, "stage", "--now", "--kernel", NEXT],
    )
}

#[test]
fn stage_through_the_fetcher_takes_over_its_overlay_once_it_is_gone() {
    let server = HttpServer::start();
    let host = host(&server);
    let mut fetcher = spawn_fetcher(&host);
    let root = host.dir.path().to_path_buf();
    let stager = std::thread::spawn(move || {
        let status = fetcher.wait().unwrap();
        unit_gone(&root);
        let out = fetcher.wait_with_output().unwrap();
        (status, String::from_utf8_lossy(&out.stderr).into_owned())
    });
    let out = stage_now(&host);
    let (fetcher_status, fetcher_log) = stager.join().unwrap();
    assert!(
        out.status.success(),
        "{}\nfetcher:\n{fetcher_log}",
        text(&out)
    );
    assert!(fetcher_status.success(), "{fetcher_log}");
    assert!(
        text(&out).contains("took over the overlay the fetcher staged"),
        "{}",
        text(&out)
    );
    assert_eq!(server.requests(&format!("/{NEXT}.tar.zst")).len(), 1);

    let store = Store::new(&host.root, STORE);
    let overlay = store.open(NEXT, DRIVER).unwrap();
    store.verify(&overlay).unwrap();
    // Moved, not copied: nothing of it is left in the fetcher's store.
    assert!(!host.exists(&format!("{STATE}/store/{NEXT}/{DRIVER}")));
    let euid = nix::unistd::geteuid().as_raw();
    for entry in walk(&host.root.join(&overlay.dir)) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        assert_eq!(meta.uid(), euid, "{}", entry.display());
        assert_eq!(
            meta.mode() & 0o022,
            0,
            "{} is writable by others",
            entry.display()
        );
    }
}

#[test]
fn without_a_fetcher_stage_fails_saying_what_to_check() {
    let server = HttpServer::start();
    let host = host(&server);
    let out = stage_now(&host);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("is nvdriver-agent-fetch.socket running?"),
        "{}",
        text(&out)
    );
    assert!(server.requests(&format!("/{NEXT}.tar.zst")).is_empty());
    assert!(Store::new(&host.root, STORE).open(NEXT, DRIVER).is_err());
}

/// What a compromised fetcher might leave for the daemon.
enum Trick {
    /// Its nvidia.ko is a hard link to a file of root's elsewhere.
    HardLink,
    /// A file the manifest does not list.
    Unlisted,
    /// A module changed after the manifest was written.
    Tampered,
    /// The kernel directory is a symlink to somewhere else.
    LinkedDir,
}

/// Play a hostile fetcher once (this test process is the peer): greet, take the request, leave
/// `trick` in the fetcher's store, claim success, "exit".
fn hostile_fetcher(host: &FakeHost, trick: Trick) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(host.path(SOCKET)).unwrap();
    unit_running(host, std::process::id());
    let root = host.dir.path().to_path_buf();
    let state = host.path(STATE);
    let outside = host.path("/etc/secret");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .write_all(b"{\"fetcher\":\"nvdriver-agent-fetch\"}\n")
            .unwrap();
        let mut request = String::new();
        BufReader::new(&stream).read_line(&mut request).unwrap();
        leave(&state, &outside, trick);
        stream
            .write_all(b"{\"staged_from\":\"https://example.invalid/x.tar.zst\",\"tried\":[]}\n")
            .unwrap();
        drop(stream);
        unit_gone(&root);
    })
}

fn leave(state: &Path, outside: &Path, trick: Trick) {
    let kernel_dir = state.join("store").join(NEXT);
    let overlay = kernel_dir.join(DRIVER);
    if let Trick::LinkedDir = trick {
        let elsewhere = state.join("elsewhere");
        OverlayBuilder::nvidia(NEXT).build(&elsewhere.join(DRIVER));
        std::fs::create_dir_all(state.join("store")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &kernel_dir).unwrap();
        return;
    }
    let manifest = OverlayBuilder::nvidia(NEXT).build(&overlay);
    let module = overlay.join(&manifest.module_files().next().unwrap().path);
    match trick {
        Trick::HardLink => {
            std::fs::remove_file(&module).unwrap();
            std::fs::hard_link(outside, &module).unwrap();
        }
        Trick::Unlisted => std::fs::write(overlay.join("usr/lib/extra.so"), b"x").unwrap(),
        Trick::Tampered => {
            let mut bytes = std::fs::read(&module).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(&module, bytes).unwrap();
        }
        Trick::LinkedDir => unreachable!(),
    }
}

#[test]
fn nothing_a_hostile_fetcher_leaves_is_taken_over() {
    for (trick, says) in [
        (Trick::HardLink, "hard links"),
        (Trick::Unlisted, "extra.so"),
        (Trick::Tampered, "nvidia"),
        (Trick::LinkedDir, "is not a directory"),
    ] {
        let server = HttpServer::start();
        let host = host(&server);
        host.write("/etc/secret", "root's");
        let secret = host.path("/etc/secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let store_before = snapshot_dir(&host.path(STORE));
        let fetcher = hostile_fetcher(&host, trick);
        let out = stage_now(&host);
        assert!(fetcher.join().is_ok(), "{}", text(&out));
        assert_eq!(out.status.code(), Some(4), "{}", text(&out));
        assert!(
            text(&out).contains(says),
            "expected {says:?}: {}",
            text(&out)
        );
        assert!(Store::new(&host.root, STORE).open(NEXT, DRIVER).is_err());
        assert_eq!(
            std::fs::metadata(&secret).unwrap().mode() & 0o7777,
            0o600,
            "the linked file's mode changed"
        );
        // Nothing of the attempt is left in the store (its temporary directory is removed).
        let mut store_after = snapshot_dir(&host.path(STORE));
        store_after.retain(|(p, _)| p != Path::new(".lock"));
        assert_eq!(store_after, store_before);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let path = out[i].clone();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                out.push(entry.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

//! `nvdriver-agent run` on a fake generic host (Garden Linux / Debian shape): boot path, then a
//! kernel package lands and the overlay for it is staged before any reboot.

use std::time::Duration;

use crate::common::agent::{self, state, status, wait_for, Daemon};
use crate::common::host::FakeHost;
use crate::common::overlay::{OverlayBuilder, DRIVER};

const OLD: &str = "6.1.0-27-cloud-amd64";
const NEW: &str = "6.1.0-28-cloud-amd64";
const WAIT: Duration = Duration::from_secs(20);

const GARDEN_OS_RELEASE: &str = "ID=gardenlinux\nNAME=\"Garden Linux\"\nPRETTY_NAME=\"Garden Linux 1592.4\"\nGARDENLINUX_VERSION=1592.4\n";

/// A Garden Linux host booted on OLD with its overlay in the store, and a source directory that
/// holds overlays for other kernels.
fn garden_host(sources_with: &[&str]) -> FakeHost {
    let host = FakeHost::new(OLD);
    host.write("/etc/os-release", GARDEN_OS_RELEASE);
    host.write(&format!("/boot/vmlinuz-{OLD}"), "kernel image");
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(OLD).build(src.path());
    let out = agent::run(
        host.dir.path(),
        &["overlay", "import", src.path().to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", agent::text(&out));
    for kver in sources_with {
        let dir = host.path(format!("/srv/overlays/{kver}/{DRIVER}"));
        std::fs::create_dir_all(&dir).unwrap();
        OverlayBuilder::nvidia(kver).build(&dir);
    }
    host.write(
        "/etc/nvdriver-agent/config.toml",
        "[stage]\nsources = [\"/srv/overlays/{kernel}/{driver}\"]\n",
    );
    host
}

/// What a kernel package install leaves: the module tree, then the image in /boot.
fn install_kernel(host: &FakeHost, kver: &str) {
    host.write(&format!("/usr/lib/modules/{kver}/modules.dep"), "");
    host.write(&format!("/boot/vmlinuz-{kver}"), "kernel image");
}

#[test]
fn stages_the_overlay_for_a_newly_installed_kernel() {
    let host = garden_host(&[NEW]);
    let mut daemon = Daemon::start(host.dir.path(), |_| {});
    assert_eq!(
        state(host.dir.path())["load"]["result"],
        "loaded",
        "{}",
        daemon.log()
    );
    assert!(state(host.dir.path())["pending"].is_null());

    install_kernel(&host, NEW);
    let seen = wait_for(
        "the overlay for the new kernel to be staged",
        WAIT,
        || state(host.dir.path()),
        |s| s["last-stage"]["result"] == "staged",
    );
    assert_eq!(seen["pending"]["kernel-release"], NEW);
    assert_eq!(seen["last-stage"]["driver-version"], DRIVER);
    assert!(host
        .path(format!(
            "/var/lib/nvdriver-agent/overlays/{NEW}/{DRIVER}/overlay.toml"
        ))
        .exists());

    let report = status(host.dir.path());
    assert_eq!(report["running-kernel"], OLD);
    assert_eq!(report["pending"]["kernel-release"], NEW);
    assert_eq!(report["pending-staged"], true);
    assert_eq!(report["daemon-pid"], daemon.pid());
    assert_eq!(report["detector"], "generic");
    let stored: Vec<&str> = crate::common::str_fields(&report["store"], "kernel-release");
    assert_eq!(stored, [OLD, NEW]);

    assert!(daemon.stop().success(), "{}", daemon.log());
    // The pid in the lock file is stale now; status says so.
    assert!(status(host.dir.path())["daemon-pid"].is_null());
}

#[test]
fn a_second_daemon_refuses_to_start() {
    let host = garden_host(&[]);
    let daemon = Daemon::start(host.dir.path(), |_| {});
    let out = agent::run(host.dir.path(), &["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", agent::text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already running") && stderr.contains(&format!("pid {}", daemon.pid())),
        "{}",
        agent::text(&out)
    );
}

#[test]
fn a_missing_overlay_is_reported_then_staged_when_asked_again() {
    let host = garden_host(&[]);
    let daemon = Daemon::start(host.dir.path(), |_| {});
    install_kernel(&host, NEW);
    let seen = wait_for(
        "the stage to report the overlay missing",
        WAIT,
        || state(host.dir.path()),
        |s| s["last-stage"]["result"] == "missing",
    );
    let detail = seen["last-stage"]["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains(&format!("/srv/overlays/{NEW}/{DRIVER}")),
        "{detail}"
    );
    assert_eq!(status(host.dir.path())["pending-staged"], false);

    // The overlay shows up in the source (not a watched place); `stage` asks the daemon to look.
    let dir = host.path(format!("/srv/overlays/{NEW}/{DRIVER}"));
    std::fs::create_dir_all(&dir).unwrap();
    OverlayBuilder::nvidia(NEW).build(&dir);
    let out = agent::run(host.dir.path(), &["stage"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("pid {}", daemon.pid())),
        "{}",
        agent::text(&out)
    );
    wait_for(
        "the daemon to stage after being asked",
        WAIT,
        || state(host.dir.path()),
        |s| s["last-stage"]["result"] == "staged",
    );
}

#[test]
fn stage_now_works_without_a_daemon_and_says_when_nothing_is_pending() {
    let host = garden_host(&[NEW]);
    let out = agent::run(host.dir.path(), &["stage", "--now"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no kernel update pending"),
        "{}",
        agent::text(&out)
    );
    install_kernel(&host, NEW);
    let out = agent::run(host.dir.path(), &["stage", "--now"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    assert!(host
        .path(format!(
            "/var/lib/nvdriver-agent/overlays/{NEW}/{DRIVER}/overlay.toml"
        ))
        .exists());
    // Missing for another kernel: exit code 3, the sources tried named.
    let out = agent::run(
        host.dir.path(),
        &["stage", "--kernel", "6.1.0-99-cloud-amd64"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", agent::text(&out));
}

#[test]
fn the_os_driver_makes_the_agent_stand_down() {
    let host = garden_host(&[NEW]);
    install_kernel(&host, NEW);
    host.write(
        &format!("/usr/lib/modules/{NEW}/updates/dkms/nvidia.ko.xz"),
        "a distro kmod",
    );
    let out = agent::run(host.dir.path(), &["stage", "--now"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    let s = state(host.dir.path());
    assert_eq!(s["last-stage"]["result"], "stood-down", "{s:#}");
    assert!(!host
        .path(format!("/var/lib/nvdriver-agent/overlays/{NEW}"))
        .exists());
}

/// READY=1 reaches systemd's notify socket after the boot path; with `WatchdogSec=` the daemon
/// pings at half the interval; without it, an idle daemon sends nothing at all.
#[test]
fn notifies_ready_and_pings_the_watchdog_only_when_asked() {
    use std::os::unix::net::UnixDatagram;
    let messages = |socket: &UnixDatagram, for_how_long: Duration| {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let deadline = std::time::Instant::now() + for_how_long;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        seen
    };

    for watchdog in [Some("200000"), None] {
        let host = garden_host(&[]);
        let socket_path = host.path("/run/systemd/notify-test");
        std::fs::create_dir_all(socket_path.parent().unwrap()).unwrap();
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        let daemon = Daemon::start(host.dir.path(), |c| {
            c.env("NOTIFY_SOCKET", &socket_path);
            if let Some(usec) = watchdog {
                c.env("WATCHDOG_USEC", usec);
            }
        });
        let first = messages(&socket, Duration::from_millis(300));
        assert!(
            first.iter().any(|m| m.lines().any(|l| l == "READY=1")),
            "{first:?}\n{}",
            daemon.log()
        );
        let idle = messages(&socket, Duration::from_secs(1));
        let pings = idle.iter().filter(|m| m.contains("WATCHDOG=1")).count();
        match watchdog {
            // 100 ms apart over a second, with slack for a loaded machine.
            Some(_) => assert!(pings >= 5, "{pings} pings: {idle:?}"),
            None => assert!(idle.is_empty(), "an idle daemon sent {idle:?}"),
        }
    }
}

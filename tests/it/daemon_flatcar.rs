//! `nvdriver-agent run` on a fake Flatcar host, with update_engine and logind served on a real
//! private bus: the next kernel is staged only once update_engine says an update waits for the
//! reboot, and under `hold` the reboot is blocked by a logind inhibitor until the overlay lands.

use std::time::Duration;

use crate::common::agent::{self, state, wait_for, Daemon};
use crate::common::bus::{LogindPeer, TestBus, UpdateEnginePeer};
use crate::common::host::FakeHost;
use crate::common::overlay::{OverlayBuilder, DRIVER};

const RUNNING: &str = "6.6.60-flatcar";
const NEXT: &str = "6.6.95-flatcar";
const WAIT: Duration = Duration::from_secs(20);
const NEED_REBOOT: &str = "UPDATE_STATUS_UPDATED_NEED_REBOOT";

/// Booted from USR-B on RUNNING; update_engine has written NEXT's kernel to slot A.
fn flatcar_host(policy: &str, with_overlay: bool) -> FakeHost {
    let host = FakeHost::flatcar(
        RUNNING,
        NEXT,
        &format!("[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"/opt/overlays/{{kernel}}/{{driver}}\"]\n[policy]\nmissing-next-overlay = \"{policy}\"\n"),
    );
    if with_overlay {
        publish(&host);
    }
    host
}

fn publish(host: &FakeHost) {
    let dir = host.path(format!("/opt/overlays/{NEXT}/{DRIVER}"));
    std::fs::create_dir_all(&dir).unwrap();
    OverlayBuilder::nvidia(NEXT).build(&dir);
}

#[test]
fn stages_when_update_engine_says_reboot_needed() {
    let bus = TestBus::start();
    let update_engine = UpdateEnginePeer::start(&bus, "UPDATE_STATUS_IDLE");
    let host = flatcar_host("warn", true);
    let root = host.dir.path();
    let mut daemon = Daemon::start(root, |c| bus.env(c));
    // Idle: the newer kernel in slot A is last update's leftover or not yet due; nothing pending.
    wait_for(
        "the daemon to hear update_engine",
        WAIT,
        || state(root),
        |s| s["update-engine-operation"] == "UPDATE_STATUS_IDLE",
    );
    assert!(state(root)["pending"].is_null(), "{}", daemon.log());

    update_engine.set_status(NEED_REBOOT, "4152.2.0");
    let seen = wait_for(
        "the overlay for slot A's kernel to be staged",
        WAIT,
        || state(root),
        |s| s["last-stage"]["result"] == "staged",
    );
    assert_eq!(seen["pending"]["kernel-release"], NEXT);
    let origin = seen["pending"]["origin"].as_str().unwrap();
    assert!(
        origin.starts_with("/boot/flatcar/vmlinuz-a") && origin.contains(NEED_REBOOT),
        "{origin}"
    );
    assert!(host
        .path(format!(
            "/var/lib/nvdriver-agent/overlays/{NEXT}/{DRIVER}/overlay.toml"
        ))
        .exists());
    assert!(daemon.stop().success(), "{}", daemon.log());

    // At shutdown, `stage --now` knows what update_engine last said without asking it.
    drop(update_engine);
    let out = agent::run(root, &["stage", "--now"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already-staged"),
        "{}",
        agent::text(&out)
    );
}

#[test]
fn hold_blocks_the_reboot_until_the_overlay_is_staged() {
    let bus = TestBus::start();
    let update_engine = UpdateEnginePeer::start(&bus, "UPDATE_STATUS_IDLE");
    let logind = LogindPeer::start(&bus);
    let host = flatcar_host("hold", false);
    let root = host.dir.path();
    let daemon = Daemon::start(root, |c| bus.env(c));

    update_engine.set_status(NEED_REBOOT, "4152.2.0");
    let (held, s) = wait_for(
        "a shutdown inhibitor, recorded in the state",
        WAIT,
        || (logind.active_inhibitors(), state(root)),
        // The hold is taken before the look at the sources; the stage record comes after.
        |(held, s)| held.len() == 1 && !s["hold"].is_null() && !s["last-stage"].is_null(),
    );
    assert!(
        held[0].starts_with("shutdown|nvdriver-agent|")
            && held[0].contains(NEXT)
            && held[0].ends_with("|block"),
        "{held:?}"
    );
    // No systemd peer on this bus: the reboot refusal cannot be put in force (its Reload()
    // fails), so it is taken off again and not claimed.
    assert_eq!(
        s["hold"]["levers"],
        serde_json::json!(["logind-shutdown-inhibitor"]),
        "{s:#}"
    );
    assert!(!host.exists("/run/systemd/system/reboot.target.d/50-nvdriver-agent-hold.conf"));
    assert_eq!(s["last-stage"]["result"], "missing");

    publish(&host);
    let out = agent::run(root, &["stage"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    wait_for(
        "the inhibitor to be released",
        WAIT,
        || (logind.active_inhibitors(), state(root)),
        |(held, s)| held.is_empty() && s["hold"].is_null(),
    );
    assert_eq!(
        state(root)["last-stage"]["result"],
        "staged",
        "{}",
        daemon.log()
    );
}

//! The scenario the product exists for, on a real ostree sysroot (made by the `ostree` CLI) with
//! the daemon running: an update is staged → the agent learns its kernel → the overlay is in the
//! store before any reboot → `status --json` shows it. And with `hold`: no overlay → the staged
//! deployment is locked until the overlay is published, then released.
//!
//! `cargo test --test it -- timeline:: --nocapture` prints the timeline.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::agent::{self, state, status, wait_for, Daemon};
use crate::common::ostree::OstreeSysroot;
use crate::common::overlay::{OverlayBuilder, DRIVER};

const RUNNING: &str = "6.11.4-301.fc41.x86_64";
const NEXT: &str = "6.11.7-300.fc41.x86_64";
const WAIT: Duration = Duration::from_secs(20);
const LOCK: &str = "run/ostree/staged-deployment-locked";

struct Timeline(Instant);

impl Timeline {
    fn mark(&self, what: &str) {
        println!("{:>6} ms  {what}", self.0.elapsed().as_millis());
    }
}

/// A Fedora CoreOS host booted into a deployment of RUNNING, with the agent configured to stage
/// from a local directory of overlays.
fn fcos_host(policy: &str) -> OstreeSysroot {
    let sysroot = OstreeSysroot::booted_layout("fedora-coreos");
    let commit = sysroot.commit_kernel(RUNNING);
    sysroot.deploy(&commit);
    let write = |host_path: &str, text: &str| {
        let path = sysroot.path(host_path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("/run/ostree-booted", "");
    write("/etc/os-release", crate::common::host::FCOS_OS_RELEASE);
    write("/proc/sys/kernel/osrelease", &format!("{RUNNING}\n"));
    write("/proc/modules", "");
    write(
        "/etc/nvdriver-agent/config.toml",
        &format!(
            "[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"/var/srv/overlays/{{kernel}}/{{driver}}\"]\nkeep-free-percent = 0\nkeep-free-bytes = 0\n[policy]\nmissing-next-overlay = \"{policy}\"\n"
        ),
    );
    sysroot
}

fn publish_overlay(root: &Path, kver: &str) {
    let dir = root.join(format!("var/srv/overlays/{kver}/{DRIVER}"));
    std::fs::create_dir_all(&dir).unwrap();
    OverlayBuilder::nvidia(kver).build(&dir);
}

#[test]
fn staged_update_gets_its_overlay_before_the_reboot() {
    let host = fcos_host("warn");
    let root = host.dir.path();
    publish_overlay(root, NEXT);
    let t = Timeline(Instant::now());
    let _daemon = Daemon::start(root, |_| {});
    t.mark("daemon up; no update pending");
    assert!(state(root)["pending"].is_null());
    assert_eq!(status(root)["detector"], "ostree");

    let next = host.commit_kernel(NEXT);
    let staged = host.stage(&next);
    t.mark(&format!("rpm-ostree staged deployment {}", staged.name()));

    let seen = wait_for(
        "the next kernel to be known",
        WAIT,
        || state(root),
        |s| s["pending"]["kernel-release"] == NEXT,
    );
    t.mark(&format!(
        "agent: next kernel {NEXT} (from {})",
        seen["pending"]["origin"]
    ));
    assert_eq!(seen["pending"]["staged-deployment"], true);
    assert!(seen["pending"]["origin"]
        .as_str()
        .unwrap()
        .contains(&staged.name()));

    wait_for(
        "the overlay to be staged",
        WAIT,
        || state(root),
        |s| s["last-stage"]["result"] == "staged",
    );
    t.mark("agent: overlay staged in the store");
    let report = status(root);
    t.mark("status --json: next kernel staged");
    assert_eq!(report["running-kernel"], RUNNING);
    assert_eq!(report["pending"]["kernel-release"], NEXT);
    assert_eq!(report["pending-staged"], true);
    assert!(root
        .join(format!(
            "var/lib/nvdriver-agent/overlays/{NEXT}/{DRIVER}/overlay.toml"
        ))
        .exists());
    assert!(report["hold"].is_null());
    assert!(!root.join(LOCK).exists());
}

#[test]
fn hold_locks_the_staged_deployment_until_the_overlay_lands() {
    let host = fcos_host("hold");
    let root = host.dir.path();
    let t = Timeline(Instant::now());
    let daemon = Daemon::start(root, |_| {});
    t.mark("daemon up (policy: hold); no overlay for the next kernel anywhere");

    let next = host.commit_kernel(NEXT);
    host.stage(&next);
    t.mark("rpm-ostree staged an update");
    let seen = wait_for(
        "the hold",
        WAIT,
        || (state(root), root.join(LOCK).exists()),
        // The hold comes before the look at the sources, the stage record after it.
        |(s, locked)| *locked && !s["hold"].is_null() && !s["last-stage"].is_null(),
    );
    t.mark("agent: overlay missing → staged deployment locked");
    assert_eq!(seen.0["last-stage"]["result"], "missing");
    assert_eq!(seen.0["hold"]["kernel-release"], NEXT);
    // No logind on this host's (absent) bus: only the lock is held, and only it is claimed.
    assert_eq!(
        seen.0["hold"]["levers"],
        serde_json::json!(["ostree-finalization-lock"])
    );
    assert_eq!(status(root)["hold"]["kernel-release"], NEXT);

    publish_overlay(root, NEXT);
    t.mark("overlay published at the source");
    let out = agent::run(root, &["stage"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    t.mark("`nvdriver-agent stage` asked the daemon to look again");
    let seen = wait_for(
        "the release",
        WAIT,
        || (state(root), root.join(LOCK).exists()),
        |(s, locked)| !*locked && s["hold"].is_null(),
    );
    t.mark("agent: overlay staged → lock removed, update released");
    assert_eq!(seen.0["last-stage"]["result"], "staged", "{}", daemon.log());
}

/// An administrator's own finalization lock (`rpm-ostree deploy --lock-finalization`) is never
/// the agent's to remove.
#[test]
fn an_administrators_lock_is_left_alone() {
    let host = fcos_host("hold");
    let root = host.dir.path();
    publish_overlay(root, NEXT);
    std::fs::create_dir_all(root.join("run/ostree")).unwrap();
    std::fs::write(root.join(LOCK), "").unwrap();
    let next = host.commit_kernel(NEXT);
    host.stage(&next);
    let out = agent::run(root, &["stage", "--now"]);
    assert!(out.status.success(), "{}", agent::text(&out));
    assert_eq!(state(root)["last-stage"]["result"], "staged");
    assert!(
        root.join(LOCK).exists(),
        "the administrator's lock was removed"
    );
}

/// rpm-ostree's D-Bus signals are hints that make the daemon look again: an overlay that shows
/// up at a source (no file-system event the daemon watches) is staged on the next
/// `PropertiesChanged` from rpm-ostree, without waiting for the retry timer.
#[test]
fn rpm_ostree_signals_make_the_daemon_look_again() {
    use crate::common::bus::{RpmOstreePeer, TestBus};
    let bus = TestBus::start();
    let rpm_ostree = RpmOstreePeer::start(&bus);
    let host = fcos_host("warn");
    let root = host.dir.path();
    let daemon = Daemon::start(root, |c| bus.env(c));
    let next = host.commit_kernel(NEXT);
    let staged = host.stage(&next);
    wait_for(
        "the overlay to be reported missing",
        WAIT,
        || state(root),
        |s| s["last-stage"]["result"] == "missing",
    );
    publish_overlay(root, NEXT);
    rpm_ostree.emit_deployments_changed(&[&staged.name()]);
    wait_for(
        "the daemon to stage after the signal",
        WAIT,
        || state(root),
        |s| s["last-stage"]["result"] == "staged",
    );
    assert!(
        daemon.log().contains("rpm-ostree signal"),
        "{}",
        daemon.log()
    );
}

/// The next kernel's signature policy is read from its own tree, which on ostree is in the
/// staged deployment (the running root has no `/usr/lib/modules/<next>`): a kernel built with
/// `CONFIG_MODULE_SIG_FORCE=y` gets no unsigned overlay staged for it.
#[test]
fn the_next_kernels_config_in_the_staged_deployment_is_honoured() {
    let host = fcos_host("warn");
    let root = host.dir.path();
    publish_overlay(root, NEXT);
    let next = host.commit_tree(|tree| {
        let modules = tree.join("usr/lib/modules").join(NEXT);
        std::fs::create_dir_all(&modules).unwrap();
        for (name, text) in [
            ("vmlinuz", format!("kernel {NEXT}\n")),
            ("initramfs.img", format!("initramfs {NEXT}\n")),
            ("modules.dep", String::new()),
            (
                "config",
                "CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\n".into(),
            ),
        ] {
            std::fs::write(modules.join(name), text).unwrap();
        }
    });
    host.stage(&next);
    assert!(!root.join(format!("usr/lib/modules/{NEXT}")).exists());

    let out = agent::run(root, &["stage", "--now"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(4), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("CONFIG_MODULE_SIG_FORCE"),
        "{stdout}{stderr}"
    );
    assert!(!root
        .join(format!("var/lib/nvdriver-agent/overlays/{NEXT}"))
        .exists());
}

/// On ostree the hold is the finalization lock *and* a logind block inhibitor: Zincati stages
/// with `--lock-finalization` (the lock is then Zincati's, never ours to claim or remove) and
/// later runs `rpm-ostree finalize-deployment`, which rpm-ostreed refuses while a `shutdown`
/// block inhibitor exists (rpm-ostree src/daemon/rpmostreed-transaction-types.cxx
/// `finalize_deployment_transaction_execute` → `check_sd_inhibitor_locks`, before unlocking).
#[test]
fn hold_on_ostree_adds_the_inhibitor_that_stops_zincatis_finalize() {
    use crate::common::bus::{LogindPeer, TestBus};
    for zincati_locked in [false, true] {
        let bus = TestBus::start();
        let logind = LogindPeer::start(&bus);
        let host = fcos_host("hold");
        let root = host.dir.path();
        if zincati_locked {
            std::fs::create_dir_all(root.join("run/ostree")).unwrap();
            std::fs::write(root.join(LOCK), "").unwrap();
        }
        let daemon = Daemon::start(root, |c| bus.env(c));
        let next = host.commit_kernel(NEXT);
        host.stage(&next);
        let (held, s) = wait_for(
            "the hold",
            WAIT,
            || (logind.active_inhibitors(), state(root)),
            |(held, s)| held.len() == 1 && !s["hold"].is_null() && !s["last-stage"].is_null(),
        );
        assert!(held[0].starts_with("shutdown|nvdriver-agent|"), "{held:?}");
        let levers = if zincati_locked {
            serde_json::json!(["logind-shutdown-inhibitor"])
        } else {
            serde_json::json!(["ostree-finalization-lock", "logind-shutdown-inhibitor"])
        };
        assert_eq!(s["hold"]["levers"], levers, "{s:#}\n{}", daemon.log());
        assert!(root.join(LOCK).exists());

        publish_overlay(root, NEXT);
        let out = agent::run(root, &["stage"]);
        assert!(out.status.success(), "{}", agent::text(&out));
        wait_for(
            "the release",
            WAIT,
            || (logind.active_inhibitors(), state(root)),
            |(held, s)| held.is_empty() && s["hold"].is_null(),
        );
        // Zincati's lock stays Zincati's; ours is gone.
        assert_eq!(root.join(LOCK).exists(), zincati_locked, "{}", daemon.log());
    }
}

/// The shutdown stage (`ExecStop=… stage --now`) of a held ostree update: the lock keeps the
/// next boot on this deployment, which has its driver, so it exits 0 saying so (exit 3 would
/// mark the unit failed at every held reboot). Without the hold, a missing overlay is exit 3.
#[test]
fn shutdown_stage_of_a_held_ostree_update_exits_0_saying_held() {
    for (policy, code, says) in [
        (
            "hold",
            0,
            "held: ostree will not finalize the staged deployment",
        ),
        ("warn", 3, "missing"),
    ] {
        let host = fcos_host(policy);
        let root = host.dir.path();
        let next = host.commit_kernel(NEXT);
        host.stage(&next);
        let out = agent::run(root, &["stage", "--now"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{policy}: {stdout}{stderr}");
        assert!(stdout.contains(says), "{policy}: {stdout}{stderr}");
        assert_eq!(root.join(LOCK).exists(), policy == "hold", "{policy}");
    }
}

//! The host failing under the agent: the store's file system full mid-stage (a 1 MiB tmpfs),
//! a read-only `/etc` (a tmpfs remounted read-only), no `/run` at all. Mounting needs root;
//! without it the first two print why they are skipped.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::agent::text;
use crate::common::archive::{overlay_archive, Compression, ManifestAt};
use crate::common::host::{snapshot_dir, FakeHost};
use crate::common::modules::FixtureModule;
use crate::common::overlay::{OverlayBuilder, Packing, DRIVER};
use nvdriver_agent::fsutil::TEMP_PREFIX;
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";
const NEXT: &str = "6.1.0-29-cloud-amd64";
const STORE: &str = "/var/lib/nvdriver-agent/overlays";

/// A tmpfs mounted at `at` for the guard's life.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &Path, options: &str) -> Option<Mount> {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: cannot mount a tmpfs ({}); run the tests as root",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Mount(at.to_path_buf()))
    }

    fn read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn configured_host() -> FakeHost {
    let host = FakeHost::new(KVER);
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!(
            "[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"/srv/{{kernel}}.tar.zst\"]\n"
        ),
    );
    host
}

#[test]
fn disk_full_during_staging_leaves_the_store_as_it_was() {
    let host = configured_host();
    // Two MiB of module that zstd cannot shrink, for a store of one MiB.
    let builder = OverlayBuilder::nvidia(NEXT).module(
        FixtureModule::new("nvidia", NEXT, DRIVER).padded(2 << 20, 2 << 20, 7),
        Packing::Plain,
    );
    let (archive, _) = overlay_archive(&builder, Compression::Zstd, ManifestAt::First);
    host.write_bytes(&format!("/srv/{NEXT}.tar.zst"), &archive);
    let Some(_store_fs) = Mount::tmpfs(&host.path("/var/lib/nvdriver-agent"), "size=1m") else {
        return;
    };
    let before = snapshot_dir(host.dir.path());
    let out = crate::common::agent::run(host.dir.path(), &["stage", "--now", "--kernel", NEXT]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("No space left on device"), "{}", text(&out));
    assert!(!stderr.contains("panicked"), "{}", text(&out));
    let store = Store::new(&host.root, STORE);
    assert!(store.kernel_releases().unwrap().is_empty());
    // Only the store's lock and the agent's own state may be new; no partial overlay.
    let after: Vec<_> = snapshot_dir(host.dir.path())
        .into_iter()
        .filter(|(p, _)| !p.ends_with(".lock") && !p.starts_with("run/nvdriver-agent"))
        .filter(|(p, _)| p != Path::new("var/lib/nvdriver-agent/overlays"))
        .filter(|(p, _)| p != Path::new("run"))
        .collect();
    for (path, _) in &after {
        assert!(
            !path.to_string_lossy().contains(TEMP_PREFIX),
            "leftover {path:?}"
        );
    }
    assert_eq!(before, after);
}

#[test]
fn read_only_etc_is_a_clear_error_and_changes_nothing() {
    let host = configured_host();
    host.import(&OverlayBuilder::nvidia(KVER).with_userspace());
    let toolkit_dir = host.path("/etc/nvidia-container-runtime");
    let Some(etc) = Mount::tmpfs(&toolkit_dir, "size=1m") else {
        return;
    };
    let old = "[nvidia-container-cli]\nroot = \"/\"\n";
    fs::write(toolkit_dir.join("config.toml"), old).unwrap();
    etc.read_only();
    let out = crate::common::agent::run(host.dir.path(), &["load"]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config.toml") && stderr.contains("Read-only file system"),
        "{}",
        text(&out)
    );
    assert!(!stderr.contains("panicked"), "{}", text(&out));
    assert_eq!(
        fs::read_to_string(toolkit_dir.join("config.toml")).unwrap(),
        old
    );
}

#[test]
fn missing_run_is_created_as_needed() {
    let host = configured_host();
    host.import(&OverlayBuilder::nvidia(KVER));
    let _ = fs::remove_dir_all(host.path("/run"));
    let out = crate::common::agent::run(host.dir.path(), &["load"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        host.read("/run/nvdriver-agent/simulated-kernel.log")
            .contains("finit-module"),
        "{}",
        text(&out)
    );
}

/// A bind mount at `target` of `source` for the guard's life (lazily unmounted at the end).
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> Option<BindMount> {
        fs::create_dir_all(target).unwrap();
        let out = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: cannot bind-mount ({}); run the tests as root",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(BindMount(target.to_path_buf()))
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Importing a rebuilt overlay for the running kernel while its old copy is bind-mounted at the
/// driver root (as `load` mounts it at /run/nvidia/driver) must leave the mounted tree whole:
/// the old copy is retired, not deleted, and removed only once nothing mounts it.
#[test]
fn replacing_the_mounted_overlay_keeps_the_live_driver_root() {
    use nvdriver_agent::host::Root;
    use nvdriver_agent::overlay::store::RETIRED_PREFIX;
    let tmp = tempfile::tempdir().unwrap();
    // The real root: the kernel's own /proc/self/mountinfo is what the store reads.
    let root = Root::new("/");
    let store_dir = tmp.path().join("store");
    let store = Store::new(&root, &store_dir);
    let old = tmp.path().join("old");
    let old_manifest = OverlayBuilder::nvidia(KVER).build(&old);
    store.import(&old).unwrap();
    let overlay = store_dir.join(KVER).join(DRIVER);
    let driver_root = tmp.path().join("run/nvidia/driver");
    let Some(mount) = BindMount::new(&overlay, &driver_root) else {
        return;
    };
    let live_before = snapshot_dir(&driver_root);
    assert!(!live_before.is_empty());

    let rebuilt = tmp.path().join("rebuilt");
    let new_manifest = OverlayBuilder::nvidia(KVER)
        .with_userspace()
        .build(&rebuilt);
    assert_ne!(old_manifest, new_manifest);
    let outcome = store.import(&rebuilt).unwrap();
    assert!(format!("{outcome:?}").contains("Replaced"), "{outcome:?}");

    // The driver root still shows the old tree, whole; the store's name the new one.
    assert_eq!(snapshot_dir(&driver_root), live_before);
    let (in_store, _) = nvdriver_agent::overlay::store::read_manifest(&overlay).unwrap();
    assert_eq!(in_store, new_manifest);
    let retired = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(RETIRED_PREFIX))
            .collect()
    };
    assert_eq!(retired(&store_dir.join(KVER)).len(), 1);
    // It is not a driver version, and a clean while it is mounted keeps it.
    assert_eq!(store.driver_versions(KVER).unwrap(), [DRIVER]);
    let lock = store.lock().unwrap();
    store.clean_leftovers(&lock).unwrap();
    assert_eq!(snapshot_dir(&driver_root), live_before);
    assert_eq!(retired(&store_dir.join(KVER)).len(), 1);

    // The next load moves the mount to the new copy; the next clean removes the old one.
    drop(mount);
    store.clean_leftovers(&lock).unwrap();
    assert!(retired(&store_dir.join(KVER)).is_empty());
    assert_eq!(store.driver_versions(KVER).unwrap(), [DRIVER]);
}

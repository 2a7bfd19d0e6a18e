//! The host failing under the agent: the store's file system too small for a stage (a 1 MiB
//! tmpfs: refused before writing), reaching its reserve mid-unpack (stopped, nothing left), a
//! full `/var` at boot (load and the daemon work, staging is refused), a read-only `/etc` (a
//! tmpfs remounted read-only), no `/run` at all. Mounting needs root; without it the tests
//! that mount print why they are skipped.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::agent::text;
use crate::common::archive::{overlay_archive, Compression, ManifestAt};
use crate::common::host::{snapshot_dir, FakeHost, TEST_RESERVE_DROP_IN};
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

/// A host with the shipped disk reserve (the larger of 10 % and 1 GiB): every store here is a
/// tmpfs of a few MiB.
fn configured_host() -> FakeHost {
    let host = FakeHost::new(KVER);
    fs::remove_file(host.path(TEST_RESERVE_DROP_IN)).unwrap();
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!(
            "[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"/srv/{{kernel}}.tar.zst\"]\n"
        ),
    );
    host
}

/// Only the store's lock, its (empty) directory and the agent's own state in /run may be new
/// after a refused stage; no temporary (partial) entry anywhere.
fn assert_nothing_left(host: &FakeHost, before: &[(std::path::PathBuf, String)]) {
    let store = Store::new(&host.root, STORE);
    let after: Vec<_> = snapshot_dir(host.dir.path())
        .into_iter()
        .filter(|(p, _)| !p.ends_with(".lock") && !p.starts_with("run/nvdriver-agent"))
        .filter(|(p, _)| p != Path::new("var/lib/nvdriver-agent/overlays"))
        .filter(|(p, _)| p != Path::new("run"))
        .filter(|(p, _)| !p.starts_with("var/lib/nvdriver-agent/overlays/.downloads"))
        .collect();
    for (path, _) in &after {
        assert!(
            !path.to_string_lossy().contains(TEMP_PREFIX),
            "leftover {path:?}"
        );
    }
    assert_eq!(before, after.as_slice());
    assert!(store.kernel_releases().unwrap().iter().all(|k| k != NEXT));
}

/// Fill the file system holding `dir` to the last byte (until `ENOSPC`).
fn fill(dir: &Path) {
    use std::io::Write;
    let mut file = fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    // Smaller writes for the last partial chunk's worth.
    while file.write(&[0x5a]).is_ok_and(|n| n == 1) {}
    let space = nvdriver_agent::overlay::space::statvfs(dir).unwrap();
    assert_eq!(space.available, 0, "{} is not full", dir.display());
}

#[test]
fn a_stage_that_does_not_fit_is_refused_before_writing_with_the_numbers() {
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
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The numbers: needed (the archive), free, reserve (the default 1 GiB), the file system.
    let needed = format!(
        "it needs {:.1} MiB ({} bytes)",
        archive.len() as f64 / 1048576.0,
        archive.len()
    );
    assert!(stdout.contains("no-room"), "{}", text(&out));
    assert!(stdout.contains(&needed), "{needed}\n{}", text(&out));
    assert!(
        stdout.contains("1.0 GiB (1073741824 bytes) must stay free"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains(STORE), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    assert_nothing_left(&host, &before);
}

/// A store too full for the next overlay until the overlay of a kernel no longer needed is
/// removed: staging removes it first (keeping the running kernel's) and then fits.
#[test]
fn overlays_no_kernel_needs_make_room_before_staging() {
    const OLD: &str = "6.1.0-27-cloud-amd64";
    let host = configured_host();
    host.write(
        "/etc/nvdriver-agent/config.d/50-reserve.toml",
        "[stage]\nkeep-free-percent = 0\nkeep-free-bytes = 1048576\nkeep-extra = 0\n",
    );
    let next = OverlayBuilder::nvidia(NEXT).module(
        FixtureModule::new("nvidia", NEXT, DRIVER).padded(3 << 20, 0, 11),
        Packing::Plain,
    );
    let (archive, _) = overlay_archive(&next, Compression::Zstd, ManifestAt::First);
    host.write_bytes(&format!("/srv/{NEXT}.tar.zst"), &archive);
    let Some(_store_fs) = Mount::tmpfs(&host.path("/var/lib/nvdriver-agent"), "size=8m") else {
        return;
    };
    host.import(&OverlayBuilder::nvidia(KVER));
    host.import(&OverlayBuilder::nvidia(OLD).module(
        FixtureModule::new("nvidia", OLD, DRIVER).padded(4 << 20, 0, 12),
        Packing::Plain,
    ));
    let store = Store::new(&host.root, STORE);
    let space = nvdriver_agent::overlay::space::statvfs(&host.path(STORE)).unwrap();
    assert!(
        space.available < archive.len() as u64 + (1 << 20),
        "the store must be too full before GC: {space:?}"
    );

    let out = crate::common::agent::run(host.dir.path(), &["stage", "--now", "--kernel", NEXT]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("removed an overlay no kernel needs, to make room"),
        "{}",
        text(&out)
    );
    assert_eq!(store.kernel_releases().unwrap(), [KVER, NEXT]);
    assert!(store.verified(NEXT, DRIVER, "x86_64").is_some());
}

/// A download whose announced size does not fit is refused before its body is written: no
/// part file is left in the store.
#[test]
fn a_download_that_does_not_fit_is_refused_before_its_body() {
    let host = configured_host();
    let server = crate::common::http::HttpServer::start();
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!(
            "[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"{}\"]\nallow-http = true\nkeep-free-percent = 0\nkeep-free-bytes = 1048576\n",
            server.url("/{kernel}.tar.zst")
        ),
    );
    let next = OverlayBuilder::nvidia(NEXT).module(
        FixtureModule::new("nvidia", NEXT, DRIVER).padded(7 << 19, 0, 13),
        Packing::Plain,
    );
    let (archive, _) = overlay_archive(&next, Compression::Zstd, ManifestAt::First);
    server.route(
        &format!("/{NEXT}.tar.zst"),
        crate::common::http::Route::file(archive.clone()),
    );
    let Some(_store_fs) = Mount::tmpfs(&host.path("/var/lib/nvdriver-agent"), "size=4m") else {
        return;
    };
    let out = crate::common::agent::run(host.dir.path(), &["stage", "--now", "--kernel", NEXT]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let expected = format!(
        "not enough room on the file system of {STORE} for the download: it needs 3.5 MiB ({} bytes)",
        archive.len()
    );
    assert!(text(&out).contains(&expected), "{expected}\n{}", text(&out));
    let downloads = host.path(format!("{STORE}/.downloads"));
    let left: Vec<_> = fs::read_dir(&downloads)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in .downloads: {left:?}");
}

/// An archive small as served but large unpacked, with its manifest last (so no total is
/// known before the files): unpacking stops at the reserve and removes what it wrote. With the
/// manifest first the same archive is refused before any file byte is written.
#[test]
fn unpacking_stops_at_the_reserve_and_leaves_nothing() {
    for at in [ManifestAt::Last, ManifestAt::First] {
        let host = configured_host();
        host.write(
            "/etc/nvdriver-agent/config.d/50-reserve.toml",
            "[stage]\nkeep-free-percent = 0\nkeep-free-bytes = 1048576\n",
        );
        // 3 MiB of zeros: a few KiB as zstd, for a 4 MiB store keeping 1 MiB free.
        let builder = OverlayBuilder::nvidia(NEXT).module(
            FixtureModule::new("nvidia", NEXT, DRIVER).padded(0, 3 << 20, 7),
            Packing::Plain,
        );
        let (archive, _) = overlay_archive(&builder, Compression::Zstd, at);
        assert!(archive.len() < 256 << 10, "{}", archive.len());
        host.write_bytes(&format!("/srv/{NEXT}.tar.zst"), &archive);
        let Some(_store_fs) = Mount::tmpfs(&host.path("/var/lib/nvdriver-agent"), "size=4m") else {
            return;
        };
        let before = snapshot_dir(host.dir.path());
        let out = crate::common::agent::run(host.dir.path(), &["stage", "--now", "--kernel", NEXT]);
        assert_eq!(out.status.code(), Some(10), "{at:?}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let expected = match at {
            ManifestAt::Last => "stopped writing the unpacked overlay",
            ManifestAt::First => "for the overlay's files (the manifest's total): it needs 3.0 MiB",
        };
        assert!(stdout.contains(expected), "{at:?}: {}", text(&out));
        assert_nothing_left(&host, &before);
        // The file system was never taken below its reserve.
        let space = nvdriver_agent::overlay::space::statvfs(&host.path(STORE)).unwrap();
        assert!(space.available >= 1 << 20, "{space:?}");
    }
}

/// `overlay import` keeps the store's reserve as staging does: an overlay that does not fit with
/// it is refused before any byte is copied (exit 10, the numbers said), and nothing is left.
#[test]
fn overlay_import_keeps_the_reserve() {
    let host = configured_host();
    host.write(
        "/etc/nvdriver-agent/config.d/50-reserve.toml",
        "[stage]\nkeep-free-percent = 0\nkeep-free-bytes = 1048576\n",
    );
    let overlay = host.path("/srv/import");
    OverlayBuilder::nvidia(NEXT)
        .module(
            FixtureModule::new("nvidia", NEXT, DRIVER).padded(0, 3 << 20, 7),
            Packing::Plain,
        )
        .build(&overlay);
    let Some(_store_fs) = Mount::tmpfs(&host.path("/var/lib/nvdriver-agent"), "size=4m") else {
        return;
    };
    let before = snapshot_dir(host.dir.path());
    let out = crate::common::agent::run(
        host.dir.path(),
        &["overlay", "import", overlay.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert!(text(&out).contains("it needs 3.0 MiB"), "{}", text(&out));
    assert_nothing_left(&host, &before);
}

/// At boot on a full /var: `load` loads the running kernel's overlay and the daemon comes up
/// (they write only /run and small files), the daemon's stage for a new kernel and a manual
/// `stage` are refused for lack of room, and nothing is left behind.
#[test]
fn a_full_disk_still_loads_at_boot_and_refuses_to_stage() {
    if !crate::common::tools::root_or_skip("a_full_disk_still_loads_at_boot_and_refuses_to_stage") {
        return;
    }
    let host = configured_host();
    let Some(_var) = Mount::tmpfs(&host.path("/var"), "size=8m") else {
        return;
    };
    host.import(&OverlayBuilder::nvidia(KVER));
    let next_dir = host.path(format!("/srv/overlays/{NEXT}/{DRIVER}"));
    fs::create_dir_all(&next_dir).unwrap();
    OverlayBuilder::nvidia(NEXT).build(&next_dir);
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!("[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"/srv/overlays/{{kernel}}/{{driver}}\"]\n"),
    );
    host.write("/etc/os-release", "ID=gardenlinux\nNAME=\"Garden Linux\"\n");
    host.write(&format!("/boot/vmlinuz-{KVER}"), "kernel image");
    fill(&host.path("/var"));
    let before = snapshot_dir(host.dir.path());

    let mut daemon = crate::common::agent::Daemon::start(host.dir.path(), |_| {});
    assert_eq!(
        crate::common::agent::state(host.dir.path())["load"]["result"],
        "loaded",
        "{}",
        daemon.log()
    );
    assert!(host
        .read("/run/nvdriver-agent/simulated-kernel.log")
        .contains("finit-module"));
    // A kernel package lands: the daemon finds it and cannot stage it.
    host.write(&format!("/usr/lib/modules/{NEXT}/modules.dep"), "");
    host.write(&format!("/boot/vmlinuz-{NEXT}"), "kernel image");
    let record = crate::common::agent::wait_for(
        "the daemon's stage record",
        std::time::Duration::from_secs(20),
        || crate::common::agent::state(host.dir.path()),
        |state| state["last-stage"]["result"] == "no-room",
    );
    let detail = record["last-stage"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("not enough room on the file system of {STORE}")),
        "{record}"
    );
    assert!(daemon.stop().success(), "{}", daemon.log());

    let out = crate::common::agent::run(host.dir.path(), &["stage", "--now", "--kernel", NEXT]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert_var_unchanged(&host, &before);
}

/// The full /var as it was: no partial overlay, download or temporary file. (`/var/run` is
/// `/run` on a real host: the CDI spec's directory is made there, its file cannot be.)
fn assert_var_unchanged(host: &FakeHost, before: &[(std::path::PathBuf, String)]) {
    let var = |snapshot: &[(std::path::PathBuf, String)]| -> Vec<(std::path::PathBuf, String)> {
        snapshot
            .iter()
            .filter(|(p, _)| p.starts_with("var") && !p.starts_with("var/run"))
            .filter(|(p, _)| !p.ends_with(".lock"))
            .cloned()
            .collect()
    };
    let after = var(&snapshot_dir(host.dir.path()));
    for (path, _) in &after {
        assert!(
            !path.to_string_lossy().contains(TEMP_PREFIX),
            "leftover {path:?}"
        );
    }
    assert_eq!(var(before), after);
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

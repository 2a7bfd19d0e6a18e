//! Next-kernel detection on ostree sysroots built by the real `ostree` CLI.

use std::path::{Path, PathBuf};

use crate::common::host::snapshot_dir;
use crate::common::ostree::{staged_record, OstreeSysroot, StagedRecord};
use nvdriver_agent::host::Root;
use nvdriver_agent::watch::ostree::{
    is_ostree_host, next_boot, next_boot_direct, pending_deployment_direct, watch_paths,
    OstreeError,
};
use nvdriver_agent::watch::NextBoot;
use pretty_assertions::assert_eq;

const OLD: &str = "6.11.3-300.fc41.x86_64";
const NEW: &str = "6.12.5-200.fc41.x86_64";
const NEWER: &str = "6.13.1-100.fc42.x86_64";

/// Run the detector the build uses, and with the `ostree` feature also the direct one, and
/// check they agree.
fn detect(sysroot: &OstreeSysroot, running: &str) -> Result<Option<NextBoot>, OstreeError> {
    let chosen = next_boot(&sysroot.root, running);
    let direct = next_boot_direct(&sysroot.root, running);
    assert_eq!(
        format!("{chosen:?}"),
        format!("{direct:?}"),
        "next_boot and next_boot_direct disagree on\n{}",
        sysroot.status()
    );
    chosen
}

fn module_tree(sysroot: &OstreeSysroot, name: &str, kernel: &str) -> PathBuf {
    PathBuf::from(format!(
        "/ostree/deploy/{}/deploy/{name}/usr/lib/modules/{kernel}",
        sysroot.stateroot
    ))
}

#[test]
fn a_second_deployment_with_a_new_kernel_is_the_next_boot() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let new = sysroot.deploy(&sysroot.commit_kernel(NEW));

    let next = detect(&sysroot, OLD).unwrap().expect("a new kernel");
    assert_eq!(
        next,
        NextBoot {
            kernel_release: NEW.to_string(),
            origin: format!("ostree default deployment fedora-coreos {}", new.name()),
            module_tree: Some(module_tree(&sysroot, &new.name(), NEW)),
            staged_deployment: false,
        }
    );
    let tree = next.module_tree.unwrap();
    assert!(sysroot.root.join(tree.join("vmlinuz")).is_file());
}

#[test]
fn one_deployment_running_its_own_kernel_is_nothing_new() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    assert_eq!(detect(&sysroot, OLD).unwrap(), None);
    // The same sysroot seen from another kernel does name it.
    assert_eq!(detect(&sysroot, NEW).unwrap().unwrap().kernel_release, OLD);
}

#[test]
fn undeploying_the_default_rolls_back_to_the_previous_kernel() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    let old = sysroot.deploy(&sysroot.commit_kernel(OLD));
    sysroot.deploy(&sysroot.commit_kernel(NEW));
    assert_eq!(detect(&sysroot, OLD).unwrap().unwrap().kernel_release, NEW);

    sysroot.undeploy(0);
    let next = detect(&sysroot, NEW).unwrap().expect("the rollback kernel");
    assert_eq!(next.kernel_release, OLD);
    assert!(next.origin.ends_with(&old.name()), "{}", next.origin);
    assert_eq!(detect(&sysroot, OLD).unwrap(), None);
}

#[test]
fn a_deployment_added_not_as_default_does_not_boot_next() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    sysroot.deploy_not_as_default(&sysroot.commit_kernel(NEWER));
    assert_eq!(sysroot.deployment_names().len(), 2);
    assert_eq!(detect(&sysroot, OLD).unwrap(), None);
    assert_eq!(detect(&sysroot, NEW).unwrap().unwrap().kernel_release, OLD);
}

#[test]
fn redeploying_a_commit_takes_the_next_serial() {
    let sysroot = OstreeSysroot::new("rhcos");
    let commit = sysroot.commit_kernel(NEW);
    sysroot.deploy(&commit);
    let again = sysroot.deploy(&commit);
    assert_eq!(again.serial, 1);
    let next = detect(&sysroot, OLD).unwrap().unwrap();
    assert_eq!(
        next.origin,
        format!("ostree default deployment rhcos {commit}.1")
    );
}

#[test]
fn a_staged_deployment_is_preferred_over_the_default() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let staged = sysroot.stage(&sysroot.commit_kernel(NEW));
    // The staged deployment is on disk but in no bootloader entry.
    let entries = std::fs::read_dir(sysroot.path("/boot/loader/entries"))
        .unwrap()
        .count();
    assert_eq!(entries, 1);

    let next = detect(&sysroot, OLD).unwrap().expect("the staged kernel");
    assert_eq!(
        next,
        NextBoot {
            kernel_release: NEW.to_string(),
            origin: format!("ostree staged deployment fedora-coreos {}", staged.name()),
            module_tree: Some(module_tree(&sysroot, &staged.name(), NEW)),
            staged_deployment: true,
        }
    );
    // Staged and running the same kernel: nothing to stage, even though the default differs.
    assert_eq!(detect(&sysroot, NEW).unwrap(), None);
}

#[test]
fn a_deployment_without_usr_lib_modules_is_a_clear_error() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let legacy = sysroot.deploy(&sysroot.commit_legacy_kernel(NEW));
    assert!(!sysroot
        .deploy_dir()
        .join(legacy.name())
        .join("usr/lib/modules")
        .exists());

    let err = detect(&sysroot, OLD).unwrap_err();
    assert!(matches!(err, OstreeError::NoModuleTree { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&legacy.name()), "{message}");
    assert!(
        message.contains("usr/lib/modules/<kernel release>/vmlinuz"),
        "{message}"
    );
}

#[test]
fn a_deployment_with_two_kernels_is_a_clear_error() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    let commit = sysroot.commit_tree(|tree| {
        for kernel in [OLD, NEW] {
            let dir = tree.join("usr/lib/modules").join(kernel);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("vmlinuz"), kernel).unwrap();
        }
    });
    sysroot.deploy(&commit);
    let err = detect(&sysroot, OLD).unwrap_err();
    assert!(matches!(err, OstreeError::SeveralKernels { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("{OLD}, {NEW}")), "{err}");
}

#[test]
fn a_staged_record_naming_a_missing_deployment_is_a_clear_error() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let gone = format!("{}.0", "ab".repeat(32));
    sysroot.write_staged_record(&staged_record(&StagedRecord {
        name: gone.clone(),
        osname: "fedora-coreos".into(),
        bootcsum: "cd".repeat(32),
        locked: None,
    }));
    let err = detect(&sysroot, OLD).unwrap_err();
    assert!(
        matches!(err, OstreeError::DeploymentMissing { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("staged deployment"), "{message}");
    assert!(message.contains(&gone), "{message}");
    assert!(
        message.contains("/run/ostree/staged-deployment"),
        "{message}"
    );
}

#[test]
fn a_damaged_staged_record_is_an_error_and_changes_nothing() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    sysroot.stage(&sysroot.commit_kernel(NEW));
    let good = std::fs::read(sysroot.path("/run/ostree/staged-deployment")).unwrap();
    sysroot.write_staged_record(&good[..good.len() - 3]);
    let before = snapshot_dir(sysroot.dir.path());

    let err = next_boot_direct(&sysroot.root, OLD).unwrap_err();
    assert!(
        matches!(err, OstreeError::StagedDeployment { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("/run/ostree/staged-deployment"),
        "{err}"
    );
    assert_eq!(snapshot_dir(sysroot.dir.path()), before);
}

#[test]
fn a_staged_record_whose_name_climbs_out_is_refused() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    sysroot.write_staged_record(&staged_record(&StagedRecord {
        name: "abc.0".into(),
        osname: "..".into(),
        bootcsum: "ff".into(),
        locked: None,
    }));
    let err = next_boot_direct(&sysroot.root, OLD).unwrap_err();
    assert!(err.to_string().contains("not a stateroot name"), "{err}");
}

#[test]
fn the_booted_layout_reads_the_same() {
    let sysroot = OstreeSysroot::booted_layout("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let new = sysroot.deploy(&sysroot.commit_kernel(NEW));
    let next = detect(&sysroot, OLD).unwrap().unwrap();
    assert_eq!(next.kernel_release, NEW);
    assert_eq!(
        next.module_tree,
        Some(module_tree(&sysroot, &new.name(), NEW))
    );
}

#[test]
fn an_empty_sysroot_has_no_deployment_to_boot() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    let err = detect(&sysroot, OLD).unwrap_err();
    assert!(matches!(err, OstreeError::NoDeployment { .. }), "{err:?}");
}

#[test]
fn ostree_hosts_are_recognised() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    assert!(is_ostree_host(&sysroot.root));
    let plain = tempfile::tempdir().unwrap();
    let plain_root = Root::new(plain.path());
    assert!(!is_ostree_host(&plain_root));
    std::fs::create_dir_all(plain_root.join("/run")).unwrap();
    std::fs::write(plain_root.join("/run/ostree-booted"), "").unwrap();
    assert!(is_ostree_host(&plain_root));
}

#[test]
fn watch_paths_name_the_directories_that_change() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    std::fs::create_dir(sysroot.path("/run")).unwrap();
    let paths = |s: &OstreeSysroot| -> Vec<String> {
        watch_paths(&s.root)
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    };
    // Nothing staged since "boot": /run/ostree does not exist yet, so /run is watched.
    assert_eq!(
        paths(&sysroot),
        [
            "/ostree/deploy",
            "/ostree/deploy/fedora-coreos/deploy",
            "/run",
            "/boot"
        ]
    );
    sysroot.stage(&sysroot.commit_kernel(NEW));
    assert!(paths(&sysroot).contains(&"/run/ostree".to_string()));
}

/// ostree announces every change to the deployments by bumping the mtime of `/ostree/deploy`
/// itself (`_ostree_sysroot_bump_mtime` in ostree's `src/libostree/ostree-sysroot.c`:
/// `utimensat (self->sysroot_fd, "ostree/deploy", NULL, 0)`, "Allow other systems to monitor
/// for changes"); that is an IN_ATTRIB on the directory, with no name. The daemon's watcher must
/// wake up for it.
#[test]
fn the_deploy_mtime_bump_wakes_the_watcher() {
    use std::sync::mpsc;
    use std::time::Duration;

    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let (tx, rx) = mpsc::channel();
    let root = sysroot.root.clone();
    nvdriver_agent::watch::fswatch::spawn(
        sysroot.root.clone(),
        move || watch_paths(&root),
        move |changed| {
            let _ = tx.send(changed);
        },
    )
    .unwrap();
    // What ostree does after a deploy, an undeploy or a cleanup, and nothing else.
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &sysroot.path("/ostree/deploy"),
        &nix::sys::time::TimeSpec::UTIME_NOW,
        &nix::sys::time::TimeSpec::UTIME_NOW,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "no wake-up for the mtime bump of /ostree/deploy"
    );
}

#[test]
fn a_deploy_is_seen_by_the_watches() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let commit = sysroot.commit_kernel(NEW);

    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    let mask = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE;
    let mut watches = Vec::new();
    for path in watch_paths(&sysroot.root) {
        let wd = inotify.add_watch(&sysroot.root.join(&path), mask).unwrap();
        watches.push((wd, path));
    }
    // What a naive watch on the loader symlink (followed to loader.N) would see.
    let naive = inotify
        .add_watch(&sysroot.path("/boot/loader"), mask)
        .unwrap();

    let new = sysroot.deploy(&commit);

    let mut seen: Vec<(PathBuf, String, AddWatchFlags)> = Vec::new();
    let mut naive_seen = Vec::new();
    while let Ok(events) = inotify.read_events() {
        for event in events {
            let name = event
                .name
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if event.wd == naive {
                naive_seen.push((name.clone(), event.mask));
            }
            if let Some((_, path)) = watches.iter().find(|(wd, _)| *wd == event.wd) {
                seen.push((path.clone(), name, event.mask));
            }
        }
    }
    let saw = |dir: &str, name: &str, flag: AddWatchFlags| {
        seen.iter()
            .any(|(p, n, m)| p == Path::new(dir) && n == name && m.contains(flag))
    };
    assert!(
        saw("/boot", "loader", AddWatchFlags::IN_MOVED_TO),
        "the loader symlink swap: {seen:#?}"
    );
    assert!(
        saw(
            "/ostree/deploy/fedora-coreos/deploy",
            &new.name(),
            AddWatchFlags::IN_CREATE
        ),
        "the new deployment directory: {seen:#?}"
    );
    assert!(
        saw("/ostree/deploy", "", AddWatchFlags::IN_ATTRIB),
        "libostree's mtime bump: {seen:#?}"
    );
    // The naive watch only saw its directory deleted after the swap, which ended it.
    assert!(
        naive_seen
            .iter()
            .all(|(_, m)| !m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)),
        "{naive_seen:?}"
    );
    assert!(
        naive_seen
            .iter()
            .any(|(_, m)| m.contains(AddWatchFlags::IN_IGNORED)),
        "{naive_seen:?}"
    );
}

#[test]
fn pending_deployment_names_what_it_was_read_from() {
    let sysroot = OstreeSysroot::new("fedora-coreos");
    sysroot.deploy(&sysroot.commit_kernel(OLD));
    let pending = pending_deployment_direct(&sysroot.root).unwrap();
    assert!(!pending.staged);
    let entry = pending.named_by.display().to_string();
    assert!(
        entry.starts_with("/boot/loader/entries/ostree-") && entry.ends_with(".conf"),
        "{entry}"
    );
}

/// The direct reader and libostree, side by side on every kind of sysroot above.
#[cfg(feature = "ostree")]
mod libostree {
    use super::*;
    use crate::common::ostree::staged_record_glib;
    use nvdriver_agent::watch::ostree::{
        next_boot_libostree, pending_deployment_libostree, read_staged_deployment_glib,
    };
    use pretty_assertions::assert_eq;

    fn agree(sysroot: &OstreeSysroot) {
        for running in [OLD, NEW, NEWER] {
            let direct = next_boot_direct(&sysroot.root, running);
            let libostree = next_boot_libostree(&sysroot.root, running);
            assert_eq!(
                format!("{direct:?}"),
                format!("{libostree:?}"),
                "running {running} on\n{}",
                sysroot.status()
            );
        }
        let direct = pending_deployment_direct(&sysroot.root).unwrap();
        let libostree = pending_deployment_libostree(&sysroot.root).unwrap();
        assert_eq!(
            (&direct.id, &direct.dir, direct.staged),
            (&libostree.id, &libostree.dir, libostree.staged)
        );
    }

    #[test]
    fn direct_and_libostree_agree() {
        let two = OstreeSysroot::new("fedora-coreos");
        two.deploy(&two.commit_kernel(OLD));
        two.deploy(&two.commit_kernel(NEW));
        agree(&two);
        two.undeploy(0);
        agree(&two);
        two.deploy_not_as_default(&two.commit_kernel(NEWER));
        agree(&two);
        two.stage(&two.commit_kernel(NEW));
        agree(&two);

        let booted = OstreeSysroot::booted_layout("rhcos");
        booted.deploy(&booted.commit_kernel(NEWER));
        agree(&booted);
        booted.stage(&booted.commit_kernel(OLD));
        agree(&booted);
    }

    #[test]
    fn the_fixture_writes_staged_records_byte_for_byte_as_glib() {
        for record in [
            StagedRecord {
                name: format!("{}.0", "0123456789abcdef".repeat(4)),
                osname: "fedora-coreos".into(),
                bootcsum: "fedcba9876543210".repeat(4),
                locked: None,
            },
            StagedRecord {
                name: "abc.12".into(),
                osname: "rhcos".into(),
                bootcsum: "ff".into(),
                locked: Some(true),
            },
            // Long enough for two-byte framing offsets.
            StagedRecord {
                name: format!("{}.3", "a".repeat(300)),
                osname: "x".repeat(200),
                bootcsum: "b".repeat(64),
                locked: Some(false),
            },
        ] {
            assert_eq!(
                staged_record(&record),
                staged_record_glib(&record),
                "{record:?}"
            );
        }
    }

    #[test]
    fn glib_and_the_direct_reader_decode_the_record_alike() {
        let sysroot = OstreeSysroot::new("fedora-coreos");
        sysroot.deploy(&sysroot.commit_kernel(OLD));
        sysroot.write_staged_record(&staged_record_glib(&StagedRecord {
            name: "abc.7".into(),
            osname: "fedora-coreos".into(),
            bootcsum: "ff".into(),
            locked: Some(true),
        }));
        let direct = nvdriver_agent::watch::ostree::read_staged_deployment(&sysroot.root)
            .unwrap()
            .unwrap();
        let glib = read_staged_deployment_glib(&sysroot.root).unwrap().unwrap();
        assert_eq!(direct, glib);
        assert!(direct.locked);
        assert_eq!(direct.target.serial, 7);
    }
}

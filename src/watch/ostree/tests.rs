use super::*;

#[test]
fn strverscmp_orders_like_glibc() {
    // The ordering glibc's strverscmp(3) documents, smallest first.
    let documented = ["000", "00", "01", "010", "09", "0", "1", "9", "10"];
    for (i, a) in documented.iter().enumerate() {
        for (j, b) in documented.iter().enumerate() {
            assert_eq!(strverscmp(a, b), i.cmp(&j), "{a} vs {b}");
        }
    }
    assert_eq!(strverscmp("2", "10"), Ordering::Less);
    assert_eq!(strverscmp("ostree-10", "ostree-9"), Ordering::Greater);
    assert_eq!(strverscmp("1.2.10", "1.2.9"), Ordering::Greater);
    assert_eq!(strverscmp("abc", "abd"), Ordering::Less);
    assert_eq!(strverscmp("", ""), Ordering::Equal);
    assert_eq!(strverscmp("1", ""), Ordering::Greater);
}

/// What ostree 2022.7 writes for the default deployment of two (`ostree admin deploy`).
const DEFAULT_ENTRY: &str = "title fedora (ostree:0)\nversion 2\noptions root=/dev/vda ostree=/ostree/boot.0/fcos/4879e2a59e50ebdf356f5d60f12b0b73e3d476b824a9fae5960c973d5e53837d/0\nlinux /ostree/fcos-4879e2a5/vmlinuz-6.1.0-2\ninitrd /ostree/fcos-4879e2a5/initramfs-6.1.0-2.img\n";

#[test]
fn boot_entry_fields() {
    let entry = parse_boot_entry(DEFAULT_ENTRY);
    assert_eq!(entry.version.as_deref(), Some("2"));
    assert_eq!(
        entry.ostree_arg.as_deref(),
        Some("/ostree/boot.0/fcos/4879e2a59e50ebdf356f5d60f12b0b73e3d476b824a9fae5960c973d5e53837d/0")
    );
    let odd =
        parse_boot_entry("# comment\n\n  version\t7 \noptions quiet\noptions a ostree=/x b\n");
    assert_eq!(odd.version.as_deref(), Some("7"));
    assert_eq!(
        odd.ostree_arg.as_deref(),
        Some("/x"),
        "the last options line wins"
    );
    assert_eq!(parse_boot_entry("title x\n"), BootEntry::default());
}

#[test]
fn default_entry_has_the_highest_version() {
    let entry = |v: Option<&str>| BootEntry {
        version: v.map(str::to_string),
        ostree_arg: None,
    };
    let entries = [
        entry(Some("9")),
        entry(None),
        entry(Some("10")),
        entry(Some("2")),
    ];
    assert_eq!(default_entry(&entries), Some(2));
    assert_eq!(default_entry(&[entry(None), entry(Some("1"))]), Some(1));
    assert_eq!(default_entry(&[]), None);
}

#[test]
fn bootlinks() {
    assert_eq!(
        parse_bootlink("/ostree/boot.1/fedora-coreos/abc123/0"),
        Some(Bootlink {
            bootversion: 1,
            stateroot: "fedora-coreos".into(),
            bootcsum: "abc123".into(),
            treebootserial: 0,
        })
    );
    assert_eq!(
        parse_bootlink("/ostree/boot.0/rhcos/ff/12").unwrap().path(),
        Path::new("/ostree/boot.0/rhcos/ff/12")
    );
    for bad in [
        "/ostree/boot.2/os/c/0",
        "/ostree/boot.0/os/c",
        "/ostree/boot.0/os/c/0/extra",
        "/ostree/boot.0/../c/0",
        "/ostree/boot.0/os/c/x",
        "ostree/boot.0/os/c/0",
        "/ostree/boot.0//c/0",
    ] {
        assert_eq!(parse_bootlink(bad), None, "{bad}");
    }
}

#[test]
fn deployment_names() {
    assert_eq!(
        parse_deployment_name("d0b5b0a3.0"),
        Some(("d0b5b0a3".to_string(), 0))
    );
    assert_eq!(
        parse_deployment_name("abc.12"),
        Some(("abc".to_string(), 12))
    );
    for bad in [
        "abc",
        "ABC.0",
        "abc.",
        ".0",
        "abc.0.origin",
        "xyz.0",
        "abc.-1",
    ] {
        assert_eq!(parse_deployment_name(bad), None, "{bad}");
    }
    let id = DeploymentId {
        stateroot: "fcos".into(),
        csum: "abc".into(),
        serial: 1,
    };
    assert_eq!(id.dir(), Path::new("/ostree/deploy/fcos/deploy/abc.1"));
}

#[test]
fn kernel_release_is_the_one_directory_with_a_vmlinuz() {
    let modules = Path::new("/ostree/deploy/fcos/deploy/abc.0/usr/lib/modules");
    let entry = |name: &str, has_vmlinuz| ModulesDirEntry {
        name: name.into(),
        has_vmlinuz,
    };
    assert_eq!(
        pick_kernel_release(modules, &[entry("6.1.0-2", true), entry("extra", false)]).unwrap(),
        "6.1.0-2"
    );
    let none = pick_kernel_release(modules, &[entry("extra", false)]).unwrap_err();
    assert!(matches!(none, OstreeError::NoKernel { .. }), "{none}");
    assert!(
        none.to_string().contains("only extra without one"),
        "{none}"
    );
    let empty = pick_kernel_release(modules, &[]).unwrap_err();
    assert!(empty.to_string().contains("an empty directory"), "{empty}");
    let several =
        pick_kernel_release(modules, &[entry("6.2", true), entry("6.1", true)]).unwrap_err();
    assert!(several.to_string().contains("6.1, 6.2"), "{several}");
}

/// `{'target': <{'name': <'abc.1'>, 'osname': <'fcos'>, 'bootcsum': <'ff'>}>, 'locked': <true>}`
/// exactly as glib 2.74 serialises it (`g_variant_get_data`, little-endian), 16 bytes a line.
const STAGED_RECORD: &[u8] = b"target\x00\x00name\x00\x00\x00\x00\
    abc.1\x00\x00s\x05\x00\x00\x00\x00\x00\x00\x00\
    osname\x00\x00fcos\x00\x00s\x07\
    bootcsum\x00\x00\x00\x00\x00\x00\x00\x00\
    ff\x00\x00s\x09\x11(>\x00a{sv}\x07\
    locked\x00\x00\x01\x00b\x07P\x5c";

#[test]
fn staged_record_as_glib_writes_it() {
    if cfg!(target_endian = "big") {
        return; // the fixture holds little-endian offsets
    }
    let staged = parse_staged_deployment(STAGED_RECORD).unwrap().unwrap();
    assert_eq!(
        staged,
        StagedDeployment {
            target: DeploymentId {
                stateroot: "fcos".into(),
                csum: "abc".into(),
                serial: 1,
            },
            bootcsum: "ff".into(),
            locked: true,
        }
    );
}

#[test]
fn staged_record_without_target_is_nothing_staged() {
    assert_eq!(parse_staged_deployment(b""), Ok(None));
}

#[test]
fn damaged_staged_records_are_errors() {
    for cut in 1..STAGED_RECORD.len() {
        assert!(
            parse_staged_deployment(&STAGED_RECORD[..cut]).is_err(),
            "truncated to {cut} bytes"
        );
    }
}

#[test]
fn resolve_in_root_keeps_symlinks_inside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    fs::create_dir_all(root.join("/sysroot/ostree/deploy")).unwrap();
    fs::create_dir_all(root.join("/boot/loader.1/entries")).unwrap();
    std::os::unix::fs::symlink("sysroot/ostree", root.join("/ostree")).unwrap();
    std::os::unix::fs::symlink("loader.1", root.join("/boot/loader")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("/boot/abs")).unwrap();
    std::os::unix::fs::symlink("../../../../..", root.join("/boot/up")).unwrap();
    std::os::unix::fs::symlink("loop", root.join("/boot/loop")).unwrap();

    let resolve = |p: &str| resolve_in_root(&root, Path::new(p));
    assert_eq!(
        resolve("/ostree/deploy").unwrap(),
        Path::new("/sysroot/ostree/deploy")
    );
    assert_eq!(
        resolve("/boot/loader/entries").unwrap(),
        Path::new("/boot/loader.1/entries")
    );
    assert_eq!(resolve("/boot/abs/x").unwrap(), Path::new("/etc/x"));
    assert_eq!(resolve("/boot/up/etc").unwrap(), Path::new("/etc"));
    assert_eq!(resolve("/missing/a/b").unwrap(), Path::new("/missing/a/b"));
    assert!(resolve("/boot/loop").is_err());
}

//! Flatcar next-kernel detection on fake Flatcar roots, with the header of a real Debian kernel
//! as the inactive slot's `vmlinuz`.

use std::path::PathBuf;

use crate::common::boot::{bzimage_with_release, debian_bzimage, version_string_offset};
use crate::common::host::FakeHost;
use nvdriver_agent::watch::flatcar::{
    bzimage_release, next_boot, os_nvidia_sysext, read_image_release, update_engine_state,
    FlatcarError, UpdateEngineState,
};

const RUNNING: &str = "6.6.60-flatcar";
/// As GRUB boots slot B with dm-verity (flatcar/scripts build_library/grub.cfg).
const CMDLINE_USR_B: &str = "rootflags=rw mount.usrflags=ro BOOT_IMAGE=/flatcar/vmlinuz-b mount.usr=/dev/mapper/usr verity.usr=PARTUUID=e03dd35c-7c2d-4a47-b3fe-27f15780a57c rootflags=rw mount.usrflags=ro consoleblank=0 root=LABEL=ROOT console=ttyS0,115200n8 flatcar.oem.id=qemu verity.usrhash=0123\n";

/// A Flatcar host booted from USR-B whose USR-A kernel is `vmlinuz_a` (none when `None`).
fn flatcar(vmlinuz_a: Option<&[u8]>) -> FakeHost {
    let host = FakeHost::new(RUNNING);
    host.write("/proc/cmdline", CMDLINE_USR_B);
    host.write_bytes("/boot/flatcar/vmlinuz-b", &bzimage_with_release(RUNNING));
    if let Some(bytes) = vmlinuz_a {
        host.write_bytes("/boot/flatcar/vmlinuz-a", bytes);
    }
    host
}

#[test]
fn real_debian_header_parses_to_its_release() {
    let (header, expected) = debian_bzimage();
    assert!(header.len() < 64 * 1024);
    assert_eq!(bzimage_release(&header).unwrap(), expected);
}

#[test]
fn file_edge_reads_only_the_header() {
    let (header, expected) = debian_bzimage();
    let dir = tempfile::tempdir().unwrap();
    // A whole kernel is megabytes; what follows the setup code is never read.
    let mut image = header.clone();
    image.resize(8 << 20, 0xcc);
    let path = dir.path().join("vmlinuz");
    std::fs::write(&path, &image).unwrap();
    assert_eq!(read_image_release(&path).unwrap(), expected);

    let missing = read_image_release(&dir.path().join("nope")).unwrap_err();
    assert!(matches!(missing, FlatcarError::Read { .. }), "{missing}");
}

#[test]
fn truncated_headers_are_errors_at_every_length() {
    let (header, _) = debian_bzimage();
    let at = version_string_offset(&header);
    let end = at + header[at..].iter().position(|&b| b == 0).unwrap();
    for len in 0..=end {
        let err = bzimage_release(&header[..len])
            .expect_err(&format!("a header cut at {len} bytes must not parse"));
        let ok = matches!(
            err,
            FlatcarError::Truncated { .. }
                | FlatcarError::VersionOutOfRange { .. }
                | FlatcarError::VersionUnterminated { .. }
        );
        assert!(ok, "cut at {len}: {err}");
    }
    // One byte more holds the NUL: whole again.
    assert!(bzimage_release(&header[..end + 1]).is_ok());
}

#[test]
fn hostile_headers_are_errors() {
    let (header, _) = debian_bzimage();

    let mut no_magic = header.clone();
    no_magic[0x202..0x206].copy_from_slice(b"HdrX");
    let err = bzimage_release(&no_magic).unwrap_err();
    assert!(matches!(err, FlatcarError::NotBzImage { .. }), "{err}");
    assert!(err.to_string().contains("HdrS"), "{err}");

    let mut old = header.clone();
    old[0x206..0x208].copy_from_slice(&0x0104u16.to_le_bytes());
    let err = bzimage_release(&old).unwrap_err();
    assert!(
        matches!(err, FlatcarError::OldProtocol { major: 1, minor: 4 }),
        "{err}"
    );

    let mut past_end = header.clone();
    past_end[0x20e..0x210].copy_from_slice(&0xfff0u16.to_le_bytes());
    let err = bzimage_release(&past_end).unwrap_err();
    assert!(
        matches!(err, FlatcarError::VersionOutOfRange { .. }),
        "{err}"
    );

    let mut no_nul = header.clone();
    let at = version_string_offset(&no_nul);
    for b in &mut no_nul[at..] {
        *b = b'x';
    }
    let err = bzimage_release(&no_nul).unwrap_err();
    assert!(
        matches!(err, FlatcarError::VersionUnterminated { .. }),
        "{err}"
    );

    let mut not_text = header.clone();
    not_text[at] = 0xff;
    let err = bzimage_release(&not_text).unwrap_err();
    assert!(matches!(err, FlatcarError::BadRelease { .. }), "{err}");

    let mut slash = header;
    slash[at] = b'/';
    assert!(matches!(
        bzimage_release(&slash),
        Err(FlatcarError::BadRelease { .. })
    ));

    // Random-ish bytes of every small length: errors, never a panic.
    for len in 0..2048usize {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
        assert!(bzimage_release(&bytes).is_err());
    }
}

#[test]
fn need_reboot_gives_the_inactive_slots_kernel() {
    let (header, expected) = debian_bzimage();
    let host = flatcar(Some(&header));
    let next = next_boot(&host.root, RUNNING, UpdateEngineState::NeedReboot)
        .unwrap()
        .expect("an update waits in USR-A");
    assert_eq!(next.kernel_release, expected);
    assert!(
        next.origin.starts_with("/boot/flatcar/vmlinuz-a (USR-A"),
        "{}",
        next.origin
    );
    assert!(next.origin.contains("UPDATE_STATUS_UPDATED_NEED_REBOOT"));
    assert_eq!(next.module_tree, None);
    assert!(!next.staged_deployment);
}

#[test]
fn need_reboot_with_the_same_kernel_is_none() {
    let host = flatcar(Some(&bzimage_with_release(RUNNING)));
    assert_eq!(
        next_boot(&host.root, RUNNING, UpdateEngineState::NeedReboot).unwrap(),
        None
    );
}

#[test]
fn need_reboot_without_a_kernel_is_an_error() {
    let host = flatcar(None);
    let err = next_boot(&host.root, RUNNING, UpdateEngineState::NeedReboot).unwrap_err();
    match &err {
        FlatcarError::MissingKernel { path, .. } => {
            assert_eq!(path, &PathBuf::from("/boot/flatcar/vmlinuz-a"))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn no_update_is_none_whatever_the_disk_holds() {
    let (header, _) = debian_bzimage();
    let host = flatcar(Some(&header));
    let before = host.snapshot();
    for status in [
        "UPDATE_STATUS_IDLE",
        "UPDATE_STATUS_DOWNLOADING",
        "UPDATE_STATUS_FINALIZING",
    ] {
        let state = update_engine_state(status);
        assert_eq!(state, UpdateEngineState::NoUpdate);
        assert_eq!(next_boot(&host.root, RUNNING, state).unwrap(), None);
    }
    assert_eq!(host.snapshot(), before, "detection writes nothing");
}

#[test]
fn unknown_falls_back_to_the_disk_newer_only() {
    // Inactive newer than running: an update is pending.
    let host = flatcar(Some(&bzimage_with_release("6.6.71-flatcar")));
    let next = next_boot(&host.root, RUNNING, UpdateEngineState::Unknown)
        .unwrap()
        .expect("a newer kernel in the inactive slot");
    assert_eq!(next.kernel_release, "6.6.71-flatcar");
    assert!(
        next.origin.contains("update_engine unreachable"),
        "{}",
        next.origin
    );

    // Numeric, not lexical: 6.6.100 is newer than 6.6.60.
    let host = flatcar(Some(&bzimage_with_release("6.6.100-flatcar")));
    let next = next_boot(&host.root, RUNNING, UpdateEngineState::Unknown).unwrap();
    assert_eq!(next.unwrap().kernel_release, "6.6.100-flatcar");

    // Inactive older: the previous release, kept for rollback.
    let host = flatcar(Some(&bzimage_with_release("6.6.54-flatcar")));
    assert_eq!(
        next_boot(&host.root, RUNNING, UpdateEngineState::Unknown).unwrap(),
        None
    );

    // First boot: USR-B never written, no vmlinuz-b.
    let host = FakeHost::new(RUNNING);
    host.write(
        "/proc/cmdline",
        "BOOT_IMAGE=/flatcar/vmlinuz-a verity.usr=PARTUUID=7130c94a-213a-4e5a-8e26-6cce9662f132\n",
    );
    assert_eq!(
        next_boot(&host.root, RUNNING, UpdateEngineState::Unknown).unwrap(),
        None
    );

    // The update_engine string that means "unknown" takes the same path.
    assert_eq!(
        update_engine_state("unknown status"),
        UpdateEngineState::Unknown
    );
}

#[test]
fn a_garbage_inactive_kernel_is_an_error_naming_the_file() {
    let host = flatcar(Some(b"not a kernel at all"));
    let err = next_boot(&host.root, RUNNING, UpdateEngineState::NeedReboot).unwrap_err();
    assert!(matches!(err, FlatcarError::Image { .. }), "{err}");
    assert!(err.to_string().contains("vmlinuz-a"), "{err}");
}

#[test]
fn a_non_flatcar_cmdline_is_a_clear_error() {
    let host = FakeHost::new(RUNNING);
    host.write(
        "/proc/cmdline",
        "BOOT_IMAGE=/vmlinuz-6.1.0-28-cloud-amd64 root=UUID=1234 ro\n",
    );
    let err = next_boot(&host.root, RUNNING, UpdateEngineState::Unknown).unwrap_err();
    assert!(matches!(err, FlatcarError::NoUsrSlot { .. }), "{err}");
    assert!(err.to_string().contains("detector"), "{err}");
}

#[test]
fn flatcars_own_nvidia_sysext_is_found() {
    let host = FakeHost::new(RUNNING);
    assert_eq!(os_nvidia_sysext(&host.root), None);

    host.write("/etc/flatcar/enabled-sysext.conf", "# extensions\npodman\n");
    assert_eq!(os_nvidia_sysext(&host.root), None);

    // Enabled, not yet set up by the initrd: the configuration is what says so.
    host.write(
        "/etc/flatcar/enabled-sysext.conf",
        "podman\nnvidia-drivers-570-open # GPU nodes\n",
    );
    assert_eq!(
        os_nvidia_sysext(&host.root),
        Some(PathBuf::from("/etc/flatcar/enabled-sysext.conf"))
    );

    // Set up: the link the initrd makes to the release-coupled image.
    host.write(
        "/etc/flatcar/sysext/flatcar-nvidia-drivers-570-open-4459.2.0.raw",
        "image",
    );
    host.mkdir("/etc/extensions");
    std::os::unix::fs::symlink(
        "/etc/flatcar/sysext/flatcar-nvidia-drivers-570-open-4459.2.0.raw",
        host.path("/etc/extensions/flatcar-nvidia-drivers-570-open.raw"),
    )
    .unwrap();
    assert_eq!(
        os_nvidia_sysext(&host.root),
        Some(PathBuf::from(
            "/etc/extensions/flatcar-nvidia-drivers-570-open.raw"
        ))
    );

    // Enabled by the OS's defaults, disabled by the admin.
    let host = FakeHost::new(RUNNING);
    host.write(
        "/usr/share/flatcar/enabled-sysext.conf",
        "nvidia-drivers-550\n",
    );
    assert_eq!(
        os_nvidia_sysext(&host.root),
        Some(PathBuf::from("/usr/share/flatcar/enabled-sysext.conf"))
    );
    host.write("/etc/flatcar/enabled-sysext.conf", "-nvidia-drivers-550\n");
    assert_eq!(os_nvidia_sysext(&host.root), None);
}

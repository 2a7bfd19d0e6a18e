//! Next-kernel detection on generic systemd hosts (Garden Linux, Debian): fake roots with real
//! UKIs (systemd's EFI stub plus sections, built by objcopy) and real bzImage headers.

use std::path::PathBuf;

use crate::common::boot::{build_uki, bzimage_with_release, debian_bzimage};
use crate::common::host::FakeHost;
use nvdriver_agent::watch::generic::{
    next_boot, read_boot_entries, uki_release, version_cmp, GenericError,
};

const RUNNING: &str = "6.6.60-cloud-amd64";

fn uki(release: &str, version_id: &str) -> Vec<u8> {
    let osrel = format!("ID=gardenlinux\nNAME=\"Garden Linux\"\nVERSION_ID={version_id}\n");
    build_uki(&[
        (".osrel", osrel.as_bytes()),
        (".uname", release.as_bytes()),
        (".linux", &bzimage_with_release(release)),
    ])
}

#[test]
fn uki_release_reads_the_uname_section() {
    let image = uki("6.6.62-cloud-amd64", "1592.3");
    assert_eq!(uki_release(&image).unwrap(), "6.6.62-cloud-amd64");
}

#[test]
fn uki_without_uname_falls_back_to_the_embedded_kernel_header() {
    let (header, expected) = debian_bzimage();
    let image = build_uki(&[(".osrel", b"ID=debian\n"), (".linux", &header)]);
    assert_eq!(uki_release(&image).unwrap(), expected);

    let image = build_uki(&[(".osrel", b"ID=debian\n")]);
    let err = uki_release(&image).unwrap_err();
    assert!(matches!(err, GenericError::NoUname), "{err}");
}

#[test]
fn hostile_pe_bytes_are_errors() {
    let image = uki("6.6.62-cloud-amd64", "1592.3");
    // Cut anywhere: an error (headers cut, or a section past the end), never a panic; whole
    // again only once the .uname bytes are in.
    for len in (0..image.len()).step_by(97) {
        if let Ok(release) = uki_release(&image[..len]) {
            assert_eq!(release, "6.6.62-cloud-amd64", "cut at {len}");
        }
    }
    assert!(uki_release(&image[..0x100]).is_err());

    let err = uki_release(&[0u8; 4096]).unwrap_err();
    assert!(matches!(err, GenericError::NotPe { .. }), "{err}");

    // .uname that is not a release.
    let bad = build_uki(&[(".uname", b"\xff\xfe not a release")]);
    assert!(matches!(
        uki_release(&bad),
        Err(GenericError::BadUname { .. })
    ));
    let huge = build_uki(&[(".uname", &[b'6'; 4096])]);
    assert!(matches!(
        uki_release(&huge),
        Err(GenericError::UnameTooLarge { size: 4096 })
    ));

    // A section table that points past the end of the file.
    let mut past = uki("6.6.62-cloud-amd64", "1");
    let at = find(&past, b".uname\0\0").expect("section header");
    // PointerToRawData is at +20 in IMAGE_SECTION_HEADER.
    past[at + 20..at + 24].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    let err = uki_release(&past).unwrap_err();
    assert!(
        matches!(err, GenericError::SectionOutOfRange { .. }),
        "{err}"
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn newest_uki_by_version_sort() {
    let host = FakeHost::new(RUNNING);
    host.write_bytes(
        "/efi/EFI/Linux/gardenlinux-1592.9.efi",
        &uki("6.6.61-cloud-amd64", "1592.9"),
    );
    host.write_bytes(
        "/efi/EFI/Linux/gardenlinux-1592.10.efi",
        &uki("6.6.62-cloud-amd64", "1592.10"),
    );
    host.mkdir("/usr/lib/modules/6.6.62-cloud-amd64");
    let next = next_boot(&host.root, RUNNING)
        .unwrap()
        .expect("a newer UKI");
    assert_eq!(next.kernel_release, "6.6.62-cloud-amd64");
    assert_eq!(
        next.origin,
        "UKI /efi/EFI/Linux/gardenlinux-1592.10.efi (first in systemd-boot's menu order)"
    );
    assert_eq!(
        next.module_tree,
        Some(PathBuf::from("/usr/lib/modules/6.6.62-cloud-amd64"))
    );
}

#[test]
fn loader_conf_default_picks_the_entry() {
    let host = FakeHost::new(RUNNING);
    host.write_bytes(
        "/efi/EFI/Linux/gardenlinux-1592.9.efi",
        &uki("6.6.61-cloud-amd64", "1592.9"),
    );
    host.write_bytes(
        "/efi/EFI/Linux/gardenlinux-1592.10.efi",
        &uki("6.6.62-cloud-amd64", "1592.10"),
    );
    host.write(
        "/efi/loader/loader.conf",
        "timeout 0\ndefault GardenLinux-1592.9*\n",
    );
    let next = next_boot(&host.root, RUNNING).unwrap().unwrap();
    assert_eq!(next.kernel_release, "6.6.61-cloud-amd64");
    assert!(
        next.origin
            .contains("/efi/loader/loader.conf default \"GardenLinux-1592.9*\""),
        "{}",
        next.origin
    );
    assert_eq!(next.module_tree, None, "no module tree for it on this root");

    // A pattern that matches nothing: menu order again.
    host.write("/efi/loader/loader.conf", "default nothing-*\n");
    let next = next_boot(&host.root, RUNNING).unwrap().unwrap();
    assert_eq!(next.kernel_release, "6.6.62-cloud-amd64");
}

#[test]
fn a_uki_out_of_tries_sorts_last() {
    let host = FakeHost::new(RUNNING);
    host.write_bytes(
        "/boot/efi/EFI/Linux/gardenlinux-1592.10+0-3.efi",
        &uki("6.6.62-cloud-amd64", "1592.10"),
    );
    host.write_bytes(
        "/boot/efi/EFI/Linux/gardenlinux-1592.9+3.efi",
        &uki("6.6.61-cloud-amd64", "1592.9"),
    );
    let next = next_boot(&host.root, RUNNING).unwrap().unwrap();
    assert_eq!(next.kernel_release, "6.6.61-cloud-amd64");
}

#[test]
fn the_same_esp_seen_twice_is_one_entry() {
    let host = FakeHost::new(RUNNING);
    host.write_bytes(
        "/boot/efi/EFI/Linux/gl.efi",
        &uki("6.6.62-cloud-amd64", "1"),
    );
    // /efi is the same file system as /boot/efi.
    std::os::unix::fs::symlink("boot/efi", host.path("/efi")).unwrap();
    let entries = read_boot_entries(&host.root).unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
}

#[test]
fn unreadable_default_uki_is_an_error_naming_it() {
    let host = FakeHost::new(RUNNING);
    host.write_bytes("/efi/EFI/Linux/broken.efi", b"MZ but nothing else");
    let err = next_boot(&host.root, RUNNING).unwrap_err();
    assert!(
        matches!(err, GenericError::DefaultUnreadable { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("/efi/EFI/Linux/broken.efi"),
        "{err}"
    );
}

fn type1(host: &FakeHost, file: &str, kver: &str, extra: &str) {
    host.write(
        &format!("/boot/loader/entries/{file}"),
        &format!("title Debian GNU/Linux 12\nversion {kver}\nlinux /vmlinuz-{kver}\ninitrd /initrd.img-{kver}\noptions root=UUID=1234 ro\n{extra}"),
    );
}

#[test]
fn type1_entries_newest_by_version_not_by_bytes() {
    let host = FakeHost::new("6.1.0-8-cloud-amd64");
    for kver in ["6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64"] {
        type1(&host, &format!("debian-{kver}.conf"), kver, "");
        host.write_bytes(
            &format!("/boot/vmlinuz-{kver}"),
            &bzimage_with_release(kver),
        );
    }
    // Installed half-way: an entry whose kernel is not there is not in the menu.
    type1(
        &host,
        "debian-6.1.0-11-cloud-amd64.conf",
        "6.1.0-11-cloud-amd64",
        "",
    );
    host.mkdir("/usr/lib/modules/6.1.0-10-cloud-amd64");

    let next = next_boot(&host.root, "6.1.0-8-cloud-amd64")
        .unwrap()
        .unwrap();
    assert_eq!(next.kernel_release, "6.1.0-10-cloud-amd64");
    assert_eq!(
        next.origin,
        "boot entry /boot/loader/entries/debian-6.1.0-10-cloud-amd64.conf (first in systemd-boot's menu order)"
    );
    assert_eq!(
        next.module_tree,
        Some(PathBuf::from("/usr/lib/modules/6.1.0-10-cloud-amd64"))
    );
    assert_eq!(read_boot_entries(&host.root).unwrap().len(), 2);

    // Already running it: nothing to do.
    assert_eq!(next_boot(&host.root, "6.1.0-10-cloud-amd64").unwrap(), None);
}

#[test]
fn type1_release_comes_from_the_kernel_header_over_the_version_line() {
    let host = FakeHost::new("6.1.0-8-cloud-amd64");
    // The entry's version is an OS version; the kernel says what it is.
    host.write(
        "/efi/loader/entries/os.conf",
        "title OS\nversion 1592.3\nlinux /os/linux\n",
    );
    host.write_bytes(
        "/efi/os/linux",
        &bzimage_with_release("6.1.0-28-cloud-amd64"),
    );
    let next = next_boot(&host.root, "6.1.0-8-cloud-amd64")
        .unwrap()
        .unwrap();
    assert_eq!(next.kernel_release, "6.1.0-28-cloud-amd64");

    // Not a bzImage (an arm64 Image): the version line.
    host.write(
        "/efi/loader/entries/os.conf",
        "title OS\nversion 6.1.0-28-arm64\nlinux /os/linux\n",
    );
    host.write("/efi/os/linux", "arm64 Image, no bzImage header");
    let next = next_boot(&host.root, "6.1.0-8-cloud-amd64")
        .unwrap()
        .unwrap();
    assert_eq!(next.kernel_release, "6.1.0-28-arm64");
}

#[test]
fn sort_keys_order_entries_before_plain_ones() {
    let host = FakeHost::new("6.1.0-8-cloud-amd64");
    for kver in [
        "6.1.0-20-cloud-amd64",
        "6.1.0-21-cloud-amd64",
        "6.1.0-30-cloud-amd64",
    ] {
        host.write_bytes(
            &format!("/boot/vmlinuz-{kver}"),
            &bzimage_with_release(kver),
        );
    }
    // With sort keys: newest version first within the key.
    type1(&host, "a.conf", "6.1.0-20-cloud-amd64", "sort-key debian\n");
    type1(&host, "b.conf", "6.1.0-21-cloud-amd64", "sort-key debian\n");
    // Without a sort key it sorts after both, even though its id and version are newest.
    type1(&host, "z-6.1.0-30.conf", "6.1.0-30-cloud-amd64", "");
    let next = next_boot(&host.root, "6.1.0-8-cloud-amd64")
        .unwrap()
        .unwrap();
    assert_eq!(next.kernel_release, "6.1.0-21-cloud-amd64");
}

#[test]
fn grub_hosts_boot_the_newest_kernel_with_an_image() {
    let host = FakeHost::new("6.1.0-8-cloud-amd64");
    for kver in ["6.1.0-8-cloud-amd64", "6.1.0-9-cloud-amd64"] {
        host.write_bytes(
            &format!("/boot/vmlinuz-{kver}"),
            &bzimage_with_release(kver),
        );
        host.mkdir(&format!("/usr/lib/modules/{kver}/kernel"));
    }
    // Partial install: modules unpacked, no kernel image yet. Not bootable.
    host.mkdir("/usr/lib/modules/6.1.0-10-cloud-amd64/kernel");
    let next = next_boot(&host.root, "6.1.0-8-cloud-amd64")
        .unwrap()
        .unwrap();
    assert_eq!(next.kernel_release, "6.1.0-9-cloud-amd64");
    assert_eq!(
        next.origin,
        "newest kernel with an image: /boot/vmlinuz-6.1.0-9-cloud-amd64 (no boot entries; GRUB boots the newest)"
    );

    // The image arrives (beside its modules, as on merged-/usr systems): now it is next.
    host.write_bytes(
        "/usr/lib/modules/6.1.0-10-cloud-amd64/vmlinuz",
        &bzimage_with_release("6.1.0-10-cloud-amd64"),
    );
    let next = next_boot(&host.root, "6.1.0-8-cloud-amd64")
        .unwrap()
        .unwrap();
    assert_eq!(next.kernel_release, "6.1.0-10-cloud-amd64");
    assert_eq!(
        next.module_tree,
        Some(PathBuf::from("/usr/lib/modules/6.1.0-10-cloud-amd64"))
    );

    // Only the running kernel: None.
    let host = FakeHost::new("6.1.0-8-cloud-amd64");
    host.write_bytes("/boot/vmlinuz-6.1.0-8-cloud-amd64", b"image");
    assert_eq!(next_boot(&host.root, "6.1.0-8-cloud-amd64").unwrap(), None);
}

#[test]
fn nothing_bootable_is_an_error() {
    let host = FakeHost::new(RUNNING);
    std::fs::remove_dir_all(host.path("/usr/lib/modules")).unwrap();
    let err = next_boot(&host.root, RUNNING).unwrap_err();
    assert!(matches!(err, GenericError::NothingBootable), "{err}");
}

#[test]
fn detection_changes_nothing_on_disk() {
    let host = FakeHost::new(RUNNING);
    host.write_bytes("/efi/EFI/Linux/gl.efi", &uki("6.6.62-cloud-amd64", "1"));
    let before = host.snapshot();
    next_boot(&host.root, RUNNING).unwrap();
    assert_eq!(host.snapshot(), before);
}

#[test]
fn kernel_version_sorting() {
    use std::cmp::Ordering::*;
    assert_eq!(
        version_cmp("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64"),
        Greater
    );
    assert_eq!(
        version_cmp("6.12.117+deb12-cloud-amd64", "6.1.0-28-cloud-amd64"),
        Greater
    );
    assert_eq!(
        version_cmp("6.6.62-cloud-amd64", "6.6.62-cloud-amd64"),
        Equal
    );
}

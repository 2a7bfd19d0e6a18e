//! Kernel images as boot loaders see them: the bzImage header of a real Debian kernel
//! (`tests/fixtures/bzimage/`, made by its `make-fixtures`), and unified kernel images built
//! the way systemd documented before `ukify`: `objcopy` adding sections to systemd's own EFI stub.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bzimage");

/// The real kernel's header bytes and the release its package name says.
pub fn debian_bzimage() -> (Vec<u8>, String) {
    let mut bins: Vec<PathBuf> = fs::read_dir(FIXTURE_DIR)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    bins.sort();
    let bin = bins
        .pop()
        .expect("no tests/fixtures/bzimage/*.bin; run tests/fixtures/bzimage/make-fixtures");
    let expected = fs::read_to_string(bin.with_extension("expected")).unwrap();
    (fs::read(&bin).unwrap(), expected.trim().to_string())
}

/// Where the header's version string starts (`kernel_version` + 0x200).
pub fn version_string_offset(header: &[u8]) -> usize {
    usize::from(u16::from_le_bytes([header[0x20e], header[0x20f]])) + 0x200
}

/// The real header with its version string replaced by `release` (the rest of the original
/// string is kept after it, so the bytes stay a real kernel's but for the release).
pub fn bzimage_with_release(release: &str) -> Vec<u8> {
    let (mut header, original) = debian_bzimage();
    assert!(
        release.len() <= original.len(),
        "{release} must fit in place of {original}"
    );
    let at = version_string_offset(&header);
    let end = at + header[at..].iter().position(|&b| b == 0).unwrap();
    let tail = header[at + original.len()..end].to_vec();
    let mut string = release.as_bytes().to_vec();
    string.extend_from_slice(&tail);
    string.resize(end - at, 0);
    header[at..end].copy_from_slice(&string);
    header
}

/// systemd's EFI stub for this machine (Debian package systemd-boot-efi).
pub fn efi_stub() -> PathBuf {
    let dir = Path::new("/usr/lib/systemd/boot/efi");
    ["linuxx64.efi.stub", "linuxaa64.efi.stub", "linuxia32.efi.stub"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .expect("no systemd EFI stub in /usr/lib/systemd/boot/efi: install systemd-boot-efi (scripts/setup)")
}

/// A unified kernel image: systemd's stub plus the sections given as (name, contents), added by
/// `objcopy` at the addresses systemd's documentation used.
pub fn build_uki(sections: &[(&str, &[u8])]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("uki.efi");
    let mut objcopy = Command::new("objcopy");
    for (i, (name, contents)) in sections.iter().enumerate() {
        let file = dir.path().join(format!("section{i}"));
        fs::write(&file, contents).unwrap();
        let vma = match *name {
            ".linux" => 0x2000000,
            ".initrd" => 0x3000000,
            _ => 0x20000 + 0x10000 * i,
        };
        objcopy
            .arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={vma:#x}"));
    }
    let status = objcopy
        .arg(efi_stub())
        .arg(&out)
        .status()
        .expect("objcopy (binutils) builds the test UKIs: install binutils (scripts/setup)");
    assert!(status.success(), "objcopy failed");
    fs::read(out).unwrap()
}

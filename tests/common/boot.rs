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

/// Where tests/fixtures/arm64-kernel/fetch caches the real Debian arm64 kernel.
pub fn arm64_kernel_cache() -> PathBuf {
    let base = std::env::var_os("NVDRIVER_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nvdriver-agent-tests"));
    base.join("arm64-kernel")
}

/// The real Debian arm64 `vmlinuz` (as the package ships it) and its release, or `None` after
/// printing why `test` is skipped. Under CI a missing kernel is a failure.
pub fn debian_arm64_vmlinuz(test: &str) -> Option<(PathBuf, String)> {
    let cache = arm64_kernel_cache();
    let mut kernels: Vec<PathBuf> = fs::read_dir(&cache)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    kernels.retain(|dir| dir.join("vmlinuz").is_file() && dir.join("release").is_file());
    kernels.sort();
    let Some(dir) = kernels.pop() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: no arm64 kernel in {}; scripts/setup fetches it (tests/fixtures/arm64-kernel/fetch)",
            cache.display()
        );
        eprintln!(
            "skipping {test}: no arm64 kernel in {}; run tests/fixtures/arm64-kernel/fetch",
            cache.display()
        );
        return None;
    };
    let release = fs::read_to_string(dir.join("release")).unwrap();
    Some((dir.join("vmlinuz"), release.trim().to_string()))
}

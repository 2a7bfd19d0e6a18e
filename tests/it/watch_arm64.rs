//! The release of arm64 kernel images, from a real Debian arm64 kernel (fetched by
//! tests/fixtures/arm64-kernel/fetch into a cache outside the checkout): as Debian ships it (an
//! uncompressed `Image` that is also a signed EFI application), gzip-compressed by the real
//! `gzip`, and wrapped as an EFI zboot image. The zboot images are built here, to the layout of
//! the kernel's drivers/firmware/efi/libstub/zboot-header.S and Makefile.zboot, around the real
//! image compressed by the real `gzip` and `zstd`; no kernel-built zboot image is tested (Debian
//! 12's arm64 kernels have CONFIG_EFI_ZBOOT unset).

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::boot::debian_arm64_vmlinuz;
use crate::common::host::FakeHost;
use nvdriver_agent::watch::arm64_image::{detect, Arm64Format, Arm64ImageError, MAX_SCANNED};
use nvdriver_agent::watch::flatcar::{
    next_boot, read_image_release, FlatcarError, UpdateEngineState,
};

const RUNNING: &str = "6.6.60-flatcar";
const CMDLINE_USR_B: &str = "BOOT_IMAGE=/flatcar/vmlinuz-b mount.usr=/dev/mapper/usr verity.usr=PARTUUID=e03dd35c-7c2d-4a47-b3fe-27f15780a57c flatcar.oem.id=qemu\n";

/// `program args… < input > output`.
fn filter(program: &str, args: &[&str], input: &Path, output: &Path) {
    let status = Command::new(program)
        .args(args)
        .stdin(fs::File::open(input).unwrap())
        .stdout(fs::File::create(output).unwrap())
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// An EFI zboot image as zboot-header.S lays it out: "MZ" (IMAGE_DOS_SIGNATURE as a .long),
/// "zimg", the payload's offset and size (u32 LE), two reserved words, COMP_TYPE as a
/// NUL-terminated string, LINUX_PE_MAGIC at 0x38; the payload in .rodata after the stub's code
/// (here: zero filler standing for it, at a 4 KiB boundary). Makefile.zboot appends the
/// uncompressed size as le32 after a non-gzip payload (gzip's own trailer holds it), and the
/// header's size leaves those 4 bytes out.
fn zboot(compression: &str, payload: &[u8], image_len: u32) -> Vec<u8> {
    const OFFSET: usize = 0x4000;
    let mut out = vec![0u8; OFFSET];
    out[..4].copy_from_slice(&0x5a4du32.to_le_bytes());
    out[4..8].copy_from_slice(b"zimg");
    out[8..12].copy_from_slice(&(OFFSET as u32).to_le_bytes());
    out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[24..24 + compression.len()].copy_from_slice(compression.as_bytes());
    out[0x38..0x3c].copy_from_slice(&0x8182_23cdu32.to_le_bytes());
    out.extend_from_slice(payload);
    if compression != "gzip" {
        out.extend_from_slice(&image_len.to_le_bytes());
    }
    out
}

#[test]
fn debians_arm64_vmlinuz_is_an_uncompressed_efi_image_and_reads() {
    let Some((vmlinuz, release)) =
        debian_arm64_vmlinuz("debians_arm64_vmlinuz_is_an_uncompressed_efi_image_and_reads")
    else {
        return;
    };
    let bytes = fs::read(&vmlinuz).unwrap();
    // What Debian ships, found out: a PE/COFF EFI application (the signed EFI stub) that is
    // also the plain arm64 Image, not gzip and not EFI zboot.
    assert_eq!(&bytes[..2], b"MZ");
    assert_eq!(&bytes[0x38..0x3c], b"ARM\x64");
    assert_ne!(&bytes[4..8], b"zimg");
    assert_eq!(detect(&bytes[..64]), Some(Arm64Format::Image));
    assert_eq!(read_image_release(&vmlinuz).unwrap(), release);

    // Only up to the banner is needed: the image cut right after it reads the same.
    let banner = memchr::memmem::find(&bytes, b"Linux version ").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut");
    fs::write(&cut, &bytes[..banner + 200]).unwrap();
    assert_eq!(read_image_release(&cut).unwrap(), release);
}

#[test]
fn gzip_and_efi_zboot_of_the_real_image_read() {
    let Some((vmlinuz, release)) =
        debian_arm64_vmlinuz("gzip_and_efi_zboot_of_the_real_image_read")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image_len = fs::metadata(&vmlinuz).unwrap().len() as u32;
    let gz = dir.path().join("Image.gz");
    filter("gzip", &["-n", "-c"], &vmlinuz, &gz);
    assert_eq!(read_image_release(&gz).unwrap(), release, "Image.gz");

    let zst = dir.path().join("Image.zst");
    filter("zstd", &["-q", "-c"], &vmlinuz, &zst);
    for (compression, payload) in [("gzip", &gz), ("zstd", &zst)] {
        let image = zboot(compression, &fs::read(payload).unwrap(), image_len);
        let path = dir.path().join(format!("vmlinuz.zboot-{compression}"));
        fs::write(&path, &image).unwrap();
        let Some(Arm64Format::Zboot {
            compression: named, ..
        }) = detect(&image[..64])
        else {
            panic!("not detected as zboot ({compression})");
        };
        assert_eq!(named, compression);
        assert_eq!(
            read_image_release(&path).unwrap(),
            release,
            "zboot {compression}"
        );
    }
}

#[test]
fn flatcar_reads_the_next_kernel_from_an_arm64_slot() {
    let Some((vmlinuz, release)) =
        debian_arm64_vmlinuz("flatcar_reads_the_next_kernel_from_an_arm64_slot")
    else {
        return;
    };
    let host = FakeHost::new(RUNNING);
    host.write("/proc/cmdline", CMDLINE_USR_B);
    host.mkdir("/boot/flatcar");
    let slot_a = host.path("/boot/flatcar/vmlinuz-a");
    if fs::hard_link(&vmlinuz, &slot_a).is_err() {
        fs::copy(&vmlinuz, &slot_a).unwrap();
    }
    let next = next_boot(&host.root, RUNNING, UpdateEngineState::NeedReboot)
        .unwrap()
        .expect("an update waits in USR-A");
    assert_eq!(next.kernel_release, release);
    assert!(
        next.origin.starts_with("/boot/flatcar/vmlinuz-a (USR-A"),
        "{}",
        next.origin
    );
}

#[test]
fn broken_and_hostile_arm64_images_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path
    };
    let inner = |e: FlatcarError| match e {
        FlatcarError::Image { error, .. } => *error,
        other => panic!("expected the file named: {other}"),
    };
    // Neither x86 nor arm64.
    let err = read_image_release(&write("junk", &[0x5a; 4096])).unwrap_err();
    assert!(
        err.to_string()
            .contains("not a kernel image this agent reads"),
        "{err}"
    );

    // An Image without a banner: scanned to its end.
    let mut image = vec![0u8; 3 << 20];
    image[0x38..0x3c].copy_from_slice(b"ARM\x64");
    let err = inner(read_image_release(&write("nobanner", &image)).unwrap_err());
    assert!(
        matches!(err, FlatcarError::Arm64(Arm64ImageError::NoBanner { scanned, capped: false }) if scanned == 3 << 20),
        "{err}"
    );

    // gzip of something that is not an Image.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &[0x11; 4096]).unwrap();
    let err = inner(read_image_release(&write("notimage.gz", &gz.finish().unwrap())).unwrap_err());
    assert!(
        matches!(err, FlatcarError::Arm64(Arm64ImageError::NotAnImage { .. })),
        "{err}"
    );

    // A decompression bomb: an Image header, then zeros far past the scan limit, as gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &image[..64]).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(MAX_SCANNED >> 20) + 16 {
        std::io::Write::write_all(&mut gz, &zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());
    let err = inner(read_image_release(&write("bomb.gz", &bomb)).unwrap_err());
    assert!(
        matches!(err, FlatcarError::Arm64(Arm64ImageError::NoBanner { scanned, capped: true }) if scanned == MAX_SCANNED),
        "{err}"
    );

    // Truncated gzip: a read error, not a panic.
    let cut = &bomb[..bomb.len() / 2];
    let err = inner(read_image_release(&write("cut.gz", cut)).unwrap_err());
    assert!(matches!(err, FlatcarError::Arm64(_)), "{err}");

    // zboot: a payload past the end of the file, and a compression this agent lacks.
    let mut outside = zboot("gzip", &[0x1f, 0x8b, 8, 0], 0);
    outside[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = inner(read_image_release(&write("outside.zboot", &outside)).unwrap_err());
    assert!(
        matches!(
            err,
            FlatcarError::Arm64(Arm64ImageError::ZbootPayloadOutside { .. })
        ),
        "{err}"
    );
    let lz4 = zboot("lz4", &[0x04, 0x22, 0x4d, 0x18], 0);
    let err = inner(read_image_release(&write("lz4.zboot", &lz4)).unwrap_err());
    assert!(
        err.to_string()
            .contains("\"lz4\"-compressed; this agent reads gzip, zstd, xz and lzma"),
        "{err}"
    );
}

//! The kernel release of an arm64 kernel image, as Flatcar's `vmlinuz-a|b` and Debian's
//! `/boot/vmlinuz-*` hold one: an uncompressed `Image`, a gzip-compressed one, or an EFI zboot
//! image (a PE/COFF executable that carries the compressed `Image` as its payload).
//!
//! arm64 has no boot protocol field pointing at the version string as x86 has, so the release
//! is read from the `linux_banner` (`init/version-timestamp.c`: `"Linux version " UTS_RELEASE
//! " (" …`) inside the image itself. Decompression is bounded: it stops as soon as the banner
//! is found, and after [`MAX_SCANNED`] bytes of image at most.
//!
//! Formats (by the kernel's own definitions):
//! - `Image`: the arm64 boot header (Documentation/arch/arm64/booting.rst) has the magic
//!   `"ARM\x64"` at 0x38. Debian's arm64 kernels are this, wrapped as a signed EFI
//!   application (`MZ` at 0 as well).
//! - gzip (`1f 8b`): `Image.gz`, which boot loaders decompress themselves.
//! - EFI zboot (`CONFIG_EFI_ZBOOT`), drivers/firmware/efi/libstub/zboot-header.S: `MZ` at 0,
//!   `"zimg"` at 4, the payload's offset (u32 LE) at 8 and size (u32 LE) at 12, two reserved
//!   words, then the compression type as a NUL-terminated string at 24 (`gzip`, `zstd`, `xz`,
//!   `lzma`, `lz4`, `lzo`, `bzip2`, from `COMP_TYPE` in drivers/firmware/efi/libstub/Makefile.zboot).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use crate::host::kernel::is_kernel_release;

/// Where the arm64 boot header keeps its magic, and the magic (`"ARM\x64"`).
const IMAGE_MAGIC_OFFSET: usize = 0x38;
const IMAGE_MAGIC: &[u8; 4] = b"ARM\x64";
/// What zboot-header.S puts at 4.
const ZBOOT_TYPE: &[u8; 4] = b"zimg";
/// The compression type string starts here and ends before the PE magic at 0x38.
const ZBOOT_COMP_TYPE: std::ops::Range<usize> = 24..IMAGE_MAGIC_OFFSET;
/// The banner's start (`init/version-timestamp.c`).
const BANNER: &[u8] = b"Linux version ";
/// A release is far shorter than this; the window kept between chunks must hold the banner's
/// prefix and a release.
const RELEASE_MAX: usize = 128;
/// At most this many bytes of image (decompressed, for a compressed one) are scanned for the
/// banner. Debian's 6.12 arm64 `Image` is 35 MB with the banner at 14 MB.
pub const MAX_SCANNED: u64 = 256 << 20;
/// Bytes read per step.
const CHUNK: usize = 1 << 20;

/// The arm64 image formats this module reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arm64Format {
    /// An uncompressed `Image` (`"ARM\x64"` at 0x38).
    Image,
    /// A gzip stream (presumably `Image.gz`; the decompressed header is checked).
    Gzip,
    /// An EFI zboot image: its compressed payload.
    Zboot {
        /// The payload's file offset.
        offset: u64,
        /// The payload's size in bytes.
        size: u64,
        /// The compression type named in the header.
        compression: String,
    },
}

/// Why an arm64 image's release could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Arm64ImageError {
    /// The EFI zboot header names a payload outside the file.
    #[error("the EFI zboot header names a payload of {size} bytes at {offset}, past the end of the {len}-byte file")]
    ZbootPayloadOutside {
        /// The payload's offset.
        offset: u64,
        /// The payload's size.
        size: u64,
        /// The file's size.
        len: u64,
    },
    /// The EFI zboot payload is compressed with something this agent cannot decompress.
    #[error("the EFI zboot payload is {compression:?}-compressed; this agent reads gzip, zstd, xz and lzma payloads")]
    ZbootCompression {
        /// The compression type the header names.
        compression: String,
    },
    /// The decompressed data does not start with an arm64 `Image` header.
    #[error("the {what} does not hold an arm64 Image: expected \"ARM\\x64\" at 0x38 of the decompressed data, found {found}")]
    NotAnImage {
        /// `gzip data` or `EFI zboot payload`.
        what: &'static str,
        /// The bytes found at 0x38, in hex (empty when the data is shorter).
        found: String,
    },
    /// No `Linux version <release>` banner within the bytes scanned.
    #[error("no \"Linux version <release>\" banner in the first {scanned} bytes of the image{}", if *.capped { " (the most this agent scans)" } else { "" })]
    NoBanner {
        /// Bytes of image scanned.
        scanned: u64,
        /// Whether the scan stopped at [`MAX_SCANNED`].
        capped: bool,
    },
    /// Reading or decompressing failed.
    #[error("cannot read the image: {0}")]
    Read(#[from] io::Error),
}

/// The arm64 format of an image, from its first bytes (at least 64); `None` when it is none of
/// them.
pub fn detect(head: &[u8]) -> Option<Arm64Format> {
    if head.starts_with(b"MZ") && head.get(4..8) == Some(ZBOOT_TYPE) {
        let u32_at = |at: usize| {
            head.get(at..at + 4)
                .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        };
        let comp = head.get(ZBOOT_COMP_TYPE)?;
        let end = comp.iter().position(|&b| b == 0).unwrap_or(comp.len());
        return Some(Arm64Format::Zboot {
            offset: u32_at(8)?,
            size: u32_at(12)?,
            compression: String::from_utf8_lossy(&comp[..end]).into_owned(),
        });
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Some(Arm64Format::Gzip);
    }
    if head.get(IMAGE_MAGIC_OFFSET..IMAGE_MAGIC_OFFSET + 4) == Some(IMAGE_MAGIC) {
        return Some(Arm64Format::Image);
    }
    None
}

/// The release a `Linux version <release> (` banner in `bytes` names: the first banner whose
/// next word is a kernel release. `None` when there is none.
pub fn banner_release(bytes: &[u8]) -> Option<String> {
    memchr::memmem::find_iter(bytes, BANNER).find_map(|at| {
        let rest = &bytes[at + BANNER.len()..];
        let end = rest
            .iter()
            .take(RELEASE_MAX)
            .position(|&b| b == b' ' || b == 0)?;
        let release = std::str::from_utf8(&rest[..end]).ok()?;
        // A release starts with its version number; this also passes over format strings
        // such as "Linux version %s" elsewhere in the image.
        let numbered = release.starts_with(|c: char| c.is_ascii_digit());
        (numbered && is_kernel_release(release)).then(|| release.to_string())
    })
}

/// Scan `image` (an `Image`'s bytes from its start) for the banner, in chunks, keeping enough
/// of each chunk's end that a banner across two chunks is found; stops at the banner or after
/// `cap` bytes.
pub fn scan_for_release(mut image: impl Read, cap: u64) -> Result<String, Arm64ImageError> {
    let keep = BANNER.len() + RELEASE_MAX;
    let mut window: Vec<u8> = Vec::with_capacity(CHUNK + keep);
    let mut scanned = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let want = CHUNK.min(usize::try_from(cap - scanned).unwrap_or(CHUNK));
        if want == 0 {
            return Err(Arm64ImageError::NoBanner {
                scanned,
                capped: true,
            });
        }
        let n = match image.read(&mut chunk[..want]) {
            Ok(0) => {
                return Err(Arm64ImageError::NoBanner {
                    scanned,
                    capped: false,
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        scanned += n as u64;
        window.extend_from_slice(&chunk[..n]);
        if let Some(release) = banner_release(&window) {
            return Ok(release);
        }
        let drop = window.len().saturating_sub(keep);
        window.drain(..drop);
    }
}

/// The decompressed stream of `input` as `compression` (a zboot `COMP_TYPE`) names it.
fn decompressor<'a>(
    compression: &str,
    input: impl Read + 'a,
) -> Result<Box<dyn Read + 'a>, Arm64ImageError> {
    Ok(match compression {
        "gzip" => Box::new(flate2::read::GzDecoder::new(input)),
        "zstd" | "zstd22" => Box::new(zstd::stream::read::Decoder::new(input)?),
        "xz" => Box::new(xz2::read::XzDecoder::new(input)),
        "lzma" => Box::new(xz2::read::XzDecoder::new_stream(
            input,
            xz2::stream::Stream::new_lzma_decoder(u64::MAX).map_err(io::Error::from)?,
        )),
        other => {
            return Err(Arm64ImageError::ZbootCompression {
                compression: other.to_string(),
            })
        }
    })
}

/// [`scan_for_release`] of decompressed data, after checking it starts as an `Image`.
fn scan_decompressed(mut data: impl Read, what: &'static str) -> Result<String, Arm64ImageError> {
    let mut head = Vec::with_capacity(64);
    (&mut data).take(64).read_to_end(&mut head)?;
    let magic = head.get(IMAGE_MAGIC_OFFSET..IMAGE_MAGIC_OFFSET + 4);
    if magic != Some(IMAGE_MAGIC) {
        return Err(Arm64ImageError::NotAnImage {
            what,
            found: magic.map(hex::encode).unwrap_or_default(),
        });
    }
    scan_for_release(io::Cursor::new(head).chain(data), MAX_SCANNED)
}

/// The release of the arm64 image `file` (of `len` bytes) whose format [`detect`] found.
pub fn read_release(
    file: &mut File,
    len: u64,
    format: &Arm64Format,
) -> Result<String, Arm64ImageError> {
    file.seek(SeekFrom::Start(0))?;
    let input = io::BufReader::with_capacity(CHUNK, file);
    match format {
        Arm64Format::Image => scan_for_release(input, MAX_SCANNED),
        Arm64Format::Gzip => scan_decompressed(flate2::read::GzDecoder::new(input), "gzip data"),
        Arm64Format::Zboot {
            offset,
            size,
            compression,
        } => {
            if offset.checked_add(*size).is_none_or(|end| end > len) {
                return Err(Arm64ImageError::ZbootPayloadOutside {
                    offset: *offset,
                    size: *size,
                    len,
                });
            }
            let mut input = input;
            input.seek(SeekFrom::Start(*offset))?;
            let payload = decompressor(compression, input.take(*size))?;
            scan_decompressed(payload, "EFI zboot payload")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with_banner(at: usize, total: usize, banner: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; total];
        image[IMAGE_MAGIC_OFFSET..IMAGE_MAGIC_OFFSET + 4].copy_from_slice(IMAGE_MAGIC);
        image[at..at + banner.len()].copy_from_slice(banner);
        image
    }

    #[test]
    fn detects_each_format() {
        let image = image_with_banner(0x1000, 0x2000, b"");
        assert_eq!(detect(&image), Some(Arm64Format::Image));
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]), Some(Arm64Format::Gzip));
        let mut zboot = vec![0u8; 64];
        zboot[..2].copy_from_slice(b"MZ");
        zboot[4..8].copy_from_slice(b"zimg");
        zboot[8..12].copy_from_slice(&0x1000u32.to_le_bytes());
        zboot[12..16].copy_from_slice(&0x2345u32.to_le_bytes());
        zboot[24..29].copy_from_slice(b"zstd\0");
        assert_eq!(
            detect(&zboot),
            Some(Arm64Format::Zboot {
                offset: 0x1000,
                size: 0x2345,
                compression: "zstd".into()
            })
        );
        assert_eq!(detect(&[0u8; 64]), None);
        assert_eq!(detect(b"MZzimg"), None, "too short for the zboot header");
    }

    #[test]
    fn the_banner_names_the_release() {
        let bytes = b"xxLinux version %s\0Linux version 6.12.117+deb12-cloud-arm64 (debian-kernel@lists.debian.org) #1";
        assert_eq!(
            banner_release(bytes).as_deref(),
            Some("6.12.117+deb12-cloud-arm64")
        );
        assert_eq!(banner_release(b"Linux version "), None);
        assert_eq!(banner_release(b"no banner here"), None);
    }

    #[test]
    fn a_banner_across_chunks_is_found() {
        let banner = b"Linux version 6.6.60-flatcar (build@localhost) #1 SMP\0";
        for at in [CHUNK - 3, CHUNK - BANNER.len(), CHUNK + 1, 3 * CHUNK - 20] {
            let image = image_with_banner(at, 4 * CHUNK, banner);
            assert_eq!(
                scan_for_release(&image[..], MAX_SCANNED).unwrap(),
                "6.6.60-flatcar",
                "banner at {at}"
            );
        }
    }

    #[test]
    fn the_scan_is_bounded() {
        let image = image_with_banner(3 * CHUNK, 4 * CHUNK, b"Linux version 6.6.60-flatcar ");
        let err = scan_for_release(&image[..], 2 * CHUNK as u64).unwrap_err();
        assert!(
            matches!(
                err,
                Arm64ImageError::NoBanner {
                    scanned,
                    capped: true
                } if scanned == 2 * CHUNK as u64
            ),
            "{err}"
        );
        let err = scan_for_release(&[0u8; 100][..], MAX_SCANNED).unwrap_err();
        assert!(matches!(
            err,
            Arm64ImageError::NoBanner {
                scanned: 100,
                capped: false
            }
        ));
    }
}

//! Reading a kernel module file the way `modinfo` does, without loading it.
//!
//! A module file is an ELF relocatable object (`ET_REL`), possibly with a signature appended
//! and possibly compressed as a whole with xz or zstd. Its `.modinfo` section is a run of
//! NUL-separated `key=value` strings written by `MODULE_*()` macros and modpost: `name`,
//! `vermagic`, `depends`, `version`, `srcversion`, `license`, `parmtype`, and many keys we do
//! not need (`alias`, `parm`, `firmware`, …), some of them repeated.
//!
//! The order of work is the kernel's: detect compression by magic bytes and decompress (with
//! an output bound, so a decompression bomb cannot exhaust memory), strip the signature
//! trailer from the *decompressed* bytes (compressed modules are signed before compression),
//! then parse the ELF. Every length and offset taken from the file is bounds-checked; bad
//! input gives an error, never a panic.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{FileHeader, SectionHeader, Sym};
use object::{Endianness, ReadCache, ReadRef};

/// Largest module file, compressed or decompressed, that we accept. NVIDIA's biggest module
/// is around 100 MiB uncompressed; this leaves room for debug info without letting a damaged
/// or hostile file take the host's memory.
pub const MAX_MODULE_SIZE: u64 = 1 << 30;

/// Plain (uncompressed) module files larger than this are read in parts, the ELF headers, the
/// `.modinfo` section and the signature trailer, not whole: a real `nvidia.ko` is ~100 MB and
/// every stage and load reads each module once.
const READ_IN_PARTS_ABOVE: u64 = 4 << 20;
/// How much of a file's end is read for its signature trailer (a PKCS#7 signature with its
/// signer and key id takes about a kilobyte).
const TRAILER_READ: u64 = 64 << 10;

/// The kernel's `MODULE_SIG_STRING`, the last bytes of a signed module.
pub const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// `sizeof(struct module_signature)`.
const MODULE_SIGNATURE_LEN: usize = 12;

const XZ_MAGIC: &[u8] = &[0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xB5, 0x2F, 0xFD];
const ELF_MAGIC: &[u8] = b"\x7fELF";
/// Offset of `e_ident[EI_CLASS]` and its values.
const EI_CLASS: usize = 4;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;

/// Memory the xz decoder may use for its dictionary. The kernel compresses modules with a
/// 1 MiB dictionary (`xz --lzma2=dict=1MiB`); `xz -9` needs 64 MiB. A header asking for more
/// is refused instead of allocated.
const XZ_MEMLIMIT: u64 = 256 << 20;

/// How a module file is compressed (detected by magic bytes, not by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain ELF file (anything without an xz or zstd magic).
    None,
    /// An xz stream (`.ko.xz`).
    Xz,
    /// A zstd frame (`.ko.zst`).
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        })
    }
}

/// What the signature trailer says, in `modinfo`'s terms.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModuleSignature {
    /// `sig_id`: `PKCS#7` for every kernel since 4.3; `X509` or `PGP` for older formats.
    pub id_type: String,
    /// Length of the signature data (for PKCS#7: the whole DER message).
    pub signature_len: u32,
    /// `signer`: for PKCS#7, the common name of the signing certificate's issuer.
    pub signer: Option<String>,
    /// `sig_key`: for PKCS#7, the certificate serial number, as colon-separated upper-case hex.
    pub key_id: Option<String>,
    /// `sig_hashalgo`: `sha256`, `sha512`, … (a dotted OID when the algorithm is unknown).
    pub hash_algo: Option<String>,
    /// Whether `key_id` is the key's subject key identifier (`sign-file -k`; then `signer` is
    /// `None`) rather than the certificate's serial number; the kernel looks keys up by either
    /// (crypto/asymmetric_keys/pkcs7_parser.c `pkcs7_sig_note_skid`, `pkcs7_sig_note_serial`).
    #[serde(skip)]
    pub key_id_is_skid: bool,
}

/// What a module file says of itself: its `.modinfo` keys, signature trailer and compression.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModInfo {
    /// The module name as the kernel spells it (underscores). From `name=`, or, for modules
    /// built before modpost wrote `name=` (Linux < 4.13), from the file name: see
    /// [`name_from_path`].
    pub name: String,
    /// `vermagic=`, whole (`6.8.0-45-generic SMP preempt mod_unload modversions`); its first
    /// word is the kernel release ([`vermagic_release`]).
    pub vermagic: String,
    /// `depends=`, split on commas; empty when the key is empty or absent. Spelled as modpost
    /// writes it (file-name form, which may contain hyphens).
    pub depends: Vec<String>,
    /// `version=` (`MODULE_VERSION`; the driver version for NVIDIA's modules), if present.
    pub version: Option<String>,
    /// `srcversion=`: modpost's checksum of the module's sources, if present.
    pub srcversion: Option<String>,
    /// `license=` (the first one), if present.
    pub license: Option<String>,
    /// `parmtype=` entries: (parameter name, type).
    pub parameters: Vec<(String, String)>,
    /// The appended signature, `None` for an unsigned module.
    pub signature: Option<ModuleSignature>,
    /// How the file itself is compressed.
    pub compression: Compression,
    /// Symbols the module exports (`EXPORT_SYMBOL*`), from `__ksymtab_strings`, as depmod
    /// reads them. Not part of `modinfo --json`.
    #[serde(skip)]
    pub exports: Vec<String>,
    /// Symbols the module needs from the kernel or other modules: the undefined entries of its
    /// `.symtab`, as depmod reads them. Not part of `modinfo --json`.
    #[serde(skip)]
    pub imports: Vec<String>,
    /// Every `softdep=` (`MODULE_SOFTDEP`), as written (`pre: a b post: c`), in order: depmod
    /// copies each to a `softdep <module> <value>` line of `modules.softdep`
    /// (`tools/depmod.c` `output_softdeps`). Not part of `modinfo --json`.
    #[serde(skip)]
    pub softdeps: Vec<String>,
    /// The ELF header's `e_machine`: the architecture the module was built for (see
    /// [`arch_of_machine`]). Not part of `modinfo --json`.
    #[serde(skip)]
    pub machine: u16,
}

/// Errors reading a module file or checking what it says; every `path` is the file as given
/// to the reader.
#[derive(Debug, thiserror::Error)]
pub enum ModinfoError {
    /// The file could not be opened, stat'ed or read.
    #[error("cannot read kernel module {path}: {error}")]
    Read {
        /// The module file.
        path: PathBuf,
        /// The I/O error.
        error: io::Error,
    },
    /// The file is larger than [`MAX_MODULE_SIZE`] (checked before reading it, and again while
    /// reading).
    #[error(
        "{path}: file is {size} bytes, over the {limit}-byte limit for a kernel module; \
         check that the path names a module file"
    )]
    FileTooLarge {
        /// The module file.
        path: PathBuf,
        /// Its size in bytes (what was read, if it grew while being read).
        size: u64,
        /// [`MAX_MODULE_SIZE`].
        limit: u64,
    },
    /// The xz or zstd decoder failed: a truncated or damaged stream, or an xz dictionary
    /// over the decoder's memory limit.
    #[error(
        "{path}: cannot decompress {compression} data: {error}; the file is truncated or \
         damaged, reinstall the overlay that provides it"
    )]
    Decompress {
        /// The module file as given to the reader (a `module data` placeholder for [`decompress`]).
        path: PathBuf,
        /// The format that failed to decode.
        compression: Compression,
        /// The decoder's error.
        error: io::Error,
    },
    /// The decompressed data would exceed the limit (a damaged file or a decompression bomb).
    #[error(
        "{path}: module data (compression: {compression}) is larger than {limit} bytes once \
         decompressed, the limit for a kernel module; the file is damaged or not a module"
    )]
    DecompressedTooLarge {
        /// The module file as given to the reader (a `module data` placeholder for [`decompress`]).
        path: PathBuf,
        /// The format being decoded.
        compression: Compression,
        /// The output limit in bytes that was hit.
        limit: u64,
    },
    /// The file ends with the signature magic, but the trailer's lengths reach back further
    /// than the file (or the signature length is zero).
    #[error(
        "{path}: truncated signature: the trailer declares {declared} bytes of signature data \
         but only {available} bytes precede it; the file is damaged, reinstall the overlay"
    )]
    TruncatedSignature {
        /// The module file.
        path: PathBuf,
        /// Signature, signer and key-id bytes the trailer declares.
        declared: u64,
        /// Bytes before the trailer's fixed-size header.
        available: u64,
    },
    /// The signature trailer's `id_type` is none of PGP (0), X509 (1), PKCS#7 (2).
    #[error(
        "{path}: signature trailer has id type {id_type}, expected 0 (PGP), 1 (X509) or \
         2 (PKCS#7); the file is damaged"
    )]
    UnknownSignatureType {
        /// The module file.
        path: PathBuf,
        /// The `id_type` byte found.
        id_type: u8,
    },
    /// The (decompressed, signature-stripped) data does not start with the ELF magic.
    #[error(
        "{path}: not a kernel module: expected an ELF file (magic 7f 45 4c 46), found {found}"
    )]
    NotElf {
        /// The module file.
        path: PathBuf,
        /// What it starts with instead (`bytes 1f8b0800`, or `an empty file`).
        found: String,
    },
    /// The ELF header or section table cannot be parsed, or the ELF class is neither 32 nor 64 bit.
    #[error(
        "{path}: not a kernel module: malformed ELF ({reason}); the file is truncated or damaged"
    )]
    MalformedElf {
        /// The module file.
        path: PathBuf,
        /// What is wrong, from the ELF parser or the class check.
        reason: String,
    },
    /// The file is ELF but not a relocatable object (`ET_REL`), e.g. an executable or shared
    /// object.
    #[error(
        "{path}: not a kernel module: ELF type is {found}, expected a relocatable object \
         (ET_REL) as every .ko is"
    )]
    NotRelocatable {
        /// The module file.
        path: PathBuf,
        /// The ELF type found (`ET_EXEC (an executable)`, …).
        found: String,
    },
    /// The ELF object has no `.modinfo` section.
    #[error("{path}: not a kernel module: no .modinfo section")]
    NoModinfo {
        /// The module file.
        path: PathBuf,
    },
    /// `.modinfo` has no `vermagic=` entry.
    #[error("{path}: not a kernel module: .modinfo has no vermagic= entry")]
    NoVermagic {
        /// The module file.
        path: PathBuf,
    },
    /// `.modinfo` has no (non-empty) `name=` and [`name_from_path`] gets none from the path
    /// (no file name, not UTF-8, or nothing before the `.ko` suffix).
    #[error(
        "{path}: .modinfo has no name= entry and the file name does not give one \
         (expected NAME.ko, NAME.ko.xz or NAME.ko.zst)"
    )]
    NoName {
        /// The module file.
        path: PathBuf,
    },
    /// [`check_vermagic`]: the module's vermagic names another kernel release.
    #[error(
        "module {module} was built for kernel {found:?} but the target kernel is {expected:?}; \
         use an overlay built for kernel {expected}"
    )]
    VermagicMismatch {
        /// The module file.
        module: PathBuf,
        /// The module's whole `vermagic=` string.
        found: String,
        /// The kernel release it should have been built for.
        expected: String,
    },
    /// [`check_arch`]: the module was built for another architecture than the overlay's.
    #[error(
        "module {module} was built for {found} but the overlay is for {expected}; \
         build the modules for {expected} (or pack them with --arch {found})"
    )]
    ArchMismatch {
        /// The module file.
        module: PathBuf,
        /// The architecture its ELF header names.
        found: String,
        /// The overlay's architecture.
        expected: String,
    },
    /// The module's `name=` differs from the name its file name gives (raised by the overlay
    /// source check, `overlay::source::check_modules`, not by this module's readers).
    #[error(
        "{path} is named for module {file_name} but its .modinfo says it is {claimed}; \
         the overlay is inconsistent, rebuild it"
    )]
    NameMismatch {
        /// The module file.
        path: PathBuf,
        /// The name from the file name ([`name_from_path`]: underscores, no `.ko*`).
        file_name: String,
        /// The `name=` from `.modinfo`.
        claimed: String,
    },
}

/// Compression by magic bytes: xz `FD 37 7A 58 5A 00`, zstd `28 B5 2F FD`, else none.
pub fn detect_compression(bytes: &[u8]) -> Compression {
    if bytes.starts_with(XZ_MAGIC) {
        Compression::Xz
    } else if bytes.starts_with(ZSTD_MAGIC) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Decompresses `bytes`, refusing output longer than `limit` bytes. Memory use is bounded by
/// `limit` (plus the decoder's own state), however large the stream claims or turns out to be.
pub fn decompress(bytes: &[u8], c: Compression, limit: u64) -> Result<Vec<u8>, ModinfoError> {
    decompress_at(bytes, c, limit, Path::new("module data"))
}

fn decompress_at(
    bytes: &[u8],
    compression: Compression,
    limit: u64,
    path: &Path,
) -> Result<Vec<u8>, ModinfoError> {
    let decompress_err = |source| ModinfoError::Decompress {
        path: path.to_path_buf(),
        compression,
        error: source,
    };
    let mut out = Vec::new();
    let within_limit = match compression {
        Compression::None => read_bounded(bytes, limit, &mut out),
        Compression::Xz => {
            let stream = xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0)
                .map_err(|e| decompress_err(e.into()))?;
            read_bounded(
                xz2::bufread::XzDecoder::new_stream(bytes, stream),
                limit,
                &mut out,
            )
        }
        Compression::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::with_buffer(bytes).map_err(decompress_err)?;
            read_bounded(decoder, limit, &mut out)
        }
    }
    .map_err(decompress_err)?;
    if !within_limit {
        return Err(ModinfoError::DecompressedTooLarge {
            path: path.to_path_buf(),
            compression,
            limit,
        });
    }
    Ok(out)
}

/// Reads at most `limit + 1` bytes from `reader` into `out`, growing `out` geometrically but
/// never past `limit + 1` bytes of capacity. Returns whether the input fit within `limit`.
fn read_bounded(reader: impl Read, limit: u64, out: &mut Vec<u8>) -> io::Result<bool> {
    const CHUNK: usize = 64 * 1024;
    let cap = limit.saturating_add(1);
    let cap_usize = usize::try_from(cap).unwrap_or(usize::MAX);
    let mut reader = reader.take(cap);
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let needed = out.len() + n;
        if out.capacity() < needed {
            let target = out
                .capacity()
                .saturating_mul(2)
                .max(CHUNK)
                .min(cap_usize)
                .max(needed);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
    Ok(out.len() as u64 <= limit)
}

/// Reads a module file (plain, `.ko.xz` or `.ko.zst`; the contents decide, not the name).
pub fn read_module_file(path: &Path) -> Result<ModInfo, ModinfoError> {
    let read_err = |source| ModinfoError::Read {
        path: path.to_path_buf(),
        error: source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > MAX_MODULE_SIZE {
        return Err(ModinfoError::FileTooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_MODULE_SIZE,
        });
    }
    if size > READ_IN_PARTS_ABOVE {
        if let Some(info) = read_plain_in_parts(&file, size, path)? {
            return Ok(info);
        }
    }
    let mut bytes = Vec::new();
    if !read_bounded(file, MAX_MODULE_SIZE, &mut bytes).map_err(read_err)? {
        // The file grew between stat and read.
        return Err(ModinfoError::FileTooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit: MAX_MODULE_SIZE,
        });
    }
    parse_module(&bytes, path)
}

/// [`read_module_file`] for a large plain module without reading it whole: `None` when the
/// file is compressed, or its signature trailer reaches further back than [`TRAILER_READ`]
/// (then the caller reads it whole, and errors are found there as for any file).
fn read_plain_in_parts(
    file: &File,
    size: u64,
    path: &Path,
) -> Result<Option<ModInfo>, ModinfoError> {
    let read_err = |source| ModinfoError::Read {
        path: path.to_path_buf(),
        error: source,
    };
    let mut head = [0u8; EI_CLASS + 1];
    file.read_exact_at(&mut head, 0).map_err(read_err)?;
    if !head.starts_with(ELF_MAGIC) {
        return Ok(None);
    }
    let tail_len = TRAILER_READ.min(size);
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, size - tail_len)
        .map_err(read_err)?;
    let signature = match split_signature(&tail, path) {
        Ok((_, signature)) => signature,
        Err(ModinfoError::TruncatedSignature { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Reads (and caches) only the ranges the ELF parser asks for.
    let cache = ReadCache::new(file);
    let (modinfo, symbols, machine) = match head[EI_CLASS] {
        ELFCLASS64 => modinfo_section_in::<elf::FileHeader64<Endianness>, _>(&cache, path)?,
        ELFCLASS32 => modinfo_section_in::<elf::FileHeader32<Endianness>, _>(&cache, path)?,
        _ => return Ok(None),
    };
    let mut info = parse_modinfo_strings(modinfo, path, Compression::None, signature)?;
    (info.exports, info.imports) = symbols;
    info.machine = machine;
    tracing::debug!(module = %path.display(), name = %info.name, vermagic = %info.vermagic,
        signed = info.signature.is_some(), "read module info (in parts)");
    Ok(Some(info))
}

/// Parses a module from its file contents, plain or compressed (detected by magic bytes).
/// `origin` names the file in errors and gives the module name when `.modinfo` has no `name=`.
pub fn parse_module(bytes: &[u8], origin: &Path) -> Result<ModInfo, ModinfoError> {
    let compression = detect_compression(bytes);
    let decompressed;
    let plain = match compression {
        Compression::None => bytes,
        c => {
            decompressed = decompress_at(bytes, c, MAX_MODULE_SIZE, origin)?;
            &decompressed[..]
        }
    };
    let (elf_bytes, signature) = split_signature(plain, origin)?;
    let (modinfo, symbols, machine) = modinfo_section(elf_bytes, origin)?;
    let mut info = parse_modinfo_strings(modinfo, origin, compression, signature)?;
    (info.exports, info.imports) = symbols;
    info.machine = machine;
    tracing::debug!(
        module = %origin.display(),
        name = %info.name,
        vermagic = %info.vermagic,
        %compression,
        signed = info.signature.is_some(),
        "read module info"
    );
    Ok(info)
}

/// The kernel release a vermagic string was built for: its first word.
pub fn vermagic_release(vermagic: &str) -> &str {
    vermagic.split_whitespace().next().unwrap_or("")
}

/// Checks that the module was built for kernel release `kver` exactly, as the kernel's own
/// vermagic check would (the rest of vermagic, `SMP preempt mod_unload …`, follows from the
/// release for the kernels we target).
pub fn check_vermagic(info: &ModInfo, path: &Path, kver: &str) -> Result<(), ModinfoError> {
    if vermagic_release(&info.vermagic) == kver {
        Ok(())
    } else {
        Err(ModinfoError::VermagicMismatch {
            module: path.to_path_buf(),
            found: info.vermagic.clone(),
            expected: kver.to_string(),
        })
    }
}

/// The `uname -m` name of an ELF `e_machine` (include/uapi/linux/elf-em.h), for the
/// architectures Linux GPU hosts run; `None` for others.
pub fn arch_of_machine(machine: u16) -> Option<&'static str> {
    match machine {
        62 => Some("x86_64"),   // EM_X86_64
        183 => Some("aarch64"), // EM_AARCH64
        21 => Some("ppc64le"),  // EM_PPC64
        22 => Some("s390x"),    // EM_S390
        243 => Some("riscv64"), // EM_RISCV
        _ => None,
    }
}

/// Checks that the module was built for architecture `arch` (`uname -m` spelling), as the
/// kernel's `elf_check_arch` would refuse it otherwise (`ENOEXEC`, "Invalid module format").
pub fn check_arch(info: &ModInfo, path: &Path, arch: &str) -> Result<(), ModinfoError> {
    if arch_of_machine(info.machine) == Some(arch) {
        return Ok(());
    }
    Err(ModinfoError::ArchMismatch {
        module: path.to_path_buf(),
        found: arch_of_machine(info.machine)
            .map(str::to_string)
            .unwrap_or_else(|| format!("ELF machine {}", info.machine)),
        expected: arch.to_string(),
    })
}

/// The module name from a file name, for modules whose `.modinfo` lacks `name=` (modpost
/// writes it since Linux 4.13). The kernel takes the name from `struct module` in
/// `.gnu.linkonce.this_module`, whose layout differs by kernel version and architecture, so
/// we use what `kmod` uses for files: the file name without `.ko`, `.ko.xz`, `.ko.zst` or
/// `.ko.gz`, with `-` turned into `_`.
pub fn name_from_path(path: &Path) -> Option<String> {
    let file_name = path.file_name()?.to_str()?;
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .unwrap_or(file_name);
    if stem.is_empty() {
        return None;
    }
    Some(stem.replace('-', "_"))
}

/// Renders `info` the way kmod's `modinfo FILE` does: `key:` padded to 16 columns, fields in
/// the order modpost usually writes them, signature fields only for signed modules.
/// `parm:` lines are left out: `modinfo` merges them with descriptions we do not keep.
pub fn modinfo_lines(info: &ModInfo, path: &Path) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        out.push_str(&format!("{:<16}{}\n", format!("{key}:"), value));
    };
    line("filename", &path.display().to_string());
    if let Some(version) = &info.version {
        line("version", version);
    }
    if let Some(license) = &info.license {
        line("license", license);
    }
    if let Some(srcversion) = &info.srcversion {
        line("srcversion", srcversion);
    }
    line("depends", &info.depends.join(","));
    line("name", &info.name);
    line("vermagic", &info.vermagic);
    if let Some(sig) = &info.signature {
        line("sig_id", &sig.id_type);
        if let Some(signer) = &sig.signer {
            line("signer", signer);
        }
        if let Some(key_id) = &sig.key_id {
            line("sig_key", key_id);
        }
        if let Some(hash_algo) = &sig.hash_algo {
            line("sig_hashalgo", hash_algo);
        }
    }
    out
}

/// Splits a signed module into its ELF part and the parsed signature trailer:
///
/// ```text
/// [ ELF ][ signer (signer_len) ][ key id (key_id_len) ][ signature (sig_len) ]
/// [ struct module_signature, 12 bytes ][ "~Module signature appended~\n" ]
/// ```
///
/// PKCS#7 signatures (every kernel since 4.3) have `signer_len = key_id_len = 0` and carry
/// signer and key inside the DER message.
fn split_signature<'a>(
    bytes: &'a [u8],
    path: &Path,
) -> Result<(&'a [u8], Option<ModuleSignature>), ModinfoError> {
    let Some(rest) = bytes.strip_suffix(MODULE_SIG_MAGIC) else {
        return Ok((bytes, None));
    };
    let truncated = |declared: u64| ModinfoError::TruncatedSignature {
        path: path.to_path_buf(),
        declared,
        available: rest.len().saturating_sub(MODULE_SIGNATURE_LEN) as u64,
    };
    let Some(header_at) = rest.len().checked_sub(MODULE_SIGNATURE_LEN) else {
        return Err(truncated(MODULE_SIGNATURE_LEN as u64));
    };
    let header = &rest[header_at..];
    let (hash, id_type, signer_len, key_id_len) = (header[1], header[2], header[3], header[4]);
    let sig_len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    let id_name = match id_type {
        0 => "PGP",
        1 => "X509",
        2 => "PKCS#7",
        _ => {
            return Err(ModinfoError::UnknownSignatureType {
                path: path.to_path_buf(),
                id_type,
            })
        }
    };
    let declared = u64::from(sig_len) + u64::from(signer_len) + u64::from(key_id_len);
    if sig_len == 0 || declared > header_at as u64 {
        return Err(truncated(declared));
    }
    // `declared <= header_at`, a usize, so these cannot overflow.
    let sig_at = header_at - sig_len as usize;
    let key_at = sig_at - usize::from(key_id_len);
    let signer_at = key_at - usize::from(signer_len);
    let sig_data = &rest[sig_at..header_at];

    let mut signature = ModuleSignature {
        id_type: id_name.to_string(),
        signature_len: sig_len,
        signer: None,
        key_id: None,
        hash_algo: None,
        key_id_is_skid: false,
    };
    if id_type == 2 {
        if let Some(p7) = pkcs7::signer_info(sig_data) {
            signature.signer = p7.signer;
            signature.key_id = p7.key_id;
            signature.key_id_is_skid = p7.by_skid;
            signature.hash_algo = p7.hash_algo;
        } else {
            tracing::debug!(module = %path.display(), "PKCS#7 signature not understood");
        }
    } else {
        let signer = &rest[signer_at..key_at];
        let key_id = &rest[key_at..sig_at];
        signature.signer =
            (!signer.is_empty()).then(|| String::from_utf8_lossy(signer).into_owned());
        signature.key_id = (!key_id.is_empty()).then(|| colon_hex(key_id));
        signature.hash_algo = LEGACY_HASH_ALGOS
            .get(usize::from(hash))
            .map(|s| s.to_string());
    }
    Ok((&bytes[..signer_at], Some(signature)))
}

/// The kernel's old `enum pkey_hash_algo`, used by pre-PKCS#7 signatures.
const LEGACY_HASH_ALGOS: &[&str] = &[
    "md4", "md5", "sha1", "rmd160", "sha256", "sha384", "sha512", "sha224", "sm3",
];

/// `1A:2B:3C`, as `modinfo` prints key ids.
fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `.modinfo` section's bytes, after checking the file is an ELF relocatable object.
/// What a module exports and imports: (exported names, undefined symbol names).
type Symbols = (Vec<String>, Vec<String>);

/// `.modinfo`, the symbols and `e_machine` of a module's ELF image.
type ModuleElf<'a> = (&'a [u8], Symbols, u16);

fn modinfo_section<'a>(bytes: &'a [u8], path: &Path) -> Result<ModuleElf<'a>, ModinfoError> {
    if !bytes.starts_with(ELF_MAGIC) {
        let head = &bytes[..bytes.len().min(4)];
        let found = if head.is_empty() {
            "an empty file".to_string()
        } else {
            format!("bytes {}", hex::encode(head))
        };
        return Err(ModinfoError::NotElf {
            path: path.to_path_buf(),
            found,
        });
    }
    match bytes.get(EI_CLASS).copied() {
        Some(ELFCLASS64) => modinfo_section_in::<elf::FileHeader64<Endianness>, _>(bytes, path),
        Some(ELFCLASS32) => modinfo_section_in::<elf::FileHeader32<Endianness>, _>(bytes, path),
        other => Err(ModinfoError::MalformedElf {
            path: path.to_path_buf(),
            reason: match other {
                Some(class) => format!("ELF class {class}, expected 1 (32-bit) or 2 (64-bit)"),
                None => "file ends inside the ELF header".to_string(),
            },
        }),
    }
}

fn modinfo_section_in<'a, H, R>(bytes: R, path: &Path) -> Result<ModuleElf<'a>, ModinfoError>
where
    H: FileHeader<Endian = Endianness>,
    R: ReadRef<'a>,
{
    let malformed = |e: object::read::Error| ModinfoError::MalformedElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let header = H::parse(bytes).map_err(malformed)?;
    let endian = header.endian().map_err(malformed)?;
    let e_type = header.e_type(endian);
    if e_type != elf::ET_REL {
        let found = match e_type {
            elf::ET_NONE => "ET_NONE".to_string(),
            elf::ET_EXEC => "ET_EXEC (an executable)".to_string(),
            elf::ET_DYN => "ET_DYN (a shared object or PIE)".to_string(),
            elf::ET_CORE => "ET_CORE (a core dump)".to_string(),
            other => format!("{:#06x}", other.0),
        };
        return Err(ModinfoError::NotRelocatable {
            path: path.to_path_buf(),
            found,
        });
    }
    let sections = header.sections(endian, bytes).map_err(malformed)?;
    let Some((_, section)) = sections.section_by_name(endian, b".modinfo") else {
        return Err(ModinfoError::NoModinfo {
            path: path.to_path_buf(),
        });
    };
    let modinfo = section.data(endian, bytes).map_err(malformed)?;
    Ok((
        modinfo,
        symbols_in(&sections, endian, bytes).map_err(malformed)?,
        header.e_machine(endian).0,
    ))
}

/// The module's exported symbols (`__ksymtab_strings`, NUL-separated names) and its undefined
/// symbols (`.symtab` entries in no section), as kmod's depmod reads them
/// (`kmod_elf_get_symbols`, `kmod_elf_get_dependency_symbols` in libkmod-elf.c): depmod derives
/// `modules.dep` from these, not from `depends=`.
fn symbols_in<'a, H, R>(
    sections: &object::read::elf::SectionTable<'a, H, R>,
    endian: Endianness,
    bytes: R,
) -> Result<Symbols, object::read::Error>
where
    H: FileHeader<Endian = Endianness>,
    R: ReadRef<'a>,
{
    let exports = match sections.section_by_name(endian, b"__ksymtab_strings") {
        Some((_, section)) => section
            .data(endian, bytes)?
            .split(|&b| b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect(),
        None => Vec::new(),
    };
    let table = sections.symbols(endian, bytes, elf::SHT_SYMTAB)?;
    let mut imports = Vec::new();
    for symbol in table.iter() {
        if symbol.st_shndx(endian) != elf::SHN_UNDEF {
            continue;
        }
        let name = symbol.name(endian, table.strings())?;
        if !name.is_empty() {
            imports.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok((exports, imports))
}

/// Interprets the `.modinfo` strings. For single-valued keys the first occurrence wins, as in
/// the kernel's `get_modinfo()`; entries without `=` are skipped.
fn parse_modinfo_strings(
    section: &[u8],
    path: &Path,
    compression: Compression,
    signature: Option<ModuleSignature>,
) -> Result<ModInfo, ModinfoError> {
    let mut name = None;
    let mut vermagic = None;
    let mut depends = None;
    let mut version = None;
    let mut srcversion = None;
    let mut license = None;
    let mut parameters = Vec::new();
    let mut softdeps = Vec::new();
    for entry in section.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let slot = match key {
            "name" => &mut name,
            "vermagic" => &mut vermagic,
            "depends" => &mut depends,
            "version" => &mut version,
            "srcversion" => &mut srcversion,
            "license" => &mut license,
            "softdep" => {
                softdeps.push(value.to_string());
                continue;
            }
            "parmtype" => {
                if let Some((parm, ty)) = value.split_once(':') {
                    parameters.push((parm.to_string(), ty.to_string()));
                }
                continue;
            }
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.to_string());
        }
    }
    let vermagic = vermagic.ok_or_else(|| ModinfoError::NoVermagic {
        path: path.to_path_buf(),
    })?;
    let name = match name.filter(|n| !n.is_empty()) {
        Some(name) => name,
        None => name_from_path(path).ok_or_else(|| ModinfoError::NoName {
            path: path.to_path_buf(),
        })?,
    };
    let depends = depends
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    Ok(ModInfo {
        name,
        vermagic,
        depends,
        version,
        srcversion,
        license,
        parameters,
        signature,
        compression,
        exports: Vec::new(),
        imports: Vec::new(),
        softdeps,
        machine: 0,
    })
}

/// Just enough PKCS#7 (RFC 2315) / CMS (RFC 5652) DER reading to find what `modinfo` prints
/// for a signature. The walk follows one fixed path into the structure (no recursion, so
/// nesting depth is bounded by the code), and every length is checked against the bytes
/// that remain; anything unexpected ends the walk with `None`.
mod pkcs7 {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const INTEGER: u8 = 0x02;
    const OID: u8 = 0x06;
    const CONTEXT_0: u8 = 0xA0;
    const CONTEXT_1: u8 = 0xA1;
    /// `[0] IMPLICIT SubjectKeyIdentifier` in a CMS SignerIdentifier.
    const CONTEXT_0_PRIMITIVE: u8 = 0x80;

    /// 1.2.840.113549.1.7.2
    const OID_SIGNED_DATA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x02];
    /// 2.5.4.3
    const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

    const HASH_ALGOS: &[(&[u8], &str)] = &[
        (&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x02, 0x04], "md4"),
        (&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x02, 0x05], "md5"),
        (&[0x2B, 0x0E, 0x03, 0x02, 0x1A], "sha1"),
        (&[0x2B, 0x24, 0x03, 0x02, 0x01], "ripemd160"),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01],
            "sha256",
        ),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02],
            "sha384",
        ),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03],
            "sha512",
        ),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04],
            "sha224",
        ),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x07],
            "sha3-224",
        ),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x08],
            "sha3-256",
        ),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x09],
            "sha3-384",
        ),
        (
            &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x0A],
            "sha3-512",
        ),
        (&[0x2A, 0x81, 0x1C, 0xCF, 0x55, 0x01, 0x83, 0x11], "sm3"),
    ];

    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct SignerInfo {
        pub signer: Option<String>,
        pub key_id: Option<String>,
        pub hash_algo: Option<String>,
        pub by_skid: bool,
    }

    /// A cursor over a run of DER TLVs.
    struct Der<'a>(&'a [u8]);

    impl<'a> Der<'a> {
        /// The next TLV's tag and contents. Only low tag numbers and definite lengths of up to
        /// four bytes are accepted: DER for anything a module signature holds.
        fn next(&mut self) -> Option<(u8, &'a [u8])> {
            let (&tag, rest) = self.0.split_first()?;
            if tag & 0x1F == 0x1F {
                return None;
            }
            let (&first, mut rest) = rest.split_first()?;
            let len = if first < 0x80 {
                usize::from(first)
            } else {
                let n = usize::from(first & 0x7F);
                if n == 0 || n > 4 || rest.len() < n {
                    return None;
                }
                let (len_bytes, after) = rest.split_at(n);
                rest = after;
                len_bytes.iter().try_fold(0usize, |acc, &b| {
                    acc.checked_mul(256)?.checked_add(b.into())
                })?
            };
            if len > rest.len() {
                return None;
            }
            let (contents, after) = rest.split_at(len);
            self.0 = after;
            Some((tag, contents))
        }

        fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
            match self.next()? {
                (t, contents) if t == tag => Some(contents),
                _ => None,
            }
        }
    }

    /// Signer, key id and digest algorithm of the first SignerInfo in a DER ContentInfo.
    pub(super) fn signer_info(der: &[u8]) -> Option<SignerInfo> {
        let mut content_info = Der(Der(der).expect(SEQUENCE)?);
        if content_info.expect(OID)? != OID_SIGNED_DATA {
            return None;
        }
        let mut signed_data = Der(Der(content_info.expect(CONTEXT_0)?).expect(SEQUENCE)?);
        signed_data.expect(INTEGER)?; // version
        signed_data.expect(SET)?; // digestAlgorithms
        signed_data.expect(SEQUENCE)?; // contentInfo / encapContentInfo
        let signer_infos = loop {
            match signed_data.next()? {
                (CONTEXT_0 | CONTEXT_1, _) => continue, // certificates, crls
                (SET, contents) => break contents,
                _ => return None,
            }
        };
        let mut signer_info = Der(Der(signer_infos).expect(SEQUENCE)?);
        signer_info.expect(INTEGER)?; // version
        let mut out = SignerInfo::default();
        match signer_info.next()? {
            (SEQUENCE, issuer_and_serial) => {
                let mut ias = Der(issuer_and_serial);
                let issuer = ias.expect(SEQUENCE)?;
                let serial = ias.expect(INTEGER)?;
                out.signer = common_name(issuer);
                out.key_id = serial_hex(serial);
            }
            (CONTEXT_0_PRIMITIVE, skid) if !skid.is_empty() => {
                out.key_id = Some(super::colon_hex(skid));
                out.by_skid = true;
            }
            _ => return None,
        }
        let algorithm = Der(signer_info.expect(SEQUENCE)?).expect(OID)?;
        out.hash_algo = Some(hash_name(algorithm)?);
        Some(out)
    }

    /// The first commonName in an X.501 Name, as OpenSSL (and so `modinfo`) finds it.
    fn common_name(name: &[u8]) -> Option<String> {
        let mut rdns = Der(name);
        while let Some(rdn) = rdns.expect(SET) {
            let mut attributes = Der(rdn);
            while let Some(attribute) = attributes.expect(SEQUENCE) {
                let mut attribute = Der(attribute);
                if attribute.expect(OID)? == OID_COMMON_NAME {
                    let (tag, value) = attribute.next()?;
                    return directory_string(tag, value);
                }
            }
        }
        None
    }

    fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
        match tag {
            // UTF8String, PrintableString, IA5String
            0x0C | 0x13 | 0x16 => Some(String::from_utf8_lossy(value).into_owned()),
            // TeletexString: in practice Latin-1
            0x14 => Some(value.iter().map(|&b| char::from(b)).collect()),
            // BMPString: UCS-2 big-endian
            0x1E if value.len().is_multiple_of(2) => {
                let units = value
                    .chunks_exact(2)
                    .map(|p| u16::from_be_bytes([p[0], p[1]]));
                Some(
                    char::decode_utf16(units)
                        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                        .collect(),
                )
            }
            _ => None,
        }
    }

    /// The serial number as `BN_bn2bin` gives it (no sign-padding zeros), in `modinfo` hex.
    fn serial_hex(serial: &[u8]) -> Option<String> {
        let start = serial.iter().position(|&b| b != 0)?;
        Some(super::colon_hex(&serial[start..]))
    }

    /// The algorithm's OpenSSL name, or the dotted OID when we do not know it.
    fn hash_name(oid: &[u8]) -> Option<String> {
        if let Some((_, name)) = HASH_ALGOS.iter().find(|(o, _)| *o == oid) {
            return Some(name.to_string());
        }
        dotted_oid(oid)
    }

    fn dotted_oid(oid: &[u8]) -> Option<String> {
        let mut arcs = Vec::new();
        let mut value: u64 = 0;
        let mut in_arc = false;
        for &b in oid {
            if !in_arc && b == 0x80 {
                return None; // non-minimal encoding
            }
            value = value.checked_mul(128)? | u64::from(b & 0x7F);
            in_arc = b & 0x80 != 0;
            if !in_arc {
                arcs.push(value);
                value = 0;
            }
        }
        if in_arc || arcs.is_empty() {
            return None;
        }
        let first = arcs[0];
        let (a, b) = match first {
            0..=39 => (0, first),
            40..=79 => (1, first - 40),
            _ => (2, first - 80),
        };
        let mut out = format!("{a}.{b}");
        for arc in &arcs[1..] {
            out.push_str(&format!(".{arc}"));
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        use crate::modinfo::fixture_modules::tlv;

        fn message(sid: Vec<u8>, digest_oid: &[u8]) -> Vec<u8> {
            let alg = tlv(SEQUENCE, &tlv(OID, digest_oid));
            let signer_info = tlv(
                SEQUENCE,
                &[tlv(INTEGER, &[1]), sid, alg.clone(), tlv(0x04, &[0xAA; 4])].concat(),
            );
            let signed_data = tlv(
                SEQUENCE,
                &[
                    tlv(INTEGER, &[1]),
                    tlv(SET, &alg),
                    tlv(
                        SEQUENCE,
                        &tlv(OID, &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 1, 7, 1]),
                    ),
                    tlv(CONTEXT_0, &tlv(SEQUENCE, &[0; 3])),
                    tlv(SET, &signer_info),
                ]
                .concat(),
            );
            tlv(
                SEQUENCE,
                &[tlv(OID, OID_SIGNED_DATA), tlv(CONTEXT_0, &signed_data)].concat(),
            )
        }

        fn issuer_and_serial(cn_tag: u8, cn: &[u8], serial: &[u8]) -> Vec<u8> {
            let rdn = |oid: &[u8], tag: u8, value: &[u8]| {
                tlv(
                    SET,
                    &tlv(SEQUENCE, &[tlv(OID, oid), tlv(tag, value)].concat()),
                )
            };
            let name = tlv(
                SEQUENCE,
                &[
                    rdn(&[0x55, 0x04, 0x0A], 0x0C, b"Org"),
                    rdn(OID_COMMON_NAME, cn_tag, cn),
                ]
                .concat(),
            );
            tlv(SEQUENCE, &[name, tlv(INTEGER, serial)].concat())
        }

        #[test]
        fn serial_sign_padding_is_dropped() {
            let der = message(
                issuer_and_serial(0x13, b"Build key", &[0x00, 0x80, 0x01]),
                &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03],
            );
            let info = signer_info(&der).unwrap();
            assert_eq!(info.signer.as_deref(), Some("Build key"));
            assert_eq!(info.key_id.as_deref(), Some("80:01"));
            assert_eq!(info.hash_algo.as_deref(), Some("sha512"));
        }

        #[test]
        fn bmp_string_common_name_is_decoded() {
            let cn: Vec<u8> = "Clé".encode_utf16().flat_map(u16::to_be_bytes).collect();
            let der = message(
                issuer_and_serial(0x1E, &cn, &[0x05]),
                &[0x2B, 0x0E, 3, 2, 0x1A],
            );
            let info = signer_info(&der).unwrap();
            assert_eq!(info.signer.as_deref(), Some("Clé"));
            assert_eq!(info.hash_algo.as_deref(), Some("sha1"));
        }

        #[test]
        fn subject_key_identifier_gives_key_id_only() {
            let der = message(
                tlv(CONTEXT_0_PRIMITIVE, &[0xDE, 0xAD, 0xBE, 0xEF]),
                &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x08],
            );
            let info = signer_info(&der).unwrap();
            assert_eq!(info.signer, None);
            assert_eq!(info.key_id.as_deref(), Some("DE:AD:BE:EF"));
            assert!(info.by_skid);
            assert_eq!(info.hash_algo.as_deref(), Some("sha3-256"));
        }

        #[test]
        fn unknown_digest_is_printed_as_dotted_oid() {
            let der = message(
                issuer_and_serial(0x0C, b"k", &[1]),
                &[0x2A, 0x03, 0x81, 0x00],
            );
            let info = signer_info(&der).unwrap();
            assert_eq!(info.hash_algo.as_deref(), Some("1.2.3.128"));
        }

        #[test]
        fn every_truncation_and_garbage_gives_none_without_panic() {
            let der = message(
                issuer_and_serial(0x0C, b"Fixture", &[0x1A]),
                &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01],
            );
            assert!(signer_info(&der).is_some());
            for cut in 0..der.len() {
                assert_eq!(signer_info(&der[..cut]), None, "cut at {cut}");
            }
            // Lengths that point past the end, indefinite and over-long length forms,
            // high tag numbers.
            for garbage in [
                &[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF][..],
                &[0x30, 0x80, 0x00, 0x00],
                &[0x30, 0x89, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                &[0x3F, 0x01, 0x00],
                &[],
            ] {
                assert_eq!(signer_info(garbage), None);
            }
            // Deep nesting is simply not followed.
            let mut deep = vec![0x05, 0x00];
            for _ in 0..10_000 {
                deep = tlv(SEQUENCE, &deep);
            }
            assert_eq!(signer_info(&deep), None);
        }
    }
}

#[cfg(test)]
#[path = "../tests/common/modules.rs"]
pub(crate) mod fixture_modules;

#[cfg(test)]
mod tests {
    use super::fixture_modules::FixtureModule;
    use super::*;
    use std::io::Write;

    const KVER: &str = "6.8.0-45-generic";

    fn uvm() -> FixtureModule {
        FixtureModule::new("nvidia-uvm", KVER, "570.86.15").depends(&["nvidia"])
    }

    fn parse(bytes: &[u8]) -> Result<ModInfo, ModinfoError> {
        parse_module(bytes, Path::new("/overlay/nvidia-uvm.ko"))
    }

    /// Exports and imports as depmod reads them, in every form the module comes in (whole,
    /// compressed, and read in parts).
    #[test]
    fn exported_and_undefined_symbols_are_read() {
        let module = uvm()
            .exports(&["nvUvmInterfaceRegisterGpu", "nv_uvm_helper"])
            .imports(&["rm_gpu_ops_create_session", "printk"]);
        for c in [Compression::None, Compression::Xz, Compression::Zstd] {
            let info = parse(&module.bytes(c)).unwrap();
            assert_eq!(
                info.exports,
                ["nvUvmInterfaceRegisterGpu", "nv_uvm_helper"],
                "{c}"
            );
            let mut imports = info.imports.clone();
            imports.sort();
            assert_eq!(imports, ["printk", "rm_gpu_ops_create_session"], "{c}");
        }
        let plain = parse(&uvm().bytes(Compression::None)).unwrap();
        assert!(plain.exports.is_empty() && plain.imports.is_empty());
    }

    #[test]
    fn large_plain_modules_read_in_parts_say_what_whole_reads_say() {
        let dir = tempfile::tempdir().unwrap();
        // Above READ_IN_PARTS_ABOVE; signed and unsigned.
        for module in [
            uvm().padded(3 << 20, 3 << 20, 7),
            uvm().padded(3 << 20, 3 << 20, 7).signed(),
            uvm()
                .padded(3 << 20, 3 << 20, 7)
                .exports(&["nv_uvm_helper"])
                .imports(&["rm_gpu_ops_create_session"]),
        ] {
            let bytes = module.bytes(Compression::None);
            assert!(bytes.len() as u64 > READ_IN_PARTS_ABOVE);
            let path = dir.path().join("nvidia-uvm.ko");
            std::fs::write(&path, &bytes).unwrap();
            let file = File::open(&path).unwrap();
            let in_parts = read_plain_in_parts(&file, bytes.len() as u64, &path)
                .unwrap()
                .expect("a plain module is read in parts");
            assert_eq!(in_parts, parse_module(&bytes, &path).unwrap());
            assert_eq!(read_module_file(&path).unwrap(), in_parts);
        }
        // Compressed files are read whole.
        let zst = uvm().padded(3 << 20, 3 << 20, 7).bytes_zstd();
        let path = dir.path().join("nvidia-uvm.ko.zst");
        std::fs::write(&path, &zst).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(
            read_plain_in_parts(&file, zst.len() as u64, &path).unwrap(),
            None
        );
    }

    #[test]
    fn plain_xz_and_zstd_modules_parse_alike() {
        let module = uvm().parameter("uvm_perf_prefetch_enable", "uint");
        let plain = parse(&module.elf_bytes()).unwrap();
        assert_eq!(plain.name, "nvidia_uvm");
        assert_eq!(
            plain.vermagic,
            format!("{KVER} SMP preempt mod_unload modversions ")
        );
        assert_eq!(plain.depends, vec!["nvidia".to_string()]);
        assert_eq!(plain.version.as_deref(), Some("570.86.15"));
        assert_eq!(plain.license.as_deref(), Some("Dual MIT/GPL"));
        assert!(plain.srcversion.is_some());
        assert_eq!(
            plain.parameters,
            vec![("uvm_perf_prefetch_enable".to_string(), "uint".to_string())]
        );
        assert_eq!(plain.compression, Compression::None);
        assert_eq!(plain.signature, None);

        for (bytes, compression) in [
            (module.bytes_xz(), Compression::Xz),
            (module.bytes_zstd(), Compression::Zstd),
        ] {
            assert_eq!(detect_compression(&bytes), compression);
            let info = parse(&bytes).unwrap();
            assert_eq!(info.compression, compression);
            assert_eq!(
                ModInfo {
                    compression: Compression::None,
                    ..info
                },
                plain
            );
        }
    }

    #[test]
    fn compression_is_detected_by_magic_not_name() {
        assert_eq!(detect_compression(b""), Compression::None);
        assert_eq!(detect_compression(b"\x7fELF"), Compression::None);
        assert_eq!(
            detect_compression(&[0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00, 1]),
            Compression::Xz
        );
        assert_eq!(
            detect_compression(&[0xFD, 0x37, 0x7A, 0x58, 0x5A]),
            Compression::None
        );
        assert_eq!(
            detect_compression(&[0x28, 0xB5, 0x2F, 0xFD]),
            Compression::Zstd
        );
        assert_eq!(
            serde_json::to_string(&Compression::Zstd).unwrap(),
            "\"zstd\""
        );
    }

    #[test]
    fn signed_module_reports_pkcs7_signer_key_and_hash() {
        let module = uvm().signed();
        for bytes in [module.elf_bytes(), module.bytes_xz(), module.bytes_zstd()] {
            let info = parse(&bytes).unwrap();
            let sig = info.signature.expect("signed module");
            assert_eq!(sig.id_type, "PKCS#7");
            assert_eq!(sig.signer.as_deref(), Some("Fixture signing key"));
            assert_eq!(sig.key_id.as_deref(), Some("1A:2B:3C"));
            assert_eq!(sig.hash_algo.as_deref(), Some("sha256"));
            assert!(sig.signature_len > 0);
            assert_eq!(info.name, "nvidia_uvm");
        }
    }

    #[test]
    fn unsigned_module_has_no_signature() {
        assert_eq!(parse(&uvm().elf_bytes()).unwrap().signature, None);
    }

    #[test]
    fn signature_we_cannot_read_still_counts_as_signed() {
        let mut bytes = uvm().elf_bytes();
        let junk = [0x55u8; 40];
        bytes.extend_from_slice(&junk);
        bytes.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&(junk.len() as u32).to_be_bytes());
        bytes.extend_from_slice(MODULE_SIG_MAGIC);
        let sig = parse(&bytes).unwrap().signature.unwrap();
        assert_eq!(sig.id_type, "PKCS#7");
        assert_eq!(sig.signature_len, 40);
        assert_eq!((sig.signer, sig.key_id, sig.hash_algo), (None, None, None));
    }

    #[test]
    fn legacy_x509_trailer_carries_signer_and_key_outside_the_signature() {
        let mut bytes = uvm().elf_bytes();
        bytes.extend_from_slice(b"Old key");
        bytes.extend_from_slice(&[0xAB, 0xCD]);
        bytes.extend_from_slice(&[0x11; 16]);
        bytes.extend_from_slice(&[1, 4, 1, 7, 2, 0, 0, 0]);
        bytes.extend_from_slice(&16u32.to_be_bytes());
        bytes.extend_from_slice(MODULE_SIG_MAGIC);
        let info = parse(&bytes).unwrap();
        let sig = info.signature.unwrap();
        assert_eq!(sig.id_type, "X509");
        assert_eq!(sig.signer.as_deref(), Some("Old key"));
        assert_eq!(sig.key_id.as_deref(), Some("AB:CD"));
        assert_eq!(sig.hash_algo.as_deref(), Some("sha256"));
    }

    #[test]
    fn vermagic_must_match_the_target_release_exactly() {
        let info = parse(&uvm().elf_bytes()).unwrap();
        let path = Path::new("/overlay/nvidia-uvm.ko");
        check_vermagic(&info, path, KVER).unwrap();
        let err = check_vermagic(&info, path, "6.8.0-45").unwrap_err();
        assert!(matches!(err, ModinfoError::VermagicMismatch { .. }));
        let err = check_vermagic(&info, path, "6.8.0-46-generic").unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&info.vermagic), "{message}");
        assert!(message.contains("6.8.0-46-generic"), "{message}");
        assert!(message.contains("/overlay/nvidia-uvm.ko"), "{message}");
        assert!(message.contains("overlay built for kernel"), "{message}");
    }

    #[test]
    fn vermagic_release_is_the_first_word() {
        assert_eq!(
            vermagic_release("6.8.0-45-generic SMP preempt mod_unload "),
            "6.8.0-45-generic"
        );
        assert_eq!(vermagic_release("  5.14.0 SMP"), "5.14.0");
        assert_eq!(vermagic_release(""), "");
    }

    #[test]
    fn truncated_elf_is_a_clear_error() {
        let bytes = uvm().elf_bytes();
        let err = parse(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(err, ModinfoError::MalformedElf { .. }), "{err}");
        assert!(err.to_string().contains("truncated or damaged"), "{err}");
        // No cut point panics.
        for cut in (0..bytes.len()).step_by(7) {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn modinfo_offset_past_the_end_is_an_error() {
        let mut bytes = uvm().elf_bytes();
        let header = elf::FileHeader64::<Endianness>::parse(&bytes[..]).unwrap();
        let endian = header.endian().unwrap();
        let sections = header.sections(endian, &bytes[..]).unwrap();
        let (index, _) = sections.section_by_name(endian, b".modinfo").unwrap();
        let shoff = header.e_shoff(endian) as usize;
        // Elf64_Shdr is 64 bytes; sh_offset is at byte 24.
        let at = shoff + index.0 * 64 + 24;
        bytes[at..at + 8].copy_from_slice(&0xFFFF_FFF0u64.to_le_bytes());
        let err = parse(&bytes).unwrap_err();
        assert!(matches!(err, ModinfoError::MalformedElf { .. }), "{err}");
    }

    #[test]
    fn truncated_xz_is_a_clear_error() {
        let bytes = uvm().bytes_xz();
        let err = parse(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(
            matches!(
                err,
                ModinfoError::Decompress {
                    compression: Compression::Xz,
                    ..
                }
            ),
            "{err}"
        );
        let bytes = uvm().bytes_zstd();
        let err = parse(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(err, ModinfoError::Decompress { .. }), "{err}");
    }

    #[test]
    fn random_bytes_are_not_a_module() {
        // A fixed xorshift sequence: random-looking, reproducible.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let err = parse(&bytes).unwrap_err();
        assert!(matches!(err, ModinfoError::NotElf { .. }), "{err}");
        assert!(err.to_string().contains("not a kernel module"), "{err}");
        let err = parse(b"").unwrap_err();
        assert!(err.to_string().contains("empty file"), "{err}");
        // Random bytes behind an ELF magic are still refused cleanly.
        let mut elfish = b"\x7fELF\x02\x01\x01".to_vec();
        elfish.extend_from_slice(&bytes);
        assert!(parse(&elfish).is_err());
    }

    #[test]
    fn signature_longer_than_the_file_is_a_truncated_signature() {
        let mut bytes = uvm().elf_bytes();
        bytes.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        bytes.extend_from_slice(MODULE_SIG_MAGIC);
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(err, ModinfoError::TruncatedSignature { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("truncated signature"), "{err}");
        // Magic alone, with no room for the header.
        let err = parse(MODULE_SIG_MAGIC).unwrap_err();
        assert!(
            matches!(err, ModinfoError::TruncatedSignature { .. }),
            "{err}"
        );
    }

    #[test]
    fn unknown_signature_id_type_is_refused() {
        let mut bytes = uvm().elf_bytes();
        bytes.extend_from_slice(&[0xAA; 8]);
        bytes.extend_from_slice(&[0, 0, 9, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&8u32.to_be_bytes());
        bytes.extend_from_slice(MODULE_SIG_MAGIC);
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(err, ModinfoError::UnknownSignatureType { id_type: 9, .. }),
            "{err}"
        );
    }

    #[test]
    fn empty_or_absent_depends_is_an_empty_list() {
        let nvidia = FixtureModule::new("nvidia", KVER, "570.86.15");
        let info = parse(&nvidia.elf_bytes()).unwrap();
        assert!(info.depends.is_empty());
        let info = parse(&nvidia.without_key("depends").elf_bytes()).unwrap();
        assert!(info.depends.is_empty());
        let drm = FixtureModule::new("nvidia-drm", KVER, "1").depends(&["nvidia-modeset", "drm"]);
        let info = parse(&drm.elf_bytes()).unwrap();
        assert_eq!(info.depends, vec!["nvidia-modeset", "drm"]);
    }

    #[test]
    fn softdeps_are_kept_in_order_as_written() {
        let nvidia = FixtureModule::new("nvidia", KVER, "1")
            .extra("softdep=pre: ecdh_generic,ecdsa_generic")
            .extra("softdep=post: nvidia-uvm");
        let info = parse(&nvidia.elf_bytes()).unwrap();
        assert_eq!(
            info.softdeps,
            ["pre: ecdh_generic,ecdsa_generic", "post: nvidia-uvm"]
        );
        let plain = FixtureModule::new("nvidia", KVER, "1");
        assert!(parse(&plain.elf_bytes()).unwrap().softdeps.is_empty());
    }

    #[test]
    fn repeated_keys_first_wins_and_aliases_are_ignored() {
        // The fixture writes several alias= and parm= entries, like real modules.
        let info = parse(
            &uvm()
                .parameter("a", "int")
                .parameter("b", "charp")
                .extra("version=second")
                .elf_bytes(),
        )
        .unwrap();
        assert_eq!(info.version.as_deref(), Some("570.86.15"));
        assert_eq!(info.parameters.len(), 2);
        assert_eq!(info.parameters[1], ("b".to_string(), "charp".to_string()));
    }

    #[test]
    fn missing_name_falls_back_to_the_file_name() {
        let bytes = uvm().without_key("name").bytes_xz();
        for path in [
            "/o/nvidia-uvm.ko.xz",
            "/o/nvidia-uvm.ko",
            "/o/nvidia-uvm.ko.zst",
        ] {
            let info = parse_module(&bytes, Path::new(path)).unwrap();
            assert_eq!(info.name, "nvidia_uvm", "{path}");
        }
        let err = parse_module(&bytes, Path::new("/")).unwrap_err();
        assert!(matches!(err, ModinfoError::NoName { .. }), "{err}");
    }

    #[test]
    fn missing_vermagic_or_modinfo_is_not_a_module() {
        let err = parse(&uvm().without_key("vermagic").elf_bytes()).unwrap_err();
        assert!(matches!(err, ModinfoError::NoVermagic { .. }), "{err}");

        use object::write::{Object, StandardSection};
        let mut obj = Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let text = obj.section_id(StandardSection::Text);
        obj.append_section_data(text, &[0xC3], 16);
        let err = parse(&obj.write().unwrap()).unwrap_err();
        assert!(matches!(err, ModinfoError::NoModinfo { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("not a kernel module: no .modinfo section"),
            "{err}"
        );
    }

    #[test]
    fn elf32_big_endian_module_parses() {
        use object::write::Object;
        let mut obj = Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::PowerPc,
            object::Endianness::Big,
        );
        let modinfo = obj.add_section(
            Vec::new(),
            b".modinfo".to_vec(),
            object::SectionKind::ReadOnlyData,
        );
        obj.append_section_data(
            modinfo,
            b"name=thing\0vermagic=5.10.0 SMP mod_unload\0depends=\0",
            1,
        );
        let bytes = obj.write().unwrap();
        assert_eq!(bytes[EI_CLASS], ELFCLASS32);
        let info = parse(&bytes).unwrap();
        assert_eq!(info.name, "thing");
        assert_eq!(vermagic_release(&info.vermagic), "5.10.0");
    }

    #[test]
    fn non_relocatable_elf_is_refused() {
        let mut bytes = uvm().elf_bytes();
        bytes[16..18].copy_from_slice(&elf::ET_DYN.0.to_le_bytes());
        let err = parse(&bytes).unwrap_err();
        assert!(matches!(err, ModinfoError::NotRelocatable { .. }), "{err}");
        assert!(err.to_string().contains("ET_DYN"), "{err}");
    }

    #[test]
    fn decompression_bomb_stops_at_the_limit() {
        const LIMIT: u64 = 1 << 20;
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());

        let err = decompress(&bomb, Compression::Zstd, LIMIT).unwrap_err();
        assert!(
            matches!(err, ModinfoError::DecompressedTooLarge { limit: LIMIT, .. }),
            "{err}"
        );
        // The buffer never grew past the limit (+1 byte to detect the overrun).
        let mut out = Vec::new();
        let decoder = zstd::stream::read::Decoder::with_buffer(&bomb[..]).unwrap();
        assert!(!read_bounded(decoder, LIMIT, &mut out).unwrap());
        assert!(out.capacity() as u64 <= LIMIT + 1, "{}", out.capacity());

        // Exactly at the limit is fine.
        let exact = zstd::encode_all(&zeros[..], 3).unwrap();
        assert_eq!(
            decompress(&exact, Compression::Zstd, LIMIT).unwrap().len() as u64,
            LIMIT
        );
        assert!(decompress(&zeros, Compression::None, LIMIT - 1).is_err());
    }

    #[test]
    fn read_module_file_reads_compressed_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nvidia-uvm.ko.zst");
        std::fs::write(&path, uvm().signed().without_key("name").bytes_zstd()).unwrap();
        let info = read_module_file(&path).unwrap();
        assert_eq!(info.name, "nvidia_uvm");
        assert_eq!(info.compression, Compression::Zstd);
        assert!(info.signature.is_some());

        let err = read_module_file(&dir.path().join("missing.ko")).unwrap_err();
        assert!(matches!(err, ModinfoError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.ko"), "{err}");
    }

    #[test]
    fn modinfo_lines_look_like_kmod_modinfo() {
        let info = parse(&uvm().signed().elf_bytes()).unwrap();
        let text = modinfo_lines(&info, Path::new("/overlay/nvidia-uvm.ko"));
        let expected_start = format!(
            "filename:       /overlay/nvidia-uvm.ko\n\
             version:        570.86.15\n\
             license:        Dual MIT/GPL\n\
             srcversion:     {}\n\
             depends:        nvidia\n\
             name:           nvidia_uvm\n\
             vermagic:       {KVER} SMP preempt mod_unload modversions \n\
             sig_id:         PKCS#7\n\
             signer:         Fixture signing key\n\
             sig_key:        1A:2B:3C\n\
             sig_hashalgo:   sha256\n",
            info.srcversion.as_deref().unwrap()
        );
        assert_eq!(text, expected_start);

        let unsigned = parse(&FixtureModule::new("nvidia", KVER, "1").elf_bytes()).unwrap();
        let text = modinfo_lines(&unsigned, Path::new("nvidia.ko"));
        assert!(text.contains("depends:        \n"), "{text}");
        assert!(!text.contains("sig"), "{text}");
    }

    #[test]
    fn name_from_path_strips_module_extensions() {
        assert_eq!(
            name_from_path(Path::new("a/nvidia-drm.ko.xz")).as_deref(),
            Some("nvidia_drm")
        );
        assert_eq!(
            name_from_path(Path::new("nvidia-peermem.ko")).as_deref(),
            Some("nvidia_peermem")
        );
        assert_eq!(name_from_path(Path::new(".ko")), None);
        assert_eq!(name_from_path(Path::new("/")), None);
    }
}

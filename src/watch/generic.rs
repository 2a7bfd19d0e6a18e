//! Garden Linux, Debian and any other systemd host: the next kernel is the default boot entry's.
//!
//! Evidence, in order:
//! 1. Boot entries as systemd-boot sees them: unified kernel images (type #2) in `EFI/Linux/`
//!    and Boot Loader Specification type #1 entries in `loader/entries/` on the ESP (`/efi`,
//!    `/boot/efi`) and XBOOTLDR (`/boot`). systemd-boot sorts both kinds into one menu and
//!    boots the first entry matching `loader.conf`'s `default` pattern, else the first entry;
//!    [`default_entry`] does the same. A UKI's release is its PE `.uname` section; a type #1
//!    entry's is its kernel's bzImage header, else its `version` field.
//! 2. With no boot entries (Debian with GRUB, whose generated menu boots the newest kernel):
//!    the newest release under `/usr/lib/modules/` that has a kernel image next to it
//!    (`/boot/vmlinuz-<kver>` or `/usr/lib/modules/<kver>/vmlinuz`); a module tree without one
//!    is a partial install and is not bootable.
//!
//! Not read: the `LoaderEntryDefault`/`LoaderEntryOneShot` EFI variables (`bootctl
//! set-default`), `loader.conf` `default @saved`, and GRUB's `GRUB_DEFAULT`.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use object::read::pe::{PeFile32, PeFile64};
use tracing::debug;

use crate::host::kernel::is_kernel_release;
/// The comparator the boot-entry order uses; it lives in [`crate::host::version`].
pub use crate::host::version::version_cmp;
use crate::host::Root;
use crate::watch::flatcar::{bzimage_release, read_image_release, BZIMAGE_HEADER_MAX};
use crate::watch::NextBoot;

/// Where systemd-boot finds unified kernel images (type #2 entries).
pub const UKI_DIRS: [&str; 3] = ["/efi/EFI/Linux", "/boot/EFI/Linux", "/boot/efi/EFI/Linux"];
/// Where systemd-boot finds type #1 entries.
pub const ENTRY_DIRS: [&str; 3] = [
    "/efi/loader/entries",
    "/boot/loader/entries",
    "/boot/efi/loader/entries",
];
/// systemd-boot reads `loader.conf` from the ESP; the first of these that exists is used.
pub const LOADER_CONFS: [&str; 3] = [
    "/efi/loader/loader.conf",
    "/boot/efi/loader/loader.conf",
    "/boot/loader/loader.conf",
];
/// Host directory of the installed kernels' module trees, one `<kernel release>/` each.
pub const MODULES_DIR: &str = "/usr/lib/modules";

/// A UKI's PE headers (DOS stub, NT headers, section table) lie in its first bytes.
const PE_HEADER_MAX: u64 = 64 * 1024;
/// `.uname` holds one release (≤ 64 bytes); anything much larger is not one.
const UNAME_MAX: u32 = 256;
/// `.osrel` is an os-release file: a few hundred bytes.
const OSREL_MAX: u32 = 16 * 1024;
/// A type #1 entry is a handful of lines.
const ENTRY_MAX: u64 = 64 * 1024;

/// Why the generic detector could not read the next boot's kernel, or a UKI's release.
#[derive(Debug, thiserror::Error)]
pub enum GenericError {
    /// A UKI's first 64 KiB are neither a PE32+ nor a PE32 image.
    #[error("not a PE image (a UKI is an EFI PE executable): {detail}")]
    NotPe {
        /// The PE32+ parser's error.
        detail: String,
    },
    /// A PE section's file range runs past the end of the image.
    #[error(
        "the PE section {section} lies at bytes {offset}..{end}, past the {len} bytes of the image"
    )]
    SectionOutOfRange {
        /// The section's name: `.uname`, `.osrel` or `.linux`.
        section: &'static str,
        /// Where the section starts in the file.
        offset: u64,
        /// Where the bytes to read would end: `offset` plus the size to read.
        end: u64,
        /// The image's size in bytes.
        len: u64,
    },
    /// The `.uname` section is larger than 256 bytes, too large to hold a kernel release.
    #[error("the PE section .uname holds {size} bytes; a kernel release is at most 64")]
    UnameTooLarge {
        /// The section's size in bytes.
        size: u32,
    },
    /// A UKI has neither a `.uname` section nor a `.linux` section to read its release from.
    #[error("the image has neither a .uname section nor a .linux section with a bzImage header; rebuild the UKI with `ukify build --uname=…`")]
    NoUname,
    /// The `.uname` section's text is not a kernel release.
    #[error("the .uname section is not a kernel release: {found:?}")]
    BadUname {
        /// The section's text, invalid UTF-8 replaced.
        found: String,
    },
    /// A UKI without `.uname`: the bzImage header at the start of its `.linux` section could not be
    /// read.
    #[error("the .linux section's bzImage header: {0}")]
    EmbeddedKernel(crate::watch::flatcar::FlatcarError),
    /// An error in one image, with that image's path. Nothing in this module constructs it at
    /// present: `read_boot_entries` keeps per-entry errors as text in [`BootEntry::release`].
    #[error("{path}: {error}")]
    Image {
        /// Path of the image.
        path: PathBuf,
        /// What is wrong with it.
        error: Box<GenericError>,
    },
    /// A directory, boot entry or UKI could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// Its path on this machine (under the root).
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The default boot entry's kernel release could not be read.
    #[error(
        "the default boot entry {entry} boots {kernel}, whose release cannot be read: {reason}"
    )]
    DefaultUnreadable {
        /// Host path of the entry file (the `.conf` or the `.efi`).
        entry: PathBuf,
        /// Host path of the kernel it boots (the UKI itself for a type #2 entry).
        kernel: PathBuf,
        /// Why the release could not be read.
        reason: String,
    },
    /// There is no boot entry, and no kernel under `/usr/lib/modules` has an image: nothing could
    /// be the next kernel.
    #[error("no boot entry (UKI in EFI/Linux, type #1 in loader/entries) and no kernel under {MODULES_DIR} with an image in /boot or beside its modules")]
    NothingBootable,
}

/// Which kind of boot entry, and the host path of the kernel it boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKernel {
    /// A unified kernel image; the entry is the image itself.
    Uki(PathBuf),
    /// A type #1 entry's `linux` (or `uki`) file.
    Type1(PathBuf),
}

/// One boot menu entry, with what systemd-boot sorts it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// The file name, boot counter removed, lower-cased (what `default` patterns match).
    pub id: String,
    /// Host path of the entry file (the `.conf` or the `.efi`).
    pub path: PathBuf,
    /// `sort-key` of a type #1 entry, or `IMAGE_ID` (else `ID`) of a UKI's `.osrel`; entries with
    /// one sort first, by it.
    pub sort_key: Option<String>,
    /// `machine-id` of a type #1 entry (always `None` for a UKI); compared after `sort_key`.
    pub machine_id: Option<String>,
    /// `version` of a type #1 entry, or `IMAGE_VERSION`, `VERSION`, `VERSION_ID` or `BUILD_ID` of a
    /// UKI's `.osrel`; newest first after `machine_id`.
    pub version: Option<String>,
    /// Boot counting (`name+LEFT-DONE.conf`): tries left and done, when counted.
    pub tries_left: Option<u32>,
    /// Boot counting: tries done, when the file name counts them (`+LEFT-DONE`).
    pub tries_done: Option<u32>,
    /// What kind of entry it is, and the kernel it boots.
    pub kernel: EntryKernel,
    /// The kernel's release, or why it could not be read.
    pub release: Result<String, String>,
}

/// systemd-boot's menu order (`boot_entry_compare`): entries out of tries last; entries with a
/// `sort-key` before those without, by sort key, machine id, then version, newest first;
/// then by id, newest first; then more tries left first.
pub fn entry_order(a: &BootEntry, b: &BootEntry) -> Ordering {
    let out_of_tries = |e: &BootEntry| e.tries_left == Some(0);
    let opt = |x: &Option<String>| x.clone().unwrap_or_default();
    out_of_tries(a)
        .cmp(&out_of_tries(b))
        .then_with(|| a.sort_key.is_none().cmp(&b.sort_key.is_none()))
        .then_with(|| {
            if a.sort_key.is_some() && b.sort_key.is_some() {
                opt(&a.sort_key)
                    .cmp(&opt(&b.sort_key))
                    .then_with(|| opt(&a.machine_id).cmp(&opt(&b.machine_id)))
                    .then_with(|| version_cmp(&opt(&b.version), &opt(&a.version)))
            } else {
                Ordering::Equal
            }
        })
        .then_with(|| version_cmp(&b.id, &a.id))
        .then_with(|| match (a.tries_left, b.tries_left) {
            (Some(la), Some(lb)) => lb
                .cmp(&la)
                .then(a.tries_done.unwrap_or(0).cmp(&b.tries_done.unwrap_or(0))),
            _ => Ordering::Equal,
        })
}

/// The entry systemd-boot boots by default: the first in menu order whose id matches the
/// `default` glob of `loader.conf` (case-insensitive), else the first.
pub fn default_entry<'a>(
    entries: &'a [BootEntry],
    default_pattern: Option<&str>,
) -> Option<&'a BootEntry> {
    let mut sorted: Vec<&BootEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| entry_order(a, b));
    default_pattern
        .map(str::to_ascii_lowercase)
        .and_then(|pattern| sorted.iter().find(|e| glob_match(&pattern, &e.id)).copied())
        .or_else(|| sorted.first().copied())
}

/// `loader.conf`'s `default` pattern; `@saved` and friends need EFI variables and are not
/// followed (`None`: menu order decides).
pub fn loader_conf_default(text: &str) -> Option<String> {
    // A later line overrides an earlier one.
    text.lines()
        .rev()
        .find_map(|line| {
            let (key, value) = split_key_value(line)?;
            (key == "default").then(|| value.to_string())
        })
        .filter(|pattern| !pattern.starts_with('@'))
}

/// `key value` lines, `#` comments, as in `loader.conf` and type #1 entries.
fn split_key_value(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (key, value) = line.split_once(|c: char| c.is_ascii_whitespace())?;
    Some((key, value.trim()))
}

/// A file name without its boot counter (`name+3-1.conf` → `name.conf`, 3 left, 1 done).
pub fn strip_boot_counter(file_name: &str) -> (String, Option<u32>, Option<u32>) {
    let (stem, ext) = match file_name.rfind('.') {
        Some(dot) => file_name.split_at(dot),
        None => (file_name, ""),
    };
    if let Some((base, counter)) = stem.rsplit_once('+') {
        let (left, done) = match counter.split_once('-') {
            Some((l, d)) => (l, Some(d)),
            None => (counter, None),
        };
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        if let Some(left) = number(left) {
            match done.map(number) {
                None => return (format!("{base}{ext}"), Some(left), None),
                Some(Some(done)) => return (format!("{base}{ext}"), Some(left), Some(done)),
                Some(None) => {}
            }
        }
    }
    (file_name.to_string(), None, None)
}

/// `fnmatch` without flags: `*`, `?` and `[…]` classes (with ranges and `!`/`^`).
fn glob_match(pattern: &str, text: &str) -> bool {
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        let mut i = 1;
        let negate = matches!(p.get(i), Some('!') | Some('^'));
        if negate {
            i += 1;
        }
        let mut matched = false;
        let start = i;
        while i < p.len() && (p[i] != ']' || i == start) {
            if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
                matched |= p[i] <= c && c <= p[i + 2];
                i += 3;
            } else {
                matched |= p[i] == c;
                i += 1;
            }
        }
        (i < p.len()).then_some((matched != negate, i + 1))
    }
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|skip| go(&p[1..], &t[skip..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some('[') if !t.is_empty() => match class(p, t[0]) {
                Some((true, len)) => go(&p[len..], &t[1..]),
                Some((false, _)) => false,
                None => t[0] == '[' && go(&p[1..], &t[1..]),
            },
            Some(&c) => t.first() == Some(&c) && go(&p[1..], &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

/// Where a UKI's sections of interest lie in the file: (offset, size).
#[derive(Clone, Copy, Debug, Default)]
struct UkiLayout {
    uname: Option<(u32, u32)>,
    osrel: Option<(u32, u32)>,
    linux: Option<(u32, u32)>,
}

/// Read the section table from the image's first bytes (PE32+ or PE32).
fn uki_layout(head: &[u8]) -> Result<UkiLayout, GenericError> {
    let table = match PeFile64::parse(head) {
        Ok(pe) => pe.section_table(),
        Err(e64) => match PeFile32::parse(head) {
            Ok(pe) => pe.section_table(),
            Err(_) => {
                return Err(GenericError::NotPe {
                    detail: e64.to_string(),
                })
            }
        },
    };
    let mut layout = UkiLayout::default();
    for section in table.iter() {
        let slot = match section.raw_name() {
            b".uname" => &mut layout.uname,
            b".osrel" => &mut layout.osrel,
            b".linux" => &mut layout.linux,
            _ => continue,
        };
        slot.get_or_insert(section.pe_file_range());
    }
    Ok(layout)
}

/// What a UKI says of itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct UkiFacts {
    release: Option<Result<String, String>>,
    sort_key: Option<String>,
    version: Option<String>,
}

/// Read the UKI's facts through `read_at(section, offset, len)`, which is bounded by the
/// caller's image (bytes in memory or a file).
fn uki_facts(
    layout: UkiLayout,
    read_at: &mut dyn FnMut(&'static str, u64, u64) -> Result<Vec<u8>, GenericError>,
) -> Result<(Result<String, GenericError>, UkiFacts), GenericError> {
    let mut facts = UkiFacts::default();
    if let Some((offset, size)) = layout.osrel {
        let text = read_at(".osrel", offset.into(), size.min(OSREL_MAX).into())?;
        let (sort_key, version) = osrel_sort_key_version(&String::from_utf8_lossy(&text));
        facts.sort_key = sort_key;
        facts.version = version;
    }
    let release = if let Some((offset, size)) = layout.uname {
        if size > UNAME_MAX {
            Err(GenericError::UnameTooLarge { size })
        } else {
            let bytes = read_at(".uname", offset.into(), size.into())?;
            let text = String::from_utf8_lossy(&bytes);
            let release = text.trim_end_matches('\0').trim();
            if is_kernel_release(release) {
                Ok(release.to_string())
            } else {
                Err(GenericError::BadUname {
                    found: text.into_owned(),
                })
            }
        }
    } else if let Some((offset, size)) = layout.linux {
        let len = u64::from(size).min(BZIMAGE_HEADER_MAX);
        let header = read_at(".linux", offset.into(), len)?;
        bzimage_release(&header).map_err(GenericError::EmbeddedKernel)
    } else {
        Err(GenericError::NoUname)
    };
    Ok((release, facts))
}

/// The sort key and version systemd-boot gives a UKI from its `.osrel`: `IMAGE_ID` else `ID`;
/// `IMAGE_VERSION` else `VERSION` else `VERSION_ID` else `BUILD_ID`.
fn osrel_sort_key_version(text: &str) -> (Option<String>, Option<String>) {
    let get = |key: &str| {
        text.lines().find_map(|line| {
            let value = line.trim().strip_prefix(key)?.strip_prefix('=')?;
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            (!value.is_empty()).then(|| value.to_string())
        })
    };
    let sort_key = get("IMAGE_ID").or_else(|| get("ID"));
    let version = get("IMAGE_VERSION")
        .or_else(|| get("VERSION"))
        .or_else(|| get("VERSION_ID"))
        .or_else(|| get("BUILD_ID"));
    (sort_key, version)
}

/// The kernel release of a unified kernel image: its `.uname` section (or, for images built
/// without one, the bzImage header at the start of `.linux`). Pure and bounded: only the
/// first 64 KiB are parsed as headers, and section ranges are checked against `pe_bytes`.
pub fn uki_release(pe_bytes: &[u8]) -> Result<String, GenericError> {
    let head = &pe_bytes[..pe_bytes.len().min(PE_HEADER_MAX as usize)];
    let layout = uki_layout(head)?;
    let len = pe_bytes.len() as u64;
    let mut read_at = |section, offset: u64, size: u64| {
        let end = offset.saturating_add(size);
        pe_bytes
            .get(offset as usize..end as usize)
            .filter(|_| end <= len)
            .map(<[u8]>::to_vec)
            .ok_or(GenericError::SectionOutOfRange {
                section,
                offset,
                end,
                len,
            })
    };
    uki_facts(layout, &mut read_at)?.0
}

/// Read a UKI file's facts, reading only its headers and the few sections used.
fn read_uki(path: &Path) -> Result<(Result<String, GenericError>, UkiFacts), GenericError> {
    let read_err = |source| GenericError::Read {
        path: path.to_path_buf(),
        error: source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    let mut head = Vec::new();
    (&mut file)
        .take(PE_HEADER_MAX)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    let layout = uki_layout(&head)?;
    let mut read_at = |section, offset: u64, size: u64| {
        let end = offset.saturating_add(size);
        if end > len {
            return Err(GenericError::SectionOutOfRange {
                section,
                offset,
                end,
                len,
            });
        }
        let mut bytes = vec![0; size as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(read_err)?;
        Ok(bytes)
    };
    uki_facts(layout, &mut read_at)
}

/// Fields of a type #1 entry that matter here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Type1 {
    version: Option<String>,
    sort_key: Option<String>,
    machine_id: Option<String>,
    linux: Option<String>,
    uki: Option<String>,
}

fn parse_type1(text: &str) -> Type1 {
    let mut entry = Type1::default();
    for (key, value) in text.lines().filter_map(split_key_value) {
        let field = match key {
            "version" => &mut entry.version,
            "sort-key" => &mut entry.sort_key,
            "machine-id" => &mut entry.machine_id,
            "linux" => &mut entry.linux,
            "uki" => &mut entry.uki,
            _ => continue,
        };
        *field = Some(value.to_string());
    }
    entry
}

/// Directory entries of a host directory, sorted, with their (dev, ino) for de-duplication
/// (`/boot/efi` and `/efi` are often the same file system). A missing directory is empty.
fn list_dir(root: &Root, host_dir: &str) -> Result<Vec<(String, PathBuf)>, GenericError> {
    let dir = root.join(host_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(GenericError::Read {
                path: dir,
                error: source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| GenericError::Read {
            path: dir.clone(),
            error: source,
        })?;
        if let Some(name) = entry.file_name().to_str() {
            out.push((name.to_string(), Path::new(host_dir).join(name)));
        }
    }
    out.sort();
    Ok(out)
}

/// Every boot entry systemd-boot would list, read under `root`.
pub fn read_boot_entries(root: &Root) -> Result<Vec<BootEntry>, GenericError> {
    let mut seen = BTreeSet::new();
    let mut first_time = |path: &Path| match fs::metadata(path) {
        Ok(meta) => meta.is_file() && seen.insert((meta.dev(), meta.ino())),
        Err(_) => false,
    };
    let mut entries = Vec::new();
    for dir in UKI_DIRS {
        for (name, host_path) in list_dir(root, dir)? {
            if !name.to_ascii_lowercase().ends_with(".efi") || name.starts_with('.') {
                continue;
            }
            let path = root.join(&host_path);
            if !first_time(&path) {
                continue;
            }
            let (release, facts) = match read_uki(&path) {
                Ok((release, facts)) => (release.map_err(|e| e.to_string()), facts),
                Err(e) => (Err(e.to_string()), UkiFacts::default()),
            };
            let (id, tries_left, tries_done) = strip_boot_counter(&name);
            entries.push(BootEntry {
                id: id.to_ascii_lowercase(),
                path: host_path.clone(),
                sort_key: facts.sort_key,
                machine_id: None,
                version: facts.version,
                tries_left,
                tries_done,
                kernel: EntryKernel::Uki(host_path),
                release,
            });
        }
    }
    for dir in ENTRY_DIRS {
        // Paths in an entry are relative to the file system it lives on.
        let fs_root = dir.trim_end_matches("/loader/entries");
        for (name, host_path) in list_dir(root, dir)? {
            if !name.to_ascii_lowercase().ends_with(".conf") || name.starts_with('.') {
                continue;
            }
            let path = root.join(&host_path);
            if !first_time(&path) {
                continue;
            }
            let mut text = String::new();
            File::open(&path)
                .and_then(|f| f.take(ENTRY_MAX).read_to_string(&mut text))
                .map_err(|source| GenericError::Read {
                    path: path.clone(),
                    error: source,
                })?;
            let fields = parse_type1(&text);
            let (kernel_rel, is_uki) = match (&fields.linux, &fields.uki) {
                (Some(linux), _) => (linux, false),
                (None, Some(uki)) => (uki, true),
                // Chain-loading (`efi`) entries boot no Linux kernel of ours.
                (None, None) => continue,
            };
            let kernel_host = Path::new(fs_root).join(kernel_rel.trim_start_matches('/'));
            let kernel_path = root.join(&kernel_host);
            // systemd-boot drops entries whose kernel file is missing.
            if !kernel_path.is_file() {
                continue;
            }
            let release = if is_uki {
                read_uki(&kernel_path)
                    .and_then(|(release, _)| release)
                    .map_err(|e| e.to_string())
            } else {
                match read_image_release(&kernel_path) {
                    Ok(release) => Ok(release),
                    Err(e) => fields
                        .version
                        .clone()
                        .filter(|v| is_kernel_release(v))
                        .ok_or_else(|| format!("{e}; and the entry has no usable `version` line")),
                }
            };
            let (id, tries_left, tries_done) = strip_boot_counter(&name);
            entries.push(BootEntry {
                id: id.to_ascii_lowercase(),
                path: host_path,
                sort_key: fields.sort_key,
                machine_id: fields.machine_id,
                version: fields.version,
                tries_left,
                tries_done,
                kernel: EntryKernel::Type1(kernel_host),
                release,
            });
        }
    }
    Ok(entries)
}

/// Kernel releases under `/usr/lib/modules` that have a kernel image, newest first, with the
/// image's host path.
pub fn installed_kernels(root: &Root) -> Result<Vec<(String, PathBuf)>, GenericError> {
    let mut kernels = Vec::new();
    for (kver, tree) in list_dir(root, MODULES_DIR)? {
        if !is_kernel_release(&kver) || !root.join(&tree).is_dir() {
            continue;
        }
        let images = [
            PathBuf::from(format!("/boot/vmlinuz-{kver}")),
            tree.join("vmlinuz"),
        ];
        if let Some(image) = images.into_iter().find(|i| root.join(i).is_file()) {
            kernels.push((kver, image));
        }
    }
    kernels.sort_by(|(a, _), (b, _)| version_cmp(b, a));
    Ok(kernels)
}

/// The kernel the default boot entry runs, or `None` when it is the running one (see the
/// module documentation for the order of evidence). `origin` names the rule and the file that
/// decided.
pub fn next_boot(root: &Root, running_kernel: &str) -> Result<Option<NextBoot>, GenericError> {
    let entries = read_boot_entries(root)?;
    let (release, origin) = if entries.is_empty() {
        let kernels = installed_kernels(root)?;
        let (release, image) = kernels.first().ok_or(GenericError::NothingBootable)?;
        (
            release.clone(),
            format!(
                "newest kernel with an image: {} (no boot entries; GRUB boots the newest)",
                image.display()
            ),
        )
    } else {
        let (pattern, conf) = LOADER_CONFS
            .iter()
            .find_map(|conf| {
                let text = fs::read_to_string(root.join(conf)).ok()?;
                Some((loader_conf_default(&text), *conf))
            })
            .unwrap_or((None, ""));
        let entry = default_entry(&entries, pattern.as_deref())
            .expect("entries is not empty, so there is a first one");
        let kernel = match &entry.kernel {
            EntryKernel::Uki(path) | EntryKernel::Type1(path) => path,
        };
        let release = entry
            .release
            .clone()
            .map_err(|reason| GenericError::DefaultUnreadable {
                entry: entry.path.clone(),
                kernel: kernel.clone(),
                reason,
            })?;
        let kind = match entry.kernel {
            EntryKernel::Uki(_) => "UKI",
            EntryKernel::Type1(_) => "boot entry",
        };
        let how = match &pattern {
            Some(p) if glob_match(&p.to_ascii_lowercase(), &entry.id) => {
                format!("{conf} default {p:?}")
            }
            _ => "first in systemd-boot's menu order".to_string(),
        };
        (release, format!("{kind} {} ({how})", entry.path.display()))
    };
    debug!(KERNEL_RELEASE = %release, "default boot entry: {origin}");
    if release == running_kernel {
        return Ok(None);
    }
    let tree = Path::new(MODULES_DIR).join(&release);
    let module_tree = root.join(&tree).is_dir().then_some(tree);
    Ok(Some(NextBoot {
        kernel_release: release,
        origin,
        module_tree,
        staged_deployment: false,
    }))
}

/// What the daemon watches (with inotify, those that exist), and the event each catches:
/// - `/usr/lib/modules`: a kernel package's module tree appears or goes (`<kver>/` created or
///   removed).
/// - `/boot`: Debian's `vmlinuz-<kver>` installed or removed (renamed into place by dpkg).
/// - `/boot/loader/entries`, `/efi/loader/entries`: `kernel-install` adds or removes a type #1
///   entry.
/// - `/boot/loader`, `/efi/loader`: `loader.conf` (its `default`) changes.
/// - `/efi/EFI/Linux`, `/boot/EFI/Linux`, `/boot/efi/EFI/Linux`: a UKI is added, replaced or
///   removed.
pub fn watch_paths() -> Vec<PathBuf> {
    // Made from the lists the readers use, so a directory they read is never left unwatched
    // (`/boot/efi/loader` was, once).
    let loader_dirs = LOADER_CONFS
        .iter()
        .filter_map(|conf| Path::new(conf).parent());
    // The lists name no directory twice; were one to, watching it again is a no-op
    // (`fswatch` adds each inode's watch once).
    [Path::new(MODULES_DIR), Path::new("/boot")]
        .into_iter()
        .chain(loader_dirs)
        .chain(ENTRY_DIRS.iter().map(Path::new))
        .chain(UKI_DIRS.iter().map(Path::new))
        .map(Path::to_path_buf)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every directory the readers look in is watched: an entry or a `loader.conf` change there
    /// must wake the daemon.
    #[test]
    fn every_directory_read_is_watched() {
        let watched = watch_paths();
        let read = LOADER_CONFS
            .iter()
            .map(|conf| Path::new(conf).parent().unwrap())
            .chain(ENTRY_DIRS.iter().map(Path::new))
            .chain(UKI_DIRS.iter().map(Path::new))
            .chain([Path::new(MODULES_DIR)]);
        for dir in read {
            assert!(
                watched.iter().any(|w| w == dir),
                "{} is not watched",
                dir.display()
            );
        }
    }

    #[test]
    fn boot_counters() {
        assert_eq!(
            strip_boot_counter("gl+3-1.efi"),
            ("gl.efi".to_string(), Some(3), Some(1))
        );
        assert_eq!(
            strip_boot_counter("gl+0.conf"),
            ("gl.conf".to_string(), Some(0), None)
        );
        assert_eq!(
            strip_boot_counter("a+b.conf"),
            ("a+b.conf".to_string(), None, None)
        );
        assert_eq!(
            strip_boot_counter("6.1+deb12.conf"),
            ("6.1+deb12.conf".to_string(), None, None)
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("debian-*", "debian-6.1.conf"));
        assert!(glob_match("*.conf", "x.conf"));
        assert!(!glob_match("*.efi", "x.conf"));
        assert!(glob_match("gl-1?.efi", "gl-12.efi"));
        assert!(glob_match("gl-[0-9].efi", "gl-7.efi"));
        assert!(!glob_match("gl-[!0-9].efi", "gl-7.efi"));
        assert!(glob_match("exact.conf", "exact.conf"));
    }

    #[test]
    fn loader_conf() {
        assert_eq!(
            loader_conf_default("timeout 3\n# default x\ndefault  gardenlinux-*.efi \n"),
            Some("gardenlinux-*.efi".to_string())
        );
        assert_eq!(loader_conf_default("default @saved\n"), None);
        assert_eq!(loader_conf_default("timeout 0\n"), None);
    }

    #[test]
    fn osrel_fields() {
        assert_eq!(
            osrel_sort_key_version("ID=gardenlinux\nVERSION_ID=\"1592.3\"\n"),
            (Some("gardenlinux".into()), Some("1592.3".into()))
        );
        assert_eq!(
            osrel_sort_key_version("ID=x\nIMAGE_ID=img\nIMAGE_VERSION=7\nVERSION_ID=1\n"),
            (Some("img".into()), Some("7".into()))
        );
    }

    #[test]
    fn hostile_pe_bytes() {
        for bytes in [&b""[..], b"MZ", &[0xffu8; 4096], b"MZ\0\0\0\0\0\0\0\0"] {
            assert!(matches!(
                uki_release(bytes),
                Err(GenericError::NotPe { .. })
            ));
        }
    }
}

//! Overlay archives: a tar (plain, gzip, xz or zstd, told apart by their magic bytes) of an
//! overlay tree with its `overlay.toml`, unpacked by our own code over the `tar` crate's entry
//! iterator into a staging directory, and verified in the same pass.
//!
//! Only regular files, directories and symlinks are accepted; every path must be plain and
//! relative; nothing is written through a link; sizes and entry counts are bounded. Each file is
//! hashed as it is written and checked against the manifest as soon as both are known (the
//! manifest may come first or last), then fsynced. A refused archive leaves nothing outside the
//! staging directory, which the caller removes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use sha2::{Digest, Sha256};

use crate::fsutil::fsync_dir;
use crate::overlay::key::OverlayKey;
use crate::overlay::manifest::{symlink_stays_inside, Manifest, ManifestError, MANIFEST_NAME};
use crate::overlay::signature::{MAX_SIGNATURE_BYTES, SIGNATURE_NAME};
use crate::overlay::space::{SpaceError, SpaceGuard};
use crate::overlay::verify::{check_digest, VerifyError};

/// Files at least this large are written back to disk in the background every this many bytes.
const WRITEBACK_EVERY: u64 = 16 << 20;

/// A manifest larger than this is not a manifest.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// How an archive is compressed, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar (`ustar` magic at byte 257).
    None,
    /// gzip (`1f 8b`); concatenated members are read as one stream.
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`); concatenated streams are read as one.
    Xz,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Compression {
    /// Recognise the compression from the first bytes (at least 262 for plain tar).
    pub fn detect(head: &[u8]) -> Option<Compression> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Compression::Xz)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if head.get(257..262) == Some(b"ustar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// Bounds on what one archive may unpack to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of the decompressed tar stream (headers and contents).
    pub max_unpacked_bytes: u64,
    /// Entries of any kind.
    pub max_entries: u64,
}

/// Why an archive was refused or could not be unpacked. Every `archive` is the name the
/// caller gave for messages (a path, a URL, or an OCI reference with its digest).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The first bytes match no supported compression and no tar header.
    #[error("{archive}: not a tar archive (plain, gzip, xz or zstd); the first bytes are {head}")]
    NotAnArchive {
        /// The archive's name for messages.
        archive: String,
        /// Its first (up to 8) bytes, in hex.
        head: String,
    },
    /// Reading, decompressing or parsing the tar stream failed (corrupt or truncated input).
    #[error("{archive}: cannot read the archive: {error}; it is corrupt or truncated")]
    Read {
        /// The archive's name for messages.
        archive: String,
        /// The read or decoder error.
        error: io::Error,
    },
    /// An entry is unsafe or malformed: an absolute path, `..`, a control character, a hard
    /// link, device node or fifo, a setuid/setgid/sticky mode, an escaping symlink, a path
    /// beneath a file or link, or a duplicate.
    #[error("{archive}: entry {entry:?} {why}; the archive is refused")]
    Refused {
        /// The archive's name for messages.
        archive: String,
        /// The entry's path (as in the archive when the path itself is the problem).
        entry: PathBuf,
        /// What is wrong with it.
        why: Cow<'static, str>,
    },
    /// The decompressed stream, the entry count, the manifest or the signature exceeds its
    /// bound.
    #[error("{archive}: unpacks to more than {limit} {what}; raise stage.max-download-bytes if the overlay really is that large")]
    TooLarge {
        /// The archive's name for messages.
        archive: String,
        /// The bound that was exceeded.
        limit: u64,
        /// Its unit: `bytes`, `entries`, `bytes of manifest` or `bytes of signature`.
        what: &'static str,
    },
    /// A file's content ended before the size its tar header gives.
    #[error("{archive}: entry {entry:?} ends after {found} of its {expected} bytes: the archive is truncated")]
    Truncated {
        /// The archive's name for messages.
        archive: String,
        /// The file's path in the overlay.
        entry: PathBuf,
        /// The size its header gives.
        expected: u64,
        /// The bytes actually read.
        found: u64,
    },
    /// The archive has no `overlay.toml` at its top.
    #[error("{archive}: no {MANIFEST_NAME} in the archive; an overlay archive holds {MANIFEST_NAME} at its top")]
    NoManifest {
        /// The archive's name for messages.
        archive: String,
    },
    /// The archive's manifest is for another kernel release, driver version or architecture
    /// than the key asked for.
    #[error("{archive}: {MANIFEST_NAME} says {field} {found:?}, but {expected:?} was asked for; the source template points at the wrong overlay")]
    WrongOverlay {
        /// The archive's name for messages.
        archive: String,
        /// The manifest key that differs (`kernel-release`, `driver-version` or `arch`).
        field: &'static str,
        /// The key's value.
        expected: String,
        /// The manifest's value.
        found: String,
    },
    /// The archive's `overlay.toml` does not parse or validate.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The unpacked contents do not match the manifest (unlisted, missing, wrong size, digest,
    /// type or link target); paths in `error` are relative to the overlay root.
    #[error("{archive}: {error}")]
    Verify {
        /// The archive's name for messages.
        archive: String,
        /// The mismatch.
        error: VerifyError,
    },
    /// The overlay does not fit on the store's file system with its reserve left free, or
    /// unpacking reached the reserve (what was unpacked is the caller's to remove).
    #[error(transparent)]
    Space(#[from] SpaceError),
    /// Creating, writing or syncing something in the staging directory failed: a problem of
    /// this host, not of the archive.
    #[error("{path}: cannot write: {error}")]
    Write {
        /// The file or directory in the staging directory.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
}

impl ArchiveError {
    /// Did the archive hold something wrong (as opposed to an I/O problem on this host)?
    pub fn is_invalid(&self) -> bool {
        !matches!(self, ArchiveError::Write { .. } | ArchiveError::Space(_))
    }
}

/// What an archive unpacked to.
#[derive(Debug)]
pub struct Extracted {
    /// The archive's parsed manifest (checked against the key).
    pub manifest: Manifest,
    /// Bytes of file content written.
    pub bytes: u64,
    /// `overlay.toml` exactly as it was in the archive (what a signature covers).
    pub manifest_text: String,
    /// `overlay.toml.minisig`, when the archive has one; checked by the caller.
    pub signature: Option<String>,
}

/// Unpack the overlay archive read from `input` into `staging` (an existing, empty directory),
/// verifying every entry against the manifest, which must be for `key`. `archive` names the
/// archive in messages. On success every file and directory is fsynced and the tree matches the
/// manifest exactly; on error `staging` holds an unspecified partial tree for the caller to
/// remove. `space` watches the file system of `staging` while files are written; a manifest
/// that comes before the files has its total checked against `limits` and `space` before any
/// file byte is written.
pub fn extract(
    input: impl Read,
    staging: &Path,
    key: &OverlayKey,
    limits: Limits,
    archive: &str,
    space: &mut SpaceGuard,
) -> Result<Extracted, ArchiveError> {
    let decompressed = decompress(input, archive)?;
    let counted = Bounded {
        inner: decompressed,
        remaining: limits.max_unpacked_bytes,
        exceeded: false,
    };
    let mut tar = tar::Archive::new(counted);
    let mut state = Unpacking {
        archive,
        staging,
        key,
        max_unpacked_bytes: limits.max_unpacked_bytes,
        space,
        manifest: None,
        files: BTreeMap::new(),
        links: BTreeMap::new(),
        dirs: BTreeSet::new(),
        buffer: vec![0u8; crate::fsutil::IO_CHUNK],
        bytes: 0,
        manifest_text: String::new(),
        signature: None,
    };
    let read_err = |source: io::Error| ArchiveError::Read {
        archive: archive.to_string(),
        error: source,
    };
    let result = unpack_all(&mut tar, &mut state, limits, read_err);
    if tar.into_inner().exceeded {
        return Err(ArchiveError::TooLarge {
            archive: archive.to_string(),
            limit: limits.max_unpacked_bytes,
            what: "bytes",
        });
    }
    result?;
    state.finish()
}

/// Unpack every entry (the entry iterator borrows the archive, so it lives here).
fn unpack_all<R: Read>(
    tar: &mut tar::Archive<R>,
    state: &mut Unpacking<'_>,
    limits: Limits,
    read_err: impl Fn(io::Error) -> ArchiveError,
) -> Result<(), ArchiveError> {
    let mut count = 0u64;
    for entry in tar.entries().map_err(&read_err)? {
        let entry = entry.map_err(&read_err)?;
        count += 1;
        if count > limits.max_entries {
            return Err(ArchiveError::TooLarge {
                archive: state.archive.to_string(),
                limit: limits.max_entries,
                what: "entries",
            });
        }
        state.unpack(entry)?;
    }
    Ok(())
}

/// The tar stream inside `input`, by its magic bytes.
pub(crate) fn decompress<'a>(
    mut input: impl Read + 'a,
    archive: &str,
) -> Result<Box<dyn Read + 'a>, ArchiveError> {
    let mut head = Vec::with_capacity(512);
    (&mut input)
        .take(512)
        .read_to_end(&mut head)
        .map_err(|source| ArchiveError::Read {
            archive: archive.to_string(),
            error: source,
        })?;
    let Some(compression) = Compression::detect(&head) else {
        return Err(ArchiveError::NotAnArchive {
            archive: archive.to_string(),
            head: hex::encode(&head[..head.len().min(8)]),
        });
    };
    let stream = io::Cursor::new(head).chain(input);
    Ok(match compression {
        Compression::None => Box::new(stream),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(stream)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(stream).map_err(|source| {
                ArchiveError::Read {
                    archive: archive.to_string(),
                    error: source,
                }
            })?)
        }
    })
}

/// Stops a decompression bomb: reads fail once `remaining` bytes have been read.
struct Bounded<R> {
    inner: R,
    remaining: u64,
    exceeded: bool,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            // One byte more tells "exactly at the limit" from "over it".
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.exceeded = true;
            return Err(io::Error::other("size limit exceeded"));
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// What an archive path has been made into so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Symlink,
    Directory,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::File => "a file",
            Kind::Symlink => "a symlink",
            Kind::Directory => "a directory",
        })
    }
}

/// A file written from the archive: what it hashed to while being written.
struct Written {
    size: u64,
    sha256: String,
    mode: u32,
}

struct Unpacking<'a> {
    archive: &'a str,
    staging: &'a Path,
    key: &'a OverlayKey,
    /// [`Limits::max_unpacked_bytes`], which the manifest's files must fit in too.
    max_unpacked_bytes: u64,
    space: &'a mut SpaceGuard,
    manifest: Option<Manifest>,
    files: BTreeMap<PathBuf, Written>,
    links: BTreeMap<PathBuf, PathBuf>,
    /// Directories created (relative; the staging directory itself is "").
    dirs: BTreeSet<PathBuf>,
    buffer: Vec<u8>,
    bytes: u64,
    manifest_text: String,
    signature: Option<String>,
}

impl Unpacking<'_> {
    fn refuse(&self, entry: &Path, why: impl Into<Cow<'static, str>>) -> ArchiveError {
        ArchiveError::Refused {
            archive: self.archive.to_string(),
            entry: entry.to_path_buf(),
            why: why.into(),
        }
    }

    fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
        move |source| ArchiveError::Write {
            path: path.to_path_buf(),
            error: source,
        }
    }

    fn verify_err(&self, source: VerifyError) -> ArchiveError {
        ArchiveError::Verify {
            archive: self.archive.to_string(),
            error: source,
        }
    }

    fn unpack<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ArchiveError> {
        let raw_path = PathBuf::from(String::from_utf8_lossy(&entry.path_bytes()).into_owned());
        let entry_type = entry.header().entry_type();
        if entry_type.is_pax_global_extensions() {
            return Ok(());
        }
        let Some(path) = plain_relative(&raw_path).map_err(|why| self.refuse(&raw_path, why))?
        else {
            // "./" itself: the staging directory.
            return if entry_type.is_dir() {
                Ok(())
            } else {
                Err(self.refuse(
                    &raw_path,
                    "names the archive's top directory but is not a directory",
                ))
            };
        };
        if path == Path::new(MANIFEST_NAME) {
            if !entry_type.is_file() {
                return Err(self.refuse(&path, "is the manifest but not a regular file"));
            }
            return self.read_manifest(&mut entry);
        }
        if path == Path::new(SIGNATURE_NAME) {
            if !entry_type.is_file() {
                return Err(self.refuse(&path, "is the signature but not a regular file"));
            }
            return self.read_signature(&mut entry);
        }
        if entry_type.is_dir() {
            self.make_parents(&path)?;
            self.make_dir(&path)
        } else if entry_type.is_file() {
            self.make_parents(&path)?;
            self.write_file(&path, &mut entry)
        } else if entry_type.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()))
                .unwrap_or_default();
            self.make_parents(&path)?;
            self.make_symlink(&path, &target)
        } else {
            let what = if entry_type.is_hard_link() {
                "is a hard link (only regular files, directories and symlinks are allowed)"
            } else if entry_type.is_character_special() || entry_type.is_block_special() {
                "is a device node (only regular files, directories and symlinks are allowed)"
            } else if entry_type.is_fifo() {
                "is a fifo (only regular files, directories and symlinks are allowed)"
            } else {
                "has an entry type other than regular file, directory or symlink"
            };
            Err(self.refuse(&path, what))
        }
    }

    fn kind_of(&self, path: &Path) -> Option<Kind> {
        if self.files.contains_key(path) {
            Some(Kind::File)
        } else if self.links.contains_key(path) {
            Some(Kind::Symlink)
        } else if self.dirs.contains(path) {
            Some(Kind::Directory)
        } else {
            None
        }
    }

    /// Create the missing parents of `path`, refusing to go through a file or link.
    fn make_parents(&mut self, path: &Path) -> Result<(), ArchiveError> {
        let parents: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        for parent in parents.into_iter().rev() {
            match self.kind_of(parent) {
                Some(Kind::Directory) => {}
                Some(kind) => {
                    return Err(self.refuse(
                        path,
                        format!("lies beneath {kind} ({}) of the archive", parent.display()),
                    ))
                }
                _ => self.make_dir(parent)?,
            }
        }
        Ok(())
    }

    fn make_dir(&mut self, path: &Path) -> Result<(), ArchiveError> {
        match self.kind_of(path) {
            Some(Kind::Directory) => return Ok(()),
            Some(kind) => return Err(self.refuse(path, format!("is a directory but also {kind}"))),
            None => {}
        }
        if let Some(manifest) = &self.manifest {
            if manifest.file(path).is_some() || manifest.symlinks.iter().any(|l| l.path == path) {
                return Err(self.verify_err(VerifyError::WrongType {
                    path: path.to_path_buf(),
                    expected: "a file or link",
                    found: "a directory".into(),
                }));
            }
        }
        let real = self.staging.join(path);
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&real)
            .map_err(Self::write_err(&real))?;
        self.dirs.insert(path.to_path_buf());
        Ok(())
    }

    fn make_symlink(&mut self, path: &Path, target: &Path) -> Result<(), ArchiveError> {
        if let Some(kind) = self.kind_of(path) {
            return Err(self.refuse(path, format!("is listed twice (already {kind})")));
        }
        if !symlink_stays_inside(path, target) {
            return Err(self.refuse(
                path,
                format!(
                    "is a symlink to {target:?}, which leaves the overlay; links must be relative and resolve inside it"
                ),
            ));
        }
        if let Some(manifest) = &self.manifest {
            check_link(manifest, path, target).map_err(|e| self.verify_err(e))?;
        }
        let real = self.staging.join(path);
        std::os::unix::fs::symlink(target, &real).map_err(Self::write_err(&real))?;
        self.links.insert(path.to_path_buf(), target.to_path_buf());
        Ok(())
    }

    fn write_file<R: Read>(
        &mut self,
        path: &Path,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ArchiveError> {
        if let Some(kind) = self.kind_of(path) {
            return Err(self.refuse(path, format!("is listed twice (already {kind})")));
        }
        let size = entry.size();
        let listed = match &self.manifest {
            Some(manifest) => {
                let Some(listed) = manifest.file(path) else {
                    return Err(self.verify_err(VerifyError::Unlisted {
                        path: path.to_path_buf(),
                    }));
                };
                if listed.size != size {
                    return Err(self.verify_err(VerifyError::Size {
                        path: path.to_path_buf(),
                        expected: listed.size,
                        found: size,
                    }));
                }
                Some(listed.clone())
            }
            None => None,
        };
        let header_mode = entry.header().mode().unwrap_or(0o644);
        if header_mode & 0o7000 != 0 {
            return Err(self.refuse(
                path,
                format!("has mode {header_mode:o} in the archive; setuid, setgid and sticky bits are not allowed"),
            ));
        }
        // The manifest's mode when known; else the archive's, tamed (checked once the manifest
        // comes).
        let mode = match &listed {
            Some(listed) => listed.mode,
            None => header_mode & 0o755,
        };
        let real = self.staging.join(path);
        // create_new: O_EXCL, so nothing is followed or overwritten.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&real)
            .map_err(Self::write_err(&real))?;
        let (written, sha256) = if size >= WRITEBACK_EVERY {
            // A large file: its pages go to disk while the rest is still being unpacked, so the
            // final fsync waits for little instead of for the whole file (time ≈ max(CPU, disk)
            // instead of their sum).
            let flushed = file.try_clone().map_err(Self::write_err(&real))?;
            let (request, requests) = mpsc::sync_channel::<()>(1);
            thread::scope(|scope| {
                let flusher =
                    scope.spawn(move || requests.iter().try_for_each(|()| flushed.sync_data()));
                let mut since_flush = 0u64;
                let copied = self.copy_hashing(entry, &mut file, &real, true, |n| {
                    since_flush += n;
                    if since_flush >= WRITEBACK_EVERY {
                        since_flush = 0;
                        // Full: a flush is already asked for and will cover these pages too.
                        // Disconnected: the flusher failed; its error comes out of join below.
                        let _ = request.try_send(());
                    }
                });
                drop(request);
                let flushed = flusher
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                let copied = copied?;
                flushed.map_err(Self::write_err(&real))?;
                Ok::<_, ArchiveError>(copied)
            })?
        } else {
            self.copy_hashing(entry, &mut file, &real, false, |_| {})?
        };
        if written != size {
            return Err(ArchiveError::Truncated {
                archive: self.archive.to_string(),
                entry: path.to_path_buf(),
                expected: size,
                found: written,
            });
        }
        if let Some(listed) = &listed {
            check_digest(path, listed, written, &sha256).map_err(|e| self.verify_err(e))?;
        }
        file.set_permissions(fs::Permissions::from_mode(mode))
            .and_then(|()| file.sync_all())
            .map_err(Self::write_err(&real))?;
        self.bytes += written;
        self.files.insert(
            path.to_path_buf(),
            Written {
                size: written,
                sha256,
                mode,
            },
        );
        Ok(())
    }

    /// Copy `entry` into `file`, hashing on the way; `progress` hears of each chunk written.
    /// Returns the bytes written and their SHA-256 (hex). `alongside`, for a large file: hash on
    /// a thread of its own ([`crate::overlay::verify::sha256_alongside`]).
    fn copy_hashing<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut File,
        real: &Path,
        alongside: bool,
        mut progress: impl FnMut(u64),
    ) -> Result<(u64, String), ArchiveError> {
        if alongside {
            return crate::overlay::verify::sha256_alongside(|chunk| {
                let n = self.read_chunk(entry, chunk)?;
                self.write_chunk(file, real, &chunk[..n])?;
                progress(n as u64);
                Ok(n)
            });
        }
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut buffer = std::mem::take(&mut self.buffer);
        let copied = loop {
            let n = match self.read_chunk(entry, &mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if let Err(e) = self.write_chunk(file, real, &buffer[..n]) {
                break Err(e);
            }
            hasher.update(&buffer[..n]);
            written += n as u64;
            progress(n as u64);
        };
        self.buffer = buffer;
        copied.map(|()| (written, hex::encode(hasher.finalize())))
    }

    /// The next chunk of `entry` into `buffer`; 0 at its end.
    fn read_chunk<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        buffer: &mut [u8],
    ) -> Result<usize, ArchiveError> {
        loop {
            match entry.read(buffer) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ArchiveError::Read {
                        archive: self.archive.to_string(),
                        error: source,
                    })
                }
                Ok(n) => return Ok(n),
            }
        }
    }

    /// Write `chunk` to `file`, within the disk reserve.
    fn write_chunk(
        &mut self,
        file: &mut File,
        real: &Path,
        chunk: &[u8],
    ) -> Result<(), ArchiveError> {
        self.space.before_write(chunk.len() as u64)?;
        file.write_all(chunk).map_err(Self::write_err(real))
    }

    /// Kept in memory, not written: the caller checks it before publishing.
    fn read_signature<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ArchiveError> {
        if self.signature.is_some() {
            return Err(self.refuse(Path::new(SIGNATURE_NAME), "is listed twice"));
        }
        self.signature = Some(self.read_text(entry, MAX_SIGNATURE_BYTES, "bytes of signature")?);
        Ok(())
    }

    /// A small text member (manifest, signature), refused above `limit` bytes.
    fn read_text<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        limit: u64,
        what: &'static str,
    ) -> Result<String, ArchiveError> {
        if entry.size() > limit {
            return Err(ArchiveError::TooLarge {
                archive: self.archive.to_string(),
                limit,
                what,
            });
        }
        let mut text = String::new();
        entry
            .read_to_string(&mut text)
            .map_err(|source| ArchiveError::Read {
                archive: self.archive.to_string(),
                error: source,
            })?;
        Ok(text)
    }

    fn read_manifest<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ArchiveError> {
        let origin = PathBuf::from(format!("{}: {MANIFEST_NAME}", self.archive));
        if self.manifest.is_some() {
            return Err(self.refuse(Path::new(MANIFEST_NAME), "is listed twice"));
        }
        let text = self.read_text(entry, MAX_MANIFEST_BYTES, "bytes of manifest")?;
        let manifest = Manifest::parse(&text, &origin)?;
        if let Some((field, expected, found)) = self.key.mismatch(&manifest) {
            return Err(ArchiveError::WrongOverlay {
                archive: self.archive.to_string(),
                field,
                expected,
                found,
            });
        }
        self.check_manifest_total(&manifest)?;
        // What came before the manifest is checked now.
        for (path, written) in &self.files {
            let Some(listed) = manifest.file(path) else {
                return Err(self.verify_err(VerifyError::Unlisted { path: path.clone() }));
            };
            check_digest(path, listed, written.size, &written.sha256)
                .map_err(|e| self.verify_err(e))?;
        }
        for (path, target) in &self.links {
            check_link(&manifest, path, target).map_err(|e| self.verify_err(e))?;
        }
        for dir in &self.dirs {
            if manifest.file(dir).is_some() || manifest.symlinks.iter().any(|l| &l.path == dir) {
                return Err(self.verify_err(VerifyError::WrongType {
                    path: dir.clone(),
                    expected: "a file or link",
                    found: "a directory".into(),
                }));
            }
        }
        let real = self.staging.join(MANIFEST_NAME);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&real)
            .map_err(Self::write_err(&real))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.set_permissions(fs::Permissions::from_mode(0o644)))
            .and_then(|()| file.sync_all())
            .map_err(Self::write_err(&real))?;
        self.manifest = Some(manifest);
        self.manifest_text = text;
        Ok(())
    }

    /// The manifest's files must fit in the unpacked-size limit and, what is not written yet,
    /// on the file system with its reserve left free.
    fn check_manifest_total(&self, manifest: &Manifest) -> Result<(), ArchiveError> {
        let total = manifest
            .files
            .iter()
            .fold(0u64, |sum, f| sum.saturating_add(f.size));
        if total > self.max_unpacked_bytes {
            return Err(ArchiveError::TooLarge {
                archive: self.archive.to_string(),
                limit: self.max_unpacked_bytes,
                what: "bytes of files (the manifest's total)",
            });
        }
        self.space.ensure(
            total.saturating_sub(self.bytes),
            "the overlay's files (the manifest's total)",
        )?;
        Ok(())
    }

    /// Everything listed arrived; modes are the manifest's; directories are durable.
    fn finish(self) -> Result<Extracted, ArchiveError> {
        let Some(manifest) = self.manifest.as_ref() else {
            return Err(ArchiveError::NoManifest {
                archive: self.archive.to_string(),
            });
        };
        for listed in &manifest.files {
            let Some(written) = self.files.get(&listed.path) else {
                return Err(self.verify_err(VerifyError::Missing {
                    path: listed.path.clone(),
                }));
            };
            if written.mode != listed.mode {
                // Only files that came before the manifest, in an archive whose header modes
                // differ from the manifest's.
                let real = self.staging.join(&listed.path);
                File::open(&real)
                    .and_then(|f| {
                        f.set_permissions(fs::Permissions::from_mode(listed.mode))?;
                        f.sync_all()
                    })
                    .map_err(Self::write_err(&real))?;
            }
        }
        if let Some(link) = manifest
            .symlinks
            .iter()
            .find(|l| !self.links.contains_key(&l.path))
        {
            return Err(self.verify_err(VerifyError::Missing {
                path: link.path.clone(),
            }));
        }
        // Children before parents, so each directory's entries are durable before it is.
        let mut dirs: Vec<&PathBuf> = self.dirs.iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let real = self.staging.join(dir);
            fsync_dir(&real).map_err(Self::write_err(&real))?;
        }
        fsync_dir(self.staging).map_err(Self::write_err(self.staging))?;
        Ok(Extracted {
            manifest: self.manifest.expect("checked above"),
            bytes: self.bytes,
            manifest_text: self.manifest_text,
            signature: self.signature,
        })
    }
}

fn check_link(manifest: &Manifest, path: &Path, target: &Path) -> Result<(), VerifyError> {
    match manifest.symlinks.iter().find(|l| l.path == path) {
        Some(listed) if listed.target == target => Ok(()),
        Some(listed) => Err(VerifyError::LinkTarget {
            path: path.to_path_buf(),
            expected: listed.target.clone(),
            found: target.to_path_buf(),
        }),
        None if manifest.file(path).is_some() => Err(VerifyError::WrongType {
            path: path.to_path_buf(),
            expected: "a regular file",
            found: "a symlink".into(),
        }),
        None => Err(VerifyError::Unlisted {
            path: path.to_path_buf(),
        }),
    }
}

/// An archive path as a plain relative path: leading `./` dropped (archives made with
/// `tar -C dir .` have it), `None` for the top directory itself; absolute paths, `..` and
/// control characters refused.
pub(crate) fn plain_relative(path: &Path) -> Result<Option<PathBuf>, &'static str> {
    if path.to_string_lossy().chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains \"..\""),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_magic() {
        assert_eq!(
            Compression::detect(&[0x1f, 0x8b, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::detect(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0]),
            Some(Compression::Xz)
        );
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Some(Compression::Zstd)
        );
        let mut tar = vec![0u8; 512];
        tar[257..263].copy_from_slice(b"ustar\0");
        assert_eq!(Compression::detect(&tar), Some(Compression::None));
        assert_eq!(Compression::detect(b"PK\x03\x04 a zip"), None);
        assert_eq!(Compression::detect(&[]), None);
    }

    #[test]
    fn archive_paths() {
        assert_eq!(
            plain_relative(Path::new("./usr/lib/x")).unwrap(),
            Some(PathBuf::from("usr/lib/x"))
        );
        assert_eq!(plain_relative(Path::new("./")).unwrap(), None);
        assert_eq!(
            plain_relative(Path::new("usr/lib/")).unwrap(),
            Some(PathBuf::from("usr/lib"))
        );
        assert!(plain_relative(Path::new("/etc/passwd")).is_err());
        assert!(plain_relative(Path::new("usr/../../etc")).is_err());
        assert!(plain_relative(Path::new("usr/a\nb")).is_err());
    }

    #[test]
    fn bounded_reader_tells_exact_from_over() {
        let mut exact = Bounded {
            inner: &b"abcd"[..],
            remaining: 4,
            exceeded: false,
        };
        let mut out = Vec::new();
        exact.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcd");
        assert!(!exact.exceeded);
        let mut over = Bounded {
            inner: &b"abcde"[..],
            remaining: 4,
            exceeded: false,
        };
        assert!(over.read_to_end(&mut Vec::new()).is_err());
        assert!(over.exceeded);
    }
}

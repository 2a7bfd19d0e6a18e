//! Checking a tree on disk against its manifest: every listed file present with its size and
//! sha256, every listed link with its target, and nothing else (no unlisted file, no device
//! node, fifo or socket, no setuid bit).

use crate::fsutil::{PathIoError, WithPath};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use sha2::{Digest, Sha256};

use crate::overlay::manifest::{FileEntry, Manifest, GENERATED_FILES, MANIFEST_NAME};

/// A tree with more directories than this is refused rather than walked forever.
const MAX_DIRECTORIES: usize = 100_000;

/// Why a tree does not match its manifest (the first difference found). From [`verify_tree`]
/// every `path` is the entry's path on disk (under the verified directory); in an archive's
/// errors it is relative to the overlay root.

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file or link the manifest lists is absent from the tree.
    #[error("{path}: listed in the manifest but missing from the overlay")]
    Missing {
        /// Where the entry should be.
        path: PathBuf,
    },
    /// A regular file or symlink in the tree that the manifest does not list (the manifest
    /// and signature at the top, and generated files when allowed, are skipped).
    #[error(
        "{path}: not listed in the manifest; an overlay holds exactly the files its manifest lists"
    )]
    Unlisted {
        /// The unexpected entry.
        path: PathBuf,
    },
    /// A file's size differs from the manifest's (or the file grew while it was hashed).
    #[error("{path}: size is {found} bytes, the manifest says {expected}: the file is truncated or altered")]
    Size {
        /// The file.
        path: PathBuf,
        /// The size the manifest lists.
        expected: u64,
        /// The size found (when hashing, at most `expected + 1`: reading stops there).
        found: u64,
    },
    /// A file's SHA-256 differs from the manifest's.
    #[error(
        "{path}: sha256 is {found}, the manifest says {expected}: the file is corrupt or altered"
    )]
    Digest {
        /// The file.
        path: PathBuf,
        /// The digest the manifest lists (lowercase hex).
        expected: String,
        /// The digest computed (lowercase hex).
        found: String,
    },
    /// An entry has the wrong kind: a directory where a file or link is listed, a symlink
    /// where a regular file is listed, or a device node, fifo or socket anywhere.
    #[error("{path}: {found}, the manifest lists {expected}")]
    WrongType {
        /// The entry.
        path: PathBuf,
        /// What was expected, as a noun phrase ("a regular file").
        expected: &'static str,
        /// What was found, as a noun phrase ("a directory", "a fifo").
        found: String,
    },
    /// A symlink points somewhere other than the manifest's target.
    #[error("{path}: symlink points to {found:?}, the manifest says {expected:?}")]
    LinkTarget {
        /// The link.
        path: PathBuf,
        /// The target the manifest lists.
        expected: PathBuf,
        /// The target read from disk.
        found: PathBuf,
    },
    /// A regular file on disk has its setuid, setgid, sticky or world-writable bit set.
    #[error("{path}: mode {mode:o} carries setuid, setgid, sticky or world-writable bits; overlays may not")]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its mode on disk (permission and special bits, `& 0o7777`).
        mode: u32,
    },
    /// The tree has more than 100,000 directories; the walk stops rather than run on.
    #[error("{dir}: more than {MAX_DIRECTORIES} directories; refusing to walk it")]
    TooLarge {
        /// The tree's root, as passed to [`verify_tree`].
        dir: PathBuf,
    },
    /// Reading a directory, an entry's metadata, a link or a file failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// Whether [`verify_tree`] tolerates the files a store generates after verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generated {
    /// A source tree: only what the manifest lists.
    Refuse,
    /// A store copy: the files the store makes itself ([`GENERATED_FILES`]) may exist too.
    Allow,
}

/// Verify the tree at `dir` (a real path) against `manifest`.
pub fn verify_tree(
    dir: &Path,
    manifest: &Manifest,
    generated: Generated,
) -> Result<(), VerifyError> {
    let mut expected_files: BTreeMap<&Path, &FileEntry> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_path(), f))
        .collect();
    let mut expected_links: BTreeMap<&Path, &Path> = manifest
        .symlinks
        .iter()
        .map(|s| (s.path.as_path(), s.target.as_path()))
        .collect();

    let mut pending = vec![PathBuf::new()];
    let mut directories = 0usize;
    while let Some(relative_dir) = pending.pop() {
        directories += 1;
        if directories > MAX_DIRECTORIES {
            return Err(VerifyError::TooLarge {
                dir: dir.to_path_buf(),
            });
        }
        let absolute_dir = dir.join(&relative_dir);
        let mut entries: Vec<_> = fs::read_dir(&absolute_dir)
            .with_path(&absolute_dir)?
            .collect::<Result<_, _>>()
            .with_path(&absolute_dir)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let relative = relative_dir.join(entry.file_name());
            let absolute = dir.join(&relative);
            if relative == Path::new(MANIFEST_NAME)
                || relative == Path::new(crate::overlay::signature::SIGNATURE_NAME)
            {
                continue;
            }
            let meta = fs::symlink_metadata(&absolute).with_path(&absolute)?;
            let file_type = meta.file_type();
            if file_type.is_dir() {
                if expected_files.contains_key(relative.as_path())
                    || expected_links.contains_key(relative.as_path())
                {
                    return Err(VerifyError::WrongType {
                        path: absolute,
                        expected: "a file or link",
                        found: "a directory".into(),
                    });
                }
                pending.push(relative);
            } else if file_type.is_symlink() {
                let Some(expected) = expected_links.remove(relative.as_path()) else {
                    return Err(unlisted_or_wrong(
                        absolute,
                        &relative,
                        &expected_files,
                        "a symlink",
                    ));
                };
                let found = fs::read_link(&absolute).with_path(&absolute)?;
                if found != expected {
                    return Err(VerifyError::LinkTarget {
                        path: absolute,
                        expected: expected.to_path_buf(),
                        found,
                    });
                }
            } else if file_type.is_file() {
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o7002 != 0 {
                    return Err(VerifyError::Mode {
                        path: absolute,
                        mode,
                    });
                }
                if generated == Generated::Allow
                    && GENERATED_FILES.iter().any(|g| relative == Path::new(g))
                {
                    continue;
                }
                let Some(entry) = expected_files.remove(relative.as_path()) else {
                    return Err(VerifyError::Unlisted { path: absolute });
                };
                check_file(&absolute, entry, meta.len())?;
            } else {
                return Err(VerifyError::WrongType {
                    path: absolute,
                    expected: "only regular files, directories and symlinks",
                    found: describe_special(&file_type),
                });
            }
        }
    }
    if let Some(path) = expected_files.keys().chain(expected_links.keys()).next() {
        return Err(VerifyError::Missing {
            path: dir.join(path),
        });
    }
    Ok(())
}

fn unlisted_or_wrong(
    absolute: PathBuf,
    relative: &Path,
    files: &BTreeMap<&Path, &FileEntry>,
    found: &str,
) -> VerifyError {
    if files.contains_key(relative) {
        VerifyError::WrongType {
            path: absolute,
            expected: "a regular file",
            found: found.to_string(),
        }
    } else {
        VerifyError::Unlisted { path: absolute }
    }
}

fn describe_special(file_type: &fs::FileType) -> String {
    if file_type.is_block_device() || file_type.is_char_device() {
        "a device node".into()
    } else if file_type.is_fifo() {
        "a fifo".into()
    } else if file_type.is_socket() {
        "a socket".into()
    } else {
        "an unknown file type".into()
    }
}

fn check_file(path: &Path, entry: &FileEntry, size_on_disk: u64) -> Result<(), VerifyError> {
    if size_on_disk != entry.size {
        return Err(VerifyError::Size {
            path: path.to_path_buf(),
            expected: entry.size,
            found: size_on_disk,
        });
    }
    let file = File::open(path).with_path(path)?;
    let (size, digest) = sha256_reader(file, entry.size).with_path(path)?;
    check_digest(path, entry, size, &digest)
}

/// Compare a computed (size, digest) with the manifest entry.
pub fn check_digest(
    path: &Path,
    entry: &FileEntry,
    size: u64,
    digest: &str,
) -> Result<(), VerifyError> {
    if size != entry.size {
        return Err(VerifyError::Size {
            path: path.to_path_buf(),
            expected: entry.size,
            found: size,
        });
    }
    if digest != entry.sha256 {
        return Err(VerifyError::Digest {
            path: path.to_path_buf(),
            expected: entry.sha256.clone(),
            found: digest.to_string(),
        });
    }
    Ok(())
}

/// sha256 and length of a reader, reading at most `limit + 1` bytes (a file that grew past its
/// manifest size is caught without reading all of it).
pub fn sha256_reader(reader: impl Read, limit: u64) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut reader = reader.take(limit.saturating_add(1));
    let mut buffer = vec![0u8; crate::fsutil::IO_CHUNK];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// SHA-256 of what `fill` produces, hashed on a thread of its own so that producing the bytes
/// (reading, decompressing, writing) overlaps hashing: on two cores about the slower of the two
/// instead of their sum. `fill` puts the next chunk into the buffer it is given and returns its
/// length, 0 at the end; its first error stops everything and is returned. Returns the total
/// length and the digest (hex).
pub fn sha256_alongside<E>(
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(u64, String), E> {
    const CHUNKS: usize = 4;
    let (full, to_hash) = mpsc::sync_channel::<(Vec<u8>, usize)>(CHUNKS);
    let (hashed, empty) = mpsc::sync_channel::<Vec<u8>>(CHUNKS);
    for _ in 0..CHUNKS {
        let _ = hashed.send(vec![0u8; crate::fsutil::IO_CHUNK]);
    }
    thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            let mut hasher = Sha256::new();
            for (chunk, n) in to_hash {
                hasher.update(&chunk[..n]);
                // The producer may have stopped already: the chunk is then simply dropped.
                let _ = hashed.send(chunk);
            }
            hex::encode(hasher.finalize())
        });
        let mut total = 0u64;
        let filled = loop {
            // Nothing comes back only once the hasher is gone: its panic comes out of join.
            let Ok(mut chunk) = empty.recv() else {
                break Ok(());
            };
            match fill(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    total += n as u64;
                    if full.send((chunk, n)).is_err() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        drop(full);
        let digest = hasher
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        filled.map(|()| (total, digest))
    })
}

/// The SHA-256 of `bytes`, as 64 lowercase hex digits.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::manifest::{Flavor, SymlinkEntry, FORMAT_VERSION};
    use std::os::unix::fs::symlink;

    const KVER: &str = "6.1.0-28-cloud-amd64";

    /// Bytes that differ chunk by chunk, so a chunk hashed twice, skipped or out of order
    /// changes the digest.
    fn counting_bytes(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 18) as u8)
            .collect()
    }

    #[test]
    fn hashing_alongside_matches_hashing_in_line() {
        // Many more chunks than are in flight, and a short last one.
        let data = counting_bytes(23 * crate::fsutil::IO_CHUNK + 1234);
        let mut rest = data.as_slice();
        let (total, digest) = sha256_alongside(|chunk: &mut [u8]| {
            // Short fills too, as a decompressor gives them.
            let n = rest.len().min(chunk.len() / 3 + 1);
            chunk[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            Ok::<_, io::Error>(n)
        })
        .unwrap();
        assert_eq!(total, data.len() as u64);
        assert_eq!(digest, sha256_bytes(&data));
        assert_eq!(
            sha256_reader(data.as_slice(), u64::MAX).unwrap(),
            (total, digest)
        );
    }

    #[test]
    fn hashing_alongside_stops_at_the_first_error() {
        let mut calls = 0;
        let result = sha256_alongside(|chunk: &mut [u8]| {
            calls += 1;
            if calls == 7 {
                return Err("the disk is full");
            }
            chunk.fill(1);
            Ok(chunk.len())
        });
        assert_eq!(result, Err("the disk is full"));
        assert_eq!(calls, 7, "nothing asked for after the error");
    }

    fn tree() -> (tempfile::TempDir, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let module = format!("usr/lib/modules/{KVER}/extra/nvidia.ko");
        let fw = "usr/lib/firmware/nvidia/570.1/gsp.bin".to_string();
        let mut files = Vec::new();
        for (path, body) in [
            (&module, b"module".as_slice()),
            (&fw, b"firmware".as_slice()),
        ] {
            let abs = dir.path().join(path);
            fs::create_dir_all(abs.parent().unwrap()).unwrap();
            fs::write(&abs, body).unwrap();
            files.push(FileEntry {
                path: path.into(),
                size: body.len() as u64,
                sha256: sha256_bytes(body),
                mode: 0o644,
            });
        }
        fs::create_dir_all(dir.path().join("usr/lib64")).unwrap();
        symlink("../lib/firmware", dir.path().join("usr/lib64/fw")).unwrap();
        let manifest = Manifest {
            format: FORMAT_VERSION,
            kernel_release: KVER.into(),
            driver_version: "570.1".into(),
            arch: "x86_64".into(),
            flavor: Flavor::Open,
            files,
            symlinks: vec![SymlinkEntry {
                path: "usr/lib64/fw".into(),
                target: "../lib/firmware".into(),
            }],
        };
        fs::write(dir.path().join(MANIFEST_NAME), manifest.to_toml()).unwrap();
        (dir, manifest)
    }

    #[test]
    fn good_tree_verifies() {
        let (dir, manifest) = tree();
        verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap();
    }

    #[test]
    fn altered_file_is_caught() {
        let (dir, manifest) = tree();
        fs::write(dir.path().join(&manifest.files[0].path), b"modulX").unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(matches!(e, VerifyError::Digest { .. }), "{e}");
    }

    #[test]
    fn truncated_file_is_caught() {
        let (dir, manifest) = tree();
        fs::write(dir.path().join(&manifest.files[0].path), b"mod").unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(
            matches!(
                e,
                VerifyError::Size {
                    expected: 6,
                    found: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn unlisted_file_is_caught() {
        let (dir, manifest) = tree();
        fs::write(dir.path().join("usr/lib64/extra.so"), b"x").unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(matches!(e, VerifyError::Unlisted { .. }), "{e}");
    }

    #[test]
    fn generated_file_only_allowed_in_store() {
        let (dir, manifest) = tree();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/ld.so.cache"), b"cache").unwrap();
        assert!(verify_tree(dir.path(), &manifest, Generated::Refuse).is_err());
        verify_tree(dir.path(), &manifest, Generated::Allow).unwrap();
    }

    #[test]
    fn missing_file_and_changed_link_are_caught() {
        let (dir, manifest) = tree();
        fs::remove_file(dir.path().join(&manifest.files[1].path)).unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(matches!(e, VerifyError::Missing { .. }), "{e}");

        let (dir, manifest) = tree();
        fs::remove_file(dir.path().join("usr/lib64/fw")).unwrap();
        symlink("/etc", dir.path().join("usr/lib64/fw")).unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(matches!(e, VerifyError::LinkTarget { .. }), "{e}");
    }

    #[test]
    fn file_replaced_by_symlink_is_caught() {
        let (dir, manifest) = tree();
        let path = dir.path().join(&manifest.files[0].path);
        fs::remove_file(&path).unwrap();
        symlink("/etc/passwd", &path).unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(matches!(e, VerifyError::WrongType { .. }), "{e}");
    }

    #[test]
    fn setuid_and_fifo_are_refused() {
        let (dir, manifest) = tree();
        let path = dir.path().join(&manifest.files[0].path);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o4755)).unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(matches!(e, VerifyError::Mode { .. }), "{e}");

        let (dir, manifest) = tree();
        nix::unistd::mkfifo(&dir.path().join("usr/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = verify_tree(dir.path(), &manifest, Generated::Refuse).unwrap_err();
        assert!(e.to_string().contains("fifo"), "{e}");
    }
}

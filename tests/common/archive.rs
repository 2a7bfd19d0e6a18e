//! Packs overlay directories into tar archives (plain, gzip, xz, zstd) the way overlay
//! publishers would, and writes raw hostile archives byte by byte for the refusal tests.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use nvdriver_agent::overlay::source::archive::Compression;
use nvdriver_agent::overlay::Manifest;

use super::overlay::OverlayBuilder;

/// Where `overlay.toml` goes in the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestAt {
    First,
    Last,
}

/// Every path under `dir`, relative, sorted (so parents come before children).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(dir.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let child = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                pending.push(child.clone());
            }
            out.push(child);
        }
    }
    out.sort();
    out
}

/// A tar of the overlay tree at `dir`, entries named `./path` as `tar -C dir .` names them.
pub fn pack_dir(dir: &Path, manifest: ManifestAt) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    let mut paths = walk(dir);
    paths.retain(|p| p != Path::new("overlay.toml"));
    if !dir.join("overlay.toml").exists() {
        // Packed as is, for the tests of archives without one.
    } else if manifest == ManifestAt::First {
        paths.insert(0, PathBuf::from("overlay.toml"));
    } else {
        paths.push(PathBuf::from("overlay.toml"));
    }
    for rel in paths {
        builder
            .append_path_with_name(dir.join(&rel), Path::new(".").join(&rel))
            .unwrap();
    }
    builder.into_inner().unwrap()
}

pub fn compress(tar: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar).unwrap();
            encoder.finish().unwrap()
        }
        Compression::Xz => {
            let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 1);
            encoder.write_all(tar).unwrap();
            encoder.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

/// Build the overlay, pack and compress it.
pub fn overlay_archive(
    builder: &OverlayBuilder,
    compression: Compression,
    at: ManifestAt,
) -> (Vec<u8>, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = builder.build(dir.path());
    (compress(&pack_dir(dir.path(), at), compression), manifest)
}

/// One raw archive entry; names are written byte for byte, unchecked.
pub enum Raw<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
}

/// A tar of raw entries, for archives no honest packer writes.
pub fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (name, link, kind, data): (&str, Option<&str>, tar::EntryType, &[u8]) = match entry {
            Raw::File(name, data) => (name, None, tar::EntryType::Regular, data),
            Raw::Dir(name) => (name, None, tar::EntryType::Directory, &[]),
            Raw::Symlink(name, target) => (name, Some(target), tar::EntryType::Symlink, &[]),
        };
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

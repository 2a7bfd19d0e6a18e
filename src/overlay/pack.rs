//! `nvdriver-agent overlay pack`: build an overlay (directory and/or `.tar.zst`) from a
//! directory of built modules, a firmware directory and optional user space, with a manifest
//! whose kernel release and driver version come from the modules themselves.
//!
//! Packing is reproducible: entries are sorted, every tar header has mtime 0, uid/gid 0 and no
//! user or group names, modes are normalised to 0644/0755, and zstd runs single-threaded at a
//! fixed level. The same inputs give the same bytes on any host.

use crate::fsutil::{PathIoError, WithPath};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::fsutil::temp_sibling;
use crate::modinfo::{self, ModinfoError};
use crate::overlay::manifest::{
    module_stem, FileEntry, Flavor, Manifest, ManifestError, SymlinkEntry, FORMAT_VERSION,
    MANIFEST_NAME,
};
use crate::overlay::signature::{self, SignatureError, SIGNATURE_NAME};
use crate::overlay::verify::sha256_reader;

/// zstd level of packed archives: fixed, so archives are reproducible.
pub const ZSTD_LEVEL: i32 = 12;

/// What to pack.
#[derive(Clone, Debug)]
pub struct PackInput {
    /// A directory holding the built modules (`nvidia*.ko*`, searched recursively): NVIDIA's
    /// `kernel-open` output directory or a `/lib/modules/<kver>` tree.
    pub modules: PathBuf,
    /// The driver's firmware files (`gsp_*.bin`), packed under
    /// `usr/lib/firmware/nvidia/<driver>/`.
    pub firmware: Option<PathBuf>,
    /// A root-shaped tree of user space (`usr/bin/nvidia-smi`, `usr/lib64/libcuda.so.*`),
    /// packed as it is.
    pub userspace: Option<PathBuf>,
    /// `uname -m` of the target.
    pub arch: String,
}

/// An overlay ready to write: its manifest and where each listed file's bytes come from.
#[derive(Clone, Debug)]
pub struct Packed {
    /// The manifest of the overlay; [`Packed::manifest_text`] is its TOML.
    pub manifest: Manifest,
    /// `overlay.toml` as written (what a signature covers).
    pub manifest_text: String,
    /// `overlay.toml.minisig`, after [`Packed::sign`].
    pub signature: Option<String>,
    /// (path in the overlay, real source path), in manifest order.
    sources: Vec<(PathBuf, PathBuf)>,
}

/// Why `overlay pack` failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// No `nvidia*` kernel module file was found under the modules directory.
    #[error("{dir}: no NVIDIA kernel modules (nvidia*.ko, .ko.xz, .ko.zst) found; point --modules at the kernel-open build output or a /lib/modules/<kver> tree")]
    NoModules {
        /// The modules directory that was searched.
        dir: PathBuf,
    },
    /// Modules were found, but none is `nvidia` itself, whose `version` gives the driver version.
    #[error("{dir}: no nvidia.ko among the modules; its `version` field is the driver version")]
    NoNvidiaModule {
        /// The modules directory that was searched.
        dir: PathBuf,
    },
    /// `nvidia.ko` has no `version` field in its `.modinfo`.
    #[error("{path}: nvidia.ko has no `version` field; cannot tell the driver version")]
    NoVersion {
        /// The module file.
        path: PathBuf,
    },
    /// Two modules were built for different kernels (the releases in their `vermagic` differ).
    #[error("{path} was built for kernel {found}, but {first} was built for {expected}; pack modules of one kernel at a time")]
    MixedKernels {
        /// The module built for another kernel.
        path: PathBuf,
        /// Its kernel release.
        found: String,
        /// The first module found.
        first: PathBuf,
        /// The first module's kernel release.
        expected: String,
    },
    /// Two module files under the modules directory have the same file name, so both would land on
    /// the same overlay path.
    #[error("{first} and {second} both become {name}; keep one of them")]
    DuplicateModule {
        /// The first one found.
        first: PathBuf,
        /// The second one.
        second: PathBuf,
        /// The file name they share.
        name: String,
    },
    /// An input directory holds something other than a regular file, directory or symlink (a
    /// socket, a FIFO, a device).
    #[error("{path}: only regular files, directories and symlinks can be packed")]
    Unsupported {
        /// Its path.
        path: PathBuf,
    },
    /// The output directory of [`Packed::write_dir`] already exists.
    #[error("{path} already exists; pack into a new directory")]
    Exists {
        /// The output path.
        path: PathBuf,
    },
    /// A module's `.modinfo` could not be read.
    #[error(transparent)]
    Module(#[from] ModinfoError),
    /// The manifest made from the inputs fails the checks every reader of an overlay applies.
    ///
    /// Not `#[from]`: the message carries the cause (see [`PathIoError`]), so it is no source.
    #[error("the packed manifest is not valid: {0}")]
    Manifest(ManifestError),
    /// Signing the manifest failed: the secret key is unusable, or encrypted and no password was
    /// given.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// Reading an input or writing an output failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

impl From<ManifestError> for PackError {
    fn from(e: ManifestError) -> Self {
        PackError::Manifest(e)
    }
}

/// Every regular file and symlink under `dir`, relative, sorted; directories are walked.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, PackError> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let absolute = dir.join(&relative);
        for entry in fs::read_dir(&absolute).with_path(&absolute)? {
            let entry = entry.with_path(&absolute)?;
            let path = relative.join(entry.file_name());
            let kind = entry.file_type().with_path(&absolute)?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() || kind.is_symlink() {
                found.push(path);
            } else {
                return Err(PackError::Unsupported {
                    path: dir.join(path),
                });
            }
        }
    }
    found.sort();
    Ok(found)
}

/// 0755 when anyone may execute it, else 0644: no host umask or ownership leaks in.
fn normal_mode(meta: &fs::Metadata) -> u32 {
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

fn file_entry(overlay_path: PathBuf, real: &Path) -> Result<FileEntry, PackError> {
    let file = File::open(real).with_path(real)?;
    let meta = file.metadata().with_path(real)?;
    let (size, sha256) = sha256_reader(file, u64::MAX).with_path(real)?;
    Ok(FileEntry {
        path: overlay_path,
        size,
        sha256,
        mode: normal_mode(&meta),
    })
}

/// Read the modules, firmware and user space of `input` and make the manifest.
pub fn plan(input: &PackInput) -> Result<Packed, PackError> {
    // (file name, real path, release)
    let mut modules: Vec<(String, PathBuf, String)> = Vec::new();
    let mut driver: Option<(String, Flavor)> = None;
    for relative in walk(&input.modules)? {
        let name = relative
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let is_nvidia = module_stem(&name).is_some_and(|stem| stem.starts_with("nvidia"));
        let real = input.modules.join(&relative);
        // Links are not followed: in an image tree they may point anywhere.
        let is_file = fs::symlink_metadata(&real).is_ok_and(|m| m.is_file());
        if !is_nvidia || !is_file {
            continue;
        }
        let info = modinfo::read_module_file(&real)?;
        modinfo::check_arch(&info, &real, &input.arch)?;
        let release = modinfo::vermagic_release(&info.vermagic).to_string();
        if let Some((_, first, expected)) = modules.first() {
            if *expected != release {
                return Err(PackError::MixedKernels {
                    path: real,
                    found: release,
                    first: first.clone(),
                    expected: expected.clone(),
                });
            }
        }
        if let Some((_, first, _)) = modules.iter().find(|(n, _, _)| *n == name) {
            return Err(PackError::DuplicateModule {
                first: first.clone(),
                second: real,
                name,
            });
        }
        if info.name == "nvidia" {
            let version = info
                .version
                .clone()
                .ok_or_else(|| PackError::NoVersion { path: real.clone() })?;
            // The proprietary modules say "NVIDIA"; the open ones "Dual MIT/GPL".
            let flavor = if info.license.as_deref() == Some("NVIDIA") {
                Flavor::Proprietary
            } else {
                Flavor::Open
            };
            driver = Some((version, flavor));
        }
        modules.push((name, real, release));
    }
    let Some((_, _, kernel_release)) = modules.first().cloned() else {
        return Err(PackError::NoModules {
            dir: input.modules.clone(),
        });
    };
    let Some((driver_version, flavor)) = driver else {
        return Err(PackError::NoNvidiaModule {
            dir: input.modules.clone(),
        });
    };

    let mut sources: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut symlinks = Vec::new();
    let modules_dir = Path::new("usr/lib/modules")
        .join(&kernel_release)
        .join("extra/nvidia");
    for (name, real, _) in &modules {
        sources.push((modules_dir.join(name), real.clone()));
    }
    if let Some(firmware) = &input.firmware {
        let base = Path::new("usr/lib/firmware/nvidia").join(&driver_version);
        add_tree(firmware, &base, &mut sources, &mut symlinks)?;
    }
    if let Some(userspace) = &input.userspace {
        add_tree(userspace, Path::new(""), &mut sources, &mut symlinks)?;
    }
    sources.sort();
    symlinks.sort_by(|a, b| a.path.cmp(&b.path));
    let files = sources
        .iter()
        .map(|(path, real)| {
            let mut entry = file_entry(path.clone(), real)?;
            if modinfo_is_module(path) {
                entry.mode = 0o644;
            }
            Ok(entry)
        })
        .collect::<Result<Vec<_>, PackError>>()?;
    let manifest = Manifest {
        format: FORMAT_VERSION,
        kernel_release,
        driver_version,
        arch: input.arch.clone(),
        flavor,
        files,
        symlinks,
    };
    let manifest_text = manifest.to_toml();
    // The same checks every reader applies: a pack that cannot be staged is an error here.
    Manifest::parse(&manifest_text, Path::new(MANIFEST_NAME))?;
    Ok(Packed {
        manifest,
        manifest_text,
        signature: None,
        sources,
    })
}

/// Files and links of `dir`, placed under `base` in the overlay (links kept as links; the
/// manifest's checks keep them inside the overlay).
fn add_tree(
    dir: &Path,
    base: &Path,
    sources: &mut Vec<(PathBuf, PathBuf)>,
    symlinks: &mut Vec<SymlinkEntry>,
) -> Result<(), PackError> {
    for relative in walk(dir)? {
        let real = dir.join(&relative);
        let meta = fs::symlink_metadata(&real).with_path(&real)?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&real).with_path(&real)?;
            symlinks.push(SymlinkEntry {
                path: base.join(relative),
                target,
            });
        } else {
            sources.push((base.join(relative), real));
        }
    }
    Ok(())
}

fn modinfo_is_module(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| module_stem(n).is_some())
}

impl Packed {
    /// Sign the manifest with a minisign secret key (the key file's text; `password` for an
    /// encrypted one). `key_file` names it in messages.
    pub fn sign(
        &mut self,
        secret_key: &str,
        password: Option<String>,
        key_file: &Path,
    ) -> Result<(), PackError> {
        let comment = format!(
            "nvdriver-agent overlay {} {} {}",
            self.manifest.kernel_release, self.manifest.driver_version, self.manifest.arch
        );
        self.signature = Some(signature::sign(
            self.manifest_text.as_bytes(),
            secret_key,
            password,
            &comment,
            key_file,
        )?);
        Ok(())
    }

    /// Write the overlay tree into `out`, which must not exist (built beside it, then renamed).
    /// Missing parents of `out` are created. Errors name `out` (and paths under it), never the
    /// temporary directory the tree is built in.
    pub fn write_dir(&self, out: &Path) -> Result<(), PackError> {
        if fs::symlink_metadata(out).is_ok() {
            return Err(PackError::Exists {
                path: out.to_path_buf(),
            });
        }
        create_parent(out)?;
        let building = temp_sibling(out);
        let result = self
            .fill_dir(&building)
            .and_then(|()| Ok(fs::rename(&building, out).with_action("create", out)?))
            .map_err(|e| match e {
                PackError::Io(mut e) => {
                    if let Ok(inside) = e.path.strip_prefix(&building) {
                        e.path = out.join(inside);
                    }
                    PackError::Io(e)
                }
                other => other,
            });
        if result.is_err() {
            let _ = fs::remove_dir_all(&building);
        }
        result
    }

    fn fill_dir(&self, dir: &Path) -> Result<(), PackError> {
        fs::create_dir(dir).with_action("create directory", dir)?;
        for (entry, (_, real)) in self.manifest.files.iter().zip(&self.sources) {
            let to = dir.join(&entry.path);
            let parent = to.parent().expect("entry has a parent");
            fs::create_dir_all(parent).with_action("create directory", parent)?;
            fs::copy(real, &to).with_action("write", &to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(entry.mode))
                .with_action("set the mode of", &to)?;
        }
        for link in &self.manifest.symlinks {
            let to = dir.join(&link.path);
            let parent = to.parent().expect("entry has a parent");
            fs::create_dir_all(parent).with_action("create directory", parent)?;
            std::os::unix::fs::symlink(&link.target, &to).with_action("create symlink", &to)?;
        }
        let manifest = dir.join(MANIFEST_NAME);
        fs::write(&manifest, &self.manifest_text).with_action("write", &manifest)?;
        if let Some(signature) = &self.signature {
            let path = dir.join(SIGNATURE_NAME);
            fs::write(&path, signature).with_action("write", &path)?;
        }
        Ok(())
    }

    /// Write the overlay as a reproducible `.tar.zst` to `out` (replaced atomically). Missing
    /// parents of `out` are created; errors name `out`, not the temporary file beside it.
    pub fn write_archive(&self, out: &Path) -> Result<(), PackError> {
        let parent = create_parent(out)?;
        let temp = tempfile::NamedTempFile::new_in(parent).with_action("write", out)?;
        self.fill_archive(temp.as_file())
            .with_action("write", out)?;
        temp.as_file().sync_all().with_action("write", out)?;
        temp.persist(out)
            .map_err(|e| PathIoError::doing("write", out, e.error))?;
        Ok(())
    }

    /// Manifest and signature first (a reader can check them before the bulk arrives), then
    /// files and links by path.
    fn fill_archive(&self, file: &File) -> io::Result<()> {
        let mut encoder = zstd::stream::write::Encoder::new(BufWriter::new(file), ZSTD_LEVEL)?;
        encoder.include_checksum(true)?;
        let mut tar = tar::Builder::new(encoder);
        let header = |size: u64, mode: u32, kind: tar::EntryType| {
            let mut h = tar::Header::new_gnu();
            h.set_size(size);
            h.set_mode(mode);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_entry_type(kind);
            h
        };
        let small = |tar: &mut tar::Builder<_>, name: &str, text: &str| {
            let mut h = header(text.len() as u64, 0o644, tar::EntryType::Regular);
            tar.append_data(&mut h, name, text.as_bytes())
        };
        small(&mut tar, MANIFEST_NAME, &self.manifest_text)?;
        if let Some(signature) = &self.signature {
            small(&mut tar, SIGNATURE_NAME, signature)?;
        }
        enum Item<'a> {
            File(&'a FileEntry, &'a Path),
            Link(&'a SymlinkEntry),
        }
        let mut items: Vec<(&Path, Item)> = self
            .manifest
            .files
            .iter()
            .zip(&self.sources)
            .map(|(e, (_, real))| (e.path.as_path(), Item::File(e, real.as_path())))
            .chain(
                self.manifest
                    .symlinks
                    .iter()
                    .map(|l| (l.path.as_path(), Item::Link(l))),
            )
            .collect();
        items.sort_by(|a, b| a.0.cmp(b.0));
        for (path, item) in items {
            match item {
                Item::File(entry, real) => {
                    let mut h = header(entry.size, entry.mode, tar::EntryType::Regular);
                    let input = File::open(real)?;
                    tar.append_data(&mut h, path, input.take(entry.size))?;
                }
                Item::Link(link) => {
                    let mut h = header(0, 0o777, tar::EntryType::Symlink);
                    tar.append_link(&mut h, path, &link.target)?;
                }
            }
        }
        let encoder = tar.into_inner()?;
        encoder.finish()?.flush()
    }
}

/// Create the missing parents of `out` and return its directory (`.` for a bare name).
fn create_parent(out: &Path) -> Result<&Path, PackError> {
    match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            fs::create_dir_all(parent).with_action("create directory", parent)?;
            Ok(parent)
        }
        _ => Ok(Path::new(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed() -> Packed {
        let manifest = Manifest {
            format: FORMAT_VERSION,
            kernel_release: "6.1.0-28-cloud-amd64".into(),
            driver_version: "580.1".into(),
            arch: "x86_64".into(),
            flavor: Flavor::Open,
            files: Vec::new(),
            symlinks: Vec::new(),
        };
        Packed {
            manifest_text: "format = 1\n".into(),
            manifest,
            signature: None,
            sources: Vec::new(),
        }
    }

    #[test]
    fn write_dir_and_archive_create_missing_parents() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b/580.1");
        packed().write_dir(&out).unwrap();
        assert!(out.join(MANIFEST_NAME).is_file());
        let archive = dir.path().join("c/d/580.1.tar.zst");
        packed().write_archive(&archive).unwrap();
        assert!(archive.is_file());
    }

    #[test]
    fn write_dir_errors_name_the_users_path_and_the_os_error_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), "").unwrap();
        let out = dir.path().join("file/580.1");
        let text = packed().write_dir(&out).unwrap_err().to_string();
        assert!(!text.contains(crate::fsutil::TEMP_PREFIX), "{text}");
        assert!(
            text.contains(&dir.path().join("file").display().to_string()),
            "{text}"
        );
        assert_eq!(text.matches("os error").count(), 1, "{text}");

        // A failure inside the tree names the path under `out`, not under the temporary one.
        let out = dir.path().join("580.1");
        let mut bad = packed();
        bad.manifest.files.push(FileEntry {
            path: "usr/lib/missing".into(),
            sha256: String::new(),
            size: 0,
            mode: 0o644,
        });
        bad.sources
            .push(("usr/lib/missing".into(), dir.path().join("no-such-source")));
        let text = bad.write_dir(&out).unwrap_err().to_string();
        assert!(
            text.starts_with(&format!("cannot write {}/usr/lib/missing: ", out.display())),
            "{text}"
        );
        assert!(!out.exists());
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "the temporary tree is removed");
    }
}

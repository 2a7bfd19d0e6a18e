//! The local store of verified overlays: `<store>/<kernel release>/<driver version>/`.
//!
//! A reader never sees half an overlay: [`Store::import`] (and [`crate::overlay::source::stage`] for
//! archives) builds the copy in a temporary sibling, verifies it, fsyncs files and directories,
//! then renames it into place (an atomic exchange when an older copy is there). Whatever changes
//! the store holds [`Store::lock`], so two stagers (or a stager and GC) take turns, and the
//! leftovers of a stage that was killed are recognisable by [`TEMP_PREFIX`] and removed by the
//! next one.
//!
//! A replaced copy may be the one bind-mounted at the driver root (`/run/nvidia/driver`) for the
//! running kernel: a mount follows the directory, not its name, so deleting the old copy would
//! empty the live driver root under running containers. It is renamed to a [`RETIRED_PREFIX`]
//! name instead and removed only once no mount shows it (the next load mounts the new copy;
//! the next stage, import or GC removes the old one).

use crate::fsutil::{PathIoError, WithPath};
use crate::host::version::version_cmp;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{debug, info, warn};

use crate::failpoints::failpoint;
use crate::fsutil::{fsync_dir, temp_sibling, TEMP_PREFIX};
use crate::host::Root;
use crate::overlay::manifest::{Manifest, ManifestError, MANIFEST_NAME};
use crate::overlay::space::{SpaceError, SpaceGuard};
use crate::overlay::verify::{self, check_digest, verify_tree, Generated, VerifyError};

/// Name prefix of an overlay copy that was replaced while it may still be mounted.
pub const RETIRED_PREFIX: &str = ".nvdriver-agent-retired.";

/// Why a store operation failed, or an overlay directory is not usable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory has no `overlay.toml` at its top.
    #[error("{path}: no {MANIFEST_NAME}; an overlay directory holds {MANIFEST_NAME} at its top")]
    NoManifest {
        /// The directory (a real path).
        path: PathBuf,
    },
    /// The manifest could not be parsed, or breaks a rule of the format.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The tree does not match its manifest.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A stored overlay's manifest names another kernel or driver than the directory it sits in.
    #[error("{path}: the manifest says kernel {found_kernel} / driver {found_driver}, but the store keeps it as {expected_kernel}/{expected_driver}; remove it and import it again")]
    Misplaced {
        /// Host path of the overlay directory.
        path: PathBuf,
        /// The kernel release its directory stands for.
        expected_kernel: String,
        /// The driver version its directory stands for.
        expected_driver: String,
        /// The kernel release its manifest names.
        found_kernel: String,
        /// The driver version its manifest names.
        found_driver: String,
    },
    /// The pinned driver version has no overlay for the kernel, though other versions do.
    #[error("driver version {version} is pinned (driver.version) but the store has no overlay for it for kernel {kernel_release}; it has: {available}")]
    PinnedMissing {
        /// The pinned driver version (`driver.version`).
        version: String,
        /// The kernel the overlay was looked for.
        kernel_release: String,
        /// The driver versions stored for that kernel, comma-separated.
        available: String,
    },
    /// The store's lock file could not be locked (`flock`).
    #[error("{path}: cannot lock the store: {error}")]
    Lock {
        /// Real path of the lock file.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// Copying into the store reached the reserve of its file system (`stage.keep-free-*`).
    #[error(transparent)]
    Space(#[from] SpaceError),
    /// Any other I/O error, with its path.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// An overlay in the store (or any overlay directory), manifest parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOverlay {
    /// Host path of the overlay's top directory.
    pub dir: PathBuf,
    /// Its parsed `overlay.toml`.
    pub manifest: Manifest,
}

/// What [`Store::import`] did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum ImportOutcome {
    /// A new overlay was placed in the store.
    Imported {
        /// Host path of the overlay in the store.
        dir: PathBuf,
    },
    /// The store already held the same manifest; nothing changed.
    AlreadyPresent {
        /// Host path of the overlay in the store.
        dir: PathBuf,
    },
    /// A different overlay for the same kernel and driver was replaced atomically.
    Replaced {
        /// Host path of the overlay in the store.
        dir: PathBuf,
    },
}

/// Proof that this process holds the store's exclusive lock (`<store>/.lock`); released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _flock: nix::fcntl::Flock<File>,
}

/// Name of the lock file at the top of the store.
pub const LOCK_NAME: &str = ".lock";
/// Directory under the store where partial downloads are kept for resuming.
pub const DOWNLOADS_DIR: &str = ".downloads";

/// The overlay store under one root: `<dir>/<kernel release>/<driver version>/`, one verified
/// overlay each. A handle only: nothing is read or created until a method needs it.
pub struct Store<'a> {
    root: &'a Root,
    /// Host path of the store directory.
    dir: PathBuf,
}

/// Read and parse `overlay.toml` from a directory (a real path).
pub fn read_manifest(real_dir: &Path) -> Result<(Manifest, String), StoreError> {
    let path = real_dir.join(MANIFEST_NAME);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NoManifest {
                path: real_dir.to_path_buf(),
            })
        }
        Err(source) => return Err(StoreError::Io(PathIoError::new(path, source))),
    };
    Ok((Manifest::parse(&text, &path)?, text))
}

/// Parse and fully verify an overlay directory that is not (yet) in the store.
pub fn verify_source(real_dir: &Path) -> Result<Manifest, StoreError> {
    let (manifest, _) = read_manifest(real_dir)?;
    verify_tree(real_dir, &manifest, Generated::Refuse)?;
    Ok(manifest)
}

impl<'a> Store<'a> {
    /// The store at the host path `dir` (the `store.dir` setting) under `root`.
    pub fn new(root: &'a Root, dir: impl Into<PathBuf>) -> Self {
        Store {
            root,
            dir: dir.into(),
        }
    }

    /// Host path of the store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Real path of the directory holding partial downloads (`<store>/.downloads`).
    pub fn downloads_dir(&self) -> PathBuf {
        self.root.join(self.dir.join(DOWNLOADS_DIR))
    }

    /// Take the store's exclusive lock, waiting for whoever holds it (another stage, GC or
    /// import). The store directory is created when missing.
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        let dir = self.root.join(&self.dir);
        create_dirs_durably(&dir)?;
        let path = dir.join(LOCK_NAME);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_path(&path)?;
        let flock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, errno)| StoreError::Lock {
                path: path.clone(),
                error: io::Error::from(errno),
            },
        )?;
        Ok(StoreLock { _flock: flock })
    }

    /// Remove what an interrupted stage, import or GC left behind: [`TEMP_PREFIX`] entries at the
    /// top of the store, in each kernel directory and in the downloads directory, then kernel
    /// directories left empty. Needs the lock, so nobody's work in progress is taken for a
    /// leftover. Returns the host paths removed.
    pub fn clean_leftovers(&self, _lock: &StoreLock) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        let mut dirs = vec![self.dir.clone(), self.dir.join(DOWNLOADS_DIR)];
        dirs.extend(self.kernel_releases()?.iter().map(|k| self.dir.join(k)));
        for host_dir in &dirs {
            let real_dir = self.root.join(host_dir);
            let mut removed_here = false;
            let mounted = self.mounted_names();
            for name in entry_names(&real_dir)? {
                if !(name.starts_with(TEMP_PREFIX) || name.starts_with(RETIRED_PREFIX)) {
                    continue;
                }
                if mounted.contains(&name) {
                    // A replaced copy still mounted at the driver root: the next load moves
                    // the mount to the new copy, a later clean removes this one.
                    debug!(path = %real_dir.join(&name).display(), "replaced overlay still mounted; kept");
                    continue;
                }
                let path = real_dir.join(&name);
                remove_any(&path)?;
                removed.push(host_dir.join(&name));
                removed_here = true;
            }
            if removed_here {
                fsync_dir(&real_dir).with_path(&real_dir)?;
            }
        }
        for kernel in self.kernel_releases()? {
            let real = self.root.join(self.dir.join(&kernel));
            if entry_names(&real)?.is_empty() && fs::remove_dir(&real).is_ok() {
                removed.push(self.dir.join(&kernel));
            }
        }
        if !removed.is_empty() {
            let top = self.root.join(&self.dir);
            fsync_dir(&top).with_path(&top)?;
            info!(removed = ?removed, "removed leftovers of an interrupted stage");
        }
        Ok(removed)
    }

    /// Remove the retired copies in `kernel_dir` (a real path) that nothing mounts; one still
    /// mounted stays for a later [`Store::clean_leftovers`]. Failures are only logged: the
    /// new copy is in place either way.
    fn remove_unmounted_retired(&self, kernel_dir: &Path) {
        let mounted = self.mounted_names();
        for name in entry_names(kernel_dir).unwrap_or_default() {
            if !name.starts_with(RETIRED_PREFIX) {
                continue;
            }
            let path = kernel_dir.join(&name);
            if mounted.contains(&name) {
                info!(path = %path.display(), "the replaced overlay is still mounted at the driver root; kept until the next load moves the mount to the new copy");
            } else if let Err(e) = remove_any(&path) {
                warn!(error = %e, "cannot remove a replaced overlay; the next stage removes it");
            }
        }
    }

    /// The last path components of every mounted directory (`/proc/self/mountinfo` under the
    /// root), to tell a replaced copy that is still mounted.
    fn mounted_names(&self) -> Vec<String> {
        let text = fs::read_to_string(self.root.join("/proc/self/mountinfo")).unwrap_or_default();
        crate::fsutil::mount_roots(&text)
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    }

    /// Remove the overlays of every kernel except `keep_kernels` and the `keep_extra` newest
    /// others (by [`version_cmp`]), plus their partial downloads and any leftovers. Each
    /// kernel directory is first renamed to a temporary name, so a crash mid-delete never leaves
    /// half an overlay under its real name. Returns the host paths removed.
    pub fn gc(&self, keep_kernels: &[String], keep_extra: u32) -> Result<Vec<PathBuf>, StoreError> {
        let lock = self.lock()?;
        self.gc_locked(&lock, keep_kernels, keep_extra)
    }

    /// [`Store::gc`] under a lock the caller holds (staging, making room).
    pub fn gc_locked(
        &self,
        lock: &StoreLock,
        keep_kernels: &[String],
        keep_extra: u32,
    ) -> Result<Vec<PathBuf>, StoreError> {
        self.clean_leftovers(lock)?;
        let doomed = gc_victims(&self.kernel_releases()?, keep_kernels, keep_extra);
        let top = self.root.join(&self.dir);
        let mut removed = Vec::new();
        for kernel in &doomed {
            let host = self.dir.join(kernel);
            let real = self.root.join(&host);
            let doomed_name = temp_sibling(&real);
            failpoint!("gc::rename-away");
            fs::rename(&real, &doomed_name).with_path(&real)?;
            fsync_dir(&top).with_path(&top)?;
            failpoint!("gc::delete");
            remove_any(&doomed_name)?;
            info!(KERNEL_RELEASE = %kernel, OVERLAY = %host.display(), "removed overlays of a kernel no longer needed");
            removed.push(host);
        }
        let downloads = self.downloads_dir();
        for name in entry_names(&downloads)? {
            if doomed.iter().any(|k| name.starts_with(&format!("{k}_"))) {
                remove_any(&downloads.join(&name))?;
                removed.push(self.dir.join(DOWNLOADS_DIR).join(name));
            }
        }
        Ok(removed)
    }

    /// Real path of a new, empty temporary directory for building the overlay of
    /// (`kernel_release`, `driver_version`) in place: a sibling of its final directory, so
    /// [`Store::publish_staged`] is a rename.
    pub fn begin_staging(
        &self,
        _lock: &StoreLock,
        kernel_release: &str,
        driver_version: &str,
    ) -> Result<PathBuf, StoreError> {
        let kernel_dir = self.root.join(self.dir.join(kernel_release));
        create_dirs_durably(&kernel_dir)?;
        let staging = temp_sibling(&kernel_dir.join(driver_version));
        fs::create_dir(&staging).with_path(&staging)?;
        Ok(staging)
    }

    /// Give up a staging directory from [`Store::begin_staging`]: remove it, and its kernel
    /// directory when that is left empty.
    pub fn abandon_staging(&self, staging: &Path) {
        if let Err(e) = remove_any(staging) {
            warn!(error = %e, "cannot remove a staging directory; the next stage removes it");
        }
        if let Some(kernel_dir) = staging.parent() {
            // Fails (as it should) when the kernel has other overlays.
            let _ = fs::remove_dir(kernel_dir);
        }
    }

    /// Put a staging directory whose files and directories are complete, verified against
    /// `manifest` and fsynced into place atomically; generated files (the ld.so cache) are made
    /// first. On error the staging directory is left for the caller to abandon.
    pub fn publish_staged(
        &self,
        _lock: &StoreLock,
        staging: &Path,
        manifest: &Manifest,
    ) -> Result<ImportOutcome, StoreError> {
        let target_host = self.overlay_dir(&manifest.kernel_release, &manifest.driver_version);
        let target = self.root.join(&target_host);
        if staging.parent() != target.parent() {
            return Err(StoreError::Io(PathIoError::new(
                staging,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a staging directory of {}", target.display()),
                ),
            )));
        }
        if manifest.has_userspace() {
            make_ld_cache(staging);
            sync_generated(staging)?;
        }
        let kernel_dir = target
            .parent()
            .expect("overlay dir has a parent")
            .to_path_buf();
        let replaced = publish(staging, &target, &kernel_dir)?;
        relabel(self.root, &target);
        if replaced {
            self.remove_unmounted_retired(&kernel_dir);
        }
        debug!(
            OVERLAY = %target_host.display(),
            KERNEL_RELEASE = %manifest.kernel_release,
            DRIVER_VERSION = %manifest.driver_version,
            "overlay staged into the store"
        );
        Ok(if replaced {
            ImportOutcome::Replaced { dir: target_host }
        } else {
            ImportOutcome::Imported { dir: target_host }
        })
    }

    /// The stored overlay for a kernel and driver, when it is there, sits where it belongs,
    /// is for `arch`, and verifies completely.
    pub fn verified(
        &self,
        kernel_release: &str,
        driver_version: &str,
        arch: &str,
    ) -> Option<StoredOverlay> {
        let overlay = self.open(kernel_release, driver_version).ok()?;
        if overlay.manifest.arch != arch {
            return None;
        }
        self.verify(&overlay).ok()?;
        Some(overlay)
    }

    /// Host path of the overlay directory for (`kernel_release`, `driver_version`), whether or not
    /// it exists.
    pub fn overlay_dir(&self, kernel_release: &str, driver_version: &str) -> PathBuf {
        self.dir.join(kernel_release).join(driver_version)
    }

    /// Kernel releases the store has overlays for, sorted (temporary siblings skipped).
    pub fn kernel_releases(&self) -> Result<Vec<String>, StoreError> {
        let mut releases = self.subdirectories(&self.dir)?;
        releases.sort();
        Ok(releases)
    }

    /// Every kernel release in the store with its driver versions (each list sorted as above).
    pub fn inventory(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.kernel_releases()?
            .into_iter()
            .map(|kernel| {
                let drivers = self.driver_versions(&kernel)?;
                Ok((kernel, drivers))
            })
            .collect()
    }

    /// Driver versions stored for a kernel, oldest first (temporary siblings skipped).
    pub fn driver_versions(&self, kernel_release: &str) -> Result<Vec<String>, StoreError> {
        let mut versions = self.subdirectories(&self.dir.join(kernel_release))?;
        versions.sort_by(|a, b| version_cmp(a, b));
        Ok(versions)
    }

    /// Names of the directories in a store directory (host path), temporary siblings skipped;
    /// none when it does not exist.
    fn subdirectories(&self, host_dir: &Path) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join(host_dir);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Io(PathIoError::new(dir, source))),
        };
        Ok(entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .collect())
    }

    /// The overlay to use for a kernel: the pinned driver version, else the newest stored.
    pub fn select(
        &self,
        kernel_release: &str,
        pinned: Option<&str>,
    ) -> Result<Option<StoredOverlay>, StoreError> {
        let versions = self.driver_versions(kernel_release)?;
        let chosen = match pinned {
            Some(version) if versions.iter().any(|v| v == version) => version.to_string(),
            Some(version) if !versions.is_empty() => {
                return Err(StoreError::PinnedMissing {
                    version: version.to_string(),
                    kernel_release: kernel_release.to_string(),
                    available: versions.join(", "),
                })
            }
            _ => match versions.last() {
                Some(newest) => newest.clone(),
                None => return Ok(None),
            },
        };
        self.open(kernel_release, &chosen).map(Some)
    }

    /// Open a stored overlay: parse its manifest and check it sits where it says it belongs.
    /// File contents are not re-hashed here; the loader hashes every module it hands to the
    /// kernel, and [`Store::verify`] checks the whole tree.
    pub fn open(
        &self,
        kernel_release: &str,
        driver_version: &str,
    ) -> Result<StoredOverlay, StoreError> {
        let dir = self.overlay_dir(kernel_release, driver_version);
        let (manifest, _) = read_manifest(&self.root.join(&dir))?;
        if manifest.kernel_release != kernel_release || manifest.driver_version != driver_version {
            return Err(StoreError::Misplaced {
                path: dir,
                expected_kernel: kernel_release.into(),
                expected_driver: driver_version.into(),
                found_kernel: manifest.kernel_release,
                found_driver: manifest.driver_version,
            });
        }
        Ok(StoredOverlay { dir, manifest })
    }

    /// Fully verify a stored overlay against its manifest.
    pub fn verify(&self, overlay: &StoredOverlay) -> Result<(), StoreError> {
        verify_tree(
            &self.root.join(&overlay.dir),
            &overlay.manifest,
            Generated::Allow,
        )?;
        Ok(())
    }

    /// Put the overlay at `source` (a real path) into the store, atomically.
    pub fn import(&self, source: &Path) -> Result<ImportOutcome, StoreError> {
        self.import_within(source, &mut SpaceGuard::unchecked())
    }

    /// [`Store::import`], the copy stopped (and removed) when it reaches `space`'s reserve.
    pub fn import_within(
        &self,
        source: &Path,
        space: &mut SpaceGuard,
    ) -> Result<ImportOutcome, StoreError> {
        let (manifest, manifest_text) = read_manifest(source)?;
        verify_tree(source, &manifest, Generated::Refuse)?;
        let kernel = &manifest.kernel_release;
        let driver = &manifest.driver_version;
        let target_host = self.overlay_dir(kernel, driver);
        let target = self.root.join(&target_host);
        // An unreadable or damaged copy is simply replaced.
        let existing = read_manifest(&target).ok().map(|(m, _)| m);
        if existing.as_ref() == Some(&manifest)
            && verify_tree(&target, &manifest, Generated::Allow).is_ok()
        {
            return Ok(ImportOutcome::AlreadyPresent { dir: target_host });
        }

        let kernel_dir = self.root.join(self.dir.join(kernel));
        create_dirs_durably(&kernel_dir)?;
        let staging = temp_sibling(&target);
        let result =
            build_copy(source, &staging, &manifest, &manifest_text, space).and_then(|()| {
                failpoint!("store::import-copied");
                publish(&staging, &target, &kernel_dir)
            });
        match result {
            Ok(replaced) => {
                if replaced {
                    self.remove_unmounted_retired(&kernel_dir);
                }
                // Staging says it once for the journal; `overlay import` prints its own line.
                debug!(
                    OVERLAY = %target_host.display(),
                    KERNEL_RELEASE = %kernel,
                    DRIVER_VERSION = %driver,
                    "overlay imported into the store"
                );
                Ok(if replaced {
                    ImportOutcome::Replaced { dir: target_host }
                } else {
                    ImportOutcome::Imported { dir: target_host }
                })
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                Err(e)
            }
        }
    }
}

/// Kernels GC removes: all but `keep` and the `keep_extra` newest of the others.
fn gc_victims(kernels: &[String], keep: &[String], keep_extra: u32) -> Vec<String> {
    let mut others: Vec<&String> = kernels.iter().filter(|k| !keep.contains(k)).collect();
    others.sort_by(|a, b| version_cmp(b, a));
    others
        .into_iter()
        .skip(keep_extra as usize)
        .cloned()
        .collect()
}

/// Names in a directory (none when it does not exist).
fn entry_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Io(PathIoError::new(dir, source))),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_path(dir)?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Remove a file, link or whole directory tree (never following links).
fn remove_any(path: &Path) -> Result<(), StoreError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    Ok(result.with_path(path)?)
}

/// fsync what [`make_ld_cache`] wrote, so it is as durable as the verified content.
fn sync_generated(staging: &Path) -> Result<(), StoreError> {
    let etc = staging.join("etc");
    if !etc.is_dir() {
        return Ok(());
    }
    for name in entry_names(&etc)? {
        let path = etc.join(name);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .with_path(&path)?;
        }
    }
    fsync_dir(&etc).with_path(&etc)?;
    Ok(fsync_dir(staging).with_path(staging)?)
}

/// `mkdir -p` that fsyncs each parent it created into.
fn create_dirs_durably(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(StoreError::Io(PathIoError::new(dir, source))),
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent).with_path(parent)?;
    }
    Ok(())
}

/// Copy every listed entry into `staging`, hashing while copying (so what lands is what was
/// verified, even if the source changes underneath), then fsync everything.
fn build_copy(
    source: &Path,
    staging: &Path,
    manifest: &Manifest,
    manifest_text: &str,
    space: &mut SpaceGuard,
) -> Result<(), StoreError> {
    fs::create_dir(staging).with_path(staging)?;
    let mut directories = vec![staging.to_path_buf()];
    let ensure_parent = |path: &Path, directories: &mut Vec<PathBuf>| -> Result<(), StoreError> {
        let parent = path.parent().expect("entry has a parent");
        if !parent.is_dir() {
            fs::create_dir_all(parent).with_path(parent)?;
            for dir in parent
                .ancestors()
                .take_while(|d| d.starts_with(staging) && *d != staging)
            {
                directories.push(dir.to_path_buf());
            }
        }
        Ok(())
    };
    for entry in &manifest.files {
        let from = source.join(&entry.path);
        let to = staging.join(&entry.path);
        ensure_parent(&to, &mut directories)?;
        let input = File::open(&from).with_path(&from)?;
        let mut output = File::create(&to).with_path(&to)?;
        let (size, digest) = copy_hashing(input, &mut output, entry.size, space, &from)?;
        check_digest(&from, entry, size, &digest)?;
        output
            .set_permissions(fs::Permissions::from_mode(entry.mode))
            .with_path(&to)?;
        output.sync_all().with_path(&to)?;
    }
    for link in &manifest.symlinks {
        let to = staging.join(&link.path);
        ensure_parent(&to, &mut directories)?;
        symlink(&link.target, &to).with_path(&to)?;
    }
    let manifest_path = staging.join(MANIFEST_NAME);
    let mut file = File::create(&manifest_path).with_path(&manifest_path)?;
    file.write_all(manifest_text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_path(&manifest_path)?;
    if manifest.has_userspace() {
        make_ld_cache(staging);
    }
    verify_tree(staging, manifest, Generated::Allow)?;
    directories.sort();
    directories.dedup();
    // Children before parents, so each directory's entries are durable before it is.
    for dir in directories.iter().rev() {
        fsync_dir(dir).with_path(dir)?;
    }
    Ok(())
}

/// Copy `input` (at most `limit` bytes) to `output`, hashing; `space` hears of each write
/// first. Errors name `from`.
fn copy_hashing(
    input: File,
    output: &mut File,
    limit: u64,
    space: &mut SpaceGuard,
    from: &Path,
) -> Result<(u64, String), StoreError> {
    struct Tee<'a, R> {
        inner: R,
        out: &'a mut File,
        space: &'a mut SpaceGuard,
        stopped: Option<SpaceError>,
    }
    impl<R: io::Read> io::Read for Tee<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            if let Err(e) = self.space.before_write(n as u64) {
                self.stopped = Some(e);
                return Err(io::Error::other("the file system's reserve is reached"));
            }
            self.out.write_all(&buf[..n])?;
            Ok(n)
        }
    }
    let mut tee = Tee {
        inner: input,
        out: output,
        space,
        stopped: None,
    };
    let result = verify::sha256_reader(&mut tee, limit);
    if let Some(stopped) = tee.stopped {
        return Err(StoreError::Space(stopped));
    }
    Ok(result.with_path(from)?)
}

/// Under SELinux, give a newly published overlay the labels the RPM's file contexts name
/// (packaging/selinux/nvdriver-agent.cil: modules_object_t for the modules, bin_t, lib_t, usr_t):
/// a rename keeps the label of where the files were written (var_lib_t), which `finit_module()`
/// and containers are refused (docs/usage/selinux.md). Root only (the unprivileged fetcher's own
/// store is not relabelled); best effort: tmpfiles.d relabels the store at every boot too.
fn relabel(root: &Root, overlay: &Path) {
    let selinux_on = root.join("/sys/fs/selinux/enforce").exists();
    if !selinux_on || !nix::unistd::geteuid().is_root() {
        return;
    }
    match Command::new("restorecon").arg("-RF").arg(overlay).status() {
        Ok(status) if status.success() => {}
        Ok(status) => {
            warn!(OVERLAY = %overlay.display(), "restorecon -RF exited with {status}; the overlay keeps the labels it was written with until the next boot relabels it")
        }
        Err(e) => {
            warn!(OVERLAY = %overlay.display(), error = %e, "cannot run restorecon; the overlay keeps the labels it was written with until the next boot relabels it")
        }
    }
}

/// The container toolkit finds libraries through `<driver root>/etc/ld.so.cache`; make one for
/// an overlay that carries libraries. Best effort: without `ldconfig` the overlay still works
/// for everything but library injection, and the warning says so.
fn make_ld_cache(staging: &Path) {
    let lib_dirs: Vec<String> = [
        "usr/lib64",
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/aarch64-linux-gnu",
    ]
    .iter()
    .filter(|d| staging.join(d).is_dir())
    .map(|d| format!("/{d}"))
    .collect();
    if lib_dirs.is_empty() {
        return;
    }
    if let Err(e) = fs::create_dir_all(staging.join("etc")) {
        warn!(error = %e, "cannot create etc/ in the overlay; no ld.so.cache made");
        return;
    }
    // -X: do not touch the overlay's symlinks (they are verified content); -r: the overlay
    // is the root; the directories are named explicitly since the overlay has no ld.so.conf.
    let status = Command::new("ldconfig")
        .arg("-X")
        .arg("-r")
        .arg(staging)
        .args(&lib_dirs)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            warn!(status = %s, "ldconfig failed; the overlay has no ld.so.cache, so the container toolkit may not find its libraries")
        }
        Err(e) => {
            warn!(error = %e, "ldconfig not found; the overlay has no ld.so.cache, so the container toolkit may not find its libraries")
        }
    }
}

/// A [`RETIRED_PREFIX`] sibling name for the replaced copy of `target`.
fn retired_sibling(target: &Path) -> PathBuf {
    let temp = temp_sibling(target);
    let name = temp.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(name.replacen(TEMP_PREFIX, RETIRED_PREFIX, 1))
}

/// Move `staging` to `target`: a plain rename when there is none, an atomic exchange (then
/// the old copy renamed to a retired name) when there is. Returns whether something was
/// replaced.
fn publish(staging: &Path, target: &Path, parent: &Path) -> Result<bool, StoreError> {
    failpoint!("store::publish-rename");
    let replaced = if target.exists() {
        // rustix, not nix: nix offers renameat2 on glibc only, and the static build is musl.
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            staging,
            rustix::fs::CWD,
            target,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .map_err(|errno| {
            StoreError::Io(PathIoError::new(
                target.to_path_buf(),
                io::Error::from(errno),
            ))
        })?;
        true
    } else {
        fs::rename(staging, target).with_path(target)?;
        false
    };
    fsync_dir(parent).with_path(parent)?;
    failpoint!("store::published");
    if replaced {
        // `staging` now holds the old copy, which may be mounted at the driver root: retire
        // it under a name that says so; `clean_leftovers` removes it once nothing mounts it.
        let retired = retired_sibling(target);
        fs::rename(staging, &retired).with_path(&retired)?;
        fsync_dir(parent).with_path(parent)?;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::manifest::{FileEntry, Flavor, FORMAT_VERSION};
    use crate::overlay::verify::sha256_bytes;

    const KVER: &str = "6.1.0-28-cloud-amd64";

    fn source(driver: &str, body: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let path = format!("usr/lib/modules/{KVER}/extra/nvidia.ko");
        fs::create_dir_all(dir.path().join(&path).parent().unwrap()).unwrap();
        fs::write(dir.path().join(&path), body).unwrap();
        let manifest = Manifest {
            format: FORMAT_VERSION,
            kernel_release: KVER.into(),
            driver_version: driver.into(),
            arch: "x86_64".into(),
            flavor: Flavor::Open,
            files: vec![FileEntry {
                path: path.into(),
                size: body.len() as u64,
                sha256: sha256_bytes(body),
                mode: 0o644,
            }],
            symlinks: vec![],
        };
        fs::write(dir.path().join(MANIFEST_NAME), manifest.to_toml()).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn import_then_again_then_replace() {
        let host = tempfile::tempdir().unwrap();
        let root = Root::new(host.path());
        let store = Store::new(&root, "/var/lib/nvdriver-agent/overlays");
        let src = source("570.1", b"one");
        let dir = PathBuf::from(format!("/var/lib/nvdriver-agent/overlays/{KVER}/570.1"));
        assert_eq!(
            store.import(src.path()).unwrap(),
            ImportOutcome::Imported { dir: dir.clone() }
        );
        assert_eq!(
            store.import(src.path()).unwrap(),
            ImportOutcome::AlreadyPresent { dir: dir.clone() }
        );
        let changed = source("570.1", b"two");
        assert_eq!(
            store.import(changed.path()).unwrap(),
            ImportOutcome::Replaced { dir: dir.clone() }
        );
        let opened = store.open(KVER, "570.1").unwrap();
        store.verify(&opened).unwrap();
        assert_eq!(
            fs::read(
                root.join(&dir)
                    .join(format!("usr/lib/modules/{KVER}/extra/nvidia.ko"))
            )
            .unwrap(),
            b"two"
        );
        assert_eq!(
            names(&root.join(dir.parent().unwrap())),
            ["570.1"],
            "no temporary left"
        );
    }

    #[test]
    fn corrupt_source_changes_nothing() {
        let host = tempfile::tempdir().unwrap();
        let root = Root::new(host.path());
        let store = Store::new(&root, "/store");
        let src = source("570.1", b"one");
        fs::write(
            src.path()
                .join(format!("usr/lib/modules/{KVER}/extra/nvidia.ko")),
            b"two",
        )
        .unwrap();
        let e = store.import(src.path()).unwrap_err();
        assert!(
            matches!(e, StoreError::Verify(VerifyError::Digest { .. })),
            "{e}"
        );
        assert!(!root.join("/store").exists(), "nothing written");
    }

    #[test]
    fn select_newest_or_pinned() {
        let host = tempfile::tempdir().unwrap();
        let root = Root::new(host.path());
        let store = Store::new(&root, "/store");
        for v in ["570.9", "570.10", "565.57.01"] {
            store.import(source(v, v.as_bytes()).path()).unwrap();
        }
        fs::create_dir_all(root.join(format!("/store/{KVER}/.nvdriver-agent-tmp.999"))).unwrap();
        assert_eq!(
            store.driver_versions(KVER).unwrap(),
            ["565.57.01", "570.9", "570.10"]
        );
        assert_eq!(
            store
                .select(KVER, None)
                .unwrap()
                .unwrap()
                .manifest
                .driver_version,
            "570.10"
        );
        assert_eq!(
            store
                .select(KVER, Some("570.9"))
                .unwrap()
                .unwrap()
                .manifest
                .driver_version,
            "570.9"
        );
        let e = store.select(KVER, Some("580.1")).unwrap_err();
        assert!(e.to_string().contains("570.10"), "{e}");
        assert!(store.select("9.9.9", None).unwrap().is_none());
    }

    #[test]
    fn gc_victims_keep_listed_and_newest_others() {
        let kernels: Vec<String> = ["6.1.0-9", "6.1.0-10", "6.1.0-28", "6.12.0-1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            gc_victims(&kernels, &["6.1.0-9".into()], 1),
            ["6.1.0-28", "6.1.0-10"]
        );
        assert_eq!(gc_victims(&kernels, &[], 4), Vec::<String>::new());
        assert_eq!(gc_victims(&kernels, &[], 0).len(), 4);
        // A kept kernel the store does not have changes nothing.
        assert_eq!(gc_victims(&kernels, &["7.0".into()], 3), ["6.1.0-9"]);
    }

    #[test]
    fn leftovers_are_removed_under_the_lock_and_real_overlays_kept() {
        let host = tempfile::tempdir().unwrap();
        let root = Root::new(host.path());
        let store = Store::new(&root, "/store");
        store.import(source("570.1", b"x").path()).unwrap();
        let top = root.join("/store");
        fs::create_dir_all(top.join(format!("{KVER}/{TEMP_PREFIX}570.2.1.2/usr"))).unwrap();
        fs::create_dir_all(top.join(format!("6.9.9/{TEMP_PREFIX}570.2.1.2"))).unwrap();
        fs::create_dir_all(top.join(DOWNLOADS_DIR)).unwrap();
        fs::write(
            top.join(DOWNLOADS_DIR).join(format!("{TEMP_PREFIX}m.1")),
            "",
        )
        .unwrap();
        fs::write(top.join(DOWNLOADS_DIR).join("k_d_0.part"), "").unwrap();
        let lock = store.lock().unwrap();
        let removed = store.clean_leftovers(&lock).unwrap();
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert_eq!(store.kernel_releases().unwrap(), [KVER]);
        assert_eq!(names(&top.join(KVER)), ["570.1"]);
        assert_eq!(names(&top.join(DOWNLOADS_DIR)), ["k_d_0.part"]);
        store.verify(&store.open(KVER, "570.1").unwrap()).unwrap();
    }

    #[test]
    fn misplaced_overlay_is_refused() {
        let host = tempfile::tempdir().unwrap();
        let root = Root::new(host.path());
        let store = Store::new(&root, "/store");
        store.import(source("570.1", b"x").path()).unwrap();
        fs::rename(
            root.join(format!("/store/{KVER}/570.1")),
            root.join(format!("/store/{KVER}/580.1")),
        )
        .unwrap();
        let e = store.select(KVER, None).unwrap_err();
        assert!(matches!(e, StoreError::Misplaced { .. }), "{e}");
    }
}

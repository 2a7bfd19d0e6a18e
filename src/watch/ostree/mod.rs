//! rpm-ostree hosts (Fedora CoreOS, RHCOS, CentOS Stream CoreOS): which kernel boots next.
//!
//! The next boot runs the *staged* deployment if there is one (`rpm-ostree upgrade` stages by
//! default; ostree finalizes it into the bootloader at shutdown), else the *default*
//! deployment, the first in boot order. Its kernel release is the one directory under the
//! deployment's `usr/lib/modules/` that holds a `vmlinuz`: that directory is what ostree itself
//! copies into `/boot` when it writes the bootloader entry.
//!
//! Two readers find that deployment:
//! - the direct reader ([`next_boot_direct`], always built) reads the sysroot's files the way
//!   libostree does: the bootloader entries `/boot/loader/entries/ostree-*.conf`, the
//!   deployment directories `/ostree/deploy/<stateroot>/deploy/<csum>.<serial>`, and the
//!   GVariant in `/run/ostree/staged-deployment`;
//! - with the cargo feature `ostree`, `next_boot_libostree` asks libostree itself, and
//!   [`next_boot`] uses it.
//!
//! Both return the same answer on the same sysroot (the tests check it on sysroots made by the
//! `ostree` CLI). Parsing is pure functions over bytes and strings; the reads sit in a few thin
//! functions at the bottom.

mod gvariant;
#[cfg(feature = "ostree")]
mod libostree;

use std::cmp::Ordering;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

#[cfg(feature = "ostree")]
pub use libostree::{
    next_boot_libostree, pending_deployment_libostree, read_staged_deployment_glib,
};

use crate::host::Root;
use crate::watch::NextBoot;

/// libostree's record of the staged deployment, written by `ostree admin deploy --stage` and
/// `rpm-ostree upgrade`/`deploy` (which stage by default): a serialised GVariant `a{sv}` whose
/// key `target` is an `a{sv}` with `name` (`<csum>.<serial>`), `osname` (the stateroot) and
/// `bootcsum` strings; optional keys are `merge-deployment`, `kargs`, `overlay-initrds` and,
/// since ostree 2023.8, `locked` (a boolean). It lives on the tmpfs `/run`, so a staged
/// deployment not finalized by shutdown is forgotten and the host boots what it booted before.
pub const STAGED_DEPLOYMENT: &str = "/run/ostree/staged-deployment";

/// The finalization lock: while this file exists, `ostree admin finalize-staged` (run as the
/// `ExecStop=` of `ostree-finalize-staged.service` at shutdown) logs "Not finalizing" and
/// returns without writing the staged deployment into the bootloader, so the reboot comes back
/// up in the current deployment and the staged one is dropped with `/run`.
///
/// What ostree does with it, from its sources (`ostree-sysroot-deploy.c`,
/// `_ostree_sysroot_finalize_staged_inner`; rpm-ostree's `rpmostree-sysroot-upgrader.cxx`):
/// - it only checks that the file exists (`fstatat`), at finalize time, not at staging time:
///   creating it any time before the agent's `ExecStop=` returns (ordered before ostree's)
///   holds the update. Since ostree 2023.8 (`ostree_sysroot_change_finalization`) a
///   `locked: true` in [`STAGED_DEPLOYMENT`] holds it too; the agent never writes that record;
/// - `rpm-ostree deploy --lock-finalization` (and, in newer ostree, `ostree admin deploy
///   --stage --lock-finalization`) create it, empty, mode 0640, *before* staging, to avoid a
///   race with shutdown;
/// - it is deleted by staging a new deployment over a staged one (newer ostree, ostree#3025),
///   by unlocking through `ostree_sysroot_change_finalization`, and by `rpm-ostree
///   finalize-deployment`: a hold must be asserted again after each new staging.
///
/// The `hold` policy creates it; releasing the hold is deleting it.
pub const STAGED_DEPLOYMENT_LOCKED: &str = "/run/ostree/staged-deployment-locked";

/// Present when the running system was booted by ostree (written by `ostree-prepare-root`).
pub const OSTREE_BOOTED: &str = "/run/ostree-booted";

/// Where every stateroot keeps its deployments: `<stateroot>/deploy/<csum>.<serial>`.
pub const DEPLOY_DIR: &str = "/ostree/deploy";

/// The bootloader entries of the current boot version (`/boot/loader` is a symlink to
/// `loader.0` or `loader.1`).
pub const LOADER_ENTRIES: &str = "/boot/loader/entries";

/// Larger staged-deployment files are refused: libostree's are a few hundred bytes (a long
/// kernel command line adds a few KiB).
const STAGED_DEPLOYMENT_MAX_BYTES: u64 = 1 << 20;

/// Larger bootloader entries are refused; ostree's are a few hundred bytes.
const BOOT_ENTRY_MAX_BYTES: u64 = 1 << 20;

/// Symlink hops allowed while resolving a path under the root (the kernel's `ELOOP` limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Why the deployment the next boot runs, or its kernel release, could not be read on an ostree
/// host.
#[derive(Debug, thiserror::Error)]
pub enum OstreeError {
    /// A file, directory or symlink of the sysroot could not be read (a missing staged-deployment
    /// record or entries directory is not an error).
    #[error("cannot read {path}: {error}")]
    Read {
        /// Host path that could not be read.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// Nothing names a deployment to boot: no staged-deployment record and no `ostree-*.conf`
    /// bootloader entry.
    #[error(
        "no deployment to boot: no staged deployment ({STAGED_DEPLOYMENT}) and no ostree \
         bootloader entry (ostree-*.conf) in {entries}; expected at least one on an ostree \
         host; check `rpm-ostree status` (or `ostree admin status`) and that /boot is mounted"
    )]
    NoDeployment {
        /// Host path of the bootloader entries directory that was searched ([`LOADER_ENTRIES`]).
        entries: PathBuf,
    },
    /// The default bootloader entry has no `ostree=` kernel argument in its `options` line.
    #[error(
        "bootloader entry {path} has no ostree= kernel argument in its options line; expected \
         ostree=/ostree/boot.N/<stateroot>/<bootcsum>/<serial> as ostree writes it; the entry \
         was not written by ostree, or was edited"
    )]
    NoOstreeArgument {
        /// Host path of the bootloader entry (`/boot/loader/entries/ostree-*.conf`).
        path: PathBuf,
    },
    /// The default entry's `ostree=` argument is not
    /// `/ostree/boot.N/<stateroot>/<bootcsum>/<serial>`.
    #[error(
        "invalid ostree= argument '{value}' in {path}: expected \
         /ostree/boot.N/<stateroot>/<bootcsum>/<serial> (N is 0 or 1)"
    )]
    BadBootlink {
        /// Host path of the bootloader entry (`/boot/loader/entries/ostree-*.conf`).
        path: PathBuf,
        /// The `ostree=` argument as found.
        value: String,
    },
    /// The bootlink's symlink target does not end in a `<checksum>.<serial>` deployment name.
    #[error(
        "{path} points at '{name}', which is not a deployment name: expected <checksum>.<serial> \
         (lowercase hex, a dot, a number)"
    )]
    BadDeploymentName {
        /// Host path of the bootlink symlink (`/ostree/boot.N/<stateroot>/<bootcsum>/<serial>`).
        path: PathBuf,
        /// The symlink's whole target, as read.
        name: String,
    },
    /// [`STAGED_DEPLOYMENT`] exists but is not a record libostree writes.
    #[error(
        "{path} is not the staged-deployment record libostree writes (a GVariant a{{sv}} with a \
         'target' a{{sv}} of strings 'name', 'osname', 'bootcsum'): {reason}; \
         `ostree admin status` shows what ostree makes of it"
    )]
    StagedDeployment {
        /// Host path of the record.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The staged-deployment record or a bootloader entry is larger than the agent reads (1 MiB).
    #[error(
        "{path} is {size} bytes, more than the {limit} a staged-deployment record can be; \
         refusing to read it"
    )]
    TooLarge {
        /// Host path of the file.
        path: PathBuf,
        /// Bytes read from it: reading stops at `limit` + 1, so this is not the file's full size.
        size: u64,
        /// The largest size accepted, in bytes.
        limit: u64,
    },
    /// The deployment directory that the staged-deployment record or the default bootloader entry
    /// names does not exist.
    #[error(
        "the {which} deployment {deployment} does not exist (named by {named_by}); the sysroot \
         changed while it was read (read it again), or it is damaged: see `ostree admin status`"
    )]
    DeploymentMissing {
        /// `"staged"` or `"default"`: which deployment it is.
        which: &'static str,
        /// Host path of the deployment directory
        /// (`/ostree/deploy/<stateroot>/deploy/<csum>.<serial>`).
        deployment: PathBuf,
        /// Host path of what named it: the staged-deployment record or a bootloader entry.
        named_by: PathBuf,
    },
    /// The next boot's deployment has no `usr/lib/modules` directory, so its kernel release is
    /// unknown.
    #[error(
        "the {which} deployment {deployment} has no usr/lib/modules directory: expected \
         usr/lib/modules/<kernel release>/vmlinuz, where Fedora CoreOS and RHCOS ship the \
         kernel; its kernel release cannot be known"
    )]
    NoModuleTree {
        /// `"staged"` or `"default"`: which deployment it is.
        which: &'static str,
        /// Host path of the deployment directory.
        deployment: PathBuf,
    },
    /// No directory in the deployment's `usr/lib/modules` holds a `vmlinuz`.
    #[error(
        "no kernel in {modules}: expected one directory <kernel release> holding a vmlinuz, \
         found {found}"
    )]
    NoKernel {
        /// Host path of that `usr/lib/modules` directory.
        modules: PathBuf,
        /// What it holds instead, for the message: "an empty directory" or the names found.
        found: String,
    },
    /// More than one directory in the deployment's `usr/lib/modules` holds a `vmlinuz`.
    #[error(
        "several kernels in {modules} ({releases}): expected exactly one directory holding a \
         vmlinuz, as ostree requires; the deployment was not built for ostree"
    )]
    SeveralKernels {
        /// Host path of that `usr/lib/modules` directory.
        modules: PathBuf,
        /// The kernel releases found, comma-separated.
        releases: String,
    },
    /// A name in a deployment's `usr/lib/modules` is not UTF-8, so it cannot be a kernel release.
    #[error("name '{name}' in {dir} is not UTF-8; a kernel release or stateroot must be")]
    NotUtf8 {
        /// Host path of the directory holding it.
        dir: PathBuf,
        /// The name, with invalid bytes replaced.
        name: String,
    },
    /// libostree could not load the sysroot (only with the cargo feature `ostree`).
    #[cfg(feature = "ostree")]
    #[error("libostree cannot load the sysroot {sysroot}: {error}")]
    Libostree {
        /// Real path of the sysroot handed to libostree: the root directory.
        sysroot: PathBuf,
        /// libostree's error.
        error: ::ostree::glib::Error,
    },
}

/// One deployment: `/ostree/deploy/<stateroot>/deploy/<csum>.<serial>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentId {
    /// The stateroot ("osname"), e.g. `fedora-coreos`, `rhcos`.
    pub stateroot: String,
    /// The ostree commit checksum the deployment was checked out from.
    pub csum: String,
    /// Distinguishes deployments of the same commit.
    pub serial: u32,
}

impl DeploymentId {
    /// `<csum>.<serial>`, the deployment directory's name.
    pub fn name(&self) -> String {
        format!("{}.{}", self.csum, self.serial)
    }

    /// Host path of the deployment's root directory.
    pub fn dir(&self) -> PathBuf {
        Path::new(DEPLOY_DIR)
            .join(&self.stateroot)
            .join("deploy")
            .join(self.name())
    }
}

/// The deployment the next boot runs, and where that was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingDeployment {
    /// Which deployment: its stateroot, commit checksum and serial.
    pub id: DeploymentId,
    /// Host path of its root directory (libostree's `deployment_dirpath`, made absolute).
    pub dir: PathBuf,
    /// Staged: finalized into the bootloader only at shutdown.
    pub staged: bool,
    /// Host path of what named it (the staged-deployment record or a bootloader entry), for
    /// error messages.
    pub named_by: PathBuf,
}

impl PendingDeployment {
    fn which(&self) -> &'static str {
        if self.staged {
            "staged"
        } else {
            "default"
        }
    }
}

/// The staged deployment as recorded in [`STAGED_DEPLOYMENT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedDeployment {
    /// The staged deployment: `target`'s `osname` and `name` (`<csum>.<serial>`).
    pub target: DeploymentId,
    /// `target`'s `bootcsum`: the checksum of the deployment's kernel and initramfs.
    pub bootcsum: String,
    /// ostree ≥ 2023.8 keeps the finalization lock in the record too.
    pub locked: bool,
}

/// The fields of a bootloader entry (Boot Loader Specification file) that matter here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootEntry {
    /// `version`: ostree numbers its entries so that the highest is the default.
    pub version: Option<String>,
    /// The value of the `ostree=` kernel argument in `options`.
    pub ostree_arg: Option<String>,
}

/// A parsed `ostree=/ostree/boot.N/<stateroot>/<bootcsum>/<serial>` kernel argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootlink {
    /// `N` of `boot.N`: which of ostree's two boot versions (0 or 1) the entry belongs to.
    pub bootversion: u8,
    /// The stateroot ("osname"), e.g. `fedora-coreos`.
    pub stateroot: String,
    /// The checksum of the deployment's kernel and initramfs.
    pub bootcsum: String,
    /// Tells apart the deployments that share the same kernel and initramfs (`bootcsum`).
    pub treebootserial: u32,
}

impl Bootlink {
    /// Host path of the symlink this argument names; it points at the deployment directory.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/ostree/boot.{}/{}/{}/{}",
            self.bootversion, self.stateroot, self.bootcsum, self.treebootserial
        ))
    }
}

/// The kernel the host boots next, or `None` when that is `running_kernel` (nothing new to
/// stage). Uses libostree when built with the `ostree` feature, else the direct reader.
pub fn next_boot(root: &Root, running_kernel: &str) -> Result<Option<NextBoot>, OstreeError> {
    #[cfg(feature = "ostree")]
    {
        next_boot_libostree(root, running_kernel)
    }
    #[cfg(not(feature = "ostree"))]
    {
        next_boot_direct(root, running_kernel)
    }
}

/// [`next_boot`] through the direct reader of the sysroot's files.
pub fn next_boot_direct(
    root: &Root,
    running_kernel: &str,
) -> Result<Option<NextBoot>, OstreeError> {
    let pending = pending_deployment_direct(root)?;
    next_boot_of(root, &pending, running_kernel)
}

/// The deployment the next boot runs, read from the sysroot's files: the staged one if
/// [`STAGED_DEPLOYMENT`] names one, else the default bootloader entry's.
pub fn pending_deployment_direct(root: &Root) -> Result<PendingDeployment, OstreeError> {
    if let Some(staged) = read_staged_deployment(root)? {
        return Ok(PendingDeployment {
            dir: staged.target.dir(),
            id: staged.target,
            staged: true,
            named_by: PathBuf::from(STAGED_DEPLOYMENT),
        });
    }
    let entries = read_boot_entries(root)?;
    let parsed: Vec<BootEntry> = entries
        .iter()
        .map(|(_, text)| parse_boot_entry(text))
        .collect();
    let index = default_entry(&parsed).ok_or_else(|| OstreeError::NoDeployment {
        entries: PathBuf::from(LOADER_ENTRIES),
    })?;
    let entry_path = &entries[index].0;
    let arg = parsed[index]
        .ostree_arg
        .as_deref()
        .ok_or_else(|| OstreeError::NoOstreeArgument {
            path: entry_path.clone(),
        })?;
    let bootlink = parse_bootlink(arg).ok_or_else(|| OstreeError::BadBootlink {
        path: entry_path.clone(),
        value: arg.to_string(),
    })?;
    // Like libostree: the bootlink is a symlink to the deployment; its target's last component
    // is `<csum>.<serial>`, the stateroot is the bootlink's.
    let link = bootlink.path();
    let target = read_link_in_root(root, &link).map_err(|source| OstreeError::Read {
        path: link.clone(),
        error: source,
    })?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (csum, serial) =
        parse_deployment_name(name).ok_or_else(|| OstreeError::BadDeploymentName {
            path: link.clone(),
            name: target.display().to_string(),
        })?;
    let id = DeploymentId {
        stateroot: bootlink.stateroot,
        csum,
        serial,
    };
    Ok(PendingDeployment {
        dir: id.dir(),
        id,
        staged: false,
        named_by: entry_path.clone(),
    })
}

/// Turn the pending deployment into a [`NextBoot`] by reading its kernel release; `None` when
/// it is the running kernel.
pub fn next_boot_of(
    root: &Root,
    pending: &PendingDeployment,
    running_kernel: &str,
) -> Result<Option<NextBoot>, OstreeError> {
    let deployment = pending.dir.clone();
    let resolved = resolve_in_root(root, &deployment).map_err(|source| OstreeError::Read {
        path: deployment.clone(),
        error: source,
    })?;
    if !root.join(&resolved).is_dir() {
        return Err(OstreeError::DeploymentMissing {
            which: pending.which(),
            deployment,
            named_by: pending.named_by.clone(),
        });
    }
    let modules = deployment.join("usr/lib/modules");
    let listing = match list_module_dirs(root, &modules) {
        Ok(listing) => listing,
        Err(OstreeError::Read { error: source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            return Err(OstreeError::NoModuleTree {
                which: pending.which(),
                deployment,
            })
        }
        Err(other) => return Err(other),
    };
    let release = pick_kernel_release(&modules, &listing)?;
    let origin = format!(
        "ostree {} deployment {} {}",
        pending.which(),
        pending.id.stateroot,
        pending.id.name()
    );
    if release == running_kernel {
        tracing::debug!(KERNEL_RELEASE = %release, "{origin} runs the running kernel");
        return Ok(None);
    }
    tracing::debug!(KERNEL_RELEASE = %release, "{origin} boots a new kernel");
    Ok(Some(NextBoot {
        module_tree: Some(modules.join(&release)),
        kernel_release: release,
        origin,
        staged_deployment: pending.staged,
    }))
}

/// Whether the host is an ostree system: booted by ostree, or holding an ostree sysroot.
pub fn is_ostree_host(root: &Root) -> bool {
    root.join(OSTREE_BOOTED).exists() || root.join(DEPLOY_DIR).is_dir()
}

/// Host directories to watch (inotify) so every change of the next boot is seen; after any
/// event, read again with [`next_boot`]. Each one is there for a reason:
/// - `/ostree/deploy`: libostree bumps this directory's mtime after every change to the
///   sysroot (deploy, stage, undeploy, cleanup: `_ostree_sysroot_bump_mtime`, "so external
///   processes know something changed"), which inotify reports as `IN_ATTRIB`; new stateroots
///   appear here too.
/// - `/ostree/deploy/<stateroot>/deploy`, one per stateroot: deployment directories (and
///   their `.origin` files) are created and deleted here, a staged deployment's included.
/// - `/run/ostree`: [`STAGED_DEPLOYMENT`] is written there (temporary file, then rename) when
///   a deployment is staged and removed when it is finalized or undeployed, and
///   [`STAGED_DEPLOYMENT_LOCKED`] comes and goes there.
/// - `/boot`: a deploy or undeploy writes the entries into the *other* `loader.N` directory,
///   then swaps the `/boot/loader` symlink by renaming a new link over it (`IN_MOVED_TO`
///   `loader` in `/boot`). A watch on `/boot/loader` would follow the link to the old
///   directory, which ostree deletes right after the swap: that watch sees the deletion,
///   then nothing ever again.
///
/// A directory that does not exist yet is replaced by its nearest existing ancestor, where it
/// will appear (`/run/ostree` before anything was staged since boot). Paths are host paths,
/// without duplicates.
pub fn watch_paths(root: &Root) -> Vec<PathBuf> {
    let mut wanted = vec![PathBuf::from(DEPLOY_DIR)];
    for stateroot in list_stateroots(root) {
        wanted.push(Path::new(DEPLOY_DIR).join(stateroot).join("deploy"));
    }
    wanted.push(PathBuf::from("/run/ostree"));
    wanted.push(PathBuf::from("/boot"));
    let mut paths: Vec<PathBuf> = Vec::new();
    for path in wanted {
        let existing = nearest_existing_dir(root, &path);
        if !paths.contains(&existing) {
            paths.push(existing);
        }
    }
    paths
}

// ---- Pure parsing ------------------------------------------------------------------------

/// Parse [`STAGED_DEPLOYMENT`]'s bytes. `Ok(None)` when the record has no `target`, which
/// libostree also takes as "nothing staged".
pub fn parse_staged_deployment(bytes: &[u8]) -> Result<Option<StagedDeployment>, String> {
    let top = gvariant::vardict(bytes).map_err(|e| e.to_string())?;
    let Some(target) = gvariant::lookup(&top, "target") else {
        return Ok(None);
    };
    let target = target.as_vardict().map_err(|e| format!("'target': {e}"))?;
    let field = |key: &str| -> Result<&str, String> {
        gvariant::lookup(&target, key)
            .ok_or_else(|| format!("'target' has no '{key}'"))?
            .as_str()
            .map_err(|e| format!("'target' '{key}': {e}"))
    };
    let name = field("name")?;
    let osname = field("osname")?;
    let bootcsum = field("bootcsum")?;
    let (csum, serial) = parse_deployment_name(name)
        .ok_or_else(|| format!("'target' 'name' is '{name}', expected <checksum>.<serial>"))?;
    if !is_stateroot_name(osname) {
        return Err(format!(
            "'target' 'osname' is '{osname}', not a stateroot name"
        ));
    }
    let locked = match gvariant::lookup(&top, "locked") {
        Some(value) => value.as_bool().map_err(|e| format!("'locked': {e}"))?,
        None => false,
    };
    Ok(Some(StagedDeployment {
        target: DeploymentId {
            stateroot: osname.to_string(),
            csum,
            serial,
        },
        bootcsum: bootcsum.to_string(),
        locked,
    }))
}

/// Parse a bootloader entry the way libostree's bootconfig parser does: one `key value` per
/// line, split at the first space or tab; `#` starts a comment line; a repeated key keeps
/// its last value.
pub fn parse_boot_entry(text: &str) -> BootEntry {
    let mut entry = BootEntry::default();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.find([' ', '\t']) {
            Some(at) => (&line[..at], line[at..].trim()),
            None => (line, ""),
        };
        match key {
            "version" => entry.version = Some(value.to_string()),
            "options" => {
                entry.ostree_arg = value
                    .split(' ')
                    .find_map(|opt| opt.strip_prefix("ostree="))
                    .map(str::to_string)
            }
            _ => {}
        }
    }
    entry
}

/// Index of the default entry: libostree sorts entries by `version`, highest first
/// (`strverscmp`), entries without one last; ostree writes `version` = number of deployments
/// minus the deployment's index, so the default deployment (index 0) has the highest.
pub fn default_entry(entries: &[BootEntry]) -> Option<usize> {
    (0..entries.len()).min_by(|&a, &b| match (&entries[a].version, &entries[b].version) {
        (Some(va), Some(vb)) => strverscmp(va, vb).reverse(),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    })
}

/// Parse `/ostree/boot.N/<stateroot>/<bootcsum>/<serial>` (libostree's
/// `_ostree_sysroot_parse_bootlink`).
pub fn parse_bootlink(arg: &str) -> Option<Bootlink> {
    let rest = arg.strip_prefix("/ostree/boot.")?;
    let mut parts = rest.split('/');
    let bootversion = match parts.next()? {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    let stateroot = parts.next()?;
    let bootcsum = parts.next()?;
    let serial = parts.next()?;
    if parts.next().is_some()
        || !is_stateroot_name(stateroot)
        || !is_stateroot_name(bootcsum)
        || !is_decimal(serial)
    {
        return None;
    }
    Some(Bootlink {
        bootversion,
        stateroot: stateroot.to_string(),
        bootcsum: bootcsum.to_string(),
        treebootserial: serial.parse().ok()?,
    })
}

/// Parse a deployment directory name `<csum>.<serial>` (lowercase hex, a dot, decimal).
pub fn parse_deployment_name(name: &str) -> Option<(String, u32)> {
    let (csum, serial) = name.split_once('.')?;
    let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    if csum.is_empty() || !csum.chars().all(hex) || !is_decimal(serial) {
        return None;
    }
    Some((csum.to_string(), serial.parse().ok()?))
}

/// One entry of a deployment's `usr/lib/modules`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModulesDirEntry {
    /// The entry's file name: a kernel release when it holds a `vmlinuz`.
    pub name: String,
    /// The entry is a directory holding a `vmlinuz`.
    pub has_vmlinuz: bool,
}

/// The kernel release of a deployment: the single entry of its `usr/lib/modules` that holds
/// a `vmlinuz`. `modules` (a host path) only names the directory in errors.
pub fn pick_kernel_release(
    modules: &Path,
    entries: &[ModulesDirEntry],
) -> Result<String, OstreeError> {
    let mut kernels: Vec<&str> = entries
        .iter()
        .filter(|e| e.has_vmlinuz)
        .map(|e| e.name.as_str())
        .collect();
    kernels.sort_unstable();
    match kernels.as_slice() {
        [one] => Ok(one.to_string()),
        [] => {
            let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            names.sort_unstable();
            Err(OstreeError::NoKernel {
                modules: modules.to_path_buf(),
                found: if names.is_empty() {
                    "an empty directory".to_string()
                } else {
                    format!("only {} without one", names.join(", "))
                },
            })
        }
        several => Err(OstreeError::SeveralKernels {
            modules: modules.to_path_buf(),
            releases: several.join(", "),
        }),
    }
}

/// glibc's `strverscmp`, which libostree sorts bootloader entries with: digit runs compare as
/// numbers, except runs with leading zeros, which compare as fractions ("09" < "0" < "1").
pub fn strverscmp(a: &str, b: &str) -> Ordering {
    // glibc's state machine: states S_N (normal), S_I (integer), S_F (fraction), S_Z (leading
    // zeros), each followed by the class of the next byte: other, digit 1-9, '0'.
    const S_N: usize = 0;
    const S_I: usize = 3;
    const S_F: usize = 6;
    const S_Z: usize = 9;
    const CMP: i8 = 2;
    const LEN: i8 = 3;
    const NEXT_STATE: [usize; 12] = [
        S_N, S_I, S_Z, //
        S_N, S_I, S_I, //
        S_N, S_F, S_F, //
        S_N, S_F, S_Z,
    ];
    const RESULT: [i8; 36] = [
        CMP, CMP, CMP, CMP, LEN, CMP, CMP, CMP, CMP, //
        CMP, -1, -1, 1, LEN, LEN, 1, LEN, LEN, //
        CMP, CMP, CMP, CMP, CMP, CMP, CMP, CMP, CMP, //
        CMP, 1, 1, -1, CMP, CMP, -1, CMP, CMP,
    ];
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let at = |s: &[u8], i: usize| s.get(i).copied().unwrap_or(0);
    let class = |c: u8| usize::from(c == b'0') + usize::from(c.is_ascii_digit());
    let mut i = 0;
    let (mut c1, mut c2) = (at(a, 0), at(b, 0));
    let mut state = S_N + class(c1);
    while c1 == c2 {
        if c1 == 0 {
            return Ordering::Equal;
        }
        state = NEXT_STATE[state];
        i += 1;
        c1 = at(a, i);
        c2 = at(b, i);
        state += class(c1);
    }
    let diff = c1.cmp(&c2);
    match RESULT[state * 3 + class(c2)] {
        CMP => diff,
        LEN => {
            let mut j = i + 1;
            while at(a, j).is_ascii_digit() {
                if !at(b, j).is_ascii_digit() {
                    return Ordering::Greater;
                }
                j += 1;
            }
            if at(b, j).is_ascii_digit() {
                Ordering::Less
            } else {
                diff
            }
        }
        r => r.cmp(&0),
    }
}

/// A path component ostree accepts as a stateroot or boot checksum, and that cannot climb out
/// of the directory it is joined onto.
fn is_stateroot_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit())
}

// ---- The thin edge: reads under the root ----------------------------------------------------

/// Read and parse [`STAGED_DEPLOYMENT`]; `None` when there is none.
pub fn read_staged_deployment(root: &Root) -> Result<Option<StagedDeployment>, OstreeError> {
    let path = PathBuf::from(STAGED_DEPLOYMENT);
    let Some(bytes) = read_bounded(root, &path, STAGED_DEPLOYMENT_MAX_BYTES)? else {
        return Ok(None);
    };
    parse_staged_deployment(&bytes).map_err(|reason| OstreeError::StagedDeployment { path, reason })
}

/// The `ostree-*.conf` entries in [`LOADER_ENTRIES`] as (host path, text), by file name.
/// A missing directory is no entries (libostree's reading too).
fn read_boot_entries(root: &Root) -> Result<Vec<(PathBuf, String)>, OstreeError> {
    let dir = Path::new(LOADER_ENTRIES);
    let read_err = |path: &Path, source| OstreeError::Read {
        path: path.to_path_buf(),
        error: source,
    };
    let resolved = resolve_in_root(root, dir).map_err(|e| read_err(dir, e))?;
    let listing = match fs::read_dir(root.join(&resolved)) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(dir, e)),
    };
    let mut names = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| read_err(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if name.starts_with("ostree-") && name.ends_with(".conf") && is_file {
            names.push(name.to_string());
        }
    }
    names.sort();
    let mut entries = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let bytes = read_bounded(root, &path, BOOT_ENTRY_MAX_BYTES)?.unwrap_or_default();
        entries.push((path, String::from_utf8_lossy(&bytes).into_owned()));
    }
    Ok(entries)
}

/// Entries of `modules` (a host path): each name and whether it holds a `vmlinuz`.
fn list_module_dirs(root: &Root, modules: &Path) -> Result<Vec<ModulesDirEntry>, OstreeError> {
    let read_err = |source| OstreeError::Read {
        path: modules.to_path_buf(),
        error: source,
    };
    let resolved = resolve_in_root(root, modules).map_err(read_err)?;
    let mut entries = Vec::new();
    for entry in fs::read_dir(root.join(&resolved)).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| OstreeError::NotUtf8 {
            dir: modules.to_path_buf(),
            name: name.to_string_lossy().into_owned(),
        })?;
        let has_vmlinuz = root.join(resolved.join(name).join("vmlinuz")).is_file();
        entries.push(ModulesDirEntry {
            name: name.to_string(),
            has_vmlinuz,
        });
    }
    Ok(entries)
}

/// Stateroot names under [`DEPLOY_DIR`]; none when it cannot be read.
fn list_stateroots(root: &Root) -> Vec<String> {
    let Ok(resolved) = resolve_in_root(root, Path::new(DEPLOY_DIR)) else {
        return Vec::new();
    };
    let Ok(listing) = fs::read_dir(root.join(resolved)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = listing
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// `host_path` if it is a directory under the root, else its nearest ancestor that is.
fn nearest_existing_dir(root: &Root, host_path: &Path) -> PathBuf {
    let mut path = host_path.to_path_buf();
    while !root.join(&path).is_dir() {
        if !path.pop() {
            return PathBuf::from("/");
        }
    }
    path
}

/// The whole file, or `None` when it does not exist; refused when larger than `limit`.
fn read_bounded(root: &Root, host_path: &Path, limit: u64) -> Result<Option<Vec<u8>>, OstreeError> {
    use std::io::Read;
    let read_err = |source| OstreeError::Read {
        path: host_path.to_path_buf(),
        error: source,
    };
    let resolved = resolve_in_root(root, host_path).map_err(read_err)?;
    let file = match fs::File::open(root.join(resolved)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(OstreeError::TooLarge {
            path: host_path.to_path_buf(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(Some(bytes))
}

/// Resolve the symlinks in a host path the way the kernel would if `root` were `/`: absolute
/// link targets start again at the root, `..` stops at it. On a real ostree host `/ostree` is
/// a link to `sysroot/ostree` and `/boot/loader` one to `loader.N`; under a test root the same
/// links must stay inside it. Returns a host path; components that do not exist are kept as
/// they are, so reading the result gives `NotFound`.
fn resolve_in_root(root: &Root, host_path: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<PathBuf> = Vec::new();
    push_components(&mut pending, host_path);
    let mut resolved = PathBuf::from("/");
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part.as_os_str() == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let on_disk = root.join(&candidate);
        match fs::symlink_metadata(&on_disk) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(io::Error::other(format!(
                        "more than {MAX_SYMLINK_HOPS} symlinks resolving {}",
                        host_path.display()
                    )));
                }
                let target = fs::read_link(&on_disk)?;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                push_components(&mut pending, &target);
            }
            Ok(_) => resolved = candidate,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                resolved = candidate;
                while let Some(rest) = pending.pop() {
                    resolved.push(rest);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(resolved)
}

/// Push the normal and `..` components of `path` onto a stack, last component first.
fn push_components(stack: &mut Vec<PathBuf>, path: &Path) {
    let parts: Vec<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(PathBuf::from(p)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

/// The target of the symlink at `host_path`, its parent directories resolved under the root.
fn read_link_in_root(root: &Root, host_path: &Path) -> io::Result<PathBuf> {
    let parent = host_path.parent().unwrap_or(Path::new("/"));
    let name = host_path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let parent = resolve_in_root(root, parent)?;
    fs::read_link(root.join(parent.join(name)))
}

#[cfg(test)]
mod tests;

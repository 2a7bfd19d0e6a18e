//! The thin edge to the kernel: the few syscalls the loader makes, behind one trait, so the
//! planning and ordering logic runs on temp roots against [`SimulatedKernel`] and the real
//! [`LinuxKernel`] stays a handful of lines (exercised by the VM tests).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::host::{kernel as hk, Root};
use crate::kmod::plan::MountState;

/// One module handed to the kernel.
pub struct ModuleLoad<'a> {
    /// The kernel's spelling (`nvidia_uvm`).
    pub name: &'a str,
    /// Host path of the file, for messages.
    pub path: &'a Path,
    /// What the kernel is given.
    pub image: ModuleImage<'a>,
    /// Module parameters, `key=value key=value` (may be empty).
    pub params: &'a str,
    // What the module says of itself; the real kernel reads it from the image, the
    // simulation needs it spelled out.
    /// `version=`, which the simulation writes to `/sys/module/<name>/version`.
    pub version: Option<&'a str>,
    /// `vermagic=`; the simulation refuses a module for another kernel (`ENOEXEC`).
    pub vermagic: &'a str,
    /// Whether the file is signed; the simulation refuses an unsigned one under `sig_enforce`.
    pub signed: bool,
}

/// How a module reaches the kernel.
#[derive(Clone, Copy)]
pub enum ModuleImage<'a> {
    /// The overlay's open file, for `finit_module(2)`; `compressed`: pass
    /// `MODULE_INIT_COMPRESSED_FILE`, the kernel decompresses it.
    File {
        /// The open module file.
        file: &'a File,
        /// Whether the kernel is to decompress it.
        compressed: bool,
    },
    /// The image decompressed here (a compression the kernel cannot undo), for `init_module(2)`.
    /// Not `finit_module` of a memfd: SELinux checks `system:module_load` against the file's
    /// label (`selinux_kernel_module_from_file` in security/selinux/hooks.c), and a memfd's
    /// (`tmpfs_t`/`memfd_t`) is allowed to no service domain in Fedora's targeted policy, while a
    /// buffer is checked against the loading domain itself, which `unconfined_service_t` passes.
    /// LoadPin and IMA refuse both alike.
    Decompressed(&'a [u8]),
}

/// What is at a device-node path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Nothing there.
    Missing,
    /// A character device with these numbers.
    CharDevice {
        /// Character major.
        major: u32,
        /// Character minor.
        minor: u32,
    },
    /// Something else: a regular file, directory, other device, or (simulated) unparsable content.
    Other,
}

/// A failed syscall (or `modprobe` run), with what it was done to.
#[derive(Debug, thiserror::Error)]
#[error("{operation} {target}: {errno}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct SysError {
    /// What was attempted (`finit_module`, `mknod`, `mount --bind`, `modprobe`, …).
    pub operation: &'static str,
    /// What it was done to: a path or a module name.
    pub target: String,
    /// The error number; a `modprobe` that exits non-zero reports `ENOENT` whatever the cause.
    pub errno: Errno,
    /// More text when there is some: an I/O error's message, `modprobe`'s stderr, the simulation's
    /// reason.
    pub detail: Option<String>,
}

impl SysError {
    fn new(operation: &'static str, target: impl std::fmt::Display, errno: Errno) -> Self {
        SysError {
            operation,
            target: target.to_string(),
            errno,
            detail: None,
        }
    }
}

/// The syscalls of the load path. Paths are *resolved* paths (already under the root).
pub trait Kernel {
    /// Load a module: `finit_module(2)` of a file, `init_module(2)` of a decompressed image.
    fn load_module(&mut self, module: &ModuleLoad<'_>) -> Result<(), SysError>;
    /// Create a character device node with exactly `mode` (the umask does not apply).
    fn mknod_char(
        &mut self,
        path: &Path,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> Result<(), SysError>;
    /// What is at `path` now, without following a symlink on the real kernel.
    fn node_state(&self, path: &Path) -> Result<NodeState, SysError>;
    /// The permission bits (`0o777` part) and owner of the node at `path`, not following a
    /// symlink: `(mode, uid, gid)`.
    fn node_owner_mode(&self, path: &Path) -> Result<(u32, u32, u32), SysError>;
    /// chmod `mode` and chown `uid:gid` a node or directory the agent makes.
    fn set_owner_mode(
        &mut self,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<(), SysError>;
    /// Is `source` mounted at `target`?
    fn mount_state(&self, source: &Path, target: &Path) -> Result<MountState, SysError>;
    /// Bind-mount `source` at `target`, then remount it read-only, `nosuid`, `nodev`.
    fn bind_mount_readonly(&mut self, source: &Path, target: &Path) -> Result<(), SysError>;
    /// Lazily unmount whatever is at `target` (`MNT_DETACH`).
    fn unmount(&mut self, target: &Path) -> Result<(), SysError>;
    /// Write a sysfs attribute (no create, no truncate: sysfs takes one write).
    fn write_sysfs(&mut self, path: &Path, value: &str) -> Result<(), SysError>;
    /// Load an OS module with the system's `modprobe`.
    fn modprobe(&mut self, name: &str) -> Result<(), SysError>;
    /// Unload a module this run loaded, to undo a partial load.
    fn delete_module(&mut self, name: &str) -> Result<(), SysError>;
}

/// Mount points in `/proc/self/mountinfo` text (field 5, octal escapes undone).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|field| PathBuf::from(crate::fsutil::unescape_mountinfo(field)))
        .collect()
}

impl ModuleImage<'_> {
    /// The syscall this image is loaded with, for messages.
    pub fn syscall(&self) -> &'static str {
        match self {
            ModuleImage::File { .. } => "finit_module",
            ModuleImage::Decompressed(_) => "init_module",
        }
    }
}

/// `MODULE_INIT_COMPRESSED_FILE`, which nix does not name.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// The real kernel.
#[derive(Debug, Default)]
pub struct LinuxKernel;

impl Kernel for LinuxKernel {
    fn load_module(&mut self, module: &ModuleLoad<'_>) -> Result<(), SysError> {
        let operation = module.image.syscall();
        let params = std::ffi::CString::new(module.params)
            .map_err(|_| SysError::new(operation, module.path.display(), Errno::EINVAL))?;
        match module.image {
            ModuleImage::File { file, compressed } => {
                let flags = if compressed {
                    nix::kmod::ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE as _)
                } else {
                    nix::kmod::ModuleInitFlags::empty()
                };
                nix::kmod::finit_module(file, &params, flags)
            }
            ModuleImage::Decompressed(bytes) => nix::kmod::init_module(bytes, &params),
        }
        .map_err(|e| SysError::new(operation, module.path.display(), e))
    }

    fn mknod_char(
        &mut self,
        path: &Path,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> Result<(), SysError> {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            makedev(major.into(), minor.into()),
        )
        .map_err(|e| SysError::new("mknod", path.display(), e))?;
        // mknod honours the umask; the mode is meant exactly.
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            path,
            Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| SysError::new("chmod", path.display(), e))
    }

    fn node_state(&self, path: &Path) -> Result<NodeState, SysError> {
        use std::os::unix::fs::MetadataExt;
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_char_device() => {
                let rdev = meta.rdev();
                Ok(NodeState::CharDevice {
                    major: nix::sys::stat::major(rdev) as u32,
                    minor: nix::sys::stat::minor(rdev) as u32,
                })
            }
            Ok(_) => Ok(NodeState::Other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeState::Missing),
            Err(e) => Err(io_sys_error("stat", path, e)),
        }
    }

    fn node_owner_mode(&self, path: &Path) -> Result<(u32, u32, u32), SysError> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::symlink_metadata(path).map_err(|e| io_sys_error("stat", path, e))?;
        Ok((meta.mode() & 0o777, meta.uid(), meta.gid()))
    }

    fn set_owner_mode(
        &mut self,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<(), SysError> {
        use std::os::unix::fs::PermissionsExt;
        // chown first: chown clears setuid bits, never permission bits, so the order is free.
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| io_sys_error("chown", path, e))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| io_sys_error("chmod", path, e))
    }

    fn mount_state(&self, source: &Path, target: &Path) -> Result<MountState, SysError> {
        use std::os::unix::fs::MetadataExt;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| io_sys_error("read", Path::new("/proc/self/mountinfo"), e))?;
        if !mount_points(&mountinfo).iter().any(|p| p == target) {
            return Ok(MountState::NotMounted);
        }
        // A bind mount shows its source's directory inode at the mount point.
        let same = match (fs::metadata(source), fs::metadata(target)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        Ok(if same {
            MountState::Wanted
        } else {
            MountState::Other
        })
    }

    fn bind_mount_readonly(&mut self, source: &Path, target: &Path) -> Result<(), SysError> {
        use nix::mount::{mount, MsFlags};
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| SysError::new("mount --bind", target.display(), e))?;
        // A bind mount ignores MS_RDONLY on the first call; remount to make it read-only.
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| {
            let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            SysError::new("mount -o remount,ro", target.display(), e)
        })
    }

    fn unmount(&mut self, target: &Path) -> Result<(), SysError> {
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| SysError::new("umount", target.display(), e))
    }

    fn write_sysfs(&mut self, path: &Path, value: &str) -> Result<(), SysError> {
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|e| io_sys_error("write", path, e))
    }

    fn modprobe(&mut self, name: &str) -> Result<(), SysError> {
        let output = std::process::Command::new("modprobe")
            .arg("--")
            .arg(name)
            .output()
            .map_err(|e| io_sys_error("modprobe", Path::new(name), e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(SysError {
                operation: "modprobe",
                target: name.to_string(),
                errno: Errno::ENOENT,
                detail: Some(String::from_utf8_lossy(&output.stderr).trim().to_string()),
            })
        }
    }

    fn delete_module(&mut self, name: &str) -> Result<(), SysError> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| SysError::new("delete_module", name, Errno::EINVAL))?;
        nix::kmod::delete_module(&cname, nix::kmod::DeleteModuleFlags::O_NONBLOCK)
            .map_err(|e| SysError::new("delete_module", name, e))
    }
}

fn set_file_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn io_sys_error(operation: &'static str, path: &Path, e: std::io::Error) -> SysError {
    SysError {
        operation,
        target: path.display().to_string(),
        errno: e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO),
        detail: Some(e.to_string()),
    }
}

/// One recorded syscall.
///
/// [`SimulatedKernel`] also appends each as a JSON line to [`SIMULATION_LOG`]; paths are host
/// paths.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum Call {
    /// `finit_module` of a module.
    FinitModule {
        /// The module (kernel spelling).
        name: String,
        /// The module file.
        path: PathBuf,
        /// Module parameters.
        params: String,
        /// Whether `MODULE_INIT_COMPRESSED_FILE` was passed.
        kernel_decompresses: bool,
    },
    /// `init_module` of an image the agent decompressed.
    InitModule {
        /// The module (kernel spelling).
        name: String,
        /// The module file it was decompressed from.
        path: PathBuf,
        /// Module parameters.
        params: String,
    },
    /// `mknod` of a character device.
    Mknod {
        /// The node.
        path: PathBuf,
        /// Character major.
        major: u32,
        /// Character minor.
        minor: u32,
        /// Permission bits.
        mode: u32,
    },
    /// A chmod and chown of a node or its directory.
    SetOwnerMode {
        /// The node or directory.
        path: PathBuf,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Permission bits.
        mode: u32,
    },
    /// A read-only bind mount.
    BindMount {
        /// What was mounted.
        source: PathBuf,
        /// Where it was mounted.
        target: PathBuf,
    },
    /// A (lazy) unmount.
    Unmount {
        /// The mount point.
        target: PathBuf,
    },
    /// A write to a sysfs attribute.
    WriteSysfs {
        /// The attribute file.
        path: PathBuf,
        /// The value written.
        value: String,
    },
    /// A `modprobe` of an OS module.
    Modprobe {
        /// The module name as given.
        name: String,
    },
    /// A `delete_module` (undoing a partial load).
    DeleteModule {
        /// The module name as given.
        name: String,
    },
}

/// Where [`SimulatedKernel`] appends its record (host path), so a CLI run can be inspected.
pub const SIMULATION_LOG: &str = "/run/nvdriver-agent/simulated-kernel.log";

/// A kernel simulated inside a fake root: it records every call (host paths) and makes the
/// effects a real kernel would make visible under the root (`/proc/modules`,
/// `/sys/module/<name>/version`, `/proc/devices`, `/proc/driver/nvidia/gpus`,
/// `/proc/self/mountinfo`, `/proc/kallsyms`), and refuses what a real one refuses: a module
/// for another kernel (ENOEXEC), one with a symbol that nothing loaded exports (ENOENT), an
/// unsigned one under `sig_enforce` (EKEYREJECTED), one already loaded (EEXIST).
///
/// Like the real kernel it never looks at `depends=`: it reads the module image it is handed
/// and resolves each undefined symbol against `/proc/kallsyms` (the kernel image's exports,
/// seeded by the fake host, and what loaded modules exported), as
/// `kernel/module/main.c` `simplify_symbols` → `resolve_symbol` does. So a plan that trusts
/// `depends=` alone fails here as it would on a real kernel.
///
/// With no GPUs, `nvidia`'s init returns ENODEV and the kernel frees it again, as the real
/// driver does ("NVRM: No NVIDIA GPU found.", open-gpu-kernel-modules kernel-open/nvidia/nv.c).
pub struct SimulatedKernel {
    root: Root,
    /// Every call made so far, in order (also appended to [`SIMULATION_LOG`]).
    pub calls: Vec<Call>,
    /// GPUs the simulated driver finds; with none, `nvidia`'s init fails with ENODEV.
    pub gpus: u32,
    /// The dynamic major the simulated `nvidia-uvm` registers.
    pub uvm_major: u32,
    /// Fault injection: refuse this module (kernel spelling) with this errno.
    pub refuse: Option<(String, Errno)>,
}

impl SimulatedKernel {
    /// A simulated kernel under `root`: `nvidia-uvm` at major 507, no fault injection, and one
    /// GPU, or, when the root has a `/sys/bus/pci/devices`, as many as it lists with NVIDIA's
    /// vendor id (`0x10de`), which may be none.
    pub fn new(root: Root) -> Self {
        let gpus = simulated_gpus(&root);
        SimulatedKernel {
            root,
            calls: Vec::new(),
            gpus,
            uvm_major: 507,
            refuse: None,
        }
    }

    fn record(&mut self, call: Call) {
        let log = self.root.join(SIMULATION_LOG);
        if let Some(parent) = log.parent() {
            let _ = fs::create_dir_all(parent);
        }
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(&log) {
            let _ = writeln!(file, "{}", serde_json::to_string(&call).unwrap_or_default());
        }
        self.calls.push(call);
    }

    fn host(&self, resolved: &Path) -> PathBuf {
        self.root
            .host_path_of(resolved)
            .unwrap_or_else(|| resolved.to_path_buf())
    }

    fn read(&self, host_path: &str) -> String {
        fs::read_to_string(self.root.join(host_path)).unwrap_or_default()
    }

    fn append(&self, host_path: &str, line: &str) {
        let path = self.root.join(host_path);
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "{line}");
        }
    }

    fn write(&self, host_path: &str, contents: &str) {
        let path = self.root.join(host_path);
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::write(path, contents);
    }

    fn is_loaded(&self, name: &str) -> bool {
        hk::parse_proc_modules(&self.read(hk::PROC_MODULES))
            .iter()
            .any(|m| *m == hk::normalize_module_name(name))
    }

    fn add_char_device(&self, major: u32, name: &str) {
        let text = self.read("/proc/devices");
        let text = if text.is_empty() {
            "Character devices:\n".to_string()
        } else {
            text
        };
        let (chars, blocks) = match text.find("\nBlock devices:") {
            Some(i) => (text[..i + 1].to_string(), text[i + 1..].to_string()),
            None => (text.clone(), String::new()),
        };
        self.write(
            "/proc/devices",
            &format!("{chars}{major:>3} {name}\n{blocks}"),
        );
    }
}

impl SimulatedKernel {
    /// Record what a module exports in `/proc/kallsyms`, tagged with the module as the real
    /// file tags module symbols.
    fn add_symbols(&self, module: &str, exports: &[String]) {
        for symbol in exports {
            self.append(
                KALLSYMS,
                &format!("0000000000000000 T {symbol}\t[{module}]"),
            );
        }
    }

    /// Forget what an unloaded module exported.
    fn remove_symbols(&self, module: &str) {
        let tag = format!("[{module}]");
        let text = self.read(KALLSYMS);
        let kept: String = text
            .lines()
            .filter(|l| l.split_whitespace().nth(3) != Some(tag.as_str()))
            .map(|l| format!("{l}\n"))
            .collect();
        self.write(KALLSYMS, &kept);
    }
}

/// The kernel's symbol list, which the simulation keeps: the kernel image's exports (seeded by
/// the fake host) and each loaded module's.
pub const KALLSYMS: &str = "/proc/kallsyms";

/// Symbol names in `/proc/kallsyms` text (`ADDRESS TYPE NAME [MODULE]`).
fn kallsyms_names(text: &str) -> std::collections::HashSet<&str> {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect()
}

/// What depmod's `modules.symbols` says `module` exports (`alias symbol:NAME MODULE` lines).
fn os_module_exports(text: &str, module: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (alias, symbol, owner) = (words.next()?, words.next()?, words.next()?);
            (alias == "alias" && hk::normalize_module_name(owner) == module)
                .then(|| symbol.strip_prefix("symbol:").map(str::to_string))
                .flatten()
        })
        .collect()
}

/// The module image as the kernel receives it (decompressed when it is compressed), parsed for
/// its symbols. Read with `pread` so the file offset the real syscall would use is untouched.
fn read_image(file: &File) -> Result<crate::modinfo::ModInfo, String> {
    use std::os::unix::fs::FileExt;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read_at(&mut buf, bytes.len() as u64)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    parse_image(&bytes)
}

fn parse_image(bytes: &[u8]) -> Result<crate::modinfo::ModInfo, String> {
    crate::modinfo::parse_module(bytes, Path::new("<module image>")).map_err(|e| e.to_string())
}

/// Host path of the PCI devices the simulation counts GPUs in.
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// NVIDIA devices in the root's `/sys/bus/pci/devices` (what the driver's PCI probe would find);
/// 1 when the root has no such directory.
fn simulated_gpus(root: &Root) -> u32 {
    let Ok(entries) = fs::read_dir(root.join(PCI_DEVICES)) else {
        return 1;
    };
    let nvidia = entries
        .flatten()
        .filter(|e| fs::read_to_string(e.path().join("vendor")).is_ok_and(|v| v.trim() == "0x10de"))
        .count();
    u32::try_from(nvidia).unwrap_or(u32::MAX)
}

impl Kernel for SimulatedKernel {
    fn load_module(&mut self, module: &ModuleLoad<'_>) -> Result<(), SysError> {
        let (name, path, params) = (
            module.name.to_string(),
            module.path.to_path_buf(),
            module.params.to_string(),
        );
        self.record(match module.image {
            ModuleImage::File { compressed, .. } => Call::FinitModule {
                name,
                path,
                params,
                kernel_decompresses: compressed,
            },
            ModuleImage::Decompressed(_) => Call::InitModule { name, path, params },
        });
        let fail = |errno, detail: String| SysError {
            operation: module.image.syscall(),
            target: module.path.display().to_string(),
            errno,
            detail: Some(detail),
        };
        if let Some((name, errno)) = &self.refuse {
            if *name == module.name {
                return Err(fail(*errno, "refused by fault injection".into()));
            }
        }
        let running = self.read(hk::OSRELEASE).trim().to_string();
        if crate::modinfo::vermagic_release(module.vermagic) != running {
            return Err(fail(
                Errno::ENOEXEC,
                "disagrees about version of symbol module_layout".into(),
            ));
        }
        if self.read(hk::SIG_ENFORCE).trim() == "Y" && !module.signed {
            return Err(fail(
                Errno::EKEYREJECTED,
                "module signature required".into(),
            ));
        }
        if self.is_loaded(module.name) {
            return Err(fail(Errno::EEXIST, "already loaded".into()));
        }
        let image = match module.image {
            ModuleImage::File { file, .. } => read_image(file),
            ModuleImage::Decompressed(bytes) => parse_image(bytes),
        }
        .map_err(|e| fail(Errno::ENOEXEC, format!("invalid module format: {e}")))?;
        let name = hk::normalize_module_name(module.name);
        let kallsyms = self.read(KALLSYMS);
        let known = kallsyms_names(&kallsyms);
        if let Some(symbol) = image.imports.iter().find(|s| !known.contains(s.as_str())) {
            // The real kernel's words (kernel/module/main.c, resolve_symbol_wait).
            return Err(fail(
                Errno::ENOENT,
                format!("{name}: Unknown symbol {symbol} (err -2)"),
            ));
        }
        if name == "nvidia" && self.gpus == 0 {
            // The module linked, its init ran and failed: the kernel frees it, nothing stays.
            return Err(fail(Errno::ENODEV, "NVRM: No NVIDIA GPU found.".into()));
        }
        self.add_symbols(&name, &image.exports);
        self.append(
            hk::PROC_MODULES,
            &format!("{name} 16384 0 - Live 0x0000000000000000 (OE)"),
        );
        if let Some(version) = module.version {
            self.write(
                &format!("/sys/module/{name}/version"),
                &format!("{version}\n"),
            );
        }
        match name.as_str() {
            "nvidia" => {
                self.add_char_device(195, "nvidia");
                for gpu in 0..self.gpus {
                    self.write(
                        &format!(
                            "/proc/driver/nvidia/gpus/0000:{:02x}:00.0/information",
                            gpu + 1
                        ),
                        &format!(
                            "Model: \t\t Simulated GPU\nIRQ:   \t\t 42\nDevice Minor: \t {gpu}\n"
                        ),
                    );
                }
            }
            "nvidia_uvm" => self.add_char_device(self.uvm_major, "nvidia-uvm"),
            _ => {}
        }
        Ok(())
    }

    fn mknod_char(
        &mut self,
        path: &Path,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> Result<(), SysError> {
        self.record(Call::Mknod {
            path: self.host(path),
            major,
            minor,
            mode,
        });
        if path.exists() {
            return Err(SysError::new("mknod", path.display(), Errno::EEXIST));
        }
        // A node is a file `c MAJOR:MINOR` with the node's permission bits; owned by root
        // unless an `owner UID:GID` line says otherwise.
        fs::write(path, format!("c {major}:{minor}\n"))
            .map_err(|e| io_sys_error("mknod", path, e))?;
        set_file_mode(path, mode).map_err(|e| io_sys_error("mknod", path, e))
    }

    fn node_state(&self, path: &Path) -> Result<NodeState, SysError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let parsed = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .strip_prefix("c ")
                    .and_then(|rest| rest.split_once(':'))
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                Ok(match parsed {
                    Some((major, minor)) => NodeState::CharDevice { major, minor },
                    None => NodeState::Other,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeState::Missing),
            Err(_) => Ok(NodeState::Other),
        }
    }

    fn node_owner_mode(&self, path: &Path) -> Result<(u32, u32, u32), SysError> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::symlink_metadata(path).map_err(|e| io_sys_error("stat", path, e))?;
        let text = if meta.is_file() {
            fs::read_to_string(path).unwrap_or_default()
        } else {
            String::new()
        };
        let (uid, gid) = text
            .lines()
            .find_map(|l| l.strip_prefix("owner "))
            .and_then(|o| o.split_once(':'))
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
            .unwrap_or((0, 0));
        Ok((meta.mode() & 0o777, uid, gid))
    }

    fn set_owner_mode(
        &mut self,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<(), SysError> {
        self.record(Call::SetOwnerMode {
            path: self.host(path),
            uid,
            gid,
            mode,
        });
        if path.is_file() {
            let text = fs::read_to_string(path).map_err(|e| io_sys_error("chown", path, e))?;
            let node = text.lines().next().unwrap_or("");
            let text = if (uid, gid) == (0, 0) {
                format!("{node}\n")
            } else {
                format!("{node}\nowner {uid}:{gid}\n")
            };
            // The file may be 0400 already; a non-root test runner must still rewrite it.
            set_file_mode(path, 0o600).map_err(|e| io_sys_error("chmod", path, e))?;
            fs::write(path, text).map_err(|e| io_sys_error("chown", path, e))?;
        }
        set_file_mode(path, mode).map_err(|e| io_sys_error("chmod", path, e))
    }

    fn mount_state(&self, source: &Path, target: &Path) -> Result<MountState, SysError> {
        let target_host = self.host(target).to_string_lossy().into_owned();
        let source_host = self.host(source).to_string_lossy().into_owned();
        let text = self.read("/proc/self/mountinfo");
        let line = text
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(target_host.as_str()));
        Ok(match line {
            None => MountState::NotMounted,
            Some(l) if l.split_whitespace().nth(3) == Some(source_host.as_str()) => {
                MountState::Wanted
            }
            Some(_) => MountState::Other,
        })
    }

    fn bind_mount_readonly(&mut self, source: &Path, target: &Path) -> Result<(), SysError> {
        let (source, target_host) = (self.host(source), self.host(target));
        self.record(Call::BindMount {
            source: source.clone(),
            target: target_host.clone(),
        });
        if !target.is_dir() {
            return Err(SysError::new(
                "mount --bind",
                target.display(),
                Errno::ENOTDIR,
            ));
        }
        self.append(
            "/proc/self/mountinfo",
            &format!(
                "900 1 253:1 {} {} ro,nosuid,nodev shared:1 - ext4 /dev/vda1 rw",
                source.display(),
                target_host.display()
            ),
        );
        Ok(())
    }

    fn unmount(&mut self, target: &Path) -> Result<(), SysError> {
        let target_host = self.host(target);
        self.record(Call::Unmount {
            target: target_host.clone(),
        });
        let text = self.read("/proc/self/mountinfo");
        let kept: String = text
            .lines()
            .filter(|l| l.split_whitespace().nth(4) != Some(&*target_host.to_string_lossy()))
            .map(|l| format!("{l}\n"))
            .collect();
        self.write("/proc/self/mountinfo", &kept);
        Ok(())
    }

    fn write_sysfs(&mut self, path: &Path, value: &str) -> Result<(), SysError> {
        self.record(Call::WriteSysfs {
            path: self.host(path),
            value: value.to_string(),
        });
        if !path.exists() {
            return Err(SysError::new("write", path.display(), Errno::ENOENT));
        }
        fs::write(path, value).map_err(|e| io_sys_error("write", path, e))
    }

    fn modprobe(&mut self, name: &str) -> Result<(), SysError> {
        self.record(Call::Modprobe {
            name: name.to_string(),
        });
        let running = self.read(hk::OSRELEASE).trim().to_string();
        let dep = self.read(&format!("/usr/lib/modules/{running}/modules.dep"));
        let builtin = self.read(&format!("/usr/lib/modules/{running}/modules.builtin"));
        let normalized = hk::normalize_module_name(name);
        if hk::parse_module_index(&builtin).contains(&normalized) || self.is_loaded(name) {
            return Ok(());
        }
        if hk::parse_module_index(&dep).contains(&normalized) {
            self.append(
                hk::PROC_MODULES,
                &format!("{normalized} 16384 0 - Live 0x0"),
            );
            let symbols = self.read(&format!("/usr/lib/modules/{running}/modules.symbols"));
            self.add_symbols(&normalized, &os_module_exports(&symbols, &normalized));
            return Ok(());
        }
        Err(SysError {
            operation: "modprobe",
            target: name.to_string(),
            errno: Errno::ENOENT,
            detail: Some(format!(
                "modprobe: FATAL: Module {name} not found in directory /lib/modules/{running}"
            )),
        })
    }

    fn delete_module(&mut self, name: &str) -> Result<(), SysError> {
        self.record(Call::DeleteModule {
            name: name.to_string(),
        });
        let normalized = hk::normalize_module_name(name);
        let text = self.read(hk::PROC_MODULES);
        let kept: String = text
            .lines()
            .filter(|l| l.split_whitespace().next() != Some(normalized.as_str()))
            .map(|l| format!("{l}\n"))
            .collect();
        self.write(hk::PROC_MODULES, &kept);
        self.remove_symbols(&normalized);
        let _ = fs::remove_dir_all(self.root.join(format!("/sys/module/{normalized}")));
        Ok(())
    }
}

//! Executing a [`LoadPlan`]: the firmware path, the OS prerequisites, `finit_module` in
//! order, device nodes, the driver root, the toolkit config, the readiness file. Every syscall
//! goes through [`Kernel`]; a module load that fails undoes the modules this run loaded.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use tracing::{info, warn};

use crate::handoff::driver_ready::{self, DriverReady};
use crate::handoff::toolkit;
use crate::host::kernel::FIRMWARE_PATH;
use crate::host::Root;
use crate::kmod::caps::{self, CapNode};
use crate::kmod::devices::{self, nodes_for, DeviceNode};
use crate::kmod::plan::{DriverRootStep, LoadPlan, ModuleAction, OsModuleAction, OsModuleStep};
use crate::kmod::sys::{Kernel, ModuleImage, ModuleLoad, NodeState, SysError};
use crate::modinfo::{self, Compression};

/// An overlay module file opened (and hashed) during inspection, handed to `finit_module`
/// as the same descriptor, so what was verified is what gets loaded.
pub struct OpenedModule {
    /// The open module file, positioned at the start.
    pub file: File,
    /// The module's `vermagic=` (only [`crate::kmod::sys::SimulatedKernel`] checks it).
    pub vermagic: String,
    /// Whether the file carries a module signature.
    pub signed: bool,
}

/// Why executing a load plan failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "the kernel refused module {module} ({path}): {hint}; `journalctl -k` says why. {cause}"
    )]
    /// `finit_module` failed (other than `EEXIST`); the modules this run loaded were unloaded
    /// again (best effort: a failed unload is only logged).
    Refused {
        /// The module (kernel spelling).
        module: String,
        /// The module file (host path).
        path: PathBuf,
        /// A likely reason, from the errno.
        hint: &'static str,
        /// The syscall error.
        cause: Box<SysError>,
    },
    /// The `nvidia` module linked, and its init found no NVIDIA GPU (`ENODEV`; the driver logs
    /// "NVRM: No NVIDIA GPU found."): nothing is wrong with the overlay. The kernel freed
    /// `nvidia` again; the modules this run loaded before it were unloaded.
    #[error("no NVIDIA GPU on this host: the kernel loaded {module} ({path}) and its init found no GPU ({cause}); the overlay is fine. If a GPU should be there, check `lspci -d 10de:` and `journalctl -k | grep NVRM`")]
    NoGpu {
        /// The module whose init failed (`nvidia`).
        module: String,
        /// The module file (host path).
        path: PathBuf,
        /// The syscall error (`ENODEV`).
        cause: Box<SysError>,
    },
    /// `modprobe` of an OS prerequisite module failed.
    #[error("cannot load the OS module {name} that the driver needs: {cause}")]
    OsModule {
        /// The OS module (kernel spelling).
        name: String,
        /// The `modprobe` failure, with its stderr.
        cause: SysError,
    },
    /// A module the kernel cannot decompress could not be decompressed here.
    #[error("cannot decompress {path} for loading: {cause}")]
    Decompress {
        /// The module file (host path).
        path: PathBuf,
        /// The decompression error.
        cause: modinfo::ModinfoError,
    },
    /// Writing `firmware_class.path` failed.
    #[error("cannot set the firmware search path: {0}; the open modules will not find their GSP firmware")]
    Firmware(SysError),
    /// A loaded module registered no character device in `/proc/devices`.
    #[error(transparent)]
    Devices(#[from] devices::DeviceError),
    /// The MIG or IMEX capability nodes could not be worked out from procfs.
    #[error(transparent)]
    Caps(#[from] caps::CapsError),
    /// Creating (or replacing) a device node failed.
    #[error("cannot create device node {path}: {cause}")]
    Node {
        /// The node (host path).
        path: PathBuf,
        /// The failed stat or mknod.
        cause: SysError,
    },
    /// The driver root could not be mounted: it is not a directory, or unmount, mkdir or bind mount
    /// failed.
    #[error("cannot expose the driver root {path}: {cause}")]
    DriverRoot {
        /// The driver root (host path, `driver.root`).
        path: PathBuf,
        /// What went wrong.
        cause: String,
    },
    /// The toolkit config could not be planned or written (checked before any syscall, then
    /// applied).
    #[error(transparent)]
    Toolkit(#[from] toolkit::RuntimeError),
    /// The GPU Operator's `driver-ready` file could not be read, checked or written.
    #[error(transparent)]
    Readiness(#[from] driver_ready::ReadinessError),
    /// A file operation failed: reading a module to decompress it, removing a stale node, making a
    /// `/dev/char` link.
    #[error("{path}: {error}")]
    Io {
        /// The file: a host path for a module, a path under the root for nodes and links.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The plan names a module (manifest path) that has no entry in the opened files: a bug in the
    /// caller.
    #[error("internal: the plan names {0} but it was not opened")]
    NotOpened(PathBuf),
}

/// What `load` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadReport {
    /// Modules this run loaded, in load order (kernel spelling).
    pub loaded: Vec<String>,
    /// Modules already loaded: at planning time, or found loaded by `finit_module` (`EEXIST`).
    pub already_loaded: Vec<String>,
    /// OS modules this run loaded with `modprobe`.
    pub os_modules_loaded: Vec<String>,
    /// Whether `firmware_class.path` was written.
    pub firmware_path_set: bool,
    /// Device nodes created or replaced (host paths).
    pub nodes_created: Vec<PathBuf>,
    /// The driver root the toolkit and `driver-ready` were pointed at (host path; `/` without user
    /// space).
    pub driver_root: PathBuf,
    /// Whether the overlay was bind-mounted at the driver root by this run.
    pub driver_root_mounted: bool,
    /// Whether the toolkit config was created or changed.
    pub toolkit_changed: bool,
    /// Whether the `driver-ready` file was written (it was missing or differed).
    pub driver_ready_written: bool,
    /// Time spent inside `finit_module` (the kernel's own work: relocation, signature check,
    /// the modules' init functions), in microseconds; the rest of `load` is the agent's overhead.
    pub module_init_micros: u64,
}

impl LoadReport {
    /// Nothing on the host changed.
    pub fn is_noop(&self) -> bool {
        self.loaded.is_empty()
            && self.os_modules_loaded.is_empty()
            && !self.firmware_path_set
            && self.nodes_created.is_empty()
            && !self.driver_root_mounted
            && !self.toolkit_changed
            && !self.driver_ready_written
    }
}

/// Execute `plan` under `root`. `opened` maps each module's manifest path to its open file.
pub fn execute(
    root: &Root,
    plan: &LoadPlan,
    opened: &BTreeMap<PathBuf, OpenedModule>,
    kernel: &mut dyn Kernel,
) -> Result<LoadReport, LoadError> {
    preflight(root, plan)?;
    let mut report = LoadReport::default();

    if let Some(firmware) = plan.firmware.as_ref().filter(|f| f.change) {
        kernel
            .write_sysfs(&root.join(FIRMWARE_PATH), &firmware.path.to_string_lossy())
            .map_err(LoadError::Firmware)?;
        report.firmware_path_set = true;
    }

    modprobe_all(&plan.os_modules, kernel, &mut report)?;

    for step in &plan.modules {
        if step.action == ModuleAction::AlreadyLoaded {
            report.already_loaded.push(step.name.clone());
            continue;
        }
        let module = opened
            .get(&step.relative_path)
            .ok_or_else(|| LoadError::NotOpened(step.relative_path.clone()))?;
        let result = load_one(step, module, kernel, &mut report.module_init_micros);
        match result {
            Ok(true) => report.loaded.push(step.name.clone()),
            Ok(false) => report.already_loaded.push(step.name.clone()),
            Err(e) => {
                // Leave the kernel as it was: unload what this run loaded, newest first.
                for name in report.loaded.iter().rev() {
                    if let Err(undo) = kernel.delete_module(name) {
                        warn!(MODULE = %name, error = %undo, "could not unload after a failed load");
                    }
                }
                return Err(e);
            }
        }
    }

    modprobe_all(&plan.os_modules_after, kernel, &mut report)?;

    let loaded: Vec<&str> = plan.modules.iter().map(|m| m.name.as_str()).collect();
    let proc_devices = read_to_string_or_empty(&root.join("/proc/devices"));
    for node in device_nodes(root, &loaded, &proc_devices)? {
        if ensure_node(root, &node, kernel)? {
            report.nodes_created.push(node.path.clone());
        }
    }
    // Read again now that the modules are loaded: the driver lists its capabilities then.
    let cap_nodes = caps::read_nodes(root, &plan.imex_channels)?;
    report
        .nodes_created
        .extend(ensure_cap_nodes(root, &cap_nodes, kernel)?);

    report.driver_root = plan.driver_root.root();
    match &plan.driver_root {
        DriverRootStep::Mount {
            source,
            path,
            replaces_other,
        } => {
            let target = root.join(path);
            let fail = |cause: String| LoadError::DriverRoot {
                path: path.clone(),
                cause,
            };
            if *replaces_other {
                kernel.unmount(&target).map_err(|e| fail(e.to_string()))?;
            }
            match fs::symlink_metadata(&target) {
                Ok(meta) if !meta.is_dir() => {
                    return Err(fail(
                        "it exists and is not a directory; remove it or set driver.root".into(),
                    ))
                }
                Ok(_) => {}
                Err(_) => fs::create_dir_all(&target).map_err(|e| fail(e.to_string()))?,
            }
            kernel
                .bind_mount_readonly(&root.join(source), &target)
                .map_err(|e| fail(e.to_string()))?;
            report.driver_root_mounted = true;
        }
        DriverRootStep::AlreadyMounted { .. } | DriverRootStep::HostRoot => {}
    }

    if let Some((config, value)) = plan.toolkit.write() {
        let change = toolkit::apply_cli_root(root, config, value)?;
        report.toolkit_changed = change != toolkit::RootChange::Unchanged;
    }

    let ready = DriverReady::for_driver_root(&report.driver_root.to_string_lossy());
    report.driver_ready_written =
        driver_ready::write_driver_ready(root, &plan.driver_ready, &ready)?;
    Ok(report)
}

/// `modprobe` each OS module still to load. One that is not required (a softdep) and fails is
/// logged and skipped, as kmod ignores a softdep's failure (`kmod_module_probe_insert_module`).
fn modprobe_all(
    steps: &[OsModuleStep],
    kernel: &mut dyn Kernel,
    report: &mut LoadReport,
) -> Result<(), LoadError> {
    for step in steps {
        if step.action != OsModuleAction::Modprobe {
            continue;
        }
        match kernel.modprobe(&step.name) {
            Ok(()) => report.os_modules_loaded.push(step.name.clone()),
            Err(cause) if !step.required => {
                warn!(MODULE = %step.name, error = %cause, "optional OS module ({}) not loaded", step.reason);
            }
            Err(cause) => {
                return Err(LoadError::OsModule {
                    name: step.name.clone(),
                    cause,
                })
            }
        }
    }
    Ok(())
}

/// Check what can be checked before the first syscall, so a broken driver root or toolkit
/// config is refused with the host untouched rather than after the modules are in.
fn preflight(root: &Root, plan: &LoadPlan) -> Result<(), LoadError> {
    if let DriverRootStep::Mount { path, .. } = &plan.driver_root {
        if let Ok(meta) = fs::symlink_metadata(root.join(path)) {
            if !meta.is_dir() {
                return Err(LoadError::DriverRoot {
                    path: path.clone(),
                    cause: "it exists and is not a directory; remove it or set driver.root".into(),
                });
            }
        }
    }
    if let Some((config, value)) = plan.toolkit.write() {
        toolkit::plan_cli_root(root, config, value)?;
    }
    Ok(())
}

/// Load one module. `Ok(false)`: the kernel already had it (a race with another loader).
fn load_one(
    step: &crate::kmod::plan::ModuleStep,
    module: &OpenedModule,
    kernel: &mut dyn Kernel,
    module_init_micros: &mut u64,
) -> Result<bool, LoadError> {
    let decompressed;
    let image = match step.action {
        ModuleAction::LoadDecompressed => {
            decompressed = decompress(&step.file, &module.file, step.compression)?;
            ModuleImage::Decompressed(&decompressed)
        }
        _ => ModuleImage::File {
            file: &module.file,
            compressed: step.compression != Compression::None,
        },
    };
    let load = ModuleLoad {
        name: &step.name,
        path: &step.file,
        image,
        params: &step.parameters,
        version: step.version.as_deref(),
        vermagic: &module.vermagic,
        signed: module.signed,
    };
    let started = Instant::now();
    let result = kernel.load_module(&load);
    *module_init_micros += u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Ok(()) => {
            let syscall = load.image.syscall();
            info!(
                MODULE = %step.name,
                DRIVER_VERSION = step.version.as_deref().unwrap_or(""),
                SYSCALL = syscall,
                "loaded {} with {syscall}",
                step.name
            );
            Ok(true)
        }
        Err(e) if e.errno == Errno::EEXIST => Ok(false),
        // Only nvidia's own init probes for GPUs; ENODEV from another module is a failure.
        Err(cause) if is_no_gpu(&step.name, cause.errno) => Err(LoadError::NoGpu {
            module: step.name.clone(),
            path: step.file.clone(),
            cause: Box::new(cause),
        }),
        Err(cause) => Err(LoadError::Refused {
            module: step.name.clone(),
            path: step.file.clone(),
            hint: refusal_hint(cause.errno),
            cause: Box::new(cause),
        }),
    }
}

/// `finit_module` of `module` failing with `errno` means "no NVIDIA GPU": the `nvidia` module's
/// init (`nvidia_init_module` → `nv_drivers_init` found no device) returns `-ENODEV`.
pub fn is_no_gpu(module: &str, errno: Errno) -> bool {
    module == "nvidia" && errno == Errno::ENODEV
}

fn refusal_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOEXEC => "it was built for another kernel or is not a valid module",
        Errno::EKEYREJECTED | Errno::EKEYEXPIRED | Errno::ENOKEY => {
            "its signature is not trusted by this kernel"
        }
        Errno::EPERM => {
            "the kernel forbids loading it (lockdown, signature policy, or missing CAP_SYS_MODULE)"
        }
        Errno::ENOENT => "a symbol it needs is missing: a dependency is not loaded",
        Errno::EINVAL => "a module parameter is invalid",
        Errno::EBUSY => "the module is busy initialising",
        _ => "the kernel returned an error",
    }
}

/// The module image of a file compressed in a way the kernel cannot undo.
fn decompress(path: &Path, file: &File, compression: Compression) -> Result<Vec<u8>, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let mut bytes = Vec::new();
    let mut reader = file;
    reader.rewind().map_err(io)?;
    reader.read_to_end(&mut bytes).map_err(io)?;
    modinfo::decompress(&bytes, compression, modinfo::MAX_MODULE_SIZE).map_err(|cause| {
        LoadError::Decompress {
            path: path.to_path_buf(),
            cause,
        }
    })
}

fn read_to_string_or_empty(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// The device nodes the loaded modules (kernel spelling) need, with `/proc/devices`' text: the
/// GPU, control, modeset and UVM nodes ([`nodes_for`], GPU minors from procfs) and the NVSwitch
/// nodes ([`devices::nvswitch_nodes`]). The load makes them; readiness checks them.
pub fn device_nodes(
    root: &Root,
    loaded: &[&str],
    proc_devices: &str,
) -> Result<Vec<DeviceNode>, devices::DeviceError> {
    let mut nodes = nodes_for(loaded, proc_devices, &gpu_minors(root))?;
    nodes.extend(devices::nvswitch_nodes(proc_devices, nvswitch_count(root)));
    Ok(nodes)
}

/// How many NVSwitches the driver probed: the entries of `/proc/driver/nvidia-nvswitch/devices`
/// (one directory per switch, named by its PCI address; procfs_nvswitch.c).
fn nvswitch_count(root: &Root) -> usize {
    fs::read_dir(root.join("/proc/driver/nvidia-nvswitch/devices"))
        .map(|entries| entries.flatten().count())
        .unwrap_or(0)
}

/// GPU minors from `/proc/driver/nvidia/gpus/*/information`.
fn gpu_minors(root: &Root) -> Vec<u32> {
    let dir = root.join("/proc/driver/nvidia/gpus");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut minors: Vec<u32> = entries
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("information")).ok())
        .filter_map(|text| devices::parse_gpu_minor(&text))
        .collect();
    minors.sort_unstable();
    minors
}

/// Make the capability nodes as nvidia-modprobe's `nvidia_cap_mknod` and `mknod_helper` do
/// (see [`crate::kmod::caps`]); returns the nodes made or replaced.
pub fn ensure_cap_nodes(
    root: &Root,
    nodes: &[CapNode],
    kernel: &mut dyn Kernel,
) -> Result<Vec<PathBuf>, LoadError> {
    let mut made = Vec::new();
    for node in nodes {
        if let Some(dir) = node.path.parent() {
            ensure_caps_dir(root, dir, kernel)?;
        }
        if ensure_cap_node(root, node, kernel)? {
            made.push(node.path.clone());
        }
    }
    Ok(made)
}

/// `/dev/nvidia-caps` (or the IMEX channels' directory): made 0755 and, when made here, chmod
/// 0755 and chown 0:0 (`nvidia_cap_mknod`); an existing one is left as it is.
fn ensure_caps_dir(root: &Root, dir: &Path, kernel: &mut dyn Kernel) -> Result<(), LoadError> {
    let path = root.join(dir);
    match fs::create_dir(&path) {
        Ok(()) => kernel
            .set_owner_mode(&path, 0, 0, caps::CAPS_DIR_MODE)
            .map_err(|cause| LoadError::Node {
                path: dir.to_path_buf(),
                cause,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(LoadError::Io { path, error }),
    }
}

/// One capability node: left alone when the driver says `DeviceFileModify: 0`; otherwise made
/// (or replaced when its numbers are wrong) and given its mode and owner. Returns whether it
/// was made.
fn ensure_cap_node(
    root: &Root,
    node: &CapNode,
    kernel: &mut dyn Kernel,
) -> Result<bool, LoadError> {
    let path = root.join(&node.path);
    let link = PathBuf::from(format!("/dev/char/{}:{}", node.major, node.minor));
    let link_target = Path::new("..").join(node.path.strip_prefix("/dev").unwrap_or(&node.path));
    if !node.modify {
        // `mknod_helper` with modification off only links an existing node.
        if path.exists() {
            ensure_char_link(root, &link, &link_target)?;
        }
        return Ok(false);
    }
    let fail = |cause| LoadError::Node {
        path: node.path.clone(),
        cause,
    };
    let made = match kernel.node_state(&path).map_err(fail)? {
        NodeState::CharDevice { major, minor } if major == node.major && minor == node.minor => {
            false
        }
        NodeState::Missing => true,
        NodeState::CharDevice { .. } | NodeState::Other => {
            fs::remove_file(&path).map_err(|error| LoadError::Io {
                path: path.clone(),
                error,
            })?;
            true
        }
    };
    if made {
        kernel
            .mknod_char(&path, node.major, node.minor, node.mode)
            .map_err(fail)?;
    }
    if made || kernel.node_owner_mode(&path).map_err(fail)? != (node.mode, node.uid, node.gid) {
        kernel
            .set_owner_mode(&path, node.uid, node.gid, node.mode)
            .map_err(fail)?;
    }
    ensure_char_link(root, &link, &link_target)?;
    Ok(made)
}

/// Make `node` exist with the right numbers, and its `/dev/char` link. Returns whether it
/// created the node.
fn ensure_node(root: &Root, node: &DeviceNode, kernel: &mut dyn Kernel) -> Result<bool, LoadError> {
    let path = root.join(&node.path);
    let fail = |cause| LoadError::Node {
        path: node.path.clone(),
        cause,
    };
    let created = match kernel.node_state(&path).map_err(fail)? {
        NodeState::CharDevice { major, minor } if major == node.major && minor == node.minor => {
            false
        }
        NodeState::Missing => {
            kernel
                .mknod_char(&path, node.major, node.minor, node.mode)
                .map_err(fail)?;
            true
        }
        NodeState::CharDevice { .. } | NodeState::Other => {
            // A stale node (another major after a reload) or a stray file: replace it.
            fs::remove_file(&path).map_err(|e| LoadError::Io {
                path: path.clone(),
                error: e,
            })?;
            kernel
                .mknod_char(&path, node.major, node.minor, node.mode)
                .map_err(fail)?;
            true
        }
    };
    let (link, target) = node.char_link();
    ensure_char_link(root, &link, &target)?;
    Ok(created)
}

/// The `/dev/char/MAJOR:MINOR` link udev (and nvidia-modprobe's `symlink_char_dev`) makes.
fn ensure_char_link(root: &Root, link: &Path, target: &Path) -> Result<(), LoadError> {
    let link = root.join(link);
    if fs::read_link(&link).ok().as_deref() != Some(target) {
        if let Some(parent) = link.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::remove_file(&link);
        symlink(target, &link).map_err(|e| LoadError::Io {
            path: link.clone(),
            error: e,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmod::sys::{Call, SimulatedKernel};

    fn step(name: &str, required: bool) -> OsModuleStep {
        OsModuleStep {
            name: name.into(),
            action: OsModuleAction::Modprobe,
            reason: "test".into(),
            required,
        }
    }

    /// A softdep that modprobe cannot load is skipped (kmod ignores a softdep's failure); a
    /// required OS module that it cannot load fails the load.
    #[test]
    fn only_required_os_modules_fail_the_load() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write("/proc/sys/kernel/osrelease", "6.1.0\n");
        write("/proc/modules", "");
        write("/usr/lib/modules/6.1.0/modules.dep", "kernel/drm.ko:\n");
        let mut kernel = SimulatedKernel::new(root.clone());
        let mut report = LoadReport::default();
        let steps = [step("absent", false), step("drm", true)];
        modprobe_all(&steps, &mut kernel, &mut report).unwrap();
        assert_eq!(report.os_modules_loaded, ["drm"]);
        assert_eq!(
            kernel.calls,
            [
                Call::Modprobe {
                    name: "absent".into()
                },
                Call::Modprobe { name: "drm".into() }
            ]
        );
        let err = modprobe_all(&[step("absent", true)], &mut kernel, &mut report).unwrap_err();
        assert!(
            matches!(err, LoadError::OsModule { ref name, .. } if name == "absent"),
            "{err}"
        );
    }
}

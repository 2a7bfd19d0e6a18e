//! The load plan: pure. From the settings, the host's facts, the kernel's state, the chosen
//! overlay and what its modules say of themselves, decide everything `load` will do, in
//! order, or refuse with what to do instead. `nvdriver-agent plan` prints it; `load`
//! executes it ([`crate::kmod::execute`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Settings;
use crate::host::kernel::{normalize_module_name, KernelState};
use crate::host::HostFacts;
use crate::modinfo::{vermagic_release, Compression, ModInfo};
use crate::overlay::manifest::{module_stem, Flavor};
use crate::overlay::StoredOverlay;

/// One overlay module file, opened and inspected at the edge.
#[derive(Debug)]
pub struct InspectedModule {
    /// The manifest path (relative to the overlay).
    pub relative_path: PathBuf,
    pub info: ModInfo,
}

/// What is mounted at a path, compared with the overlay we want there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountState {
    NotMounted,
    /// The wanted overlay is mounted there.
    Wanted,
    /// Something else is.
    Other,
}

/// The container toolkit config as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolkitState {
    Absent,
    Present { root: Option<String> },
}

pub struct PlanInputs<'a> {
    pub settings: &'a Settings,
    pub host: &'a HostFacts,
    pub kernel: &'a KernelState,
    pub overlay: &'a StoredOverlay,
    pub modules: &'a [InspectedModule],
    pub toolkit: ToolkitState,
    /// What is mounted at the driver root now.
    pub driver_root_mount: MountState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleAction {
    /// `finit_module` on the file; the kernel decompresses it when it is compressed.
    Load,
    /// The kernel cannot decompress this format: decompress into a memfd, then load that.
    LoadDecompressed,
    /// Already loaded at this version: left alone.
    AlreadyLoaded,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleStep {
    /// The kernel's spelling (`nvidia_uvm`).
    pub name: String,
    /// Host path of the file.
    pub file: PathBuf,
    #[serde(skip)]
    pub relative_path: PathBuf,
    pub version: Option<String>,
    pub depends: Vec<String>,
    pub parameters: String,
    pub compression: Compression,
    pub signed: bool,
    pub action: ModuleAction,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OsModuleAction {
    Modprobe,
    AlreadyLoaded,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OsModuleStep {
    pub name: String,
    pub action: OsModuleAction,
    /// Why it is loaded: configured, or named in an overlay module's `depends=`.
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FirmwareStep {
    /// Host path handed to `firmware_class.path`.
    pub path: PathBuf,
    pub current: String,
    pub change: bool,
}

/// Where a node's major comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MajorSource {
    Fixed(u32),
    /// Registered at load time; read from `/proc/devices` under this name.
    ProcDevices(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeSpec {
    /// `/dev/nvidia{minor}` stands for one node per GPU.
    pub path: String,
    pub major: MajorSource,
    /// `None`: one per GPU, minors from `/proc/driver/nvidia/gpus/*/information`.
    pub minor: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum DriverRootStep {
    /// The overlay has user space: bind it read-only at `path`.
    Mount {
        source: PathBuf,
        path: PathBuf,
        /// Something else is mounted there now and is unmounted first.
        replaces_other: bool,
    },
    AlreadyMounted {
        source: PathBuf,
        path: PathBuf,
    },
    /// Kernel modules only: the driver's user space is the host's own, root `/`.
    HostRoot,
}

impl DriverRootStep {
    /// The driver root the toolkit and the GPU Operator are told about.
    pub fn root(&self) -> PathBuf {
        match self {
            DriverRootStep::Mount { path, .. } | DriverRootStep::AlreadyMounted { path, .. } => {
                path.clone()
            }
            DriverRootStep::HostRoot => PathBuf::from("/"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "change")]
pub enum ToolkitStep {
    Unchanged {
        config: PathBuf,
        root: String,
    },
    Set {
        config: PathBuf,
        root: String,
        previous: Option<String>,
    },
    Create {
        config: PathBuf,
        root: String,
    },
    /// `toolkit.manage = false`.
    NotManaged,
}

impl ToolkitStep {
    /// The config file and the root value to write, when this step writes.
    pub fn write(&self) -> Option<(&Path, &str)> {
        match self {
            ToolkitStep::Set { config, root, .. } | ToolkitStep::Create { config, root } => {
                Some((config, root))
            }
            ToolkitStep::Unchanged { .. } | ToolkitStep::NotManaged => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadPlan {
    pub kernel_release: String,
    pub arch: String,
    pub overlay: PathBuf,
    pub driver_version: String,
    pub flavor: Flavor,
    pub firmware: Option<FirmwareStep>,
    pub os_modules: Vec<OsModuleStep>,
    /// In load order.
    pub modules: Vec<ModuleStep>,
    pub device_nodes: Vec<NodeSpec>,
    pub driver_root: DriverRootStep,
    pub toolkit: ToolkitStep,
    pub driver_ready: PathBuf,
    pub warnings: Vec<String>,
}

impl LoadPlan {
    /// Nothing to do: every module loaded, firmware path set, driver root in place.
    pub fn modules_all_loaded(&self) -> bool {
        self.modules
            .iter()
            .all(|m| m.action == ModuleAction::AlreadyLoaded)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("overlay {overlay} is for {found} but this machine is {expected}; stage the {expected} build")]
    WrongArch {
        overlay: PathBuf,
        expected: String,
        found: String,
    },
    #[error("module {path} was built for kernel {found:?} (vermagic) but the target kernel is {expected:?}; use an overlay built for {expected}")]
    WrongKernel {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} is named for module {file_name} but its .modinfo says it is {claimed}; the overlay is inconsistent, rebuild it")]
    NameMismatch {
        path: PathBuf,
        file_name: String,
        claimed: String,
    },
    #[error("overlay {overlay} has two files for module {name}: {first} and {second}")]
    DuplicateModule {
        overlay: PathBuf,
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("module {name} is configured (driver.modules) but overlay {overlay} has no {name}.ko*; it has: {available}")]
    NotInOverlay {
        name: String,
        overlay: PathBuf,
        available: String,
    },
    #[error("module {module} depends on {dependency}, which is neither in the overlay nor in the OS's modules for kernel {kernel_release}; install it or use an overlay that carries it")]
    MissingDependency {
        module: String,
        dependency: String,
        kernel_release: String,
    },
    #[error("the overlay's modules depend on each other in a cycle: {cycle}; the overlay is broken, rebuild it")]
    DependencyCycle { cycle: String },
    #[error("nouveau is {state}; the NVIDIA driver cannot take the GPU while it does. The shipped /usr/lib/modprobe.d/nvdriver-agent.conf blacklists it: reboot, or unbind it (echo ADDR > /sys/bus/pci/drivers/nouveau/unbind; rmmod nouveau)")]
    Nouveau { state: String },
    #[error("{reason} and these modules are unsigned: {modules}; the kernel would refuse them. Sign them with a key the kernel trusts (MOK/secure boot db) or use signed precompiled modules")]
    Unsigned { reason: String, modules: String },
    #[error("{name} is loaded at version {loaded} but the overlay has {wanted}; the running driver must be unloaded first (stop GPU workloads, `modprobe -r {name}`) or reboot")]
    OtherVersionLoaded {
        name: String,
        loaded: String,
        wanted: String,
    },
}

/// Build the plan.
pub fn plan_load(inputs: &PlanInputs<'_>) -> Result<LoadPlan, PlanError> {
    let PlanInputs {
        settings,
        host,
        kernel,
        overlay,
        modules,
        ..
    } = inputs;
    let manifest = &overlay.manifest;
    let mut warnings = Vec::new();

    if manifest.arch != host.arch {
        return Err(PlanError::WrongArch {
            overlay: overlay.dir.clone(),
            expected: host.arch.clone(),
            found: manifest.arch.clone(),
        });
    }
    let by_name = index_modules(modules, overlay, host)?;
    let (wanted, mut os_needed) = wanted_modules(&by_name, inputs)?;
    let order = dependency_order(&wanted, &by_name, &settings.modules)?;
    check_nouveau(kernel)?;
    let steps = module_steps(&order, &by_name, inputs, &mut warnings)?;
    check_signatures(kernel, &steps)?;
    let os_modules = os_module_steps(settings, kernel, &mut os_needed);

    let firmware = manifest.has_firmware().then(|| {
        let path = overlay.dir.join("usr/lib/firmware");
        FirmwareStep {
            change: Path::new(&kernel.firmware_path) != path,
            current: kernel.firmware_path.clone(),
            path,
        }
    });
    if firmware.is_none() && manifest.flavor == Flavor::Open {
        warnings.push(
            "the overlay carries no firmware; the open modules need GSP firmware from the OS's /usr/lib/firmware/nvidia".into(),
        );
    }
    let driver_root = driver_root_step(inputs);
    let toolkit = toolkit_step(inputs, &driver_root);

    Ok(LoadPlan {
        kernel_release: host.kernel_release.clone(),
        arch: host.arch.clone(),
        overlay: overlay.dir.clone(),
        driver_version: manifest.driver_version.clone(),
        flavor: manifest.flavor,
        firmware,
        os_modules,
        device_nodes: node_specs(&order),
        modules: steps,
        driver_root,
        toolkit,
        driver_ready: settings.driver_ready.clone(),
        warnings,
    })
}

/// Index the overlay's modules by kernel spelling, checking each against the kernel.
fn index_modules<'m>(
    modules: &'m [InspectedModule],
    overlay: &StoredOverlay,
    host: &HostFacts,
) -> Result<BTreeMap<String, &'m InspectedModule>, PlanError> {
    let mut by_name: BTreeMap<String, &InspectedModule> = BTreeMap::new();
    for module in modules.iter() {
        let host_path = overlay.dir.join(&module.relative_path);
        let release = vermagic_release(&module.info.vermagic);
        if release != host.kernel_release {
            return Err(PlanError::WrongKernel {
                path: host_path,
                found: module.info.vermagic.clone(),
                expected: host.kernel_release.clone(),
            });
        }
        let file_name = module
            .relative_path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(module_stem)
            .unwrap_or_default();
        let name = normalize_module_name(file_name);
        if normalize_module_name(&module.info.name) != name {
            return Err(PlanError::NameMismatch {
                path: host_path,
                file_name: file_name.to_string(),
                claimed: module.info.name.clone(),
            });
        }
        if let Some(first) = by_name.insert(name.clone(), module) {
            return Err(PlanError::DuplicateModule {
                overlay: overlay.dir.clone(),
                name,
                first: first.relative_path.clone(),
                second: module.relative_path.clone(),
            });
        }
    }
    Ok(by_name)
}

/// The configured modules and, transitively, their overlay dependencies; also the OS modules
/// their `depends=` names, each with the reason it is needed.
fn wanted_modules(
    by_name: &BTreeMap<String, &InspectedModule>,
    inputs: &PlanInputs<'_>,
) -> Result<(Vec<String>, BTreeMap<String, String>), PlanError> {
    let (kernel, overlay) = (inputs.kernel, inputs.overlay);
    let mut wanted: Vec<String> = Vec::new();
    let mut os_needed: BTreeMap<String, String> = BTreeMap::new();
    let mut queue: Vec<String> = inputs
        .settings
        .modules
        .iter()
        .map(|m| normalize_module_name(m))
        .collect();
    for name in &queue {
        if !by_name.contains_key(name) {
            return Err(PlanError::NotInOverlay {
                name: name.replace('_', "-"),
                overlay: overlay.dir.clone(),
                available: by_name.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
    }
    while let Some(name) = queue.pop() {
        if wanted.contains(&name) {
            continue;
        }
        let module = by_name[&name];
        for dependency in &module.info.depends {
            let dependency = normalize_module_name(dependency);
            if by_name.contains_key(&dependency) {
                queue.push(dependency);
            } else if kernel.os_modules.contains(&dependency)
                || kernel.loaded.contains_key(&dependency)
            {
                os_needed
                    .entry(dependency)
                    .or_insert_with(|| format!("depends= of {name}"));
            } else {
                return Err(PlanError::MissingDependency {
                    module: name.clone(),
                    dependency,
                    kernel_release: inputs.host.kernel_release.clone(),
                });
            }
        }
        wanted.push(name);
    }
    Ok((wanted, os_needed))
}

/// nouveau loaded or bound to a device is a conflict on the host.
fn check_nouveau(kernel: &KernelState) -> Result<(), PlanError> {
    if kernel.nouveau_bound.is_empty() && !kernel.loaded.contains_key("nouveau") {
        return Ok(());
    }
    let state = if kernel.nouveau_bound.is_empty() {
        "loaded".to_string()
    } else {
        format!("bound to {}", kernel.nouveau_bound.join(", "))
    };
    Err(PlanError::Nouveau { state })
}

/// One step per module in load order: load, load decompressed here, or already loaded.
fn module_steps(
    order: &[String],
    by_name: &BTreeMap<String, &InspectedModule>,
    inputs: &PlanInputs<'_>,
    warnings: &mut Vec<String>,
) -> Result<Vec<ModuleStep>, PlanError> {
    let (settings, kernel, overlay) = (inputs.settings, inputs.kernel, inputs.overlay);
    let mut steps = Vec::new();
    for name in order {
        let module = by_name[name];
        let info = &module.info;
        let action = module_action(kernel, name, info)?;
        let parameters = settings.module_params(name);
        for (param, _) in settings.parameters.get(name).into_iter().flatten() {
            if !info.parameters.is_empty() && !info.parameters.iter().any(|(p, _)| p == param) {
                warnings.push(format!(
                    "parameter {param} is configured for {name} but the module does not declare it; the kernel will ignore it"
                ));
            }
        }
        steps.push(ModuleStep {
            name: name.clone(),
            file: overlay.dir.join(&module.relative_path),
            relative_path: module.relative_path.clone(),
            version: info.version.clone(),
            depends: info.depends.clone(),
            parameters,
            compression: info.compression,
            signed: info.signature.is_some(),
            action,
        });
    }
    Ok(steps)
}

/// What to do with one module given what the kernel has loaded and can decompress.
fn module_action(
    kernel: &KernelState,
    name: &str,
    info: &ModInfo,
) -> Result<ModuleAction, PlanError> {
    Ok(match kernel.loaded.get(name) {
        Some(loaded) => {
            if loaded.version.is_some() && info.version.is_some() && loaded.version != info.version
            {
                return Err(PlanError::OtherVersionLoaded {
                    name: name.to_string(),
                    loaded: loaded.version.clone().unwrap_or_default(),
                    wanted: info.version.clone().unwrap_or_default(),
                });
            }
            ModuleAction::AlreadyLoaded
        }
        None if info.compression == Compression::None => ModuleAction::Load,
        None if kernel.compression.contains(&info.compression) => ModuleAction::Load,
        None => ModuleAction::LoadDecompressed,
    })
}

/// Under signature enforcement or lockdown, every module still to load must be signed.
fn check_signatures(kernel: &KernelState, steps: &[ModuleStep]) -> Result<(), PlanError> {
    let enforcing = if kernel.sig_enforce {
        Some("module signatures are enforced (module.sig_enforce=1)".to_string())
    } else {
        kernel
            .lockdown
            .as_ref()
            .map(|mode| format!("kernel lockdown is {mode}"))
    };
    let Some(reason) = enforcing else {
        return Ok(());
    };
    let unsigned: Vec<_> = steps
        .iter()
        .filter(|s| !s.signed && s.action != ModuleAction::AlreadyLoaded)
        .map(|s| s.name.clone())
        .collect();
    if unsigned.is_empty() {
        return Ok(());
    }
    Err(PlanError::Unsigned {
        reason,
        modules: unsigned.join(", "),
    })
}

/// OS prerequisites: the configured ones where the OS has them, then `depends=` ones.
fn os_module_steps(
    settings: &Settings,
    kernel: &KernelState,
    os_needed: &mut BTreeMap<String, String>,
) -> Vec<OsModuleStep> {
    let mut os_modules = Vec::new();
    let mut seen = BTreeSet::new();
    for name in &settings.os_modules {
        let normalized = normalize_module_name(name);
        if kernel.os_modules.contains(&normalized) || kernel.loaded.contains_key(&normalized) {
            os_needed.remove(&normalized);
            if seen.insert(normalized.clone()) {
                os_modules.push(os_step(kernel, &normalized, "driver.os-modules".into()));
            }
        }
    }
    for (name, reason) in std::mem::take(os_needed) {
        if seen.insert(name.clone()) {
            os_modules.push(os_step(kernel, &name, reason));
        }
    }
    os_modules
}

/// Where the driver root is: the overlay bind-mounted (it has user space) or the host's `/`.
fn driver_root_step(inputs: &PlanInputs<'_>) -> DriverRootStep {
    let overlay = inputs.overlay;
    if !overlay.manifest.has_userspace() {
        return DriverRootStep::HostRoot;
    }
    let path = inputs.settings.driver_root.clone();
    match inputs.driver_root_mount {
        MountState::Wanted => DriverRootStep::AlreadyMounted {
            source: overlay.dir.clone(),
            path,
        },
        state => DriverRootStep::Mount {
            source: overlay.dir.clone(),
            path,
            replaces_other: state == MountState::Other,
        },
    }
}

/// What happens to the toolkit's `[nvidia-container-cli] root`.
fn toolkit_step(inputs: &PlanInputs<'_>, driver_root: &DriverRootStep) -> ToolkitStep {
    let settings = inputs.settings;
    let root_text = driver_root.root().to_string_lossy().into_owned();
    let config = settings.toolkit_config.clone();
    if !settings.manage_toolkit {
        return ToolkitStep::NotManaged;
    }
    match &inputs.toolkit {
        ToolkitState::Absent => ToolkitStep::Create {
            config,
            root: root_text,
        },
        ToolkitState::Present { root } if root.as_deref() == Some(root_text.as_str()) => {
            ToolkitStep::Unchanged {
                config,
                root: root_text,
            }
        }
        ToolkitState::Present { root } => ToolkitStep::Set {
            config,
            root: root_text,
            previous: root.clone(),
        },
    }
}

fn os_step(kernel: &KernelState, name: &str, reason: String) -> OsModuleStep {
    OsModuleStep {
        name: name.to_string(),
        action: if kernel.loaded.contains_key(name) {
            OsModuleAction::AlreadyLoaded
        } else {
            OsModuleAction::Modprobe
        },
        reason,
    }
}

/// Topological order (dependencies first). Ties go to the configured order, then the name, so
/// the plan is the same on every run.
fn dependency_order(
    wanted: &[String],
    by_name: &BTreeMap<String, &InspectedModule>,
    configured: &[String],
) -> Result<Vec<String>, PlanError> {
    let wanted_set: BTreeSet<&String> = wanted.iter().collect();
    let rank = |name: &String| {
        configured
            .iter()
            .position(|c| normalize_module_name(c) == *name)
            .unwrap_or(usize::MAX)
    };
    let mut remaining: BTreeMap<&String, BTreeSet<String>> = wanted
        .iter()
        .map(|name| {
            let deps = by_name[name]
                .info
                .depends
                .iter()
                .map(|d| normalize_module_name(d))
                .filter(|d| wanted_set.contains(d) && d != name)
                .collect();
            (name, deps)
        })
        .collect();
    // A module that names itself in depends= is a cycle of one.
    if let Some(name) = wanted.iter().find(|n| {
        by_name[*n]
            .info
            .depends
            .iter()
            .any(|d| normalize_module_name(d) == **n)
    }) {
        return Err(PlanError::DependencyCycle {
            cycle: format!("{name} -> {name}"),
        });
    }
    let mut order = Vec::new();
    while !remaining.is_empty() {
        let mut ready: Vec<&String> = remaining
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(name, _)| *name)
            .collect();
        if ready.is_empty() {
            let cycle: Vec<&str> = remaining.keys().map(|s| s.as_str()).collect();
            return Err(PlanError::DependencyCycle {
                cycle: cycle.join(", "),
            });
        }
        ready.sort_by_key(|name| (rank(name), (*name).clone()));
        let next = ready[0].clone();
        remaining.remove(&next);
        for deps in remaining.values_mut() {
            deps.remove(&next);
        }
        order.push(next);
    }
    Ok(order)
}

fn node_specs(order: &[String]) -> Vec<NodeSpec> {
    use crate::kmod::devices::{NVIDIACTL_MINOR, NVIDIA_MAJOR, NVIDIA_MODESET_MINOR};
    let has = |n: &str| order.iter().any(|m| m == n);
    let mut specs = Vec::new();
    if has("nvidia") {
        specs.push(NodeSpec {
            path: "/dev/nvidiactl".into(),
            major: MajorSource::Fixed(NVIDIA_MAJOR),
            minor: Some(NVIDIACTL_MINOR),
        });
        specs.push(NodeSpec {
            path: "/dev/nvidia{minor}".into(),
            major: MajorSource::Fixed(NVIDIA_MAJOR),
            minor: None,
        });
        if has("nvidia_modeset") {
            specs.push(NodeSpec {
                path: "/dev/nvidia-modeset".into(),
                major: MajorSource::Fixed(NVIDIA_MAJOR),
                minor: Some(NVIDIA_MODESET_MINOR),
            });
        }
    }
    if has("nvidia_uvm") {
        for (path, minor) in [("/dev/nvidia-uvm", 0), ("/dev/nvidia-uvm-tools", 1)] {
            specs.push(NodeSpec {
                path: path.into(),
                major: MajorSource::ProcDevices("nvidia-uvm".into()),
                minor: Some(minor),
            });
        }
    }
    specs
}

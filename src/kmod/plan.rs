//! The load plan: pure. From the settings, the host's facts, the kernel's state, the chosen
//! overlay and what its modules say of themselves, decide everything `load` will do, in
//! order, or refuse with what to do instead. `nvdriver-agent plan` prints it; `load`
//! executes it ([`crate::kmod::execute`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Settings;
use crate::host::kernel::{normalize_module_name, KernelState};
use crate::host::keyring::{self, KeyTrust};
use crate::host::HostFacts;
use crate::modinfo::{vermagic_release, Compression, ModInfo};
use crate::overlay::manifest::{module_stem, Flavor};
use crate::overlay::StoredOverlay;

/// One overlay module file, opened and inspected at the edge.
#[derive(Debug)]
pub struct InspectedModule {
    /// The manifest path (relative to the overlay).
    pub relative_path: PathBuf,
    /// What its `.modinfo` and signature trailer say.
    pub info: ModInfo,
}

/// What is mounted at a path, compared with the overlay we want there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountState {
    /// Nothing is mounted there.
    NotMounted,
    /// The wanted overlay is mounted there.
    Wanted,
    /// Something else is.
    Other,
}

/// The container toolkit config as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolkitState {
    /// The config file does not exist (the plan creates it).
    Absent,
    /// The config file exists.
    Present {
        /// `[nvidia-container-cli] root`, `None` when unset.
        root: Option<String>,
    },
}

/// Everything [`plan_load`] decides from, gathered at the edge (`boot::load::prepare_load`).
pub struct PlanInputs<'a> {
    /// The effective configuration.
    pub settings: &'a Settings,
    /// The running kernel's release, the architecture and os-release.
    pub host: &'a HostFacts,
    /// What the kernel has loaded and enforces now.
    pub kernel: &'a KernelState,
    /// The store's overlay for the running kernel (its `dir` is a host path).
    pub overlay: &'a StoredOverlay,
    /// Every module file of the overlay, opened and inspected.
    pub modules: &'a [InspectedModule],
    /// The container toolkit's config as it is now.
    pub toolkit: ToolkitState,
    /// What is mounted at the driver root now.
    pub driver_root_mount: MountState,
}

/// What the load does with one overlay module.
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

/// One overlay module to load (or leave alone), in load order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleStep {
    /// The kernel's spelling (`nvidia_uvm`).
    pub name: String,
    /// Host path of the file.
    pub file: PathBuf,
    /// The manifest path (relative to the overlay); keys the opened files handed to execute.
    #[serde(skip)]
    pub relative_path: PathBuf,
    /// `version=` from `.modinfo` (the driver version), if any.
    pub version: Option<String>,
    /// `depends=` from `.modinfo`, as modpost spells it (hyphens possible), then the overlay
    /// modules it needs by symbol that `depends=` does not name (kernel spelling).
    pub depends: Vec<String>,
    /// Parameters passed to `finit_module`: the configured ones, `key=value key=value`.
    pub parameters: String,
    /// How the file is compressed.
    pub compression: Compression,
    /// Whether the file carries a module signature.
    pub signed: bool,
    /// What the load does with it.
    pub action: ModuleAction,
}

/// What the load does with an OS module the driver needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OsModuleAction {
    /// Not loaded yet: load it with the system's `modprobe`.
    Modprobe,
    /// Already in `/proc/modules`: left alone.
    AlreadyLoaded,
}

/// An OS prerequisite module (from the OS's own module tree, not the overlay).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OsModuleStep {
    /// The kernel's spelling (underscores).
    pub name: String,
    /// What the load does with it.
    pub action: OsModuleAction,
    /// Why it is loaded: configured, or named in an overlay module's `depends=`.
    pub reason: String,
}

/// Pointing the kernel's `firmware_class.path` at the overlay's firmware.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FirmwareStep {
    /// Host path handed to `firmware_class.path`.
    pub path: PathBuf,
    /// `firmware_class.path` as it is now (empty when unset); it is replaced, not appended to.
    pub current: String,
    /// Whether `current` differs from `path`, i.e. the load writes the parameter.
    pub change: bool,
}

/// Where a node's major comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MajorSource {
    /// A fixed major (NVIDIA's 195).
    Fixed(u32),
    /// Registered at load time; read from `/proc/devices` under this name.
    ProcDevices(String),
}

/// A `/dev` node the load creates, as `nvdriver-agent plan` shows it (execute derives the real
/// nodes from `/proc/devices`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeSpec {
    /// `/dev/nvidia{minor}` stands for one node per GPU.
    pub path: String,
    /// Where its major comes from.
    pub major: MajorSource,
    /// `None`: one per GPU, minors from `/proc/driver/nvidia/gpus/*/information`.
    pub minor: Option<u32>,
}

/// How the driver root (what the toolkit and GPU Operator see as the driver's `/`) is provided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum DriverRootStep {
    /// The overlay has user space: bind it read-only at `path`.
    Mount {
        /// The overlay's top directory (host path): the mount source.
        source: PathBuf,
        /// The configured driver root (host path, `driver.root`): the mount point.
        path: PathBuf,
        /// Something else is mounted there now and is unmounted first.
        replaces_other: bool,
    },
    /// The overlay is already bind-mounted at the driver root: nothing to do.
    AlreadyMounted {
        /// The overlay's top directory (host path).
        source: PathBuf,
        /// The configured driver root (host path).
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

/// What the load does to the container toolkit's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "change")]
pub enum ToolkitStep {
    /// `[nvidia-container-cli] root` already names the driver root: nothing to write.
    Unchanged {
        /// The toolkit's `config.toml` (host path).
        config: PathBuf,
        /// The driver root it names.
        root: String,
    },
    /// The config exists with another `root` (or none): set it.
    Set {
        /// The toolkit's `config.toml` (host path).
        config: PathBuf,
        /// The driver root to write.
        root: String,
        /// The value it replaces, `None` when unset.
        previous: Option<String>,
    },
    /// The config does not exist: create it with `root` set.
    Create {
        /// The toolkit's `config.toml` (host path).
        config: PathBuf,
        /// The driver root to write.
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

/// Everything `load` will do for the running kernel, in order; printed by `nvdriver-agent plan`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadPlan {
    /// The running kernel's release (every module's vermagic matches it).
    pub kernel_release: String,
    /// The machine's architecture (the overlay's matches it).
    pub arch: String,
    /// The overlay's top directory (host path).
    pub overlay: PathBuf,
    /// The overlay's driver version, from its manifest.
    pub driver_version: String,
    /// Open or proprietary modules, from the manifest.
    pub flavor: Flavor,
    /// Set `firmware_class.path`; `None` when the overlay carries no firmware.
    pub firmware: Option<FirmwareStep>,
    /// OS modules to `modprobe` first: configured (`driver.os-modules`) ones, then `depends=` ones.
    pub os_modules: Vec<OsModuleStep>,
    /// In load order.
    pub modules: Vec<ModuleStep>,
    /// The device nodes the modules need, for display (execute computes its own from
    /// `/proc/devices`).
    pub device_nodes: Vec<NodeSpec>,
    /// How the driver root is provided.
    pub driver_root: DriverRootStep,
    /// What happens to the toolkit's config.
    pub toolkit: ToolkitStep,
    /// Host path of the GPU Operator's `driver-ready` file to write.
    pub driver_ready: PathBuf,
    /// Non-fatal findings (unknown module parameters, open modules without firmware), logged by
    /// `load`.
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

/// Why the load cannot be planned; each message says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The overlay is for another CPU architecture.
    #[error("overlay {overlay} is for {found} but this machine is {expected}; stage the {expected} build")]
    WrongArch {
        /// The overlay's top directory (host path).
        overlay: PathBuf,
        /// This machine's architecture.
        expected: String,
        /// The manifest's architecture.
        found: String,
    },
    /// A module's vermagic names another kernel than the running one.
    #[error("module {path} was built for kernel {found:?} (vermagic) but the target kernel is {expected:?}; use an overlay built for {expected}")]
    WrongKernel {
        /// The module file (host path).
        path: PathBuf,
        /// The module's whole vermagic.
        found: String,
        /// The running kernel's release.
        expected: String,
    },
    /// A module's `.modinfo` `name=` differs from its file name.
    #[error("{path} is named for module {file_name} but its .modinfo says it is {claimed}; the overlay is inconsistent, rebuild it")]
    NameMismatch {
        /// The module file (host path).
        path: PathBuf,
        /// The name from the file name, as in the file (hyphens kept).
        file_name: String,
        /// The `name=` the module claims.
        claimed: String,
    },
    /// Two files of the overlay are the same module (e.g. `nvidia.ko` and `nvidia.ko.xz`).
    #[error("overlay {overlay} has two files for module {name}: {first} and {second}")]
    DuplicateModule {
        /// The overlay's top directory (host path).
        overlay: PathBuf,
        /// The module name (underscores).
        name: String,
        /// The first file (relative to the overlay).
        first: PathBuf,
        /// The second file (relative to the overlay).
        second: PathBuf,
    },
    /// A module configured in `driver.modules` has no file in the overlay.
    #[error("module {name} is configured (driver.modules) but overlay {overlay} has no {name}.ko*; it has: {available}")]
    NotInOverlay {
        /// The configured module (hyphen spelling).
        name: String,
        /// The overlay's top directory (host path).
        overlay: PathBuf,
        /// The modules the overlay has, comma-separated (underscores).
        available: String,
    },
    /// A wanted module's `depends=` names a module neither in the overlay, nor the OS's tree, nor
    /// loaded.
    #[error("module {module} depends on {dependency}, which is neither in the overlay nor in the OS's modules for kernel {kernel_release}; install it or use an overlay that carries it")]
    MissingDependency {
        /// The module that depends (underscores).
        module: String,
        /// The dependency (underscores).
        dependency: String,
        /// The running kernel's release whose module tree was searched.
        kernel_release: String,
    },
    /// The wanted modules' `depends=` form a cycle (a module naming itself included).
    #[error("the overlay's modules depend on each other in a cycle: {cycle}; the overlay is broken, rebuild it")]
    DependencyCycle {
        /// `a -> a` for a self-dependency, else every module left unordered, comma-separated.
        cycle: String,
    },
    /// nouveau is loaded or bound to a GPU, so the NVIDIA driver cannot take it.
    #[error("nouveau is {state}; the NVIDIA driver cannot take the GPU while it does. The shipped /usr/lib/modprobe.d/nvdriver-agent.conf blacklists it: reboot, or unbind it (echo ADDR > /sys/bus/pci/drivers/nouveau/unbind; rmmod nouveau)")]
    Nouveau {
        /// `loaded`, or `bound to <PCI addresses>`.
        state: String,
    },
    /// Signatures are enforced (`sig_enforce` or lockdown) and modules still to load are unsigned.
    #[error("{reason} and these modules are unsigned: {modules}; the kernel would refuse them. Sign them with a key the kernel trusts (MOK/secure boot db) or use signed precompiled modules")]
    Unsigned {
        /// What enforces signatures (`sig_enforce`, or the lockdown mode).
        reason: String,
        /// The unsigned modules still to load, comma-separated.
        modules: String,
    },
    /// Signatures are enforced and a module still to load is signed by a key the kernel does
    /// not trust (none of the keys in its trusted keyrings can be the signer).
    #[error("{reason} and these modules are signed by keys the kernel does not trust: {modules}; it trusts {trusted}. The kernel would refuse them: enroll the signing key (`mokutil --import CERT.der`, confirm at the next boot) or use modules signed by one of the trusted keys")]
    UntrustedKey {
        /// What enforces signatures (`sig_enforce`, or the lockdown mode).
        reason: String,
        /// Each untrusted module with its signer's name and key id, `, `-separated.
        modules: String,
        /// The trusted keyring and its keys (name, id and id kind).
        trusted: String,
    },
    /// A module is loaded at another `version=` than the overlay's (both versions known).
    #[error("{name} is loaded at version {loaded} but the overlay has {wanted}; the running driver must be unloaded first (stop GPU workloads, `modprobe -r {name}`) or reboot")]
    OtherVersionLoaded {
        /// The module (underscores).
        name: String,
        /// The loaded version (`/sys/module/<name>/version`).
        loaded: String,
        /// The overlay module's version.
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
    let needs = overlay_dependencies(&by_name);
    let (wanted, mut os_needed) = wanted_modules(&by_name, &needs, inputs)?;
    let order = dependency_order(&wanted, &needs)?;
    check_nouveau(kernel)?;
    let steps = module_steps(&order, &by_name, &needs, inputs, &mut warnings)?;
    check_signatures(kernel, &steps, &by_name, &mut warnings)?;
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
    needs: &BTreeMap<String, BTreeSet<String>>,
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
        queue.extend(needs[&name].iter().cloned());
        for dependency in &module.info.depends {
            let dependency = normalize_module_name(dependency);
            if by_name.contains_key(&dependency) {
                continue;
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
    needs: &BTreeMap<String, BTreeSet<String>>,
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
            depends: depends_with_derived(&info.depends, &needs[name]),
            parameters,
            compression: info.compression,
            signed: info.signature.is_some(),
            action,
        });
    }
    Ok(steps)
}

/// `depends=` as declared, then the overlay modules derived from symbols that it does not name.
fn depends_with_derived(declared: &[String], needs: &BTreeSet<String>) -> Vec<String> {
    let mut depends = declared.to_vec();
    for need in needs {
        if !declared.iter().any(|d| normalize_module_name(d) == *need) {
            depends.push(need.clone());
        }
    }
    depends
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

/// Under signature enforcement or lockdown, every module still to load must be signed, by a
/// key the kernel trusts (as far as `/proc/keys` can tell: [`keyring::signer_trust`]; what it
/// cannot tell becomes a warning, the kernel decides).
fn check_signatures(
    kernel: &KernelState,
    steps: &[ModuleStep],
    by_name: &BTreeMap<String, &InspectedModule>,
    warnings: &mut Vec<String>,
) -> Result<(), PlanError> {
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
    let to_load = || {
        steps
            .iter()
            .filter(|s| s.action != ModuleAction::AlreadyLoaded)
    };
    let unsigned: Vec<_> = to_load()
        .filter(|s| !s.signed)
        .map(|s| s.name.clone())
        .collect();
    if !unsigned.is_empty() {
        return Err(PlanError::Unsigned {
            reason,
            modules: unsigned.join(", "),
        });
    }
    let Some(trusted) = &kernel.trusted_keys else {
        return Ok(());
    };
    let (mut untrusted, mut platform) = (Vec::new(), false);
    for step in to_load() {
        let Some(signature) = by_name
            .get(&step.name)
            .and_then(|m| m.info.signature.as_ref())
        else {
            continue;
        };
        match keyring::signer_trust(signature, trusted) {
            KeyTrust::Trusted(_) => {}
            KeyTrust::NotTrusted(why) => {
                platform |= why.contains(keyring::PLATFORM);
                untrusted.push(format!("{} ({})", step.name, keyring::describe_signer(signature)));
            }
            KeyTrust::CannotTell(why) => warnings.push(format!(
                "cannot tell whether the kernel trusts the key that signed {}: {why}; the kernel decides at load time",
                step.name
            )),
        }
    }
    if untrusted.is_empty() {
        return Ok(());
    }
    Err(PlanError::UntrustedKey {
        reason,
        modules: untrusted.join(", "),
        trusted: format!(
            "{} [{}]{}",
            trusted.keyring,
            keyring::list(&trusted.keys),
            if platform {
                " (a signing key is in .platform, which the kernel uses for kexec and IMA, not for modules)"
            } else {
                ""
            }
        ),
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
/// What each overlay module needs loaded before it, among the overlay's modules: its
/// `depends=`, and, as depmod derives `modules.dep`, every module that exports a symbol it
/// leaves undefined. `depends=` alone misses what modpost did not see: a real nvidia-drm or
/// nvidia-peermem built in its own Kbuild pass carries an empty one while calling into
/// nvidia-modeset or nvidia.
fn overlay_dependencies(
    by_name: &BTreeMap<String, &InspectedModule>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut exporter: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, module) in by_name {
        for symbol in &module.info.exports {
            exporter.entry(symbol.as_str()).or_insert(name.as_str());
        }
    }
    by_name
        .iter()
        .map(|(name, module)| {
            let declared = module
                .info
                .depends
                .iter()
                .map(|d| normalize_module_name(d))
                .filter(|d| by_name.contains_key(d));
            let derived = module
                .info
                .imports
                .iter()
                .filter_map(|symbol| exporter.get(symbol.as_str()))
                .map(|exporter| exporter.to_string())
                .filter(|exporter| exporter != name);
            (name.clone(), declared.chain(derived).collect())
        })
        .collect()
}

/// NVIDIA's own load order, for modules that do not depend on each other: what their
/// installer and `nvidia-modprobe` do. Others follow, by name.
const NVIDIA_ORDER: [&str; 5] = [
    "nvidia",
    "nvidia_modeset",
    "nvidia_uvm",
    "nvidia_drm",
    "nvidia_peermem",
];

/// `wanted` in an order where every module follows what it needs (`needs`); ties in
/// [`NVIDIA_ORDER`], not in the order a user happened to list them.
fn dependency_order(
    wanted: &[String],
    needs: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Vec<String>, PlanError> {
    let wanted_set: BTreeSet<&String> = wanted.iter().collect();
    let rank = |name: &String| {
        NVIDIA_ORDER
            .iter()
            .position(|n| n == name)
            .unwrap_or(NVIDIA_ORDER.len())
    };
    // A module that needs itself is a cycle of one.
    if let Some(name) = wanted.iter().find(|n| needs[*n].contains(*n)) {
        return Err(PlanError::DependencyCycle {
            cycle: format!("{name} -> {name}"),
        });
    }
    let mut remaining: BTreeMap<&String, BTreeSet<String>> = wanted
        .iter()
        .map(|name| {
            let deps = needs[name]
                .iter()
                .filter(|d| wanted_set.contains(d))
                .cloned()
                .collect();
            (name, deps)
        })
        .collect();
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

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
use crate::host::modprobe::{self, ModprobeConfig, Softdep, MODULES_SOFTDEP};
use crate::host::HostFacts;
use crate::kmod::caps::CapNode;
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
    /// What `modprobe` would apply: `modprobe.d` options and softdeps, the kernel command line.
    pub modprobe: &'a ModprobeConfig,
    /// The capability nodes procfs lists now ([`crate::kmod::caps::read_nodes`]), or why they
    /// cannot be worked out (shown as a warning).
    pub caps_nodes: Result<Vec<CapNode>, String>,
}

/// What the load does with one overlay module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleAction {
    /// `finit_module` on the file; the kernel decompresses it when it is compressed.
    Load,
    /// The kernel cannot decompress this format: decompress it here and hand the kernel the
    /// image (`init_module(2)`).
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
    /// Parameters passed to `finit_module`, as `modprobe` would pass them: the `options` lines of
    /// `modprobe.d`, then `<module>.<param>=` of `/proc/cmdline`, then `[parameters]` of the
    /// agent's config; the kernel takes the last value of a repeated parameter.
    pub parameters: String,
    /// Each parameter of [`ModuleStep::parameters`], in order, with where it came from.
    pub parameter_sources: Vec<ParameterSource>,
    /// How the file is compressed.
    pub compression: Compression,
    /// Whether the file carries a module signature.
    pub signed: bool,
    /// What the load does with it.
    pub action: ModuleAction,
}

/// One module parameter and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParameterSource {
    /// The parameter's name.
    pub name: String,
    /// Its value as the kernel reads it (quotes removed); `None` for a bare `name`.
    pub value: Option<String>,
    /// A `modprobe.d` file's host path, `/proc/cmdline`, or `config` (`[parameters]`).
    pub source: String,
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
    /// Why it is loaded: configured, named in an overlay module's `depends=`, exporting a symbol
    /// an overlay module uses (`modules.symbols`), or a softdep.
    pub reason: String,
    /// Whether the load fails when `modprobe` does; softdeps are not required (kmod ignores
    /// their errors: `kmod_module_probe_insert_module`).
    pub required: bool,
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
    /// OS modules to `modprobe` first: configured (`driver.os-modules`) ones, then those the
    /// overlay's modules need (`depends=`, their symbols, softdep `pre:`), by name.
    pub os_modules: Vec<OsModuleStep>,
    /// In load order.
    pub modules: Vec<ModuleStep>,
    /// OS modules to `modprobe` after the overlay's modules: softdep `post:` ones.
    pub os_modules_after: Vec<OsModuleStep>,
    /// The device nodes the modules need, for display (execute computes its own from
    /// `/proc/devices`).
    pub device_nodes: Vec<NodeSpec>,
    /// The MIG and IMEX capability nodes, from `/proc/driver/nvidia/capabilities` and
    /// `/proc/devices` as they are now: empty before `nvidia` is loaded (execute reads procfs
    /// again after loading).
    pub caps_nodes: Vec<CapNode>,
    /// `driver.imex-channels`: the IMEX channel nodes to make.
    pub imex_channels: Vec<u32>,
    /// How the driver root is provided.
    pub driver_root: DriverRootStep,
    /// What happens to the toolkit's config.
    pub toolkit: ToolkitStep,
    /// Host path of the GPU Operator's `driver-ready` file to write.
    pub driver_ready: PathBuf,
    /// Non-fatal findings (unknown module parameters, open modules without firmware, modules
    /// left out because the kernel command line blacklists them), logged by `load`.
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
    /// Every configured module is blacklisted on the kernel command line, itself or a module it
    /// needs.
    #[error("the kernel command line blacklists {modules} ({how}) and every module in driver.modules is or needs one of them, so nothing is loaded; remove the blacklist from the kernel command line to load the driver")]
    Blacklisted {
        /// The blacklisted modules the configured ones need, comma-separated.
        modules: String,
        /// `modprobe.blacklist=` or `module_blacklist=`, and that it is in `/proc/cmdline`.
        how: String,
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
    let softdeps = resolve_softdeps(&by_name, inputs);
    let mut wanted = wanted_modules(&by_name, &needs, &softdeps, inputs, &mut warnings)?;
    let order = dependency_order(&wanted.modules, &wanted.order_after)?;
    check_nouveau(kernel)?;
    let steps = module_steps(&order, &by_name, &needs, inputs, &mut warnings)?;
    check_signatures(kernel, &steps, &by_name, &mut warnings)?;
    let os_modules = os_module_steps(settings, kernel, &mut wanted.os_before);
    let os_modules_after = std::mem::take(&mut wanted.os_after)
        .into_iter()
        .filter(|(name, _)| !os_modules.iter().any(|m| &m.name == name))
        .map(|(name, need)| os_step(kernel, &name, need))
        .collect();

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
        caps_nodes: caps_nodes(inputs, &mut warnings),
        imex_channels: settings.imex_channels.clone(),
        modules: steps,
        os_modules_after,
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

/// Why an OS module is loaded, and whether the load fails without it.
#[derive(Clone, Debug)]
struct OsNeed {
    reason: String,
    required: bool,
}

impl OsNeed {
    fn required(reason: String) -> Self {
        OsNeed {
            reason,
            required: true,
        }
    }
}

/// Record that `name` is needed; a required need replaces a softdep's.
fn need_os(needs: &mut BTreeMap<String, OsNeed>, name: String, need: OsNeed) {
    match needs.get(&name) {
        Some(old) if old.required || !need.required => {}
        _ => {
            needs.insert(name, need);
        }
    }
}

/// The softdep that applies to one overlay module, its names resolved.
#[derive(Debug, Default)]
struct ResolvedSoftdep {
    /// Overlay modules to load before / after it.
    pre_overlay: Vec<String>,
    post_overlay: Vec<String>,
    /// OS modules to modprobe before / after it.
    pre_os: Vec<String>,
    post_os: Vec<String>,
    /// Where the softdep came from.
    source: String,
}

/// For each overlay module, the softdep `modprobe` would apply to it
/// ([`ModprobeConfig::softdep_for`]: `modprobe.d`, and its own first `softdep=`, which depmod
/// writes to `modules.softdep`). A name that is neither an overlay module nor one of the OS's
/// is dropped without a word, as kmod's `lookup_dep` drops it: that is what becomes of the
/// open modules' own `MODULE_SOFTDEP("pre: ecdh_generic,ecdsa_generic")`, whose comma kmod
/// does not split on (`kmod_config_add_softdep` splits on whitespace), so `modprobe nvidia`
/// loads neither; the kernel's crypto API requests them itself when first used, by the
/// `crypto-ecdh`-style aliases `MODULE_ALIAS_CRYPTO` gives them (crypto/api.c).
fn resolve_softdeps(
    by_name: &BTreeMap<String, &InspectedModule>,
    inputs: &PlanInputs<'_>,
) -> BTreeMap<String, ResolvedSoftdep> {
    let kernel = inputs.kernel;
    let mut out = BTreeMap::new();
    for (name, module) in by_name {
        let own = module.info.softdeps.first().map(|value| {
            let source = format!("softdep= of {name}");
            modprobe::parse_softdep(name, value, MODULES_SOFTDEP, &source)
        });
        let Some(softdep): Option<&Softdep> = inputs.modprobe.softdep_for(name, own.as_ref())
        else {
            continue;
        };
        let mut resolved = ResolvedSoftdep {
            source: softdep.source.clone(),
            ..ResolvedSoftdep::default()
        };
        for (names, overlay, os) in [
            (
                &softdep.pre,
                &mut resolved.pre_overlay,
                &mut resolved.pre_os,
            ),
            (
                &softdep.post,
                &mut resolved.post_overlay,
                &mut resolved.post_os,
            ),
        ] {
            for dep in names.iter().map(|d| normalize_module_name(d)) {
                if by_name.contains_key(&dep) {
                    overlay.push(dep);
                } else if kernel.os_modules.contains(&dep) || kernel.loaded.contains_key(&dep) {
                    os.push(dep);
                }
            }
        }
        out.insert(name.clone(), resolved);
    }
    out
}

/// What the load needs, found from the configured modules.
struct Wanted {
    /// Overlay modules to load, in discovery order.
    modules: Vec<String>,
    /// What each overlay module is loaded after: what it needs, its softdep `pre:` overlay
    /// modules, and the modules whose softdep `post:` names it.
    order_after: BTreeMap<String, BTreeSet<String>>,
    /// OS modules to modprobe before the overlay's, with why.
    os_before: BTreeMap<String, OsNeed>,
    /// OS modules to modprobe after (softdep `post:`).
    os_after: BTreeMap<String, OsNeed>,
}

/// The modules blacklisted on the kernel command line, each with how.
///
/// `modprobe.blacklist=` is kmod's (`kcmdline_parse_result`), and `modprobe nvidia` itself
/// would ignore it: kmod applies blacklists to aliases only unless `-b`
/// (`KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY` in tools/modprobe.c). But the agent loads at boot
/// from configuration, as systemd-modules-load does, and that applies it
/// (`KMOD_PROBE_APPLY_BLACKLIST`): an operator who puts `modprobe.blacklist=nvidia` on the
/// kernel command line means "do not load it", and is obeyed. `module_blacklist=` is the
/// kernel's own: it refuses those modules whoever loads them (kernel/module/main.c
/// `blacklisted()`). `blacklist` lines of `modprobe.d` apply to aliases only, and the agent
/// names modules: they are ignored, as `modprobe <name>` ignores them.
fn cmdline_blacklist(config: &ModprobeConfig) -> BTreeMap<&str, &'static str> {
    let mut out = BTreeMap::new();
    for name in &config.kernel_blacklist {
        out.insert(name.as_str(), "module_blacklist= in /proc/cmdline");
    }
    for name in &config.cmdline_blacklist {
        out.insert(name.as_str(), "modprobe.blacklist= in /proc/cmdline");
    }
    out
}

/// The blacklisted modules among `name` and what it needs, transitively, each with how.
fn blocked_needs<'b>(
    name: &str,
    needs: &BTreeMap<String, BTreeSet<String>>,
    blocked: &BTreeMap<&'b str, &'b str>,
) -> Vec<(&'b str, &'b str)> {
    // Nothing blacklisted (the usual case): no closure to walk. Called once per configured
    // module, so walking it anyway made planning cubic in a chain of modules (bench/scaling).
    if blocked.is_empty() {
        return Vec::new();
    }
    let mut closure = vec![name.to_string()];
    let mut seen: BTreeSet<String> = closure.iter().cloned().collect();
    let mut i = 0;
    while i < closure.len() {
        for need in &needs[&closure[i]] {
            if seen.insert(need.clone()) {
                closure.push(need.clone());
            }
        }
        i += 1;
    }
    closure
        .iter()
        .filter_map(|m| blocked.get_key_value(m.as_str()))
        .map(|(m, how)| (*m, *how))
        .collect()
}

/// The configured modules without those the kernel command line blacklists (themselves or a
/// module they need); refuses when none is left.
fn unblocked_configured(
    configured: Vec<String>,
    needs: &BTreeMap<String, BTreeSet<String>>,
    blocked: &BTreeMap<&str, &str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>, PlanError> {
    let mut kept = Vec::new();
    let mut hits: BTreeMap<&str, &str> = BTreeMap::new();
    for name in configured {
        let blocking = blocked_needs(&name, needs, blocked);
        if blocking.is_empty() {
            kept.push(name);
            continue;
        }
        for (module, how) in blocking {
            hits.insert(module, how);
            warnings.push(format!(
                "{name} is not loaded: {} is blacklisted ({how})",
                module
            ));
        }
    }
    if kept.is_empty() && !hits.is_empty() {
        let how: BTreeSet<&str> = hits.values().copied().collect();
        return Err(PlanError::Blacklisted {
            modules: hits.keys().copied().collect::<Vec<_>>().join(", "),
            how: how.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(kept)
}

/// The configured modules and, transitively, the overlay modules they need or name as
/// softdeps; the OS modules they need (`depends=`, symbols found in the OS's
/// `modules.symbols`, softdeps), each with the reason.
fn wanted_modules(
    by_name: &BTreeMap<String, &InspectedModule>,
    needs: &BTreeMap<String, BTreeSet<String>>,
    softdeps: &BTreeMap<String, ResolvedSoftdep>,
    inputs: &PlanInputs<'_>,
    warnings: &mut Vec<String>,
) -> Result<Wanted, PlanError> {
    let (kernel, overlay) = (inputs.kernel, inputs.overlay);
    let configured: Vec<String> = inputs
        .settings
        .modules
        .iter()
        .map(|m| normalize_module_name(m))
        .collect();
    for name in &configured {
        if !by_name.contains_key(name) {
            return Err(PlanError::NotInOverlay {
                name: name.replace('_', "-"),
                overlay: overlay.dir.clone(),
                available: by_name.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
    }
    let blocked = cmdline_blacklist(inputs.modprobe);
    let mut queue = unblocked_configured(configured, needs, &blocked, warnings)?;
    let exported: BTreeSet<&str> = by_name
        .values()
        .flat_map(|m| m.info.exports.iter().map(String::as_str))
        .collect();
    let mut wanted = Wanted {
        modules: Vec::new(),
        order_after: needs.clone(),
        os_before: BTreeMap::new(),
        os_after: BTreeMap::new(),
    };
    let mut taken: BTreeSet<String> = BTreeSet::new();
    while let Some(name) = queue.pop() {
        if taken.contains(&name) {
            continue;
        }
        // Only a softdep reaches a module that is, or needs, a blacklisted one here (the
        // configured ones and what they need were checked): it is optional.
        if let Some((module, how)) = blocked_needs(&name, needs, &blocked).first() {
            warnings.push(format!(
                "softdep module {name} is not loaded: {module} is blacklisted ({how})"
            ));
            continue;
        }
        let module = by_name[&name];
        queue.extend(needs[&name].iter().cloned());
        os_depends(&name, module, by_name, inputs, &mut wanted.os_before)?;
        // Symbols no overlay module exports: an OS module's (depmod's `modules.symbols`), or,
        // when listed nowhere, the kernel image's own (vmlinux exports are not in it).
        for symbol in &module.info.imports {
            if exported.contains(symbol.as_str()) {
                continue;
            }
            if let Some(os_module) = kernel.os_symbols.get(symbol) {
                let reason = format!("symbol {symbol} of {name}");
                need_os(
                    &mut wanted.os_before,
                    os_module.clone(),
                    OsNeed::required(reason),
                );
            }
        }
        if let Some(softdep) = softdeps.get(&name) {
            apply_softdep(&name, softdep, &mut wanted, &mut queue);
        }
        taken.insert(name.clone());
        wanted.modules.push(name);
    }
    Ok(wanted)
}

/// The OS modules `name`'s `depends=` names; a name nowhere is refused.
fn os_depends(
    name: &str,
    module: &InspectedModule,
    by_name: &BTreeMap<String, &InspectedModule>,
    inputs: &PlanInputs<'_>,
    os_needed: &mut BTreeMap<String, OsNeed>,
) -> Result<(), PlanError> {
    let kernel = inputs.kernel;
    for dependency in &module.info.depends {
        let dependency = normalize_module_name(dependency);
        if by_name.contains_key(&dependency) {
            continue;
        } else if kernel.os_modules.contains(&dependency) || kernel.loaded.contains_key(&dependency)
        {
            need_os(
                os_needed,
                dependency,
                OsNeed::required(format!("depends= of {name}")),
            );
        } else {
            return Err(PlanError::MissingDependency {
                module: name.to_string(),
                dependency,
                kernel_release: inputs.host.kernel_release.clone(),
            });
        }
    }
    Ok(())
}

/// A softdep as modprobe applies it (`__kmod_module_fill_softdep`): `pre:` modules before the
/// module, `post:` ones after; neither is required (their failures are ignored).
fn apply_softdep(
    name: &str,
    softdep: &ResolvedSoftdep,
    wanted: &mut Wanted,
    queue: &mut Vec<String>,
) {
    for pre in &softdep.pre_overlay {
        wanted
            .order_after
            .entry(name.to_string())
            .or_default()
            .insert(pre.clone());
        queue.push(pre.clone());
    }
    for post in &softdep.post_overlay {
        wanted
            .order_after
            .entry(post.clone())
            .or_default()
            .insert(name.to_string());
        queue.push(post.clone());
    }
    let need = |when: &str| OsNeed {
        reason: format!("softdep {when} of {name} ({})", softdep.source),
        required: false,
    };
    for pre in &softdep.pre_os {
        need_os(&mut wanted.os_before, pre.clone(), need("pre:"));
    }
    for post in &softdep.post_os {
        need_os(&mut wanted.os_after, post.clone(), need("post:"));
    }
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
    let (kernel, overlay) = (inputs.kernel, inputs.overlay);
    let mut steps = Vec::new();
    for name in order {
        let module = by_name[name];
        let info = &module.info;
        let action = module_action(kernel, name, info)?;
        let (parameters, parameter_sources) = module_parameters(name, info, inputs, warnings);
        steps.push(ModuleStep {
            name: name.clone(),
            file: overlay.dir.join(&module.relative_path),
            relative_path: module.relative_path.clone(),
            version: info.version.clone(),
            depends: depends_with_derived(&info.depends, &needs[name]),
            parameters,
            parameter_sources,
            compression: info.compression,
            signed: info.signature.is_some(),
            action,
        });
    }
    Ok(steps)
}

/// The parameter string `modprobe` would hand the kernel for `name`, and each parameter's
/// source: `options` of `modprobe.d` and `/proc/cmdline` as written, concatenated in kmod's
/// order (`kmod_module_get_options`, then the command line last, `kmod_config_new`), then the
/// agent's `[parameters]`, quoted where the kernel's `next_arg()` needs it. A parameter set
/// twice reaches the kernel twice; `parse_args` sets it twice, so the last one counts.
fn module_parameters(
    name: &str,
    info: &ModInfo,
    inputs: &PlanInputs<'_>,
    warnings: &mut Vec<String>,
) -> (String, Vec<ParameterSource>) {
    let mut words: Vec<String> = Vec::new();
    let mut sources = Vec::new();
    for options in inputs.modprobe.options_for(name) {
        words.push(options.options.clone());
        for (param, value) in modprobe::split_params(&options.options) {
            sources.push(ParameterSource {
                name: param,
                value,
                source: options.source.clone(),
            });
        }
    }
    for (param, value) in inputs.settings.parameters.get(name).into_iter().flatten() {
        let value = value.to_string();
        words.push(modprobe::quote_param(param, &value));
        sources.push(ParameterSource {
            name: param.clone(),
            value: Some(value),
            source: "config".into(),
        });
    }
    // The kernel takes `-` and `_` alike in parameter names (kernel/params.c `parameq`).
    let declared = |p: &str| {
        let p = normalize_module_name(p);
        info.parameters
            .iter()
            .any(|(d, _)| normalize_module_name(d) == p)
    };
    for source in &sources {
        if !info.parameters.is_empty() && !declared(&source.name) {
            let (param, from) = (&source.name, &source.source);
            let from = if from == "config" {
                "the config"
            } else {
                from.as_str()
            };
            warnings.push(format!(
                "parameter {param} from {from} is set for {name} but the module does not declare it; the kernel will ignore it"
            ));
        }
    }
    (words.join(" "), sources)
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

/// OS prerequisites: the configured ones where the OS has them, then those the overlay's
/// modules need, by name.
fn os_module_steps(
    settings: &Settings,
    kernel: &KernelState,
    os_needed: &mut BTreeMap<String, OsNeed>,
) -> Vec<OsModuleStep> {
    let mut os_modules = Vec::new();
    let mut seen = BTreeSet::new();
    for name in &settings.os_modules {
        let normalized = normalize_module_name(name);
        if kernel.os_modules.contains(&normalized) || kernel.loaded.contains_key(&normalized) {
            os_needed.remove(&normalized);
            if seen.insert(normalized.clone()) {
                let need = OsNeed::required("driver.os-modules".into());
                os_modules.push(os_step(kernel, &normalized, need));
            }
        }
    }
    for (name, need) in std::mem::take(os_needed) {
        if seen.insert(name.clone()) {
            os_modules.push(os_step(kernel, &name, need));
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

fn os_step(kernel: &KernelState, name: &str, need: OsNeed) -> OsModuleStep {
    OsModuleStep {
        name: name.to_string(),
        action: if kernel.loaded.contains_key(name) {
            OsModuleAction::AlreadyLoaded
        } else {
            OsModuleAction::Modprobe
        },
        reason: need.reason,
        required: need.required,
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
    // Kahn's algorithm, always taking the first ready module in (NVIDIA's order, name): each
    // module and each edge is handled once (the earlier rescan of every remaining module per
    // step was quadratic: bench/scaling).
    let mut unmet: BTreeMap<&String, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
    for name in wanted {
        let deps: BTreeSet<&String> = needs[name]
            .iter()
            .filter_map(|d| wanted_set.get(d).copied())
            .collect();
        unmet.insert(name, deps.len());
        for dep in deps {
            dependents.entry(dep).or_default().push(name);
        }
    }
    let mut ready: BTreeSet<(usize, &String)> = unmet
        .iter()
        .filter(|(_, count)| **count == 0)
        .map(|(name, _)| (rank(name), *name))
        .collect();
    let mut order = Vec::new();
    while let Some((_, next)) = ready.pop_first() {
        unmet.remove(next);
        for dependent in dependents.get(next).into_iter().flatten() {
            let count = unmet.get_mut(dependent).expect("a wanted module");
            *count -= 1;
            if *count == 0 {
                ready.insert((rank(dependent), *dependent));
            }
        }
        order.push(next.clone());
    }
    if !unmet.is_empty() {
        let cycle: Vec<&str> = unmet.keys().map(|s| s.as_str()).collect();
        return Err(PlanError::DependencyCycle {
            cycle: cycle.join(", "),
        });
    }
    Ok(order)
}

fn caps_nodes(inputs: &PlanInputs<'_>, warnings: &mut Vec<String>) -> Vec<CapNode> {
    match &inputs.caps_nodes {
        Ok(nodes) => nodes.clone(),
        Err(e) => {
            warnings.push(format!("capability nodes: {e}"));
            Vec::new()
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::OsRelease;
    use crate::overlay::Manifest;

    const KVER: &str = "6.12.9-200.fc41.x86_64";

    fn settings(extra: &str) -> Settings {
        let layers = [
            (
                PathBuf::from("/usr/lib/nvdriver-agent/config.toml"),
                include_str!("../../dist/config.toml").to_string(),
            ),
            (
                PathBuf::from("/etc/nvdriver-agent/config.toml"),
                extra.to_string(),
            ),
        ];
        crate::config::merge_layers(&layers).unwrap()
    }

    fn module(name: &str, depends: &[&str], exports: &[&str], imports: &[&str]) -> InspectedModule {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        InspectedModule {
            relative_path: PathBuf::from(format!(
                "usr/lib/modules/{KVER}/extra/{}.ko",
                name.replace('_', "-")
            )),
            info: ModInfo {
                name: name.to_string(),
                vermagic: format!("{KVER} SMP preempt mod_unload "),
                depends: strings(depends),
                version: Some("580.95.05".into()),
                srcversion: None,
                license: Some("Dual MIT/GPL".into()),
                parameters: Vec::new(),
                signature: None,
                compression: Compression::None,
                exports: strings(exports),
                imports: strings(imports),
                softdeps: Vec::new(),
                machine: 62,
            },
        }
    }

    /// The open modules as built against a kernel with DRM and InfiniBand: nvidia-drm and
    /// nvidia-peermem carry an empty `depends=` and call into nvidia-modeset, nvidia, DRM and
    /// ib_core; `printk` is the kernel image's.
    fn nvidia_modules() -> Vec<InspectedModule> {
        vec![
            module(
                "nvidia",
                &[],
                &["nvidia_get_rm_ops", "nvidia_p2p_get_pages"],
                &["printk", "i2c_transfer"],
            ),
            module(
                "nvidia_modeset",
                &["nvidia"],
                &["nvKmsKapiGetFunctionsTable"],
                &["nvidia_get_rm_ops", "printk"],
            ),
            module("nvidia_uvm", &["nvidia"], &[], &["nvidia_get_rm_ops"]),
            module(
                "nvidia_drm",
                &[],
                &[],
                &[
                    "nvKmsKapiGetFunctionsTable",
                    "drm_dev_register",
                    "drm_atomic_helper_check",
                    "printk",
                ],
            ),
            module(
                "nvidia_peermem",
                &[],
                &[],
                &["nvidia_p2p_get_pages", "ib_register_peer_memory_client"],
            ),
        ]
    }

    fn kernel() -> KernelState {
        let mut kernel = KernelState::default();
        for m in [
            "i2c_core",
            "ipmi_msghandler",
            "drm",
            "drm_kms_helper",
            "ib_core",
            "ecdh_generic",
            "ecdsa_generic",
            "i2c_algo_bit",
            "crc32c",
            "sha256",
        ] {
            kernel.os_modules.insert(m.to_string());
        }
        for (symbol, module) in [
            ("i2c_transfer", "i2c_core"),
            ("drm_dev_register", "drm"),
            ("drm_atomic_helper_check", "drm_kms_helper"),
            ("ib_register_peer_memory_client", "ib_core"),
            // An OS build of nvidia-modeset: the overlay's own export comes first.
            ("nvKmsKapiGetFunctionsTable", "nvidia_modeset"),
        ] {
            kernel.os_symbols.insert(symbol.into(), module.into());
        }
        kernel
    }

    struct Case {
        settings: Settings,
        kernel: KernelState,
        modules: Vec<InspectedModule>,
        modprobe: ModprobeConfig,
    }

    impl Case {
        fn new(config: &str) -> Self {
            Case {
                settings: settings(config),
                kernel: kernel(),
                modules: nvidia_modules(),
                modprobe: ModprobeConfig::default(),
            }
        }

        fn plan(&self) -> Result<LoadPlan, PlanError> {
            let host = HostFacts {
                os: OsRelease::parse("ID=fedora\n", "/etc/os-release".into()).unwrap(),
                kernel_release: KVER.into(),
                arch: "x86_64".into(),
            };
            let overlay = StoredOverlay {
                dir: PathBuf::from(format!("/var/lib/nvdriver-agent/overlays/{KVER}/580.95.05")),
                manifest: Manifest {
                    format: 1,
                    kernel_release: KVER.into(),
                    driver_version: "580.95.05".into(),
                    arch: "x86_64".into(),
                    flavor: Flavor::Proprietary,
                    files: Vec::new(),
                    symlinks: Vec::new(),
                },
            };
            plan_load(&PlanInputs {
                settings: &self.settings,
                host: &host,
                kernel: &self.kernel,
                overlay: &overlay,
                modules: &self.modules,
                toolkit: ToolkitState::Absent,
                driver_root_mount: MountState::NotMounted,
                modprobe: &self.modprobe,
                caps_nodes: Ok(Vec::new()),
            })
        }

        fn module(&mut self, name: &str) -> &mut ModInfo {
            &mut self
                .modules
                .iter_mut()
                .find(|m| m.info.name == name)
                .unwrap()
                .info
        }
    }

    const ALL: &str = "[driver]\nmodules = [\"nvidia-peermem\", \"nvidia-drm\", \"nvidia-uvm\"]\n";

    fn names(plan: &LoadPlan) -> Vec<&str> {
        plan.modules.iter().map(|m| m.name.as_str()).collect()
    }

    fn os(steps: &[OsModuleStep]) -> Vec<(&str, &str, bool)> {
        steps
            .iter()
            .map(|m| (m.name.as_str(), m.reason.as_str(), m.required))
            .collect()
    }

    #[test]
    fn os_prerequisites_found_through_modules_symbols() {
        let plan = Case::new(ALL).plan().unwrap();
        assert_eq!(
            names(&plan),
            [
                "nvidia",
                "nvidia_modeset",
                "nvidia_uvm",
                "nvidia_drm",
                "nvidia_peermem"
            ]
        );
        assert_eq!(
            os(&plan.os_modules),
            [
                ("i2c_core", "driver.os-modules", true),
                ("ipmi_msghandler", "driver.os-modules", true),
                ("drm", "symbol drm_dev_register of nvidia_drm", true),
                (
                    "drm_kms_helper",
                    "symbol drm_atomic_helper_check of nvidia_drm",
                    true
                ),
                (
                    "ib_core",
                    "symbol ib_register_peer_memory_client of nvidia_peermem",
                    true
                ),
            ]
        );
        assert!(plan.os_modules_after.is_empty());
        // printk is listed nowhere: the kernel image's, not an error and not a step.
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    #[test]
    fn os_prerequisite_already_loaded_is_left_alone_and_unused_ones_are_not_loaded() {
        let mut case = Case::new("[driver]\nmodules = [\"nvidia-drm\"]\nos-modules = []\n");
        case.kernel.loaded.insert(
            "drm".into(),
            crate::host::kernel::LoadedModule {
                name: "drm".into(),
                version: None,
            },
        );
        let plan = case.plan().unwrap();
        let actions: Vec<_> = plan
            .os_modules
            .iter()
            .map(|m| (m.name.as_str(), m.action.clone()))
            .collect();
        // i2c_core is reached through nvidia's i2c_transfer; no ib_core without nvidia-peermem.
        assert_eq!(
            actions,
            [
                ("drm", OsModuleAction::AlreadyLoaded),
                ("drm_kms_helper", OsModuleAction::Modprobe),
                ("i2c_core", OsModuleAction::Modprobe),
            ]
        );
    }

    #[test]
    fn softdep_from_modinfo_and_modprobe_d() {
        let mut case = Case::new(ALL);
        // NVIDIA's own, with a comma kmod does not split on: a name nothing has, skipped.
        case.module("nvidia")
            .softdeps
            .push("pre: ecdh_generic,ecdsa_generic".into());
        // Spaces: two OS modules, loaded before, not required.
        case.module("nvidia_uvm")
            .softdeps
            .push("pre: crc32c   sha256 post: i2c_algo_bit no_such".into());
        // modprobe.d: uvm after drm (against NVIDIA's order), sorted before modules.softdep.
        case.modprobe.add_file(
            "50-nv.conf",
            "/etc/modprobe.d/50-nv.conf",
            "softdep nvidia_peermem pre: nvidia-drm\nsoftdep nvidia_drm post: nvidia-uvm\n",
        );
        let plan = case.plan().unwrap();
        assert_eq!(
            names(&plan),
            [
                "nvidia",
                "nvidia_modeset",
                "nvidia_drm",
                "nvidia_uvm",
                "nvidia_peermem"
            ]
        );
        let softdep_os: Vec<_> = os(&plan.os_modules)
            .into_iter()
            .filter(|(_, _, required)| !required)
            .collect();
        assert_eq!(
            softdep_os,
            [
                (
                    "crc32c",
                    "softdep pre: of nvidia_uvm (softdep= of nvidia_uvm)",
                    false
                ),
                (
                    "sha256",
                    "softdep pre: of nvidia_uvm (softdep= of nvidia_uvm)",
                    false
                ),
            ]
        );
        assert_eq!(
            os(&plan.os_modules_after),
            [(
                "i2c_algo_bit",
                "softdep post: of nvidia_uvm (softdep= of nvidia_uvm)",
                false
            )]
        );
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    #[test]
    fn modprobe_d_softdep_named_after_modules_softdep_loses_to_the_module_own() {
        let mut case = Case::new("[driver]\nmodules = [\"nvidia\"]\n");
        case.module("nvidia")
            .softdeps
            .push("pre: ecdh_generic".into());
        case.modprobe.add_file(
            "nvidia.conf",
            "/etc/modprobe.d/nvidia.conf",
            "softdep nvidia pre: i2c_algo_bit\n",
        );
        let plan = case.plan().unwrap();
        let softdep_os: Vec<_> = plan
            .os_modules
            .iter()
            .filter(|m| !m.required)
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(softdep_os, ["ecdh_generic"]);
    }

    #[test]
    fn parameters_in_modprobe_order_with_sources() {
        let mut case = Case::new(
            "[parameters.nvidia]\nNVreg_A = 3\nNVreg_C = \"p q\"\n[parameters.nvidia-uvm]\nuvm_x = true\n",
        );
        case.modprobe.add_file(
            "nvidia.conf",
            "/usr/lib/modprobe.d/nvidia.conf",
            "options nvidia NVreg_A=1 NVreg_B=\"x y\"\n",
        );
        case.modprobe
            .add_cmdline("quiet nvidia.NVreg_A=2 nvidia_uvm.uvm_y=1 rd.nvidia.x=1\n");
        case.module("nvidia").parameters.extend([
            ("NVreg_A".into(), "int".into()),
            ("NVreg_B".into(), "charp".into()),
        ]);
        let plan = case.plan().unwrap();
        let nvidia = &plan.modules[0];
        assert_eq!(
            nvidia.parameters,
            "NVreg_A=1 NVreg_B=\"x y\" NVreg_A=2 NVreg_A=3 NVreg_C=\"p q\""
        );
        let sources: Vec<_> = nvidia
            .parameter_sources
            .iter()
            .map(|p| (p.name.as_str(), p.value.as_deref(), p.source.as_str()))
            .collect();
        assert_eq!(
            sources,
            [
                ("NVreg_A", Some("1"), "/usr/lib/modprobe.d/nvidia.conf"),
                ("NVreg_B", Some("x y"), "/usr/lib/modprobe.d/nvidia.conf"),
                ("NVreg_A", Some("2"), "/proc/cmdline"),
                ("NVreg_A", Some("3"), "config"),
                ("NVreg_C", Some("p q"), "config"),
            ]
        );
        assert_eq!(plan.modules[2].parameters, "uvm_y=1 uvm_x=1");
        assert_eq!(
            plan.warnings,
            ["parameter NVreg_C from the config is set for nvidia but the module does not declare it; the kernel will ignore it"]
        );
    }

    #[test]
    fn cmdline_blacklist_skips_what_needs_the_module() {
        let mut case = Case::new(ALL);
        case.modprobe
            .add_cmdline("modprobe.blacklist=nouveau,nvidia-modeset\n");
        let plan = case.plan().unwrap();
        // nvidia-drm needs nvidia-modeset (by symbol): not loaded; the rest are.
        assert_eq!(names(&plan), ["nvidia", "nvidia_uvm", "nvidia_peermem"]);
        assert_eq!(
            plan.warnings,
            ["nvidia_drm is not loaded: nvidia_modeset is blacklisted (modprobe.blacklist= in /proc/cmdline)"]
        );
        assert!(!plan.os_modules.iter().any(|m| m.name == "drm"));
    }

    #[test]
    fn softdep_module_needing_a_blacklisted_one_is_skipped() {
        let mut case = Case::new("[driver]\nmodules = [\"nvidia\"]\n");
        case.modprobe.add_file(
            "nv.conf",
            "/etc/modprobe.d/nv.conf",
            "softdep nvidia post: nvidia-drm nvidia-uvm\n",
        );
        case.modprobe.add_cmdline("module_blacklist=nvidia_modeset");
        let plan = case.plan().unwrap();
        assert_eq!(names(&plan), ["nvidia", "nvidia_uvm"]);
        assert_eq!(
            plan.warnings,
            ["softdep module nvidia_drm is not loaded: nvidia_modeset is blacklisted (module_blacklist= in /proc/cmdline)"]
        );
    }

    #[test]
    fn cmdline_blacklist_of_the_driver_refuses_the_plan() {
        for cmdline in ["modprobe.blacklist=nvidia", "module_blacklist=nvidia"] {
            let mut case = Case::new("");
            case.modprobe.add_cmdline(cmdline);
            let err = case.plan().unwrap_err();
            assert!(matches!(err, PlanError::Blacklisted { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains("nvidia") && text.contains("/proc/cmdline"),
                "{text}"
            );
        }
        // A modprobe.d `blacklist nvidia` line applies to aliases only: still loaded.
        let mut case = Case::new("");
        case.modprobe
            .add_file("b.conf", "/etc/modprobe.d/b.conf", "blacklist nvidia\n");
        assert_eq!(names(&case.plan().unwrap())[0], "nvidia");
    }

    fn needs_of(edges: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        edges
            .iter()
            .map(|(name, deps)| {
                (
                    name.to_string(),
                    deps.iter().map(|d| d.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn dependency_order_breaks_ties_in_nvidia_order_then_by_name() {
        let needs = needs_of(&[
            ("nvidia_uvm", &["nvidia"]),
            ("nvidia_drm", &["nvidia_modeset"]),
            ("zz_other", &[]),
            ("aa_other", &[]),
            ("nvidia", &[]),
            ("nvidia_modeset", &["nvidia"]),
        ]);
        let wanted: Vec<String> = needs.keys().rev().cloned().collect();
        assert_eq!(
            dependency_order(&wanted, &needs).unwrap(),
            [
                "nvidia",
                "nvidia_modeset",
                "nvidia_uvm",
                "nvidia_drm",
                "aa_other",
                "zz_other"
            ]
        );
    }

    #[test]
    fn dependency_order_follows_a_long_chain_listed_backwards() {
        let names: Vec<String> = (0..300).map(|k| format!("m{k:03}")).collect();
        let needs: BTreeMap<String, BTreeSet<String>> = names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                (
                    name.clone(),
                    names[..k].iter().rev().take(1).cloned().collect(),
                )
            })
            .collect();
        let wanted: Vec<String> = names.iter().rev().cloned().collect();
        assert_eq!(dependency_order(&wanted, &needs).unwrap(), names);
    }

    #[test]
    fn dependency_cycle_names_every_module_left_unordered() {
        let needs = needs_of(&[("a", &["b"]), ("b", &["a"]), ("c", &[]), ("d", &["a"])]);
        let wanted: Vec<String> = needs.keys().cloned().collect();
        match dependency_order(&wanted, &needs) {
            Err(PlanError::DependencyCycle { cycle }) => assert_eq!(cycle, "a, b, d"),
            other => panic!("expected a cycle, got {other:?}"),
        }
    }
}

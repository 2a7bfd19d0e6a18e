//! Configuration: the shipped defaults (`/usr/lib/nvdriver-agent/config.toml`), then
//! `/etc/nvdriver-agent/config.toml`, then `/etc/nvdriver-agent/config.d/*.toml` in lexical
//! order; later keys win. Each file is a `Fragment` of all-optional fields with
//! `deny_unknown_fields`, so a typo is an error naming the file, line and key; the merged
//! fragments become one validated [`Settings`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::host::Root;

/// The defaults as shipped; compiled in so a host without `/usr/lib/nvdriver-agent` still has
/// them, and read from the same file the packages install (one source of truth).
pub const SHIPPED_DEFAULTS: &str = include_str!("../../dist/config.toml");
/// Host path of the packaged defaults; read, when present, right after the built-in
/// [`SHIPPED_DEFAULTS`].
pub const SHIPPED_DEFAULTS_PATH: &str = "/usr/lib/nvdriver-agent/config.toml";
/// Host path of the administrator's configuration, read after the defaults.
pub const ETC_CONFIG_PATH: &str = "/etc/nvdriver-agent/config.toml";
/// Host directory of drop-ins (`*.toml`), read last, in lexical order.
pub const ETC_DROPIN_DIR: &str = "/etc/nvdriver-agent/config.d";

/// `[trust] signatures`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignaturePolicy {
    /// Every overlay must carry a good signature by a trusted key.
    Require,
    /// A signature that is there must be good; unsigned overlays are accepted.
    #[default]
    IfPresent,
    /// Signatures are not looked at.
    Off,
}

/// Why the configuration could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file is not valid TOML, or has an unknown key or a value of the wrong type.
    #[error("{file}:{line}: {message}")]
    Parse {
        /// The file: a host path, the `--config` path as given, or the built-in defaults.
        file: PathBuf,
        /// 1-based line of the error; 0 when the parser gave no position.
        line: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// A file or the drop-in directory exists but could not be read.
    #[error("cannot read config {file}: {error}")]
    Read {
        /// The path on this machine (under the root), or the `--config` path as given.
        file: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// A key is missing from every layer, or its merged value cannot be used.
    #[error("config key {key} (last set in {file}): {message}")]
    Invalid {
        /// The key, dotted as in the file, e.g. `stage.sources`.
        key: String,
        /// The file that set it last (the shipped defaults' path when it is missing).
        file: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
}

/// Module parameter values as TOML allows them.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// `true` or `false`, passed to the kernel as `1` or `0`.
    Bool(bool),
    /// An integer, passed in decimal.
    Int(i64),
    /// A string, passed as it is.
    Str(String),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The kernel's bool parameters accept 1/0 everywhere (Y/N only for some).
            ParamValue::Bool(b) => write!(f, "{}", u8::from(*b)),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Str(s) => write!(f, "{s}"),
        }
    }
}

/// What `load` does when the store has no overlay for the running kernel
/// (`policy.missing-overlay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingOverlayPolicy {
    /// Log it, leave the driver unloaded, exit 0: boot goes on.
    Warn,
    /// Exit with the "no overlay" code so the unit fails visibly.
    Fail,
}

/// What the daemon does when no source has an overlay for the kernel the host boots next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingNextOverlayPolicy {
    /// Log it and show it in status; the update goes ahead.
    Warn,
    /// Keep the update from taking effect until the overlay is staged (or `hold release`, or
    /// `policy.hold-max-hours`): on ostree the staged deployment is locked and a logind shutdown
    /// inhibitor held; on Flatcar and other systemd hosts reboot.target refuses a manual start
    /// and the inhibitor is held.
    Hold,
}

/// What the daemon does when the boot-time load of the driver fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadFailureFallback {
    /// Record the failure (status, metrics, NFD labels say not ready); nothing more.
    Off,
    /// Also log, once, why and the command that fixes it, and mark the node not ready in
    /// every output until the next successful load.
    MarkNotReady,
    /// On rpm-ostree hosts: `rpm-ostree rollback --reboot` into the previous deployment, once
    /// per failing kernel; elsewhere, or when that was tried already, `mark-not-ready`.
    Rollback,
}

/// Files the agent keeps up to date for others; `None` turns one off. Each is written only
/// when its directory exists (the consumer creates it), so a host without that consumer is
/// not littered.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutputSettings {
    /// Prometheus text file for node_exporter's textfile collector.
    pub metrics: Option<PathBuf>,
    /// Node Feature Discovery local feature file.
    pub nfd_features: Option<PathBuf>,
    /// Container Device Interface spec for the loaded driver.
    pub cdi_spec: Option<PathBuf>,
}

/// Which next-kernel detector the daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detector {
    /// Chosen from the host: ostree when `/run/ostree-booted` exists or os-release names an
    /// rpm-ostree OS, Flatcar by os-release, otherwise the generic one.
    Auto,
    /// rpm-ostree and other ostree hosts: the staged or default deployment.
    Ostree,
    /// Flatcar: the kernel in the inactive USR slot.
    Flatcar,
    /// Any other systemd host: the default boot entry, else the newest installed kernel.
    Generic,
    /// Load at boot only; never watch for updates.
    Off,
}

/// Where overlays for the next kernel come from, and the limits on fetching them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct StageSettings {
    /// Source templates over `{kernel}`, `{driver}` and `{arch}`, tried in order.
    pub sources: Vec<String>,
    /// `stage.max-download-bytes`: archives larger than this are refused, and what one unpacks to
    /// is bounded at a multiple of it.
    pub max_download_bytes: u64,
    /// `stage.download-timeout-secs`: a download still running after this long is abandoned and the
    /// next source is tried.
    pub download_timeout: std::time::Duration,
    /// Allow `http://` sources (verification against the manifest happens either way).
    pub allow_http: bool,
    /// Overlays kept beyond the running and the pending kernels'.
    pub keep_extra: u32,
    /// `[trust] signatures`: whether overlays must carry a minisign signature.
    pub signatures: SignaturePolicy,
    /// `[oci]`: plain-HTTP registries and mirrors for `oci://` sources.
    pub oci: OciSettings,
    /// `stage.keep-free-percent` and `stage.keep-free-bytes`: what staging leaves free on the
    /// store's file system.
    pub keep_free: DiskReserve,
    /// Stage through the unprivileged fetcher listening on this socket (a host path), not in
    /// this process: the global `--fetcher` option, never the config files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetcher: Option<PathBuf>,
}

/// How much of its file system the store leaves free (`stage.keep-free-percent`,
/// `stage.keep-free-bytes`): the larger of a share of the file system and a number of bytes;
/// see [`crate::overlay::space`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct DiskReserve {
    /// `stage.keep-free-percent`: percent of the file system's size kept free (0–100).
    pub percent: u8,
    /// `stage.keep-free-bytes`: bytes kept free.
    pub bytes: u64,
}

impl DiskReserve {
    /// No reserve: only the file system's own size limits staging.
    pub const NONE: DiskReserve = DiskReserve {
        percent: 0,
        bytes: 0,
    };

    /// The bytes kept free on a file system of `total` bytes.
    pub fn of(&self, total: u64) -> u64 {
        let share = u128::from(total) * u128::from(self.percent.min(100)) / 100;
        (share as u64).max(self.bytes)
    }
}

/// `[oci]` settings (read whether or not the `oci` feature is built, so one config file serves
/// both builds).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct OciSettings {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Registry → mirrors tried, in order, before it.
    pub mirrors: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fragment {
    store: Option<StoreFragment>,
    driver: Option<DriverFragment>,
    parameters: Option<BTreeMap<String, BTreeMap<String, ParamValue>>>,
    toolkit: Option<ToolkitFragment>,
    readiness: Option<ReadinessFragment>,
    policy: Option<PolicyFragment>,
    stage: Option<StageFragment>,
    watch: Option<WatchFragment>,
    outputs: Option<OutputsFragment>,
    fallback: Option<FallbackFragment>,
    trust: Option<TrustFragment>,
    oci: Option<OciFragment>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct OutputsFragment {
    metrics: Option<PathBuf>,
    nfd_features: Option<PathBuf>,
    cdi_spec: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FallbackFragment {
    on_load_failure: Option<LoadFailureFallback>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct OciFragment {
    insecure_registries: Option<Vec<String>>,
    mirrors: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFragment {
    signatures: Option<SignaturePolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StageFragment {
    sources: Option<Vec<String>>,
    max_download_bytes: Option<u64>,
    download_timeout_secs: Option<u64>,
    allow_http: Option<bool>,
    keep_extra: Option<u32>,
    keep_free_percent: Option<u8>,
    keep_free_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchFragment {
    detector: Option<Detector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFragment {
    dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DriverFragment {
    version: Option<String>,
    root: Option<PathBuf>,
    modules: Option<Vec<String>>,
    os_modules: Option<Vec<String>>,
    imex_channels: Option<Vec<u32>>,
    persistenced: Option<bool>,
    fabric_manager: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolkitFragment {
    config: Option<PathBuf>,
    manage: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ReadinessFragment {
    driver_ready: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PolicyFragment {
    missing_overlay: Option<MissingOverlayPolicy>,
    missing_next_overlay: Option<MissingNextOverlayPolicy>,
    hold_max_hours: Option<u64>,
}

/// The validated, merged configuration. Paths are host paths (absolute); resolve them under a
/// [`Root`] before touching the disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    /// Host path of the overlay store (`store.dir`).
    pub store_dir: PathBuf,
    /// Pinned driver version, if any.
    pub driver_version: Option<String>,
    /// Host path where the overlay's tree is exposed for the container toolkit when it carries user
    /// space (`driver.root`).
    pub driver_root: PathBuf,
    /// Overlay modules to load, as configured (file-name spelling, e.g. `nvidia-uvm`).
    pub modules: Vec<String>,
    /// The OS's own modules NVIDIA needs (`driver.os-modules`), loaded first with the system's
    /// modprobe where present.
    pub os_modules: Vec<String>,
    /// IMEX channels whose `/dev/nvidia-caps-imex-channels/channel<N>` nodes the load makes
    /// (`driver.imex-channels`); non-empty also makes the `fabric-imex-mgmt` capability node.
    pub imex_channels: Vec<u32>,
    /// Start the overlay's `nvidia-persistenced` after a load (`driver.persistenced`).
    pub persistenced: bool,
    /// Start the overlay's `nv-fabricmanager` after a load where the host has NVSwitches
    /// (`driver.fabric-manager`).
    pub fabric_manager: bool,
    /// Per module (normalised to underscores), parameter name → value.
    pub parameters: BTreeMap<String, BTreeMap<String, ParamValue>>,
    /// Host path of the NVIDIA container toolkit's `config.toml` (`toolkit.config`).
    pub toolkit_config: PathBuf,
    /// Whether the agent sets `[nvidia-container-cli] root` in that file (`toolkit.manage`, default
    /// true).
    pub manage_toolkit: bool,
    /// Host path of the GPU Operator's `driver-ready` file (`readiness.driver-ready`).
    pub driver_ready: PathBuf,
    /// `policy.missing-overlay` (default `warn`).
    pub missing_overlay: MissingOverlayPolicy,
    /// `policy.missing-next-overlay` (default `warn`).
    pub missing_next_overlay: MissingNextOverlayPolicy,
    /// `policy.hold-max-hours`: after this many hours a held update is let through (default
    /// unset: no deadline).
    pub hold_max_hours: Option<u64>,
    /// `[stage]`, with `[trust]` and `[oci]`: where next-kernel overlays come from and how they are
    /// checked.
    pub stage: StageSettings,
    /// `watch.detector` (default `auto`).
    pub detector: Detector,
    /// `[outputs]`: files kept up to date for other software.
    pub outputs: OutputSettings,
    /// `fallback.on-load-failure` (default `off`).
    pub on_load_failure: LoadFailureFallback,
    /// The files that were read, in order (host paths, or the `--config` path as given).
    pub sources: Vec<PathBuf>,
}

impl Settings {
    /// This config's `[parameters]` for one module as the kernel takes them: `key=value
    /// key="value with spaces"` (the load plan puts modprobe.d's and /proc/cmdline's first).
    pub fn module_params(&self, module: &str) -> String {
        self.parameters
            .get(&crate::host::kernel::normalize_module_name(module))
            .map(|params| {
                params
                    .iter()
                    .map(|(k, v)| crate::host::modprobe::quote_param(k, &v.to_string()))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }
}

/// Where configuration comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// The standard layering under the root.
    Layered,
    /// `--config FILE`: the shipped defaults, then this one file (not resolved under the root);
    /// `/etc` is not read.
    File(PathBuf),
}

/// Read and merge configuration.
pub fn load(root: &Root, source: &ConfigSource) -> Result<Settings, ConfigError> {
    let mut layers: Vec<(PathBuf, String)> = vec![(
        PathBuf::from(format!("{SHIPPED_DEFAULTS_PATH} (built in)")),
        SHIPPED_DEFAULTS.to_string(),
    )];
    match source {
        ConfigSource::Layered => {
            let mut host_files = vec![
                PathBuf::from(SHIPPED_DEFAULTS_PATH),
                PathBuf::from(ETC_CONFIG_PATH),
            ];
            host_files.extend(list_dropins(root)?);
            for host_file in host_files {
                if let Some(text) = read_optional(&root.join(&host_file))? {
                    layers.push((host_file, text));
                }
            }
        }
        ConfigSource::File(path) => {
            let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
                file: path.clone(),
                error: source,
            })?;
            layers.push((path.clone(), text));
        }
    }
    merge_layers(&layers)
}

fn read_optional(path: &Path) -> Result<Option<String>, ConfigError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            file: path.to_path_buf(),
            error: source,
        }),
    }
}

/// `config.d/*.toml`, sorted by file name (lexical byte order, as systemd sorts drop-ins).
fn list_dropins(root: &Root) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = root.join(ETC_DROPIN_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                file: dir,
                error: source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.ends_with(".toml") && !name.starts_with('.'))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| Path::new(ETC_DROPIN_DIR).join(name))
        .collect())
}

/// Parse each layer (so errors name their file) and merge them in order.
pub fn merge_layers(layers: &[(PathBuf, String)]) -> Result<Settings, ConfigError> {
    let mut merged = Merged::default();
    for (file, text) in layers {
        let fragment: Fragment = toml::from_str(text).map_err(|e| parse_error(file, text, &e))?;
        merged.apply(file, fragment);
    }
    merged.finish(layers.iter().map(|(f, _)| f.clone()).collect())
}

fn parse_error(file: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let line = error
        .span()
        .map(|span| crate::text::line_column(text, span.start).0)
        .unwrap_or(0);
    ConfigError::Parse {
        file: file.to_path_buf(),
        line,
        message: error.message().trim().to_string(),
    }
}

/// Each value remembers the file that set it last, for error messages.
type Sourced<T> = Option<(T, PathBuf)>;

#[derive(Default)]
struct Merged {
    store_dir: Sourced<PathBuf>,
    driver_version: Sourced<String>,
    driver_root: Sourced<PathBuf>,
    modules: Sourced<Vec<String>>,
    os_modules: Sourced<Vec<String>>,
    imex_channels: Sourced<Vec<u32>>,
    persistenced: Sourced<bool>,
    fabric_manager: Sourced<bool>,
    parameters: BTreeMap<String, BTreeMap<String, ParamValue>>,
    toolkit_config: Sourced<PathBuf>,
    manage_toolkit: Sourced<bool>,
    driver_ready: Sourced<PathBuf>,
    missing_overlay: Sourced<MissingOverlayPolicy>,
    missing_next_overlay: Sourced<MissingNextOverlayPolicy>,
    hold_max_hours: Sourced<u64>,
    sources: Sourced<Vec<String>>,
    max_download_bytes: Sourced<u64>,
    download_timeout_secs: Sourced<u64>,
    allow_http: Sourced<bool>,
    keep_extra: Sourced<u32>,
    keep_free_percent: Sourced<u8>,
    keep_free_bytes: Sourced<u64>,
    detector: Sourced<Detector>,
    metrics: Sourced<PathBuf>,
    nfd_features: Sourced<PathBuf>,
    cdi_spec: Sourced<PathBuf>,
    on_load_failure: Sourced<LoadFailureFallback>,
    signatures: Sourced<SignaturePolicy>,
    insecure_registries: Sourced<Vec<String>>,
    mirrors: Sourced<BTreeMap<String, Vec<String>>>,
}

fn set<T>(slot: &mut Sourced<T>, value: Option<T>, file: &Path) {
    if let Some(value) = value {
        *slot = Some((value, file.to_path_buf()));
    }
}

impl Merged {
    fn apply(&mut self, file: &Path, fragment: Fragment) {
        if let Some(store) = fragment.store {
            set(&mut self.store_dir, store.dir, file);
        }
        if let Some(driver) = fragment.driver {
            set(&mut self.driver_version, driver.version, file);
            set(&mut self.driver_root, driver.root, file);
            set(&mut self.modules, driver.modules, file);
            set(&mut self.os_modules, driver.os_modules, file);
            set(&mut self.imex_channels, driver.imex_channels, file);
            set(&mut self.persistenced, driver.persistenced, file);
            set(&mut self.fabric_manager, driver.fabric_manager, file);
        }
        // Parameters merge per module and per key, so a drop-in can change one parameter.
        for (module, params) in fragment.parameters.unwrap_or_default() {
            self.parameters
                .entry(crate::host::kernel::normalize_module_name(&module))
                .or_default()
                .extend(params);
        }
        if let Some(toolkit) = fragment.toolkit {
            set(&mut self.toolkit_config, toolkit.config, file);
            set(&mut self.manage_toolkit, toolkit.manage, file);
        }
        if let Some(readiness) = fragment.readiness {
            set(&mut self.driver_ready, readiness.driver_ready, file);
        }
        if let Some(policy) = fragment.policy {
            set(&mut self.missing_overlay, policy.missing_overlay, file);
            set(
                &mut self.missing_next_overlay,
                policy.missing_next_overlay,
                file,
            );
            set(&mut self.hold_max_hours, policy.hold_max_hours, file);
        }
        if let Some(stage) = fragment.stage {
            set(&mut self.sources, stage.sources, file);
            set(&mut self.max_download_bytes, stage.max_download_bytes, file);
            set(
                &mut self.download_timeout_secs,
                stage.download_timeout_secs,
                file,
            );
            set(&mut self.allow_http, stage.allow_http, file);
            set(&mut self.keep_extra, stage.keep_extra, file);
            set(&mut self.keep_free_percent, stage.keep_free_percent, file);
            set(&mut self.keep_free_bytes, stage.keep_free_bytes, file);
        }
        if let Some(watch) = fragment.watch {
            set(&mut self.detector, watch.detector, file);
        }
        if let Some(outputs) = fragment.outputs {
            set(&mut self.metrics, outputs.metrics, file);
            set(&mut self.nfd_features, outputs.nfd_features, file);
            set(&mut self.cdi_spec, outputs.cdi_spec, file);
        }
        if let Some(fallback) = fragment.fallback {
            set(&mut self.on_load_failure, fallback.on_load_failure, file);
        }
        if let Some(trust) = fragment.trust {
            set(&mut self.signatures, trust.signatures, file);
        }
        if let Some(oci) = fragment.oci {
            set(&mut self.insecure_registries, oci.insecure_registries, file);
            set(&mut self.mirrors, oci.mirrors, file);
        }
    }

    fn finish(self, files: Vec<PathBuf>) -> Result<Settings, ConfigError> {
        let store_dir = required_path("store.dir", self.store_dir)?;
        let driver_root = required_path("driver.root", self.driver_root)?;
        let toolkit_config = required_path("toolkit.config", self.toolkit_config)?;
        let driver_ready = required_path("readiness.driver-ready", self.driver_ready)?;
        let (modules, modules_file) = required("driver.modules", self.modules)?;
        if modules.is_empty() {
            return Err(ConfigError::Invalid {
                key: "driver.modules".into(),
                file: modules_file,
                message: "expected at least one module (e.g. \"nvidia\"), found an empty list"
                    .into(),
            });
        }
        check_module_names("driver.modules", &modules, &modules_file)?;
        let (os_modules, os_file) = required("driver.os-modules", self.os_modules)?;
        check_module_names("driver.os-modules", &os_modules, &os_file)?;
        let (sources, sources_file) = required("stage.sources", self.sources)?;
        check_sources(&sources, &sources_file)?;
        let (max_download_bytes, _) =
            required("stage.max-download-bytes", self.max_download_bytes)?;
        let (timeout_secs, timeout_file) =
            required("stage.download-timeout-secs", self.download_timeout_secs)?;
        if timeout_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "stage.download-timeout-secs".into(),
                file: timeout_file,
                message: "expected a number of seconds above 0, found 0".into(),
            });
        }
        let (keep_free_percent, percent_file) =
            required("stage.keep-free-percent", self.keep_free_percent)?;
        if keep_free_percent > 100 {
            return Err(ConfigError::Invalid {
                key: "stage.keep-free-percent".into(),
                file: percent_file,
                message: format!("expected a percentage from 0 to 100, found {keep_free_percent}"),
            });
        }
        let (keep_free_bytes, _) = required("stage.keep-free-bytes", self.keep_free_bytes)?;
        if let Some((0, file)) = &self.hold_max_hours {
            return Err(ConfigError::Invalid {
                key: "policy.hold-max-hours".into(),
                file: file.clone(),
                message:
                    "expected a number of hours above 0, found 0; leave it unset for no deadline"
                        .into(),
            });
        }
        let stage = StageSettings {
            sources,
            max_download_bytes,
            download_timeout: std::time::Duration::from_secs(timeout_secs),
            allow_http: self.allow_http.map(|(v, _)| v).unwrap_or(false),
            keep_extra: self.keep_extra.map(|(v, _)| v).unwrap_or(1),
            signatures: self.signatures.map(|(v, _)| v).unwrap_or_default(),
            oci: OciSettings {
                insecure_registries: self.insecure_registries.map(|(v, _)| v).unwrap_or_default(),
                mirrors: self.mirrors.map(|(v, _)| v).unwrap_or_default(),
            },
            keep_free: DiskReserve {
                percent: keep_free_percent,
                bytes: keep_free_bytes,
            },
            fetcher: None,
        };
        let driver_version = self
            .driver_version
            .map(|(v, _)| v)
            .filter(|v| !v.is_empty());
        Ok(Settings {
            store_dir,
            driver_version,
            driver_root,
            modules,
            os_modules,
            imex_channels: self.imex_channels.map(|(v, _)| v).unwrap_or_default(),
            persistenced: self.persistenced.map(|(v, _)| v).unwrap_or(true),
            fabric_manager: self.fabric_manager.map(|(v, _)| v).unwrap_or(true),
            parameters: self.parameters,
            toolkit_config,
            manage_toolkit: self.manage_toolkit.map(|(v, _)| v).unwrap_or(true),
            driver_ready,
            missing_overlay: self
                .missing_overlay
                .map(|(v, _)| v)
                .unwrap_or(MissingOverlayPolicy::Warn),
            missing_next_overlay: self
                .missing_next_overlay
                .map(|(v, _)| v)
                .unwrap_or(MissingNextOverlayPolicy::Warn),
            hold_max_hours: self.hold_max_hours.map(|(v, _)| v),
            stage,
            detector: self.detector.map(|(v, _)| v).unwrap_or(Detector::Auto),
            outputs: OutputSettings {
                metrics: optional_path("outputs.metrics", self.metrics)?,
                nfd_features: optional_path("outputs.nfd-features", self.nfd_features)?,
                cdi_spec: optional_path("outputs.cdi-spec", self.cdi_spec)?,
            },
            on_load_failure: self
                .on_load_failure
                .map(|(v, _)| v)
                .unwrap_or(LoadFailureFallback::Off),
            sources: files,
        })
    }
}

/// The placeholders a source template may use.
pub const SOURCE_PLACEHOLDERS: [&str; 4] = ["{kernel}", "{driver}", "{arch}", "{os}"];

/// A source is an absolute directory or archive path, or an `http(s)://` URL; its only braces
/// are the known placeholders.
fn check_sources(sources: &[String], file: &Path) -> Result<(), ConfigError> {
    for source in sources {
        let mut rest = source.clone();
        for placeholder in SOURCE_PLACEHOLDERS {
            rest = rest.replace(placeholder, "");
        }
        let shape_ok = source.starts_with('/')
            || source.starts_with("https://")
            || source.starts_with("http://")
            || source.starts_with("oci://");
        let message = if !shape_ok {
            format!("expected an absolute path, an http(s):// URL or an oci:// reference, found {source:?}")
        } else if rest.contains('{') || rest.contains('}') {
            format!("{source:?} has an unknown placeholder; the known ones are {{kernel}}, {{driver}}, {{arch}} and {{os}}")
        } else if source.starts_with('/') && source.split('/').any(|part| part == "..") {
            format!("expected a path without \"..\", found {source:?}")
        } else {
            continue;
        };
        return Err(ConfigError::Invalid {
            key: "stage.sources".into(),
            file: file.to_path_buf(),
            message,
        });
    }
    Ok(())
}

fn check_module_names(key: &str, names: &[String], file: &Path) -> Result<(), ConfigError> {
    match names.iter().find(|m| !is_module_name(m)) {
        Some(bad) => Err(ConfigError::Invalid {
            key: key.into(),
            file: file.to_path_buf(),
            message: format!("{bad:?} is not a module name (letters, digits, - and _ only)"),
        }),
        None => Ok(()),
    }
}

fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn required<T>(key: &str, value: Sourced<T>) -> Result<(T, PathBuf), ConfigError> {
    value.ok_or_else(|| ConfigError::Invalid {
        key: key.into(),
        file: PathBuf::from(SHIPPED_DEFAULTS_PATH),
        message: "missing; the shipped defaults set it".into(),
    })
}

/// Paths in the config are host paths: absolute, with no `..` (they are resolved under the root).
fn required_path(key: &str, value: Sourced<PathBuf>) -> Result<PathBuf, ConfigError> {
    let (path, file) = required(key, value)?;
    let ok = path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if !ok {
        return Err(ConfigError::Invalid {
            key: key.into(),
            file,
            message: format!("expected an absolute path without \"..\", found {path:?}"),
        });
    }
    Ok(path)
}

/// An optional host path: unset or `""` means off.
fn optional_path(key: &str, value: Sourced<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    match value {
        None => Ok(None),
        Some((path, _)) if path.as_os_str().is_empty() => Ok(None),
        value => required_path(key, value).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layered(files: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        for (path, text) in files {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        load(&root, &ConfigSource::Layered)
    }

    #[test]
    fn defaults_alone() {
        let s = layered(&[]).unwrap();
        assert_eq!(s.store_dir, Path::new("/var/lib/nvdriver-agent/overlays"));
        assert_eq!(s.modules, ["nvidia", "nvidia-modeset", "nvidia-uvm"]);
        assert_eq!(s.driver_root, Path::new("/run/nvidia/driver"));
        assert_eq!(
            s.toolkit_config,
            Path::new("/etc/nvidia-container-runtime/config.toml")
        );
        assert_eq!(s.missing_overlay, MissingOverlayPolicy::Warn);
        assert_eq!(s.driver_version, None);
        assert!(s.manage_toolkit);
    }

    #[test]
    fn layering_order_usr_lib_then_etc_then_dropins_lexically() {
        let s = layered(&[
            (
                "/usr/lib/nvdriver-agent/config.toml",
                "[store]\ndir = \"/usr-lib\"\n[policy]\nmissing-overlay = \"fail\"\n",
            ),
            (
                "/etc/nvdriver-agent/config.toml",
                "[store]\ndir = \"/etc\"\n[driver]\nversion = \"570.1\"\n",
            ),
            (
                "/etc/nvdriver-agent/config.d/20-b.toml",
                "[store]\ndir = \"/dropin-b\"\n",
            ),
            (
                "/etc/nvdriver-agent/config.d/10-a.toml",
                "[store]\ndir = \"/dropin-a\"\n[driver]\nmodules = [\"nvidia\", \"nvidia-drm\"]\n",
            ),
            (
                "/etc/nvdriver-agent/config.d/30-c.conf",
                "[store]\ndir = \"/ignored\"\n",
            ),
        ])
        .unwrap();
        assert_eq!(s.store_dir, Path::new("/dropin-b"));
        assert_eq!(s.driver_version.as_deref(), Some("570.1"));
        assert_eq!(s.modules, ["nvidia", "nvidia-drm"]);
        assert_eq!(s.missing_overlay, MissingOverlayPolicy::Fail);
        let sources: Vec<_> = s
            .sources
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            &sources[1..],
            [
                "/usr/lib/nvdriver-agent/config.toml",
                "/etc/nvdriver-agent/config.toml",
                "/etc/nvdriver-agent/config.d/10-a.toml",
                "/etc/nvdriver-agent/config.d/20-b.toml",
            ]
        );
    }

    #[test]
    fn parameters_merge_per_key() {
        let s = layered(&[
            (
                "/etc/nvdriver-agent/config.toml",
                "[parameters.nvidia]\nNVreg_A = 1\nNVreg_B = \"x\"\n",
            ),
            (
                "/etc/nvdriver-agent/config.d/50.toml",
                "[parameters.nvidia]\nNVreg_B = \"y\"\n[parameters.nvidia-uvm]\nuvm_perf = true\n",
            ),
        ])
        .unwrap();
        assert_eq!(s.module_params("nvidia"), "NVreg_A=1 NVreg_B=y");
        assert_eq!(s.module_params("nvidia-uvm"), "uvm_perf=1");
        assert_eq!(s.module_params("nvidia-drm"), "");
    }

    #[test]
    fn typo_names_file_line_and_key() {
        let err = layered(&[(
            "/etc/nvdriver-agent/config.d/10-x.toml",
            "[store]\ndir = \"/x\"\n\n[driver]\nmodulez = [\"nvidia\"]\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/etc/nvdriver-agent/config.d/10-x.toml:5"),
            "{err}"
        );
        assert!(err.contains("modulez"), "{err}");
    }

    #[test]
    fn wrong_type_names_file_line_and_key() {
        let err = layered(&[(
            "/etc/nvdriver-agent/config.toml",
            "[toolkit]\nmanage = \"yes\"\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/nvdriver-agent/config.toml:2"), "{err}");
        assert!(err.contains("manage") || err.contains("bool"), "{err}");
    }

    #[test]
    fn outputs_default_on_turn_off_with_empty_and_refuse_relative_paths() {
        let defaults = layered(&[]).unwrap();
        assert_eq!(
            defaults.outputs.metrics.as_deref(),
            Some(Path::new(
                "/var/lib/node_exporter/textfile_collector/nvdriver_agent.prom"
            ))
        );
        assert_eq!(defaults.on_load_failure, LoadFailureFallback::Off);
        let off = layered(&[(
            "/etc/nvdriver-agent/config.toml",
            "[outputs]\nmetrics = \"\"\n[fallback]\non-load-failure = \"mark-not-ready\"\n",
        )])
        .unwrap();
        assert_eq!(off.outputs.metrics, None);
        assert!(off.outputs.nfd_features.is_some());
        assert_eq!(off.on_load_failure, LoadFailureFallback::MarkNotReady);
        let err = layered(&[(
            "/etc/nvdriver-agent/config.d/10-cdi.toml",
            "[outputs]\ncdi-spec = \"cdi/nvidia.json\"\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("outputs.cdi-spec") && err.contains("10-cdi.toml"),
            "{err}"
        );
    }

    #[test]
    fn bad_policy_value() {
        let err = layered(&[(
            "/etc/nvdriver-agent/config.toml",
            "[policy]\nmissing-overlay = \"ignore\"\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains(":2") && err.contains("ignore"), "{err}");
    }

    #[test]
    fn relative_path_refused() {
        let err = layered(&[(
            "/etc/nvdriver-agent/config.toml",
            "[driver]\nroot = \"run/nvidia\"\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("driver.root") && err.contains("/etc/nvdriver-agent/config.toml"),
            "{err}"
        );
    }

    #[test]
    fn empty_module_list_refused() {
        let err = layered(&[(
            "/etc/nvdriver-agent/config.toml",
            "[driver]\nmodules = []\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("driver.modules"), "{err}");
    }

    #[test]
    fn disk_reserve_defaults_and_bounds() {
        let s = layered(&[]).unwrap();
        assert_eq!(
            s.stage.keep_free,
            DiskReserve {
                percent: 10,
                bytes: 1 << 30
            }
        );
        let err = layered(&[(
            "/etc/nvdriver-agent/config.toml",
            "[stage]\nkeep-free-percent = 101\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("stage.keep-free-percent") && err.contains("from 0 to 100, found 101"),
            "{err}"
        );
    }

    #[test]
    fn explicit_file_skips_etc() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        fs::create_dir_all(root.join("/etc/nvdriver-agent")).unwrap();
        fs::write(
            root.join(ETC_CONFIG_PATH),
            "[store]\ndir = \"/etc-store\"\n",
        )
        .unwrap();
        let file = dir.path().join("mine.toml");
        fs::write(&file, "[store]\ndir = \"/mine\"\n").unwrap();
        let s = load(&root, &ConfigSource::File(file)).unwrap();
        assert_eq!(s.store_dir, Path::new("/mine"));
        assert_eq!(s.modules, ["nvidia", "nvidia-modeset", "nvidia-uvm"]);
    }
}

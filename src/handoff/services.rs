//! The driver's own daemons, run from the overlay's user space: `nvidia-persistenced` and
//! `nv-fabricmanager`, each as a systemd unit the agent ships
//! (`units/nvdriver-agent-persistenced.service`, `units/nvdriver-agent-fabricmanager.service`)
//! whose `ExecStart=` runs the binary under the driver root `/run/nvidia/driver`, so the
//! daemon is always the overlay's exact driver version (Fabric Manager refuses a driver of
//! another version).
//!
//! Which of them a host needs is [`plan`], pure: persistenced wherever the overlay carries it
//! (unless `driver.persistenced = false`); Fabric Manager only where NVSwitches are on the PCI
//! bus ([`scan_nvswitches`]). `/proc/devices` is not enough: the `nvidia-nvswitch` major is
//! registered by `nvidia.ko` on every host, switch or not (the H200 test machine has it and no
//! switch). The daemon starts the units with systemd's `StartUnit` over D-Bus ([`start`]) after
//! each load, rather than `WantedBy=`: systemd cannot know at boot whether the overlay carries
//! the binary or the host has switches, and a unit started by dependency before the modules are
//! loaded would fail.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::host::Root;

/// PCI class of an NVSwitch: bridge (0x06), "other bridge" (0x80); the programming interface
/// byte varies. NVIDIA's own `nvidia-fabricmanager` packaging keys its udev rules on the same
/// vendor/class pair.
const NVSWITCH_CLASS_PREFIX: u32 = 0x0680;
/// NVIDIA's PCI vendor id.
const NVIDIA_VENDOR: u32 = 0x10de;

/// One of the driver's daemons the agent can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverService {
    /// `nvidia-persistenced`: keeps the GPUs initialised between clients.
    Persistenced,
    /// `nv-fabricmanager`: trains the NVLink fabric through the NVSwitches.
    FabricManager,
    /// `nvlsm`: the NVLink subnet manager of NVLink 5 (Blackwell) switch systems.
    Nvlsm,
}

impl DriverService {
    /// Every service, in start order.
    pub const ALL: [DriverService; 3] = [
        DriverService::Persistenced,
        DriverService::Nvlsm,
        DriverService::FabricManager,
    ];

    /// The executable's name in the overlay's user space.
    pub fn binary(self) -> &'static str {
        match self {
            DriverService::Persistenced => "nvidia-persistenced",
            DriverService::FabricManager => "nv-fabricmanager",
            DriverService::Nvlsm => "nvlsm",
        }
    }

    /// The systemd unit the agent ships for it; `None` for `nvlsm`, which has no unit yet.
    pub fn unit(self) -> Option<&'static str> {
        match self {
            DriverService::Persistenced => Some("nvdriver-agent-persistenced.service"),
            DriverService::FabricManager => Some("nvdriver-agent-fabricmanager.service"),
            DriverService::Nvlsm => None,
        }
    }

    /// The name shown in `status` and `overlay inspect`.
    pub fn name(self) -> &'static str {
        self.binary()
    }
}

/// The directories of an overlay's user space the binaries are looked for in, relative to its
/// root (the units run `/run/nvidia/driver/usr/bin/<binary>`).
const BIN_DIRS: [&str; 2] = ["usr/bin", "usr/sbin"];

/// The services an overlay can run, from the relative paths of its files (its manifest).
pub fn carried<'a>(paths: impl IntoIterator<Item = &'a str>) -> Vec<DriverService> {
    let paths: Vec<&str> = paths.into_iter().collect();
    DriverService::ALL
        .into_iter()
        .filter(|service| {
            BIN_DIRS
                .iter()
                .any(|dir| paths.contains(&format!("{dir}/{}", service.binary()).as_str()))
        })
        .collect()
}

/// The services the tree at `driver_root` (a resolved path, e.g. the mounted driver root)
/// can run: the binaries present in its user space.
pub fn carried_in_tree(driver_root: &Path) -> Vec<DriverService> {
    DriverService::ALL
        .into_iter()
        .filter(|service| {
            BIN_DIRS
                .iter()
                .any(|dir| driver_root.join(dir).join(service.binary()).is_file())
        })
        .collect()
}

/// The overlay's library directories under `driver_root`, as `LD_LIBRARY_PATH` (the same list
/// the units set; see src/handoff/cdi.rs for where overlays put libraries).
pub fn library_path(driver_root: &Path) -> String {
    [
        "usr/lib64",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/aarch64-linux-gnu",
        "usr/lib",
    ]
    .iter()
    .map(|dir| driver_root.join(dir).display().to_string())
    .collect::<Vec<_>>()
    .join(":")
}

/// An NVSwitch on the PCI bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NvSwitch {
    /// The PCI address, e.g. `0000:05:00.0`.
    pub address: String,
}

/// Errors reading the host for the services.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// `/sys/bus/pci/devices` could not be listed.
    #[error("cannot list {path}: {source}; the NVSwitch check needs sysfs mounted")]
    PciList {
        /// The directory, as a host path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// systemd refused or failed a start or stop.
    #[error("systemd could not {verb} {unit}: {source}; see `journalctl -u {unit}`")]
    Systemd {
        /// `start` or `stop`.
        verb: &'static str,
        /// The unit.
        unit: &'static str,
        /// The D-Bus error.
        source: Box<zbus::Error>,
    },
    /// The system bus could not be reached.
    #[error(transparent)]
    Bus(#[from] crate::watch::dbus::DbusError),
    /// Fabric Manager's configuration could not be read from the overlay or written for it.
    #[error("cannot {action} {path}: {source}; Fabric Manager is not started")]
    FabricManagerConfig {
        /// `read` or `write`.
        action: &'static str,
        /// The file, as a host path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The overlay's stock Fabric Manager configuration, under the driver root.
pub const FABRIC_MANAGER_STOCK_CONFIG: &str = "usr/share/nvidia/nvswitch/fabricmanager.cfg";
/// Where the agent writes the configuration the unit runs with (`-c`): the stock one with the
/// paths to the driver's own files moved under the driver root.
pub const FABRIC_MANAGER_CONFIG: &str = "/run/nvdriver-agent/fabricmanager.cfg";
/// The keys of `fabricmanager.cfg` naming the driver's own files (the per-board topology files
/// and the database), with Fabric Manager's built-in default for each. NVIDIA's packages
/// install those under `/usr/share/nvidia/nvswitch`; in an overlay they are under the driver
/// root, which Fabric Manager cannot know. Logs and the state file stay where the stock file
/// puts them: they are the host's, not the driver's.
pub const FABRIC_MANAGER_DRIVER_PATHS: [(&str, &str); 2] = [
    ("TOPOLOGY_FILE_PATH", "/usr/share/nvidia/nvswitch"),
    ("DATABASE_PATH", "/usr/share/nvidia/nvswitch"),
];

/// Fabric Manager's configuration for an overlay at `driver_root`: the stock text with each
/// driver path (see [`FABRIC_MANAGER_DRIVER_PATHS`]) moved under the driver root, and added,
/// with its default, where the stock file leaves it out; pure.
pub fn fabric_manager_config(stock: &str, driver_root: &Path) -> String {
    let under_root = |value: &str| {
        if Path::new(value).starts_with(driver_root) {
            value.to_string()
        } else {
            driver_root
                .join(value.trim_start_matches('/'))
                .display()
                .to_string()
        }
    };
    let mut seen = Vec::new();
    let mut out = format!(
        "# Written by nvdriver-agent from {}/{FABRIC_MANAGER_STOCK_CONFIG}: the paths to the\n\
         # driver's own files point into the driver overlay. Rewritten at every load.\n",
        driver_root.display()
    );
    for line in stock.lines() {
        let rewritten = line.split_once('=').and_then(|(key, value)| {
            let key = key.trim();
            let value = value.trim();
            let known = FABRIC_MANAGER_DRIVER_PATHS.iter().any(|(k, _)| *k == key);
            (known && value.starts_with('/')).then(|| {
                seen.push(key.to_string());
                format!("{key}={}", under_root(value))
            })
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    for (key, default) in FABRIC_MANAGER_DRIVER_PATHS {
        if !seen.iter().any(|k| k == key) {
            out.push_str(&format!("{key}={}\n", under_root(default)));
        }
    }
    out
}

/// Write [`FABRIC_MANAGER_CONFIG`] from the loaded overlay's stock file, atomically.
pub fn write_fabric_manager_config(root: &Root, driver_root: &Path) -> Result<(), ServicesError> {
    let stock = root.join(driver_root).join(FABRIC_MANAGER_STOCK_CONFIG);
    let text =
        std::fs::read_to_string(&stock).map_err(|source| ServicesError::FabricManagerConfig {
            action: "read",
            path: driver_root.join(FABRIC_MANAGER_STOCK_CONFIG),
            source,
        })?;
    let dest = root.join(FABRIC_MANAGER_CONFIG);
    let written = dest
        .parent()
        .map_or(Ok(()), |dir| crate::fsutil::create_dir_all_mode(dir, 0o755))
        .and_then(|()| {
            crate::fsutil::write_atomic(
                &dest,
                fabric_manager_config(&text, driver_root).as_bytes(),
                0o644,
            )
        });
    written.map_err(|source| ServicesError::FabricManagerConfig {
        action: "write",
        path: FABRIC_MANAGER_CONFIG.into(),
        source,
    })
}

fn read_hex(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Whether a PCI function's `vendor` and `class` (sysfs's hex text) are an NVSwitch's.
pub fn is_nvswitch(vendor: u32, class: u32) -> bool {
    vendor == NVIDIA_VENDOR && class >> 8 == NVSWITCH_CLASS_PREFIX
}

/// The NVSwitches under `/sys/bus/pci/devices`; no directory (no PCI bus) is no switch.
pub fn scan_nvswitches(root: &Root) -> Result<Vec<NvSwitch>, ServicesError> {
    let dir = root.join("/sys/bus/pci/devices");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ServicesError::PciList { path: dir, source }),
    };
    let mut switches: Vec<NvSwitch> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let path = entry.path();
            matches!(
                (read_hex(&path.join("vendor")), read_hex(&path.join("class"))),
                (Some(vendor), Some(class)) if is_nvswitch(vendor, class)
            )
        })
        .map(|entry| NvSwitch {
            address: entry.file_name().to_string_lossy().into_owned(),
        })
        .collect();
    switches.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(switches)
}

/// The settings that shape [`plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSettings {
    /// `driver.persistenced`.
    pub persistenced: bool,
    /// `driver.fabric-manager`.
    pub fabric_manager: bool,
}

/// What [`plan`] decided for one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ServiceDecision {
    /// The service.
    pub service: DriverService,
    /// Whether the agent starts it (readiness waits for it).
    pub start: bool,
    /// Whether the host needs it: started, or needed and missing from the overlay (Fabric
    /// Manager on an NVSwitch host), which readiness reports.
    pub needed: bool,
    /// Why, in words.
    pub why: String,
}

/// Which services this host needs from this overlay; pure. Every service is listed, started or
/// not, so `status` can say why one is not running.
pub fn plan(
    carried: &[DriverService],
    switches: &[NvSwitch],
    settings: ServiceSettings,
) -> Vec<ServiceDecision> {
    DriverService::ALL
        .into_iter()
        .map(|service| {
            let (needed, why) = decide(service, carried.contains(&service), switches, settings);
            ServiceDecision {
                service,
                start: needed && carried.contains(&service) && service.unit().is_some(),
                needed,
                why,
            }
        })
        .collect()
}

fn decide(
    service: DriverService,
    in_overlay: bool,
    switches: &[NvSwitch],
    settings: ServiceSettings,
) -> (bool, String) {
    let binary = service.binary();
    let wanted = match service {
        DriverService::Persistenced => settings.persistenced,
        DriverService::FabricManager | DriverService::Nvlsm => settings.fabric_manager,
    };
    if !wanted {
        return (false, "turned off in the configuration".into());
    }
    let needs_switch = service != DriverService::Persistenced;
    if needs_switch && switches.is_empty() {
        return (false, "no NVSwitch on the PCI bus".into());
    }
    if !in_overlay {
        let why = format!("the overlay does not carry usr/bin/{binary}");
        // Without Fabric Manager an NVSwitch system's GPUs fail CUDA (error 802): readiness
        // must hear of it, so it is "needed", and missing.
        return (needs_switch && service == DriverService::FabricManager, why);
    }
    match service.unit() {
        Some(unit) => (true, format!("started as {unit}")),
        None => (
            false,
            format!("the overlay carries {binary}, but the agent ships no unit for it yet"),
        ),
    }
}

/// Start (or restart, so the binary is the newly loaded overlay's) each unit the plan starts,
/// in order, with systemd's `RestartUnit` (`replace` mode); returns the units started.
pub fn start(
    conn: &crate::watch::dbus::Connection,
    decisions: &[ServiceDecision],
) -> Result<Vec<&'static str>, ServicesError> {
    let mut started = Vec::new();
    for decision in decisions.iter().filter(|d| d.start) {
        let Some(unit) = decision.service.unit() else {
            continue;
        };
        systemd_unit_call(conn, "RestartUnit", "start", unit)?;
        started.push(unit);
    }
    Ok(started)
}

fn systemd_unit_call(
    conn: &crate::watch::dbus::Connection,
    method: &'static str,
    verb: &'static str,
    unit: &'static str,
) -> Result<(), ServicesError> {
    conn.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        method,
        &(unit, "replace"),
    )
    .map(drop)
    .map_err(|source| ServicesError::Systemd {
        verb,
        unit,
        source: Box::new(source),
    })
}

/// A unit's `ActiveState` (`active`, `activating`, `failed`, `inactive`, ...), through
/// `LoadUnit` (which also answers for units never started).
pub fn active_state(
    conn: &crate::watch::dbus::Connection,
    unit: &'static str,
) -> Result<String, ServicesError> {
    let call = |source| ServicesError::Systemd {
        verb: "read the state of",
        unit,
        source: Box::new(source),
    };
    let reply = conn
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "LoadUnit",
            &(unit,),
        )
        .map_err(call)?;
    let path: zbus::zvariant::OwnedObjectPath = reply.body().deserialize().map_err(call)?;
    let reply = conn
        .call_method(
            Some("org.freedesktop.systemd1"),
            path.as_str(),
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &("org.freedesktop.systemd1.Unit", "ActiveState"),
        )
        .map_err(call)?;
    let value: zbus::zvariant::OwnedValue = reply.body().deserialize().map_err(call)?;
    String::try_from(value).map_err(|e| call(zbus::Error::Variant(e)))
}

/// The fabric's state on one GPU, from `nvidia-smi -q`'s `Fabric` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FabricState {
    /// `Completed`: the GPU is in the trained fabric.
    Completed,
    /// `N/A`: the GPU is not in an NVSwitch fabric (a single H200 shows this).
    NotApplicable,
    /// Anything else (`Not Started`, `In Progress`, ...), as printed.
    Other(String),
}

/// The `State` line of each `Fabric` section in `nvidia-smi -q` text; pure. Its layout (a
/// `Fabric` heading, then indented `State : <value>`) is nvidia-smi's, as the H200 test
/// machine prints it.
pub fn parse_fabric_states(text: &str) -> Vec<FabricState> {
    let mut states = Vec::new();
    let mut in_fabric: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if trimmed == "Fabric" {
            in_fabric = Some(indent);
            continue;
        }
        let Some(section_indent) = in_fabric else {
            continue;
        };
        if indent <= section_indent {
            in_fabric = None;
            continue;
        }
        if let Some((key, value)) = trimmed.split_once(':') {
            if key.trim() == "State" {
                states.push(match value.trim() {
                    "Completed" => FabricState::Completed,
                    "N/A" => FabricState::NotApplicable,
                    other => FabricState::Other(other.to_string()),
                });
                in_fabric = None;
            }
        }
    }
    states
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch() -> Vec<NvSwitch> {
        vec![NvSwitch {
            address: "0000:05:00.0".into(),
        }]
    }

    const ON: ServiceSettings = ServiceSettings {
        persistenced: true,
        fabric_manager: true,
    };

    // The lines of NVIDIA's stock fabricmanager.cfg that name paths (the driver package's
    // /usr/share/nvidia/nvswitch/fabricmanager.cfg, as NVIDIA's Fabric Manager user guide lists
    // its options), comments and all.
    const STOCK_FM_CONFIG: &str = "\
# Description: Filename for Fabric Manager logs
LOG_FILE_NAME=/var/log/fabricmanager.log
DAEMONIZE=1
STATE_FILE_NAME =/tmp/fabricmanager.state
#TOPOLOGY_FILE_PATH=/commented/out
TOPOLOGY_FILE_PATH=/usr/share/nvidia/nvswitch
DATABASE_PATH=/usr/share/nvidia/nvswitch
";

    #[test]
    fn fabric_manager_config_points_driver_paths_into_the_overlay() {
        let out = fabric_manager_config(STOCK_FM_CONFIG, Path::new("/run/nvidia/driver"));
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "LOG_FILE_NAME=/var/log/fabricmanager.log",
                "DAEMONIZE=1",
                "STATE_FILE_NAME =/tmp/fabricmanager.state",
                "TOPOLOGY_FILE_PATH=/run/nvidia/driver/usr/share/nvidia/nvswitch",
                "DATABASE_PATH=/run/nvidia/driver/usr/share/nvidia/nvswitch",
            ]
        );
        assert!(out.contains("#TOPOLOGY_FILE_PATH=/commented/out\n"));
        // Rewriting is idempotent: a path already in the overlay stays.
        let again = fabric_manager_config(&out, Path::new("/run/nvidia/driver"));
        let again: Vec<&str> = again.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(again, lines);
    }

    #[test]
    fn fabric_manager_config_adds_the_built_in_defaults_it_leaves_out() {
        let out = fabric_manager_config("DAEMONIZE=1\n", Path::new("/run/nvidia/driver"));
        assert!(out.contains("\nTOPOLOGY_FILE_PATH=/run/nvidia/driver/usr/share/nvidia/nvswitch\n"));
        assert!(out.contains("\nDATABASE_PATH=/run/nvidia/driver/usr/share/nvidia/nvswitch\n"));
    }

    #[test]
    fn fabric_manager_config_is_written_from_the_overlay_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let driver_root = Path::new("/run/nvidia/driver");
        let err = write_fabric_manager_config(&root, driver_root).unwrap_err();
        assert!(
            err.to_string().contains(
                "cannot read /run/nvidia/driver/usr/share/nvidia/nvswitch/fabricmanager.cfg"
            ),
            "{err}"
        );
        assert!(!root.join(FABRIC_MANAGER_CONFIG).exists());
        let stock = root.join(driver_root).join(FABRIC_MANAGER_STOCK_CONFIG);
        std::fs::create_dir_all(stock.parent().unwrap()).unwrap();
        std::fs::write(&stock, STOCK_FM_CONFIG).unwrap();
        write_fabric_manager_config(&root, driver_root).unwrap();
        let written = std::fs::read_to_string(root.join(FABRIC_MANAGER_CONFIG)).unwrap();
        assert!(
            written.contains("\nTOPOLOGY_FILE_PATH=/run/nvidia/driver/usr/share/nvidia/nvswitch\n")
        );
    }

    fn started(decisions: &[ServiceDecision]) -> Vec<DriverService> {
        decisions
            .iter()
            .filter(|d| d.start)
            .map(|d| d.service)
            .collect()
    }

    #[test]
    fn carried_services_come_from_the_manifest_paths() {
        let paths = [
            "usr/bin/nvidia-smi",
            "usr/bin/nvidia-persistenced",
            "usr/sbin/nv-fabricmanager",
        ];
        assert_eq!(
            carried(paths),
            vec![DriverService::Persistenced, DriverService::FabricManager]
        );
        assert!(carried(["lib/modules/x/nvidia.ko"]).is_empty());
    }

    #[test]
    fn single_gpu_host_runs_persistenced_only() {
        let all = DriverService::ALL;
        let decisions = plan(&all, &[], ON);
        assert_eq!(started(&decisions), vec![DriverService::Persistenced]);
        let fm = &decisions[2];
        assert_eq!(fm.service, DriverService::FabricManager);
        assert_eq!(fm.why, "no NVSwitch on the PCI bus");
    }

    #[test]
    fn switch_host_runs_fabric_manager_and_needs_it_even_when_missing() {
        let decisions = plan(&DriverService::ALL, &switch(), ON);
        assert_eq!(
            started(&decisions),
            vec![DriverService::Persistenced, DriverService::FabricManager]
        );
        // nvlsm is carried but has no unit: said, not started.
        assert!(decisions[1].why.contains("no unit"));
        // An overlay without nv-fabricmanager on a switch host: needed and missing.
        let decisions = plan(&[DriverService::Persistenced], &switch(), ON);
        assert!(decisions[2].needed && !decisions[2].start);
        assert!(decisions[2]
            .why
            .contains("does not carry usr/bin/nv-fabricmanager"));
    }

    #[test]
    fn settings_turn_services_off() {
        let off = ServiceSettings {
            persistenced: false,
            fabric_manager: false,
        };
        let decisions = plan(&DriverService::ALL, &switch(), off);
        assert!(started(&decisions).is_empty());
        assert!(decisions
            .iter()
            .all(|d| d.why == "turned off in the configuration"));
        // Persistenced absent from the overlay: not needed, said.
        let decisions = plan(&[], &[], ON);
        assert!(!decisions[0].start);
    }

    fn pci(dir: &Path, address: &str, vendor: &str, class: &str) {
        let function = dir.join("sys/bus/pci/devices").join(address);
        std::fs::create_dir_all(&function).unwrap();
        std::fs::write(function.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(function.join("class"), format!("{class}\n")).unwrap();
    }

    #[test]
    fn nvswitches_are_found_by_vendor_and_class() {
        let host = tempfile::tempdir().unwrap();
        let root = Root::new(host.path());
        assert!(scan_nvswitches(&root).unwrap().is_empty(), "no sysfs");
        // An H200 (3D controller 0x0302), an Intel PCI bridge (0x060400), a Mellanox NIC.
        pci(host.path(), "0000:18:00.0", "0x10de", "0x030200");
        pci(host.path(), "0000:00:01.0", "0x8086", "0x060400");
        pci(host.path(), "0000:1a:00.0", "0x15b3", "0x020000");
        // A non-NVIDIA "other bridge" is no switch.
        pci(host.path(), "0000:00:1f.0", "0x8086", "0x068000");
        assert!(scan_nvswitches(&root).unwrap().is_empty(), "GPU host");
        pci(host.path(), "0000:06:00.0", "0x10de", "0x068000");
        pci(host.path(), "0000:05:00.0", "0x10de", "0x068001");
        let found = scan_nvswitches(&root).unwrap();
        assert_eq!(
            found.iter().map(|s| s.address.as_str()).collect::<Vec<_>>(),
            ["0000:05:00.0", "0000:06:00.0"]
        );
    }

    #[test]
    fn fabric_state_is_read_per_gpu() {
        let text = include_str!("../../tests/fixtures/nvidia-smi/fabric.txt");
        assert_eq!(
            parse_fabric_states(text),
            vec![
                FabricState::Completed,
                FabricState::Other("In Progress".into())
            ]
        );
        let single = include_str!("../../tests/fixtures/nvidia-smi/h200-single.txt");
        assert_eq!(
            parse_fabric_states(single),
            vec![FabricState::NotApplicable]
        );
    }
}

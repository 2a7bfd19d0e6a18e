//! Whether a loaded driver is a usable GPU: the device and capability nodes exist, the driver
//! services the host needs ([`crate::handoff::services`]) are running, the CDI spec (when
//! configured) is written, and on NVSwitch systems the fabric is trained.
//!
//! [`gather`] reads the facts (files under the root, systemd's unit states over D-Bus, the
//! overlay's `nvidia-smi -q`); [`problems`] judges them, pure. The fabric state is read from the
//! overlay's own `nvidia-smi -q` (`Fabric` → `State`), not NVML: the agent links no NVIDIA
//! library, and the overlay's nvidia-smi is the driver's exact version. It is read only where
//! NVSwitches are on the PCI bus; `N/A` (a GPU outside any fabric) counts as not applicable.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::config::Settings;
use crate::handoff::services::{self, DriverService, FabricState, ServiceSettings};
use crate::host::Root;
use crate::kmod::{caps, execute};

/// The facts [`problems`] judges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UsableFacts {
    /// Device and capability nodes the loaded driver should have and `/dev` lacks.
    pub missing_nodes: Vec<PathBuf>,
    /// Each driver service, whether the host needs it, and its unit's state.
    pub services: Vec<ServiceFact>,
    /// The CDI spec, when `outputs.cdi-spec` is configured.
    pub cdi_spec: Option<CdiFact>,
    /// NVSwitches on the PCI bus (their addresses); empty on hosts without a fabric.
    pub nvswitches: Vec<String>,
    /// The fabric state per GPU, read only where there are NVSwitches.
    pub fabric: Option<FabricFact>,
}

/// One driver service as readiness sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ServiceFact {
    /// The service.
    pub service: DriverService,
    /// Whether the host needs it (readiness waits for it).
    pub needed: bool,
    /// Why it is or is not needed.
    pub why: String,
    /// The unit's `ActiveState` (`active`, `failed`, ...), when read.
    pub state: Option<String>,
    /// Why the state could not be read.
    pub state_error: Option<String>,
}

/// The CDI spec's presence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CdiFact {
    /// The configured path.
    pub path: PathBuf,
    /// Whether the file exists.
    pub present: bool,
    /// Whether nvidia-ctk or nvidia-cdi-hook is there to make it
    /// ([`crate::handoff::cdi::generator_available`]); readiness waits for the spec only then.
    pub generator: bool,
}

/// What `nvidia-smi -q` said about the fabric.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FabricFact {
    /// One state per GPU.
    States(Vec<FabricState>),
    /// nvidia-smi could not be run or said nothing about the fabric.
    Unreadable(String),
}

/// Why the GPU is not usable, each reason in words; empty when it is. Pure.
pub fn problems(facts: &UsableFacts) -> Vec<String> {
    let mut out = Vec::new();
    if !facts.missing_nodes.is_empty() {
        let nodes: Vec<String> = facts
            .missing_nodes
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        out.push(format!(
            "device nodes missing: {} (`nvdriver-agent load` makes them)",
            nodes.join(", ")
        ));
    }
    for service in facts.services.iter().filter(|s| s.needed) {
        if let Some(problem) = service_problem(service) {
            out.push(problem);
        }
    }
    if let Some(cdi) = facts
        .cdi_spec
        .as_ref()
        .filter(|c| c.generator && !c.present)
    {
        out.push(format!(
            "the CDI spec {} is not written (see the agent's journal)",
            cdi.path.display()
        ));
    }
    if !facts.nvswitches.is_empty() {
        if let Some(problem) = fabric_problem(facts.fabric.as_ref()) {
            out.push(problem);
        }
    }
    out
}

fn service_problem(service: &ServiceFact) -> Option<String> {
    let name = service.service.name();
    let Some(unit) = service.service.unit() else {
        return Some(format!("{name} is needed: {}", service.why));
    };
    if service.state.is_none() && service.state_error.is_none() {
        return Some(format!("{name} is needed: {}", service.why));
    }
    match (&service.state, &service.state_error) {
        (Some(state), _) if state == "active" => None,
        (Some(state), _) => Some(format!(
            "{name} is not running ({unit} is {state}; `journalctl -u {unit}` says why)"
        )),
        (None, Some(e)) => Some(format!("{name}: cannot read the state of {unit}: {e}")),
        (None, None) => Some(format!("{name} is needed: {}", service.why)),
    }
}

fn fabric_problem(fabric: Option<&FabricFact>) -> Option<String> {
    match fabric {
        None => Some("the NVLink fabric state was not read".into()),
        Some(FabricFact::Unreadable(why)) => {
            Some(format!("cannot read the NVLink fabric state: {why}"))
        }
        Some(FabricFact::States(states)) => {
            let pending: Vec<String> = states
                .iter()
                .enumerate()
                .filter_map(|(gpu, state)| match state {
                    FabricState::Other(s) => Some(format!("GPU {gpu}: {s}")),
                    _ => None,
                })
                .collect();
            (!pending.is_empty()).then(|| {
                format!(
                    "the NVLink fabric is not trained ({}); Fabric Manager trains it",
                    pending.join(", ")
                )
            })
        }
    }
}

/// Read the facts for a loaded driver whose tree is at `driver_root` (a host path). Never fails:
/// what cannot be read is a fact too.
pub fn gather(root: &Root, settings: &Settings, loaded: &[&str]) -> UsableFacts {
    let driver_root = root.join(&settings.driver_root);
    let switches = services::scan_nvswitches(root).unwrap_or_default();
    let carried = services::carried_in_tree(&driver_root);
    let decisions = services::plan(
        &carried,
        &switches,
        ServiceSettings {
            persistenced: settings.persistenced,
            fabric_manager: settings.fabric_manager,
        },
    );
    let bus = decisions
        .iter()
        .any(|d| d.start)
        .then(crate::watch::dbus::system_bus);
    let services = decisions
        .into_iter()
        .map(|d| {
            let (state, state_error) = match (&bus, d.start.then(|| d.service.unit()).flatten()) {
                (Some(Ok(conn)), Some(unit)) => match services::active_state(conn, unit) {
                    Ok(state) => (Some(state), None),
                    Err(e) => (None, Some(e.to_string())),
                },
                (Some(Err(e)), Some(_)) => (None, Some(e.to_string())),
                _ => (None, None),
            };
            ServiceFact {
                service: d.service,
                needed: d.needed,
                why: d.why,
                state,
                state_error,
            }
        })
        .collect();
    let fabric = (!switches.is_empty()).then(|| read_fabric(&driver_root));
    UsableFacts {
        missing_nodes: missing_nodes(root, settings, loaded),
        services,
        cdi_spec: settings.outputs.cdi_spec.as_ref().map(|path| CdiFact {
            path: path.clone(),
            present: root.join(path).exists(),
            generator: crate::handoff::cdi::generator_available(root, &settings.driver_root),
        }),
        nvswitches: switches.into_iter().map(|s| s.address).collect(),
        fabric,
    }
}

fn missing_nodes(root: &Root, settings: &Settings, loaded: &[&str]) -> Vec<PathBuf> {
    let proc_devices = std::fs::read_to_string(root.join("/proc/devices")).unwrap_or_default();
    let device_nodes = execute::device_nodes(root, loaded, &proc_devices)
        .unwrap_or_default()
        .into_iter()
        .map(|n| n.path);
    let cap_nodes = caps::read_nodes(root, &settings.imex_channels)
        .unwrap_or_default()
        .into_iter()
        .map(|n| n.path);
    device_nodes
        .chain(cap_nodes)
        .filter(|path| !root.join(path).exists())
        .collect()
}

/// `nvidia-smi -q` from the overlay (its libraries first, as the units run the services).
fn read_fabric(driver_root: &Path) -> FabricFact {
    let smi = driver_root.join("usr/bin/nvidia-smi");
    let libs = services::library_path(driver_root);
    match Command::new(&smi)
        .arg("-q")
        .env("LD_LIBRARY_PATH", libs)
        .output()
    {
        Ok(out) if out.status.success() => {
            let states = services::parse_fabric_states(&String::from_utf8_lossy(&out.stdout));
            if states.is_empty() {
                FabricFact::Unreadable(format!("{} -q printed no Fabric State", smi.display()))
            } else {
                FabricFact::States(states)
            }
        }
        Ok(out) => FabricFact::Unreadable(format!(
            "{} -q exited with {}: {}",
            smi.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => FabricFact::Unreadable(format!("cannot run {}: {e}", smi.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fm(state: Option<&str>) -> ServiceFact {
        ServiceFact {
            service: DriverService::FabricManager,
            needed: true,
            why: "started as nvdriver-agent-fabricmanager.service".into(),
            state: state.map(str::to_string),
            state_error: None,
        }
    }

    fn switch_host(fabric: FabricFact) -> UsableFacts {
        UsableFacts {
            services: vec![fm(Some("active"))],
            nvswitches: vec!["0000:05:00.0".into()],
            fabric: Some(fabric),
            ..UsableFacts::default()
        }
    }

    #[test]
    fn a_complete_host_has_no_problem() {
        assert!(problems(&UsableFacts::default()).is_empty());
        let trained = switch_host(FabricFact::States(vec![FabricState::Completed; 8]));
        assert!(problems(&trained).is_empty());
        // A single H200: no switch, fabric N/A, nothing to wait for.
        let single = UsableFacts {
            fabric: Some(FabricFact::States(vec![FabricState::NotApplicable])),
            ..UsableFacts::default()
        };
        assert!(problems(&single).is_empty());
    }

    #[test]
    fn missing_nodes_are_named() {
        let facts = UsableFacts {
            missing_nodes: vec!["/dev/nvidia-caps/nvidia-cap1".into()],
            ..UsableFacts::default()
        };
        let p = problems(&facts);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("/dev/nvidia-caps/nvidia-cap1"), "{p:?}");
    }

    #[test]
    fn a_failed_fabric_manager_is_named() {
        let mut facts = switch_host(FabricFact::States(vec![FabricState::Completed]));
        facts.services = vec![fm(Some("failed"))];
        let p = problems(&facts);
        assert_eq!(
            p,
            ["nv-fabricmanager is not running (nvdriver-agent-fabricmanager.service is failed; `journalctl -u nvdriver-agent-fabricmanager.service` says why)"]
        );
        // Needed but not in the overlay: named with why.
        facts.services = vec![ServiceFact {
            state: None,
            why: "the overlay does not carry usr/bin/nv-fabricmanager".into(),
            ..fm(None)
        }];
        assert!(problems(&facts)[0].contains("does not carry usr/bin/nv-fabricmanager"));
        // Its state unreadable (no system bus): not ready, said.
        facts.services = vec![ServiceFact {
            state_error: Some("no bus".into()),
            ..fm(None)
        }];
        assert!(problems(&facts)[0].contains("cannot read the state"));
        // A service not needed is not waited for.
        facts.services = vec![ServiceFact {
            needed: false,
            ..fm(Some("inactive"))
        }];
        assert!(problems(&facts).is_empty());
    }

    #[test]
    fn an_untrained_or_unread_fabric_is_not_ready() {
        let p = problems(&switch_host(FabricFact::States(vec![
            FabricState::Completed,
            FabricState::Other("In Progress".into()),
        ])));
        assert_eq!(
            p,
            ["the NVLink fabric is not trained (GPU 1: In Progress); Fabric Manager trains it"]
        );
        let p = problems(&switch_host(FabricFact::Unreadable("no nvidia-smi".into())));
        assert!(p[0].contains("cannot read the NVLink fabric state: no nvidia-smi"));
        let mut unread = switch_host(FabricFact::Unreadable(String::new()));
        unread.fabric = None;
        assert!(!problems(&unread).is_empty());
    }

    #[test]
    fn a_configured_cdi_spec_must_exist() {
        let facts = UsableFacts {
            cdi_spec: Some(CdiFact {
                path: "/var/run/cdi/nvidia.json".into(),
                present: false,
                generator: true,
            }),
            ..UsableFacts::default()
        };
        assert!(problems(&facts)[0].contains("/var/run/cdi/nvidia.json is not written"));
        // Nothing here can make a spec: the agent claims no CDI, readiness does not wait.
        let mut none = facts.clone();
        none.cdi_spec.as_mut().unwrap().generator = false;
        assert!(problems(&none).is_empty());
    }
}

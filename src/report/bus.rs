//! The agent's own D-Bus object, `org.nvdriveragent.Agent1` at `/org/nvdriveragent/Agent1`, as
//! a client sees it: its names, its properties ([`AgentProperties`], made from a
//! [`StatusReport`]) and how `status` reads them from the running daemon. The daemon serves the
//! object in `daemon::bus`.

use zbus::blocking::{connection, Connection};

use crate::report::status::StatusReport;

/// The well-known bus name the daemon owns on the system bus.
pub const AGENT_NAME: &str = "org.nvdriveragent.Agent1";
/// The object path of the agent's object.
pub const AGENT_PATH: &str = "/org/nvdriveragent/Agent1";
/// The interface that carries the agent's properties.
pub const AGENT_INTERFACE: &str = "org.nvdriveragent.Agent1";

/// Why the daemon's properties could not be read over D-Bus.
#[derive(Debug, thiserror::Error)]
pub enum AgentBusError {
    /// Connecting to the system bus or the `GetAll` call failed (no daemon, no bus, timeout).
    #[error("cannot read {AGENT_NAME}'s properties: {0}")]
    Read(Box<zbus::Error>),
}

/// The properties as D-Bus carries them: strings, empty for "none" (D-Bus has no null).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentProperties {
    /// `RunningKernel`: the running kernel's release.
    pub running_kernel: String,
    /// `LoadedDriverVersion`: the NVIDIA driver version loaded now.
    pub loaded_driver_version: String,
    /// `PendingKernel`: the kernel the host boots next, when it differs from the running one.
    pub pending_kernel: String,
    /// The store directory of the overlay staged for the pending kernel.
    pub staged_overlay: String,
    /// `PolicyState`: `ok`, `held: …`, `not-ready-after-reboot: …` or `not-ready: …`.
    pub policy_state: String,
    /// `LastError`: the most recent error (see [`StatusReport::last_error`]).
    pub last_error: String,
}

impl AgentProperties {
    /// The properties a `status` report implies; `StagedOverlay` only when the last stage was for
    /// the pending kernel and it is staged.
    pub fn from_report(report: &StatusReport) -> AgentProperties {
        let staged_overlay = match (&report.pending, &report.last_stage) {
            (Some(next), Some(stage))
                if report.pending_staged == Some(true)
                    && stage.kernel_release == next.kernel_release =>
            {
                stage
                    .overlay
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            }
            _ => String::new(),
        };
        AgentProperties {
            running_kernel: report.running_kernel.clone(),
            loaded_driver_version: report.loaded_driver.clone().unwrap_or_default(),
            pending_kernel: report
                .pending
                .as_ref()
                .map(|n| n.kernel_release.clone())
                .unwrap_or_default(),
            staged_overlay,
            policy_state: report.policy_state.clone(),
            last_error: report.last_error.clone().unwrap_or_default(),
        }
    }

    /// `(D-Bus name, value)` of every property, in a fixed order.
    pub(crate) fn named(&self) -> [(&'static str, &str); 6] {
        [
            ("RunningKernel", &self.running_kernel),
            ("LoadedDriverVersion", &self.loaded_driver_version),
            ("PendingKernel", &self.pending_kernel),
            ("StagedOverlay", &self.staged_overlay),
            ("PolicyState", &self.policy_state),
            ("LastError", &self.last_error),
        ]
    }
}

/// Take the running daemon's word, read over D-Bus, for what it decides (its policy state and
/// last error); the rest is read from disk either way and agrees with it.
pub fn merge_daemon_view(report: &mut StatusReport, daemon: &AgentProperties) {
    report.read_from = "daemon".into();
    report.policy_state = daemon.policy_state.clone();
    report.last_error = Some(daemon.last_error.clone()).filter(|e| !e.is_empty());
}

/// The running daemon's properties, read over the system bus (for `status`); a daemon that does
/// not answer within two seconds counts as absent.
pub fn read_daemon_properties() -> Result<AgentProperties, AgentBusError> {
    let read = |e| AgentBusError::Read(Box::new(e));
    let connection = connection::Builder::system()
        .map_err(read)?
        .method_timeout(std::time::Duration::from_secs(2))
        .build()
        .map_err(read)?;
    read_properties(&connection)
}

/// The agent's properties, read through `connection`.
pub fn read_properties(connection: &Connection) -> Result<AgentProperties, AgentBusError> {
    let read = |e| AgentBusError::Read(Box::new(e));
    let proxy = zbus::blocking::fdo::PropertiesProxy::builder(connection)
        .destination(AGENT_NAME)
        .map_err(read)?
        .path(AGENT_PATH)
        .map_err(read)?
        .build()
        .map_err(read)?;
    let interface = zbus::names::InterfaceName::from_static_str(AGENT_INTERFACE)
        .map_err(|e| read(zbus::Error::from(e)))?;
    let all = proxy
        .get_all(interface)
        .map_err(|e| read(zbus::Error::from(e)))?;
    let text = |name: &str| -> String {
        all.get(name)
            .and_then(|v| String::try_from(v.clone()).ok())
            .unwrap_or_default()
    };
    Ok(AgentProperties {
        running_kernel: text("RunningKernel"),
        loaded_driver_version: text("LoadedDriverVersion"),
        pending_kernel: text("PendingKernel"),
        staged_overlay: text("StagedOverlay"),
        policy_state: text("PolicyState"),
        last_error: text("LastError"),
    })
}

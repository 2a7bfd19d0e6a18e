//! The agent's own D-Bus object on the system bus: `org.nvdriveragent.Agent1` at
//! `/org/nvdriveragent/Agent1`, with read-only properties for how things stand and the methods
//! `Stage()` and `Reload()`. zbus serves it on its own executor thread; the daemon's main loop
//! only swaps in new property values ([`AgentService::update`]), which emits
//! `PropertiesChanged` for the ones that changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::blocking::{connection, Connection};
use zbus::zvariant::Value;

use crate::status::StatusReport;

pub const AGENT_NAME: &str = "org.nvdriveragent.Agent1";
pub const AGENT_PATH: &str = "/org/nvdriveragent/Agent1";
pub const AGENT_INTERFACE: &str = "org.nvdriveragent.Agent1";

#[derive(Debug, thiserror::Error)]
pub enum AgentBusError {
    #[error("cannot serve {AGENT_NAME} on the system bus: {0}; the agent goes on without its D-Bus object (is units/org.nvdriveragent.Agent1.conf installed in /usr/share/dbus-1/system.d/?)")]
    Serve(#[source] Box<zbus::Error>),
    #[error("cannot read {AGENT_NAME}'s properties: {0}")]
    Read(#[source] Box<zbus::Error>),
}

/// The properties as D-Bus carries them: strings, empty for "none" (D-Bus has no null).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentProperties {
    pub running_kernel: String,
    pub loaded_driver_version: String,
    pub pending_kernel: String,
    /// The store directory of the overlay staged for the pending kernel.
    pub staged_overlay: String,
    pub policy_state: String,
    pub last_error: String,
}

impl AgentProperties {
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
    fn named(&self) -> [(&'static str, &str); 6] {
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

type StageHook = Box<dyn Fn() + Send + Sync>;
/// Checks and applies a new configuration; `Err` is the message for the caller.
type ReloadHook = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

struct AgentObject {
    properties: Arc<Mutex<AgentProperties>>,
    on_stage: StageHook,
    on_reload: ReloadHook,
}

impl AgentObject {
    fn get(&self, pick: impl Fn(&AgentProperties) -> &String) -> String {
        pick(&self.properties.lock().unwrap_or_else(|e| e.into_inner())).clone()
    }
}

#[zbus::interface(name = "org.nvdriveragent.Agent1")]
impl AgentObject {
    /// `uname -r` of the running kernel.
    #[zbus(property)]
    fn running_kernel(&self) -> String {
        self.get(|p| &p.running_kernel)
    }
    /// The NVIDIA driver version loaded now; empty when none.
    #[zbus(property)]
    fn loaded_driver_version(&self) -> String {
        self.get(|p| &p.loaded_driver_version)
    }
    /// The kernel the host boots next when it differs from the running one; empty when none.
    #[zbus(property)]
    fn pending_kernel(&self) -> String {
        self.get(|p| &p.pending_kernel)
    }
    /// The store directory of the overlay staged for the pending kernel; empty when none.
    #[zbus(property)]
    fn staged_overlay(&self) -> String {
        self.get(|p| &p.staged_overlay)
    }
    /// `ok`, `held: …`, `not-ready-after-reboot: …` or `not-ready: …`.
    #[zbus(property)]
    fn policy_state(&self) -> String {
        self.get(|p| &p.policy_state)
    }
    /// The most recent error; empty when none.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.get(|p| &p.last_error)
    }

    /// Look at the next kernel again now (as `nvdriver-agent stage` or SIGUSR1).
    fn stage(&self) {
        (self.on_stage)();
    }

    /// Read the configuration again (as SIGHUP); fails, changing nothing, when it is invalid.
    fn reload(&self) -> zbus::fdo::Result<()> {
        (self.on_reload)().map_err(zbus::fdo::Error::Failed)
    }
}

/// The served object; dropping it leaves the bus.
pub struct AgentService {
    connection: Connection,
    properties: Arc<Mutex<AgentProperties>>,
}

impl AgentService {
    /// Connect to the system bus, serve the object and take the well-known name.
    pub fn start(
        initial: AgentProperties,
        on_stage: impl Fn() + Send + Sync + 'static,
        on_reload: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<AgentService, AgentBusError> {
        let properties = Arc::new(Mutex::new(initial));
        let object = AgentObject {
            properties: properties.clone(),
            on_stage: Box::new(on_stage),
            on_reload: Box::new(on_reload),
        };
        let serve = |e| AgentBusError::Serve(Box::new(e));
        let connection = connection::Builder::system()
            .map_err(serve)?
            .serve_at(AGENT_PATH, object)
            .map_err(serve)?
            .name(AGENT_NAME)
            .map_err(serve)?
            .build()
            .map_err(serve)?;
        Ok(AgentService {
            connection,
            properties,
        })
    }

    /// Swap in new values and emit `PropertiesChanged` for those that changed.
    pub fn update(&self, new: AgentProperties) -> Result<(), AgentBusError> {
        let changed: HashMap<&str, Value<'_>> = {
            let mut current = self.properties.lock().unwrap_or_else(|e| e.into_inner());
            if *current == new {
                return Ok(());
            }
            let changed = new
                .named()
                .into_iter()
                .zip(current.named())
                .filter(|((_, new), (_, old))| new != old)
                .map(|((name, value), _)| (name, Value::from(value.to_string())))
                .collect();
            *current = new;
            changed
        };
        self.connection
            .emit_signal(
                None::<&str>,
                AGENT_PATH,
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                &(AGENT_INTERFACE, changed, Vec::<&str>::new()),
            )
            .map_err(|e| AgentBusError::Serve(Box::new(e)))
    }
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

//! Serving the agent's D-Bus object on the system bus (names and properties in
//! [`crate::report::bus`]): read-only properties for how things stand and the methods
//! `Stage()` and `Reload()`. zbus serves it on its own executor thread; the daemon's main loop
//! only swaps in new property values ([`AgentService::update`]), which emits
//! `PropertiesChanged` for the ones that changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::blocking::{connection, Connection};
use zbus::zvariant::Value;

use crate::report::bus::{AgentProperties, AGENT_INTERFACE, AGENT_NAME, AGENT_PATH};

/// The daemon could not serve its object; it goes on without it.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Connecting to the system bus, serving the object, taking the name or emitting
    /// `PropertiesChanged` failed.
    #[error("cannot serve {AGENT_NAME} on the system bus: {0}; the agent goes on without its D-Bus object (is units/org.nvdriveragent.Agent1.conf installed in /usr/share/dbus-1/system.d/?)")]
    Serve(Box<zbus::Error>),
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
    ) -> Result<AgentService, ServeError> {
        let properties = Arc::new(Mutex::new(initial));
        let object = AgentObject {
            properties: properties.clone(),
            on_stage: Box::new(on_stage),
            on_reload: Box::new(on_reload),
        };
        let serve = |e| ServeError::Serve(Box::new(e));
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
    pub fn update(&self, new: AgentProperties) -> Result<(), ServeError> {
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
            .map_err(|e| ServeError::Serve(Box::new(e)))
    }
}

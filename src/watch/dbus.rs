//! D-Bus edges: the OS update services' signals as hints, update_engine's status, and for the
//! `hold` policy logind's shutdown inhibitor and systemd's `Reload()` and `SystemState`.
//!
//! Every listener runs on its own thread over a blocking zbus connection to the system bus
//! (`DBUS_SYSTEM_BUS_ADDRESS` is honoured, which is how tests point it at their own bus). A
//! signal is only ever a hint: the handler that receives it re-reads the truth from disk.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tracing::{debug, warn};
pub use zbus::blocking::Connection;
use zbus::blocking::MessageIterator;
use zbus::message::Type as MessageType;
use zbus::MatchRule;

/// rpm-ostreed's well-known bus name.
pub const RPM_OSTREE_NAME: &str = "org.projectatomic.rpmostree1";
/// Path namespace of every rpm-ostree object; property changes under it are hints.
pub const RPM_OSTREE_PATH_NAMESPACE: &str = "/org/projectatomic/rpmostree1";
/// update_engine's well-known bus name (Flatcar).
pub const UPDATE_ENGINE_NAME: &str = "com.coreos.update1";
/// The object update_engine exports (its XML says `/com/coreos/update1/Manager`, but
/// `dbus_constants.h` and the running service use this path).
pub const UPDATE_ENGINE_PATH: &str = "/com/coreos/update1";
/// update_engine's interface: the `GetStatus` method and the `StatusUpdate` signal.
pub const UPDATE_ENGINE_INTERFACE: &str = "com.coreos.update1.Manager";
/// systemd-logind's well-known bus name.
pub const LOGIND_NAME: &str = "org.freedesktop.login1";
/// logind's manager object.
pub const LOGIND_PATH: &str = "/org/freedesktop/login1";
/// logind's manager interface, which has `Inhibit`.
pub const LOGIND_INTERFACE: &str = "org.freedesktop.login1.Manager";

/// systemd's (PID 1) well-known bus name.
pub const SYSTEMD_NAME: &str = "org.freedesktop.systemd1";
/// systemd's manager object.
pub const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
/// systemd's manager interface: `Reload()` and the `SystemState` property.
pub const SYSTEMD_INTERFACE: &str = "org.freedesktop.systemd1.Manager";

/// Why a D-Bus connection, signal subscription or method call failed.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    /// The system bus could not be reached.
    #[error("cannot connect to the system bus: {0}; the agent goes on without D-Bus hints (file-system events still work)")]
    Connect(Box<zbus::Error>),
    /// A match rule for signals could not be built or registered.
    #[error("cannot subscribe to {what} signals: {error}")]
    Subscribe {
        /// Which signals, e.g. `rpm-ostree` or `update_engine`.
        what: &'static str,
        /// zbus's error.
        error: Box<zbus::Error>,
    },
    /// A method call failed, or its reply did not have the expected type.
    #[error("{service}.{method} failed: {error}")]
    Call {
        /// Bus name of the service called.
        service: &'static str,
        /// The method's name, e.g. `GetStatus` or `Inhibit`.
        method: &'static str,
        /// zbus's error.
        error: Box<zbus::Error>,
    },
}

/// What a D-Bus listener tells the daemon.
#[derive(Clone, Debug, PartialEq)]
pub enum Hint {
    /// rpm-ostree changed something (a deployment, a transaction): look at the sysroot again.
    RpmOstree,
    /// update_engine's status, from `GetStatus` or a `StatusUpdate` signal.
    UpdateEngine {
        /// update_engine's `current_operation`, e.g. `UPDATE_STATUS_UPDATED_NEED_REBOOT`;
        /// [`crate::watch::flatcar::update_engine_state`] maps it.
        current_operation: String,
    },
    /// update_engine left or joined the bus; its last status is no longer known.
    UpdateEngineGone,
}

/// update_engine's `GetStatus`/`StatusUpdate` payload, as its XML declares it (`xdssx`).
pub type UpdateEngineStatus = (i64, f64, String, String, i64);

/// Connect to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
pub fn system_bus() -> Result<Connection, DbusError> {
    Connection::system().map_err(|e| DbusError::Connect(Box::new(e)))
}

fn signal_iterator(
    conn: &Connection,
    what: &'static str,
    rule: zbus::Result<MatchRule<'static>>,
) -> Result<MessageIterator, DbusError> {
    let subscribe = |source| DbusError::Subscribe {
        what,
        error: Box::new(source),
    };
    let rule = rule.map_err(subscribe)?;
    // A bounded queue: a signal storm costs at most this many messages of memory. zbus does not
    // drop what does not fit: it stops reading the connection until the queue has room, method
    // replies included. So every iterator needs a thread consuming it before the connection is
    // used for a call.
    MessageIterator::for_match_rule(rule, conn, Some(64)).map_err(subscribe)
}

/// `PropertiesChanged` from any rpm-ostree object. Matched by path namespace, not by sender:
/// the bus matches a rule's sender against unique names, and rpm-ostreed gets a new one each
/// time it is activated. A stray match only costs a re-read.
pub fn rpm_ostree_rule() -> zbus::Result<MatchRule<'static>> {
    Ok(MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path_namespace(RPM_OSTREE_PATH_NAMESPACE)?
        .build())
}

/// update_engine's `StatusUpdate` signals from its manager object.
pub fn update_engine_rule() -> zbus::Result<MatchRule<'static>> {
    Ok(MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface(UPDATE_ENGINE_INTERFACE)?
        .member("StatusUpdate")?
        .path(UPDATE_ENGINE_PATH)?
        .build())
}

fn name_owner_rule(name: &'static str) -> zbus::Result<MatchRule<'static>> {
    Ok(MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender("org.freedesktop.DBus")?
        .interface("org.freedesktop.DBus")?
        .member("NameOwnerChanged")?
        .add_arg(name)?
        .build())
}

/// Listen for rpm-ostree's signals; `on_hint` runs on the listener thread.
pub fn spawn_rpm_ostree_listener(
    conn: &Connection,
    on_hint: impl Fn(Hint) + Send + 'static,
) -> Result<JoinHandle<()>, DbusError> {
    let signals = signal_iterator(conn, "rpm-ostree", rpm_ostree_rule())?;
    Ok(std::thread::Builder::new()
        .name("rpm-ostree-hints".into())
        .spawn(move || {
            for message in signals {
                match message {
                    Ok(_) => on_hint(Hint::RpmOstree),
                    Err(e) => debug!(error = %e, "rpm-ostree signal stream"),
                }
            }
        })
        .expect("spawning a thread"))
}

/// Ask update_engine for its status now.
pub fn update_engine_status(conn: &Connection) -> Result<UpdateEngineStatus, DbusError> {
    let call = |source| DbusError::Call {
        service: UPDATE_ENGINE_NAME,
        method: "GetStatus",
        error: Box::new(source),
    };
    let reply = conn
        .call_method(
            Some(UPDATE_ENGINE_NAME),
            UPDATE_ENGINE_PATH,
            Some(UPDATE_ENGINE_INTERFACE),
            "GetStatus",
            &(),
        )
        .map_err(call)?;
    reply.body().deserialize().map_err(call)
}

/// Listen for update_engine's `StatusUpdate`, and ask `GetStatus` at start and whenever
/// update_engine (re)joins the bus, so a restart of update_engine is not a blind spot.
pub fn spawn_update_engine_listener(
    conn: &Connection,
    on_hint: impl Fn(Hint) + Send + Sync + 'static,
) -> Result<Vec<JoinHandle<()>>, DbusError> {
    let on_hint = Arc::new(on_hint);
    let statuses = signal_iterator(conn, "update_engine", update_engine_rule())?;
    let owners = signal_iterator(
        conn,
        "update_engine NameOwnerChanged",
        name_owner_rule(UPDATE_ENGINE_NAME),
    )?;

    // The status thread must consume signals while the first GetStatus is under way (see
    // signal_iterator); what update_engine said last must still reach `on_hint` last. Until the
    // answer is handed on, the thread keeps only the latest signal, and it goes after the answer.
    let first_answer = Arc::new(Mutex::new(FirstAnswer::default()));
    let status_hint = on_hint.clone();
    let status_gate = first_answer.clone();
    let status_thread = std::thread::Builder::new()
        .name("update-engine-status".into())
        .spawn(move || {
            for message in statuses {
                let status: Result<UpdateEngineStatus, _> =
                    message.and_then(|m| m.body().deserialize());
                match status {
                    Ok((_, _, current_operation, _, _)) => {
                        let mut gate = status_gate.lock().unwrap_or_else(PoisonError::into_inner);
                        if gate.handed_on {
                            status_hint(Hint::UpdateEngine { current_operation })
                        } else {
                            gate.held = Some(current_operation);
                        }
                    }
                    Err(e) => warn!(error = %e, "malformed update_engine StatusUpdate; ignored"),
                }
            }
        })
        .expect("spawning a thread");
    let answer = update_engine_status(conn);
    {
        let mut gate = first_answer.lock().unwrap_or_else(PoisonError::into_inner);
        hand_on_status(answer, on_hint.as_ref());
        gate.handed_on = true;
        if let Some(current_operation) = gate.held.take() {
            on_hint(Hint::UpdateEngine { current_operation });
        }
    }

    let owner_conn = conn.clone();
    let owner_thread = std::thread::Builder::new()
        .name("update-engine-owner".into())
        .spawn(move || {
            for message in owners {
                let new_owner: Option<String> = message.ok().and_then(|m| {
                    m.body()
                        .deserialize::<(String, String, String)>()
                        .ok()
                        .map(|(_, _, new)| new)
                });
                on_hint(Hint::UpdateEngineGone);
                if new_owner.is_some_and(|owner| !owner.is_empty()) {
                    ask_update_engine(&owner_conn, on_hint.as_ref());
                }
            }
        })
        .expect("spawning a thread");
    Ok(vec![status_thread, owner_thread])
}

/// The first `GetStatus` answer, and the latest signal that came while it was awaited.
#[derive(Default)]
struct FirstAnswer {
    handed_on: bool,
    held: Option<String>,
}

fn ask_update_engine(conn: &Connection, on_hint: &(dyn Fn(Hint) + Send + Sync)) {
    hand_on_status(update_engine_status(conn), on_hint);
}

fn hand_on_status(
    answer: Result<UpdateEngineStatus, DbusError>,
    on_hint: &(dyn Fn(Hint) + Send + Sync),
) {
    match answer {
        Ok((_, _, current_operation, _, _)) => on_hint(Hint::UpdateEngine { current_operation }),
        Err(e) => debug!(error = %e, "update_engine not reachable now"),
    }
}

/// A held logind inhibitor lock; dropping it (closing the fd) releases it.
#[derive(Debug)]
pub struct Inhibitor {
    _fd: OwnedFd,
}

/// Take a logind `shutdown` block inhibitor: `systemctl reboot` and reboot coordinators that ask
/// logind (FLUO, kured, locksmith) wait until it is released.
pub fn inhibit_shutdown(conn: &Connection, why: &str) -> Result<Inhibitor, DbusError> {
    let call = |source| DbusError::Call {
        service: LOGIND_NAME,
        method: "Inhibit",
        error: Box::new(source),
    };
    let reply = conn
        .call_method(
            Some(LOGIND_NAME),
            LOGIND_PATH,
            Some(LOGIND_INTERFACE),
            "Inhibit",
            &("shutdown", "nvdriver-agent", why, "block"),
        )
        .map_err(call)?;
    let fd: zbus::zvariant::OwnedFd = reply.body().deserialize().map_err(call)?;
    Ok(Inhibitor { _fd: fd.into() })
}

/// Ask systemd to reload its unit files (`systemctl daemon-reload`), so a runtime drop-in
/// written or removed under `/run/systemd/system` takes effect. systemd answers once the reload
/// is done (systemd src/core/dbus-manager.c `method_reload`: the reply is sent after reloading).
pub fn systemd_reload(conn: &Connection) -> Result<(), DbusError> {
    conn.call_method(
        Some(SYSTEMD_NAME),
        SYSTEMD_PATH,
        Some(SYSTEMD_INTERFACE),
        "Reload",
        &(),
    )
    .map(drop)
    .map_err(|source| DbusError::Call {
        service: SYSTEMD_NAME,
        method: "Reload",
        error: Box::new(source),
    })
}

/// systemd's `SystemState` (what `systemctl is-system-running` prints): `running`, `degraded`,
/// `stopping` once a shutdown or reboot is under way, and so on.
pub fn systemd_system_state(conn: &Connection) -> Result<String, DbusError> {
    let call = |source| DbusError::Call {
        service: SYSTEMD_NAME,
        method: "Get(SystemState)",
        error: Box::new(source),
    };
    let reply = conn
        .call_method(
            Some(SYSTEMD_NAME),
            SYSTEMD_PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(SYSTEMD_INTERFACE, "SystemState"),
        )
        .map_err(call)?;
    let value: zbus::zvariant::OwnedValue = reply.body().deserialize().map_err(call)?;
    String::try_from(value).map_err(|e| call(zbus::Error::Variant(e)))
}

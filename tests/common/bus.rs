//! A private D-Bus bus (a real `dbus-daemon`) and test peers serving the interfaces of the real
//! services the agent talks to: rpm-ostree's Sysroot, update_engine's Manager, logind's Inhibit,
//! systemd's Manager (`Reload()`, `SystemState`).
//! The agent under test is pointed at the bus with `DBUS_SYSTEM_BUS_ADDRESS`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use zbus::blocking::{connection, Connection};
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

pub const RPM_OSTREE_NAME: &str = "org.projectatomic.rpmostree1";
pub const SYSROOT_PATH: &str = "/org/projectatomic/rpmostree1/Sysroot";
pub const SYSROOT_INTERFACE: &str = "org.projectatomic.rpmostree1.Sysroot";
pub const UPDATE_ENGINE_NAME: &str = "com.coreos.update1";
pub const UPDATE_ENGINE_PATH: &str = "/com/coreos/update1";
pub const LOGIND_NAME: &str = "org.freedesktop.login1";
pub const LOGIND_PATH: &str = "/org/freedesktop/login1";

/// A `dbus-daemon` of our own, on a socket in a temp dir, that lets everyone do everything.
pub struct TestBus {
    pub address: String,
    daemon: Child,
    _dir: tempfile::TempDir,
}

/// The system bus's default policy (dbus's `system.conf`): nobody owns names or calls methods
/// unless a policy file in system.d allows it.
const SYSTEM_DEFAULT_POLICY: &str = r#"<policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>"#;

impl TestBus {
    pub fn start() -> TestBus {
        TestBus::start_with(
            r#"<policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>"#,
        )
    }

    /// A bus with the system bus's default policy plus `policy_file` (as from system.d), on a
    /// socket every user can reach.
    pub fn system_like(policy_file: &Path) -> TestBus {
        TestBus::start_with(&format!(
            "{SYSTEM_DEFAULT_POLICY}\n  <include>{}</include>",
            policy_file.display()
        ))
    }

    fn start_with(policy: &str) -> TestBus {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("bus");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  {policy}
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut daemon = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            // It complains that it cannot raise its fd limit when not root; nothing else to say.
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (package dbus) must be installed: scripts/setup installs it");
        let mut line = String::new();
        BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:"), "dbus-daemon said {line:?}");
        TestBus {
            address,
            daemon,
            _dir: dir,
        }
    }

    pub fn connect(&self) -> Connection {
        connection::Builder::address(self.address.as_str())
            .unwrap()
            .build()
            .unwrap()
    }

    /// A command with the system bus pointed here.
    pub fn env(&self, command: &mut Command) {
        command.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address);
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// rpm-ostree's `Sysroot` object: the properties its XML declares, read-only.
pub struct Sysroot {
    pub path: String,
    pub deployments: Vec<HashMap<String, OwnedValue>>,
}

#[zbus::interface(name = "org.projectatomic.rpmostree1.Sysroot")]
impl Sysroot {
    #[zbus(property)]
    fn booted(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from("/org/projectatomic/rpmostree1/fedora_coreos").unwrap()
    }
    #[zbus(property)]
    fn path(&self) -> String {
        self.path.clone()
    }
    #[zbus(property)]
    fn active_transaction(&self) -> (String, String, String) {
        Default::default()
    }
    #[zbus(property)]
    fn active_transaction_path(&self) -> String {
        String::new()
    }
    #[zbus(property)]
    fn automatic_update_policy(&self) -> String {
        "none".into()
    }
    #[zbus(property)]
    fn deployments(&self) -> Vec<HashMap<String, OwnedValue>> {
        self.deployments.clone()
    }
}

/// A peer owning `org.projectatomic.rpmostree1` with the Sysroot object.
pub struct RpmOstreePeer {
    pub conn: Connection,
}

impl RpmOstreePeer {
    pub fn start(bus: &TestBus) -> RpmOstreePeer {
        let conn = connection::Builder::address(bus.address.as_str())
            .unwrap()
            .name(RPM_OSTREE_NAME)
            .unwrap()
            .serve_at(
                SYSROOT_PATH,
                Sysroot {
                    path: "/sysroot".into(),
                    deployments: Vec::new(),
                },
            )
            .unwrap()
            .build()
            .unwrap();
        RpmOstreePeer { conn }
    }

    /// What rpmostreed emits when a deployment is added (`Deployments` changed), in the
    /// standard `PropertiesChanged(sa{sv}as)` shape.
    pub fn emit_deployments_changed(&self, deployment_ids: &[&str]) {
        let deployments: Vec<HashMap<&str, Value>> = deployment_ids
            .iter()
            .map(|id| HashMap::from([("id", Value::from(*id))]))
            .collect();
        let changed = HashMap::from([("Deployments", Value::from(deployments))]);
        self.conn
            .emit_signal(
                None::<()>,
                SYSROOT_PATH,
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                &(SYSROOT_INTERFACE, changed, Vec::<&str>::new()),
            )
            .unwrap();
    }
}

/// update_engine's status, as `GetStatus` returns it.
#[derive(Clone)]
pub struct UpdateStatus {
    pub current_operation: String,
    pub new_version: String,
}

pub struct UpdateEngineManager {
    status: Arc<Mutex<UpdateStatus>>,
}

#[zbus::interface(name = "com.coreos.update1.Manager")]
impl UpdateEngineManager {
    fn attempt_update(&self) {}
    fn reset_status(&self) {}
    #[zbus(out_args(
        "last_checked_time",
        "progress",
        "current_operation",
        "new_version",
        "new_size"
    ))]
    fn get_status(&self) -> (i64, f64, String, String, i64) {
        let status = self.status.lock().unwrap().clone();
        (
            1_700_000_000,
            1.0,
            status.current_operation,
            status.new_version,
            0,
        )
    }
}

pub struct UpdateEnginePeer {
    pub conn: Connection,
    status: Arc<Mutex<UpdateStatus>>,
}

impl UpdateEnginePeer {
    pub fn start(bus: &TestBus, current_operation: &str) -> UpdateEnginePeer {
        let status = Arc::new(Mutex::new(UpdateStatus {
            current_operation: current_operation.into(),
            new_version: String::new(),
        }));
        let conn = connection::Builder::address(bus.address.as_str())
            .unwrap()
            .name(UPDATE_ENGINE_NAME)
            .unwrap()
            .serve_at(
                UPDATE_ENGINE_PATH,
                UpdateEngineManager {
                    status: status.clone(),
                },
            )
            .unwrap()
            .build()
            .unwrap();
        UpdateEnginePeer { conn, status }
    }

    /// Change the status and broadcast `StatusUpdate(xdssx)` as update_engine does.
    pub fn set_status(&self, current_operation: &str, new_version: &str) {
        *self.status.lock().unwrap() = UpdateStatus {
            current_operation: current_operation.into(),
            new_version: new_version.into(),
        };
        self.conn
            .emit_signal(
                None::<()>,
                UPDATE_ENGINE_PATH,
                "com.coreos.update1.Manager",
                "StatusUpdate",
                &(
                    1_700_000_000i64,
                    1.0f64,
                    current_operation,
                    new_version,
                    0i64,
                ),
            )
            .unwrap();
    }
}

/// logind's `Inhibit`: like logind, hands out the write end of a pipe and keeps the read end;
/// the inhibitor is held until every copy of the write end is closed.
pub struct Login1Manager {
    held: Arc<Mutex<Vec<(String, OwnedFd)>>>,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Login1Manager {
    fn inhibit(
        &self,
        what: &str,
        who: &str,
        why: &str,
        mode: &str,
    ) -> zbus::fdo::Result<zbus::zvariant::OwnedFd> {
        let (read, write) =
            nix::unistd::pipe().map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        self.held
            .lock()
            .unwrap()
            .push((format!("{what}|{who}|{why}|{mode}"), read));
        Ok(write.into())
    }
}

pub struct LogindPeer {
    /// Held for the name on the bus; never read.
    #[allow(dead_code)]
    pub conn: Connection,
    held: Arc<Mutex<Vec<(String, OwnedFd)>>>,
}

impl LogindPeer {
    pub fn start(bus: &TestBus) -> LogindPeer {
        let held = Arc::new(Mutex::new(Vec::new()));
        let conn = connection::Builder::address(bus.address.as_str())
            .unwrap()
            .name(LOGIND_NAME)
            .unwrap()
            .serve_at(LOGIND_PATH, Login1Manager { held: held.clone() })
            .unwrap()
            .build()
            .unwrap();
        LogindPeer { conn, held }
    }

    /// The inhibitors taken so far whose holder still has them open:
    /// `what|who|why|mode` for each.
    pub fn active_inhibitors(&self) -> Vec<String> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let held = self.held.lock().unwrap();
        held.iter()
            .filter(|(_, read)| {
                let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
                let ready = poll(&mut fds, PollTimeout::ZERO).unwrap();
                // A closed write end shows as POLLHUP on the read end.
                ready == 0
                    || !fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLHUP))
            })
            .map(|(desc, _)| desc.clone())
            .collect()
    }
}

pub const SYSTEMD_NAME: &str = "org.freedesktop.systemd1";
pub const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";

/// systemd's Manager, the two members the agent uses, with upstream's signatures
/// (man org.freedesktop.systemd1: `Reload();`, `readonly s SystemState`). Like systemd, `Reload()`
/// answers once the reload is done; each reload records which of `watched` exist then (the
/// drop-ins systemd would read).
pub struct Systemd1Manager {
    state: Arc<Mutex<SystemdSeen>>,
}

#[derive(Default)]
struct SystemdSeen {
    system_state: String,
    watched: Vec<std::path::PathBuf>,
    reloads: Vec<Vec<bool>>,
    /// `(method, unit)` of each RestartUnit call.
    unit_calls: Vec<(String, String)>,
    /// The `ActiveState` a restarted unit reaches (`active`, or `failed` for a daemon that dies).
    restart_result: String,
    /// Unit name → `ActiveState`; absent is `inactive`.
    unit_states: HashMap<String, String>,
}

/// A unit's object path as systemd makes it (src/basic/bus-label.c `bus_label_escape`: every
/// byte but [A-Za-z0-9] becomes `_xx`).
pub fn unit_path(unit: &str) -> String {
    let label: String = unit
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect();
    format!("{SYSTEMD_PATH}/unit/{label}")
}

/// `org.freedesktop.systemd1.Unit`, its `ActiveState` only.
struct Systemd1Unit {
    name: String,
    state: Arc<Mutex<SystemdSeen>>,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Unit")]
impl Systemd1Unit {
    #[zbus(property)]
    fn active_state(&self) -> String {
        let seen = self.state.lock().unwrap();
        seen.unit_states
            .get(&self.name)
            .cloned()
            .unwrap_or_else(|| "inactive".into())
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Systemd1Manager {
    fn reload(&self) {
        let mut seen = self.state.lock().unwrap();
        let present = seen.watched.iter().map(|p| p.exists()).collect();
        seen.reloads.push(present);
    }

    /// `RestartUnit(in s name, in s mode, out o job)`; the job is done at once here.
    fn restart_unit(&self, name: String, _mode: String) -> zbus::zvariant::OwnedObjectPath {
        let mut seen = self.state.lock().unwrap();
        seen.unit_calls.push(("RestartUnit".into(), name.clone()));
        let result = seen.restart_result.clone();
        seen.unit_states.insert(name, result);
        zbus::zvariant::OwnedObjectPath::try_from(format!("{SYSTEMD_PATH}/job/1")).unwrap()
    }

    /// `LoadUnit(in s name, out o unit)`.
    fn load_unit(&self, name: String) -> zbus::zvariant::OwnedObjectPath {
        zbus::zvariant::OwnedObjectPath::try_from(unit_path(&name)).unwrap()
    }

    #[zbus(property)]
    fn system_state(&self) -> String {
        self.state.lock().unwrap().system_state.clone()
    }
}

pub struct SystemdPeer {
    #[allow(dead_code)]
    pub conn: Connection,
    state: Arc<Mutex<SystemdSeen>>,
}

impl SystemdPeer {
    /// Serve the Manager in `system_state` (`running`, `stopping`, …); each `Reload()` notes
    /// which of `watched` (real paths) exist.
    pub fn start(
        bus: &TestBus,
        system_state: &str,
        watched: Vec<std::path::PathBuf>,
    ) -> SystemdPeer {
        Self::start_with_units(bus, system_state, watched, &[], "active")
    }

    /// The same, also serving `units` (their `ActiveState`); a restarted unit becomes
    /// `restart_result`.
    pub fn start_with_units(
        bus: &TestBus,
        system_state: &str,
        watched: Vec<std::path::PathBuf>,
        units: &[&str],
        restart_result: &str,
    ) -> SystemdPeer {
        let state = Arc::new(Mutex::new(SystemdSeen {
            system_state: system_state.into(),
            watched,
            restart_result: restart_result.into(),
            ..SystemdSeen::default()
        }));
        let mut builder = connection::Builder::address(bus.address.as_str())
            .unwrap()
            .name(SYSTEMD_NAME)
            .unwrap()
            .serve_at(
                SYSTEMD_PATH,
                Systemd1Manager {
                    state: state.clone(),
                },
            )
            .unwrap();
        for unit in units {
            builder = builder
                .serve_at(
                    unit_path(unit),
                    Systemd1Unit {
                        name: unit.to_string(),
                        state: state.clone(),
                    },
                )
                .unwrap();
        }
        let conn = builder.build().unwrap();
        SystemdPeer { conn, state }
    }

    /// `(method, unit)` of each RestartUnit so far.
    pub fn unit_calls(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().unit_calls.clone()
    }

    /// For each `Reload()` so far, which of the watched files existed.
    pub fn reloads(&self) -> Vec<Vec<bool>> {
        self.state.lock().unwrap().reloads.clone()
    }
}

/// Parse one of the upstream XML files in tests/fixtures/interfaces.
pub fn upstream_node(file: &str) -> zbus_xml::Node<'static> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/interfaces")
        .join(file);
    let xml = std::fs::read(&path).unwrap();
    zbus_xml::Node::from_reader(xml.as_slice()).unwrap()
}

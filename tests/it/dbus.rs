//! The D-Bus edges against a real `dbus-daemon` and peers serving the real interfaces.

use std::sync::mpsc;
use std::time::Duration;

use crate::common::bus::{self, LogindPeer, RpmOstreePeer, TestBus, UpdateEnginePeer};
use nvdriver_agent::watch::dbus::{self as agent_dbus, Hint};

const WAIT: Duration = Duration::from_secs(10);

/// What a peer serves at `path` for `interface`, by introspection over the bus.
fn served(bus: &TestBus, name: &str, path: &str, interface: &str) -> zbus_xml::Interface<'static> {
    let conn = bus.connect();
    let reply = conn
        .call_method(
            Some(name),
            path,
            Some("org.freedesktop.DBus.Introspectable"),
            "Introspect",
            &(),
        )
        .unwrap();
    let xml: String = reply.body().deserialize().unwrap();
    let node = zbus_xml::Node::from_reader(xml.as_bytes()).unwrap();
    node.interfaces()
        .iter()
        .find(|i| i.name() == interface)
        .unwrap_or_else(|| panic!("{name} does not serve {interface} at {path}"))
        .clone()
}

fn signature_of(args: &[zbus_xml::Arg]) -> Vec<String> {
    args.iter().map(|a| a.ty().to_string()).collect()
}

/// The update_engine peer serves exactly the upstream Manager interface.
#[test]
fn update_engine_peer_matches_upstream_xml() {
    let bus = TestBus::start();
    let _peer = UpdateEnginePeer::start(&bus, "UPDATE_STATUS_IDLE");
    let upstream_node = bus::upstream_node("update_engine.xml");
    let upstream = upstream_node
        .interfaces()
        .iter()
        .find(|i| i.name() == "com.coreos.update1.Manager")
        .unwrap();
    let ours = served(
        &bus,
        bus::UPDATE_ENGINE_NAME,
        bus::UPDATE_ENGINE_PATH,
        "com.coreos.update1.Manager",
    );
    for method in upstream.methods() {
        let mine = ours
            .methods()
            .iter()
            .find(|m| m.name() == method.name())
            .unwrap_or_else(|| panic!("peer lacks method {}", method.name()));
        assert_eq!(
            signature_of(mine.args()),
            signature_of(method.args()),
            "{}",
            method.name()
        );
    }
    // zbus does not list signals it never declared; the peer emits StatusUpdate by hand in the
    // upstream shape, checked here against the XML.
    let status_update = upstream
        .signals()
        .iter()
        .find(|s| s.name() == "StatusUpdate")
        .unwrap();
    assert_eq!(
        signature_of(status_update.args()),
        ["x", "d", "s", "s", "x"]
    );
}

/// The rpm-ostree peer serves the upstream Sysroot properties with their types.
#[test]
fn rpm_ostree_peer_matches_upstream_xml() {
    let bus = TestBus::start();
    let _peer = RpmOstreePeer::start(&bus);
    let upstream_node = bus::upstream_node("org.projectatomic.rpmostree1.xml");
    let upstream = upstream_node
        .interfaces()
        .iter()
        .find(|i| i.name() == bus::SYSROOT_INTERFACE)
        .unwrap();
    let ours = served(
        &bus,
        bus::RPM_OSTREE_NAME,
        bus::SYSROOT_PATH,
        bus::SYSROOT_INTERFACE,
    );
    assert!(!upstream.properties().is_empty());
    for property in upstream.properties() {
        let mine = ours
            .properties()
            .iter()
            .find(|p| p.name() == property.name())
            .unwrap_or_else(|| panic!("peer lacks property {}", property.name()));
        assert_eq!(
            mine.ty().to_string(),
            property.ty().to_string(),
            "{}",
            property.name()
        );
    }
}

#[test]
fn rpm_ostree_property_changes_reach_the_listener() {
    let bus = TestBus::start();
    let peer = RpmOstreePeer::start(&bus);
    let agent = bus.connect();
    let (tx, rx) = mpsc::channel();
    agent_dbus::spawn_rpm_ostree_listener(&agent, move |hint| tx.send(hint).unwrap()).unwrap();
    peer.emit_deployments_changed(&["fedora-coreos-abc.0", "fedora-coreos-def.0"]);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Hint::RpmOstree);
    // A signal from another service's object is not a hint.
    peer.conn
        .emit_signal(
            None::<()>,
            "/org/freedesktop/other",
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
            &(
                "org.freedesktop.other",
                std::collections::HashMap::<&str, zbus::zvariant::Value>::new(),
                Vec::<&str>::new(),
            ),
        )
        .unwrap();
    peer.emit_deployments_changed(&["fedora-coreos-def.0"]);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Hint::RpmOstree);
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn update_engine_status_is_asked_then_followed() {
    let bus = TestBus::start();
    let peer = UpdateEnginePeer::start(&bus, "UPDATE_STATUS_IDLE");
    let agent = bus.connect();
    let (tx, rx) = mpsc::channel();
    agent_dbus::spawn_update_engine_listener(&agent, move |hint| {
        let _ = tx.send(hint);
    })
    .unwrap();
    // GetStatus at start.
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap(),
        Hint::UpdateEngine {
            current_operation: "UPDATE_STATUS_IDLE".into()
        }
    );
    peer.set_status("UPDATE_STATUS_UPDATED_NEED_REBOOT", "4152.2.0");
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap(),
        Hint::UpdateEngine {
            current_operation: "UPDATE_STATUS_UPDATED_NEED_REBOOT".into()
        }
    );
    // update_engine restarts: the listener forgets, then asks the new instance.
    drop(peer);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Hint::UpdateEngineGone);
    let _peer = UpdateEnginePeer::start(&bus, "UPDATE_STATUS_UPDATED_NEED_REBOOT");
    let mut after_restart = Vec::new();
    while let Ok(hint) = rx.recv_timeout(Duration::from_secs(2)) {
        after_restart.push(hint);
    }
    assert_eq!(
        after_restart.last(),
        Some(&Hint::UpdateEngine {
            current_operation: "UPDATE_STATUS_UPDATED_NEED_REBOOT".into()
        }),
        "{after_restart:?}"
    );
}

#[test]
fn logind_inhibitor_is_held_until_dropped() {
    let bus = TestBus::start();
    let logind = LogindPeer::start(&bus);
    let agent = bus.connect();
    let inhibitor =
        agent_dbus::inhibit_shutdown(&agent, "no NVIDIA driver overlay for 6.6.1 yet").unwrap();
    assert_eq!(
        logind.active_inhibitors(),
        ["shutdown|nvdriver-agent|no NVIDIA driver overlay for 6.6.1 yet|block"]
    );
    drop(inhibitor);
    let deadline = std::time::Instant::now() + WAIT;
    while !logind.active_inhibitors().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the inhibitor is still held after the agent dropped it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_bus_is_a_clear_error() {
    let bus = TestBus::start();
    let address = bus.address.clone();
    drop(bus);
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &address);
    let err = agent_dbus::system_bus().unwrap_err().to_string();
    assert!(err.contains("system bus"), "{err}");
}

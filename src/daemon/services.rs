//! After the boot load: start the driver services the host needs
//! ([`crate::handoff::services`]) and hold the driver-ready file back until the GPU is usable
//! ([`crate::report::usable`]).
//!
//! The units are started with systemd's `RestartUnit` over D-Bus while the agent is still
//! starting: systemd queues the jobs and, the units being `After=nvdriver-agent.service`, runs
//! them once the agent has sent `READY=1`. Nothing waits on the jobs here. A thread then looks
//! every [`POLL`] for up to [`WAIT`] whether the GPU is usable (services active, fabric trained)
//! and tells the daemon, which writes or removes the driver-ready file with the rest of its
//! outputs.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::app::Context;
use crate::handoff::services::{self, ServiceSettings};
use crate::host::Root;
use crate::report::usable;

/// How often the thread looks.
const POLL: Duration = Duration::from_secs(2);
/// How long it looks before it reports the GPU not usable, with the reasons. Fabric Manager
/// trains an 8-GPU HGX fabric in well under a minute; a failed one stays failed.
const WAIT: Duration = Duration::from_secs(180);

/// Start the units the host needs; returns whether any service is needed (then readiness
/// waits for it, or names it missing). Failures are logged: readiness names the service that is not running.
pub fn start(ctx: &Context) -> bool {
    let driver_root = ctx.root.join(&ctx.settings.driver_root);
    let switches = services::scan_nvswitches(&ctx.root).unwrap_or_else(|e| {
        warn!("{e}");
        Vec::new()
    });
    let mut decisions = services::plan(
        &services::carried_in_tree(&driver_root),
        &switches,
        ServiceSettings {
            persistenced: ctx.settings.persistenced,
            fabric_manager: ctx.settings.fabric_manager,
        },
    );
    for d in &decisions {
        info!(
            SERVICE = d.service.name(),
            START = d.start,
            "{}: {}",
            d.service.name(),
            d.why
        );
    }
    let needed = decisions.iter().any(|d| d.needed);
    let fabric_manager = |d: &services::ServiceDecision| {
        d.start && d.service == services::DriverService::FabricManager
    };
    if decisions.iter().any(fabric_manager) {
        if let Err(e) = services::write_fabric_manager_config(&ctx.root, &ctx.settings.driver_root)
        {
            // Not started with a configuration that names the host's (missing) topology
            // files: readiness names Fabric Manager as not running.
            warn!("{e}");
            decisions.retain(|d| !fabric_manager(d));
        }
    }
    if !decisions.iter().any(|d| d.start) {
        return needed;
    }
    match crate::watch::dbus::system_bus()
        .map_err(services::ServicesError::from)
        .and_then(|bus| services::start(&bus, &decisions))
    {
        Ok(units) => info!("queued the start of {}", units.join(", ")),
        Err(e) => warn!("{e}"),
    }
    needed
}

/// Look for the GPU to become usable; `done()` is called once it is, or when [`WAIT`] is over.
pub fn spawn_usable_watch(
    ctx: &Context,
    loaded: Vec<String>,
    tx: Sender<super::Event>,
) -> std::io::Result<()> {
    let (root, settings): (Root, _) = (ctx.root.clone(), ctx.settings.clone());
    std::thread::Builder::new()
        .name("usable-watch".into())
        .spawn(move || {
            let loaded: Vec<&str> = loaded.iter().map(String::as_str).collect();
            let until = Instant::now() + WAIT;
            loop {
                let problems = usable::problems(&usable::gather(&root, &settings, &loaded));
                if problems.is_empty() {
                    info!("the GPU is usable: driver services running, fabric ready where there is one");
                    break;
                }
                if Instant::now() >= until {
                    warn!("the GPU is not usable after {}s: {}", WAIT.as_secs(), problems.join("; "));
                    break;
                }
                std::thread::sleep(POLL);
            }
            let _ = tx.send(super::Event::Usable);
        })
        .map(drop)
}

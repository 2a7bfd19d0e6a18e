//! `nvdriver-agent run`: load the driver for the running kernel, then watch for the next one.
//!
//! One thread per event source (inotify, each D-Bus listener, signals) feeds a channel; the
//! main thread sleeps in `recv()` until something happens. The only timed wakeups are the
//! systemd watchdog, when `WatchdogSec=` asks for it, and retries while an overlay for a pending
//! kernel is missing. Idle with nothing pending, the process makes no wakeups at all.

pub mod bus;
mod services;

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use tracing::{debug, error, info, warn};

use crate::app::{self, CommandError, Context};
use crate::boot::fallback;
use crate::boot::load::{self, LoadOutcome};
use crate::config::{self, ConfigSource, Settings};
use crate::daemon::bus::AgentService;
use crate::handoff::driver_ready::{self, DriverReady};
use crate::host::HostFacts;
use crate::kmod::sys::Kernel;
use crate::report::bus::AgentProperties;
use crate::state::instance::{InstanceError, InstanceLock};
use crate::state::{now_unix, AgentState, LoadRecord, LoadResult};
use crate::update::hold::{HostLevers, InhibitorSlot, LeverScope};
use crate::update::stage::{self, NextBootReadiness, Target};
use crate::watch::dbus::{self, Hint};
use crate::watch::flatcar::{self, UpdateEngineState};
use crate::watch::{self, fswatch, Family};

/// Events closer together than this are handled as one (a package install writes many files).
const SETTLE: Duration = Duration::from_millis(50);
/// ... but a steady stream of events does not postpone the work longer than this.
const SETTLE_MAX: Duration = Duration::from_secs(1);
/// Retry delays while the overlay for a pending kernel is missing: doubling, up to an hour.
const RETRY_FIRST: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// Why [`run`] ended early; a failed boot load is not one (it is recorded and the daemon stays up).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the instance lock, or the lock could not be taken.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// A setup step failed: reading the host's facts, for one.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The handled signals could not be blocked for the signal thread.
    #[error("cannot set up signal handling: {0}")]
    Signals(nix::Error),
}

impl DaemonError {
    /// The process exit code for this error (one of [`crate::app::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Command(e) => e.exit_code(),
            _ => crate::app::exit::FAILURE,
        }
    }
}

#[derive(Debug)]
enum Event {
    /// Something on disk or on the bus changed: look again.
    Changed(String),
    /// update_engine's `current_operation`; `None` when it left the bus.
    UpdateEngine(Option<String>),
    /// SIGUSR1 (`nvdriver-agent stage`) or the D-Bus `Stage()` method; SIGUSR2 (`hold release`)
    /// too, after the signal thread dropped the inhibitor.
    Rescan,
    /// SIGHUP (`None`: read the configuration here) or D-Bus `Reload()` (the settings it
    /// already read and checked, so the caller could be told when they were invalid).
    Reload(Option<Box<Settings>>),
    /// SIGTERM or SIGINT.
    Shutdown,
    /// The usable-GPU watch ([`services::spawn_usable_watch`]) is done: bring the outputs and
    /// the driver-ready file up to date.
    Usable,
}

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(signal);
    }
    set
}

/// Signals are blocked in every thread (threads inherit the mask, so this runs first) and
/// taken synchronously by one thread: no handler runs in signal context. SIGUSR2 (`hold
/// release`) drops the logind inhibitor right here, while the main thread may be downloading.
fn spawn_signal_thread(
    tx: Sender<Event>,
    root: crate::host::Root,
    inhibitor: InhibitorSlot,
) -> Result<(), DaemonError> {
    let set = handled_signals();
    set.thread_block().map_err(DaemonError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let event = match set.wait() {
                Ok(Signal::SIGTERM | Signal::SIGINT) => Event::Shutdown,
                Ok(Signal::SIGHUP) => Event::Reload(None),
                Ok(Signal::SIGUSR2) => {
                    drop_released_inhibitor(&root, &inhibitor);
                    Event::Rescan
                }
                Ok(_) => Event::Rescan,
                Err(_) => continue,
            };
            let last = matches!(event, Event::Shutdown);
            if tx.send(event).is_err() || last {
                return;
            }
        })
        .expect("spawning a thread");
    Ok(())
}

/// `hold release` wrote that the administrator let the hold go (and cleared it): drop the
/// inhibitor now; the next look records the rest.
fn drop_released_inhibitor(root: &crate::host::Root, inhibitor: &InhibitorSlot) {
    let state = AgentState::read(root);
    if state.hold.is_none() && state.hold_released.is_some() && inhibitor.drop_now() {
        warn!("hold released by the administrator: the logind shutdown inhibitor is dropped");
    }
}

/// Run the daemon until SIGTERM. `source` is where the configuration is read again from on
/// SIGHUP or D-Bus `Reload()`.
pub fn run(
    ctx: &Context,
    source: &ConfigSource,
    kernel: &mut dyn Kernel,
) -> Result<(), DaemonError> {
    let (tx, rx) = mpsc::channel();
    let levers = HostLevers::new(ctx.root.clone(), LeverScope::Daemon);
    spawn_signal_thread(tx.clone(), ctx.root.clone(), levers.inhibitor_slot())?;
    let _instance = InstanceLock::acquire(&ctx.root)?;

    let mut state = AgentState::read(&ctx.root);
    let (load_record, driver_ready) = boot_path(ctx, kernel);
    state.load = Some(load_record);
    if driver_ready.is_some() && services::start(ctx) {
        // Not ready until the services run (and the fabric is trained): the watch writes the
        // file back through refresh().
        if let Err(e) =
            crate::handoff::driver_ready::remove_driver_ready(&ctx.root, &ctx.settings.driver_ready)
        {
            warn!("{e}");
        }
        let loaded = crate::host::KernelState::read(
            &ctx.root,
            &crate::host::kernel::read_kernel_release(&ctx.root).unwrap_or_default(),
        )
        .map(|k| k.loaded.keys().cloned().collect())
        .unwrap_or_default();
        if let Err(e) = services::spawn_usable_watch(ctx, loaded, tx.clone()) {
            warn!("cannot watch for the GPU to become usable: {e}");
        }
    }
    if let Err(e) = state.write(&ctx.root) {
        warn!("{e}");
    }
    let store = ctx.store();
    if let Err(e) = store.lock().and_then(|lock| store.clean_leftovers(&lock)) {
        warn!("cannot clean up after an interrupted stage: {e}");
    }

    let host = HostFacts::read(&ctx.root).map_err(CommandError::from)?;
    let family = watch::choose(ctx.settings.detector, &ctx.root, &host.os);
    if let Some(load) = &state.load {
        let rpm_ostree = family == Some(Family::Ostree);
        if let Err(e) =
            fallback::after_boot_load(&ctx.root, ctx.settings.on_load_failure, load, rpm_ostree)
        {
            error!("{e}");
        }
    }
    let mut daemon = Daemon {
        ctx: Context {
            root: ctx.root.clone(),
            settings: ctx.settings.clone(),
        },
        source: source.clone(),
        agent: None,
        family,
        update_engine: UpdateEngineState::Unknown,
        unsaved_operation: None,
        bus: None,
        levers,
        retry_at: None,
        retry_delay: RETRY_FIRST,
        driver_ready,
    };
    let load_status = state
        .load
        .as_ref()
        .map(|l| l.result.as_str())
        .unwrap_or_default();
    // READY=1 as soon as the boot path is done: units ordered after us wait for the driver,
    // not for the D-Bus listeners (a hung update_engine must not delay containerd).
    app::notify_status(
        &format!(
            "driver {load_status}; {}",
            match family {
                Some(f) => format!("watching for kernel updates ({f:?})"),
                None => "not watching".into(),
            }
        ),
        true,
    );
    daemon.start_agent_object(&tx);
    // Published before the first look, which may download for minutes.
    daemon.refresh();
    match family {
        None => info!("watching for kernel updates is off (watch.detector = \"off\")"),
        Some(family) => daemon.start_watchers(family, &tx),
    }
    if family.is_some() {
        // What the listeners learned while starting (update_engine's GetStatus answer) counts
        // for the first look.
        while let Ok(event) = rx.try_recv() {
            if matches!(event, Event::Shutdown) {
                daemon.save_operation();
                daemon.release_for_stop();
                return Ok(());
            }
            daemon.absorb(event);
        }
        daemon.save_operation();
        daemon.evaluate();
        daemon.refresh();
    }
    daemon.event_loop(&rx);
    info!("stopping");
    daemon.release_for_stop();
    notify(&[libsystemd::daemon::NotifyState::Stopping]);
    Ok(())
}

/// The boot path, as `nvdriver-agent load` runs it; a failure is recorded, not fatal: the daemon
/// stays up to stage for the next kernel, and status says what went wrong.
fn boot_path(ctx: &Context, kernel: &mut dyn Kernel) -> (LoadRecord, Option<DriverReady>) {
    let kernel_release = crate::host::kernel::read_kernel_release(&ctx.root).unwrap_or_default();
    let mut record = LoadRecord {
        at: now_unix(),
        kernel_release,
        result: LoadResult::Loaded,
        driver_version: None,
        overlay: None,
        error: None,
    };
    let mut driver_ready = None;
    match load::load(ctx, kernel) {
        Ok(LoadOutcome::Loaded { plan, report }) => {
            driver_ready = Some(DriverReady::for_driver_root(
                &report.driver_root.to_string_lossy(),
            ));
            record.driver_version = Some(plan.driver_version.clone());
            record.overlay = Some(plan.overlay.clone());
        }
        Ok(LoadOutcome::NoOverlayWarned { .. }) => record.result = LoadResult::NoOverlay,
        // Logged by load::load with its MESSAGE_ID; not a failure of the overlay.
        Err(e) if e.is_no_gpu() => {
            record.result = LoadResult::NoGpu;
            record.error = Some(e.to_string());
        }
        Err(e) => {
            error!(KERNEL_RELEASE = %record.kernel_release, "loading the driver failed: {e}");
            record.result = LoadResult::Failed;
            record.error = Some(e.to_string());
        }
    }
    (record, driver_ready)
}

/// When to retry a failed stage, and the delay after that one; `None` keeps the retry already
/// pending. Only a due retry that fails again backs off: failures of looks triggered by events
/// (a kernel install writes /boot many times) must not push the retry later, or one install
/// would put it a quarter of an hour away (seen in tests/vm/run's late-update scenario).
fn next_retry(
    now: Instant,
    pending: Option<Instant>,
    delay: Duration,
) -> Option<(Instant, Duration)> {
    if pending.is_some_and(|at| at > now) {
        return None;
    }
    Some((now + delay, (delay * 2).min(RETRY_MAX)))
}

/// Hand the pages that a stage pass freed (decompressor windows, unpack and hash buffers, one
/// malloc arena per hashing thread) back to the kernel. glibc keeps them otherwise, and the
/// daemon then idles a megabyte or two above what it needs until the next pass; musl's
/// allocator returns them by itself. One of the crate's two `unsafe` blocks (the other: `keyctl` in
/// `host::keyring`): there is no safe binding.
#[allow(unsafe_code)]
fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointers are passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn notify(states: &[libsystemd::daemon::NotifyState]) {
    if let Err(e) = libsystemd::daemon::notify(false, states) {
        debug!(error = %e, "sd_notify failed");
    }
}

struct Daemon {
    ctx: Context,
    source: ConfigSource,
    /// Our D-Bus object, when the system bus let us serve it.
    agent: Option<AgentService>,
    family: Option<Family>,
    update_engine: UpdateEngineState,
    /// update_engine's operation as last heard, while not yet in the state file: it is written
    /// once per batch of events, so a signal storm costs no file write per signal.
    unsaved_operation: Option<Option<String>>,
    bus: Option<zbus::blocking::Connection>,
    /// The `hold` levers; the logind inhibitor's fd lives here.
    levers: HostLevers,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// The driver-ready file the boot load wrote, kept in step with readiness by
    /// [`Daemon::refresh`]; `None` when nothing was loaded.
    driver_ready: Option<DriverReady>,
}

impl Daemon {
    /// Serve `org.nvdriveragent.Agent1`; without a system bus the daemon goes on (said once).
    fn start_agent_object(&mut self, tx: &Sender<Event>) {
        let stage_tx = tx.clone();
        let reload_tx = tx.clone();
        let (root, source) = (self.ctx.root.clone(), self.source.clone());
        let started = AgentService::start(
            AgentProperties::default(),
            move || {
                let _ = stage_tx.send(Event::Rescan);
            },
            move || {
                let settings = config::load(&root, &source).map_err(|e| e.to_string())?;
                reload_tx
                    .send(Event::Reload(Some(Box::new(settings))))
                    .map_err(|_| "the daemon is stopping".to_string())
            },
        );
        match started {
            Ok(service) => {
                debug!(
                    "serving {} on the system bus",
                    crate::report::bus::AGENT_NAME
                );
                self.agent = Some(service);
            }
            Err(e) => warn!("{e}"),
        }
    }

    /// The driver-ready file says ready only while the GPU is usable: written back when it is,
    /// removed (reason logged) when a loaded driver is not ([`crate::report::usable`]).
    fn sync_driver_ready(&self, report: &crate::report::status::StatusReport) {
        let Some(ready) = &self.driver_ready else {
            return;
        };
        let path = &self.ctx.settings.driver_ready;
        let result = if report.readiness.ready_now() {
            driver_ready::write_driver_ready(&self.ctx.root, path, ready)
        } else {
            driver_ready::remove_driver_ready(&self.ctx.root, path).inspect(|&removed| {
                if removed {
                    warn!(
                        "removed {}: {}",
                        path.display(),
                        report.readiness_detail.as_deref().unwrap_or("not ready")
                    );
                }
            })
        };
        if let Err(e) = result {
            warn!("{e}");
        }
    }

    /// Re-read how things stand and bring every output up to date: the metrics and NFD files
    /// and the D-Bus properties (each only changes when its content does).
    fn refresh(&self) {
        let report = match crate::report::status::gather(&self.ctx) {
            Ok(report) => report,
            Err(e) => {
                warn!("cannot gather the status for the outputs: {e}");
                return;
            }
        };
        self.sync_driver_ready(&report);
        match crate::report::metrics::publish(&self.ctx.root, &self.ctx.settings.outputs, &report) {
            Ok(written) => {
                for path in written {
                    debug!("updated {}", path.display());
                }
            }
            Err(e) => warn!("{e}"),
        }
        if let Some(agent) = &self.agent {
            if let Err(e) = agent.update(AgentProperties::from_report(&report)) {
                debug!("{e}");
            }
        }
    }

    fn reload(&mut self, settings: Option<Box<Settings>>) {
        let settings = match settings {
            Some(settings) => *settings,
            None => match config::load(&self.ctx.root, &self.source) {
                Ok(settings) => settings,
                Err(e) => {
                    error!("the configuration was not read again, the old one stays in force: {e}");
                    return;
                }
            },
        };
        if settings.detector != self.ctx.settings.detector {
            warn!("watch.detector changed; it takes effect when the daemon restarts (`systemctl restart nvdriver-agent`)");
        }
        info!(
            "configuration read again from {}",
            settings
                .sources
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let fetcher = self.ctx.settings.stage.fetcher.take();
        self.ctx.settings = settings;
        // A command-line option, not a config key: a reload keeps it.
        self.ctx.settings.stage.fetcher = fetcher;
    }

    fn start_watchers(&mut self, family: Family, tx: &Sender<Event>) {
        let root = self.ctx.root.clone();
        let paths_root = root.clone();
        let fs_tx = tx.clone();
        if let Err(e) = fswatch::spawn(
            root,
            move || watch::watch_paths(&paths_root, family),
            move |changed| {
                let what = changed
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let _ = fs_tx.send(Event::Changed(format!("file-system change ({what})")));
            },
        ) {
            warn!("{e}");
        }

        if !matches!(family, Family::Ostree | Family::Flatcar) {
            return;
        }
        let bus = match dbus::system_bus() {
            Ok(bus) => bus,
            Err(e) => {
                warn!("{e}");
                return;
            }
        };
        let hint_tx = tx.clone();
        let on_hint = move |hint: Hint| {
            let event = match hint {
                Hint::RpmOstree => Event::Changed("rpm-ostree signal".into()),
                Hint::UpdateEngine { current_operation } => {
                    Event::UpdateEngine(Some(current_operation))
                }
                Hint::UpdateEngineGone => Event::UpdateEngine(None),
            };
            let _ = hint_tx.send(event);
        };
        let started = match family {
            Family::Ostree => dbus::spawn_rpm_ostree_listener(&bus, on_hint).map(drop),
            _ => dbus::spawn_update_engine_listener(&bus, on_hint).map(drop),
        };
        if let Err(e) = started {
            warn!("{e}");
        }
        self.bus = Some(bus);
    }

    fn event_loop(&mut self, rx: &Receiver<Event>) {
        let watchdog = libsystemd::daemon::watchdog_enabled(false).map(|t| t / 2);
        let mut watchdog_due = watchdog.map(|w| Instant::now() + w);
        loop {
            let wake_at = [watchdog_due, self.retry_at].into_iter().flatten().min();
            let event = match wake_at {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            let now = Instant::now();
            if let (Some(due), Some(interval)) = (watchdog_due, watchdog) {
                if now >= due {
                    notify(&[libsystemd::daemon::NotifyState::Watchdog]);
                    watchdog_due = Some(now + interval);
                }
            }
            let mut look_again = false;
            match event {
                Ok(Event::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    return self.save_operation()
                }
                Ok(event) => {
                    // A file event may be the first of a package install's many: let the
                    // burst settle. A D-Bus signal, a poke or a reload is complete in itself:
                    // only what is already queued joins it.
                    let settle = if matches!(event, Event::Changed(_)) {
                        SETTLE
                    } else {
                        Duration::ZERO
                    };
                    look_again |= self.absorb(event);
                    let settle_until = now + SETTLE_MAX;
                    loop {
                        let wait =
                            settle.min(settle_until.saturating_duration_since(Instant::now()));
                        match rx.recv_timeout(wait) {
                            Ok(Event::Shutdown) => return self.save_operation(),
                            Ok(event) => look_again |= self.absorb(event),
                            Err(_) => break,
                        }
                    }
                    self.save_operation();
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.retry_at.is_some_and(|at| now >= at) {
                        info!("retrying the stage for the pending kernel");
                        look_again = true;
                    }
                }
            }
            if look_again {
                if self.family.is_some() {
                    self.evaluate();
                }
                self.refresh();
            }
        }
    }

    /// Take in one event; true when it calls for a new look.
    fn absorb(&mut self, event: Event) -> bool {
        match event {
            Event::Changed(why) => {
                debug!("{why}");
                true
            }
            Event::UpdateEngine(operation) => {
                let state = operation
                    .as_deref()
                    .map(flatcar::update_engine_state)
                    .unwrap_or(UpdateEngineState::Unknown);
                self.unsaved_operation = Some(operation);
                let changed = state != self.update_engine;
                if changed {
                    info!("update_engine: {state:?}");
                }
                self.update_engine = state;
                changed
            }
            Event::Rescan => {
                info!("asked to look again");
                true
            }
            Event::Reload(settings) => {
                self.reload(settings);
                true
            }
            Event::Usable => {
                self.refresh();
                false
            }
            Event::Shutdown => false,
        }
    }

    /// Put update_engine's last heard operation in the state file (`status` reads it there).
    fn save_operation(&mut self) {
        let Some(operation) = self.unsaved_operation.take() else {
            return;
        };
        let mut saved = AgentState::read(&self.ctx.root);
        if saved.update_engine_operation != operation {
            saved.update_engine_operation = operation;
            if let Err(e) = saved.write(&self.ctx.root) {
                warn!("{e}");
            }
        }
    }

    /// Look at what boots next and act on it.
    fn evaluate(&mut self) {
        let Some(family) = self.family else { return };
        let target = Target::Detect {
            family,
            update_engine: self.update_engine,
        };
        let run = match stage::stage_next(&self.ctx, &target, None, &mut self.levers) {
            Ok(run) => run,
            Err(e) => {
                warn!("{e}");
                self.schedule_retry();
                return;
            }
        };
        match (run.readiness, &run.pending) {
            (NextBootReadiness::Missing, Some(_)) => self.schedule_retry(),
            _ => {
                self.retry_at = None;
                self.retry_delay = RETRY_FIRST;
            }
        }
        app::notify_status(&status_line(&run), false);
        return_freed_memory();
    }

    fn schedule_retry(&mut self) {
        let now = Instant::now();
        match next_retry(now, self.retry_at, self.retry_delay) {
            Some((at, delay)) => {
                info!("will try again in {} s", (at - now).as_secs());
                self.retry_at = Some(at);
                self.retry_delay = delay;
            }
            None => debug!("a retry is already scheduled"),
        }
    }

    /// Stopping: let go of what nobody would release once we are gone (see
    /// [`HostLevers::release_for_stop`]) and record what is left.
    fn release_for_stop(&mut self) {
        let left = self.levers.release_for_stop();
        let mut state = AgentState::read(&self.ctx.root);
        let Some(hold) = &mut state.hold else { return };
        let before = hold.levers.len();
        hold.levers
            .retain(|name| left.iter().any(|l| l.name() == name));
        if hold.levers.len() == before {
            return;
        }
        warn!(
            KERNEL_RELEASE = %hold.kernel_release,
            "the agent stops: the update to {} is no longer held by the logind inhibitor{}; the hold is taken again when the agent starts (`nvdriver-agent hold release` lets it go for good)",
            hold.kernel_release,
            if left.contains(&crate::update::hold::HoldLever::RebootRefusal) { "" } else { " or the reboot refusal" }
        );
        if let Err(e) = state.write(&self.ctx.root) {
            warn!("{e}");
        }
    }
}

fn status_line(run: &stage::StageRun) -> String {
    match (&run.pending, &run.record) {
        (None, _) => "no kernel update pending".into(),
        (Some(next), Some(record)) => {
            format!("next kernel {}: {}", next.kernel_release, record.result)
        }
        (Some(next), None) => format!("next kernel {}", next.kernel_release),
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn event_failures_keep_the_pending_retry_and_due_ones_back_off() {
        let t0 = Instant::now();
        // The first failure schedules a retry and doubles the next delay.
        let (at, delay) = next_retry(t0, None, RETRY_FIRST).unwrap();
        assert_eq!((at, delay), (t0 + RETRY_FIRST, RETRY_FIRST * 2));
        // Failures of event-triggered looks before it is due change nothing.
        for secs in [1, 10, 59] {
            assert_eq!(
                next_retry(t0 + Duration::from_secs(secs), Some(at), delay),
                None
            );
        }
        // The due retry fails: the next one waits twice as long.
        let t1 = t0 + RETRY_FIRST;
        assert_eq!(
            next_retry(t1, Some(at), delay),
            Some((t1 + RETRY_FIRST * 2, RETRY_FIRST * 4))
        );
        // Bounded.
        assert_eq!(next_retry(t1, None, RETRY_MAX).unwrap().1, RETRY_MAX);
    }
}

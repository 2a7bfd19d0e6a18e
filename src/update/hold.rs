//! The `hold` policy: keep an OS update from taking effect while no overlay exists for its
//! kernel, and let it go the moment one is staged, the administrator lets it go
//! (`nvdriver-agent hold release`) or `policy.hold-max-hours` runs out.
//!
//! Which callers a hold can stop depends on the lever; [`levers_for`] picks them per OS family
//! and [`plan_hold`] decides, both pure. The levers themselves are thin edges:
//!
//! - [`HoldLever::OstreeFinalizationLock`]: `/run/ostree/staged-deployment-locked` makes
//!   `ostree admin finalize-staged` (run at shutdown) leave the staged deployment unfinalized, so
//!   a reboot boots the current deployment again. The same file is what
//!   `rpm-ostree deploy --lock-finalization` (Zincati) creates, so the agent marks the locks it
//!   made (`/run/nvdriver-agent/ostree-hold`) and never removes a lock someone else took.
//! - [`HoldLever::LogindShutdownInhibitor`]: a logind `shutdown` block inhibitor held by the daemon
//!   (closing its fd releases it). It stops non-root callers of logind, and rpm-ostreed: rpm-ostree
//!   src/daemon/rpmostreed-transaction-types.cxx `finalize_deployment_transaction_execute` calls
//!   src/daemon/rpmostreed-utils.cxx `check_sd_inhibitor_locks` (ListInhibitors; any `block`
//!   inhibitor whose what contains `shutdown`, of any uid) *before* it unlocks the staged
//!   deployment, and refuses; so do the `--reboot` paths of upgrade/deploy/rebase. It does not
//!   stop root calling logind on systemd ≤ 256: src/login/logind-dbus.c `verify_shutdown_creds`
//!   (v252) skips block inhibitors of the caller's own uid (`manager_is_inhibited(..., ignore_uid,
//!   uid)`) and lets a caller with CAP_SYS_BOOT through polkit; since v257 a `block` inhibitor
//!   refuses root too (only `block-weak` ones of the caller's uid are skipped,
//!   src/login/logind-inhibit.c `manager_is_inhibited`). See [`crate::watch::dbus::inhibit_shutdown`].
//! - [`HoldLever::RebootRefusal`]: runtime drop-ins `RefuseManualStart=yes` for `reboot.target`
//!   and `kexec.target`, then systemd `Reload()`. systemd refuses a D-Bus `StartUnit` of such a
//!   unit whoever asks (src/core/dbus-unit.c `bus_unit_queue_job`: "Operation refused, unit %s may
//!   be requested by dependency only"); logind starts `reboot.target` with `StartUnit`
//!   (src/login/logind-dbus.c `execute_shutdown_or_sleep`), and `systemctl reboot` falls back to
//!   `StartUnit` when logind fails (src/systemctl/systemctl-start-special.c `verb_start_special`).
//!   So it stops root's `Reboot()` over logind (locksmithd, FLUO) and `systemctl reboot` (kured).
//!   `poweroff.target` is deliberately left alone: a cloud's ACPI shutdown must work.
//!
//! Nothing stops `systemctl reboot --force` (the manager's `Reboot()` without reboot.target),
//! `reboot -ff`, sysrq or a power cut.

use crate::failpoints::failpoint;
use crate::fsutil::{PathIoError, WithPath};
use std::io;

use tracing::{info, warn};

use crate::config::MissingNextOverlayPolicy;
use crate::fsutil;
use crate::host::Root;
use crate::state::{now_unix, AgentState, HoldRecord, HoldRelease, StateError};
use crate::watch::dbus::{self, DbusError, Inhibitor};
use crate::watch::Family;

/// ostree's finalization lock: while it exists, the staged deployment is not finalized at
/// shutdown (the same file `rpm-ostree deploy --lock-finalization` creates).
pub const OSTREE_FINALIZATION_LOCK: &str = "/run/ostree/staged-deployment-locked";
/// Our mark that the lock above is ours; holds the kernel release it was taken for.
pub const OSTREE_HOLD_MARK: &str = "/run/nvdriver-agent/ostree-hold";

/// Runtime drop-ins that refuse a manual start of the reboot targets while a hold is taken.
pub const REBOOT_REFUSAL_DROPINS: [&str; 2] = [
    "/run/systemd/system/reboot.target.d/50-nvdriver-agent-hold.conf",
    "/run/systemd/system/kexec.target.d/50-nvdriver-agent-hold.conf",
];

/// What each reboot-refusal drop-in says.
pub const REBOOT_REFUSAL_TEXT: &str = "\
# Written by nvdriver-agent (policy.missing-next-overlay = \"hold\"): no NVIDIA driver overlay is
# staged yet for the kernel the host boots next. Removed when one is staged; to let the update
# through now, run `nvdriver-agent hold release`.
[Unit]
RefuseManualStart=yes
";

/// The kernel-release placeholder of a hold taken while the next kernel could not be told.
pub const UNKNOWN_KERNEL: &str = "";

/// Why a hold lever could not be taken or released.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Creating or removing the lock, the mark, a drop-in or their directories failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// The system bus or systemd could not be asked.
    #[error(transparent)]
    Bus(#[from] DbusError),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateError),
}

/// One way of keeping a pending update from taking effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldLever {
    /// `/run/ostree/staged-deployment-locked` (a staged ostree deployment).
    OstreeFinalizationLock,
    /// A logind `shutdown` block inhibitor held by the daemon.
    LogindShutdownInhibitor,
    /// `RefuseManualStart=yes` drop-ins for reboot.target and kexec.target.
    RebootRefusal,
}

impl HoldLever {
    /// Every lever, in the order they are taken.
    pub const ALL: [HoldLever; 3] = [
        HoldLever::OstreeFinalizationLock,
        HoldLever::RebootRefusal,
        HoldLever::LogindShutdownInhibitor,
    ];

    /// The kebab-case name, as in the state file, `status` and on D-Bus.
    pub fn name(self) -> &'static str {
        match self {
            HoldLever::OstreeFinalizationLock => "ostree-finalization-lock",
            HoldLever::LogindShutdownInhibitor => "logind-shutdown-inhibitor",
            HoldLever::RebootRefusal => "reboot-refusal",
        }
    }

    /// The lever a name from [`HoldLever::name`] stands for.
    pub fn from_name(name: &str) -> Option<HoldLever> {
        HoldLever::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Which reboot callers this lever stops, and which it does not (for `status`).
    pub fn stops(self) -> &'static str {
        match self {
            HoldLever::OstreeFinalizationLock => "any reboot boots the current deployment again (the staged one is not finalized); not rpm-ostree finalize-deployment, which removes it",
            HoldLever::LogindShutdownInhibitor => "rpm-ostree finalize-deployment and --reboot (Zincati), non-root callers of logind; root callers only on systemd 257 or later",
            HoldLever::RebootRefusal => "systemctl reboot and logind Reboot() of any caller, root included (locksmithd, FLUO, kured); not systemctl reboot --force, reboot -ff, poweroff",
        }
    }
}

/// The levers that hold an update on this OS family. `staged` is whether the pending ostree
/// deployment is staged (`None`: the next boot could not be told); pure.
pub fn levers_for(family: Family, staged: Option<bool>) -> Vec<HoldLever> {
    match family {
        // The lock first: a root `systemctl reboot` then boots the old deployment once, instead
        // of the new kernel without its driver. The inhibitor stops Zincati's finalize.
        Family::Ostree => match staged {
            Some(false) => vec![HoldLever::LogindShutdownInhibitor],
            Some(true) | None => vec![
                HoldLever::OstreeFinalizationLock,
                HoldLever::LogindShutdownInhibitor,
            ],
        },
        Family::Flatcar | Family::Generic => {
            vec![HoldLever::RebootRefusal, HoldLever::LogindShutdownInhibitor]
        }
    }
}

/// What the next boot needs, as far as a hold is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldNeed {
    /// The next boot has its driver (or nothing is pending): nothing to hold.
    Covered,
    /// No overlay for this kernel yet.
    Missing(String),
    /// Which kernel boots next could not be told (the error): hold what needs no kernel.
    Unknown(String),
}

/// Why a hold was let go before its overlay came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LetThrough {
    /// `nvdriver-agent hold release`.
    Administrator,
    /// `policy.hold-max-hours` ran out.
    Deadline,
}

impl LetThrough {
    /// The word the state file and `status` use.
    pub fn as_str(self) -> &'static str {
        match self {
            LetThrough::Administrator => "administrator",
            LetThrough::Deadline => "deadline",
        }
    }
}

/// What [`plan_hold`] decides on.
#[derive(Clone, Debug)]
pub struct HoldInputs<'a> {
    /// `policy.missing-next-overlay`.
    pub policy: MissingNextOverlayPolicy,
    /// `policy.hold-max-hours`, if set.
    pub max_hours: Option<u64>,
    /// The levers this host has ([`levers_for`]).
    pub levers: &'a [HoldLever],
    /// What the next boot needs.
    pub need: &'a HoldNeed,
    /// The hold in force now, if any (the state file's).
    pub current: Option<&'a HoldRecord>,
    /// The last hold let go before its overlay came, if any.
    pub released: Option<&'a HoldRelease>,
    /// Now, in seconds since the epoch.
    pub now: u64,
}

/// What to do about a hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldAction {
    /// Hold the update to `kernel_release` (empty: unknown) with these levers; `since` is when
    /// this kernel's hold was first taken.
    Take {
        /// The levers to take.
        levers: Vec<HoldLever>,
        /// The kernel held ([`UNKNOWN_KERNEL`] when it could not be told).
        kernel_release: String,
        /// When the hold for this kernel was first taken.
        since: u64,
    },
    /// Let go of any hold of ours (the next boot is covered, or the policy is not `hold`).
    Release,
    /// Let go, and do not take it again for this kernel: the administrator said so, or the
    /// deadline passed.
    LetThrough {
        /// Why.
        why: LetThrough,
        /// The kernel let through.
        kernel_release: String,
        /// When its hold was first taken.
        since: u64,
    },
    /// Hold wanted, but this host has no lever for it.
    Unsupported,
}

/// Decide the hold; pure. Held only while the next boot's overlay is missing (or the next
/// kernel cannot be told) and the policy is `hold`; never again for a kernel the administrator
/// or the deadline let through.
pub fn plan_hold(inputs: &HoldInputs) -> HoldAction {
    let kernel_release = match (inputs.policy, inputs.need) {
        (MissingNextOverlayPolicy::Warn, _) | (_, HoldNeed::Covered) => return HoldAction::Release,
        (MissingNextOverlayPolicy::Hold, HoldNeed::Missing(k)) => k.clone(),
        (MissingNextOverlayPolicy::Hold, HoldNeed::Unknown(_)) => UNKNOWN_KERNEL.to_string(),
    };
    let since = inputs
        .current
        .filter(|h| h.kernel_release == kernel_release)
        .map(|h| h.since)
        .unwrap_or(inputs.now);
    if let Some(released) = inputs
        .released
        .filter(|r| r.kernel_release == kernel_release)
    {
        let why = match released.by.as_str() {
            "deadline" => LetThrough::Deadline,
            _ => LetThrough::Administrator,
        };
        return HoldAction::LetThrough {
            why,
            kernel_release,
            since: released.since,
        };
    }
    if inputs.levers.is_empty() {
        return HoldAction::Unsupported;
    }
    let expired = inputs
        .max_hours
        .is_some_and(|h| inputs.now >= since.saturating_add(h.saturating_mul(3600)));
    if expired {
        return HoldAction::LetThrough {
            why: LetThrough::Deadline,
            kernel_release,
            since,
        };
    }
    HoldAction::Take {
        levers: inputs.levers.to_vec(),
        kernel_release,
        since,
    }
}

/// What taking the ostree lock found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OstreeLockOutcome {
    /// We created the lock.
    Taken,
    /// Ours was already there.
    AlreadyOurs,
    /// Someone else (an administrator, `--lock-finalization`) holds it; we leave it alone.
    HeldByOther,
}

/// Keep the staged ostree deployment from being finalized.
pub fn take_ostree_lock(root: &Root, kernel_release: &str) -> Result<OstreeLockOutcome, HoldError> {
    let lock = root.join(OSTREE_FINALIZATION_LOCK);
    let mark = root.join(OSTREE_HOLD_MARK);
    if mark.exists() && lock.exists() {
        return Ok(OstreeLockOutcome::AlreadyOurs);
    }
    if lock.exists() {
        return Ok(OstreeLockOutcome::HeldByOther);
    }
    // Mark first: a crash between the two writes leaves a mark without a lock, which the next
    // release cleans up; the reverse order could leave a lock nobody knows is ours.
    if let Some(dir) = mark.parent() {
        fsutil::create_dir_all_mode(dir, 0o755).with_action("create", "/run/nvdriver-agent")?;
    }
    fsutil::write_atomic(&mark, format!("{kernel_release}\n").as_bytes(), 0o644)
        .with_action("write", OSTREE_HOLD_MARK)?;
    if let Some(dir) = lock.parent() {
        fsutil::create_dir_all_mode(dir, 0o755).with_action("create", "/run/ostree")?;
    }
    failpoint!("hold::take");
    fsutil::write_atomic(&lock, b"", 0o644).with_action("create", OSTREE_FINALIZATION_LOCK)?;
    info!(KERNEL_RELEASE = %kernel_release, "holding the staged deployment: created {OSTREE_FINALIZATION_LOCK}");
    Ok(OstreeLockOutcome::Taken)
}

/// Release our ostree lock, if we hold one. Returns whether a lock was released.
pub fn release_ostree_lock(root: &Root) -> Result<bool, HoldError> {
    let lock = root.join(OSTREE_FINALIZATION_LOCK);
    let mark = root.join(OSTREE_HOLD_MARK);
    if !mark.exists() {
        return Ok(false);
    }
    let released = match std::fs::remove_file(&lock) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(PathIoError::doing("remove", OSTREE_FINALIZATION_LOCK, e).into()),
    };
    match std::fs::remove_file(&mark) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PathIoError::doing("remove", OSTREE_HOLD_MARK, e).into()),
    }
    if released {
        info!("released the staged deployment: removed {OSTREE_FINALIZATION_LOCK}");
    }
    Ok(released)
}

/// Whether we hold the ostree lock now.
pub fn holds_ostree_lock(root: &Root) -> bool {
    root.join(OSTREE_HOLD_MARK).exists() && root.join(OSTREE_FINALIZATION_LOCK).exists()
}

/// Write the reboot-refusal drop-ins (atomically; only what differs). Returns whether any file
/// changed, i.e. whether systemd must reload to see it.
pub fn write_reboot_refusal(root: &Root) -> Result<bool, HoldError> {
    let mut changed = false;
    for dropin in REBOOT_REFUSAL_DROPINS {
        let path = root.join(dropin);
        if std::fs::read(&path).is_ok_and(|text| text == REBOOT_REFUSAL_TEXT.as_bytes()) {
            continue;
        }
        if let Some(dir) = path.parent() {
            fsutil::create_dir_all_mode(dir, 0o755).with_action("create", dir)?;
        }
        fsutil::write_atomic(&path, REBOOT_REFUSAL_TEXT.as_bytes(), 0o644)
            .with_action("write", dropin)?;
        changed = true;
    }
    Ok(changed)
}

/// Remove our reboot-refusal drop-ins (nothing else in their directories). Returns whether any
/// was there.
pub fn remove_reboot_refusal(root: &Root) -> Result<bool, HoldError> {
    let mut removed = false;
    for dropin in REBOOT_REFUSAL_DROPINS {
        match std::fs::remove_file(root.join(dropin)) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PathIoError::doing("remove", dropin, e).into()),
        }
    }
    Ok(removed)
}

/// Whether our reboot-refusal drop-ins are on disk.
pub fn holds_reboot_refusal(root: &Root) -> bool {
    REBOOT_REFUSAL_DROPINS
        .iter()
        .any(|dropin| root.join(dropin).exists())
}

/// The levers of one process: `take` and `release` are the only ways [`crate::update::stage`]
/// touches them.
pub trait HoldLevers {
    /// Take `levers` for `kernel_release`; `why` is the reason shown to people. Returns the
    /// levers held now (a lever this process does not hold, or that failed, is left out; the
    /// failure is logged).
    fn take(&mut self, levers: &[HoldLever], kernel_release: &str, why: &str) -> Vec<HoldLever>;
    /// Let go of every lever of ours; a failure is logged.
    fn release(&mut self);
}

/// Which levers a [`HostLevers`] may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeverScope {
    /// The daemon: every lever (it lives on to hold the inhibitor's fd).
    Daemon,
    /// A one-shot command (`stage --now`, run by ExecStop at shutdown): the ostree lock only,
    /// the one lever that still matters once a reboot is under way. It still releases every
    /// file lever when the overlay is there.
    OneShot,
}

/// The levers on a real host: files under the root, logind and systemd over the system bus
/// (connected on first use; `DBUS_SYSTEM_BUS_ADDRESS` is honoured).
pub struct HostLevers {
    root: Root,
    scope: LeverScope,
    bus: Option<dbus::Connection>,
    inhibitor: InhibitorSlot,
    refusing: bool,
}

/// Where the daemon's logind inhibitor lives, shared with its signal thread so that
/// `hold release` drops it at once, even while a download keeps the main thread busy.
#[derive(Clone, Default)]
pub struct InhibitorSlot(std::sync::Arc<std::sync::Mutex<Option<Inhibitor>>>);

impl InhibitorSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Inhibitor>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Close the inhibitor's fd (logind then drops it); whether one was held.
    pub fn drop_now(&self) -> bool {
        self.lock().take().is_some()
    }

    fn is_held(&self) -> bool {
        self.lock().is_some()
    }
}

impl HostLevers {
    /// Levers under `root` for a process of this scope; nothing is taken yet.
    pub fn new(root: Root, scope: LeverScope) -> HostLevers {
        HostLevers {
            root,
            scope,
            bus: None,
            inhibitor: InhibitorSlot::default(),
            refusing: false,
        }
    }

    fn bus(&mut self) -> Result<&dbus::Connection, HoldError> {
        if self.bus.is_none() {
            self.bus = Some(dbus::system_bus()?);
        }
        Ok(self.bus.as_ref().expect("connected above"))
    }

    /// The inhibitor's slot, for a thread that must be able to drop it ([`InhibitorSlot`]).
    pub fn inhibitor_slot(&self) -> InhibitorSlot {
        self.inhibitor.clone()
    }

    /// Whether systemd says the system is shutting down (`systemctl is-system-running` =
    /// `stopping`); unknown counts as not.
    pub fn system_stopping(&mut self) -> bool {
        self.bus()
            .ok()
            .and_then(|bus| dbus::systemd_system_state(bus).ok())
            .is_some_and(|state| state == "stopping")
    }

    fn take_one(
        &mut self,
        lever: HoldLever,
        kernel_release: &str,
        why: &str,
    ) -> Result<bool, HoldError> {
        match lever {
            HoldLever::OstreeFinalizationLock => {
                match take_ostree_lock(&self.root, kernel_release)? {
                    OstreeLockOutcome::Taken | OstreeLockOutcome::AlreadyOurs => Ok(true),
                    OstreeLockOutcome::HeldByOther => {
                        info!("{OSTREE_FINALIZATION_LOCK} exists and is not ours (rpm-ostree --lock-finalization, Zincati or an administrator): left alone, not listed as our lever");
                        Ok(false)
                    }
                }
            }
            _ if self.scope == LeverScope::OneShot => Ok(false),
            HoldLever::LogindShutdownInhibitor => {
                if !self.inhibitor.is_held() {
                    let inhibitor = dbus::inhibit_shutdown(self.bus()?, why)?;
                    *self.inhibitor.lock() = Some(inhibitor);
                }
                Ok(true)
            }
            HoldLever::RebootRefusal => {
                let changed = write_reboot_refusal(&self.root)?;
                if changed || !self.refusing {
                    if let Err(e) = self.bus().and_then(|bus| Ok(dbus::systemd_reload(bus)?)) {
                        // On disk but not in force: take it off again, so nothing claims a
                        // refusal systemd does not know of.
                        let _ = remove_reboot_refusal(&self.root);
                        return Err(e);
                    }
                    info!("reboot.target and kexec.target refuse a manual start now (systemd reloaded)");
                }
                self.refusing = true;
                Ok(true)
            }
        }
    }

    /// The daemon stops: its inhibitor goes with it, and outside a shutdown the reboot refusal
    /// is removed too, so a stopped agent leaves no refusal that nobody would release (the
    /// ostree lock stays: a reboot then boots the current deployment; `hold release` removes
    /// it). Returns the levers still in force.
    pub fn release_for_stop(&mut self) -> Vec<HoldLever> {
        self.inhibitor.drop_now();
        let mut left = Vec::new();
        if holds_ostree_lock(&self.root) {
            left.push(HoldLever::OstreeFinalizationLock);
        }
        if !self.refusing && !holds_reboot_refusal(&self.root) {
            return left;
        }
        if self.system_stopping() {
            // The reboot is under way already; the refusal leaves with /run.
            if self.refusing {
                left.push(HoldLever::RebootRefusal);
            }
        } else if let Err(e) = self.release_refusal() {
            warn!(
                "cannot remove the reboot refusal while stopping: {e}; remove {} and run `systemctl daemon-reload`, or `nvdriver-agent hold release`",
                REBOOT_REFUSAL_DROPINS.join(" and ")
            );
            left.push(HoldLever::RebootRefusal);
        }
        left
    }

    fn release_refusal(&mut self) -> Result<(), HoldError> {
        let removed = remove_reboot_refusal(&self.root)?;
        if removed || self.refusing {
            self.refusing = false;
            // Once a shutdown is under way a reload helps nobody: the files are gone, and /run
            // with them at the reboot.
            if !self.system_stopping() {
                dbus::systemd_reload(self.bus()?)?;
            }
            info!("reboot.target and kexec.target start on request again (drop-ins removed)");
        }
        Ok(())
    }
}

impl HoldLevers for HostLevers {
    fn take(&mut self, levers: &[HoldLever], kernel_release: &str, why: &str) -> Vec<HoldLever> {
        let mut held = Vec::new();
        for &lever in levers {
            match self.take_one(lever, kernel_release, why) {
                Ok(true) => held.push(lever),
                Ok(false) => {}
                Err(e) => warn!(
                    KERNEL_RELEASE = %kernel_release,
                    "cannot take the hold lever {}: {e}; the update is not held by it",
                    lever.name()
                ),
            }
        }
        held
    }

    fn release(&mut self) {
        if self.inhibitor.drop_now() {
            info!("the logind shutdown inhibitor is released");
        }
        if let Err(e) = release_ostree_lock(&self.root) {
            warn!("cannot release the ostree finalization lock: {e}; remove {OSTREE_FINALIZATION_LOCK} and {OSTREE_HOLD_MARK} by hand");
        }
        if let Err(e) = self.release_refusal() {
            warn!(
                "cannot release the reboot refusal: {e}; remove {} and run `systemctl daemon-reload`",
                REBOOT_REFUSAL_DROPINS.join(" and ")
            );
        }
    }
}

/// `nvdriver-agent hold release`: remove our levers (the ostree lock only if ours, the reboot
/// refusal) and record that the administrator let the held kernel through, so no later pass
/// holds it again. Returns that record, `None` when nothing was held. The daemon's inhibitor is
/// its own: the caller tells the daemon ([`crate::state::instance::poke_hold_released`]), which
/// drops it at once ([`InhibitorSlot::drop_now`]).
pub fn release_by_administrator(
    root: &Root,
    levers: &mut dyn HoldLevers,
) -> Result<Option<HoldRelease>, HoldError> {
    levers.release();
    let mut state = AgentState::read(root);
    let Some(hold) = state.hold.take() else {
        return Ok(None);
    };
    let release = HoldRelease {
        kernel_release: hold.kernel_release,
        by: LetThrough::Administrator.as_str().into(),
        since: hold.since,
        at: now_unix(),
    };
    state.hold_released = Some(release.clone());
    state.write(root)?;
    warn!(
        KERNEL_RELEASE = %release.kernel_release,
        "hold released by the administrator: the update is let through without its NVIDIA overlay and not held again for this kernel"
    );
    Ok(Some(release))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_and_releases_only_its_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        assert_eq!(
            take_ostree_lock(&root, "6.1.0-29").unwrap(),
            OstreeLockOutcome::Taken
        );
        assert!(holds_ostree_lock(&root));
        assert_eq!(
            take_ostree_lock(&root, "6.1.0-29").unwrap(),
            OstreeLockOutcome::AlreadyOurs
        );
        assert!(release_ostree_lock(&root).unwrap());
        assert!(!root.join(OSTREE_FINALIZATION_LOCK).exists());
        assert!(!release_ostree_lock(&root).unwrap());

        // An administrator's lock (rpm-ostree --lock-finalization) is never ours to remove.
        std::fs::write(root.join(OSTREE_FINALIZATION_LOCK), "").unwrap();
        assert_eq!(
            take_ostree_lock(&root, "6.1.0-29").unwrap(),
            OstreeLockOutcome::HeldByOther
        );
        assert!(!release_ostree_lock(&root).unwrap());
        assert!(root.join(OSTREE_FINALIZATION_LOCK).exists());
    }

    use crate::config::MissingNextOverlayPolicy::{Hold, Warn};

    const NOW: u64 = 1_000_000;

    fn inputs<'a>(
        levers: &'a [HoldLever],
        need: &'a HoldNeed,
        current: Option<&'a HoldRecord>,
        released: Option<&'a HoldRelease>,
        max_hours: Option<u64>,
    ) -> HoldInputs<'a> {
        HoldInputs {
            policy: Hold,
            max_hours,
            levers,
            need,
            current,
            released,
            now: NOW,
        }
    }

    fn record(kernel: &str, since: u64) -> HoldRecord {
        HoldRecord {
            levers: vec!["reboot-refusal".into()],
            kernel_release: kernel.into(),
            since,
            detail: None,
        }
    }

    #[test]
    fn levers_by_family() {
        use HoldLever::*;
        assert_eq!(
            levers_for(Family::Ostree, Some(true)),
            vec![OstreeFinalizationLock, LogindShutdownInhibitor]
        );
        // Not staged: the new deployment is the default already; only rpm-ostree's own reboot
        // paths (which check inhibitors) can be stopped.
        assert_eq!(
            levers_for(Family::Ostree, Some(false)),
            vec![LogindShutdownInhibitor]
        );
        assert_eq!(
            levers_for(Family::Ostree, None),
            vec![OstreeFinalizationLock, LogindShutdownInhibitor]
        );
        for family in [Family::Flatcar, Family::Generic] {
            for staged in [Some(true), Some(false), None] {
                assert_eq!(
                    levers_for(family, staged),
                    vec![RebootRefusal, LogindShutdownInhibitor]
                );
            }
        }
        for lever in HoldLever::ALL {
            assert_eq!(HoldLever::from_name(lever.name()), Some(lever));
        }
    }

    #[test]
    fn holds_only_when_missing_and_asked_to() {
        let levers = levers_for(Family::Flatcar, Some(false));
        let missing = HoldNeed::Missing("6.2".into());
        assert_eq!(
            plan_hold(&inputs(&levers, &missing, None, None, None)),
            HoldAction::Take {
                levers: levers.clone(),
                kernel_release: "6.2".into(),
                since: NOW
            }
        );
        assert_eq!(
            plan_hold(&inputs(&levers, &HoldNeed::Covered, None, None, None)),
            HoldAction::Release
        );
        let warn = HoldInputs {
            policy: Warn,
            ..inputs(&levers, &missing, None, None, None)
        };
        assert_eq!(plan_hold(&warn), HoldAction::Release);
        assert_eq!(
            plan_hold(&inputs(&[], &missing, None, None, None)),
            HoldAction::Unsupported
        );
    }

    #[test]
    fn a_detection_error_fails_closed() {
        let levers = levers_for(Family::Generic, None);
        let unknown = HoldNeed::Unknown("no boot entry".into());
        assert_eq!(
            plan_hold(&inputs(&levers, &unknown, None, None, None)),
            HoldAction::Take {
                levers: levers.clone(),
                kernel_release: UNKNOWN_KERNEL.into(),
                since: NOW
            }
        );
        // Once the kernel is known, its own hold starts its own clock.
        let was_unknown = record(UNKNOWN_KERNEL, 5);
        let missing = HoldNeed::Missing("6.2".into());
        assert_eq!(
            plan_hold(&inputs(
                &levers,
                &missing,
                Some(&was_unknown),
                None,
                Some(1)
            )),
            HoldAction::Take {
                levers,
                kernel_release: "6.2".into(),
                since: NOW
            }
        );
    }

    #[test]
    fn the_deadline_counts_from_the_first_hold_of_that_kernel() {
        let levers = levers_for(Family::Flatcar, Some(false));
        let missing = HoldNeed::Missing("6.2".into());
        let held = record("6.2", NOW - 3 * 3600);
        assert!(matches!(
            plan_hold(&inputs(&levers, &missing, Some(&held), None, Some(4))),
            HoldAction::Take { since, .. } if since == NOW - 3 * 3600
        ));
        assert_eq!(
            plan_hold(&inputs(&levers, &missing, Some(&held), None, Some(3))),
            HoldAction::LetThrough {
                why: LetThrough::Deadline,
                kernel_release: "6.2".into(),
                since: NOW - 3 * 3600
            }
        );
        // Another kernel's old hold does not count.
        let other = record("6.1", 0);
        assert!(matches!(
            plan_hold(&inputs(&levers, &missing, Some(&other), None, Some(1))),
            HoldAction::Take { since: NOW, .. }
        ));
        // No deadline set: held however long.
        let ancient = record("6.2", 0);
        assert!(matches!(
            plan_hold(&inputs(&levers, &missing, Some(&ancient), None, None)),
            HoldAction::Take { .. }
        ));
    }

    #[test]
    fn a_released_kernel_is_not_held_again_but_the_next_one_is() {
        let levers = levers_for(Family::Ostree, Some(true));
        let released = HoldRelease {
            kernel_release: "6.2".into(),
            by: "administrator".into(),
            since: 7,
            at: 9,
        };
        let missing = HoldNeed::Missing("6.2".into());
        assert_eq!(
            plan_hold(&inputs(&levers, &missing, None, Some(&released), None)),
            HoldAction::LetThrough {
                why: LetThrough::Administrator,
                kernel_release: "6.2".into(),
                since: 7
            }
        );
        let newer = HoldNeed::Missing("6.3".into());
        assert!(matches!(
            plan_hold(&inputs(&levers, &newer, None, Some(&released), None)),
            HoldAction::Take { .. }
        ));
        // Covered: nothing to let through, just release.
        assert_eq!(
            plan_hold(&inputs(
                &levers,
                &HoldNeed::Covered,
                None,
                Some(&released),
                None
            )),
            HoldAction::Release
        );
    }

    #[test]
    fn reboot_refusal_drop_ins_are_ours_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        // Someone else's drop-ins beside ours, and a poweroff one: never touched.
        let theirs = root.join("/run/systemd/system/reboot.target.d/10-admin.conf");
        std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
        std::fs::write(&theirs, "[Unit]\nDescription=theirs\n").unwrap();

        assert!(!holds_reboot_refusal(&root));
        assert!(write_reboot_refusal(&root).unwrap());
        assert!(holds_reboot_refusal(&root));
        for dropin in REBOOT_REFUSAL_DROPINS {
            let text = std::fs::read_to_string(root.join(dropin)).unwrap();
            assert_eq!(text, REBOOT_REFUSAL_TEXT);
            assert!(text.contains("\n[Unit]\nRefuseManualStart=yes\n"), "{text}");
            assert!(text.contains("nvdriver-agent hold release"), "{text}");
        }
        assert!(!root.join("/run/systemd/system/poweroff.target.d").exists());
        // Unchanged content: no write, so no reload is asked for.
        assert!(!write_reboot_refusal(&root).unwrap());
        // Written atomically: no temporary file is left beside them.
        let names: Vec<String> = std::fs::read_dir(theirs.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        assert!(remove_reboot_refusal(&root).unwrap());
        assert!(!holds_reboot_refusal(&root));
        assert!(!remove_reboot_refusal(&root).unwrap());
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            "[Unit]\nDescription=theirs\n"
        );
    }

    /// Levers that only record what they were asked.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
    }

    impl HoldLevers for Recorder {
        fn take(&mut self, levers: &[HoldLever], kernel: &str, _why: &str) -> Vec<HoldLever> {
            self.calls.push(format!("take {kernel}"));
            levers.to_vec()
        }
        fn release(&mut self) {
            self.calls.push("release".into());
        }
    }

    #[test]
    fn the_administrator_release_is_recorded_for_that_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let mut levers = Recorder::default();
        assert_eq!(release_by_administrator(&root, &mut levers).unwrap(), None);
        let mut state = AgentState::fresh();
        state.hold = Some(record("6.2", 42));
        state.write(&root).unwrap();
        let released = release_by_administrator(&root, &mut levers)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                released.kernel_release.as_str(),
                released.by.as_str(),
                released.since
            ),
            ("6.2", "administrator", 42)
        );
        let state = AgentState::read(&root);
        assert_eq!(state.hold, None);
        assert_eq!(state.hold_released, Some(released));
        assert_eq!(levers.calls, ["release", "release"]);
    }
}

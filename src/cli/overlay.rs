//! The `overlay` subcommands that work on the store and on overlay directories.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::app::{CommandError, Context};
use crate::host::os_release::OsRelease;
use crate::host::version::version_cmp;
use crate::modinfo;
use crate::overlay::source::{self, OverlayKey, StageReport};
use crate::overlay::space::SpaceGuard;
use crate::overlay::store::{self, ImportOutcome, StoreError};
use crate::overlay::Manifest;
use crate::state::AgentState;
use crate::watch;

/// Verify an overlay directory (a real path, not under the root) completely.
pub fn overlay_verify(dir: &Path) -> Result<Manifest, CommandError> {
    Ok(store::verify_source(dir)?)
}

/// Verify an overlay directory and check its modules against the manifest's kernel.
pub fn overlay_verify_modules(
    dir: &Path,
    manifest: &Manifest,
) -> Result<Vec<modinfo::ModInfo>, CommandError> {
    Ok(source::check_modules(dir, manifest)?)
}

/// Import an overlay directory into the store, after checking its modules.
pub fn overlay_import(ctx: &Context, dir: &Path) -> Result<ImportOutcome, CommandError> {
    let manifest = overlay_verify(dir)?;
    overlay_verify_modules(dir, &manifest)?;
    let store = ctx.store();
    let lock = store.lock()?;
    // What an interrupted import or stage left goes first, as stage and gc do.
    store.clean_leftovers(&lock)?;
    // The store's reserve, as staging keeps it: the whole overlay must fit before the copy
    // starts, and the copy stops (and is removed) if the file system fills up meanwhile.
    let what = "the imported overlay";
    let mut space = SpaceGuard::new(
        &ctx.root.join(store.dir()),
        store.dir(),
        ctx.settings.stage.keep_free,
        what,
    );
    space
        .ensure(source::manifest_total(&manifest), what)
        .map_err(StoreError::Space)?;
    Ok(store.import_within(dir, &mut space)?)
}

/// Stage the overlay for a kernel from the configured sources (`overlay fetch`). The driver
/// version is `driver`, else the pinned `driver.version`; the architecture is the machine's.
pub fn overlay_fetch(
    ctx: &Context,
    kernel_release: &str,
    driver: Option<&str>,
) -> Result<StageReport, CommandError> {
    let Some(driver_version) = driver.or(ctx.settings.driver_version.as_deref()) else {
        return Err(CommandError::NoDriverVersion {
            kernel_release: kernel_release.to_string(),
        });
    };
    let key = OverlayKey {
        kernel_release: kernel_release.to_string(),
        driver_version: driver_version.to_string(),
        arch: crate::host::machine_arch(),
    };
    Ok(source::stage(
        &ctx.root,
        &ctx.store(),
        &ctx.settings.stage,
        &key,
        None,
    )?)
}

/// Remove the overlays of kernels other than `keep`, the running kernel's, the next boot's
/// and the `stage.keep-extra` newest others (`overlay gc`).
pub fn overlay_gc(ctx: &Context, keep: &[String]) -> Result<Vec<PathBuf>, CommandError> {
    let mut keep = keep.to_vec();
    keep.extend(kernels_in_use(ctx)?);
    Ok(ctx.store().gc(&keep, ctx.settings.stage.keep_extra)?)
}

/// The kernels whose overlays a manual GC must keep: the running one (the next boot may well
/// run it again), the one the host boots next as the daemon would find it, and the pending
/// kernel the state file records. When the next boot cannot be read, every stored kernel newer
/// than the running one is kept instead: removing the next boot's overlay would leave that
/// boot without a driver. A fake root without /proc or os-release has none of these.
fn kernels_in_use(ctx: &Context) -> Result<Vec<String>, CommandError> {
    let mut kernels: Vec<String> = AgentState::read(&ctx.root)
        .pending
        .map(|next| next.kernel_release)
        .into_iter()
        .collect();
    let Ok(running) = crate::host::kernel::read_kernel_release(&ctx.root) else {
        return Ok(kernels);
    };
    kernels.push(running.clone());
    let Ok(os) = OsRelease::read(&ctx.root) else {
        return Ok(kernels);
    };
    let Some(family) = watch::choose(ctx.settings.detector, &ctx.root, &os) else {
        return Ok(kernels);
    };
    let update_engine = crate::state::last_update_engine_state(&ctx.root);
    match watch::next_boot(&ctx.root, family, &running, update_engine) {
        Ok(next) => kernels.extend(next.map(|n| n.kernel_release)),
        Err(e) => {
            let newer: Vec<String> = ctx
                .store()
                .kernel_releases()?
                .into_iter()
                .filter(|k| version_cmp(k, &running) == Ordering::Greater)
                .collect();
            warn!(
                "cannot tell which kernel boots next ({e}); keeping the overlays of every kernel newer than the running {running}: {}",
                if newer.is_empty() { "none".to_string() } else { newer.join(", ") }
            );
            kernels.extend(newer);
        }
    }
    Ok(kernels)
}

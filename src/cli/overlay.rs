//! The `overlay` subcommands that work on the store and on overlay directories.

use std::path::{Path, PathBuf};

use crate::app::{CommandError, Context};
use crate::modinfo;
use crate::overlay::source::{self, OverlayKey, StageReport};
use crate::overlay::store::{self, ImportOutcome};
use crate::overlay::Manifest;

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
    Ok(store.import(dir)?)
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
    )?)
}

/// Remove the overlays of kernels other than `keep`, the running kernel's and the
/// `stage.keep-extra` newest others (`overlay gc`).
pub fn overlay_gc(ctx: &Context, keep: &[String]) -> Result<Vec<PathBuf>, CommandError> {
    let mut keep = keep.to_vec();
    // The next boot may well run this kernel again. A fake root without /proc has none.
    if let Ok(running) = crate::host::kernel::read_kernel_release(&ctx.root) {
        keep.push(running);
    }
    Ok(ctx.store().gc(&keep, ctx.settings.stage.keep_extra)?)
}

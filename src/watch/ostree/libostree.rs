//! The same answer as the direct reader, asked of libostree (cargo feature `ostree`).

use std::path::{Path, PathBuf};

use ::ostree::{gio, glib};

use super::{
    is_stateroot_name, next_boot_of, read_bounded, DeploymentId, OstreeError, PendingDeployment,
    StagedDeployment, LOADER_ENTRIES, STAGED_DEPLOYMENT, STAGED_DEPLOYMENT_MAX_BYTES,
};
use crate::host::Root;
use crate::watch::NextBoot;

/// [`super::next_boot`] through libostree.
pub fn next_boot_libostree(
    root: &Root,
    running_kernel: &str,
) -> Result<Option<NextBoot>, OstreeError> {
    let pending = pending_deployment_libostree(root)?;
    next_boot_of(root, &pending, running_kernel)
}

/// The deployment the next boot runs, as libostree lists it: the staged one, else the first.
///
/// libostree reads [`STAGED_DEPLOYMENT`] only when the sysroot is the booted system's `/`
/// (`_ostree_sysroot_reload_staged` returns early otherwise, and always reads the host's
/// `/run`). For any other sysroot (a `--root` in tests, a mounted disk) the record under the
/// root is decoded with glib's own GVariant parser instead, so staging is seen there too.
pub fn pending_deployment_libostree(root: &Root) -> Result<PendingDeployment, OstreeError> {
    let sysroot = ::ostree::Sysroot::new(Some(&gio::File::for_path(root.path())));
    sysroot
        .load(gio::Cancellable::NONE)
        .map_err(|source| OstreeError::Libostree {
            sysroot: root.path().to_path_buf(),
            error: source,
        })?;
    if let Some(staged) = sysroot.staged_deployment() {
        return pending_of(&sysroot, &staged, true, Path::new(STAGED_DEPLOYMENT));
    }
    if !sysroot.is_booted() {
        if let Some(staged) = read_staged_deployment_glib(root)? {
            let dir = staged.target.dir();
            return Ok(PendingDeployment {
                id: staged.target,
                dir,
                staged: true,
                named_by: PathBuf::from(STAGED_DEPLOYMENT),
            });
        }
    }
    let deployments = sysroot.deployments();
    let first = deployments
        .first()
        .ok_or_else(|| OstreeError::NoDeployment {
            entries: PathBuf::from(LOADER_ENTRIES),
        })?;
    pending_of(
        &sysroot,
        first,
        first.is_staged(),
        Path::new(LOADER_ENTRIES),
    )
}

fn pending_of(
    sysroot: &::ostree::Sysroot,
    deployment: &::ostree::Deployment,
    staged: bool,
    named_by: &Path,
) -> Result<PendingDeployment, OstreeError> {
    let stateroot = deployment.osname().to_string();
    let csum = deployment.csum().to_string();
    let bad_name = || OstreeError::BadDeploymentName {
        path: named_by.to_path_buf(),
        name: format!("{stateroot}/{csum}.{}", deployment.deployserial()),
    };
    let serial = u32::try_from(deployment.deployserial()).map_err(|_| bad_name())?;
    if !is_stateroot_name(&stateroot) {
        return Err(bad_name());
    }
    Ok(PendingDeployment {
        id: DeploymentId {
            stateroot,
            csum,
            serial,
        },
        dir: Path::new("/").join(sysroot.deployment_dirpath(deployment).as_str()),
        staged,
        named_by: named_by.to_path_buf(),
    })
}

/// [`STAGED_DEPLOYMENT`] under the root, decoded by glib as libostree decodes it. glib reads
/// malformed GVariant data as default values (no error), so a damaged record reads as
/// "nothing staged" here where the direct reader reports it.
pub fn read_staged_deployment_glib(root: &Root) -> Result<Option<StagedDeployment>, OstreeError> {
    let path = PathBuf::from(STAGED_DEPLOYMENT);
    let Some(bytes) = read_bounded(root, &path, STAGED_DEPLOYMENT_MAX_BYTES)? else {
        return Ok(None);
    };
    // Untrusted: glib validates as it reads.
    let record = glib::Variant::from_data_with_type(bytes, glib::VariantTy::VARDICT);
    let record = glib::VariantDict::new(Some(&record));
    let Some(target) = record.lookup_value("target", Some(glib::VariantTy::VARDICT)) else {
        return Ok(None);
    };
    let target = glib::VariantDict::new(Some(&target));
    let field =
        |key: &str| {
            target.lookup::<String>(key).ok().flatten().ok_or_else(|| {
                OstreeError::StagedDeployment {
                    path: path.clone(),
                    reason: format!("'target' has no string '{key}'"),
                }
            })
        };
    let (name, osname, bootcsum) = (field("name")?, field("osname")?, field("bootcsum")?);
    let Some((csum, serial)) = super::parse_deployment_name(&name) else {
        return Err(OstreeError::StagedDeployment {
            path,
            reason: format!("'target' 'name' is '{name}', expected <checksum>.<serial>"),
        });
    };
    if !is_stateroot_name(&osname) {
        return Err(OstreeError::StagedDeployment {
            path,
            reason: format!("'target' 'osname' is '{osname}', not a stateroot name"),
        });
    }
    Ok(Some(StagedDeployment {
        target: DeploymentId {
            stateroot: osname,
            csum,
            serial,
        },
        bootcsum,
        locked: record
            .lookup::<bool>("locked")
            .ok()
            .flatten()
            .unwrap_or(false),
    }))
}

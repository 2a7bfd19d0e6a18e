//! Files the agent keeps up to date for other software (metrics, NFD features, the CDI spec):
//! written atomically, only when their directory exists, so a host without that consumer is
//! left alone.

use std::path::{Path, PathBuf};

use tracing::debug;

use crate::fsutil;
use crate::host::Root;

/// Why an output file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The atomic write failed.
    #[error("cannot write {path}: {error}; check that its directory is writable (set outputs.{key} = \"\" to turn it off)")]
    Write {
        /// The file, as a host path.
        path: PathBuf,
        /// Its `outputs.*` config key, named in the message so the user can turn the output off.
        key: &'static str,
        /// The underlying I/O error.
        error: std::io::Error,
    },
}

/// Atomically replace `host_path` when its directory exists and the content differs.
pub fn write_if_dir_exists(
    root: &Root,
    host_path: &Path,
    key: &'static str,
    contents: &[u8],
) -> Result<bool, OutputError> {
    let path = root.join(host_path);
    if !path.parent().is_some_and(Path::is_dir) {
        debug!(
            "{} not written: its directory does not exist",
            host_path.display()
        );
        return Ok(false);
    }
    if std::fs::read(&path).is_ok_and(|old| old == contents) {
        return Ok(false);
    }
    fsutil::write_atomic(&path, contents, 0o644).map_err(|source| OutputError::Write {
        path: host_path.to_path_buf(),
        key,
        error: source,
    })?;
    Ok(true)
}

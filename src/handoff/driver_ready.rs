//! Readiness files that others already watch.
//!
//! The NVIDIA GPU Operator's operands (toolkit, device plugin, GFD, DCGM exporter, MIG manager,
//! the DRA driver) wait in their init containers for `/run/nvidia/validations/driver-ready` and
//! then `source` it as shell variables to learn where the driver is. The operator's validator
//! writes it; on a host whose driver the operator does not manage (`driver.enabled=false`) the
//! agent writes the same file in the same format, so those operands start as soon as the driver
//! is loaded, and removes it when the driver is not ready.

use crate::failpoints::failpoint;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil;
use crate::host::Root;

/// Where the GPU Operator's validator keeps the driver readiness file.
pub const DRIVER_READY_PATH: &str = "/run/nvidia/validations/driver-ready";

/// Where the GPU Operator mounts the host's root in its operand containers.
const HOST_CTR_PATH: &str = "/host";
/// Where the GPU Operator mounts the driver install dir (`/run/nvidia/driver` by default) in its
/// operand containers.
const DRIVER_ROOT_CTR_PATH: &str = "/driver-root";

const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// Why the `driver-ready` file could not be written or removed.
#[derive(Debug, thiserror::Error)]
pub enum ReadinessError {
    /// A path for the file is relative or has characters a shell would interpret.
    #[error(
        "expected {field} in the driver readiness file to be an absolute path of plain characters \
         (letters, digits, `/._+@:,=-`), found {found:?}; the file is sourced by shell scripts, \
         so use a plain path for the driver root"
    )]
    UnsafePath {
        /// The variable it was for (`NVIDIA_DRIVER_ROOT` or `NVIDIA_DEV_ROOT`).
        field: &'static str,
        /// The offending path.
        found: String,
    },
    /// `is_host_driver` is set but the driver root or the device root is not `/`.
    #[error(
        "a host-installed driver (IS_HOST_DRIVER=true) must have its driver and device roots at \
         `/`, found driver root {driver_root:?} and device root {dev_root:?}; use \
         `DriverReady::for_driver_root` or set is_host_driver to false"
    )]
    HostDriverNotAtRoot {
        /// The driver root given.
        driver_root: String,
        /// The device root given.
        dev_root: String,
    },
    /// The device root is neither `/` nor the driver root, the only two the operator can mount.
    #[error(
        "expected the device root to be `/` or the driver root {driver_root:?}, found \
         {dev_root:?}; the GPU Operator can only mount one of those two into its containers"
    )]
    UnsupportedDevRoot {
        /// The driver root given.
        driver_root: String,
        /// The device root given.
        dev_root: String,
    },
    /// A directory sits where the readiness file goes.
    #[error(
        "expected {path} to be a regular file, found a directory; remove it so the driver \
         readiness file can be written there"
    )]
    NotAFile {
        /// The readiness file (joined onto the root).
        path: PathBuf,
    },
    /// The existing file could not be read (to compare it with the new text).
    #[error("cannot read {path}: {error}; expected a readable regular file or nothing there")]
    Read {
        /// The readiness file (joined onto the root).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The file's directory could not be created.
    #[error(
        "cannot create directory {path} for the driver readiness file: {error}; check that /run \
         is writable and no regular file is in the way"
    )]
    CreateDir {
        /// The directory (joined onto the root).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The atomic write failed.
    #[error(
        "cannot write {path}: {error}; the GPU Operator's operands will keep waiting for the \
         driver. Check that the directory is writable"
    )]
    Write {
        /// The readiness file (joined onto the root).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The file could not be examined or removed.
    #[error(
        "cannot remove {path}: {error}; the GPU Operator's operands may start against a driver \
         that is not ready. Remove the file by hand"
    )]
    Remove {
        /// The readiness file (joined onto the root).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
}

/// Where the driver is, in the terms of the GPU Operator's `driver-ready` file.
///
/// `is_host_driver` follows the validator's meaning: the driver is installed directly in the
/// host's root filesystem, so operands find it through their `/host` mount of the host root
/// (`DRIVER_ROOT_CTR_PATH=/host`). Otherwise the driver sits in the driver install dir, which
/// operands see through their `/driver-root` mount of `/run/nvidia/driver`.
///
/// For the agent that means: `is_host_driver` is true exactly when the driver root is `/`, which
/// is the case when the overlay has no user-space part and the host's own libraries and tools are
/// used. When the agent mounts the overlay read-only at `/run/nvidia/driver` it is `false`, just
/// as for the operator's own driver container, which exposes its install at that same path;
/// calling that a "host driver" would send operands to look for `nvidia-smi` and the libraries
/// under `/host`, where they are not. [`DriverReady::for_driver_root`] applies this rule.
///
/// `dev_root` is where the `/dev/nvidia*` nodes live: the agent makes them in the host's `/dev`,
/// so it is `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverReady {
    /// `NVIDIA_DRIVER_ROOT`: where the driver's files are, as a host path.
    pub driver_root: String,
    /// `NVIDIA_DEV_ROOT`: where the `/dev/nvidia*` nodes are, as a host path (`/` for the agent).
    pub dev_root: String,
    /// `IS_HOST_DRIVER`: the driver is installed in the host's own root (driver root `/`).
    pub is_host_driver: bool,
}

impl DriverReady {
    /// The readiness of a driver exposed at `driver_root`, with device nodes in the host's `/dev`.
    pub fn for_driver_root(driver_root: &str) -> Self {
        DriverReady {
            driver_root: driver_root.to_string(),
            dev_root: "/".to_string(),
            is_host_driver: driver_root == "/",
        }
    }

    /// Check that the file would say something the operands can act on: plain absolute paths
    /// (the file is sourced by shell scripts), a host driver at `/`, and a device root the
    /// operator mounts.
    pub fn validate(&self) -> Result<(), ReadinessError> {
        check_path("NVIDIA_DRIVER_ROOT", &self.driver_root)?;
        check_path("NVIDIA_DEV_ROOT", &self.dev_root)?;
        if self.is_host_driver && (self.driver_root != "/" || self.dev_root != "/") {
            return Err(ReadinessError::HostDriverNotAtRoot {
                driver_root: self.driver_root.clone(),
                dev_root: self.dev_root.clone(),
            });
        }
        if self.dev_root != "/" && self.dev_root != self.driver_root {
            return Err(ReadinessError::UnsupportedDevRoot {
                driver_root: self.driver_root.clone(),
                dev_root: self.dev_root.clone(),
            });
        }
        Ok(())
    }
}

fn check_path(field: &'static str, path: &str) -> Result<(), ReadinessError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._+@:,=-".contains(c);
    if path.starts_with('/') && path.chars().all(plain) {
        Ok(())
    } else {
        Err(ReadinessError::UnsafePath {
            field,
            found: path.to_string(),
        })
    }
}

/// The text of the `driver-ready` file, byte for byte what the GPU Operator's validator writes:
/// five unquoted `KEY=value` lines in this order, each ending in a newline.
///
/// Source: NVIDIA/gpu-operator, `cmd/nvidia-validator/main.go` (`(*Driver).createStatusFile`,
/// read at commit 92f404ceb77cb8c68a7218de09290049b14aef04) for the keys, their order and the
/// `%t` spelling of the boolean; `cmd/nvidia-validator/driver.go` (`getDriverInfo`, commit
/// 31dfd0eb5fc7622cb1fb682c472d991c7d706db8) for the values.
///
/// The container paths are the operator's mounts: a host driver is seen at `/host`, any other at
/// `/driver-root`; device nodes in the host's `/dev` are seen at `/host`, device nodes in the
/// driver root at `/driver-root`.
pub fn driver_ready_contents(ready: &DriverReady) -> String {
    let (driver_root_ctr_path, dev_root_ctr_path) = if ready.is_host_driver {
        (HOST_CTR_PATH, HOST_CTR_PATH)
    } else if ready.dev_root == "/" {
        (DRIVER_ROOT_CTR_PATH, HOST_CTR_PATH)
    } else {
        (DRIVER_ROOT_CTR_PATH, DRIVER_ROOT_CTR_PATH)
    };
    format!(
        "IS_HOST_DRIVER={}\n\
         NVIDIA_DRIVER_ROOT={}\n\
         DRIVER_ROOT_CTR_PATH={}\n\
         NVIDIA_DEV_ROOT={}\n\
         DEV_ROOT_CTR_PATH={}\n",
        ready.is_host_driver,
        ready.driver_root,
        driver_root_ctr_path,
        ready.dev_root,
        dev_root_ctr_path,
    )
}

/// Write the `driver-ready` file at `host_path` (resolved under `root`), creating its directory
/// (mode 0755) if needed. Atomic; nothing is written when the file already says the same.
/// Returns whether the file changed.
pub fn write_driver_ready(
    root: &Root,
    host_path: &Path,
    ready: &DriverReady,
) -> Result<bool, ReadinessError> {
    ready.validate()?;
    let path = root.join(host_path);
    let contents = driver_ready_contents(ready);
    match fs::read(&path) {
        Ok(existing) if existing == contents.as_bytes() => {
            tracing::debug!(path = %path.display(), "driver readiness file already up to date");
            return Ok(false);
        }
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(_) if path.is_dir() => return Err(ReadinessError::NotAFile { path }),
        Err(source) => {
            return Err(ReadinessError::Read {
                path,
                error: source,
            })
        }
    }
    if let Some(parent) = path.parent() {
        fsutil::create_dir_all_mode(parent, DIR_MODE).map_err(|source| {
            ReadinessError::CreateDir {
                path: parent.to_path_buf(),
                error: source,
            }
        })?;
    }
    failpoint!("readiness::write");
    fsutil::write_atomic(&path, contents.as_bytes(), FILE_MODE).map_err(|source| {
        ReadinessError::Write {
            path: path.clone(),
            error: source,
        }
    })?;
    tracing::info!(
        path = %path.display(),
        DRIVER_ROOT = %ready.driver_root,
        IS_HOST_DRIVER = ready.is_host_driver,
        "wrote the driver readiness file"
    );
    Ok(true)
}

/// Remove the `driver-ready` file at `host_path` (resolved under `root`), as the validator does
/// before it checks the driver. A missing file (or directory) is fine. Returns whether a file was
/// removed.
pub fn remove_driver_ready(root: &Root, host_path: &Path) -> Result<bool, ReadinessError> {
    let path = root.join(host_path);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => return Err(ReadinessError::NotAFile { path }),
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) if err.raw_os_error() == Some(nix::errno::Errno::ENOTDIR as i32) => {
            return Ok(false)
        }
        Err(source) => {
            return Err(ReadinessError::Remove {
                path,
                error: source,
            })
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(ReadinessError::Remove {
                path,
                error: source,
            })
        }
    }
    if let Some(parent) = path.parent() {
        // Durability only matters off tmpfs; the file is gone either way.
        if let Err(err) = fsutil::fsync_dir(parent) {
            tracing::warn!(path = %parent.display(), error = %err, "cannot fsync directory");
        }
    }
    tracing::info!(path = %path.display(), "removed the driver readiness file");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use pretty_assertions::assert_eq;

    fn fake_host() -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        (dir, root)
    }

    fn ready_path() -> &'static Path {
        Path::new(DRIVER_READY_PATH)
    }

    #[test]
    fn host_driver_format() {
        let ready = DriverReady::for_driver_root("/");
        assert!(ready.is_host_driver);
        assert_eq!(
            driver_ready_contents(&ready),
            "IS_HOST_DRIVER=true\n\
             NVIDIA_DRIVER_ROOT=/\n\
             DRIVER_ROOT_CTR_PATH=/host\n\
             NVIDIA_DEV_ROOT=/\n\
             DEV_ROOT_CTR_PATH=/host\n"
        );
    }

    #[test]
    fn overlay_at_run_nvidia_driver_format() {
        // The same text the k8s-device-plugin's tests use as the operator's contract for a
        // driver at /run/nvidia/driver with device nodes in the host's /dev.
        let ready = DriverReady::for_driver_root("/run/nvidia/driver");
        assert!(!ready.is_host_driver);
        assert_eq!(ready.dev_root, "/");
        assert_eq!(
            driver_ready_contents(&ready),
            "IS_HOST_DRIVER=false\n\
             NVIDIA_DRIVER_ROOT=/run/nvidia/driver\n\
             DRIVER_ROOT_CTR_PATH=/driver-root\n\
             NVIDIA_DEV_ROOT=/\n\
             DEV_ROOT_CTR_PATH=/host\n"
        );
    }

    #[test]
    fn device_nodes_inside_the_driver_root_format() {
        let ready = DriverReady {
            driver_root: "/run/nvidia/driver".into(),
            dev_root: "/run/nvidia/driver".into(),
            is_host_driver: false,
        };
        assert_eq!(
            driver_ready_contents(&ready),
            "IS_HOST_DRIVER=false\n\
             NVIDIA_DRIVER_ROOT=/run/nvidia/driver\n\
             DRIVER_ROOT_CTR_PATH=/driver-root\n\
             NVIDIA_DEV_ROOT=/run/nvidia/driver\n\
             DEV_ROOT_CTR_PATH=/driver-root\n"
        );
    }

    #[test]
    fn contents_source_as_shell_variables() {
        let (_dir, root) = fake_host();
        let ready = DriverReady::for_driver_root("/run/nvidia/driver");
        write_driver_ready(&root, ready_path(), &ready).unwrap();
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#". "$1" && echo "$IS_HOST_DRIVER $NVIDIA_DRIVER_ROOT $DRIVER_ROOT_CTR_PATH""#)
            .arg("sh")
            .arg(root.join(DRIVER_READY_PATH))
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            "false /run/nvidia/driver /driver-root\n"
        );
    }

    #[test]
    fn write_creates_dirs_and_skips_identical_content() {
        let (dir, root) = fake_host();
        let ready = DriverReady::for_driver_root("/run/nvidia/driver");
        assert!(write_driver_ready(&root, ready_path(), &ready).unwrap());

        let path = root.join(DRIVER_READY_PATH);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            driver_ready_contents(&ready)
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        for created in ["run", "run/nvidia", "run/nvidia/validations"] {
            let mode = fs::metadata(dir.path().join(created))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755, "{created}");
        }

        let before = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!write_driver_ready(&root, ready_path(), &ready).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), before);

        let host = DriverReady::for_driver_root("/");
        assert!(write_driver_ready(&root, ready_path(), &host).unwrap());
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            driver_ready_contents(&host)
        );
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn write_rejects_what_operands_could_not_use() {
        let (_dir, root) = fake_host();
        let cases = [
            DriverReady::for_driver_root("run/nvidia/driver"),
            DriverReady::for_driver_root("/run/nvidia driver"),
            DriverReady::for_driver_root("/run/$(reboot)"),
            DriverReady {
                driver_root: "/run/nvidia/driver".into(),
                dev_root: "/".into(),
                is_host_driver: true,
            },
            DriverReady {
                driver_root: "/run/nvidia/driver".into(),
                dev_root: "/elsewhere".into(),
                is_host_driver: false,
            },
        ];
        for ready in cases {
            let err = write_driver_ready(&root, ready_path(), &ready).unwrap_err();
            assert!(err.to_string().contains("expected") || err.to_string().contains("must"));
            assert!(!root.join(DRIVER_READY_PATH).exists(), "{ready:?}");
        }
    }

    #[test]
    fn a_directory_in_the_way_is_an_error() {
        let (_dir, root) = fake_host();
        let path = root.join(DRIVER_READY_PATH);
        fs::create_dir_all(&path).unwrap();
        let ready = DriverReady::for_driver_root("/");
        let err = write_driver_ready(&root, ready_path(), &ready).unwrap_err();
        assert!(matches!(err, ReadinessError::NotAFile { .. }), "{err:?}");
        let err = remove_driver_ready(&root, ready_path()).unwrap_err();
        assert!(matches!(err, ReadinessError::NotAFile { .. }), "{err:?}");
        assert!(path.is_dir());
    }

    #[test]
    fn a_file_as_parent_is_an_error_for_write_and_nothing_for_remove() {
        let (_dir, root) = fake_host();
        let parent = root.join("/run/nvidia/validations");
        fs::create_dir_all(parent.parent().unwrap()).unwrap();
        fs::write(&parent, "x").unwrap();
        let ready = DriverReady::for_driver_root("/");
        let err = write_driver_ready(&root, ready_path(), &ready).unwrap_err();
        assert!(matches!(err, ReadinessError::Read { .. }), "{err:?}");
        assert!(!remove_driver_ready(&root, ready_path()).unwrap());
        assert_eq!(fs::read_to_string(&parent).unwrap(), "x");
    }

    #[test]
    fn remove_is_fine_when_missing() {
        let (_dir, root) = fake_host();
        assert!(!remove_driver_ready(&root, ready_path()).unwrap());

        let ready = DriverReady::for_driver_root("/run/nvidia/driver");
        write_driver_ready(&root, ready_path(), &ready).unwrap();
        assert!(remove_driver_ready(&root, ready_path()).unwrap());
        assert!(!root.join(DRIVER_READY_PATH).exists());
        assert!(
            root.join("/run/nvidia/validations").is_dir(),
            "directory stays"
        );
        assert!(!remove_driver_ready(&root, ready_path()).unwrap());
    }
}

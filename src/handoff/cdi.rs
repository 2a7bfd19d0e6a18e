//! The Container Device Interface spec for the loaded driver (`outputs.cdi-spec`, by default
//! `/var/run/cdi/nvidia.json`), regenerated after every load.
//!
//! Where `nvidia-ctk` is installed it writes the spec (`nvidia-ctk cdi generate`), since it knows
//! every library and hook a CUDA container needs. Otherwise the agent writes a minimal valid spec
//! itself: kind `nvidia.com/gpu`, a device per `/dev/nvidiaN` and `all`, the control and UVM
//! device nodes, and read-only bind mounts of the libraries and tools in the overlay's user
//! space. The agent's own spec is JSON (CDI reads `.json` and `.yaml` alike, and JSON needs no
//! YAML writer); the spec is replaced atomically either way.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::fsutil;
use crate::handoff::output_file::{self, OutputError};
use crate::host::Root;

/// The CDI spec version the agent's minimal spec declares.
pub const CDI_VERSION: &str = "0.6.0";
/// The CDI device kind the spec declares (`nvidia.com/gpu=0`, `nvidia.com/gpu=all`, …).
pub const CDI_KIND: &str = "nvidia.com/gpu";
/// Where nvidia-ctk is looked for, under the root.
const NVIDIA_CTK_DIRS: [&str; 4] = ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/opt/bin"];
/// Directories of an overlay's user space whose files are bind-mounted into containers.
const LIBRARY_DIRS: [&str; 4] = [
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib",
];

/// Why the CDI spec could not be regenerated.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// The agent's minimal spec could not be written.
    #[error(transparent)]
    Write(#[from] OutputError),
    /// `nvidia-ctk cdi generate` could not run, failed, or its output could not be moved into place.
    #[error("`{command}` failed: {detail}; containers asking for {CDI_KIND} devices will not get them until it works (or remove nvidia-ctk so the agent writes a minimal spec)")]
    NvidiaCtk {
        /// The command line as run (`Debug` form).
        command: String,
        /// Its stderr, or the error that kept it from running or its output from moving.
        detail: String,
    },
    /// A directory could not be listed (`/dev`) or created (the spec's directory).
    #[error("cannot read {path}: {error}")]
    Read {
        /// The directory (joined onto the root).
        path: PathBuf,
        /// The underlying I/O error.
        error: std::io::Error,
    },
}

/// What the spec is made from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CdiFacts {
    /// GPU minor numbers (`/dev/nvidia<minor>`), sorted.
    pub gpus: Vec<u32>,
    /// Control and UVM nodes that exist (`/dev/nvidiactl`, `/dev/nvidia-uvm`, …).
    pub control_nodes: Vec<String>,
    /// User-space files as (host path under the driver root, path in the container).
    pub mounts: Vec<(PathBuf, PathBuf)>,
}

/// The CDI spec as JSON; pure.
pub fn spec(facts: &CdiFacts) -> Value {
    let node = |path: &str| json!({ "path": path });
    let mut devices: Vec<Value> = facts
        .gpus
        .iter()
        .map(|minor| {
            json!({
                "name": minor.to_string(),
                "containerEdits": { "deviceNodes": [node(&format!("/dev/nvidia{minor}"))] }
            })
        })
        .collect();
    devices.push(json!({
        "name": "all",
        "containerEdits": {
            "deviceNodes": facts.gpus.iter().map(|m| node(&format!("/dev/nvidia{m}"))).collect::<Vec<_>>()
        }
    }));
    let mounts: Vec<Value> = facts
        .mounts
        .iter()
        .map(|(host, container)| {
            json!({
                "hostPath": host,
                "containerPath": container,
                "options": ["ro", "nosuid", "nodev", "bind"]
            })
        })
        .collect();
    json!({
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": devices,
        "containerEdits": {
            "deviceNodes": facts.control_nodes.iter().map(|p| node(p)).collect::<Vec<_>>(),
            "mounts": mounts
        }
    })
}

/// Look at `/dev` and the overlay's user space under `root`.
pub fn gather(root: &Root, overlay_dir: &Path, driver_root: &Path) -> Result<CdiFacts, CdiError> {
    let mut facts = CdiFacts::default();
    let dev = root.join("/dev");
    let read = |path: &Path| -> Result<std::fs::ReadDir, CdiError> {
        std::fs::read_dir(path).map_err(|source| CdiError::Read {
            path: path.to_path_buf(),
            error: source,
        })
    };
    for entry in read(&dev)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(minor) = name
            .strip_prefix("nvidia")
            .and_then(|n| n.parse::<u32>().ok())
        {
            facts.gpus.push(minor);
        }
    }
    facts.gpus.sort_unstable();
    for name in ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"] {
        if dev.join(name).exists() {
            facts.control_nodes.push(format!("/dev/{name}"));
        }
    }
    let overlay = root.join(overlay_dir);
    let mut user_space: Vec<PathBuf> = Vec::new();
    for dir in LIBRARY_DIRS {
        let Ok(entries) = std::fs::read_dir(overlay.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("lib") && name.contains(".so") {
                user_space.push(Path::new(dir).join(name));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(overlay.join("usr/bin")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("nvidia-") {
                user_space.push(Path::new("usr/bin").join(name));
            }
        }
    }
    user_space.sort();
    facts.mounts = user_space
        .into_iter()
        .map(|rel| (driver_root.join(&rel), Path::new("/").join(rel)))
        .collect();
    Ok(facts)
}

/// `nvidia-ctk` under the root, if installed.
pub fn find_nvidia_ctk(root: &Root) -> Option<PathBuf> {
    NVIDIA_CTK_DIRS
        .iter()
        .map(|dir| root.join(Path::new(dir).join("nvidia-ctk")))
        .find(|path| path.is_file())
}

/// Who wrote the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdiOutcome {
    /// `nvidia-ctk cdi generate` wrote it.
    NvidiaCtk,
    /// The agent's minimal spec.
    Minimal,
    /// The agent's minimal spec, already up to date.
    Unchanged,
}

/// Regenerate the spec at `spec_path` (a host path) for the driver at `driver_root` whose
/// overlay is `overlay_dir`.
pub fn regenerate(
    root: &Root,
    spec_path: &Path,
    overlay_dir: &Path,
    driver_root: &Path,
) -> Result<CdiOutcome, CdiError> {
    let target = root.join(spec_path);
    if let Some(dir) = target.parent() {
        // /var/run/cdi is the agent's to create: CDI consumers only read it.
        fsutil::create_dir_all_mode(dir, 0o755).map_err(|source| CdiError::Read {
            path: dir.to_path_buf(),
            error: source,
        })?;
    }
    if let Some(ctk) = find_nvidia_ctk(root) {
        let tmp = fsutil::temp_sibling(&target);
        let format = if spec_path.extension().is_some_and(|e| e == "json") {
            "json"
        } else {
            "yaml"
        };
        let mut command = Command::new(&ctk);
        command
            .args(["cdi", "generate"])
            .arg(format!(
                "--driver-root={}",
                root.join(driver_root).display()
            ))
            .arg(format!("--format={format}"))
            .arg(format!("--output={}", tmp.display()));
        let shown = format!("{command:?}");
        let result = command.output();
        let failed = |detail: String| {
            let _ = std::fs::remove_file(&tmp);
            CdiError::NvidiaCtk {
                command: shown.clone(),
                detail,
            }
        };
        let output = result.map_err(|e| failed(e.to_string()))?;
        if !output.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            ));
        }
        std::fs::rename(&tmp, &target).map_err(|e| failed(e.to_string()))?;
        return Ok(CdiOutcome::NvidiaCtk);
    }
    let facts = gather(root, overlay_dir, driver_root)?;
    let mut text = serde_json::to_vec_pretty(&spec(&facts)).expect("spec serializes");
    text.push(b'\n');
    let written = output_file::write_if_dir_exists(root, spec_path, "cdi-spec", &text)?;
    Ok(if written {
        CdiOutcome::Minimal
    } else {
        CdiOutcome::Unchanged
    })
}

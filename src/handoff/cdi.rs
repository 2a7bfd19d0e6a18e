//! The Container Device Interface spec for the loaded driver (`outputs.cdi-spec`, by default
//! `/var/run/cdi/nvidia.json`), regenerated after every load.
//!
//! Where `nvidia-ctk` is installed it writes the spec (`nvidia-ctk cdi generate`), since it knows
//! every library and hook a CUDA container needs. It is given `--dev-root=/` as well as
//! `--driver-root`: without it the toolkit takes the dev root to be the driver root
//! (NVIDIA/nvidia-container-toolkit `pkg/nvcdi/options.go`, `populateOptions`: `if o.devRoot ==
//! "" { o.devRoot = o.driverRoot }`), looks for `/run/nvidia/driver/dev/nvidia*` and writes a
//! spec without device nodes. `--dev-root` exists since nvidia-ctk v1.15.0 (commit 00a712d0,
//! "Add --dev-root option to CDI spec generation"). Whatever nvidia-ctk writes is checked: a
//! spec that lacks a device node `/dev` has is refused, never claimed.
//!
//! Otherwise the agent writes the spec itself, complete as nvidia-ctk's is: a device per
//! `/dev/nvidiaN` and `all` (with the MIG access and IMEX channel nodes), the control and UVM
//! nodes, read-only bind mounts of the overlay's libraries and `nvidia-*` tools, and the two
//! hooks nvidia-ctk's specs carry (`internal/discover/hooks.go`, `symlinks.go`, `ldconfig.go`):
//! `create-symlinks` (the overlay's SONAME links, and `libcuda.so`) and `update-ldcache` (the
//! library folders, so an image whose ld.so.cache knows other folders finds `libcuda.so.1`).
//! The hooks need `nvidia-cdi-hook` on the host; without it no spec is claimed (a stale one is
//! removed) and the error says why. The agent's own spec is JSON (CDI reads `.json` and `.yaml`
//! alike); it is replaced atomically either way.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::fsutil;
use crate::handoff::output_file::{self, OutputError};
use crate::host::Root;

/// The CDI spec version the agent's spec declares.
pub const CDI_VERSION: &str = "0.6.0";
/// The CDI device kind the spec declares (`nvidia.com/gpu=0`, `nvidia.com/gpu=all`, …).
pub const CDI_KIND: &str = "nvidia.com/gpu";
/// Where nvidia-ctk and nvidia-cdi-hook are looked for, under the root.
const TOOL_DIRS: [&str; 4] = ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/opt/bin"];
/// The hook binary the agent's own spec runs (nvidia-ctk's default, `defaultNvidiaCDIHookPath`).
pub const CDI_HOOK: &str = "nvidia-cdi-hook";
/// Directories of an overlay's user space whose files are bind-mounted into containers.
const LIBRARY_DIRS: [&str; 4] = [
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib",
];
/// `/dev` nodes a spec must carry when they exist on the host.
const CONTROL_NODES: [&str; 3] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

/// Why the CDI spec could not be regenerated.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// The agent's spec could not be written.
    #[error(transparent)]
    Write(#[from] OutputError),
    /// `nvidia-ctk cdi generate` could not run, failed, or its output could not be moved into place.
    #[error("`{command}` failed: {detail}; containers asking for {CDI_KIND} devices will not get them until it works (or remove nvidia-ctk so the agent writes its own spec)")]
    NvidiaCtk {
        /// The command line as run (`Debug` form).
        command: String,
        /// Its stderr, or the error that kept it from running or its output from moving.
        detail: String,
    },
    /// nvidia-ctk is older than v1.15.0 and has no `--dev-root`.
    #[error("{ctk} has no --dev-root (it came with nvidia-ctk v1.15.0; it said: {detail}); without it nvidia-ctk looks for the device nodes under the driver root and writes a spec without them. Install nvidia-container-toolkit 1.15.0 or later, or remove nvidia-ctk so the agent writes its own spec; no CDI spec is claimed until then")]
    NvidiaCtkTooOld {
        /// The nvidia-ctk found (host path under the root).
        ctk: PathBuf,
        /// Its stderr.
        detail: String,
    },
    /// The spec nvidia-ctk wrote lacks device nodes that exist.
    #[error("the CDI spec `nvidia-ctk cdi generate` wrote has no device node {missing:?}, which /dev has; containers would see no GPU, so it was not installed (and a previous spec at {spec} was removed)")]
    MissingNodes {
        /// The nodes `/dev` has that the spec lacks.
        missing: Vec<String>,
        /// The spec path (host path).
        spec: PathBuf,
    },
    /// No `nvidia-cdi-hook` for the agent's own spec.
    #[error("no nvidia-cdi-hook in {dirs} or the overlay's usr/bin: without its create-symlinks and update-ldcache hooks CUDA images would not find libcuda.so.1, so the agent wrote no CDI spec (and removed a previous one at {spec}). Install nvidia-container-toolkit (nvidia-ctk, nvidia-cdi-hook) on the host, or ship nvidia-cdi-hook in the overlay's user space", dirs = TOOL_DIRS.join(", "))]
    NoHook {
        /// The spec path (host path).
        spec: PathBuf,
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
    /// MIG access and IMEX channel nodes that exist, for the `all` device.
    pub caps_nodes: Vec<String>,
    /// User-space files as (host path under the driver root, path in the container).
    pub mounts: Vec<(PathBuf, PathBuf)>,
    /// `create-symlinks` links as nvidia-ctk spells them: `TARGET::LINK` (LINK in the container).
    pub links: Vec<String>,
    /// Container folders holding libraries, for `update-ldcache`.
    pub library_dirs: Vec<PathBuf>,
    /// Host path of `nvidia-cdi-hook`.
    pub hook: PathBuf,
}

fn node(path: &str) -> Value {
    json!({ "path": path })
}

/// One `createContainer` hook as nvidia-ctk writes it (`cdiHookCreator.Create`): the binary's
/// base name, the hook's name, its arguments.
fn hook(binary: &Path, name: &str, args: Vec<String>) -> Value {
    let base = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| CDI_HOOK.into());
    let mut all = vec![base, name.to_string()];
    all.extend(args);
    json!({
        "hookName": "createContainer",
        "path": binary,
        "args": all,
        "env": ["NVIDIA_CTK_DEBUG=false"]
    })
}

fn hooks(facts: &CdiFacts) -> Vec<Value> {
    let mut out = Vec::new();
    if !facts.links.is_empty() {
        let args = facts
            .links
            .iter()
            .flat_map(|l| ["--link".to_string(), l.clone()])
            .collect();
        out.push(hook(&facts.hook, "create-symlinks", args));
    }
    let folders = facts
        .library_dirs
        .iter()
        .flat_map(|d| ["--folder".to_string(), d.display().to_string()])
        .collect();
    out.push(hook(&facts.hook, "update-ldcache", folders));
    out
}

/// The CDI spec as JSON; pure.
pub fn spec(facts: &CdiFacts) -> Value {
    let gpu = |minor: &u32| node(&format!("/dev/nvidia{minor}"));
    let mut devices: Vec<Value> = facts
        .gpus
        .iter()
        .map(|minor| {
            json!({
                "name": minor.to_string(),
                "containerEdits": { "deviceNodes": [gpu(minor)] }
            })
        })
        .collect();
    let mut all: Vec<Value> = facts.gpus.iter().map(gpu).collect();
    all.extend(facts.caps_nodes.iter().map(|p| node(p)));
    devices.push(json!({ "name": "all", "containerEdits": { "deviceNodes": all } }));
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
            "mounts": mounts,
            "hooks": hooks(facts)
        }
    })
}

/// The `/dev` nodes a spec must carry: `/dev/nvidiaN` and the control and UVM nodes that exist.
fn dev_nodes(root: &Root) -> Result<(Vec<u32>, Vec<String>), CdiError> {
    let dev = root.join("/dev");
    let entries = std::fs::read_dir(&dev).map_err(|error| CdiError::Read {
        path: dev.clone(),
        error,
    })?;
    let mut gpus: Vec<u32> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("nvidia")?.parse().ok()
        })
        .collect();
    gpus.sort_unstable();
    let control = CONTROL_NODES
        .iter()
        .filter(|name| dev.join(name).exists())
        .map(|name| format!("/dev/{name}"))
        .collect();
    Ok((gpus, control))
}

/// The overlay's user space: regular files to mount, and its symlinks as `create-symlinks`
/// links (nvidia-ctk mounts files and makes the SONAME links by hook, `getDotSoSymlinks`).
fn user_space(overlay: &Path, driver_root: &Path, facts: &mut CdiFacts) {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in LIBRARY_DIRS {
        let Ok(entries) = std::fs::read_dir(overlay.join(dir)) else {
            continue;
        };
        let mut has_libraries = false;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("lib") && name.contains(".so")) {
                continue;
            }
            has_libraries = true;
            let container = Path::new("/").join(dir).join(&name);
            match std::fs::read_link(entry.path()) {
                Ok(target) => {
                    facts
                        .links
                        .push(format!("{}::{}", target.display(), container.display()))
                }
                Err(_) => files.push(Path::new(dir).join(&name)),
            }
            // `getLinksForMount`: applications dlopen libcuda.so, which is no SONAME.
            if name.starts_with("libcuda.so.") && name.matches('.').count() > 2 {
                let link = Path::new("/").join(dir).join("libcuda.so");
                facts
                    .links
                    .push(format!("libcuda.so.1::{}", link.display()));
            }
        }
        if has_libraries {
            facts.library_dirs.push(Path::new("/").join(dir));
        }
    }
    if let Ok(entries) = std::fs::read_dir(overlay.join("usr/bin")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("nvidia-") && name != CDI_HOOK {
                files.push(Path::new("usr/bin").join(name));
            }
        }
    }
    files.sort();
    facts.links.sort();
    facts.links.dedup();
    facts.mounts = files
        .into_iter()
        .map(|rel| (driver_root.join(&rel), Path::new("/").join(rel)))
        .collect();
}

/// `nvidia-cdi-hook` on the host, else in the overlay (run at the driver root).
fn find_hook(root: &Root, overlay_dir: &Path, driver_root: &Path) -> Option<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(CDI_HOOK))
        .find(|path| root.join(path).is_file())
        .or_else(|| {
            let rel = Path::new("usr/bin").join(CDI_HOOK);
            root.join(overlay_dir.join(&rel))
                .is_file()
                .then(|| driver_root.join(rel))
        })
}

/// Look at `/dev` and the overlay's user space under `root`; `None` when there is no hook.
pub fn gather(
    root: &Root,
    overlay_dir: &Path,
    driver_root: &Path,
    caps_nodes: &[PathBuf],
) -> Result<Option<CdiFacts>, CdiError> {
    let Some(hook) = find_hook(root, overlay_dir, driver_root) else {
        return Ok(None);
    };
    let (gpus, control_nodes) = dev_nodes(root)?;
    let mut facts = CdiFacts {
        gpus,
        control_nodes,
        hook,
        ..CdiFacts::default()
    };
    facts.caps_nodes = caps_nodes
        .iter()
        .filter(|path| root.join(path).exists())
        .map(|path| path.display().to_string())
        .collect();
    user_space(&root.join(overlay_dir), driver_root, &mut facts);
    Ok(Some(facts))
}

/// Whether a spec can be made here at all: nvidia-ctk or nvidia-cdi-hook on the host, or the
/// hook in the driver root's user space (`driver_root` is a host path, resolved under `root`).
/// Without either the agent never claims CDI, and readiness does not wait for a spec.
pub fn generator_available(root: &Root, driver_root: &Path) -> bool {
    find_nvidia_ctk(root).is_some()
        || TOOL_DIRS
            .iter()
            .any(|dir| root.join(Path::new(dir).join(CDI_HOOK)).is_file())
        || root
            .join(driver_root.join("usr/bin").join(CDI_HOOK))
            .is_file()
}

/// `nvidia-ctk` under the root, if installed.
pub fn find_nvidia_ctk(root: &Root) -> Option<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|dir| root.join(Path::new(dir).join("nvidia-ctk")))
        .find(|path| path.is_file())
}

/// The `deviceNodes` paths anywhere in a spec nvidia-ctk wrote (JSON, or YAML's
/// `- path: /dev/…` lines, as its YAML writer puts them).
pub fn spec_device_paths(text: &str, json: bool) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::Array(nodes)) = map.get("deviceNodes") {
                    out.extend(
                        nodes
                            .iter()
                            .filter_map(|n| n["path"].as_str().map(String::from)),
                    );
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if json {
        if let Ok(value) = serde_json::from_str::<Value>(text) {
            walk(&value, &mut out);
        }
    } else {
        out = text
            .lines()
            .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("path: "))
            .map(|p| p.trim().trim_matches('"').to_string())
            .filter(|p| p.starts_with("/dev/"))
            .collect();
    }
    out.sort();
    out.dedup();
    out
}

/// The nodes `/dev` has that a spec's device paths lack.
pub fn missing_nodes(gpus: &[u32], control: &[String], in_spec: &[String]) -> Vec<String> {
    gpus.iter()
        .map(|m| format!("/dev/nvidia{m}"))
        .chain(control.iter().cloned())
        .filter(|p| !in_spec.contains(p))
        .collect()
}

/// Who wrote the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdiOutcome {
    /// `nvidia-ctk cdi generate` wrote it.
    NvidiaCtk,
    /// The agent's own spec.
    Own,
    /// The agent's own spec, already up to date.
    Unchanged,
}

/// Regenerate the spec at `spec_path` (a host path) for the driver at `driver_root` whose
/// overlay is `overlay_dir`; `caps_nodes` are the capability nodes containers get
/// ([`crate::kmod::caps::workload_nodes`]).
pub fn regenerate(
    root: &Root,
    spec_path: &Path,
    overlay_dir: &Path,
    driver_root: &Path,
    caps_nodes: &[PathBuf],
) -> Result<CdiOutcome, CdiError> {
    let target = root.join(spec_path);
    if let Some(dir) = target.parent() {
        // /var/run/cdi is the agent's to create: CDI consumers only read it.
        fsutil::create_dir_all_mode(dir, 0o755).map_err(|source| CdiError::Read {
            path: dir.to_path_buf(),
            error: source,
        })?;
    }
    let result = match find_nvidia_ctk(root) {
        Some(ctk) => run_nvidia_ctk(root, &ctk, spec_path, driver_root),
        None => write_own(root, spec_path, overlay_dir, driver_root, caps_nodes),
    };
    if result.is_err() {
        // Claim no CDI rather than a spec that does not match what is loaded.
        let _ = std::fs::remove_file(&target);
    }
    result
}

fn write_own(
    root: &Root,
    spec_path: &Path,
    overlay_dir: &Path,
    driver_root: &Path,
    caps_nodes: &[PathBuf],
) -> Result<CdiOutcome, CdiError> {
    let Some(facts) = gather(root, overlay_dir, driver_root, caps_nodes)? else {
        return Err(CdiError::NoHook {
            spec: spec_path.to_path_buf(),
        });
    };
    let mut text = serde_json::to_vec_pretty(&spec(&facts)).expect("spec serializes");
    text.push(b'\n');
    let written = output_file::write_if_dir_exists(root, spec_path, "cdi-spec", &text)?;
    Ok(if written {
        CdiOutcome::Own
    } else {
        CdiOutcome::Unchanged
    })
}

fn run_nvidia_ctk(
    root: &Root,
    ctk: &Path,
    spec_path: &Path,
    driver_root: &Path,
) -> Result<CdiOutcome, CdiError> {
    let target = root.join(spec_path);
    let tmp = fsutil::temp_sibling(&target);
    let json = spec_path.extension().is_some_and(|e| e == "json");
    let mut command = Command::new(ctk);
    command
        .args(["cdi", "generate"])
        .arg(format!(
            "--driver-root={}",
            root.join(driver_root).display()
        ))
        .arg(format!("--dev-root={}", root.join("/").display()))
        .arg(format!("--format={}", if json { "json" } else { "yaml" }))
        .arg(format!("--output={}", tmp.display()));
    let shown = format!("{command:?}");
    let failed = |detail: String| {
        let _ = std::fs::remove_file(&tmp);
        CdiError::NvidiaCtk {
            command: shown.clone(),
            detail,
        }
    };
    let output = command.output().map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let _ = std::fs::remove_file(&tmp);
        // urfave/cli's words for an unknown flag.
        if stderr.contains("flag provided but not defined") && stderr.contains("dev-root") {
            return Err(CdiError::NvidiaCtkTooOld {
                ctk: ctk.to_path_buf(),
                detail: stderr,
            });
        }
        return Err(failed(stderr));
    }
    let text = std::fs::read_to_string(&tmp).map_err(|e| failed(e.to_string()))?;
    let (gpus, control) = dev_nodes(root)?;
    let missing = missing_nodes(&gpus, &control, &spec_device_paths(&text, json));
    if !missing.is_empty() {
        let _ = std::fs::remove_file(&tmp);
        return Err(CdiError::MissingNodes {
            missing,
            spec: spec_path.to_path_buf(),
        });
    }
    std::fs::rename(&tmp, &target).map_err(|e| failed(e.to_string()))?;
    Ok(CdiOutcome::NvidiaCtk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_from_json_and_yaml() {
        let json = r#"{"devices":[{"name":"0","containerEdits":{"deviceNodes":[{"path":"/dev/nvidia0"}]}}],
            "containerEdits":{"deviceNodes":[{"path":"/dev/nvidiactl"}]}}"#;
        assert_eq!(
            spec_device_paths(json, true),
            ["/dev/nvidia0", "/dev/nvidiactl"]
        );
        let yaml = "containerEdits:\n  deviceNodes:\n  - path: /dev/nvidiactl\n  mounts:\n  - hostPath: /x\n    containerPath: /x\ndevices:\n- containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n";
        assert_eq!(
            spec_device_paths(yaml, false),
            ["/dev/nvidia0", "/dev/nvidiactl"]
        );
    }

    #[test]
    fn missing_nodes_are_named() {
        let control = vec!["/dev/nvidiactl".to_string(), "/dev/nvidia-uvm".to_string()];
        assert_eq!(
            missing_nodes(&[0], &control, &["/dev/nvidiactl".into()]),
            ["/dev/nvidia0", "/dev/nvidia-uvm"]
        );
        assert!(missing_nodes(
            &[0],
            &control[..1],
            &["/dev/nvidia0".into(), "/dev/nvidiactl".into()]
        )
        .is_empty());
    }

    #[test]
    fn hooks_as_nvidia_ctk_writes_them() {
        let facts = CdiFacts {
            links: vec!["libcuda.so.1::/usr/lib64/libcuda.so".into()],
            library_dirs: vec!["/usr/lib64".into()],
            hook: "/usr/bin/nvidia-cdi-hook".into(),
            ..CdiFacts::default()
        };
        let spec = spec(&facts);
        let hooks = &spec["containerEdits"]["hooks"];
        assert_eq!(
            hooks[0]["args"],
            json!([
                "nvidia-cdi-hook",
                "create-symlinks",
                "--link",
                "libcuda.so.1::/usr/lib64/libcuda.so"
            ])
        );
        assert_eq!(
            hooks[1]["args"],
            json!([
                "nvidia-cdi-hook",
                "update-ldcache",
                "--folder",
                "/usr/lib64"
            ])
        );
        assert_eq!(hooks[1]["hookName"], "createContainer");
    }
}

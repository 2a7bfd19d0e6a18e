//! The MIG and IMEX capability nodes: `/dev/nvidia-caps/nvidia-cap<minor>` for the files under
//! `/proc/driver/nvidia/capabilities`, and `/dev/nvidia-caps-imex-channels/channel<N>` for the
//! configured IMEX channels (`driver.imex-channels`).
//!
//! nvidia-modprobe normally makes these (it is setuid, and refused in overlays). This module
//! does what it does, from NVIDIA/nvidia-modprobe `modprobe-utils/nvidia-modprobe-utils.c`
//! (commit a9556df9):
//! - `nvidia_cap_get_device_file_attrs`: the major is `nvidia-caps` in `/proc/devices`, the
//!   minor is the cap file's `DeviceFileMinor:`, the node `/dev/nvidia-caps/nvidia-cap%d`;
//! - `init_device_file_parameters`: mode, uid, gid and whether the node may be touched come
//!   from the same file's `DeviceFileMode:` (decimal), `DeviceFileUID:`, `DeviceFileGID:`,
//!   `DeviceFileModify:` (or `ModifyDeviceFiles:`), defaulting to 0666, 0, 0 and 1;
//! - `mknod_helper`: with modify 0 an existing node is left alone (and none is made); otherwise a
//!   node with other numbers (or not a character device) is replaced, and mode and owner are set;
//! - `nvidia_cap_mknod`: `/dev/nvidia-caps` is made 0755 and, when this run made it, chmod
//!   0755 and chown 0:0;
//! - `nvidia_cap_imex_channel_mknod`: major `nvidia-caps-imex-channels`, minor = channel,
//!   `/dev/nvidia-caps-imex-channels` made 0755, attributes from `/proc/driver/nvidia/params`.
//!
//! Pure functions over the files' text; reading procfs is [`read_caps_tree`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::host::Root;
use crate::kmod::devices::parse_proc_devices;

/// Where the driver lists its capabilities.
pub const CAPS_PROC_DIR: &str = "/proc/driver/nvidia/capabilities";
/// The driver's global device-file parameters (IMEX channels take theirs from here).
pub const NVIDIA_PARAMS: &str = "/proc/driver/nvidia/params";
/// The directory of the capability nodes.
pub const CAPS_DEV_DIR: &str = "/dev/nvidia-caps";
/// The directory of the IMEX channel nodes.
pub const IMEX_DEV_DIR: &str = "/dev/nvidia-caps-imex-channels";
/// The mode `nvidia_cap_mknod` and `nvidia_cap_imex_channel_mknod` give their directory.
pub const CAPS_DIR_MODE: u32 = 0o755;
/// `/proc/devices` name of the capability nodes' major.
pub const CAPS_MAJOR_NAME: &str = "nvidia-caps";
/// `/proc/devices` name of the IMEX channel nodes' major.
pub const IMEX_MAJOR_NAME: &str = "nvidia-caps-imex-channels";
/// The cap that IMEX daemons open; made only when IMEX channels are configured.
pub const IMEX_MGMT_CAP: &str = "fabric-imex-mgmt";

/// One capability (or IMEX channel) node to make.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CapNode {
    /// Host path, e.g. `/dev/nvidia-caps/nvidia-cap1`.
    pub path: PathBuf,
    /// Character major (`nvidia-caps` or `nvidia-caps-imex-channels` in `/proc/devices`).
    pub major: u32,
    /// Character minor.
    pub minor: u32,
    /// Permission bits (`DeviceFileMode`).
    pub mode: u32,
    /// Owner (`DeviceFileUID`).
    pub uid: u32,
    /// Group (`DeviceFileGID`).
    pub gid: u32,
    /// `DeviceFileModify`: false means an existing node is left as it is and none is made.
    pub modify: bool,
    /// What it was made from: the cap file under `/proc/driver/nvidia/capabilities`
    /// (`mig/config`) or `imex-channel <N>`.
    pub source: String,
}

/// Errors working out the capability nodes.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// The driver lists capabilities but registered no major for them.
    #[error("{CAPS_PROC_DIR} lists {count} capabilities but /proc/devices has no {name:?} character device; the nvidia module did not register it, see dmesg")]
    NoMajor {
        /// The `/proc/devices` name looked for.
        name: &'static str,
        /// How many nodes wanted it.
        count: usize,
    },
    /// A cap file without `DeviceFileMinor:`.
    #[error("{CAPS_PROC_DIR}/{file} has no `DeviceFileMinor:` line (found {text:?}); the driver's capability format changed, please report it")]
    NoMinor {
        /// The file, relative to the capabilities directory.
        file: String,
        /// Its text.
        text: String,
    },
}

/// The capability files as read from procfs: path relative to [`CAPS_PROC_DIR`] → text.
pub type CapsTree = BTreeMap<String, String>;

/// Attributes of a device file, as `init_device_file_parameters` reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileAttrs {
    /// `DeviceFileMinor` (only cap files have one).
    pub minor: Option<u32>,
    /// `DeviceFileMode`, decimal in the file; default 0666.
    pub mode: u32,
    /// `DeviceFileUID`; default 0.
    pub uid: u32,
    /// `DeviceFileGID`; default 0.
    pub gid: u32,
    /// `DeviceFileModify` or `ModifyDeviceFiles` equal to 1; default true.
    pub modify: bool,
}

/// Parse `Key: value` lines as `init_device_file_parameters` does (values are decimal).
/// nvidia-modprobe's `fscanf` loop stops at the first line that is not `name: number`; the
/// attributes come first in both the cap files and `params`, so reading every line is the same.
pub fn parse_attrs(text: &str) -> FileAttrs {
    let mut attrs = FileAttrs {
        minor: None,
        mode: 0o666,
        uid: 0,
        gid: 0,
        modify: true,
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u32>() else {
            continue;
        };
        match key.trim() {
            "DeviceFileMinor" => attrs.minor = Some(value),
            "DeviceFileMode" => attrs.mode = value & 0o777,
            "DeviceFileUID" => attrs.uid = value,
            "DeviceFileGID" => attrs.gid = value,
            "DeviceFileModify" | "ModifyDeviceFiles" => attrs.modify = value == 1,
            _ => {}
        }
    }
    attrs
}

/// Whether the agent makes a node for this cap file: every MIG cap (`mig/config`,
/// `mig/monitor`, `gpuN/mig/giX/access`, `gpuN/mig/giX/ciY/access`, which nvidia-smi and NVML
/// open to see or change MIG), and `fabric-imex-mgmt` only where IMEX is configured (it lets
/// its holder manage the IMEX fabric; NVIDIA's IMEX daemon needs it, nothing else does).
pub fn wanted(relative: &str, imex: bool) -> bool {
    if relative.starts_with("mig/") {
        return true;
    }
    if relative == IMEX_MGMT_CAP {
        return imex;
    }
    let mut parts = relative.split('/');
    let gpu = parts.next().unwrap_or("");
    let is_gpu = gpu
        .strip_prefix("gpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    is_gpu && parts.next() == Some("mig") && parts.next().is_some()
}

/// The major of `name` in `/proc/devices`; `count` nodes wanted it (for the error).
fn major_of(proc_devices: &str, name: &'static str, count: usize) -> Result<u32, CapsError> {
    parse_proc_devices(proc_devices)
        .get(name)
        .copied()
        .ok_or(CapsError::NoMajor { name, count })
}

/// The capability nodes for `tree`, given `/proc/devices` and whether IMEX is configured;
/// sorted by minor.
pub fn cap_nodes(
    tree: &CapsTree,
    proc_devices: &str,
    imex: bool,
) -> Result<Vec<CapNode>, CapsError> {
    let wanted: Vec<(&String, &String)> = tree.iter().filter(|(r, _)| wanted(r, imex)).collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let major = major_of(proc_devices, CAPS_MAJOR_NAME, wanted.len())?;
    let mut nodes = wanted
        .into_iter()
        .map(|(relative, text)| {
            let attrs = parse_attrs(text);
            let minor = attrs.minor.ok_or_else(|| CapsError::NoMinor {
                file: relative.clone(),
                text: text.clone(),
            })?;
            Ok(CapNode {
                path: Path::new(CAPS_DEV_DIR).join(format!("nvidia-cap{minor}")),
                major,
                minor,
                mode: attrs.mode,
                uid: attrs.uid,
                gid: attrs.gid,
                modify: attrs.modify,
                source: relative.clone(),
            })
        })
        .collect::<Result<Vec<_>, CapsError>>()?;
    nodes.sort_by_key(|n| n.minor);
    Ok(nodes)
}

/// The IMEX channel nodes for `channels`, with attributes from `params`
/// (`/proc/driver/nvidia/params`), as `nvidia_cap_imex_channel_mknod` makes them.
pub fn imex_channel_nodes(
    channels: &[u32],
    proc_devices: &str,
    params: &str,
) -> Result<Vec<CapNode>, CapsError> {
    if channels.is_empty() {
        return Ok(Vec::new());
    }
    let major = major_of(proc_devices, IMEX_MAJOR_NAME, channels.len())?;
    let attrs = parse_attrs(params);
    let mut channels = channels.to_vec();
    channels.sort_unstable();
    channels.dedup();
    Ok(channels
        .into_iter()
        .map(|channel| CapNode {
            path: Path::new(IMEX_DEV_DIR).join(format!("channel{channel}")),
            major,
            minor: channel,
            mode: attrs.mode,
            uid: attrs.uid,
            gid: attrs.gid,
            modify: attrs.modify,
            source: format!("imex-channel {channel}"),
        })
        .collect())
}

/// Every node of both kinds; the text of procfs comes from the caller.
pub fn all_nodes(
    tree: &CapsTree,
    proc_devices: &str,
    params: &str,
    imex_channels: &[u32],
) -> Result<Vec<CapNode>, CapsError> {
    let mut nodes = cap_nodes(tree, proc_devices, !imex_channels.is_empty())?;
    nodes.extend(imex_channel_nodes(imex_channels, proc_devices, params)?);
    Ok(nodes)
}

/// The nodes a container's `all` device gets: MIG access caps (`gpuN/mig/…`) and IMEX
/// channels; not `mig/config`, `mig/monitor` or `fabric-imex-mgmt`, which administer MIG or
/// the fabric and are not a workload's to hold.
pub fn workload_nodes(nodes: &[CapNode]) -> Vec<PathBuf> {
    nodes
        .iter()
        .filter(|n| n.source.starts_with("gpu") || n.source.starts_with("imex-channel"))
        .map(|n| n.path.clone())
        .collect()
}

/// Read every regular file under [`CAPS_PROC_DIR`] (empty when the driver is not loaded).
pub fn read_caps_tree(root: &Root) -> CapsTree {
    let base = root.join(CAPS_PROC_DIR);
    let mut tree = CapsTree::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(base.join(&relative)) else {
            continue;
        };
        for entry in entries.flatten() {
            let child = relative.join(entry.file_name());
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(child),
                Ok(t) if t.is_file() => {
                    if let Ok(text) = std::fs::read_to_string(entry.path()) {
                        tree.insert(child.to_string_lossy().into_owned(), text);
                    }
                }
                _ => {}
            }
        }
    }
    tree
}

/// Read procfs under `root` and work out every node; pure after the reads.
pub fn read_nodes(root: &Root, imex_channels: &[u32]) -> Result<Vec<CapNode>, CapsError> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    all_nodes(
        &read_caps_tree(root),
        &read("/proc/devices"),
        &read(NVIDIA_PARAMS),
        imex_channels,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each node as "PATH MAJOR:MINOR MODE(octal)".
    fn described(nodes: &[CapNode]) -> Vec<String> {
        nodes
            .iter()
            .map(|n| format!("{} {}:{} {:o}", n.path.display(), n.major, n.minor, n.mode))
            .collect()
    }

    const DEVICES: &str =
        "Character devices:\n195 nvidia\n241 nvidia-caps\n242 nvidia-caps-imex-channels\n";

    fn tree(files: &[(&str, &str)]) -> CapsTree {
        files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn attrs_default_as_init_device_file_parameters() {
        let a = parse_attrs("");
        assert_eq!(
            (a.minor, a.mode, a.uid, a.gid, a.modify),
            (None, 0o666, 0, 0, true)
        );
        let a = parse_attrs("DeviceFileMinor: 7\nDeviceFileMode: 292\nDeviceFileModify: 0\n");
        assert_eq!((a.minor, a.mode, a.modify), (Some(7), 0o444, false));
        let a = parse_attrs(
            "ModifyDeviceFiles: 0\nDeviceFileUID: 5\nDeviceFileGID: 6\nRegistryDwords: \"\"\n",
        );
        assert_eq!((a.uid, a.gid, a.modify), (5, 6, false));
    }

    #[test]
    fn which_caps_are_wanted() {
        for (path, imex, want) in [
            ("mig/config", false, true),
            ("mig/monitor", false, true),
            ("gpu0/mig/gi1/access", false, true),
            ("gpu12/mig/gi1/ci0/access", false, true),
            ("gpu0/mig", false, false),
            ("gpux/mig/gi1/access", false, false),
            ("fabric-imex-mgmt", false, false),
            ("fabric-imex-mgmt", true, true),
            ("something-new", true, false),
        ] {
            assert_eq!(wanted(path, imex), want, "{path} imex={imex}");
        }
    }

    #[test]
    fn nodes_sorted_by_minor_with_modes() {
        let t = tree(&[
            (
                "mig/monitor",
                "DeviceFileMinor: 2\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
            ),
            (
                "mig/config",
                "DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\n",
            ),
            (
                "fabric-imex-mgmt",
                "DeviceFileMinor: 4323\nDeviceFileMode: 256\n",
            ),
        ]);
        let nodes = cap_nodes(&t, DEVICES, false).unwrap();
        let got = described(&nodes);
        assert_eq!(
            got,
            [
                "/dev/nvidia-caps/nvidia-cap1 241:1 400",
                "/dev/nvidia-caps/nvidia-cap2 241:2 444"
            ]
        );
        assert_eq!(cap_nodes(&t, DEVICES, true).unwrap().len(), 3);
    }

    #[test]
    fn missing_major_or_minor_is_an_error() {
        let t = tree(&[("mig/config", "DeviceFileMinor: 1\n")]);
        let e = cap_nodes(&t, "Character devices:\n195 nvidia\n", false).unwrap_err();
        assert!(e.to_string().contains("\"nvidia-caps\""), "{e}");
        let t = tree(&[("mig/config", "DeviceFileMode: 256\n")]);
        let e = cap_nodes(&t, DEVICES, false).unwrap_err();
        assert!(e.to_string().contains("mig/config"), "{e}");
        // Nothing wanted: no major needed.
        assert!(cap_nodes(&CapsTree::new(), "", false).unwrap().is_empty());
    }

    #[test]
    fn imex_channels_take_params_attributes() {
        let params =
            "ModifyDeviceFiles: 1\nDeviceFileUID: 0\nDeviceFileGID: 0\nDeviceFileMode: 438\n";
        let nodes = imex_channel_nodes(&[1, 0, 1], DEVICES, params).unwrap();
        let got = described(&nodes);
        assert_eq!(
            got,
            [
                "/dev/nvidia-caps-imex-channels/channel0 242:0 666",
                "/dev/nvidia-caps-imex-channels/channel1 242:1 666"
            ]
        );
        let e =
            imex_channel_nodes(&[0], "Character devices:\n241 nvidia-caps\n", params).unwrap_err();
        assert!(e.to_string().contains("nvidia-caps-imex-channels"), "{e}");
    }
}

//! The `/dev/nvidia*` nodes: which ones the loaded modules need, with majors from
//! `/proc/devices` and GPU minors from `/proc/driver/nvidia/gpus/*/information`.
//! Pure functions over the text of those files.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// NVIDIA's fixed character major.
pub const NVIDIA_MAJOR: u32 = 195;
/// Minor of `/dev/nvidiactl` under [`NVIDIA_MAJOR`].
pub const NVIDIACTL_MINOR: u32 = 255;
/// Minor of `/dev/nvidia-modeset` under [`NVIDIA_MAJOR`].
pub const NVIDIA_MODESET_MINOR: u32 = 254;
/// The mode nvidia-modprobe gives the nodes by default.
pub const NODE_MODE: u32 = 0o666;
/// Minor of `/dev/nvidia-nvswitchctl` under the `nvidia-nvswitch` major: the driver's
/// `NVSWITCH_CTL_MINOR` (kernel-open/nvidia/linux_nvswitch.c), which nvidia-modprobe mirrors
/// as `NV_NVSWITCH_CTL_MINOR`.
pub const NVSWITCH_CTL_MINOR: u32 = 255;

/// One character-device node to create under `/dev`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceNode {
    /// Host path, e.g. `/dev/nvidia0`.
    pub path: PathBuf,
    /// Character major (from `/proc/devices`).
    pub major: u32,
    /// Character minor.
    pub minor: u32,
    /// Permission bits (always [`NODE_MODE`] from [`nodes_for`]).
    pub mode: u32,
}

impl DeviceNode {
    /// The `/dev/char/MAJOR:MINOR` link udev would make, and its relative target.
    pub fn char_link(&self) -> (PathBuf, PathBuf) {
        let name = self.path.file_name().expect("node has a name");
        (
            PathBuf::from(format!("/dev/char/{}:{}", self.major, self.minor)),
            PathBuf::from("..").join(name),
        )
    }
}

/// Errors working out the device nodes.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A loaded module registered no character device under the name expected in `/proc/devices`.
    #[error("{module} is loaded but /proc/devices has no {entry:?} character device; the module did not register, see dmesg")]
    NoMajor {
        /// The module (kernel spelling).
        module: &'static str,
        /// The `/proc/devices` name looked for (`nvidia`, also tried as `nvidia-frontend`; or
        /// `nvidia-uvm`).
        entry: &'static str,
    },
}

/// Character-device names → majors from `/proc/devices`.
pub fn parse_proc_devices(text: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let mut in_chars = false;
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with("devices:") {
            in_chars = line.starts_with("Character");
            continue;
        }
        if !in_chars {
            continue;
        }
        if let Some((major, name)) = line.split_once(char::is_whitespace) {
            if let Ok(major) = major.trim().parse() {
                out.insert(name.trim().to_string(), major);
            }
        }
    }
    out
}

/// The `Device Minor:` of one GPU's `information` file.
pub fn parse_gpu_minor(information: &str) -> Option<u32> {
    information.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "Device Minor")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// The NVSwitch nodes for `switches` switches the driver probed (the entries of
/// `/proc/driver/nvidia-nvswitch/devices`): `/dev/nvidia-nvswitchctl` and
/// `/dev/nvidia-nvswitch0..N-1`, as nvidia-modprobe's `nvidia_nvswitch_mknod` names them
/// (nvidia-modprobe-utils.c). The driver gives each probed switch the lowest free minor from 0
/// (`nvswitch_find_minor`, linux_nvswitch.c), so N switches are minors 0..N-1; its procfs
/// `permissions` file says mode 0666 (`nv_procfs_read_permissions`, procfs_nvswitch.c). Fabric
/// Manager opens them; nvidia-modprobe, which makes them on a package-installed driver, is
/// setuid and refused in overlays. None without a switch: `nvidia.ko` registers the
/// `nvidia-nvswitch` major on every host.
pub fn nvswitch_nodes(proc_devices: &str, switches: usize) -> Vec<DeviceNode> {
    let Some(major) = parse_proc_devices(proc_devices)
        .get("nvidia-nvswitch")
        .copied()
    else {
        return Vec::new();
    };
    if switches == 0 {
        return Vec::new();
    }
    let node = |path: String, minor| DeviceNode {
        path: PathBuf::from(path),
        major,
        minor,
        mode: NODE_MODE,
    };
    let mut nodes = vec![node("/dev/nvidia-nvswitchctl".into(), NVSWITCH_CTL_MINOR)];
    let last = u32::try_from(switches)
        .unwrap_or(NVSWITCH_CTL_MINOR)
        .min(NVSWITCH_CTL_MINOR);
    nodes.extend((0..last).map(|minor| node(format!("/dev/nvidia-nvswitch{minor}"), minor)));
    nodes
}

/// The nodes to create, given which NVIDIA modules are loaded (kernel spelling), the text of
/// `/proc/devices` and the GPU minors.
pub fn nodes_for(
    loaded: &[&str],
    proc_devices: &str,
    gpu_minors: &[u32],
) -> Result<Vec<DeviceNode>, DeviceError> {
    let majors = parse_proc_devices(proc_devices);
    let node = |path: String, major, minor| DeviceNode {
        path: PathBuf::from(path),
        major,
        minor,
        mode: NODE_MODE,
    };
    let mut nodes = Vec::new();
    if loaded.contains(&"nvidia") {
        // Proprietary drivers register "nvidia-frontend", the open ones "nvidia".
        let major = majors
            .get("nvidia-frontend")
            .or_else(|| majors.get("nvidia"))
            .copied()
            .ok_or(DeviceError::NoMajor {
                module: "nvidia",
                entry: "nvidia",
            })?;
        nodes.push(node("/dev/nvidiactl".into(), major, NVIDIACTL_MINOR));
        let mut minors = gpu_minors.to_vec();
        minors.sort_unstable();
        minors.dedup();
        for minor in minors {
            nodes.push(node(format!("/dev/nvidia{minor}"), major, minor));
        }
        if loaded.contains(&"nvidia_modeset") {
            nodes.push(node(
                "/dev/nvidia-modeset".into(),
                major,
                NVIDIA_MODESET_MINOR,
            ));
        }
    }
    if loaded.contains(&"nvidia_uvm") {
        let major = majors
            .get("nvidia-uvm")
            .copied()
            .ok_or(DeviceError::NoMajor {
                module: "nvidia_uvm",
                entry: "nvidia-uvm",
            })?;
        nodes.push(node("/dev/nvidia-uvm".into(), major, 0));
        nodes.push(node("/dev/nvidia-uvm-tools".into(), major, 1));
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_DEVICES: &str = "Character devices:\n  1 mem\n195 nvidia\n195 nvidiactl\n507 nvidia-uvm\n\nBlock devices:\n  8 sd\n507 notachar\n";

    /// The H200 machine's `/proc/devices` (open 580.159.04): `nvidia-nvswitch` is 239 although
    /// the machine has no switch.
    const H200_PROC_DEVICES: &str =
        include_str!("../../tests/fixtures/nvidia-caps/h200-580.159.04/proc-devices");

    #[test]
    fn nvswitch_nodes_are_the_control_node_and_one_per_probed_switch() {
        let nodes = nvswitch_nodes(H200_PROC_DEVICES, 4);
        let listed: Vec<(String, u32, u32, u32)> = nodes
            .iter()
            .map(|n| (n.path.display().to_string(), n.major, n.minor, n.mode))
            .collect();
        assert_eq!(
            listed,
            [
                ("/dev/nvidia-nvswitchctl".to_string(), 239, 255, 0o666),
                ("/dev/nvidia-nvswitch0".to_string(), 239, 0, 0o666),
                ("/dev/nvidia-nvswitch1".to_string(), 239, 1, 0o666),
                ("/dev/nvidia-nvswitch2".to_string(), 239, 2, 0o666),
                ("/dev/nvidia-nvswitch3".to_string(), 239, 3, 0o666),
            ]
        );
    }

    #[test]
    fn no_nvswitch_nodes_without_a_switch_or_its_major() {
        // The H200 machine: the major is registered, no switch probed.
        assert!(nvswitch_nodes(H200_PROC_DEVICES, 0).is_empty());
        assert!(nvswitch_nodes(PROC_DEVICES, 4).is_empty());
    }

    #[test]
    fn majors_from_char_section_only() {
        let majors = parse_proc_devices(PROC_DEVICES);
        assert_eq!(majors["nvidia"], 195);
        assert_eq!(majors["nvidia-uvm"], 507);
        assert!(!majors.contains_key("sd"));
    }

    #[test]
    fn gpu_minor() {
        let info = "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 0\nGPU UUID: \t GPU-x\nDevice Minor: \t 3\n";
        assert_eq!(parse_gpu_minor(info), Some(3));
        assert_eq!(parse_gpu_minor("Model: x\n"), None);
    }

    #[test]
    fn nodes_for_full_set() {
        let nodes = nodes_for(
            &["nvidia", "nvidia_modeset", "nvidia_uvm"],
            PROC_DEVICES,
            &[1, 0],
        )
        .unwrap();
        let got: Vec<_> = nodes
            .iter()
            .map(|n| format!("{} {}:{}", n.path.display(), n.major, n.minor))
            .collect();
        assert_eq!(
            got,
            [
                "/dev/nvidiactl 195:255",
                "/dev/nvidia0 195:0",
                "/dev/nvidia1 195:1",
                "/dev/nvidia-modeset 195:254",
                "/dev/nvidia-uvm 507:0",
                "/dev/nvidia-uvm-tools 507:1",
            ]
        );
        assert_eq!(
            nodes[0].char_link(),
            (
                PathBuf::from("/dev/char/195:255"),
                PathBuf::from("../nvidiactl")
            )
        );
    }

    #[test]
    fn missing_uvm_major_is_an_error() {
        let e = nodes_for(
            &["nvidia", "nvidia_uvm"],
            "Character devices:\n195 nvidia\n",
            &[0],
        )
        .unwrap_err();
        assert!(e.to_string().contains("nvidia-uvm"), "{e}");
    }
}

//! Flatcar Container Linux: the next kernel is the one in the inactive USR slot.
//!
//! Flatcar keeps two `/usr` partitions, `USR-A` and `USR-B` (GPT partition type
//! `5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6`, fixed partition UUIDs `7130c94a-…` and `e03dd35c-…`,
//! flatcar/scripts `build_library/disk_layout.json`), and one kernel for each on the EFI system
//! partition, mounted at `/boot`: `/boot/flatcar/vmlinuz-a` and `/boot/flatcar/vmlinuz-b`.
//! update_engine writes the new `/usr` and its kernel into the inactive slot and makes it the
//! next boot's (`gptprio`); GRUB passes the slot to the kernel as
//! `verity.usr=PARTUUID=<uuid>` (or `mount.usr=`/`usr=`, as a `PARTUUID=`, `PARTLABEL=` or
//! `/dev/disk/by-part*/` reference) and `BOOT_IMAGE=/flatcar/vmlinuz-<slot>`
//! (flatcar/scripts `build_library/grub.cfg`). The kernel's release is read from the image
//! itself, so nothing needs mounting: from the bzImage header on x86, from the banner of the
//! `Image` (uncompressed, gzip or EFI zboot) on arm64 ([`crate::watch::arm64_image`]).

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tracing::debug;

use crate::host::kernel::is_kernel_release;
use crate::host::version::version_cmp;
use crate::host::Root;
use crate::watch::arm64_image;
use crate::watch::NextBoot;

/// Partition UUID of `USR-A` (flatcar/scripts `build_library/disk_layout.json`; GRUB's
/// `gptprio` function compares against it to pick slot `a`).
pub const USR_A_PARTUUID: &str = "7130c94a-213a-4e5a-8e26-6cce9662f132";
/// Partition UUID of `USR-B`.
pub const USR_B_PARTUUID: &str = "e03dd35c-7c2d-4a47-b3fe-27f15780a57c";
/// GPT partition type of both USR partitions ("CoreOS /usr").
pub const USR_PARTITION_TYPE: &str = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";

/// The kernel command line, from which the booted USR slot is read.
pub const CMDLINE: &str = "/proc/cmdline";
/// Host directory on the EFI system partition (mounted at `/boot`) that holds each slot's kernel,
/// `vmlinuz-a` and `vmlinuz-b`.
pub const KERNEL_DIR: &str = "/boot/flatcar";

/// How much of a kernel image is read: the real-mode setup code that holds the boot protocol
/// header and the version string is at most 64 KiB (`setup_sects` ≤ 127 sectors).
pub const BZIMAGE_HEADER_MAX: u64 = 64 * 1024;

/// Where the boot protocol header sits and what it holds (Documentation/arch/x86/boot.rst).
const HDRS_OFFSET: usize = 0x202;
const PROTOCOL_OFFSET: usize = 0x206;
const KERNEL_VERSION_OFFSET: usize = 0x20E;
/// `kernel_version` exists from boot protocol 2.00 on.
const MIN_PROTOCOL: u16 = 0x0200;
/// The version string ("6.1.0-28-cloud-amd64 (debian-kernel@…) #1 SMP …") is short; a
/// terminator further away than this is not a version string.
const VERSION_STRING_MAX: usize = 512;

/// Why the next boot's kernel could not be read on Flatcar, or a kernel image's release could not
/// be read (the generic detector reads bzImage headers with the same code).
#[derive(Debug, thiserror::Error)]
pub enum FlatcarError {
    /// The image lacks the `HdrS` boot protocol magic at 0x202: it is not an x86 bzImage.
    #[error(
        "not an x86 bzImage: expected the boot protocol magic \"HdrS\" at 0x202, found {found}"
    )]
    NotBzImage {
        /// The four bytes found there, in hex.
        found: String,
    },
    /// The image ends before a header field the parser needs.
    #[error("the kernel image is cut short: its header needs {needed} bytes, found {len}")]
    Truncated {
        /// Bytes the image must have to hold that field.
        needed: usize,
        /// Bytes it has (at most the 64 KiB that are read).
        len: usize,
    },
    /// The boot protocol is older than 2.00, which added the pointer to the version string.
    #[error("boot protocol {major}.{minor:02} is older than 2.00 and carries no version string")]
    OldProtocol {
        /// Major version of the boot protocol.
        major: u8,
        /// Minor version of the boot protocol.
        minor: u8,
    },
    /// The header's `kernel_version` pointer is 0: the image has no version string.
    #[error("the bzImage header has no version string (kernel_version is 0)")]
    NoVersionString,
    /// The version string pointer lies at or past the end of the bytes read.
    #[error("the bzImage version string should start at byte {offset}, past the {len} bytes read")]
    VersionOutOfRange {
        /// File offset the pointer names (`kernel_version` + 0x200).
        offset: usize,
        /// Bytes read.
        len: usize,
    },
    /// No NUL ends the version string within its first 512 bytes.
    #[error("the bzImage version string at byte {offset} has no NUL terminator within {VERSION_STRING_MAX} bytes")]
    VersionUnterminated {
        /// File offset of the version string.
        offset: usize,
    },
    /// The version string's first word is not a kernel release.
    #[error("the bzImage version string is not a kernel release: {found:?}")]
    BadRelease {
        /// The whole version string, invalid UTF-8 replaced.
        found: String,
    },
    /// An arm64 image's release could not be read.
    #[error(transparent)]
    Arm64(#[from] crate::watch::arm64_image::Arm64ImageError),
    /// The file is neither an x86 bzImage nor an arm64 image this agent reads.
    #[error("not a kernel image this agent reads: expected an x86 bzImage (\"HdrS\" at 0x202), an arm64 Image (\"ARM\\x64\" at 0x38), a gzip-compressed one, or an EFI zboot image (\"MZ\" and \"zimg\" at 0); the first bytes are {head}")]
    UnknownImage {
        /// The first 8 bytes, in hex.
        head: String,
    },
    /// A header error, with the image file it came from.
    #[error("{path}: {error}")]
    Image {
        /// The image's path on this machine (already under the root).
        path: PathBuf,
        /// What is wrong with its header.
        error: Box<FlatcarError>,
    },
    /// A file (the kernel command line, a kernel image) could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// Its path on this machine (under the root).
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// No parameter of the kernel command line names a USR slot: probably not a Flatcar host.
    #[error("cannot tell the active USR partition from the kernel command line: expected verity.usr=, mount.usr= or usr= naming PARTUUID={USR_A_PARTUUID}/{USR_B_PARTUUID} or PARTLABEL=USR-A/USR-B, or BOOT_IMAGE=/flatcar/vmlinuz-a/-b; found {cmdline:?}. Is this a Flatcar host? Set [watch] detector to match the OS")]
    NoUsrSlot {
        /// The command line, trimmed.
        cmdline: String,
    },
    /// Two parameters of the kernel command line name different USR slots.
    #[error("the kernel command line names both USR-A and USR-B as /usr ({first} and {second}); fix the boot entry")]
    ConflictingUsrSlot {
        /// The first parameter that named a slot, e.g. `verity.usr=PARTUUID=…`.
        first: String,
        /// A later parameter that names the other slot.
        second: String,
    },
    /// update_engine says an update waits for a reboot, but the inactive slot has no kernel.
    #[error("update_engine says an update waits for a reboot, but {path} is missing; the update in slot {slot} looks incomplete: check `journalctl -u update-engine`")]
    MissingKernel {
        /// Host path of the missing kernel (`/boot/flatcar/vmlinuz-<slot>`).
        path: PathBuf,
        /// The inactive slot the update was written into.
        slot: UsrSlot,
    },
}

/// One of the two `/usr` slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum UsrSlot {
    /// `USR-A`, booted with `/boot/flatcar/vmlinuz-a`.
    A,
    /// `USR-B`, booted with `/boot/flatcar/vmlinuz-b`.
    B,
}

impl UsrSlot {
    /// The other slot: the inactive one when `self` is the booted one.
    pub fn other(self) -> UsrSlot {
        match self {
            UsrSlot::A => UsrSlot::B,
            UsrSlot::B => UsrSlot::A,
        }
    }

    /// The partition label, `USR-A` or `USR-B`.
    pub fn label(self) -> &'static str {
        match self {
            UsrSlot::A => "USR-A",
            UsrSlot::B => "USR-B",
        }
    }

    /// Host path of the slot's kernel.
    pub fn kernel_path(self) -> PathBuf {
        let name = match self {
            UsrSlot::A => "vmlinuz-a",
            UsrSlot::B => "vmlinuz-b",
        };
        Path::new(KERNEL_DIR).join(name)
    }
}

impl std::fmt::Display for UsrSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// What the daemon last heard from update_engine over D-Bus (`GetStatus` / `StatusUpdate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum UpdateEngineState {
    /// `UPDATE_STATUS_UPDATED_NEED_REBOOT`: an update sits in the inactive slot.
    NeedReboot,
    /// Any other known status: no update is waiting (one may be in progress).
    NoUpdate,
    /// update_engine was not reachable, or said something unknown.
    Unknown,
}

/// Map update_engine's `current_operation` to [`UpdateEngineState`]. The strings are those of
/// flatcar/update_engine `UpdateStatusToString` (`src/update_engine/update_attempter.cc`);
/// anything else (its own `"unknown status"` included) is [`UpdateEngineState::Unknown`], so
/// the detector falls back to the disk.
pub fn update_engine_state(current_operation: &str) -> UpdateEngineState {
    match current_operation {
        "UPDATE_STATUS_UPDATED_NEED_REBOOT" => UpdateEngineState::NeedReboot,
        "UPDATE_STATUS_IDLE"
        | "UPDATE_STATUS_CHECKING_FOR_UPDATE"
        | "UPDATE_STATUS_UPDATE_AVAILABLE"
        | "UPDATE_STATUS_DOWNLOADING"
        | "UPDATE_STATUS_VERIFYING"
        | "UPDATE_STATUS_FINALIZING"
        | "UPDATE_STATUS_REPORTING_ERROR_EVENT" => UpdateEngineState::NoUpdate,
        _ => UpdateEngineState::Unknown,
    }
}

/// The kernel release in an x86 bzImage header (the x86 boot protocol,
/// Documentation/arch/x86/boot.rst): `"HdrS"` at 0x202, protocol ≥ 2.00 at 0x206, and the u16
/// `kernel_version` at 0x20E pointing (less 0x200) at a NUL-terminated version string whose
/// first word is the release. Only the first [`BZIMAGE_HEADER_MAX`] bytes are ever needed;
/// every offset is checked, so hostile bytes give an error, never a panic.
pub fn bzimage_release(header: &[u8]) -> Result<String, FlatcarError> {
    let u16_at = |offset: usize| -> Result<u16, FlatcarError> {
        header
            .get(offset..offset + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(FlatcarError::Truncated {
                needed: offset + 2,
                len: header.len(),
            })
    };
    let magic = header
        .get(HDRS_OFFSET..HDRS_OFFSET + 4)
        .ok_or(FlatcarError::Truncated {
            needed: HDRS_OFFSET + 4,
            len: header.len(),
        })?;
    if magic != b"HdrS" {
        return Err(FlatcarError::NotBzImage {
            found: format!("{magic:02x?}"),
        });
    }
    let protocol = u16_at(PROTOCOL_OFFSET)?;
    if protocol < MIN_PROTOCOL {
        let [minor, major] = protocol.to_le_bytes();
        return Err(FlatcarError::OldProtocol { major, minor });
    }
    let kernel_version = u16_at(KERNEL_VERSION_OFFSET)?;
    if kernel_version == 0 {
        return Err(FlatcarError::NoVersionString);
    }
    let offset = usize::from(kernel_version) + 0x200;
    let rest = header.get(offset..).filter(|rest| !rest.is_empty()).ok_or(
        FlatcarError::VersionOutOfRange {
            offset,
            len: header.len(),
        },
    )?;
    let window = &rest[..rest.len().min(VERSION_STRING_MAX)];
    let end = window
        .iter()
        .position(|&b| b == 0)
        .ok_or(FlatcarError::VersionUnterminated { offset })?;
    let text = String::from_utf8_lossy(&window[..end]);
    let release = text.split_ascii_whitespace().next().unwrap_or("");
    if !is_kernel_release(release) {
        return Err(FlatcarError::BadRelease {
            found: text.into_owned(),
        });
    }
    Ok(release.to_string())
}

/// The kernel release of the image file at `path` (a path on this machine, already under the
/// root): [`bzimage_release`] of its first [`BZIMAGE_HEADER_MAX`] bytes for an x86 bzImage, else
/// the banner of an arm64 image ([`crate::watch::arm64_image`]; bounded, and remembered per
/// file version since it may mean decompressing megabytes).
pub fn read_image_release(path: &Path) -> Result<String, FlatcarError> {
    let read_err = |source| FlatcarError::Read {
        path: path.to_path_buf(),
        error: source,
    };
    let with_path = |source: FlatcarError| FlatcarError::Image {
        path: path.to_path_buf(),
        error: Box::new(source),
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut header = Vec::with_capacity(BZIMAGE_HEADER_MAX as usize);
    (&mut file)
        .take(BZIMAGE_HEADER_MAX)
        .read_to_end(&mut header)
        .map_err(read_err)?;
    if header.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(b"HdrS") {
        return bzimage_release(&header).map_err(with_path);
    }
    let Some(format) = arm64_image::detect(&header) else {
        return Err(with_path(FlatcarError::UnknownImage {
            head: hex::encode(&header[..header.len().min(8)]),
        }));
    };
    let meta = file.metadata().map_err(read_err)?;
    let version = image_version(&meta);
    if let Some(release) = remembered(&version) {
        return Ok(release);
    }
    let release = arm64_image::read_release(&mut file, meta.len(), &format)
        .map_err(|e| with_path(e.into()))?;
    remember(version, &release);
    Ok(release)
}

/// What tells one version of a file from another: device, inode, size, modification time.
type ImageVersion = (u64, u64, u64, i64, i64);

fn image_version(meta: &fs::Metadata) -> ImageVersion {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// The arm64 releases read lately (the two slots' kernels, a few boot entries).
static REMEMBERED: std::sync::Mutex<Vec<(ImageVersion, String)>> =
    std::sync::Mutex::new(Vec::new());
const REMEMBER_MAX: usize = 8;

fn remembered(version: &ImageVersion) -> Option<String> {
    let cache = REMEMBERED.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .iter()
        .find(|(v, _)| v == version)
        .map(|(_, r)| r.clone())
}

fn remember(version: ImageVersion, release: &str) {
    let mut cache = REMEMBERED.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= REMEMBER_MAX {
        cache.remove(0);
    }
    cache.push((version, release.to_string()));
}

/// The slot the running system booted from, as the kernel command line says. Every parameter
/// that names a slot is read (`verity.usr=`, `mount.usr=`, `usr=`, `BOOT_IMAGE=`); they must
/// agree. `mount.usr=/dev/mapper/usr` (dm-verity) names no slot and is passed over.
pub fn active_usr_slot(cmdline: &str) -> Result<UsrSlot, FlatcarError> {
    let mut found: Option<(UsrSlot, String)> = None;
    for param in split_cmdline(cmdline) {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        let slot = match key {
            "verity.usr" | "mount.usr" | "usr" => usr_reference_slot(value),
            "BOOT_IMAGE" => boot_image_slot(value),
            _ => None,
        };
        let Some(slot) = slot else { continue };
        match &found {
            None => found = Some((slot, param.to_string())),
            Some((first_slot, first)) if *first_slot != slot => {
                return Err(FlatcarError::ConflictingUsrSlot {
                    first: first.clone(),
                    second: param.to_string(),
                })
            }
            Some(_) => {}
        }
    }
    found
        .map(|(slot, _)| slot)
        .ok_or_else(|| FlatcarError::NoUsrSlot {
            cmdline: cmdline.trim().to_string(),
        })
}

/// Kernel parameters, honouring double quotes the way the kernel does (`key="a b"`).
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    params.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        params.push(current);
    }
    params
}

/// `PARTUUID=…`, `PARTLABEL=…` or their `/dev/disk/by-part*/` spellings.
fn usr_reference_slot(value: &str) -> Option<UsrSlot> {
    let (kind, id) = if let Some(id) = value.strip_prefix("PARTUUID=") {
        ("uuid", id)
    } else if let Some(id) = value.strip_prefix("/dev/disk/by-partuuid/") {
        ("uuid", id)
    } else if let Some(label) = value.strip_prefix("PARTLABEL=") {
        ("label", label)
    } else if let Some(label) = value.strip_prefix("/dev/disk/by-partlabel/") {
        ("label", label)
    } else {
        return None;
    };
    match kind {
        "uuid" if id.eq_ignore_ascii_case(USR_A_PARTUUID) => Some(UsrSlot::A),
        "uuid" if id.eq_ignore_ascii_case(USR_B_PARTUUID) => Some(UsrSlot::B),
        "label" if id == "USR-A" => Some(UsrSlot::A),
        "label" if id == "USR-B" => Some(UsrSlot::B),
        _ => None,
    }
}

/// GRUB's `BOOT_IMAGE=(hd0,gpt1)/flatcar/vmlinuz-a` (`/coreos/` before the rename).
fn boot_image_slot(value: &str) -> Option<UsrSlot> {
    let path = value.rsplit(')').next().unwrap_or(value);
    match path {
        "/flatcar/vmlinuz-a" | "/coreos/vmlinuz-a" => Some(UsrSlot::A),
        "/flatcar/vmlinuz-b" | "/coreos/vmlinuz-b" => Some(UsrSlot::B),
        _ => None,
    }
}

/// The kernel the next boot runs, or `None` when it is the running one.
///
/// The rule, by what update_engine last said:
/// - [`UpdateEngineState::NeedReboot`]: an update was applied to the inactive slot and GRUB
///   boots it next, so its kernel (`/boot/flatcar/vmlinuz-<inactive>`) is next; `None` when that
///   kernel has the running release (an update that did not change the kernel). A missing
///   kernel there is an error: the update is incomplete.
/// - [`UpdateEngineState::NoUpdate`]: `None`; whatever the inactive slot holds is the previous
///   release (or a half-written update), not the next boot.
/// - [`UpdateEngineState::Unknown`] (update_engine not reachable): fall back to the disk. The
///   inactive slot's kernel is next only if its release sorts newer than the running one
///   ([`version_cmp`]): after an update it holds the new kernel, after a normal boot the
///   previous, older one. A missing inactive kernel (first boot: `USR-B` is empty) is `None`.
///
/// The active slot comes from `/proc/cmdline` ([`active_usr_slot`]).
pub fn next_boot(
    root: &Root,
    running_kernel: &str,
    update_engine: UpdateEngineState,
) -> Result<Option<NextBoot>, FlatcarError> {
    if update_engine == UpdateEngineState::NoUpdate {
        return Ok(None);
    }
    let cmdline_path = root.join(CMDLINE);
    let cmdline = fs::read_to_string(&cmdline_path).map_err(|source| FlatcarError::Read {
        path: cmdline_path,
        error: source,
    })?;
    let inactive = active_usr_slot(&cmdline)?.other();
    let host_path = inactive.kernel_path();
    let path = root.join(&host_path);
    if !path.exists() {
        return match update_engine {
            UpdateEngineState::NeedReboot => Err(FlatcarError::MissingKernel {
                path: host_path,
                slot: inactive,
            }),
            _ => Ok(None),
        };
    }
    let release = read_image_release(&path)?;
    debug!(KERNEL_RELEASE = %release, "{} holds {release}", host_path.display());
    if release == running_kernel {
        return Ok(None);
    }
    let why = match update_engine {
        UpdateEngineState::NeedReboot => "update_engine: UPDATE_STATUS_UPDATED_NEED_REBOOT",
        _ => {
            if version_cmp(&release, running_kernel).is_le() {
                return Ok(None);
            }
            "update_engine unreachable; newer than the running kernel"
        }
    };
    Ok(Some(NextBoot {
        kernel_release: release,
        origin: format!("{} ({}, {why})", host_path.display(), inactive.label()),
        // The inactive /usr is not mounted; its module tree cannot be read now.
        module_tree: None,
        staged_deployment: false,
    }))
}

/// Paths whose changes mean "look again" when update_engine cannot be heard: update_engine
/// writes the new kernel into `/boot/flatcar` (its kernel copier step) before it reports
/// `UPDATE_STATUS_UPDATED_NEED_REBOOT`.
pub fn watch_paths() -> Vec<PathBuf> {
    vec![PathBuf::from(KERNEL_DIR)]
}

/// Flatcar's own NVIDIA driver sysext, if this host uses it; the agent then stands down.
///
/// Flatcar ships the driver as official, release-coupled system extensions named
/// `nvidia-drivers-<branch>[-open]` (flatcar/scripts `build_library/extra_sysexts.sh`). They
/// are enabled by listing the name in `/etc/flatcar/enabled-sysext.conf` (defaults in
/// `/usr/share/flatcar/enabled-sysext.conf`; a `-NAME` line disables one, `#` starts a
/// comment); the initrd (flatcar/bootengine `dracut/99setup-root/initrd-setup-root-after-ignition`)
/// then keeps the image as `/etc/flatcar/sysext/flatcar-NAME-VERSION.raw`, links it from
/// `/etc/extensions/flatcar-NAME.raw`, and update_engine fetches the matching image with each
/// OS update, so the next kernel is covered by the OS too.
///
/// Returns the merged link `/etc/extensions/flatcar-nvidia-drivers-….raw` when it is there,
/// else the configuration file that enables one (host paths).
pub fn os_nvidia_sysext(root: &Root) -> Option<PathBuf> {
    const CONFIGS: [&str; 2] = [
        "/usr/share/flatcar/enabled-sysext.conf",
        "/etc/flatcar/enabled-sysext.conf",
    ];
    let mut enabled: Vec<(String, &str)> = Vec::new();
    for config in CONFIGS {
        let Ok(text) = fs::read_to_string(root.join(config)) else {
            continue;
        };
        for line in text.lines() {
            let name = line.split('#').next().unwrap_or("").trim();
            if let Some(disabled) = name.strip_prefix('-') {
                enabled.retain(|(n, _)| n != disabled);
            } else if !name.is_empty() && !enabled.iter().any(|(n, _)| n == name) {
                enabled.push((name.to_string(), config));
            }
        }
    }
    let (name, config) = enabled
        .into_iter()
        .find(|(name, _)| name.starts_with("nvidia-drivers"))?;
    let link = PathBuf::from(format!("/etc/extensions/flatcar-{name}.raw"));
    // The link itself: its absolute target names a host path, not one under `root`.
    if fs::symlink_metadata(root.join(&link)).is_ok() {
        Some(link)
    } else {
        Some(PathBuf::from(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_engine_strings() {
        assert_eq!(
            update_engine_state("UPDATE_STATUS_UPDATED_NEED_REBOOT"),
            UpdateEngineState::NeedReboot
        );
        for s in [
            "UPDATE_STATUS_IDLE",
            "UPDATE_STATUS_CHECKING_FOR_UPDATE",
            "UPDATE_STATUS_UPDATE_AVAILABLE",
            "UPDATE_STATUS_DOWNLOADING",
            "UPDATE_STATUS_VERIFYING",
            "UPDATE_STATUS_FINALIZING",
            "UPDATE_STATUS_REPORTING_ERROR_EVENT",
        ] {
            assert_eq!(update_engine_state(s), UpdateEngineState::NoUpdate, "{s}");
        }
        assert_eq!(
            update_engine_state("unknown status"),
            UpdateEngineState::Unknown
        );
        assert_eq!(update_engine_state(""), UpdateEngineState::Unknown);
    }

    #[test]
    fn slot_from_real_cmdlines() {
        // As GRUB passes them with dm-verity (Flatcar on EC2).
        let verity = "rootflags=rw mount.usrflags=ro BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=/dev/mapper/usr verity.usr=PARTUUID=7130c94a-213a-4e5a-8e26-6cce9662f132 rootflags=rw mount.usrflags=ro consoleblank=0 root=LABEL=ROOT console=ttyS0,115200n8 flatcar.first_boot=detected flatcar.oem.id=ec2 verity.usrhash=1839da26";
        assert_eq!(active_usr_slot(verity).unwrap(), UsrSlot::A);
        let plain = "BOOT_IMAGE=/flatcar/vmlinuz-b mount.usr=PARTUUID=E03DD35C-7C2D-4A47-B3FE-27F15780A57C root=LABEL=ROOT";
        assert_eq!(active_usr_slot(plain).unwrap(), UsrSlot::B);
        assert_eq!(
            active_usr_slot("usr=PARTLABEL=USR-B quiet").unwrap(),
            UsrSlot::B
        );
        assert_eq!(
            active_usr_slot("mount.usr=/dev/disk/by-partlabel/USR-A").unwrap(),
            UsrSlot::A
        );
        assert_eq!(
            active_usr_slot("BOOT_IMAGE=(hd0,gpt1)/coreos/vmlinuz-b").unwrap(),
            UsrSlot::B
        );
    }

    #[test]
    fn slot_errors() {
        assert!(matches!(
            active_usr_slot("root=/dev/sda1 mount.usr=/dev/mapper/usr"),
            Err(FlatcarError::NoUsrSlot { .. })
        ));
        assert!(matches!(
            active_usr_slot("mount.usr=PARTUUID=00000000-0000-0000-0000-000000000000"),
            Err(FlatcarError::NoUsrSlot { .. })
        ));
        let err = active_usr_slot("BOOT_IMAGE=/flatcar/vmlinuz-a verity.usr=PARTLABEL=USR-B")
            .unwrap_err();
        assert!(
            matches!(err, FlatcarError::ConflictingUsrSlot { .. }),
            "{err}"
        );
    }

    #[test]
    fn quoted_parameters_stay_whole() {
        assert_eq!(
            split_cmdline(" a=\"x y\"  usr=PARTLABEL=USR-A\n"),
            vec!["a=x y".to_string(), "usr=PARTLABEL=USR-A".to_string()]
        );
    }

    fn header(protocol: u16, kernel_version: u16, string: &[u8]) -> Vec<u8> {
        let at = 0x200 + usize::from(kernel_version);
        let mut h = vec![0u8; (at + string.len()).max(0x210)];
        h[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        h[PROTOCOL_OFFSET..PROTOCOL_OFFSET + 2].copy_from_slice(&protocol.to_le_bytes());
        h[KERNEL_VERSION_OFFSET..KERNEL_VERSION_OFFSET + 2]
            .copy_from_slice(&kernel_version.to_le_bytes());
        h[at..at + string.len()].copy_from_slice(string);
        h
    }

    #[test]
    fn header_edge_cases() {
        let ok = header(0x020f, 0x100, b"6.6.60-flatcar (jenkins@x) #1 SMP\0");
        assert_eq!(bzimage_release(&ok).unwrap(), "6.6.60-flatcar");
        assert!(matches!(
            bzimage_release(&header(0x0201, 0, b"")),
            Err(FlatcarError::NoVersionString)
        ));
        assert!(matches!(
            bzimage_release(&header(0x01ff, 0x100, b"6.1\0")),
            Err(FlatcarError::OldProtocol {
                major: 1,
                minor: 0xff
            })
        ));
        assert!(matches!(
            bzimage_release(&header(0x020f, 0x100, b"6.1 no terminator")),
            Err(FlatcarError::VersionUnterminated { .. })
        ));
        assert!(matches!(
            bzimage_release(&header(0x020f, 0x100, b"\0")),
            Err(FlatcarError::BadRelease { .. })
        ));
        assert!(matches!(
            bzimage_release(&header(0x020f, 0x100, b"\xff\xfe\0")),
            Err(FlatcarError::BadRelease { .. })
        ));
        let mut past = header(0x020f, 0x100, b"x\0");
        past.truncate(0x300);
        assert!(matches!(
            bzimage_release(&past),
            Err(FlatcarError::VersionOutOfRange { offset: 0x300, .. })
        ));
    }
}

//! The running kernel as seen through `/proc` and `/sys` under the root: its release, which
//! modules are loaded (and at which version), which compressions `finit_module` accepts,
//! whether module signatures are enforced, and what the OS's own module tree provides.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{HostError, Root};
use crate::modinfo::Compression;

/// Host path of the running kernel's release string (what `uname -r` prints).
pub const OSRELEASE: &str = "/proc/sys/kernel/osrelease";
/// Host path of the kernel's list of loaded modules.
pub const PROC_MODULES: &str = "/proc/modules";
/// Host path of the directory with one `<name>/` per loaded (or built-in) module; `<name>/version`
/// holds its version.
pub const SYS_MODULE: &str = "/sys/module";
/// Host path of the file naming the in-kernel module decompressor (absent on kernels without one).
pub const MODULE_COMPRESSION: &str = "/sys/module/compression";
/// Host path of the flag (`Y`/`N`) saying whether the kernel refuses unsigned modules.
pub const SIG_ENFORCE: &str = "/sys/module/module/parameters/sig_enforce";
/// Host path of the kernel lockdown mode file (`none [integrity] confidentiality`).
pub const LOCKDOWN: &str = "/sys/kernel/security/lockdown";
/// Host path of the `firmware_class.path` parameter: an extra directory the kernel loads firmware
/// from.
pub const FIRMWARE_PATH: &str = "/sys/module/firmware_class/parameters/path";
/// Host path of the nouveau PCI driver's directory; its `0000:01:00.0`-like entries are the devices
/// bound to it.
pub const NOUVEAU_DRIVER: &str = "/sys/bus/pci/drivers/nouveau";

/// Read the running kernel's release from [`OSRELEASE`] under `root`, trimmed.
pub fn read_kernel_release(root: &Root) -> Result<String, HostError> {
    let path = root.join(OSRELEASE);
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|source| HostError::KernelRelease {
            path,
            error: source,
        })
}

/// Whether `text` can be a kernel release (`uname -r`) as read from a kernel image or a boot
/// entry: 1 to 64 bytes (utsname keeps 65 with the NUL) of printable ASCII, no whitespace and no
/// `/`, so it is also safe as a path component (the store keeps overlays under it).
pub fn is_kernel_release(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text != "."
        && text != ".."
        && text.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// A module the kernel has loaded, as `/proc/modules` and `/sys/module/<name>/version` say.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoadedModule {
    /// The kernel's spelling of the name (underscores), as in `/proc/modules`.
    pub name: String,
    /// The `version=` the module declared, from `/sys/module/<name>/version`; `None` when it has
    /// none.
    pub version: Option<String>,
}

/// The kernel's module-related state, read once before planning.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelState {
    /// Keyed by the kernel's spelling of the name (underscores).
    pub loaded: BTreeMap<String, LoadedModule>,
    /// Formats `finit_module(MODULE_INIT_COMPRESSED_FILE)` can decompress in-kernel.
    pub compression: Vec<Compression>,
    /// Whether unsigned modules are refused (`sig_enforce` is `Y`); `false` when the file is
    /// absent.
    pub sig_enforce: bool,
    /// The active lockdown mode (`integrity`, `confidentiality`), `None` when off or unknown.
    pub lockdown: Option<String>,
    /// PCI devices bound to nouveau.
    pub nouveau_bound: Vec<String>,
    /// `firmware_class.path` as it is now (empty when unset).
    pub firmware_path: String,
    /// Modules the OS's own tree for the running kernel provides (loadable or built in),
    /// normalised to underscores.
    pub os_modules: BTreeSet<String>,
    /// Symbols the OS's loadable modules export, from depmod's `modules.symbols` for the running
    /// kernel: symbol → module (underscores). The kernel image's own exports are not in it.
    #[serde(skip)]
    pub os_symbols: BTreeMap<String, String>,
    /// The keys the kernel checks module signatures against; `None` when `/proc/keys` names no
    /// trusted keyring (see [`super::keyring`]).
    pub trusted_keys: Option<super::keyring::TrustedKeys>,
}

/// The kernel spells module names with underscores; files and `depends=` keep hyphens.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

impl KernelState {
    /// Read the whole state under `root`; `kernel_release` picks the OS module tree for
    /// [`KernelState::os_modules`].
    /// Missing files count as empty/off; only a file that exists but cannot be read is an error.
    pub fn read(root: &Root, kernel_release: &str) -> Result<Self, HostError> {
        let modules_text = read_optional(root, PROC_MODULES)?.unwrap_or_default();
        let mut loaded = BTreeMap::new();
        for name in parse_proc_modules(&modules_text) {
            let version = read_optional(root, &format!("{SYS_MODULE}/{name}/version"))?
                .map(|v| v.trim().to_string());
            loaded.insert(name.clone(), LoadedModule { name, version });
        }
        let compression = read_optional(root, MODULE_COMPRESSION)?
            .map(|s| parse_compression(&s))
            .unwrap_or_default();
        let sig_enforce = read_optional(root, SIG_ENFORCE)?
            .map(|s| s.trim() == "Y")
            .unwrap_or(false);
        let lockdown = read_optional(root, LOCKDOWN)?.and_then(|s| parse_lockdown(&s));
        let nouveau_bound = list_pci_bindings(&root.join(NOUVEAU_DRIVER));
        let firmware_path = read_optional(root, FIRMWARE_PATH)?
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let (os_modules, os_symbols) = read_os_modules(root, kernel_release)?;
        let trusted_keys = super::keyring::read_trusted_keys(root)?;
        Ok(KernelState {
            loaded,
            compression,
            sig_enforce,
            lockdown,
            nouveau_bound,
            firmware_path,
            os_modules,
            os_symbols,
            trusted_keys,
        })
    }

    /// The loaded module called `name` (hyphens or underscores), if the kernel has it loaded.
    pub fn is_loaded(&self, name: &str) -> Option<&LoadedModule> {
        self.loaded.get(&normalize_module_name(name))
    }
}

fn read_optional(root: &Root, host_path: &str) -> Result<Option<String>, HostError> {
    let path = root.join(host_path);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HostError::Read {
            path,
            error: source,
        }),
    }
}

/// Names (first field) of `/proc/modules`.
pub fn parse_proc_modules(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// `/sys/module/compression` holds one word, e.g. `zstd`, naming the in-kernel decompressor.
pub fn parse_compression(text: &str) -> Vec<Compression> {
    text.split_whitespace()
        .filter_map(|word| match word {
            "xz" => Some(Compression::Xz),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        })
        .collect()
}

/// `/sys/kernel/security/lockdown` reads like `none [integrity] confidentiality`.
pub fn parse_lockdown(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    let mode = &text[start + 1..end];
    (mode != "none").then(|| mode.to_string())
}

fn list_pci_bindings(driver_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(driver_dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        // PCI addresses look like 0000:01:00.0; the rest are bind/unbind/uevent/module.
        .filter(|n| n.len() == 12 && n.as_bytes()[4] == b':' && n.as_bytes()[10] == b'.')
        .collect();
    out.sort();
    out
}

/// The OS's module names, and its symbols with the module exporting each.
type OsModuleIndex = (BTreeSet<String>, BTreeMap<String, String>);

/// Module names in the OS's own `modules.dep` and `modules.builtin` for `kernel_release`, and
/// its `modules.symbols`.
fn read_os_modules(root: &Root, kernel_release: &str) -> Result<OsModuleIndex, HostError> {
    let mut names = BTreeSet::new();
    let mut symbols = BTreeMap::new();
    for dir in ["/usr/lib/modules", "/lib/modules"] {
        let base = PathBuf::from(dir).join(kernel_release);
        for index in ["modules.dep", "modules.builtin"] {
            if let Some(text) = read_optional(root, &base.join(index).to_string_lossy())? {
                names.extend(parse_module_index(&text));
            }
        }
        if !names.is_empty() {
            let path = base.join("modules.symbols");
            if let Some(text) = read_optional(root, &path.to_string_lossy())? {
                symbols = parse_modules_symbols(&text);
            }
            break;
        }
    }
    Ok((names, symbols))
}

/// depmod's `modules.symbols` (kmod `tools/depmod.c` `output_symbols`): lines
/// `alias symbol:<symbol> <module>`; symbol → module (underscores). A symbol listed for two
/// modules keeps the first, as `modprobe symbol:<name>` would load the first match.
pub fn parse_modules_symbols(text: &str) -> BTreeMap<String, String> {
    let mut symbols = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("alias"), Some(alias), Some(module)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if let Some(symbol) = alias.strip_prefix("symbol:") {
            symbols
                .entry(symbol.to_string())
                .or_insert_with(|| normalize_module_name(module));
        }
    }
    symbols
}

/// Module names from `modules.dep` (`kernel/drivers/i2c/i2c-core.ko.xz: dep…`) or
/// `modules.builtin` (one path a line), normalised to underscores.
pub fn parse_module_index(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.split(':').next())
        .filter_map(|path| path.trim().rsplit('/').next())
        .filter_map(|file| file.split(".ko").next())
        .filter(|name| !name.is_empty())
        .map(normalize_module_name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_shapes() {
        for ok in [
            "6.1.0-28-cloud-amd64",
            "6.12.117+deb12-cloud-amd64",
            "6.6.60-flatcar",
        ] {
            assert!(is_kernel_release(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "6.1/../x",
            "6.1 x",
            "6.1\u{e9}",
            &"9".repeat(65),
        ] {
            assert!(!is_kernel_release(bad), "{bad:?}");
        }
    }

    #[test]
    fn proc_modules_names() {
        let text = "nvidia_uvm 1990656 0 - Live 0x0000000000000000 (OE)\nnvidia 11223344 2 nvidia_uvm,nvidia_modeset, Live 0x0 (OE)\n";
        assert_eq!(parse_proc_modules(text), vec!["nvidia_uvm", "nvidia"]);
    }

    #[test]
    fn lockdown_modes() {
        assert_eq!(parse_lockdown("[none] integrity confidentiality\n"), None);
        assert_eq!(
            parse_lockdown("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(parse_lockdown(""), None);
    }

    #[test]
    fn module_index_names() {
        let dep = "kernel/drivers/i2c/i2c-core.ko.xz:\nkernel/drivers/char/ipmi/ipmi_msghandler.ko: kernel/x.ko\n";
        let builtin = "kernel/drivers/video/backlight.ko\n";
        let mut names = parse_module_index(dep);
        names.extend(parse_module_index(builtin));
        assert!(names.contains("i2c_core"));
        assert!(names.contains("ipmi_msghandler"));
        assert!(names.contains("backlight"));
    }

    #[test]
    fn modules_symbols_lines() {
        let text = "# Aliases for symbols, used by symbol_request().\n\
                    alias symbol:drm_dev_register drm\n\
                    alias symbol:drm_atomic_helper_check drm_kms_helper\n\
                    alias symbol:ib_register_client ib_core\n\
                    alias symbol:drm_dev_register other\n\
                    alias pci:v* nouveau\n";
        let symbols = parse_modules_symbols(text);
        assert_eq!(symbols["drm_dev_register"], "drm");
        assert_eq!(symbols["drm_atomic_helper_check"], "drm_kms_helper");
        assert_eq!(symbols["ib_register_client"], "ib_core");
        assert_eq!(symbols.len(), 3);
    }

    #[test]
    fn compression_words() {
        assert_eq!(parse_compression("zstd\n"), vec![Compression::Zstd]);
        assert_eq!(parse_compression("gzip\n"), Vec::<Compression>::new());
    }

    #[test]
    fn reads_state_from_fake_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let w = |p: &str, s: &str| {
            let path = root.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, s).unwrap();
        };
        w(OSRELEASE, "6.1.0-28-cloud-amd64\n");
        w(PROC_MODULES, "nvidia 1 0 - Live 0x0 (OE)\n");
        w("/sys/module/nvidia/version", "570.1\n");
        w(SIG_ENFORCE, "Y\n");
        w(MODULE_COMPRESSION, "xz\n");
        std::fs::create_dir_all(root.join("/sys/bus/pci/drivers/nouveau/0000:01:00.0")).unwrap();
        w(
            "/usr/lib/modules/6.1.0-28-cloud-amd64/modules.dep",
            "kernel/a/i2c-core.ko:\n",
        );
        w(
            "/usr/lib/modules/6.1.0-28-cloud-amd64/modules.symbols",
            "alias symbol:i2c_transfer i2c_core\n",
        );
        let kver = read_kernel_release(&root).unwrap();
        assert_eq!(kver, "6.1.0-28-cloud-amd64");
        let state = KernelState::read(&root, &kver).unwrap();
        assert_eq!(
            state.is_loaded("nvidia").unwrap().version.as_deref(),
            Some("570.1")
        );
        assert!(state.sig_enforce);
        assert_eq!(state.compression, vec![Compression::Xz]);
        assert_eq!(state.nouveau_bound, vec!["0000:01:00.0"]);
        assert!(state.os_modules.contains("i2c_core"));
        assert_eq!(state.os_symbols["i2c_transfer"], "i2c_core");
    }
}

//! Fake hosts in temp dirs. [`FakeHost`]: a whole host, with os-release, /proc and /sys as the
//! agent reads them, the OS's module index, /dev; the agent runs on it with `--root`.
//! [`BareHost`]: an empty root and its overlay store, for the tests that stage overlays through
//! the library.

use std::fs;
use std::path::{Path, PathBuf};

use super::boot::bzimage_with_release;
use super::overlay::OverlayBuilder;
use nvdriver_agent::config::StageSettings;
use nvdriver_agent::fsutil::TEMP_PREFIX;
use nvdriver_agent::host::Root;
use nvdriver_agent::overlay::signature::KEYS_DIR;
use nvdriver_agent::overlay::source::{stage, OverlayKey, SourceError, StageReport};
use nvdriver_agent::overlay::Store;

/// The overlay store's default place on the host.
pub const STORE: &str = "/var/lib/nvdriver-agent/overlays";

pub const FCOS_OS_RELEASE: &str = "NAME=\"Fedora Linux\"\nVERSION=\"41.20241109.3.0 (CoreOS)\"\nID=fedora\nVERSION_ID=41\nVARIANT_ID=coreos\nPRETTY_NAME=\"Fedora CoreOS 41.20241109.3.0\"\n";

/// Symbols the fake kernel image exports (in its `/proc/kallsyms`).
pub const KERNEL_IMAGE_SYMBOLS: [&str; 5] = [
    "_printk",
    "printk",
    "__register_chrdev",
    "__unregister_chrdev",
    "pci_register_driver",
];

/// Symbols the fake OS modules export (`modules.symbols`), as (symbol, module).
pub const OS_MODULE_SYMBOLS: [(&str, &str); 3] = [
    ("drm_dev_register", "drm"),
    ("drm_kms_helper_poll_init", "drm_kms_helper"),
    ("ipmi_create_user", "ipmi_msghandler"),
];

/// Flatcar's kernel command line when booted from the USR-B partition.
pub const FLATCAR_CMDLINE_USR_B: &str = "BOOT_IMAGE=/flatcar/vmlinuz-b mount.usr=/dev/mapper/usr verity.usr=PARTUUID=e03dd35c-7c2d-4a47-b3fe-27f15780a57c root=LABEL=ROOT flatcar.oem.id=qemu\n";

/// The drop-in every [`FakeHost`] has, turning the disk reserve off (`stage.keep-free-*`).
pub const TEST_RESERVE_DROP_IN: &str = "/etc/nvdriver-agent/config.d/00-test-no-disk-reserve.toml";

pub struct FakeHost {
    pub dir: tempfile::TempDir,
    pub root: Root,
}

impl FakeHost {
    pub fn new(kernel_release: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), kernel_release)
    }

    /// A fake host in a temp dir under `parent`.
    pub fn new_in(parent: &Path, kernel_release: &str) -> Self {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let root = Root::new(dir.path());
        let host = FakeHost { dir, root };
        host.write("/etc/os-release", FCOS_OS_RELEASE);
        // No disk reserve: the shipped one (10 % of the file system) depends on how full the
        // test machine's disk is. Tests of the reserve set it in a later drop-in.
        host.write(
            TEST_RESERVE_DROP_IN,
            "[stage]\nkeep-free-percent = 0\nkeep-free-bytes = 0\n",
        );
        host.write("/proc/sys/kernel/osrelease", &format!("{kernel_release}\n"));
        host.write("/proc/modules", "");
        host.write(
            "/proc/devices",
            "Character devices:\n  1 mem\n  4 tty\n\nBlock devices:\n  8 sd\n",
        );
        host.write(
            "/proc/self/mountinfo",
            "1 0 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n",
        );
        host.write("/sys/module/compression", "zstd\n");
        host.write("/sys/module/firmware_class/parameters/path", "\n");
        host.write("/sys/module/module/parameters/sig_enforce", "N\n");
        host.write(
            &format!("/usr/lib/modules/{kernel_release}/modules.dep"),
            "kernel/drivers/i2c/i2c-core.ko.xz:\nkernel/drivers/char/ipmi/ipmi_msghandler.ko.xz:\nkernel/drivers/gpu/drm/drm.ko.xz:\nkernel/drivers/gpu/drm/drm_kms_helper.ko.xz: kernel/drivers/gpu/drm/drm.ko.xz\n",
        );
        host.write(
            &format!("/usr/lib/modules/{kernel_release}/modules.builtin"),
            "kernel/drivers/video/backlight.ko\n",
        );
        // What depmod writes for the OS modules above: the symbols each exports.
        host.write(
            &format!("/usr/lib/modules/{kernel_release}/modules.symbols"),
            &OS_MODULE_SYMBOLS
                .iter()
                .map(|(symbol, module)| format!("alias symbol:{symbol} {module}\n"))
                .collect::<String>(),
        );
        // The kernel image's exports; the simulated kernel adds each loaded module's.
        host.write(
            "/proc/kallsyms",
            &KERNEL_IMAGE_SYMBOLS
                .iter()
                .map(|symbol| format!("ffffffff81000000 T {symbol}\n"))
                .collect::<String>(),
        );
        fs::create_dir_all(host.path("/dev/char")).unwrap();
        host
    }

    /// A Flatcar host booted from USR-B on `running`, with update_engine having written `next`'s
    /// kernel to slot A (as it does before asking for a reboot); `config` is its
    /// `/etc/nvdriver-agent/config.toml`.
    pub fn flatcar(running: &str, next: &str, config: &str) -> Self {
        let host = FakeHost::new(running);
        host.write(
            "/etc/os-release",
            "NAME=\"Flatcar Container Linux by Kinvolk\"\nID=flatcar\nVERSION_ID=4081.2.0\n",
        );
        host.write("/proc/cmdline", FLATCAR_CMDLINE_USR_B);
        host.write_bytes("/boot/flatcar/vmlinuz-b", &bzimage_with_release(running));
        host.write_bytes("/boot/flatcar/vmlinuz-a", &bzimage_with_release(next));
        host.write("/etc/nvdriver-agent/config.toml", config);
        host
    }

    /// Put `overlay` in the store at [`STORE`], through the store's own import (not the agent
    /// binary).
    pub fn import(&self, overlay: &OverlayBuilder) {
        let src = tempfile::tempdir().unwrap();
        overlay.build(src.path());
        Store::new(&self.root, STORE).import(src.path()).unwrap();
    }

    /// Resolve a host path under the fake root.
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        self.root.join(host_path)
    }

    pub fn write(&self, host_path: &str, contents: &str) {
        let path = self.path(host_path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    pub fn write_bytes(&self, host_path: &str, contents: &[u8]) {
        let path = self.path(host_path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    pub fn mkdir(&self, host_path: &str) {
        fs::create_dir_all(self.path(host_path)).unwrap();
    }

    pub fn read(&self, host_path: &str) -> String {
        fs::read_to_string(self.path(host_path)).unwrap_or_default()
    }

    pub fn exists(&self, host_path: &str) -> bool {
        self.path(host_path).exists()
    }

    /// sha256 of every file and link under the root, sorted: equal snapshots mean nothing
    /// changed.
    pub fn snapshot(&self) -> Vec<(PathBuf, String)> {
        snapshot_dir(self.dir.path())
    }
}

/// A bare fake host: an empty root (in `outer/host`, so writes that escape it show up in
/// `outer`), the overlay store at [`STORE`] in it, and the overlay to stage there.
pub struct BareHost {
    outer: tempfile::TempDir,
    pub root: Root,
    pub key: OverlayKey,
}

impl BareHost {
    pub fn new(key: OverlayKey) -> Self {
        let outer = tempfile::tempdir().unwrap();
        fs::create_dir(outer.path().join("host")).unwrap();
        let root = Root::new(outer.path().join("host"));
        let host = BareHost { outer, root, key };
        // As on a FakeHost: no disk reserve for the binary run on it.
        host.put(
            TEST_RESERVE_DROP_IN,
            b"[stage]\nkeep-free-percent = 0\nkeep-free-bytes = 0\n",
        );
        host
    }

    pub fn store(&self) -> Store<'_> {
        Store::new(&self.root, STORE)
    }

    /// Put a file on the fake host.
    pub fn put(&self, host_path: &str, bytes: &[u8]) {
        let path = self.root.join(host_path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    /// Copy a file from outside into the fake host; returns its host path.
    pub fn copy_in(&self, from: &Path, host_path: &str) -> PathBuf {
        let to = self.root.join(host_path);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(from, &to).unwrap();
        PathBuf::from(host_path)
    }

    /// Trust a minisign public key for overlay signatures.
    pub fn trust(&self, public_key: &Path) {
        let dir = self.root.join(KEYS_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(public_key, dir.join("builder.pub")).unwrap();
    }

    /// Stage `self.key` into the store.
    pub fn stage(&self, settings: &StageSettings) -> Result<StageReport, SourceError> {
        stage(&self.root, &self.store(), settings, &self.key, None)
    }

    /// Where `self.key`'s overlay is, if the store holds it verified.
    pub fn stored(&self) -> Option<PathBuf> {
        let key = &self.key;
        self.store()
            .verified(&key.kernel_release, &key.driver_version, &key.arch)
            .map(|o| self.root.join(o.dir))
    }

    /// The store holds no overlay and no leftovers (lock files aside).
    pub fn assert_empty(&self) {
        assert!(self.stored().is_none());
        let store = self.root.join(STORE);
        if store.exists() {
            let leftovers: Vec<_> = walk(&store)
                .into_iter()
                .filter(|p| p.is_file() && !p.ends_with(".lock"))
                .collect();
            assert!(leftovers.is_empty(), "left in the store: {leftovers:?}");
        }
    }

    /// Every overlay under its real name verifies; no temporary leftovers anywhere in the
    /// store; no partial downloads left unless `parts_allowed`; nothing written beside the
    /// root. Returns the stored (kernel, driver) pairs.
    pub fn assert_store_clean(&self, parts_allowed: bool) -> Vec<(String, String)> {
        let store = self.store();
        let mut found = Vec::new();
        for kernel in store.kernel_releases().unwrap() {
            for driver in store.driver_versions(&kernel).unwrap() {
                let overlay = store.open(&kernel, &driver).unwrap();
                store.verify(&overlay).unwrap();
                found.push((kernel.clone(), driver));
            }
        }
        let top = self.root.join(STORE);
        if top.exists() {
            for (path, _) in snapshot_dir(&top) {
                let name = path.file_name().unwrap().to_string_lossy();
                assert!(
                    !name.starts_with(TEMP_PREFIX),
                    "leftover {} in the store",
                    path.display()
                );
                if !parts_allowed {
                    assert!(
                        !name.ends_with(".part"),
                        "partial download {} left",
                        path.display()
                    );
                }
            }
        }
        assert_eq!(
            fs::read_dir(self.outer.path()).unwrap().count(),
            1,
            "nothing written beside the root"
        );
        found
    }
}

/// Every path under `dir`, directories after their contents.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

pub fn snapshot_dir(top: &Path) -> Vec<(PathBuf, String)> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::new();
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(top).unwrap().to_path_buf();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.push((rel, "dir".into()));
                pending.push(path);
            } else if meta.file_type().is_symlink() {
                out.push((
                    rel,
                    format!("-> {}", fs::read_link(&path).unwrap().display()),
                ));
            } else {
                out.push((rel, hex::encode(Sha256::digest(fs::read(&path).unwrap()))));
            }
        }
    }
    out.sort();
    out
}

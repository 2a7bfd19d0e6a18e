//! A whole fake host in a temp dir: os-release, /proc and /sys as the agent reads them, the
//! OS's module index, /dev. The agent runs on it with `--root`.

use std::fs;
use std::path::{Path, PathBuf};

use nvdriver_agent::host::Root;

pub const FCOS_OS_RELEASE: &str = "NAME=\"Fedora Linux\"\nVERSION=\"41.20241109.3.0 (CoreOS)\"\nID=fedora\nVERSION_ID=41\nVARIANT_ID=coreos\nPRETTY_NAME=\"Fedora CoreOS 41.20241109.3.0\"\n";

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
        fs::create_dir_all(host.path("/dev/char")).unwrap();
        host
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

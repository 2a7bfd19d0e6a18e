//! Real ostree sysroots in a temp dir, made by the `ostree` CLI (`ostree admin init-fs`,
//! `os-init`, `commit`, `admin deploy`), the way an rpm-ostree host's physical root looks.
//!
//! Staging needs a *booted* ostree system (`ostree admin deploy --stage` refuses otherwise),
//! so [`OstreeSysroot::stage`] does what libostree's `ostree_sysroot_stage_tree` does on disk:
//! it checks the commit out as a new deployment directory (with its `.origin`), which no
//! bootloader entry names, and writes `/run/ostree/staged-deployment` in libostree's format.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nvdriver_agent::host::Root;

/// An ostree sysroot; its temp dir is the root the agent reads.
pub struct OstreeSysroot {
    pub dir: tempfile::TempDir,
    pub root: Root,
    pub stateroot: String,
    /// Host path of the physical sysroot the `ostree` CLI works on: `/`, or `/sysroot` in
    /// the booted layout.
    pub sysroot: PathBuf,
}

/// One deployment made by [`OstreeSysroot::deploy`] or [`OstreeSysroot::stage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployed {
    pub csum: String,
    pub serial: u32,
}

impl Deployed {
    /// `<csum>.<serial>`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.csum, self.serial)
    }
}

impl OstreeSysroot {
    /// `ostree admin init-fs` and `os-init <stateroot>`: an empty sysroot with one stateroot;
    /// the root is the physical sysroot (as `ostree admin` sees a disk).
    pub fn new(stateroot: &str) -> Self {
        Self::init(stateroot, "/")
    }

    /// The same sysroot as a booted host sees it: the physical root mounted at `/sysroot`,
    /// `/ostree` a symlink to `sysroot/ostree`, and `/boot` (a mount on a real host; a
    /// symlink here) showing `sysroot/boot`.
    pub fn booted_layout(stateroot: &str) -> Self {
        let sysroot = Self::init(stateroot, "/sysroot");
        std::os::unix::fs::symlink("sysroot/ostree", sysroot.path("/ostree")).unwrap();
        std::os::unix::fs::symlink("sysroot/boot", sysroot.path("/boot")).unwrap();
        sysroot
    }

    fn init(stateroot: &str, physical: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let sysroot = OstreeSysroot {
            dir,
            root,
            stateroot: stateroot.to_string(),
            sysroot: PathBuf::from(physical),
        };
        fs::create_dir_all(sysroot.path(physical)).unwrap();
        sysroot.ostree(&["admin", "init-fs", "--modern", &sysroot.path_str()]);
        sysroot.ostree(&[
            "admin",
            "os-init",
            &format!("--sysroot={}", sysroot.path_str()),
            stateroot,
        ]);
        sysroot
    }

    /// Resolve a host path under the sysroot.
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        self.root.join(host_path)
    }

    /// The physical sysroot's path on this machine, for `--sysroot=`.
    fn path_str(&self) -> String {
        self.path(&self.sysroot).display().to_string()
    }

    /// Commit an OS tree whose kernel is `kernel_release` (`usr/lib/modules/<kver>/vmlinuz`
    /// and `initramfs.img`, as Fedora CoreOS ships them); returns the commit checksum.
    pub fn commit_kernel(&self, kernel_release: &str) -> String {
        self.commit_tree(|tree| {
            let modules = tree.join("usr/lib/modules").join(kernel_release);
            write(
                &modules.join("vmlinuz"),
                format!("kernel {kernel_release}\n"),
            );
            write(
                &modules.join("initramfs.img"),
                format!("initramfs {kernel_release}\n"),
            );
            write(&modules.join("modules.dep"), "");
        })
    }

    /// Commit an OS tree in the layout older ostree systems used: the kernel only in
    /// `usr/lib/ostree-boot/vmlinuz-<kver>-<bootcsum>`, no `usr/lib/modules` at all. ostree
    /// still deploys it.
    pub fn commit_legacy_kernel(&self, kernel_release: &str) -> String {
        self.commit_tree(|tree| {
            use sha2::{Digest, Sha256};
            let kernel = format!("kernel {kernel_release}\n");
            let initramfs = format!("initramfs {kernel_release}\n");
            let bootcsum = hex::encode(Sha256::digest(format!("{kernel}{initramfs}")));
            let boot = tree.join("usr/lib/ostree-boot");
            write(
                &boot.join(format!("vmlinuz-{kernel_release}-{bootcsum}")),
                kernel,
            );
            write(
                &boot.join(format!("initramfs-{kernel_release}.img-{bootcsum}")),
                initramfs,
            );
        })
    }

    /// Commit the tree `fill` writes (plus the os-release and `usr/etc` every ostree OS has)
    /// to the branch `<stateroot>/stable`; returns the commit checksum.
    pub fn commit_tree(&self, fill: impl FnOnce(&Path)) -> String {
        let tree = tempfile::tempdir().unwrap();
        write(
            &tree.path().join("usr/lib/os-release"),
            "NAME=\"Fedora Linux\"\nID=fedora\nVERSION_ID=41\nVARIANT_ID=coreos\n",
        );
        fs::create_dir_all(tree.path().join("usr/etc")).unwrap();
        fill(tree.path());
        let out = self.ostree(&[
            &format!("--repo={}", self.path("/ostree/repo").display()),
            "commit",
            &format!("--branch={}/stable", self.stateroot),
            &format!("--tree=dir={}", tree.path().display()),
        ]);
        out.trim().to_string()
    }

    /// `ostree admin deploy`: the commit becomes the new default deployment (index 0).
    pub fn deploy(&self, commit: &str) -> Deployed {
        self.deploy_with(commit, &[])
    }

    /// `ostree admin deploy --not-as-default`: added after the current default.
    pub fn deploy_not_as_default(&self, commit: &str) -> Deployed {
        self.deploy_with(commit, &["--not-as-default"])
    }

    fn deploy_with(&self, commit: &str, flags: &[&str]) -> Deployed {
        let before = self.deployment_names();
        let sysroot = format!("--sysroot={}", self.path_str());
        let os = format!("--os={}", self.stateroot);
        let mut args = vec![
            "admin",
            "deploy",
            &sysroot,
            &os,
            "--retain",
            "--karg=root=/dev/vda",
        ];
        args.extend_from_slice(flags);
        args.push(commit);
        self.ostree(&args);
        let new: Vec<String> = self
            .deployment_names()
            .difference(&before)
            .cloned()
            .collect();
        assert_eq!(new.len(), 1, "one new deployment, found {new:?}");
        parse_name(&new[0])
    }

    /// `ostree admin undeploy <index>`.
    pub fn undeploy(&self, index: usize) {
        self.ostree(&[
            "admin",
            "undeploy",
            &format!("--sysroot={}", self.path_str()),
            &index.to_string(),
        ]);
    }

    /// Stage `commit` as libostree does on a booted host: check it out as a new deployment
    /// directory with its `.origin`, then record it in `/run/ostree/staged-deployment` with
    /// [`staged_record`]. No bootloader entry names it until it is finalized.
    pub fn stage(&self, commit: &str) -> Deployed {
        let serial = (0..)
            .find(|serial| {
                !self
                    .deploy_dir()
                    .join(format!("{commit}.{serial}"))
                    .exists()
            })
            .unwrap();
        let deployed = Deployed {
            csum: commit.to_string(),
            serial,
        };
        let dir = self.deploy_dir().join(deployed.name());
        self.ostree(&[
            &format!("--repo={}", self.path("/ostree/repo").display()),
            "checkout",
            commit,
            &dir.display().to_string(),
        ]);
        write(
            &self
                .deploy_dir()
                .join(format!("{}.origin", deployed.name())),
            format!("[origin]\nrefspec={}/stable\n", self.stateroot),
        );
        self.write_staged_record(&staged_record(&StagedRecord {
            name: deployed.name(),
            osname: self.stateroot.clone(),
            bootcsum: bootcsum_placeholder(commit),
            locked: None,
        }));
        deployed
    }

    /// Write `/run/ostree/staged-deployment` as libostree does (whole file replaced).
    pub fn write_staged_record(&self, bytes: &[u8]) {
        let path = self.path("/run/ostree/staged-deployment");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, bytes).unwrap();
        fs::rename(tmp, path).unwrap();
    }

    /// The stateroot's deployment directory names (`<csum>.<serial>`).
    pub fn deployment_names(&self) -> BTreeSet<String> {
        match fs::read_dir(self.deploy_dir()) {
            Ok(listing) => listing
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.ends_with(".origin"))
                .collect(),
            Err(_) => BTreeSet::new(),
        }
    }

    /// `/ostree/deploy/<stateroot>/deploy` under the root.
    pub fn deploy_dir(&self) -> PathBuf {
        self.path(format!("/ostree/deploy/{}/deploy", self.stateroot))
    }

    /// `ostree admin status`, for assertion messages.
    pub fn status(&self) -> String {
        self.ostree(&["admin", "status", &format!("--sysroot={}", self.path_str())])
    }

    /// Run the ostree CLI; panics with its stderr when it fails.
    pub fn ostree(&self, args: &[&str]) -> String {
        let out = Command::new("ostree")
            .args(args)
            // Deployments are made immutable (chattr +i) by default, which would keep the temp
            // dir from being removed; this is ostree's own switch for test sysroots.
            .env("OSTREE_SYSROOT_DEBUG", "mutable-deployments")
            .output()
            .expect("the ostree CLI (Debian package ostree; scripts/setup installs it)");
        assert!(
            out.status.success(),
            "ostree {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn parse_name(name: &str) -> Deployed {
    let (csum, serial) = name.split_once('.').unwrap();
    Deployed {
        csum: csum.to_string(),
        serial: serial.parse().unwrap(),
    }
}

/// A stand-in for the boot checksum libostree computes over the kernel and initramfs; the
/// readers only carry it along.
fn bootcsum_placeholder(commit: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("boot {commit}")))
}

fn write(path: &Path, contents: impl AsRef<[u8]>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// What libostree records about a staged deployment (`ostree_sysroot_stage_tree_with_options`
/// in ostree-sysroot-deploy.c): `{'target': <{'name': <s>, 'osname': <s>, 'bootcsum': <s>}>}`,
/// plus `'locked': <b>` when staged with `--lock-finalization` on ostree ≥ 2023.8.
#[derive(Clone, Debug)]
pub struct StagedRecord {
    pub name: String,
    pub osname: String,
    pub bootcsum: String,
    pub locked: Option<bool>,
}

/// The record's bytes in GVariant serialisation, keys in libostree's order. Written by hand
/// here so the tests need no glib with the `ostree` feature off; with it on,
/// `staged_record_glib` builds the same value with glib and a test checks the bytes agree.
pub fn staged_record(record: &StagedRecord) -> Vec<u8> {
    let target = gvariant::vardict(&[
        ("name", gvariant::string_variant(&record.name)),
        ("osname", gvariant::string_variant(&record.osname)),
        ("bootcsum", gvariant::string_variant(&record.bootcsum)),
    ]);
    let mut top = vec![("target", gvariant::variant(&target, "a{sv}"))];
    if let Some(locked) = record.locked {
        top.push(("locked", gvariant::variant(&[u8::from(locked)], "b")));
    }
    gvariant::vardict(&top)
}

/// [`staged_record`] built by glib, the way libostree builds it (`GVariantBuilder` of `a{sv}`).
#[cfg(feature = "ostree")]
pub fn staged_record_glib(record: &StagedRecord) -> Vec<u8> {
    use ::ostree::glib::{Variant, VariantTy};
    use ::ostree::prelude::ToVariant;
    let vardict = |entries: &[(&str, Variant)]| {
        Variant::array_from_iter_with_type(
            VariantTy::new("{sv}").unwrap(),
            entries
                .iter()
                .map(|(k, v)| Variant::from_dict_entry(&k.to_variant(), &Variant::from_variant(v))),
        )
    };
    let target = vardict(&[
        ("name", record.name.to_variant()),
        ("osname", record.osname.to_variant()),
        ("bootcsum", record.bootcsum.to_variant()),
    ]);
    let mut top = vec![("target", target)];
    if let Some(locked) = record.locked {
        top.push(("locked", locked.to_variant()));
    }
    vardict(&top).data().to_vec()
}

/// Just enough of a GVariant *writer* for the staged record (the reader under test is in
/// src/watch/ostree/gvariant.rs; this is written from the serialisation spec independently).
mod gvariant {
    /// Serialised `v`: the value, a NUL, the type string.
    pub fn variant(value: &[u8], type_string: &str) -> Vec<u8> {
        let mut out = value.to_vec();
        out.push(0);
        out.extend_from_slice(type_string.as_bytes());
        out
    }

    pub fn string_variant(s: &str) -> Vec<u8> {
        let mut value = s.as_bytes().to_vec();
        value.push(0);
        variant(&value, "s")
    }

    /// Serialised `a{sv}` from (key, serialised `v`) pairs.
    pub fn vardict(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for (key, value) in entries {
            pad_to(&mut out, 8);
            let start = out.len();
            let mut entry = key.as_bytes().to_vec();
            entry.push(0);
            let key_end = entry.len();
            pad_to(&mut entry, 8);
            entry.extend_from_slice(value);
            append_offsets(&mut entry, &[key_end]);
            out.extend_from_slice(&entry);
            ends.push(out.len());
            debug_assert!(start % 8 == 0);
        }
        append_offsets(&mut out, &ends);
        out
    }

    fn pad_to(buf: &mut Vec<u8>, alignment: usize) {
        while !buf.len().is_multiple_of(alignment) {
            buf.push(0);
        }
    }

    /// Append framing offsets, choosing the smallest width that addresses the whole container
    /// (the width depends on the final size, which depends on the width).
    fn append_offsets(buf: &mut Vec<u8>, offsets: &[usize]) {
        if offsets.is_empty() {
            return;
        }
        let width = [1usize, 2, 4, 8]
            .into_iter()
            .find(|w| {
                let total = buf.len() + w * offsets.len();
                *w == 8 || total < (1usize << (8 * w))
            })
            .unwrap();
        for &offset in offsets {
            match width {
                1 => buf.push(u8::try_from(offset).unwrap()),
                2 => buf.extend_from_slice(&u16::try_from(offset).unwrap().to_ne_bytes()),
                4 => buf.extend_from_slice(&u32::try_from(offset).unwrap().to_ne_bytes()),
                _ => buf.extend_from_slice(&(offset as u64).to_ne_bytes()),
            }
        }
    }
}

//! Will the kernel the overlay is staged for accept unsigned modules? Checked at stage time,
//! so an overlay whose modules the next kernel would refuse is refused now, not at boot.
//!
//! The target enforces module signatures when its command line has `module.sig_enforce=1`,
//! when it was built with `CONFIG_MODULE_SIG_FORCE=y`, or when the host runs in lockdown or
//! with Secure Boot on (both persist across a reboot into the next kernel). The command line
//! is the running one: kernel arguments carry over to the next deployment on every supported
//! OS unless an update changes them.

use std::fs;
use std::path::Path;

use crate::host::kernel::{parse_lockdown, LOCKDOWN};
use crate::host::Root;

/// The running kernel's command line, read as the target's (see the module docs).
pub const PROC_CMDLINE: &str = "/proc/cmdline";
/// The EFI `SecureBoot` variable (4 bytes of attributes, then 1 when on).
pub const SECURE_BOOT_VAR: &str =
    "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// What is known about the target kernel's signature policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetFacts {
    /// The kernel command line (`/proc/cmdline`); empty when unreadable.
    pub cmdline: String,
    /// The kernel's build config (`/usr/lib/modules/<kver>/config`), when found.
    pub kconfig: Option<String>,
    /// The active lockdown mode (`integrity`, `confidentiality`), or `None` when it is `none`
    /// or the lockdown file is absent.
    pub lockdown: Option<String>,
    /// Whether the EFI `SecureBoot` variable says Secure Boot is on.
    pub secure_boot: bool,
}

impl TargetFacts {
    /// Read the facts for `kernel_release` from the host under `root`; what is missing counts
    /// as not enforcing. `module_tree` is where the target's modules are when that is not the
    /// running root's `/usr/lib/modules/<kver>` (an ostree host: the staged or pending
    /// deployment's tree, a host path); its `config` is read first.
    pub fn read(root: &Root, kernel_release: &str, module_tree: Option<&Path>) -> TargetFacts {
        let read = |path: &str| fs::read(root.join(path)).ok();
        let text = |path: &str| read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
        let in_tree = module_tree.map(|tree| tree.join("config").to_string_lossy().into_owned());
        let kconfig = in_tree
            .into_iter()
            .chain([
                format!("/usr/lib/modules/{kernel_release}/config"),
                format!("/lib/modules/{kernel_release}/config"),
                format!("/boot/config-{kernel_release}"),
            ])
            .find_map(|p| text(&p));
        TargetFacts {
            cmdline: text(PROC_CMDLINE).unwrap_or_default(),
            kconfig,
            lockdown: text(LOCKDOWN).and_then(|t| parse_lockdown(&t)),
            secure_boot: read(SECURE_BOOT_VAR).is_some_and(|b| b.get(4) == Some(&1)),
        }
    }
}

/// Why the target kernel only loads signed modules, or `None` when it loads any.
pub fn enforcement_reason(facts: &TargetFacts) -> Option<String> {
    let karg = facts
        .cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("module.sig_enforce="))
        .next_back();
    if matches!(karg, Some("1" | "y" | "Y")) {
        return Some("its command line has module.sig_enforce=1".into());
    }
    if facts.kconfig.as_deref().is_some_and(|config| {
        config
            .lines()
            .any(|line| line.trim() == "CONFIG_MODULE_SIG_FORCE=y")
    }) {
        return Some("it is built with CONFIG_MODULE_SIG_FORCE=y".into());
    }
    if let Some(mode) = &facts.lockdown {
        return Some(format!("the host runs in kernel lockdown ({mode})"));
    }
    if facts.secure_boot {
        return Some("the host boots with Secure Boot on (the kernel locks down)".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fact_enforces_on_its_own() {
        assert_eq!(enforcement_reason(&TargetFacts::default()), None);
        let facts = |f: fn(&mut TargetFacts)| {
            let mut facts = TargetFacts {
                cmdline: "root=/dev/vda1 module.sig_enforce=0".into(),
                kconfig: Some("CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n".into()),
                ..TargetFacts::default()
            };
            f(&mut facts);
            enforcement_reason(&facts)
        };
        assert_eq!(facts(|_| {}), None);
        assert!(facts(|f| f.cmdline.push_str(" module.sig_enforce=1"))
            .unwrap()
            .contains("sig_enforce"));
        assert!(
            facts(|f| f.kconfig = Some("CONFIG_MODULE_SIG_FORCE=y\n".into()))
                .unwrap()
                .contains("SIG_FORCE")
        );
        assert!(facts(|f| f.lockdown = Some("integrity".into()))
            .unwrap()
            .contains("lockdown"));
        assert!(facts(|f| f.secure_boot = true)
            .unwrap()
            .contains("Secure Boot"));
    }

    #[test]
    fn secure_boot_variable_and_kernel_config_are_read_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let put = |path: &str, bytes: &[u8]| {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        };
        assert_eq!(
            TargetFacts::read(&root, "6.1.0", None),
            TargetFacts::default()
        );
        put(SECURE_BOOT_VAR, &[6, 0, 0, 0, 1]);
        put(
            "/usr/lib/modules/6.1.0/config",
            b"CONFIG_MODULE_SIG_FORCE=y\n",
        );
        let facts = TargetFacts::read(&root, "6.1.0", None);
        assert!(facts.secure_boot);
        assert!(facts.kconfig.is_some());
    }

    /// On ostree the next kernel's tree (and its `config`) is in the staged deployment, not in
    /// the running root's /usr/lib/modules.
    #[test]
    fn the_kernel_config_is_read_from_the_next_deployments_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let tree = Path::new("/ostree/deploy/fedora-coreos/deploy/abc.0/usr/lib/modules/6.12.0");
        fs::create_dir_all(root.join(tree)).unwrap();
        fs::write(
            root.join(tree).join("config"),
            "CONFIG_MODULE_SIG_FORCE=y\n",
        )
        .unwrap();
        assert_eq!(TargetFacts::read(&root, "6.12.0", None).kconfig, None);
        let facts = TargetFacts::read(&root, "6.12.0", Some(tree));
        assert!(enforcement_reason(&facts).is_some_and(|r| r.contains("CONFIG_MODULE_SIG_FORCE")));
    }
}

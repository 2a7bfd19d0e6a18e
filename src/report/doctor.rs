//! `nvdriver-agent doctor`: read-only checks of everything the driver needs, one verdict per
//! line with what to do. [`gather`] reads the host (and asks each HTTP source for its head);
//! [`diagnose`] judges, purely. Nothing is ever written.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::app::{CommandError, Context};
use crate::config::Settings;
use crate::host::keyring::{self, KeyTrust};
use crate::host::{HostFacts, KernelState, Root};
use crate::watch::{self, flatcar::UpdateEngineState, Family, NextBoot};

const LOCKDOWN: &str = "/sys/kernel/security/lockdown";
const SECURE_BOOT_VAR: &str =
    "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";
const IOMMU_CLASS: &str = "/sys/class/iommu";
const FIRMWARE_PATH: &str = "/sys/module/firmware_class/parameters/path";
const MODPROBE_DIRS: [&str; 3] = ["/etc/modprobe.d", "/run/modprobe.d", "/usr/lib/modprobe.d"];
/// How long one source may take to answer a HEAD request.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(5);

/// How one check came out; `doctor` exits non-zero when any check fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Nothing to do.
    Ok,
    /// Works now, but something may go wrong (e.g. on the next boot); the detail says what to do.
    Warn,
    /// Broken now; the detail says what to do.
    Fail,
}

/// One line of `doctor`'s output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// How it came out.
    pub verdict: Verdict,
    /// What was checked (`os`, `kernel`, `nouveau`, …).
    pub what: &'static str,
    /// What was found and, unless ok, what to do.
    pub detail: String,
}

/// What a source answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceProbe {
    /// A directory or file that exists.
    Present,
    /// Nothing exists at that path under the root.
    Absent,
    /// An HTTP status code.
    Http(u16),
    /// The HTTP(S) HEAD request failed (DNS, connection, TLS, timeout); the error text.
    Unreachable(String),
}

/// Everything the checks judge.
#[derive(Clone, Debug, Default)]
pub struct DoctorFacts {
    /// The OS's `PRETTY_NAME` (or its `ID` when there is none).
    pub os_pretty: String,
    /// The OS family whose detector watches for the next kernel; `None` when watching is off.
    pub family: Option<Family>,
    /// The running kernel's release.
    pub kernel_release: String,
    /// Whether `/usr/lib/modules/<running kernel>` exists.
    pub module_tree: bool,
    /// The kernel the host boots next, when it differs from the running one.
    pub pending: Option<NextBoot>,
    /// Why the next kernel could not be read, if it could not.
    pub pending_error: Option<String>,
    /// `[none] integrity confidentiality` style, when the file exists.
    pub lockdown: Option<String>,
    /// Whether `module.sig_enforce` is on.
    pub sig_enforce: bool,
    /// Secure Boot per its EFI variable; `None` without one (no EFI, or efivarfs not mounted).
    pub secure_boot: Option<bool>,
    /// Whether nouveau is loaded now.
    pub nouveau_loaded: bool,
    /// The modprobe.d file that blacklists nouveau, if any.
    pub nouveau_blacklisted_in: Option<PathBuf>,
    /// How many IOMMU units `/sys/class/iommu` lists.
    pub iommu_units: usize,
    /// `firmware_class.path`, empty when unset.
    pub firmware_path: String,
    /// The NVIDIA driver version loaded now, if any.
    pub loaded_driver: Option<String>,
    /// Which of `/dev/nvidiactl`, `/dev/nvidia-uvm` and `/dev/nvidia0` exist.
    pub dev_nodes: Vec<String>,
    /// `[nvidia-container-cli] root` in the toolkit config; `None` when absent, `Some(None)`
    /// when the file has no such key.
    pub toolkit_root: Option<Option<String>>,
    /// `toolkit.manage`: whether the agent keeps the toolkit config pointed at the driver root.
    pub manage_toolkit: bool,
    /// The driver root the toolkit config should name (the configured `driver-root`).
    pub expected_driver_root: PathBuf,
    /// The toolkit config file, as a host path.
    pub toolkit_config: PathBuf,
    /// The store's inventory: each kernel release with its driver versions.
    pub store: Vec<(String, Vec<String>)>,
    /// Why the store could not be read, if it could not.
    pub store_error: Option<String>,
    /// (source as configured, as expanded, probe).
    pub sources: Vec<(String, String, SourceProbe)>,
    /// Each module of the running kernel's overlay and whether the kernel trusts its key.
    pub module_keys: Vec<ModuleKey>,
}

/// One overlay module's signing key, judged against the running kernel's trusted keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleKey {
    /// The module file, relative to the overlay.
    pub module: String,
    /// `signer "CN", key serial …`; `None` for an unsigned module.
    pub signer: Option<String>,
    /// The verdict; `None` when unsigned, unreadable, or when `/proc/keys` names no trusted
    /// keyring.
    pub trust: Option<KeyTrust>,
    /// Why the module file could not be read, if it could not.
    pub error: Option<String>,
}

/// Read everything; writes nothing.
pub fn gather(ctx: &Context) -> Result<DoctorFacts, CommandError> {
    let root = &ctx.root;
    let settings = &ctx.settings;
    let host = HostFacts::read(root)?;
    let kernel = KernelState::read(root, &host.kernel_release)?;
    let family = watch::choose(settings.detector, root, &host.os);
    let (pending, pending_error) = match family {
        Some(Family::Flatcar) => (crate::state::AgentState::read(root).pending, None),
        Some(family) => match watch::next_boot(
            root,
            family,
            &host.kernel_release,
            UpdateEngineState::Unknown,
        ) {
            Ok(next) => (next, None),
            Err(e) => (None, Some(e.to_string())),
        },
        None => (None, None),
    };
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    let secure_boot = std::fs::read(root.join(SECURE_BOOT_VAR))
        .ok()
        .and_then(|bytes| bytes.last().copied())
        .map(|b| b == 1);
    let nouveau_blacklisted_in = MODPROBE_DIRS.iter().find_map(|dir| {
        let entries = std::fs::read_dir(root.join(dir)).ok()?;
        entries.flatten().find_map(|entry| {
            let text = std::fs::read_to_string(entry.path()).ok()?;
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["blacklist", "nouveau"])
                .then(|| Path::new(dir).join(entry.file_name()))
        })
    });
    let dev_nodes = ["nvidiactl", "nvidia-uvm", "nvidia0"]
        .iter()
        .filter(|n| root.join("/dev").join(n).exists())
        .map(|n| format!("/dev/{n}"))
        .collect();
    let toolkit_root = read(&settings.toolkit_config.to_string_lossy()).map(|text| {
        text.parse::<toml::Table>().ok().and_then(|t| {
            t.get("nvidia-container-cli")?
                .get("root")?
                .as_str()
                .map(String::from)
        })
    });
    let (store, store_error) = match ctx.store().inventory() {
        Ok(store) => (store, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let driver_version = settings
        .driver_version
        .clone()
        .or_else(|| kernel.is_loaded("nvidia").and_then(|m| m.version.clone()))
        .or_else(|| store.iter().flat_map(|(_, d)| d.iter()).last().cloned())
        .unwrap_or_default();
    let target_kernel = pending
        .as_ref()
        .map(|n| n.kernel_release.clone())
        .unwrap_or_else(|| host.kernel_release.clone());
    let sources = settings
        .stage
        .sources
        .iter()
        .map(|template| {
            let expanded = template
                .replace("{kernel}", &target_kernel)
                .replace("{driver}", &driver_version)
                .replace("{arch}", &host.arch);
            let probe = probe_source(root, &expanded);
            (template.clone(), expanded, probe)
        })
        .collect();
    let module_keys = module_keys(ctx, &host.kernel_release, &kernel);
    Ok(DoctorFacts {
        os_pretty: host
            .os
            .pretty_name
            .clone()
            .unwrap_or_else(|| host.os.id.clone()),
        family,
        module_tree: root
            .join(Path::new("/usr/lib/modules").join(&host.kernel_release))
            .is_dir(),
        kernel_release: host.kernel_release.clone(),
        pending,
        pending_error,
        lockdown: read(LOCKDOWN).map(|s| s.trim().to_string()),
        sig_enforce: kernel.sig_enforce,
        secure_boot,
        nouveau_loaded: kernel.is_loaded("nouveau").is_some(),
        nouveau_blacklisted_in,
        iommu_units: std::fs::read_dir(root.join(IOMMU_CLASS))
            .map(|d| d.count())
            .unwrap_or(0),
        firmware_path: read(FIRMWARE_PATH)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        loaded_driver: kernel.is_loaded("nvidia").and_then(|m| m.version.clone()),
        dev_nodes,
        toolkit_root,
        manage_toolkit: settings.manage_toolkit,
        expected_driver_root: expected_driver_root(settings),
        toolkit_config: settings.toolkit_config.clone(),
        store,
        store_error,
        sources,
        module_keys,
    })
}

/// The running kernel's overlay's modules, each with its signer and the kernel's verdict.
fn module_keys(ctx: &Context, kernel_release: &str, kernel: &KernelState) -> Vec<ModuleKey> {
    let pinned = ctx.settings.driver_version.as_deref();
    let Ok(Some(overlay)) = ctx.store().select(kernel_release, pinned) else {
        return Vec::new();
    };
    overlay
        .manifest
        .module_files()
        .map(|entry| {
            let module = entry.path.display().to_string();
            let path = ctx.root.join(overlay.dir.join(&entry.path));
            match crate::modinfo::read_module_file(&path) {
                Ok(info) => ModuleKey {
                    module,
                    signer: info.signature.as_ref().map(keyring::describe_signer),
                    trust: info
                        .signature
                        .as_ref()
                        .zip(kernel.trusted_keys.as_ref())
                        .map(|(sig, keys)| keyring::signer_trust(sig, keys)),
                    error: None,
                },
                Err(e) => ModuleKey {
                    module,
                    signer: None,
                    trust: None,
                    error: Some(e.to_string()),
                },
            }
        })
        .collect()
}

fn expected_driver_root(settings: &Settings) -> PathBuf {
    settings.driver_root.clone()
}

/// A directory or archive path under the root, or an HTTP(S) HEAD.
fn probe_source(root: &Root, source: &str) -> SourceProbe {
    if source.starts_with("http://") || source.starts_with("https://") {
        let agent = crate::overlay::source::http::http_agent(false, Some(SOURCE_TIMEOUT));
        match agent.head(source).call() {
            Ok(response) => SourceProbe::Http(response.status().as_u16()),
            Err(e) => SourceProbe::Unreachable(e.to_string()),
        }
    } else if root.join(source).exists() {
        SourceProbe::Present
    } else {
        SourceProbe::Absent
    }
}

/// Judge the facts; pure.
pub fn diagnose(f: &DoctorFacts) -> Vec<Check> {
    let mut checks = Checks(Vec::new());
    for group in [
        os_checks,
        pending_checks,
        signing_checks,
        gpu_checks,
        toolkit_checks,
        store_checks,
    ] {
        group(f, &mut checks);
    }
    checks.0
}

/// The checks so far, in the order they are shown.
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, verdict: Verdict, what: &'static str, detail: String) {
        self.0.push(Check {
            verdict,
            what,
            detail,
        })
    }
}

/// Whether the store holds an overlay for `kernel`.
fn staged_for(f: &DoctorFacts, kernel: &str) -> bool {
    f.store.iter().any(|(k, d)| k == kernel && !d.is_empty())
}

/// The OS and its detector, and the running kernel's module tree.
fn os_checks(f: &DoctorFacts, c: &mut Checks) {
    use Verdict::*;
    match f.family {
        Some(family) => c.add(Ok, "os", format!("{} (watching with the {family:?} detector)", f.os_pretty)),
        None => c.add(Warn, "os", format!("{}: watching for kernel updates is off (watch.detector = \"off\"); the next kernel's overlay is not staged before reboots", f.os_pretty)),
    }
    if f.module_tree {
        c.add(Ok, "kernel", f.kernel_release.clone());
    } else {
        c.add(Warn, "kernel", format!("{}: /usr/lib/modules/{} is missing; the OS modules NVIDIA needs (i2c_core, ipmi_msghandler) cannot be loaded from it", f.kernel_release, f.kernel_release));
    }
}

/// The kernel the next boot runs, and whether its overlay is staged.
fn pending_checks(f: &DoctorFacts, c: &mut Checks) {
    use Verdict::*;
    match (&f.pending, &f.pending_error) {
        (_, Some(e)) => c.add(
            Warn,
            "pending kernel",
            format!("cannot tell which kernel boots next: {e}"),
        ),
        (None, None) => c.add(
            Ok,
            "pending kernel",
            "none: the next boot runs this kernel".into(),
        ),
        (Some(next), None) if staged_for(f, &next.kernel_release) => c.add(
            Ok,
            "pending kernel",
            format!(
                "{} (from {}): overlay staged",
                next.kernel_release, next.origin
            ),
        ),
        (Some(next), None) => c.add(
            Warn,
            "pending kernel",
            format!(
                "{} (from {}): no overlay staged; run `nvdriver-agent stage --now`",
                next.kernel_release, next.origin
            ),
        ),
    }
}

/// Whether the kernel loads only signed modules, and why.
fn signing_checks(f: &DoctorFacts, c: &mut Checks) {
    use Verdict::*;
    let lockdown = f
        .lockdown
        .as_deref()
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with('[')))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string());
    let enforcing = f.sig_enforce
        || f.secure_boot == Some(true)
        || lockdown.as_deref().is_some_and(|l| l != "none");
    let why = format!(
        "Secure Boot {}, lockdown {}, module.sig_enforce {}",
        match f.secure_boot {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown (no EFI variable)",
        },
        lockdown.as_deref().unwrap_or("unknown"),
        if f.sig_enforce { "Y" } else { "N" }
    );
    if enforcing {
        c.add(Warn, "module signing", format!("{why}: the kernel only loads signed modules; use overlays whose modules are signed with a key the kernel trusts (`nvdriver-agent plan` shows which are signed)"));
    } else {
        c.add(Ok, "module signing", why);
    }
    for key in &f.module_keys {
        module_key_check(key, enforcing, c);
    }
}

/// One overlay module's key: trusted, not trusted, or cannot tell (and why).
fn module_key_check(key: &ModuleKey, enforcing: bool, c: &mut Checks) {
    use Verdict::*;
    let module = &key.module;
    if let Some(error) = &key.error {
        c.add(
            Fail,
            "module key",
            format!("{module}: cannot be read: {error}"),
        );
        return;
    }
    let Some(signer) = &key.signer else {
        let verdict = if enforcing { Fail } else { Ok };
        c.add(
            verdict,
            "module key",
            format!(
                "{module}: unsigned{}",
                if enforcing {
                    "; the kernel refuses it: use signed modules"
                } else {
                    " (signatures are not enforced)"
                }
            ),
        );
        return;
    };
    match &key.trust {
        Some(KeyTrust::Trusted(by)) => c.add(Ok, "module key", format!("{module}: trusted ({signer}: {by})")),
        Some(KeyTrust::NotTrusted(why)) if enforcing => c.add(Fail, "module key", format!("{module}: not trusted: {why}; the kernel refuses it: enroll its key (`mokutil --import CERT.der`) or use modules signed by a trusted key")),
        Some(KeyTrust::NotTrusted(why)) => c.add(Warn, "module key", format!("{module}: not trusted: {why}; it loads only because signatures are not enforced (and taints the kernel)")),
        Some(KeyTrust::CannotTell(why)) => c.add(Warn, "module key", format!("{module}: cannot tell whether it is trusted: {why}")),
        None => c.add(Warn, "module key", format!("{module}: cannot tell whether it is trusted: {signer}; /proc/keys names no trusted keyring")),
    }
}

/// nouveau, the IOMMU, the firmware path and the loaded driver.
fn gpu_checks(f: &DoctorFacts, c: &mut Checks) {
    use Verdict::*;
    match (f.nouveau_loaded, &f.nouveau_blacklisted_in) {
        (true, _) => c.add(Fail, "nouveau", "nouveau is loaded and holds the GPU; blacklist it (`echo blacklist nouveau > /etc/modprobe.d/blacklist-nouveau.conf`, or the kernel argument `modprobe.blacklist=nouveau`) and reboot".into()),
        (false, Some(file)) => c.add(Ok, "nouveau", format!("not loaded, blacklisted in {}", file.display())),
        (false, None) => c.add(Warn, "nouveau", "not loaded, but not blacklisted either; it may claim the GPU on a later boot: add `blacklist nouveau` to /etc/modprobe.d/".into()),
    }
    if f.iommu_units > 0 {
        c.add(
            Ok,
            "iommu",
            format!("{} IOMMU unit(s) in /sys/class/iommu", f.iommu_units),
        );
    } else {
        c.add(Ok, "iommu", "no IOMMU active (only GPU passthrough to VMs needs one: intel_iommu=on / amd_iommu=on)".into());
    }
    c.add(
        Ok,
        "firmware path",
        if f.firmware_path.is_empty() {
            "firmware_class.path is unset: the kernel searches /lib/firmware only (load sets it to the overlay's firmware)".into()
        } else {
            format!("firmware_class.path = {}", f.firmware_path)
        },
    );
    match (&f.loaded_driver, f.dev_nodes.iter().any(|n| n == "/dev/nvidiactl")) {
        (Some(v), true) => c.add(Ok, "driver", format!("{v} loaded; device nodes {}", f.dev_nodes.join(", "))),
        (Some(v), false) => c.add(Fail, "driver", format!("{v} loaded but /dev/nvidiactl is missing; run `nvdriver-agent load` to create the device nodes")),
        (None, _) => c.add(Warn, "driver", "not loaded; `nvdriver-agent plan` shows what `load` would do".into()),
    }
}

/// The container toolkit's `[nvidia-container-cli] root`.
fn toolkit_checks(f: &DoctorFacts, c: &mut Checks) {
    use Verdict::*;
    let expected = f.expected_driver_root.display().to_string();
    match (&f.toolkit_root, f.manage_toolkit) {
        (_, false) => c.add(Ok, "toolkit config", format!("not managed (toolkit.manage = false); {} is left alone", f.toolkit_config.display())),
        (None, true) => c.add(Warn, "toolkit config", format!("{} does not exist; `nvdriver-agent load` creates it", f.toolkit_config.display())),
        (Some(Some(root)), true) if *root == expected || root == "/" => c.add(Ok, "toolkit config", format!("{} has [nvidia-container-cli] root = {root:?}", f.toolkit_config.display())),
        (Some(other), true) => c.add(Warn, "toolkit config", format!("{} has [nvidia-container-cli] root = {:?}, expected {expected:?} (or \"/\"); `nvdriver-agent load` sets it", f.toolkit_config.display(), other.as_deref().unwrap_or("unset"))),
    }
}

/// The store and every configured source.
fn store_checks(f: &DoctorFacts, c: &mut Checks) {
    use Verdict::*;
    match &f.store_error {
        Some(e) => c.add(Fail, "store", e.clone()),
        None if staged_for(f, &f.kernel_release) => c.add(Ok, "store", format!("overlay for the running kernel {}; {} kernel(s) in the store", f.kernel_release, f.store.len())),
        None => c.add(Fail, "store", format!("no overlay for the running kernel {} in the store; `nvdriver-agent stage --now --kernel {}` or `nvdriver-agent overlay import DIR`", f.kernel_release, f.kernel_release)),
    }
    if f.sources.is_empty() {
        c.add(Warn, "sources", "none configured ([stage] sources): overlays for new kernels can only be imported by hand".into());
    }
    for (template, expanded, probe) in &f.sources {
        match probe {
            SourceProbe::Present => c.add(Ok, "source", format!("{expanded} exists")),
            SourceProbe::Http(code) if (200..300).contains(code) => c.add(Ok, "source", format!("{expanded} answers {code}")),
            SourceProbe::Absent => c.add(Warn, "source", format!("{expanded} (from {template}) does not exist; the overlay for that kernel is not there (yet)")),
            SourceProbe::Http(code) => c.add(Warn, "source", format!("{expanded} answers HTTP {code}; the overlay for that kernel is not published there (yet)")),
            SourceProbe::Unreachable(e) => c.add(Fail, "source", format!("{expanded} is unreachable: {e}; check the network, proxy and the URL in [stage] sources")),
        }
    }
}

/// One line per check.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let verdict = match check.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        };
        let _ = writeln!(out, "{verdict}  {}: {}", check.what, check.detail);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(signer: Option<&str>, trust: Option<KeyTrust>) -> ModuleKey {
        ModuleKey {
            module: "usr/lib/modules/6.1/extra/nvidia.ko".into(),
            signer: signer.map(str::to_string),
            trust,
            error: None,
        }
    }

    fn lines(f: &DoctorFacts) -> Vec<(Verdict, String)> {
        diagnose(f)
            .into_iter()
            .filter(|c| c.what == "module key")
            .map(|c| (c.verdict, c.detail))
            .collect()
    }

    #[test]
    fn each_overlay_module_key_gets_a_line_with_its_verdict() {
        let mut f = DoctorFacts {
            sig_enforce: true,
            module_keys: vec![
                key(
                    Some("signer \"A\""),
                    Some(KeyTrust::Trusted("A: 01 in .machine".into())),
                ),
                key(
                    Some("signer \"B\""),
                    Some(KeyTrust::NotTrusted("B is none of …".into())),
                ),
                key(
                    Some("signer \"C\""),
                    Some(KeyTrust::CannotTell("ids of two kinds".into())),
                ),
                key(None, None),
            ],
            ..DoctorFacts::default()
        };
        let got = lines(&f);
        let verdicts: Vec<_> = got.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            verdicts,
            [Verdict::Ok, Verdict::Fail, Verdict::Warn, Verdict::Fail]
        );
        assert!(got[0].1.contains("trusted") && got[0].1.contains(".machine"));
        assert!(got[1].1.contains("not trusted") && got[1].1.contains("mokutil"));
        assert!(got[2].1.contains("cannot tell") && got[2].1.contains("two kinds"));
        assert!(got[3].1.contains("unsigned"));
        f.sig_enforce = false;
        let verdicts: Vec<_> = lines(&f).iter().map(|(v, _)| *v).collect();
        assert_eq!(
            verdicts,
            [Verdict::Ok, Verdict::Warn, Verdict::Warn, Verdict::Ok]
        );
    }
}

//! The measurements for `bench/scaling`: how the agent's cost grows with what it works on. Each
//! series builds fake hosts with the test fixtures (FakeHost, OverlayBuilder, fixture modules)
//! and times the library's own entry points, the ones the CLI calls, in this process (no
//! process start in the figures):
//!
//! - `plan-modules`: `Context::new` + `boot::load::prepare_load` (what `plan` does) on an overlay
//!   of N fixture modules, each needing the one before it (nvidia, then a chain);
//! - `load-modules`: `Context::new` + `boot::load::load` with the simulated kernel on a fresh
//!   copy of the same host (what `--simulate-kernel load` does; the copy is not timed), less
//!   the time inside the simulated `finit_module` (`LoadReport::module_init_micros`), as
//!   `bench/load-overhead` counts the agent's own work;
//! - `plan-mib`: `plan` on an overlay whose nvidia.ko carries N MiB of incompressible bytes;
//! - `gc-overlays`: `overlay gc` (`cli::overlay::overlay_gc`) on a store of N overlays, one per
//!   kernel, removing all but the running kernel's and `keep-extra = 1` newest other;
//! - `gc-scan`: the same with nothing to remove (`keep-extra` above N): listing and deciding;
//! - `detect-kernels`: `watch::next_boot` on a Debian-like host with N kernels in
//!   `/usr/lib/modules` and `/boot/vmlinuz-*`, no boot entries (GRUB);
//! - `detect-bls`: the same with N Boot Loader Specification entries in `/boot/loader/entries`,
//!   each naming a bzImage whose header the detector reads;
//! - `detect-ostree`: `watch::next_boot` (direct reader) on an ostree sysroot with N
//!   deployments and their N `ostree-*.conf` entries, laid out as `examples/demo-host.rs` does.
//!
//! Rounds alternate the sizes (round 1: every size, round 2: every size, ...), so a noisy
//! moment falls on all sizes alike. Prints one line per size: `POINT <series> <n> <median ms>
//! <min ms> <rounds>`.
//!
//! ```text
//! cargo run --release --example bench-scaling -- SERIES ROUNDS N...
//! ```
//!
//! Fake roots go under `$TMPDIR` (bench/scaling points it at /dev/shm): the figures are the
//! agent's work and syscalls, not a disk's.

// The examples use a few of the test fixtures, not all of them.
#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Instant;

use common::boot::bzimage_with_release;
use common::host::{FakeHost, STORE};
use common::modules::FixtureModule;
use common::overlay::{OverlayBuilder, Packing, DRIVER};
use nvdriver_agent::app::Context;
use nvdriver_agent::boot::load::{load, prepare_load, LoadOutcome, Prepared};
use nvdriver_agent::config::ConfigSource;
use nvdriver_agent::host::Root;
use nvdriver_agent::kmod::sys::SimulatedKernel;
use nvdriver_agent::watch::{self, flatcar::UpdateEngineState, Family};

const KVER: &str = "6.1.0-28-cloud-amd64";
const DEBIAN_OS_RELEASE: &str = "ID=debian\nVERSION_ID=12\nNAME=\"Debian GNU/Linux\"\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(series), Some(rounds)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bench-scaling SERIES ROUNDS N...");
        std::process::exit(2);
    };
    let rounds: usize = rounds.parse().expect("ROUNDS is a whole number");
    let sizes: Vec<usize> = args[2..]
        .iter()
        .map(|n| n.parse().expect("N is a whole number"))
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut setups: Vec<Setup> = sizes.iter().map(|&n| Setup::new(series, n)).collect();
    for _ in 0..rounds {
        for (setup, out) in setups.iter_mut().zip(&mut samples) {
            out.push(setup.measure());
        }
    }
    for (n, mut ms) in sizes.iter().zip(samples) {
        ms.sort_by(f64::total_cmp);
        println!(
            "POINT {series} {n} {:.4} {:.4} {}",
            ms[ms.len() / 2],
            ms[0],
            ms.len()
        );
    }
}

/// One size of one series: what was built once, and how one round is timed.
struct Setup {
    series: String,
    n: usize,
    /// The host built once (plan, detection), or the template copied per round (load, gc).
    host: FakeHost,
}

impl Setup {
    fn new(series: &str, n: usize) -> Setup {
        let host = match series {
            "plan-modules" | "load-modules" => module_host(n, 0),
            "plan-mib" => module_host(1, n),
            "gc-overlays" | "gc-scan" => {
                let host = generic_host(1);
                fill_store(host.dir.path(), n);
                host
            }
            "detect-kernels" => generic_host(n),
            "detect-bls" => bls_host(n),
            "detect-ostree" => ostree_host(n),
            _ => {
                eprintln!("unknown series {series:?}");
                std::process::exit(2);
            }
        };
        Setup {
            series: series.to_string(),
            n,
            host,
        }
    }

    /// One timed round, in milliseconds.
    fn measure(&mut self) -> f64 {
        match self.series.as_str() {
            "plan-modules" | "plan-mib" => timed(|| plan(self.host.dir.path())),
            "load-modules" => {
                let copy = copy_of(self.host.dir.path());
                let (total, module_init) = timed_value(|| load_simulated(copy.path()));
                total - module_init
            }
            "gc-overlays" => {
                let copy = copy_of(self.host.dir.path());
                let (ms, removed) = timed_value(|| gc(copy.path(), 1));
                assert_eq!(removed, self.n - 2, "overlays removed");
                ms
            }
            "gc-scan" => {
                let (ms, removed) = timed_value(|| gc(self.host.dir.path(), u32::MAX));
                assert_eq!(removed, 0, "overlays removed");
                ms
            }
            "detect-kernels" | "detect-bls" => {
                timed(|| detect(self.host.dir.path(), Family::Generic))
            }
            "detect-ostree" => timed(|| detect(self.host.dir.path(), Family::Ostree)),
            _ => unreachable!(),
        }
    }
}

fn timed(f: impl FnOnce()) -> f64 {
    timed_value(f).0
}

fn timed_value<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let start = Instant::now();
    let value = f();
    (start.elapsed().as_secs_f64() * 1000.0, value)
}

fn context(dir: &Path) -> Context {
    Context::new(Root::new(dir), &ConfigSource::Layered).expect("config")
}

/// What `nvdriver-agent plan` computes.
fn plan(dir: &Path) {
    let ctx = context(dir);
    let kernel = SimulatedKernel::new(ctx.root.clone());
    match prepare_load(&ctx, &kernel).expect("plan") {
        Prepared::Ready(prepared) => assert!(!prepared.plan.modules.is_empty()),
        Prepared::NoOverlay { .. } => panic!("no overlay"),
    }
}

/// What `nvdriver-agent --simulate-kernel load` does; returns the time spent in the simulated
/// `finit_module` (ms), which is not the agent's: the simulator re-reads its own growing
/// `/proc/modules` and `/proc/kallsyms` for every module.
fn load_simulated(dir: &Path) -> f64 {
    let ctx = context(dir);
    let mut kernel = SimulatedKernel::new(ctx.root.clone());
    match load(&ctx, &mut kernel).expect("load") {
        LoadOutcome::Loaded { report, .. } => {
            assert!(!report.loaded.is_empty());
            report.module_init_micros as f64 / 1000.0
        }
        LoadOutcome::NoOverlayWarned { .. } => panic!("no overlay"),
    }
}

/// What `nvdriver-agent overlay gc` does; returns how many overlays it removed.
fn gc(dir: &Path, keep_extra: u32) -> usize {
    let mut ctx = context(dir);
    ctx.settings.stage.keep_extra = keep_extra;
    nvdriver_agent::cli::overlay::overlay_gc(&ctx, &[])
        .expect("gc")
        .len()
}

/// What the daemon does after a watch event: read the next boot's kernel.
fn detect(dir: &Path, family: Family) {
    let next = watch::next_boot(&Root::new(dir), family, KVER, UpdateEngineState::Unknown)
        .expect("detect")
        .expect("a next kernel");
    assert_ne!(next.kernel_release, KVER);
}

/// A generic host running KVER whose store holds an overlay of `modules` fixture modules
/// (nvidia, then `nvx-1` needing nvidia, `nvx-2` needing `nvx-1`, ...: depends= and a symbol
/// each, as the real ones call each other), nvidia.ko padded with `mib` MiB of random bytes.
/// Every module is listed in `driver.modules`.
fn module_host(modules: usize, mib: usize) -> FakeHost {
    let host = FakeHost::new(KVER);
    let m = |name: &str| FixtureModule::new(name, KVER, DRIVER);
    let mut list = vec![(
        m("nvidia")
            .exports(&["nvx_0"])
            .imports(&["pci_register_driver", "__register_chrdev"])
            .padded(mib << 20, 0, 7),
        Packing::Plain,
    )];
    let mut names = vec!["nvidia".to_string()];
    for k in 1..modules {
        let name = format!("nvx-{k}");
        list.push((
            m(&name)
                .depends(&[&names[k - 1]])
                .exports(&[&format!("nvx_{k}")])
                .imports(&[&format!("nvx_{}", k - 1)]),
            Packing::Plain,
        ));
        names.push(name);
    }
    let mut overlay = OverlayBuilder::nvidia(KVER);
    overlay.modules = list;
    host.import(&overlay);
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!(
            "[driver]\nmodules = [{}]\nos-modules = []\n",
            quoted.join(", ")
        ),
    );
    host
}

/// A Debian host running KVER with `kernels` installed (KVER and newer), each with its module
/// tree and `/boot/vmlinuz-*`, and no boot entries: the newest is booted next.
fn generic_host(kernels: usize) -> FakeHost {
    let host = FakeHost::new(KVER);
    host.write("/etc/os-release", DEBIAN_OS_RELEASE);
    for k in 0..kernels {
        let kver = kernel(k);
        host.write(&format!("/usr/lib/modules/{kver}/modules.dep"), "");
        host.write(&format!("/boot/vmlinuz-{kver}"), "image");
    }
    host
}

/// The k-th kernel: KVER for 0, then newer ones.
fn kernel(k: usize) -> String {
    if k == 0 {
        KVER.to_string()
    } else {
        format!("6.1.0-{}-cloud-amd64", 28 + k)
    }
}

/// A Debian host with systemd-boot: `entries` type #1 entries, one per kernel, each naming a
/// bzImage that says its release.
fn bls_host(entries: usize) -> FakeHost {
    let host = generic_host(1);
    for k in 0..entries {
        let kver = kernel(k);
        host.write(&format!("/usr/lib/modules/{kver}/modules.dep"), "");
        host.write_bytes(
            &format!("/boot/vmlinuz-{kver}"),
            &bzimage_with_release(&kver),
        );
        host.write(
            &format!("/boot/loader/entries/debian-{kver}.conf"),
            &format!("title Debian GNU/Linux 12\nversion {kver}\nlinux /vmlinuz-{kver}\ninitrd /initrd.img-{kver}\noptions root=UUID=1234 ro\n"),
        );
    }
    host
}

/// An ostree host (as examples/demo-host.rs lays one out) with `deployments` deployments of
/// the stateroot, one kernel each, and their bootloader entries; the newest entry (the
/// highest `version`) is the default and boots the newest kernel.
fn ostree_host(deployments: usize) -> FakeHost {
    const STATEROOT: &str = "fedora-coreos";
    let host = FakeHost::new(KVER);
    let root = host.dir.path();
    host.write("/run/ostree-booted", "");
    let sysroot = root.join("sysroot");
    let deploy = sysroot.join(format!("ostree/deploy/{STATEROOT}/deploy"));
    fs::create_dir_all(sysroot.join(format!("ostree/deploy/{STATEROOT}/var"))).unwrap();
    for k in 0..deployments {
        let kver = kernel(k);
        let commit = format!("{k:064x}");
        let bootcsum = format!("{:064x}", k + 1_000_000);
        let deployment = format!("{commit}.0");
        let modules = deploy.join(&deployment).join("usr/lib/modules").join(&kver);
        write(&modules.join("vmlinuz"), "kernel\n");
        write(&modules.join("initramfs.img"), "initramfs\n");
        write(
            &deploy.join(format!("{deployment}.origin")),
            "[origin]\ncontainer-image-reference=ostree-remote-registry:fedora:quay.io/fedora/fedora-coreos:stable\n",
        );
        let bootlinks = sysroot.join(format!("ostree/boot.1.1/{STATEROOT}/{bootcsum}"));
        fs::create_dir_all(&bootlinks).unwrap();
        symlink(
            format!("../../../deploy/{STATEROOT}/deploy/{deployment}"),
            bootlinks.join("0"),
        )
        .unwrap();
        let kernel_dir = format!("ostree/{STATEROOT}-{bootcsum}");
        write(
            &sysroot.join(format!("boot/{kernel_dir}/vmlinuz-{kver}")),
            "kernel\n",
        );
        // ostree numbers entries from 1 and gives the default the highest version.
        write(
            &sysroot.join(format!("boot/loader.1/entries/ostree-{}.conf", k + 1)),
            &format!(
                "title Fedora CoreOS (ostree:{k})\nversion {}\noptions root=UUID=0b5b2c8e rw ostree=/ostree/boot.1/{STATEROOT}/{bootcsum}/0\nlinux /{kernel_dir}/vmlinuz-{kver}\n",
                k + 1
            ),
        );
    }
    symlink("boot.1.1", sysroot.join("ostree/boot.1")).unwrap();
    symlink("loader.1", sysroot.join("boot/loader")).unwrap();
    symlink("sysroot/ostree", root.join("ostree")).unwrap();
    symlink("sysroot/boot", root.join("boot")).unwrap();
    host
}

fn write(path: &Path, contents: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// Put `overlays` small overlays in the store, one per kernel (KVER and newer), through the
/// store's own import.
fn fill_store(dir: &Path, overlays: usize) {
    let root = Root::new(dir);
    let store = nvdriver_agent::overlay::Store::new(&root, STORE);
    let src = tempfile::tempdir().unwrap();
    for k in 0..overlays {
        let kver = kernel(k);
        let mut overlay = OverlayBuilder::nvidia(&kver);
        overlay.modules = vec![(FixtureModule::new("nvidia", &kver, DRIVER), Packing::Plain)];
        let tree = src.path().join(&kver);
        overlay.build(&tree);
        store.import(&tree).unwrap();
    }
}

/// A copy of the fake root at `dir` (`cp -a`: links, modes, empty files as they are).
fn copy_of(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", dir.display()))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {}", dir.display());
    copy
}

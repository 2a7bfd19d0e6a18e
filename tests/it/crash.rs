//! Crash safety of staging: the real binary stages an overlay from a local archive and is
//! killed with SIGKILL at a random moment within one stage's duration, a hundred times. After
//! every kill the store holds only complete, verified overlays under their real names; after the
//! next stage (or GC) it holds no leftovers either.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use crate::common::archive::{overlay_archive, Compression, ManifestAt};
use crate::common::host::snapshot_dir;
use crate::common::modules::FixtureModule;
use crate::common::overlay::{OverlayBuilder, Packing, DRIVER};
use nvdriver_agent::fsutil::TEMP_PREFIX;
use nvdriver_agent::host::Root;
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";
const STORE: &str = "/var/lib/nvdriver-agent/overlays";
const TRIALS: u32 = 100;

fn agent(root: &Path, args: &[&str]) -> Command {
    let mut command = crate::common::agent::command(root, args);
    command.stdin(Stdio::null());
    command
}

fn run(root: &Path, args: &[&str]) -> Output {
    let out = agent(root, args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Overlays under their real names (each verified completely) and temporary leftovers.
fn inspect(root: &Path) -> (usize, usize) {
    let root = Root::new(root);
    let store = Store::new(&root, STORE);
    let mut overlays = 0;
    for kernel in store.kernel_releases().unwrap() {
        for driver in store.driver_versions(&kernel).unwrap() {
            let overlay = store
                .open(&kernel, &driver)
                .unwrap_or_else(|e| panic!("{kernel}/{driver} is not a complete overlay: {e}"));
            store
                .verify(&overlay)
                .unwrap_or_else(|e| panic!("{kernel}/{driver} does not verify: {e}"));
            overlays += 1;
        }
    }
    let top = root.join(STORE);
    let leftovers = if top.exists() {
        snapshot_dir(&top)
            .iter()
            .filter(|(p, _)| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(TEMP_PREFIX)
            })
            .count()
    } else {
        0
    };
    (overlays, leftovers)
}

/// xorshift64*, seeded from the clock (printed, so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn killed_stages_never_leave_a_half_overlay() {
    let host = tempfile::tempdir().unwrap();
    let root = host.path();
    let write = |host_path: &str, bytes: &[u8]| {
        let path = Root::new(root).join(host_path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    };
    write(
        "/etc/nvdriver-agent/config.toml",
        format!(
            "[driver]\nversion = \"{DRIVER}\"\n[stage]\nsources = [\"/srv/overlays/nvidia-{{driver}}-{{kernel}}.tar.zst\"]\nkeep-extra = 0\n# No disk reserve: it would depend on how full this machine's disk is.\nkeep-free-percent = 0\nkeep-free-bytes = 0\n"
        )
        .as_bytes(),
    );
    let builder = OverlayBuilder::nvidia(KVER).module(
        FixtureModule::new("nvidia", KVER, DRIVER).padded(2 << 20, 2 << 20, 42),
        Packing::Plain,
    );
    let (archive, _) = overlay_archive(&builder, Compression::Zstd, ManifestAt::First);
    write(
        &format!("/srv/overlays/nvidia-{DRIVER}-{KVER}.tar.zst"),
        &archive,
    );
    let fetch = ["overlay", "fetch", "--kernel", KVER];
    let gc = ["overlay", "gc"];

    // How long one full stage takes, process start included.
    let mut durations = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        run(root, &fetch);
        durations.push(started.elapsed());
        assert_eq!(inspect(root), (1, 0));
        run(root, &gc);
        assert_eq!(inspect(root), (0, 0));
    }
    durations.sort();
    let stage_time = durations[1];

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("one stage takes {stage_time:?}; seed {seed}");
    let mut rng = Rng(seed);
    let (mut killed, mut interrupted_mid_stage) = (0, 0);
    for trial in 0..TRIALS {
        let delay = stage_time.mul_f64(rng.next_unit());
        let mut child = agent(root, &fetch)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if status.signal() == Some(9) {
            killed += 1;
        }
        let (_, leftovers) = inspect(root);
        if leftovers > 0 {
            interrupted_mid_stage += 1;
        }
        if trial % 2 == 0 {
            // Stage again: completes, and cleans what the killed one left.
            let out = run(root, &fetch);
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(&format!("{STORE}/{KVER}/{DRIVER}")),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert_eq!(
                inspect(root),
                (1, 0),
                "trial {trial} (delay {delay:?}, seed {seed})"
            );
        }
        run(root, &gc);
        assert_eq!(
            inspect(root),
            (0, 0),
            "trial {trial} (delay {delay:?}, seed {seed})"
        );
    }
    eprintln!(
        "{TRIALS} trials: {killed} killed before finishing, {interrupted_mid_stage} left a staging directory behind"
    );
    // The kills must really land mid-stage, or this test tests nothing.
    assert!(killed >= TRIALS / 4, "only {killed} kills landed");
    assert!(
        interrupted_mid_stage >= TRIALS / 10,
        "only {interrupted_mid_stage} kills landed while a staging directory existed"
    );
    // Nothing was ever written outside the store but the config and the source.
    let outside: Vec<_> = snapshot_dir(root)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("var"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(outside.len(), 6, "{outside:?}");
}

//! Crash safety at every failpoint (`src/failpoints.rs`; run with
//! `cargo test --features failpoints --test it -- crash_failpoints::`). For each command that
//! changes the host (load, stage, GC, import) and each failpoint, the agent is stopped at the
//! 1st, 2nd, … time it reaches the point (exiting on the spot, or panicking), until it no longer
//! reaches it. After every crash the store holds only complete verified overlays and the toolkit
//! config.toml is the old or the new file byte for byte; the next normal run succeeds and
//! leaves no temporary file anywhere on the host.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use crate::common::host::{snapshot_dir, FakeHost};
use crate::common::http::{serve_overlay_source, HttpServer};
use crate::common::overlay::OverlayBuilder;
use nvdriver_agent::failpoints::{ALL, CRASH_EXIT_CODE};
use nvdriver_agent::fsutil::TEMP_PREFIX;
use nvdriver_agent::host::Root;
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";
const NEXT: &str = "6.1.0-29-cloud-amd64";
const OLD: [&str; 3] = [
    "6.1.0-25-cloud-amd64",
    "6.1.0-26-cloud-amd64",
    "6.1.0-27-cloud-amd64",
];
/// Crashes in a row at one point before the run that must succeed.
const REPEATS: u32 = 12;
const STORE: &str = "/var/lib/nvdriver-agent/overlays";
const TOOLKIT: &str = "/etc/nvidia-container-runtime/config.toml";
const TOOLKIT_OLD: &str = "# the site's own settings\ndisable-require = false\n\n[nvidia-container-cli]\nroot = \"/\"\nldconfig = \"@/sbin/ldconfig\"\n";

static AGENT_TIME: std::sync::Mutex<std::time::Duration> =
    std::sync::Mutex::new(std::time::Duration::ZERO);

fn agent(root: &Path, args: &[&str], failpoints: Option<&str>) -> Output {
    let t = Instant::now();
    let out = agent_inner(root, args, failpoints);
    *AGENT_TIME.lock().unwrap() += t.elapsed();
    out
}

fn agent_inner(root: &Path, args: &[&str], failpoints: Option<&str>) -> Output {
    let mut command = crate::common::agent::command(root, args);
    match failpoints {
        Some(spec) => command.env("FAILPOINTS", spec),
        None => command.env_remove("FAILPOINTS"),
    };
    command.output().unwrap()
}

/// The host every trial starts from: the running kernel's overlay (with user space, so load
/// points the toolkit at it) and three old kernels' in the store, the site's toolkit config,
/// the next kernel's overlay served over HTTP and in a directory.
fn template(server: &HttpServer) -> FakeHost {
    let host = FakeHost::new_in(&scratch_dir(), KVER);
    serve_overlay_source(&host, server, NEXT, |_, _| {}, "keep-extra = 1\n");
    host.write(TOOLKIT, TOOLKIT_OLD);
    let store = Store::new(&host.root, STORE);
    for kernel in OLD.iter().copied().chain([KVER]) {
        let src = tempfile::tempdir().unwrap();
        OverlayBuilder::nvidia(kernel)
            .with_userspace()
            .build(src.path());
        store.import(src.path()).unwrap();
    }
    OverlayBuilder::nvidia(NEXT).build(&host.path("/srv/next"));
    host
}

/// Where trial hosts live: a tmpfs when there is one, since every step fsyncs and hundreds of
/// runs on a disk spend their time waiting for it.
fn scratch_dir() -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(scratch_dir()).unwrap()
}

fn copy_host(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// The store's overlays under their real names, each complete and verified.
fn verified_overlays(root: &Path) -> Vec<String> {
    let root = Root::new(root);
    let store = Store::new(&root, STORE);
    let mut found = Vec::new();
    for kernel in store.kernel_releases().unwrap() {
        for driver in store.driver_versions(&kernel).unwrap() {
            let overlay = store
                .open(&kernel, &driver)
                .unwrap_or_else(|e| panic!("{kernel}/{driver} is not complete: {e}"));
            store
                .verify(&overlay)
                .unwrap_or_else(|e| panic!("{kernel}/{driver} does not verify: {e}"));
            found.push(kernel.clone());
        }
    }
    found
}

fn temp_files(root: &Path) -> Vec<String> {
    snapshot_dir(root)
        .into_iter()
        .map(|(p, _)| p.display().to_string())
        .filter(|p| p.contains(TEMP_PREFIX))
        .collect()
}

#[test]
fn every_failpoint_crash_leaves_old_or_new_state() {
    let started = Instant::now();
    let server = HttpServer::start();
    let template = template(&server);
    let work = scratch();
    let next_dir = |root: &Path| root.join("srv/next").display().to_string();

    // The toolkit config a successful load writes.
    let baseline = work.path().join("baseline");
    copy_host(template.dir.path(), &baseline);
    let out = agent(&baseline, &["load"], None);
    assert!(out.status.success(), "{}", crate::common::agent::text(&out));
    let toolkit_new = fs::read_to_string(Root::new(&baseline).join(TOOLKIT)).unwrap();
    assert_ne!(toolkit_new, TOOLKIT_OLD);

    let commands: [(&str, Vec<String>); 4] = [
        ("load", vec!["load".into()]),
        (
            "stage",
            ["stage", "--now", "--kernel", NEXT]
                .map(String::from)
                .into(),
        ),
        (
            "gc",
            ["overlay", "gc", "--keep", KVER].map(String::from).into(),
        ),
        ("import", vec!["overlay".into(), "import".into()]),
    ];
    let mut kills = 0;
    let mut reached = std::collections::BTreeMap::<&str, u32>::new();
    for (name, args) in &commands {
        for failpoint in ALL {
            for n in 0.. {
                let trial = work.path().join(format!("{name}-{failpoint}-{n}"));
                copy_host(template.dir.path(), &trial);
                let mut args: Vec<String> = args.clone();
                if *name == "import" {
                    args.push(next_dir(&trial));
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                // The same crash again and again (power lost during each recovery), alternating
                // a hard exit (no cleanup at all) with a panic (unwinding).
                let mut crashes = 0;
                let mut context = String::new();
                for repeat in 0..REPEATS {
                    let action = if repeat % 2 == 0 { "return" } else { "panic" };
                    let spec = format!("{failpoint}={n}*off->{action}");
                    let out = agent(&trial, &args, Some(&spec));
                    let crashed = out.status.code() == Some(CRASH_EXIT_CODE)
                        || String::from_utf8_lossy(&out.stderr).contains("panicked");
                    context = format!(
                        "{name} with {spec} (x{repeat}): {}",
                        crate::common::agent::text(&out)
                    );
                    if !crashed {
                        assert!(out.status.success(), "{context}");
                        break;
                    }
                    crashes += 1;
                    // Right after the crash: whole overlays only, config old or new.
                    verified_overlays(&trial);
                    let toolkit = fs::read_to_string(Root::new(&trial).join(TOOLKIT)).unwrap();
                    assert!(
                        toolkit == TOOLKIT_OLD || toolkit == toolkit_new,
                        "{context}\ntorn toolkit config:\n{toolkit}"
                    );
                }
                if crashes == 0 {
                    fs::remove_dir_all(&trial).unwrap();
                    break;
                }
                kills += crashes;
                *reached.entry(failpoint).or_default() += 1;
                // The next start: succeeds and leaves the host tidy.
                let again = agent(&trial, &args, None);
                assert!(
                    again.status.success(),
                    "{context}\nrerun: {}",
                    crate::common::agent::text(&again)
                );
                let stored = verified_overlays(&trial);
                match *name {
                    "stage" | "import" => assert!(stored.contains(&NEXT.to_string()), "{context}"),
                    "gc" => assert_eq!(stored, [OLD[2], KVER], "{context}"),
                    _ => assert!(stored.contains(&KVER.to_string()), "{context}"),
                }
                let toolkit = fs::read_to_string(Root::new(&trial).join(TOOLKIT)).unwrap();
                let expected = if *name == "load" {
                    &toolkit_new
                } else {
                    TOOLKIT_OLD
                };
                assert_eq!(&toolkit, expected, "{context}");
                assert_eq!(temp_files(&trial), Vec::<String>::new(), "{context}");
                fs::remove_dir_all(&trial).unwrap();
            }
        }
    }
    eprintln!(
        "{kills} crashes in {:?} ({:?} in the agent); per failpoint: {reached:?}",
        started.elapsed(),
        AGENT_TIME.lock().unwrap()
    );
    let unreached: Vec<&&str> = ALL
        .iter()
        .filter(|f| !reached.contains_key(**f) && **f != "hold::take")
        .collect();
    assert!(unreached.is_empty(), "never reached: {unreached:?}");
    assert!(kills >= 200, "only {kills} crashes");
}

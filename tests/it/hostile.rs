//! The hostile overlay corpus (`tests/hostile/build`): every archive is one attack on top of a
//! good overlay, staged like any source. Each is refused with its own error, the store holds
//! nothing afterwards, and nothing outside the store changed (sha256 of every file of the fake
//! host, before and after). Module-level attacks the loader has to judge against the running
//! OS (a `depends` on a module neither the overlay nor the OS has) are in tests/it/load.rs
//! (`missing_dependency_is_refused`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::host::snapshot_dir;
use crate::common::overlay::{OverlayBuilder, DRIVER};
use nvdriver_agent::config::StageSettings;
use nvdriver_agent::fsutil::TEMP_PREFIX;
use nvdriver_agent::host::Root;
use nvdriver_agent::overlay::source::{stage, OverlayKey, SourceError, MAX_ENTRIES};
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";
const STORE: &str = "/var/lib/nvdriver-agent/overlays";

/// The corpus, built once per test binary into a temp dir that lives as long as it.
fn corpus() -> &'static Path {
    static CORPUS: OnceLock<tempfile::TempDir> = OnceLock::new();
    CORPUS
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let good = dir.path().join("good");
            OverlayBuilder::nvidia(KVER).build(&good);
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/build");
            let out = Command::new(script)
                .arg(&good)
                .arg(dir.path().join("corpus"))
                .output()
                .expect("python3 runs tests/hostile/build");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .path()
}

fn settings(archive: &str, max_download_bytes: u64) -> StageSettings {
    StageSettings {
        sources: vec![format!("/srv/{archive}")],
        max_download_bytes,
        download_timeout: Duration::from_secs(20),
        allow_http: false,
        keep_extra: 1,
        signatures: Default::default(),
        oci: Default::default(),
        keep_free: nvdriver_agent::overlay::space::Reserve::NONE,
        fetcher: None,
    }
}

/// Stage `archive` from the corpus onto a fresh fake host (the root is `outer/host`, so
/// writes that escape it show in `outer`); returns the refusal's message.
fn refusal(archive: &str, max_download_bytes: u64) -> String {
    let outer = tempfile::tempdir().unwrap();
    let root = Root::new(outer.path().join("host"));
    let srv = root.join("/srv");
    fs::create_dir_all(&srv).unwrap();
    fs::copy(corpus().join("corpus").join(archive), srv.join(archive)).unwrap();
    // The store's directories exist before, as on a host that has staged before.
    fs::create_dir_all(root.join(STORE)).unwrap();
    let before = snapshot_dir(outer.path());
    let store = Store::new(&root, STORE);
    let key = OverlayKey {
        kernel_release: KVER.into(),
        driver_version: DRIVER.into(),
        arch: std::env::consts::ARCH.into(),
    };
    let err = stage(
        &root,
        &store,
        &settings(archive, max_download_bytes),
        &key,
        None,
    )
    .expect_err(archive);
    assert!(err.any_invalid(), "{archive}: {err}");
    let SourceError::Failed { tried, .. } = &err else {
        panic!("{archive}: {err}")
    };
    // Only the store's lock file may be new; no staging leftovers, nothing else.
    let after: Vec<(PathBuf, String)> = snapshot_dir(outer.path())
        .into_iter()
        .filter(|(p, _)| !p.ends_with(".lock"))
        .collect();
    for (path, _) in &after {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            !name.starts_with(TEMP_PREFIX),
            "{archive}: leftover {path:?}"
        );
    }
    assert_eq!(before, after, "{archive}: the host changed");
    assert!(store.kernel_releases().unwrap().is_empty(), "{archive}");
    tried[0].error.to_string()
}

#[track_caller]
fn refused_with(archive: &str, expected: &str) {
    let message = refusal(archive, 64 << 20);
    assert!(
        message.contains(expected),
        "{archive}: expected {expected:?} in: {message}"
    );
}

#[test]
fn path_traversal_is_refused() {
    refused_with("dotdot.tar", "contains \"..\"");
    refused_with("absolute.tar", "is absolute");
    refused_with("symlink-escape.tar", "leaves");
    refused_with("symlink-absolute.tar", "leaves");
    refused_with("through-symlink.tar", "beneath a symlink");
    refused_with("hardlink-outside.tar", "is a hard link");
    refused_with("hardlink-inside.tar", "is a hard link");
}

#[test]
fn special_files_and_modes_are_refused() {
    refused_with("chardev.tar", "is a device node");
    refused_with("blockdev.tar", "is a device node");
    refused_with("fifo.tar", "is a fifo");
    refused_with("setuid-header.tar", "has mode 4755 in the archive; setuid");
    refused_with("setuid-manifest.tar", "has mode 4755");
}

#[test]
fn odd_names_and_manifests_are_refused() {
    refused_with("newline-name.tar", "contains a control character");
    refused_with("unlisted-file.tar", "not listed");
    refused_with("listed-twice.tar", "twice");
    refused_with(
        "ko-claims-another-name.tar",
        "is named for module nvidia_modeset but its .modinfo says it is nvidia_uvm",
    );
}

#[test]
fn decompression_bomb_stops_at_the_unpacked_cap() {
    // 8 MiB of zeros; the cap is max-download-bytes times the unpack ratio.
    let message = refusal("bomb.tar.xz", 256 << 10);
    assert!(message.contains("unpacks to more than"), "{message}");
    assert!(message.contains("bytes"), "{message}");
}

#[test]
fn entry_count_stops_at_the_default_cap() {
    assert_eq!(MAX_ENTRIES, 100_000, "the corpus is built for this cap");
    let message = refusal("many-entries.tar.gz", 1 << 30);
    assert!(
        message.contains(&format!("unpacks to more than {MAX_ENTRIES} entries")),
        "{message}"
    );
}

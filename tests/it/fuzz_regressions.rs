//! Replays the fuzz targets' inputs (`src/fuzzing.rs`, `fuzz/`) in `cargo test`: every file
//! under `fuzz/regressions/<target>/`, and seed inputs built here from the fixture builders.
//! With `NVDRIVER_FUZZ_SEEDS=<dir>` the seeds are also written to `<dir>/<target>/`, the
//! starting corpus of a fuzz run (see `docs/development/fuzzing.md`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::archive::{overlay_archive, Compression as TarCompression, ManifestAt};
use crate::common::modules::FixtureModule;
use crate::common::overlay::OverlayBuilder;
use crate::common::Compression;
use nvdriver_agent::fuzzing::{archive_key, TARGETS};

fn check(target: &str) -> fn(&[u8]) {
    TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"))
        .1
}

#[test]
fn regression_inputs_pass_their_targets() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    for (target, run) in TARGETS {
        let Ok(entries) = fs::read_dir(dir.join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            eprintln!("replaying {}", path.display());
            run(&bytes);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no regression inputs under {}", dir.display());
}

/// Seed inputs per target: well-formed inputs of each kind the parser reads, so the fuzzer
/// starts from the interesting paths instead of from nothing.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let key = archive_key();
    let mut seeds = Vec::new();
    let module = FixtureModule::new("nvidia-uvm", &key.kernel_release, &key.driver_version)
        .depends(&["nvidia"])
        .signed();
    for c in [Compression::None, Compression::Xz, Compression::Zstd] {
        seeds.push(("modinfo", module.bytes(c)));
    }
    let mut overlay = OverlayBuilder::nvidia(&key.kernel_release);
    overlay.driver_version = key.driver_version.clone();
    for (i, c) in [
        TarCompression::None,
        TarCompression::Gzip,
        TarCompression::Xz,
        TarCompression::Zstd,
    ]
    .into_iter()
    .enumerate()
    {
        let at = if i % 2 == 0 {
            ManifestAt::First
        } else {
            ManifestAt::Last
        };
        let (bytes, manifest) = overlay_archive(&overlay, c, at);
        if i == 0 {
            seeds.push(("manifest", manifest.to_toml().into_bytes()));
        }
        seeds.push(("archive", bytes));
    }
    let bzimage = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bzimage/6.12.117+deb12-cloud-amd64.bin");
    seeds.push(("bzimage", fs::read(bzimage).unwrap()));
    seeds.push(("os_release", crate::common::host::FCOS_OS_RELEASE.into()));
    seeds.push((
        "os_release",
        b"ID=flatcar\nVERSION_ID=4081.2.0\nPRETTY_NAME='Flatcar Container Linux'\n# c\n".to_vec(),
    ));
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/config.toml");
    seeds.push(("config", fs::read(config).unwrap()));
    seeds.push((
        "toolkit_config",
        b"disable-require = false\n\n[nvidia-container-cli]\n# where\nroot = \"/\"\nldconfig = \"@/sbin/ldconfig\"\n\n[nvidia-container-runtime]\nmode = \"auto\"\n".to_vec(),
    ));
    seeds
}

#[test]
fn seeds_pass_their_targets() {
    let export = std::env::var_os("NVDRIVER_FUZZ_SEEDS").map(PathBuf::from);
    for (i, (target, bytes)) in seeds().into_iter().enumerate() {
        check(target)(&bytes);
        if let Some(dir) = &export {
            let dir = dir.join(target);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(format!("seed-{i}")), &bytes).unwrap();
        }
    }
}

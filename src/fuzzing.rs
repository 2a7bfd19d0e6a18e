//! The checks behind the fuzz targets in `fuzz/` (libFuzzer through cargo-fuzz) and their
//! regression replay in `tests/it/fuzz_regressions.rs`. Each takes raw bytes, feeds them to one
//! parser the agent points at untrusted input, and panics only when an invariant is broken;
//! errors are the expected answer to bad input. Kept in the library so the fuzzer and
//! `cargo test` run the very same code.

use std::fs;
use std::path::{Path, PathBuf};

use crate::overlay::key::OverlayKey;
use crate::overlay::manifest::Manifest;
use crate::overlay::source::archive::{self, Limits};

/// A fuzz target's check: panics only on a broken invariant.
pub type Check = fn(&[u8]);

/// The fuzz targets, by the name of their `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/regressions/<name>/` directory.
pub const TARGETS: [(&str, Check); 7] = [
    ("modinfo", modinfo),
    ("manifest", manifest),
    ("archive", archive),
    ("bzimage", bzimage),
    ("os_release", os_release),
    ("config", config),
    ("toolkit_config", toolkit_config),
];

/// `.modinfo`/ELF reader (plain, xz or zstd module bytes): no panic, and a parsed module has
/// a name and prints.
pub fn modinfo(data: &[u8]) {
    let origin = Path::new("fuzz.ko");
    if let Ok(info) = crate::modinfo::parse_module(data, origin) {
        assert!(!info.name.is_empty(), "a parsed module has a name");
        let _ = crate::modinfo::modinfo_lines(&info, origin);
        let _ = crate::modinfo::check_vermagic(&info, origin, "6.1.0-fuzz");
    }
}

/// Manifest parser: a manifest that parses serialises back to one that parses equal.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = Manifest::parse(text, Path::new("overlay.toml")) {
        let again = Manifest::parse(&parsed.to_toml(), Path::new("overlay.toml"))
            .expect("a serialised manifest parses");
        assert_eq!(parsed, again, "manifest round trip");
    }
}

/// The key every fuzzed archive is checked against (fuzz seeds are built for it).
pub fn archive_key() -> OverlayKey {
    OverlayKey {
        kernel_release: "6.1.0-fuzz".into(),
        driver_version: "550.54.15".into(),
        arch: std::env::consts::ARCH.into(),
    }
}

/// tar (plain, gzip, xz, zstd) extractor: no panic, bounded work, and nothing written outside
/// the staging directory (its parent holds only it afterwards, whatever the archive said).
pub fn archive(data: &[u8]) {
    let parent = tempfile::tempdir().expect("temp dir");
    let staging = parent.path().join("staging");
    fs::create_dir(&staging).expect("staging dir");
    let limits = Limits {
        max_unpacked_bytes: 4 << 20,
        max_entries: 512,
    };
    let _ = archive::extract(
        data,
        &staging,
        &archive_key(),
        limits,
        "fuzz.tar",
        &mut crate::overlay::space::SpaceGuard::unchecked(),
    );
    let names: Vec<PathBuf> = fs::read_dir(parent.path())
        .expect("read parent")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(names, vec![staging], "the archive wrote outside staging");
}

/// bzImage header reader: no panic; a release found is one non-empty word.
pub fn bzimage(data: &[u8]) {
    if let Ok(release) = crate::watch::flatcar::bzimage_release(data) {
        assert!(!release.is_empty() && !release.contains(char::is_whitespace));
    }
}

/// os-release parser: no panic.
pub fn os_release(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::host::os_release::OsRelease::parse(text, PathBuf::from("os-release"));
    }
}

/// Config parser and merge: no panic. A NUL byte splits the input into two layers, so the
/// merge of drop-ins is fuzzed too.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let layers: Vec<(PathBuf, String)> = text
        .splitn(2, '\0')
        .enumerate()
        .map(|(i, t)| (PathBuf::from(format!("{i}.toml")), t.to_string()))
        .collect();
    let _ = crate::config::merge_layers(&layers);
}

/// Toolkit config.toml editor: the edited text parses as TOML, has the new root, keeps every
/// other key and value, and a second edit changes nothing. A first line starting with `/`
/// is the driver root to set.
pub fn toolkit_config(data: &[u8]) {
    use crate::handoff::toolkit::{current_cli_root, set_cli_root, CLI_TABLE, ROOT_KEY};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (root, existing) = match text.split_once('\n') {
        Some((first, rest)) if first.starts_with('/') => (first, rest),
        _ => ("/run/nvidia/driver", text),
    };
    let Ok(edited) = set_cli_root(Some(existing), root) else {
        return;
    };
    let Some(edited) = edited else {
        assert_eq!(
            current_cli_root(existing).ok().flatten().as_deref(),
            Some(root)
        );
        return;
    };
    assert_eq!(
        current_cli_root(&edited)
            .expect("edited text parses")
            .as_deref(),
        Some(root)
    );
    assert_eq!(
        set_cli_root(Some(&edited), root).expect("edits again"),
        None
    );
    let without_root = |text: &str| -> Option<toml::Table> {
        let mut table: toml::Table = toml::from_str(text).ok()?;
        if let Some(toml::Value::Table(cli)) = table.get_mut(CLI_TABLE) {
            cli.remove(ROOT_KEY);
            if cli.is_empty() {
                table.remove(CLI_TABLE);
            }
        }
        Some(table)
    };
    if let Some(before) = without_root(existing) {
        let after = without_root(&edited).expect("the edited config parses as TOML");
        assert_eq!(before, after, "the edit changed keys other than the root");
    }
}

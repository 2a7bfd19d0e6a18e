//! Host tools and privileges some tests need. A missing tool (or root) skips its test with a
//! notice, except under CI (`CI` set), where `scripts/setup` must have installed the tool and
//! the tests run as root: a skipped check there would pass without having checked anything.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// A host tool by name, searched on `PATH` and in the sbin directories (kmod's `modprobe`
/// lives there, and they are often missing from a non-root `PATH`).
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The tool, or `None` after printing why `test` is skipped. Under CI a missing tool is a
/// failure.
pub fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    let found = tool(name);
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required under CI; scripts/setup installs it"
        );
        eprintln!("skipping {test}: {name} not found (scripts/setup installs it)");
    }
    found
}

pub fn is_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Whether the tests run as root; if not, prints why `test` is skipped. Under CI not being
/// root is a failure.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} must run as root under CI"
    );
    eprintln!("skipping {test}: not running as root");
    false
}

/// Run a python3-jsonschema `script` as `python3 -c SCRIPT SCHEMA INSTANCE_FILE` on `instance`
/// (written to a temp file): `Ok` when it exits 0, else what it printed. A missing module or a
/// traceback (the schema itself invalid) fails the test: that is no verdict on the instance.
pub fn jsonschema_check(
    script: &str,
    schema: &std::path::Path,
    instance: &serde_json::Value,
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instance.json");
    fs::write(&file, serde_json::to_vec(instance).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(schema)
        .arg(&file)
        .output()
        .expect("python3 (scripts/setup installs it, with python3-jsonschema)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !["ModuleNotFoundError", "SchemaError", "Traceback"]
            .iter()
            .any(|bad| said.contains(bad)),
        "{}: cannot validate (run scripts/setup for python3-jsonschema): {said}",
        schema.display()
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(said)
    }
}

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

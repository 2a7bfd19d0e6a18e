//! The agent binary as systemd would run it, on a fake host: `run` as a child process, and the
//! one-shot commands beside it.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test (cargo builds it for integration tests; examples share this module but
/// do not run the agent).
#[allow(clippy::option_env_unwrap)] // examples compile this module without ever calling it
pub fn bin() -> &'static str {
    option_env!("CARGO_BIN_EXE_nvdriver-agent").expect("only integration tests run the agent")
}

/// A command for the agent on `host`, with the kernel simulated and no systemd around.
pub fn command(root: &Path, args: &[&str]) -> Command {
    on_fake_host(Command::new(bin()), root, args)
}

/// The static aarch64 release binary that `NVDRIVER_AGENT_AARCH64` names (scripts/test sets it
/// after packaging/build), run under qemu-user's `qemu-aarch64-static`, which reports the
/// machine as `aarch64` to it (uname), as on an arm64 host. Otherwise as [`command`].
pub fn aarch64_command(root: &Path, args: &[&str]) -> Command {
    let binary = std::env::var_os("NVDRIVER_AGENT_AARCH64").expect(
        "NVDRIVER_AGENT_AARCH64 must name the static aarch64 binary \
         (packaging/build writes nvdriver-agent-VERSION-aarch64-linux-musl); scripts/test sets it",
    );
    let mut qemu = Command::new("qemu-aarch64-static");
    qemu.arg(binary);
    on_fake_host(qemu, root, args)
}

fn on_fake_host(mut command: Command, root: &Path, args: &[&str]) -> Command {
    command
        .arg("--root")
        .arg(root)
        .arg("--simulate-kernel")
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("WATCHDOG_USEC")
        // Never the machine's own system bus: a test that wants a bus sets its own.
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/nvdriver-agent-test-bus",
        );
    command
}

pub fn run(root: &Path, args: &[&str]) -> Output {
    command(root, args).output().unwrap()
}

pub fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `status --json`, parsed (any of its readiness exit codes but no-GPU: 0, 7, 8).
pub fn status(root: &Path) -> serde_json::Value {
    let out = run(root, &["status", "--json"]);
    assert!(
        matches!(out.status.code(), Some(0 | 7 | 8)),
        "{}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The state file the daemon and `stage` keep, parsed (Null when absent).
pub fn state(root: &Path) -> serde_json::Value {
    std::fs::read(root.join("run/nvdriver-agent/state.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Poll until `check` holds (or panic with what was last seen).
pub fn wait_for<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = probe();
        if check(&seen) {
            return seen;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last seen: {seen:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nvdriver-agent run` in the background; stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    log: tempfile::NamedTempFile,
}

impl Daemon {
    pub fn start(root: &Path, extra: impl FnOnce(&mut Command)) -> Daemon {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut command = command(root, &["-v", "run"]);
        extra(&mut command);
        let child = command
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child, log };
        // Up when it has done the boot path and written its state.
        let started = Instant::now();
        while state(root)["load"].is_null() {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("the daemon exited ({status}):\n{}", daemon.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the daemon did not come up:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGTERM, then wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        use nix::sys::signal::{kill, Signal};
        let _ = kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the daemon ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if std::thread::panicking() {
            // A second panic here would abort the whole test binary (every other test's result
            // lost); the first one already says what failed.
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            let _ = self.stop();
        }
    }
}

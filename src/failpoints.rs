//! Failpoints at every step that changes the host, for the crash tests
//! (`tests/it/crash_failpoints.rs`). Compiled in only with the cargo feature `failpoints`; the
//! `FAILPOINTS` variable arms them (the `fail` crate's syntax, `name=action;…`). Besides the
//! crate's own actions (`panic`, `sleep(ms)`, …), `return` makes the agent exit on the spot
//! with [`CRASH_EXIT_CODE`], skipping every destructor and cleanup as a power cut or SIGKILL
//! would; `3*off->return` crashes at the fourth time the point is reached.

/// The exit status of a process a `return` failpoint stopped.
pub const CRASH_EXIT_CODE: i32 = 86;

/// Every failpoint, for the crash test to iterate over.
pub const ALL: &[&str] = &[
    "stage::download",
    "stage::unpacked",
    "stage::verified",
    "store::publish-rename",
    "store::published",
    "store::import-copied",
    "state::write",
    "hold::take",
    "gc::rename-away",
    "gc::delete",
    "write-atomic::temp-written",
    "write-atomic::fsynced",
    "write-atomic::renamed",
    "readiness::write",
];

/// Arm the failpoints named in `FAILPOINTS`; keep the guard for the life of the process.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// Stop the process where failpoint `name` fired, with nothing cleaned up.
pub fn crash(name: &str) -> ! {
    eprintln!("nvdriver-agent: failpoint {name}: crashing");
    std::process::exit(CRASH_EXIT_CODE)
}

/// A failpoint: nothing at all unless the crate is built with the `failpoints` feature.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            debug_assert!($crate::failpoints::ALL.contains(&$name));
            if fail::eval($name, |_| ()).is_some() {
                $crate::failpoints::crash($name);
            }
        }
    };
}
pub(crate) use failpoint;

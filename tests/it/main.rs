//! The integration tests, as one test binary (`cargo test --test it`): one module per area, the
//! fixture builders in `tests/common`. Filter by module: `cargo test --test it -- stage::`.

#[path = "../common/mod.rs"]
mod common;

mod arm64_overlay;
mod arm64_qemu;
mod build;
mod caps;
mod cdi;
mod cli;
mod cli_docs;
mod concurrency;
mod crash;
#[cfg(feature = "failpoints")]
mod crash_failpoints;
mod daemon;
mod daemon_flatcar;
mod daemon_hold;
mod dbus;
mod faults;
mod fetcher;
mod fuzz_regressions;
mod hostile;
mod load;
mod modinfo_files;
#[cfg(feature = "oci")]
mod oci;
mod operate;
mod pack;
mod stage;
mod timeline;
mod units;
mod watch_arm64;
mod watch_flatcar;
mod watch_generic;
mod watch_ostree;

//! nvdriver-agent: keeps precompiled NVIDIA driver overlays loaded across kernel updates on
//! image-based Linux (Fedora CoreOS / RHCOS / SCOS, Flatcar, Garden Linux).
//!
//! The modules are layered (docs/design.md has the table); each uses only the ones before it:
//!
//! - [`text`] and [`fsutil`]: line/column of an offset for messages; atomic file replacement
//!   and the path-carrying I/O error.
//! - [`modinfo`]: what a module file says of itself (ELF `.modinfo`, compression, signature).
//! - [`host`]: the [`host::Root`] every path resolves under, os-release, the running kernel's
//!   state, the version comparator.
//! - [`config`]: the shipped defaults, `/etc/nvdriver-agent/config.toml` and its drop-ins,
//!   merged into one validated [`config::Settings`].
//! - [`kmod`]: the pure [`kmod::plan::LoadPlan`], executed through the thin
//!   [`kmod::sys::Kernel`] trait, and the device nodes.
//! - [`overlay`]: manifests, verification, signatures, the local store and the sources
//!   overlays are staged from.
//! - [`watch`]: which kernel the host boots next, one detector per OS family.
//! - [`state`]: the state file in `/run/nvdriver-agent` and the daemon's instance lock.
//! - [`handoff`]: what the loaded driver is handed to: the container toolkit's config, the GPU
//!   Operator's `driver-ready` file, the CDI spec.
//! - [`app`]: the [`app::Context`] every command works with, [`app::CommandError`] and the
//!   exit codes.
//! - [`boot`]: the boot-time load of the running kernel's overlay and the fallback when it
//!   fails.
//! - [`update`]: one stage pass for the next kernel and the hold that keeps an update from
//!   booting without its driver.
//! - [`report`]: `status`, `doctor`, metrics and NFD labels, the D-Bus properties as read.
//! - [`daemon`]: `nvdriver-agent run`, the event loop and the D-Bus object it serves.
//! - [`cli`]: the clap command tree and the `overlay` subcommands.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod boot;
pub mod cli;
pub mod config;
pub mod daemon;
#[doc(hidden)]
pub mod failpoints;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod handoff;
pub mod host;
pub mod kmod;
pub mod modinfo;
pub mod overlay;
pub mod report;
pub mod state;
pub mod text;
pub mod update;
pub mod watch;

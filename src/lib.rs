//! nvdriver-agent: keeps precompiled NVIDIA driver overlays loaded across kernel updates on
//! image-based Linux (Fedora CoreOS / RHCOS / SCOS, Flatcar, Garden Linux).
//!
//! The crate is split the way the boot path runs: [`config`] and [`host`] gather facts,
//! [`overlay`] finds and verifies the overlay for a kernel, [`kmod`] turns all of that into a
//! pure [`kmod::plan::LoadPlan`] and executes it through the thin [`kmod::sys::Kernel`] trait,
//! [`runtime`] and [`readiness`] hand the driver to the container toolkit and the GPU Operator.
#![deny(unsafe_code)]

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

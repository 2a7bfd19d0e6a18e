//! nvdriver-agent: keeps precompiled NVIDIA driver overlays loaded across kernel updates on
//! image-based Linux (Fedora CoreOS / RHCOS / SCOS, Flatcar, Garden Linux).
//!
//! The crate is split the way the boot path runs: [`config`] and [`host`] gather facts,
//! [`overlay`] finds and verifies the overlay for a kernel, [`kmod`] turns all of that into a
//! pure [`kmod::plan::LoadPlan`] and executes it through the thin [`kmod::sys::Kernel`] trait,
//! [`runtime`] and [`readiness`] hand the driver to the container toolkit and the GPU Operator.
#![deny(unsafe_code)]

pub mod agent_bus;
pub mod cdi;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod doctor;
#[doc(hidden)]
pub mod failpoints;
pub mod fallback;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod hold;
pub mod host;
pub mod kmod;
pub mod outputs;
pub mod overlay;
pub mod readiness;
pub mod runtime;
pub mod stage;
pub mod state;
pub mod status;
pub mod text;
pub mod watch;

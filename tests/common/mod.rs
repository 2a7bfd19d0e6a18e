//! Fixture builders shared by the integration tests (`mod common;` in `tests/*.rs`).
#![allow(dead_code)]

pub use nvdriver_agent::modinfo::Compression;

pub mod agent;
pub mod archive;
pub mod boot;
pub mod bus;
pub mod host;
pub mod http;
pub mod modules;
pub mod ostree;
pub mod overlay;
pub mod registry;

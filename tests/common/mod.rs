//! Fixture builders shared by the integration tests (`mod common;` in `tests/it/main.rs`; the
//! examples include it too).

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
#[cfg(feature = "oci")]
pub mod registry;
pub mod tools;

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

/// The string field `key` of each object in the JSON array `array` (module names of `plan
/// --json`, node paths of a CDI spec, ...); panics if it is not that shape.
pub fn str_fields<'a>(array: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    array
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item[key].as_str().unwrap())
        .collect()
}

//! Overlays: a root-shaped tree for one (kernel release, driver version, arch) plus its
//! manifest `overlay.toml`; verification of a tree against its manifest; the local store.

pub mod manifest;
pub mod store;
pub mod verify;

pub use manifest::{Flavor, Manifest, ManifestError, MANIFEST_NAME};
pub use store::{Store, StoreError, StoredOverlay};
pub use verify::{verify_tree, VerifyError};

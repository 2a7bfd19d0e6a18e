//! Overlays: a root-shaped tree for one (kernel release, driver version, arch) plus its
//! manifest `overlay.toml`; verification of a tree against its manifest; the local store;
//! the sources overlays are staged from (directories, tar archives, HTTP(S)).

pub mod build;
pub mod enforce;
pub mod fetcher;
pub mod inspect;
pub mod key;
pub mod manifest;
pub mod pack;
pub mod signature;
pub mod source;
pub mod space;
pub mod store;
pub mod verify;

pub use manifest::{Flavor, Manifest, ManifestError, MANIFEST_NAME};
pub use source::{stage, OverlayKey, SourceError, StageReport};
pub use store::{Store, StoreError, StoreLock, StoredOverlay};
pub use verify::{verify_tree, VerifyError};

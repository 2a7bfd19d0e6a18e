//! Overlay sources and staging: the configured `[stage] sources` templates, expanded for one
//! (kernel, driver, arch), tried in order until one yields a verified overlay, which goes into
//! the store atomically.
//!
//! A template expands to a directory holding an overlay tree, a local tar archive, or an
//! `https://` (or, when allowed, `http://`) URL of one. A source that does not have the overlay
//! or gives a bad one is recorded with the reason and the next one is tried.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::{info, warn};

use super::archive::{self, ArchiveError, Limits};
use super::fetch::{self, FetchError, FetchLimits};
use super::manifest::Manifest;
use super::signature::{
    self, SignatureError, SignaturePolicy, SignatureStatus, TrustedKey, MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
};
use super::store::{self, ImportOutcome, Store, StoreError, StoreLock};
use super::verify::{sha256_bytes, verify_tree, Generated, VerifyError};
use crate::config::StageSettings;
use crate::host::Root;
use crate::kmod::modinfo::{self, ModInfo, ModinfoError};

/// An archive may unpack to at most this many times `stage.max-download-bytes`.
pub const UNPACK_RATIO: u64 = 4;
/// An archive may hold at most this many entries.
pub const MAX_ENTRIES: u64 = 100_000;

/// Which overlay to stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OverlayKey {
    pub kernel_release: String,
    pub driver_version: String,
    pub arch: String,
}

impl fmt::Display for OverlayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel {}, driver {}, {}",
            self.kernel_release, self.driver_version, self.arch
        )
    }
}

impl OverlayKey {
    /// The first field where `manifest` is not for this key: (field, expected, found).
    pub fn mismatch(&self, manifest: &Manifest) -> Option<(&'static str, String, String)> {
        [
            (
                "kernel-release",
                &self.kernel_release,
                &manifest.kernel_release,
            ),
            (
                "driver-version",
                &self.driver_version,
                &manifest.driver_version,
            ),
            ("arch", &self.arch, &manifest.arch),
        ]
        .into_iter()
        .find(|(_, expected, found)| expected != found)
        .map(|(field, expected, found)| (field, expected.clone(), found.clone()))
    }
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 3] = ["{kernel}", "{driver}", "{arch}"];

/// Fill `{kernel}`, `{driver}` and `{arch}` into a source template.
///
/// ```
/// use nvdriver_agent::overlay::source::{expand, OverlayKey};
/// let key = OverlayKey {
///     kernel_release: "6.1.0-28-cloud-amd64".into(),
///     driver_version: "570.124.06".into(),
///     arch: "x86_64".into(),
/// };
/// assert_eq!(
///     expand("https://example.com/nvidia-{driver}-{kernel}-{arch}.tar.zst", &key),
///     "https://example.com/nvidia-570.124.06-6.1.0-28-cloud-amd64-x86_64.tar.zst"
/// );
/// ```
pub fn expand(template: &str, key: &OverlayKey) -> String {
    template
        .replace("{kernel}", &key.kernel_release)
        .replace("{driver}", &key.driver_version)
        .replace("{arch}", &key.arch)
}

/// `{word}` placeholders in a template that [`expand`] does not know (typos like `{kver}`).
pub fn unknown_placeholders(template: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        let Some(close) = after.find('}') else { break };
        let candidate = &after[..=close];
        let word = &candidate[1..candidate.len() - 1];
        if !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && !PLACEHOLDERS.contains(&candidate)
        {
            unknown.push(candidate.to_string());
        }
        rest = &after[1..];
    }
    unknown
}

/// Why one source did not give the overlay.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is neither a directory nor a regular file")]
    NotAFileOrDirectory { path: PathBuf },
    #[error("unknown placeholder {placeholders}; templates may use {{kernel}}, {{driver}} and {{arch}}", placeholders = .0.join(", "))]
    UnknownPlaceholder(Vec<String>),
    #[error(
        "not a source: expected an absolute path (directory or tar archive) or an https:// URL"
    )]
    Unsupported,
    #[error("{path}: {MANIFEST} is for {field} {found:?}, but {expected:?} was asked for; the source template points at the wrong overlay", MANIFEST = super::MANIFEST_NAME)]
    WrongOverlay {
        path: PathBuf,
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error("{path}: the archive is {size} bytes, larger than stage.max-download-bytes ({limit})")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Module(#[from] ModinfoError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl AttemptError {
    /// The source simply does not have the overlay (no such file, HTTP 404).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            AttemptError::Missing { .. } | AttemptError::Fetch(FetchError::NotFound { .. })
        )
    }

    /// The source had something, and it is not a valid overlay for the key.
    pub fn is_invalid(&self) -> bool {
        match self {
            AttemptError::WrongOverlay { .. }
            | AttemptError::TooLarge { .. }
            | AttemptError::Verify(_)
            | AttemptError::Module(_) => true,
            AttemptError::Signature(e) => !matches!(e, SignatureError::Io { .. }),
            AttemptError::Archive(e) => e.is_invalid(),
            AttemptError::Fetch(FetchError::TooLarge { .. }) => true,
            AttemptError::Store(e) => !matches!(e, StoreError::Io { .. } | StoreError::Lock { .. }),
            _ => false,
        }
    }
}

/// One source that was tried and did not give the overlay.
#[derive(Debug)]
pub struct SourceAttempt {
    /// The expanded source.
    pub source: String,
    pub error: AttemptError,
}

impl fmt::Display for SourceAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.error.is_not_found() {
            "not there"
        } else {
            "failed"
        };
        write!(f, "{}: {how}: {}", self.source, self.error)
    }
}

/// What [`stage`] did.
#[derive(Debug)]
pub struct StageReport {
    /// The source the overlay came from (the store's directory when it was there already).
    pub source: String,
    pub outcome: ImportOutcome,
    /// The sources tried before it, with why each did not give the overlay.
    pub tried: Vec<SourceAttempt>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("no source has the overlay for {key}; tried:{}", list(tried))]
    NotFound {
        key: OverlayKey,
        tried: Vec<SourceAttempt>,
    },
    #[error("no source gave a valid overlay for {key}; tried:{}", list(tried))]
    Failed {
        key: OverlayKey,
        tried: Vec<SourceAttempt>,
    },
    #[error("stage.sources is empty; add where overlays come from to [stage] sources in /etc/nvdriver-agent/config.toml")]
    NoSources,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Trust(#[from] SignatureError),
}

impl SourceError {
    /// Did some source have the overlay, but only broken or for another kernel?
    pub fn any_invalid(&self) -> bool {
        match self {
            SourceError::NotFound { tried, .. } | SourceError::Failed { tried, .. } => {
                tried.iter().any(|a| a.error.is_invalid())
            }
            _ => false,
        }
    }
}

fn list(tried: &[SourceAttempt]) -> String {
    tried.iter().map(|a| format!("\n  {a}")).collect()
}

/// Stage the overlay for `key` into the store from the first configured source that has a
/// valid one. Holds the store lock throughout, and first removes what an interrupted stage
/// left. Returns at once when the store already holds a verified overlay for the key.
pub fn stage(
    root: &Root,
    store: &Store,
    settings: &StageSettings,
    key: &OverlayKey,
) -> Result<StageReport, SourceError> {
    if settings.sources.is_empty() {
        return Err(SourceError::NoSources);
    }
    let lock = store.lock()?;
    store.clean_leftovers(&lock)?;
    let trust = Trust::load(root, settings.signatures)?;
    if let Some(existing) = store.verified(&key.kernel_release, &key.driver_version, &key.arch) {
        return Ok(StageReport {
            source: existing.dir.display().to_string(),
            outcome: ImportOutcome::AlreadyPresent { dir: existing.dir },
            tried: Vec::new(),
        });
    }
    let mut tried = Vec::new();
    for template in &settings.sources {
        let source = expand(template, key);
        match stage_from(root, store, &lock, settings, &trust, key, template, &source) {
            Ok(outcome) => {
                info!(
                    KERNEL_RELEASE = %key.kernel_release,
                    DRIVER_VERSION = %key.driver_version,
                    source = %source,
                    "overlay staged"
                );
                return Ok(StageReport {
                    source,
                    outcome,
                    tried,
                });
            }
            Err(error) => {
                warn!(
                    KERNEL_RELEASE = %key.kernel_release,
                    DRIVER_VERSION = %key.driver_version,
                    source = %source,
                    "source did not give the overlay: {error}"
                );
                tried.push(SourceAttempt { source, error });
            }
        }
    }
    let key = key.clone();
    if tried.iter().all(|a| a.error.is_not_found()) {
        Err(SourceError::NotFound { key, tried })
    } else {
        Err(SourceError::Failed { key, tried })
    }
}

/// The signature policy with the trusted keys it checks against.
pub struct Trust {
    pub policy: SignaturePolicy,
    pub keys: Vec<TrustedKey>,
}

impl Trust {
    /// The policy and, unless it is `off`, the keys in `/etc/nvdriver-agent/keys.d`.
    pub fn load(root: &Root, policy: SignaturePolicy) -> Result<Trust, SignatureError> {
        let keys = if policy == SignaturePolicy::Off {
            Vec::new()
        } else {
            signature::load_trusted_keys(root)?
        };
        Ok(Trust { policy, keys })
    }

    /// Check an overlay's manifest bytes and signature; logs what was found.
    pub fn check(
        &self,
        key: &OverlayKey,
        manifest: &[u8],
        signature: Option<&str>,
        origin: &str,
    ) -> Result<SignatureStatus, SignatureError> {
        let status = signature::check(self.policy, &self.keys, manifest, signature, origin)?;
        info!(
            KERNEL_RELEASE = %key.kernel_release,
            DRIVER_VERSION = %key.driver_version,
            source = %origin,
            "overlay signature: {status}"
        );
        Ok(status)
    }
}

#[allow(clippy::too_many_arguments)]
fn stage_from(
    root: &Root,
    store: &Store,
    lock: &StoreLock,
    settings: &StageSettings,
    trust: &Trust,
    key: &OverlayKey,
    template: &str,
    source: &str,
) -> Result<ImportOutcome, AttemptError> {
    let unknown = unknown_placeholders(template);
    if !unknown.is_empty() {
        return Err(AttemptError::UnknownPlaceholder(unknown));
    }
    if source.starts_with("https://") || source.starts_with("http://") {
        return stage_url(store, lock, settings, trust, key, source);
    }
    if source.contains("://") || !source.starts_with('/') {
        return Err(AttemptError::Unsupported);
    }
    let path = root.join(source);
    let meta = match fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(AttemptError::Missing {
                path: PathBuf::from(source),
            })
        }
        Err(e) => {
            return Err(AttemptError::Io {
                path: PathBuf::from(source),
                source: e,
            })
        }
    };
    if meta.is_dir() {
        stage_directory(store, trust, key, &path, Path::new(source))
    } else if meta.is_file() {
        if meta.len() > settings.max_download_bytes {
            return Err(AttemptError::TooLarge {
                path: PathBuf::from(source),
                size: meta.len(),
                limit: settings.max_download_bytes,
            });
        }
        let file = File::open(&path).map_err(|e| AttemptError::Io {
            path: PathBuf::from(source),
            source: e,
        })?;
        stage_archive(
            store,
            lock,
            settings,
            trust,
            key,
            BufReader::new(file),
            source,
        )
    } else {
        Err(AttemptError::NotAFileOrDirectory {
            path: PathBuf::from(source),
        })
    }
}

/// An overlay tree on disk: verified, then copied into the store by [`Store::import`].
fn stage_directory(
    store: &Store,
    trust: &Trust,
    key: &OverlayKey,
    real_dir: &Path,
    host_dir: &Path,
) -> Result<ImportOutcome, AttemptError> {
    let (manifest, manifest_text) = store::read_manifest(real_dir)?;
    let signature = read_signature(real_dir)?;
    trust.check(
        key,
        manifest_text.as_bytes(),
        signature.as_deref(),
        &host_dir.display().to_string(),
    )?;
    if let Some((field, expected, found)) = key.mismatch(&manifest) {
        return Err(AttemptError::WrongOverlay {
            path: host_dir.to_path_buf(),
            field,
            expected,
            found,
        });
    }
    verify_tree(real_dir, &manifest, Generated::Refuse)?;
    check_modules(real_dir, &manifest)?;
    Ok(store.import(real_dir)?)
}

/// An archive: unpacked and verified in one pass into a staging directory of the store, the
/// modules checked, then renamed into place.
pub fn stage_archive(
    store: &Store,
    lock: &StoreLock,
    settings: &StageSettings,
    trust: &Trust,
    key: &OverlayKey,
    input: impl Read,
    name: &str,
) -> Result<ImportOutcome, AttemptError> {
    let limits = Limits {
        max_unpacked_bytes: settings.max_download_bytes.saturating_mul(UNPACK_RATIO),
        max_entries: MAX_ENTRIES,
    };
    let staging = store.begin_staging(lock, &key.kernel_release, &key.driver_version)?;
    let result = archive::extract(input, &staging, key, limits, name)
        .map_err(AttemptError::from)
        .and_then(|extracted| {
            trust.check(
                key,
                extracted.manifest_text.as_bytes(),
                extracted.signature.as_deref(),
                name,
            )?;
            check_modules(&staging, &extracted.manifest)?;
            Ok(store.publish_staged(lock, &staging, &extracted.manifest)?)
        });
    if result.is_err() {
        store.abandon_staging(&staging);
    }
    result
}

/// A URL: downloaded into `<store>/.downloads/` (kept across calls for resuming), then staged
/// like a local archive. The download is used up either way once it is complete.
fn stage_url(
    store: &Store,
    lock: &StoreLock,
    settings: &StageSettings,
    trust: &Trust,
    key: &OverlayKey,
    url: &str,
) -> Result<ImportOutcome, AttemptError> {
    if url.starts_with("http://") && !settings.allow_http {
        return Err(FetchError::HttpRefused { url: url.into() }.into());
    }
    let downloads = store.downloads_dir();
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&downloads)
        .map_err(|e| AttemptError::Io {
            path: downloads.clone(),
            source: e,
        })?;
    let part = downloads.join(part_name(key, url));
    fetch::download(
        url,
        &part,
        &FetchLimits {
            max_bytes: settings.max_download_bytes,
            timeout: settings.download_timeout,
            allow_http: settings.allow_http,
        },
    )?;
    let file = File::open(&part).map_err(|e| AttemptError::Io {
        path: part.clone(),
        source: e,
    })?;
    let result = stage_archive(store, lock, settings, trust, key, BufReader::new(file), url);
    fetch::discard_part(&part);
    result
}

/// `<kernel>_<driver>_<url digest>.part`: one per URL, recognisable by kernel for GC.
fn part_name(key: &OverlayKey, url: &str) -> String {
    format!(
        "{}_{}_{}.part",
        key.kernel_release,
        key.driver_version,
        &sha256_bytes(url.as_bytes())[..16]
    )
}

/// `overlay.toml.minisig` of an overlay directory, when it has one.
pub fn read_signature(real_dir: &Path) -> Result<Option<String>, AttemptError> {
    let path = real_dir.join(SIGNATURE_NAME);
    match File::open(&path) {
        Ok(file) => {
            let mut text = String::new();
            file.take(MAX_SIGNATURE_BYTES)
                .read_to_string(&mut text)
                .map_err(|source| AttemptError::Io {
                    path: path.clone(),
                    source,
                })?;
            Ok(Some(text))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AttemptError::Io { path, source }),
    }
}

/// Read every module of an overlay tree and check it was built for the manifest's kernel.
pub fn check_modules(dir: &Path, manifest: &Manifest) -> Result<Vec<ModInfo>, ModinfoError> {
    let mut infos = Vec::new();
    for entry in manifest.module_files() {
        let path = dir.join(&entry.path);
        let info = modinfo::read_module_file(&path)?;
        modinfo::check_vermagic(&info, &path, &manifest.kernel_release)?;
        infos.push(info);
    }
    Ok(infos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> OverlayKey {
        OverlayKey {
            kernel_release: "6.12.0-55.el10.x86_64".into(),
            driver_version: "580.65.06".into(),
            arch: "x86_64".into(),
        }
    }

    #[test]
    fn expands_every_placeholder_every_time() {
        assert_eq!(
            expand("/o/{kernel}/{driver}/{kernel}-{arch}.tar", &key()),
            "/o/6.12.0-55.el10.x86_64/580.65.06/6.12.0-55.el10.x86_64-x86_64.tar"
        );
        assert_eq!(expand("/plain", &key()), "/plain");
    }

    #[test]
    fn unknown_placeholders_are_named() {
        assert_eq!(
            unknown_placeholders("https://h/{kver}/{driver}/{ARCH}?q={}"),
            ["{kver}", "{ARCH}"]
        );
        assert!(unknown_placeholders("/o/{kernel}/{driver}-{arch}").is_empty());
    }

    #[test]
    fn key_mismatch_names_the_field() {
        let mut manifest = Manifest {
            format: super::super::manifest::FORMAT_VERSION,
            kernel_release: key().kernel_release,
            driver_version: key().driver_version,
            arch: "x86_64".into(),
            flavor: super::super::Flavor::Open,
            files: vec![],
            symlinks: vec![],
        };
        assert_eq!(key().mismatch(&manifest), None);
        manifest.arch = "aarch64".into();
        assert_eq!(
            key().mismatch(&manifest),
            Some(("arch", "x86_64".to_string(), "aarch64".to_string()))
        );
    }

    #[test]
    fn part_names_differ_by_url_and_start_with_the_kernel() {
        let a = part_name(&key(), "https://a/x.tar");
        let b = part_name(&key(), "https://b/x.tar");
        assert_ne!(a, b);
        assert!(a.starts_with("6.12.0-55.el10.x86_64_580.65.06_"), "{a}");
    }
}

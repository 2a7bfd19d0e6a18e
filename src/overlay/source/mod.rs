//! Overlay sources and staging: the configured `[stage] sources` templates, expanded for one
//! (kernel, driver, arch), tried in order until one yields a verified overlay, which goes into
//! the store atomically.
//!
//! A template expands to a directory holding an overlay tree, a local tar archive, or an
//! `https://` (or, when allowed, `http://`) URL of one. A source that does not have the overlay
//! or gives a bad one is recorded with the reason and the next one is tried.

use crate::failpoints::failpoint;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use crate::config::StageSettings;
use crate::host::Root;
use crate::modinfo::{self, ModInfo, ModinfoError};
use crate::overlay::enforce;
use crate::overlay::fetcher::FailureKind;
pub use crate::overlay::key::OverlayKey;
use crate::overlay::manifest::Manifest;
use crate::overlay::signature::{
    self, SignatureError, SignaturePolicy, SignatureStatus, TrustedKey, MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
};
use crate::overlay::source::archive::{ArchiveError, Limits};
use crate::overlay::source::http::{FetchError, FetchLimits};
use crate::overlay::space::{SpaceError, SpaceGuard};
use crate::overlay::store::{self, ImportOutcome, Store, StoreError, StoreLock};
use crate::overlay::verify::{sha256_bytes, verify_tree, Generated, VerifyError};

pub mod archive;
pub mod http;
#[cfg(feature = "oci")]
pub mod oci;
#[cfg(feature = "oci")]
pub mod push;
pub mod serve;
mod takeover;

/// An archive may unpack to at most this many times `stage.max-download-bytes`.
pub const UNPACK_RATIO: u64 = 4;
/// An archive may hold at most this many entries.
pub const MAX_ENTRIES: u64 = 100_000;

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 4] = ["{kernel}", "{driver}", "{arch}", "{os}"];

/// `{os}` of a template: the host's os-release `ID` and `VERSION_ID` run together, as the GPU
/// Operator's driver image tags spell it (`rhcos4.14`, `ubuntu22.04`, `fedora41`).
pub fn os_tag(root: &Root) -> String {
    crate::host::os_release::OsRelease::read(root)
        .map(|os| format!("{}{}", os.id, os.version_id.unwrap_or_default()))
        .unwrap_or_default()
}

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
    /// A local source (directory or archive) does not exist.
    #[error("{path} does not exist")]
    Missing {
        /// The expanded source, as a host path (not under `--root`).
        path: PathBuf,
    },
    /// A local source exists but (after following links) is neither a directory nor a
    /// regular file.
    #[error("{path} is neither a directory nor a regular file")]
    NotAFileOrDirectory {
        /// The expanded source, as a host path.
        path: PathBuf,
    },
    /// The template has `{word}` placeholders other than `{kernel}`, `{driver}`, `{arch}` and
    /// `{os}` (the list, as written).
    #[error("unknown placeholder {placeholders}; templates may use {{kernel}}, {{driver}}, {{arch}} and {{os}}", placeholders = .0.join(", "))]
    UnknownPlaceholder(Vec<String>),
    /// The expanded source is neither an absolute path nor an `http(s)://` or `oci://` URL.
    #[error(
        "not a source: expected an absolute path (directory or tar archive), an https:// URL or an oci:// reference"
    )]
    Unsupported,
    /// The source is `oci://` but this binary was built without the `oci` feature.
    #[error(
        "oci:// sources need nvdriver-agent built with the `oci` feature (the packages have it)"
    )]
    OciNotBuilt,
    /// Resolving, fetching or unpacking an `oci://` reference failed.
    #[cfg(feature = "oci")]
    #[error(transparent)]
    Oci(#[from] crate::overlay::source::oci::OciError),
    /// The source's manifest (a directory's, or the one generated from an image) is for
    /// another kernel release, driver version or architecture than asked for.
    #[error("{path}: {MANIFEST} is for {field} {found:?}, but {expected:?} was asked for; the source template points at the wrong overlay", MANIFEST = crate::overlay::MANIFEST_NAME)]
    WrongOverlay {
        /// The source directory (host path), or the image's reference and digest.
        path: PathBuf,
        /// The manifest key that differs (`kernel-release`, `driver-version` or `arch`).
        field: &'static str,
        /// The value asked for.
        expected: String,
        /// The manifest's value.
        found: String,
    },
    /// A local archive is larger than `stage.max-download-bytes`.
    #[error("{path}: the archive is {size} bytes, larger than stage.max-download-bytes ({limit})")]
    TooLarge {
        /// The archive, as a host path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// `stage.max-download-bytes`.
        limit: u64,
    },
    /// Downloading an `http(s)://` source failed (404 is a plain "not found").
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// An archive (local, downloaded, or an OCI overlay layer) was refused or could not be
    /// unpacked.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Reading a directory's manifest, staging into or publishing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A directory source, or an overlay built from an image, does not match its manifest.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A module cannot be read, was built for another kernel, or is not the module its file
    /// name says ([`check_modules`]).
    #[error(transparent)]
    Module(#[from] ModinfoError),
    /// The signature policy refused the overlay, or a signature file could not be read.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The target kernel only loads signed modules (see [`crate::overlay::enforce`]) and some
    /// of the overlay's modules carry no signature.
    #[error("kernel {kernel} only loads signed modules ({reason}), but these are unsigned: {modules}; sign them with a key the kernel trusts (enrolled MOK or built-in keyring) and repack")]
    UnsignedModules {
        /// The target kernel release.
        kernel: String,
        /// Why it enforces signatures ([`crate::overlay::enforce::enforcement_reason`]).
        reason: String,
        /// The unsigned modules' overlay paths, comma-separated.
        modules: String,
    },
    /// The overlay does not fit on the store's file system with its reserve left free (even
    /// after removing overlays no kernel needs), or writing it reached the reserve.
    #[error(transparent)]
    Space(#[from] SpaceError),
    /// Building an overlay from a plain image's modules and firmware failed.
    #[error("building the overlay from the image: {0}")]
    Pack(Box<crate::overlay::pack::PackError>),
    /// A source failed in the fetcher (`nvdriver-agent-fetch.service`); its own words.
    #[error("{message}")]
    Fetched {
        /// The fetcher's error message.
        message: String,
        /// Its class, as the fetcher judged it.
        kind: crate::overlay::fetcher::FailureKind,
    },
    /// The exchange with the fetcher failed.
    #[error(transparent)]
    Fetcher(#[from] crate::overlay::fetcher::FetcherError),
    /// What the fetcher left cannot be taken over as it is.
    #[error("what the fetcher staged: {path} {problem}; nothing of it is used")]
    Takeover {
        /// The entry.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Opening a source or a download, reading a signature file, or creating a download or
    /// scratch directory failed.
    #[error("{path}: {error}")]
    Io {
        /// What was being opened, read or created.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
}

impl AttemptError {
    /// The source simply does not have the overlay (no such file, HTTP 404).
    pub fn is_not_found(&self) -> bool {
        match self {
            AttemptError::Missing { .. } | AttemptError::Fetch(FetchError::NotFound { .. }) => true,
            AttemptError::Fetched { kind, .. } => *kind == FailureKind::NotFound,
            #[cfg(feature = "oci")]
            AttemptError::Oci(e) => e.is_not_found(),
            _ => false,
        }
    }

    /// The store's file system has no room for it (see [`crate::overlay::space`]).
    pub fn is_no_room(&self) -> bool {
        #[cfg(feature = "oci")]
        if let AttemptError::Oci(e) = self {
            return e.is_no_room();
        }
        matches!(
            self,
            AttemptError::Fetched {
                kind: FailureKind::NoRoom,
                ..
            } | AttemptError::Space(_)
                | AttemptError::Fetch(FetchError::Space { .. })
                | AttemptError::Archive(ArchiveError::Space(_))
                | AttemptError::Store(StoreError::Space(_))
        )
    }

    /// The source had something, and it is not a valid overlay for the key.
    pub fn is_invalid(&self) -> bool {
        match self {
            AttemptError::WrongOverlay { .. }
            | AttemptError::TooLarge { .. }
            | AttemptError::Verify(_)
            | AttemptError::Module(_)
            | AttemptError::Pack(_)
            | AttemptError::Takeover { .. }
            | AttemptError::Fetched {
                kind: FailureKind::Invalid,
                ..
            }
            | AttemptError::UnsignedModules { .. } => true,
            AttemptError::Signature(e) => !matches!(e, SignatureError::Io { .. }),
            AttemptError::Archive(e) => e.is_invalid(),
            #[cfg(feature = "oci")]
            AttemptError::Oci(e) => e.is_invalid(),
            AttemptError::Fetch(FetchError::TooLarge { .. }) => true,
            AttemptError::Store(e) => !matches!(
                e,
                StoreError::Io { .. } | StoreError::Lock { .. } | StoreError::Space(_)
            ),
            _ => false,
        }
    }
}

/// One source that was tried and did not give the overlay.
#[derive(Debug)]
pub struct SourceAttempt {
    /// The expanded source.
    pub source: String,
    /// Why it did not give the overlay.
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
    /// What the store did: imported, already present, or replaced.
    pub outcome: ImportOutcome,
    /// The sources tried before it, with why each did not give the overlay.
    pub tried: Vec<SourceAttempt>,
    /// For an `oci://` source: the digest the reference resolved to.
    pub digest: Option<String>,
}

/// Why [`stage`] did not put the overlay into the store.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Every source said it does not have the overlay ([`AttemptError::is_not_found`]).
    #[error("no source has the overlay for {key}; tried:{}", list(tried))]
    NotFound {
        /// The overlay asked for.
        key: OverlayKey,
        /// Every source, in configured order, with its error.
        tried: Vec<SourceAttempt>,
    },
    /// Every source failed, and at least one for another reason than not having it.
    #[error("no source gave a valid overlay for {key}; tried:{}", list(tried))]
    Failed {
        /// The overlay asked for.
        key: OverlayKey,
        /// Every source, in configured order, with its error.
        tried: Vec<SourceAttempt>,
    },
    /// `[stage] sources` is empty.
    #[error("stage.sources is empty; add where overlays come from to [stage] sources in /etc/nvdriver-agent/config.toml")]
    NoSources,
    /// Locking the store or removing an interrupted stage's leftovers failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The trusted keys could not be loaded.
    #[error(transparent)]
    Trust(#[from] SignatureError),
}

impl SourceError {
    /// Did some source have the overlay, but no room on the store's file system for it?
    pub fn any_no_room(&self) -> bool {
        match self {
            SourceError::NotFound { tried, .. } | SourceError::Failed { tried, .. } => {
                tried.iter().any(|a| a.error.is_no_room())
            }
            _ => false,
        }
    }

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
    module_tree: Option<&Path>,
) -> Result<StageReport, SourceError> {
    stage_with(root, store, settings, key, module_tree, None)
}

/// [`stage`], with the registry credentials given as the text of an `auth.json` instead of read
/// from the host (the fetcher cannot read root's file; the daemon sends it the text).
pub fn stage_with(
    root: &Root,
    store: &Store,
    settings: &StageSettings,
    key: &OverlayKey,
    module_tree: Option<&Path>,
    registry_auth: Option<&str>,
) -> Result<StageReport, SourceError> {
    if settings.sources.is_empty() {
        return Err(SourceError::NoSources);
    }
    let lock = store.lock()?;
    store.clean_leftovers(&lock)?;
    let mut trust = Trust::load(root, settings.signatures)?;
    trust.signed_modules_required = enforce::enforcement_reason(&enforce::TargetFacts::read(
        root,
        &key.kernel_release,
        module_tree,
    ));
    if trust.signed_modules_required.is_some() {
        trust.running_kernel_keys = crate::host::keyring::read_trusted_keys(root).ok().flatten();
    }
    if let Some(existing) = store.verified(&key.kernel_release, &key.driver_version, &key.arch) {
        return Ok(StageReport {
            source: existing.dir.display().to_string(),
            outcome: ImportOutcome::AlreadyPresent { dir: existing.dir },
            tried: Vec::new(),
            digest: None,
        });
    }
    let attempt = Attempt {
        root,
        store,
        lock: &lock,
        settings,
        trust: &trust,
        key,
        module_tree,
        registry_auth,
    };
    if let Some(socket) = &settings.fetcher {
        return attempt.stage_through(socket);
    }
    let mut tried = Vec::new();
    let os = os_tag(root);
    for template in &settings.sources {
        let source = expand(template, key).replace("{os}", &os);
        match attempt.stage_from(template, &source) {
            Ok((outcome, digest)) => {
                // update::stage says it once for the journal, with the store directory.
                debug!(
                    KERNEL_RELEASE = %key.kernel_release,
                    DRIVER_VERSION = %key.driver_version,
                    source = %source,
                    OCI_DIGEST = digest.as_deref().unwrap_or(""),
                    "overlay staged"
                );
                return Ok(StageReport {
                    source,
                    outcome,
                    tried,
                    digest,
                });
            }
            Err(error) => {
                // The caller's summary names every source tried and why.
                debug!(
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
    /// `trust.signatures`: whether a signature is ignored, checked when present, or required.
    pub policy: SignaturePolicy,
    /// The keys a signature must be made with; empty when the policy is `off`.
    pub keys: Vec<TrustedKey>,
    /// Why the target kernel only loads signed modules (see [`crate::overlay::enforce`]), if it does.
    pub signed_modules_required: Option<String>,
    /// The keys the *running* kernel trusts for modules (see [`crate::host::keyring`]); only a
    /// warning is drawn from them at stage time ([`enforce::next_kernel_key_warning`]).
    pub running_kernel_keys: Option<crate::host::keyring::TrustedKeys>,
}

impl Trust {
    /// The policy and, unless it is `off`, the keys in `/etc/nvdriver-agent/keys.d`.
    pub fn load(root: &Root, policy: SignaturePolicy) -> Result<Trust, SignatureError> {
        let keys = if policy == SignaturePolicy::Off {
            Vec::new()
        } else {
            signature::load_trusted_keys(root)?
        };
        Ok(Trust {
            policy,
            keys,
            signed_modules_required: None,
            running_kernel_keys: None,
        })
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
        // A good signature is worth a line of its own; "unsigned, as the policy allows" is
        // the default case and would only lengthen the story of every update.
        if matches!(status, SignatureStatus::Verified { .. }) {
            info!(
                KERNEL_RELEASE = %key.kernel_release,
                DRIVER_VERSION = %key.driver_version,
                source = %origin,
                "overlay signature: {status}"
            );
        } else {
            debug!(
                KERNEL_RELEASE = %key.kernel_release,
                DRIVER_VERSION = %key.driver_version,
                source = %origin,
                "overlay signature: {status}"
            );
        }
        Ok(status)
    }
}

/// One try at staging the overlay for `key` from one source: what every kind of source needs
/// (the host, the locked store, the limits and the trust policy to apply).
struct Attempt<'a> {
    root: &'a Root,
    store: &'a Store<'a>,
    lock: &'a StoreLock,
    settings: &'a StageSettings,
    trust: &'a Trust,
    key: &'a OverlayKey,
    module_tree: Option<&'a Path>,
    /// `auth.json`'s text, when given rather than read from the host.
    #[cfg_attr(not(feature = "oci"), allow(dead_code))]
    registry_auth: Option<&'a str>,
}

impl Attempt<'_> {
    fn stage_from(
        &self,
        template: &str,
        source: &str,
    ) -> Result<(ImportOutcome, Option<String>), AttemptError> {
        let unknown = unknown_placeholders(template);
        if !unknown.is_empty() {
            return Err(AttemptError::UnknownPlaceholder(unknown));
        }
        if source.starts_with("oci://") {
            #[cfg(feature = "oci")]
            return self
                .stage_oci(source)
                .map(|(outcome, digest)| (outcome, Some(digest)));
            #[cfg(not(feature = "oci"))]
            return Err(AttemptError::OciNotBuilt);
        }
        self.stage_local_or_url(source).map(|o| (o, None))
    }

    fn stage_local_or_url(&self, source: &str) -> Result<ImportOutcome, AttemptError> {
        if source.starts_with("https://") || source.starts_with("http://") {
            return self.stage_url(source);
        }
        if source.contains("://") || !source.starts_with('/') {
            return Err(AttemptError::Unsupported);
        }
        let path = self.root.join(source);
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
                    error: e,
                })
            }
        };
        if meta.is_dir() {
            self.stage_directory(&path, Path::new(source))
        } else if meta.is_file() {
            if meta.len() > self.settings.max_download_bytes {
                return Err(AttemptError::TooLarge {
                    path: PathBuf::from(source),
                    size: meta.len(),
                    limit: self.settings.max_download_bytes,
                });
            }
            let file = File::open(&path).map_err(|e| AttemptError::Io {
                path: PathBuf::from(source),
                error: e,
            })?;
            self.stage_archive(BufReader::new(file), meta.len(), source)
        } else {
            Err(AttemptError::NotAFileOrDirectory {
                path: PathBuf::from(source),
            })
        }
    }

    /// An overlay tree on disk: verified, then copied into the store by [`Store::import`].
    fn stage_directory(
        &self,
        real_dir: &Path,
        host_dir: &Path,
    ) -> Result<ImportOutcome, AttemptError> {
        let manifest = self.check_tree(real_dir, &host_dir.display().to_string())?;
        self.ensure_room(manifest_total(&manifest), "the overlay's files")?;
        let mut space = self.space_guard("the overlay's files");
        Ok(self.store.import_within(real_dir, &mut space)?)
    }

    /// Check the overlay tree at `dir` (`origin` names it in messages) as the one this attempt
    /// wants: its manifest and signature, the key it is for, every file (nothing unlisted), and
    /// that its modules fit the target kernel. Returns the manifest.
    fn check_tree(&self, dir: &Path, origin: &str) -> Result<Manifest, AttemptError> {
        let key = self.key;
        let (manifest, manifest_text) = store::read_manifest(dir)?;
        let signature = read_signature(dir)?;
        self.trust
            .check(key, manifest_text.as_bytes(), signature.as_deref(), origin)?;
        if let Some((field, expected, found)) = key.mismatch(&manifest) {
            return Err(AttemptError::WrongOverlay {
                path: PathBuf::from(origin),
                field,
                expected,
                found,
            });
        }
        verify_tree(dir, &manifest, Generated::Refuse)?;
        self.check_target(dir, &manifest)?;
        Ok(manifest)
    }

    /// Watches the store's file system while `what` is written.
    fn space_guard(&self, what: &'static str) -> SpaceGuard {
        let dir = self.store.dir();
        SpaceGuard::new(&self.root.join(dir), dir, self.settings.keep_free, what)
    }

    /// Refuse, before writing, unless `need` bytes fit on the store's file system with the
    /// reserve left free; when they do not, remove overlays no kernel needs and look again.
    fn ensure_room(&self, need: u64, what: &'static str) -> Result<(), AttemptError> {
        let guard = self.space_guard(what);
        let first = guard.ensure(need, what);
        let result = match first {
            Err(SpaceError::NoRoom { .. }) if self.collect_garbage() => guard.ensure(need, what),
            other => other,
        };
        if let Err(SpaceError::NoRoom { shortfall, fs, .. }) = &result {
            warn!(
                KERNEL_RELEASE = %self.key.kernel_release,
                DRIVER_VERSION = %self.key.driver_version,
                STORE = %fs.display(),
                NEED_BYTES = shortfall.need,
                FREE_BYTES = shortfall.available,
                RESERVE_BYTES = shortfall.reserve,
                FS_BYTES = shortfall.total,
                "not staging {what}: it does not fit with the reserve left free"
            );
        }
        Ok(result?)
    }

    /// Remove the overlays no kernel needs (as [`Store::gc`] would after this stage), keeping
    /// the kernel staged for, the running kernel, every stored kernel newer than it and the
    /// `keep-extra` newest others. Nothing is removed when the running kernel cannot be read.
    /// Returns whether anything was removed.
    fn collect_garbage(&self) -> bool {
        let Ok(running) = crate::host::kernel::read_kernel_release(self.root) else {
            return false;
        };
        let newer = self
            .store
            .kernel_releases()
            .unwrap_or_default()
            .into_iter()
            .filter(|k| {
                crate::host::version::version_cmp(k, &running) == std::cmp::Ordering::Greater
            });
        let keep: Vec<String> = [self.key.kernel_release.clone(), running.clone()]
            .into_iter()
            .chain(newer)
            .collect();
        match self
            .store
            .gc_locked(self.lock, &keep, self.settings.keep_extra)
        {
            Ok(removed) => {
                for dir in &removed {
                    info!(OVERLAY = %dir.display(), "removed an overlay no kernel needs, to make room");
                }
                !removed.is_empty()
            }
            Err(e) => {
                warn!("store garbage collection failed: {e}");
                false
            }
        }
    }

    /// An archive of `size` bytes: unpacked and verified in one pass into a staging directory of
    /// the store, the modules checked, then renamed into place. It must fit at its own size
    /// before unpacking starts (its manifest's total once that is read; the reserve throughout).
    fn stage_archive(
        &self,
        input: impl Read,
        size: u64,
        name: &str,
    ) -> Result<ImportOutcome, AttemptError> {
        let (store, lock, key) = (self.store, self.lock, self.key);
        self.ensure_room(size, "the unpacked overlay")?;
        let mut space = self.space_guard("the unpacked overlay");
        let limits = Limits {
            max_unpacked_bytes: self
                .settings
                .max_download_bytes
                .saturating_mul(UNPACK_RATIO),
            max_entries: MAX_ENTRIES,
        };
        let staging = store.begin_staging(lock, &key.kernel_release, &key.driver_version)?;
        let result = archive::extract(input, &staging, key, limits, name, &mut space)
            .map_err(AttemptError::from)
            .and_then(|extracted| {
                failpoint!("stage::unpacked");
                self.trust.check(
                    key,
                    extracted.manifest_text.as_bytes(),
                    extracted.signature.as_deref(),
                    name,
                )?;
                self.check_target(&staging, &extracted.manifest)?;
                failpoint!("stage::verified");
                Ok(store.publish_staged(lock, &staging, &extracted.manifest)?)
            });
        if result.is_err() {
            store.abandon_staging(&staging);
        }
        result
    }

    /// A URL: downloaded into `<store>/.downloads/` (kept across calls for resuming), then staged
    /// like a local archive. The download is used up either way once it is complete.
    fn stage_url(&self, url: &str) -> Result<ImportOutcome, AttemptError> {
        let settings = self.settings;
        if url.starts_with("http://") && !settings.allow_http {
            return Err(FetchError::HttpRefused { url: url.into() }.into());
        }
        let part = self.downloads_dir()?.join(part_name(self.key, url));
        failpoint!("stage::download");
        let limits = FetchLimits::of(settings);
        let fetch =
            || http::download_within(url, &part, &limits, &mut self.space_guard("the download"));
        match fetch() {
            Err(FetchError::Space {
                error: SpaceError::NoRoom { .. },
                ..
            }) if self.collect_garbage() => fetch(),
            other => other,
        }?;
        let file = File::open(&part).map_err(|e| AttemptError::Io {
            path: part.clone(),
            error: e,
        })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let result = self.stage_archive(BufReader::new(file), size, url);
        http::discard_part(&part);
        result
    }

    /// `<store>/.downloads`, made (mode 0700) when missing: partial downloads and OCI scratch
    /// directories, kept out of reach of other users.
    fn downloads_dir(&self) -> Result<PathBuf, AttemptError> {
        let downloads = self.store.downloads_dir();
        crate::fsutil::create_dir_all_mode(&downloads, 0o700).map_err(|e| AttemptError::Io {
            path: downloads.clone(),
            error: e,
        })?;
        Ok(downloads)
    }

    /// An `oci://` reference: resolved to a digest, its layer blobs streamed (and checked) into a
    /// scratch directory of the store, then staged as shape (a) (one layer holding an overlay
    /// archive) or built as shape (b) (a plain image's modules and firmware). Returns the digest.
    #[cfg(feature = "oci")]
    fn stage_oci(&self, source: &str) -> Result<(ImportOutcome, String), AttemptError> {
        use crate::overlay::source::oci::{self, Client, Credentials, Reference};
        let (settings, key) = (self.settings, self.key);
        let reference = Reference::parse(source)?;
        let credentials = match self.registry_auth {
            Some(text) => Credentials::parse(text, Path::new(oci::AUTH_FILE))?,
            None => Credentials::load(self.root)?,
        };
        let mut client = Client::new(
            &settings.oci,
            &credentials,
            settings.download_timeout,
            settings.max_download_bytes,
            &reference,
        );
        let resolved = client.resolve(&reference, &key.arch)?;
        info!(
            KERNEL_RELEASE = %key.kernel_release,
            DRIVER_VERSION = %key.driver_version,
            OCI_DIGEST = %resolved.digest,
            endpoint = %resolved.endpoint,
            "resolved {reference}"
        );
        let layers_total = resolved
            .layers
            .iter()
            .fold(0u64, |sum, layer| sum.saturating_add(layer.size));
        self.ensure_room(layers_total, "the image's layers")?;
        let downloads = self.downloads_dir()?;
        let scratch = tempfile::Builder::new()
            .prefix(crate::fsutil::TEMP_PREFIX)
            .tempdir_in(&downloads)
            .map_err(|e| AttemptError::Io {
                path: downloads.clone(),
                error: e,
            })?;
        let mut blobs = Vec::new();
        let mut space = self.space_guard("the image's layers");
        for (i, layer) in resolved.layers.iter().enumerate() {
            let path = scratch.path().join(format!("layer-{i}"));
            client.fetch_blob(&resolved, &reference.repository, layer, &path, &mut space)?;
            blobs.push(path);
        }
        let name = format!("{reference} ({})", resolved.digest);
        let outcome = if blobs.len() == 1 && oci::layer_is_overlay(&blobs[0])? {
            let file = File::open(&blobs[0]).map_err(|e| AttemptError::Io {
                path: blobs[0].clone(),
                error: e,
            })?;
            self.stage_archive(BufReader::new(file), resolved.layers[0].size, &name)?
        } else {
            self.stage_image(&blobs, scratch.path(), &name)?
        };
        Ok((outcome, resolved.digest))
    }

    /// Shape (b): apply the image's layers into a scratch tree, pack the target kernel's NVIDIA
    /// modules and the driver's firmware into an overlay with a generated manifest, verify it and
    /// publish it.
    #[cfg(feature = "oci")]
    fn stage_image(
        &self,
        layers: &[PathBuf],
        scratch: &Path,
        name: &str,
    ) -> Result<ImportOutcome, AttemptError> {
        use crate::overlay::pack::{self, PackInput};
        use crate::overlay::source::oci::{self, ApplyLimits, OciError};
        let (store, lock, key) = (self.store, self.lock, self.key);
        let tree = scratch.join("rootfs");
        fs::create_dir(&tree).map_err(|e| AttemptError::Io {
            path: tree.clone(),
            error: e,
        })?;
        oci::apply_layers(
            layers,
            &tree,
            ApplyLimits {
                max_unpacked_bytes: self
                    .settings
                    .max_download_bytes
                    .saturating_mul(UNPACK_RATIO),
                max_entries: MAX_ENTRIES,
            },
        )?;
        let in_tree = |path: String| -> Option<PathBuf> {
            let resolved = oci::resolve_in(&tree, Path::new(&path)).ok()?;
            let real = tree.join(resolved);
            fs::symlink_metadata(&real)
                .is_ok_and(|m| m.is_dir())
                .then_some(real)
        };
        let no_modules = || OciError::NoModules {
            reference: name.to_string(),
            kernel: key.kernel_release.clone(),
        };
        let modules =
            in_tree(format!("lib/modules/{}", key.kernel_release)).ok_or_else(no_modules)?;
        let firmware = in_tree(format!("lib/firmware/nvidia/{}", key.driver_version));
        let packed = match pack::plan(&PackInput {
            modules,
            firmware,
            userspace: None,
            arch: key.arch.clone(),
        }) {
            Ok(packed) => packed,
            Err(pack::PackError::NoModules { .. }) => return Err(no_modules().into()),
            Err(e) => return Err(AttemptError::Pack(Box::new(e))),
        };
        if let Some((field, expected, found)) = key.mismatch(&packed.manifest) {
            return Err(AttemptError::WrongOverlay {
                path: PathBuf::from(name),
                field,
                expected,
                found,
            });
        }
        // A generated manifest carries no signature: under `require` such images are refused.
        self.trust
            .check(key, packed.manifest_text.as_bytes(), None, name)?;
        let staging = store.begin_staging(lock, &key.kernel_release, &key.driver_version)?;
        let result = (|| {
            fs::remove_dir(&staging).map_err(|e| AttemptError::Io {
                path: staging.clone(),
                error: e,
            })?;
            packed
                .write_dir(&staging)
                .map_err(|e| AttemptError::Pack(Box::new(e)))?;
            crate::fsutil::sync_tree(&staging).map_err(|e| AttemptError::Io {
                path: staging.clone(),
                error: e,
            })?;
            verify_tree(&staging, &packed.manifest, Generated::Refuse)?;
            self.check_target(&staging, &packed.manifest)?;
            Ok(store.publish_staged(lock, &staging, &packed.manifest)?)
        })();
        if result.is_err() {
            store.abandon_staging(&staging);
        }
        result
    }

    /// [`check_modules`], and when the target kernel only loads signed modules, that every module
    /// carries a signature.
    fn check_target(&self, dir: &Path, manifest: &Manifest) -> Result<(), AttemptError> {
        let infos = check_modules(dir, manifest)?;
        let Some(reason) = &self.trust.signed_modules_required else {
            return Ok(());
        };
        let unsigned: Vec<String> = manifest
            .module_files()
            .zip(&infos)
            .filter(|(_, info)| info.signature.is_none())
            .map(|(entry, _)| entry.path.display().to_string())
            .collect();
        if unsigned.is_empty() {
            for (entry, info) in manifest.module_files().zip(&infos) {
                let warning = enforce::next_kernel_key_warning(
                    &self.key.kernel_release,
                    info.signature.as_ref(),
                    self.trust.running_kernel_keys.as_ref(),
                );
                if let Some(warning) = warning {
                    tracing::warn!(KERNEL_RELEASE = %self.key.kernel_release, MODULE = %entry.path.display(), "{warning}");
                }
            }
            Ok(())
        } else {
            Err(AttemptError::UnsignedModules {
                kernel: self.key.kernel_release.clone(),
                reason: reason.clone(),
                modules: unsigned.join(", "),
            })
        }
    }
}

/// The bytes of the files a manifest lists.
pub fn manifest_total(manifest: &Manifest) -> u64 {
    manifest
        .files
        .iter()
        .fold(0u64, |sum, f| sum.saturating_add(f.size))
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
                    error: source,
                })?;
            Ok(Some(text))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AttemptError::Io {
            path,
            error: source,
        }),
    }
}

/// Read every module of an overlay tree and check it was built for the manifest's kernel and
/// is the module its file name says.
pub fn check_modules(dir: &Path, manifest: &Manifest) -> Result<Vec<ModInfo>, ModinfoError> {
    let mut infos = Vec::new();
    for entry in manifest.module_files() {
        let path = dir.join(&entry.path);
        let info = modinfo::read_module_file(&path)?;
        modinfo::check_vermagic(&info, &path, &manifest.kernel_release)?;
        modinfo::check_arch(&info, &path, &manifest.arch)?;
        // The loader refuses this too; refusing it here keeps such an overlay out of the store.
        let file_name = modinfo::name_from_path(&path).unwrap_or_default();
        if info.name.replace('-', "_") != file_name {
            return Err(ModinfoError::NameMismatch {
                path,
                file_name,
                claimed: info.name,
            });
        }
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
            format: crate::overlay::manifest::FORMAT_VERSION,
            kernel_release: key().kernel_release,
            driver_version: key().driver_version,
            arch: "x86_64".into(),
            flavor: crate::overlay::Flavor::Open,
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

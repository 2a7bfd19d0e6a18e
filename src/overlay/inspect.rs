//! `nvdriver-agent overlay inspect REF`: what an overlay directory, archive, URL or OCI image
//! holds (manifest, modules with the kernel each was built for, signature status, digest),
//! read into a temporary directory and thrown away; the store is not touched.

use crate::fsutil::{PathIoError, WithPath};
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::StageSettings;
use crate::host::Root;
use crate::modinfo;
use crate::overlay::manifest::{Flavor, Manifest, ManifestError, MANIFEST_NAME};
use crate::overlay::signature::{self, SignaturePolicy, SIGNATURE_NAME};
use crate::overlay::source::archive::{self, ArchiveError, Limits};
use crate::overlay::source::http::{self, FetchError, FetchLimits};
use crate::overlay::source::{
    read_signature, AttemptError, OverlayKey, Trust, MAX_ENTRIES, UNPACK_RATIO,
};
use crate::overlay::store::{self, StoreError};
use crate::overlay::verify::{sha256_reader, verify_tree, Generated};

/// A manifest larger than this is not a manifest.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// One kernel module found in the inspected overlay or image (modules whose `.modinfo`
/// cannot be read are left out).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ModuleSummary {
    /// The module file, relative to the overlay (or image) root.
    pub path: PathBuf,
    /// The module name from its `.modinfo`, as the kernel spells it (underscores).
    pub name: String,
    /// Its `version=` from `.modinfo`, when it has one.
    pub version: Option<String>,
    /// The kernel release its vermagic names.
    pub kernel_release: String,
    /// Whether the file carries an appended module signature (not checked against any key).
    pub signed: bool,
}

/// The headline facts of an overlay's manifest.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ManifestSummary {
    /// The kernel release the overlay is for.
    pub kernel_release: String,
    /// The NVIDIA driver version.
    pub driver_version: String,
    /// The architecture.
    pub arch: String,
    /// Open or proprietary modules.
    pub flavor: Flavor,
    /// How many regular files the manifest lists.
    pub files: usize,
    /// How many symlinks the manifest lists.
    pub symlinks: usize,
    /// Whether it carries firmware ([`Manifest::has_firmware`]).
    pub firmware: bool,
    /// Whether it carries user space ([`Manifest::has_userspace`]).
    pub userspace: bool,
    /// The driver services its user space can run ([`crate::handoff::services::carried`]).
    pub services: Vec<crate::handoff::services::DriverService>,
}

/// What `overlay inspect` found; printed by [`render`] or serialised as JSON.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Inspection {
    /// The reference, as given on the command line.
    pub source: String,
    /// `directory`, `archive`, `oci-overlay` (shape a) or `oci-image` (shape b).
    pub kind: &'static str,
    /// The OCI digest the reference resolved to, or an archive's sha256.
    pub digest: Option<String>,
    /// The overlay's manifest (none for a plain image).
    pub manifest: Option<ManifestSummary>,
    /// "verified" or why the tree does not match its manifest.
    pub contents: String,
    /// The signature as the configured trust sees it (`require` reported like `if-present`).
    pub signature: String,
    /// The kernel modules found: the manifest's (those present and readable) for an
    /// overlay, every `nvidia*` module under `usr/lib/modules` or `lib/modules` for a plain
    /// image.
    pub modules: Vec<ModuleSummary>,
}

/// Why an overlay could not be inspected at all. A tree or archive that does not match its
/// manifest is no error: [`Inspection::contents`] says so.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The reference is a local path that is neither a directory nor a regular file.
    #[error(
        "{0:?} is neither a directory, a tar archive, an http(s):// URL nor an oci:// reference"
    )]
    Unsupported(String),
    /// An archive (local, downloaded, or an OCI overlay layer) has no `overlay.toml` at its
    /// top.
    #[error("{source_ref}: no {MANIFEST_NAME} in the archive; an overlay archive holds {MANIFEST_NAME} at its top")]
    NoManifest {
        /// The reference, as given.
        source_ref: String,
    },
    /// An archive's `overlay.toml` does not parse or validate.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// An archive is not a tar, or cannot be read while looking for its manifest.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Downloading an `http(s)://` reference failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A directory's manifest is missing, unreadable or invalid.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A directory's signature file could not be read, or the binary lacks `oci` support.
    #[error(transparent)]
    Attempt(#[from] AttemptError),
    /// The trusted keys could not be loaded.
    #[error(transparent)]
    Signature(#[from] signature::SignatureError),
    /// Resolving, fetching or unpacking an `oci://` reference failed.
    #[cfg(feature = "oci")]
    #[error(transparent)]
    Oci(#[from] crate::overlay::source::oci::OciError),
    /// The local path could not be examined, or a temporary directory could not be made or
    /// read.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// Inspect `reference`: a local directory or archive (paths as given, not under `root`), an
/// `http(s)://` URL or an `oci://` reference. `root` gives the trusted keys and registry
/// credentials; `settings` the limits, signature policy and `[oci]` settings.
pub fn inspect(
    root: &Root,
    settings: &StageSettings,
    reference: &str,
) -> Result<Inspection, InspectError> {
    let policy = match settings.signatures {
        SignaturePolicy::Off => SignaturePolicy::Off,
        _ => SignaturePolicy::IfPresent,
    };
    let trust = Trust::load(root, policy)?;
    let scratch = tempfile::tempdir().with_path(Path::new("temporary directory"))?;
    if reference.starts_with("oci://") {
        #[cfg(feature = "oci")]
        return inspect_oci(root, settings, &trust, reference, scratch.path());
        #[cfg(not(feature = "oci"))]
        return Err(AttemptError::OciNotBuilt.into());
    }
    if reference.starts_with("https://") || reference.starts_with("http://") {
        let part = scratch.path().join("download.part");
        http::download(reference, &part, &FetchLimits::of(settings))?;
        return inspect_archive(settings, &trust, &part, reference, scratch.path());
    }
    let path = Path::new(reference);
    let meta = fs::metadata(path).with_path(path)?;
    if meta.is_dir() {
        inspect_dir(&trust, path, reference, "directory", None)
    } else if meta.is_file() {
        inspect_archive(settings, &trust, path, reference, scratch.path())
    } else {
        Err(InspectError::Unsupported(reference.to_string()))
    }
}

fn signature_status(
    trust: &Trust,
    manifest: &[u8],
    signature: Option<&str>,
    origin: &str,
) -> String {
    match signature::check(trust.policy, &trust.keys, manifest, signature, origin) {
        Ok(status) => status.to_string(),
        Err(e) => format!("REFUSED: {e}"),
    }
}

fn modules_of(dir: &Path, paths: impl Iterator<Item = PathBuf>) -> Vec<ModuleSummary> {
    paths
        .filter_map(|relative| {
            let info = modinfo::read_module_file(&dir.join(&relative)).ok()?;
            Some(ModuleSummary {
                kernel_release: modinfo::vermagic_release(&info.vermagic).to_string(),
                name: info.name,
                version: info.version,
                signed: info.signature.is_some(),
                path: relative,
            })
        })
        .collect()
}

fn inspect_dir(
    trust: &Trust,
    dir: &Path,
    source: &str,
    kind: &'static str,
    digest: Option<String>,
) -> Result<Inspection, InspectError> {
    let (manifest, text) = store::read_manifest(dir)?;
    let signature = read_signature(dir)?;
    let contents = match verify_tree(dir, &manifest, Generated::Refuse) {
        Ok(()) => "verified".to_string(),
        Err(e) => format!("DOES NOT MATCH ITS MANIFEST: {e}"),
    };
    Ok(Inspection {
        source: source.to_string(),
        kind,
        digest,
        signature: signature_status(trust, text.as_bytes(), signature.as_deref(), source),
        modules: modules_of(dir, manifest.module_files().map(|f| f.path.clone())),
        manifest: Some(summary(&manifest)),
        contents,
    })
}

fn summary(manifest: &Manifest) -> ManifestSummary {
    ManifestSummary {
        kernel_release: manifest.kernel_release.clone(),
        driver_version: manifest.driver_version.clone(),
        arch: manifest.arch.clone(),
        flavor: manifest.flavor,
        files: manifest.files.len(),
        symlinks: manifest.symlinks.len(),
        firmware: manifest.has_firmware(),
        userspace: manifest.has_userspace(),
        services: crate::handoff::services::carried(
            manifest.files.iter().filter_map(|f| f.path.to_str()),
        ),
    }
}

/// `overlay.toml` of an archive, read without unpacking anything.
fn manifest_of_archive(file: &Path, name: &str) -> Result<Option<String>, InspectError> {
    let input = BufReader::new(File::open(file).with_path(file)?);
    let mut tar = tar::Archive::new(archive::decompress(input, name)?);
    let read_err = |source| ArchiveError::Read {
        archive: name.to_string(),
        error: source,
    };
    for entry in tar.entries().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = PathBuf::from(String::from_utf8_lossy(&entry.path_bytes()).into_owned());
        if archive::plain_relative(&path).ok().flatten().as_deref()
            == Some(Path::new(MANIFEST_NAME))
        {
            let mut text = String::new();
            entry
                .take(MAX_MANIFEST_BYTES)
                .read_to_string(&mut text)
                .map_err(read_err)?;
            return Ok(Some(text));
        }
    }
    Ok(None)
}

/// An archive: its manifest read first (it names the key), then unpacked and verified into a
/// scratch directory like staging would.
fn inspect_archive(
    settings: &StageSettings,
    trust: &Trust,
    file: &Path,
    source: &str,
    scratch: &Path,
) -> Result<Inspection, InspectError> {
    let digest = sha256_reader(File::open(file).with_path(file)?, u64::MAX)
        .with_path(file)?
        .1;
    inspect_archive_as(
        settings,
        trust,
        file,
        source,
        scratch,
        "archive",
        Some(format!("sha256:{digest}")),
    )
}

fn inspect_archive_as(
    settings: &StageSettings,
    trust: &Trust,
    file: &Path,
    source: &str,
    scratch: &Path,
    kind: &'static str,
    digest: Option<String>,
) -> Result<Inspection, InspectError> {
    let Some(text) = manifest_of_archive(file, source)? else {
        return Err(InspectError::NoManifest {
            source_ref: source.to_string(),
        });
    };
    let manifest = Manifest::parse(&text, &Path::new(source).join(MANIFEST_NAME))?;
    let key = OverlayKey {
        kernel_release: manifest.kernel_release.clone(),
        driver_version: manifest.driver_version.clone(),
        arch: manifest.arch.clone(),
    };
    let tree = scratch.join("tree");
    fs::create_dir(&tree).with_path(&tree)?;
    let input = BufReader::new(File::open(file).with_path(file)?);
    let limits = Limits {
        max_unpacked_bytes: settings.max_download_bytes.saturating_mul(UNPACK_RATIO),
        max_entries: MAX_ENTRIES,
    };
    let (contents, signature) = match archive::extract(
        input,
        &tree,
        &key,
        limits,
        source,
        &mut crate::overlay::space::SpaceGuard::unchecked(),
    ) {
        Ok(extracted) => ("verified".to_string(), extracted.signature),
        Err(e) => (format!("DOES NOT MATCH ITS MANIFEST: {e}"), None),
    };
    let signature = match signature {
        Some(sig) => Some(sig),
        // A refused archive may still carry one; report what it says.
        None => fs::read_to_string(tree.join(SIGNATURE_NAME)).ok(),
    };
    Ok(Inspection {
        source: source.to_string(),
        kind,
        digest,
        signature: signature_status(trust, text.as_bytes(), signature.as_deref(), source),
        modules: modules_of(
            &tree,
            manifest
                .module_files()
                .map(|f| f.path.clone())
                .filter(|p| tree.join(p).is_file()),
        ),
        manifest: Some(summary(&manifest)),
        contents,
    })
}

#[cfg(feature = "oci")]
fn inspect_oci(
    root: &Root,
    settings: &StageSettings,
    trust: &Trust,
    source: &str,
    scratch: &Path,
) -> Result<Inspection, InspectError> {
    use crate::overlay::source::oci::{self, ApplyLimits, Client, Credentials, Reference};
    let reference = Reference::parse(source)?;
    let credentials = Credentials::load(root)?;
    let mut client = Client::new(
        &settings.oci,
        &credentials,
        settings.download_timeout,
        settings.max_download_bytes,
        &reference,
    );
    let resolved = client.resolve(&reference, &crate::host::machine_arch())?;
    let mut blobs = Vec::new();
    for (i, layer) in resolved.layers.iter().enumerate() {
        let path = scratch.join(format!("layer-{i}"));
        // A scratch directory, not the store: no reserve to keep.
        let mut unchecked = crate::overlay::space::SpaceGuard::unchecked();
        client.fetch_blob(
            &resolved,
            &reference.repository,
            layer,
            &path,
            &mut unchecked,
        )?;
        blobs.push(path);
    }
    if blobs.len() == 1 && oci::layer_is_overlay(&blobs[0])? {
        return inspect_archive_as(
            settings,
            trust,
            &blobs[0],
            source,
            scratch,
            "oci-overlay",
            Some(resolved.digest),
        );
    }
    let tree = scratch.join("rootfs");
    fs::create_dir(&tree).with_path(&tree)?;
    oci::apply_layers(
        &blobs,
        &tree,
        ApplyLimits {
            max_unpacked_bytes: settings.max_download_bytes.saturating_mul(UNPACK_RATIO),
            max_entries: MAX_ENTRIES,
        },
    )?;
    // Every kernel's NVIDIA modules, wherever the image keeps its module trees.
    let mut modules = Vec::new();
    for base in ["usr/lib/modules", "lib/modules"] {
        let Ok(resolved_base) = oci::resolve_in(&tree, Path::new(base)) else {
            continue;
        };
        if modules
            .iter()
            .any(|m: &ModuleSummary| m.path.starts_with(&resolved_base))
        {
            continue;
        }
        let mut found = Vec::new();
        collect_nvidia(&tree, &resolved_base, &mut found);
        found.sort();
        modules.extend(modules_of(&tree, found.into_iter()));
    }
    Ok(Inspection {
        source: source.to_string(),
        kind: "oci-image",
        digest: Some(resolved.digest),
        manifest: None,
        contents: "plain image: an overlay is built from its modules at stage time".into(),
        signature: "none (a plain image has no overlay manifest to sign)".into(),
        modules,
    })
}

#[cfg(feature = "oci")]
fn collect_nvidia(tree: &Path, relative: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(tree.join(relative)) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = relative.join(entry.file_name());
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() {
            collect_nvidia(tree, &path, found);
        } else if kind.is_file()
            && name.starts_with("nvidia")
            && crate::overlay::manifest::is_module_file_name(&name)
        {
            found.push(path);
        }
    }
}

/// The text `overlay inspect` prints.
pub fn render(inspection: &Inspection) -> String {
    let mut out = format!(
        "source:    {}\nkind:      {}\n",
        inspection.source, inspection.kind
    );
    if let Some(digest) = &inspection.digest {
        out.push_str(&format!("digest:    {digest}\n"));
    }
    if let Some(m) = &inspection.manifest {
        out.push_str(&format!(
            "overlay:   kernel {}, driver {}, {}, {}; {} files, {} links{}{}\n",
            m.kernel_release,
            m.driver_version,
            m.arch,
            match m.flavor {
                Flavor::Open => "open",
                Flavor::Proprietary => "proprietary",
            },
            m.files,
            m.symlinks,
            if m.firmware { ", firmware" } else { "" },
            if m.userspace { ", user space" } else { "" },
        ));
    }
    if let Some(m) = &inspection.manifest {
        let services: Vec<&str> = m.services.iter().map(|s| s.name()).collect();
        out.push_str(&format!(
            "services:  {}\n",
            if services.is_empty() {
                "none (no nvidia-persistenced, nv-fabricmanager or nvlsm in usr/bin)".to_string()
            } else {
                services.join(", ")
            }
        ));
    }
    out.push_str(&format!("contents:  {}\n", inspection.contents));
    out.push_str(&format!("signature: {}\n", inspection.signature));
    out.push_str("modules:\n");
    if inspection.modules.is_empty() {
        out.push_str("  (none)\n");
    }
    for m in &inspection.modules {
        out.push_str(&format!(
            "  {}  {} {}  built for {}  {}\n",
            m.path.display(),
            m.name,
            m.version.as_deref().unwrap_or("-"),
            m.kernel_release,
            if m.signed { "signed" } else { "unsigned" }
        ));
    }
    out
}

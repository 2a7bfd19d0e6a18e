//! Overlays from OCI registries (cargo feature `oci`): the registry v2 protocol over the same
//! `ureq` client as HTTP sources.
//!
//! A reference `oci://registry/repo:tag` (or `@sha256:…`) is resolved to a manifest digest
//! first (an image index is narrowed to `linux/<arch>`), then every layer blob is streamed into
//! the store's download directory while its sha256 is checked against the manifest. Auth comes
//! from `/etc/nvdriver-agent/auth.json` (containers' `auth.json` format): Basic credentials
//! directly, or exchanged for a Bearer token when the registry's `WWW-Authenticate` asks for
//! one. Plain HTTP is used only for registries listed in `[oci] insecure-registries`; mirrors
//! from `[oci] mirrors` are tried in order before the registry itself.
//!
//! Two image shapes are understood: (a) a single layer holding an overlay tree with
//! `overlay.toml` (staged like any archive), and (b) a plain container image whose layers are
//! applied in order, whiteouts included, into a scratch tree from which the NVIDIA modules for
//! the target kernel and their firmware are packed into an overlay (see [`apply_layers`]).

use crate::fsutil::{PathIoError, WithPath};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::overlay::space::SpaceGuard;
use tracing::{debug, info};

use crate::config::OciSettings;
use crate::host::Root;
use crate::overlay::source::archive::{self, plain_relative, ArchiveError};
use crate::overlay::MANIFEST_NAME;

/// Where registry credentials live (a host path).
pub const AUTH_FILE: &str = "/etc/nvdriver-agent/auth.json";
/// Image manifests and indexes larger than this are refused.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// A token response larger than this is refused.
const MAX_TOKEN_BYTES: u64 = 1 << 20;
/// Symlinks followed while resolving one path inside an image.
const MAX_LINK_HOPS: u32 = 40;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A parsed `oci://` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// The repository path on the registry (`nvidia/driver`): lower-case, `/`-separated.
    pub repository: String,
    /// The tag after the last `:`, when given.
    pub tag: Option<String>,
    /// `sha256:<hex>`.
    pub digest: Option<String>,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Why an `oci://` reference could not be resolved, fetched or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The text is not `oci://registry/repository:tag` or `…@sha256:<hex>`.
    #[error("{reference:?} is not an OCI reference: {why}; expected oci://registry/repository:tag or oci://registry/repository@sha256:<64 hex digits>")]
    BadReference {
        /// The text as given.
        reference: String,
        /// Which part is wrong.
        why: &'static str,
    },
    /// The registry answered 404 for a manifest or blob.
    #[error("{url}: not in the registry (HTTP {status})")]
    NotFound {
        /// The URL requested.
        url: String,
        /// The HTTP status (404).
        status: u16,
    },
    /// The registry or its token service answered 401 or 403, after any auth challenge
    /// was answered.
    #[error("{url}: the registry refused access (HTTP {status}){hint}")]
    Unauthorized {
        /// The registry or token-service URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What to do about the credentials, starting with `; `.
        hint: String,
    },
    /// The registry answered another status than 200, 401, 403 or 404.
    #[error("{url}: the registry answered HTTP {status}; expected 200")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// A manifest or blob hashed to another digest than the one asked for (or, by tag, than
    /// the registry's `Docker-Content-Digest`).
    #[error("{what}: sha256 is {found}, but {expected} was expected: the registry served different bytes than the manifest names (tampered or corrupt); nothing was staged")]
    DigestMismatch {
        /// The manifest or blob, as `manifest <host/path>` or `blob <host/path>`.
        what: String,
        /// The digest expected (`sha256:<hex>`).
        expected: String,
        /// The digest computed (`sha256:<hex>`).
        found: String,
    },
    /// Writing a blob would take the store's file system into its reserve.
    #[error(transparent)]
    Space(crate::overlay::space::SpaceError),
    /// A manifest, token response or blob is larger than allowed, the image's layers add up
    /// to more than `stage.max-download-bytes`, or applying the layers exceeds its bounds.
    #[error("{what} is larger than {limit} bytes{}", hint)]
    TooLarge {
        /// What was too large.
        what: String,
        /// The bound in bytes (or entries, for an image's entry count).
        limit: u64,
        /// A remedy or explanation to append (may be empty).
        hint: &'static str,
    },
    /// The pull ran past its one deadline (`stage.download-timeout-secs`).
    #[error("{reference}: not finished after {timeout:?} (stage.download-timeout-secs)")]
    TimedOut {
        /// The reference being pulled.
        reference: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The image index has no `linux/<arch>` entry.
    #[error("{url}: the image index has no linux/{arch} image (it has: {found})")]
    NoPlatform {
        /// The index, as `host/v2/<repository>/manifests/<ref>`.
        url: String,
        /// The OCI architecture looked for (`amd64`, `arm64`, …).
        arch: String,
        /// The `os/architecture` pairs the index lists, comma-separated.
        found: String,
    },
    /// A manifest is not JSON, has no layers or malformed digests, or a Bearer challenge or
    /// token response is unusable (no realm, plain-http realm, not JSON).
    #[error("{url}: not a usable image manifest: {why}")]
    BadManifest {
        /// The manifest, endpoint or token URL concerned.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// `auth.json` is not valid JSON or an `auth` value is not base64 of `user:password`.
    #[error("{path}: not a containers auth.json: {why}")]
    BadAuthFile {
        /// The file, as a host path ([`AUTH_FILE`]).
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A plain image (shape b) has no module directory for the target kernel, or no NVIDIA
    /// modules in it.
    #[error("{reference}: the image has no NVIDIA modules for kernel {kernel} (looked in lib/modules/{kernel} and usr/lib/modules/{kernel})")]
    NoModules {
        /// The reference with its digest.
        reference: String,
        /// The target kernel release.
        kernel: String,
    },
    /// A layer entry's path is absolute, contains `..` or a control character, or resolves
    /// through too many or unreadable symlinks.
    #[error("{layer}: entry {entry:?} {why}; the image is refused")]
    Layer {
        /// The layer blob's file name.
        layer: String,
        /// The entry's path.
        entry: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Every endpoint (mirrors, then the registry) failed; each with its own error.
    #[error("every endpoint failed:{}", .tried.iter().map(|(host, e)| format!("\n    {host}: {e}")).collect::<String>())]
    Endpoints {
        /// `(host[:port], error)` per endpoint, in the order tried.
        tried: Vec<(String, OciError)>,
    },
    /// A layer blob is not a tar in a supported compression, or its stream could not be
    /// decoded.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A request failed before a status came back (DNS, connect, TLS, redirects, …).
    #[error("{url}: {error}")]
    Http {
        /// The URL requested.
        url: String,
        /// ureq's error.
        error: Box<ureq::Error>,
    },
    /// Reading `auth.json`, a response body or a layer, or writing a blob or the scratch
    /// tree, failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

impl OciError {
    /// The registry does not have the image (every endpoint said so).
    pub fn is_not_found(&self) -> bool {
        match self {
            OciError::NotFound { .. } | OciError::NoModules { .. } => true,
            OciError::Endpoints { tried } => tried.iter().all(|(_, e)| e.is_not_found()),
            _ => false,
        }
    }

    /// A blob did not fit with the store's reserve left free.
    pub fn is_no_room(&self) -> bool {
        matches!(self, OciError::Space(_))
    }

    /// The registry served something wrong (as opposed to being unreachable).
    pub fn is_invalid(&self) -> bool {
        match self {
            OciError::DigestMismatch { .. }
            | OciError::TooLarge { .. }
            | OciError::BadManifest { .. }
            | OciError::Layer { .. }
            | OciError::NoPlatform { .. } => true,
            OciError::Archive(e) => e.is_invalid(),
            OciError::Endpoints { tried } => tried.iter().any(|(_, e)| e.is_invalid()),
            _ => false,
        }
    }
}

fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Reference {
    /// Parse `oci://registry[:port]/repo[/more]:tag` or `…@sha256:…` (both may be given; the
    /// digest wins).
    pub fn parse(text: &str) -> Result<Reference, OciError> {
        let bad = |why| OciError::BadReference {
            reference: text.to_string(),
            why,
        };
        let rest = text.strip_prefix("oci://").ok_or(bad("no oci:// prefix"))?;
        let (rest, digest) = match rest.split_once('@') {
            Some((rest, digest)) if is_digest(digest) => (rest, Some(digest.to_string())),
            Some(_) => return Err(bad("the digest is not sha256:<64 lowercase hex digits>")),
            None => (rest, None),
        };
        let (registry, path) = rest.split_once('/').ok_or(bad("no repository"))?;
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(bad("the registry is not a host[:port]"));
        }
        // A colon after the last slash starts the tag.
        let (repository, tag) = match path.rfind(':') {
            Some(i) if !path[i..].contains('/') => (&path[..i], Some(path[i + 1..].to_string())),
            _ => (path, None),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                    })
            });
        if !repo_ok {
            return Err(bad(
                "the repository must be lower-case letters, digits and . _ - separated by /",
            ));
        }
        if let Some(tag) = &tag {
            let tag_ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !tag_ok {
                return Err(bad(
                    "the tag must be up to 128 letters, digits and . _ - (check the template's values)",
                ));
            }
        }
        if tag.is_none() && digest.is_none() {
            return Err(bad("neither a tag nor a digest"));
        }
        Ok(Reference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .expect("parse demands one")
    }
}

/// Registry credentials from `auth.json`: host → (user, password).
#[derive(Clone, Default)]
pub struct Credentials {
    entries: BTreeMap<String, (String, String)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
}

impl Credentials {
    /// Parse an `auth.json` (`{"auths": {"host": {"auth": base64("user:password")}}}`). Keys
    /// may carry a scheme or a path (`https://host/v1/`); only the host counts.
    pub fn parse(text: &str, path: &Path) -> Result<Credentials, OciError> {
        let bad = |why: String| OciError::BadAuthFile {
            path: path.to_path_buf(),
            why,
        };
        let file: AuthFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut entries = BTreeMap::new();
        for (key, entry) in file.auths {
            let Some(auth) = entry.auth else { continue };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| bad(format!("{key}: auth is not base64: {e}")))?;
            let decoded =
                String::from_utf8(decoded).map_err(|_| bad(format!("{key}: auth is not UTF-8")))?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| bad(format!("{key}: auth is not base64(\"user:password\")")))?;
            let host = key
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            entries.insert(host, (user.to_string(), password.to_string()));
        }
        Ok(Credentials { entries })
    }

    /// [`AUTH_FILE`] under `root`; none when it does not exist.
    pub fn load(root: &Root) -> Result<Credentials, OciError> {
        let path = root.join(AUTH_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Credentials::parse(&text, Path::new(AUTH_FILE)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Credentials::default()),
            Err(source) => Err(OciError::Io(PathIoError::new(path, source))),
        }
    }

    /// The Basic Authorization value for `host`, when auth.json has credentials for it.
    pub(crate) fn basic(&self, host: &str) -> Option<String> {
        self.entries.get(host).map(|(user, password)| {
            let raw = format!("{user}:{password}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }
}

/// An OCI descriptor (the fields used).
#[derive(Clone, Debug, Deserialize)]
pub struct Descriptor {
    /// `mediaType`; empty when absent. Not looked at: a layer's content decides its shape.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// The content's digest, `sha256:<hex>` (checked before use).
    pub digest: String,
    /// The content's size in bytes, as the manifest gives it.
    pub size: u64,
    /// In an image index: the platform the entry is for.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform of an image-index entry (the fields used).
#[derive(Clone, Debug, Deserialize)]
pub struct Platform {
    /// OCI's architecture name (`amd64`, `arm64`; see [`oci_arch`]).
    pub architecture: String,
    /// The operating system (`linux`).
    pub os: String,
}

#[derive(Debug, Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// A reference resolved to the image for one platform.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The endpoint (registry or mirror, `host[:port]`) that answered.
    pub endpoint: String,
    /// Digest of what the reference names (the index, for a multi-platform image).
    pub digest: String,
    /// Digest of the platform's image manifest.
    pub manifest_digest: String,
    /// The image's layers, in the order they apply.
    pub layers: Vec<Descriptor>,
}

/// OCI's architecture names for `uname -m`.
pub fn oci_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The registry client for one pull: one deadline and one byte budget for everything.
pub struct Client<'a> {
    agent: ureq::Agent,
    settings: &'a OciSettings,
    credentials: &'a Credentials,
    started: Instant,
    timeout: Duration,
    max_bytes: u64,
    received: u64,
    /// Authorization header value per endpoint, once learnt.
    authorization: BTreeMap<String, String>,
    reference: String,
}

impl<'a> Client<'a> {
    /// A client for pulling `reference` (named in timeout messages): `timeout` is the
    /// deadline for the whole pull, starting now; `max_bytes` bounds the sum of the layers.
    pub fn new(
        settings: &'a OciSettings,
        credentials: &'a Credentials,
        timeout: Duration,
        max_bytes: u64,
        reference: &Reference,
    ) -> Self {
        // Redirects to blob storage are followed; plain HTTP is decided per registry.
        let agent = crate::overlay::source::http::http_agent(false, None);
        Client {
            agent,
            settings,
            credentials,
            started: Instant::now(),
            timeout,
            max_bytes,
            received: 0,
            authorization: BTreeMap::new(),
            reference: reference.to_string(),
        }
    }

    fn scheme(&self, host: &str) -> &'static str {
        if self.settings.insecure_registries.iter().any(|r| r == host) {
            "http"
        } else {
            "https"
        }
    }

    fn remaining(&self) -> Result<Duration, OciError> {
        let left = self.timeout.saturating_sub(self.started.elapsed());
        if left.is_zero() {
            Err(self.timed_out())
        } else {
            Ok(left)
        }
    }

    fn timed_out(&self) -> OciError {
        OciError::TimedOut {
            reference: self.reference.clone(),
            timeout: self.timeout,
        }
    }

    fn call(
        &self,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let mut request = self.agent.get(url);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        match request
            .config()
            .timeout_global(Some(self.remaining()?))
            .build()
            .call()
        {
            Ok(response) => Ok(response),
            Err(ureq::Error::Timeout(_)) => Err(self.timed_out()),
            Err(e) => Err(OciError::Http {
                url: url.to_string(),
                error: Box::new(e),
            }),
        }
    }

    /// GET `path` on `host`, answering one auth challenge (Basic or Bearer) when the registry
    /// asks; returns a 200 response.
    fn get(
        &mut self,
        host: &str,
        repository: &str,
        path: &str,
        accept: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let url = format!("{}://{host}{path}", self.scheme(host));
        let known = self.authorization.get(host).cloned();
        let mut response = self.call(&url, accept, known.as_deref())?;
        if response.status().as_u16() == 401 {
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            if let Some(authorization) = self.answer(host, repository, &challenge, &url)? {
                response = self.call(&url, accept, Some(&authorization))?;
                self.authorization.insert(host.to_string(), authorization);
            }
        }
        let status = response.status().as_u16();
        match status {
            200 => Ok(response),
            404 => Err(OciError::NotFound { url, status }),
            401 | 403 => Err(OciError::Unauthorized {
                url,
                status,
                hint: if self.credentials.basic(host).is_some() {
                    format!("; the credentials for {host} in {AUTH_FILE} were not accepted")
                } else {
                    format!("; add credentials for {host} to {AUTH_FILE}")
                },
            }),
            _ => Err(OciError::Status { url, status }),
        }
    }

    /// The Authorization header for a challenge, if one can be made.
    fn answer(
        &mut self,
        host: &str,
        repository: &str,
        challenge: &str,
        url: &str,
    ) -> Result<Option<String>, OciError> {
        let basic = self.credentials.basic(host);
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        let Some(realm) = params.get("realm") else {
            return Err(OciError::BadManifest {
                url: url.to_string(),
                why: "the Bearer challenge names no realm".into(),
            });
        };
        // The token goes where the registry says, but never over plain HTTP unless the
        // registry itself is insecure: Basic credentials go with the request.
        if realm.starts_with("http://") && self.scheme(host) == "https" {
            return Err(OciError::BadManifest {
                url: url.to_string(),
                why: format!("the token realm {realm} is plain http"),
            });
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{repository}:pull"));
        let mut token_url = format!("{realm}?scope={}", encode_query(&scope));
        if let Some(service) = params.get("service") {
            token_url.push_str(&format!("&service={}", encode_query(service)));
        }
        let response = self.call(&token_url, None, basic.as_deref())?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(OciError::Unauthorized {
                url: token_url,
                status,
                hint: format!(
                    "; the token service refused (credentials for {host} come from {AUTH_FILE})"
                ),
            });
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_small(response, MAX_TOKEN_BYTES, &token_url)?;
        let token: Token = serde_json::from_slice(&body).map_err(|e| OciError::BadManifest {
            url: token_url.clone(),
            why: format!("the token response is not JSON: {e}"),
        })?;
        Ok(token
            .token
            .or(token.access_token)
            .map(|t| format!("Bearer {t}")))
    }

    /// Resolve `reference` on its mirrors (in order) and then its registry.
    pub fn resolve(&mut self, reference: &Reference, arch: &str) -> Result<Resolved, OciError> {
        let mut endpoints: Vec<String> = self
            .settings
            .mirrors
            .get(&reference.registry)
            .cloned()
            .unwrap_or_default();
        endpoints.push(reference.registry.clone());
        let mut tried = Vec::new();
        for endpoint in endpoints {
            match self.resolve_on(&endpoint, reference, arch) {
                Ok(resolved) => return Ok(resolved),
                // Out of time: no other endpoint can help.
                Err(e @ OciError::TimedOut { .. }) if tried.is_empty() => return Err(e),
                Err(e) => {
                    debug!(endpoint, error = %e, "registry endpoint did not give the image");
                    tried.push((endpoint, e));
                }
            }
        }
        if tried.len() == 1 {
            Err(tried.pop().expect("one").1)
        } else {
            Err(OciError::Endpoints { tried })
        }
    }

    fn fetch_manifest(
        &mut self,
        host: &str,
        repository: &str,
        reference: &str,
    ) -> Result<(ManifestDoc, String, String), OciError> {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let accept = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", ");
        let response = self.get(host, repository, &path, Some(&accept))?;
        let url = format!("{host}{path}");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let announced = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_small(response, MAX_MANIFEST_BYTES, &url)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        // By digest, the bytes must be exactly that; by tag, what the registry says it sent.
        let expected = if is_digest(reference) {
            Some(reference.to_string())
        } else {
            announced.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(OciError::DigestMismatch {
                    what: format!("manifest {url}"),
                    expected,
                    found: digest,
                });
            }
        }
        let doc: ManifestDoc =
            serde_json::from_slice(&body).map_err(|e| OciError::BadManifest {
                url: url.clone(),
                why: e.to_string(),
            })?;
        let media_type = doc.media_type.clone().unwrap_or(content_type);
        Ok((doc, digest, media_type))
    }

    fn resolve_on(
        &mut self,
        host: &str,
        reference: &Reference,
        arch: &str,
    ) -> Result<Resolved, OciError> {
        let repository = &reference.repository;
        let (doc, digest, media_type) =
            self.fetch_manifest(host, repository, reference.manifest_ref())?;
        let is_index = media_type.contains("index") || media_type.contains("manifest.list");
        let (image, manifest_digest) = if is_index || !doc.manifests.is_empty() {
            let wanted = oci_arch(arch);
            let Some(chosen) = doc.manifests.iter().find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == wanted)
            }) else {
                let found = doc
                    .manifests
                    .iter()
                    .filter_map(|m| m.platform.as_ref())
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(OciError::NoPlatform {
                    url: format!(
                        "{host}/v2/{repository}/manifests/{}",
                        reference.manifest_ref()
                    ),
                    arch: wanted.to_string(),
                    found,
                });
            };
            if !is_digest(&chosen.digest) {
                return Err(OciError::BadManifest {
                    url: host.to_string(),
                    why: format!("the index names digest {:?}", chosen.digest),
                });
            }
            let (image, image_digest, _) = self.fetch_manifest(host, repository, &chosen.digest)?;
            (image, image_digest)
        } else {
            (doc, digest.clone())
        };
        if image.layers.is_empty() {
            return Err(OciError::BadManifest {
                url: format!("{host}/v2/{repository}/manifests/{manifest_digest}"),
                why: "the image has no layers".into(),
            });
        }
        if let Some(bad) = image.layers.iter().find(|l| !is_digest(&l.digest)) {
            return Err(OciError::BadManifest {
                url: format!("{host}/v2/{repository}/manifests/{manifest_digest}"),
                why: format!(
                    "layer digest {:?} is not sha256:<64 hex digits>",
                    bad.digest
                ),
            });
        }
        // Checked: a hostile manifest's sizes could wrap a plain sum below the limit, and each
        // blob's read is bounded by its own size only.
        let total = layers_total(&image.layers).unwrap_or(u64::MAX);
        if total > self.max_bytes {
            return Err(OciError::TooLarge {
                what: format!("{reference}: the image's layers ({total} bytes)"),
                limit: self.max_bytes,
                hint: "; raise stage.max-download-bytes if the image really is that large",
            });
        }
        Ok(Resolved {
            endpoint: host.to_string(),
            digest,
            manifest_digest,
            layers: image.layers,
        })
    }

    /// Stream one layer blob into `dest` (a new file), checking size and sha256 as it comes.
    /// On error `dest` is removed.
    pub fn fetch_blob(
        &mut self,
        resolved: &Resolved,
        repository: &str,
        layer: &Descriptor,
        dest: &Path,
        space: &mut SpaceGuard,
    ) -> Result<(), OciError> {
        let result = self.fetch_blob_inner(resolved, repository, layer, dest, space);
        if result.is_err() {
            let _ = fs::remove_file(dest);
        }
        result
    }

    fn fetch_blob_inner(
        &mut self,
        resolved: &Resolved,
        repository: &str,
        layer: &Descriptor,
        dest: &Path,
        space: &mut SpaceGuard,
    ) -> Result<(), OciError> {
        let path = format!("/v2/{repository}/blobs/{}", layer.digest);
        let what = format!("blob {}{path}", resolved.endpoint);
        let response = self.get(&resolved.endpoint, repository, &path, None)?;
        let mut body = response.into_body();
        let mut reader = body
            .with_config()
            .limit(layer.size.saturating_add(1))
            .reader();
        let mut file = File::create(dest).with_path(dest)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if self.started.elapsed() >= self.timeout => {
                    debug!(error = %e, "blob read failed after the deadline");
                    return Err(self.timed_out());
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(self.timed_out()),
                Err(source) => {
                    return Err(OciError::Io(PathIoError::new(PathBuf::from(&what), source)))
                }
            };
            size += n as u64;
            self.received += n as u64;
            if size > layer.size {
                return Err(OciError::TooLarge {
                    what: what.clone(),
                    limit: layer.size,
                    hint: " (the size its manifest gives)",
                });
            }
            hasher.update(&buffer[..n]);
            space.before_write(n as u64).map_err(OciError::Space)?;
            file.write_all(&buffer[..n]).with_path(dest)?;
        }
        let found = format!("sha256:{}", hex::encode(hasher.finalize()));
        if found != layer.digest {
            return Err(OciError::DigestMismatch {
                what,
                expected: layer.digest.clone(),
                found,
            });
        }
        file.sync_all().with_path(dest)?;
        info!(digest = %layer.digest, size, "layer blob fetched and verified");
        Ok(())
    }
}

/// Read a small response body whole, refusing more than `limit` bytes.
fn read_small(
    response: ureq::http::Response<ureq::Body>,
    limit: u64,
    url: &str,
) -> Result<Vec<u8>, OciError> {
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    body.with_config()
        .limit(limit + 1)
        .reader()
        .read_to_end(&mut bytes)
        .map_err(|source| OciError::Io(PathIoError::new(PathBuf::from(url), source)))?;
    if bytes.len() as u64 > limit {
        return Err(OciError::TooLarge {
            what: url.to_string(),
            limit,
            hint: "",
        });
    }
    Ok(bytes)
}

/// `Bearer realm="…",service="…",scope="…"` → ("Bearer", {realm, service, scope}).
pub fn parse_challenge(header: &str) -> (String, BTreeMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_string(), params)
}

fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Does this layer (a tar, any compression) hold `overlay.toml` at its top? That makes the
/// image shape (a): the layer is an overlay archive.
pub fn layer_is_overlay(layer: &Path) -> Result<bool, OciError> {
    let file = File::open(layer).with_path(layer)?;
    let name = layer.display().to_string();
    let stream = archive::decompress(io::BufReader::new(file), &name)?;
    let mut tar = tar::Archive::new(stream);
    for entry in tar.entries().with_path(layer)? {
        let entry = entry.with_path(layer)?;
        let path = PathBuf::from(String::from_utf8_lossy(&entry.path_bytes()).into_owned());
        if let Ok(Some(path)) = plain_relative(&path) {
            if path == Path::new(MANIFEST_NAME) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Files of an image worth unpacking: modules and firmware (resolved paths).
fn wanted(resolved: &Path) -> bool {
    [
        "usr/lib/modules",
        "lib/modules",
        "usr/lib/firmware",
        "lib/firmware",
    ]
    .iter()
    .any(|prefix| resolved.starts_with(prefix))
}

/// The layers' sizes added up; `None` when the sum does not fit in 64 bits (a hostile
/// manifest).
fn layers_total(layers: &[Descriptor]) -> Option<u64> {
    layers
        .iter()
        .try_fold(0u64, |sum, l| sum.checked_add(l.size))
}

/// Resolve `path` (relative) inside the image tree at `scratch` the way the image's own root
/// would: symlinks are followed inside the tree (absolute targets from its top, `..` stops at
/// it), so nothing outside `scratch` is ever touched. Components that do not exist yet are
/// kept as they are. Returns the resolved relative path.
pub fn resolve_in(scratch: &Path, path: &Path) -> Result<PathBuf, &'static str> {
    // Owned components: a link's target is spliced in front of what is left.
    enum Step {
        Root,
        Up,
        Name(std::ffi::OsString),
    }
    fn steps(path: &Path) -> Vec<Step> {
        path.components()
            .filter_map(|c| match c {
                Component::RootDir => Some(Step::Root),
                Component::ParentDir => Some(Step::Up),
                Component::Normal(n) => Some(Step::Name(n.to_os_string())),
                Component::CurDir | Component::Prefix(_) => None,
            })
            .collect()
    }
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<Step> = steps(path).into();
    let mut hops = 0;
    while let Some(step) = pending.pop_front() {
        match step {
            Step::Root => resolved = PathBuf::new(),
            Step::Up => {
                resolved.pop();
            }
            Step::Name(name) => {
                let next = resolved.join(name);
                match fs::symlink_metadata(scratch.join(&next)) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        hops += 1;
                        if hops > MAX_LINK_HOPS {
                            return Err("goes through too many symlinks");
                        }
                        let target = fs::read_link(scratch.join(&next))
                            .map_err(|_| "goes through an unreadable symlink")?;
                        if target.is_absolute() {
                            resolved = PathBuf::new();
                        }
                        for step in steps(&target).into_iter().rev() {
                            pending.push_front(step);
                        }
                    }
                    _ => resolved = next,
                }
            }
        }
    }
    Ok(resolved)
}

/// Bounds on applying an image's layers.
#[derive(Clone, Copy, Debug)]
pub struct ApplyLimits {
    /// Bytes of module and firmware files written (other files are not written or counted).
    pub max_unpacked_bytes: u64,
    /// Entries of any kind, over all layers together.
    pub max_entries: u64,
}

/// Apply image layers (tar, any compression) in order into `scratch`, as a container runtime
/// would: `.wh.<name>` deletes `<name>`, `.wh..wh..opq` empties its directory, later layers
/// replace earlier files. Only module and firmware files are written (directories, symlinks and
/// whiteouts everywhere, so paths resolve as in the image); hard links, devices and fifos are
/// skipped. Every path goes through the archive code's checks and resolves inside `scratch`.
pub fn apply_layers(
    layers: &[PathBuf],
    scratch: &Path,
    limits: ApplyLimits,
) -> Result<u64, OciError> {
    let mut written = 0u64;
    let mut entries = 0u64;
    for layer in layers {
        let name = layer
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let refuse = |entry: &Path, why: &str| OciError::Layer {
            layer: name.clone(),
            entry: entry.to_path_buf(),
            why: why.to_string(),
        };
        let file = File::open(layer).with_path(layer)?;
        let stream = archive::decompress(io::BufReader::new(file), &name)?;
        let mut tar = tar::Archive::new(stream);
        let read_err = |e| PathIoError::new(layer, e);
        for entry in tar.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            entries += 1;
            if entries > limits.max_entries {
                return Err(OciError::TooLarge {
                    what: format!("{name}: the image's entries"),
                    limit: limits.max_entries,
                    hint: "",
                });
            }
            let raw = PathBuf::from(String::from_utf8_lossy(&entry.path_bytes()).into_owned());
            let Some(path) = plain_relative(&raw).map_err(|why| refuse(&raw, why))? else {
                continue;
            };
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = path.parent().unwrap_or(Path::new(""));
            let parent = resolve_in(scratch, parent).map_err(|why| refuse(&path, why))?;
            if file_name == ".wh..wh..opq" {
                let dir = scratch.join(&parent);
                if let Ok(children) = fs::read_dir(&dir) {
                    for child in children.flatten() {
                        remove_any(&child.path()).with_path(child.path())?;
                    }
                }
                continue;
            }
            if let Some(hidden) = file_name.strip_prefix(".wh.") {
                // `.wh.`, `.wh..` and `.wh...` name no file: joined, they would remove the
                // directory itself or the one above `scratch` (the OCI image spec's whiteouts
                // name a sibling; a runtime refuses these too).
                if matches!(hidden, "" | "." | "..") {
                    return Err(refuse(&path, "is a whiteout that names no file"));
                }
                let target = scratch.join(&parent).join(hidden);
                remove_any(&target).with_path(&target)?;
                continue;
            }
            let resolved = parent.join(&file_name);
            let real = scratch.join(&resolved);
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                if fs::symlink_metadata(&real).is_ok_and(|m| !m.is_dir()) {
                    remove_any(&real).with_path(&real)?;
                }
                fs::create_dir_all(&real).with_path(&real)?;
            } else if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()))
                    .unwrap_or_default();
                make_parent(&real)?;
                remove_any(&real).with_path(&real)?;
                std::os::unix::fs::symlink(&target, &real).with_path(&real)?;
            } else if kind.is_file() {
                if !wanted(&resolved) {
                    continue;
                }
                written += entry.size();
                if written > limits.max_unpacked_bytes {
                    return Err(OciError::TooLarge {
                        what: format!("{name}: the image's module and firmware files"),
                        limit: limits.max_unpacked_bytes,
                        hint: "",
                    });
                }
                make_parent(&real)?;
                remove_any(&real).with_path(&real)?;
                let mut out = File::create(&real).with_path(&real)?;
                io::copy(&mut entry, &mut out).with_path(&real)?;
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                out.set_permissions(fs::Permissions::from_mode(mode))
                    .with_path(&real)?;
            }
        }
    }
    Ok(written)
}

fn make_parent(real: &Path) -> Result<(), OciError> {
    let parent = real.parent().expect("entry has a parent");
    fs::create_dir_all(parent).with_path(parent)?;
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        let r = Reference::parse("oci://registry.example:5000/nvidia/driver:570.1-6.1.0-rhcos4.14")
            .unwrap();
        assert_eq!(r.registry, "registry.example:5000");
        assert_eq!(r.repository, "nvidia/driver");
        assert_eq!(r.tag.as_deref(), Some("570.1-6.1.0-rhcos4.14"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("oci://r.example/x@{d}")).unwrap();
        assert_eq!(r.manifest_ref(), d);
        for bad in [
            "oci://r.example/x",
            "oci://r.example/X:t",
            "oci://r.example/x@sha256:abc",
            "oci://r.example/x:a/b",
            "oci:///x:t",
            "https://r/x:t",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges_parse() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(params["realm"], "https://auth.example/token");
        assert_eq!(params["service"], "registry.example");
        assert_eq!(params["scope"], "repository:a/b:pull");
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(params["realm"], "Registry Realm");
    }

    #[test]
    fn auth_json_keys_are_hosts() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        let text =
            format!(r#"{{"auths": {{"https://r.example:5000/v1/": {{"auth": "{auth}"}}}}}}"#);
        let creds = Credentials::parse(&text, Path::new("auth.json")).unwrap();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("u:p:w")
        );
        assert_eq!(creds.basic("r.example:5000"), Some(expected));
        assert!(
            format!("{creds:?}").contains("r.example") && !format!("{creds:?}").contains("u:p")
        );
        assert!(Credentials::parse(r#"{"auths": {"h": {"auth": "!!"}}}"#, Path::new("a")).is_err());
    }

    /// A layer of one empty file entry per name, plain tar.
    fn layer_of(dir: &Path, names: &[&str]) -> PathBuf {
        let path = dir.join("layer.tar");
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        for name in names {
            let mut header = tar::Header::new_gnu();
            header.set_size(0);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`-looking names; the raw name field takes them as a hostile
            // registry would send them.
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, io::empty()).unwrap();
        }
        builder.finish().unwrap();
        path
    }

    #[test]
    fn whiteouts_that_name_no_file_are_refused_and_touch_nothing() {
        let limits = ApplyLimits {
            max_unpacked_bytes: 1 << 20,
            max_entries: 100,
        };
        for name in [".wh..", ".wh...", ".wh.", "usr/.wh..."] {
            let dir = tempfile::tempdir().unwrap();
            let scratch = dir.path().join("scratch");
            fs::create_dir_all(scratch.join("usr/lib")).unwrap();
            let layer = layer_of(dir.path(), &[name]);
            let err = apply_layers(std::slice::from_ref(&layer), &scratch, limits).unwrap_err();
            assert!(
                err.to_string().contains("whiteout that names no file"),
                "{name}: {err}"
            );
            assert!(
                layer.exists(),
                "{name}: the layer beside scratch is still there"
            );
            assert!(
                scratch.join("usr/lib").is_dir(),
                "{name}: scratch is untouched"
            );
        }
    }

    #[test]
    fn layer_sizes_that_overflow_are_not_summed_below_the_limit() {
        let layer = |size| Descriptor {
            media_type: String::new(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size,
            platform: None,
        };
        assert_eq!(layers_total(&[layer(1), layer(2)]), Some(3));
        // Wrapped, these two would add up to 1 byte.
        assert_eq!(layers_total(&[layer(u64::MAX), layer(2)]), None);
    }

    #[test]
    fn resolution_stays_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", dir.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("/etc/../../..", dir.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("loop", dir.path().join("loop")).unwrap();
        assert_eq!(
            resolve_in(dir.path(), Path::new("lib/modules/k")).unwrap(),
            Path::new("usr/lib/modules/k")
        );
        assert_eq!(
            resolve_in(dir.path(), Path::new("escape/x")).unwrap(),
            Path::new("x")
        );
        assert!(resolve_in(dir.path(), Path::new("loop/x")).is_err());
    }
}

//! Pushing an overlay archive to an OCI registry (`overlay build --push`): the image shape (a)
//! that [`super::oci`] pulls, one `application/vnd.oci.image.layer.v1.tar+zstd` layer holding
//! the archive as it is, with an image config for `linux/<arch>`.
//!
//! The registry v2 upload protocol: `HEAD` a blob to skip one the registry has, else `POST
//! /v2/<repo>/blobs/uploads/` and a monolithic `PUT <location>?digest=`; then `PUT` the
//! manifest by tag. Credentials are those the agent pulls with ([`super::oci::AUTH_FILE`]),
//! Basic or exchanged for a Bearer token with `pull,push` scope; plain HTTP only for
//! `[oci] insecure-registries`. Nothing here depends on a clock: the same archive gives the
//! same manifest digest.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::OciSettings;
use crate::fsutil::{PathIoError, WithPath};
use crate::overlay::source::oci::{oci_arch, parse_challenge, Credentials, Reference, AUTH_FILE};
use crate::overlay::Manifest;

/// The layer's media type: a zstd tar, the overlay archive itself.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The image config's media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The manifest's media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The reference has no tag to push to, or a digest (which a push cannot choose).
    #[error("{reference}: push needs oci://registry/repository:tag (no @digest: the registry computes it)")]
    NoTag {
        /// The reference as given.
        reference: String,
    },
    /// The registry refused the credentials, or none were found.
    #[error("{url}: the registry refused the push (HTTP {status}); {hint}")]
    Unauthorized {
        /// The URL.
        url: String,
        /// 401 or 403.
        status: u16,
        /// What to do.
        hint: String,
    },
    /// The registry answered something other than the protocol's status.
    #[error("{url}: the registry answered HTTP {status} to {method}; expected {expected}: {body}")]
    Status {
        /// The method.
        method: &'static str,
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// What the protocol expects.
        expected: &'static str,
        /// The start of the response body (the registry's error JSON).
        body: String,
    },
    /// The upload session's location header is missing, or a token answer is unusable.
    #[error("{url}: {why}")]
    Protocol {
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The request failed before a status came back.
    #[error("{url}: {error}; is the registry reachable (and in [oci] insecure-registries if it speaks plain HTTP)?")]
    Http {
        /// The URL.
        url: String,
        /// ureq's error.
        error: Box<ureq::Error>,
    },
    /// Reading the archive failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// What was pushed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pushed {
    /// The reference with the tag.
    pub reference: String,
    /// The manifest's digest (`sha256:…`): pin nodes to `oci://…@<digest>`.
    pub digest: String,
    /// The layer blobs the registry already had (skipped).
    pub skipped: usize,
}

/// A blob to upload: its digest and its bytes or file.
struct Blob<'a> {
    digest: String,
    body: BlobBody<'a>,
}

enum BlobBody<'a> {
    Bytes(Vec<u8>),
    File(&'a Path),
}

/// sha256 of a file, and of what its zstd stream decompresses to (the layer's diff id).
fn archive_digests(archive: &Path) -> Result<(String, u64, String), PushError> {
    let file = File::open(archive).with_path(archive)?;
    let (size, digest) =
        crate::overlay::verify::sha256_reader(file, u64::MAX).with_path(archive)?;
    let file = File::open(archive).with_path(archive)?;
    let mut decoder = zstd::stream::read::Decoder::new(file).with_path(archive)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let n = decoder.read(&mut buffer).with_path(archive)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok((
        format!("sha256:{digest}"),
        size,
        format!("sha256:{}", hex::encode(hasher.finalize())),
    ))
}

/// The image config and manifest for an archive (pure; JSON with fixed key order).
pub fn image_documents(
    manifest: &Manifest,
    layer_digest: &str,
    layer_size: u64,
    diff_id: &str,
) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::json!({
        "architecture": oci_arch(&manifest.arch),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    .to_string()
    .into_bytes();
    let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(&config)));
    let image = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer_size}],
        "annotations": {
            "org.opencontainers.image.title": format!(
                "NVIDIA {} overlay for kernel {} ({})",
                manifest.driver_version, manifest.kernel_release, manifest.arch
            ),
            "io.nvdriver-agent.kernel-release": manifest.kernel_release,
            "io.nvdriver-agent.driver-version": manifest.driver_version,
        },
    })
    .to_string()
    .into_bytes();
    (config, image)
}

/// The registry session of one push.
struct Session<'a> {
    agent: ureq::Agent,
    scheme: &'static str,
    reference: &'a Reference,
    credentials: &'a Credentials,
    authorization: Option<String>,
}

type Response = ureq::http::Response<ureq::Body>;

impl Session<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.reference.registry)
    }

    /// One request; `send` adds the method, headers and body to a request builder.
    fn request(
        &mut self,
        method: &'static str,
        url: &str,
        content_type: Option<&str>,
        body: Option<&BlobBody>,
    ) -> Result<Response, PushError> {
        for attempt in 0..2 {
            let mut builder = ureq::http::Request::builder().method(method).uri(url);
            if let Some(auth) = &self.authorization {
                builder = builder.header("Authorization", auth);
            }
            if let Some(content_type) = content_type {
                builder = builder.header("Content-Type", content_type);
            }
            let http = |e: ureq::http::Error| PushError::Protocol {
                url: url.to_string(),
                why: e.to_string(),
            };
            let sent = match body {
                None => self.agent.run(
                    builder
                        .header("Content-Length", "0")
                        .body(())
                        .map_err(http)?,
                ),
                Some(BlobBody::Bytes(bytes)) => self.agent.run(
                    builder
                        .header("Content-Length", bytes.len().to_string())
                        .body(bytes.as_slice())
                        .map_err(http)?,
                ),
                Some(BlobBody::File(path)) => {
                    let file = File::open(path).with_path(*path)?;
                    let size = file.metadata().with_path(*path)?.len();
                    self.agent.run(
                        builder
                            .header("Content-Length", size.to_string())
                            .body(file)
                            .map_err(http)?,
                    )
                }
            };
            let response = sent.map_err(|e| PushError::Http {
                url: url.to_string(),
                error: Box::new(e),
            })?;
            if response.status().as_u16() == 401 && attempt == 0 {
                let challenge = response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if let Some(auth) = self.answer(&challenge, url)? {
                    self.authorization = Some(auth);
                    continue;
                }
            }
            return Ok(response);
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn basic(&self) -> Option<String> {
        self.credentials.basic(&self.reference.registry)
    }

    /// The Authorization for a challenge: Basic from auth.json, or a Bearer token for
    /// `repository:<repo>:pull,push`.
    fn answer(&mut self, challenge: &str, url: &str) -> Result<Option<String>, PushError> {
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(self.basic());
        }
        let Some(realm) = params
            .get("realm")
            .filter(|_| scheme.eq_ignore_ascii_case("bearer"))
        else {
            return Ok(None);
        };
        if realm.starts_with("http://") && self.scheme == "https" {
            return Err(PushError::Protocol {
                url: url.to_string(),
                why: format!("the token realm {realm} is plain http; refusing to send credentials"),
            });
        }
        let scope = format!("repository:{}:pull,push", self.reference.repository);
        let mut token_url = format!("{realm}?scope={scope}");
        if let Some(service) = params.get("service") {
            token_url.push_str(&format!("&service={service}"));
        }
        let mut request = self.agent.get(&token_url);
        if let Some(basic) = self.basic() {
            request = request.header("Authorization", &basic);
        }
        let mut response = request.call().map_err(|e| PushError::Http {
            url: token_url.clone(),
            error: Box::new(e),
        })?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(self.unauthorized(token_url, status));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .map_err(|e| PushError::Http {
                url: token_url.clone(),
                error: Box::new(e),
            })?;
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| PushError::Protocol {
                url: token_url.clone(),
                why: format!("the token answer is not JSON: {e}"),
            })?;
        Ok(json["token"]
            .as_str()
            .or(json["access_token"].as_str())
            .map(|t| format!("Bearer {t}")))
    }

    fn unauthorized(&self, url: String, status: u16) -> PushError {
        let host = &self.reference.registry;
        PushError::Unauthorized {
            url,
            status,
            hint: if self.basic().is_some() {
                format!("the credentials for {host} in {AUTH_FILE} (under --root) were not accepted or may not push")
            } else {
                format!("add credentials for {host} to {AUTH_FILE} (under --root)")
            },
        }
    }

    fn expect(
        &self,
        method: &'static str,
        url: &str,
        mut response: Response,
        ok: &[u16],
        expected: &'static str,
    ) -> Result<Response, PushError> {
        let status = response.status().as_u16();
        if ok.contains(&status) {
            return Ok(response);
        }
        if matches!(status, 401 | 403) {
            return Err(self.unauthorized(url.to_string(), status));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(4096)
            .read_to_string()
            .unwrap_or_default();
        Err(PushError::Status {
            method,
            url: url.to_string(),
            status,
            expected,
            body: body.chars().take(300).collect(),
        })
    }

    /// Upload `blob` unless the registry has it; true when it was skipped.
    fn upload(&mut self, blob: &Blob) -> Result<bool, PushError> {
        let repo = &self.reference.repository;
        let head = self.url(&format!("/v2/{repo}/blobs/{}", blob.digest));
        let response = self.request("HEAD", &head, None, None)?;
        if response.status().as_u16() == 200 {
            return Ok(true);
        }
        let start = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        let response = self.request("POST", &start, None, None)?;
        let response = self.expect("POST", &start, response, &[202], "202 Accepted")?;
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| PushError::Protocol {
                url: start.clone(),
                why: "the upload session has no Location header".into(),
            })?;
        let mut put = if location.starts_with('/') {
            self.url(location)
        } else {
            location.to_string()
        };
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str(&format!("digest={}", blob.digest.replace(':', "%3A")));
        let response = self.request(
            "PUT",
            &put,
            Some("application/octet-stream"),
            Some(&blob.body),
        )?;
        self.expect("PUT", &put, response, &[201, 204], "201 Created")?;
        Ok(false)
    }
}

/// Push `archive` (an overlay `.tar.zst` whose manifest is `manifest`) as `reference`'s tag.
pub fn push(
    settings: &OciSettings,
    credentials: &Credentials,
    reference: &Reference,
    archive: &Path,
    manifest: &Manifest,
) -> Result<Pushed, PushError> {
    let Some(tag) = reference.tag.clone().filter(|_| reference.digest.is_none()) else {
        return Err(PushError::NoTag {
            reference: reference.to_string(),
        });
    };
    let (layer_digest, layer_size, diff_id) = archive_digests(archive)?;
    let (config, image) = image_documents(manifest, &layer_digest, layer_size, &diff_id);
    let insecure = settings.insecure_registries.contains(&reference.registry);
    let mut session = Session {
        agent: crate::overlay::source::http::http_agent(false, None),
        scheme: if insecure { "http" } else { "https" },
        reference,
        credentials,
        authorization: None,
    };
    let blobs = [
        Blob {
            digest: layer_digest,
            body: BlobBody::File(archive),
        },
        Blob {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&config))),
            body: BlobBody::Bytes(config),
        },
    ];
    let mut skipped = 0;
    for blob in &blobs {
        skipped += usize::from(session.upload(blob)?);
    }
    let url = session.url(&format!("/v2/{}/manifests/{tag}", reference.repository));
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&image)));
    let response = session.request(
        "PUT",
        &url,
        Some(MANIFEST_MEDIA_TYPE),
        Some(&BlobBody::Bytes(image)),
    )?;
    session.expect("PUT", &url, response, &[201], "201 Created")?;
    Ok(Pushed {
        reference: reference.to_string(),
        digest,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::manifest::{Flavor, FORMAT_VERSION};

    #[test]
    fn the_image_is_one_zstd_layer_for_the_overlays_arch_and_has_no_clock() {
        let manifest = Manifest {
            format: FORMAT_VERSION,
            kernel_release: "6.1.0-57-cloud-amd64".into(),
            driver_version: "535.261.03".into(),
            arch: "x86_64".into(),
            flavor: Flavor::Open,
            files: vec![],
            symlinks: vec![],
        };
        let layer = format!("sha256:{}", "a".repeat(64));
        let diff = format!("sha256:{}", "b".repeat(64));
        let (config, image) = image_documents(&manifest, &layer, 123, &diff);
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["rootfs"]["diff_ids"][0], diff.as_str());
        assert!(config.get("created").is_none());
        let parsed: serde_json::Value = serde_json::from_slice(&image).unwrap();
        assert_eq!(parsed["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(parsed["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(parsed["layers"][0]["digest"], layer.as_str());
        assert_eq!(parsed["layers"][0]["size"], 123);
        assert_eq!(
            parsed["annotations"]["io.nvdriver-agent.kernel-release"],
            "6.1.0-57-cloud-amd64"
        );
        // Deterministic: the same inputs, the same bytes.
        assert_eq!(image, image_documents(&manifest, &layer, 123, &diff).1);
    }

    #[test]
    fn a_push_needs_a_tag_and_no_digest() {
        let manifest = Manifest {
            format: FORMAT_VERSION,
            kernel_release: "k".into(),
            driver_version: "d".into(),
            arch: "x86_64".into(),
            flavor: Flavor::Open,
            files: vec![],
            symlinks: vec![],
        };
        let pinned = format!(
            "oci://registry.example/nvidia/overlay:v1@sha256:{}",
            "0".repeat(64)
        );
        let reference = Reference::parse(&pinned).unwrap();
        // Refused before the archive is read or the registry asked.
        let err = push(
            &OciSettings::default(),
            &Credentials::default(),
            &reference,
            Path::new("/nonexistent.tar.zst"),
            &manifest,
        )
        .unwrap_err();
        assert!(matches!(err, PushError::NoTag { .. }), "{err}");
        assert!(err.to_string().contains("no @digest"), "{err}");
    }
}

//! Downloading an overlay archive over HTTP(S) into a kept `.part` file, bounded in size and
//! time, resumed with `Range` after a dropped connection (in this call or a later one) and
//! restarted from zero when the server ignores `Range` or the file changed meanwhile.
//!
//! Nothing here trusts the bytes: the caller verifies the finished download against its
//! manifest before anything reaches the store, exactly like a local archive.
//!
//! The client is `ureq` (blocking, no async runtime in a daemon that fetches one file at a
//! time) with rustls and the platform verifier, which on Linux trusts the system's CA store
//! (`/etc/pki/tls/certs/ca-bundle.crt` on RHCOS and Fedora, including CAs added with
//! `update-ca-trust`; `/etc/ssl/certs` on Debian and Flatcar; `SSL_CERT_FILE` when set), and no
//! OpenSSL library to match across hosts. Proxies come from `HTTPS_PROXY`/`NO_PROXY`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::fsutil::write_atomic;

/// Connections dropped mid-body are resumed at most this many times per call (each resume must
/// have made progress).
const MAX_ATTEMPTS: u32 = 5;

#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    /// Bytes of the archive as served.
    pub max_bytes: u64,
    /// One deadline for the whole download, resumes included.
    pub timeout: Duration,
    /// Allow `http://` (and redirects to it).
    pub allow_http: bool,
}

impl FetchLimits {
    /// The limits `[stage]` sets for every download.
    pub fn of(settings: &crate::config::StageSettings) -> Self {
        FetchLimits {
            max_bytes: settings.max_download_bytes,
            timeout: settings.download_timeout,
            allow_http: settings.allow_http,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: the server has no such file (HTTP {status})")]
    NotFound { url: String, status: u16 },
    #[error("{url}: plain http is refused; use https, or set stage.allow-http = true (the overlay is verified against its manifest either way)")]
    HttpRefused { url: String },
    #[error("{url}: the server answered HTTP {status}; expected 200 or 206")]
    Status { url: String, status: u16 },
    #[error("{url}: the archive is larger than stage.max-download-bytes ({limit} bytes){}; raise the limit if it really is that large", announced.map(|n| format!(": the server announces {n} bytes")).unwrap_or_default())]
    TooLarge {
        url: String,
        limit: u64,
        announced: Option<u64>,
    },
    #[error("{url}: not finished after {:?} (stage.download-timeout-secs), {received} bytes in; the part is kept and the next stage resumes it", timeout)]
    TimedOut {
        url: String,
        timeout: Duration,
        received: u64,
    },
    #[error("{url}: the connection dropped {attempts} times without finishing ({received} bytes in); the part is kept and the next stage resumes it: {source}")]
    Interrupted {
        url: String,
        attempts: u32,
        received: u64,
        #[source]
        source: io::Error,
    },
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`download`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// Size of the complete file.
    pub size: u64,
    /// Bytes a kept part already held when this call started (0: fetched from the start).
    pub resumed_from: u64,
    /// Bytes fetched by this call.
    pub fetched: u64,
    /// Times the download started over from zero (the server ignored `Range`, or the file
    /// changed).
    pub restarts: u32,
}

/// What is known of the file a part belongs to; kept beside it as `<part>.meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PartMeta {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
    total: Option<u64>,
}

fn meta_path(part: &Path) -> PathBuf {
    let mut name = part.file_name().unwrap_or_default().to_os_string();
    name.push(".meta");
    part.with_file_name(name)
}

/// Remove a part file and its metadata.
pub fn discard_part(part: &Path) {
    let _ = fs::remove_file(part);
    let _ = fs::remove_file(meta_path(part));
}

/// Redirects followed per request. Only http(s) ones are: ureq knows no other scheme, so a
/// `file://` location is an error, and a path-only location is a path on the same server.
pub const MAX_REDIRECTS: u32 = 5;

/// The one HTTP client configuration (downloads, registries, `doctor`'s probes): the system CA
/// store, at most [`MAX_REDIRECTS`] redirects (http(s) only: ureq refuses other schemes), HTTP
/// statuses returned as values, plain `http://` refused when `https_only`.
pub(crate) fn http_agent(https_only: bool, timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .https_only(https_only)
        .max_redirects(MAX_REDIRECTS)
        .timeout_global(timeout)
        .user_agent(concat!("nvdriver-agent/", env!("CARGO_PKG_VERSION")))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into()
}

/// Download `url` into `part` (a real path; its directory must exist), resuming what a kept
/// part holds. On success `part` holds the whole file as served; on a dropped connection or a
/// timeout it is kept for the next call; on anything else it is removed.
pub fn download(url: &str, part: &Path, limits: &FetchLimits) -> Result<Downloaded, FetchError> {
    let started = Instant::now();
    let deadline = started + limits.timeout;
    if url.starts_with("http://") && !limits.allow_http {
        return Err(FetchError::HttpRefused { url: url.into() });
    }
    let agent = http_agent(!limits.allow_http, None);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };

    let mut meta = read_meta(part).filter(|m| m.url == url);
    if meta.is_none() {
        discard_part(part);
    }
    let resumed_from = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut fetched = 0u64;
    let mut restarts = 0u32;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let offset = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        let timed_out = || FetchError::TimedOut {
            url: url.into(),
            timeout: limits.timeout,
            received: offset,
        };
        if remaining.is_zero() {
            return Err(timed_out());
        }
        if offset > 0 && meta.as_ref().and_then(|m| m.total) == Some(offset) {
            // Complete already (the run that fetched it stopped before using it); the caller
            // verifies it like any download.
            info!(url, size = offset, "download already complete");
            return Ok(Downloaded {
                size: offset,
                resumed_from,
                fetched,
                restarts,
            });
        }
        let mut request = agent.get(url);
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
            // If the file changed, a server that honours If-Range sends all of it (200).
            if let Some(validator) = meta.as_ref().and_then(PartMeta::validator) {
                request = request.header("If-Range", validator);
            }
        }
        let response = request
            .config()
            .timeout_global(Some(remaining))
            .build()
            .call();
        let response = match response {
            Ok(response) => response,
            Err(ureq::Error::Timeout(_)) => return Err(timed_out()),
            Err(ureq::Error::RequireHttpsOnly(_)) => {
                return Err(FetchError::HttpRefused { url: url.into() })
            }
            Err(e) => {
                return Err(FetchError::Http {
                    url: url.into(),
                    source: Box::new(e),
                })
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let served = PartMeta {
            url: url.into(),
            etag: header("etag"),
            last_modified: header("last-modified"),
            total: None,
        };
        let content_length = response.body().content_length();
        let (start, total) = match status {
            200 => (0, content_length),
            // 206 with the range asked for, from the same file: resume. A 206 for another
            // range or file, or a 416 (the part is no prefix of what is served now): start over.
            206 | 416 => {
                let range = if status == 206 {
                    header("content-range").and_then(|v| parse_content_range(&v))
                } else {
                    None
                };
                let known = meta.as_ref().and_then(|m| m.total);
                let same_file = meta.as_ref().is_some_and(|m| m.same_file(&served));
                match range {
                    Some((start, total))
                        if start == offset && same_file && (known.is_none() || total == known) =>
                    {
                        (start, total.or(known))
                    }
                    _ => {
                        debug!(
                            url,
                            status,
                            ?range,
                            "unusable partial response; starting over"
                        );
                        discard_part(part);
                        meta = None;
                        restarts += 1;
                        if restarts > MAX_ATTEMPTS {
                            return Err(FetchError::Status {
                                url: url.into(),
                                status,
                            });
                        }
                        continue;
                    }
                }
            }
            404 | 410 => {
                discard_part(part);
                return Err(FetchError::NotFound {
                    url: url.into(),
                    status,
                });
            }
            _ => {
                discard_part(part);
                return Err(FetchError::Status {
                    url: url.into(),
                    status,
                });
            }
        };
        let announced = match status {
            200 => total,
            _ => total.or(content_length.map(|n| n + start)),
        };
        if let Some(size) = announced.filter(|&n| n > limits.max_bytes) {
            discard_part(part);
            return Err(FetchError::TooLarge {
                url: url.into(),
                limit: limits.max_bytes,
                announced: Some(size),
            });
        }
        let mut file = if status == 200 {
            if offset > 0 {
                info!(url, offset, "the server sent the whole file; starting over");
                restarts += 1;
            }
            let new_meta = PartMeta { total, ..served };
            write_meta(part, &new_meta).map_err(io_err(part))?;
            meta = Some(new_meta);
            File::create(part).map_err(io_err(part))?
        } else {
            if meta.as_ref().is_some_and(|m| m.total.is_none()) && total.is_some() {
                let updated = PartMeta {
                    total,
                    ..meta.clone().unwrap_or_default()
                };
                write_meta(part, &updated).map_err(io_err(part))?;
                meta = Some(updated);
            }
            let mut file = OpenOptions::new()
                .write(true)
                .open(part)
                .map_err(io_err(part))?;
            file.seek(SeekFrom::Start(start)).map_err(io_err(part))?;
            file
        };
        let mut body = response.into_body().into_reader();
        let mut position = start;
        let mut buffer = vec![0u8; 256 << 10];
        let outcome = loop {
            let n = match body.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            if position + n as u64 > limits.max_bytes {
                drop(file);
                discard_part(part);
                return Err(FetchError::TooLarge {
                    url: url.into(),
                    limit: limits.max_bytes,
                    announced: None,
                });
            }
            file.write_all(&buffer[..n]).map_err(io_err(part))?;
            position += n as u64;
            fetched += n as u64;
        };
        let progressed = position > start;
        match outcome {
            Ok(()) if announced.is_none_or(|n| n == position) => {
                file.flush().map_err(io_err(part))?;
                info!(
                    url,
                    size = position,
                    resumed_from,
                    restarts,
                    "download complete"
                );
                return Ok(Downloaded {
                    size: position,
                    resumed_from,
                    fetched,
                    restarts,
                });
            }
            outcome => {
                let source = outcome.err().unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended early")
                });
                if is_timeout(&source) || Instant::now() >= deadline {
                    return Err(FetchError::TimedOut {
                        url: url.into(),
                        timeout: limits.timeout,
                        received: position,
                    });
                }
                if !progressed || attempts >= MAX_ATTEMPTS {
                    return Err(FetchError::Interrupted {
                        url: url.into(),
                        attempts,
                        received: position,
                        source,
                    });
                }
                info!(url, received = position, error = %source, "connection dropped; resuming");
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<ureq::Error>())
            .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)))
}

impl PartMeta {
    /// The `If-Range` validator: a strong ETag, else Last-Modified.
    fn validator(&self) -> Option<String> {
        self.etag
            .clone()
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| self.last_modified.clone())
    }

    /// Does a response describe the same file as this part (by whatever validators both have)?
    fn same_file(&self, served: &PartMeta) -> bool {
        let same = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        same(&self.etag, &served.etag) && same(&self.last_modified, &served.last_modified)
    }
}

fn read_meta(part: &Path) -> Option<PartMeta> {
    let text = fs::read_to_string(meta_path(part)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_meta(part: &Path, meta: &PartMeta) -> io::Result<()> {
    let text = serde_json::to_string(meta).map_err(io::Error::other)?;
    write_atomic(&meta_path(part), text.as_bytes(), 0o600)
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) → (START, TOTAL).
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    match total.trim() {
        "*" => Some((start, None)),
        n => {
            let total: u64 = n.parse().ok()?;
            (total > end).then_some((start, Some(total)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes 10-9/200"), None);
        assert_eq!(parse_content_range("bytes 0-199/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn validators() {
        let meta = PartMeta {
            url: "u".into(),
            etag: Some("W/\"weak\"".into()),
            last_modified: Some("Tue, 01 Jul 2025 00:00:00 GMT".into()),
            total: Some(3),
        };
        assert_eq!(
            meta.validator().as_deref(),
            Some("Tue, 01 Jul 2025 00:00:00 GMT")
        );
        let changed = PartMeta {
            etag: Some("W/\"other\"".into()),
            ..meta.clone()
        };
        assert!(!meta.same_file(&changed));
        let unknown = PartMeta {
            etag: None,
            last_modified: None,
            ..meta.clone()
        };
        assert!(meta.same_file(&unknown));
    }
}

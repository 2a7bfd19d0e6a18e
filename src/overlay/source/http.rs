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
use crate::overlay::space::{SpaceError, SpaceGuard};

/// Connections dropped mid-body are resumed at most this many times per call (each resume must
/// have made progress).
const MAX_ATTEMPTS: u32 = 5;

/// The bounds every [`download`] runs under.
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

/// Why a [`download`] failed. Every `url` is the URL as asked for (not where a redirect led).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server answered 404 or 410; the part is removed. The source simply lacks the
    /// overlay, so the next source is tried.
    #[error("{url}: the server has no such file (HTTP {status})")]
    NotFound {
        /// The URL asked for.
        url: String,
        /// The HTTP status (404 or 410).
        status: u16,
    },
    /// The URL, or a redirect, is plain `http://` and `stage.allow-http` is off.
    #[error("{url}: plain http is refused; use https, or set stage.allow-http = true (the overlay is verified against its manifest either way)")]
    HttpRefused {
        /// The URL asked for.
        url: String,
    },
    /// The server answered another status than 200, 206, 404, 410 or 416 (the part is
    /// removed), or partial responses forced more than 5 restarts from zero.
    #[error("{url}: the server answered HTTP {status}; expected 200 or 206")]
    Status {
        /// The URL asked for.
        url: String,
        /// The last HTTP status received.
        status: u16,
    },
    /// The file is larger than `stage.max-download-bytes`, as announced by the server or
    /// found while receiving it; the part is removed.
    #[error("{url}: the archive is larger than stage.max-download-bytes ({limit} bytes){}; raise the limit if it really is that large", announced.map(|n| format!(": the server announces {n} bytes")).unwrap_or_default())]
    TooLarge {
        /// The URL asked for.
        url: String,
        /// The limit in bytes ([`FetchLimits::max_bytes`]).
        limit: u64,
        /// The size the server announced, or `None` when the limit was crossed while
        /// receiving.
        announced: Option<u64>,
    },
    /// The whole download, resumes included, ran past [`FetchLimits::timeout`]; the part is
    /// kept for the next call to resume.
    #[error("{url}: not finished after {:?} (stage.download-timeout-secs), {received} bytes in; the part is kept and the next stage resumes it", timeout)]
    TimedOut {
        /// The URL asked for.
        url: String,
        /// The deadline that passed ([`FetchLimits::timeout`]).
        timeout: Duration,
        /// Bytes the part held when time ran out.
        received: u64,
    },
    /// The body ended early and could not be resumed: an attempt made no progress or 5
    /// requests were used up. The part is kept for the next call.
    #[error("{url}: the connection dropped {attempts} times without finishing ({received} bytes in); the part is kept and the next stage resumes it: {error}")]
    Interrupted {
        /// The URL asked for.
        url: String,
        /// Requests made in this call (restarts from zero included).
        attempts: u32,
        /// Bytes the part held when the last connection dropped.
        received: u64,
        /// Why the last body read ended (`UnexpectedEof` when it just ended short).
        error: io::Error,
    },
    /// The request failed before a status came back (DNS, connect, TLS, redirect loop, …).
    #[error("{url}: {error}")]
    Http {
        /// The URL asked for.
        url: String,
        /// ureq's error.
        error: Box<ureq::Error>,
    },
    /// The announced size does not fit on the store's file system with its reserve left free,
    /// or the download reached the reserve; the part is removed.
    #[error("{url}: {error}")]
    Space {
        /// The URL asked for.
        url: String,
        /// The numbers.
        error: SpaceError,
    },
    /// Writing the part file or its `.meta` file failed.
    #[error("{path}: {error}")]
    Io {
        /// The part file (also named when its `.meta` file failed).
        path: PathBuf,
        /// The OS error.
        error: io::Error,
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
    download_within(url, part, limits, &mut SpaceGuard::unchecked())
}

/// [`download`], refused before the body is written when the size the server announces does
/// not fit with `space`'s reserve left free, and stopped (the part removed) when writing
/// reaches the reserve.
pub fn download_within(
    url: &str,
    part: &Path,
    limits: &FetchLimits,
    space: &mut SpaceGuard,
) -> Result<Downloaded, FetchError> {
    let deadline = Instant::now() + limits.timeout;
    if url.starts_with("http://") && !limits.allow_http {
        return Err(FetchError::HttpRefused { url: url.into() });
    }
    let meta = read_meta(part).filter(|m| m.url == url);
    if meta.is_none() {
        discard_part(part);
    }
    let mut download = Download {
        url,
        part,
        limits,
        space,
        agent: http_agent(!limits.allow_http, None),
        deadline,
        meta,
        resumed_from: fs::metadata(part).map(|m| m.len()).unwrap_or(0),
        fetched: 0,
        restarts: 0,
        attempts: 0,
    };
    loop {
        if let Some(done) = download.attempt()? {
            return Ok(done);
        }
    }
}

/// One download in progress: what every attempt shares.
struct Download<'a> {
    url: &'a str,
    part: &'a Path,
    limits: &'a FetchLimits,
    space: &'a mut SpaceGuard,
    agent: ureq::Agent,
    deadline: Instant,
    /// What is known of the file the part belongs to; `None` once it is started over.
    meta: Option<PartMeta>,
    resumed_from: u64,
    fetched: u64,
    restarts: u32,
    attempts: u32,
}

/// How a response continues the part: its bytes go at `start`; the whole file is `total`
/// bytes, `announced` the size the response promises the part will reach.
struct Accepted {
    status: u16,
    start: u64,
    total: Option<u64>,
    announced: Option<u64>,
    served: PartMeta,
}

impl Download<'_> {
    /// One request: `Some` when the part is complete, `None` to try again (started over, or
    /// resuming after a dropped connection).
    fn attempt(&mut self) -> Result<Option<Downloaded>, FetchError> {
        self.attempts += 1;
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let offset = fs::metadata(self.part).map(|m| m.len()).unwrap_or(0);
        if remaining.is_zero() {
            return Err(self.timed_out(offset));
        }
        if offset > 0 && self.meta.as_ref().and_then(|m| m.total) == Some(offset) {
            // Complete already (the run that fetched it stopped before using it); the caller
            // verifies it like any download.
            info!(url = self.url, size = offset, "download already complete");
            return Ok(Some(self.done(offset)));
        }
        let response = self.request(offset, remaining)?;
        let Some(accepted) = self.accept(&response, offset)? else {
            return Ok(None);
        };
        if let Some(total) = accepted.announced {
            let need = total.saturating_sub(accepted.start);
            if let Err(e) = self.space.ensure(need, "the download") {
                discard_part(self.part);
                return Err(FetchError::Space {
                    url: self.url.into(),
                    error: e,
                });
            }
        }
        let file = self.open_part(&accepted, offset)?;
        self.receive(response, file, &accepted)
    }

    fn done(&self, size: u64) -> Downloaded {
        Downloaded {
            size,
            resumed_from: self.resumed_from,
            fetched: self.fetched,
            restarts: self.restarts,
        }
    }

    fn timed_out(&self, received: u64) -> FetchError {
        FetchError::TimedOut {
            url: self.url.into(),
            timeout: self.limits.timeout,
            received,
        }
    }

    fn io_err(&self) -> impl FnOnce(io::Error) -> FetchError {
        let path = self.part.to_path_buf();
        move |source| FetchError::Io {
            path,
            error: source,
        }
    }

    /// GET the file, from `offset` on when the part holds a prefix of it.
    fn request(
        &self,
        offset: u64,
        remaining: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        let mut request = self.agent.get(self.url);
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
            // If the file changed, a server that honours If-Range sends all of it (200).
            if let Some(validator) = self.meta.as_ref().and_then(PartMeta::validator) {
                request = request.header("If-Range", validator);
            }
        }
        let response = request
            .config()
            .timeout_global(Some(remaining))
            .build()
            .call();
        match response {
            Ok(response) => Ok(response),
            Err(ureq::Error::Timeout(_)) => Err(self.timed_out(offset)),
            Err(ureq::Error::RequireHttpsOnly(_)) => Err(FetchError::HttpRefused {
                url: self.url.into(),
            }),
            Err(e) => Err(FetchError::Http {
                url: self.url.into(),
                error: Box::new(e),
            }),
        }
    }

    /// Decide from the status and headers where the response's bytes go; `None` to start over.
    fn accept(
        &mut self,
        response: &ureq::http::Response<ureq::Body>,
        offset: u64,
    ) -> Result<Option<Accepted>, FetchError> {
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let served = PartMeta {
            url: self.url.into(),
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
                let known = self.meta.as_ref().and_then(|m| m.total);
                let same_file = self.meta.as_ref().is_some_and(|m| m.same_file(&served));
                match range {
                    Some((start, total))
                        if start == offset && same_file && (known.is_none() || total == known) =>
                    {
                        (start, total.or(known))
                    }
                    _ => return self.start_over(status, range).map(|()| None),
                }
            }
            404 | 410 => {
                discard_part(self.part);
                return Err(FetchError::NotFound {
                    url: self.url.into(),
                    status,
                });
            }
            _ => {
                discard_part(self.part);
                return Err(FetchError::Status {
                    url: self.url.into(),
                    status,
                });
            }
        };
        let announced = match status {
            200 => total,
            _ => total.or(content_length.map(|n| n + start)),
        };
        if let Some(size) = announced.filter(|&n| n > self.limits.max_bytes) {
            discard_part(self.part);
            return Err(FetchError::TooLarge {
                url: self.url.into(),
                limit: self.limits.max_bytes,
                announced: Some(size),
            });
        }
        Ok(Some(Accepted {
            status,
            start,
            total,
            announced,
            served,
        }))
    }

    /// An unusable partial response: drop the part and start from zero, a bounded number of times.
    fn start_over(
        &mut self,
        status: u16,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<(), FetchError> {
        debug!(
            url = self.url,
            status,
            ?range,
            "unusable partial response; starting over"
        );
        discard_part(self.part);
        self.meta = None;
        self.restarts += 1;
        if self.restarts > MAX_ATTEMPTS {
            return Err(FetchError::Status {
                url: self.url.into(),
                status,
            });
        }
        Ok(())
    }

    /// The part file positioned where the response's bytes go, its metadata brought up to date.
    fn open_part(&mut self, accepted: &Accepted, offset: u64) -> Result<File, FetchError> {
        let part = self.part;
        if accepted.status == 200 {
            if offset > 0 {
                info!(
                    url = self.url,
                    offset, "the server sent the whole file; starting over"
                );
                self.restarts += 1;
            }
            let new_meta = PartMeta {
                total: accepted.total,
                ..accepted.served.clone()
            };
            write_meta(part, &new_meta).map_err(self.io_err())?;
            self.meta = Some(new_meta);
            return File::create(part).map_err(self.io_err());
        }
        if self.meta.as_ref().is_some_and(|m| m.total.is_none()) && accepted.total.is_some() {
            let updated = PartMeta {
                total: accepted.total,
                ..self.meta.clone().unwrap_or_default()
            };
            write_meta(part, &updated).map_err(self.io_err())?;
            self.meta = Some(updated);
        }
        let mut file = OpenOptions::new()
            .write(true)
            .open(part)
            .map_err(self.io_err())?;
        file.seek(SeekFrom::Start(accepted.start))
            .map_err(self.io_err())?;
        Ok(file)
    }

    /// Copy the body into the part; `Some` when complete, `None` to resume after a drop.
    fn receive(
        &mut self,
        response: ureq::http::Response<ureq::Body>,
        mut file: File,
        accepted: &Accepted,
    ) -> Result<Option<Downloaded>, FetchError> {
        let mut body = response.into_body().into_reader();
        let mut position = accepted.start;
        let mut buffer = vec![0u8; 256 << 10];
        let outcome = loop {
            let n = match body.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            if position + n as u64 > self.limits.max_bytes {
                drop(file);
                discard_part(self.part);
                return Err(FetchError::TooLarge {
                    url: self.url.into(),
                    limit: self.limits.max_bytes,
                    announced: None,
                });
            }
            if let Err(e) = self.space.before_write(n as u64) {
                drop(file);
                discard_part(self.part);
                return Err(FetchError::Space {
                    url: self.url.into(),
                    error: e,
                });
            }
            file.write_all(&buffer[..n]).map_err(self.io_err())?;
            position += n as u64;
            self.fetched += n as u64;
        };
        match outcome {
            Ok(()) if accepted.announced.is_none_or(|n| n == position) => {
                file.flush().map_err(self.io_err())?;
                info!(
                    url = self.url,
                    size = position,
                    resumed_from = self.resumed_from,
                    restarts = self.restarts,
                    "download complete"
                );
                Ok(Some(self.done(position)))
            }
            outcome => {
                let source = outcome.err().unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended early")
                });
                self.dropped(source, position, position > accepted.start)
                    .map(|()| None)
            }
        }
    }

    /// The body ended early: resume if this attempt made progress and attempts are left.
    fn dropped(
        &self,
        source: io::Error,
        position: u64,
        progressed: bool,
    ) -> Result<(), FetchError> {
        if is_timeout(&source) || Instant::now() >= self.deadline {
            return Err(self.timed_out(position));
        }
        if !progressed || self.attempts >= MAX_ATTEMPTS {
            return Err(FetchError::Interrupted {
                url: self.url.into(),
                attempts: self.attempts,
                received: position,
                error: source,
            });
        }
        info!(url = self.url, received = position, error = %source, "connection dropped; resuming");
        Ok(())
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

//! The fetcher's half of staging (`nvdriver-agent fetch-serve`, run by
//! `nvdriver-agent-fetch.service` without privileges): one request on the socket systemd passed,
//! staged with [`super::stage`] into a store in the fetcher's own state directory, one answer,
//! then the process exits. See [`crate::overlay::fetcher`] for the protocol and why.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use tracing::info;

use crate::host::Root;
use crate::overlay::fetcher::{FailureKind, FetchReply, FetchRequest, Hello, RemoteAttempt};
use crate::overlay::source::{stage_with, AttemptError, SourceError};
use crate::overlay::store::Store;

/// The most a request line may hold.
const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// Why the fetcher could not serve its one request.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No listening socket came from systemd (and none was named).
    #[error("no listening socket was passed (LISTEN_FDS); run this from nvdriver-agent-fetch.socket, or name one with --listen")]
    NoSocket,
    /// The socket failed.
    #[error("the fetch socket: {0}")]
    Socket(#[from] io::Error),
    /// The request line was not valid.
    #[error("the request is not valid: {0}")]
    Request(serde_json::Error),
}

/// The listening socket systemd passed (`LISTEN_FDS`), or a new one bound at `listen` (a host
/// path; tests and runs by hand).
pub fn listener(root: &Root, listen: Option<&Path>) -> Result<UnixListener, ServeError> {
    if let Some(path) = listen {
        let path = root.join(path);
        let _ = std::fs::remove_file(&path);
        return Ok(UnixListener::bind(&path)?);
    }
    let fds =
        libsystemd::activation::receive_descriptors(true).map_err(|_| ServeError::NoSocket)?;
    let fd = fds.into_iter().next().ok_or(ServeError::NoSocket)?;
    Ok(listener_from(fd))
}

#[allow(unsafe_code)]
fn listener_from(fd: libsystemd::activation::FileDescriptor) -> UnixListener {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: systemd passed this descriptor to us alone (receive_descriptors took it out of
    // the environment), and it is a listening AF_UNIX stream socket (ListenStream= of the unit).
    unsafe { UnixListener::from_raw_fd(fd.into_raw_fd()) }
}

/// Accept one connection and serve it: greet, read the request, stage into
/// `<state_dir>/store`, answer. Returns whether an overlay was left for the daemon to take over:
/// only then must this process exit (the daemon takes over only once it is gone); after a
/// failure it serves the next request, so a fetcher is still there for the shutdown stage
/// (systemd restarts none once shutdown began; seen in the QEMU ostree-late-update scenario).
pub fn serve_one(
    root: &Root,
    listener: &UnixListener,
    state_dir: &Path,
) -> Result<bool, ServeError> {
    let (mut stream, _) = listener.accept()?;
    let mut hello = serde_json::to_vec(&Hello {
        fetcher: "nvdriver-agent-fetch".into(),
    })
    .expect("a greeting serializes");
    hello.push(b'\n');
    stream.write_all(&hello)?;
    let request = read_request(&stream)?;
    let store_dir = state_dir.join(crate::overlay::fetcher::STORE_SUBDIR);
    let reply = fetch(root, &store_dir, request);
    let mut line = serde_json::to_vec(&reply).expect("a reply serializes");
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(reply.staged_from.is_some())
}

fn read_request(stream: &UnixStream) -> Result<FetchRequest, ServeError> {
    let mut line = Vec::new();
    BufReader::new(stream.take(MAX_REQUEST_BYTES)).read_until(b'\n', &mut line)?;
    serde_json::from_slice(&line).map_err(ServeError::Request)
}

/// Stage the request into the fetcher's store and say how it went.
fn fetch(root: &Root, store_dir: &Path, request: FetchRequest) -> FetchReply {
    let mut settings = request.settings;
    // Never hand on: this process is the fetcher.
    settings.fetcher = None;
    let key = request.key;
    info!(KERNEL_RELEASE = %key.kernel_release, DRIVER_VERSION = %key.driver_version, "fetching for the agent");
    if let Err(e) = crate::fsutil::create_dir_all_mode(&root.join(store_dir), 0o755) {
        return FetchReply {
            error: Some(format!("{}: {e}", store_dir.display())),
            ..FetchReply::default()
        };
    }
    let store = Store::new(root, store_dir);
    let staged = stage_with(
        root,
        &store,
        &settings,
        &key,
        request.module_tree.as_deref(),
        request.registry_auth.as_deref(),
    );
    match staged {
        Ok(report) => {
            if let Err(e) = open_for_takeover(&root.join(store_dir), &key) {
                return FetchReply {
                    error: Some(e.to_string()),
                    ..FetchReply::default()
                };
            }
            FetchReply {
                staged_from: Some(report.source),
                digest: report.digest,
                tried: report.tried.iter().map(remote).collect(),
                error: None,
            }
        }
        Err(SourceError::NotFound { tried, .. } | SourceError::Failed { tried, .. }) => {
            FetchReply {
                tried: tried.iter().map(remote).collect(),
                ..FetchReply::default()
            }
        }
        Err(e) => FetchReply {
            error: Some(e.to_string()),
            ..FetchReply::default()
        },
    }
}

fn remote(attempt: &super::SourceAttempt) -> RemoteAttempt {
    RemoteAttempt {
        source: attempt.source.clone(),
        message: attempt.error.to_string(),
        kind: kind_of(&attempt.error),
    }
}

fn kind_of(error: &AttemptError) -> FailureKind {
    if error.is_not_found() {
        FailureKind::NotFound
    } else if error.is_no_room() {
        FailureKind::NoRoom
    } else if error.is_invalid() {
        FailureKind::Invalid
    } else {
        FailureKind::Other
    }
}

/// Let the daemon move the overlay out: it holds no `CAP_DAC_OVERRIDE`, so the directories it
/// renames out of and removes must be writable by it, and so must the overlay's own directory
/// (rename(2) of a directory to another parent rewrites its `..`: EACCES without write on it;
/// seen in the QEMU guest, where the daemon really lacks the capability). They sit under
/// `/var/lib/private` (mode 0700, root's), which no one else can enter; the daemon makes the
/// overlay root's and 0755 again before it looks at anything in it.
fn open_for_takeover(store: &Path, key: &crate::overlay::key::OverlayKey) -> io::Result<()> {
    let kernel_dir: PathBuf = store.join(&key.kernel_release);
    let overlay_dir = kernel_dir.join(&key.driver_version);
    for dir in [store, kernel_dir.as_path(), overlay_dir.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    }
    Ok(())
}

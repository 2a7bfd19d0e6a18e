//! The unprivileged fetcher's protocol and the root daemon's side of it.
//!
//! Downloads, the registry protocol and unpacking (C decompressors) run in
//! `nvdriver-agent-fetch.service` (`DynamicUser=yes`, no capabilities, `ProtectSystem=strict`;
//! see `units/`), not in the daemon that may load modules. The fetcher serves one request on the
//! socket systemd hands it (`nvdriver-agent-fetch.socket`, root's only), stages the overlay into a
//! store in its own state directory with the same code the daemon would use
//! ([`crate::overlay::source::serve`]), answers and exits; `Restart=always` brings a fresh one.
//! The daemon waits until every process of the fetch unit is gone (its cgroup is empty, so no
//! descriptor the fetcher held can write any more), then takes over what it left
//! ([`crate::overlay::source`]'s takeover): renamed out of the fetcher's reach, owned by root,
//! nothing unlisted, no hard links, verified against the manifest and its signature, published.
//!
//! One exchange: the fetcher sends [`Hello`] (with the kernel-filled `SCM_CREDENTIALS` that name
//! its pid, so the daemon reads its cgroup from the kernel, not from what it says); the daemon
//! sends one [`FetchRequest`] line; the fetcher answers one [`FetchReply`] line and closes.
//! A fetcher that staged something exits; one that did not serves the next request.

use std::io::{self, BufRead, BufReader, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::StageSettings;
use crate::host::Root;
use crate::overlay::key::OverlayKey;

/// The fetch unit; its cgroup must be the one the answering process runs in.
pub const UNIT: &str = "nvdriver-agent-fetch.service";
/// The fetcher's state directory as root sees it (`StateDirectory=` of a `DynamicUser=` unit
/// lives under `/var/lib/private`, which only root can enter).
pub const STATE_DIR: &str = "/var/lib/private/nvdriver-agent-fetch";
/// The store the fetcher stages into, under its state directory.
pub const STORE_SUBDIR: &str = "store";
/// The socket the shipped units use (`nvdriver-agent-fetch.socket`).
pub const SOCKET: &str = "/run/nvdriver-agent/fetch.sock";
/// The most a request or reply line may hold.
const MAX_LINE_BYTES: u64 = 4 << 20;
/// How long a fetcher may take to greet.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the fetch unit's processes may take to be gone after its answer.
const GONE_TIMEOUT: Duration = Duration::from_secs(30);

/// The fetcher's first line: it is there and ready for a request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Always `nvdriver-agent-fetch`.
    pub fetcher: String,
}

/// What the daemon asks for: the overlay, with the daemon's own stage settings (so both sides
/// apply one configuration) and the target kernel's module tree, when known.
// No Debug: it may carry registry credentials.
#[derive(Serialize, Deserialize)]
pub struct FetchRequest {
    /// The overlay to stage.
    pub key: OverlayKey,
    /// Sources, limits, reserve and trust policy, as the daemon read them.
    pub settings: StageSettings,
    /// The target kernel's module tree, when the daemon knows it.
    pub module_tree: Option<PathBuf>,
    /// The text of `/etc/nvdriver-agent/auth.json` (root's, mode 0600, which the fetcher cannot
    /// read), when there is one.
    pub registry_auth: Option<String>,
}

/// The class of a source's failure, so the daemon's exit status and status report stay what
/// they are when it stages in-process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The source does not have the overlay.
    NotFound,
    /// No room on the store's file system.
    NoRoom,
    /// The source had something, and it is not a valid overlay for the key.
    Invalid,
    /// Anything else (network, I/O).
    Other,
}

/// One source that did not give the overlay, as the fetcher saw it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoteAttempt {
    /// The expanded source.
    pub source: String,
    /// Why, as the fetcher's error said it.
    pub message: String,
    /// The class of the failure.
    pub kind: FailureKind,
}

/// The fetcher's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FetchReply {
    /// The source that gave the overlay, now in the fetcher's store; none when no source did.
    pub staged_from: Option<String>,
    /// For an `oci://` source: the digest its reference resolved to.
    pub digest: Option<String>,
    /// The sources tried before it (or all of them), with why each did not give it.
    pub tried: Vec<RemoteAttempt>,
    /// A failure before any source was tried (no sources, its store's lock, its keys).
    pub error: Option<String>,
}

/// Why the exchange with the fetcher did not give an answer the daemon can act on.
#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    /// Nothing listens on the socket.
    #[error("cannot reach the fetcher at {socket}: {source}; is nvdriver-agent-fetch.socket running? (systemctl status nvdriver-agent-fetch.socket)")]
    Connect {
        /// The socket, as a host path.
        socket: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading or writing the socket failed (including the fetcher's time running out).
    #[error(
        "talking to the fetcher at {socket}: {source}; see journalctl -u nvdriver-agent-fetch"
    )]
    Exchange {
        /// The socket, as a host path.
        socket: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// No greeting came (no fetcher could be started, or it failed at once).
    #[error("no fetcher answered on {socket} within 15 s: {source}; see systemctl status nvdriver-agent-fetch.service (at shutdown systemd starts no new fetcher)")]
    NoGreeting {
        /// The socket, as a host path.
        socket: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A line was not what the protocol says.
    #[error("the fetcher at {socket} sent {what} that is not valid: {message}")]
    Protocol {
        /// The socket, as a host path.
        socket: PathBuf,
        /// Which line.
        what: &'static str,
        /// What was wrong with it.
        message: String,
    },
    /// The answering process is not the sandboxed fetch unit.
    #[error("the process answering on {socket} (pid {pid}) runs in cgroup {cgroup:?}, not in {UNIT}; nothing it fetched is taken over (is the socket served by the shipped unit?)")]
    NotTheUnit {
        /// The socket, as a host path.
        socket: PathBuf,
        /// The peer's pid, from the kernel.
        pid: i32,
        /// Its cgroup, from `/proc/<pid>/cgroup` ("" when unreadable).
        cgroup: String,
    },
    /// The fetch unit's processes did not all exit after the answer.
    #[error("processes of {UNIT} were still running {secs} s after its answer (cgroup {cgroup}); what it fetched is not taken over")]
    Lingered {
        /// The unit's cgroup.
        cgroup: String,
        /// How long the daemon waited.
        secs: u64,
    },
}

/// Ask the fetcher at `socket` (a host path) for `request`; returns its answer once every process
/// of the fetch unit has exited. `timeout` bounds the wait for the answer.
pub fn exchange(
    root: &Root,
    socket: &Path,
    request: &FetchRequest,
    timeout: Duration,
) -> Result<FetchReply, FetcherError> {
    let connect = |source| FetcherError::Connect {
        socket: socket.to_path_buf(),
        source,
    };
    let io_error = |source| FetcherError::Exchange {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = connect_passing_credentials(&root.join(socket)).map_err(connect)?;
    // A fetcher greets at once; none comes when systemd could not start one (at shutdown it
    // starts no new unit): do not wait out the whole download time for that.
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(io_error)?;
    let (hello, pid) = receive_hello(&stream).map_err(|e| FetcherError::NoGreeting {
        socket: socket.to_path_buf(),
        source: e,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    protocol_line::<Hello>(socket, "its greeting", &hello)?;
    let cgroup = unit_cgroup(root, socket, pid)?;
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_error)?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(io_error)?;
    let mut reply = Vec::new();
    (&stream)
        .take(MAX_LINE_BYTES)
        .read_to_end(&mut reply)
        .map_err(io_error)?;
    let reply = protocol_line::<FetchReply>(socket, "its answer", &reply)?;
    // Nothing to take over, nothing to wait for: the fetcher stays for the next request.
    if reply.staged_from.is_some() {
        wait_until_gone(root, &cgroup, GONE_TIMEOUT)?;
    }
    Ok(reply)
}

/// A connected stream that receives the sender's credentials with every message. `SO_PASSCRED`
/// is set before `connect`: a message queued before it would come without them (pid 0).
fn connect_passing_credentials(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::PassCred, &true)?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// The first line and the sender's pid, which the kernel fills in (`SO_PASSCRED`): a process
/// without `CAP_SYS_ADMIN` cannot name another pid (unix(7), `SCM_CREDENTIALS`).
fn receive_hello(stream: &UnixStream) -> io::Result<(Vec<u8>, i32)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let (bytes, pid) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )?;
        let pid = msg.cmsgs()?.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(creds) if creds.pid() > 0 => Some(creds.pid()),
            _ => None,
        });
        (msg.bytes, pid)
    };
    let pid = pid.ok_or_else(|| io::Error::other("no credentials came with the greeting"))?;
    buf.truncate(bytes);
    if !buf.ends_with(b"\n") {
        // The rest of the line (a greeting is short; a stream may still split it).
        let mut rest = Vec::new();
        BufReader::new(stream.take(4096)).read_until(b'\n', &mut rest)?;
        buf.extend(rest);
    }
    Ok((buf, pid))
}

fn protocol_line<T: serde::de::DeserializeOwned>(
    socket: &Path,
    what: &'static str,
    line: &[u8],
) -> Result<T, FetcherError> {
    serde_json::from_slice(line).map_err(|e| FetcherError::Protocol {
        socket: socket.to_path_buf(),
        what,
        message: if line.is_empty() {
            "nothing (it closed the connection; see journalctl -u nvdriver-agent-fetch)".into()
        } else {
            e.to_string()
        },
    })
}

/// The cgroup (v2) of `pid`, which must be the fetch unit's.
fn unit_cgroup(root: &Root, socket: &Path, pid: i32) -> Result<String, FetcherError> {
    let text =
        std::fs::read_to_string(root.join(format!("/proc/{pid}/cgroup"))).unwrap_or_default();
    let cgroup = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_string();
    if Path::new(&cgroup).file_name() != Some(std::ffi::OsStr::new(UNIT)) {
        return Err(FetcherError::NotTheUnit {
            socket: socket.to_path_buf(),
            pid,
            cgroup,
        });
    }
    Ok(cgroup)
}

/// Wait until the cgroup holds no process: its `cgroup.events` says `populated 0`, or systemd
/// removed it when the unit went inactive (`Restart=` brings a new one only after that).
fn wait_until_gone(root: &Root, cgroup: &str, timeout: Duration) -> Result<(), FetcherError> {
    let events = root.join(format!("/sys/fs/cgroup{cgroup}/cgroup.events"));
    let start = Instant::now();
    loop {
        match std::fs::read_to_string(&events) {
            Err(_) => return Ok(()),
            Ok(text) if text.lines().any(|l| l == "populated 0") => return Ok(()),
            Ok(_) if start.elapsed() > timeout => {
                return Err(FetcherError::Lingered {
                    cgroup: cgroup.to_string(),
                    secs: timeout.as_secs(),
                })
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_outside_the_fetch_unit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        std::fs::create_dir_all(dir.path().join("proc/42")).unwrap();
        std::fs::write(
            dir.path().join("proc/42/cgroup"),
            "0::/system.slice/sshd.service\n",
        )
        .unwrap();
        let err = unit_cgroup(&root, Path::new(SOCKET), 42).unwrap_err();
        assert!(err
            .to_string()
            .contains("not in nvdriver-agent-fetch.service"));
        std::fs::write(
            dir.path().join("proc/42/cgroup"),
            "0::/system.slice/nvdriver-agent-fetch.service\n",
        )
        .unwrap();
        assert_eq!(
            unit_cgroup(&root, Path::new(SOCKET), 42).unwrap(),
            "/system.slice/nvdriver-agent-fetch.service"
        );
    }

    #[test]
    fn gone_means_an_empty_or_removed_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let cg = "/system.slice/nvdriver-agent-fetch.service";
        let wait = || wait_until_gone(&root, cg, Duration::from_millis(50));
        assert!(wait().is_ok(), "a removed cgroup is an empty one");
        let events = dir
            .path()
            .join("sys/fs/cgroup/system.slice/nvdriver-agent-fetch.service");
        std::fs::create_dir_all(&events).unwrap();
        std::fs::write(events.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let err = wait().unwrap_err();
        assert!(err.to_string().contains("still running"), "{err}");
        std::fs::write(events.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(wait().is_ok());
    }
}

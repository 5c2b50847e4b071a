//! The control socket: `baton upgrade`, `baton status`, `baton stop`.
//!
//! Shared by library-mode servers and the `baton run` supervisor: same
//! socket rules, same messages. The socket lives in a private directory
//! (0700), is itself 0600, and both ends check the other's uid with
//! `SO_PEERCRED`.
//!
//! Framing: `u32` big-endian length, then one version byte, then
//! postcard. A connection carries one [`Request`]; the server answers with
//! zero or more [`Reply::Event`]s and exactly one final reply.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::listeners::ListenerInfo;
use baton_sys as sys;

/// Control protocol version.
pub const CONTROL_VERSION: u8 = 1;
/// Largest control frame.
pub const MAX_CONTROL_FRAME: usize = 256 * 1024;
/// How long a server waits for a client's request.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Start an upgrade and report its progress and result.
    Upgrade(UpgradeOptions),
    /// Report status.
    Status,
    /// Stop gracefully.
    Stop,
    /// [`Request::Upgrade`], refused at once ("in progress") instead of
    /// waiting while a generation starts (`baton upgrade --no-wait`). A
    /// variant of its own, appended, so that the wire form of the other
    /// requests is unchanged: an older server answers it "malformed".
    UpgradeNoWait(UpgradeOptions),
    /// `baton upgrade --self`: the supervisor re-executes itself in place
    /// (appended too: an older server answers it "malformed").
    UpgradeSelf,
}

/// Options of one upgrade.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UpgradeOptions {
    /// Refuse unless the executable's SHA-256 is this (hex).
    pub expect_sha256: Option<String>,
    /// Run this command line for the new generation instead of the current
    /// one.
    pub command: Option<Vec<String>>,
    /// Refuse at once instead of waiting for a starting generation to be
    /// ready. Not on the wire: [`Request::UpgradeNoWait`] carries it.
    #[serde(skip)]
    pub no_wait: bool,
    /// `baton upgrade --self`: re-execute the supervisor itself, not the
    /// app. Not on the wire: [`Request::UpgradeSelf`] carries it; a
    /// library-mode server refuses it.
    #[serde(skip)]
    pub self_exec: bool,
}

/// Progress of an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The new generation was started.
    Spawned {
        /// Its pid.
        pid: u32,
        /// Its generation number.
        generation: u64,
    },
    /// It reported ready.
    Ready {
        /// Its pid.
        pid: u32,
        /// Milliseconds from spawn to ready.
        after_ms: u64,
    },
    /// It was promoted: it serves now, the old one drains.
    Promoted {
        /// Its pid.
        pid: u32,
    },
    /// The old generation finished draining.
    Drained {
        /// Milliseconds from promotion to drained.
        after_ms: u64,
        /// Idle connections moved to the new generation.
        handed_over: u64,
        /// Connections closed at the drain deadline.
        closed: u64,
    },
    /// Anything else worth a line.
    Note(String),
}

/// Report progress to whoever asked for the upgrade. One who stopped
/// listening (a client that hung up) does not stop the upgrade.
pub(crate) fn emit(events: &mpsc::UnboundedSender<Event>, e: Event) {
    let _ = events.send(e);
}

/// Why a request failed, by category (the CLI maps each to an exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The upgrade was not started; nothing changed.
    Refused,
    /// It started, failed, and was rolled back.
    Failed,
    /// Another upgrade is running.
    InProgress,
    /// The request was malformed or not applicable.
    Invalid,
    /// Something unexpected inside the server.
    Internal,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Category.
    pub kind: FailureKind,
    /// What happened, for an operator.
    pub message: String,
}

impl From<&Error> for Failure {
    fn from(e: &Error) -> Self {
        let kind = match e {
            Error::Refused(_) => FailureKind::Refused,
            Error::InProgress(_) => FailureKind::InProgress,
            Error::Failed(_)
            | Error::NewGenerationFailed { .. }
            | Error::Protocol(_)
            | Error::PeerGone(_)
            | Error::FdsTruncated(_)
            | Error::State(_) => FailureKind::Failed,
            Error::Config(_) => FailureKind::Invalid,
            _ => FailureKind::Internal,
        };
        Failure {
            kind,
            message: e.to_string(),
        }
    }
}

/// The result of a successful upgrade.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// Generation before.
    pub from_generation: u64,
    /// Generation after.
    pub to_generation: u64,
    /// Pid of the old generation.
    pub old_pid: u32,
    /// Pid of the new generation.
    pub new_pid: u32,
    /// Spawn to ready, ms.
    pub ready_ms: u64,
    /// Promotion to the old generation's end, ms.
    pub drain_ms: u64,
    /// Trigger to the end, ms.
    pub total_ms: u64,
    /// Idle connections handed over.
    pub handed_over: u64,
    /// Connections closed at the drain deadline.
    pub closed_at_deadline: u64,
    /// Bytes of state handed over.
    pub state_bytes: u64,
    /// Exact state mode: how long this generation was paused (no accept, no
    /// new request read) from the snapshot to the promotion, ms.
    pub pause_ms: Option<u64>,
}

/// The last upgrade, for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUpgrade {
    /// `success`, `failed`, `refused`.
    pub result: String,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// When it ended (Unix ms).
    pub at_unix_ms: u64,
    /// The report, if it succeeded.
    pub report: Option<UpgradeReport>,
}

/// Counters reported in status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Upgrades that succeeded (this process's view).
    pub upgrades_succeeded: u64,
    /// Upgrades that failed and were rolled back.
    pub upgrades_failed: u64,
    /// Upgrades refused before anything started.
    pub upgrades_refused: u64,
    /// Idle connections handed to a successor.
    pub conns_handed_over: u64,
    /// Idle connections received from the predecessor.
    pub conns_received: u64,
    /// Bytes of already-read requests that came with them (replayed first).
    pub conns_received_prefix_bytes: u64,
    /// Connections closed because the drain deadline passed.
    pub conns_closed_at_deadline: u64,
    /// Connections handed to a successor that then died.
    pub conns_lost: u64,
    /// Restarts of a crashed generation (supervisor).
    pub restarts: u64,
}

/// `baton status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// `library` or `supervisor`.
    pub mode: String,
    /// Service name, if any.
    pub name: Option<String>,
    /// Application version string.
    pub app_version: String,
    /// Serving generation.
    pub generation: u64,
    /// Pid of the serving generation.
    pub pid: u32,
    /// Pid of the process that answered (the supervisor's in supervisor mode).
    pub answered_by: u32,
    /// Seconds since the serving generation started.
    pub uptime_ms: u64,
    /// Phase of the answering process.
    pub phase: String,
    /// An upgrade is running.
    pub upgrade_in_progress: bool,
    /// Listeners.
    pub listeners: Vec<ListenerInfo>,
    /// The last upgrade.
    pub last_upgrade: Option<LastUpgrade>,
    /// Counters.
    pub counters: Counters,
    /// Free-form notes (steering fallback, app `STATUS=` line...).
    pub notes: Vec<String>,
}

/// What the server sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Progress; more replies follow.
    Event(Event),
    /// Final: the upgrade succeeded.
    Upgraded(UpgradeReport),
    /// Final: status.
    Status(Box<StatusReport>),
    /// Final: stopping.
    Stopping,
    /// Final: the request failed.
    Failed(Failure),
}

impl Reply {
    /// Whether this ends the conversation.
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Event(_))
    }
}

/// A request as delivered to the owner of upgrade state, with its own reply
/// channels (the owner answers status at once even while an upgrade runs).
#[derive(Debug)]
pub enum Command {
    /// Upgrade; progress events go to `events`.
    Upgrade {
        /// Options.
        opts: UpgradeOptions,
        /// Progress sink (may be closed).
        events: mpsc::UnboundedSender<Event>,
        /// The final answer.
        reply: oneshot::Sender<Result<UpgradeReport, Failure>>,
    },
    /// Status.
    Status {
        /// The answer.
        reply: oneshot::Sender<StatusReport>,
    },
    /// Graceful stop.
    Stop {
        /// Answered when the stop begins.
        reply: oneshot::Sender<Result<(), Failure>>,
    },
}

async fn write_frame<T: Serialize>(s: &mut UnixStream, v: &T) -> Result<(), Error> {
    let mut body = vec![CONTROL_VERSION];
    body = postcard::to_extend(v, body).map_err(|e| Error::Control(format!("encode: {e}")))?;
    if body.len() > MAX_CONTROL_FRAME {
        return Err(Error::Control(format!(
            "frame of {} bytes too large",
            body.len()
        )));
    }
    let len = u32::try_from(body.len()).map_err(|_| Error::Control("frame too large".into()))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    s.write_all(&out)
        .await
        .map_err(|e| Error::io("control socket write", e))
}

async fn read_frame<T: for<'de> Deserialize<'de>>(s: &mut UnixStream) -> Result<Option<T>, Error> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::io("control socket read", e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_CONTROL_FRAME {
        return Err(Error::Control(format!("bad frame length {len}")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .await
        .map_err(|e| Error::io("control socket read", e))?;
    if body[0] != CONTROL_VERSION {
        return Err(Error::Control(format!(
            "peer speaks control protocol v{}, this build speaks v{CONTROL_VERSION}; use a baton binary of the same release",
            body[0]
        )));
    }
    postcard::from_bytes(&body[1..])
        .map(Some)
        .map_err(|e| Error::Control(format!("malformed message: {e}")))
}

/// Whether a peer uid may talk to a process running as `ours`: the same uid,
/// or root.
fn uid_allowed(peer: u32, ours: u32) -> bool {
    peer == ours || peer == 0
}

/// Create the control socket's directory (0700) if needed and check that an
/// existing one is private and ours.
///
/// # Errors
/// [`Error::Control`] when the directory is shared or owned by someone else.
pub fn prepare_dir(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| Error::Control(format!("{} has no parent directory", path.display())))?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::Control(format!("creating {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::Control(format!("chmod {}: {e}", dir.display())))?;
    }
    let meta =
        std::fs::metadata(dir).map_err(|e| Error::Control(format!("{}: {e}", dir.display())))?;
    if meta.uid() != sys::process::euid() {
        return Err(Error::Control(format!(
            "{} belongs to uid {}, not to us (uid {}): pick a private directory",
            dir.display(),
            meta.uid(),
            sys::process::euid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Error::Control(format!(
            "{} is writable by others (mode {:o}): the control socket needs a private directory (chmod 700)",
            dir.display(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

/// The default control socket path for a service name:
/// `$RUNTIME_DIRECTORY/NAME.sock` under systemd, else
/// `$XDG_RUNTIME_DIR/baton/NAME.sock`, else `/run/baton/NAME.sock` for root,
/// else `/tmp/baton-UID/NAME.sock`.
pub fn default_socket_path(name: &str) -> PathBuf {
    let file = format!("{name}.sock");
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several, separated by ':'.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        if !first.is_empty() {
            return PathBuf::from(first).join(file);
        }
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("baton").join(file);
    }
    if sys::process::euid() == 0 {
        return PathBuf::from("/run/baton").join(file);
    }
    PathBuf::from(format!("/tmp/baton-{}", sys::process::euid())).join(file)
}

/// Serve one control connection: check the peer, read one request, forward
/// it to the owner, stream the answer back.
pub async fn serve_connection(mut s: UnixStream, owner: mpsc::Sender<Command>) {
    let ours = sys::process::euid();
    // tokio's peer_cred copes with a peer in another PID namespace (pid 0).
    match s
        .peer_cred()
        .map(|c| (c.uid(), c.gid(), c.pid().unwrap_or(0)))
    {
        Ok((uid, _, pid)) if uid_allowed(uid, ours) => {
            tracing::debug!(peer_pid = pid, peer_uid = uid, "control connection");
        }
        Ok((uid, _, pid)) => {
            tracing::warn!(
                peer_pid = pid,
                peer_uid = uid,
                "control connection from another uid refused"
            );
            let _ = write_frame(
                &mut s,
                &Reply::Failed(Failure {
                    kind: FailureKind::Refused,
                    message: format!(
                        "uid {uid} may not use this control socket (owner uid {ours})"
                    ),
                }),
            )
            .await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "control connection without credentials refused");
            return;
        }
    }
    let req = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame::<Request>(&mut s)).await
    {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            let _ = write_frame(
                &mut s,
                &Reply::Failed(Failure {
                    kind: FailureKind::Invalid,
                    message: e.to_string(),
                }),
            )
            .await;
            return;
        }
        Err(_) => return,
    };
    let gone = || {
        Reply::Failed(Failure {
            kind: FailureKind::Internal,
            message: "this generation is shutting down; try again".into(),
        })
    };
    let no_wait = matches!(req, Request::UpgradeNoWait(_));
    let final_reply = match req {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            if owner.send(Command::Status { reply: tx }).await.is_err() {
                gone()
            } else {
                rx.await
                    .map_or_else(|_| gone(), |st| Reply::Status(Box::new(st)))
            }
        }
        Request::Stop => {
            let (tx, rx) = oneshot::channel();
            if owner.send(Command::Stop { reply: tx }).await.is_err() {
                gone()
            } else {
                match rx.await {
                    Ok(Ok(())) => Reply::Stopping,
                    Ok(Err(f)) => Reply::Failed(f),
                    Err(_) => gone(),
                }
            }
        }
        req @ (Request::Upgrade(_) | Request::UpgradeNoWait(_) | Request::UpgradeSelf) => {
            let opts = match req {
                Request::Upgrade(o) | Request::UpgradeNoWait(o) => UpgradeOptions { no_wait, ..o },
                _ => UpgradeOptions {
                    self_exec: true,
                    ..UpgradeOptions::default()
                },
            };
            let (etx, mut erx) = mpsc::unbounded_channel();
            let (tx, mut rx) = oneshot::channel();
            if owner
                .send(Command::Upgrade {
                    opts,
                    events: etx,
                    reply: tx,
                })
                .await
                .is_err()
            {
                gone()
            } else {
                loop {
                    tokio::select! {
                        biased;
                        ev = erx.recv() => match ev {
                            Some(ev) => {
                                if write_frame(&mut s, &Reply::Event(ev)).await.is_err() {
                                    // The client went away; the upgrade goes on.
                                }
                            }
                            None => {
                                break match (&mut rx).await {
                                    Ok(Ok(r)) => Reply::Upgraded(r),
                                    Ok(Err(f)) => Reply::Failed(f),
                                    Err(_) => gone(),
                                };
                            }
                        },
                        r = &mut rx => {
                            // Flush events sent before the result.
                            while let Ok(ev) = erx.try_recv() {
                                let _ = write_frame(&mut s, &Reply::Event(ev)).await;
                            }
                            break match r {
                                Ok(Ok(r)) => Reply::Upgraded(r),
                                Ok(Err(f)) => Reply::Failed(f),
                                Err(_) => gone(),
                            };
                        }
                    }
                }
            }
        }
    };
    let _ = write_frame(&mut s, &final_reply).await;
    let _ = s.shutdown().await;
}

/// A control-socket client.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connect, and check that the server runs as our uid (or root).
    ///
    /// # Errors
    /// [`Error::Control`] saying why it could not connect.
    pub async fn connect(path: &Path) -> Result<Client, Error> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::NotFound => {
                    " (no such socket: is the server running, with this --control path?)"
                }
                io::ErrorKind::ConnectionRefused => {
                    " (nobody is listening: the server is not running)"
                }
                io::ErrorKind::PermissionDenied => {
                    " (permission denied: the socket belongs to another user)"
                }
                _ => "",
            };
            Error::Control(format!("cannot connect to {}: {e}{hint}", path.display()))
        })?;
        let peer = sys::socket::peer_cred(stream.as_fd())
            .map_err(|e| Error::Control(format!("SO_PEERCRED: {e}")))?;
        let ours = sys::process::euid();
        if !uid_allowed(peer.uid, ours) {
            let pid = match peer.pid {
                0 => "pid not visible from this pid namespace".to_owned(),
                p => format!("pid {p}"),
            };
            return Err(Error::Control(format!(
                "the server at {} runs as uid {} ({pid}), not as us (uid {ours}); refusing to talk to it",
                path.display(),
                peer.uid
            )));
        }
        Ok(Client { stream })
    }

    /// Send a request. Read the answers with [`Client::next_reply`].
    ///
    /// # Errors
    /// I/O errors.
    pub async fn send(&mut self, req: &Request) -> Result<(), Error> {
        write_frame(&mut self.stream, req).await
    }

    /// The next reply; `None` if the server closed without a final reply.
    ///
    /// # Errors
    /// I/O or protocol errors.
    pub async fn next_reply(&mut self) -> Result<Option<Reply>, Error> {
        read_frame(&mut self.stream).await
    }

    /// Send a request and collect replies until the final one, calling
    /// `on_event` for each progress event.
    ///
    /// # Errors
    /// I/O or protocol errors, or the server closing early.
    pub async fn call(
        mut self,
        req: &Request,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Reply, Error> {
        if let Err(e) = self.send(req).await {
            // A server that refuses a peer answers and closes without
            // reading the request: its answer says why.
            if let Ok(Some(r)) = self.next_reply().await
                && r.is_final()
            {
                return Ok(r);
            }
            return Err(e);
        }
        loop {
            match self.next_reply().await? {
                Some(Reply::Event(e)) => on_event(&e),
                Some(r) => return Ok(r),
                None => {
                    return Err(Error::Control(
                        "the server closed the connection without an answer (did it exit?)".into(),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_reply_roundtrip_and_bad_frames() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_frame(&mut a, &Request::Upgrade(UpgradeOptions::default()))
            .await
            .unwrap();
        let got: Request = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(got, Request::Upgrade(UpgradeOptions::default()));

        // Oversized length prefix.
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(read_frame::<Request>(&mut b).await.is_err());

        let (mut a, mut b) = UnixStream::pair().unwrap();
        // Wrong version.
        a.write_all(&[0, 0, 0, 2, 9, 0]).await.unwrap();
        let e = read_frame::<Request>(&mut b).await.unwrap_err();
        assert!(e.to_string().contains("v9"), "{e}");

        let (mut a, mut b) = UnixStream::pair().unwrap();
        // Garbage body.
        a.write_all(&[0, 0, 0, 3, CONTROL_VERSION, 200, 200])
            .await
            .unwrap();
        assert!(read_frame::<Request>(&mut b).await.is_err());
    }

    #[tokio::test]
    async fn server_forwards_status() {
        let (client, server) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(serve_connection(server, tx));
        tokio::spawn(async move {
            if let Some(Command::Status { reply }) = rx.recv().await {
                let _ = reply.send(StatusReport {
                    generation: 3,
                    ..StatusReport::default()
                });
            }
        });
        let c = Client { stream: client };
        match c.call(&Request::Status, |_| {}).await.unwrap() {
            Reply::Status(s) => assert_eq!(s.generation, 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn failure_kinds() {
        assert_eq!(
            Failure::from(&Error::Refused("x".into())).kind,
            FailureKind::Refused
        );
        assert_eq!(
            Failure::from(&Error::InProgress("x".into())).kind,
            FailureKind::InProgress
        );
        assert_eq!(
            Failure::from(&Error::Failed("x".into())).kind,
            FailureKind::Failed
        );
        assert_eq!(
            Failure::from(&Error::NewGenerationFailed { reason: "x".into() }).kind,
            FailureKind::Failed
        );
    }
}

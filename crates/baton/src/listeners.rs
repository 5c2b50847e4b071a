//! The named listener registry, the accept gate and the stream type.
//!
//! Every listening socket of a generation lives here as one `OwnedFd`
//! (the *registry copy*). The application gets a [`Listener`] built on a
//! duplicate, so whatever the app does with its copy, the registry copy keeps
//! the kernel socket (and its accept queue) alive until this process exits.
//! That is what lets an old generation stop accepting at promotion yet resume
//! if its successor dies: it never closed anything.
//!
//! Sources, in order: the predecessor's handoff (same kernel sockets), then
//! systemd's `LISTEN_FDS`/`LISTEN_FDNAMES`, then a fresh bind.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::ListenAddr;
use crate::error::Error;
use crate::lifecycle::{AcceptGate, Phase};
use crate::protocol::{ListenerKind, ListenerMeta};
use baton_sys as sys;

pub use baton_sys::inherit::ListenFds;

/// Where a registry entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Handed over by the previous generation.
    Predecessor,
    /// systemd socket activation (`LISTEN_FDS`).
    Systemd,
    /// Bound by this process.
    Bound,
}

impl Origin {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Origin::Predecessor => "inherited from the previous generation",
            Origin::Systemd => "inherited from systemd (LISTEN_FDS)",
            Origin::Bound => "bound by this generation",
        }
    }
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: ListenerKind,
    fd: Arc<OwnedFd>,
    origin: Origin,
    used: bool,
}

/// A listener as reported in status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListenerInfo {
    /// Name.
    pub name: String,
    /// Address (`127.0.0.1:8080` or `unix:/path`).
    pub addr: String,
    /// Where the socket came from.
    pub origin: String,
}

/// The registry of this generation's listening sockets.
#[derive(Debug)]
pub(crate) struct Registry {
    entries: Mutex<Vec<Entry>>,
    backlog: i32,
}

fn kind_of(k: sys::socket::SocketKind) -> ListenerKind {
    match k {
        sys::socket::SocketKind::Tcp => ListenerKind::Tcp,
        sys::socket::SocketKind::Unix => ListenerKind::Unix,
    }
}

fn describe_fd(kind: ListenerKind, fd: &OwnedFd) -> String {
    match kind {
        ListenerKind::Tcp => sys::socket::tcp_local_addr(fd.as_fd())
            .map(|a| a.to_string())
            .unwrap_or_else(|e| format!("<{e}>")),
        ListenerKind::Unix => match sys::socket::unix_local_path(fd.as_fd()) {
            Ok(Some(p)) => format!("unix:{}", p.display()),
            Ok(None) => "unix:<unnamed>".into(),
            Err(e) => format!("<{e}>"),
        },
    }
}

impl Registry {
    pub(crate) fn new(backlog: i32) -> Self {
        Registry {
            entries: Mutex::new(Vec::new()),
            backlog,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // A poisoned registry only means another thread panicked mid-update of
        // a Vec of fds; the Vec itself is still valid.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add an inherited socket after checking it is a listening stream
    /// socket of the announced kind.
    pub(crate) fn add_inherited(
        &self,
        name: &str,
        announced: Option<ListenerKind>,
        fd: OwnedFd,
        origin: Origin,
    ) -> Result<(), Error> {
        let kind = sys::socket::listening_socket_kind(fd.as_fd())
            .map(kind_of)
            .map_err(|e| Error::listener(name, format!("inherited fd is unusable: {e}")))?;
        if let Some(a) = announced
            && a != kind
        {
            return Err(Error::listener(
                name,
                format!("announced as {a:?} but the socket is {kind:?}"),
            ));
        }
        let mut entries = self.lock();
        let mut unique = name.to_owned();
        let mut n = 2;
        while entries.iter().any(|e| e.name == unique) {
            unique = format!("{name}#{n}");
            n += 1;
        }
        tracing::debug!(listener = %unique, addr = %describe_fd(kind, &fd), origin = origin.as_str(), "inherited listener");
        entries.push(Entry {
            name: unique,
            kind,
            fd: Arc::new(fd),
            origin,
            used: false,
        });
        Ok(())
    }

    /// Get the socket for `name`: inherited if there is one (by name, or an
    /// unnamed systemd socket with the same address), else bound now.
    /// Returns a `CLOEXEC` duplicate for the application and the origin.
    ///
    /// With `strict_address` (a name baton derived from the address), an
    /// inherited socket of that name with another address is an error
    /// rather than kept with a warning.
    pub(crate) fn take_or_bind(
        &self,
        name: &str,
        addr: &ListenAddr,
        unix_mode: Option<u32>,
        strict_address: bool,
    ) -> Result<(ListenerKind, OwnedFd, Origin), Error> {
        let mut entries = self.lock();
        let pos = entries.iter().position(|e| e.name == name).or_else(|| {
            entries.iter().position(|e| {
                e.origin == Origin::Systemd
                    && !e.used
                    && (e.name == "unknown"
                        || e.name.starts_with("unknown#")
                        || e.name.starts_with("LISTEN_FD_"))
                    && addr.is_bound_by(e.fd.as_fd())
            })
        });
        if let Some(i) = pos {
            let e = &mut entries[i];
            if e.used {
                return Err(Error::listener(name, "already taken by this generation"));
            }
            let want_kind = match addr {
                ListenAddr::Tcp(_) => ListenerKind::Tcp,
                ListenAddr::Unix(_) => ListenerKind::Unix,
            };
            if e.kind != want_kind {
                return Err(Error::listener(
                    name,
                    format!(
                        "the inherited socket is {:?} but {addr} was asked for; \
                         give the new listener another name to change its kind",
                        e.kind
                    ),
                ));
            }
            let moved = !addr.is_bound_by(e.fd.as_fd());
            if moved && strict_address {
                return Err(Error::listener(
                    name,
                    format!(
                        "the inherited socket listens on {} but this name was derived from {addr}; \
                         name the listener explicitly (--listen NAME=ADDR) to keep a socket whose address changed",
                        describe_fd(e.kind, &e.fd)
                    ),
                ));
            }
            if moved {
                tracing::warn!(
                    listener = name,
                    inherited = %describe_fd(e.kind, &e.fd),
                    configured = %addr,
                    "inherited listener has another address than configured; keeping the inherited \
                     socket (a listening socket is never re-bound during an upgrade; restart to move it)"
                );
            }
            e.used = true;
            if e.name != name {
                e.name = name.to_owned();
            }
            let dup =
                sys::fd::dup(e.fd.as_fd()).map_err(|err| Error::listener(name, err.to_string()))?;
            return Ok((e.kind, dup, e.origin));
        }
        let (kind, fd) = match addr {
            ListenAddr::Tcp(a) => (ListenerKind::Tcp, bind_tcp(name, *a, self.backlog, false)?),
            ListenAddr::Unix(p) => (
                ListenerKind::Unix,
                bind_unix(name, p, self.backlog, unix_mode)?,
            ),
        };
        let dup = sys::fd::dup(fd.as_fd()).map_err(|err| Error::listener(name, err.to_string()))?;
        tracing::info!(listener = name, addr = %describe_fd(kind, &fd), "bound listener");
        entries.push(Entry {
            name: name.to_owned(),
            kind,
            fd: Arc::new(fd),
            origin: Origin::Bound,
            used: true,
        });
        Ok((kind, dup, Origin::Bound))
    }

    /// Take every inherited socket not taken yet (internal `baton.*` ones
    /// excepted): `(name, kind, CLOEXEC duplicate)` each.
    pub(crate) fn take_inherited(&self) -> Result<Vec<(String, ListenerKind, OwnedFd)>, Error> {
        let mut entries = self.lock();
        let mut out = Vec::new();
        for e in entries
            .iter_mut()
            .filter(|e| !e.used && e.origin != Origin::Bound && !e.name.starts_with("baton."))
        {
            let dup = sys::fd::dup(e.fd.as_fd())
                .map_err(|err| Error::listener(&e.name, err.to_string()))?;
            e.used = true;
            out.push((e.name.clone(), e.kind, dup));
        }
        Ok(out)
    }

    /// Sockets systemd passed (`LISTEN_FDS`) that this generation did not
    /// take: `(name, address)` each.
    pub(crate) fn unused_systemd(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .filter(|e| !e.used && e.origin == Origin::Systemd)
            .map(|e| (e.name.clone(), describe_fd(e.kind, &e.fd)))
            .collect()
    }

    /// The sockets to hand to a successor: every entry still held.
    pub(crate) fn handoff_set(&self) -> Vec<(ListenerMeta, Arc<OwnedFd>)> {
        self.lock()
            .iter()
            .map(|e| {
                (
                    ListenerMeta {
                        name: e.name.clone(),
                        kind: e.kind,
                    },
                    Arc::clone(&e.fd),
                )
            })
            .collect()
    }

    /// Close inherited sockets this generation never asked for (a listener
    /// removed from the configuration). Called once this generation serves.
    pub(crate) fn drop_unused(&self) {
        let mut entries = self.lock();
        entries.retain(|e| {
            if !e.used && e.origin != Origin::Bound {
                tracing::warn!(
                    listener = %e.name,
                    addr = %describe_fd(e.kind, &e.fd),
                    "closing an inherited listener this generation does not use"
                );
                false
            } else {
                true
            }
        });
    }

    /// Describe every listener (for status), internal ones excluded.
    pub(crate) fn describe(&self) -> Vec<ListenerInfo> {
        self.lock()
            .iter()
            .filter(|e| !e.name.starts_with("baton."))
            .map(|e| ListenerInfo {
                name: e.name.clone(),
                addr: describe_fd(e.kind, &e.fd),
                origin: e.origin.as_str().into(),
            })
            .collect()
    }
}

/// Bind a TCP listener (`SO_REUSEADDR`, `CLOEXEC`, non-blocking).
pub(crate) fn bind_tcp(
    name: &str,
    addr: SocketAddr,
    backlog: i32,
    reuseport: bool,
) -> Result<OwnedFd, Error> {
    sys::socket::bind_tcp(
        addr,
        sys::socket::TcpBindOptions {
            backlog,
            reuseport,
            nonblocking: true,
        },
    )
    .map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::AddrInUse {
            " (another process is listening there; is an old instance still running?)"
        } else if e.kind() == io::ErrorKind::PermissionDenied {
            " (ports below 1024 need CAP_NET_BIND_SERVICE)"
        } else {
            ""
        };
        Error::listener(name, format!("cannot bind {addr}: {e}{hint}"))
    })
}

/// Bind a Unix listener (`CLOEXEC`, non-blocking). A leftover socket file
/// nobody listens on (a crashed instance) is replaced; a live one is an
/// error. The path of a socket a generation serves is never unlinked by
/// baton afterwards: the next generation serves the same socket. `mode`, if
/// given, is applied to the socket file.
///
/// # Errors
/// [`Error::Listener`] naming `name` and saying what to do.
pub fn bind_unix(
    name: &str,
    path: &Path,
    backlog: i32,
    mode: Option<u32>,
) -> Result<OwnedFd, Error> {
    let fd = match sys::socket::bind_unix(path, backlog, true) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path).map_err(|e| {
                Error::listener(name, format!("cannot inspect {}: {e}", path.display()))
            })?;
            if !meta.file_type().is_socket() {
                return Err(Error::listener(
                    name,
                    format!(
                        "{} exists and is not a socket; remove it or pick another path",
                        path.display()
                    ),
                ));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::listener(
                        name,
                        format!("{} is served by a running process", path.display()),
                    ));
                }
                Err(ce) if ce.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale Unix socket nobody listens on");
                    std::fs::remove_file(path).map_err(|e| {
                        Error::listener(
                            name,
                            format!("cannot remove stale {}: {e}", path.display()),
                        )
                    })?;
                    sys::socket::bind_unix(path, backlog, true).map_err(|e| {
                        Error::listener(name, format!("cannot bind {}: {e}", path.display()))
                    })?
                }
                Err(ce) => {
                    return Err(Error::listener(
                        name,
                        format!("{} is in use: {ce}", path.display()),
                    ));
                }
            }
        }
        Err(e) => {
            return Err(Error::listener(
                name,
                format!("cannot bind {}: {e}", path.display()),
            ));
        }
    };
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::listener(name, format!("chmod {}: {e}", path.display())))?;
    }
    Ok(fd)
}

#[derive(Debug)]
enum ListenerIo {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A listening socket handed to the application.
///
/// [`accept`](Listener::accept) only yields connections while this
/// generation is *serving*: before it is promoted, while a successor is being
/// promoted or draining it, the socket stays open but unaccepted, so
/// connections wait in the kernel's queue for whichever generation serves.
#[derive(Debug)]
pub struct Listener {
    name: String,
    io: ListenerIo,
    gate: AcceptGate,
    active: std::sync::atomic::AtomicBool,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.set_active(false);
    }
}

/// A local or peer address of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// Unix socket (path if bound).
    Unix(Option<PathBuf>),
}

impl std::fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamAddr::Tcp(a) => write!(f, "{a}"),
            StreamAddr::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            StreamAddr::Unix(None) => write!(f, "unix:<unnamed>"),
        }
    }
}

impl Listener {
    pub(crate) fn new(
        name: &str,
        kind: ListenerKind,
        fd: OwnedFd,
        gate: AcceptGate,
    ) -> Result<Self, Error> {
        sys::fd::set_nonblocking(fd.as_fd(), true)
            .map_err(|e| Error::listener(name, e.to_string()))?;
        let io = match kind {
            ListenerKind::Tcp => ListenerIo::Tcp(
                tokio::net::TcpListener::from_std(std::net::TcpListener::from(fd))
                    .map_err(|e| Error::listener(name, e.to_string()))?,
            ),
            ListenerKind::Unix => ListenerIo::Unix(
                tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
                    .map_err(|e| Error::listener(name, e.to_string()))?,
            ),
        };
        Ok(Listener {
            name: name.to_owned(),
            io,
            gate,
            active: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn set_active(&self, on: bool) {
        use std::sync::atomic::Ordering;
        if self.active.swap(on, Ordering::SeqCst) != on {
            if on {
                self.gate.acceptors.activate();
            } else {
                self.gate.acceptors.deactivate();
            }
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    ///
    /// # Errors
    /// The OS error from `getsockname`.
    pub fn local_addr(&self) -> io::Result<StreamAddr> {
        match &self.io {
            ListenerIo::Tcp(l) => l.local_addr().map(StreamAddr::Tcp),
            ListenerIo::Unix(l) => Ok(StreamAddr::Unix(
                l.local_addr()?.as_pathname().map(Path::to_path_buf),
            )),
        }
    }

    /// Accept the next connection while this generation serves.
    ///
    /// Returns `None` once this generation is done for good (it exits).
    /// Errors are per-accept (e.g. `EMFILE`); keep calling after one, ideally
    /// after a short pause.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn accept(&self) -> Option<io::Result<(Stream, StreamAddr)>> {
        let mut rx = self.gate.phase.clone();
        loop {
            let phase = *rx.borrow_and_update();
            self.set_active(phase == Phase::Serving);
            match phase {
                Phase::Serving => {
                    tokio::select! {
                        r = self.accept_now() => {
                            if r.is_ok() {
                                first_accept();
                            }
                            return Some(r);
                        }
                        changed = rx.changed() => if changed.is_err() { return None },
                    }
                }
                Phase::Done => return None,
                _ => {
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    async fn accept_now(&self) -> io::Result<(Stream, StreamAddr)> {
        match &self.io {
            ListenerIo::Tcp(l) => {
                let (s, a) = l.accept().await?;
                Ok((Stream::Tcp(s), StreamAddr::Tcp(a)))
            }
            ListenerIo::Unix(l) => {
                let (s, a) = l.accept().await?;
                Ok((
                    Stream::Unix(s),
                    StreamAddr::Unix(a.as_pathname().map(Path::to_path_buf)),
                ))
            }
        }
    }
}

/// Trace the first connection this process accepts (`crate::trace`).
fn first_accept() {
    static SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SEEN.swap(true, std::sync::atomic::Ordering::Relaxed) {
        crate::trace::step("first accept");
    }
}

/// A connection: TCP or Unix stream, accepted or handed over.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(tokio::net::TcpStream),
    /// Unix stream.
    Unix(tokio::net::UnixStream),
}

impl Stream {
    /// Take the socket out of tokio, to hand it to another process.
    ///
    /// # Errors
    /// The OS error from deregistering it.
    pub fn into_owned_fd(self) -> io::Result<OwnedFd> {
        Ok(match self {
            Stream::Tcp(s) => OwnedFd::from(s.into_std()?),
            Stream::Unix(s) => OwnedFd::from(s.into_std()?),
        })
    }

    /// Wrap a connected socket fd (checks its family).
    ///
    /// # Errors
    /// The fd is not a stream socket, or registering it with tokio failed.
    pub fn from_owned_fd(fd: OwnedFd) -> io::Result<Self> {
        sys::fd::set_nonblocking(fd.as_fd(), true)?;
        Ok(match sys::socket::socket_family_kind(fd.as_fd())? {
            sys::socket::SocketKind::Tcp => Stream::Tcp(tokio::net::TcpStream::from_std(
                std::net::TcpStream::from(fd),
            )?),
            sys::socket::SocketKind::Unix => Stream::Unix(tokio::net::UnixStream::from_std(
                std::os::unix::net::UnixStream::from(fd),
            )?),
        })
    }

    /// Wrap a connected socket known to be non-blocking and of `kind` (a
    /// connection handed over by the previous generation: `O_NONBLOCK` is a
    /// flag of the open file description, which the old side's tokio set).
    /// Saves two syscalls per connection when thousands arrive at once.
    pub(crate) fn from_handed_fd(fd: OwnedFd, kind: sys::socket::SocketKind) -> io::Result<Self> {
        Ok(match kind {
            sys::socket::SocketKind::Tcp => Stream::Tcp(tokio::net::TcpStream::from_std(
                std::net::TcpStream::from(fd),
            )?),
            sys::socket::SocketKind::Unix => Stream::Unix(tokio::net::UnixStream::from_std(
                std::os::unix::net::UnixStream::from(fd),
            )?),
        })
    }

    /// The peer's address.
    ///
    /// # Errors
    /// The OS error from `getpeername`.
    pub fn peer_addr(&self) -> io::Result<StreamAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().map(StreamAddr::Tcp),
            Stream::Unix(s) => Ok(StreamAddr::Unix(
                s.peer_addr()?.as_pathname().map(Path::to_path_buf),
            )),
        }
    }

    /// Set `TCP_NODELAY` (no-op for Unix streams).
    ///
    /// # Errors
    /// The OS error from `setsockopt`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(on),
            Stream::Unix(_) => Ok(()),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_take_and_handoff_set() {
        let reg = Registry::new(16);
        let addr: ListenAddr = "127.0.0.1:0".parse().unwrap();
        let (kind, fd, origin) = reg.take_or_bind("http", &addr, None, false).unwrap();
        assert_eq!(kind, ListenerKind::Tcp);
        assert_eq!(origin, Origin::Bound);
        assert!(sys::fd::is_cloexec(fd.as_fd()).unwrap());
        assert!(
            reg.take_or_bind("http", &addr, None, false).is_err(),
            "take-once"
        );
        let set = reg.handoff_set();
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].0.name, "http");
    }

    #[tokio::test]
    async fn stale_unix_socket_is_replaced_live_one_is_not() {
        let dir = std::env::temp_dir().join(format!("baton-ut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        {
            let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
            drop(stale); // file stays, nobody listens
        }
        let fd = bind_unix("x", &path, 16, Some(0o600)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind_unix("x", &path, 16, None).unwrap_err();
        assert!(err.to_string().contains("running process"), "{err}");
        drop(fd);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn inherited_fd_must_be_a_listening_socket() {
        let reg = Registry::new(16);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = reg
            .add_inherited("x", None, OwnedFd::from(a), Origin::Systemd)
            .unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let err = reg
            .add_inherited("y", None, OwnedFd::from(file), Origin::Systemd)
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }
}

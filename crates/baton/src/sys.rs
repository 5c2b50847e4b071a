//! Every system call baton makes, in one place.
//!
//! Almost everything here is a thin, safe wrapper over `rustix`. The one
//! `unsafe` block is [`place_fds_before_exec`]: placing inherited fds at fixed
//! numbers in a child between `fork` and `exec` needs `pre_exec`, which Rust
//! marks unsafe because the closure runs in a forked child of a
//! multi-threaded process. The rest of the crate is `forbid(unsafe_code)` in
//! spirit (`deny` at the crate root, allowed only on this module).

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
    sockopt,
};

/// The kernel's limit on fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

fn to_io(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// A connected `AF_UNIX`/`SOCK_SEQPACKET` pair, both ends `CLOEXEC`.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(to_io)
}

/// Put an fd in non-blocking mode (a file-status flag: shared by every dup of
/// the same open file description).
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let mut flags = rustix::fs::fcntl_getfl(fd).map_err(to_io)?;
    flags.set(rustix::fs::OFlags::NONBLOCK, on);
    rustix::fs::fcntl_setfl(fd, flags).map_err(to_io)
}

/// Mark an fd close-on-exec.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).map_err(to_io)
}

/// Whether an fd is close-on-exec.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(rustix::io::fcntl_getfd(fd)
        .map_err(to_io)?
        .contains(rustix::io::FdFlags::CLOEXEC))
}

/// Duplicate an fd (the copy is `CLOEXEC`).
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(to_io)
}

/// Duplicate an fd to a number at or above `min` (the copy is `CLOEXEC`).
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, min).map_err(to_io)
}

/// Take ownership of an fd number inherited from our parent (systemd's
/// `LISTEN_FDS`, or baton's `BATON_HANDOFF_FD`) and mark it `CLOEXEC`.
///
/// Returns `Ok(None)` when nothing is open at that number. The caller must
/// adopt each number at most once (the listener registry reads the
/// environment once per process).
pub fn adopt_inherited_fd(raw: RawFd) -> io::Result<Option<OwnedFd>> {
    if raw < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to adopt fd {raw}: inherited fds start at 3"),
        ));
    }
    // SAFETY: the borrow is used only for the `fcntl(F_GETFD)` probe right
    // here; an fd number that is not open makes the kernel answer EBADF.
    let probe = unsafe { BorrowedFd::borrow_raw(raw) };
    match rustix::io::fcntl_getfd(probe) {
        Ok(_) => {}
        Err(rustix::io::Errno::BADF) => return Ok(None),
        Err(e) => return Err(to_io(e)),
    }
    // SAFETY: the number is open and was handed to this process on purpose by
    // its parent (the LISTEN_FDS / BATON_HANDOFF_FD conventions); nothing else
    // in this process owns it, because it is adopted once, at start-up.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(owned.as_fd())?;
    Ok(Some(owned))
}

/// Send one datagram with fds attached. Non-blocking sockets answer
/// `WouldBlock`.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} fds in one message (the kernel allows {SCM_MAX_FD})",
                fds.len()
            ),
        ));
    }
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("ancillary buffer too small"));
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(to_io)?;
    if sent != data.len() {
        return Err(io::Error::other(format!(
            "short seqpacket send: {sent} of {} bytes",
            data.len()
        )));
    }
    Ok(())
}

/// What [`recv_with_fds`] got.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the datagram (0 with no fds means the peer closed).
    pub len: usize,
    /// Fds that arrived (already `CLOEXEC`).
    pub fds: Vec<OwnedFd>,
    /// The datagram did not fit the buffer.
    pub truncated: bool,
    /// Some fds were dropped by the kernel (our fd limit, or too many fds).
    pub fds_truncated: bool,
}

/// Receive one datagram and up to [`SCM_MAX_FD`] fds, `MSG_CMSG_CLOEXEC`.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(to_io)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    Ok(Received {
        len: msg.bytes.min(buf.len()),
        fds,
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

/// The uid, gid and pid of the process on the other end of a Unix socket.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(u32, u32, i32)> {
    let c = sockopt::socket_peercred(fd).map_err(to_io)?;
    Ok((c.uid.as_raw(), c.gid.as_raw(), c.pid.as_raw_nonzero().get()))
}

/// This process's effective uid.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// This process's pid.
pub fn getpid() -> u32 {
    rustix::process::getpid()
        .as_raw_nonzero()
        .get()
        .unsigned_abs()
}

/// Our parent's pid (0 if we have none, e.g. in a fresh PID namespace).
pub fn getppid() -> u32 {
    rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs())
}

/// Raise `RLIMIT_NOFILE`'s soft limit to the hard limit (handed-over
/// connections arrive by the thousand). Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .map_err(to_io)?;
    }
    Ok(lim.maximum.unwrap_or(u64::MAX))
}

/// Make this process a child subreaper: orphaned descendants are reparented
/// to us instead of PID 1, so we can reap them.
pub fn set_child_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(to_io)
}

/// Send a signal to a process by pid.
pub fn kill(pid: u32, signal: rustix::process::Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"))?;
    rustix::process::kill_process(pid, signal).map_err(to_io)
}

/// Open a pidfd for a process (readable once it exits).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"))?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).map_err(to_io)
}

/// Reap any exited child without blocking; returns its pid, if one was reaped.
pub fn reap_any() -> io::Result<Option<u32>> {
    match rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {
        Ok(Some((pid, _))) => Ok(Some(pid.as_raw_nonzero().get().unsigned_abs())),
        Ok(None) => Ok(None),
        Err(rustix::io::Errno::CHILD) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// What kind of listening socket an fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// An `AF_INET`/`AF_INET6` stream socket.
    Tcp,
    /// An `AF_UNIX` stream socket.
    Unix,
}

/// Check that an inherited fd is a listening stream socket and say which kind.
pub fn listening_socket_kind(fd: BorrowedFd<'_>) -> io::Result<SocketKind> {
    let ty = sockopt::socket_type(fd).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a socket ({})", to_io(e)),
        )
    })?;
    if ty != SocketType::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a stream socket",
        ));
    }
    if !sockopt::socket_acceptconn(fd).map_err(to_io)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket is not listening",
        ));
    }
    socket_family_kind(fd)
}

/// The family of a stream socket, as a [`SocketKind`].
pub fn socket_family_kind(fd: BorrowedFd<'_>) -> io::Result<SocketKind> {
    let dom = sockopt::socket_domain(fd).map_err(to_io)?;
    if dom == AddressFamily::INET || dom == AddressFamily::INET6 {
        Ok(SocketKind::Tcp)
    } else if dom == AddressFamily::UNIX {
        Ok(SocketKind::Unix)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported socket family {dom:?}"),
        ))
    }
}

/// Check that an fd is a `SOCK_SEQPACKET` Unix socket (the handoff channel).
pub fn is_seqpacket(fd: BorrowedFd<'_>) -> bool {
    matches!(sockopt::socket_type(fd), Ok(t) if t == SocketType::SEQPACKET)
        && matches!(sockopt::socket_domain(fd), Ok(d) if d == AddressFamily::UNIX)
}

/// Options for binding a TCP listener.
#[derive(Debug, Clone, Copy)]
pub struct TcpBindOptions {
    /// `listen()` backlog.
    pub backlog: i32,
    /// Set `SO_REUSEPORT` (supervisor steering groups).
    pub reuseport: bool,
    /// Put the socket in non-blocking mode.
    pub nonblocking: bool,
}

/// Bind and listen on a TCP address: `CLOEXEC`, `SO_REUSEADDR`.
pub fn bind_tcp(addr: SocketAddr, opts: TcpBindOptions) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let mut flags = SocketFlags::CLOEXEC;
    if opts.nonblocking {
        flags |= SocketFlags::NONBLOCK;
    }
    let fd = rustix::net::socket_with(family, SocketType::STREAM, flags, None).map_err(to_io)?;
    sockopt::set_socket_reuseaddr(&fd, true).map_err(to_io)?;
    if opts.reuseport {
        sockopt::set_socket_reuseport(&fd, true).map_err(to_io)?;
    }
    rustix::net::bind(&fd, &addr).map_err(to_io)?;
    rustix::net::listen(&fd, opts.backlog).map_err(to_io)?;
    Ok(fd)
}

/// Bind and listen on a Unix socket path: `CLOEXEC`. The caller decides what
/// to do about an existing path (see `listeners::bind_unix`).
pub fn bind_unix(path: &Path, backlog: i32, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = SocketFlags::CLOEXEC;
    if nonblocking {
        flags |= SocketFlags::NONBLOCK;
    }
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)
        .map_err(to_io)?;
    let addr = SocketAddrUnix::new(path).map_err(to_io)?;
    rustix::net::bind(&fd, &addr).map_err(to_io)?;
    rustix::net::listen(&fd, backlog).map_err(to_io)?;
    Ok(fd)
}

/// The local address of a TCP socket.
pub fn tcp_local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let any = rustix::net::getsockname(fd).map_err(to_io)?;
    SocketAddr::try_from(any).map_err(|_| io::Error::other("not an IP socket"))
}

/// The path a Unix socket is bound to, if any.
pub fn unix_local_path(fd: BorrowedFd<'_>) -> io::Result<Option<std::path::PathBuf>> {
    let any = rustix::net::getsockname(fd).map_err(to_io)?;
    let unix = SocketAddrUnix::try_from(any).map_err(|_| io::Error::other("not a Unix socket"))?;
    Ok(unix
        .path()
        .map(|p| std::path::PathBuf::from(p.to_string_lossy().into_owned())))
}

/// Number of connections waiting in a TCP listener's accept queue.
///
/// Read from `/proc/net/tcp{,6}` (for a listening socket the `rx_queue`
/// column is the accept backlog), matched by the socket's inode: no
/// `getsockopt(TCP_INFO)` struct layout, no unsafe.
pub fn tcp_accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let inode = rustix::fs::fstat(fd).map_err(to_io)?.st_ino;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(n) = parse_proc_net_tcp_queue(&text, inode as u64) {
            return Ok(n);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "listening socket not found in /proc/net/tcp{,6}",
    ))
}

/// Find the `rx_queue` of the socket with `inode` in a `/proc/net/tcp` table.
pub fn parse_proc_net_tcp_queue(text: &str, inode: u64) -> Option<u32> {
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        if cols[9].parse::<u64>().ok() != Some(inode) {
            continue;
        }
        let rx = cols[4].split(':').nth(1)?;
        return u32::from_str_radix(rx, 16).ok();
    }
    None
}

/// Register an owned fd with tokio's reactor.
pub fn async_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` keeps the same open fd number for as long as it
    // lives, and the `AsyncFd` owns it, so the registration always refers to
    // the file it was made for (the I/O-safety condition of
    // `register_with_interest`).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts().1)
}

/// A fd placement for a child: `src` appears at number `target` in the child,
/// without `CLOEXEC`.
#[derive(Debug)]
pub struct FdPlacement {
    /// The fd in the parent. Must not be a number in any placement's `target`
    /// range; use [`dup_at_least`] to move it out of the way first.
    pub src: OwnedFd,
    /// The fd number in the child.
    pub target: RawFd,
}

/// Arrange for `placements` to be installed in the child just before `exec`.
///
/// Every other fd of ours stays `CLOEXEC` and is closed by `exec`.
pub fn place_fds_before_exec(cmd: &mut tokio::process::Command, placements: Vec<FdPlacement>) {
    let plan: Vec<(RawFd, RawFd)> = placements
        .iter()
        .map(|p| (p.src.as_raw_fd(), p.target))
        .collect();
    // The closure keeps the OwnedFds alive until the Command is dropped.
    let keep = placements;
    // SAFETY: the closure runs in the forked child before exec. It only calls
    // `dup3`/`fcntl` (async-signal-safe raw syscalls through rustix), does not
    // allocate, and touches only data captured by value (`plan` is a Vec
    // allocated before fork; reading it does not allocate). Sources were moved
    // above every target number by the caller, so no dup clobbers a source.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            for &(src, target) in &plan {
                let src_fd = BorrowedFd::borrow_raw(src);
                if src == target {
                    rustix::io::fcntl_setfd(src_fd, rustix::io::FdFlags::empty())?;
                } else {
                    // dup3 without O_CLOEXEC leaves the target inheritable.
                    let mut tgt = std::mem::ManuallyDrop::new(OwnedFd::from_raw_fd(target));
                    rustix::io::dup3(src_fd, &mut tgt, rustix::io::DupFlags::empty())?;
                }
            }
            Ok(())
        });
    }
}

/// Read this process's `/proc/self/fd` count (for leak checks and status).
pub fn open_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// An fd's raw number, for logs.
pub fn raw(fd: &impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}

/// Put `data` in a sealed memfd (no write, grow, shrink or further seals):
/// the receiver can trust its size and content not to change under it.
pub fn sealed_memfd(name: &str, data: &[u8]) -> io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(to_io)?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, data)?;
    let fd = OwnedFd::from(file);
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )
    .map_err(to_io)?;
    Ok(fd)
}

/// Read a sealed memfd of exactly `len` bytes (checked against its size and
/// seals, and against `limit`).
pub fn read_sealed_memfd(fd: OwnedFd, len: u64, limit: u64) -> io::Result<Vec<u8>> {
    use rustix::fs::SealFlags;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes exceeds the {limit}-byte state limit"),
        ));
    }
    let seals = rustix::fs::fcntl_get_seals(&fd).map_err(to_io)?;
    let need = SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE;
    if !seals.contains(need) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "memfd is not sealed",
        ));
    }
    let size = rustix::fs::fstat(&fd).map_err(to_io)?.st_size;
    if u64::try_from(size).ok() != Some(len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("memfd holds {size} bytes, message says {len}"),
        ));
    }
    let cap =
        usize::try_from(len).map_err(|_| io::Error::other("state too large for this platform"))?;
    let mut out = Vec::with_capacity(cap);
    let mut file = std::fs::File::from(fd);
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
    std::io::Read::read_to_end(&mut file, &mut out)?;
    if out.len() != cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short memfd read",
        ));
    }
    Ok(out)
}

//! Every system call baton makes, in one place.
//!
//! Almost everything here is a thin, safe wrapper over `rustix`. The
//! `unsafe` blocks, each with its `// SAFETY:` line, are: placing inherited
//! fds at fixed numbers in a child between `fork` and `exec`
//! ([`place_fds_before_exec`], `pre_exec` runs in a forked child of a
//! multi-threaded process), adopting fd numbers inherited from our parent,
//! registering an owned fd with tokio, and one raw `setsockopt`
//! ([`attach_reuseport_cbpf`], which rustix does not wrap). The rest of the
//! crate is `forbid(unsafe_code)` in spirit (`deny` at the crate root, allowed
//! only on this module).

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
    Ok(adopt_checked(raw, |_| Ok(()))?.map(|(fd, ())| fd))
}

/// Adopt an inherited fd that must be a listening stream socket
/// (`LISTEN_FDS`). The check runs *before* the fd is owned: if the number
/// is open but is something else — typically because the parent left it
/// closed and this process has since opened an fd of its own there (an
/// epoll, a pipe) — it is refused and left alone, never closed.
///
/// Returns `Ok(None)` when nothing is open at that number.
///
/// # Errors
/// `InvalidInput` naming what the fd is instead.
pub fn adopt_inherited_listener(raw: RawFd) -> io::Result<Option<(OwnedFd, SocketKind)>> {
    adopt_checked(raw, listening_socket_kind)
}

/// Probe `raw`, run `check` on it while it is only borrowed, and take
/// ownership (`CLOEXEC`) only if both succeed. `Ok(None)`: nothing is open
/// there.
fn adopt_checked<T>(
    raw: RawFd,
    check: impl FnOnce(BorrowedFd<'_>) -> io::Result<T>,
) -> io::Result<Option<(OwnedFd, T)>> {
    if raw < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to adopt fd {raw}: inherited fds start at 3"),
        ));
    }
    // SAFETY: the borrow is used only for the probes right here; an fd
    // number that is not open makes the kernel answer EBADF.
    let probe = unsafe { BorrowedFd::borrow_raw(raw) };
    match rustix::io::fcntl_getfd(probe) {
        Ok(_) => {}
        Err(rustix::io::Errno::BADF) => return Ok(None),
        Err(e) => return Err(to_io(e)),
    }
    let checked = check(probe)?;
    // SAFETY: the number is open and was handed to this process on purpose by
    // its parent (the LISTEN_FDS / BATON_HANDOFF_FD conventions); nothing else
    // in this process owns it, because it is adopted once, at start-up.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(owned.as_fd())?;
    Ok(Some((owned, checked)))
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

/// One classic-BPF instruction (the kernel's `struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CbpfInsn {
    /// Opcode (`BPF_LD | BPF_H | BPF_ABS`, ...).
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Generic field (constant, offset).
    pub k: u32,
}

/// The kernel's limit on classic-BPF program length (`BPF_MAXINSNS`).
pub const CBPF_MAX_INSNS: usize = 4096;

/// Attach a classic-BPF program to the `SO_REUSEPORT` group `fd` belongs to
/// (`SO_ATTACH_REUSEPORT_CBPF`): for each new connection the kernel runs it
/// and uses its return value as the index of the listening socket in the
/// group (in the order the sockets started listening; an index past the end
/// falls back to the hash). It replaces any program attached before, for
/// the whole group, atomically. No privileges are needed.
///
/// # Errors
/// `InvalidInput` for an empty or too long program; the OS error otherwise
/// (`EINVAL` when `fd` is not in a reuseport group or the program is
/// rejected by the kernel's checker).
pub fn attach_reuseport_cbpf(fd: BorrowedFd<'_>, prog: &[CbpfInsn]) -> io::Result<()> {
    if prog.is_empty() || prog.len() > CBPF_MAX_INSNS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a classic BPF program has 1 to {CBPF_MAX_INSNS} instructions, not {}",
                prog.len()
            ),
        ));
    }
    let mut filter: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        // Checked above: at most CBPF_MAX_INSNS (4096) fits in a u16.
        len: prog.len() as libc::c_ushort,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `fd` is a valid open fd for the duration of the borrow;
    // `fprog` is a properly initialised `sock_fprog` whose `filter` points
    // to `len` initialised `sock_filter`s owned by `filter`, which outlives
    // the call; the kernel only reads `optlen` bytes of `fprog` and copies
    // the program before returning, keeping no pointer to our memory.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast::<libc::c_void>(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `SO_REUSEPORT` is set on a socket.
pub fn socket_reuseport(fd: BorrowedFd<'_>) -> io::Result<bool> {
    sockopt::socket_reuseport(fd).map_err(to_io)
}

/// Whether a listening socket has connections waiting to be accepted (a
/// listener polls readable exactly when its accept queue is not empty).
/// Does not change the socket's flags, which are shared with every process
/// holding it.
pub fn accept_queue_nonempty(fd: BorrowedFd<'_>) -> io::Result<bool> {
    poll_readable_now(fd)
}

/// Whether an fd polls readable right now (zero timeout): a listener with
/// queued connections, a pidfd whose process exited, a socket with data.
pub fn poll_readable_now(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let n = rustix::event::poll(&mut fds, Some(&zero)).map_err(to_io)?;
    Ok(n > 0
        && fds[0]
            .revents()
            .intersects(rustix::event::PollFlags::IN | rustix::event::PollFlags::ERR))
}

/// Accept and close every connection waiting in a listener's queue, at most
/// `max`; returns how many. The caller makes sure nobody else accepts from
/// this socket meanwhile (the listener may be in blocking mode: a
/// connection taken by someone else between the poll and the accept would
/// make `accept` wait).
pub fn close_pending_connections(fd: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
    let mut n = 0;
    while n < max && accept_queue_nonempty(fd)? {
        let conn = rustix::net::accept_with(fd, SocketFlags::CLOEXEC).map_err(to_io)?;
        drop(conn);
        n += 1;
    }
    Ok(n)
}

/// Accept every connection waiting in a listener's queue, at most `max`,
/// and return them (`CLOEXEC`). Same caveat as
/// [`close_pending_connections`]: nobody else may accept from this socket
/// meanwhile.
pub fn accept_pending_connections(fd: BorrowedFd<'_>, max: usize) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::new();
    while out.len() < max && accept_queue_nonempty(fd)? {
        out.push(rustix::net::accept_with(fd, SocketFlags::CLOEXEC).map_err(to_io)?);
    }
    Ok(out)
}

/// Credentials the kernel attached to a datagram (`SCM_CREDENTIALS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderCreds {
    /// Sender's pid.
    pub pid: u32,
    /// Sender's uid.
    pub uid: u32,
    /// Sender's gid.
    pub gid: u32,
}

/// Ask the kernel to attach the sender's credentials to every datagram this
/// socket receives (`SO_PASSCRED`).
pub fn set_passcred(fd: BorrowedFd<'_>) -> io::Result<()> {
    sockopt::set_socket_passcred(fd, true).map_err(to_io)
}

/// What [`recv_with_creds`] got.
#[derive(Debug)]
pub struct CredDatagram {
    /// Bytes of the datagram in the buffer.
    pub len: usize,
    /// The datagram did not fit the buffer.
    pub truncated: bool,
    /// Who sent it (`None` if the socket lacks `SO_PASSCRED`).
    pub creds: Option<SenderCreds>,
}

/// Receive one datagram and its sender's credentials. Fds that come with it
/// are closed at once.
pub fn recv_with_creds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<CredDatagram> {
    let mut space = vec![
        MaybeUninit::<u8>::uninit();
        rustix::cmsg_space!(ScmRights(SCM_MAX_FD), ScmCredentials(1))
    ];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(to_io)?;
    let mut creds = None;
    for m in control.drain() {
        match m {
            RecvAncillaryMessage::ScmCredentials(c) => {
                creds = Some(SenderCreds {
                    pid: c.pid.as_raw_nonzero().get().unsigned_abs(),
                    uid: c.uid.as_raw(),
                    gid: c.gid.as_raw(),
                });
            }
            RecvAncillaryMessage::ScmRights(fds) => drop(fds.collect::<Vec<_>>()),
            _ => {}
        }
    }
    Ok(CredDatagram {
        len: msg.bytes.min(buf.len()),
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        creds,
    })
}

/// Send a signal to every process of a process group.
pub fn kill_group(pgid: u32, signal: rustix::process::Signal) -> io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid process group"))?;
    rustix::process::kill_process_group(pid, signal).map_err(to_io)
}

/// A TCP connection as `/proc/net/tcp{,6}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcTcpEntry {
    /// Kernel TCP state (1 = ESTABLISHED, 4 = FIN_WAIT1, 6 = TIME_WAIT,
    /// 10 = LISTEN...).
    pub state: u8,
    /// Socket inode; 0 while a connection waits in an accept queue (no
    /// process has a file for it yet) and again once it is closed.
    pub inode: u64,
}

/// TCP state `ESTABLISHED` in `/proc/net/tcp`.
pub const TCP_ESTABLISHED: u8 = 1;

/// Look up the socket whose local address is `local` and remote address is
/// `remote` in `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn proc_tcp_entry(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<ProcTcpEntry>> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(e) = parse_proc_net_tcp_entry(&text, local, remote) {
            return Ok(Some(e));
        }
    }
    Ok(None)
}

/// Parse `/proc/net/tcp{,6}` address notation: hex IP in host order per
/// 32-bit word, `:`, hex port.
pub fn parse_proc_net_tcp_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes()).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for w in 0..4 {
                let word = u32::from_str_radix(ip.get(w * 8..w * 8 + 8)?, 16).ok()?;
                bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => v6.into(),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |x: SocketAddr| match x.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), x.port()),
            None => x,
        },
        std::net::IpAddr::V4(_) => x,
    };
    canon(a) == canon(b)
}

/// Find the connection `local` ↔ `remote` in one `/proc/net/tcp{,6}` table.
pub fn parse_proc_net_tcp_entry(
    text: &str,
    local: SocketAddr,
    remote: SocketAddr,
) -> Option<ProcTcpEntry> {
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let (Some(l), Some(r)) = (
            parse_proc_net_tcp_addr(cols[1]),
            parse_proc_net_tcp_addr(cols[2]),
        ) else {
            continue;
        };
        if !same_endpoint(l, local) || !same_endpoint(r, remote) {
            continue;
        }
        return Some(ProcTcpEntry {
            state: u8::from_str_radix(cols[3], 16).ok()?,
            inode: cols[9].parse().ok()?,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_RET_K: u16 = 0x06;

    fn listener(addr: SocketAddr) -> OwnedFd {
        bind_tcp(
            addr,
            TcpBindOptions {
                backlog: 16,
                reuseport: true,
                nonblocking: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn reuseport_cbpf_steers_every_connection_to_one_socket() {
        let a = listener("127.0.0.1:0".parse().unwrap());
        let addr = tcp_local_addr(a.as_fd()).unwrap();
        let b = listener(addr);
        for (target, idle) in [(&b, &a), (&a, &b)] {
            let index = if std::ptr::eq(target, &b) { 1 } else { 0 };
            let prog = [CbpfInsn {
                code: BPF_RET_K,
                jt: 0,
                jf: 0,
                k: index,
            }];
            attach_reuseport_cbpf(a.as_fd(), &prog).unwrap();
            let conns: Vec<_> = (0..10)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!accept_queue_nonempty(idle.as_fd()).unwrap());
            assert_eq!(close_pending_connections(target.as_fd(), 100).unwrap(), 10);
            drop(conns);
        }
        assert!(attach_reuseport_cbpf(a.as_fd(), &[]).is_err());
    }

    #[test]
    fn proc_net_tcp_addresses() {
        assert_eq!(
            parse_proc_net_tcp_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_net_tcp_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_proc_net_tcp_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_proc_net_tcp_addr("zz:1"), None);
    }

    #[test]
    fn an_accepted_connection_gets_an_inode() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        let me = c.local_addr().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let queued = proc_tcp_entry(addr, me).unwrap().unwrap();
        assert_eq!(queued.state, TCP_ESTABLISHED);
        assert_eq!(queued.inode, 0, "not accepted yet");
        let (_s, _) = l.accept().unwrap();
        let accepted = proc_tcp_entry(addr, me).unwrap().unwrap();
        assert_ne!(accepted.inode, 0);
    }
}

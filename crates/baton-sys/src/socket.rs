//! Sockets: binding listeners, checking inherited ones, the accept queue,
//! peer credentials, and reuseport steering (classic BPF).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};

use crate::fd::{SCM_MAX_FD, poll_readable_now};
use crate::to_io;

/// The credentials of the process on the other end of a Unix socket
/// (`SO_PEERCRED`). The pid is 0 when that process is not visible from
/// this process's pid namespace (a server in a container asked by a client
/// on the host): read raw, never through a non-zero pid type.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<SenderCreds> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is open for the borrow; `c` is a properly aligned,
    // initialised `ucred` and `len` its size, so the kernel writes at most
    // `len` bytes into it; any bit pattern is a valid `ucred` (plain
    // integers, pid 0 included).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut c).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SenderCreds {
        pid: c.pid.unsigned_abs(),
        uid: c.uid,
        gid: c.gid,
    })
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

/// Credentials of a peer: of a connected socket's other end
/// ([`peer_cred`]) or of a datagram's sender (`SCM_CREDENTIALS`,
/// [`recv_with_creds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderCreds {
    /// The peer's pid; 0 when it is not visible from this process's pid
    /// namespace.
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
/// are closed at once (`MSG_CMSG_CLOEXEC` meanwhile). The pid is 0 when the
/// sender is not visible from our pid namespace: the control messages are
/// parsed by hand, never into a non-zero pid type.
pub fn recv_with_creds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<CredDatagram> {
    // Room for the credentials and up to SCM_MAX_FD fds, u64-aligned as
    // cmsghdr needs.
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe {
        libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32) as usize
            + libc::CMSG_SPACE((SCM_MAX_FD * std::mem::size_of::<libc::c_int>()) as u32) as usize
    };
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast::<libc::c_void>();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: `msg` points at `iov` (which points at `buf`) and at
    // `control`, all alive and exclusively borrowed for the call; the
    // kernel writes at most `iov_len` and `msg_controllen` bytes there.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut creds = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with
    // well-formed cmsghdrs; CMSG_FIRSTHDR/CMSG_NXTHDR stay within them and
    // CMSG_DATA points inside each header's `cmsg_len`. Data is read with
    // read_unaligned into plain integer types (any bit pattern is valid).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            let data = libc::CMSG_DATA(c);
            let payload = (h.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            if h.cmsg_level == libc::SOL_SOCKET
                && h.cmsg_type == libc::SCM_CREDENTIALS
                && payload >= std::mem::size_of::<libc::ucred>()
            {
                let u = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                creds = Some(SenderCreds {
                    pid: u.pid.unsigned_abs(),
                    uid: u.uid,
                    gid: u.gid,
                });
            } else if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                    let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                    // The kernel installed it for us and nothing else knows
                    // its number: owning it here closes it once.
                    drop(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let len = usize::try_from(n).unwrap_or(0);
    Ok(CredDatagram {
        len: len.min(buf.len()),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        creds,
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

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
    fn a_datagram_carries_its_senders_credentials_and_its_fds_are_closed() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        set_passcred(b.as_fd()).unwrap();
        let (r, _w) = crate::fd::pipe_cloexec().unwrap();
        let before = crate::fd::open_fd_count().unwrap();
        crate::fd::send_with_fds(a.as_fd(), b"READY=1", &[r.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let d = recv_with_creds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..d.len], b"READY=1");
        assert!(!d.truncated);
        let c = d.creds.unwrap();
        assert_eq!(c.pid, crate::process::getpid());
        assert_eq!(c.uid, crate::process::euid());
        assert_eq!(
            crate::fd::open_fd_count().unwrap(),
            before,
            "the passed fd is closed"
        );
        let peer = peer_cred(a.as_fd()).unwrap();
        assert_eq!(peer.pid, crate::process::getpid());
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
}

//! Sockets: binding listeners, checking inherited ones, the accept queue,
//! peer credentials, and reuseport steering (classic BPF).

use std::io;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SocketAddrUnix, SocketFlags, SocketType, sockopt,
};

use crate::fd::{SCM_MAX_FD, poll_readable_now};
use crate::to_io;

/// The uid, gid and pid of the process on the other end of a Unix socket.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(u32, u32, i32)> {
    let c = sockopt::socket_peercred(fd).map_err(to_io)?;
    Ok((c.uid.as_raw(), c.gid.as_raw(), c.pid.as_raw_nonzero().get()))
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

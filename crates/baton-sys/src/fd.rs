//! Fds: CLOEXEC by default, duplication, adoption of inherited fd numbers,
//! `SCM_RIGHTS` passing over the seqpacket channel, sealed memfds, and
//! registration with tokio.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::socket::{SocketKind, listening_socket_kind};
use crate::to_io;

/// The kernel's limit on fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

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
pub(crate) fn adopt_inherited_fd(raw: RawFd) -> io::Result<Option<OwnedFd>> {
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
pub(crate) fn adopt_inherited_listener(raw: RawFd) -> io::Result<Option<(OwnedFd, SocketKind)>> {
    adopt_checked(raw, listening_socket_kind)
}

/// Probe `raw`, run `check` on it while it is only borrowed, and take
/// ownership (`CLOEXEC`) only if both succeed. `Ok(None)`: nothing is open
/// there.
pub(crate) fn adopt_checked<T>(
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
    claim(raw)?;
    // SAFETY: the number is open and was handed to this process on purpose by
    // its parent (the conventions of `crate::inherit`, the only callers);
    // nothing else in this process owns it: `claim` lets each number be
    // adopted once per process.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(owned.as_fd())?;
    Ok(Some((owned, checked)))
}

/// Record that `raw` is being adopted; refuse a number adopted before (two
/// owners of one fd would close it twice).
fn claim(raw: RawFd) -> io::Result<()> {
    static ADOPTED: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());
    let mut adopted = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
    if adopted.contains(&raw) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("fd {raw} was adopted already in this process"),
        ));
    }
    adopted.push(raw);
    Ok(())
}

/// Mark close-on-exec every fd of this process that `keep` does not name
/// and that is not stdin/stdout/stderr, without owning any: fds a shell or
/// a harness left open by accident then never reach a child. Returns how
/// many it marked. Call it first thing, before threads open fds.
pub fn cloexec_inherited(keep: impl Fn(RawFd) -> bool) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut n = 0;
    for fd in fds.into_iter().filter(|&fd| fd > 2 && !keep(fd)) {
        // SAFETY: raw fcntl calls on a number, no Rust object made from it:
        // F_GETFD/F_SETFD only read and set the close-on-exec flag (EBADF for
        // a number closed meanwhile, such as the directory's own fd).
        let marked = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            flags >= 0
                && (flags & libc::FD_CLOEXEC != 0
                    || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) == 0)
        };
        if marked {
            n += 1;
        }
    }
    n
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

/// Clear an fd's close-on-exec flag: it will be inherited across `exec`.
pub fn clear_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).map_err(to_io)
}

/// A pipe, both ends `CLOEXEC`: `(read, write)`.
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(to_io)
}

/// Wait until an fd polls readable (or hung up), at most `timeout`.
/// Returns `false` on timeout.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::time::Timespec::try_from(timeout).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("timeout {timeout:?} out of range"),
        )
    })?;
    Ok(rustix::event::poll(&mut fds, Some(&ts)).map_err(to_io)? > 0)
}

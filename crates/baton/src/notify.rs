//! systemd's notification protocol (`sd_notify`), without libsystemd.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Sends `KEY=VALUE` datagrams to `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    addr: NotifyAddr,
}

#[derive(Debug, Clone)]
enum NotifyAddr {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`, if set.
    pub fn from_env() -> Option<Self> {
        let v = std::env::var_os("NOTIFY_SOCKET")?;
        Self::from_value(&v)
    }

    /// A notifier for an explicit socket (`/path` or `@abstract`).
    pub fn from_value(v: &std::ffi::OsStr) -> Option<Self> {
        let b = v.as_encoded_bytes();
        let addr = match b.first() {
            Some(b'/') => NotifyAddr::Path(PathBuf::from(v)),
            Some(b'@') => NotifyAddr::Abstract(b[1..].to_vec()),
            _ => return None,
        };
        Some(Notifier { addr })
    }

    /// Send one datagram (lines joined by `\n`).
    ///
    /// # Errors
    /// The OS error from `sendto`.
    pub fn send(&self, lines: &[String]) -> io::Result<()> {
        let msg = lines.join("\n");
        let sock = UnixDatagram::unbound()?;
        match &self.addr {
            NotifyAddr::Path(p) => sock.send_to(msg.as_bytes(), p)?,
            NotifyAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let a = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &a)?
            }
        };
        Ok(())
    }

    /// `BARRIER=1`: send a pipe's write end and wait until systemd closed it,
    /// i.e. processed every earlier message (`sd_notify_barrier`).
    ///
    /// # Errors
    /// The OS error, or a timeout.
    pub fn barrier(&self, timeout: Duration) -> io::Result<()> {
        use std::os::fd::AsFd;
        let (r, w) = baton_sys::fd::pipe_cloexec()?;
        let sock = UnixDatagram::unbound()?;
        match &self.addr {
            NotifyAddr::Path(p) => sock.connect(p)?,
            NotifyAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                sock.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
            }
        }
        baton_sys::fd::send_with_fds(sock.as_fd(), b"BARRIER=1", &[w.as_fd()])?;
        drop(w);
        // Wait for POLLHUP on the read end.
        if !baton_sys::fd::poll_readable(r.as_fd(), timeout)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "systemd did not answer BARRIER=1",
            ));
        }
        Ok(())
    }
}

/// `MONOTONIC_USEC=` value for `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    baton_sys::process::monotonic_usec()
}

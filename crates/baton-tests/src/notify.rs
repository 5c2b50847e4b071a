//! A fake systemd notification socket: records every datagram with the
//! sender's pid (SO_PASSCRED) and closes any fd it carries (BARRIER=1).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One notification.
#[derive(Debug, Clone)]
pub struct Note {
    pub pid: u32,
    pub lines: Vec<String>,
    pub fds: usize,
}

impl Note {
    pub fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line || l.starts_with(line))
    }
}

/// The socket.
#[derive(Debug)]
pub struct NotifySocket {
    pub path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path).unwrap();
        rustix::net::sockopt::set_socket_passcred(&sock, true).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            path: path.to_path_buf(),
            sock,
        }
    }

    /// The next notification, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Note> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        use std::mem::MaybeUninit;
        let deadline = Instant::now() + timeout;
        loop {
            let mut buf = [0u8; 4096];
            let mut space = [MaybeUninit::<u8>::uninit(); 512];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            match rustix::net::recvmsg(
                self.sock.as_fd(),
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            ) {
                Ok(r) => {
                    let mut pid = 0;
                    let mut fds: Vec<OwnedFd> = Vec::new();
                    for m in control.drain() {
                        match m {
                            RecvAncillaryMessage::ScmCredentials(c) => {
                                pid = c.pid.as_raw_nonzero().get() as u32
                            }
                            RecvAncillaryMessage::ScmRights(it) => fds.extend(it),
                            _ => {}
                        }
                    }
                    let text = String::from_utf8_lossy(&buf[..r.bytes]).into_owned();
                    let n = fds.len();
                    drop(fds); // completes a BARRIER=1
                    return Some(Note {
                        pid,
                        lines: text.lines().map(str::to_owned).collect(),
                        fds: n,
                    });
                }
                Err(_) => {
                    if Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Every notification until `quiet` passes without one.
    pub fn drain(&self, quiet: Duration) -> Vec<Note> {
        let mut out = Vec::new();
        while let Some(n) = self.recv(quiet) {
            out.push(n);
        }
        out
    }
}

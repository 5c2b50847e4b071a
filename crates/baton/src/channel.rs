//! The handoff channel: one end of a `SOCK_SEQPACKET` socketpair, driven by
//! tokio, carrying [`Msg`] frames with fds alongside.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::error::Error;
use crate::protocol::{self, MAX_FRAME, Msg};
use baton_sys as sys;

/// One end of the handoff channel.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// Wrap a seqpacket socket (made non-blocking here).
    pub(crate) fn new(fd: OwnedFd) -> Result<Self, Error> {
        sys::fd::set_nonblocking(fd.as_fd(), true).map_err(|e| Error::io("handoff channel", e))?;
        let fd = sys::fd::async_fd(fd, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| Error::io("registering the handoff channel", e))?;
        Ok(Channel { fd })
    }

    /// Send one message with its fds.
    ///
    /// # Cancel safety
    /// Cancel safe: a datagram is either sent whole or not at all.
    pub(crate) async fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        // Wiped when dropped: a frame may carry TLS session keys (an owned
        // connection's state blob).
        let frame = zeroize::Zeroizing::new(
            protocol::encode(msg).map_err(|e| Error::Protocol(e.to_string()))?,
        );
        loop {
            let mut guard = self
                .fd
                .writable()
                .await
                .map_err(|e| Error::io("handoff channel", e))?;
            match guard
                .try_io(|inner| sys::fd::send_with_fds(inner.get_ref().as_fd(), &frame[..], fds))
            {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Err(Error::PeerGone(format!(
                        "the other generation closed the handoff channel before {}",
                        msg.name()
                    )));
                }
                Ok(Err(e)) => {
                    return Err(Error::io(
                        format!("sending {} on the handoff channel", msg.name()),
                        e,
                    ));
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Receive one message. `Ok(None)` means the peer closed the channel
    /// (it exited).
    ///
    /// # Cancel safety
    /// Cancel safe: a datagram is either received whole or left queued.
    pub(crate) async fn recv(&self) -> Result<Option<(Msg, Vec<OwnedFd>)>, Error> {
        match self.recv_detail().await? {
            None => Ok(None),
            Some((msg, fds, false)) => Ok(Some((msg, fds))),
            Some((msg, fds, true)) => Err(Error::FdsTruncated(format!(
                "only {} fds of a {} message arrived (RLIMIT_NOFILE reached?)",
                fds.len(),
                msg.name()
            ))),
        }
    }

    /// Receive a message already queued, without waiting (the reactor's
    /// readiness cache is bypassed). `Ok(None)`: nothing queued, or EOF.
    pub(crate) fn try_recv_now(&self) -> Result<Option<Msg>, Error> {
        let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_FRAME + 1]);
        match sys::fd::recv_with_fds(self.fd.get_ref().as_fd(), &mut buf) {
            Ok(got) if got.len == 0 && got.fds.is_empty() => Ok(None),
            Ok(got) if got.truncated || got.fds_truncated => {
                Err(Error::Protocol("truncated frame".into()))
            }
            Ok(got) => protocol::decode(&buf[..got.len], got.fds.len())
                .map(Some)
                .map_err(|e| Error::Protocol(e.to_string())),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::ConnectionReset =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::io("receiving on the handoff channel", e)),
        }
    }

    /// Like [`recv`](Self::recv), but a message whose fds the kernel
    /// truncated (`MSG_CTRUNC`) is returned with `true` instead of failing,
    /// so the receiver can refuse exactly that message. Its fd count is not
    /// validated; the fds that did arrive are returned.
    pub(crate) async fn recv_detail(&self) -> Result<Option<(Msg, Vec<OwnedFd>, bool)>, Error> {
        let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_FRAME + 1]);
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| Error::io("handoff channel", e))?;
            let got = match guard
                .try_io(|inner| sys::fd::recv_with_fds(inner.get_ref().as_fd(), &mut buf))
            {
                Ok(Ok(got)) => got,
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Ok(Err(e)) => return Err(Error::io("receiving on the handoff channel", e)),
                Err(_would_block) => continue,
            };
            if got.len == 0 && got.fds.is_empty() && !got.truncated {
                return Ok(None);
            }
            if got.truncated || got.len > MAX_FRAME {
                return Err(Error::Protocol(format!(
                    "handoff frame larger than {MAX_FRAME} bytes"
                )));
            }
            let frame = &buf[..got.len];
            if got.fds_truncated {
                let msg = protocol::decode_ignoring_fds(frame)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                return Ok(Some((msg, got.fds, true)));
            }
            let msg = protocol::decode(frame, got.fds.len())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            return Ok(Some((msg, got.fds, false)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ConnMeta, Hello, PROTOCOL_VERSION};

    #[tokio::test]
    async fn messages_and_fds_cross_a_socketpair() {
        let (a, b) = sys::fd::seqpacket_pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let hello = Msg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            app_version: "t".into(),
            generation: 1,
            pid: 1,
        });
        a.send(&hello, &[]).await.unwrap();
        let (m, fds) = b.recv().await.unwrap().unwrap();
        assert_eq!(m, hello);
        assert!(fds.is_empty());

        // An fd crosses, arrives CLOEXEC, and refers to the same socket.
        let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
        let batch = Msg::Conns {
            batch: 1,
            conns: vec![ConnMeta {
                listener: "http".into(),
                prefix: vec![1, 2],
            }],
        };
        a.send(&batch, &[x.as_fd()]).await.unwrap();
        drop(x);
        let (m, mut fds) = b.recv().await.unwrap().unwrap();
        assert_eq!(m, batch);
        let fd = fds.pop().unwrap();
        assert!(sys::fd::is_cloexec(fd.as_fd()).unwrap());
        let got = std::os::unix::net::UnixStream::from(fd);
        use std::io::{Read, Write};
        (&got).write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        (&y).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");

        drop(a);
        assert!(
            b.recv().await.unwrap().is_none(),
            "EOF after the peer closes"
        );
    }

    #[tokio::test]
    async fn garbage_and_wrong_fd_counts_are_errors() {
        let (a, b) = sys::fd::seqpacket_pair().unwrap();
        let b = Channel::new(b).unwrap();
        sys::fd::send_with_fds(a.as_fd(), b"garbage", &[]).unwrap();
        assert!(matches!(b.recv().await, Err(Error::Protocol(_))));
        // Promote must carry no fds.
        let f = protocol::encode(&Msg::Promote).unwrap();
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        sys::fd::send_with_fds(a.as_fd(), &f, &[x.as_fd()]).unwrap();
        assert!(matches!(b.recv().await, Err(Error::Protocol(_))));
        // After rejecting bad frames the channel still works.
        let f = protocol::encode(&Msg::WantState).unwrap();
        sys::fd::send_with_fds(a.as_fd(), &f, &[]).unwrap();
        assert_eq!(b.recv().await.unwrap().unwrap().0, Msg::WantState);
    }
}

//! A TLS session carried by baton's record layer, as a byte stream hyper
//! can serve: [`RecordIo`] reads records from the socket and opens them,
//! seals what hyper writes. Used by a connection received from the
//! previous generation, and by one whose keys were extracted for a
//! successor that then refused it.
//!
//! What the record layer cannot follow does not break a response: after a
//! KeyUpdate or a renegotiation request, reads stay pending (the client's
//! next records are under a key we do not have) and [`RecordEvents`] tells
//! the connection task, which lets the response in progress finish, then
//! closes with close_notify. A bad record gets its fatal alert, then the
//! read fails. Writes past a key's usage limit fail; well before it,
//! [`RecordEvents`] asks for a close after the response.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use baton::Stream;
use rustls::AlertDescription;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::counters::CloseReason;
use super::record::{CannotFollow, Content, MAX_FRAGMENT, Opened, Opener, RecordError, Sealer};

/// Plaintext sealed per write call: a few records.
const WRITE_CHUNK: usize = 4 * MAX_FRAGMENT;
/// Sealed bytes buffered before a write waits for the socket.
const MAX_PENDING_WRITE: usize = 8 * MAX_FRAGMENT;
/// Bytes read from the socket per read call.
const READ_CHUNK: usize = 16 * 1024;

/// What happened on the connection that the connection task must act on
/// (written from inside hyper's I/O calls, read right after them).
#[derive(Debug, Default)]
pub(crate) struct RecordEvents {
    /// 0: nothing; else the [`CloseReason`] (see `reason_code`).
    reason: AtomicU8,
}

fn reason_code(r: CloseReason) -> u8 {
    match r {
        CloseReason::KeyUpdate => 1,
        CloseReason::Renegotiation => 2,
        CloseReason::Alert => 3,
        CloseReason::Limit => 4,
        CloseReason::Refused => 5,
    }
}

impl RecordEvents {
    fn set(&self, r: CloseReason) {
        // The first reason wins.
        let _ = self
            .reason
            .compare_exchange(0, reason_code(r), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why the connection must end (after the response in progress), if it must.
    pub(crate) fn reason(&self) -> Option<CloseReason> {
        match self.reason.load(Ordering::SeqCst) {
            1 => Some(CloseReason::KeyUpdate),
            2 => Some(CloseReason::Renegotiation),
            3 => Some(CloseReason::Alert),
            4 => Some(CloseReason::Limit),
            5 => Some(CloseReason::Refused),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// close_notify received (or EOF): reads return end of stream.
    Ended,
    /// Something we cannot follow: reads stay pending.
    Stuck,
    /// An error: reads fail.
    Failed,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct RecordIo {
    stream: Stream,
    opener: Opener,
    sealer: Sealer,
    /// Ciphertext received, not opened yet.
    rbuf: Vec<u8>,
    /// Plaintext opened (or carried over), not read yet.
    plain: Vec<u8>,
    /// Sealed bytes not written yet, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    read_state: ReadState,
    close_sent: bool,
    events: Arc<RecordEvents>,
}

impl RecordIo {
    /// A session continuing on `stream`: `unread` is ciphertext received and
    /// not opened, `plain` plaintext opened and not served yet.
    pub(crate) fn new(
        stream: Stream,
        unread: Vec<u8>,
        opener: Opener,
        sealer: Sealer,
        plain: Vec<u8>,
    ) -> RecordIo {
        RecordIo {
            stream,
            opener,
            sealer,
            rbuf: unread,
            plain,
            wbuf: Vec::new(),
            wpos: 0,
            read_state: ReadState::Open,
            close_sent: false,
            events: Arc::new(RecordEvents::default()),
        }
    }

    pub(crate) fn events(&self) -> Arc<RecordEvents> {
        Arc::clone(&self.events)
    }

    /// Whether the session can move on: nothing waiting to be written, no
    /// end or error seen, the keys not near their limit.
    pub(crate) fn can_move(&self) -> bool {
        self.wpos == self.wbuf.len()
            && self.read_state == ReadState::Open
            && !self.close_sent
            && self.events.reason().is_none()
    }

    /// Put plaintext back in front (what hyper read and did not consume).
    pub(crate) fn unread_plain(&mut self, front: &[u8]) {
        if !front.is_empty() {
            let mut p = front.to_vec();
            p.append(&mut self.plain);
            self.plain = p;
        }
    }

    /// Plaintext not served yet.
    pub(crate) fn plain_len(&self) -> usize {
        self.plain.len()
    }

    /// Ciphertext not opened yet.
    pub(crate) fn unread_len(&self) -> usize {
        self.rbuf.len()
    }

    /// Take the session apart to move it: (socket, unopened ciphertext,
    /// opener, sealer, unserved plaintext).
    pub(crate) fn into_parts(self) -> (Stream, Vec<u8>, Opener, Sealer, Vec<u8>) {
        (self.stream, self.rbuf, self.opener, self.sealer, self.plain)
    }

    /// Write out sealed bytes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// A record error: send its fatal alert (best effort, without waiting),
    /// and fail.
    fn fail(&mut self, cx: &mut Context<'_>, e: RecordError) -> io::Error {
        self.read_state = ReadState::Failed;
        if let Some(alert) = e.alert() {
            self.events.set(CloseReason::Alert);
            if !self.close_sent && self.sealer.seal_alert(alert, &mut self.wbuf).is_ok() {
                self.close_sent = true;
                let _ = self.poll_drain(cx);
            }
        }
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl AsyncRead for RecordIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(out.remaining());
                out.put_slice(&this.plain[..n]);
                this.plain.drain(..n);
                return Poll::Ready(Ok(()));
            }
            match this.read_state {
                ReadState::Open => {}
                ReadState::Ended => return Poll::Ready(Ok(())),
                // The connection task closes it (see the module docs).
                ReadState::Stuck => return Poll::Pending,
                ReadState::Failed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        RecordError::Closed,
                    )));
                }
            }
            let consumed = match this.opener.open(&mut this.rbuf) {
                Ok(Opened::Record { len, content }) => {
                    match content {
                        Content::Data(d) => this.plain.extend_from_slice(d),
                        Content::CloseNotify => this.read_state = ReadState::Ended,
                        Content::Alert(a) => {
                            this.read_state = ReadState::Failed;
                            tracing::debug!(alert = ?a, "the TLS client sent an alert");
                        }
                        Content::CannotFollow(what) => {
                            this.read_state = ReadState::Stuck;
                            this.events.set(match what {
                                CannotFollow::KeyUpdate => CloseReason::KeyUpdate,
                                CannotFollow::Renegotiation => CloseReason::Renegotiation,
                            });
                            tracing::debug!(
                                ?what,
                                "TLS: the client did what the record layer cannot follow; closing after the response"
                            );
                        }
                    }
                    Some(len)
                }
                Ok(Opened::Incomplete { .. }) => None,
                Err(e) => return Poll::Ready(Err(this.fail(cx, e))),
            };
            if let Some(len) = consumed {
                this.rbuf.drain(..len);
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.stream).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                if this.rbuf.is_empty() {
                    // EOF without close_notify: the end, as hyper sees it.
                    this.read_state = ReadState::Ended;
                    return Poll::Ready(Ok(()));
                }
                this.read_state = ReadState::Failed;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the TLS stream ended inside a record",
                )));
            }
            this.rbuf.extend_from_slice(rb.filled());
        }
    }
}

impl AsyncWrite for RecordIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wbuf.len() - this.wpos >= MAX_PENDING_WRITE {
            ready!(this.poll_drain(cx))?;
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = data.len().min(WRITE_CHUNK);
        if let Err(e) = this.sealer.seal_data(&data[..n], &mut this.wbuf) {
            if e == RecordError::KeyExhausted {
                this.events.set(CloseReason::Limit);
            }
            return Poll::Ready(Err(io::Error::other(e)));
        }
        if this.sealer.must_close() {
            this.events.set(CloseReason::Limit);
        }
        // Start writing; what the socket does not take now is written by
        // the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            let _ = this
                .sealer
                .seal_alert(AlertDescription::CloseNotify, &mut this.wbuf);
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tls::record::{Cipher, TrafficSecret, Version};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn secret(fill: u8) -> TrafficSecret {
        TrafficSecret::new(Cipher::Chacha20Poly1305, &[fill; 32], [fill; 12], 3).unwrap()
    }

    /// The server's RecordIo and the client's socket, sealer (for what the
    /// server opens) and opener (for what it seals).
    fn pair() -> (RecordIo, tokio::net::UnixStream, Sealer, Opener) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let v = Version::Tls13;
        let io = RecordIo::new(
            Stream::Unix(a),
            Vec::new(),
            Opener::new(v, secret(1)).unwrap(),
            Sealer::new(v, secret(2)).unwrap(),
            b"carried ".to_vec(),
        );
        (
            io,
            b,
            Sealer::new(v, secret(1)).unwrap(),
            Opener::new(v, secret(2)).unwrap(),
        )
    }

    async fn next_record(sock: &mut tokio::net::UnixStream, opener: &mut Opener) -> String {
        let mut buf = Vec::new();
        loop {
            let mut scratch = buf.clone();
            match opener.open(&mut scratch).unwrap() {
                Opened::Record { content, .. } => return format!("{content:?}"),
                Opened::Incomplete { .. } => {
                    let mut chunk = [0u8; 4096];
                    let n = sock.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "EOF before a whole record");
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn data_flows_both_ways_and_a_bad_record_gets_bad_record_mac_then_an_error() {
        let (mut io, mut client, mut c_seal, mut c_open) = pair();
        let mut wire = Vec::new();
        c_seal.seal_data(b"request", &mut wire).unwrap();
        client.write_all(&wire).await.unwrap();
        let mut got = vec![0u8; 15];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"carried request", "the carried plaintext comes first");
        io.write_all(b"response").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            next_record(&mut client, &mut c_open).await,
            "Data([114, 101, 115, 112, 111, 110, 115, 101])"
        );
        // A record under the right header and the wrong key.
        let mut bad = Vec::new();
        Sealer::new(Version::Tls13, secret(9))
            .unwrap()
            .seal_data(b"forged", &mut bad)
            .unwrap();
        client.write_all(&bad).await.unwrap();
        let e = io.read(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert_eq!(io.events().reason(), Some(CloseReason::Alert));
        assert_eq!(
            next_record(&mut client, &mut c_open).await,
            "Alert(BadRecordMac)"
        );
        assert!(!io.can_move());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_sends_close_notify_and_the_peers_close_notify_is_the_end() {
        let (mut io, mut client, mut c_seal, mut c_open) = pair();
        let mut got = vec![0u8; 8];
        io.read_exact(&mut got).await.unwrap();
        let mut wire = Vec::new();
        c_seal
            .seal_alert(rustls::AlertDescription::CloseNotify, &mut wire)
            .unwrap();
        client.write_all(&wire).await.unwrap();
        assert_eq!(
            io.read(&mut got).await.unwrap(),
            0,
            "close_notify reads as the end"
        );
        io.shutdown().await.unwrap();
        assert_eq!(next_record(&mut client, &mut c_open).await, "CloseNotify");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_key_near_its_usage_limit_asks_for_a_close_and_is_never_used_past_it() {
        use crate::tls::record::{AES_GCM_RECORD_LIMIT, CLOSE_MARGIN};
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let v = Version::Tls13;
        let key = |seq| TrafficSecret::new(Cipher::Aes128Gcm, &[4; 16], [4; 12], seq).unwrap();
        let mut io = RecordIo::new(
            Stream::Unix(a),
            Vec::new(),
            Opener::new(v, key(0)).unwrap(),
            Sealer::new(v, key(AES_GCM_RECORD_LIMIT - CLOSE_MARGIN - 2)).unwrap(),
            Vec::new(),
        );
        io.write_all(b"x").await.unwrap();
        assert_eq!(io.events().reason(), None);
        io.write_all(b"y").await.unwrap();
        assert_eq!(io.events().reason(), Some(CloseReason::Limit));
        assert!(!io.can_move());
        let mut io = RecordIo::new(
            io.stream,
            Vec::new(),
            Opener::new(v, key(0)).unwrap(),
            Sealer::new(v, key(AES_GCM_RECORD_LIMIT - 1)).unwrap(),
            Vec::new(),
        );
        // The last sequence number is kept for the closing alert.
        assert!(io.write_all(b"z").await.is_err());
        io.shutdown().await.unwrap();
    }
}

//! The socket as rustls sees it before a possible key extraction: bytes
//! are given to rustls **whole records at a time**, and the rest stays in
//! our buffer.
//!
//! Why: when rustls' secrets are extracted, a partial record inside rustls
//! is lost silently (and unread plaintext with it). With this reader under
//! tokio-rustls, rustls only ever holds whole records, which it decrypts at
//! once; at an idle point everything it was given is processed, and the
//! bytes of a record still arriving are here, to travel as ciphertext with
//! the connection ([`Aligned::into_parts`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::record::{HEADER_LEN, whole_records};

/// A record header announcing more than this is garbage (or an attack):
/// it is given to rustls at once, which refuses it, rather than buffered.
const MAX_RECORD: usize = HEADER_LEN + (1 << 14) + 2048;
/// Bytes read from the socket per read call.
const READ_CHUNK: usize = 8 * 1024;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Aligned<T> {
    inner: T,
    /// Read from the socket, not yet given to rustls.
    buf: BytesMut,
    /// Bytes at the front of `buf` that may be given (whole records, or the
    /// rest of a record rustls got part of).
    ready: usize,
    /// Bytes of the record being given that rustls has not had yet (0: what
    /// rustls got ends on a record boundary).
    rest_of_record: usize,
    eof: bool,
}

impl<T> Aligned<T> {
    pub(crate) fn new(inner: T) -> Self {
        Aligned {
            inner,
            buf: BytesMut::new(),
            ready: 0,
            rest_of_record: 0,
            eof: false,
        }
    }

    /// Whether rustls holds no partial record (what it got ends on a record
    /// boundary).
    pub(crate) fn at_record_boundary(&self) -> bool {
        self.rest_of_record == 0
    }

    /// Bytes read and not given to rustls.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The socket and the bytes rustls never got.
    pub(crate) fn into_parts(self) -> (T, Vec<u8>) {
        (self.inner, self.buf.to_vec())
    }

    /// How much of `buf` (at a record boundary) may be given now.
    fn releasable(&self) -> usize {
        if self.eof {
            return self.buf.len();
        }
        if let Some(&[_, _, _, hi, lo]) = self.buf.get(..HEADER_LEN)
            && HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo])) > MAX_RECORD
        {
            // rustls refuses it from its header.
            return self.buf.len();
        }
        whole_records(&self.buf)
    }

    /// Give `n` bytes of the ready region to rustls: account for where
    /// they end relative to record boundaries.
    fn release(&mut self, n: usize) {
        let mut left = n;
        let mut at = 0;
        while left > 0 {
            if self.rest_of_record == 0 {
                self.rest_of_record = match self.buf.get(at..at + HEADER_LEN) {
                    Some(&[_, _, _, hi, lo]) => {
                        HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]))
                    }
                    // A released tail without a whole header (EOF or
                    // garbage): no boundary to keep any more.
                    _ => left,
                };
            }
            let take = left.min(self.rest_of_record);
            self.rest_of_record -= take;
            left -= take;
            at += take;
        }
        self.ready -= n;
        self.buf.advance(n);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Aligned<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready == 0 && this.rest_of_record == 0 {
                this.ready = this.releasable();
            }
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.release(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.buf.extend_from_slice(rb.filled());
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Aligned<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn rec(len: usize, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(fill, len));
        r
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_whole_records_are_given_and_a_partial_one_stays_here() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut wire = rec(10, 1);
        wire.extend(rec(6000, 2));
        let partial = rec(100, 3);
        wire.extend_from_slice(&partial[..40]);
        tokio::io::AsyncWriteExt::write_all(&mut a, &wire)
            .await
            .unwrap();
        let mut r = Aligned::new(b);
        let mut got = Vec::new();
        // Small reads, as rustls' 4 KiB ones: a record is given in pieces.
        while got.len() < 15 + 6005 {
            let mut small = [0u8; 4096];
            let n = r.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
            assert_eq!(r.at_record_boundary(), got.len() == 15 || got.len() == 6020);
        }
        assert_eq!(got, wire[..6020]);
        // Nothing more to give: the partial record is not released.
        let mut one = [0u8; 1];
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut one));
        assert!(pending.await.is_err());
        assert!(r.at_record_boundary());
        assert_eq!(r.buffered(), 40);
        let (_, rest) = r.into_parts();
        assert_eq!(rest, partial[..40]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_oversized_header_is_given_at_once() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[22, 3, 1, 0xff, 0xff, 0])
            .await
            .unwrap();
        let mut r = Aligned::new(b);
        let mut buf = [0u8; 64];
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(n, 6);
    }
}

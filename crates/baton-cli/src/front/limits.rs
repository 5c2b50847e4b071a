//! The request body limit (`--front-max-body`): a body declared larger
//! (`Content-Length`) is refused with `413` before anything reaches the
//! app; a body without a declared length (chunked, HTTP/2 DATA frames) is
//! forwarded until it passes the limit, then cut: if the app has not
//! answered yet, the client gets `413`, otherwise the answer in progress is
//! cut (either way the upstream connection is closed, never reused).
//!
//! The header limit (`--front-max-header`, `431`) and the header-read
//! timeout are hyper's own (`serve.rs`). Refusing a request without
//! reading all of it needs a lingering close ([`Lingering`]) for the
//! client to see the answer.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Response, StatusCode, Version, header};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::proxy::DownBody;

/// A request body cut at a limit.
pub struct Capped {
    inner: Incoming,
    left: u64,
    /// Set when the body passed the limit.
    tripped: Arc<AtomicBool>,
}

/// The client's body passed `--front-max-body`.
#[derive(Debug)]
pub struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body is larger than --front-max-body")
    }
}

impl std::error::Error for TooLarge {}

impl Capped {
    /// `inner`, at most `limit` bytes; `tripped` says whether it passed.
    pub fn new(inner: Incoming, limit: u64, tripped: Arc<AtomicBool>) -> Capped {
        Capped {
            inner,
            left: limit,
            tripped,
        }
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    if n > this.left {
                        this.tripped.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            other => other.map(|o| o.map(|r| r.map_err(|e| -> Self::Error { Box::new(e) }))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `413` baton answers for a body over `limit`, to a request of
/// `version`.
pub fn too_large(limit: u64, version: Version) -> Response<DownBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "413 Content Too Large: the request body is larger than {limit} bytes (baton --front-max-body)\n"
    )))));
    *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    // HTTP/1: the rest of the body is not read, the connection cannot
    // carry another request. (HTTP/2 resets the stream instead, and has no
    // connection headers.)
    if version < Version::HTTP_2 {
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    r
}

/// Longest time baton goes on reading (and discarding) a client's request
/// after it answered `413` without reading the body, before it closes.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// A client connection (`T`: the socket, or a wrapper of it) that can
/// *linger* when it is closed: closing a socket with unread bytes in its
/// receive queue sends a reset, and a client still sending the body baton
/// refused would lose the `413` it was sent (it reads its answer only after
/// sending). So, at close (hyper's
/// shutdown) after such a `413`, the write side is closed first (FIN after
/// the answer), then what the client still sends is read and discarded,
/// until it closes or for at most [`LINGER_TIME`]. Otherwise (`linger`
/// unset) the shutdown is the plain one: an upgraded connection's
/// half-close must not lose a byte.
pub struct Lingering<T> {
    io: T,
    linger: Arc<AtomicBool>,
    until: Option<Pin<Box<Sleep>>>,
}

impl<T> Lingering<T> {
    /// `io`, lingering at close when `linger` is set.
    pub fn new(io: T, linger: Arc<AtomicBool>) -> Lingering<T> {
        Lingering {
            io,
            linger,
            until: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.linger.load(Ordering::Acquire) {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        if this.until.is_none() {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.until = Some(Box::pin(tokio::time::sleep(LINGER_TIME)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // The client closed (or reset): done.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                Poll::Pending => {
                    return match this.until.as_mut().map(|s| s.as_mut().poll(cx)) {
                        Some(Poll::Pending) => Poll::Pending,
                        _ => Poll::Ready(Ok(())),
                    };
                }
            }
        }
    }
}

//! The request body limit (`--front-max-body`): a body declared larger
//! (`Content-Length`) is refused with `413` before anything reaches the
//! app; a body without a declared length (chunked, HTTP/2 DATA frames) is
//! forwarded until it passes the limit, then cut: if the app has not
//! answered yet, the client gets `413`, otherwise the answer in progress is
//! cut (either way the upstream connection is closed, never reused).
//!
//! The header limit (`--front-max-header`, `431`) and the header-read
//! timeout are hyper's own (`serve.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Response, StatusCode, Version, header};

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

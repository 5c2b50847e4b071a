//! Counting requests in flight: hyper has no "is idle" query, so a service
//! wrapper counts each request from the call until its response body is
//! dropped (hyper drops it once the last frame is written).
//!
//! For TLS connections it can also end the connection after the next
//! response (`close_next`): once that flag is set, every response the
//! handler returns gets `Connection: close` before hyper writes its head
//! (hyper then closes the connection after the body). Deciding when the
//! response is produced cannot race: hyper calls the handler and writes the
//! head in one poll, often before a connection task could look.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::Service;

use crate::ConnInfo;

/// Decrements both counters when dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    conn: Arc<AtomicUsize>,
    global: Arc<baton::Activity>,
}

impl InFlight {
    fn new(conn: &Arc<AtomicUsize>, global: &Arc<baton::Activity>) -> Self {
        conn.fetch_add(1, Ordering::SeqCst);
        global.start();
        InFlight {
            conn: Arc::clone(conn),
            global: Arc::clone(global),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.fetch_sub(1, Ordering::SeqCst);
        self.global.finish();
    }
}

/// The counting service wrapper; also puts [`ConnInfo`] in each request's
/// extensions.
#[derive(Debug, Clone)]
pub(crate) struct Counted<S> {
    pub(crate) inner: S,
    pub(crate) conn: Arc<AtomicUsize>,
    pub(crate) global: Arc<baton::Activity>,
    /// Once set, responses carry `Connection: close` (TLS connections).
    pub(crate) close_next: Option<Arc<AtomicBool>>,
    pub(crate) info: ConnInfo,
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.info.clone());
        let guard = InFlight::new(&self.conn, &self.global);
        CountedFuture {
            close_next: self.close_next.clone(),
            fut: self.inner.call(req),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The service future, carrying the in-flight guard into the body.
    pub(crate) struct CountedFuture<F> {
        #[pin]
        fut: F,
        guard: Option<InFlight>,
        close_next: Option<Arc<AtomicBool>>,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.fut.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                this.guard.take();
                Poll::Ready(Err(e))
            }
            Poll::Ready(Ok(mut resp)) => {
                if this
                    .close_next
                    .as_ref()
                    .is_some_and(|c| c.load(Ordering::SeqCst))
                    && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
                {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                let guard = this.guard.take();
                if let Some(g) = &guard {
                    g.global.response(resp.status().as_u16());
                }
                Poll::Ready(Ok(resp.map(|inner| CountedBody {
                    inner,
                    _guard: guard,
                })))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds the in-flight guard until hyper drops it.
    pub(crate) struct CountedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! Carrying the front's idle client connections across `baton upgrade
//! --self` (baton re-executes itself in place; see `supervisor/self_exec`).
//!
//! The model: every client connection's socket goes through a [`CarryIo`],
//! and every request through [`track`], so the front knows, per
//! connection, how many requests are in flight (until the response body has
//! been handed to hyper) and which bytes hyper read while none was (the
//! start of the next request). `--self` *freezes* the front: a connection
//! with no request in flight that asks to read is *parked* instead — it
//! reads nothing more from the kernel, and a duplicate of its fd is kept
//! with the bytes read so far. Requests in flight finish (their reads are
//! not frozen). Once every connection is parked (or the deadline passed),
//! the exec carries the parked duplicates; the new image replays each one's
//! bytes before reading the socket. If the exec fails, the front thaws: the
//! duplicates are dropped and the connections read on.
//!
//! Not carried (closed by the exec, counted): HTTP/2 connections (their
//! state lives in hyper), upgraded connections (WebSocket tunnels), a
//! connection still busy or still writing at the deadline, and one that
//! sent a request with a chunked body (where that body ended in the byte
//! stream is not known here). Bytes read after a `Content-Length` body —
//! its tail arriving after the response (an app that answers before it
//! reads), or a pipelined next request — are accounted to the next
//! request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use hyper::body::{Body, Bytes, Frame};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Longest next-request prefix a parked connection may carry (hyper's
/// header limit is below it); a longer one is not carried.
pub const MAX_CARRIED_PREFIX: usize = 64 * 1024;

const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// An idle client connection taken out of the front for the exec.
#[derive(Debug)]
pub struct Parked {
    /// A duplicate of its socket.
    pub fd: OwnedFd,
    /// Its public listener.
    pub listener: usize,
    /// The client.
    pub peer: SocketAddr,
    /// Bytes of its next request already read.
    pub prefix: Vec<u8>,
}

/// Every client connection of the front.
#[derive(Debug, Default)]
pub struct Registry {
    frozen: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    changed: Notify,
}

#[derive(Debug)]
struct ConnState {
    id: u64,
    listener: usize,
    peer: SocketAddr,
    in_flight: AtomicUsize,
    /// HTTP/2 or upgraded: never carried.
    not_http1: AtomicBool,
    write_blocked: AtomicBool,
    seen_first_read: AtomicBool,
    inner: Mutex<ConnInner>,
}

#[derive(Debug, Default)]
struct ConnInner {
    /// Bytes read beyond the current request's body: the start of the
    /// next request.
    recorded: Vec<u8>,
    /// Bytes of the current request's body not read yet (`Content-Length`
    /// minus what was read).
    body_left: u64,
    waker: Option<Waker>,
    parked: Option<OwnedFd>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConnState {
    /// Ready to be carried: parked, nothing in flight, nothing left to
    /// write.
    fn carry_ready(&self) -> bool {
        let inner = lock(&self.inner);
        self.in_flight.load(Ordering::SeqCst) == 0
            && !self.write_blocked.load(Ordering::SeqCst)
            && inner.body_left == 0
            && inner.parked.is_some()
    }
}

impl ConnState {
    /// Account for `data`, just read from the client.
    fn note(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if !self.seen_first_read.swap(true, Ordering::SeqCst)
            && (data.starts_with(H2_PREFACE_START) || H2_PREFACE_START.starts_with(data))
            && data.first() == Some(&b'P')
        {
            self.not_http1.store(true, Ordering::SeqCst);
        }
        let mut inner = lock(&self.inner);
        // The current request's body first (it may still arrive after the
        // response ended: an app that answers without reading it); what
        // follows belongs to the next request.
        let body = usize::try_from(inner.body_left)
            .unwrap_or(usize::MAX)
            .min(data.len());
        inner.body_left -= body as u64;
        let rest = &data[body..];
        if inner.recorded.len() + rest.len() > MAX_CARRIED_PREFIX {
            // Not a request boundary we can carry: never park it.
            drop(inner);
            self.not_http1.store(true, Ordering::SeqCst);
        } else {
            inner.recorded.extend_from_slice(rest);
        }
    }
}

impl Registry {
    fn register(&self, listener: usize, peer: SocketAddr) -> Arc<ConnState> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let st = Arc::new(ConnState {
            id,
            listener,
            peer,
            in_flight: AtomicUsize::new(0),
            not_http1: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            seen_first_read: AtomicBool::new(false),
            inner: Mutex::new(ConnInner::default()),
        });
        lock(&self.conns).insert(id, Arc::clone(&st));
        st
    }

    fn wake_all(&self) {
        let conns: Vec<Arc<ConnState>> = lock(&self.conns).values().cloned().collect();
        for c in conns {
            if let Some(w) = lock(&c.inner).waker.take() {
                w.wake();
            }
        }
    }

    /// Stop reading new requests: idle connections park at their next
    /// read.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Undo [`Registry::freeze`] (the exec failed): parked connections
    /// read on.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        for c in lock(&self.conns).values() {
            lock(&c.inner).parked = None;
        }
        self.wake_all();
    }

    /// Connections not ready to be carried: (busy HTTP/1, not HTTP/1).
    fn unready(&self) -> (usize, usize) {
        let conns = lock(&self.conns);
        let mut busy = 0;
        let mut other = 0;
        for c in conns.values() {
            if c.not_http1.load(Ordering::SeqCst) {
                other += 1;
            } else if !c.carry_ready() {
                busy += 1;
            }
        }
        (busy, other)
    }

    /// Wait (frozen) until every HTTP/1 connection is parked and idle, at
    /// most until `deadline`. Returns (connections still busy, HTTP/2 or
    /// upgraded ones).
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn wait_parked(&self, deadline: tokio::time::Instant) -> (usize, usize) {
        loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            let (busy, other) = self.unready();
            if busy == 0 {
                return (busy, other);
            }
            tokio::select! {
                () = n => {}
                () = tokio::time::sleep_until(deadline) => return self.unready(),
            }
        }
    }

    /// Duplicates of the parked connections' fds with their prefixes, and
    /// how many connections are not carried.
    ///
    /// # Errors
    /// A duplicate cannot be made (out of fds).
    pub fn take_parked(&self) -> io::Result<(Vec<Parked>, u64)> {
        let conns = lock(&self.conns);
        let mut out = Vec::new();
        let mut closed = 0;
        for c in conns.values() {
            let inner = lock(&c.inner);
            let ready = c.in_flight.load(Ordering::SeqCst) == 0
                && !c.write_blocked.load(Ordering::SeqCst)
                && !c.not_http1.load(Ordering::SeqCst)
                && inner.body_left == 0;
            match (&inner.parked, ready) {
                (Some(fd), true) => out.push(Parked {
                    fd: baton_sys::fd::dup(fd.as_fd())?,
                    listener: c.listener,
                    peer: c.peer,
                    prefix: inner.recorded.clone(),
                }),
                _ => closed += 1,
            }
        }
        Ok((out, closed))
    }
}

/// A client connection's socket as the front's hyper server sees it.
pub struct CarryIo {
    stream: TcpStream,
    state: Arc<ConnState>,
    registry: Arc<Registry>,
    replay: Bytes,
}

impl CarryIo {
    /// Wrap an accepted (or carried) connection; `prefix` is replayed
    /// before the socket is read.
    pub fn new(
        registry: &Arc<Registry>,
        stream: TcpStream,
        listener: usize,
        peer: SocketAddr,
        prefix: Vec<u8>,
    ) -> (CarryIo, Tracker) {
        let state = registry.register(listener, peer);
        let tracker = Tracker {
            state: Arc::clone(&state),
            registry: Arc::clone(registry),
        };
        (
            CarryIo {
                stream,
                state,
                registry: Arc::clone(registry),
                replay: Bytes::from(prefix),
            },
            tracker,
        )
    }

    fn note_read(&self, data: &[u8]) {
        self.state.note(data);
    }
}

impl Drop for CarryIo {
    fn drop(&mut self) {
        lock(&self.registry.conns).remove(&self.state.id);
        self.registry.changed.notify_waiters();
    }
}

impl AsyncRead for CarryIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            let chunk = this.replay.split_to(n);
            buf.put_slice(&chunk);
            this.note_read(&chunk);
            return Poll::Ready(Ok(()));
        }
        let st = &this.state;
        {
            let mut inner = lock(&st.inner);
            let idle = st.in_flight.load(Ordering::SeqCst) == 0 && inner.body_left == 0;
            if this.registry.frozen.load(Ordering::SeqCst)
                && idle
                && !st.not_http1.load(Ordering::SeqCst)
            {
                if inner.parked.is_none() {
                    inner.parked = Some(baton_sys::fd::dup(this.stream.as_fd())?);
                    this.registry.changed.notify_waiters();
                }
                inner.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if !inner
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                inner.waker = Some(cx.waker().clone());
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.note_read(buf.filled().get(before..).unwrap_or(&[]));
        }
        r
    }
}

impl CarryIo {
    fn wrote<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        let blocked = r.is_pending();
        if self.state.write_blocked.swap(blocked, Ordering::SeqCst) && !blocked {
            self.registry.changed.notify_waiters();
        }
        r
    }
}

impl AsyncWrite for CarryIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_flush(cx);
        this.wrote(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Counts one connection's requests in flight (see [`track`]).
#[derive(Clone)]
pub struct Tracker {
    state: Arc<ConnState>,
    registry: Arc<Registry>,
}

impl Tracker {
    /// hyper parsed a request head (it is at the start of `recorded`)
    /// and the body is `body` bytes long (`None`: chunked).
    fn begin(&self, body: Option<u64>) {
        self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        let mut inner = lock(&self.state.inner);
        let head_end = inner
            .recorded
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4);
        match (head_end, body) {
            (Some(h), Some(len)) => {
                let read = (inner.recorded.len() - h) as u64;
                if read >= len {
                    // Body complete; anything after it is the next request.
                    let next = h + usize::try_from(len).unwrap_or(usize::MAX);
                    let next = next.min(inner.recorded.len());
                    inner.recorded.drain(..next);
                    inner.body_left = 0;
                } else {
                    inner.recorded.clear();
                    inner.body_left = len - read;
                }
            }
            _ => {
                // A chunked body (or a head we did not see whole): where
                // this request ends is unknown here, so the connection is
                // never carried.
                inner.recorded.clear();
                drop(inner);
                self.state.not_http1.store(true, Ordering::SeqCst);
            }
        }
    }

    fn end(&self) {
        if self.state.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.registry.changed.notify_waiters();
        }
    }
}

/// Ends a request when the response body has been taken to the last
/// frame, or dropped.
struct EndGuard(Option<Tracker>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.end();
        }
    }
}

/// A response body that ends its request at its end.
pub struct TrackedBody<B> {
    inner: B,
    guard: EndGuard,
}

impl<B> Body for TrackedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = &r {
            if let Some(t) = this.guard.0.take() {
                t.end();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Count the handling of `req` (`handle(req)`) as in flight on its
/// connection from now (hyper calls the service as soon as it parsed the
/// head) until its response body ends, and its body's bytes as its own
/// until `Content-Length` is reached.
pub fn track<I, B, E, F, H>(
    t: &Tracker,
    req: Request<I>,
    handle: H,
) -> impl Future<Output = Result<Response<TrackedBody<B>>, E>> + use<I, B, E, F, H>
where
    I: Body,
    H: FnOnce(Request<I>) -> F,
    F: Future<Output = Result<Response<B>, E>>,
{
    let body = if req.body().is_end_stream() {
        Some(0)
    } else {
        req.body().size_hint().exact()
    };
    t.begin(body);
    let fut = handle(req);
    let guard = EndGuard(Some(t.clone()));
    let state = Arc::clone(&t.state);
    async move {
        let resp = fut.await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The connection becomes a tunnel.
            state.not_http1.store(true, Ordering::SeqCst);
        }
        Ok(resp.map(|inner| TrackedBody { inner, guard }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Arc<Registry>, Tracker) {
        let r = Arc::new(Registry::default());
        let state = r.register(0, "127.0.0.1:1".parse().unwrap());
        let t = Tracker {
            state,
            registry: Arc::clone(&r),
        };
        (r, t)
    }

    fn recorded(t: &Tracker) -> Vec<u8> {
        lock(&t.state.inner).recorded.clone()
    }

    #[test]
    fn a_partial_next_request_is_what_is_carried() {
        let (_r, t) = conn();
        t.state.note(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        t.begin(Some(0));
        assert!(recorded(&t).is_empty());
        t.end();
        t.state.note(b"GET /b HT");
        assert_eq!(recorded(&t), b"GET /b HT");
        assert!(!t.state.not_http1.load(Ordering::SeqCst));
    }

    /// Regression (Python `requests` POST, an app that answers before it
    /// reads the body): the body's tail, read after the response ended,
    /// is not the next request.
    #[test]
    fn a_body_tail_read_after_the_response_is_not_a_request() {
        let (_r, t) = conn();
        t.state
            .note(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123");
        t.begin(Some(10));
        assert_eq!(lock(&t.state.inner).body_left, 6);
        t.end();
        t.state.note(b"456789");
        assert!(recorded(&t).is_empty());
        assert_eq!(lock(&t.state.inner).body_left, 0);
        t.state.note(b"GET /");
        assert_eq!(recorded(&t), b"GET /");
    }

    #[test]
    fn pipelined_bytes_after_the_body_belong_to_the_next_request() {
        let (_r, t) = conn();
        t.state
            .note(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET /next HTTP/1.1\r\n");
        t.begin(Some(2));
        assert_eq!(recorded(&t), b"GET /next HTTP/1.1\r\n");
    }

    #[test]
    fn chunked_bodies_and_h2_are_never_carried() {
        let (_r, t) = conn();
        t.state
            .note(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        t.begin(None);
        assert!(t.state.not_http1.load(Ordering::SeqCst));
        let (_r, t) = conn();
        t.state.note(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(t.state.not_http1.load(Ordering::SeqCst));
    }
}

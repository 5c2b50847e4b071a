//! The client side: accept on a public listener (at most
//! `max_connections` at once), serve each connection with hyper's HTTP/1.1
//! server (keep-alive, upgrades, a header-read timeout, a header size
//! limit) or HTTP/2 with prior knowledge (h2c), every request through
//! [`super::proxy::handle`]; and the front's graceful stop.
//!
//! The stop ([`shutdown`]): the accept loops take what is already in their
//! listen queue (those connections are served one request, then closed)
//! and close their listeners, so that a new connection is refused rather
//! than left unanswered; every client connection is asked to end after the
//! request it carries (an idle one closes at once, HTTP/2 gets GOAWAY);
//! tunnels run on until the app, stopped next, closes them. At the deadline
//! (`--drain-timeout`) whatever is left is closed and counted.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::Front;
use super::limits::Lingering;

/// Pause after an accept error (EMFILE and the like) so that a full fd
/// table does not become a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// One client connection, as a request sees it.
pub struct Client {
    /// The public listener's index.
    pub idx: usize,
    /// The client's address, as the forwarding headers' values (made once
    /// per connection).
    pub forwarded: super::proxy::PeerHeaders,
    /// Its `--front-max-connections` slot (a tunnel holds it too); `None`
    /// for a connection served past the limit.
    pub slot: Option<Arc<OwnedSemaphorePermit>>,
    /// Set when a request was refused without its body read: the
    /// connection lingers when it is closed ([`super::limits::Lingering`]).
    pub linger: Arc<AtomicBool>,
}

/// The client connections being served, to wait for at the stop.
#[derive(Default)]
pub struct Live {
    n: AtomicUsize,
    changed: Notify,
}

struct LiveGuard(Front);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let live = &self.0.inner.live;
        live.n.fetch_sub(1, Ordering::AcqRel);
        live.changed.notify_waiters();
    }
}

impl Live {
    /// Client connections being served now (upgraded ones are tunnels).
    pub fn count(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    /// A future that completes when a client connection closes after it
    /// was created (enable it before checking [`Live::count`]).
    pub fn closing(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Wait until none is open, or `deadline`.
    async fn wait_zero(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return true;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// Start accepting on `fd`, the public listener number `idx` (a TCP
/// listening socket). `carried`: client connections of this listener that
/// the previous image of baton left parked (`baton upgrade --self`), each
/// with the bytes of its next request already read; served first.
///
/// # Errors
///
/// `fd` is not a TCP listener tokio can register.
pub fn spawn_accept(
    front: Front,
    idx: usize,
    fd: OwnedFd,
    carried: Vec<super::carry::Parked>,
) -> anyhow::Result<()> {
    let std_l = std::net::TcpListener::from(fd);
    std_l.set_nonblocking(true)?;
    let listener =
        tokio::net::TcpListener::from_std(std_l).context("the front serves TCP listeners only")?;
    let slots = Arc::new(Semaphore::new(front.inner.cfg.max_connections));
    for c in carried {
        let std_s = std::net::TcpStream::from(c.fd);
        std_s.set_nonblocking(true)?;
        let stream = TcpStream::from_std(std_s)?;
        let permit = slots.clone().try_acquire_owned().ok();
        serve_conn(&front, idx, stream, c.peer, permit, false, Some(c.prefix));
    }
    let stop = front.inner.stop.clone();
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = stop.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "front: accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
                () = stop.cancelled() => break,
            };
            serve_conn(&front, idx, stream, peer, Some(permit), false, None);
        }
        // Stopping: what already sits in the listen queue completed its
        // handshake and may have sent a request; closing the listener would
        // reset it. Take it (one request each), then close.
        let mut queued = 0;
        match listener.into_std() {
            Ok(l) => {
                while let Ok((stream, peer)) = l.accept() {
                    // Past the limit, these few are served anyway.
                    let permit = slots.clone().try_acquire_owned().ok();
                    let stream = stream
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(stream));
                    if let Ok(stream) = stream {
                        serve_conn(&front, idx, stream, peer, permit, true, None);
                        queued += 1;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "front: cannot take the listen queue"),
        }
        tracing::info!(
            listener = idx,
            queued,
            "front: listener closed (stopping); connections from its queue are served one request"
        );
    });
    Ok(())
}

/// Serve one client connection on a task of its own. `last` (the stop
/// has begun): one request, then close. `carried`: a connection the
/// previous image of baton accepted (`baton upgrade --self`), with the
/// bytes of its next request it had read.
fn serve_conn(
    front: &Front,
    idx: usize,
    stream: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    last: bool,
    carried: Option<Vec<u8>>,
) {
    let counters = &front.inner.counters;
    if carried.is_none() {
        counters.connections.fetch_add(1, Ordering::Relaxed);
    }
    let _ = stream.set_nodelay(true);
    let (stream, tracker) = super::carry::CarryIo::new(
        &front.inner.carry,
        stream,
        idx,
        peer,
        carried.unwrap_or_default(),
    );
    front.inner.live.n.fetch_add(1, Ordering::AcqRel);
    let guard = LiveGuard(front.clone());
    let front = front.clone();
    tokio::spawn(async move {
        let cfg = &front.inner.cfg;
        let client = Arc::new(Client {
            idx,
            forwarded: super::proxy::PeerHeaders::new(peer),
            slot: permit.map(Arc::new),
            linger: Arc::new(AtomicBool::new(false)),
        });
        let io = Lingering::new(stream, Arc::clone(&client.linger));
        let f = front.clone();
        let svc = service_fn(move |req| {
            let (f, client) = (f.clone(), Arc::clone(&client));
            super::carry::track(&tracker, req, move |req| {
                super::proxy::handle(f, client, req)
            })
        });
        // HTTP/1.1, or HTTP/2 with prior knowledge (h2c): the builder reads
        // the preface.
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_timeout)
            // A head that does not fit in the buffer is answered 431.
            .max_buf_size(cfg.max_header)
            // One buffer, one `write` per response (see `pool.rs`).
            .writev(false)
            .keep_alive(!last);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(cfg.max_header).unwrap_or(u32::MAX))
            .keep_alive_interval(None);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let stop = front.inner.stop.clone();
        let cut = front.inner.cut.clone();
        let res = tokio::select! {
            r = conn.as_mut() => r,
            () = stop.cancelled(), if !last => {
                // An idle connection closes now; a busy one after its
                // response (with `Connection: close`); HTTP/2: GOAWAY.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = cut.cancelled() => Ok(()),
                }
            }
            () = cut.cancelled() => Ok(()),
        };
        if let Err(e) = res {
            count_error(&front, &*e, peer);
        }
        drop(guard);
    });
}

/// Count the client errors the limits cause (hyper answered them itself).
fn count_error(front: &Front, e: &(dyn std::error::Error + 'static), peer: SocketAddr) {
    let c = &front.inner.counters;
    match e.downcast_ref::<hyper::Error>() {
        Some(h) if h.is_parse_too_large() => {
            c.header_too_large.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, "front: request head larger than --front-max-header: 431");
        }
        Some(h) if h.is_timeout() => {
            c.header_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "front: no request head within --front-header-timeout: closed");
        }
        _ => tracing::debug!(error = %e, %peer, "front: client connection ended"),
    }
}

/// The front's graceful stop (see the module doc), bounded by `deadline`
/// (at once if `hurry` fires). Returns how many client connections were
/// still open then (closed, and counted in `closed_at_stop`). Tunnels are
/// not waited for: they end with the app (see [`super::Front::shutdown`]).
pub async fn shutdown(
    front: &Front,
    deadline: tokio::time::Instant,
    hurry: &CancellationToken,
) -> usize {
    let inner = &front.inner;
    inner.stop.cancel();
    tokio::select! {
        _ = inner.live.wait_zero(deadline) => {}
        () = hurry.cancelled() => {}
    }
    let left = inner.live.count();
    if left > 0 {
        inner.cut.cancel();
        inner
            .counters
            .closed_at_stop
            .fetch_add(left as u64, Ordering::Relaxed);
    }
    left
}

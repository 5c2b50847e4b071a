//! The client side: accept on a public listener (at most
//! `max_connections` at once), serve each connection with hyper's HTTP/1.1
//! server (keep-alive, a header-read timeout) or HTTP/2 with prior
//! knowledge (h2c), every request through
//! [`super::proxy::handle`].

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::Semaphore;

use super::Front;

/// Pause after an accept error (EMFILE and the like) so that a full fd
/// table does not become a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Start accepting on `fd`, the public listener number `idx` (a TCP
/// listening socket).
///
/// # Errors
///
/// `fd` is not a TCP listener tokio can register.
///
/// `carried`: client connections of this listener that the previous image
/// of baton left parked (`baton upgrade --self`), each with the bytes of
/// its next request already read; served first.
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
        let stream = tokio::net::TcpStream::from_std(std_s)?;
        let permit = slots.clone().try_acquire_owned().ok();
        serve_conn(front.clone(), idx, stream, c.peer, c.prefix, permit);
    }
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "front: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            front
                .inner
                .counters
                .connections
                .fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            serve_conn(front.clone(), idx, stream, peer, Vec::new(), Some(permit));
        }
    });
    Ok(())
}

/// Serve one client connection (`prefix`: bytes of its next request
/// already read, replayed first).
fn serve_conn(
    front: Front,
    idx: usize,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    prefix: Vec<u8>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let (io, tracker) = super::carry::CarryIo::new(&front.inner.carry, stream, idx, peer, prefix);
    tokio::spawn(async move {
        let header_timeout = front.inner.cfg.header_timeout;
        let svc = service_fn(move |req| {
            let front = front.clone();
            super::carry::track(&tracker, req, move |req| {
                super::proxy::handle(front, idx, peer, req)
            })
        });
        // HTTP/1.1, or HTTP/2 with prior knowledge (h2c): the
        // builder reads the preface.
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(None);
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, %peer, "front: client connection ended");
        }
        drop(permit);
    });
}

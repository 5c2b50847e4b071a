//! One TLS connection's life: handshake, HTTP/1.1 or HTTP/2 by ALPN, and
//! when the generation drains, a polite end on this generation (a TLS
//! connection is never handed over: see the module docs of `tls`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use baton::{Phase, Stream};
use bytes::Bytes;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;

use super::TlsInner;
use crate::count::Counted;
use crate::io::ConnIo;
use crate::{ConnInfo, HttpService, Shared};

type Io = ConnIo<TlsStream<Stream>>;

/// Serve one accepted connection over TLS until it ends.
pub(crate) async fn serve<S>(
    shared: Arc<Shared<S>>,
    tls: Arc<TlsInner>,
    stream: Stream,
    info: ConnInfo,
) where
    S: HttpService,
{
    let limit = tls.config.handshake_timeout;
    let stream = match tokio::time::timeout(limit, tls.acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = %info.peer_string(), error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %info.peer_string(), ?limit, "TLS handshake timed out (handshake timeout)");
            return;
        }
    };
    // HTTP/2 over TLS is negotiated with ALPN only (RFC 9113, 3.2).
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = ConnIo::new(stream, Bytes::new(), &shared.baton);
    io.flags().track_activity();
    if h2 {
        serve_h2(&shared, &tls, io, &info).await;
    } else {
        serve_h1(&shared, &tls, io, &info).await;
    }
}

type PhaseFuture = Pin<Box<dyn Future<Output = watch::Receiver<Phase>> + Send>>;

fn next_phase_change(mut rx: watch::Receiver<Phase>) -> PhaseFuture {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        rx
    })
}

/// This connection's moment to wind down during a handover: armed when the
/// handover starts, dropped if the generation serves again (the successor
/// died and this one resumed).
struct Moment {
    timer: Option<Pin<Box<Sleep>>>,
    reached: bool,
}

impl Moment {
    fn new() -> Self {
        Moment {
            timer: None,
            reached: false,
        }
    }

    /// Whether the connection should wind down now, given the phase.
    fn due(&mut self, phase: Phase, tls: &TlsInner, cx: &mut Context<'_>) -> bool {
        match phase {
            // A stop (no successor) or the end: at once.
            Phase::ShuttingDown | Phase::Done => true,
            Phase::Handover => {
                if !self.reached {
                    let timer = self.timer.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep(tls.spread.next_delay()))
                    });
                    if timer.as_mut().poll(cx).is_ready() {
                        self.timer = None;
                        self.reached = true;
                    }
                }
                self.reached
            }
            Phase::Starting | Phase::Serving | Phase::Quiesced | Phase::Observing => {
                self.timer = None;
                self.reached = false;
                false
            }
        }
    }
}

async fn serve_h2<S>(shared: &Shared<S>, tls: &TlsInner, io: Io, info: &ConnInfo)
where
    S: HttpService,
{
    let svc = Counted {
        inner: shared.service.clone(),
        conn: Arc::new(AtomicUsize::new(0)),
        global: Arc::clone(&shared.in_flight),
        close_next: None,
        info: info.clone(),
    };
    let mut conn =
        http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), svc);
    let rx = shared.baton.phase_watch();
    let mut phase_fut = next_phase_change(rx.clone());
    let mut moment = Moment::new();
    let mut goaway_sent = false;
    std::future::poll_fn(|cx: &mut Context<'_>| {
        loop {
            match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(()),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/2 over TLS ended with an error");
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
            if !goaway_sent && moment.due(*rx.borrow(), tls, cx) {
                // Two-phase GOAWAY (GOAWAY(max) + PING, then the final
                // GOAWAY); open streams finish; hyper then shuts the TLS
                // stream down, which sends close_notify.
                Pin::new(&mut conn).graceful_shutdown();
                goaway_sent = true;
                continue;
            }
            match phase_fut.as_mut().poll(cx) {
                Poll::Ready(rx2) => {
                    phase_fut = next_phase_change(rx2);
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
}

async fn serve_h1<S>(shared: &Shared<S>, tls: &TlsInner, io: Io, info: &ConnInfo)
where
    S: HttpService,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let close_next = Arc::new(AtomicBool::new(false));
    let svc = Counted {
        inner: shared.service.clone(),
        conn: Arc::clone(&in_flight),
        global: Arc::clone(&shared.in_flight),
        close_next: Some(Arc::clone(&close_next)),
        info: info.clone(),
    };
    let flags = io.flags();
    let mut conn = shared
        .h1
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let rx = shared.baton.phase_watch();
    let mut phase_fut = next_phase_change(rx.clone());
    let mut moment = Moment::new();
    let mut quiet_timer: Option<Pin<Box<Sleep>>> = None;
    let mut closing = false;
    let quiet = tls.config.close_quiet;
    std::future::poll_fn(|cx: &mut Context<'_>| {
        loop {
            match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(()),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/1 over TLS ended with an error");
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
            // hyper is waiting. Decide in this same poll, so nothing can
            // slip in between the check and the action.
            let phase = *rx.borrow();
            if !closing && moment.due(phase, tls, cx) {
                // From now on every response carries `Connection: close`
                // (hyper then ends the connection after it, with
                // close_notify): a client in a request loop learns it on
                // its next response, and never sees its connection close
                // under a request it just sent.
                close_next.store(true, Ordering::SeqCst);
                if phase != Phase::Handover {
                    // A stop (no successor): close at once, like a plain
                    // connection.
                    Pin::new(&mut conn).graceful_shutdown();
                    closing = true;
                    continue;
                }
                if in_flight.load(Ordering::SeqCst) == 0 && flags.waiting_for_client() {
                    let q = flags.quiet_for();
                    if q >= quiet {
                        // Idle and quiet: close_notify now.
                        Pin::new(&mut conn).graceful_shutdown();
                        closing = true;
                        continue;
                    }
                    // Quiet for too short a while: the client may be about
                    // to send; look again when the quiet period would end.
                    if quiet_timer.is_none() {
                        quiet_timer = Some(Box::pin(tokio::time::sleep(quiet - q)));
                    }
                }
            } else if !closing {
                // Serving again (the successor died before this
                // connection's moment): keep-alive as usual.
                close_next.store(false, Ordering::SeqCst);
            }
            if let Some(t) = quiet_timer.as_mut()
                && t.as_mut().poll(cx).is_ready()
            {
                quiet_timer = None;
                continue;
            }
            match phase_fut.as_mut().poll(cx) {
                Poll::Ready(rx2) => {
                    phase_fut = next_phase_change(rx2);
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
}

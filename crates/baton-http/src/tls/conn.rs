//! One TLS connection's life: handshake, HTTP/1.1 or HTTP/2 by ALPN, and
//! when the generation drains:
//!
//! * HTTP/1.1, successor taking TLS connections: at the next idle point the
//!   session keys are extracted from rustls and the connection moves with
//!   them ([`TLS_KIND`]); the successor serves it on baton's record layer
//!   ([`serve_moved`]), and it can move again from there.
//! * otherwise (HTTP/2, a successor that does not take them, a refused
//!   batch): a polite end on this generation (see the module docs of `tls`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use baton::{OwnedConn, Phase, Stream};
use bytes::Bytes;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;

use super::aligned::Aligned;
use super::counters::CloseReason;
use super::record::{self, Opener, Sealer};
use super::record_io::{RecordEvents, RecordIo};
use super::{TlsInner, session};
use crate::count::Counted;
use crate::io::ConnIo;
use crate::{ConnInfo, HttpService, Shared};

/// After the record layer met what it cannot follow (a KeyUpdate), how long
/// a request in progress may take to finish: it may be waiting for body
/// bytes that can no longer be read. Then the connection is dropped.
const STUCK_REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// The kind HTTP/1.1 TLS connections move under between generations (see
/// [`baton::Baton::receive_owned`]); [`Tls::load`](super::Tls::load)
/// registers it unless [`TlsConfig::take_connections`](super::TlsConfig::take_connections)
/// is off.
pub const TLS_KIND: &str = "baton-http/tls";

type Rustls = TlsStream<Aligned<Stream>>;

/// Serve one accepted connection over TLS until it ends or moves.
pub(crate) async fn serve<S>(
    shared: Arc<Shared<S>>,
    tls: Arc<TlsInner>,
    stream: Stream,
    info: ConnInfo,
) where
    S: HttpService,
{
    let limit = tls.config.handshake_timeout;
    let accept = tls.acceptor.accept(Aligned::new(stream));
    let stream = match tokio::time::timeout(limit, accept).await {
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
    tls.counters.handshake();
    // HTTP/2 over TLS is negotiated with ALPN only (RFC 9113, 3.2).
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut io = ConnIo::new(stream, Bytes::new(), &shared.baton);
    io.flags().track_activity();
    if h2 {
        serve_h2(&shared, &tls, io, &info).await;
        return;
    }
    let mut may_move = true;
    loop {
        let (mut back, read_buf) = match serve_h1(&shared, &tls, io, &info, may_move, None).await {
            H1End::Finished => return,
            H1End::Detach(back, read_buf) => (back, read_buf),
        };
        if !extractable(&mut back, &read_buf) {
            // Not at a point where the keys can leave rustls without losing
            // bytes: it stays here, and ends politely.
            back.put_back(&read_buf);
            io = back;
            may_move = false;
            continue;
        }
        let Some(rec) = extract(back, read_buf, &info) else {
            return;
        };
        // After the extraction the session never goes back to rustls.
        match hand_over(&shared, rec, &info).await {
            Ok(()) => {}
            Err(Some(rec)) => serve_record(shared, tls, rec, info, false, true).await,
            Err(None) => {}
        }
        return;
    }
}

/// Serve a connection the previous generation handed over with its keys.
pub(crate) async fn serve_moved<S>(
    shared: Arc<Shared<S>>,
    tls: Arc<TlsInner>,
    mut conn: OwnedConn,
    info: ConnInfo,
) where
    S: HttpService,
{
    tls.counters.handed_over();
    let parsed = session::parse(&conn.state).and_then(|p| {
        let (o, s) = p.session().map_err(|e| e.to_string())?;
        Ok((o, s, p.plain.to_vec()))
    });
    session::wipe(&mut conn.state);
    let (opener, sealer, plain) = match parsed {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "a TLS connection from the previous generation cannot be continued; closing it");
            return;
        }
    };
    tls.counters.received();
    let rec = RecordIo::new(conn.stream, conn.unread, opener, sealer, plain);
    let info = ConnInfo {
        handed_over: true,
        ..info
    };
    serve_record(shared, tls, rec, info, true, false).await;
}

/// Whether rustls' secrets can be extracted now without losing a byte:
/// nothing to send (session tickets included), no plaintext inside rustls,
/// no partial record inside rustls, and what travels within its bounds.
fn extractable(io: &mut ConnIo<Rustls>, read_buf: &[u8]) -> bool {
    let plain = read_buf.len() + io.replay().len();
    let (aligned, conn) = io.get_mut().get_mut();
    if conn.is_handshaking() || conn.wants_write() {
        return false;
    }
    let Ok(state) = conn.process_new_packets() else {
        return false;
    };
    state.plaintext_bytes_to_read() == 0
        && !state.peer_has_closed()
        && aligned.at_record_boundary()
        && aligned.buffered() <= baton::protocol::MAX_CONN_PREFIX
        && plain <= session::MAX_PLAIN
}

/// Take the keys out of rustls (consuming it) and continue on the record
/// layer. `None`: the extraction failed and the connection is lost (it
/// cannot happen after [`extractable`]; logged).
fn extract(io: ConnIo<Rustls>, read_buf: Bytes, info: &ConnInfo) -> Option<RecordIo> {
    let (tls_stream, plain) = io.into_parts(read_buf);
    let (aligned, conn) = tls_stream.into_inner();
    let (stream, unread) = aligned.into_parts();
    let version = conn.protocol_version()?;
    let secrets = match conn.dangerous_extract_secrets() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = %info.peer_string(), error = %e, "TLS key extraction failed; the connection is closed");
            return None;
        }
    };
    match record::continue_session(version, secrets) {
        Ok((opener, sealer)) => Some(RecordIo::new(stream, unread, opener, sealer, plain)),
        Err(e) => {
            tracing::warn!(peer = %info.peer_string(), error = %e, "TLS session cannot continue on the record layer; the connection is closed");
            None
        }
    }
}

/// Hand a session on the record layer to the successor. `Err(Some)`: it
/// stays here (refused, or not movable now); `Err(None)`: lost (logged).
async fn hand_over<S>(
    shared: &Shared<S>,
    rec: RecordIo,
    info: &ConnInfo,
) -> Result<(), Option<RecordIo>> {
    if !rec.can_move()
        || rec.plain_len() > session::MAX_PLAIN
        || rec.unread_len() > baton::protocol::MAX_CONN_PREFIX
    {
        return Err(Some(rec));
    }
    let (stream, unread, opener, sealer, plain) = rec.into_parts();
    let state = session::encode(opener.version(), opener, sealer, &plain);
    let conn = OwnedConn {
        kind: TLS_KIND.to_owned(),
        stream,
        unread,
        state,
        listener: info.listener.to_string(),
    };
    match shared.baton.hand_over_owned(conn).await {
        // Counted by the successor (this generation exits with its counts).
        Ok(()) => Ok(()),
        Err(mut back) => {
            tracing::debug!(peer = %info.peer_string(), "TLS handoff refused; continuing the session here on the record layer");
            let r = session::parse(&back.state).and_then(|p| {
                let (o, s): (Opener, Sealer) = p.session().map_err(|e| e.to_string())?;
                Ok((o, s, p.plain.to_vec()))
            });
            session::wipe(&mut back.state);
            match r {
                Ok((o, s, plain)) => {
                    Err(Some(RecordIo::new(back.stream, back.unread, o, s, plain)))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a refused TLS session cannot be continued; closing it");
                    Err(None)
                }
            }
        }
    }
}

/// Serve HTTP/1.1 on the record layer until the connection ends or moves.
async fn serve_record<S>(
    shared: Arc<Shared<S>>,
    tls: Arc<TlsInner>,
    mut rec: RecordIo,
    info: ConnInfo,
    mut may_move: bool,
    mut refused: bool,
) where
    S: HttpService,
{
    loop {
        let events = rec.events();
        let io = ConnIo::new(rec, Bytes::new(), &shared.baton);
        io.flags().track_activity();
        match serve_h1(&shared, &tls, io, &info, may_move, Some(&events)).await {
            H1End::Finished => {
                if let Some(why) = events.reason() {
                    tls.counters.closed(why);
                } else if refused {
                    tls.counters.closed(CloseReason::Refused);
                }
                return;
            }
            H1End::Detach(io, read_buf) => {
                let (mut back, replay) = io.into_parts(read_buf);
                back.unread_plain(&replay);
                match hand_over(&shared, back, &info).await {
                    Ok(()) | Err(None) => return,
                    Err(Some(r)) => {
                        rec = r;
                        refused = true;
                        may_move = false;
                    }
                }
            }
        }
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

async fn serve_h2<S>(shared: &Shared<S>, tls: &TlsInner, io: ConnIo<Rustls>, info: &ConnInfo)
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

/// How an HTTP/1.1 connection over TLS ended on our side.
enum H1End<T> {
    /// hyper finished (client closed, error, keep-alive off, upgrade, or a
    /// polite close).
    Finished,
    /// Idle at a request boundary while the successor takes TLS
    /// connections: the I/O and the bytes hyper had read.
    Detach(ConnIo<T>, Bytes),
}

/// Serve HTTP/1.1 over `io` (rustls, or the record layer with its
/// `events`) until it ends, or until it is idle while the successor takes
/// TLS connections (`may_move`).
async fn serve_h1<S, T>(
    shared: &Shared<S>,
    tls: &TlsInner,
    io: ConnIo<T>,
    info: &ConnInfo,
    may_move: bool,
    events: Option<&RecordEvents>,
) -> H1End<T>
where
    S: HttpService,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
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
    let mut stuck_timer: Option<Pin<Box<Sleep>>> = None;
    let mut closing = false;
    let quiet = tls.config.close_quiet;
    // Idle at a request boundary: hyper flushed everything, has no request
    // in flight and is blocked reading the next one.
    let idle = || in_flight.load(Ordering::SeqCst) == 0 && flags.waiting_for_client();
    let moving =
        |phase: Phase| may_move && phase == Phase::Handover && shared.baton.takes_owned(TLS_KIND);
    let mut polled_once = false;
    let end = std::future::poll_fn(|cx: &mut Context<'_>| {
        loop {
            // Woken by a phase change with hyper idle since its last poll:
            // detach before hyper reads the next request.
            if polled_once && !closing && moving(*rx.borrow()) && idle() {
                return Poll::Ready(true);
            }
            polled_once = true;
            match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(false),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/1 over TLS ended with an error");
                    return Poll::Ready(false);
                }
                Poll::Pending => {}
            }
            // hyper is waiting. Decide in this same poll, so nothing can
            // slip in between the check and the action.
            let phase = *rx.borrow();
            if closing {
                // Nothing more to decide.
            } else if events.is_some_and(|e| e.reason().is_some()) {
                // The record layer cannot go on (KeyUpdate, renegotiation,
                // key near its limit): the response in progress finishes
                // (with `Connection: close` if not started), then the
                // connection closes with close_notify.
                close_next.store(true, Ordering::SeqCst);
                if in_flight.load(Ordering::SeqCst) == 0 {
                    Pin::new(&mut conn).graceful_shutdown();
                    closing = true;
                    continue;
                }
                // A request in progress may wait for body bytes that can
                // no longer be read: it gets a bounded time.
                let t = stuck_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(STUCK_REQUEST_LIMIT)));
                if t.as_mut().poll(cx).is_ready() {
                    tracing::debug!(peer = %info.peer_string(), "TLS: the request in progress did not finish after a KeyUpdate; closing");
                    return Poll::Ready(false);
                }
            } else if moving(phase) {
                if idle() {
                    return Poll::Ready(true);
                }
                // Busy: moves after this response. Never graceful_shutdown
                // here: that would add Connection: close.
            } else if moment.due(phase, tls, cx) {
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
                if idle() {
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
            } else {
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
    if !end {
        return H1End::Finished;
    }
    match conn.into_parts() {
        Some(parts) => H1End::Detach(parts.io.into_inner(), parts.read_buf),
        None => H1End::Finished,
    }
}

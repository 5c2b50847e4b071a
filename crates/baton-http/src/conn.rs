//! One connection's life: sniff HTTP/1 vs HTTP/2, serve, and when the
//! generation drains, either hand the connection to the successor at its
//! next request boundary (HTTP/1.1), or close it politely.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use baton::{HandoffConn, Phase, Stream};
use bytes::Bytes;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use crate::count::Counted;
use crate::io::ConnIo;
use crate::{ConnInfo, HttpService, Shared};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// When stopping without a successor, how long a just-accepted connection
/// has to send its first bytes before it is closed.
const STOP_SNIFF_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

type PhaseFuture = Pin<Box<dyn Future<Output = watch::Receiver<Phase>> + Send>>;

/// A future that resolves at the next phase change.
fn next_phase_change(mut rx: watch::Receiver<Phase>) -> PhaseFuture {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            // The generation is gone; never wake again.
            std::future::pending::<()>().await;
        }
        rx
    })
}

enum Sniffed {
    H1,
    H2,
    /// Draining caught the connection before its first complete request
    /// line: hand it over (or close it) as it is.
    Idle,
    Closed,
}

/// How an HTTP/1 connection ended on our side.
enum H1End {
    /// hyper finished (client closed, error, keep-alive off, or upgrade).
    Finished,
    /// Idle at a request boundary while a successor takes connections.
    Detach,
}

/// Serve one connection until it ends or moves to the successor.
pub(crate) async fn serve<S>(
    shared: Arc<Shared<S>>,
    stream: Stream,
    prefix: Vec<u8>,
    info: ConnInfo,
) where
    S: HttpService,
{
    let mut io = ConnIo::new(stream, Bytes::from(prefix), &shared.baton);
    let mut phase = shared.baton.drain_signal();
    // After a refused handoff this connection finishes here (it is not
    // offered again, which could loop).
    let mut may_hand_over = true;
    loop {
        let back = match sniff(&mut io, &mut phase, &shared, may_hand_over).await {
            Sniffed::Closed => return,
            Sniffed::H2 => {
                serve_h2(&shared, io, &info).await;
                return;
            }
            Sniffed::Idle => detach(&shared, io, Bytes::new(), &info).await,
            Sniffed::H1 => serve_h1(&shared, io, &info, may_hand_over).await,
        };
        match back {
            Some(back) => {
                io = back;
                may_hand_over = false;
            }
            None => return,
        }
    }
}

/// Read until we know the protocol. A drain that finds the connection
/// without a complete first line makes it `Idle`.
async fn sniff<S>(
    io: &mut ConnIo,
    phase: &mut baton::DrainSignal,
    shared: &Shared<S>,
    may_hand_over: bool,
) -> Sniffed {
    loop {
        let r = io.replay();
        if r.len() >= H2_PREFACE.len() {
            return if r.starts_with(H2_PREFACE) {
                Sniffed::H2
            } else {
                Sniffed::H1
            };
        }
        if !r.is_empty() && !H2_PREFACE.starts_with(r) {
            return Sniffed::H1;
        }
        if phase.is_draining() {
            match phase.phase() {
                Phase::Handover if may_hand_over && shared.baton.handoff_open() => {
                    return Sniffed::Idle;
                }
                Phase::ShuttingDown | Phase::Done if r.is_empty() => {
                    // Stopping with no successor: a client that just
                    // connected is about to send its request; give it a
                    // moment instead of closing under it.
                    match tokio::time::timeout(STOP_SNIFF_GRACE, io.fill()).await {
                        Ok(Ok(n)) if n > 0 => continue,
                        _ => return Sniffed::Closed,
                    }
                }
                _ => {}
            }
        }
        if io.reads_held() {
            // Exact state snapshot: read nothing new until it resolves.
            phase.changed().await;
            continue;
        }
        tokio::select! {
            n = io.fill() => match n {
                Ok(0) | Err(_) => return Sniffed::Closed,
                Ok(_) => {}
            },
            // Re-evaluate at every phase change (drain, rollback, snapshot).
            () = phase.changed() => {}
        }
    }
}

/// Hand the connection to the successor; on refusal, get it back.
async fn detach<S>(
    shared: &Shared<S>,
    io: ConnIo,
    read_buf: Bytes,
    info: &ConnInfo,
) -> Option<ConnIo> {
    let (stream, prefix) = io.into_parts(read_buf);
    let conn = HandoffConn {
        stream,
        prefix,
        listener: info.listener.to_string(),
    };
    match shared.baton.hand_over(conn).await {
        Ok(()) => None,
        Err(back) => {
            tracing::debug!(peer = %info.peer_string(), "handoff refused; serving the connection here");
            Some(ConnIo::new(
                back.stream,
                Bytes::from(back.prefix),
                &shared.baton,
            ))
        }
    }
}

async fn serve_h2<S>(shared: &Shared<S>, io: ConnIo, info: &ConnInfo)
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
    let conn = http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let mut drain = shared.baton.drain_signal();
    let mut goaway_sent = false;
    loop {
        if drain.is_draining() && !goaway_sent {
            // Two-phase GOAWAY (h2 does it: GOAWAY(max) + PING, then the
            // final GOAWAY); open streams finish.
            conn.as_mut().graceful_shutdown();
            goaway_sent = true;
        }
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            // Any phase change: start the GOAWAY, or resume reads after an
            // exact snapshot (hyper must be polled again to read).
            () = drain.changed() => {}
        }
    }
}

/// Serve HTTP/1.x. Returns the connection back if it was detached for a
/// handoff that was refused (serve it again here).
async fn serve_h1<S>(
    shared: &Shared<S>,
    io: ConnIo,
    info: &ConnInfo,
    may_hand_over: bool,
) -> Option<ConnIo>
where
    S: HttpService,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let svc = Counted {
        inner: shared.service.clone(),
        conn: Arc::clone(&in_flight),
        global: Arc::clone(&shared.in_flight),
        close_next: None,
        info: info.clone(),
    };
    let flags = io.flags();
    let mut conn = shared
        .h1
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    // The phase is read at every wake (each request wakes this task a few
    // times): from the lock-free cell, not the watch. The watch's future
    // is still polled at every wake: a `Pending` from it does not always
    // mean it is registered (tokio's cooperative budget can make it yield
    // without registering), so skipping it when "nothing changed" loses
    // wake-ups — the exact-state test hung a connection in 11 of 25 runs.
    let cell = shared.baton.phase_cell();
    let mut phase_fut = next_phase_change(shared.baton.phase_watch());
    let mut closing = false;
    // Idle at a request boundary: hyper flushed everything, has no request
    // in flight and is blocked reading the next one (its last read found
    // nothing, or reads are held for an exact snapshot).
    let idle_for_handoff = |phase: Phase| {
        may_hand_over
            && phase == Phase::Handover
            && shared.baton.handoff_open()
            && in_flight.load(Ordering::SeqCst) == 0
            && flags.waiting_for_client()
    };
    let mut polled_once = false;
    let end = std::future::poll_fn(|cx: &mut Context<'_>| {
        loop {
            // Woken by a phase change with hyper idle since its last poll:
            // detach *before* hyper gets a chance to read the next request
            // (in the exact state mode it must not be served here).
            if polled_once && !closing && idle_for_handoff(cell.get()) {
                return Poll::Ready(H1End::Detach);
            }
            polled_once = true;
            match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(H1End::Finished),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/1 connection ended with an error");
                    return Poll::Ready(H1End::Finished);
                }
                Poll::Pending => {}
            }
            // hyper is waiting. Decide in this same poll, so nothing can
            // slip in between the check and the action.
            let phase = cell.get();
            if phase.is_draining() && !closing {
                let busy = in_flight.load(Ordering::SeqCst) > 0;
                let handoff =
                    may_hand_over && phase == Phase::Handover && shared.baton.handoff_open();
                if handoff {
                    if idle_for_handoff(phase) {
                        return Poll::Ready(H1End::Detach);
                    }
                    // Busy: hand over after this response. Never
                    // graceful_shutdown here: that would add Connection: close.
                } else if busy || phase == Phase::ShuttingDown || phase == Phase::Done {
                    // No successor takes connections: finish politely. With
                    // a request in flight hyper answers it with
                    // `Connection: close`; an idle one is closed now (stop).
                    // Idle connections during a handover without handoff
                    // wait for their next request and get Connection: close.
                    Pin::new(&mut conn).graceful_shutdown();
                    closing = true;
                    continue;
                }
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
    match end {
        H1End::Finished => None,
        H1End::Detach => {
            let parts = conn.into_parts()?;
            let io = parts.io.into_inner();
            detach(shared, io, parts.read_buf, info).await
        }
    }
}

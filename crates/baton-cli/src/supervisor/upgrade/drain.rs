//! The drain: the end of a generation. After an upgrade the old one's
//! accept queue empties once new connections go to the new one (`settle`),
//! then it gets the stop signal, `--drain-timeout`, SIGKILL, and what is left
//! in its queue is relayed to the new one (`stop_old`). When baton exits,
//! the serving generation gets the same stop signal and bound (`stop`).

use std::time::{Duration, Instant};

use baton::control::Event;
use tokio_util::sync::CancellationToken;

use super::{Events, Sup, emit, view};
use crate::supervisor::child::{GenProc, StopOutcome};
use crate::supervisor::sockets::ListenerSet;
use crate::supervisor::{RunConfig, STEER_SETTLE_TIMEOUT, signal_name};

/// How often the old generation's accept queue is looked at after
/// steering.
const SETTLE_POLL: Duration = Duration::from_millis(5);

/// `leaver`'s accept queue (in `slot`) is empty and stayed so for the quiet
/// period, or `leaver` exited (`Ok`); or `keeper` died meanwhile (`Err`).
pub(super) async fn settle(
    listeners: &ListenerSet,
    slot: usize,
    keeper: &GenProc,
    leaver: &GenProc,
    quiet: Duration,
) -> Result<Duration, ()> {
    let t = Instant::now();
    let mut empty_since: Option<Instant> = None;
    loop {
        if keeper.has_exited() {
            return Err(());
        }
        if leaver.has_exited() {
            return Ok(t.elapsed());
        }
        match listeners.pending(slot) {
            Ok(false) => {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= quiet {
                    return Ok(t.elapsed());
                }
            }
            Ok(true) => empty_since = None,
            Err(e) => {
                tracing::warn!(error = %e, generation = leaver.generation, "cannot look at the leaving generation's accept queue; stopping it now");
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() > STEER_SETTLE_TIMEOUT {
            tracing::warn!(
                generation = leaver.generation,
                "the leaving generation's accept queue is still not empty after {STEER_SETTLE_TIMEOUT:?}; stopping it anyway"
            );
            return Ok(t.elapsed());
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Stop the old generation once new connections go to the new one and its
/// queue settled: the stop signal, then `--drain-timeout`, then SIGKILL (at
/// once if `hurry` fires). Then what is left in its socket's queue (in
/// `old_slot`) is relayed to the new generation. Returns how many of those
/// connections were closed instead, plus (`--front`) the WebSocket tunnels
/// the old generation still held at the deadline.
pub(super) async fn stop_old(
    sup: &mut Sup,
    old: Option<GenProc>,
    old_slot: usize,
    steering: bool,
    events: &Events,
    hurry: &CancellationToken,
) -> u64 {
    let mut closed = 0;
    if let Some(mut o) = old {
        // --front: the old generation finishes the requests baton sent it,
        // and gets the stop signal only when no upstream connection of it
        // carries one (baton closes them; the app never closes one baton
        // is about to use). Its WebSocket tunnels too, at most until the
        // same deadline (at once on a second stop signal).
        if let Some(f) = &sup.cfg.front {
            let tunnels = f.retired_tunnels();
            if tunnels > 0 {
                let note = format!(
                    "waiting for {tunnels} WebSocket tunnel(s) on generation {} to close (at most --drain-timeout {:?})",
                    o.generation, sup.cfg.drain_timeout
                );
                tracing::info!(generation = o.generation, tunnels, "front: {note}");
                emit(events, Event::Note(note));
            }
            let idle = tokio::select! {
                idle = f.wait_retired_idle(sup.cfg.drain_timeout) => idle,
                () = hurry.cancelled() => false,
            };
            if !idle {
                closed += f.tunnels_past_drain() as u64;
                tracing::warn!(
                    generation = o.generation,
                    "front: requests or tunnels still open on the old generation after --drain-timeout; stopping it anyway"
                );
            }
        }
        let out = stop_generation(&sup.cfg, &mut o, "stopping the old generation", hurry).await;
        // Its tunnels end with it; whatever the app left open, baton closes.
        if let Some(f) = &sup.cfg.front {
            f.close_retired_tunnels();
        }
        if out.graceful {
            tracing::info!(generation = o.generation, pid = o.pid, status = %out.status, after_ms = out.after.as_millis() as u64, "old generation exited");
        } else {
            tracing::warn!(generation = o.generation, pid = o.pid, status = %out.status, "old generation killed after --drain-timeout");
            emit(
                events,
                Event::Note(format!(
                    "generation {} (pid {}) did not exit within --drain-timeout {:?}: killed",
                    o.generation, o.pid, sup.cfg.drain_timeout
                )),
            );
        }
    }
    // Whatever is left in the old socket's queue (a handshake that
    // completed after the quiet period, or the old generation died during
    // the upgrade) would otherwise wait there until a later generation gets
    // this socket. No process read those connections: relay them to the new
    // generation (the steering program sends there now).
    if steering {
        let (relayed, lost) = sup.listeners.relay_pending(old_slot, sup.cfg.drain_timeout);
        view(&sup.view).relayed += relayed as u64;
        closed += lost as u64;
        if relayed > 0 {
            tracing::info!(
                connections = relayed,
                "connections left unaccepted in the old generation's queue were relayed to the new generation"
            );
        }
        if closed > 0 {
            tracing::warn!(
                connections = closed,
                "connections left unaccepted in the old generation's queue were closed"
            );
        }
    }
    // --front-upstream unix: the old generation is gone; its socket path
    // goes (the next generation on this slot gets a new one).
    sup.listeners.unlink_unix(old_slot);
    closed
}

/// Stop the serving generation (baton is exiting).
pub(super) async fn stop(sup: &mut Sup, hurry: &CancellationToken) {
    sup.notify_systemd(&["STOPPING=1".into(), "STATUS=stopping".into()]);
    // --front: stop accepting, finish the requests in flight, close idle
    // client connections; only then the app. WebSocket tunnels are not
    // waited for (there is no generation to come): the app closes them
    // with its protocol's close when it stops, baton what it left.
    if let Some(f) = &sup.cfg.front {
        let closed = f.shutdown(sup.cfg.drain_timeout, hurry).await;
        tracing::info!(closed, "front: client connections done");
    }
    if let Some(mut g) = sup.serving.take() {
        let out = stop_generation(&sup.cfg, &mut g, "stopping the serving generation", hurry).await;
        tracing::info!(generation = g.generation, pid = g.pid, status = %out.status, after_ms = out.after.as_millis() as u64, graceful = out.graceful, "generation stopped");
        sup.final_status = g.exit_code();
    }
    if let Some(f) = &sup.cfg.front {
        let closed = f.close_tunnels();
        if closed > 0 {
            tracing::warn!(
                tunnels = closed,
                "front: tunnels the app left open were closed"
            );
        }
    }
    sup.listeners.remove_unix();
}

/// Send `g` the stop signal and wait until it exits: at most
/// `--drain-timeout`, then SIGKILL (at once if `hurry` fires). `what` is the
/// log line that says which generation is stopped, and why.
pub(super) async fn stop_generation(
    cfg: &RunConfig,
    g: &mut GenProc,
    what: &str,
    hurry: &CancellationToken,
) -> StopOutcome {
    tracing::info!(
        generation = g.generation,
        pid = g.pid,
        signal = signal_name(cfg.stop_signal),
        "{what}"
    );
    g.stop(cfg.stop_signal, cfg.drain_timeout, hurry).await
}

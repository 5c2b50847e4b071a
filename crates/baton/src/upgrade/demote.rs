//! A rolled-back provisional promotion gives its connections back: when the
//! observation window or the canary fails, the old generation sends
//! `GiveBack` (instead of `Demote`) to a successor of revision ≥ 2, which
//! stops accepting and hands its idle keep-alive and owned connections
//! (WebSockets) back — the same batches and acknowledgements as a drain,
//! the other way round — then finishes and exits. The clients see no
//! close: the connection they opened to the new generation is served by
//! the old one from its next message on.
//!
//! Both roles live here: `take_back` on the old side, `give_back` on the
//! rolled-back one, which runs the ordinary drain towards its predecessor.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::channel::Channel;
use crate::handoff::owned::OwnedOut;
use crate::handoff::send::OldSide;
use crate::handoff::take::Taker;
use crate::inner::{Inner, lock};
use crate::lifecycle::Phase;
use crate::protocol::{Accepts, GiveBack, Msg};
use crate::spawn::{ChildProcess, WaitFuture};
use crate::upgrade::child::{abort_child, describe_exit, wait_or_kill};
use crate::upgrade::drain::{DrainEnd, Queues, drain};

/// Old side, after a failed window: get the new generation's connections
/// back (or, from a first-release successor, just `Demote` it), wait for
/// it to exit (at most `limit`, then kill it). Returns how it ended.
pub(super) async fn take_back(
    inner: &Inner,
    old: &OldSide,
    child: &mut Box<dyn ChildProcess>,
    why: &str,
    limit: Duration,
) -> String {
    if !old.peer_accepts {
        let _ = old.demote(why).await;
        return wait_or_kill(child, limit).await;
    }
    let http = if inner.incoming_taken.load(Ordering::SeqCst) {
        lock(&inner.incoming_tx).clone()
    } else {
        None
    };
    let sinks = lock(&inner.owned_sinks_live).clone();
    let g = GiveBack {
        reason: why.chars().take(4000).collect(),
        accepts_conns: http.is_some(),
        accepts: Accepts {
            owned_kinds: sinks.iter().map(|s| s.kind.clone()).collect(),
        },
    };
    if old.give_back(g).await.is_err() {
        return wait_or_kill(child, limit).await;
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut taker = Taker::default();
    let mut back = 0u64;
    loop {
        tokio::select! {
            st = child.wait() => {
                tracing::info!(connections = back, "the rolled-back generation gave its connections back and exited");
                return describe_exit(&st);
            }
            m = old.recv_detail() => {
                let (msg, fds, truncated) = match m {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => {
                        // It closed the channel: it is exiting.
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        return wait_or_kill(child, left).await;
                    }
                };
                match taker.take(msg, fds, truncated, http.is_some(), &sinks) {
                    Ok((batch, Ok(taken))) => {
                        // Acknowledged before any is touched, as in a drain.
                        let _ = old.answer_batch(batch, Ok(())).await;
                        back += taken.len();
                        inner.counters.conns_received.fetch_add(taken.len(), Ordering::Relaxed);
                        taken.deliver(http.as_ref());
                    }
                    Ok((batch, Err(reason))) => {
                        tracing::warn!(%reason, "refusing connections given back; the rolled-back generation keeps them");
                        let _ = old.answer_batch(batch, Err(reason)).await;
                    }
                    Err(Msg::Serving | Msg::Stats { .. }) => {}
                    Err(other) => {
                        tracing::warn!(msg = other.name(), "unexpected message from the rolled-back generation");
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return abort_child(child, Duration::ZERO).await;
            }
        }
    }
}

/// The previous generation, seen from a rolled-back one giving its
/// connections back: not our child, so never waited for nor killed here;
/// its end shows as the channel closing.
#[derive(Debug)]
struct Predecessor(u32);

impl ChildProcess for Predecessor {
    fn pid(&self) -> u32 {
        self.0
    }

    fn kill(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn wait(&mut self) -> WaitFuture<'_> {
        Box::pin(std::future::pending())
    }

    fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        Ok(None)
    }
}

/// New side, rolled back: stop accepting and drain towards the previous
/// generation, which takes what `g` says. Returns whether this generation
/// is done (false: the predecessor vanished meanwhile and this one serves
/// again).
pub(super) async fn give_back(inner: &Arc<Inner>, chan: Arc<Channel>, g: GiveBack) -> bool {
    let old = OldSide::over(chan, g.accepts.clone());
    let http = g.accepts_conns.then(|| {
        let (tx, rx) = mpsc::channel(8192);
        *lock(&inner.handoff_tx) = Some(tx);
        rx
    });
    let owned = (!g.accepts.owned_kinds.is_empty()).then(|| {
        let (tx, rx) = mpsc::channel(8192);
        *lock(&inner.owned_out) = Some(OwnedOut {
            kinds: g.accepts.owned_kinds.clone(),
            tx,
        });
        rx
    });
    inner.life.set(Phase::Handover);
    let mut peer: Box<dyn ChildProcess> = Box::new(Predecessor(inner.predecessor_pid.unwrap_or(0)));
    let end = drain(inner, &old, &mut peer, Queues::new(http, owned), true).await;
    *lock(&inner.handoff_tx) = None;
    *lock(&inner.owned_out) = None;
    match end {
        DrainEnd::Drained {
            handed_over,
            closed,
        } => {
            inner
                .counters
                .conns_handed_over
                .fetch_add(handed_over, Ordering::Relaxed);
            tracing::info!(
                handed_over,
                closed,
                "gave the connections back; this generation exits"
            );
            true
        }
        DrainEnd::SuccessorFailed { why, .. } => {
            tracing::error!(%why, "the previous generation went away while taking its connections back; serving on");
            false
        }
    }
}

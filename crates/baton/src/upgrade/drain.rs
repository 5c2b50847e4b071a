//! The drain: after promotion the old generation hands its idle
//! connections over in acknowledged batches, watches the successor, and
//! waits for its busy connections to finish — or resumes serving if the
//! successor dies or hangs.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::handoff::owned::{OwnedConn, OwnedReq};
use crate::handoff::send::{
    OldSide, SentBatch, SentOwned, fits_batch, fits_owned_batch, owned_entry_len,
};
use crate::inner::{HandoffReq, Inner, lock};
use crate::lifecycle::Phase;
use crate::protocol::Msg;
use crate::spawn::ChildProcess;
use crate::upgrade::child::{abort_child, describe_exit};

pub(super) enum DrainEnd {
    Drained { handed_over: u64, closed: u64 },
    SuccessorFailed { why: String, lost: u64 },
}

type Reply = oneshot::Sender<Result<(), crate::handoff::HandoffConn>>;
type OwnedReply = oneshot::Sender<Result<(), OwnedConn>>;

/// A batch in flight: idle HTTP connections or application-owned ones (one
/// batch numbering, one acknowledgement protocol).
enum Sent {
    Http(SentBatch<Reply>),
    Owned(SentOwned<OwnedReply>),
}

impl Sent {
    fn id(&self) -> u32 {
        match self {
            Sent::Http(b) => b.id,
            Sent::Owned(b) => b.id,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Sent::Http(b) => b.items.len() as u64,
            Sent::Owned(b) => b.items.len() as u64,
        }
    }

    /// Taken: close our copies, tell each task it moved.
    fn acked(self) {
        match self {
            Sent::Http(b) => {
                for (conn, reply) in b.items {
                    drop(conn); // our copy; the successor has its own
                    let _ = reply.send(Ok(()));
                }
            }
            Sent::Owned(b) => {
                for (mut conn, reply) in b.items {
                    // Our copy of its state (it may hold TLS keys).
                    zeroize::Zeroize::zeroize(&mut conn.state);
                    drop(conn);
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    /// Not taken: each task gets its connection back to serve here.
    fn give_back(self) {
        match self {
            Sent::Http(b) => {
                for (conn, reply) in b.items {
                    let _ = reply.send(Err(conn));
                }
            }
            Sent::Owned(b) => {
                for (conn, reply) in b.items {
                    let _ = reply.send(Err(conn));
                }
            }
        }
    }
}

/// A queued connection and the reply its task waits for (`Err` gives it
/// back).
type Queued<C> = (C, oneshot::Sender<Result<(), C>>);

/// The next connection to hand over: the one that did not fit the previous
/// batch, else the queue's next (never, once the queue is closed).
async fn next_queued<C>(
    carry: &mut Option<Queued<C>>,
    rx: &mut Option<mpsc::Receiver<Queued<C>>>,
) -> Option<Queued<C>> {
    if let Some(c) = carry.take() {
        return Some(c);
    }
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Give every queued connection back to its task and close the queue.
fn give_back_queued<C>(rx: &mut Option<mpsc::Receiver<Queued<C>>>, carry: &mut Option<Queued<C>>) {
    if let Some((c, reply)) = carry.take() {
        let _ = reply.send(Err(c));
    }
    if let Some(mut r) = rx.take() {
        r.close();
        while let Ok((c, reply)) = r.try_recv() {
            let _ = reply.send(Err(c));
        }
    }
}

/// Give every queued owned connection back and close the queue.
fn close_owned(
    inner: &Inner,
    rx: &mut Option<mpsc::Receiver<OwnedReq>>,
    carry: &mut Option<OwnedReq>,
) {
    *lock(&inner.owned_out) = None;
    give_back_queued(rx, carry);
}

/// Connection batches sent and not yet acknowledged, oldest first.
type InFlight = std::collections::VecDeque<(Sent, tokio::time::Instant)>;

/// How many connection batches may be in flight at once (acknowledgements
/// are pipelined: the next batch goes out before the previous one's ack).
const BATCHES_IN_FLIGHT: usize = 8;

async fn ack_deadline(p: &InFlight) {
    match p.front() {
        Some((_, at)) => tokio::time::sleep_until(*at).await,
        None => std::future::pending().await,
    }
}

/// Batches whose fate is unknown (the successor died or the channel broke):
/// an acknowledged one was taken (its connections are lost with a dead
/// successor), an unacknowledged one was never used there and is served here
/// again. Returns how many connections were lost.
fn settle_unacked(old: &OldSide, pending: &mut InFlight) -> u64 {
    if pending.is_empty() {
        return 0;
    }
    let acked = old.queued_acks();
    let mut lost = 0;
    for (b, _) in pending.drain(..) {
        if acked.contains(&b.id()) {
            lost += b.len();
        } else {
            tracing::info!(
                connections = b.len(),
                "taking back a connection batch the successor never acknowledged"
            );
            b.give_back();
        }
    }
    lost
}

/// The successor died: resume serving first (so the connections given
/// back see `Serving`), then settle the batches in flight.
fn resume_unacked(inner: &Inner, old: &OldSide, pending: &mut InFlight) -> u64 {
    *lock(&inner.handoff_tx) = None;
    *lock(&inner.owned_out) = None;
    inner.life.set(Phase::Serving);
    settle_unacked(old, pending)
}

/// Give every queued HTTP connection back to its task and close the queue.
fn close_handoff(
    inner: &Inner,
    rx: &mut Option<mpsc::Receiver<HandoffReq>>,
    carry: &mut Option<HandoffReq>,
) {
    *lock(&inner.handoff_tx) = None;
    give_back_queued(rx, carry);
}

/// The queues of connections waiting to be handed over: idle HTTP ones
/// and application-owned ones, each with the request that did not fit the
/// previous batch.
pub(super) struct Queues {
    pub(super) http: Option<mpsc::Receiver<HandoffReq>>,
    pub(super) owned: Option<mpsc::Receiver<OwnedReq>>,
    http_carry: Option<HandoffReq>,
    owned_carry: Option<OwnedReq>,
}

impl Queues {
    pub(super) fn new(
        http: Option<mpsc::Receiver<HandoffReq>>,
        owned: Option<mpsc::Receiver<OwnedReq>>,
    ) -> Self {
        Queues {
            http,
            owned,
            http_carry: None,
            owned_carry: None,
        }
    }

    /// Give everything queued back and close both queues.
    fn close(&mut self, inner: &Inner) {
        close_handoff(inner, &mut self.http, &mut self.http_carry);
        close_owned(inner, &mut self.owned, &mut self.owned_carry);
    }
}

/// After promotion: hand idle connections over in acknowledged batches,
/// watch the successor, wait for our connections to finish.
pub(super) async fn drain(
    inner: &Inner,
    old: &OldSide,
    child: &mut Box<dyn ChildProcess>,
    mut q: Queues,
    confirmed: bool,
) -> DrainEnd {
    let deadline = tokio::time::Instant::now() + inner.config.drain_timeout;
    let ack_timeout = inner.config.handoff_ack_timeout;
    let mut pending: InFlight = InFlight::new();
    let mut next_batch: u32 = 1;
    let mut handed_over: u64 = 0;
    let mut lost_unacked: u64 = 0;
    let mut chan_open = true;
    // The drain cannot finish before the successor confirmed it accepts.
    let mut confirmed = confirmed;
    let confirm_deadline = tokio::time::Instant::now() + ack_timeout;
    let tracker = inner.life.tracker().clone();
    loop {
        tokio::select! {
            biased;
            st = child.wait() => {
                let why = format!("died ({})", describe_exit(&st));
                let lost = handed_over + lost_unacked + resume_unacked(inner, old, &mut pending);
                q.close(inner);
                return DrainEnd::SuccessorFailed { why, lost };
            }
            msg = old.recv(), if chan_open => {
                match msg {
                    Ok(Some(Msg::Serving)) if !confirmed => {
                        crate::trace::step("old: Serving received");
                        confirmed = true;
                        tracing::debug!(pid = child.pid(), "the new generation confirmed it serves");
                    }
                    Ok(Some(Msg::ConnsAck { batch })) if pending.iter().any(|(b, _)| b.id() == batch) => {
                        if let Some(i) = pending.iter().position(|(b, _)| b.id() == batch)
                            && let Some((b, _)) = pending.remove(i)
                        {
                            handed_over += b.len();
                            b.acked();
                        }
                    }
                    Ok(Some(Msg::ConnsNack { batch, reason })) if pending.iter().any(|(b, _)| b.id() == batch) => {
                        if let Some(i) = pending.iter().position(|(b, _)| b.id() == batch)
                            && let Some((b, _)) = pending.remove(i)
                        {
                            // A refused batch of one kind stops handing over
                            // that kind only.
                            match &b {
                                Sent::Http(_) => {
                                    tracing::warn!(%reason, "the new generation refused a connection batch; serving those connections here");
                                    close_handoff(inner, &mut q.http, &mut q.http_carry);
                                }
                                Sent::Owned(_) => {
                                    tracing::warn!(%reason, "the new generation refused a batch of owned connections; they stay here until the drain deadline");
                                    close_owned(inner, &mut q.owned, &mut q.owned_carry);
                                }
                            }
                            b.give_back();
                        }
                    }
                    other => {
                        // EOF with the child alive, a protocol error, or an
                        // unexpected message: stop handing over. Batches in
                        // flight are settled by their acknowledgements.
                        match other {
                            Ok(None) => tracing::warn!("the new generation closed the handoff channel; no more connections are handed over"),
                            Ok(Some(m)) => tracing::warn!(msg = m.name(), "unexpected message from the new generation; no more connections are handed over"),
                            Err(e) => tracing::warn!(error = %e, "handoff channel error; no more connections are handed over"),
                        }
                        chan_open = false;
                        lost_unacked += settle_unacked(old, &mut pending);
                        q.close(inner);
                    }
                }
            }
            req = next_queued(&mut q.http_carry, &mut q.http), if pending.len() < BATCHES_IN_FLIGHT && chan_open => {
                let Some(first) = req else {
                    q.http = None;
                    continue;
                };
                let mut bytes = first.0.prefix.len() + first.0.listener.len() + 8;
                let mut items = vec![first];
                if let Some(rx) = q.http.as_mut() {
                    while let Ok(more) = rx.try_recv() {
                        if !fits_batch(items.len(), bytes, more.0.listener.len(), more.0.prefix.len()) {
                            q.http_carry = Some(more);
                            break;
                        }
                        bytes += more.0.prefix.len() + more.0.listener.len() + 8;
                        items.push(more);
                    }
                }
                let id = next_batch;
                next_batch = next_batch.wrapping_add(1);
                match old.send_batch(id, items).await {
                    Ok(sent) => pending.push_back((Sent::Http(sent), tokio::time::Instant::now() + ack_timeout)),
                    Err((e, back)) => {
                        tracing::warn!(error = %e, "could not send a connection batch; serving those connections here");
                        for (c, r) in back {
                            let _ = r.send(Err(c));
                        }
                        chan_open = false;
                        q.close(inner);
                    }
                }
            }
            req = next_queued(&mut q.owned_carry, &mut q.owned), if pending.len() < BATCHES_IN_FLIGHT && chan_open => {
                let Some(first) = req else {
                    q.owned = None;
                    continue;
                };
                let mut bytes = owned_entry_len(&first.0);
                let mut items = vec![first];
                if let Some(rx) = q.owned.as_mut() {
                    while let Ok(more) = rx.try_recv() {
                        let entry = owned_entry_len(&more.0);
                        if !fits_owned_batch(items.len(), bytes, entry) {
                            q.owned_carry = Some(more);
                            break;
                        }
                        bytes += entry;
                        items.push(more);
                    }
                }
                let id = next_batch;
                next_batch = next_batch.wrapping_add(1);
                match old.send_owned_batch(id, items).await {
                    Ok(sent) => pending.push_back((Sent::Owned(sent), tokio::time::Instant::now() + ack_timeout)),
                    Err((e, back)) => {
                        tracing::warn!(error = %e, "could not send a batch of owned connections; they stay here");
                        for (c, r) in back {
                            let _ = r.send(Err(c));
                        }
                        chan_open = false;
                        q.close(inner);
                    }
                }
            }
            () = ack_deadline(&pending) => {
                // The successor holds the listeners but does not answer: it is
                // hung. Kill it and resume.
                let status = abort_child(child, Duration::ZERO).await;
                let why = format!("did not acknowledge handed-over connections within {ack_timeout:?} and was killed ({status})");
                let lost = handed_over + lost_unacked + resume_unacked(inner, old, &mut pending);
                q.close(inner);
                return DrainEnd::SuccessorFailed { why, lost };
            }
            () = tokio::time::sleep_until(confirm_deadline), if !confirmed => {
                let status = abort_child(child, Duration::ZERO).await;
                let why = format!("did not confirm it serves within {ack_timeout:?} of promotion and was killed ({status})");
                let lost = handed_over + lost_unacked + resume_unacked(inner, old, &mut pending);
                q.close(inner);
                return DrainEnd::SuccessorFailed { why, lost };
            }
            () = inner.life.drained(), if pending.is_empty() && confirmed => {
                q.close(inner);
                return DrainEnd::Drained { handed_over, closed: lost_unacked };
            }
            () = tokio::time::sleep_until(deadline) => {
                let left = inner.open_left(&tracker);
                if left > 0 {
                    tracing::warn!(connections = left, "drain timeout reached; closing the connections still open");
                }
                q.close(inner);
                inner.close_owned_at_deadline().await;
                return DrainEnd::Drained { handed_over, closed: left + lost_unacked };
            }
        }
    }
}

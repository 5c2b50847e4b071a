//! A generation's lifecycle: the phase everyone watches, the tracker of
//! connection tasks the drain waits for, and what the serving layer counts
//! for it (requests in [`Activity`], connections held by
//! [`ConnectionToken`]s).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::task::TaskTracker;

/// Where this generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Initializing; not accepting yet (a new generation waits for
    /// `Promote`).
    Starting,
    /// Accepting and serving.
    Serving,
    /// Not accepting, connections keep running (exact state snapshot in
    /// progress); may return to `Serving`.
    Quiesced,
    /// A successor serves provisionally (observation window): not
    /// accepting, connections keep being served here until the window ends.
    Observing,
    /// A successor was promoted: not accepting; connections finish or move to
    /// the successor. Returns to `Serving` if the successor dies.
    Handover,
    /// Graceful stop without a successor: not accepting, connections finish.
    ShuttingDown,
    /// Finished: the process should exit now.
    Done,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Starting,
        Phase::Serving,
        Phase::Quiesced,
        Phase::Observing,
        Phase::Handover,
        Phase::ShuttingDown,
        Phase::Done,
    ];

    /// True when connections should wind down (hand over or close).
    pub fn is_draining(self) -> bool {
        matches!(self, Phase::Handover | Phase::ShuttingDown | Phase::Done)
    }

    /// Lower-case name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Quiesced => "quiesced",
            Phase::Observing => "observing",
            Phase::Handover => "handover",
            Phase::ShuttingDown => "shutting-down",
            Phase::Done => "done",
        }
    }
}

/// Counts listeners whose accept loop is active (has seen `Serving` and not
/// yet seen it end). The drain waits for this to reach zero before it trusts
/// an empty tracker: a connection accepted just as the phase changed is
/// spawned on the tracker before its accept loop comes back to see the new
/// phase, so "no active acceptor and empty tracker" means no connection can
/// still appear.
#[derive(Debug, Default)]
pub(crate) struct Acceptors {
    active: AtomicUsize,
    quiet: Notify,
}

impl Acceptors {
    pub(crate) fn activate(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn deactivate(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.quiet.notify_waiters();
        }
    }

    /// Wait until no accept loop is active, or `limit` passed (an app that
    /// stopped calling `accept` must not block the drain).
    pub(crate) async fn quiet(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.quiet.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::debug!(
                    active = self.active.load(Ordering::SeqCst),
                    "accept loops did not all pause in time; draining anyway"
                );
                return;
            }
        }
    }
}

/// The current [`Phase`], readable without a lock: a copy kept beside the
/// phase watch and updated before each change is announced on it, so a
/// task the watch wakes reads the new phase here. For per-request paths
/// (every read of a connection asks whether reads are held); wait for
/// changes with [`Baton::phase_watch`](crate::Baton::phase_watch).
///
/// ```no_run
/// # async fn f(baton: baton::Baton) {
/// let phase = baton.phase_cell();
/// if phase.get() == baton::Phase::Quiesced {
///     // an exact state snapshot is being taken: start nothing new
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PhaseCell(Arc<AtomicU8>);

impl PhaseCell {
    fn new(p: Phase) -> Self {
        PhaseCell(Arc::new(AtomicU8::new(p as u8)))
    }

    /// The phase now.
    pub fn get(&self) -> Phase {
        let i = usize::from(self.0.load(Ordering::Acquire));
        Phase::ALL.get(i).copied().unwrap_or(Phase::Done)
    }

    fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::Release);
    }
}

/// What a [`Listener`](crate::Listener) needs to gate its accepts.
#[derive(Debug, Clone)]
pub(crate) struct AcceptGate {
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) acceptors: Arc<Acceptors>,
}

/// How long the drain waits for accept loops to notice a phase change.
pub(crate) const ACCEPTORS_QUIET_LIMIT: Duration = Duration::from_secs(2);

/// Phase broadcast + connection tracker.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    phase: watch::Sender<Phase>,
    cell: PhaseCell,
    tracker: TaskTracker,
    acceptors: Arc<Acceptors>,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Lifecycle {
            phase: watch::Sender::new(Phase::Starting),
            cell: PhaseCell::new(Phase::Starting),
            tracker: TaskTracker::new(),
            acceptors: Arc::new(Acceptors::default()),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub(crate) fn set(&self, p: Phase) {
        // The cell first: whoever the watch wakes must read the new phase.
        self.cell.set(p);
        let old = self.phase.send_replace(p);
        if old != p {
            tracing::debug!(from = old.as_str(), to = p.as_str(), "phase");
        }
        match p {
            Phase::Handover | Phase::ShuttingDown => {
                self.tracker.close();
            }
            Phase::Serving | Phase::Quiesced | Phase::Observing | Phase::Starting => {
                self.tracker.reopen();
            }
            Phase::Done => {}
        }
    }

    pub(crate) fn cell(&self) -> PhaseCell {
        self.cell.clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub(crate) fn gate(&self) -> AcceptGate {
        AcceptGate {
            phase: self.phase.subscribe(),
            acceptors: Arc::clone(&self.acceptors),
        }
    }

    /// Resolves when no accept loop can add a connection any more and every
    /// tracked connection task has finished.
    pub(crate) async fn drained(&self) {
        self.acceptors.quiet(ACCEPTORS_QUIET_LIMIT).await;
        self.tracker.wait().await;
    }

    /// Wait until every tracked connection task finished, or `limit` passed.
    /// Returns whether it drained in time.
    pub(crate) async fn wait_drained(&self, limit: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(limit, self.drained()).await.is_ok()
    }
}

/// A future that resolves when this generation starts draining.
///
/// ```no_run
/// # async fn f(baton: baton::Baton) {
/// let mut drain = baton.drain_signal();
/// drain.wait().await; // a successor took over, or we are stopping
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DrainSignal {
    rx: watch::Receiver<Phase>,
}

impl DrainSignal {
    pub(crate) fn new(rx: watch::Receiver<Phase>) -> Self {
        DrainSignal { rx }
    }

    /// Whether the generation is draining right now.
    pub fn is_draining(&self) -> bool {
        self.rx.borrow().is_draining()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolve once the generation is draining (immediately if it is).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait(&mut self) {
        // An error means the generation is gone: that is a drain too.
        let _ = self.rx.wait_for(|p| p.is_draining()).await;
    }

    /// Resolve at the next phase change.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolve once the generation serves again (after a rolled-back
    /// handover), or is done. Returns the phase reached.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_not_handover(&mut self) -> Phase {
        match self.rx.wait_for(|p| *p != Phase::Handover).await {
            Ok(p) => *p,
            Err(_) => Phase::Done,
        }
    }
}

/// Requests in flight and started, kept by the serving layer (e.g.
/// baton-http) for the exact state mode.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests being processed now.
    pub in_flight: AtomicUsize,
    /// Requests started since start-up.
    pub started: AtomicU64,
    /// Responses sent since start-up.
    pub responses: AtomicU64,
    /// 5xx responses sent since start-up.
    pub errors: AtomicU64,
    /// Connections open now (held by [`ConnectionToken`]s).
    pub open_connections: AtomicUsize,
}

/// Held by a serving layer for each open connection: keeps the drain
/// waiting (a task-tracker token) and counts the connection, so the drain
/// deadline can say how many it cut. Drop it when the connection closes or
/// leaves the process.
#[derive(Debug)]
pub struct ConnectionToken {
    pub(crate) _token: tokio_util::task::task_tracker::TaskTrackerToken,
    pub(crate) activity: Arc<Activity>,
}

impl Drop for ConnectionToken {
    fn drop(&mut self) {
        self.activity
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// Record a request start.
    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Record a request end.
    pub fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Record a response status (the canary compares error rates).
    pub fn response(&self, status: u16) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_cell_holds_every_phase() {
        let cell = PhaseCell::new(Phase::Starting);
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "Phase::ALL is in declaration order");
            cell.set(*p);
            assert_eq!(cell.get(), *p);
        }
    }

    #[test]
    fn the_cell_has_the_new_phase_when_the_watch_announces_it() {
        let life = Lifecycle::new();
        let (cell, mut rx) = (life.cell(), life.subscribe());
        life.set(Phase::Quiesced);
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!(*rx.borrow_and_update(), Phase::Quiesced);
        assert_eq!(cell.get(), Phase::Quiesced);
    }
}

//! A generation's lifecycle: the phase everyone watches, and the tracker of
//! connection tasks the drain waits for.

use std::time::Duration;

use tokio::sync::watch;
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
    /// A successor was promoted: not accepting; connections finish or move to
    /// the successor. Returns to `Serving` if the successor dies.
    Handover,
    /// Graceful stop without a successor: not accepting, connections finish.
    ShuttingDown,
    /// Finished: the process should exit now.
    Done,
}

impl Phase {
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
            Phase::Handover => "handover",
            Phase::ShuttingDown => "shutting-down",
            Phase::Done => "done",
        }
    }
}

/// Phase broadcast + connection tracker.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    phase: watch::Sender<Phase>,
    tracker: TaskTracker,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Lifecycle {
            phase: watch::Sender::new(Phase::Starting),
            tracker: TaskTracker::new(),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub(crate) fn set(&self, p: Phase) {
        let old = self.phase.send_replace(p);
        if old != p {
            tracing::debug!(from = old.as_str(), to = p.as_str(), "phase");
        }
        match p {
            Phase::Handover | Phase::ShuttingDown => {
                self.tracker.close();
            }
            Phase::Serving | Phase::Quiesced | Phase::Starting => {
                self.tracker.reopen();
            }
            Phase::Done => {}
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Wait until every tracked connection task finished, or `limit` passed.
    /// Returns how many were still running at the deadline.
    pub(crate) async fn wait_drained(&self, limit: Duration) -> usize {
        self.tracker.close();
        match tokio::time::timeout(limit, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
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

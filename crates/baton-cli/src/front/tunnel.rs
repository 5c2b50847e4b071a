//! Upgraded connections (WebSocket and any other `Upgrade:` protocol):
//! after the generation answered `101 Switching Protocols`, the client's
//! connection and the upstream one are spliced byte for byte until either
//! side closes. A tunnel stays on the generation that accepted it — baton
//! cannot move a connection the app owns the protocol state of.
//!
//! Each tunnel belongs to the epoch of the upstream connection it came
//! from. The supervisor waits for the tunnels of the old epochs to close
//! (bounded by `--drain-timeout`) before it stops the old generation; past
//! that deadline the old generation gets its stop signal with the tunnels
//! still open (the app may close them with its protocol's close, e.g. a
//! WebSocket 1001), and baton closes whatever is left once it has exited.
//! Tunnels still open at the deadline are counted
//! (`tunnels_closed_at_drain`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::Front;

/// The open tunnels, per epoch.
#[derive(Default)]
pub struct Tunnels {
    state: Mutex<BTreeMap<u64, Epoch>>,
    /// Woken when a tunnel closes.
    changed: Notify,
}

#[derive(Default)]
struct Epoch {
    open: usize,
    /// Cancelled to close this epoch's tunnels.
    cut: CancellationToken,
}

impl Tunnels {
    fn state(&self) -> MutexGuard<'_, BTreeMap<u64, Epoch>> {
        // Plain counters and tokens: still usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open tunnels, every epoch.
    pub fn open(&self) -> usize {
        self.state().values().map(|e| e.open).sum()
    }

    /// Open tunnels of the epochs before `epoch`.
    pub fn open_before(&self, epoch: u64) -> usize {
        self.state().range(..epoch).map(|(_, e)| e.open).sum()
    }

    /// Close the tunnels of the epochs before `epoch` (all of them with
    /// `u64::MAX`). Returns how many were open.
    pub fn cut_before(&self, epoch: u64) -> usize {
        let st = self.state();
        let mut n = 0;
        for (_, e) in st.range(..epoch) {
            n += e.open;
            e.cut.cancel();
        }
        n
    }

    /// Wait until no tunnel of an epoch before `epoch` is open, or
    /// `deadline`. Returns whether none is.
    pub async fn wait_closed_before(&self, epoch: u64, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open_before(epoch) == 0 {
                return true;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Count a new tunnel of `epoch`; the token closes it.
    fn add(&self, epoch: u64) -> CancellationToken {
        let mut st = self.state();
        let e = st.entry(epoch).or_default();
        e.open += 1;
        e.cut.child_token()
    }

    fn remove(&self, epoch: u64) {
        let mut st = self.state();
        if let Some(e) = st.get_mut(&epoch) {
            e.open = e.open.saturating_sub(1);
            if e.open == 0 {
                st.remove(&epoch);
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }
}

/// One open tunnel, counted from the moment the `101` arrived until both
/// connections are closed.
pub struct Tunnel {
    front: Front,
    epoch: u64,
    cut: CancellationToken,
}

impl Tunnel {
    /// Count a tunnel of `epoch` (call it before the upstream connection's
    /// busy count is given back, so that the epoch is never seen idle in
    /// between).
    pub fn open(front: &Front, epoch: u64) -> Tunnel {
        let cut = front.inner.tunnels.add(epoch);
        front
            .inner
            .counters
            .tunnels_opened
            .fetch_add(1, Ordering::Relaxed);
        Tunnel {
            front: front.clone(),
            epoch,
            cut,
        }
    }

    /// Splice the client's upgraded connection and the generation's once
    /// both upgrades completed, on a task of its own. `slot` is the client
    /// connection's `--front-max-connections` slot: held until the tunnel
    /// closes.
    pub fn spawn(
        self,
        client: OnUpgrade,
        upstream: OnUpgrade,
        slot: Option<Arc<OwnedSemaphorePermit>>,
    ) {
        tokio::spawn(async move {
            let cut = self.cut.clone();
            tokio::select! {
                () = cut.cancelled() => {
                    tracing::debug!(epoch = self.epoch, "front: tunnel closed by baton");
                }
                r = splice(client, upstream) => match r {
                    Ok((up, down)) => tracing::debug!(epoch = self.epoch, up, down, "front: tunnel closed"),
                    Err(e) => tracing::debug!(epoch = self.epoch, error = %e, "front: tunnel ended"),
                },
            }
            drop(slot);
            drop(self);
        });
    }
}

async fn splice(client: OnUpgrade, upstream: OnUpgrade) -> std::io::Result<(u64, u64)> {
    let (c, u) = tokio::join!(client, upstream);
    let mut c = TokioIo::new(c.map_err(std::io::Error::other)?);
    let mut u = TokioIo::new(u.map_err(std::io::Error::other)?);
    tokio::io::copy_bidirectional(&mut c, &mut u).await
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.front.inner.tunnels.remove(self.epoch);
        self.front
            .inner
            .counters
            .tunnels_closed
            .fetch_add(1, Ordering::Relaxed);
    }
}

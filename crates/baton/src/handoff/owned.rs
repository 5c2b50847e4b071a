//! Connections the application owns — a WebSocket, a protocol of its own —
//! moving to the next generation at a point the application chooses (a
//! message boundary), with the bytes it read and has not processed and a
//! small state blob of its own.
//!
//! The old side of the story: a connection task holds an [`OwnedGuard`]
//! (which keeps the drain waiting and tells baton how to close the
//! connection in its own protocol), and when the generation hands over and
//! the successor takes its kind ([`Baton::takes_owned`]), it stops at its
//! next message boundary and calls [`Baton::hand_over_owned`]. The new side
//! registered a receiver for the kind before `ready()`
//! ([`Baton::receive_owned`]) and gets each connection from it.
//!
//! What does not move — a kind the successor did not register, a batch it
//! refused, a successor of the first release — stays here and is closed at
//! the drain deadline by the guard's close callback, then given
//! [`OWNED_CLOSE_GRACE`] to finish its closing handshake.
//!
//! [`Baton::takes_owned`]: crate::Baton::takes_owned
//! [`Baton::hand_over_owned`]: crate::Baton::hand_over_owned
//! [`Baton::receive_owned`]: crate::Baton::receive_owned

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::lifecycle::ConnectionToken;
use crate::listeners::Stream;

/// After the drain deadline called the close callbacks, how long the
/// connections have to finish their closing handshake (a WebSocket close
/// frame written and flushed) before the generation exits anyway.
pub const OWNED_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// An application-owned connection on its way between generations. `Debug`
/// shows the lengths of its bytes, not the bytes (a state blob may hold TLS
/// session keys).
pub struct OwnedConn {
    /// Its kind: the new generation delivers it to the receiver registered
    /// for this name (1 to [`MAX_KIND`](crate::protocol::MAX_KIND) bytes).
    pub kind: String,
    /// The socket.
    pub stream: Stream,
    /// Bytes read from the socket and not processed yet (at most
    /// [`MAX_CONN_PREFIX`](crate::protocol::MAX_CONN_PREFIX)); the receiver
    /// processes them before reading the socket.
    pub unread: Vec<u8>,
    /// The application's own state for this connection (at most
    /// [`MAX_OWNED_STATE`](crate::protocol::MAX_OWNED_STATE) bytes), e.g. a
    /// sequence number; version it yourself.
    pub state: Vec<u8>,
    /// Name of the listener it was accepted on.
    pub listener: String,
}

impl std::fmt::Debug for OwnedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedConn")
            .field("kind", &self.kind)
            .field("stream", &self.stream)
            .field("unread_len", &self.unread.len())
            .field("state_len", &self.state.len())
            .field("listener", &self.listener)
            .finish()
    }
}

/// A successor's verdict on one connection before it is taken: `Err` with a
/// reason refuses its whole batch, which then stays with the old generation.
pub type OwnedCheck = Arc<dyn Fn(&OwnedConn) -> Result<(), String> + Send + Sync>;

/// A receiver registered by a new generation for one kind.
#[derive(Clone)]
pub(crate) struct OwnedSink {
    pub(crate) kind: String,
    pub(crate) tx: mpsc::UnboundedSender<OwnedConn>,
    pub(crate) check: Option<OwnedCheck>,
}

impl std::fmt::Debug for OwnedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedSink")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A request to hand an owned connection over, with where to send it back.
pub(crate) type OwnedReq = (OwnedConn, oneshot::Sender<Result<(), OwnedConn>>);

/// While a promoted successor takes owned connections: the kinds it takes
/// and the queue to the drain.
#[derive(Debug, Clone)]
pub(crate) struct OwnedOut {
    pub(crate) kinds: Vec<String>,
    pub(crate) tx: mpsc::Sender<OwnedReq>,
}

type Closer = Box<dyn FnOnce() + Send>;

/// The close callbacks of the live owned connections, by guard id.
#[derive(Default)]
pub(crate) struct Closers {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, Closer>>,
}

impl std::fmt::Debug for Closers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closers")
            .field("live", &lock(&self.map).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Closers {
    pub(crate) fn add(&self, f: Closer) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.map).insert(id, f);
        id
    }

    fn remove(&self, id: u64) {
        lock(&self.map).remove(&id);
    }

    /// Call every close callback once (outside the lock: a callback may
    /// drop its own guard). Returns how many were called.
    pub(crate) fn close_all(&self) -> usize {
        let all = std::mem::take(&mut *lock(&self.map));
        let n = all.len();
        for (_, f) in all {
            f();
        }
        n
    }
}

/// Held by the task of one application-owned connection while it lives in
/// this generation: it keeps the drain waiting (like a
/// [`ConnectionToken`]) and holds the callback that closes the connection
/// in its own protocol at the drain deadline (a WebSocket close frame with
/// code 1012, a line saying goodbye, ...). Drop it when the connection
/// closes or has been handed over.
#[must_use = "the connection is tracked only while the guard lives"]
pub struct OwnedGuard {
    pub(crate) id: u64,
    pub(crate) closers: Arc<Closers>,
    /// `None` when another token already counts the connection.
    pub(crate) _token: Option<ConnectionToken>,
}

impl std::fmt::Debug for OwnedGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedGuard").field("id", &self.id).finish()
    }
}

impl Drop for OwnedGuard {
    fn drop(&mut self) {
        self.closers.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn close_all_calls_each_live_callback_once() {
        let c = Closers::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let ids: Vec<u64> = (0..3)
            .map(|_| {
                let h = Arc::clone(&hits);
                c.add(Box::new(move || {
                    h.fetch_add(1, Ordering::SeqCst);
                }))
            })
            .collect();
        c.remove(ids[1]);
        assert_eq!(c.close_all(), 2);
        assert_eq!(c.close_all(), 0);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }
}

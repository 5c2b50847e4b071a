//! Application-owned connections on the handle: registering a receiver
//! (new side), guarding a live connection and handing it over (old side).
//! The model is in [`crate::handoff::owned`].

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::generation::Baton;
use crate::handoff::owned::{OwnedCheck, OwnedConn, OwnedGuard, OwnedSink};
use crate::inner::lock;
use crate::lifecycle::Phase;
use crate::protocol::{MAX_CONN_PREFIX, MAX_NAME, MAX_OWNED_KINDS, MAX_OWNED_STATE, check_kind};

impl Baton {
    /// Take the application-owned connections of `kind` that the previous
    /// generation hands over. Call it **before** [`ready`](Baton::ready):
    /// the kinds registered then are what the old generation offers.
    ///
    /// ```no_run
    /// # async fn f(baton: baton::Baton) -> Result<(), baton::Error> {
    /// let mut moved = baton.receive_owned("chat")?;
    /// tokio::spawn(async move {
    ///     while let Some(conn) = moved.recv().await {
    ///         // conn.stream, conn.unread (process first), conn.state
    ///     }
    /// });
    /// baton.ready().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Config`] after `ready()`, for a kind already registered,
    /// an empty or too long kind (1 to 64 bytes), or too many kinds (64).
    pub fn receive_owned(&self, kind: &str) -> Result<mpsc::UnboundedReceiver<OwnedConn>, Error> {
        self.register_owned(kind, None)
    }

    /// [`receive_owned`](Baton::receive_owned) with a check run on each
    /// connection before it is taken (its state blob's version, say): an
    /// `Err` refuses the whole batch, whose connections then stay with the
    /// old generation and close at its drain deadline.
    ///
    /// # Errors
    /// As [`receive_owned`](Baton::receive_owned).
    pub fn receive_owned_checked(
        &self,
        kind: &str,
        check: impl Fn(&OwnedConn) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<mpsc::UnboundedReceiver<OwnedConn>, Error> {
        let check: OwnedCheck = Arc::new(check);
        self.register_owned(kind, Some(check))
    }

    fn register_owned(
        &self,
        kind: &str,
        check: Option<OwnedCheck>,
    ) -> Result<mpsc::UnboundedReceiver<OwnedConn>, Error> {
        check_kind(kind).map_err(|e| Error::Config(e.to_string()))?;
        let mut sinks = lock(&self.inner.owned_sinks);
        let Some(sinks) = sinks.as_mut() else {
            return Err(Error::Config(format!(
                "receive_owned(\"{kind}\") after ready(): register every kind before ready()"
            )));
        };
        if sinks.iter().any(|s| s.kind == kind) {
            return Err(Error::Config(format!(
                "owned connections of kind '{kind}' already have a receiver"
            )));
        }
        if sinks.len() >= MAX_OWNED_KINDS {
            return Err(Error::Config(format!(
                "at most {MAX_OWNED_KINDS} kinds of owned connection"
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        sinks.push(OwnedSink {
            kind: kind.to_owned(),
            tx,
            check,
        });
        Ok(rx)
    }

    /// Track one live application-owned connection: the guard keeps the
    /// drain waiting, and `on_close` is how baton closes the connection in
    /// its own protocol if it is still here at the drain deadline (send
    /// your protocol's goodbye — a WebSocket close 1012 — then close; it is
    /// called at most once, from a runtime thread: signal your connection's
    /// task and return). Drop the guard when the connection closes or moved.
    pub fn owned_guard(&self, on_close: impl FnOnce() + Send + 'static) -> OwnedGuard {
        let id = self.inner.closers.add(Box::new(on_close));
        OwnedGuard {
            id,
            closers: Arc::clone(&self.inner.closers),
            _token: Some(self.connection_token()),
        }
    }

    /// [`owned_guard`](Baton::owned_guard) for a connection that a
    /// [`ConnectionToken`](crate::ConnectionToken) held elsewhere already
    /// counts (an upgraded connection whose I/O still carries its serving
    /// layer's token): only the close callback, so the connection is not
    /// counted twice at the drain deadline.
    pub fn owned_close_callback(&self, on_close: impl FnOnce() + Send + 'static) -> OwnedGuard {
        let id = self.inner.closers.add(Box::new(on_close));
        OwnedGuard {
            id,
            closers: Arc::clone(&self.inner.closers),
            _token: None,
        }
    }

    /// Whether a promoted successor takes owned connections of `kind` right
    /// now: if so, stop at the connection's next message boundary and
    /// [`hand_over_owned`](Baton::hand_over_owned) it.
    pub fn takes_owned(&self, kind: &str) -> bool {
        self.inner.life.phase() == Phase::Handover
            && lock(&self.inner.owned_out)
                .as_ref()
                .is_some_and(|o| o.kinds.iter().any(|k| k == kind))
    }

    /// Hand an application-owned connection to the promoted successor.
    /// `Ok` means it is no longer this generation's (moved, or lost with a
    /// successor that died — counted either way); `Err` gives it back,
    /// untouched, to serve here: no successor takes this kind, it refused
    /// the batch, or a bound is exceeded (unread bytes over 16 KiB, state
    /// over 4 KiB).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future may close the connection.
    pub async fn hand_over_owned(&self, conn: OwnedConn) -> Result<(), OwnedConn> {
        if conn.unread.len() > MAX_CONN_PREFIX
            || conn.state.len() > MAX_OWNED_STATE
            || conn.listener.is_empty()
            || conn.listener.len() > MAX_NAME
            || check_kind(&conn.kind).is_err()
        {
            return Err(conn);
        }
        let out = lock(&self.inner.owned_out).clone();
        let Some(out) = out.filter(|o| o.kinds.contains(&conn.kind)) else {
            return Err(conn);
        };
        let (rtx, rrx) = oneshot::channel();
        if let Err(mpsc::error::SendError((c, _))) = out.tx.send((conn, rtx)).await {
            return Err(c);
        }
        rrx.await.unwrap_or(Ok(()))
    }
}

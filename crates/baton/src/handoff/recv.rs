//! The new generation's side of a handoff (mirror: `send.rs`).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::channel::Channel;
use crate::error::Error;
use crate::handoff::HandoffConn;
use crate::handoff::owned::OwnedSink;
use crate::handoff::take::Taker;
use crate::protocol::{
    Accepts, BlobData, GiveBack, Hello, ListenerMeta, Msg, PROTOCOL_REVISION, REVISION_BLOB,
    ReadyInfo,
};
use baton_sys as sys;

/// How long the new side waits for the old side's first messages.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The new side of the handoff channel.
#[derive(Debug)]
pub(crate) struct NewSide {
    chan: Arc<Channel>,
    /// The old generation's hello.
    pub(crate) peer: Hello,
    /// The old generation's protocol revision, from its state (1 until
    /// then: the first release announces none).
    peer_revision: AtomicU8,
}

/// What the old side tells a promoted new side later.
#[derive(Debug)]
pub(crate) enum PeerEvent {
    /// The observation window / canary passed: take over the pid file.
    Commit,
    /// It failed: stop gracefully.
    Demote(String),
    /// The old side finished the upgrade.
    Done(crate::protocol::DoneReport),
    /// The window failed: give the connections back over this channel,
    /// then stop.
    GiveBack(GiveBack, Arc<Channel>),
}

/// How waiting for `Promote` ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Promotion {
    /// Promoted: serve. `provisional`: keep off the pid file until `Commit`.
    Promoted {
        /// Observation window or canary in progress.
        provisional: bool,
    },
    /// The old generation vanished before promoting us: we serve anyway
    /// (nobody else holds the listeners).
    PredecessorGone,
}

impl NewSide {
    /// Exchange hellos and receive the listeners.
    pub(crate) async fn connect(
        fd: OwnedFd,
        me: impl FnOnce(&Hello) -> Hello,
    ) -> Result<(NewSide, Vec<(ListenerMeta, OwnedFd)>), Error> {
        let chan = Arc::new(Channel::new(fd)?);
        let first = tokio::time::timeout(HELLO_TIMEOUT, chan.recv())
            .await
            .map_err(|_| {
                Error::Protocol("the previous generation sent no Hello within 10 s".into())
            })??;
        crate::trace::step("new: Hello received");
        let peer = match first {
            Some((Msg::Hello(h), _)) => h,
            Some((other, _)) => {
                return Err(Error::Protocol(format!(
                    "expected Hello, got {}",
                    other.name()
                )));
            }
            None => {
                return Err(Error::PeerGone(
                    "the previous generation closed the handoff channel before Hello".into(),
                ));
            }
        };
        chan.send(&Msg::Hello(me(&peer)), &[]).await?;
        crate::trace::step("new: Hello sent");
        let listeners = match tokio::time::timeout(HELLO_TIMEOUT, chan.recv())
            .await
            .map_err(|_| {
                Error::Protocol("the previous generation sent no Listeners within 10 s".into())
            })?? {
            Some((Msg::Listeners(metas), fds)) => {
                crate::trace::step("new: Listeners received");
                metas.into_iter().zip(fds).collect()
            }
            Some((other, _)) => {
                return Err(Error::Protocol(format!(
                    "expected Listeners, got {}",
                    other.name()
                )));
            }
            None => {
                return Err(Error::PeerGone(
                    "the previous generation closed the handoff channel before Listeners".into(),
                ));
            }
        };
        let side = NewSide {
            chan,
            peer,
            peer_revision: AtomicU8::new(1),
        };
        Ok((side, listeners))
    }

    /// Ask for the state and read it (memfds checked against `limit`).
    pub(crate) async fn want_state(&self, limit: u64) -> Result<Vec<(String, Vec<u8>)>, Error> {
        self.chan.send(&Msg::WantState, &[]).await?;
        crate::trace::step("new: WantState sent");
        let (metas, fds) = match self.chan.recv().await? {
            Some((Msg::State(m), fds)) => (m, fds),
            Some((other, _)) => {
                return Err(Error::Protocol(format!(
                    "expected State, got {}",
                    other.name()
                )));
            }
            None => {
                return Err(Error::PeerGone(
                    "the previous generation went away before sending state".into(),
                ));
            }
        };
        crate::trace::step("new: State received");
        let mut fds = fds.into_iter();
        let mut out = Vec::with_capacity(metas.len());
        let mut total: u64 = 0;
        for m in metas {
            if m.name == REVISION_BLOB {
                // Not the application's: the old side's revision.
                if let BlobData::Inline(b) = &m.data
                    && let Some(&r) = b.first()
                {
                    self.peer_revision.store(r, Ordering::Relaxed);
                }
                continue;
            }
            let bytes = match m.data {
                BlobData::Inline(b) => b,
                BlobData::Memfd { len } => {
                    let fd = fds.next().ok_or_else(|| {
                        Error::Protocol("State message is missing a memfd".into())
                    })?;
                    sys::fd::read_sealed_memfd(fd, len, limit.saturating_sub(total))
                        .map_err(|e| Error::State(format!("state '{}': {e}", m.name)))?
                }
            };
            total += bytes.len() as u64;
            if total > limit {
                return Err(Error::State(format!(
                    "state of {total} bytes exceeds the {limit}-byte limit (Config::state_limit)"
                )));
            }
            out.push((m.name, bytes));
        }
        Ok(out)
    }

    /// The old generation's protocol revision, as far as it said.
    pub(crate) fn peer_revision(&self) -> u8 {
        self.peer_revision.load(Ordering::Relaxed)
    }

    /// Say what we take (`Accepts`, only to a peer of revision ≥ 2), then
    /// `Ready`, and wait for `Promote`.
    pub(crate) async fn ready(
        &self,
        info: ReadyInfo,
        accepts: Accepts,
        limit: Duration,
        sent: impl FnOnce(),
    ) -> Result<Promotion, Error> {
        if self.peer_revision() >= 2 && PROTOCOL_REVISION >= 2 {
            self.chan.send(&Msg::Accepts(accepts), &[]).await?;
        }
        self.chan
            .send(&Msg::Ready(info), &[])
            .await
            .or_else(|e| match e {
                Error::PeerGone(_) => Ok(()),
                e => Err(e),
            })?;
        sent();
        crate::trace::step("new: Ready sent");
        let got = tokio::time::timeout(limit, self.chan.recv()).await;
        crate::trace::step("new: Promote received");
        match got {
            Err(_) => Err(Error::Protocol(format!(
                "the previous generation did not promote us within {limit:?}"
            ))),
            Ok(Ok(Some((Msg::Promote, _)))) => Ok(Promotion::Promoted { provisional: false }),
            Ok(Ok(Some((Msg::PromoteProvisional { .. }, _)))) => {
                Ok(Promotion::Promoted { provisional: true })
            }
            Ok(Ok(Some((other, _)))) => Err(Error::Protocol(format!(
                "expected Promote, got {}",
                other.name()
            ))),
            Ok(Ok(None)) => Ok(Promotion::PredecessorGone),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Tell the old side we accept now.
    pub(crate) async fn confirm_serving(&self) {
        if let Err(e) = self.chan.send(&Msg::Serving, &[]).await {
            tracing::debug!(error = %e, "could not confirm serving to the previous generation");
        }
    }

    /// Report a start-up failure; the old side rolls back.
    pub(crate) async fn fail(&self, reason: &str) {
        let reason: String = reason.chars().take(4000).collect();
        let _ = self.chan.send(&Msg::Failed { reason }, &[]).await;
    }

    /// After promotion: receive handed-over connections until the old side
    /// exits (or asks for them back: `GiveBack`). Each batch is
    /// acknowledged once its fds are ours, before any is touched.
    pub(crate) async fn receive_connections(
        self,
        deliver: Option<mpsc::UnboundedSender<HandoffConn>>,
        owned: Vec<OwnedSink>,
        (received, prefix_bytes): (Arc<AtomicU64>, Arc<AtomicU64>),
        activity: Arc<crate::lifecycle::Activity>,
        events: mpsc::UnboundedSender<PeerEvent>,
    ) {
        let mut taker = Taker::default();
        loop {
            let (msg, fds, truncated) = match self.chan.recv_detail().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    tracing::debug!(
                        pid = self.peer.pid,
                        "previous generation closed the handoff channel"
                    );
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "handoff channel error after promotion; no more connections will be taken");
                    return;
                }
            };
            let msg = match taker.take(msg, fds, truncated, deliver.is_some(), &owned) {
                Ok((batch, Ok(taken))) => {
                    if self.chan.send(&Msg::ConnsAck { batch }, &[]).await.is_err() {
                        // The old side is gone; these connections are ours
                        // now anyway (its copies closed with it): serve them.
                        tracing::warn!(
                            "could not acknowledge a connection batch; serving it anyway"
                        );
                    }
                    received.fetch_add(taken.len(), Ordering::Relaxed);
                    prefix_bytes.fetch_add(taken.prefix_bytes(), Ordering::Relaxed);
                    tracing::debug!(batch, connections = taken.len(), "received connections");
                    taken.deliver(deliver.as_ref());
                    continue;
                }
                Ok((batch, Err(reason))) => {
                    // Refused whole: the old side keeps every connection of
                    // it, so none is served twice. Our copies close on drop.
                    tracing::warn!(batch, %reason, "refusing a connection batch; the previous generation keeps it");
                    let _ = self.chan.send(&Msg::ConnsNack { batch, reason }, &[]).await;
                    continue;
                }
                Err(msg) => msg,
            };
            match msg {
                Msg::Commit => {
                    let _ = events.send(PeerEvent::Commit);
                }
                Msg::Demote { reason } => {
                    let _ = events.send(PeerEvent::Demote(reason));
                }
                Msg::GiveBack(g) => {
                    // The channel is the give-back's now (it reads the
                    // acknowledgements): stop reading it here.
                    let _ = events.send(PeerEvent::GiveBack(g, Arc::clone(&self.chan)));
                    return;
                }
                Msg::Done(report) => {
                    let _ = events.send(PeerEvent::Done(report));
                }
                Msg::StatsRequest => {
                    let stats = Msg::Stats {
                        requests: activity.responses.load(Ordering::Relaxed),
                        errors: activity.errors.load(Ordering::Relaxed),
                    };
                    if self.chan.send(&stats, &[]).await.is_err() {
                        return;
                    }
                }
                other => {
                    tracing::error!(msg = other.name(), "unexpected message after promotion");
                    return;
                }
            }
        }
    }
}

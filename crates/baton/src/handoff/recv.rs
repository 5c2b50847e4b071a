//! The new generation's side of a handoff (mirror: `send.rs`).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::channel::Channel;
use crate::error::Error;
use crate::handoff::HandoffConn;
use crate::handoff::owned::{OwnedConn, OwnedSink};
use crate::listeners::Stream;
use crate::protocol::{
    Accepts, BlobData, Hello, ListenerMeta, Msg, OwnedMeta, PROTOCOL_REVISION, REVISION_BLOB,
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
        let listeners = match tokio::time::timeout(HELLO_TIMEOUT, chan.recv())
            .await
            .map_err(|_| {
                Error::Protocol("the previous generation sent no Listeners within 10 s".into())
            })?? {
            Some((Msg::Listeners(metas), fds)) => metas.into_iter().zip(fds).collect(),
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
        match tokio::time::timeout(limit, self.chan.recv()).await {
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
    /// exits. Each batch is acknowledged once its fds are ours.
    pub(crate) async fn receive_connections(
        self,
        deliver: Option<mpsc::UnboundedSender<HandoffConn>>,
        owned: Vec<OwnedSink>,
        (received, prefix_bytes): (Arc<AtomicU64>, Arc<AtomicU64>),
        activity: Arc<crate::lifecycle::Activity>,
        events: mpsc::UnboundedSender<PeerEvent>,
    ) {
        let mut kinds: Vec<(String, baton_sys::socket::SocketKind)> = Vec::new();
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
            let (batch, conns) = match msg {
                Msg::Conns { batch, conns } => (batch, conns),
                Msg::Owned { batch, conns } => {
                    let reply = if truncated {
                        tracing::error!(
                            batch,
                            arrived = fds.len(),
                            wanted = conns.len(),
                            "owned connection batch truncated by the kernel (fd limit); refusing it"
                        );
                        Err("fd limit reached in the new generation (MSG_CTRUNC)".to_owned())
                    } else {
                        take_owned(&owned, conns, fds, &mut kinds)
                    };
                    match reply {
                        Ok(ready) => {
                            let n = ready.len() as u64;
                            if self.chan.send(&Msg::ConnsAck { batch }, &[]).await.is_err() {
                                tracing::warn!(
                                    "could not acknowledge an owned batch; serving it anyway"
                                );
                            }
                            received.fetch_add(n, Ordering::Relaxed);
                            for (sink, c) in ready {
                                if sink.tx.send(c).is_err() {
                                    tracing::warn!(kind = %sink.kind, "owned connection receiver dropped; closing a handed-over connection");
                                }
                            }
                            tracing::debug!(batch, connections = n, "received owned connections");
                        }
                        Err(reason) => {
                            tracing::warn!(batch, %reason, "refusing an owned connection batch; the previous generation keeps it");
                            let _ = self.chan.send(&Msg::ConnsNack { batch, reason }, &[]).await;
                        }
                    }
                    continue;
                }
                Msg::Commit => {
                    let _ = events.send(PeerEvent::Commit);
                    continue;
                }
                Msg::Demote { reason } => {
                    let _ = events.send(PeerEvent::Demote(reason));
                    continue;
                }
                Msg::Done(report) => {
                    let _ = events.send(PeerEvent::Done(report));
                    continue;
                }
                Msg::StatsRequest => {
                    let stats = Msg::Stats {
                        requests: activity.responses.load(Ordering::Relaxed),
                        errors: activity.errors.load(Ordering::Relaxed),
                    };
                    if self.chan.send(&stats, &[]).await.is_err() {
                        return;
                    }
                    continue;
                }
                other => {
                    tracing::error!(msg = other.name(), "unexpected message after promotion");
                    return;
                }
            };
            if truncated {
                // The kernel could not install every fd (our RLIMIT_NOFILE):
                // refuse the whole batch so the old side keeps serving it.
                tracing::error!(
                    batch,
                    arrived = fds.len(),
                    wanted = conns.len(),
                    "connection batch truncated by the kernel (fd limit); refusing it"
                );
                drop(fds);
                let _ = self
                    .chan
                    .send(
                        &Msg::ConnsNack {
                            batch,
                            reason: "fd limit reached in the new generation (MSG_CTRUNC)".into(),
                        },
                        &[],
                    )
                    .await;
                continue;
            }
            let Some(deliver) = deliver.as_ref() else {
                let _ = self
                    .chan
                    .send(
                        &Msg::ConnsNack {
                            batch,
                            reason: "this generation does not take connections".into(),
                        },
                        &[],
                    )
                    .await;
                continue;
            };
            let mut ready = Vec::with_capacity(conns.len());
            let mut bad = None;
            for (meta, fd) in conns.into_iter().zip(fds) {
                // The kind of a listener's connections never changes: check
                // it once per listener, not once per connection.
                let kind = match kinds.iter().find(|(n, _)| *n == meta.listener) {
                    Some((_, k)) => Ok(*k),
                    None => baton_sys::socket::socket_family_kind(std::os::fd::AsFd::as_fd(&fd))
                        .inspect(|k| {
                            kinds.push((meta.listener.clone(), *k));
                        }),
                };
                match kind.and_then(|k| Stream::from_handed_fd(fd, k)) {
                    Ok(stream) => ready.push(HandoffConn {
                        stream,
                        prefix: meta.prefix,
                        listener: meta.listener,
                    }),
                    Err(e) => {
                        bad = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(reason) = bad {
                // Refuse the whole batch: the old side keeps every connection
                // of it, so none is served twice. Our copies close on drop.
                drop(ready);
                let _ = self.chan.send(&Msg::ConnsNack { batch, reason }, &[]).await;
                continue;
            }
            let n = ready.len() as u64;
            let bytes: u64 = ready.iter().map(|c| c.prefix.len() as u64).sum();
            if self.chan.send(&Msg::ConnsAck { batch }, &[]).await.is_err() {
                // The old side is gone; these connections are ours now anyway
                // (its copies closed with it), so serve them.
                tracing::warn!("could not acknowledge a connection batch; serving it anyway");
            }
            received.fetch_add(n, Ordering::Relaxed);
            prefix_bytes.fetch_add(bytes, Ordering::Relaxed);
            tracing::debug!(
                batch,
                connections = n,
                prefix_bytes = bytes,
                "received idle connections"
            );
            for c in ready {
                if deliver.send(c).is_err() {
                    tracing::warn!("connection receiver dropped; closing a handed-over connection");
                }
            }
        }
    }
}

/// Check and wrap one `Owned` batch: every connection's kind must have a
/// receiver here and pass its check, else the whole batch is refused (the
/// old side keeps every connection of it, so none is served twice).
fn take_owned(
    sinks: &[OwnedSink],
    metas: Vec<OwnedMeta>,
    fds: Vec<OwnedFd>,
    kinds: &mut Vec<(String, baton_sys::socket::SocketKind)>,
) -> Result<Vec<(OwnedSink, OwnedConn)>, String> {
    let mut ready = Vec::with_capacity(metas.len());
    for (meta, fd) in metas.into_iter().zip(fds) {
        let Some(sink) = sinks.iter().find(|s| s.kind == meta.kind) else {
            return Err(format!(
                "this generation takes no owned connections of kind '{}'",
                meta.kind
            ));
        };
        let kind = match kinds.iter().find(|(n, _)| *n == meta.listener) {
            Some((_, k)) => Ok(*k),
            None => baton_sys::socket::socket_family_kind(std::os::fd::AsFd::as_fd(&fd))
                .inspect(|k| kinds.push((meta.listener.clone(), *k))),
        };
        let stream = kind
            .and_then(|k| Stream::from_handed_fd(fd, k))
            .map_err(|e| e.to_string())?;
        let conn = OwnedConn {
            kind: meta.kind,
            stream,
            unread: meta.unread,
            state: meta.state,
            listener: meta.listener,
        };
        if let Some(check) = &sink.check {
            check(&conn).map_err(|why| {
                format!("a connection of kind '{}' was refused: {why}", conn.kind)
            })?;
        }
        ready.push((sink.clone(), conn));
    }
    Ok(ready)
}

//! The old generation's side of a handoff (mirror: `recv.rs`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::channel::Channel;
use crate::error::Error;
use crate::handoff::owned::OwnedConn;
use crate::handoff::{HandoffConn, INLINE_STATE_BUDGET};
use crate::protocol::{
    Accepts, BlobData, BlobMeta, ConnMeta, Hello, ListenerMeta, MAX_CONN_PREFIX, MAX_FRAME,
    MAX_INLINE_BLOB, Msg, OwnedMeta, PROTOCOL_REVISION, PROTOCOL_VERSION, REVISION_BLOB, ReadyInfo,
};
use baton_sys as sys;
use baton_sys::fd::SCM_MAX_FD;

/// Produces the state blobs when the new side asks for them.
pub(crate) trait StateSource: Send + Sync {
    /// Snapshot every registered exporter: `(name, bytes)`.
    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, Error>;
    /// Called when the new side asks for state, before the snapshot (the
    /// exact mode quiesces here).
    fn before_snapshot(&self) -> impl std::future::Future<Output = Result<(), Error>> + Send;
}

/// What happened during the handshake, for the report.
#[derive(Debug, Default)]
pub(crate) struct HandshakeLog {
    pub(crate) state_bytes: u64,
    pub(crate) state_snapshot: Option<std::time::Duration>,
}

/// The old side of one handoff channel.
#[derive(Debug)]
pub(crate) struct OldSide {
    chan: Arc<Channel>,
    /// The new side's hello, once received.
    pub(crate) peer: Option<Hello>,
    /// What the new side takes (`Accepts`; empty from a revision-1 peer).
    pub(crate) accepts: Accepts,
    /// The new side sent `Accepts`: it speaks revision 2 (it can give its
    /// connections back after a failed window, `GiveBack`).
    pub(crate) peer_accepts: bool,
}

/// A connection batch in flight: sent, not yet acknowledged.
#[derive(Debug)]
pub(crate) struct SentBatch<R> {
    pub(crate) id: u32,
    /// The old side's copies and who to tell; kept open until the ack.
    pub(crate) items: Vec<(HandoffConn, R)>,
}

/// An owned-connection batch in flight (see [`SentBatch`]).
#[derive(Debug)]
pub(crate) struct SentOwned<R> {
    pub(crate) id: u32,
    pub(crate) items: Vec<(OwnedConn, R)>,
}

impl OldSide {
    pub(crate) fn new(chan: Channel) -> Self {
        OldSide {
            chan: Arc::new(chan),
            peer: None,
            accepts: Accepts::default(),
            peer_accepts: false,
        }
    }

    /// The sending role on a channel that exists already: a rolled-back
    /// generation giving its connections back to its predecessor, which
    /// takes what `accepts` says.
    pub(crate) fn over(chan: Arc<Channel>, accepts: Accepts) -> Self {
        OldSide {
            chan,
            peer: None,
            accepts,
            peer_accepts: true,
        }
    }

    /// The window failed: ask the new side for its connections back.
    pub(crate) async fn give_back(&self, g: crate::protocol::GiveBack) -> Result<(), Error> {
        self.chan.send(&Msg::GiveBack(g), &[]).await
    }

    /// The next message with its fds, and whether the kernel truncated them
    /// (connections given back).
    pub(crate) async fn recv_detail(&self) -> Result<Option<(Msg, Vec<OwnedFd>, bool)>, Error> {
        self.chan.recv_detail().await
    }

    /// Acknowledge (or refuse) a batch given back.
    pub(crate) async fn answer_batch(
        &self,
        batch: u32,
        res: Result<(), String>,
    ) -> Result<(), Error> {
        let msg = match res {
            Ok(()) => Msg::ConnsAck { batch },
            Err(reason) => Msg::ConnsNack { batch, reason },
        };
        self.chan.send(&msg, &[]).await
    }

    /// Hello both ways, the listeners, state on request; returns when the
    /// new side says `Ready`. `Failed` and anything out of order are errors.
    /// ([`announce`](Self::announce), then [`await_ready`](Self::await_ready).)
    #[cfg(test)]
    pub(crate) async fn handshake(
        &mut self,
        me: Hello,
        listeners: &[(ListenerMeta, Arc<OwnedFd>)],
        state: &impl StateSource,
        log: &mut HandshakeLog,
    ) -> Result<ReadyInfo, Error> {
        self.announce(me, listeners).await?;
        self.await_ready(state, log).await
    }

    /// Our `Hello` and the listeners, without waiting for the new side's
    /// `Hello`: sent before the new generation is even started, they wait
    /// in the channel, so that it finds them at its first read instead of
    /// waiting a round trip for them (the new side reads `Hello`, answers
    /// with its own, then reads `Listeners`, in this order, as ever). This
    /// side keeps its own copies of the listeners: if the new generation
    /// never starts or fails, the copies in flight are closed with the
    /// channel and nothing else changes.
    pub(crate) async fn announce(
        &mut self,
        me: Hello,
        listeners: &[(ListenerMeta, Arc<OwnedFd>)],
    ) -> Result<(), Error> {
        self.chan.send(&Msg::Hello(me), &[]).await?;
        let metas: Vec<ListenerMeta> = listeners.iter().map(|(m, _)| m.clone()).collect();
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        self.chan.send(&Msg::Listeners(metas), &fds).await?;
        crate::trace::step("old: Hello and Listeners sent");
        Ok(())
    }

    /// After [`announce`](Self::announce): the new side's `Hello`, state on
    /// request; returns when it says `Ready`.
    pub(crate) async fn await_ready(
        &mut self,
        state: &impl StateSource,
        log: &mut HandshakeLog,
    ) -> Result<ReadyInfo, Error> {
        match self.recv_expect("Hello").await? {
            (Msg::Hello(h), _) => {
                crate::trace::step("old: Hello received");
                tracing::debug!(pid = h.pid, version = %h.app_version, "new generation said hello");
                self.peer = Some(h);
            }
            (other, _) => return Err(unexpected("Hello", &other)),
        }
        let mut state_sent = false;
        loop {
            match self.recv_expect("Ready").await? {
                (Msg::WantState, _) if !state_sent => {
                    crate::trace::step("old: WantState received");
                    state.before_snapshot().await?;
                    let t = std::time::Instant::now();
                    let blobs = state.snapshot()?;
                    log.state_snapshot = Some(t.elapsed());
                    log.state_bytes = blobs.iter().map(|(_, b)| b.len() as u64).sum();
                    self.send_state(blobs).await?;
                    crate::trace::step("old: State sent");
                    state_sent = true;
                }
                (Msg::Accepts(a), _) => {
                    tracing::debug!(kinds = ?a.owned_kinds, "the new generation takes owned connections");
                    self.accepts = a;
                    self.peer_accepts = true;
                }
                (Msg::Ready(info), _) => return Ok(info),
                (Msg::Failed { reason }, _) => {
                    return Err(Error::NewGenerationFailed { reason });
                }
                (other, _) => return Err(unexpected("Ready, Failed or WantState", &other)),
            }
        }
    }

    async fn send_state(&self, mut blobs: Vec<(String, Vec<u8>)>) -> Result<(), Error> {
        // Our revision, for a new side that can use it (see `protocol`).
        blobs.push((REVISION_BLOB.to_owned(), vec![PROTOCOL_REVISION]));
        let total: usize = blobs.iter().map(|(_, b)| b.len()).sum();
        let mut metas = Vec::with_capacity(blobs.len());
        let mut memfds: Vec<OwnedFd> = Vec::new();
        for (name, bytes) in blobs {
            if total <= INLINE_STATE_BUDGET && bytes.len() <= MAX_INLINE_BLOB {
                metas.push(BlobMeta {
                    name,
                    data: BlobData::Inline(bytes),
                });
            } else {
                let fd = sys::fd::sealed_memfd(&format!("baton-state-{name}"), &bytes)
                    .map_err(|e| Error::io("writing state to a memfd", e))?;
                metas.push(BlobMeta {
                    name,
                    data: BlobData::Memfd {
                        len: bytes.len() as u64,
                    },
                });
                memfds.push(fd);
            }
        }
        tracing::info!(
            bytes = total,
            blobs = metas.len(),
            in_memfds = memfds.len(),
            "sending state ({})",
            if memfds.is_empty() {
                "inline"
            } else {
                "sealed memfds"
            }
        );
        let fds: Vec<BorrowedFd<'_>> = memfds.iter().map(AsFd::as_fd).collect();
        self.chan.send(&Msg::State(metas), &fds).await
    }

    /// The commit point.
    pub(crate) async fn promote(&self) -> Result<(), Error> {
        self.chan.send(&Msg::Promote, &[]).await
    }

    /// Provisional promotion (observation window, canary).
    pub(crate) async fn promote_provisional(&self, canary: bool) -> Result<(), Error> {
        self.chan
            .send(&Msg::PromoteProvisional { canary }, &[])
            .await
    }

    /// The window passed.
    pub(crate) async fn commit(&self) -> Result<(), Error> {
        self.chan.send(&Msg::Commit, &[]).await
    }

    /// The window failed: the new side stops gracefully.
    pub(crate) async fn demote(&self, reason: &str) -> Result<(), Error> {
        let reason: String = reason.chars().take(4000).collect();
        self.chan.send(&Msg::Demote { reason }, &[]).await
    }

    /// The upgrade is complete (sent just before this process exits).
    pub(crate) async fn done(&self, report: crate::protocol::DoneReport) -> Result<(), Error> {
        self.chan.send(&Msg::Done(report), &[]).await
    }

    /// Ask for response counts (canary).
    pub(crate) async fn request_stats(&self) -> Result<(), Error> {
        self.chan.send(&Msg::StatsRequest, &[]).await
    }

    /// Send a batch of connections. The caller keeps `items` (and so the old
    /// side's copies) until the acknowledgement.
    pub(crate) async fn send_batch<R>(
        &self,
        id: u32,
        items: Vec<(HandoffConn, R)>,
    ) -> Result<SentBatch<R>, (Error, Vec<(HandoffConn, R)>)> {
        // Take the fds out of tokio for sending; they are re-wrapped if the
        // batch comes back.
        let mut metas = Vec::with_capacity(items.len());
        let mut owned: Vec<(OwnedFd, Vec<u8>, String, R)> = Vec::with_capacity(items.len());
        let mut failed = Vec::new();
        for (c, r) in items {
            let HandoffConn {
                stream,
                prefix,
                listener,
            } = c;
            match stream.into_owned_fd() {
                Ok(fd) => {
                    metas.push(ConnMeta {
                        listener: listener.clone(),
                        prefix: prefix.clone(),
                    });
                    owned.push((fd, prefix, listener, r));
                }
                Err(e) => {
                    // Deregistering failed: the socket is unusable here; it is
                    // dropped (closed) and counted by the caller as closed.
                    tracing::warn!(error = %e, "could not detach a connection for handoff");
                    failed.push(r);
                }
            }
        }
        drop(failed);
        let fds: Vec<BorrowedFd<'_>> = owned.iter().map(|(fd, ..)| fd.as_fd()).collect();
        let res = if metas.is_empty() {
            Ok(())
        } else {
            self.chan
                .send(
                    &Msg::Conns {
                        batch: id,
                        conns: metas,
                    },
                    &fds,
                )
                .await
        };
        drop(fds);
        let rewrap = |owned: Vec<(OwnedFd, Vec<u8>, String, R)>| -> Vec<(HandoffConn, R)> {
            owned
                .into_iter()
                .filter_map(|(fd, prefix, listener, r)| {
                    match crate::listeners::Stream::from_owned_fd(fd) {
                        Ok(stream) => Some((
                            HandoffConn {
                                stream,
                                prefix,
                                listener,
                            },
                            r,
                        )),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not re-register a connection");
                            None
                        }
                    }
                })
                .collect()
        };
        match res {
            Ok(()) => Ok(SentBatch {
                id,
                items: rewrap(owned),
            }),
            Err(e) => Err((e, rewrap(owned))),
        }
    }

    /// Send a batch of application-owned connections; as
    /// [`send_batch`](Self::send_batch), acknowledged the same way.
    pub(crate) async fn send_owned_batch<R>(
        &self,
        id: u32,
        items: Vec<(OwnedConn, R)>,
    ) -> Result<SentOwned<R>, (Error, Vec<(OwnedConn, R)>)> {
        let mut metas = Vec::with_capacity(items.len());
        let mut owned: Vec<(OwnedFd, OwnedMeta, R)> = Vec::with_capacity(items.len());
        for (c, r) in items {
            let OwnedConn {
                kind,
                stream,
                unread,
                state,
                listener,
            } = c;
            match stream.into_owned_fd() {
                Ok(fd) => {
                    let meta = OwnedMeta {
                        kind,
                        listener,
                        unread,
                        state,
                    };
                    metas.push(meta.clone());
                    owned.push((fd, meta, r));
                }
                Err(e) => {
                    // As in send_batch: unusable here, closed and counted.
                    tracing::warn!(error = %e, "could not detach an owned connection for handoff");
                }
            }
        }
        let fds: Vec<BorrowedFd<'_>> = owned.iter().map(|(fd, ..)| fd.as_fd()).collect();
        let res = if metas.is_empty() {
            Ok(())
        } else {
            let mut msg = Msg::Owned {
                batch: id,
                conns: metas,
            };
            let res = self.chan.send(&msg, &fds).await;
            // The message's copies of the state blobs (they may hold TLS
            // keys); ours stay until the batch is settled.
            if let Msg::Owned { conns, .. } = &mut msg {
                for c in conns {
                    zeroize::Zeroize::zeroize(&mut c.state);
                }
            }
            res
        };
        drop(fds);
        let rewrap = |owned: Vec<(OwnedFd, OwnedMeta, R)>| -> Vec<(OwnedConn, R)> {
            owned
                .into_iter()
                .filter_map(
                    |(fd, m, r)| match crate::listeners::Stream::from_owned_fd(fd) {
                        Ok(stream) => Some((
                            OwnedConn {
                                kind: m.kind,
                                stream,
                                unread: m.unread,
                                state: m.state,
                                listener: m.listener,
                            },
                            r,
                        )),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not re-register an owned connection");
                            None
                        }
                    },
                )
                .collect()
        };
        match res {
            Ok(()) => Ok(SentOwned {
                id,
                items: rewrap(owned),
            }),
            Err(e) => Err((e, rewrap(owned))),
        }
    }

    /// Next message from the new side (acks); `None` at EOF.
    pub(crate) async fn recv(&self) -> Result<Option<Msg>, Error> {
        Ok(self.chan.recv().await?.map(|(m, _fds)| m))
    }

    /// After the new side died or went silent: which batches were
    /// acknowledged (acks may still be queued)? The new side acknowledges
    /// *before* it touches a connection, so an unacknowledged batch was never
    /// used over there and the old side can safely serve it again.
    pub(crate) fn queued_acks(&self) -> Vec<u32> {
        let mut acked = Vec::new();
        while let Ok(Some(m)) = self.chan.try_recv_now() {
            if let Msg::ConnsAck { batch } = m {
                acked.push(batch);
            }
        }
        acked
    }

    async fn recv_expect(&self, what: &str) -> Result<(Msg, Vec<OwnedFd>), Error> {
        self.chan.recv().await?.ok_or_else(|| {
            Error::PeerGone(format!(
                "the new generation closed the handoff channel while we waited for {what} (it exited or crashed)"
            ))
        })
    }
}

fn unexpected(wanted: &str, got: &Msg) -> Error {
    Error::Protocol(format!("expected {wanted}, got {}", got.name()))
}

/// Our hello.
pub(crate) fn hello(app_version: &str, generation: u64) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        app_version: app_version.chars().take(200).collect(),
        generation,
        pid: sys::process::getpid(),
    }
}

/// Whether one more connection with `prefix_len` bytes fits a batch that
/// already has `count` entries and `bytes` of prefixes.
pub(crate) fn fits_batch(
    count: usize,
    bytes: usize,
    listener_len: usize,
    prefix_len: usize,
) -> bool {
    // Per entry: the prefix, the listener name, and a few bytes of varints.
    let entry = prefix_len + listener_len + 8;
    count < SCM_MAX_FD && bytes + entry + 64 < MAX_FRAME && prefix_len <= MAX_CONN_PREFIX
}

/// Whether one more owned connection fits a batch that already has `count`
/// entries and `bytes` of payload: `entry` is its unread bytes, state,
/// kind and listener name.
pub(crate) fn fits_owned_batch(count: usize, bytes: usize, entry: usize) -> bool {
    count < SCM_MAX_FD && bytes + entry + 16 + 64 < MAX_FRAME
}

/// The payload of one owned connection in a batch, for [`fits_owned_batch`].
pub(crate) fn owned_entry_len(c: &OwnedConn) -> usize {
    c.unread.len() + c.state.len() + c.kind.len() + c.listener.len() + 16
}

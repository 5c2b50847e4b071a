//! Taking a batch of connections that arrived on the handoff channel —
//! idle HTTP ones (`Conns`) or application-owned ones (`Owned`) — on
//! whichever side receives it: the new generation during a drain, the old
//! one when a rolled-back generation gives its connections back.
//!
//! A batch is taken whole or refused whole (the sender keeps every
//! connection of a refused batch, so none is served twice), and the
//! receiver acknowledges it *before* it touches a connection.

use std::os::fd::{AsFd, OwnedFd};

use tokio::sync::mpsc;

use crate::handoff::HandoffConn;
use crate::handoff::owned::{OwnedConn, OwnedSink};
use crate::listeners::Stream;
use crate::protocol::{ConnMeta, Msg, OwnedMeta};
use baton_sys::socket::SocketKind;

/// Connections of a batch that was taken, ready to deliver.
#[derive(Debug)]
pub(crate) enum Taken {
    Conns(Vec<HandoffConn>),
    Owned(Vec<(OwnedSink, OwnedConn)>),
}

impl Taken {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Taken::Conns(c) => c.len() as u64,
            Taken::Owned(c) => c.len() as u64,
        }
    }

    /// Bytes of HTTP prefixes carried (for the counters).
    pub(crate) fn prefix_bytes(&self) -> u64 {
        match self {
            Taken::Conns(c) => c.iter().map(|c| c.prefix.len() as u64).sum(),
            Taken::Owned(_) => 0,
        }
    }

    /// Hand each connection to whoever serves it here.
    pub(crate) fn deliver(self, http: Option<&mpsc::UnboundedSender<HandoffConn>>) {
        match self {
            Taken::Conns(conns) => {
                for c in conns {
                    if http.is_none_or(|tx| tx.send(c).is_err()) {
                        tracing::warn!(
                            "connection receiver dropped; closing a handed-over connection"
                        );
                    }
                }
            }
            Taken::Owned(conns) => {
                for (sink, c) in conns {
                    if sink.tx.send(c).is_err() {
                        tracing::warn!(kind = %sink.kind, "owned connection receiver dropped; closing a handed-over connection");
                    }
                }
            }
        }
    }
}

/// Remembers each listener's socket family: the kind of a listener's
/// connections never changes, so it is asked of the kernel once.
#[derive(Debug, Default)]
pub(crate) struct Taker {
    kinds: Vec<(String, SocketKind)>,
}

impl Taker {
    /// `msg` is a `Conns` or `Owned` batch: its number, and its connections
    /// or the reason to refuse it. `None` for any other message.
    pub(crate) fn take(
        &mut self,
        msg: Msg,
        fds: Vec<OwnedFd>,
        truncated: bool,
        http: bool,
        sinks: &[OwnedSink],
    ) -> Result<(u32, Result<Taken, String>), Msg> {
        let (batch, wanted) = match &msg {
            Msg::Conns { batch, conns } => (*batch, conns.len()),
            Msg::Owned { batch, conns } => (*batch, conns.len()),
            _ => return Err(msg),
        };
        if truncated {
            // The kernel could not install every fd (our RLIMIT_NOFILE).
            tracing::error!(
                batch,
                arrived = fds.len(),
                wanted,
                "connection batch truncated by the kernel (fd limit); refusing it"
            );
            return Ok((
                batch,
                Err("fd limit reached in the receiving generation (MSG_CTRUNC)".into()),
            ));
        }
        let res = match msg {
            Msg::Conns { conns, .. } if http => self.conns(conns, fds).map(Taken::Conns),
            Msg::Conns { .. } => Err("this generation does not take connections".into()),
            Msg::Owned { conns, .. } => self.owned(conns, fds, sinks).map(Taken::Owned),
            _ => Err("not a batch".into()),
        };
        Ok((batch, res))
    }

    fn stream(&mut self, listener: &str, fd: OwnedFd) -> Result<Stream, String> {
        let kind = match self.kinds.iter().find(|(n, _)| n == listener) {
            Some((_, k)) => Ok(*k),
            None => baton_sys::socket::socket_family_kind(fd.as_fd())
                .inspect(|k| self.kinds.push((listener.to_owned(), *k))),
        };
        kind.and_then(|k| Stream::from_handed_fd(fd, k))
            .map_err(|e| e.to_string())
    }

    fn conns(
        &mut self,
        metas: Vec<ConnMeta>,
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<HandoffConn>, String> {
        let mut ready = Vec::with_capacity(metas.len());
        for (meta, fd) in metas.into_iter().zip(fds) {
            ready.push(HandoffConn {
                stream: self.stream(&meta.listener, fd)?,
                prefix: meta.prefix,
                listener: meta.listener,
            });
        }
        Ok(ready)
    }

    /// Every connection's kind must have a receiver here and pass its
    /// check.
    fn owned(
        &mut self,
        metas: Vec<OwnedMeta>,
        fds: Vec<OwnedFd>,
        sinks: &[OwnedSink],
    ) -> Result<Vec<(OwnedSink, OwnedConn)>, String> {
        let mut ready: Vec<(OwnedSink, OwnedConn)> = Vec::with_capacity(metas.len());
        for (meta, fd) in metas.into_iter().zip(fds) {
            let Some(sink) = sinks.iter().find(|s| s.kind == meta.kind) else {
                return Err(format!(
                    "this generation takes no owned connections of kind '{}'",
                    meta.kind
                ));
            };
            let conn = OwnedConn {
                stream: self.stream(&meta.listener, fd)?,
                kind: meta.kind,
                unread: meta.unread,
                state: meta.state,
                listener: meta.listener,
            };
            if let Some(check) = &sink.check
                && let Err(why) = check(&conn)
            {
                // The old side keeps the connection; our copies of the
                // state blobs (they may hold TLS keys) are wiped.
                let mut conn = conn;
                zeroize::Zeroize::zeroize(&mut conn.state);
                for (_, mut c) in ready {
                    zeroize::Zeroize::zeroize(&mut c.state);
                }
                return Err(format!(
                    "a connection of kind '{}' was refused: {why}",
                    conn.kind
                ));
            }
            ready.push((sink.clone(), conn));
        }
        Ok(ready)
    }
}

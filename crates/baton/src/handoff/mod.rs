//! The two roles of a handoff, in two files that mirror each other:
//! `send.rs` is the old generation, `recv.rs` the new one.

pub(crate) mod owned;
pub(crate) mod recv;
pub(crate) mod send;
pub(crate) mod take;

use crate::listeners::Stream;

/// A connection moving between generations: the socket and the bytes
/// already read from it (the start of the next request).
#[derive(Debug)]
pub struct HandoffConn {
    /// The socket.
    pub stream: Stream,
    /// Bytes read but not processed yet; the receiver replays them first.
    pub prefix: Vec<u8>,
    /// Name of the listener it was accepted on.
    pub listener: String,
}

/// How inline state is sent: up to this many bytes in total go in the
/// message, larger state in memfds.
pub(crate) const INLINE_STATE_BUDGET: usize = 96 * 1024;

#[cfg(test)]
mod tests {
    use super::recv::NewSide;
    use super::send::{HandshakeLog, OldSide, StateSource, hello};
    use crate::channel::Channel;
    use crate::error::Error;

    struct NoState;

    impl StateSource for NoState {
        fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
            Ok(Vec::new())
        }

        async fn before_snapshot(&self) -> Result<(), Error> {
            Ok(())
        }
    }

    /// The old side tells a new generation's own `Failed` from every other
    /// handshake error by its variant, not by the text of a message.
    #[tokio::test]
    async fn a_reported_failure_is_a_typed_error_with_the_reason() {
        let (ours, theirs) = baton_sys::fd::seqpacket_pair().unwrap();
        let new = tokio::spawn(async move {
            let (side, _listeners) = NewSide::connect(theirs, |_| hello("new", 2)).await.unwrap();
            side.fail("config file missing").await;
        });
        let mut old = OldSide::new(Channel::new(ours).unwrap());
        let mut log = HandshakeLog::default();
        let res = old
            .handshake(hello("old", 1), &[], &NoState, &mut log)
            .await;
        new.await.unwrap();
        match res {
            Err(Error::NewGenerationFailed { reason }) => assert_eq!(reason, "config file missing"),
            other => panic!("expected NewGenerationFailed, got {other:?}"),
        }
    }

    /// The old side's `Hello` and listeners are in the channel before the new
    /// side exists (the old generation writes them before it starts the new
    /// process): a new side started afterwards gets its listeners while the
    /// old side is not polled at all — no round trip waited for — and the
    /// handshake then completes as ever.
    #[tokio::test]
    async fn the_listeners_wait_in_the_channel_before_the_new_side_starts() {
        use super::recv::Promotion;
        use crate::protocol::{Accepts, ListenerKind, ListenerMeta, ReadyInfo};
        use std::os::fd::OwnedFd;
        use std::sync::Arc;
        use std::time::Duration;

        let (ours, theirs) = baton_sys::fd::seqpacket_pair().unwrap();
        let mut old = OldSide::new(Channel::new(ours).unwrap());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let meta = ListenerMeta {
            name: "http".into(),
            kind: ListenerKind::Tcp,
        };
        old.announce(hello("old", 1), &[(meta, Arc::new(OwnedFd::from(l)))])
            .await
            .unwrap();
        let (side, listeners) = tokio::time::timeout(
            Duration::from_secs(10),
            NewSide::connect(theirs, |_| hello("new", 2)),
        )
        .await
        .expect("the listeners without the old side answering the new side's Hello")
        .unwrap();
        assert_eq!(listeners.len(), 1);
        assert_eq!(listeners[0].0.name, "http");
        let got = std::net::TcpListener::from(listeners.into_iter().next().unwrap().1);
        assert_eq!(got.local_addr().unwrap(), addr, "the same socket");

        let new = tokio::spawn(async move {
            let info = ReadyInfo {
                accepts_conns: false,
            };
            side.ready(info, Accepts::default(), Duration::from_secs(10), || {})
                .await
        });
        let mut log = HandshakeLog::default();
        let info = old.await_ready(&NoState, &mut log).await.unwrap();
        assert!(!info.accepts_conns);
        assert_eq!(old.peer.as_ref().map(|h| h.generation), Some(2));
        old.promote().await.unwrap();
        assert_eq!(
            new.await.unwrap().unwrap(),
            Promotion::Promoted { provisional: false }
        );
    }

    /// Revision 2 on both sides: the new side says which owned kinds it
    /// takes; a batch of such connections arrives with its unread bytes
    /// and state and is acknowledged; a batch of a kind it did not register,
    /// or that its check refuses, is refused whole.
    #[tokio::test]
    async fn owned_connections_move_to_a_new_side_that_takes_their_kind() {
        use crate::handoff::owned::{OwnedConn, OwnedSink};
        use crate::protocol::{Accepts, Msg, ReadyInfo};
        use std::sync::Arc;
        use std::sync::atomic::AtomicU64;
        use tokio::sync::mpsc;

        let (ours, theirs) = baton_sys::fd::seqpacket_pair().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let new = tokio::spawn(async move {
            let (side, _) = NewSide::connect(theirs, |_| hello("new", 2)).await.unwrap();
            side.want_state(1 << 20).await.unwrap();
            assert_eq!(side.peer_revision(), crate::protocol::PROTOCOL_REVISION);
            let accepts = Accepts {
                owned_kinds: vec!["ws".into(), "picky".into()],
            };
            let info = ReadyInfo {
                accepts_conns: false,
            };
            side.ready(info, accepts, std::time::Duration::from_secs(10), || {})
                .await
                .unwrap();
            let sinks = vec![
                OwnedSink {
                    kind: "ws".into(),
                    tx: tx.clone(),
                    check: None,
                },
                OwnedSink {
                    kind: "picky".into(),
                    tx,
                    check: Some(Arc::new(|c: &OwnedConn| {
                        Err(format!("state v{} unknown", c.state[0]))
                    })),
                },
            ];
            let counts = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let (etx, _erx) = mpsc::unbounded_channel();
            side.receive_connections(None, sinks, counts, Arc::default(), etx)
                .await;
        });
        let mut old = OldSide::new(Channel::new(ours).unwrap());
        let mut log = HandshakeLog::default();
        old.handshake(hello("old", 1), &[], &NoState, &mut log)
            .await
            .unwrap();
        assert_eq!(old.accepts.owned_kinds, ["ws", "picky"]);
        old.promote().await.unwrap();

        let conn = |kind: &str| {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let a = crate::listeners::Stream::Unix(tokio::net::UnixStream::from_std(a).unwrap());
            (
                OwnedConn {
                    kind: kind.into(),
                    stream: a,
                    unread: b"half a fra".to_vec(),
                    state: vec![7, 0, 0, 0],
                    listener: "http".into(),
                },
                b,
            )
        };
        let (c, mut peer) = conn("ws");
        old.send_owned_batch(1, vec![(c, ())]).await.unwrap();
        assert_eq!(old.recv().await.unwrap(), Some(Msg::ConnsAck { batch: 1 }));
        let got = rx.recv().await.unwrap();
        assert_eq!(
            (got.kind.as_str(), &got.unread[..], &got.state[..]),
            ("ws", &b"half a fra"[..], &[7u8, 0, 0, 0][..])
        );
        // The same socket: what the moved end writes, the client reads.
        let crate::listeners::Stream::Unix(s) = got.stream else {
            panic!("not a unix stream")
        };
        s.try_write(b"hi").unwrap();
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut peer, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");

        for (batch, kind) in [(2, "other"), (3, "picky")] {
            let (c, _peer) = conn(kind);
            let sent = old.send_owned_batch(batch, vec![(c, ())]).await.unwrap();
            match old.recv().await.unwrap() {
                Some(Msg::ConnsNack { batch: b, reason }) => {
                    assert_eq!(b, batch);
                    assert!(reason.contains(kind), "{reason}");
                }
                other => panic!("expected ConnsNack, got {other:?}"),
            }
            // The old side still has its copy to serve.
            assert_eq!(sent.items.len(), 1);
        }
        drop(old);
        new.await.unwrap();
    }

    /// A new side that heard no revision from the old side (the first
    /// release announces none) sends no `Accepts`, which that release could
    /// not decode.
    #[tokio::test]
    async fn no_accepts_to_a_first_release_peer() {
        use crate::protocol::{Accepts, Msg, ReadyInfo};
        let (ours, theirs) = baton_sys::fd::seqpacket_pair().unwrap();
        let new = tokio::spawn(async move {
            let (side, _) = NewSide::connect(theirs, |_| hello("new", 2)).await.unwrap();
            assert_eq!(side.peer_revision(), 1);
            let accepts = Accepts {
                owned_kinds: vec!["ws".into()],
            };
            let info = ReadyInfo {
                accepts_conns: true,
            };
            let _ = side
                .ready(info, accepts, std::time::Duration::from_secs(5), || {})
                .await;
        });
        // Play the first release by hand: Hello, Listeners, then read.
        let chan = Channel::new(ours).unwrap();
        chan.send(&Msg::Hello(hello("old", 1)), &[]).await.unwrap();
        assert!(matches!(
            chan.recv().await.unwrap(),
            Some((Msg::Hello(_), _))
        ));
        chan.send(&Msg::Listeners(vec![]), &[]).await.unwrap();
        match chan.recv().await.unwrap() {
            Some((Msg::Ready(_), _)) => {}
            other => panic!("expected Ready first, got {other:?}"),
        }
        chan.send(&Msg::Promote, &[]).await.unwrap();
        new.await.unwrap();
    }

    /// The drain cuts owned batches by count and by bytes: a batch of
    /// maximal entries (16 KiB unread, 4 KiB state, 64-byte kind, 256-byte
    /// listener name) that `fits_owned_batch` accepts always encodes within
    /// one frame, and the next entry would not have fitted.
    #[test]
    fn a_batch_cut_by_fits_owned_batch_always_encodes() {
        use super::send::fits_owned_batch;
        use crate::protocol::{
            MAX_CONN_PREFIX, MAX_KIND, MAX_NAME, MAX_OWNED_STATE, Msg, OwnedMeta, encode,
        };
        let meta = OwnedMeta {
            kind: "k".repeat(MAX_KIND),
            listener: "l".repeat(MAX_NAME),
            unread: vec![0xff; MAX_CONN_PREFIX],
            state: vec![0xff; MAX_OWNED_STATE],
        };
        let entry =
            meta.unread.len() + meta.state.len() + meta.kind.len() + meta.listener.len() + 16;
        let mut conns = vec![meta.clone()];
        let mut bytes = entry;
        while fits_owned_batch(conns.len(), bytes, entry) {
            conns.push(meta.clone());
            bytes += entry;
        }
        assert!(conns.len() > 1);
        let frame = encode(&Msg::Owned {
            batch: u32::MAX,
            conns: conns.clone(),
        });
        assert!(frame.is_ok(), "{} entries: {frame:?}", conns.len());
        conns.push(meta);
        assert!(
            encode(&Msg::Owned { batch: 1, conns }).is_err(),
            "one more would not fit"
        );
    }
}

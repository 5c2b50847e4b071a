//! The two roles of a handoff, in two files that mirror each other:
//! `send.rs` is the old generation, `recv.rs` the new one.

pub(crate) mod recv;
pub(crate) mod send;

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
}

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

//! The handoff protocol between two generations: versioned messages and
//! their framing. Pure data; no I/O (see `channel.rs` for the transport).
//!
//! One message is one `SOCK_SEQPACKET` datagram:
//!
//! ```text
//! +--------+---------+-----------------------+
//! | "BTN"  | version | postcard(Msg)         |   fds (SCM_RIGHTS) alongside
//! | 3 bytes| u8      | <= MAX_FRAME - 4      |
//! +--------+---------+-----------------------+
//! ```
//!
//! The conversation (old → new unless marked ←):
//!
//! ```text
//! Hello            ⇄  both ways; protocol versions must match
//! Listeners           every listening socket, one fd each, in order
//! WantState        ←  (optional) the new side asks for state as late as possible
//! State               named blobs, inline or as sealed memfds (one fd each)
//! Ready | Failed   ←  the new side is ready (or not, with a reason)
//! Promote             the commit point: only now does the new side accept
//! Serving          ←  the new side accepts now (the old side may finish)
//!
//! With an observation window or a canary, `PromoteProvisional` replaces
//! `Promote`: the new side accepts but does not take over the pid file; the
//! old side later sends `Commit` (keep it) or `Demote` (it stops gracefully
//! and the old side resumes). During a canary the old side asks
//! `StatsRequest` and the new side answers `Stats`.
//! Conns               idle connections, ≤ 253 fds per batch
//! ConnsAck | ConnsNack ← per batch; the old side closes its copies on Ack
//! ```
//!
//! Every length is bounded; a decoded message is validated against the
//! number of fds that arrived with it before anything acts on it.
//!
//! ## Revisions: how a release talks to the one before it
//!
//! The frame's version byte and `Hello::protocol` stay at
//! [`PROTOCOL_VERSION`] 1: the first release refuses any other value, and an
//! upgrade from or back to it must keep working. What later releases add is
//! negotiated inside version 1, by *revision* ([`PROTOCOL_REVISION`]):
//!
//! * The old side announces its revision in a reserved state blob,
//!   [`REVISION_BLOB`] (one byte), sent with the state. A revision-1 new
//!   side keeps unknown blobs to itself (nobody imports that name), so the
//!   announcement costs it nothing.
//! * A new side that read revision ≥ 2 there says, before `Ready`, which
//!   kinds of application-owned connection it takes (`Accepts`). It never
//!   sends `Accepts` to a revision-1 peer, which could not decode it.
//! * The old side sends `Owned` batches only to a new side that sent
//!   `Accepts` naming their kind. A revision-1 new side never does, so it
//!   never sees one; those connections stay and close at the drain deadline.
//! * New variants are only ever appended to [`Msg`]: postcard numbers enum
//!   variants by position, so every revision-1 message keeps its encoding
//!   (a test pins those bytes).
//!
//! ```text
//! State            ...  + blob "baton.protocol" = [revision]   (old → new)
//! Accepts          ←  revision ≥ 2 on both sides: owned kinds taken
//! Ready            ←
//! ...
//! Owned               app-owned connections of an accepted kind, ≤ 253 per
//!                     batch, each with its unread bytes and a state blob
//! ConnsAck | ConnsNack ← per batch, as for Conns (one batch numbering)
//!
//! GiveBack            replaces Demote (the window failed) to a new side
//!                     that sent Accepts: it stops accepting and sends its
//!                     idle connections back —
//! Conns | Owned    ←  the other way round, batch by batch,
//! ConnsAck | ConnsNack  acknowledged by the old side, which serves them
//! ```

use serde::{Deserialize, Serialize};

use baton_sys::fd::SCM_MAX_FD;

/// The protocol version this build speaks (the frame's version byte and
/// `Hello::protocol`): 1, the only one, kept so that the first release can
/// still upgrade to and from this one (see the module docs).
pub const PROTOCOL_VERSION: u8 = 1;
/// The revision of version 1 this build speaks: 1 is the first release;
/// 2 adds `Accepts` and `Owned` (application-owned connections).
pub const PROTOCOL_REVISION: u8 = 2;
/// Name of the reserved state blob in which the old side announces its
/// revision (one byte). Never handed to the application.
pub const REVISION_BLOB: &str = "baton.protocol";
/// Frame magic.
const MAGIC: &[u8; 3] = b"BTN";
/// Largest datagram either side sends or accepts (fits the default Unix
/// socket buffer).
pub const MAX_FRAME: usize = 160 * 1024;
/// Longest name (listener, blob) or version string.
pub const MAX_NAME: usize = 256;
/// Longest human-readable reason.
pub const MAX_REASON: usize = 4096;
/// Most listeners one generation may hand over.
pub const MAX_LISTENERS: usize = 64;
/// Most state blobs.
pub const MAX_BLOBS: usize = 64;
/// Largest inline state blob; larger state travels in a memfd.
pub const MAX_INLINE_BLOB: usize = 64 * 1024;
/// Largest already-read prefix that travels with one handed-over connection.
pub const MAX_CONN_PREFIX: usize = 16 * 1024;
/// Largest state blob that travels with one application-owned connection.
pub const MAX_OWNED_STATE: usize = 4 * 1024;
/// Longest name of a kind of application-owned connection.
pub const MAX_KIND: usize = 64;
/// Most kinds of application-owned connection one generation takes.
pub const MAX_OWNED_KINDS: usize = 64;

/// A handoff message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// First message in each direction.
    Hello(Hello),
    /// The listening sockets, one fd per entry, in order.
    Listeners(Vec<ListenerMeta>),
    /// New → old: send the state now.
    WantState,
    /// Old → new: the exported state.
    State(Vec<BlobMeta>),
    /// New → old: ready to serve; waiting for `Promote`.
    Ready(ReadyInfo),
    /// New → old: start-up failed; the old side rolls back.
    Failed {
        /// Why, in words for an operator.
        reason: String,
    },
    /// Old → new: start accepting; the old side stops.
    Promote,
    /// Old → new: start accepting, provisionally (observation window or
    /// canary): keep off the pid file until `Commit`.
    PromoteProvisional {
        /// Canary: the old side keeps accepting too.
        canary: bool,
    },
    /// Old → new: the window passed; take over the pid file.
    Commit,
    /// Old → new: the window failed; stop accepting, finish, exit.
    Demote {
        /// Why.
        reason: String,
    },
    /// Old → new: report response counts.
    StatsRequest,
    /// New → old: responses served and how many were 5xx, since start.
    Stats {
        /// Responses.
        requests: u64,
        /// 5xx responses.
        errors: u64,
    },
    /// Old → new: the upgrade is complete, the old side exits now. Carries
    /// its measurements so the new side can count the upgrade (metrics that
    /// survive upgrades).
    Done(DoneReport),
    /// New → old: promoted and accepting. Until this arrives the old side
    /// does not finish its drain, so a successor that dies or hangs right
    /// after `Ready` is always rolled back.
    Serving,
    /// Old → new: a batch of idle connections, one fd each, in order.
    Conns {
        /// Batch number, echoed in the acknowledgement.
        batch: u32,
        /// One entry per fd.
        conns: Vec<ConnMeta>,
    },
    /// New → old: the batch arrived whole; the old side may close its copies.
    ConnsAck {
        /// The batch acknowledged.
        batch: u32,
    },
    /// New → old: the batch could not be taken (e.g. fd limit); the old side
    /// keeps serving those connections itself.
    ConnsNack {
        /// The batch refused.
        batch: u32,
        /// Why.
        reason: String,
    },
    // Revision 2. Append only: postcard numbers variants by position.
    /// New → old, before `Ready`, only to a peer of revision ≥ 2: the kinds
    /// of application-owned connection this generation takes.
    Accepts(Accepts),
    /// Old → new: a batch of application-owned connections, one fd each, in
    /// order; acknowledged with `ConnsAck` / `ConnsNack` like `Conns`.
    Owned {
        /// Batch number (shared with `Conns`), echoed in the acknowledgement.
        batch: u32,
        /// One entry per fd.
        conns: Vec<OwnedMeta>,
    },
    /// Old → new, instead of `Demote`, to a new side that sent `Accepts`:
    /// the window failed; stop accepting and give your idle connections
    /// back (`Conns` / `Owned` batches the other way, acknowledged by the old
    /// side), then finish and exit.
    GiveBack(GiveBack),
}

/// What a rolled-back generation may give back, sent with `GiveBack`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiveBack {
    /// Why the window failed.
    pub reason: String,
    /// The old side takes idle HTTP connections back.
    pub accepts_conns: bool,
    /// The kinds of owned connection the old side takes back.
    pub accepts: Accepts,
}

/// What a new generation of revision ≥ 2 takes, sent with `Accepts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepts {
    /// Kinds of application-owned connection it registered a receiver for.
    pub owned_kinds: Vec<String>,
}

/// One application-owned connection in an `Owned` batch. `Debug` shows the
/// lengths of its bytes, not the bytes (a state blob may hold TLS keys).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedMeta {
    /// Its kind (the receiver the new side registered).
    pub kind: String,
    /// The listener it was accepted on.
    pub listener: String,
    /// Bytes read from the socket and not processed (≤ [`MAX_CONN_PREFIX`]).
    #[serde(with = "crate::state::as_bytes")]
    pub unread: Vec<u8>,
    /// The application's state for this connection (≤ [`MAX_OWNED_STATE`]).
    #[serde(with = "crate::state::as_bytes")]
    pub state: Vec<u8>,
}

impl std::fmt::Debug for OwnedMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedMeta")
            .field("kind", &self.kind)
            .field("listener", &self.listener)
            .field("unread_len", &self.unread.len())
            .field("state_len", &self.state.len())
            .finish()
    }
}

/// Who is speaking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u8,
    /// The application's version string.
    pub app_version: String,
    /// The sender's generation number.
    pub generation: u64,
    /// The sender's pid.
    pub pid: u32,
}

/// Kind of a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerKind {
    /// TCP over IPv4 or IPv6.
    Tcp,
    /// Unix stream socket.
    Unix,
}

/// One listener in a `Listeners` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerMeta {
    /// The listener's name.
    pub name: String,
    /// Its kind (checked against the fd on receipt).
    pub kind: ListenerKind,
}

/// How a state blob travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobData {
    /// The bytes, in the message.
    Inline(#[serde(with = "crate::state::as_bytes")] Vec<u8>),
    /// In a sealed memfd (one fd) of this many bytes.
    Memfd {
        /// Length in bytes.
        len: u64,
    },
}

/// One named piece of exported state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Name the exporter registered.
    pub name: String,
    /// The data.
    pub data: BlobData,
}

/// What the new side says with `Ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// The new side will take idle connections (`Conns`).
    pub accepts_conns: bool,
}

/// What the old side measured, sent with `Done`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneReport {
    /// Spawn to `Ready`, ms.
    pub ready_ms: u64,
    /// Promotion to drained, ms.
    pub drain_ms: u64,
    /// Trigger to drained, ms.
    pub total_ms: u64,
    /// Connections closed at the drain deadline.
    pub closed: u64,
}

/// One connection in a `Conns` batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnMeta {
    /// The listener it was accepted on.
    pub listener: String,
    /// Bytes already read from it but not yet processed (the start of the
    /// next request); the new side replays them first.
    #[serde(with = "crate::state::as_bytes")]
    pub prefix: Vec<u8>,
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a baton frame.
    #[error("not a baton handoff frame (bad magic)")]
    BadMagic,
    /// The peer speaks another protocol version.
    #[error("peer speaks handoff protocol v{peer}, this build speaks v{ours}")]
    Version {
        /// Peer's version.
        peer: u8,
        /// Ours.
        ours: u8,
    },
    /// The frame is larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// postcard could not decode it.
    #[error("malformed message: {0}")]
    Decode(String),
    /// A field is out of bounds, or the fd count does not match.
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Encode a message into one frame.
///
/// # Errors
/// [`FrameError::TooLarge`] if it would not fit in one datagram.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.push(PROTOCOL_VERSION);
    let out = postcard::to_extend(msg, out).map_err(|e| FrameError::Decode(e.to_string()))?;
    if out.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decode and validate one frame that arrived with `nfds` fds.
///
/// # Errors
/// Any [`FrameError`]; the caller must treat it as a protocol failure (roll
/// back), never panic.
pub fn decode(frame: &[u8], nfds: usize) -> Result<Msg, FrameError> {
    if frame.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(frame.len()));
    }
    if frame.len() < 4 || &frame[..3] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if frame[3] != PROTOCOL_VERSION {
        return Err(FrameError::Version {
            peer: frame[3],
            ours: PROTOCOL_VERSION,
        });
    }
    let (msg, rest): (Msg, &[u8]) =
        postcard::take_from_bytes(&frame[4..]).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Invalid(format!(
            "{} trailing bytes after message",
            rest.len()
        )));
    }
    validate(&msg, nfds)?;
    Ok(msg)
}

/// Decode and validate a frame whose fds were truncated by the kernel: every
/// bound is checked except the fd count.
///
/// # Errors
/// Any [`FrameError`].
pub fn decode_ignoring_fds(frame: &[u8]) -> Result<Msg, FrameError> {
    let probe = decode(frame, 0);
    match probe {
        Err(FrameError::Invalid(_)) => {}
        other => return other,
    }
    // Decode again with the count the message itself expects.
    let (msg, _): (Msg, &[u8]) =
        postcard::take_from_bytes(&frame[4..]).map_err(|e| FrameError::Decode(e.to_string()))?;
    let n = fds_expected(&msg);
    decode(frame, n)
}

/// How many fds must accompany `msg`.
pub fn fds_expected(msg: &Msg) -> usize {
    match msg {
        Msg::Listeners(l) => l.len(),
        Msg::State(blobs) => blobs
            .iter()
            .filter(|b| matches!(b.data, BlobData::Memfd { .. }))
            .count(),
        Msg::Conns { conns, .. } => conns.len(),
        Msg::Owned { conns, .. } => conns.len(),
        _ => 0,
    }
}

fn check_name(what: &str, s: &str) -> Result<(), FrameError> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(FrameError::Invalid(format!(
            "{what} must be 1..={MAX_NAME} bytes, got {}",
            s.len()
        )));
    }
    Ok(())
}

/// A kind of application-owned connection: 1..=[`MAX_KIND`] bytes.
///
/// # Errors
/// [`FrameError::Invalid`] otherwise.
pub fn check_kind(s: &str) -> Result<(), FrameError> {
    if s.is_empty() || s.len() > MAX_KIND {
        return Err(FrameError::Invalid(format!(
            "owned connection kind must be 1..={MAX_KIND} bytes, got {}",
            s.len()
        )));
    }
    Ok(())
}

fn check_reason(s: &str) -> Result<(), FrameError> {
    if s.len() > MAX_REASON {
        return Err(FrameError::Invalid(format!(
            "reason of {} bytes exceeds {MAX_REASON}",
            s.len()
        )));
    }
    Ok(())
}

/// Check every bound of a decoded message, and its fd count.
///
/// # Errors
/// [`FrameError::Invalid`] naming the first violated bound.
pub fn validate(msg: &Msg, nfds: usize) -> Result<(), FrameError> {
    match msg {
        Msg::Hello(h) => {
            if h.app_version.len() > MAX_NAME {
                return Err(FrameError::Invalid("app version string too long".into()));
            }
            if h.protocol != PROTOCOL_VERSION {
                return Err(FrameError::Version {
                    peer: h.protocol,
                    ours: PROTOCOL_VERSION,
                });
            }
        }
        Msg::Listeners(l) => {
            if l.len() > MAX_LISTENERS {
                return Err(FrameError::Invalid(format!(
                    "{} listeners (at most {MAX_LISTENERS})",
                    l.len()
                )));
            }
            for m in l {
                check_name("listener name", &m.name)?;
            }
            let mut names: Vec<&str> = l.iter().map(|m| m.name.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Err(FrameError::Invalid("duplicate listener name".into()));
            }
        }
        Msg::State(blobs) => {
            if blobs.len() > MAX_BLOBS {
                return Err(FrameError::Invalid(format!(
                    "{} state blobs (at most {MAX_BLOBS})",
                    blobs.len()
                )));
            }
            for b in blobs {
                check_name("state blob name", &b.name)?;
                if let BlobData::Inline(v) = &b.data
                    && v.len() > MAX_INLINE_BLOB
                {
                    return Err(FrameError::Invalid(format!(
                        "inline state blob '{}' of {} bytes exceeds {MAX_INLINE_BLOB}",
                        b.name,
                        v.len()
                    )));
                }
            }
        }
        Msg::Failed { reason } | Msg::ConnsNack { reason, .. } | Msg::Demote { reason } => {
            check_reason(reason)?
        }
        Msg::Conns { conns, .. } => {
            if conns.is_empty() || conns.len() > SCM_MAX_FD {
                return Err(FrameError::Invalid(format!(
                    "connection batch of {} (1..={SCM_MAX_FD})",
                    conns.len()
                )));
            }
            for c in conns {
                check_name("listener name", &c.listener)?;
                if c.prefix.len() > MAX_CONN_PREFIX {
                    return Err(FrameError::Invalid(format!(
                        "connection prefix of {} bytes exceeds {MAX_CONN_PREFIX}",
                        c.prefix.len()
                    )));
                }
            }
        }
        Msg::Accepts(a) => {
            if a.owned_kinds.len() > MAX_OWNED_KINDS {
                return Err(FrameError::Invalid(format!(
                    "{} owned kinds (at most {MAX_OWNED_KINDS})",
                    a.owned_kinds.len()
                )));
            }
            for k in &a.owned_kinds {
                check_kind(k)?;
            }
        }
        Msg::GiveBack(g) => {
            check_reason(&g.reason)?;
            if g.accepts.owned_kinds.len() > MAX_OWNED_KINDS {
                return Err(FrameError::Invalid(format!(
                    "{} owned kinds (at most {MAX_OWNED_KINDS})",
                    g.accepts.owned_kinds.len()
                )));
            }
            for k in &g.accepts.owned_kinds {
                check_kind(k)?;
            }
        }
        Msg::Owned { conns, .. } => {
            if conns.is_empty() || conns.len() > SCM_MAX_FD {
                return Err(FrameError::Invalid(format!(
                    "owned connection batch of {} (1..={SCM_MAX_FD})",
                    conns.len()
                )));
            }
            for c in conns {
                check_kind(&c.kind)?;
                check_name("listener name", &c.listener)?;
                if c.unread.len() > MAX_CONN_PREFIX {
                    return Err(FrameError::Invalid(format!(
                        "owned connection unread bytes of {} exceed {MAX_CONN_PREFIX}",
                        c.unread.len()
                    )));
                }
                if c.state.len() > MAX_OWNED_STATE {
                    return Err(FrameError::Invalid(format!(
                        "owned connection state of {} bytes exceeds {MAX_OWNED_STATE}",
                        c.state.len()
                    )));
                }
            }
        }
        Msg::WantState
        | Msg::Ready(_)
        | Msg::Promote
        | Msg::PromoteProvisional { .. }
        | Msg::Commit
        | Msg::StatsRequest
        | Msg::Stats { .. }
        | Msg::Done(_)
        | Msg::Serving
        | Msg::ConnsAck { .. } => {}
    }
    let want = fds_expected(msg);
    if want != nfds {
        return Err(FrameError::Invalid(format!(
            "{} message came with {nfds} fds, expected {want}",
            msg.name()
        )));
    }
    Ok(())
}

impl Msg {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "Hello",
            Msg::Listeners(_) => "Listeners",
            Msg::WantState => "WantState",
            Msg::State(_) => "State",
            Msg::Ready(_) => "Ready",
            Msg::Failed { .. } => "Failed",
            Msg::Promote => "Promote",
            Msg::PromoteProvisional { .. } => "PromoteProvisional",
            Msg::Commit => "Commit",
            Msg::Demote { .. } => "Demote",
            Msg::StatsRequest => "StatsRequest",
            Msg::Stats { .. } => "Stats",
            Msg::Done(_) => "Done",
            Msg::Serving => "Serving",
            Msg::Conns { .. } => "Conns",
            Msg::ConnsAck { .. } => "ConnsAck",
            Msg::ConnsNack { .. } => "ConnsNack",
            Msg::Accepts(_) => "Accepts",
            Msg::Owned { .. } => "Owned",
            Msg::GiveBack(_) => "GiveBack",
        }
    }
}

#[cfg(test)]
mod tests;

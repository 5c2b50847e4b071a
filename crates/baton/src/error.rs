//! baton's one error type.

use std::io;

/// Everything that can go wrong in baton.
///
/// Messages say what happened and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What baton was doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The other generation sent something this build cannot accept.
    #[error("handoff protocol error: {0}")]
    Protocol(String),
    /// The kernel dropped fds of a handoff message (fd limit reached).
    #[error("handoff fds truncated: {0}")]
    FdsTruncated(String),
    /// The other generation went away.
    #[error("{0}")]
    PeerGone(String),
    /// The upgrade was not started; nothing changed.
    #[error("upgrade refused: {0}")]
    Refused(String),
    /// Another upgrade is running.
    #[error("upgrade in progress: {0}")]
    InProgress(String),
    /// The upgrade started but failed; this generation kept (or resumed)
    /// serving.
    #[error("upgrade failed, rolled back: {0}")]
    Failed(String),
    /// The new generation said it cannot start (`Failed` during the
    /// handshake), with its own reason. An upgrade reports it inside
    /// [`Error::Failed`], after the rollback.
    #[error("the new generation reported a failure: {reason}")]
    NewGenerationFailed {
        /// Its reason, as it gave it.
        reason: String,
    },
    /// Bad configuration or arguments.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listener could not be bound, inherited or used.
    #[error("listener '{name}': {reason}")]
    Listener {
        /// The listener's name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// State could not be exported or imported.
    #[error("state handoff: {0}")]
    State(String),
    /// The control socket or its protocol.
    #[error("control socket: {0}")]
    Control(String),
    /// This generation is shutting down (or already gone).
    #[error("baton is shutting down")]
    Closed,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn listener(name: &str, reason: impl Into<String>) -> Self {
        Error::Listener {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}

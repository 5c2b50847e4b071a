//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong setting up a [`Server`](crate::Server).
///
/// Each message names the file or setting at fault; a new generation that
/// gets one should report it with [`baton::Baton::fail`] so the upgrade is
/// rolled back with that reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The certificate chain file is missing, unreadable or malformed.
    #[error(
        "TLS certificate chain {}: {reason} (fix the file, then start or upgrade again)",
        .path.display()
    )]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The private key file is missing, unreadable or malformed.
    #[error(
        "TLS private key {}: {reason} (fix the file, then start or upgrade again)",
        .path.display()
    )]
    PrivateKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS settings cannot be used (a certificate that does not match
    /// its key, a setting out of range, no random source).
    #[error("TLS: {0}")]
    Tls(String),
    /// The session-ticket keys handed over by the previous generation
    /// cannot be read.
    #[error("TLS session-ticket keys from the previous generation: {0}")]
    TicketState(String),
    /// baton itself (the state channel to the previous generation).
    #[error(transparent)]
    Baton(#[from] baton::Error),
}

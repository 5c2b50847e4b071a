//! The TLS connection counters (issue 16): carried across upgrades with
//! [`Baton::carried_counter`], so they appear in `/metrics` as
//! `baton_tls_*_total` and keep counting from generation to generation. A
//! test asserts "no new handshake" with `baton_tls_handshakes_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use baton::Baton;

use crate::Error;

/// Why a TLS connection carried by baton's record layer was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// A TLS 1.3 KeyUpdate (or another post-handshake message) we cannot follow.
    KeyUpdate,
    /// A TLS 1.2 renegotiation request.
    Renegotiation,
    /// A fatal alert sent (bad MAC, malformed or oversized record).
    Alert,
    /// A key neared its usage limit.
    Limit,
    /// Keys extracted, the successor refused the batch: closed politely here.
    Refused,
}

/// The counters, each shared with the metrics.
#[derive(Debug, Clone)]
pub(crate) struct TlsCounters {
    handshakes: Arc<AtomicU64>,
    handed_over: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    closed: [Arc<AtomicU64>; 5],
}

/// (name without `_total`, help) of the per-reason close counters, in the
/// order of [`CloseReason`].
const CLOSED: [(&str, &str); 5] = [
    (
        "baton_tls_closed_key_update",
        "TLS connections closed after a KeyUpdate the record layer cannot follow",
    ),
    (
        "baton_tls_closed_renegotiation",
        "TLS connections closed after a TLS 1.2 renegotiation request",
    ),
    (
        "baton_tls_closed_alert",
        "TLS connections on the record layer closed with a fatal alert",
    ),
    (
        "baton_tls_closed_limit",
        "TLS connections closed because a key neared its usage limit",
    ),
    (
        "baton_tls_closed_refused",
        "TLS connections whose keys were extracted for a successor that refused them, closed here",
    ),
];

impl TlsCounters {
    /// Register the counters (before `ready()`).
    ///
    /// # Errors
    /// [`Error::Baton`] if baton refuses a name (it does not: they are valid).
    pub(crate) fn register(baton: &Baton) -> Result<TlsCounters, Error> {
        let c = |name: &str, help: &str| baton.carried_counter(name, help);
        Ok(TlsCounters {
            handshakes: c("baton_tls_handshakes", "TLS handshakes completed")?,
            handed_over: c(
                "baton_tls_handed_over",
                "TLS connections handed over between generations with their session keys \
                 (counted by the generation that takes them)",
            )?,
            received: c(
                "baton_tls_received",
                "TLS connections taken over and continued on the record layer",
            )?,
            closed: [
                c(CLOSED[0].0, CLOSED[0].1)?,
                c(CLOSED[1].0, CLOSED[1].1)?,
                c(CLOSED[2].0, CLOSED[2].1)?,
                c(CLOSED[3].0, CLOSED[3].1)?,
                c(CLOSED[4].0, CLOSED[4].1)?,
            ],
        })
    }

    pub(crate) fn handshake(&self) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handed_over(&self) {
        self.handed_over.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, why: CloseReason) {
        let i = match why {
            CloseReason::KeyUpdate => 0,
            CloseReason::Renegotiation => 1,
            CloseReason::Alert => 2,
            CloseReason::Limit => 3,
            CloseReason::Refused => 4,
        };
        self.closed[i].fetch_add(1, Ordering::Relaxed);
    }
}

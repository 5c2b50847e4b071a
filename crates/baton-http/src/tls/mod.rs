//! HTTPS with rustls (feature `tls`).
//!
//! ## What happens to TLS connections at an upgrade
//!
//! **HTTP/1.1 connections move with their session keys** (issue 16). rustls
//! is given whole records only (`aligned.rs`), so at an idle point — hyper
//! between requests, nothing for rustls to send, no plaintext or partial
//! record inside it — the traffic keys, IVs and sequence numbers can be
//! extracted without losing a byte. That happens only when the successor
//! takes the kind [`TLS_KIND`] (every [`Tls::load`] registers it unless
//! [`TlsConfig::take_connections`] is off); the socket then moves with the
//! keys in its state blob (`session.rs`), in memory only, and the successor
//! continues the session on baton's record layer (`record/`,
//! `record_io.rs`), serving HTTP/1.1 with the same service; it moves again
//! at the next upgrade. After the extraction the session never goes back to
//! rustls: a refused batch continues here on the record layer. What the
//! record layer cannot follow (a TLS 1.3 KeyUpdate, a TLS 1.2
//! renegotiation) ends the connection after the response in progress, with
//! close_notify; a bad record gets its fatal alert. Counters: `counters.rs`.
//!
//! The others — HTTP/2, and connections the successor does not take or
//! refused — **finish on the old generation**, after the new one serves,
//! each at its own moment within [`TlsConfig::close_spread`] (so clients do
//! not all reconnect at once):
//!
//! * HTTP/1.1: from its moment on, every response carries `Connection:
//!   close`, and the connection ends after it with `close_notify`. A
//!   connection that is idle at its moment is closed with `close_notify`
//!   once nothing has moved on it for [`TlsConfig::close_quiet`] — a client
//!   in a request loop never sees its connection close under a request it
//!   just sent.
//! * HTTP/2: a two-phase GOAWAY; open streams finish, then `close_notify`.
//!
//! Clients reconnect to the new generation, and thanks to the carried
//! session-ticket keys ([`TICKET_STATE_NAME`]) they resume their session
//! instead of doing a full handshake.
//!
//! ## Session tickets
//!
//! Tickets (TLS 1.3 and TLS 1.2) are encrypted with keys this crate owns,
//! kept in memory only: [`Tls::load`] takes them over from the previous
//! generation through baton's state channel (named [`TICKET_STATE_NAME`])
//! and registers them for the next one. The current key encrypts, the
//! previous one still decrypts; the key changes every
//! [`TlsConfig::ticket_rotation`], and the keys' creation times travel with
//! them, so the schedule does not restart at each upgrade. The state is
//! versioned; one this build cannot read is [`Error::TicketState`] (report
//! it with [`Baton::fail`]: the upgrade rolls back).
//!
//! ## Certificates
//!
//! Read from PEM files by [`Tls::load`], i.e. afresh by every generation at
//! start: replacing the files and upgrading is how certificates are
//! rotated. A missing or malformed file is an [`Error`] — report it with
//! [`Baton::fail`] and the upgrade rolls back to the generation still
//! serving the old certificate.

mod aligned;
mod conn;
mod counters;
pub(crate) mod record;
mod record_io;
mod session;
mod tickets;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton::Baton;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;
pub use conn::TLS_KIND;
pub(crate) use conn::{serve, serve_moved};
use counters::TlsCounters;
pub use tickets::TICKET_STATE_NAME;
use tickets::Ticketer;

/// Default [`TlsConfig::close_spread`].
pub const DEFAULT_CLOSE_SPREAD: Duration = Duration::from_secs(1);
/// Default [`TlsConfig::close_quiet`]: long enough that a client in a
/// request loop, even one starved of CPU for a while, gets its next response
/// with `Connection: close` rather than an idle close.
pub const DEFAULT_CLOSE_QUIET: Duration = Duration::from_secs(1);
/// Default [`TlsConfig::ticket_rotation`] (tickets then live 6 to 12 hours,
/// like rustls' own ticketer).
pub const DEFAULT_TICKET_ROTATION: Duration = Duration::from_secs(6 * 3600);
/// Default [`TlsConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest [`TlsConfig::ticket_rotation`].
pub const MIN_TICKET_ROTATION: Duration = Duration::from_secs(1);
/// Longest [`TlsConfig::ticket_rotation`]: a ticket lives up to twice the
/// rotation period, and TLS 1.3 caps ticket lifetimes at seven days.
pub const MAX_TICKET_ROTATION: Duration = Duration::from_secs(84 * 3600);

/// ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// TLS settings for [`Tls::load`].
///
/// ```
/// let mut cfg = baton_http::TlsConfig::new("/etc/app/cert.pem", "/etc/app/key.pem");
/// cfg.close_spread = std::time::Duration::from_secs(2);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// During a drain, TLS connections close at moments spread evenly over
    /// this window after the new generation serves.
    pub close_spread: Duration,
    /// An idle HTTP/1.1 connection is closed at its moment only once no
    /// byte has moved on it for this long (otherwise its next response
    /// carries `Connection: close`).
    pub close_quiet: Duration,
    /// How often the session-ticket key changes (see [`TICKET_STATE_NAME`]).
    pub ticket_rotation: Duration,
    /// Longest a client may take to complete its handshake.
    pub handshake_timeout: Duration,
    /// Take over the previous generation's HTTP/1.1 TLS connections with
    /// their session keys (default `true`). With `false`, this generation
    /// does not ask for them, and the previous one ends them politely.
    pub take_connections: bool,
}

impl TlsConfig {
    /// Certificate chain and key files, everything else default.
    pub fn new(cert_chain: impl Into<PathBuf>, private_key: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert_chain: cert_chain.into(),
            private_key: private_key.into(),
            close_spread: DEFAULT_CLOSE_SPREAD,
            close_quiet: DEFAULT_CLOSE_QUIET,
            ticket_rotation: DEFAULT_TICKET_ROTATION,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            take_connections: true,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if !(MIN_TICKET_ROTATION..=MAX_TICKET_ROTATION).contains(&self.ticket_rotation) {
            return Err(Error::Tls(format!(
                "the ticket rotation period must be between {MIN_TICKET_ROTATION:?} and \
                 {MAX_TICKET_ROTATION:?} (tickets live up to twice that; TLS 1.3 allows 7 days), \
                 not {:?}",
                self.ticket_rotation
            )));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Error::Tls("the handshake timeout must not be zero".into()));
        }
        Ok(())
    }
}

/// Loaded TLS settings: the rustls configuration and the session-ticket
/// keys. Cheap to clone. Load it once per process (the ticket keys are one
/// piece of state) and use it on every TLS listener.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<TlsInner>,
}

pub(crate) struct TlsInner {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    pub(crate) config: TlsConfig,
    pub(crate) spread: Spread,
    pub(crate) counters: TlsCounters,
    /// TLS connections the previous generation hands over, until the first
    /// `serve_tls` takes them.
    moved: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<baton::OwnedConn>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Read the certificate chain and key, and take over the session-ticket
    /// keys of the previous generation (or make new ones in a first
    /// generation). Call it **before** [`Baton::ready`]: it asks the
    /// previous generation for its state (see [`Baton::import_raw`]), and it
    /// registers the ticket keys for export to the next generation.
    ///
    /// ```no_run
    /// # async fn f(baton: baton::Baton) {
    /// let tls = match baton_http::Tls::load(&baton, baton_http::TlsConfig::new("cert.pem", "key.pem")).await {
    ///     Ok(tls) => tls,
    ///     Err(e) => {
    ///         baton.fail(&e.to_string()).await; // the upgrade rolls back
    ///         std::process::exit(1);
    ///     }
    /// };
    /// # let _ = tls; }
    /// ```
    ///
    /// # Errors
    /// [`Error::Certificate`] / [`Error::PrivateKey`] for a missing or
    /// malformed file, [`Error::Tls`] for a key that does not match the
    /// certificate or a setting out of range, [`Error::TicketState`] for
    /// ticket keys from the previous generation that this build cannot read,
    /// [`Error::Baton`] if the state channel broke.
    ///
    /// # Cancel safety
    /// Not cancel safe: it may have asked the previous generation for state.
    pub async fn load(baton: &Baton, config: TlsConfig) -> Result<Tls, Error> {
        config.validate()?;
        let chain = read_cert_chain(&config.cert_chain)?;
        let key = read_private_key(&config.private_key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(format!("protocol versions: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                Error::Tls(format!(
                    "the certificate chain {} and the private key {} cannot be used together: {e}",
                    config.cert_chain.display(),
                    config.private_key.display()
                ))
            })?;
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        // Idle HTTP/1.1 connections move to the next generation with their
        // keys (see `conn.rs`).
        server.enable_secret_extraction = true;
        tracing::info!(
            cert = %config.cert_chain.display(),
            key = %config.private_key.display(),
            "TLS certificate loaded"
        );

        let now = tickets::now_ms();
        let ticketer = match baton.import_raw(TICKET_STATE_NAME).await? {
            Some(state) => {
                let t = Ticketer::import(config.ticket_rotation, &state, now)
                    .map_err(|e| Error::TicketState(e.to_string()))?;
                tracing::info!(
                    key_age_s = now.saturating_sub(t.current_created_ms()) / 1000,
                    "TLS session-ticket keys taken over from the previous generation"
                );
                t
            }
            None => Ticketer::new(config.ticket_rotation, now)
                .map_err(|e| Error::Tls(format!("making session-ticket keys: {e}")))?,
        };
        let ticketer = Arc::new(ticketer);
        server.ticketer = Arc::clone(&ticketer) as Arc<dyn rustls::server::ProducesTickets>;
        baton.export_raw(TICKET_STATE_NAME, move || {
            Ok(ticketer.export(tickets::now_ms()))
        });
        let counters = TlsCounters::register(baton)?;
        let moved =
            if config.take_connections {
                Some(baton.receive_owned_checked(conn::TLS_KIND, |c| {
                    session::parse(&c.state).map(drop)
                })?)
            } else {
                None
            };
        Ok(Tls {
            inner: Arc::new(TlsInner {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
                spread: Spread::new(config.close_spread),
                config,
                counters,
                moved: Mutex::new(moved),
            }),
        })
    }

    /// The settings it was loaded with.
    pub fn config(&self) -> &TlsConfig {
        &self.inner.config
    }

    pub(crate) fn inner(&self) -> &Arc<TlsInner> {
        &self.inner
    }
}

impl TlsInner {
    /// The connections handed over by the previous generation (once).
    pub(crate) fn take_moved(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<baton::OwnedConn>> {
        self.moved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let err = |reason: String| Error::Certificate {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(pem_error(&e)))?;
    if chain.is_empty() {
        return Err(err("no PEM CERTIFICATE block in it".into()));
    }
    Ok(chain)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let err = |reason: String| Error::PrivateKey {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => err(
            "no PEM private key block (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) in it"
                .into(),
        ),
        e => err(pem_error(&e)),
    })
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: a section has no \"-----END {}-----\" line (truncated file?)",
            String::from_utf8_lossy(end_marker)
        ),
        E::IllegalSectionStart { line } => format!(
            "not valid PEM: bad section start {:?}",
            String::from_utf8_lossy(line)
        ),
        e => format!("not valid PEM: {e}"),
    }
}

/// Hands out each draining connection its moment within the close spread.
///
/// The k-th connection gets `frac(k × φ)` of the window (φ the golden
/// ratio): any number of connections, without knowing how many, land
/// evenly spread, and no clock or random source is needed.
#[derive(Debug)]
pub(crate) struct Spread {
    window: Duration,
    next: AtomicU64,
}

impl Spread {
    fn new(window: Duration) -> Spread {
        Spread {
            window,
            next: AtomicU64::new(0),
        }
    }

    /// How long the next draining connection waits before it winds down.
    pub(crate) fn next_delay(&self) -> Duration {
        const PHI_FRAC: f64 = 0.618_033_988_749_894_9;
        let k = self.next.fetch_add(1, Ordering::Relaxed) % (1 << 20);
        self.window.mul_f64((k as f64 * PHI_FRAC).fract())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_spread_covers_its_window_evenly() {
        let s = Spread::new(Duration::from_secs(1));
        let mut d: Vec<Duration> = (0..20).map(|_| s.next_delay()).collect();
        assert_eq!(d[0], Duration::ZERO);
        assert!(d.iter().all(|x| *x < Duration::from_secs(1)));
        d.sort();
        // No gap between neighbours larger than 2/n of the window.
        let gaps = d.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(gaps <= Duration::from_millis(100), "{gaps:?}");
        assert!(*d.last().unwrap() > Duration::from_millis(900));
    }

    #[test]
    fn rotation_limits_are_checked() {
        let mut c = TlsConfig::new("c", "k");
        c.ticket_rotation = Duration::from_millis(10);
        assert!(c.validate().unwrap_err().to_string().contains("between"));
        c.ticket_rotation = Duration::from_secs(100 * 3600);
        assert!(c.validate().is_err());
        c.ticket_rotation = DEFAULT_TICKET_ROTATION;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn missing_and_malformed_files_name_the_file_and_the_problem() {
        let dir = std::env::temp_dir().join(format!("baton-http-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = read_cert_chain(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read it"),
            "{e}"
        );
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "this is not a certificate\n").unwrap();
        let e = read_cert_chain(&garbage).unwrap_err().to_string();
        assert!(e.contains("no PEM CERTIFICATE block"), "{e}");
        let e = read_private_key(&garbage).unwrap_err().to_string();
        assert!(e.contains("no PEM private key block"), "{e}");
        let truncated = dir.join("truncated.pem");
        std::fs::write(&truncated, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let e = read_cert_chain(&truncated).unwrap_err().to_string();
        assert!(
            e.contains("not valid PEM: a section has no \"-----END CERTIFICATE-----\" line"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

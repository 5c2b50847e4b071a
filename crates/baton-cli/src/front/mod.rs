//! `baton run --front http`: baton accepts the clients' HTTP connections
//! itself and forwards each request to the serving generation.
//!
//! The model: client connections belong to baton and never close because of
//! an upgrade. Each generation gets a private socket of its own (a
//! `127.0.0.1` port baton binds, passed at fd 3.. through `LISTEN_FDS`, so
//! the app is unchanged; the supervisor steers between the generations'
//! sockets exactly as it steers client connections without the front).
//! Upstream connections are pooled per *epoch*: the supervisor starts a new
//! epoch when it steers new connections to another generation, so a request
//! that starts after the switch opens or reuses a connection of the new
//! generation only.
//!
//! Invariants:
//! - an upstream connection of an old epoch is never given a new request:
//!   it finishes what it carries, then baton drops it (baton closes it, not
//!   the app);
//! - the supervisor stops the old generation only after the old epochs'
//!   upstream connections are idle ([`Front::wait_retired_idle`], bounded by
//!   `--drain-timeout`);
//! - a request that was never written upstream is retried on the current
//!   epoch; so is an idempotent request without a body that got no response
//!   byte; any other upstream failure is a 502.
//!
//! Cost: the front runs on the supervisor's one-thread tokio runtime (no
//! thread of its own); per client connection one hyper task and its
//! buffers, per upstream connection one more: about 24 KiB of RSS per idle
//! client connection with its pooled upstream one (measured once, debug
//! build, 500 connections; docs/supervisor.md).
//!
//! Files: `serve.rs` (the client side: accept, limits, hyper server),
//! `proxy.rs` (one request: headers, forwarding, retries), `pool.rs` (the
//! upstream connections per epoch), `carry.rs` (idle client connections
//! across `baton upgrade --self`).

pub mod carry;
mod pool;
mod proxy;
mod serve;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use pool::Pool;

/// Default `--front-header-timeout`: time a client has to send a request's
/// headers (also the longest idle time of a keep-alive connection between
/// requests).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--front-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `--front-upstream-idle`: an idle upstream connection older than
/// this is closed by baton rather than reused. Kept below the keep-alive
/// timeouts of common servers (gunicorn 2 s, Node 5 s) so that the app never
/// closes a connection baton is about to use.
pub const DEFAULT_UPSTREAM_IDLE: Duration = Duration::from_millis(1500);
/// Attempts for one request (the first and the retries).
pub const MAX_ATTEMPTS: u32 = 3;

/// The front's configuration.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// See [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// Client connections served at once; past it, baton stops accepting.
    pub max_connections: usize,
    /// See [`DEFAULT_UPSTREAM_IDLE`].
    pub upstream_idle: Duration,
    /// Keep the clients' `Forwarded` and `X-Forwarded-*` headers (baton is
    /// behind a proxy that sets them); otherwise they are removed. baton
    /// adds its own either way.
    pub trust_forwarded: bool,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            upstream_idle: DEFAULT_UPSTREAM_IDLE,
            trust_forwarded: false,
        }
    }
}

/// The front's counters (in `baton status`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests received from clients.
    pub requests: AtomicU64,
    /// Upstream failures (connect, reset, closed), retried or not.
    pub upstream_errors: AtomicU64,
    /// Requests sent again after an upstream failure.
    pub retries: AtomicU64,
    /// 502 responses (the request may have been processed).
    pub bad_gateway: AtomicU64,
    /// Client connections accepted.
    pub connections: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy)]
pub struct CountersView {
    /// See [`Counters::requests`].
    pub requests: u64,
    /// See [`Counters::upstream_errors`].
    pub upstream_errors: u64,
    /// See [`Counters::retries`].
    pub retries: u64,
    /// See [`Counters::bad_gateway`].
    pub bad_gateway: u64,
    /// See [`Counters::connections`].
    pub connections: u64,
    /// Upstream connections carrying a request now.
    pub upstream_busy: usize,
}

impl CountersView {
    /// For `baton run --metrics`: (name without `_total`, help, value).
    pub fn metrics(&self) -> Vec<(String, String, u64)> {
        [
            (
                "baton_front_requests",
                "Requests received from clients by --front",
                self.requests,
            ),
            (
                "baton_front_upstream_errors",
                "Upstream failures (connect, reset, closed), retried or not",
                self.upstream_errors,
            ),
            (
                "baton_front_retries",
                "Requests sent again after an upstream failure",
                self.retries,
            ),
            (
                "baton_front_bad_gateway",
                "502 answers: the request may have been processed",
                self.bad_gateway,
            ),
            (
                "baton_front_connections",
                "Client connections accepted by --front",
                self.connections,
            ),
        ]
        .into_iter()
        .map(|(n, h, v)| (n.to_owned(), h.to_owned(), v))
        .collect()
    }

    /// The line in `baton status`'s notes.
    pub fn note(&self) -> String {
        format!(
            "front: requests={} upstream_errors={} retries={} bad_gateway={} connections={} upstream_busy={}",
            self.requests,
            self.upstream_errors,
            self.retries,
            self.bad_gateway,
            self.connections,
            self.upstream_busy
        )
    }
}

/// The handle the supervisor holds (cheap to clone).
#[derive(Clone)]
pub struct Front {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: FrontConfig,
    counters: Counters,
    /// One pool per public listener, in the order of the listeners.
    pools: Vec<Pool>,
    epoch: AtomicU64,
    /// Every client connection, for `baton upgrade --self`.
    carry: Arc<carry::Registry>,
    /// Duplicates of the public listeners, carried by `--self`.
    public: Vec<OwnedFd>,
}

/// What the previous image of baton left to the front (`baton upgrade
/// --self`).
#[derive(Debug, Default)]
pub struct Resumed {
    /// Its upstream epoch.
    pub epoch: u64,
    /// Its counters: requests, upstream_errors, retries, bad_gateway,
    /// connections.
    pub counters: [u64; 5],
    /// Its idle client connections.
    pub conns: Vec<carry::Parked>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("cfg", &self.inner.cfg)
            .field("epoch", &self.inner.epoch.load(Ordering::Relaxed))
            .finish()
    }
}

impl Front {
    /// Start serving clients on `public` (listening sockets, one per
    /// listener), forwarding each listener's requests to its generation
    /// socket at `upstream` (same order). Spawns the accept loops on the
    /// current tokio runtime.
    ///
    /// # Errors
    ///
    /// A socket that tokio cannot register.
    pub fn start(
        cfg: FrontConfig,
        public: Vec<OwnedFd>,
        upstream: Vec<SocketAddr>,
        resumed: Resumed,
    ) -> anyhow::Result<Front> {
        let pools = upstream
            .iter()
            .map(|a| Pool::new(*a, cfg.upstream_idle))
            .collect();
        let [requests, upstream_errors, retries, bad_gateway, connections] =
            resumed.counters.map(AtomicU64::new);
        let kept = public
            .iter()
            .map(|fd| baton_sys::fd::dup(std::os::fd::AsFd::as_fd(fd)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let front = Front {
            inner: Arc::new(Inner {
                cfg,
                counters: Counters {
                    requests,
                    upstream_errors,
                    retries,
                    bad_gateway,
                    connections,
                },
                pools,
                epoch: AtomicU64::new(resumed.epoch),
                carry: Arc::default(),
                public: kept,
            }),
        };
        let mut conns = resumed.conns;
        for (i, fd) in public.into_iter().enumerate() {
            let mine;
            (mine, conns) = conns.into_iter().partition(|c| c.listener == i);
            serve::spawn_accept(front.clone(), i, fd, mine)?;
        }
        if !conns.is_empty() {
            tracing::warn!(
                count = conns.len(),
                "front: carried connections of a listener that no longer exists closed"
            );
        }
        Ok(front)
    }

    /// The connection registry `baton upgrade --self` freezes and carries.
    pub fn carry(&self) -> &carry::Registry {
        &self.inner.carry
    }

    /// The public listening sockets (to carry across `--self`).
    pub fn public_fds(&self) -> &[OwnedFd] {
        &self.inner.public
    }

    /// The upstream epoch and the counters (to carry across `--self`).
    pub fn carried_numbers(&self) -> (u64, [u64; 5]) {
        let c = self.counters();
        (
            self.epoch(),
            [
                c.requests,
                c.upstream_errors,
                c.retries,
                c.bad_gateway,
                c.connections,
            ],
        )
    }

    /// A new epoch: the supervisor steered new connections to another
    /// generation. Upstream connections opened before are not reused.
    pub fn switch(&self) {
        let e = self.inner.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        for p in &self.inner.pools {
            p.retire_before(e);
        }
        tracing::info!(epoch = e, "front: new requests go to the new generation");
    }

    /// Wait until no upstream connection of an earlier epoch carries a
    /// request, at most `limit`. Returns whether they are idle.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn wait_retired_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        for p in &self.inner.pools {
            if !p.wait_retired_idle(deadline).await {
                return false;
            }
        }
        true
    }

    /// The counters now.
    pub fn counters(&self) -> CountersView {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersView {
            requests: l(&c.requests),
            upstream_errors: l(&c.upstream_errors),
            retries: l(&c.retries),
            bad_gateway: l(&c.bad_gateway),
            connections: l(&c.connections),
            upstream_busy: self.inner.pools.iter().map(Pool::busy).sum(),
        }
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }
}

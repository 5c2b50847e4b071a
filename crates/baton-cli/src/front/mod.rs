//! `baton run --front http`: baton accepts the clients' HTTP connections
//! itself and forwards each request to the serving generation.
//!
//! The model: client connections belong to baton and never close because of
//! an upgrade. Each generation gets a private socket of its own (a
//! `127.0.0.1` port baton binds, passed at fd 3.. through `LISTEN_FDS`, so
//! the app is unchanged; the supervisor steers between the generations'
//! sockets exactly as it steers client connections without the front).
//! With `--front-upstream unix` it is a Unix stream socket at a path of
//! its generation's own instead, and the steering is the pool's choice of
//! path at connect ([`Target`]): fewer kernel hops per request.
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
//!   upstream connections are idle and their tunnels closed
//!   ([`Front::wait_retired_idle`], bounded by `--drain-timeout`; tunnels
//!   still open then are counted);
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
//! Upgrade requests (WebSocket) are forwarded with their `Upgrade` header;
//! after the app's `101` the two connections are spliced into a tunnel
//! that stays on that generation until it closes; the supervisor waits for
//! the old epochs' tunnels like for their requests (`tunnel.rs`). A tunnel
//! costs one task and two copy buffers (8 KiB each).
//!
//! The stop ([`Front::shutdown`]): listeners closed after what is queued is
//! served, idle client connections closed, requests finished (bounded);
//! then the app is stopped, and closes its own WebSockets.
//!
//! Files: `serve.rs` (the client side: accept, hyper server, the graceful
//! stop), `proxy.rs` (one request: headers, forwarding, retries,
//! upgrades), `pool.rs` (the upstream connections per epoch), `tunnel.rs`
//! (upgraded connections), `limits.rs` (the body size limit and the
//! lingering close after a `413`), `carry.rs` (idle client connections
//! across `baton upgrade --self`).

pub mod carry;
mod limits;
mod pool;
mod proxy;
mod serve;
mod trim;
mod tunnel;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use pool::{Pool, Target};

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
/// Default `--front-max-body`: larger request bodies get `413`.
pub const DEFAULT_MAX_BODY: u64 = 1 << 30;
/// Default `--front-max-header`: a larger request head (request line and
/// headers) gets `431`.
pub const DEFAULT_MAX_HEADER: usize = 64 << 10;
/// The smallest `--front-max-header` (hyper's smallest read buffer).
pub const MIN_MAX_HEADER: usize = 8 << 10;
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
    /// See [`DEFAULT_MAX_BODY`].
    pub max_body: u64,
    /// See [`DEFAULT_MAX_HEADER`] (at least [`MIN_MAX_HEADER`]).
    pub max_header: usize,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            upstream_idle: DEFAULT_UPSTREAM_IDLE,
            trust_forwarded: false,
            max_body: DEFAULT_MAX_BODY,
            max_header: DEFAULT_MAX_HEADER,
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
    /// Upgraded connections (WebSocket) opened.
    pub tunnels_opened: AtomicU64,
    /// Upgraded connections closed (by either side, or by baton).
    pub tunnels_closed: AtomicU64,
    /// Tunnels of an old generation still open when `--drain-timeout`
    /// expired (the generation was stopped under them).
    pub tunnels_closed_at_drain: AtomicU64,
    /// `413` answers (`--front-max-body`).
    pub body_too_large: AtomicU64,
    /// `431` answers (`--front-max-header`).
    pub header_too_large: AtomicU64,
    /// Connections closed for want of a request head within
    /// `--front-header-timeout` (idle keep-alive ones included).
    pub header_timeouts: AtomicU64,
    /// Client connections and tunnels still open when the front's stop
    /// reached `--drain-timeout` (closed then).
    pub closed_at_stop: AtomicU64,
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
    /// See [`Counters::tunnels_opened`].
    pub tunnels_opened: u64,
    /// See [`Counters::tunnels_closed`].
    pub tunnels_closed: u64,
    /// Tunnels open now.
    pub tunnels_open: usize,
    /// See [`Counters::tunnels_closed_at_drain`].
    pub tunnels_closed_at_drain: u64,
    /// See [`Counters::body_too_large`].
    pub body_too_large: u64,
    /// See [`Counters::header_too_large`].
    pub header_too_large: u64,
    /// See [`Counters::header_timeouts`].
    pub header_timeouts: u64,
    /// See [`Counters::closed_at_stop`].
    pub closed_at_stop: u64,
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
            (
                "baton_front_tunnels_opened",
                "Upgraded connections (WebSocket) opened through --front",
                self.tunnels_opened,
            ),
            (
                "baton_front_tunnels_closed",
                "Upgraded connections closed (open = opened - closed)",
                self.tunnels_closed,
            ),
            (
                "baton_front_tunnels_closed_at_drain",
                "Tunnels of an old generation still open when --drain-timeout expired",
                self.tunnels_closed_at_drain,
            ),
            (
                "baton_front_body_too_large",
                "413 answers: request body over --front-max-body",
                self.body_too_large,
            ),
            (
                "baton_front_header_too_large",
                "431 answers: request head over --front-max-header",
                self.header_too_large,
            ),
            (
                "baton_front_header_timeouts",
                "Client connections closed without a request head within --front-header-timeout",
                self.header_timeouts,
            ),
            (
                "baton_front_closed_at_stop",
                "Client connections and tunnels closed when baton's stop reached --drain-timeout",
                self.closed_at_stop,
            ),
        ]
        .into_iter()
        .map(|(n, h, v)| (n.to_owned(), h.to_owned(), v))
        .collect()
    }

    /// The line in `baton status`'s notes.
    pub fn note(&self) -> String {
        format!(
            "front: requests={} upstream_errors={} retries={} bad_gateway={} connections={} upstream_busy={} \
             tunnels_open={} tunnels_opened={} tunnels_closed_at_drain={} body_too_large={} \
             header_too_large={} header_timeouts={} closed_at_stop={}",
            self.requests,
            self.upstream_errors,
            self.retries,
            self.bad_gateway,
            self.connections,
            self.upstream_busy,
            self.tunnels_open,
            self.tunnels_opened,
            self.tunnels_closed_at_drain,
            self.body_too_large,
            self.header_too_large,
            self.header_timeouts,
            self.closed_at_stop
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
    tunnels: tunnel::Tunnels,
    /// Client connections being served.
    live: serve::Live,
    /// The front's stop began: accept no more, close idle connections.
    stop: CancellationToken,
    /// The stop's deadline passed: close every client connection.
    cut: CancellationToken,
    /// Every client connection, for `baton upgrade --self`.
    carry: Arc<carry::Registry>,
    /// Duplicates of the public listeners, carried by `--self` (dropped at
    /// the stop, so that the accept loops closing theirs closes them).
    public: std::sync::Mutex<Vec<OwnedFd>>,
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
    /// sockets at `upstream` (same order; loopback TCP, or Unix with
    /// `--front-upstream unix`). Spawns the accept loops on the
    /// current tokio runtime.
    ///
    /// # Errors
    ///
    /// A socket that tokio cannot register.
    pub fn start(
        cfg: FrontConfig,
        public: Vec<OwnedFd>,
        upstream: Vec<Target>,
        resumed: Resumed,
    ) -> anyhow::Result<Front> {
        let pools = upstream
            .into_iter()
            .map(|t| Pool::new(t, cfg.upstream_idle))
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
                    ..Counters::default()
                },
                pools,
                epoch: AtomicU64::new(resumed.epoch),
                tunnels: tunnel::Tunnels::default(),
                live: serve::Live::default(),
                stop: CancellationToken::new(),
                cut: CancellationToken::new(),
                carry: Arc::default(),
                public: std::sync::Mutex::new(kept),
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
        for p in &front.inner.pools {
            p.spawn_sweeper();
        }
        trim::spawn(front.clone(), front.inner.cfg.upstream_idle);
        Ok(front)
    }

    /// The connection registry `baton upgrade --self` freezes and carries.
    pub fn carry(&self) -> &carry::Registry {
        &self.inner.carry
    }

    /// Duplicates of the public listening sockets (to carry across
    /// `--self`).
    ///
    /// # Errors
    /// Out of fds.
    pub fn public_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.inner
            .public
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|fd| baton_sys::fd::dup(std::os::fd::AsFd::as_fd(fd)))
            .collect()
    }

    /// The addresses of the public listeners, in listener order (for
    /// status).
    pub fn public_addrs(&self) -> Vec<String> {
        self.inner
            .public
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|fd| {
                baton_sys::socket::tcp_local_addr(std::os::fd::AsFd::as_fd(fd))
                    .map_or_else(|e| format!("? ({e})"), |a| a.to_string())
            })
            .collect()
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
    /// request and no tunnel of an earlier epoch is open, at most `limit`.
    /// Returns whether they are all done; if not, the caller counts the
    /// tunnels left ([`Front::tunnels_past_drain`]), stops their
    /// generation, then calls [`Front::close_retired_tunnels`].
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
        // A tunnel comes from a busy upstream connection: once those are
        // idle, no tunnel of an old epoch can open.
        self.inner
            .tunnels
            .wait_closed_before(self.epoch(), deadline)
            .await
    }

    /// Tunnels of the earlier epochs open now.
    pub fn retired_tunnels(&self) -> usize {
        self.inner.tunnels.open_before(self.epoch())
    }

    /// The drain gave up on the old generation: count the tunnels of the
    /// earlier epochs still open (`tunnels_closed_at_drain`) and return
    /// how many.
    pub fn tunnels_past_drain(&self) -> usize {
        let open = self.inner.tunnels.open_before(self.epoch());
        if open > 0 {
            self.inner
                .counters
                .tunnels_closed_at_drain
                .fetch_add(open as u64, Ordering::Relaxed);
            tracing::warn!(
                tunnels = open,
                "front: upgraded connections (WebSocket) still open on the old generation after --drain-timeout; it is stopped under them"
            );
        }
        open
    }

    /// Close the tunnels of the earlier epochs (their generation has
    /// exited). Returns how many were still open.
    pub fn close_retired_tunnels(&self) -> usize {
        self.inner.tunnels.cut_before(self.epoch())
    }

    /// The front's graceful stop: accept no more (what is queued is served
    /// one request), close idle client connections, let requests finish
    /// until `limit` (or `hurry`), then close the rest. Tunnels run on:
    /// the app closes them with its protocol's close when it is stopped,
    /// then [`Front::close_tunnels`]. Returns how many connections were
    /// closed at the deadline.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, but the stop has begun: accepting does not resume.
    pub async fn shutdown(&self, limit: Duration, hurry: &CancellationToken) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        // The accept loops close their listeners: these copies must not
        // keep them open.
        self.inner
            .public
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        serve::shutdown(self, deadline, hurry).await
    }

    /// Close every tunnel still open (the app has exited: baton stops).
    /// Counted in `closed_at_stop`; returns how many.
    pub fn close_tunnels(&self) -> usize {
        let n = self.inner.tunnels.cut_before(u64::MAX);
        self.inner
            .counters
            .closed_at_stop
            .fetch_add(n as u64, Ordering::Relaxed);
        n
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
            tunnels_opened: l(&c.tunnels_opened),
            tunnels_closed: l(&c.tunnels_closed),
            tunnels_open: self.inner.tunnels.open(),
            tunnels_closed_at_drain: l(&c.tunnels_closed_at_drain),
            body_too_large: l(&c.body_too_large),
            header_too_large: l(&c.header_too_large),
            header_timeouts: l(&c.header_timeouts),
            closed_at_stop: l(&c.closed_at_stop),
        }
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }
}

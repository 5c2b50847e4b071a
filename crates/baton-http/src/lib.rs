//! # baton-http — serve HTTP across upgrades without dropping a request
//!
//! A hyper 1 serving loop for [`baton`]: HTTP/1.1 and HTTP/2 (prior
//! knowledge) on the same listener, and when the generation drains:
//!
//! * **idle HTTP/1.1 keep-alive connections move to the new generation** at
//!   their next request boundary — the socket plus any bytes of the next
//!   request already read. The client keeps its TCP connection; its next
//!   response comes from the new version. No `Connection: close`, no reset.
//! * connections busy with a request finish it here, then move;
//! * HTTP/2 connections get a two-phase GOAWAY and finish their streams;
//! * WebSockets served through [`ws::Endpoint`] move to the new generation
//!   at a message boundary, with their unread bytes and the application's
//!   state for them; those that cannot move get a close frame with code
//!   1012 at the drain deadline ([`ws`]);
//! * other upgraded connections stay here until they close or the drain
//!   deadline passes;
//! * with no successor taking connections (a plain stop, or a successor
//!   that does not use baton-http), in-flight responses carry
//!   `Connection: close`.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use baton::{Baton, Config};
//! use http_body_util::Full;
//! use hyper::{Request, Response, body::{Bytes, Incoming}, service::service_fn};
//!
//! # async fn run() -> Result<(), baton::Error> {
//! let baton = Baton::start(Config::default()).await?;
//! let svc = service_fn(|_req: Request<Incoming>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
//! });
//! let server = baton_http::Server::new(&baton, svc); // before ready()
//! server.serve(baton.listen("http", &"127.0.0.1:8080".parse()?)?);
//! baton.ready().await?;
//! baton.done().await;
//! # Ok(()) }
//! ```
//!
//! ## HTTPS (feature `tls`)
//!
//! `Server::serve_tls` serves a listener over TLS with rustls: ALPN `h2`
//! and `http/1.1`, certificates read afresh by each generation
//! (`Tls::load`), session-ticket keys carried to the next generation in
//! memory so clients resume their sessions after an upgrade. An idle
//! HTTP/1.1 TLS connection moves to the new generation with its session
//! keys (no new handshake) and is served there on baton's own record layer;
//! HTTP/2 over TLS finishes on the old generation, closing politely at a
//! moment spread over `TlsConfig::close_spread`. The `tls` module tells the
//! whole story.
//!
//! An axum `Router` is served through
//! `hyper_util::service::TowerToHyperService::new(router)` (see the README
//! and `examples/axum.rs`).
//!
//! ## How "idle" is decided
//!
//! hyper cannot say whether a connection is between requests, and
//! `graceful_shutdown` on a busy connection adds `Connection: close`. So a
//! service wrapper counts requests in flight (from the call until hyper
//! drops the response body), the I/O wrapper records whether hyper's writes
//! are flushed and whether its last read found nothing, and the connection
//! task checks all three right after hyper returned `Pending`, in the same
//! poll, before detaching with `into_parts()`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod conn;
mod count;
mod error;
mod io;
#[cfg(feature = "tls")]
pub mod tls;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use baton::{Baton, Listener, StreamAddr};
use hyper::server::conn::http1;

pub use error::Error;
pub use hyper_util::service::TowerToHyperService;

/// A boxed error, as hyper takes them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`Server`] serves: a hyper service of `Request<Incoming>` whose
/// future and response body can move between threads. Implemented for every
/// such service (an axum `Router` through [`TowerToHyperService`]); it only
/// names the bounds once.
pub trait HttpService:
    hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<Self::ResBody>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
    /// The response body.
    type ResBody: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HttpService for S
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type ResBody = B;
}
#[cfg(feature = "tls")]
pub use tls::{
    DEFAULT_CLOSE_QUIET, DEFAULT_CLOSE_SPREAD, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_TICKET_ROTATION,
    MAX_TICKET_ROTATION, MIN_TICKET_ROTATION, TICKET_STATE_NAME, TLS_KIND, Tls, TlsConfig,
};

/// Facts about the connection a request arrived on, in the request's
/// extensions.
///
/// ```
/// # fn f(req: &http::Request<()>) {
/// if let Some(info) = req.extensions().get::<baton_http::ConnInfo>() {
///     println!("{} via {} (handed over: {}, TLS: {})", info.peer_string(), info.listener, info.handed_over, info.tls);
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: Option<StreamAddr>,
    /// The listener it arrived on (shared: cloning a `ConnInfo` into every
    /// request's extensions allocates nothing).
    pub listener: Arc<str>,
    /// It was accepted by a previous generation and handed to this one.
    pub handed_over: bool,
    /// It is a TLS connection (`handed_over` too: it moved with its
    /// session keys).
    pub tls: bool,
}

impl ConnInfo {
    /// The peer address as a string (`-` if unknown).
    pub fn peer_string(&self) -> String {
        self.peer
            .as_ref()
            .map_or_else(|| "-".into(), ToString::to_string)
    }
}

pub(crate) struct Shared<S> {
    pub(crate) baton: Baton,
    pub(crate) service: S,
    pub(crate) h1: http1::Builder,
    pub(crate) in_flight: Arc<baton::Activity>,
}

/// Serves a hyper service on baton listeners and on connections handed
/// over by the previous generation. Cheap to clone.
pub struct Server<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Server<S> {
    fn clone(&self) -> Self {
        Server {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl<S> Server<S>
where
    S: HttpService,
{
    /// Create the server. Call it **before** [`Baton::ready`]: it takes the
    /// stream of handed-over connections, which tells the old generation
    /// that this one accepts them. Must run inside a tokio runtime.
    pub fn new(baton: &Baton, service: S) -> Self {
        let mut h1 = http1::Builder::new();
        h1.keep_alive(true);
        let shared = Arc::new(Shared {
            baton: baton.clone(),
            service,
            h1,
            in_flight: baton.activity(),
        });
        if let Some(mut incoming) = baton.take_incoming() {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                while let Some(c) = incoming.recv().await {
                    let info = ConnInfo {
                        peer: c.stream.peer_addr().ok(),
                        listener: Arc::from(c.listener.as_str()),
                        handed_over: true,
                        tls: false,
                    };
                    // TCP_NODELAY is a socket option: the generation that
                    // accepted the connection already set it.
                    let shared2 = Arc::clone(&shared);
                    shared
                        .baton
                        .tracker()
                        .spawn(conn::serve(shared2, c.stream, c.prefix, info));
                }
            });
        }
        Server { shared }
    }

    /// Accept and serve connections on `listener` (in a background task)
    /// while this generation serves.
    pub fn serve(&self, listener: Listener) {
        self.accept_loop(listener, |shared, stream, info| {
            let tracker = shared.baton.tracker().clone();
            tracker.spawn(conn::serve(shared, stream, Vec::new(), info));
        });
    }

    /// Accept connections on `listener` and serve them over TLS (in a
    /// background task) while this generation serves. HTTP/2 or HTTP/1.1 is
    /// chosen by ALPN. Idle HTTP/1.1 connections move to the successor
    /// with their session keys; the first call also serves those the
    /// previous generation handed over (see [`Tls`]). HTTP/2 ones finish
    /// here when the generation drains.
    #[cfg(feature = "tls")]
    pub fn serve_tls(&self, listener: Listener, tls: &Tls) {
        let tls = Arc::clone(tls.inner());
        if let Some(mut moved) = tls.take_moved() {
            let (shared, tls) = (Arc::clone(&self.shared), Arc::clone(&tls));
            tokio::spawn(async move {
                while let Some(c) = moved.recv().await {
                    let info = ConnInfo {
                        peer: c.stream.peer_addr().ok(),
                        listener: Arc::from(c.listener.as_str()),
                        handed_over: true,
                        tls: true,
                    };
                    let tracker = shared.baton.tracker().clone();
                    tracker.spawn(tls::serve_moved(
                        Arc::clone(&shared),
                        Arc::clone(&tls),
                        c,
                        info,
                    ));
                }
            });
        }
        self.accept_loop(listener, move |shared, stream, mut info| {
            info.tls = true;
            let tracker = shared.baton.tracker().clone();
            tracker.spawn(tls::serve(shared, Arc::clone(&tls), stream, info));
        });
    }

    fn accept_loop(
        &self,
        listener: Listener,
        on_conn: impl Fn(Arc<Shared<S>>, baton::Stream, ConnInfo) + Send + 'static,
    ) {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let name: Arc<str> = Arc::from(listener.name());
            let mut last_error_log = None::<tokio::time::Instant>;
            while let Some(res) = listener.accept().await {
                match res {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let info = ConnInfo {
                            peer: Some(peer),
                            listener: name.clone(),
                            handed_over: false,
                            tls: false,
                        };
                        on_conn(Arc::clone(&shared), stream, info);
                    }
                    Err(e) => {
                        // EMFILE and friends: log at most once a second, back
                        // off a little, keep going.
                        let now = tokio::time::Instant::now();
                        if last_error_log.is_none_or(|t| now - t > Duration::from_secs(1)) {
                            tracing::warn!(listener = %name, error = %e, "accept failed");
                            last_error_log = Some(now);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
}

//! # baton — pass the baton, don't drop it
//!
//! baton lets a tokio server replace its own binary while it runs, with no
//! refused connection, no failed request and no lost state.
//!
//! ## The model
//!
//! A running server is a *generation*. On `SIGUSR2`, a control-socket
//! request (`baton upgrade --control PATH`) or [`Baton::upgrade`], the
//! serving generation starts the executable on disk (the new version, with
//! `posix_spawn`: no copy of the address space)
//! and talks to it over a private `SOCK_SEQPACKET` socketpair:
//!
//! 1. it passes its listening sockets — the *same kernel sockets*, never
//!    re-bound, so the accept queue is never dropped;
//! 2. the new generation initializes, optionally asks for state, and says
//!    `Ready` (or `Failed`) within the readiness timeout;
//! 3. the old generation answers `Promote` — the single commit point: only
//!    now does the new one accept;
//! 4. the old generation stops accepting, hands its idle keep-alive
//!    connections over — and the connections the application owns
//!    (WebSockets, its own protocols) at their next message boundary, with
//!    their unread bytes and a state blob ([`Baton::hand_over_owned`],
//!    [`Baton::receive_owned`]) — lets busy ones finish, and exits.
//!
//! If the new generation exits, fails, hangs, or dies during the drain, the
//! old one kills and reaps it and keeps (or resumes) serving.
//!
//! ## Invariants
//!
//! * At every instant some live process holds every listening socket: an old
//!   generation keeps its copies until it exits, even after promotion.
//! * At most one upgrade is in flight. One task owns upgrade state; a second
//!   request is answered "in progress". A promoted generation refuses to
//!   upgrade until its predecessor is gone.
//! * A failed upgrade leaves the service as it was: same generation serving,
//!   no leftover child, the reason reported to whoever asked.
//! * Every wait has a timeout with a name and a default
//!   ([`DEFAULT_READY_TIMEOUT`], [`DEFAULT_DRAIN_TIMEOUT`],
//!   [`DEFAULT_HANDOFF_ACK_TIMEOUT`]).
//! * Every fd baton creates is `CLOEXEC` unless it is deliberately placed in
//!   a child.
//!
//! ## Example
//!
//! ```no_run
//! use baton::{Baton, Config, ListenAddr};
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> Result<(), baton::Error> {
//!     let mut config = Config::default();
//!     config.pid_file = Some("/run/app.pid".into());
//!     let baton = Baton::start(config).await?;
//!     let listener = baton.listen("http", &"127.0.0.1:8080".parse::<ListenAddr>()?)?;
//!     // Serve: accept() yields connections only while this generation serves.
//!     let b = baton.clone();
//!     tokio::spawn(async move {
//!         while let Some(Ok((stream, _peer))) = listener.accept().await {
//!             b.tracker().spawn(async move { drop(stream) });
//!         }
//!     });
//!     baton.ready().await?; // commit point in a new generation
//!     baton.done().await;   // after a successful upgrade (or a stop)
//!     Ok(())
//! }
//! ```
//!
//! For HTTP, the `baton-http` crate serves hyper/axum services with drain and
//! idle keep-alive handoff built in, and WebSockets that move (`baton_http::ws`).
//! `examples/line_counter.rs` moves the connections of a line-based TCP
//! protocol with the same API.
//!
//! ## Gotchas
//!
//! * Install every signal handler before [`Baton::ready`]: a deploy script
//!   may signal the moment the pid file changes.
//! * The executable is resolved once, at start-up, from argv\[0\] (made
//!   absolute, *not* symlink-resolved): replace the file (or flip the
//!   `current` symlink) and signal.
//! * [`Listener::accept`] waits while the generation is not serving; spawn
//!   connection tasks on [`Baton::tracker`] so the drain can wait for them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod carry;
mod channel;
mod config;
pub mod control;
mod error;
mod generation;
mod handoff;
mod inner;
mod lifecycle;
mod listeners;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod notify;
pub mod observe;
mod pid_file;
pub mod probe;
pub mod protocol;
pub mod spawn;
pub mod state;
pub mod trace;
mod upgrade;

pub use config::{
    Config, DEFAULT_BACKLOG, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HANDOFF_ACK_TIMEOUT,
    DEFAULT_HEALTH_INTERVAL, DEFAULT_LISTENER_NAME, DEFAULT_NEWCOMER_OOM_SCORE_ADJ,
    DEFAULT_READY_TIMEOUT, DEFAULT_STATE_LIMIT, HandoffHook, HandoffPoint, ListenAddr, ListenSpec,
    name_listeners, parse_bytes, parse_duration, validate_listener_name,
};
pub use control::{UpgradeOptions, UpgradeReport};
pub use error::Error;
pub use generation::Baton;
pub use handoff::HandoffConn;
pub use handoff::owned::{OWNED_CLOSE_GRACE, OwnedCheck, OwnedConn, OwnedGuard};
pub use lifecycle::{Activity, ConnectionToken, DrainSignal, Phase, PhaseCell};
pub use listeners::{
    ListenFds, Listener, ListenerInfo, Stream, StreamAddr, bind_unix as bind_unix_listener,
};
pub use pid_file::write_pid_file;
pub use spawn::{
    ChildProcess, ENV_HANDOFF_FD, ENV_OOM_SCORE_ADJ, ENV_PARENT_PID, OsSpawner, SpawnSpec, Spawner,
};
pub use state::{Schema, StateMode};

//! [`Baton`]: this process's generation, and the handle the application
//! holds.
//!
//! Start-up (the inherited handoff channel, systemd's listeners, the
//! `SIGUSR2` handler, the control socket) is in `start.rs`; state export
//! and import on the handle in `state.rs`. The shared state behind the
//! handle is [`Inner`](crate::inner).

mod owned;
mod start;
mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenAddr};
use crate::control::{
    Command, Counters, Event, Failure, StatusReport, UpgradeOptions, UpgradeReport,
};
use crate::error::Error;
use crate::handoff::HandoffConn;
use crate::handoff::recv::{PeerEvent, Promotion};
use crate::inner::{Inner, lock};
use crate::lifecycle::{Activity, ConnectionToken, DrainSignal, Phase, PhaseCell};
use crate::listeners::Listener;
use crate::protocol::{Accepts, ReadyInfo};
use crate::spawn::ENV_OOM_SCORE_ADJ;

/// This process's generation: its listeners, its upgrade machinery, its
/// lifecycle. Cheap to clone.
///
/// See the [crate documentation](crate) for the model and a full example.
#[derive(Debug, Clone)]
pub struct Baton {
    pub(crate) inner: Arc<Inner>,
}

impl Baton {
    /// This generation's number (1 for a fresh start, +1 per upgrade).
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The previous generation's pid, if this process was started by an
    /// upgrade.
    pub fn predecessor_pid(&self) -> Option<u32> {
        self.inner.predecessor_pid
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.inner.life.phase()
    }

    /// Get the listener `name`: the previous generation's socket if it had
    /// one by that name, else systemd's, else a new socket bound to `addr`.
    ///
    /// Must be called inside a tokio runtime. Each name can be taken once.
    ///
    /// # Errors
    /// Binding failed (address in use, permission), or the inherited socket
    /// does not match the kind asked for.
    pub fn listen(&self, name: &str, addr: &ListenAddr) -> Result<Listener, Error> {
        crate::config::validate_listener_name(name)?;
        let (kind, fd, _) = self.inner.registry.take_or_bind(name, addr, None, false)?;
        Listener::new(name, kind, fd, self.inner.life.gate())
    }

    /// [`listen`](Baton::listen) for a [`ListenSpec`](crate::ListenSpec). A listener named by
    /// baton from its address ([`crate::name_listeners`]) must find an
    /// inherited socket of that name at that very address: another address
    /// is an error, where an explicitly named listener keeps the inherited
    /// socket with a warning.
    ///
    /// # Errors
    /// As [`listen`](Baton::listen), and the address check above.
    pub fn listen_spec(&self, spec: &crate::ListenSpec) -> Result<Listener, Error> {
        crate::config::validate_listener_name(&spec.name)?;
        let derived = !spec.named && spec.name != crate::DEFAULT_LISTENER_NAME;
        let (kind, fd, _) = self
            .inner
            .registry
            .take_or_bind(&spec.name, &spec.addr, None, derived)?;
        Listener::new(&spec.name, kind, fd, self.inner.life.gate())
    }

    /// Take every listening socket this generation inherited and has not
    /// taken by name yet: the ones systemd passed (`LISTEN_FDS`, whatever
    /// their `FileDescriptorName=`) on a first start, the previous
    /// generation's at an upgrade. For a program that serves whatever it is
    /// given (no addresses of its own); each [`Listener`] keeps its name.
    ///
    /// ```no_run
    /// # async fn f(baton: baton::Baton) -> Result<(), baton::Error> {
    /// let mut listeners = baton.listen_inherited()?;
    /// if listeners.is_empty() {
    ///     listeners.push(baton.listen("http", &"127.0.0.1:8080".parse()?)?);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Duplicating a socket failed.
    pub fn listen_inherited(&self) -> Result<Vec<Listener>, Error> {
        self.inner
            .registry
            .take_inherited()?
            .into_iter()
            .map(|(name, kind, fd)| Listener::new(&name, kind, fd, self.inner.life.gate()))
            .collect()
    }

    /// Describe the listeners (name, address, origin).
    pub fn listeners(&self) -> Vec<crate::listeners::ListenerInfo> {
        self.inner.registry.describe()
    }

    /// Say this generation is ready to serve.
    ///
    /// First generation: starts accepting, writes the pid file and tells
    /// systemd `READY=1`. New generation: reports `Ready` to the old one and
    /// waits for `Promote` (the commit point) before accepting; then writes
    /// the pid file. Install every signal handler you need *before* calling
    /// this.
    ///
    /// # Errors
    /// The old generation refused or the channel broke; the process should
    /// exit (the old generation keeps serving).
    ///
    /// # Cancel safety
    /// Not cancel safe: call it once and await it.
    pub async fn ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        crate::trace::step("new: ready() called");
        if inner.life.phase() != Phase::Starting {
            return Err(Error::Config("ready() was already called".into()));
        }
        // A socket systemd passed and this program does not use is a
        // configuration error, not something to close quietly: closing it
        // would lose what the kernel queued on it.
        let unused = inner.registry.unused_systemd();
        if !unused.is_empty() {
            let list: Vec<String> = unused
                .iter()
                .map(|(name, addr)| format!("'{name}' ({addr})"))
                .collect();
            return Err(Error::Config(format!(
                "systemd passed listening sockets this program does not use: {}; name each one \
                 (FileDescriptorName= in its .socket unit, or systemd-socket-activate \
                 --fdname) after a listener this program opens, or serve them all \
                 (Baton::listen_inherited)",
                list.join(", ")
            )));
        }
        if inner.predecessor_pid.is_some() {
            match self.import_raw(crate::carry::BLOB).await {
                Ok(Some(b)) => match postcard::from_bytes::<crate::carry::Carried>(&b) {
                    Ok(c) => inner.apply_carried(&c),
                    Err(e) => tracing::warn!(error = %e, "ignoring unreadable carried counters"),
                },
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let side = inner.predecessor.lock().await.take();
        // No receiver of owned connections can be registered from now on.
        let owned = lock(&inner.owned_sinks).take().unwrap_or_default();
        lock(&inner.owned_sinks_live).clone_from(&owned);
        match side {
            Some(side) => {
                let accepts_conns = inner.incoming_taken.load(Ordering::SeqCst);
                let accepts = Accepts {
                    owned_kinds: owned.iter().map(|s| s.kind.clone()).collect(),
                };
                let limit = inner.config.ready_timeout + Duration::from_secs(10);
                let how = side
                    .ready(ReadyInfo { accepts_conns }, accepts, limit, || {
                        inner
                            .config
                            .run_hook(crate::config::HandoffPoint::ReadySent);
                    })
                    .await?;
                inner.life.set(Phase::Serving);
                crate::trace::step("new: accept open (serving)");
                inner.registry.drop_unused();
                let provisional = match how {
                    Promotion::PredecessorGone => {
                        tracing::warn!(
                            previous_pid = side.peer.pid,
                            "the previous generation vanished before promoting us; serving anyway"
                        );
                        false
                    }
                    Promotion::Promoted { provisional } => {
                        side.confirm_serving().await;
                        tracing::info!(
                            generation = inner.generation,
                            pid = inner.pid,
                            previous_pid = side.peer.pid,
                            provisional,
                            "promoted: serving"
                        );
                        provisional
                    }
                };
                if !provisional {
                    self.write_pid_file();
                    crate::trace::step("new: pid file written");
                }
                inner.config.run_hook(crate::config::HandoffPoint::Promoted);
                // A clone: the same queue takes connections a rolled-back
                // successor gives back, when this generation is the old one.
                let deliver = if accepts_conns {
                    lock(&inner.incoming_tx).clone()
                } else {
                    None
                };
                let received = (
                    Arc::clone(&inner.counters.conns_received),
                    Arc::clone(&inner.counters.conns_received_prefix_bytes),
                );
                let alive = inner.predecessor_alive.clone();
                let (etx, mut erx) = mpsc::unbounded_channel();
                let activity = Arc::clone(&inner.activity);
                tokio::spawn(async move {
                    side.receive_connections(deliver, owned, received, activity, etx)
                        .await;
                    alive.send_replace(false);
                    restore_oom_score_adj();
                });
                let me = self.clone();
                tokio::spawn(async move {
                    while let Some(ev) = erx.recv().await {
                        match ev {
                            PeerEvent::Commit => {
                                tracing::info!("the previous generation committed the upgrade");
                                me.write_pid_file();
                            }
                            PeerEvent::Done(r) => {
                                me.inner.record_done(&r);
                            }
                            PeerEvent::Demote(reason) => {
                                tracing::warn!(%reason, "demoted by the previous generation: stopping gracefully");
                                me.shutdown().await;
                            }
                            PeerEvent::GiveBack(g, chan) => {
                                tracing::warn!(reason = %g.reason, "demoted by the previous generation: giving the connections back, then stopping");
                                crate::upgrade::give_back(Arc::clone(&me.inner), chan, g).await;
                            }
                        }
                    }
                });
            }
            None => {
                inner.life.set(Phase::Serving);
                inner.registry.drop_unused();
                self.write_pid_file();
                inner.notify(&["READY=1".into(), inner.status_line("serving")]);
                tracing::info!(generation = inner.generation, pid = inner.pid, "serving");
            }
        }
        Ok(())
    }

    /// Report that this (new) generation cannot start; the old one rolls
    /// back at once instead of waiting for the readiness timeout. No-op in a
    /// first generation. Exit after calling it.
    pub async fn fail(&self, reason: &str) {
        if let Some(side) = self.inner.predecessor.lock().await.as_ref() {
            side.fail(reason).await;
        }
    }

    /// Upgrade now: start the executable on disk, hand everything over,
    /// drain. Resolves when this generation has finished draining (success;
    /// the process should then exit) or the upgrade failed and this
    /// generation kept serving.
    ///
    /// # Errors
    /// [`Error::Refused`], [`Error::InProgress`] or [`Error::Failed`] with
    /// the reason.
    pub async fn upgrade(&self, opts: UpgradeOptions) -> Result<UpgradeReport, Error> {
        // Held until the caller has its answer: a successful upgrade ends
        // with this generation done, and the end waits for control calls
        // (bounded), so the caller's task runs before the process exits.
        let _answering = self.inner.control_tasks.token();
        let (etx, _erx) = mpsc::unbounded_channel::<Event>();
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd_tx
            .send(Command::Upgrade {
                opts,
                events: etx,
                reply: tx,
            })
            .await
            .map_err(|_| Error::Closed)?;
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(f)) => Err(failure_to_error(f)),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Status, as `baton status` shows it.
    pub async fn status(&self) -> StatusReport {
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .cmd_tx
            .send(Command::Status { reply: tx })
            .await
            .is_ok()
            && let Ok(s) = rx.await
        {
            return s;
        }
        self.inner.status_report(false)
    }

    /// Stop gracefully (no successor): stop accepting, let connections
    /// finish (up to the drain timeout), then [`done`](Baton::done)
    /// resolves.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .cmd_tx
            .send(Command::Stop { reply: tx })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// A signal that fires when this generation starts draining.
    pub fn drain_signal(&self) -> DrainSignal {
        DrainSignal::new(self.inner.life.subscribe())
    }

    /// A watch of this generation's phase.
    pub fn phase_watch(&self) -> watch::Receiver<Phase> {
        self.inner.life.subscribe()
    }

    /// This generation's phase, readable without a lock (see [`PhaseCell`]).
    pub fn phase_cell(&self) -> PhaseCell {
        self.inner.life.cell()
    }

    /// Resolve when this generation is finished and the process should
    /// exit: after a successful upgrade's drain, or a graceful shutdown.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn done(&self) {
        let mut rx = self.inner.life.subscribe();
        let _ = rx.wait_for(|p| *p == Phase::Done).await;
    }

    /// A token for one open connection (see [`ConnectionToken`]).
    pub fn connection_token(&self) -> ConnectionToken {
        self.inner
            .activity
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        ConnectionToken {
            _token: self.inner.life.tracker().token(),
            activity: Arc::clone(&self.inner.activity),
        }
    }

    /// The tracker connection tasks must be spawned on: the drain waits for
    /// it to empty.
    pub fn tracker(&self) -> &TaskTracker {
        self.inner.life.tracker()
    }

    /// Connections handed over by the previous generation. Take it (once)
    /// **before** [`ready`](Baton::ready): that is how the old generation
    /// learns this one accepts connections.
    pub fn take_incoming(&self) -> Option<mpsc::UnboundedReceiver<HandoffConn>> {
        let rx = lock(&self.inner.incoming_rx).take();
        if rx.is_some() {
            self.inner.incoming_taken.store(true, Ordering::SeqCst);
        }
        rx
    }

    /// Whether a promoted successor takes connections right now.
    pub fn handoff_open(&self) -> bool {
        lock(&self.inner.handoff_tx).is_some()
    }

    /// Hand a connection to the promoted successor. `Ok` means it is no
    /// longer this generation's (moved, or lost with a successor that died
    /// — counted either way); `Err` gives it back to serve here.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future may close the connection.
    pub async fn hand_over(&self, conn: HandoffConn) -> Result<(), HandoffConn> {
        if conn.prefix.len() > crate::protocol::MAX_CONN_PREFIX
            || conn.listener.len() > crate::protocol::MAX_NAME
        {
            return Err(conn);
        }
        let tx = lock(&self.inner.handoff_tx).clone();
        let Some(tx) = tx else { return Err(conn) };
        let (rtx, rrx) = oneshot::channel();
        if let Err(mpsc::error::SendError((c, _))) = tx.send((conn, rtx)).await {
            return Err(c);
        }
        rrx.await.unwrap_or(Ok(()))
    }

    /// Request counters an HTTP layer keeps up to date (the exact state mode
    /// waits on them).
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.inner.activity)
    }

    /// Counters (upgrades, connections handed over, ...).
    pub fn counters(&self) -> Counters {
        self.inner.counters_snapshot()
    }

    fn write_pid_file(&self) {
        if let Some(p) = &self.inner.config.pid_file {
            self.inner.write_pid_file(p);
        }
    }

    /// A counter that survives upgrades: it starts at the value the previous
    /// generation had (if it registered the same name) and appears in
    /// [`metrics_text`](Baton::metrics_text). Register it before
    /// [`ready`](Baton::ready).
    ///
    /// # Errors
    /// [`Error::Config`] if `name` is not a valid Prometheus metric name.
    pub fn carried_counter(&self, name: &str, help: &str) -> Result<Arc<AtomicU64>, Error> {
        if !crate::carry::valid_metric_name(name) {
            return Err(Error::Config(format!(
                "'{name}' is not a valid metric name"
            )));
        }
        let mut list = lock(&self.inner.app_counters);
        if let Some(a) = list.iter().find(|a| a.name == name) {
            return Ok(Arc::clone(&a.value));
        }
        let value = Arc::new(AtomicU64::new(self.inner.pending_carry.claim(name)));
        list.push(crate::carry::AppCounter {
            name: name.to_owned(),
            help: help.to_owned(),
            value: Arc::clone(&value),
        });
        Ok(value)
    }

    /// Add a line to status notes.
    pub fn note(&self, line: impl Into<String>) {
        lock(&self.inner.notes).push(line.into());
    }
}

/// The newcomer ran with a raised `oom_score_adj` during the overlap; now
/// that its predecessor is gone it goes back to the old generation's value
/// (best effort: lowering it needs CAP_SYS_RESOURCE unless the kernel's
/// per-process minimum allows it).
fn restore_oom_score_adj() {
    let Some(v) = std::env::var(ENV_OOM_SCORE_ADJ)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    match std::fs::write("/proc/self/oom_score_adj", v.to_string()) {
        Ok(()) => tracing::debug!(oom_score_adj = v, "restored oom_score_adj"),
        Err(e) => tracing::debug!(error = %e, "could not restore oom_score_adj"),
    }
}

pub(crate) fn failure_to_error(f: Failure) -> Error {
    use crate::control::FailureKind;
    match f.kind {
        FailureKind::Refused => Error::Refused(strip(&f.message, "upgrade refused: ")),
        FailureKind::InProgress => Error::InProgress(strip(&f.message, "upgrade in progress: ")),
        FailureKind::Failed => Error::Failed(strip(&f.message, "upgrade failed, rolled back: ")),
        FailureKind::Invalid => Error::Config(f.message),
        FailureKind::Internal => Error::Control(f.message),
    }
}

fn strip(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_owned()
}

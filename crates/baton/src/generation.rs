//! [`Baton`]: this process's generation, and the handle the application
//! holds.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenAddr};
use crate::control::{
    self, Command, Counters, Event, Failure, LastUpgrade, StatusReport, UpgradeOptions,
    UpgradeReport,
};
use crate::error::Error;
use crate::handoff::HandoffConn;
use crate::handoff::recv::{NewSide, PeerEvent, Promotion};
use crate::lifecycle::{DrainSignal, Lifecycle, Phase};
use crate::listeners::{Listener, Origin, Registry};
use crate::notify::Notifier;
use crate::protocol::ReadyInfo;
use crate::spawn::{OsSpawner, Spawner};
use baton_sys as sys;

/// Environment variable naming the handoff channel's fd in a new generation.
pub const ENV_HANDOFF_FD: &str = "BATON_HANDOFF_FD";
/// Environment variable with the old generation's pid (checked against
/// `getppid()` so a stray copy of the environment is ignored).
pub const ENV_PARENT_PID: &str = "BATON_PARENT_PID";
/// Environment variable with the old generation's `oom_score_adj`: the new
/// one returns to it once its predecessor is gone.
pub const ENV_OOM_SCORE_ADJ: &str = "BATON_OOM_SCORE_ADJ";
/// The fd number of the handoff channel in the new generation.
pub const HANDOFF_FD: RawFd = 3;
/// Name of the internal listener carrying the control socket.
pub(crate) const CONTROL_LISTENER: &str = "baton.control";

/// Requests in flight and started, kept by the serving layer (e.g.
/// baton-http) for the exact state mode.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests being processed now.
    pub in_flight: AtomicUsize,
    /// Requests started since start-up.
    pub started: AtomicU64,
    /// Responses sent since start-up.
    pub responses: AtomicU64,
    /// 5xx responses sent since start-up.
    pub errors: AtomicU64,
    /// Connections open now (held by [`ConnectionToken`]s).
    pub open_connections: AtomicUsize,
}

/// Held by a serving layer for each open connection: keeps the drain
/// waiting (a task-tracker token) and counts the connection, so the drain
/// deadline can say how many it cut. Drop it when the connection closes or
/// leaves the process.
#[derive(Debug)]
pub struct ConnectionToken {
    _token: tokio_util::task::task_tracker::TaskTrackerToken,
    activity: Arc<Activity>,
}

impl Drop for ConnectionToken {
    fn drop(&mut self) {
        self.activity
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// Record a request start.
    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Record a request end.
    pub fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Record a response status (the canary compares error rates).
    pub fn response(&self, status: u16) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A request to hand a connection over, with where to send it back if that
/// cannot be done.
pub(crate) type HandoffReq = (HandoffConn, oneshot::Sender<Result<(), HandoffConn>>);

/// State blobs received from the predecessor: `(name, bytes)`.
pub(crate) type Blobs = Vec<(String, Vec<u8>)>;

/// Exports one named piece of state.
pub(crate) type Exporter = Arc<dyn Fn() -> Result<Vec<u8>, String> + Send + Sync>;

/// What to exec at upgrade.
#[derive(Debug, Clone)]
pub(crate) struct ExecPlan {
    pub(crate) program: PathBuf,
    pub(crate) arg0: OsString,
    pub(crate) args: Vec<OsString>,
}

#[derive(Debug, Default)]
pub(crate) struct AtomicCounters {
    pub(crate) upgrades_succeeded: AtomicU64,
    pub(crate) upgrades_failed: AtomicU64,
    pub(crate) upgrades_refused: AtomicU64,
    pub(crate) conns_handed_over: AtomicU64,
    pub(crate) conns_received: Arc<AtomicU64>,
    pub(crate) conns_received_prefix_bytes: Arc<AtomicU64>,
    pub(crate) conns_closed_at_deadline: AtomicU64,
    pub(crate) conns_lost: AtomicU64,
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) generation: u64,
    pub(crate) pid: u32,
    pub(crate) started: Instant,
    pub(crate) exec: ExecPlan,
    pub(crate) registry: Registry,
    pub(crate) life: Lifecycle,
    pub(crate) cmd_tx: mpsc::Sender<Command>,
    pub(crate) spawner: Arc<dyn Spawner>,
    pub(crate) notifier: Option<Notifier>,
    /// The new side of the channel to our predecessor, until `ready()`.
    pub(crate) predecessor: tokio::sync::Mutex<Option<NewSide>>,
    pub(crate) predecessor_pid: Option<u32>,
    /// True while the previous generation still runs (it drains).
    pub(crate) predecessor_alive: watch::Sender<bool>,
    /// Open while a promoted successor takes connections.
    pub(crate) handoff_tx: Mutex<Option<mpsc::Sender<HandoffReq>>>,
    pub(crate) incoming_tx: Mutex<Option<mpsc::UnboundedSender<HandoffConn>>>,
    pub(crate) incoming_rx: Mutex<Option<mpsc::UnboundedReceiver<HandoffConn>>>,
    pub(crate) incoming_taken: AtomicBool,
    pub(crate) exporters: Mutex<Vec<(String, Exporter)>>,
    pub(crate) imported: tokio::sync::Mutex<Option<Blobs>>,
    pub(crate) last_upgrade: Mutex<Option<LastUpgrade>>,
    pub(crate) counters: AtomicCounters,
    pub(crate) activity: Arc<Activity>,
    pub(crate) quiesced_at: Mutex<Option<Instant>>,
    pub(crate) control_tasks: TaskTracker,
    pub(crate) notes: Mutex<Vec<String>>,
    pub(crate) successor_pid: Mutex<Option<u32>>,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) started_unix_secs: u64,
    pub(crate) histograms: crate::carry::Histograms,
    pub(crate) app_counters: Mutex<Vec<crate::carry::AppCounter>>,
    pub(crate) pending_carry: crate::carry::Pending,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("generation", &self.generation)
            .field("pid", &self.pid)
            .field("phase", &self.life.phase())
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This process's generation: its listeners, its upgrade machinery, its
/// lifecycle. Cheap to clone.
///
/// See the [crate documentation](crate) for the model and a full example.
#[derive(Debug, Clone)]
pub struct Baton {
    pub(crate) inner: Arc<Inner>,
}

impl Baton {
    /// Start baton in this process, with the real process spawner.
    ///
    /// In a new generation (started by an upgrade) this receives the
    /// listening sockets from the old generation; otherwise it adopts
    /// systemd's `LISTEN_FDS` if they are meant for this pid. It installs the
    /// `SIGUSR2` handler (before anything can announce readiness) and opens
    /// the control socket if configured. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// A broken handoff channel, unusable inherited sockets, or a control
    /// socket that cannot be created.
    pub async fn start(config: Config) -> Result<Baton, Error> {
        Self::start_with_spawner(config, Arc::new(OsSpawner)).await
    }

    /// [`start`](Baton::start) with another [`Spawner`] (tests).
    ///
    /// # Errors
    /// As [`start`](Baton::start).
    pub async fn start_with_spawner(
        config: Config,
        spawner: Arc<dyn Spawner>,
    ) -> Result<Baton, Error> {
        match sys::process::raise_nofile_limit() {
            Ok(n) => tracing::debug!(
                nofile = n,
                "raised RLIMIT_NOFILE soft limit to the hard limit"
            ),
            Err(e) => tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE"),
        }
        let mut argv = std::env::args_os();
        let arg0 = argv.next().unwrap_or_else(|| OsString::from("server"));
        let args: Vec<OsString> = argv.collect();
        let program = match &config.executable {
            Some(p) => p.clone(),
            None => crate::spawn::resolve_executable(Some(&arg0))
                .map_err(|e| Error::io("finding this program's executable", e))?,
        };
        let exec = ExecPlan {
            program,
            arg0,
            args,
        };
        let pid = sys::process::getpid();
        let registry = Registry::new(config.backlog);

        let mut generation = 1;
        let mut predecessor = None;
        let mut predecessor_pid = None;
        if let Some(fd) = inherited_handoff_fd()? {
            hook(&config, crate::config::HandoffPoint::Started);
            let app_version = config.app_version.clone();
            let (side, listeners) = NewSide::connect(fd, |peer| {
                crate::handoff::send::hello(&app_version, peer.generation + 1)
            })
            .await?;
            generation = side.peer.generation + 1;
            predecessor_pid = Some(side.peer.pid);
            tracing::info!(
                generation,
                pid,
                previous_pid = side.peer.pid,
                previous_version = %side.peer.app_version,
                listeners = listeners.len(),
                "new generation received the listeners of the previous one"
            );
            for (meta, fd) in listeners {
                registry.add_inherited(&meta.name, Some(meta.kind), fd, Origin::Predecessor)?;
            }
            hook(&config, crate::config::HandoffPoint::ListenersReceived);
            predecessor = Some(side);
        } else {
            adopt_systemd_listeners(&registry)?;
        }

        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let notifier = if config.systemd_notify {
            Notifier::from_env()
        } else {
            None
        };
        let inner = Arc::new(Inner {
            generation,
            pid,
            started: Instant::now(),
            exec,
            registry,
            life: Lifecycle::new(),
            cmd_tx,
            spawner,
            notifier,
            predecessor_alive: watch::Sender::new(predecessor.is_some()),
            predecessor: tokio::sync::Mutex::new(predecessor),
            predecessor_pid,
            handoff_tx: Mutex::new(None),
            incoming_tx: Mutex::new(Some(incoming_tx)),
            incoming_rx: Mutex::new(Some(incoming_rx)),
            incoming_taken: AtomicBool::new(false),
            exporters: Mutex::new(Vec::new()),
            imported: tokio::sync::Mutex::new(None),
            last_upgrade: Mutex::new(None),
            counters: AtomicCounters::default(),
            activity: Arc::new(Activity::default()),
            quiesced_at: Mutex::new(None),
            control_tasks: TaskTracker::new(),
            notes: Mutex::new(Vec::new()),
            successor_pid: Mutex::new(None),
            started_unix_secs: unix_ms() / 1000,
            histograms: crate::carry::Histograms::default(),
            app_counters: Mutex::new(Vec::new()),
            pending_carry: crate::carry::Pending::default(),
            config,
        });
        tokio::spawn(crate::upgrade::owner(Arc::clone(&inner), cmd_rx));
        let baton = Baton { inner };
        if baton.inner.config.upgrade_on_sigusr2 {
            baton.install_sigusr2()?;
        }
        if let Some(path) = baton.inner.config.control_socket.clone() {
            baton.open_control_socket(&path)?;
        }
        Ok(baton)
    }

    fn install_sigusr2(&self) -> Result<(), Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sig = signal(SignalKind::user_defined2())
            .map_err(|e| Error::io("installing the SIGUSR2 handler", e))?;
        let tx = self.inner.cmd_tx.clone();
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                tracing::info!("SIGUSR2 received: upgrade requested");
                let (etx, _erx) = mpsc::unbounded_channel();
                let (rtx, rrx) = oneshot::channel();
                if tx
                    .send(Command::Upgrade {
                        opts: UpgradeOptions::default(),
                        events: etx,
                        reply: rtx,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::spawn(async move {
                    match rrx.await {
                        Ok(Ok(_)) | Err(_) => {}
                        Ok(Err(f)) => {
                            tracing::warn!(reason = %f.message, "SIGUSR2 upgrade did not happen")
                        }
                    }
                });
            }
        });
        Ok(())
    }

    fn open_control_socket(&self, path: &Path) -> Result<(), Error> {
        control::prepare_dir(path)?;
        let (kind, fd, origin) = self.inner.registry.take_or_bind(
            CONTROL_LISTENER,
            &ListenAddr::Unix(path.to_path_buf()),
            Some(0o600),
        )?;
        let listener = Listener::new(CONTROL_LISTENER, kind, fd, self.inner.life.gate())?;
        tracing::debug!(path = %path.display(), origin = origin.as_str(), "control socket");
        let tx = self.inner.cmd_tx.clone();
        let tasks = self.inner.control_tasks.clone();
        tokio::spawn(async move {
            while let Some(res) = listener.accept().await {
                match res {
                    Ok((crate::listeners::Stream::Unix(s), _)) => {
                        tasks.spawn(control::serve_connection(s, tx.clone()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(())
    }

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
        let (kind, fd, _) = self.inner.registry.take_or_bind(name, addr, None)?;
        Listener::new(name, kind, fd, self.inner.life.gate())
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
        if inner.life.phase() != Phase::Starting {
            return Err(Error::Config("ready() was already called".into()));
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
        match side {
            Some(side) => {
                let accepts_conns = inner.incoming_taken.load(Ordering::SeqCst);
                let limit = inner.config.ready_timeout + Duration::from_secs(10);
                let how = side
                    .ready(ReadyInfo { accepts_conns }, limit, || {
                        hook(&inner.config, crate::config::HandoffPoint::ReadySent);
                    })
                    .await?;
                inner.life.set(Phase::Serving);
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
                }
                hook(&inner.config, crate::config::HandoffPoint::Promoted);
                let deliver = if accepts_conns {
                    lock(&inner.incoming_tx).take()
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
                    side.receive_connections(deliver, received, activity, etx)
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

    /// Register a state exporter under `name`: called in this generation
    /// when a successor asks for state.
    pub fn export_raw(
        &self,
        name: &str,
        f: impl Fn() -> Result<Vec<u8>, String> + Send + Sync + 'static,
    ) {
        let mut ex = lock(&self.inner.exporters);
        ex.retain(|(n, _)| n != name);
        ex.push((name.to_owned(), Arc::new(f)));
    }

    /// The state the previous generation exported under `name` (`None` in a
    /// first generation or when it exported nothing by that name). The first
    /// call asks the old generation for its state, as late as possible: call
    /// it after everything that does not depend on state is initialized.
    ///
    /// # Errors
    /// The channel broke, or the state is over the limit.
    pub async fn import_raw(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let mut imported = self.inner.imported.lock().await;
        if imported.is_none() {
            let side = self.inner.predecessor.lock().await;
            let Some(side) = side.as_ref() else {
                return Ok(None);
            };
            *imported = Some(side.want_state(self.inner.config.state_limit).await?);
            hook(
                &self.inner.config,
                crate::config::HandoffPoint::StateReceived,
            );
        }
        Ok(imported.as_mut().and_then(|v| {
            v.iter()
                .position(|(n, _)| n == name)
                .map(|i| std::mem::take(&mut v[i].1))
        }))
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

fn hook(config: &Config, point: crate::config::HandoffPoint) {
    if let Some(h) = &config.handoff_hook {
        (h.0)(point);
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

impl Inner {
    pub(crate) fn notify(&self, lines: &[String]) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.send(lines)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    pub(crate) fn status_line(&self, what: &str) -> String {
        format!(
            "STATUS=generation {} (pid {}) {what}",
            self.generation, self.pid
        )
    }

    pub(crate) fn write_pid_file(&self, p: &Path) {
        if let Err(e) = write_pid_file(p, self.pid) {
            tracing::error!(path = %p.display(), error = %e, "could not write the pid file");
        } else {
            tracing::debug!(path = %p.display(), pid = self.pid, "pid file written");
        }
    }

    /// Connections still open at a drain deadline: counted by the serving
    /// layer's connection tokens, else the tasks on the tracker.
    pub(crate) fn open_left(&self, tracker: &TaskTracker) -> u64 {
        match self.activity.open_connections.load(Ordering::Relaxed) {
            0 => tracker.len() as u64,
            n => n as u64,
        }
    }

    /// Start from the counters the previous generation carried over.
    pub(crate) fn apply_carried(&self, c: &crate::carry::Carried) {
        use crate::carry::add;
        let k = &self.counters;
        add(&k.upgrades_succeeded, c.upgrades_succeeded);
        add(&k.upgrades_failed, c.upgrades_failed);
        add(&k.upgrades_refused, c.upgrades_refused);
        add(&k.conns_handed_over, c.handed_over);
        add(&k.conns_closed_at_deadline, c.closed_at_deadline);
        add(&k.conns_lost, c.lost);
        self.histograms.upgrade_seconds.absorb(&c.upgrade_seconds);
        self.histograms.ready_seconds.absorb(&c.ready_seconds);
        self.histograms.drain_seconds.absorb(&c.drain_seconds);
        let apps = lock(&self.app_counters);
        let mut pending = lock(&self.pending_carry.app);
        for (name, v) in &c.app {
            match apps.iter().find(|a| &a.name == name) {
                Some(a) => add(&a.value, *v),
                None => pending.push((name.clone(), *v)),
            }
        }
    }

    /// What to carry to the next generation.
    pub(crate) fn carried(&self) -> crate::carry::Carried {
        let c = self.counters_snapshot();
        crate::carry::Carried {
            upgrades_succeeded: c.upgrades_succeeded,
            upgrades_failed: c.upgrades_failed,
            upgrades_refused: c.upgrades_refused,
            handed_over: c.conns_handed_over,
            closed_at_deadline: c.conns_closed_at_deadline,
            lost: c.conns_lost,
            app: lock(&self.app_counters)
                .iter()
                .map(|a| (a.name.clone(), a.value.load(Ordering::Relaxed)))
                .collect(),
            upgrade_seconds: self.histograms.upgrade_seconds.data(),
            ready_seconds: self.histograms.ready_seconds.data(),
            drain_seconds: self.histograms.drain_seconds.data(),
        }
    }

    /// The previous generation finished the upgrade that made this one.
    pub(crate) fn record_done(&self, r: &crate::protocol::DoneReport) {
        self.counters
            .upgrades_succeeded
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .conns_closed_at_deadline
            .fetch_add(r.closed, Ordering::Relaxed);
        self.histograms
            .upgrade_seconds
            .observe(r.total_ms as f64 / 1000.0);
        self.histograms
            .ready_seconds
            .observe(r.ready_ms as f64 / 1000.0);
        self.histograms
            .drain_seconds
            .observe(r.drain_ms as f64 / 1000.0);
    }

    pub(crate) fn counters_snapshot(&self) -> Counters {
        let c = &self.counters;
        Counters {
            upgrades_succeeded: c.upgrades_succeeded.load(Ordering::Relaxed),
            upgrades_failed: c.upgrades_failed.load(Ordering::Relaxed),
            upgrades_refused: c.upgrades_refused.load(Ordering::Relaxed),
            // Cumulative across generations: what earlier generations handed
            // over (carried), what this one received, what it handed over.
            conns_handed_over: c.conns_handed_over.load(Ordering::Relaxed)
                + c.conns_received.load(Ordering::Relaxed),
            conns_received: c.conns_received.load(Ordering::Relaxed),
            conns_received_prefix_bytes: c.conns_received_prefix_bytes.load(Ordering::Relaxed),
            conns_closed_at_deadline: c.conns_closed_at_deadline.load(Ordering::Relaxed),
            conns_lost: c.conns_lost.load(Ordering::Relaxed),
            restarts: 0,
        }
    }

    pub(crate) fn status_report(&self, upgrade_in_progress: bool) -> StatusReport {
        let mut notes = lock(&self.notes).clone();
        if *self.predecessor_alive.borrow() {
            notes.push(format!(
                "previous generation (pid {}) is still draining",
                self.predecessor_pid.unwrap_or(0)
            ));
        }
        if let Some(s) = *lock(&self.successor_pid) {
            notes.push(format!("successor pid {s} serves; this generation drains"));
        }
        StatusReport {
            mode: "library".into(),
            name: None,
            app_version: self.config.app_version.clone(),
            generation: self.generation,
            pid: self.pid,
            answered_by: self.pid,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            phase: self.life.phase().as_str().into(),
            upgrade_in_progress,
            listeners: self.registry.describe(),
            last_upgrade: lock(&self.last_upgrade).clone(),
            counters: self.counters_snapshot(),
            notes,
        }
    }
}

/// Write a pid file atomically: a temporary file in the same directory,
/// then `rename`.
///
/// # Errors
/// The I/O error.
pub fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{pid}.tmp"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn inherited_handoff_fd() -> Result<Option<std::os::fd::OwnedFd>, Error> {
    let Some(v) = std::env::var_os(ENV_HANDOFF_FD) else {
        return Ok(None);
    };
    let parent_ok = std::env::var(ENV_PARENT_PID)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == sys::process::getppid());
    if !parent_ok {
        tracing::warn!(
            "{ENV_HANDOFF_FD} is set but {ENV_PARENT_PID} is not our parent: \
             ignoring a handoff environment inherited by accident"
        );
        return Ok(None);
    }
    let raw: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("{ENV_HANDOFF_FD}={v:?} is not an fd number")))?;
    let fd = sys::fd::adopt_inherited_fd(raw)
        .map_err(|e| Error::io(format!("adopting the handoff channel fd {raw}"), e))?
        .ok_or_else(|| {
            Error::Protocol(format!(
                "{ENV_HANDOFF_FD}={raw} but nothing is open at fd {raw}"
            ))
        })?;
    if !sys::socket::is_seqpacket(std::os::fd::AsFd::as_fd(&fd)) {
        return Err(Error::Protocol(format!(
            "fd {raw} is not a SOCK_SEQPACKET Unix socket"
        )));
    }
    Ok(Some(fd))
}

/// Adopt systemd socket-activation fds (`LISTEN_FDS`) meant for this pid.
fn adopt_systemd_listeners(registry: &Registry) -> Result<(), Error> {
    let Some(passed) = crate::listeners::ListenFds::from_env() else {
        return Ok(());
    };
    for (raw, name) in passed.fds() {
        let name = name.unwrap_or("unknown");
        match sys::fd::adopt_inherited_listener(raw) {
            Ok(Some((fd, _))) => registry.add_inherited(name, None, fd, Origin::Systemd)?,
            Ok(None) => tracing::warn!(fd = raw, "LISTEN_FDS names fd {raw} but it is not open"),
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "fd {raw} named by LISTEN_FDS is not a listening socket (was it passed close-on-exec?)"
                    ),
                    e,
                ));
            }
        }
    }
    tracing::info!(
        count = passed.count(),
        "adopted systemd socket-activation listeners"
    );
    Ok(())
}

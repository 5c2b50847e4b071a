//! [`Baton`]: this process's generation, and the handle the application
//! holds.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenAddr};
use crate::control::{
    self, Command, Counters, Event, Failure, StatusReport, UpgradeOptions, UpgradeReport,
};
use crate::error::Error;
use crate::handoff::HandoffConn;
use crate::handoff::recv::{NewSide, PeerEvent, Promotion};
use crate::inner::{AtomicCounters, ExecPlan, Inner, lock, unix_ms};
use crate::lifecycle::{Activity, ConnectionToken, DrainSignal, Lifecycle, Phase};
use crate::listeners::{Listener, Origin, Registry};
use crate::notify::Notifier;
use crate::protocol::ReadyInfo;
use crate::spawn::{ENV_HANDOFF_FD, ENV_OOM_SCORE_ADJ, ENV_PARENT_PID, OsSpawner, Spawner};
use crate::state::{Migration, Schema, decode, encode};
use baton_sys as sys;

/// Name of the internal listener carrying the control socket.
pub(crate) const CONTROL_LISTENER: &str = "baton.control";

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

// Typed state: the envelope of `crate::state` over the raw exporters and
// importers above.
impl Baton {
    /// Export typed state under `name`: `f` runs in this generation when a
    /// successor asks for state (on a runtime thread: keep it quick, take a
    /// lock, clone, return).
    ///
    /// ```no_run
    /// # async fn f(baton: baton::Baton) {
    /// use std::sync::{Arc, Mutex};
    /// const SCHEMA: baton::Schema = baton::Schema::new("demo.Counter", 1);
    /// let counter = Arc::new(Mutex::new(0u64));
    /// let c = counter.clone();
    /// baton.export_state("counter", SCHEMA, move || *c.lock().unwrap());
    /// # }
    /// ```
    pub fn export_state<T, F>(&self, name: &str, schema: Schema, f: F)
    where
        T: Serialize,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.export_raw(name, move || {
            encode(schema, &f()).map_err(|e| e.to_string())
        });
    }

    /// Import typed state the previous generation exported under `name`.
    /// `Ok(None)`: first generation, or nothing exported by that name.
    ///
    /// The first import asks the old generation for its state; call it after
    /// everything that does not depend on state is initialized, and before
    /// [`ready`](Baton::ready). On error, report it with
    /// [`fail`](Baton::fail) and exit: the old generation keeps serving.
    ///
    /// # Errors
    /// As [`decode`](crate::state::decode), plus channel errors and the size limit.
    ///
    /// # Cancel safety
    /// Not cancel safe.
    pub async fn import_state<T: DeserializeOwned>(
        &self,
        name: &str,
        schema: Schema,
    ) -> Result<Option<T>, Error> {
        self.import_state_with(name, schema, None::<fn(u32, &[u8]) -> Result<T, String>>)
            .await
    }

    /// [`import_state`](Baton::import_state) with a migration hook for
    /// older schema versions: `migrate(old_version, payload)` gets the
    /// postcard payload of the old version (decode it with
    /// [`decode_payload`](crate::state::decode_payload)).
    ///
    /// # Errors
    /// As [`import_state`](Baton::import_state).
    ///
    /// # Cancel safety
    /// Not cancel safe.
    pub async fn import_state_with<T, M>(
        &self,
        name: &str,
        schema: Schema,
        migrate: Option<M>,
    ) -> Result<Option<T>, Error>
    where
        T: DeserializeOwned,
        M: Fn(u32, &[u8]) -> Result<T, String>,
    {
        let Some(bytes) = self.import_raw(name).await? else {
            return Ok(None);
        };
        let m = migrate.as_ref().map(|m| m as Migration<'_, T>);
        decode(name, schema, &bytes, m).map(Some)
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

//! `Inner`: the state every part of a generation shares — the [`Baton`]
//! handle holds it in an `Arc`, the upgrade owner reads and updates it.
//!
//! It sits below both of them (and above the handoff roles it holds), so
//! neither the handle nor the upgrade code has to import the other to
//! reach it.
//!
//! [`Baton`]: crate::Baton

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::{Command, Counters, LastUpgrade, StatusReport};
use crate::handoff::HandoffConn;
use crate::handoff::owned::{Closers, OwnedOut, OwnedSink};
use crate::handoff::recv::NewSide;
use crate::lifecycle::{Activity, Lifecycle};
use crate::listeners::Registry;
use crate::notify::Notifier;
use crate::pid_file::write_pid_file;
use crate::spawn::Spawner;

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
    /// New side: receivers of application-owned connections by kind,
    /// registered before `ready()` (which takes them).
    pub(crate) owned_sinks: Mutex<Option<Vec<OwnedSink>>>,
    /// The receivers of owned connections this generation registered, kept
    /// after `ready()`: a rolled-back successor gives connections back to
    /// them.
    pub(crate) owned_sinks_live: Mutex<Vec<OwnedSink>>,
    /// Old side: open while a promoted successor takes owned connections.
    pub(crate) owned_out: Mutex<Option<OwnedOut>>,
    /// The close callbacks of this generation's live owned connections.
    pub(crate) closers: Arc<Closers>,
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

    /// The drain deadline passed: close every owned connection still here
    /// in its own protocol, and give them [`OWNED_CLOSE_GRACE`] to finish.
    ///
    /// [`OWNED_CLOSE_GRACE`]: crate::handoff::owned::OWNED_CLOSE_GRACE
    pub(crate) async fn close_owned_at_deadline(&self) {
        let n = self.closers.close_all();
        if n == 0 {
            return;
        }
        tracing::info!(
            connections = n,
            "drain deadline: closing the owned connections still here in their own protocol"
        );
        let grace = crate::handoff::owned::OWNED_CLOSE_GRACE;
        if tokio::time::timeout(grace, self.life.tracker().wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "owned connections did not all finish closing in time"
            );
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

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

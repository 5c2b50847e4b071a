//! The single owner of the supervisor's state.
//!
//! One task holds the listeners, the serving generation and everything
//! else, and runs at most one *job* at a time: starting a generation,
//! upgrading, or stopping. A job takes the state by value and gives it back
//! when it ends, so a second upgrade request cannot even reach the state
//! while one runs: it is answered "in progress" from the job slot. Status is
//! answered at once from a small view the jobs keep up to date.
//!
//! The phases a job runs live next to it: `start` (the first start, and a
//! restart after the serving generation died), `run` (one upgrade: the next
//! generation, readiness, steering, promotion, rollback), `observe` (the
//! canary and the observation window) and `drain` (the leaving generation's
//! queue empties, then its stop).

mod drain;
mod observe;
mod run;
mod self_exec;
mod start;

pub use self_exec::{Resumed, book_after, resume, resume_front, resume_listeners};

use std::ffi::OsString;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton::carry::CarriedHistogram;
use baton::control::{
    Command, Counters, Event, Failure, FailureKind, LastUpgrade, StatusReport, UpgradeReport,
};
use baton::notify::Notifier;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::supervisor::child::{GenProc, KeptExe};
use crate::supervisor::ready::ReadyPlan;
use crate::supervisor::sockets::ListenerSet;
use crate::supervisor::{RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX, RunConfig};

/// How many recent events status shows.
const RECENT_EVENTS: usize = 5;

/// The signals baton acts on.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// What a signal asks for.
pub(super) enum Sig {
    /// SIGTERM or SIGINT.
    Stop(&'static str),
    /// SIGHUP.
    Upgrade,
}

impl Signals {
    /// Install the handlers (before any generation can announce
    /// readiness).
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(super) async fn recv(&mut self) -> Sig {
        tokio::select! {
            _ = self.term.recv() => Sig::Stop("SIGTERM"),
            _ = self.int.recv() => Sig::Stop("SIGINT"),
            _ = self.hup.recv() => Sig::Upgrade,
        }
    }
}

/// The last command that worked.
#[derive(Debug, Clone)]
struct LastGood {
    argv: Vec<OsString>,
    exe: Option<Arc<KeptExe>>,
    generation: u64,
}

/// What status shows; kept current by the owner and its jobs.
#[derive(Debug, Default)]
struct View {
    phase: &'static str,
    generation: u64,
    pid: u32,
    /// The generation being started and its pid (status shows it while
    /// the phase is starting or restarting).
    starting: Option<(u64, u32)>,
    started: Option<Instant>,
    command: String,
    app_status: Option<Arc<Mutex<Option<String>>>>,
    last_upgrade: Option<LastUpgrade>,
    counters: Counters,
    recent: Vec<String>,
    down_reason: Option<String>,
    /// Histograms and counters for `--metrics` (status has the rest).
    upgrade_seconds: CarriedHistogram,
    ready_seconds: CarriedHistogram,
    drain_seconds: CarriedHistogram,
    closed_at_drain: u64,
    relayed: u64,
}

type SharedView = Arc<Mutex<View>>;

fn view(v: &SharedView) -> std::sync::MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

impl View {
    fn serving(&mut self, g: &GenProc) {
        self.generation = g.generation;
        self.pid = g.pid;
        self.started = Some(g.started);
        self.command = g.command_line();
        self.app_status = g.notify.as_ref().map(|n| Arc::clone(&n.status));
        self.down_reason = None;
        self.starting = None;
    }

    fn note(&mut self, s: String) {
        self.recent.push(s);
        if self.recent.len() > RECENT_EVENTS {
            self.recent.remove(0);
        }
    }

    fn record(&mut self, res: &Result<UpgradeReport, Failure>) {
        let (result, reason, report) = match res {
            Ok(r) => {
                self.counters.upgrades_succeeded += 1;
                self.upgrade_seconds.observe(r.total_ms as f64 / 1000.0);
                self.ready_seconds.observe(r.ready_ms as f64 / 1000.0);
                self.drain_seconds.observe(r.drain_ms as f64 / 1000.0);
                self.closed_at_drain += r.closed_at_deadline;
                ("success", None, Some(r.clone()))
            }
            Err(f) if f.kind == FailureKind::Failed => {
                self.counters.upgrades_failed += 1;
                ("failed", Some(f.message.clone()), None)
            }
            Err(f) => {
                self.counters.upgrades_refused += 1;
                ("refused", Some(f.message.clone()), None)
            }
        };
        self.last_upgrade = Some(LastUpgrade {
            result: result.into(),
            reason,
            at_unix_ms: unix_ms(),
            report,
        });
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The supervisor's metrics (`--metrics`).
fn metrics_snapshot(v: &View, started_unix_secs: f64) -> baton::metrics::Snapshot {
    let mut s = baton::metrics::Snapshot::default();
    s.generation = v.generation;
    s.process_start_time_seconds = started_unix_secs;
    s.upgrades_succeeded = v.counters.upgrades_succeeded;
    s.upgrades_failed = v.counters.upgrades_failed;
    s.upgrades_refused = v.counters.upgrades_refused;
    s.upgrade_seconds = v.upgrade_seconds.data();
    s.ready_seconds = v.ready_seconds.data();
    s.drain_seconds = v.drain_seconds.data();
    s.connections_closed_at_drain = v.closed_at_drain;
    s.restarts = Some(v.counters.restarts);
    s.counters = vec![(
        "baton_connections_relayed".into(),
        "Connections that queued for a generation that died or exited without accepting them, relayed to the serving one".into(),
        v.relayed,
    )];
    s
}

/// Fixed at start-up, for status.
#[derive(Debug)]
struct Statics {
    name: String,
    listeners: Vec<baton::ListenerInfo>,
    notes: Vec<String>,
    /// `--front`: its counters are a note (the status message is postcard:
    /// a new field would break `baton status` across versions).
    front: Option<crate::front::Front>,
    /// For the note about baton itself (`--self`).
    cfg: Arc<RunConfig>,
}

/// The listeners for status: with `--front`, each public address (which
/// the clients use) before the generations' private socket of that name.
fn listener_infos(
    listeners: &ListenerSet,
    front: Option<&crate::front::Front>,
) -> Vec<baton::ListenerInfo> {
    let infos = listeners.infos();
    let Some(front) = front else {
        return infos;
    };
    let public = front.public_addrs();
    let mut out = Vec::with_capacity(infos.len() * 2);
    for (i, mut private) in infos.into_iter().enumerate() {
        if let Some(addr) = public.get(i) {
            out.push(baton::ListenerInfo {
                name: private.name.clone(),
                addr: addr.clone(),
                origin: "public: baton's front serves the clients here (--front http)".into(),
            });
        }
        private.origin = format!(
            "the generations' private socket (--front http); {}",
            private.origin
        );
        out.push(private);
    }
    out
}

fn status_report(v: &View, s: &Statics, in_progress: bool) -> StatusReport {
    let mut notes = Vec::new();
    if let Some(d) = &v.down_reason {
        notes.push(format!("down: {d}"));
    }
    if !v.command.is_empty() {
        notes.push(format!("command: {}", v.command));
    }
    if let Some(st) = v
        .app_status
        .as_ref()
        .and_then(|a| a.lock().unwrap_or_else(|p| p.into_inner()).clone())
    {
        notes.push(format!("app status (STATUS=): {st}"));
    }
    notes.extend(s.notes.iter().cloned());
    if let Some(f) = &s.front {
        notes.push(f.counters().note());
    }
    notes.push(
        s.cfg
            .self_exec
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(),
    );
    notes.extend(v.recent.iter().cloned());
    let shown = match v.starting {
        Some(g) if matches!(v.phase, "starting" | "restarting") => g,
        _ => (v.generation, v.pid),
    };
    StatusReport {
        mode: "supervisor".into(),
        name: Some(s.name.clone()),
        app_version: v.command.clone(),
        generation: shown.0,
        pid: shown.1,
        answered_by: baton_sys::process::getpid(),
        uptime_ms: v
            .started
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0),
        phase: v.phase.into(),
        upgrade_in_progress: in_progress,
        listeners: s.listeners.clone(),
        last_upgrade: v.last_upgrade.clone(),
        counters: v.counters.clone(),
        notes,
    }
}

/// Everything a job works on.
#[derive(Debug)]
struct Sup {
    cfg: Arc<RunConfig>,
    listeners: ListenerSet,
    plan: ReadyPlan,
    serving: Option<GenProc>,
    /// The slot the steering program sends new connections to.
    serving_slot: usize,
    next_generation: u64,
    last_good: Option<LastGood>,
    view: SharedView,
    systemd: Option<Notifier>,
    announced_ready: bool,
    /// `--health` (or the `http` readiness check), for the canary and the
    /// observation window.
    health: Option<ReadyPlan>,
    /// How the last generation ended when baton stopped it (exit code, or
    /// 128 + signal).
    final_status: Option<u8>,
}

impl Sup {
    fn notify_systemd(&self, lines: &[String]) {
        if let Some(n) = &self.systemd
            && let Err(e) = n.send(lines)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    fn serving_status_line(&self) -> String {
        match &self.serving {
            Some(g) => format!("STATUS=generation {} (pid {}) serving", g.generation, g.pid),
            None => "STATUS=no generation serving".into(),
        }
    }

    /// Tell systemd the service is (again) ready.
    fn announce_ready(&mut self, extra: &str) {
        let mut line = self.serving_status_line();
        if !extra.is_empty() {
            line.push_str("; ");
            line.push_str(extra);
        }
        self.notify_systemd(&["READY=1".into(), line]);
        self.announced_ready = true;
    }
}

type Events = mpsc::UnboundedSender<Event>;

fn emit(events: &Events, e: Event) {
    let _ = events.send(e);
}

fn failed(kind: FailureKind, message: String) -> Failure {
    Failure { kind, message }
}

fn record_good(sup: &mut Sup, g: &GenProc) {
    sup.last_good = Some(LastGood {
        argv: g.argv.clone(),
        exe: g.exe.clone(),
        generation: g.generation,
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Start(StartKind),
    Upgrade,
    Stop,
    /// `baton upgrade --self` (ends only if the exec failed).
    SelfExec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartKind {
    /// The first generation.
    Initial,
    /// After the serving generation died, or a start failed.
    Restart,
    /// `baton upgrade` while nothing serves.
    Requested,
}

type JobFuture = Pin<Box<dyn Future<Output = (Sup, Result<UpgradeReport, Failure>)>>>;

struct Job {
    kind: JobKind,
    fut: JobFuture,
    /// First stop request: abandon a start or an upgrade not yet committed.
    cancel: CancellationToken,
    /// Second stop request: SIGKILL instead of waiting for the drain.
    hurry: CancellationToken,
    reply: Option<oneshot::Sender<Result<UpgradeReport, Failure>>>,
    started: Instant,
}

async fn poll_job(job: &mut Option<Job>) -> (Sup, Result<UpgradeReport, Failure>) {
    match job {
        Some(j) => j.fut.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn serving_exited(sup: &Option<Sup>) {
    match sup.as_ref().and_then(|s| s.serving.as_ref()) {
        Some(g) => g.exited().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn old_exited(old: &Option<GenProc>) {
    match old {
        Some(o) => o.exited().await,
        None => std::future::pending().await,
    }
}

/// Run the supervisor until it is stopped. Returns how the last generation
/// ended (exit code, or 128 + signal), if one was running. `resumed`: what
/// the previous image left (`baton upgrade --self`).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: RunConfig,
    listeners: ListenerSet,
    plan: ReadyPlan,
    health: Option<ReadyPlan>,
    mut rx: mpsc::Receiver<Command>,
    mut signals: Signals,
    metrics: Option<tokio::net::TcpListener>,
    resumed: Option<Resumed>,
) -> Option<u8> {
    let mut static_notes = vec![format!("readiness: {}", plan.describe(&listeners))];
    for l in &listeners.items {
        if let Some(r) = &l.shared_reason {
            static_notes.push(format!(
                "listener '{}' is one shared socket, not steered: {r}",
                l.name
            ));
        }
    }
    let ready_timeout = cfg.ready_timeout;
    let drain_timeout = cfg.drain_timeout;
    let cfg = Arc::new(cfg);
    let statics = Statics {
        name: cfg.name.clone(),
        listeners: listener_infos(&listeners, cfg.front.as_ref()),
        notes: static_notes,
        front: cfg.front.clone(),
        cfg: Arc::clone(&cfg),
    };
    let shared = Arc::new(Mutex::new(View {
        phase: "starting",
        ..View::default()
    }));
    let mut sup = Some(Sup {
        cfg,
        listeners,
        plan,
        serving: None,
        serving_slot: 0,
        next_generation: 1,
        last_good: None,
        view: Arc::clone(&shared),
        systemd: Notifier::from_env(),
        announced_ready: false,
        health,
        final_status: None,
    });
    if let Some(l) = metrics {
        let v = Arc::clone(&shared);
        let started = unix_ms() as f64 / 1000.0;
        let front = statics.front.clone();
        // Runs until the runtime ends.
        drop(tokio::spawn(crate::supervisor::metrics::serve(
            l,
            move || {
                let mut snap = metrics_snapshot(&view(&v), started);
                if let Some(f) = &front {
                    snap.counters.extend(f.counters().metrics());
                }
                baton::metrics::render(&snap)
            },
        )));
    }
    let mut job: Option<Job> = None;
    // An upgrade asked for while a generation starts: it runs once the
    // start ends (as the start itself if that one failed).
    let mut waiting: Option<Waiting> = None;
    let mut stopping: Option<CancellationToken> = None;
    let mut restart_at: Option<tokio::time::Instant> = None;
    let mut backoff = RESTART_BACKOFF_INITIAL;
    let mut control_closed = false;

    match resumed {
        Some(r) => {
            // `baton upgrade --self`: the serving generation is still our
            // child; supervise it from here on.
            if let Some(s) = sup.as_mut() {
                r.apply(s);
                let line = s.serving_status_line();
                s.notify_systemd(&[format!("{line}; baton re-executed in place")]);
            }
        }
        None => {
            if let Some(s) = sup.take() {
                job = Some(start_job(
                    s,
                    StartKind::Initial,
                    UpgradeReq::default(),
                    None,
                    None,
                ));
            }
        }
    }

    loop {
        if stopping.is_some() && job.is_none() {
            match sup.take() {
                Some(s) if s.serving.is_some() => {
                    let hurry = stopping.clone().unwrap_or_default();
                    job = Some(stop_job(s, hurry));
                }
                other => {
                    sup = other;
                    break;
                }
            }
        }
        let restart_due = if job.is_none() && stopping.is_none() {
            restart_at
        } else {
            None
        };
        let watch_serving = job.is_none() && stopping.is_none();
        tokio::select! {
            sig = signals.recv() => match sig {
                Sig::Stop(name) => {
                    if let Some(h) = &stopping {
                        tracing::warn!("{name} again: killing the serving generation now");
                        h.cancel();
                        if let Some(j) = &job {
                            j.hurry.cancel();
                        }
                    } else {
                        tracing::info!("{name}: stopping gracefully (send it again to kill at once)");
                        let token = CancellationToken::new();
                        begin_stop(&mut stopping, &job, &shared, token);
                    }
                }
                Sig::Upgrade => {
                    tracing::info!("SIGHUP: upgrade requested");
                    let (etx, _erx) = mpsc::unbounded_channel();
                    let w = Waiting { req: UpgradeReq::default(), events: etx, reply: None };
                    if let Some(w) = park_upgrade(&job, &mut waiting, &shared, ready_timeout, w) {
                        on_upgrade(&mut sup, &mut job, &mut waiting, &stopping, &mut restart_at, w.req, w.events, w.reply);
                    }
                }
            },
            (s, res) = poll_job(&mut job) => {
                let Some(done) = job.take() else { continue };
                let mut s = s;
                job_ended(&mut s, &done, &res, &shared, &mut restart_at, &mut backoff, stopping.is_some());
                if let Some(r) = done.reply {
                    let _ = r.send(res);
                } else if done.kind == JobKind::Upgrade || done.kind == JobKind::Start(StartKind::Requested) {
                    match &res {
                        Ok(_) => {}
                        Err(f) => tracing::warn!(reason = %f.message, "upgrade did not happen"),
                    }
                }
                if done.kind == JobKind::Stop {
                    sup = Some(s);
                    break;
                }
                sup = Some(s);
                if let Some(w) = waiting.take() {
                    if stopping.is_some() {
                        w.refuse(failed(FailureKind::Refused, "baton is stopping".into()));
                    } else {
                        tracing::info!("the start it waited for ended; the upgrade runs now");
                        on_upgrade(&mut sup, &mut job, &mut waiting, &stopping, &mut restart_at, w.req, w.events, w.reply);
                    }
                }
            }
            cmd = rx.recv(), if !control_closed => {
                let Some(cmd) = cmd else {
                    control_closed = true;
                    continue;
                };
                match cmd {
                    Command::Status { reply } => {
                        let in_progress = matches!(job.as_ref().map(|j| j.kind), Some(JobKind::Upgrade));
                        let _ = reply.send(status_report(&view(&shared), &statics, in_progress));
                    }
                    Command::Upgrade { opts, reply, .. } if opts.self_exec => {
                        on_self_exec(&mut sup, &mut job, &stopping, drain_timeout, reply);
                    }
                    Command::Upgrade { opts, events, reply } => {
                        let req = UpgradeReq {
                            command: opts.command.map(|c| c.into_iter().map(OsString::from).collect()),
                            expect_sha256: opts.expect_sha256,
                            no_wait: opts.no_wait,
                        };
                        let w = Waiting { req, events, reply: Some(reply) };
                        if let Some(w) = park_upgrade(&job, &mut waiting, &shared, ready_timeout, w) {
                            on_upgrade(&mut sup, &mut job, &mut waiting, &stopping, &mut restart_at, w.req, w.events, w.reply);
                        }
                    }
                    Command::Stop { reply } => {
                        if stopping.is_none() {
                            tracing::info!("stop requested over the control socket");
                            begin_stop(&mut stopping, &job, &shared, CancellationToken::new());
                        }
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            () = serving_exited(&sup), if watch_serving => {
                if let Some(s) = sup.as_mut() {
                    start::on_crash(s, &mut restart_at, &mut backoff).await;
                }
            }
            () = sleep_until_opt(restart_due), if restart_due.is_some() => {
                restart_at = None;
                if let Some(s) = sup.take() {
                    view(&shared).counters.restarts += 1;
                    job = Some(start_job(s, StartKind::Restart, UpgradeReq::default(), None, None));
                }
            }
        }
    }
    if let Some(s) = &sup {
        s.notify_systemd(&["STOPPING=1".into(), "STATUS=stopped".into()]);
    }
    tracing::info!("baton stopped");
    sup.and_then(|s| s.final_status)
}

fn begin_stop(
    stopping: &mut Option<CancellationToken>,
    job: &Option<Job>,
    shared: &SharedView,
    token: CancellationToken,
) {
    view(shared).phase = "stopping";
    if let Some(j) = job {
        // A start or an upgrade not yet committed is abandoned; a committed
        // upgrade finishes its drain first.
        j.cancel.cancel();
    }
    *stopping = Some(token);
}

/// What an upgrade request asks for.
#[derive(Debug, Default)]
struct UpgradeReq {
    /// A new command line.
    command: Option<Vec<OsString>>,
    /// Pin the executable's content.
    expect_sha256: Option<String>,
    /// Refuse instead of waiting for a starting generation.
    no_wait: bool,
}

/// An upgrade request waiting for a start to end.
struct Waiting {
    req: UpgradeReq,
    events: Events,
    reply: Option<oneshot::Sender<Result<UpgradeReport, Failure>>>,
}

impl Waiting {
    fn refuse(self, f: Failure) {
        tracing::warn!(reason = %f.message, "upgrade not started");
        if let Some(r) = self.reply {
            let _ = r.send(Err(f));
        }
    }
}

/// An upgrade asked for while a generation starts (first start, or a
/// restart after a crash) waits for that start to end, unless it asked not
/// to or another one already waits: then it is `Some` again, for
/// [`on_upgrade`] to answer.
fn park_upgrade(
    job: &Option<Job>,
    waiting: &mut Option<Waiting>,
    shared: &SharedView,
    ready_timeout: Duration,
    w: Waiting,
) -> Option<Waiting> {
    let Some(j) = job else { return Some(w) };
    if !matches!(
        j.kind,
        JobKind::Start(StartKind::Initial | StartKind::Restart)
    ) || w.req.no_wait
        || waiting.is_some()
    {
        return Some(w);
    }
    let what = match view(shared).starting {
        Some((generation, pid)) => format!("generation {generation} (pid {pid})"),
        None => "the generation being started".into(),
    };
    let line = format!(
        "waiting for {what} to be ready (starting for {} ms, at most {ready_timeout:?}); the upgrade runs then",
        j.started.elapsed().as_millis()
    );
    tracing::info!("{line}");
    emit(&w.events, Event::Note(line));
    *waiting = Some(w);
    None
}

#[allow(clippy::too_many_arguments)]
fn on_upgrade(
    sup: &mut Option<Sup>,
    job: &mut Option<Job>,
    waiting: &mut Option<Waiting>,
    stopping: &Option<CancellationToken>,
    restart_at: &mut Option<tokio::time::Instant>,
    req: UpgradeReq,
    events: Events,
    reply: Option<oneshot::Sender<Result<UpgradeReport, Failure>>>,
) {
    fn answer(reply: Option<oneshot::Sender<Result<UpgradeReport, Failure>>>, f: Failure) {
        tracing::warn!(reason = %f.message, "upgrade not started");
        if let Some(r) = reply {
            let _ = r.send(Err(f));
        }
    }
    if stopping.is_some() {
        return answer(
            reply,
            failed(FailureKind::Refused, "baton is stopping".into()),
        );
    }
    if let Some(j) = job {
        let ms = j.started.elapsed().as_millis();
        let msg = match j.kind {
            JobKind::Upgrade => {
                format!("an upgrade has been running for {ms} ms; wait for it to finish")
            }
            JobKind::Start(StartKind::Restart) => format!(
                "a generation is being restarted (for {ms} ms) after the serving one died; try again when it serves"
            ),
            JobKind::Start(_) if waiting.is_some() => format!(
                "an upgrade is already waiting for the generation that has been starting for {ms} ms; try again when it serves"
            ),
            JobKind::Start(_) => {
                format!("a generation has been starting for {ms} ms; try again when it serves")
            }
            JobKind::Stop => "baton is stopping".into(),
            JobKind::SelfExec => {
                format!("baton upgrade --self has been running for {ms} ms")
            }
        };
        return answer(reply, failed(FailureKind::InProgress, msg));
    }
    if let Some(c) = &req.command
        && c.is_empty()
    {
        return answer(
            reply,
            failed(FailureKind::Invalid, "the new command line is empty".into()),
        );
    }
    let Some(s) = sup.take() else {
        return answer(
            reply,
            failed(
                FailureKind::Internal,
                "the supervisor state is unavailable".into(),
            ),
        );
    };
    if s.serving.is_some() {
        *job = Some(upgrade_job(s, req, events, reply));
    } else {
        // Nothing serves (a crash loop, or a refused restart): the upgrade
        // is the start.
        *restart_at = None;
        *job = Some(start_job(s, StartKind::Requested, req, Some(events), reply));
    }
}

/// `baton upgrade --self`: refused while a job runs (like an upgrade),
/// else a job of its own that ends only if the exec failed.
fn on_self_exec(
    sup: &mut Option<Sup>,
    job: &mut Option<Job>,
    stopping: &Option<CancellationToken>,
    drain_timeout: Duration,
    reply: oneshot::Sender<Result<UpgradeReport, Failure>>,
) {
    fn refuse(
        reply: oneshot::Sender<Result<UpgradeReport, Failure>>,
        kind: FailureKind,
        msg: String,
    ) {
        tracing::warn!(reason = %msg, "baton upgrade --self not started");
        let _ = reply.send(Err(failed(kind, msg)));
    }
    if stopping.is_some() {
        return refuse(reply, FailureKind::Refused, "baton is stopping".into());
    }
    if let Some(j) = job {
        let what = match j.kind {
            JobKind::Upgrade => "an upgrade",
            JobKind::SelfExec => "baton upgrade --self",
            JobKind::Stop => "the stop",
            JobKind::Start(_) => "a generation start",
        };
        return refuse(
            reply,
            FailureKind::InProgress,
            format!(
                "{what} has been running for {} ms; try again when it is done",
                j.started.elapsed().as_millis()
            ),
        );
    }
    let Some(mut s) = sup.take() else {
        return refuse(
            reply,
            FailureKind::Internal,
            "the supervisor state is unavailable".into(),
        );
    };
    tracing::info!("baton upgrade --self requested");
    view(&s.view).phase = "re-executing";
    *job = Some(Job {
        kind: JobKind::SelfExec,
        fut: Box::pin(async move {
            let f = self_exec::run(&mut s, drain_timeout).await;
            (s, Err(f))
        }),
        cancel: CancellationToken::new(),
        hurry: CancellationToken::new(),
        reply: Some(reply),
        started: Instant::now(),
    });
}

fn upgrade_job(
    mut sup: Sup,
    req: UpgradeReq,
    events: Events,
    reply: Option<oneshot::Sender<Result<UpgradeReport, Failure>>>,
) -> Job {
    let cancel = CancellationToken::new();
    let hurry = CancellationToken::new();
    let (c, h) = (cancel.clone(), hurry.clone());
    Job {
        kind: JobKind::Upgrade,
        fut: Box::pin(async move {
            let r = run::upgrade(&mut sup, req, &events, &c, &h).await;
            (sup, r)
        }),
        cancel,
        hurry,
        reply,
        started: Instant::now(),
    }
}

fn start_job(
    mut sup: Sup,
    kind: StartKind,
    req: UpgradeReq,
    events: Option<Events>,
    reply: Option<oneshot::Sender<Result<UpgradeReport, Failure>>>,
) -> Job {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let events = events.unwrap_or_else(|| mpsc::unbounded_channel().0);
    Job {
        kind: JobKind::Start(kind),
        fut: Box::pin(async move {
            let r = start::start(&mut sup, kind, req, &events, &c).await;
            (sup, r)
        }),
        cancel,
        hurry: CancellationToken::new(),
        reply,
        started: Instant::now(),
    }
}

fn stop_job(mut sup: Sup, hurry: CancellationToken) -> Job {
    let h = hurry.clone();
    Job {
        kind: JobKind::Stop,
        fut: Box::pin(async move {
            drain::stop(&mut sup, &h).await;
            (sup, Err(failed(FailureKind::Refused, "stopped".into())))
        }),
        cancel: CancellationToken::new(),
        hurry,
        reply: None,
        started: Instant::now(),
    }
}

fn job_ended(
    sup: &mut Sup,
    job: &Job,
    res: &Result<UpgradeReport, Failure>,
    shared: &SharedView,
    restart_at: &mut Option<tokio::time::Instant>,
    backoff: &mut Duration,
    stopping: bool,
) {
    let mut v = view(shared);
    match job.kind {
        JobKind::Upgrade | JobKind::Start(StartKind::Requested) => v.record(res),
        _ => {}
    }
    if stopping {
        v.phase = "stopping";
        return;
    }
    match &sup.serving {
        Some(g) => {
            v.phase = "serving";
            v.serving(g);
            if job.kind == JobKind::Upgrade && res.is_ok() {
                *backoff = RESTART_BACKOFF_INITIAL;
            }
        }
        None if v.down_reason.is_some() => {
            v.phase = "down";
        }
        None => {
            // Nothing serves: a start failed, or the old generation died
            // during a failed upgrade. Try again after the backoff; the
            // sockets keep queueing connections meanwhile.
            v.phase = "restarting";
            let wait = *backoff;
            *backoff = (*backoff * 2).min(RESTART_BACKOFF_MAX);
            *restart_at = Some(tokio::time::Instant::now() + wait);
            let why = match res {
                Err(f) => f.message.clone(),
                Ok(_) => "no generation serves".into(),
            };
            tracing::warn!(retry_in_ms = wait.as_millis() as u64, reason = %why,
                "no generation serves: starting one again after a pause (the listening sockets stay open, connections queue)");
            drop(v);
            sup.notify_systemd(&[format!(
                "STATUS=no generation serving; retrying in {} ms: {why}",
                wait.as_millis()
            )]);
        }
    }
}

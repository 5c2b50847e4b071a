//! The single owner of the supervisor's state.
//!
//! One task holds the listeners, the serving generation and everything
//! else, and runs at most one *job* at a time: starting a generation,
//! upgrading, or stopping. A job takes the state by value and gives it back
//! when it ends, so a second upgrade request cannot even reach the state
//! while one runs: it is answered "in progress" from the job slot. Status is
//! answered at once from a small view the jobs keep up to date.

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

use super::admission;
use super::child::{self, ExecHow, GenProc, KeptExe, SpawnPlan, join_argv};
use super::ready::{self, NotifySocket, ReadyCtx, ReadyPlan, Route};
use super::sockets::{ListenerSet, Steer};
use super::{
    RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX, RESTART_BACKOFF_RESET_AFTER, RunConfig,
    STEER_SETTLE_TIMEOUT,
};

/// How often the old generation's accept queue is looked at after
/// steering.
const SETTLE_POLL: Duration = Duration::from_millis(5);
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
    notes.extend(v.recent.iter().cloned());
    StatusReport {
        mode: "supervisor".into(),
        name: Some(s.name.clone()),
        app_version: v.command.clone(),
        generation: v.generation,
        pid: v.pid,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Start(StartKind),
    Upgrade,
    Stop,
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

/// Run the supervisor until it is stopped. Returns how the last generation
/// ended (exit code, or 128 + signal), if one was running.
pub async fn run(
    cfg: RunConfig,
    listeners: ListenerSet,
    plan: ReadyPlan,
    health: Option<ReadyPlan>,
    mut rx: mpsc::Receiver<Command>,
    mut signals: Signals,
    metrics: Option<tokio::net::TcpListener>,
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
    let statics = Statics {
        name: cfg.name.clone(),
        listeners: listeners.infos(),
        notes: static_notes,
    };
    let shared = Arc::new(Mutex::new(View {
        phase: "starting",
        ..View::default()
    }));
    let mut sup = Some(Sup {
        cfg: Arc::new(cfg),
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
        // Runs until the runtime ends.
        drop(tokio::spawn(super::metrics::serve(l, move || {
            baton::metrics::render(&metrics_snapshot(&view(&v), started))
        })));
    }
    let mut job: Option<Job> = None;
    let mut stopping: Option<CancellationToken> = None;
    let mut restart_at: Option<tokio::time::Instant> = None;
    let mut backoff = RESTART_BACKOFF_INITIAL;
    let mut control_closed = false;

    if let Some(s) = sup.take() {
        job = Some(start_job(
            s,
            StartKind::Initial,
            UpgradeReq::default(),
            None,
            None,
        ));
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
                    on_upgrade(&mut sup, &mut job, &stopping, &mut restart_at, UpgradeReq::default(), etx, None);
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
                    Command::Upgrade { opts, events, reply } => {
                        let req = UpgradeReq {
                            command: opts.command.map(|c| c.into_iter().map(OsString::from).collect()),
                            expect_sha256: opts.expect_sha256,
                        };
                        on_upgrade(&mut sup, &mut job, &stopping, &mut restart_at, req, events, Some(reply));
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
                    on_crash(s, &mut restart_at, &mut backoff).await;
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
}

fn on_upgrade(
    sup: &mut Option<Sup>,
    job: &mut Option<Job>,
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
            JobKind::Start(_) => {
                format!("a generation has been starting for {ms} ms; try again when it serves")
            }
            JobKind::Stop => "baton is stopping".into(),
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
            let r = upgrade(&mut sup, req, &events, &c, &h).await;
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
            let r = start(&mut sup, kind, req, &events, &c).await;
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
            stop(&mut sup, &h).await;
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

/// The serving generation died on its own.
async fn on_crash(
    sup: &mut Sup,
    restart_at: &mut Option<tokio::time::Instant>,
    backoff: &mut Duration,
) {
    let Some(mut g) = sup.serving.take() else {
        return;
    };
    let status = g.reap().await;
    let served = g.started.elapsed();
    if served >= RESTART_BACKOFF_RESET_AFTER {
        *backoff = RESTART_BACKOFF_INITIAL;
    }
    let wait = *backoff;
    *backoff = (*backoff * 2).min(RESTART_BACKOFF_MAX);
    *restart_at = Some(tokio::time::Instant::now() + wait);
    tracing::error!(
        generation = g.generation,
        pid = g.pid,
        %status,
        served_ms = served.as_millis() as u64,
        restart_in_ms = wait.as_millis() as u64,
        "the serving generation died; restarting it (its sockets stay open: connections queue, none is refused)"
    );
    {
        let mut v = view(&sup.view);
        v.phase = "restarting";
        v.note(format!(
            "generation {} (pid {}) died ({status}) after {:.1} s; restarting",
            g.generation,
            g.pid,
            served.as_secs_f64()
        ));
    }
    sup.notify_systemd(&[format!(
        "STATUS=generation {} (pid {}) died ({status}); restarting",
        g.generation, g.pid
    )]);
}

/// How the readiness wait ended badly.
enum NotReady {
    Exited,
    Timeout,
    Cancelled,
}

async fn old_exited(old: &Option<GenProc>) {
    match old {
        Some(o) => o.exited().await,
        None => std::future::pending().await,
    }
}

/// Spawn the next generation in `route.new` and wait until it is ready. On failure it
/// is killed and reaped, steering is back on `route.regular`, and the reason is
/// returned. `old` (the serving generation, during an upgrade) is watched:
/// if it dies meanwhile it is reaped and set to `None`.
#[allow(clippy::too_many_arguments)]
async fn launch(
    sup: &mut Sup,
    argv: Vec<OsString>,
    exec: ExecHow,
    oom_score_adj: Option<i32>,
    // (the serving generation's slot, the new generation's slot)
    route: (usize, usize),
    events: &Events,
    cancel: &CancellationToken,
    old: &mut Option<GenProc>,
) -> Result<(GenProc, Duration), String> {
    let (regular, slot) = route;
    let generation = sup.next_generation;
    sup.next_generation += 1;
    let notify = if sup.plan.wants_notify() {
        Some(
            NotifySocket::bind(&sup.cfg.run_dir, &sup.cfg.name, generation)
                .map_err(|e| format!("creating the notify socket: {e}"))?,
        )
    } else {
        None
    };
    let probe_port = if sup.plan.wants_probe_port()
        || sup.health.as_ref().is_some_and(ReadyPlan::wants_probe_port)
    {
        Some(ready::free_probe_port().map_err(|e| format!("finding a probe port: {e}"))?)
    } else {
        None
    };
    let fds = sup
        .listeners
        .dup_for(slot)
        .map_err(|e| format!("duplicating the listening sockets: {e}"))?;
    let command = join_argv(&argv);
    let kept = matches!(exec, ExecHow::Kept(_));
    let mut child_gen = child::spawn(SpawnPlan {
        generation,
        argv,
        exec,
        fds,
        fd_names: sup.listeners.fd_names(),
        notify,
        probe_port,
        oom_score_adj,
        notify_env: None,
        generation_env: true,
    })
    .map_err(|e| format!("could not start generation {generation} ({command}): {e}"))?;
    tracing::info!(generation, pid = child_gen.pid, socket_slot = slot, %command, kept_executable = kept, "spawned");
    emit(
        events,
        Event::Spawned {
            pid: child_gen.pid,
            generation,
        },
    );
    let spawned = Instant::now();
    let last_error = Mutex::new(String::from("no check has run yet"));
    let timeout = sup.cfg.ready_timeout;
    let outcome = {
        let ctx = ReadyCtx {
            plan: &sup.plan,
            listeners: &sup.listeners,
            route: Route {
                regular: Steer::Slot(regular),
                new: slot,
            },
            probe_port,
            notify: child_gen.notify.as_ref(),
        };
        let ready = ready::wait_ready(&ctx, &last_error);
        tokio::pin!(ready);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                () = child_gen.exited() => break Err(NotReady::Exited),
                () = cancel.cancelled() => break Err(NotReady::Cancelled),
                () = old_exited(old) => {
                    if let Some(mut o) = old.take() {
                        let st = o.reap().await;
                        tracing::error!(generation = o.generation, pid = o.pid, status = %st,
                            "the serving generation died while the next one was starting");
                        view(&sup.view).note(format!(
                            "generation {} (pid {}) died ({st}) during an upgrade",
                            o.generation, o.pid
                        ));
                    }
                }
                () = &mut ready => break Ok(()),
                () = &mut deadline => break Err(NotReady::Timeout),
            }
        }
    };
    // Whatever happened, the probe rule goes: new connections keep going to
    // `regular` until the caller commits.
    if let Err(e) = sup.listeners.steer(regular, regular) {
        tracing::error!(error = %e, "could not reset the steering program");
    }
    match outcome {
        Ok(()) => {
            let after = spawned.elapsed();
            tracing::info!(
                generation,
                pid = child_gen.pid,
                ready_ms = after.as_millis() as u64,
                "ready"
            );
            Ok((child_gen, after))
        }
        Err(why) => {
            let pid = child_gen.pid;
            let status = child_gen.abort().await;
            let reason = match why {
                NotReady::Exited => format!("exited before it was ready ({status})"),
                NotReady::Timeout => format!(
                    "was not ready within {timeout:?} (--ready-timeout; last check: {}) and was killed ({status})",
                    last_error.lock().unwrap_or_else(|p| p.into_inner())
                ),
                NotReady::Cancelled => {
                    format!("was abandoned because baton is stopping ({status})")
                }
            };
            if slot != regular {
                // Only probes reached this socket; don't leave them for the
                // next generation that gets it.
                sup.listeners.close_pending(slot);
            }
            let msg = format!("generation {generation} (pid {pid}) {reason}");
            tracing::warn!(generation, pid, %reason, "generation not ready");
            Err(msg)
        }
    }
}

/// Which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Canary,
    Observe,
}

impl Window {
    fn name(self) -> &'static str {
        match self {
            Window::Canary => "canary",
            Window::Observe => "observation window",
        }
    }
}

/// Watch the new generation for `length` (a canary or an observation
/// window), with a health check every `--health-interval` when there is
/// one. `Err` says why it must be rolled back: it died, failed
/// `--health-failures` checks in a row, or
/// baton is stopping. If the old generation dies meanwhile there is nothing
/// to roll back to: the window ends and the new one stays.
#[allow(clippy::too_many_arguments)]
async fn watch_window(
    sup: &mut Sup,
    kind: Window,
    length: Duration,
    new: &GenProc,
    old: &mut Option<GenProc>,
    route: Route,
    cancel: &CancellationToken,
    events: &Events,
) -> Result<(), String> {
    let name = kind.name();
    let max_failures = sup.cfg.health_failures.max(1);
    let health_timeout = sup.cfg.health_timeout;
    let deadline = tokio::time::Instant::now() + length;
    let interval = sup.cfg.health_interval;
    let mut next_check = tokio::time::Instant::now() + interval;
    let mut failures = 0u32;
    let mut checks = 0u32;
    let has_health = sup.health.is_some();
    loop {
        tokio::select! {
            biased;
            () = new.exited() => {
                return Err(format!("the new generation died during the {name}"));
            }
            () = cancel.cancelled() => {
                return Err(format!("the {name} was abandoned because baton is stopping"));
            }
            () = old_exited(old) => {
                if let Some(mut o) = old.take() {
                    let st = o.reap().await;
                    tracing::error!(generation = o.generation, pid = o.pid, status = %st,
                        "the old generation died during the {name}: nothing to roll back to, the new one stays");
                    emit(events, Event::Note(format!(
                        "generation {} (pid {}) died during the {name} ({st}); generation {} stays",
                        o.generation, o.pid, new.generation
                    )));
                }
                return Ok(());
            }
            () = tokio::time::sleep_until(next_check), if has_health => {
                checks += 1;
                let res = match &sup.health {
                    Some(plan) => ready::health_once(&sup.listeners, plan, route, new.probe_port, health_timeout).await,
                    None => Ok(()),
                };
                // Drop the probe rule the check added.
                let back = match route.regular {
                    Steer::Split { old, .. } => old,
                    Steer::Slot(s) => s,
                };
                if let Err(e) = sup.listeners.steer_to(route.regular, back) {
                    tracing::warn!(error = %e, "could not reset the steering program after a health check");
                }
                match res {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(generation = new.generation, pid = new.pid, failures, error = %e, "health check failed during the {name}");
                        if failures >= max_failures {
                            return Err(format!(
                                "the health check of generation {} (pid {}) failed {failures} times in a row during the {name}: {e}",
                                new.generation, new.pid
                            ));
                        }
                    }
                }
                next_check = tokio::time::Instant::now() + interval;
            }
            () = tokio::time::sleep_until(deadline) => {
                let line = if has_health {
                    format!("{name} passed ({checks} health checks)")
                } else {
                    format!("{name} passed (no health check: the generation stayed alive)")
                };
                tracing::info!(generation = new.generation, pid = new.pid, "{line}");
                emit(events, Event::Note(line));
                return Ok(());
            }
        }
    }
}

/// Roll back an upgrade whose new generation already took new connections
/// (a canary, an observation window, or right after promotion). New
/// connections go to the old generation again — it never stopped
/// accepting. The new one, if alive, first accepts what queued for it and
/// then gets the stop signal (its requests finish); if it died, what is left
/// in its queue is reset (and counted).
async fn roll_back(
    sup: &mut Sup,
    old: Option<GenProc>,
    mut new: GenProc,
    (old_slot, new_slot): (usize, usize),
    why: String,
    hurry: &CancellationToken,
) -> Failure {
    if let Err(e) = sup.listeners.steer(old_slot, old_slot) {
        tracing::error!(error = %e, "could not steer connections back to the old generation");
    }
    sup.serving_slot = old_slot;
    let (generation, pid) = (new.generation, new.pid);
    let ended = if new.has_exited() {
        format!("died ({})", new.abort().await)
    } else {
        if let Some(o) = &old {
            let _ = settle(&sup.listeners, new_slot, o, &new, sup.cfg.steer_quiet).await;
        }
        tracing::info!(
            generation,
            pid,
            signal = super::signal_name(sup.cfg.stop_signal),
            "rolling back: stopping the new generation"
        );
        let out = new
            .stop(sup.cfg.stop_signal, sup.cfg.drain_timeout, hurry)
            .await;
        format!("was stopped ({})", out.status)
    };
    // What queued for it and was never accepted: relayed to the old
    // generation if it is alive (no process has read those connections).
    let (relayed, lost) = match &old {
        Some(o) if !o.has_exited() => sup.listeners.relay_pending(new_slot, sup.cfg.drain_timeout),
        _ => (0, sup.listeners.close_pending(new_slot)),
    };
    view(&sup.view).relayed += relayed as u64;
    let back_to = match &old {
        Some(o) => format!(
            "new connections go to generation {} (pid {}) again",
            o.generation, o.pid
        ),
        None => "the old generation died too: starting one again".into(),
    };
    sup.serving = old;
    if let Some(s) = &sup.serving {
        view(&sup.view).serving(s);
    }
    let mut msg = format!("{why}; generation {generation} (pid {pid}) {ended}; {back_to}");
    if relayed > 0 {
        msg.push_str(&format!(
            "; {relayed} connections that had queued for it were relayed to the old generation"
        ));
    }
    if lost > 0 {
        msg.push_str(&format!(
            "; {lost} connections that had queued for it were reset"
        ));
    }
    tracing::error!(reason = %msg, "upgrade rolled back");
    sup.announce_ready(&format!("last upgrade rolled back: {why}"));
    failed(FailureKind::Failed, msg)
}

/// `leaver`'s accept queue (in `slot`) is empty and stayed so for the quiet
/// period, or `leaver` exited (`Ok`); or `keeper` died meanwhile (`Err`).
async fn settle(
    listeners: &ListenerSet,
    slot: usize,
    keeper: &GenProc,
    leaver: &GenProc,
    quiet: Duration,
) -> Result<Duration, ()> {
    let t = Instant::now();
    let mut empty_since: Option<Instant> = None;
    loop {
        if keeper.has_exited() {
            return Err(());
        }
        if leaver.has_exited() {
            return Ok(t.elapsed());
        }
        match listeners.pending(slot) {
            Ok(false) => {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= quiet {
                    return Ok(t.elapsed());
                }
            }
            Ok(true) => empty_since = None,
            Err(e) => {
                tracing::warn!(error = %e, generation = leaver.generation, "cannot look at the leaving generation's accept queue; stopping it now");
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() > STEER_SETTLE_TIMEOUT {
            tracing::warn!(
                generation = leaver.generation,
                "the leaving generation's accept queue is still not empty after {STEER_SETTLE_TIMEOUT:?}; stopping it anyway"
            );
            return Ok(t.elapsed());
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

fn record_good(sup: &mut Sup, g: &GenProc) {
    sup.last_good = Some(LastGood {
        argv: g.argv.clone(),
        exe: g.exe.clone(),
        generation: g.generation,
    });
}

/// An upgrade: next generation on the idle sockets, ready, steer, settle,
/// stop the old one.
async fn upgrade(
    sup: &mut Sup,
    req: UpgradeReq,
    events: &Events,
    cancel: &CancellationToken,
    hurry: &CancellationToken,
) -> Result<UpgradeReport, Failure> {
    let t0 = Instant::now();
    let mut old = sup.serving.take();
    let Some((from_generation, old_pid)) = old.as_ref().map(|o| (o.generation, o.pid)) else {
        return Err(failed(FailureKind::Refused, "no generation serves".into()));
    };
    let argv = req
        .command
        .or_else(|| sup.last_good.as_ref().map(|l| l.argv.clone()))
        .unwrap_or_else(|| sup.cfg.argv.clone());
    // Admission: nothing is spawned unless every gate passes.
    let exec = match admit(sup, &argv, req.expect_sha256.as_deref(), Some(old_pid)).await {
        Ok(x) => x,
        Err(e) => {
            sup.serving = old;
            let msg = format!(
                "{e}; nothing changed: generation {from_generation} (pid {old_pid}) still serves"
            );
            tracing::warn!(reason = %msg, "upgrade refused");
            return Err(failed(FailureKind::Refused, msg));
        }
    };
    let newcomer_adj = sup.cfg.admission.newcomer_oom_score_adj;
    let own_adj = child::own_oom_score_adj();
    let oom_score_adj = (newcomer_adj != 0).then(|| (own_adj + newcomer_adj).clamp(-1000, 1000));
    let old_slot = sup.serving_slot;
    let steering = sup.listeners.any_steered();
    let new_slot = if steering { 1 - old_slot } else { old_slot };
    {
        let mut v = view(&sup.view);
        v.phase = "upgrading";
    }
    tracing::info!(generation = from_generation, pid = old_pid, command = %join_argv(&argv), "upgrade: starting the next generation");
    sup.notify_systemd(&[
        "RELOADING=1".into(),
        format!("MONOTONIC_USEC={}", baton::notify::monotonic_usec()),
        format!("STATUS=upgrading generation {from_generation} (pid {old_pid})"),
    ]);
    if steering {
        let stale = sup.listeners.close_pending(new_slot);
        if stale > 0 {
            tracing::debug!(
                connections = stale,
                "closed stale probe connections on the idle sockets"
            );
        }
    }
    let launched = launch(
        sup,
        argv,
        exec,
        oom_score_adj,
        (old_slot, new_slot),
        events,
        cancel,
        &mut old,
    )
    .await;
    let (mut new, ready_after) = match launched {
        Ok(x) => x,
        Err(reason) => {
            let alive = old.is_some();
            sup.serving = old;
            let msg = if alive {
                format!("{reason}; generation {from_generation} (pid {old_pid}) still serves")
            } else {
                format!("{reason}; generation {from_generation} died meanwhile: starting one again")
            };
            tracing::warn!(reason = %msg, "upgrade failed, rolled back");
            sup.announce_ready(&format!("last upgrade failed: {reason}"));
            return Err(failed(FailureKind::Failed, msg));
        }
    };
    let (generation, pid) = (new.generation, new.pid);
    emit(
        events,
        Event::Ready {
            pid,
            after_ms: ready_after.as_millis() as u64,
        },
    );
    // A canary: both generations take new connections for a while.
    if let Some(length) = sup.cfg.canary
        && steering
        && old.is_some()
    {
        let split = Steer::Split {
            new: new_slot,
            old: old_slot,
            percent: sup.cfg.canary_percent,
        };
        if let Err(e) = sup.listeners.steer_to(split, old_slot) {
            let status = new.abort().await;
            sup.serving = old;
            let msg = format!(
                "could not start the canary of generation {generation}: {e}; it was killed ({status}) and generation {from_generation} still serves"
            );
            sup.announce_ready("last upgrade failed");
            return Err(failed(FailureKind::Failed, msg));
        }
        tracing::info!(generation, pid, percent = sup.cfg.canary_percent, window = ?length, "canary: both generations take new connections");
        emit(
            events,
            Event::Note(format!(
                "canary: generation {generation} (pid {pid}) gets {}% of new connections for {length:?}",
                sup.cfg.canary_percent
            )),
        );
        view(&sup.view).phase = "canary";
        let route = Route {
            regular: split,
            new: new_slot,
        };
        match watch_window(
            sup,
            Window::Canary,
            length,
            &new,
            &mut old,
            route,
            cancel,
            events,
        )
        .await
        {
            Ok(()) => {}
            Err(why) => {
                return Err(roll_back(sup, old, new, (old_slot, new_slot), why, hurry).await);
            }
        }
    }
    // The commit point: new connections go to the new generation.
    if steering {
        if let Err(e) = sup.listeners.steer(new_slot, old_slot) {
            let status = new.abort().await;
            sup.serving = old;
            let msg = format!(
                "could not steer connections to generation {generation}: {e}; it was killed ({status}) and generation {from_generation} still serves"
            );
            sup.announce_ready("last upgrade failed");
            return Err(failed(FailureKind::Failed, msg));
        }
        tracing::info!(generation, pid, "new connections now go to this generation");
        let next = if sup.cfg.observe.is_zero() {
            format!("waiting for generation {from_generation}'s queue to empty")
        } else {
            format!("generation {from_generation} stands by")
        };
        emit(
            events,
            Event::Note(format!(
                "new connections go to generation {generation} (pid {pid}); {next}"
            )),
        );
    }
    sup.serving_slot = new_slot;
    emit(events, Event::Promoted { pid });
    view(&sup.view).serving(&new);
    // The observation window: the old generation keeps running, idle, ready
    // to take the connections back.
    if !sup.cfg.observe.is_zero() && steering && old.is_some() {
        let length = sup.cfg.observe;
        tracing::info!(generation, pid, window = ?length, "observation window: the old generation stands by");
        emit(
            events,
            Event::Note(format!(
                "observing generation {generation} (pid {pid}) for {length:?}; generation {from_generation} stands by"
            )),
        );
        view(&sup.view).phase = "observing";
        let route = Route {
            regular: Steer::Slot(new_slot),
            new: new_slot,
        };
        if let Err(why) = watch_window(
            sup,
            Window::Observe,
            length,
            &new,
            &mut old,
            route,
            cancel,
            events,
        )
        .await
        {
            return Err(roll_back(sup, old, new, (old_slot, new_slot), why, hurry).await);
        }
        view(&sup.view).phase = "upgrading";
    }
    let drain_start = Instant::now();
    if steering && let Some(o) = &old {
        match settle(&sup.listeners, old_slot, &new, o, sup.cfg.steer_quiet).await {
            Ok(after) => {
                tracing::info!(
                    generation = from_generation,
                    pid = old_pid,
                    settle_ms = after.as_millis() as u64,
                    "the old generation's accept queue is empty"
                )
            }
            Err(()) => {
                // The new generation died right after promotion: steer back
                // to the old one, which never stopped accepting.
                let why = "the new generation died right after promotion".to_owned();
                return Err(roll_back(sup, old, new, (old_slot, new_slot), why, hurry).await);
            }
        }
    }
    let mut closed = 0;
    if let Some(mut o) = old.take() {
        tracing::info!(
            generation = o.generation,
            pid = o.pid,
            signal = super::signal_name(sup.cfg.stop_signal),
            "stopping the old generation"
        );
        let out = o
            .stop(sup.cfg.stop_signal, sup.cfg.drain_timeout, hurry)
            .await;
        if out.graceful {
            tracing::info!(generation = o.generation, pid = o.pid, status = %out.status, after_ms = out.after.as_millis() as u64, "old generation exited");
        } else {
            tracing::warn!(generation = o.generation, pid = o.pid, status = %out.status, "old generation killed after --drain-timeout");
            emit(
                events,
                Event::Note(format!(
                    "generation {} (pid {}) did not exit within --drain-timeout {:?}: killed",
                    o.generation, o.pid, sup.cfg.drain_timeout
                )),
            );
        }
    }
    // Whatever is left in the old socket's queue (a handshake that
    // completed after the quiet period, or the old generation died during
    // the upgrade) would otherwise wait there until a later generation gets
    // this socket. No process read those connections: relay them to the new
    // generation (the steering program sends there now).
    if steering {
        let (relayed, lost) = sup.listeners.relay_pending(old_slot, sup.cfg.drain_timeout);
        view(&sup.view).relayed += relayed as u64;
        closed = lost as u64;
        if relayed > 0 {
            tracing::info!(
                connections = relayed,
                "connections left unaccepted in the old generation's queue were relayed to the new generation"
            );
        }
        if closed > 0 {
            tracing::warn!(
                connections = closed,
                "connections left unaccepted in the old generation's queue were closed"
            );
        }
    }
    let drain_ms = drain_start.elapsed().as_millis() as u64;
    emit(
        events,
        Event::Drained {
            after_ms: drain_ms,
            handed_over: 0,
            closed,
        },
    );
    if new.has_exited() {
        // It died while the old one drained (which had its stop signal and
        // cannot take connections back): nothing serves. The owner starts
        // the last command that worked after the restart backoff; the new
        // generation's socket keeps queueing connections for it.
        let status = new.reap().await;
        let msg = format!(
            "generation {generation} (pid {pid}) died ({status}) while generation {from_generation} (pid {old_pid}) drained; no generation serves: starting the last command that worked again (connections wait in the queue meanwhile)"
        );
        tracing::error!(reason = %msg, "upgrade failed after promotion");
        view(&sup.view).note(format!(
            "generation {generation} (pid {pid}) died ({status}) during the drain of generation {from_generation}"
        ));
        return Err(failed(FailureKind::Failed, msg));
    }
    record_good(sup, &new);
    if oom_score_adj.is_some() {
        // The overlap is over: the newcomer is no longer the first to go.
        new.set_oom_score_adj(own_adj);
    }
    sup.serving = Some(new);
    let total_ms = t0.elapsed().as_millis() as u64;
    tracing::info!(
        from_generation,
        generation,
        pid,
        ready_ms = ready_after.as_millis() as u64,
        drain_ms,
        total_ms,
        "upgrade done"
    );
    sup.announce_ready("last upgrade succeeded");
    Ok(UpgradeReport {
        from_generation,
        to_generation: generation,
        old_pid,
        new_pid: pid,
        ready_ms: ready_after.as_millis() as u64,
        drain_ms,
        total_ms,
        handed_over: 0,
        closed_at_deadline: closed,
        state_bytes: 0,
        pause_ms: None,
    })
}

/// The gates before a new generation is spawned: pre-flight of the
/// executable (pinned with `expect_sha256`), the `--check` command, and,
/// next to a serving generation, memory headroom. Returns how to exec it.
async fn admit(
    sup: &Sup,
    argv: &[OsString],
    expect_sha256: Option<&str>,
    serving_pid: Option<u32>,
) -> Result<ExecHow, String> {
    let cfg = &sup.cfg.admission;
    let program = admission::preflight(
        argv.first().map_or("".as_ref(), |a| a.as_os_str()),
        expect_sha256,
    )
    .map_err(|e| format!("pre-flight: {e}"))?;
    admission::check(cfg).await?;
    if let Some(pid) = serving_pid
        && let Some(line) = admission::memory(cfg, pid)?
    {
        tracing::info!("{line}");
    }
    Ok(match program.pinned {
        Some(k) => {
            tracing::info!(path = %program.path.display(), "SHA-256 verified; the hashed file will be executed through its open fd");
            ExecHow::Kept(k)
        }
        None => ExecHow::Disk,
    })
}

/// What to run when restarting after a crash: the last command that worked,
/// from the kept executable if the file on disk changed since.
fn restart_command(sup: &Sup) -> Result<(Vec<OsString>, ExecHow), String> {
    let Some(lg) = &sup.last_good else {
        return Ok((sup.cfg.argv.clone(), ExecHow::Disk));
    };
    let Some(k) = &lg.exe else {
        return Ok((lg.argv.clone(), ExecHow::Disk));
    };
    let on_disk = child::resolve_program(lg.argv.first().map_or("".as_ref(), |a| a.as_os_str()));
    match on_disk {
        Ok(p) if k.unchanged_at(&p) => Ok((lg.argv.clone(), ExecHow::Disk)),
        _ if k.elf => {
            tracing::warn!(
                path = %k.path.display(),
                last_good_generation = lg.generation,
                "the executable changed on disk since the last good generation started; restarting from the kept copy of that one"
            );
            Ok((lg.argv.clone(), ExecHow::Kept(Arc::clone(k))))
        }
        _ => Err(format!(
            "not restarting: {} changed on disk since generation {} (the last one that worked) started, and it is not a native executable, so baton cannot run the kept copy; start the new version with `baton upgrade` (or `baton upgrade -- CMD`)",
            k.path.display(),
            lg.generation
        )),
    }
}

/// Start a generation when none serves.
async fn start(
    sup: &mut Sup,
    kind: StartKind,
    req: UpgradeReq,
    events: &Events,
    cancel: &CancellationToken,
) -> Result<UpgradeReport, Failure> {
    let t0 = Instant::now();
    let from_generation = view(&sup.view).generation;
    let (argv, exec) = match kind {
        StartKind::Initial => (sup.cfg.argv.clone(), ExecHow::Disk),
        StartKind::Requested => {
            let argv = req
                .command
                .or_else(|| sup.last_good.as_ref().map(|l| l.argv.clone()))
                .unwrap_or_else(|| sup.cfg.argv.clone());
            match admit(sup, &argv, req.expect_sha256.as_deref(), None).await {
                Ok(exec) => (argv, exec),
                Err(e) => {
                    tracing::warn!(reason = %e, "start refused");
                    return Err(failed(FailureKind::Refused, e));
                }
            }
        }
        StartKind::Restart => match restart_command(sup) {
            Ok(x) => {
                if let Err(e) = admission::check(&sup.cfg.admission).await {
                    // Try again after the backoff: the check may pass later
                    // (a configuration being fixed).
                    let reason = format!("not restarting yet: {e}");
                    tracing::error!(%reason, "restart refused by the pre-flight check");
                    view(&sup.view).note(reason.clone());
                    sup.notify_systemd(&[format!("STATUS={reason}")]);
                    return Err(failed(FailureKind::Refused, reason));
                }
                x
            }
            Err(reason) => {
                tracing::error!(%reason, "no generation serves");
                let mut v = view(&sup.view);
                v.down_reason = Some(reason.clone());
                drop(v);
                sup.notify_systemd(&[format!("STATUS={reason}")]);
                return Err(failed(FailureKind::Refused, reason));
            }
        },
    };
    view(&sup.view).phase = match kind {
        StartKind::Restart => "restarting",
        _ => "starting",
    };
    let slot = sup.serving_slot;
    let mut none = None;
    match launch(
        sup,
        argv,
        exec,
        None,
        (slot, slot),
        events,
        cancel,
        &mut none,
    )
    .await
    {
        Ok((g, ready_after)) => {
            emit(
                events,
                Event::Ready {
                    pid: g.pid,
                    after_ms: ready_after.as_millis() as u64,
                },
            );
            emit(events, Event::Promoted { pid: g.pid });
            let report = UpgradeReport {
                from_generation,
                to_generation: g.generation,
                old_pid: 0,
                new_pid: g.pid,
                ready_ms: ready_after.as_millis() as u64,
                drain_ms: 0,
                total_ms: t0.elapsed().as_millis() as u64,
                handed_over: 0,
                closed_at_deadline: 0,
                state_bytes: 0,
                pause_ms: None,
            };
            if kind == StartKind::Restart {
                view(&sup.view).note(format!(
                    "restarted as generation {} (pid {})",
                    g.generation, g.pid
                ));
            }
            record_good(sup, &g);
            sup.serving = Some(g);
            sup.announce_ready("");
            Ok(report)
        }
        Err(reason) => Err(failed(FailureKind::Failed, reason)),
    }
}

/// Stop the serving generation (baton is exiting).
async fn stop(sup: &mut Sup, hurry: &CancellationToken) {
    sup.notify_systemd(&["STOPPING=1".into(), "STATUS=stopping".into()]);
    if let Some(mut g) = sup.serving.take() {
        tracing::info!(
            generation = g.generation,
            pid = g.pid,
            signal = super::signal_name(sup.cfg.stop_signal),
            "stopping the serving generation"
        );
        let out = g
            .stop(sup.cfg.stop_signal, sup.cfg.drain_timeout, hurry)
            .await;
        tracing::info!(generation = g.generation, pid = g.pid, status = %out.status, after_ms = out.after.as_millis() as u64, graceful = out.graceful, "generation stopped");
        sup.final_status = g.exit_code();
    }
}

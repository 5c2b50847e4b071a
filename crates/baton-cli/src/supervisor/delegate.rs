//! `baton run --delegate -- SERVER`: PID 1 of a container whose server is
//! a library-mode baton app, which upgrades *itself*.
//!
//! A library-mode server cannot upgrade itself as PID 1: the old
//! generation's exit would end the container. Under a delegate, the server
//! is not PID 1; baton is, and it does not start generations itself. It
//! starts the server once, with a `NOTIFY_SOCKET` of its own, and follows
//! the server's own upgrades the way systemd follows a `Type=notify`
//! service with `NotifyAccess=main`:
//!
//! * only the current **main pid** is listened to (the sender is checked
//!   with `SCM_CREDENTIALS`); the first main pid is the one baton started;
//! * `MAINPID=<new>` from the main pid (the old generation names its
//!   successor, which must be a process of baton's tree) makes `<new>` the
//!   main pid; the old one is now a predecessor, draining;
//! * `READY=1`, `RELOADING=1`, `STATUS=` are tracked (and passed on to
//!   systemd when baton itself runs under it);
//! * baton is a child subreaper (or PID 1): each new generation was forked
//!   by its predecessor and is reparented to baton when that one exits,
//!   and every exited process is reaped ([`super::reaper`]);
//! * if the main pid exits while a predecessor still runs, that
//!   predecessor may take the service back with `MAINPID=<its own pid>`
//!   (a library-mode generation does when its successor dies during the
//!   drain); if nothing serves any more, the server is started again after
//!   a backoff, like `baton run` restarts a crashed generation;
//! * SIGTERM/SIGINT (or `baton stop`) send `--stop-signal` to the main pid;
//!   baton exits with its exit status once it and its predecessors are
//!   gone (a second signal kills them at once);
//! * `baton upgrade` to baton's control socket is forwarded to the
//!   server's own control socket (`--app-control PATH`), with its progress
//!   and result; SIGHUP to baton sends `--upgrade-signal` (USR2) to the main
//!   pid.
//!
//! The listeners given with `--listen` are bound by baton, passed to the
//! server with `LISTEN_FDS` when it starts (the server hands them on at its
//! upgrades), and kept open by baton, so a restart finds the same sockets
//! and connections made meanwhile wait in their queue.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton::control::{
    Command, Counters, Event, Failure, FailureKind, LastUpgrade, Reply, Request, StatusReport,
    UpgradeReport,
};
use baton::notify::Notifier;
use baton_sys::process::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use super::child::{self, ExecHow, GenProc, SpawnPlan, join_argv};
use super::ready::{bind_notify, in_tree};
use super::sockets::ListenerSet;
use super::upgrade::Signals;
use super::{RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX, RESTART_BACKOFF_RESET_AFTER, reaper};

/// Largest notification datagram read.
const MAX_NOTIFY_DATAGRAM: usize = 4096;
/// How long baton waits for the reaper to report a main pid's exit status
/// after it exited.
const STATUS_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for the server's answer to a forwarded `baton upgrade`
/// (the server bounds its own upgrade; this only frees the forwarding slot
/// if it never answers).
pub const FORWARD_UPGRADE_TIMEOUT: Duration = Duration::from_secs(600);

/// Delegate mode's settings.
#[derive(Debug)]
pub struct DelegateConfig {
    /// Service name.
    pub name: String,
    /// The server's command line.
    pub argv: Vec<OsString>,
    /// Time the first (or a restarted) server has to send `READY=1`.
    pub ready_timeout: Duration,
    /// Signal that stops the server gracefully.
    pub stop_signal: Signal,
    /// Time it has to exit after that, before SIGKILL.
    pub drain_timeout: Duration,
    /// Signal that asks the server to upgrade itself (SIGHUP to baton).
    pub upgrade_signal: Signal,
    /// The server's own control socket: `baton upgrade` is forwarded there.
    pub app_control: Option<PathBuf>,
    /// Private directory for the notify socket.
    pub run_dir: PathBuf,
}

/// One notification from a process that passed the uid check.
#[derive(Debug)]
struct Note {
    pid: u32,
    lines: Vec<(String, String)>,
}

/// Read notifications from the socket, check the sender's uid, and pass
/// them on with the sender's pid (the owner decides whom to listen to).
fn read_notes(sock: std::os::unix::net::UnixDatagram) -> std::io::Result<mpsc::Receiver<Note>> {
    let sock = tokio::net::UnixDatagram::from_std(sock)?;
    let (tx, rx) = mpsc::channel(256);
    drop(tokio::spawn(async move {
        let ours = baton_sys::process::euid();
        let mut buf = vec![0u8; MAX_NOTIFY_DATAGRAM];
        while let Some((c, len, truncated)) =
            super::ready::recv_notification(&sock, &mut buf, None).await
        {
            if c.uid != ours && c.uid != 0 {
                tracing::warn!(
                    sender_pid = c.pid,
                    sender_uid = c.uid,
                    "notification from another uid ignored"
                );
                continue;
            }
            if truncated {
                tracing::warn!(
                    sender_pid = c.pid,
                    "notification larger than {MAX_NOTIFY_DATAGRAM} bytes ignored"
                );
                continue;
            }
            let text = String::from_utf8_lossy(&buf[..len]);
            let lines = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            if tx.send(Note { pid: c.pid, lines }).await.is_err() {
                return;
            }
        }
    }));
    Ok(rx)
}

/// A process baton follows: the main pid or a predecessor.
#[derive(Debug)]
struct Tracked {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    /// The process baton started itself (its exit status comes from its
    /// handle; the others' from the reaper).
    started: Option<GenProc>,
    since: Instant,
}

impl Tracked {
    fn follow(pid: u32) -> std::io::Result<Tracked> {
        Ok(Tracked {
            pid,
            pidfd: baton_sys::fd::async_fd(
                baton_sys::process::pidfd_open(pid)?,
                tokio::io::Interest::READABLE,
            )?,
            started: None,
            since: Instant::now(),
        })
    }

    fn started(g: GenProc) -> std::io::Result<Tracked> {
        let mut t = Tracked::follow(g.pid)?;
        t.started = Some(g);
        Ok(t)
    }

    async fn exited(&self) {
        // A pidfd stays readable once the process exited.
        let _ = self.pidfd.readable().await;
    }

    fn has_exited(&self) -> bool {
        baton_sys::fd::poll_readable_now(self.pidfd.get_ref().as_fd()).unwrap_or(false)
    }

    /// How it ended (exit code, or 128 + signal), once it has exited.
    async fn status(&mut self) -> Option<u8> {
        if let Some(g) = self.started.as_mut() {
            // Not `reap`: that kills the rest of the process group, where
            // the server's next generation lives.
            g.reap_alone().await;
            return g.exit_code();
        }
        let deadline = Instant::now() + STATUS_WAIT;
        loop {
            reaper::reap_now();
            if let Some(s) = reaper::take_status(self.pid) {
                return Some(s);
            }
            // Not (or no longer) our child: its parent, a previous
            // generation, collects its status.
            if proc_ppid(self.pid) != Some(baton_sys::process::getpid())
                || Instant::now() > deadline
            {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The parent of `pid`, if it still exists (a zombie does).
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn exited(t: &Option<Tracked>) {
    match t {
        Some(t) => t.exited().await,
        None => std::future::pending().await,
    }
}

/// Resolves with the index of the first predecessor that exited.
async fn predecessor_exited(preds: &[Tracked]) -> usize {
    if preds.is_empty() {
        return std::future::pending().await;
    }
    let futs = preds.iter().enumerate().map(|(i, p)| {
        Box::pin(async move {
            p.exited().await;
            i
        })
    });
    futures_select_all(futs).await
}

/// The first of several futures to finish (a tiny `select_all`).
async fn futures_select_all<F>(futs: impl Iterator<Item = F>) -> usize
where
    F: std::future::Future<Output = usize> + Unpin,
{
    let mut futs: Vec<F> = futs.collect();
    std::future::poll_fn(move |cx| {
        for f in futs.iter_mut() {
            if let std::task::Poll::Ready(i) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(i);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Default)]
struct DelegateView {
    phase: &'static str,
    main_pid: u32,
    generation: u64,
    since: Option<Instant>,
    app_status: Option<String>,
    predecessors: Vec<u32>,
    counters: Counters,
    last_upgrade: Option<LastUpgrade>,
    recent: Vec<String>,
}

impl DelegateView {
    fn note(&mut self, s: String) {
        self.recent.push(s);
        if self.recent.len() > 5 {
            self.recent.remove(0);
        }
    }
}

struct State {
    cfg: DelegateConfig,
    listeners: Option<ListenerSet>,
    notify_env: OsString,
    systemd: Option<Notifier>,
    main: Option<Tracked>,
    preds: Vec<Tracked>,
    view: Arc<Mutex<DelegateView>>,
    /// Number given to the next start of the server (for logs only).
    starts: u64,
    /// Waiting for `READY=1` from the server baton started, until then.
    ready_deadline: Option<tokio::time::Instant>,
    announced_ready: bool,
    restart_at: Option<tokio::time::Instant>,
    backoff: Duration,
    stopping: bool,
    kill_at: Option<tokio::time::Instant>,
    final_status: Option<u8>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn systemd(&self, lines: &[String]) {
        if let Some(n) = &self.systemd
            && let Err(e) = n.send(lines)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, DelegateView> {
        lock(&self.view)
    }

    fn sync_view(&self) {
        let mut v = lock(&self.view);
        v.main_pid = self.main.as_ref().map_or(0, |m| m.pid);
        v.since = self.main.as_ref().map(|m| m.since);
        v.predecessors = self.preds.iter().map(|p| p.pid).collect();
    }

    /// Start the server (first start, or after it died).
    fn start(&mut self) {
        self.starts += 1;
        let fds = match &self.listeners {
            Some(l) => match l.dup_for(0) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "duplicating the listening sockets");
                    self.schedule_restart(format!("duplicating the listening sockets: {e}"));
                    return;
                }
            },
            None => Vec::new(),
        };
        let plan = SpawnPlan {
            generation: self.starts,
            argv: self.cfg.argv.clone(),
            exec: ExecHow::Disk,
            fds,
            fd_names: self
                .listeners
                .as_ref()
                .map(ListenerSet::fd_names)
                .unwrap_or_default(),
            notify: None,
            probe_port: None,
            oom_score_adj: None,
            notify_env: Some(self.notify_env.clone()),
            generation_env: false,
        };
        let command = join_argv(&self.cfg.argv);
        match child::spawn(plan).and_then(Tracked::started) {
            Ok(t) => {
                tracing::info!(pid = t.pid, %command, "started the server; following its own upgrades");
                self.main = Some(t);
                self.ready_deadline = Some(tokio::time::Instant::now() + self.cfg.ready_timeout);
                let mut v = self.view();
                v.phase = "starting";
                v.generation += 1;
                drop(v);
                self.sync_view();
            }
            Err(e) => {
                let why = format!("could not start {command}: {e}");
                tracing::error!("{why}");
                self.schedule_restart(why);
            }
        }
    }

    fn schedule_restart(&mut self, why: String) {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(RESTART_BACKOFF_MAX);
        self.restart_at = Some(tokio::time::Instant::now() + wait);
        tracing::warn!(retry_in_ms = wait.as_millis() as u64, reason = %why,
            "no server process serves: starting it again after a pause");
        {
            let mut v = self.view();
            v.phase = "restarting";
            v.note(format!("{why}; restarting"));
        }
        self.systemd(&[format!(
            "STATUS=no server process; restarting in {} ms: {why}",
            wait.as_millis()
        )]);
    }

    /// A notification from `pid`.
    fn on_note(&mut self, note: Note) {
        let from_main = self.main.as_ref().is_some_and(|m| m.pid == note.pid);
        if !from_main {
            // A predecessor taking the service back (its successor died).
            let claim = self.main.is_none()
                && note
                    .lines
                    .iter()
                    .any(|(k, v)| k == "MAINPID" && v.parse::<u32>().ok() == Some(note.pid));
            if let (true, Some(i)) = (claim, self.preds.iter().position(|p| p.pid == note.pid)) {
                let t = self.preds.remove(i);
                tracing::warn!(pid = t.pid, "the previous generation took the service back");
                self.view().note(format!(
                    "pid {} took the service back after its successor died",
                    t.pid
                ));
                self.main = Some(t);
                self.restart_at = None;
                self.sync_view();
            } else {
                if self.preds.iter().any(|p| p.pid == note.pid) {
                    // A predecessor's BARRIER=1 after it named its successor
                    // (its fd is closed already, which is all it waits for).
                    tracing::debug!(
                        sender_pid = note.pid,
                        "notification from a previous generation ignored"
                    );
                } else {
                    tracing::warn!(
                        sender_pid = note.pid,
                        "notification from a process that is not the main pid ignored (NotifyAccess=main)"
                    );
                }
                return;
            }
        }
        for (k, v) in &note.lines {
            match k.as_str() {
                "MAINPID" => self.on_mainpid(note.pid, v),
                "READY" if v == "1" => {
                    self.ready_deadline = None;
                    let first = !self.announced_ready;
                    {
                        let mut view = self.view();
                        view.phase = "serving";
                    }
                    let status = self.view().app_status.clone();
                    let mut lines = vec!["READY=1".to_owned()];
                    if let Some(s) = status {
                        lines.push(format!("STATUS={s}"));
                    }
                    self.systemd(&lines);
                    self.announced_ready = true;
                    if first {
                        tracing::info!(pid = note.pid, "the server is ready");
                    }
                }
                "RELOADING" if v == "1" => {
                    tracing::info!(pid = note.pid, "the server is upgrading itself");
                    self.view().phase = "upgrading";
                    let usec = note
                        .lines
                        .iter()
                        .find(|(k, _)| k == "MONOTONIC_USEC")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_else(|| baton::notify::monotonic_usec().to_string());
                    self.systemd(&["RELOADING=1".into(), format!("MONOTONIC_USEC={usec}")]);
                }
                "STATUS" => {
                    tracing::debug!(pid = note.pid, status = %v, "server status");
                    self.view().app_status = Some(v.clone());
                }
                "STOPPING" | "BARRIER" | "MONOTONIC_USEC" | "ERRNO" | "EXIT_STATUS" => {
                    tracing::debug!(pid = note.pid, "{k}={v}");
                }
                _ => tracing::debug!(pid = note.pid, "notification {k}={v} ignored"),
            }
        }
    }

    /// `MAINPID=` from the main pid: follow the server's upgrade.
    fn on_mainpid(&mut self, from: u32, value: &str) {
        let Ok(new) = value.trim().parse::<u32>() else {
            tracing::warn!(from, value, "MAINPID= is not a pid; ignored");
            return;
        };
        if new == from {
            return;
        }
        if !in_tree(new, baton_sys::process::getpid()) {
            tracing::warn!(
                from,
                new,
                "MAINPID= names a process that is not baton's descendant; ignored"
            );
            return;
        }
        let t = match Tracked::follow(new) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(from, new, error = %e, "cannot follow the new main pid; ignored");
                return;
            }
        };
        if let Some(old) = self.main.replace(t) {
            self.preds.push(old);
        }
        tracing::info!(
            old_pid = from,
            new_pid = new,
            "following the server's upgrade: new main pid"
        );
        {
            let mut v = self.view();
            v.generation += 1;
            v.counters.upgrades_succeeded += 1;
            v.note(format!("main pid {from} -> {new}"));
        }
        self.backoff = RESTART_BACKOFF_INITIAL;
        self.sync_view();
    }

    /// The main pid exited.
    async fn on_main_exit(&mut self) {
        let Some(mut m) = self.main.take() else {
            return;
        };
        let status = m.status().await;
        let served = m.since.elapsed();
        let how = status.map_or("unknown status".to_owned(), |s| format!("status {s}"));
        self.ready_deadline = None;
        if self.stopping {
            tracing::info!(pid = m.pid, %how, "the server exited");
            self.final_status = status.or(self.final_status);
            self.sync_view();
            return;
        }
        if served >= RESTART_BACKOFF_RESET_AFTER {
            self.backoff = RESTART_BACKOFF_INITIAL;
        }
        let live: Vec<u32> = self
            .preds
            .iter()
            .filter(|p| !p.has_exited())
            .map(|p| p.pid)
            .collect();
        if live.is_empty() {
            tracing::error!(pid = m.pid, %how, "the server's main process exited");
            self.view().counters.restarts += 1;
            self.schedule_restart(format!("main pid {} exited ({how})", m.pid));
        } else {
            tracing::error!(pid = m.pid, %how, predecessors = ?live,
                "the server's main process exited; waiting for its predecessor to take the service back (MAINPID=)");
            self.view().phase = "waiting";
        }
        self.sync_view();
    }

    /// A predecessor exited: it has been reaped (or is, now).
    async fn on_pred_exit(&mut self, i: usize) {
        let mut p = self.preds.remove(i);
        let status = p.status().await;
        tracing::info!(pid = p.pid, ?status, "a previous generation exited");
        if self.main.is_none()
            && !self.stopping
            && self.restart_at.is_none()
            && self.preds.is_empty()
        {
            self.view().counters.restarts += 1;
            self.schedule_restart("the server's processes all exited".into());
        }
        self.sync_view();
    }

    fn begin_stop(&mut self, why: &str) {
        if self.stopping {
            tracing::warn!("{why} again: killing the server now");
            self.kill_all();
            return;
        }
        tracing::info!("{why}: stopping the server gracefully (send it again to kill at once)");
        self.stopping = true;
        self.restart_at = None;
        self.view().phase = "stopping";
        self.systemd(&["STOPPING=1".into(), "STATUS=stopping".into()]);
        if let Some(m) = &self.main {
            if let Err(e) = baton_sys::process::kill(m.pid, self.cfg.stop_signal) {
                tracing::debug!(pid = m.pid, error = %e, "stop signal not sent");
            }
        }
        self.kill_at = Some(tokio::time::Instant::now() + self.cfg.drain_timeout);
    }

    fn kill_all(&mut self) {
        let mut pids: Vec<u32> = self.preds.iter().map(|p| p.pid).collect();
        pids.extend(self.main.as_ref().map(|m| m.pid));
        for pid in pids {
            // The server's generations share the process group of the one
            // baton started.
            let _ = baton_sys::process::kill_group(pid, Signal::KILL);
            let _ = baton_sys::process::kill(pid, Signal::KILL);
        }
        if let Some(g) = self.main.as_ref().and_then(|m| m.started.as_ref()) {
            let _ = baton_sys::process::kill_group(g.pid, Signal::KILL);
        }
    }

    fn status_report(&self, statics: &[String], listeners: &[baton::ListenerInfo]) -> StatusReport {
        let v = self.view();
        let mut notes = Vec::new();
        notes.push(format!("command: {}", join_argv(&self.cfg.argv)));
        if let Some(s) = &v.app_status {
            notes.push(format!("app status (STATUS=): {s}"));
        }
        if !v.predecessors.is_empty() {
            notes.push(format!(
                "previous generations still running: {:?}",
                v.predecessors
            ));
        }
        notes.extend(statics.iter().cloned());
        notes.push(format!("processes reaped: {}", reaper::reaped()));
        notes.extend(v.recent.iter().cloned());
        StatusReport {
            mode: "delegate".into(),
            name: Some(self.cfg.name.clone()),
            app_version: join_argv(&self.cfg.argv),
            generation: v.generation,
            pid: v.main_pid,
            answered_by: baton_sys::process::getpid(),
            uptime_ms: v.since.map_or(0, |t| t.elapsed().as_millis() as u64),
            phase: v.phase.into(),
            upgrade_in_progress: v.phase == "upgrading",
            listeners: listeners.to_vec(),
            last_upgrade: v.last_upgrade.clone(),
            counters: v.counters.clone(),
            notes,
        }
    }
}

/// Forward `baton upgrade` to the server's own control socket.
async fn forward_upgrade(
    path: PathBuf,
    opts: baton::control::UpgradeOptions,
    events: mpsc::UnboundedSender<Event>,
    reply: oneshot::Sender<Result<UpgradeReport, Failure>>,
    view: Arc<Mutex<DelegateView>>,
    busy: Arc<AtomicBool>,
) {
    let res = async {
        let client = baton::control::Client::connect(&path)
            .await
            .map_err(|e| Failure {
                kind: FailureKind::Refused,
                message: format!("cannot reach the server's control socket (--app-control): {e}"),
            })?;
        let req = Request::Upgrade(opts);
        let call = client.call(&req, |e| {
            let _ = events.send(e.clone());
        });
        let r = tokio::time::timeout(FORWARD_UPGRADE_TIMEOUT, call)
            .await
            .map_err(|_| Failure {
                kind: FailureKind::Internal,
                message: format!(
                    "the server did not answer the upgrade within {FORWARD_UPGRADE_TIMEOUT:?}"
                ),
            })?
            .map_err(|e| Failure {
                kind: FailureKind::Internal,
                message: format!("the server's control socket: {e}"),
            })?;
        match r {
            Reply::Upgraded(r) => Ok(r),
            Reply::Failed(f) => Err(f),
            other => Err(Failure {
                kind: FailureKind::Internal,
                message: format!("unexpected answer from the server: {other:?}"),
            }),
        }
    }
    .await;
    {
        let mut v = lock(&view);
        let (result, reason, report) = match &res {
            Ok(r) => ("success", None, Some(r.clone())),
            Err(f) if f.kind == FailureKind::Failed => ("failed", Some(f.message.clone()), None),
            Err(f) => ("refused", Some(f.message.clone()), None),
        };
        match result {
            "failed" => v.counters.upgrades_failed += 1,
            "refused" => v.counters.upgrades_refused += 1,
            _ => {}
        }
        v.last_upgrade = Some(LastUpgrade {
            result: result.into(),
            reason,
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            report,
        });
    }
    busy.store(false, Ordering::SeqCst);
    let _ = reply.send(res);
}

/// Run delegate mode until the server is stopped. Returns the main
/// process's exit status (exit code, or 128 + signal).
pub async fn run(
    cfg: DelegateConfig,
    listeners: Option<ListenerSet>,
    mut rx: mpsc::Receiver<Command>,
    mut signals: Signals,
) -> Result<Option<u8>, String> {
    let (sock, notify_env, path) = bind_notify(&cfg.run_dir, &cfg.name, "delegate")
        .map_err(|e| format!("creating the notify socket: {e}"))?;
    let _remove = RemoveOnDrop(path);
    let mut notes = read_notes(sock).map_err(|e| format!("notify socket: {e}"))?;
    let listener_infos = listeners
        .as_ref()
        .map(ListenerSet::infos)
        .unwrap_or_default();
    let statics = vec![format!(
        "delegate mode: baton follows the server's own upgrades (MAINPID=); baton upgrade {}",
        match &cfg.app_control {
            Some(p) => format!("is forwarded to {}", p.display()),
            None => "needs --app-control".into(),
        }
    )];
    let busy = Arc::new(AtomicBool::new(false));
    let mut st = State {
        cfg,
        listeners,
        notify_env,
        systemd: Notifier::from_env(),
        main: None,
        preds: Vec::new(),
        view: Arc::new(Mutex::new(DelegateView {
            phase: "starting",
            ..DelegateView::default()
        })),
        starts: 0,
        ready_deadline: None,
        announced_ready: false,
        restart_at: None,
        backoff: RESTART_BACKOFF_INITIAL,
        stopping: false,
        kill_at: None,
        final_status: None,
    };
    st.start();
    let mut control_closed = false;
    loop {
        if st.stopping && st.main.is_none() && st.preds.iter().all(Tracked::has_exited) {
            break;
        }
        if st.stopping && st.main.is_none() && st.kill_at.is_none() {
            st.kill_at = Some(tokio::time::Instant::now() + st.cfg.drain_timeout);
        }
        tokio::select! {
            sig = signals.recv() => match sig {
                super::upgrade::Sig::Stop(name) => st.begin_stop(name),
                super::upgrade::Sig::Upgrade => match &st.main {
                    Some(m) if !st.stopping => {
                        tracing::info!(pid = m.pid, signal = super::signal_name(st.cfg.upgrade_signal), "SIGHUP: asking the server to upgrade itself");
                        if let Err(e) = baton_sys::process::kill(m.pid, st.cfg.upgrade_signal) {
                            tracing::warn!(pid = m.pid, error = %e, "could not signal the server");
                        }
                    }
                    _ => tracing::warn!("SIGHUP: no server process to upgrade"),
                },
            },
            Some(note) = notes.recv() => st.on_note(note),
            () = exited(&st.main) => st.on_main_exit().await,
            i = predecessor_exited(&st.preds) => st.on_pred_exit(i).await,
            () = sleep_until_opt(st.ready_deadline) => {
                st.ready_deadline = None;
                if let Some(m) = &st.main {
                    tracing::error!(pid = m.pid, timeout = ?st.cfg.ready_timeout,
                        "the server sent no READY=1 within --ready-timeout: killing it");
                    st.view().note(format!("pid {} was not ready within {:?}", m.pid, st.cfg.ready_timeout));
                    let _ = baton_sys::process::kill_group(m.pid, Signal::KILL);
                    let _ = baton_sys::process::kill(m.pid, Signal::KILL);
                }
            }
            () = sleep_until_opt(st.restart_at), if !st.stopping => {
                st.restart_at = None;
                st.start();
            }
            () = sleep_until_opt(st.kill_at), if st.stopping => {
                st.kill_at = None;
                tracing::warn!(timeout = ?st.cfg.drain_timeout, "the server did not exit within --drain-timeout: SIGKILL");
                st.kill_all();
                // Whatever happens now, leave after a last reap.
                st.kill_at = Some(tokio::time::Instant::now() + child::REAP_TIMEOUT);
                if st.main.is_none() {
                    break;
                }
            }
            cmd = rx.recv(), if !control_closed => {
                let Some(cmd) = cmd else {
                    control_closed = true;
                    continue;
                };
                match cmd {
                    Command::Status { reply } => {
                        let _ = reply.send(st.status_report(&statics, &listener_infos));
                    }
                    Command::Stop { reply } => {
                        st.begin_stop("stop requested over the control socket");
                        let _ = reply.send(Ok(()));
                    }
                    Command::Upgrade { opts, events, reply } => {
                        let refuse = |kind, message: String| Err(Failure { kind, message });
                        if opts.self_exec {
                            let _ = reply.send(refuse(FailureKind::Invalid,
                                "`baton upgrade --self` is not available with --delegate (restart baton to update it)".into()));
                        } else if st.stopping {
                            let _ = reply.send(refuse(FailureKind::Refused, "baton is stopping".into()));
                        } else if let Some(path) = st.cfg.app_control.clone() {
                            if busy.swap(true, Ordering::SeqCst) {
                                let _ = reply.send(refuse(FailureKind::InProgress,
                                    "an upgrade forwarded to the server is still running".into()));
                            } else {
                                drop(tokio::spawn(forward_upgrade(path, opts, events, reply, Arc::clone(&st.view), Arc::clone(&busy))));
                            }
                        } else {
                            let _ = reply.send(refuse(FailureKind::Invalid,
                                "delegate mode: the server upgrades itself. Start baton run with --app-control PATH (the server's own --control socket) to forward baton upgrade to it, or send SIGHUP to baton (it sends --upgrade-signal to the server)".into()));
                        }
                    }
                }
            }
        }
    }
    tracing::info!(status = ?st.final_status, "baton stopped");
    Ok(st.final_status)
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

//! The single owner of upgrade state.
//!
//! One task receives every request (`SIGUSR2`, control socket, library
//! call) with its own reply channel. It runs at most one upgrade at a time —
//! a second request gets "in progress" at once — and answers status while an
//! upgrade runs. "One upgrade at a time" is the structure, not a flag.
//!
//! This module makes no system calls: processes go through the
//! [`Spawner`](crate::Spawner), bytes through `handoff::send`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::channel::Channel;
use crate::control::{
    Command, Event, Failure, FailureKind, LastUpgrade, UpgradeOptions, UpgradeReport,
};
use crate::error::Error;
use crate::handoff::send::{HandshakeLog, OldSide, SentBatch, StateSource, fits_batch, hello};
use crate::inner::{HandoffReq, Inner, lock, unix_ms};
use crate::lifecycle::Phase;
use crate::protocol::Msg;
use crate::spawn::{
    ChildProcess, ENV_HANDOFF_FD, ENV_OOM_SCORE_ADJ, ENV_PARENT_PID, HANDOFF_FD, SpawnSpec,
};
use baton_sys as sys;

/// How long a killed child may take to be reaped before we give up waiting.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the old generation waits for control replies to be written
/// before it exits.
const CONTROL_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to read what a new generation sent before it exited (its
/// `Failed` reason), once its exit was seen.
const LAST_WORDS_TIMEOUT: Duration = Duration::from_secs(1);

type UpgradeFuture = Pin<Box<dyn Future<Output = Result<UpgradeReport, Error>> + Send>>;

struct Running {
    fut: UpgradeFuture,
    reply: oneshot::Sender<Result<UpgradeReport, Failure>>,
    started: Instant,
}

async fn poll_running(r: &mut Option<Running>) -> Result<UpgradeReport, Error> {
    match r {
        Some(r) => r.fut.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The owner task.
pub(crate) async fn owner(inner: Arc<Inner>, mut rx: mpsc::Receiver<Command>) {
    let mut running: Option<Running> = None;
    let mut pending_stops: Vec<oneshot::Sender<Result<(), Failure>>> = Vec::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    Command::Status { reply } => {
                        let _ = reply.send(inner.status_report(running.is_some()));
                    }
                    Command::Upgrade { opts, events, reply } => {
                        if let Some(r) = &running {
                            tracing::warn!("upgrade requested while one is running; ignored");
                            let _ = reply.send(Err(Failure {
                                kind: FailureKind::InProgress,
                                message: format!(
                                    "an upgrade has been running for {} ms; wait for it to finish",
                                    r.started.elapsed().as_millis()
                                ),
                            }));
                            continue;
                        }
                        settle_exited_predecessor(&inner).await;
                        if let Err(e) = upgrade_allowed(&inner) {
                            tracing::warn!(reason = %e, "upgrade not started");
                            if matches!(e, Error::Refused(_)) {
                                record(&inner, &Err(&e));
                            }
                            let _ = reply.send(Err(Failure::from(&e)));
                            continue;
                        }
                        let fut = Box::pin(run_upgrade(Arc::clone(&inner), opts, events));
                        running = Some(Running { fut, reply, started: Instant::now() });
                    }
                    Command::Stop { reply } => {
                        if running.is_some() {
                            tracing::info!("stop requested during an upgrade: stopping once it ends");
                            pending_stops.push(reply);
                        } else {
                            begin_shutdown(&inner);
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            res = poll_running(&mut running) => {
                let Some(r) = running.take() else { continue };
                record(&inner, &res.as_ref());
                let succeeded = res.is_ok();
                let _ = r.reply.send(res.map_err(|e| Failure::from(&e)));
                if succeeded {
                    finish(&inner).await;
                    for s in pending_stops.drain(..) {
                        let _ = s.send(Ok(()));
                    }
                } else if !pending_stops.is_empty() {
                    begin_shutdown(&inner);
                    for s in pending_stops.drain(..) {
                        let _ = s.send(Ok(()));
                    }
                }
            }
        }
    }
}

fn record(inner: &Inner, res: &Result<&UpgradeReport, &Error>) {
    let (result, reason, report) = match res {
        Ok(r) => {
            inner
                .counters
                .upgrades_succeeded
                .fetch_add(1, Ordering::Relaxed);
            ("success", None, Some((*r).clone()))
        }
        Err(Error::Refused(m)) => {
            inner
                .counters
                .upgrades_refused
                .fetch_add(1, Ordering::Relaxed);
            ("refused", Some(m.clone()), None)
        }
        Err(e) => {
            inner
                .counters
                .upgrades_failed
                .fetch_add(1, Ordering::Relaxed);
            ("failed", Some(e.to_string()), None)
        }
    };
    *lock(&inner.last_upgrade) = Some(LastUpgrade {
        result: result.into(),
        reason,
        at_unix_ms: unix_ms(),
        report,
    });
}

/// The previous generation has exited, but the end of its handoff channel
/// (its last messages, then EOF) is still being read: wait for that, at most
/// [`PREDECESSOR_EOF_WAIT`], so an upgrade asked for right after its exit is
/// not told that it is still draining. A predecessor that still runs is not
/// waited for.
async fn settle_exited_predecessor(inner: &Inner) {
    let Some(pid) = inner.predecessor_pid else {
        return;
    };
    if !*inner.predecessor_alive.borrow() || !process_exited(pid) {
        return;
    }
    let mut alive = inner.predecessor_alive.subscribe();
    let _ = tokio::time::timeout(PREDECESSOR_EOF_WAIT, alive.wait_for(|a| !a)).await;
}

/// Longest wait for an exited predecessor's channel to be read to the end.
const PREDECESSOR_EOF_WAIT: Duration = Duration::from_secs(1);

/// `pid` is gone or a zombie (`/proc/PID/stat`).
fn process_exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    matches!(state, Some('Z' | 'X'))
}

fn upgrade_allowed(inner: &Inner) -> Result<(), Error> {
    if inner.pid == 1 {
        return Err(Error::Refused(
            "this server is PID 1 (a container's init): it cannot replace itself, because the old \
             generation's exit would end the container. Run it under `baton run --delegate -- SERVER ...`: \
             baton stays PID 1, reaps, forwards signals, and follows the server's own upgrades"
                .into(),
        ));
    }
    let phase = inner.life.phase();
    if phase != Phase::Serving {
        return Err(Error::Refused(format!(
            "this generation is not serving (phase: {})",
            phase.as_str()
        )));
    }
    if *inner.predecessor_alive.borrow() {
        return Err(Error::InProgress(format!(
            "the previous generation (pid {}) is still draining; wait for it to exit",
            inner.predecessor_pid.unwrap_or(0)
        )));
    }
    Ok(())
}

/// Graceful stop without a successor.
fn begin_shutdown(inner: &Arc<Inner>) {
    if matches!(inner.life.phase(), Phase::ShuttingDown | Phase::Done) {
        return;
    }
    tracing::info!(
        generation = inner.generation,
        pid = inner.pid,
        "stopping: draining connections"
    );
    inner.notify(&["STOPPING=1".into(), inner.status_line("stopping")]);
    inner.life.set(Phase::ShuttingDown);
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let t = Instant::now();
        let drained = inner.life.wait_drained(inner.config.drain_timeout).await;
        let left = if drained {
            0
        } else {
            inner.open_left(inner.life.tracker())
        };
        if left > 0 {
            inner
                .counters
                .conns_closed_at_deadline
                .fetch_add(left as u64, Ordering::Relaxed);
            tracing::warn!(
                connections = left,
                "drain timeout: closing connections still open"
            );
        }
        tracing::info!(after_ms = t.elapsed().as_millis() as u64, "stopped");
        finish(&inner).await;
    });
}

/// Let control replies go out, then mark the generation done (the app
/// exits).
async fn finish(inner: &Inner) {
    inner.control_tasks.close();
    let _ = tokio::time::timeout(CONTROL_FLUSH_TIMEOUT, inner.control_tasks.wait()).await;
    inner.life.set(Phase::Done);
}

struct Exporters<'a>(&'a Inner);

/// How long "no request in flight, none started" must hold before the exact
/// snapshot: covers a request hyper had already buffered and dispatches in
/// the same poll that finishes the previous one.
const QUIESCE_STABLE: Duration = Duration::from_millis(5);

impl StateSource for Exporters<'_> {
    async fn before_snapshot(&self) -> Result<(), Error> {
        let inner = self.0;
        if inner.config.state_mode != crate::config::StateMode::Exact {
            return Ok(());
        }
        // Stop accepting and stop reading new requests; let those in flight
        // finish.
        *lock(&inner.quiesced_at) = Some(Instant::now());
        inner.life.set(Phase::Quiesced);
        let deadline = Instant::now() + inner.config.quiesce_timeout;
        let act = &inner.activity;
        loop {
            let started = act.started.load(Ordering::SeqCst);
            if act.in_flight.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(QUIESCE_STABLE).await;
                if act.in_flight.load(Ordering::SeqCst) == 0
                    && act.started.load(Ordering::SeqCst) == started
                {
                    return Ok(());
                }
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if Instant::now() > deadline {
                return Err(Error::Failed(format!(
                    "exact state mode: {} requests still in flight after {:?} (quiesce timeout)",
                    act.in_flight.load(Ordering::SeqCst),
                    inner.config.quiesce_timeout
                )));
            }
        }
    }

    fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let list = lock(&self.0.exporters).clone();
        let mut out = Vec::with_capacity(list.len() + 1);
        match postcard::to_stdvec(&self.0.carried()) {
            Ok(b) => out.push((crate::carry::BLOB.to_owned(), b)),
            Err(e) => tracing::warn!(error = %e, "could not encode the carried counters"),
        }
        for (name, f) in list {
            let bytes = f().map_err(|e| Error::State(format!("exporting '{name}': {e}")))?;
            out.push((name, bytes));
        }
        Ok(out)
    }
}

fn emit(events: &mpsc::UnboundedSender<Event>, e: Event) {
    let _ = events.send(e);
}

fn describe_exit(st: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("unknown status ({e})"),
    }
}

/// Kill a child that will not become the next generation, and reap it.
/// A child that reported its own failure gets `grace` to exit by itself.
/// Returns how it ended, for the report.
async fn abort_child(child: &mut Box<dyn ChildProcess>, grace: Duration) -> String {
    let pid = child.pid();
    // If it already exited on its own, its real status is what we report.
    if let Ok(Some(st)) = child.try_wait() {
        return format!("pid {pid} {}", describe_exit(&Ok(st)));
    }
    if !grace.is_zero()
        && let Ok(st) = tokio::time::timeout(grace, child.wait()).await
    {
        return format!("pid {pid} {}", describe_exit(&st));
    }
    let _ = child.kill();
    match tokio::time::timeout(REAP_TIMEOUT, child.wait()).await {
        Ok(_) => format!("pid {pid} stopped with SIGKILL"),
        Err(_) => format!("pid {pid} did not die within {REAP_TIMEOUT:?} of SIGKILL"),
    }
}

/// One upgrade, old side: spawn, hand over, promote, drain.
async fn run_upgrade(
    inner: Arc<Inner>,
    opts: UpgradeOptions,
    events: mpsc::UnboundedSender<Event>,
) -> Result<UpgradeReport, Error> {
    let t0 = Instant::now();
    let next_gen = inner.generation + 1;
    let mut plan = inner.exec.clone();
    if let Some(cmd) = &opts.command {
        let Some((first, rest)) = cmd.split_first() else {
            return Err(Error::Refused("the new command line is empty".into()));
        };
        plan.program = first.into();
        plan.arg0 = first.into();
        plan.args = rest.iter().map(Into::into).collect();
    }
    // Admission: nothing is spawned unless every gate passes.
    if inner.config.canary.is_some() && !lock(&inner.exporters).is_empty() {
        return Err(Error::Refused(
            "a canary cannot be combined with state handoff: both generations would serve and write \
             diverging copies of the state; disable the canary or the state export"
                .into(),
        ));
    }
    let exe = crate::admission::preflight(&plan.program, opts.expect_sha256.as_deref())?;
    if let Some(cmd) = &inner.config.check_command {
        crate::admission::run_check(cmd, inner.config.check_timeout).await?;
    }
    if inner.config.memory.enabled {
        let estimate = inner
            .config
            .memory
            .estimate
            .unwrap_or_else(|| crate::admission::process_tree_memory(inner.pid));
        let levels = crate::admission::memory_levels(std::path::Path::new("/"));
        let line = crate::admission::check_memory(&levels, estimate, &inner.config.memory)?;
        tracing::info!("{line}");
    }
    tracing::info!(generation = inner.generation, next = next_gen, program = %plan.program.display(), pinned = exe.pinned.is_some(), "upgrade: starting the next generation");
    inner.notify(&[
        "RELOADING=1".into(),
        format!("MONOTONIC_USEC={}", crate::notify::monotonic_usec()),
        inner.status_line("upgrading"),
    ]);

    let (ours, theirs) =
        sys::fd::seqpacket_pair().map_err(|e| Error::io("creating the handoff channel", e))?;
    // A pinned executable is exec'd through its open fd (the hashed
    // content); argv[0] keeps the real path, from which the new generation
    // resolves its own next upgrade.
    let mut spec = SpawnSpec::new(exe.exec_path());
    spec.arg0 = Some(plan.arg0.clone());
    spec.args = plan.args.clone();
    spec.env_remove = [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        ENV_HANDOFF_FD,
        ENV_PARENT_PID,
    ]
    .iter()
    .map(Into::into)
    .collect();
    spec.env_set = vec![
        (ENV_HANDOFF_FD.into(), HANDOFF_FD.to_string().into()),
        (ENV_PARENT_PID.into(), inner.pid.to_string().into()),
    ];
    spec.fds = vec![(theirs, HANDOFF_FD)];
    let own_adj = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(0);
    if inner.config.newcomer_oom_score_adj != 0 {
        spec.oom_score_adj =
            Some((own_adj + inner.config.newcomer_oom_score_adj).clamp(-1000, 1000));
        spec.env_set
            .push((ENV_OOM_SCORE_ADJ.into(), own_adj.to_string().into()));
    }
    let spawned = inner.spawner.spawn(spec);
    drop(exe); // the child has its own copy of a pinned fd (closed at exec)
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let err = Error::Failed(format!("could not start {}: {e}", plan.program.display()));
            rollback_notify(&inner, &err);
            return Err(err);
        }
    };
    let new_pid = child.pid();
    let spawned_at = Instant::now();
    tracing::info!(pid = new_pid, generation = next_gen, "upgrade: spawned");
    emit(
        &events,
        Event::Spawned {
            pid: new_pid,
            generation: next_gen,
        },
    );

    let chan = match Channel::new(ours) {
        Ok(c) => c,
        Err(e) => {
            abort_child(&mut child, Duration::ZERO).await;
            return Err(e);
        }
    };
    let mut old = OldSide::new(chan);
    let listeners = inner.registry.handoff_set();
    let mut log = HandshakeLog::default();
    let ready_timeout = inner.config.ready_timeout;
    let handshake = {
        let source = Exporters(&inner);
        let me = hello(&inner.config.app_version, inner.generation);
        let hs = old.handshake(me, &listeners, &source, &mut log);
        tokio::pin!(hs);
        tokio::select! {
            r = tokio::time::timeout(ready_timeout, &mut hs) => match r {
                Ok(r) => r,
                Err(_) => Err(Error::Failed(format!(
                    "the new generation (pid {new_pid}) was not ready within {ready_timeout:?} (ready timeout)"
                ))),
            },
            st = child.wait() => {
                // A new generation that cannot start says why (`Failed`) and
                // exits at once: its exit can be seen before its last
                // message is read. Read what it sent before it went (its end
                // of the channel is closed, so this ends at once).
                match tokio::time::timeout(LAST_WORDS_TIMEOUT, &mut hs).await {
                    Ok(Err(e @ Error::Failed(_))) => Err(e),
                    _ => Err(Error::Failed(format!(
                        "the new generation (pid {new_pid}) exited before it was ready ({})",
                        describe_exit(&st)
                    ))),
                }
            }
        }
    };
    let info = match handshake {
        Ok(info) => info,
        Err(e) => {
            // A child that reported Failed exits by itself: let it, so the
            // report shows its own exit status.
            let grace = if matches!(e, Error::Failed(ref m) if m.contains("reported a failure")) {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            };
            let status = abort_child(&mut child, grace).await;
            resume_if_quiesced(&inner);
            let err = match e {
                Error::Failed(m) | Error::PeerGone(m) => {
                    Error::Failed(format!("{m} (child {status})"))
                }
                other => Error::Failed(format!("{other} (child {status})")),
            };
            tracing::warn!(pid = new_pid, reason = %err, "upgrade failed before promotion; still serving");
            rollback_notify(&inner, &err);
            return Err(err);
        }
    };
    let ready_ms = spawned_at.elapsed().as_millis() as u64;
    tracing::info!(pid = new_pid, ready_ms, "upgrade: new generation ready");
    emit(
        &events,
        Event::Ready {
            pid: new_pid,
            after_ms: ready_ms,
        },
    );

    // The commit point (provisional with a canary or an observation window).
    let windowed = inner.config.canary.is_some() || !inner.config.observe.is_zero();
    let promoted = if windowed {
        old.promote_provisional(inner.config.canary.is_some()).await
    } else {
        old.promote().await
    };
    if let Err(e) = promoted {
        let status = abort_child(&mut child, Duration::ZERO).await;
        resume_if_quiesced(&inner);
        let err = Error::Failed(format!(
            "could not promote pid {new_pid}: {e} (child {status})"
        ));
        rollback_notify(&inner, &err);
        return Err(err);
    }
    let promoted_at = Instant::now();
    let pause_ms = lock(&inner.quiesced_at)
        .take()
        .map(|t| promoted_at.duration_since(t).as_millis() as u64);
    if let Some(p) = pause_ms {
        tracing::info!(
            pause_ms = p,
            "exact state mode: paused from the snapshot to the promotion"
        );
    }
    let mut confirmed = false;
    if windowed {
        *lock(&inner.successor_pid) = Some(new_pid);
        match window(&inner, &old, &mut child, &events, &mut confirmed).await {
            Ok(()) => {
                if let Err(e) = old.commit().await {
                    tracing::warn!(error = %e, "could not send Commit to the new generation");
                }
            }
            Err(why) => {
                // Resume first (connections queue to us again), then stop
                // the new generation gracefully: its requests in flight end.
                *lock(&inner.successor_pid) = None;
                inner.life.set(Phase::Serving);
                let _ = old.demote(&why).await;
                let status = wait_or_kill(&mut child, inner.config.drain_timeout).await;
                let err = Error::Failed(format!(
                    "{why}; the new generation (pid {new_pid}) was stopped ({status}); this generation (pid {}) serves again",
                    inner.pid
                ));
                tracing::error!(reason = %err, "upgrade rolled back");
                rollback_notify(&inner, &err);
                return Err(err);
            }
        }
    }
    // Open the handoff queue before announcing the handover: connection
    // tasks decide what to do when they see the phase change.
    let handoff_rx = if info.accepts_conns {
        let (tx, rx) = mpsc::channel(8192);
        *lock(&inner.handoff_tx) = Some(tx);
        Some(rx)
    } else {
        None
    };
    inner.life.set(Phase::Handover);
    *lock(&inner.successor_pid) = Some(new_pid);
    tracing::info!(
        pid = new_pid,
        generation = next_gen,
        "upgrade: promoted; draining"
    );
    emit(&events, Event::Promoted { pid: new_pid });
    notify_main_pid(&inner, new_pid, next_gen).await;

    let end = drain(&inner, &old, &mut child, handoff_rx, confirmed).await;
    *lock(&inner.handoff_tx) = None;
    let drain_ms = promoted_at.elapsed().as_millis() as u64;
    match end {
        DrainEnd::Drained {
            handed_over,
            closed,
        } => {
            inner
                .counters
                .conns_handed_over
                .fetch_add(handed_over, Ordering::Relaxed);
            inner
                .counters
                .conns_closed_at_deadline
                .fetch_add(closed, Ordering::Relaxed);
            tracing::info!(
                drain_ms,
                handed_over,
                closed_at_deadline = closed,
                "upgrade: drained; this generation exits"
            );
            emit(
                &events,
                Event::Drained {
                    after_ms: drain_ms,
                    handed_over,
                    closed,
                },
            );
            let total_ms = t0.elapsed().as_millis() as u64;
            // Let the new generation count this upgrade (metrics carried
            // across generations).
            let _ = old
                .done(crate::protocol::DoneReport {
                    ready_ms,
                    drain_ms,
                    total_ms,
                    closed,
                })
                .await;
            Ok(UpgradeReport {
                from_generation: inner.generation,
                to_generation: next_gen,
                old_pid: inner.pid,
                new_pid,
                ready_ms,
                drain_ms,
                total_ms: t0.elapsed().as_millis() as u64,
                handed_over,
                closed_at_deadline: closed,
                state_bytes: log.state_bytes,
                pause_ms,
            })
        }
        DrainEnd::SuccessorFailed { why, lost } => {
            inner.counters.conns_lost.fetch_add(lost, Ordering::Relaxed);
            *lock(&inner.successor_pid) = None;
            inner.life.set(Phase::Serving);
            if let Some(p) = &inner.config.pid_file {
                inner.write_pid_file(p);
            }
            let err = Error::Failed(format!(
                "the new generation (pid {new_pid}) {why} after promotion; this generation (pid {}) resumed serving{}",
                inner.pid,
                if lost > 0 {
                    format!("; {lost} connections handed to it were lost")
                } else {
                    String::new()
                }
            ));
            tracing::error!(reason = %err, "upgrade rolled back");
            inner.notify(&[
                format!("MAINPID={}", inner.pid),
                "READY=1".into(),
                format!(
                    "STATUS=generation {} (pid {}) serving; last upgrade rolled back: {why}",
                    inner.generation, inner.pid
                ),
            ]);
            Err(err)
        }
    }
}

/// An exact-mode upgrade that fails before promotion resumes serving.
fn resume_if_quiesced(inner: &Inner) {
    lock(&inner.quiesced_at).take();
    if inner.life.phase() == Phase::Quiesced {
        tracing::info!("exact state mode: upgrade failed, resuming");
        inner.life.set(Phase::Serving);
    }
}

fn rollback_notify(inner: &Inner, err: &Error) {
    inner.notify(&[
        "READY=1".into(),
        format!(
            "STATUS=generation {} (pid {}) serving; last upgrade failed: {err}",
            inner.generation, inner.pid
        ),
    ]);
}

/// Under systemd: the old main pid names the new one and waits until systemd
/// has processed that, before it may exit.
async fn notify_main_pid(inner: &Arc<Inner>, new_pid: u32, next_gen: u64) {
    if inner.notifier.is_none() {
        return;
    }
    inner.notify(&[
        format!("MAINPID={new_pid}"),
        "READY=1".into(),
        format!("STATUS=generation {next_gen} (pid {new_pid}) serving; last upgrade succeeded"),
    ]);
    let inner2 = Arc::clone(inner);
    let res = tokio::task::spawn_blocking(move || {
        inner2
            .notifier
            .as_ref()
            .map(|n| n.barrier(Duration::from_secs(5)))
    })
    .await;
    if let Ok(Some(Err(e))) = res {
        tracing::warn!(error = %e, "BARRIER=1 after MAINPID= failed");
    }
}

/// Wait for a demoted child to finish by itself, up to `limit`, then kill it.
async fn wait_or_kill(child: &mut Box<dyn ChildProcess>, limit: Duration) -> String {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(st) => describe_exit(&st),
        Err(_) => abort_child(child, Duration::ZERO).await,
    }
}

/// The canary and the observation window, in that order. `Ok` keeps the new
/// generation; `Err` says why it must go.
async fn window(
    inner: &Inner,
    old: &OldSide,
    child: &mut Box<dyn ChildProcess>,
    events: &mpsc::UnboundedSender<Event>,
    confirmed: &mut bool,
) -> Result<(), String> {
    if let Some(c) = inner.config.canary.clone() {
        canary(inner, old, child, &c, events, confirmed).await?;
    }
    if !inner.config.observe.is_zero() {
        observe(inner, old, child, events, confirmed).await?;
    }
    Ok(())
}

/// A message from the new side during a window: `Serving` is recorded,
/// `Stats` returned, anything else is a reason to roll back.
fn window_msg(
    msg: Result<Option<Msg>, Error>,
    confirmed: &mut bool,
) -> Result<Option<(u64, u64)>, String> {
    match msg {
        Ok(Some(Msg::Serving)) => {
            *confirmed = true;
            Ok(None)
        }
        Ok(Some(Msg::Stats { requests, errors })) => Ok(Some((requests, errors))),
        Ok(Some(other)) => Err(format!(
            "unexpected {} from the new generation",
            other.name()
        )),
        Ok(None) => Err("the new generation closed the handoff channel".into()),
        Err(e) => Err(e.to_string()),
    }
}

async fn canary(
    inner: &Inner,
    old: &OldSide,
    child: &mut Box<dyn ChildProcess>,
    policy: &crate::observe::CanaryPolicy,
    events: &mpsc::UnboundedSender<Event>,
    confirmed: &mut bool,
) -> Result<(), String> {
    use crate::observe::{CanaryVerdict, judge};
    let act = &inner.activity;
    let base = (
        act.responses.load(Ordering::Relaxed),
        act.errors.load(Ordering::Relaxed),
    );
    let mut deadline = tokio::time::Instant::now() + policy.window;
    let mut stats_deadline = None;
    let mut extensions_left = policy.extensions;
    tracing::info!(window = ?policy.window, "canary: both generations accept");
    emit(
        events,
        Event::Note(format!(
            "canary: both generations accept for {:?}",
            policy.window
        )),
    );
    loop {
        tokio::select! {
            st = child.wait() => {
                return Err(format!("the new generation died during the canary ({})", describe_exit(&st)));
            }
            m = old.recv() => {
                let Some(new) = window_msg(m, confirmed)? else { continue };
                if stats_deadline.take().is_none() {
                    continue;
                }
                let old_counts = (
                    act.responses.load(Ordering::Relaxed).saturating_sub(base.0),
                    act.errors.load(Ordering::Relaxed).saturating_sub(base.1),
                );
                match judge(policy, new, old_counts, extensions_left) {
                    CanaryVerdict::Pass(s) => {
                        tracing::info!("canary passed: {s}");
                        emit(events, Event::Note(format!("canary passed: {s}")));
                        return Ok(());
                    }
                    CanaryVerdict::Extend(s) => {
                        extensions_left -= 1;
                        deadline = tokio::time::Instant::now() + policy.window;
                        tracing::info!("canary extended: {s}");
                        emit(events, Event::Note(format!("canary extended: {s}")));
                    }
                    CanaryVerdict::Fail(s) => return Err(format!("canary failed: {s}")),
                }
            }
            () = tokio::time::sleep_until(deadline), if stats_deadline.is_none() => {
                old.request_stats().await.map_err(|e| e.to_string())?;
                stats_deadline = Some(tokio::time::Instant::now() + inner.config.handoff_ack_timeout);
            }
            () = async {
                match stats_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                return Err("the new generation did not report its statistics for the canary".into());
            }
        }
    }
}

async fn observe(
    inner: &Inner,
    old: &OldSide,
    child: &mut Box<dyn ChildProcess>,
    events: &mpsc::UnboundedSender<Event>,
    confirmed: &mut bool,
) -> Result<(), String> {
    use crate::observe::probe;
    let max_failures = inner.config.health_failures.max(1);
    let window = inner.config.observe;
    // Stop accepting (the new generation takes every new connection) but
    // keep serving what we have, and keep the listeners.
    inner.life.set(Phase::Observing);
    tracing::info!(?window, health = ?inner.config.health_url, "observation window");
    emit(
        events,
        Event::Note(format!("observing the new generation for {window:?}")),
    );
    let deadline = tokio::time::Instant::now() + window;
    let mut next_probe = tokio::time::Instant::now() + inner.config.health_interval;
    let mut failures = 0u32;
    let mut checks = 0u32;
    loop {
        tokio::select! {
            st = child.wait() => {
                return Err(format!("the new generation died during the observation window ({})", describe_exit(&st)));
            }
            m = old.recv() => {
                window_msg(m, confirmed)?;
            }
            () = tokio::time::sleep_until(next_probe), if inner.config.health_url.is_some() => {
                if let Some(url) = &inner.config.health_url {
                    checks += 1;
                    match probe(url, inner.config.health_timeout).await {
                        Ok(()) => failures = 0,
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(%url, failures, error = %e, "health check failed");
                            if failures >= max_failures {
                                return Err(format!(
                                    "health check {url} failed {failures} times in a row during the observation window: {e}"
                                ));
                            }
                        }
                    }
                }
                next_probe = tokio::time::Instant::now() + inner.config.health_interval;
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::info!(checks, "observation window passed");
                emit(events, Event::Note(format!("observation window passed ({checks} health checks)")));
                return Ok(());
            }
        }
    }
}

enum DrainEnd {
    Drained { handed_over: u64, closed: u64 },
    SuccessorFailed { why: String, lost: u64 },
}

type Reply = oneshot::Sender<Result<(), crate::handoff::HandoffConn>>;

async fn next_req(
    carry: &mut Option<HandoffReq>,
    rx: &mut Option<mpsc::Receiver<HandoffReq>>,
) -> Option<HandoffReq> {
    if let Some(c) = carry.take() {
        return Some(c);
    }
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Connection batches sent and not yet acknowledged, oldest first.
type InFlight = std::collections::VecDeque<(SentBatch<Reply>, tokio::time::Instant)>;

/// How many connection batches may be in flight at once (acknowledgements
/// are pipelined: the next batch goes out before the previous one's ack).
const BATCHES_IN_FLIGHT: usize = 8;

async fn ack_deadline(p: &InFlight) {
    match p.front() {
        Some((_, at)) => tokio::time::sleep_until(*at).await,
        None => std::future::pending().await,
    }
}

/// Batches whose fate is unknown (the successor died or the channel broke):
/// an acknowledged one was taken (its connections are lost with a dead
/// successor), an unacknowledged one was never used there and is served here
/// again. Returns how many connections were lost.
fn settle_unacked(old: &OldSide, pending: &mut InFlight) -> u64 {
    if pending.is_empty() {
        return 0;
    }
    let acked = old.queued_acks();
    let mut lost = 0;
    for (b, _) in pending.drain(..) {
        if acked.contains(&b.id) {
            lost += b.items.len() as u64;
        } else {
            tracing::info!(
                connections = b.items.len(),
                "taking back a connection batch the successor never acknowledged"
            );
            for (conn, reply) in b.items {
                let _ = reply.send(Err(conn));
            }
        }
    }
    lost
}

/// The successor died: resume serving first (so the connections given
/// back see `Serving`), then settle the batches in flight.
fn resume_unacked(inner: &Inner, old: &OldSide, pending: &mut InFlight) -> u64 {
    *lock(&inner.handoff_tx) = None;
    inner.life.set(Phase::Serving);
    settle_unacked(old, pending)
}

/// Give every queued connection back to its task and close the queue.
fn close_handoff(
    inner: &Inner,
    rx: &mut Option<mpsc::Receiver<HandoffReq>>,
    carry: &mut Option<HandoffReq>,
) {
    *lock(&inner.handoff_tx) = None;
    if let Some((c, reply)) = carry.take() {
        let _ = reply.send(Err(c));
    }
    if let Some(mut r) = rx.take() {
        r.close();
        while let Ok((c, reply)) = r.try_recv() {
            let _ = reply.send(Err(c));
        }
    }
}

/// After promotion: hand idle connections over in acknowledged batches,
/// watch the successor, wait for our connections to finish.
async fn drain(
    inner: &Inner,
    old: &OldSide,
    child: &mut Box<dyn ChildProcess>,
    mut handoff_rx: Option<mpsc::Receiver<HandoffReq>>,
    confirmed: bool,
) -> DrainEnd {
    let deadline = tokio::time::Instant::now() + inner.config.drain_timeout;
    let ack_timeout = inner.config.handoff_ack_timeout;
    let mut pending: InFlight = InFlight::new();
    let mut next_batch: u32 = 1;
    let mut handed_over: u64 = 0;
    let mut lost_unacked: u64 = 0;
    let mut chan_open = true;
    let mut carry: Option<HandoffReq> = None;
    // The drain cannot finish before the successor confirmed it accepts.
    let mut confirmed = confirmed;
    let confirm_deadline = tokio::time::Instant::now() + ack_timeout;
    let tracker = inner.life.tracker().clone();
    loop {
        tokio::select! {
            biased;
            st = child.wait() => {
                let why = format!("died ({})", describe_exit(&st));
                let lost = handed_over + lost_unacked + resume_unacked(inner, old, &mut pending);
                close_handoff(inner, &mut handoff_rx, &mut carry);
                return DrainEnd::SuccessorFailed { why, lost };
            }
            msg = old.recv(), if chan_open => {
                match msg {
                    Ok(Some(Msg::Serving)) if !confirmed => {
                        confirmed = true;
                        tracing::debug!(pid = child.pid(), "the new generation confirmed it serves");
                    }
                    Ok(Some(Msg::ConnsAck { batch })) if pending.iter().any(|(b, _)| b.id == batch) => {
                        if let Some(i) = pending.iter().position(|(b, _)| b.id == batch)
                            && let Some((b, _)) = pending.remove(i)
                        {
                            handed_over += b.items.len() as u64;
                            for (conn, reply) in b.items {
                                drop(conn); // our copy; the successor has its own
                                let _ = reply.send(Ok(()));
                            }
                        }
                    }
                    Ok(Some(Msg::ConnsNack { batch, reason })) if pending.iter().any(|(b, _)| b.id == batch) => {
                        tracing::warn!(%reason, "the new generation refused a connection batch; serving those connections here");
                        if let Some(i) = pending.iter().position(|(b, _)| b.id == batch)
                            && let Some((b, _)) = pending.remove(i)
                        {
                            for (conn, reply) in b.items {
                                let _ = reply.send(Err(conn));
                            }
                        }
                        close_handoff(inner, &mut handoff_rx, &mut carry);
                    }
                    other => {
                        // EOF with the child alive, a protocol error, or an
                        // unexpected message: stop handing over. Batches in
                        // flight are settled by their acknowledgements.
                        match other {
                            Ok(None) => tracing::warn!("the new generation closed the handoff channel; no more connections are handed over"),
                            Ok(Some(m)) => tracing::warn!(msg = m.name(), "unexpected message from the new generation; no more connections are handed over"),
                            Err(e) => tracing::warn!(error = %e, "handoff channel error; no more connections are handed over"),
                        }
                        chan_open = false;
                        lost_unacked += settle_unacked(old, &mut pending);
                        close_handoff(inner, &mut handoff_rx, &mut carry);
                    }
                }
            }
            req = next_req(&mut carry, &mut handoff_rx), if pending.len() < BATCHES_IN_FLIGHT && chan_open => {
                let Some(first) = req else {
                    handoff_rx = None;
                    continue;
                };
                let mut bytes = first.0.prefix.len() + first.0.listener.len() + 8;
                let mut items = vec![first];
                if let Some(rx) = handoff_rx.as_mut() {
                    while let Ok(more) = rx.try_recv() {
                        if !fits_batch(items.len(), bytes, more.0.listener.len(), more.0.prefix.len()) {
                            carry = Some(more);
                            break;
                        }
                        bytes += more.0.prefix.len() + more.0.listener.len() + 8;
                        items.push(more);
                    }
                }
                let id = next_batch;
                next_batch = next_batch.wrapping_add(1);
                match old.send_batch(id, items).await {
                    Ok(sent) => pending.push_back((sent, tokio::time::Instant::now() + ack_timeout)),
                    Err((e, back)) => {
                        tracing::warn!(error = %e, "could not send a connection batch; serving those connections here");
                        for (c, r) in back {
                            let _ = r.send(Err(c));
                        }
                        chan_open = false;
                        close_handoff(inner, &mut handoff_rx, &mut carry);
                    }
                }
            }
            () = ack_deadline(&pending) => {
                // The successor holds the listeners but does not answer: it is
                // hung. Kill it and resume.
                let status = abort_child(child, Duration::ZERO).await;
                let why = format!("did not acknowledge handed-over connections within {ack_timeout:?} and was killed ({status})");
                let lost = handed_over + lost_unacked + resume_unacked(inner, old, &mut pending);
                close_handoff(inner, &mut handoff_rx, &mut carry);
                return DrainEnd::SuccessorFailed { why, lost };
            }
            () = tokio::time::sleep_until(confirm_deadline), if !confirmed => {
                let status = abort_child(child, Duration::ZERO).await;
                let why = format!("did not confirm it serves within {ack_timeout:?} of promotion and was killed ({status})");
                let lost = handed_over + lost_unacked + resume_unacked(inner, old, &mut pending);
                close_handoff(inner, &mut handoff_rx, &mut carry);
                return DrainEnd::SuccessorFailed { why, lost };
            }
            () = inner.life.drained(), if pending.is_empty() && confirmed => {
                close_handoff(inner, &mut handoff_rx, &mut carry);
                return DrainEnd::Drained { handed_over, closed: lost_unacked };
            }
            () = tokio::time::sleep_until(deadline) => {
                let left = inner.open_left(&tracker);
                if left > 0 {
                    tracing::warn!(connections = left, "drain timeout reached; closing the connections still open");
                }
                close_handoff(inner, &mut handoff_rx, &mut carry);
                return DrainEnd::Drained { handed_over, closed: left + lost_unacked };
            }
        }
    }
}

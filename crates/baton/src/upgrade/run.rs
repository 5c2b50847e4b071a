//! One upgrade, old side: admission, spawn, handshake, promotion — and the
//! rollback when any of it fails. After promotion the window
//! (`observe.rs`) and the drain (`drain.rs`) take over.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::channel::Channel;
use crate::config::HandoffPoint;
use crate::control::{Event, UpgradeOptions, UpgradeReport, emit};
use crate::error::Error;
use crate::handoff::send::{HandshakeLog, OldSide, StateSource, hello};
use crate::inner::{Inner, lock};
use crate::lifecycle::Phase;
use crate::spawn::{ENV_HANDOFF_FD, ENV_OOM_SCORE_ADJ, ENV_PARENT_PID, HANDOFF_FD, SpawnSpec};
use crate::upgrade::child::{abort_child, describe_exit};
use crate::upgrade::demote::take_back;
use crate::upgrade::drain::{DrainEnd, Queues, drain};
use crate::upgrade::observe::window;
use baton_sys as sys;

/// How long to read what a new generation sent before it exited (its
/// `Failed` reason), once its exit was seen.
const LAST_WORDS_TIMEOUT: Duration = Duration::from_secs(1);

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

/// One upgrade, old side: spawn, hand over, promote, drain.
pub(super) async fn run_upgrade(
    inner: Arc<Inner>,
    opts: UpgradeOptions,
    events: mpsc::UnboundedSender<Event>,
) -> Result<UpgradeReport, Error> {
    crate::trace::step("old: upgrade begins");
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
    crate::trace::step("old: pre-flight done");
    if let Some(cmd) = &inner.config.check_command {
        crate::admission::run_check(cmd, inner.config.check_timeout).await?;
    }
    if inner.config.memory.enabled {
        let estimate = inner
            .config
            .memory
            .estimate
            .unwrap_or_else(|| crate::admission::process_tree_memory(inner.pid));
        crate::trace::step("old: memory estimated");
        let levels = crate::admission::memory_levels(std::path::Path::new("/"));
        crate::trace::step("old: memory limits read");
        let line = crate::admission::check_memory(&levels, estimate, &inner.config.memory)?;
        tracing::info!("{line}");
    }
    crate::trace::step("old: admission done");
    tracing::info!(generation = inner.generation, next = next_gen, program = %plan.program.display(), pinned = exe.pinned.is_some(), "upgrade: starting the next generation");
    inner.notify(&[
        "RELOADING=1".into(),
        format!("MONOTONIC_USEC={}", crate::notify::monotonic_usec()),
        inner.status_line("upgrading"),
    ]);

    let (ours, theirs) =
        sys::fd::seqpacket_pair().map_err(|e| Error::io("creating the handoff channel", e))?;
    // Our Hello and the listeners go first, before the new generation
    // starts: it finds them at its first read (no round trip waited for).
    let listeners = inner.registry.handoff_set();
    let announced = async {
        let mut old = OldSide::new(Channel::new(ours)?);
        let me = hello(&inner.config.app_version, inner.generation);
        old.announce(me, &listeners).await.map(|()| old)
    };
    let mut old = match announced.await {
        Ok(old) => old,
        Err(e) => {
            let err = Error::Failed(format!("could not write to the handoff channel: {e}"));
            rollback_notify(&inner, &err);
            return Err(err);
        }
    };
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
    let own_adj =
        crate::admission::read_small(std::path::Path::new("/proc/self/oom_score_adj"), 16)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .unwrap_or(0);
    if inner.config.newcomer_oom_score_adj != 0 {
        spec.oom_score_adj =
            Some((own_adj + inner.config.newcomer_oom_score_adj).clamp(-1000, 1000));
        spec.env_set
            .push((ENV_OOM_SCORE_ADJ.into(), own_adj.to_string().into()));
    }
    crate::trace::step("old: spawn called");
    let spawned = inner.spawner.spawn(spec);
    crate::trace::step("old: spawn returned");
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

    let mut log = HandshakeLog::default();
    let ready_timeout = inner.config.ready_timeout;
    let handshake = {
        let source = Exporters(&inner);
        let hs = old.await_ready(&source, &mut log);
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
                    Ok(Err(e @ (Error::NewGenerationFailed { .. } | Error::Failed(_)))) => Err(e),
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
            let grace = if matches!(e, Error::NewGenerationFailed { .. }) {
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
    crate::trace::step("old: Ready received");
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
    crate::trace::step("old: Promote sent");
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
                let status =
                    take_back(&inner, &old, &mut child, &why, inner.config.drain_timeout).await;
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
    let owned_rx = if old.accepts.owned_kinds.is_empty() {
        None
    } else {
        let (tx, rx) = mpsc::channel(8192);
        *lock(&inner.owned_out) = Some(crate::handoff::owned::OwnedOut {
            kinds: old.accepts.owned_kinds.clone(),
            tx,
        });
        Some(rx)
    };
    inner.life.set(Phase::Handover);
    crate::trace::step("old: accept stopped (handover)");
    *lock(&inner.successor_pid) = Some(new_pid);
    tracing::info!(
        pid = new_pid,
        generation = next_gen,
        "upgrade: promoted; draining"
    );
    emit(&events, Event::Promoted { pid: new_pid });
    notify_main_pid(&inner, new_pid, next_gen).await;

    let queues = Queues::new(handoff_rx, owned_rx);
    let end = drain(&inner, &old, &mut child, queues, confirmed).await;
    *lock(&inner.handoff_tx) = None;
    *lock(&inner.owned_out) = None;
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
            crate::trace::step("old: drained, Done sent");
            inner.config.run_hook(HandoffPoint::Exiting);
            // The last step before exiting: is the successor still there?
            // If it died during the drain's last moments, nobody would serve
            // the listeners once this process is gone: serve them again.
            // (It narrows the window, it cannot close it: the successor can
            // still die between this check and our exit; a service
            // manager's restart covers that.)
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(st)) => {
                    let why = format!("died ({})", describe_exit(&Ok(st)));
                    return Err(resume_without_successor(&inner, new_pid, &why, handed_over));
                }
                Err(e) => {
                    tracing::warn!(error = %e, pid = new_pid, "could not check the new generation before exiting")
                }
            }
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
            Err(resume_without_successor(&inner, new_pid, &why, lost))
        }
    }
}

/// The successor died after promotion: this generation serves again (its
/// acceptors resume, the pid file and systemd's main pid name it). The
/// connections handed to the successor, `lost`, are counted.
fn resume_without_successor(inner: &Inner, new_pid: u32, why: &str, lost: u64) -> Error {
    inner.counters.conns_lost.fetch_add(lost, Ordering::Relaxed);
    *lock(&inner.successor_pid) = None;
    // The pid file names this process before it accepts again: whoever
    // sees it answer finds it named.
    if let Some(p) = &inner.config.pid_file {
        inner.write_pid_file(p);
    }
    inner.life.set(Phase::Serving);
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
    err
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

//! One upgrade: the next generation on the idle sockets, readiness,
//! steering (the commit point), the canary and the observation window if
//! asked for, then the old generation's drain; and the rollback when the
//! new one fails before the old one was stopped.

use std::ffi::OsString;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton::control::{Event, Failure, FailureKind, UpgradeReport};
use tokio_util::sync::CancellationToken;

use super::drain::{settle, stop_generation, stop_old};
use super::observe::{Window, watch_window};
use super::{Events, Sup, UpgradeReq, emit, failed, old_exited, record_good, view};
use crate::supervisor::admission;
use crate::supervisor::child::{self, ExecHow, GenProc, SpawnPlan, join_argv};
use crate::supervisor::ready::{self, NotifySocket, ReadyCtx, ReadyPlan, Route};
use crate::supervisor::sockets::Steer;

/// How the readiness wait ended badly.
enum NotReady {
    Exited,
    Timeout,
    Cancelled,
}

/// Spawn the next generation in `route.new` and wait until it is ready. On failure it
/// is killed and reaped, steering is back on `route.regular`, and the reason is
/// returned. `old` (the serving generation, during an upgrade) is watched:
/// if it dies meanwhile it is reaped and set to `None`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn launch(
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
    if slot != regular {
        // --front-upstream unix: the new generation's own socket path.
        sup.listeners
            .renew_unix(slot, generation, baton::DEFAULT_BACKLOG)
            .map_err(|e| format!("creating the new generation's upstream socket: {e}"))?;
    }
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
    view(&sup.view).starting = Some((generation, child_gen.pid));
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
                sup.listeners.unlink_unix(slot);
            }
            let msg = format!("generation {generation} (pid {pid}) {reason}");
            tracing::warn!(generation, pid, %reason, "generation not ready");
            Err(msg)
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
    if let Some(f) = &sup.cfg.front {
        f.switch();
    }
    sup.serving_slot = old_slot;
    let (generation, pid) = (new.generation, new.pid);
    let ended = if new.has_exited() {
        format!("died ({})", new.abort().await)
    } else {
        if let Some(o) = &old {
            let _ = settle(&sup.listeners, new_slot, o, &new, sup.cfg.steer_quiet).await;
        }
        let out = stop_generation(
            &sup.cfg,
            &mut new,
            "rolling back: stopping the new generation",
            hurry,
        )
        .await;
        format!("was stopped ({})", out.status)
    };
    // What queued for it and was never accepted: relayed to the old
    // generation if it is alive (no process has read those connections).
    let (relayed, lost) = match &old {
        Some(o) if !o.has_exited() => sup.listeners.relay_pending(new_slot, sup.cfg.drain_timeout),
        _ => (0, sup.listeners.close_pending(new_slot)),
    };
    // The new generation is gone: its upstream socket path goes.
    sup.listeners.unlink_unix(new_slot);
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

/// An upgrade: next generation on the idle sockets, ready, steer, settle,
/// stop the old one.
pub(super) async fn upgrade(
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
            // No new generation runs: its upstream socket path (if it got
            // one) goes.
            if new_slot != old_slot {
                sup.listeners.unlink_unix(new_slot);
            }
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
        if let Some(f) = &sup.cfg.front {
            f.switch();
        }
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
    let closed = stop_old(sup, old, old_slot, steering, events, hurry).await;
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
pub(super) async fn admit(
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

//! Starting a generation when none serves: the first one, one that
//! `baton upgrade` asks for, and a restart after the serving generation
//! died (with backoff; the sockets keep queueing connections meanwhile).

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::control::{Event, Failure, FailureKind, UpgradeReport};
use tokio_util::sync::CancellationToken;

use super::run::{admit, launch};
use super::{Events, StartKind, Sup, UpgradeReq, emit, failed, record_good, view};
use crate::supervisor::admission;
use crate::supervisor::child::{self, ExecHow};
use crate::supervisor::{
    RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX, RESTART_BACKOFF_RESET_AFTER,
};

/// The serving generation died on its own.
pub(super) async fn on_crash(
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
pub(super) async fn start(
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

//! The single owner of upgrade state.
//!
//! One task receives every request (`SIGUSR2`, control socket, library
//! call) with its own reply channel. It runs at most one upgrade at a time —
//! a second request gets "in progress" at once — and answers status while an
//! upgrade runs. "One upgrade at a time" is the structure, not a flag.
//!
//! This module makes no system calls: processes go through the
//! [`Spawner`](crate::Spawner), bytes through `handoff::send`.
//!
//! The parts of one upgrade, one file each: `run.rs` (spawn, handshake,
//! promotion, rollback), `observe.rs` (the observation window and the
//! canary, when configured), `drain.rs` (the old generation's drain after
//! promotion: connections handed over in acknowledged batches), and
//! `child.rs` (how the new generation's process ended, and ending it).

mod child;
mod demote;
mod drain;
mod observe;
mod run;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::control::{Command, Failure, FailureKind, LastUpgrade, UpgradeReport};
use crate::error::Error;
use crate::inner::{Inner, lock, unix_ms};
use crate::lifecycle::Phase;
use crate::upgrade::run::run_upgrade;

/// How long the old generation waits for control replies to be written
/// before it exits.
const CONTROL_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

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
                        if opts.self_exec {
                            let _ = reply.send(Err(Failure {
                                kind: FailureKind::Invalid,
                                message: "`baton upgrade --self` re-executes a `baton run` supervisor; a library-mode server upgrades itself with a plain `baton upgrade`".into(),
                            }));
                            continue;
                        }
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
        if left > 0 {
            inner.close_owned_at_deadline().await;
        }
        tracing::info!(after_ms = t.elapsed().as_millis() as u64, "stopped");
        finish(&inner).await;
    });
}

/// Let control replies go out, then mark the generation done (the app
/// exits).
pub(super) async fn finish(inner: &Inner) {
    inner.control_tasks.close();
    let _ = tokio::time::timeout(CONTROL_FLUSH_TIMEOUT, inner.control_tasks.wait()).await;
    inner.life.set(Phase::Done);
}

/// The window failed in the generation before this one and it asked for
/// the connections back (the new side of a demotion): see `demote.rs`.
pub(crate) async fn give_back(
    inner: Arc<Inner>,
    chan: Arc<crate::channel::Channel>,
    g: crate::protocol::GiveBack,
) {
    if demote::give_back(&inner, chan, g).await {
        finish(&inner).await;
    }
}

//! After the new generation is ready and before the old one is stopped:
//! the canary (both generations take new connections) and the observation
//! window (the new one takes them all, the old one stands by). Either one
//! ends early, and the upgrade is rolled back, if the new generation dies,
//! fails its health checks, or baton stops.

use std::time::Duration;

use baton::control::Event;
use tokio_util::sync::CancellationToken;

use super::{Events, Sup, emit, old_exited};
use crate::supervisor::child::GenProc;
use crate::supervisor::ready::{self, Route};
use crate::supervisor::sockets::Steer;

/// Which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Window {
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
pub(super) async fn watch_window(
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

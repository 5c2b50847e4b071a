//! The observation window and the canary, as run inside an upgrade: after a
//! provisional promotion, before the drain. The policy (what counts as a
//! failure, the canary's verdict) is in [`crate::observe`].

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use crate::control::{Event, emit};
use crate::error::Error;
use crate::handoff::send::OldSide;
use crate::inner::Inner;
use crate::lifecycle::Phase;
use crate::protocol::Msg;
use crate::spawn::ChildProcess;
use crate::upgrade::child::describe_exit;

/// The canary and the observation window, in that order. `Ok` keeps the new
/// generation; `Err` says why it must go.
pub(super) async fn window(
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
    use crate::probe::get as probe;
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

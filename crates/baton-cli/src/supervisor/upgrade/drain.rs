//! The end of a generation: its accept queue empties once new connections
//! go elsewhere, then the stop signal, `--drain-timeout`, SIGKILL.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Sup;
use crate::supervisor::child::GenProc;
use crate::supervisor::sockets::ListenerSet;
use crate::supervisor::{STEER_SETTLE_TIMEOUT, signal_name};

/// How often the old generation's accept queue is looked at after
/// steering.
const SETTLE_POLL: Duration = Duration::from_millis(5);

/// `leaver`'s accept queue (in `slot`) is empty and stayed so for the quiet
/// period, or `leaver` exited (`Ok`); or `keeper` died meanwhile (`Err`).
pub(super) async fn settle(
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

/// Stop the serving generation (baton is exiting).
pub(super) async fn stop(sup: &mut Sup, hurry: &CancellationToken) {
    sup.notify_systemd(&["STOPPING=1".into(), "STATUS=stopping".into()]);
    if let Some(mut g) = sup.serving.take() {
        tracing::info!(
            generation = g.generation,
            pid = g.pid,
            signal = signal_name(sup.cfg.stop_signal),
            "stopping the serving generation"
        );
        let out = g
            .stop(sup.cfg.stop_signal, sup.cfg.drain_timeout, hurry)
            .await;
        tracing::info!(generation = g.generation, pid = g.pid, status = %out.status, after_ms = out.after.as_millis() as u64, graceful = out.graceful, "generation stopped");
        sup.final_status = g.exit_code();
    }
}

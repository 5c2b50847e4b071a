//! The new generation's process, as one upgrade sees it: how it ended (for
//! the report) and ending it — killed and reaped, never left behind.

use std::time::Duration;

use crate::spawn::{ChildProcess, REAP_TIMEOUT};

pub(super) fn describe_exit(st: &std::io::Result<std::process::ExitStatus>) -> String {
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
pub(super) async fn abort_child(child: &mut Box<dyn ChildProcess>, grace: Duration) -> String {
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

/// Wait for a demoted child to finish by itself, up to `limit`, then kill it.
pub(super) async fn wait_or_kill(child: &mut Box<dyn ChildProcess>, limit: Duration) -> String {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(st) => describe_exit(&st),
        Err(_) => abort_child(child, Duration::ZERO).await,
    }
}

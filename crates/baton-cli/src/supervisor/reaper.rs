//! Reaping every zombie, as PID 1 (a container's init) or as a child
//! subreaper (`--delegate`).
//!
//! Orphaned processes are reparented to init, or to the nearest
//! subreaper: to baton. Their exit status waits in the kernel (a zombie)
//! until someone collects it, and only baton can. But baton also has
//! children it waits for itself (each generation it starts, and the
//! `--check` command, through tokio's process handles): reaping those here
//! would steal their exit status. So the reaper collects only zombies that
//! nobody *manages* — found in `/proc/self/task/*/children`, reaped one pid
//! at a time with `waitpid(pid, WNOHANG)` — and stays out of the way while
//! a `--check` command runs (its pid is not known here).
//!
//! The exit status of each reaped process is kept for a while, so that
//! delegate mode can tell how a main process it did not start itself ended.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use baton_sys::process::ChildExit;

/// How often the reaper looks for zombies even without a `SIGCHLD`.
pub const REAP_INTERVAL: Duration = Duration::from_millis(500);
/// Most exit statuses kept for [`take_status`].
const MAX_KEPT_STATUSES: usize = 1024;

/// How a reaped process ended: an exit code, or 128 + the signal, like a
/// shell reports it.
pub type Status = u8;

#[derive(Debug, Default)]
struct Reaper {
    managed: Mutex<BTreeSet<u32>>,
    holds: AtomicUsize,
    statuses: Mutex<HashMap<u32, Status>>,
    reaped: std::sync::atomic::AtomicU64,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Start reaping (once): on every `SIGCHLD`, and every [`REAP_INTERVAL`].
///
/// # Errors
/// The `SIGCHLD` handler could not be installed.
pub fn start() -> std::io::Result<()> {
    if REAPER.get().is_some() {
        return Ok(());
    }
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    let _ = REAPER.set(Reaper::default());
    drop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            reap_now();
        }
    }));
    Ok(())
}

/// `pid` is waited for by its owner (a tokio process handle): leave it.
/// Call it right after the fork, before any `.await`.
pub fn manage(pid: u32) {
    if let Some(r) = REAPER.get() {
        lock(&r.managed).insert(pid);
    }
}

/// `pid` was waited for by its owner.
pub fn forget(pid: u32) {
    if let Some(r) = REAPER.get() {
        lock(&r.managed).remove(&pid);
    }
}

/// While the returned guard lives, nothing is reaped (a child whose pid is
/// not known here, like the `--check` command's, is being waited for).
pub fn hold() -> Hold {
    if let Some(r) = REAPER.get() {
        r.holds.fetch_add(1, Ordering::SeqCst);
    }
    Hold(())
}

/// See [`hold`].
#[derive(Debug)]
pub struct Hold(());

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(r) = REAPER.get() {
            r.holds.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The exit status of `pid`, if the reaper collected it (once).
pub fn take_status(pid: u32) -> Option<Status> {
    lock(&REAPER.get()?.statuses).remove(&pid)
}

/// How many processes the reaper collected so far.
pub fn reaped() -> u64 {
    REAPER.get().map_or(0, |r| r.reaped.load(Ordering::Relaxed))
}

/// Our direct children (orphans reparented to us included).
fn children() -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            == Some('Z')
    })
}

/// Collect every zombie child nobody manages, now.
pub fn reap_now() {
    let Some(r) = REAPER.get() else { return };
    if r.holds.load(Ordering::SeqCst) > 0 {
        return;
    }
    for pid in children() {
        if lock(&r.managed).contains(&pid) || !is_zombie(pid) {
            continue;
        }
        if let Ok(Some(exit)) = baton_sys::process::try_reap(pid) {
            let status = match exit {
                ChildExit::Code(c) => c as Status,
                ChildExit::Signal(sig) => 128u8.saturating_add(sig as u8),
                ChildExit::Other => 1,
            };
            tracing::debug!(pid, status, "reaped");
            r.reaped.fetch_add(1, Ordering::Relaxed);
            let mut statuses = lock(&r.statuses);
            if statuses.len() >= MAX_KEPT_STATUSES {
                statuses.clear();
            }
            statuses.insert(pid, status);
        }
    }
}

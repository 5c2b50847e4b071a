//! The old image's side of `baton upgrade --self`: write the state into a
//! sealed memfd, leave the carried fds open across the exec, exec; on
//! failure put everything back. Mirror of `recv.rs`.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};

use baton_sys as sys;

use super::SelfCtx;
use super::state::{self, ENV_RETURN, ENV_RETURNED, ENV_STATE, SelfState};

/// Environment variables the next image must not inherit from this one.
const ENV_DROP: &[&str] = &[
    ENV_STATE,
    ENV_RETURN,
    ENV_RETURNED,
    // systemd's sockets are in the state now; the next image must not
    // adopt them a second time.
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Exec `ctx.exe` with `st` and the fds `carry` (every fd `st` names).
/// Returns only if that failed: why, with everything as it was.
pub fn exec(ctx: &SelfCtx, st: &SelfState, carry: &[BorrowedFd<'_>]) -> String {
    let bytes = match state::encode(st) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let memfd = match sys::fd::sealed_memfd("baton-self-state", &bytes) {
        Ok(m) => m,
        Err(e) => return format!("creating the state memfd: {e}"),
    };
    // The running image's own file, to come back to if the new one cannot
    // read the state (opened through /proc: the path may already hold the
    // new file).
    let back = match std::fs::File::open("/proc/self/exe") {
        Ok(f) => std::os::fd::OwnedFd::from(f),
        Err(e) => return format!("opening /proc/self/exe: {e}"),
    };
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !ENV_DROP.iter().any(|d| k == d))
        .collect();
    env.push((
        ENV_STATE.into(),
        format!("{}:{}", sys::fd::raw(&memfd), bytes.len()).into(),
    ));
    env.push((ENV_RETURN.into(), sys::fd::raw(&back).to_string().into()));
    let mut all: Vec<BorrowedFd<'_>> = carry.to_vec();
    all.push(memfd.as_fd());
    all.push(back.as_fd());
    let mut cleared = Vec::with_capacity(all.len());
    for fd in &all {
        if let Err(e) = sys::fd::clear_cloexec(*fd) {
            restore(&cleared);
            return format!("clearing close-on-exec on fd {}: {e}", sys::fd::raw(fd));
        }
        cleared.push(*fd);
    }
    tracing::info!(exe = %ctx.exe.display(), fds = all.len(), state_bytes = bytes.len(), "baton upgrade --self: executing the new image in place");
    // A SIGHUP or SIGTERM sent while the new image has no handler yet must
    // wait for it, not kill baton: blocked here, pending across the exec,
    // unblocked by the new image once its handlers are in place.
    if let Err(e) = sys::process::block_handled_signals(true) {
        tracing::warn!(error = %e, "could not block SIGHUP/SIGTERM/SIGINT across the exec");
    }
    let err = sys::process::exec_in_place(&ctx.exe, &ctx.argv, &env);
    let _ = sys::process::block_handled_signals(false);
    restore(&cleared);
    format!(
        "executing {} failed: {err}; baton keeps running as before",
        ctx.exe.display()
    )
}

fn restore(fds: &[BorrowedFd<'_>]) {
    for fd in fds {
        if let Err(e) = sys::fd::set_cloexec(*fd) {
            tracing::error!(fd = sys::fd::raw(fd), error = %e, "could not set close-on-exec again");
        }
    }
}

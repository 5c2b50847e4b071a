//! `baton __exec-shim -- CMD ARGS...`: the few instructions between `fork`
//! and the app.
//!
//! systemd's protocol wants `LISTEN_PID` to be the pid of the process that
//! reads `LISTEN_FDS`, and many apps check it (gunicorn, sd_listen_fds). The
//! supervisor cannot know the child's pid before `fork`, and setting an
//! environment variable between `fork` and `exec` is not async-signal-safe.
//! So the child first execs this shim (a fresh, single-threaded process),
//! which reads its own pid, adds `LISTEN_PID` to the environment of the next
//! `exec`, and execs the app: same pid, same fds, same process group.
//!
//! Two more things happen here because they must happen before the app
//! runs: the newcomer's `oom_score_adj` is raised (`--oom-score-adj`, so
//! that every process the app forks inherits it), and a pinned executable
//! (`--exec-fd`, the file `--expect-sha256` hashed) is executed through its
//! open fd.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

/// Arguments of the shim.
#[derive(Debug, clap::Args)]
pub struct ShimArgs {
    /// Exec the kept copy of the executable open at this fd (via
    /// /proc/self/fd/N) instead of looking CMD up on disk; CMD[0] stays
    /// argv[0].
    #[arg(long, value_name = "FD")]
    exec_fd: Option<i32>,
    /// Leave the `--exec-fd` open in the app: a script's interpreter opens
    /// `/proc/self/fd/N` after the exec, so the fd must survive it.
    #[arg(long, requires = "exec_fd")]
    keep_exec_fd: bool,
    /// Write this to /proc/self/oom_score_adj first (best effort).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    oom_score_adj: Option<i32>,
    /// The app's command line.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// Exec the app; returns only on failure (127: not found, 126: not
/// executable, like a shell).
pub fn main(args: ShimArgs) -> ExitCode {
    let Some((argv0, rest)) = args.command.split_first() else {
        eprintln!("baton: exec shim: no command");
        return ExitCode::from(127);
    };
    let pid = std::process::id();
    if let Some(adj) = args.oom_score_adj
        && let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string())
    {
        // A container may forbid it; the upgrade goes on without.
        eprintln!("baton: exec shim: cannot set oom_score_adj to {adj}: {e}");
    }
    // Keep the executable's fd open until exec; exec through /proc resolves
    // it before close-on-exec fds are closed, so a native app does not
    // inherit it.
    let mut _keep = None;
    let program: OsString = match args.exec_fd {
        Some(fd) => match baton_sys::inherit::adopt_exec_fd(fd) {
            Ok(Some(owned)) => {
                if args.keep_exec_fd
                    && let Err(e) = baton_sys::fd::clear_cloexec(owned.as_fd())
                {
                    eprintln!("baton: exec shim: fd {fd}: {e}");
                    return ExitCode::from(126);
                }
                _keep = Some(owned);
                format!("/proc/self/fd/{fd}").into()
            }
            Ok(None) => {
                eprintln!("baton: exec shim: fd {fd} is not open");
                return ExitCode::from(127);
            }
            Err(e) => {
                eprintln!("baton: exec shim: fd {fd}: {e}");
                return ExitCode::from(127);
            }
        },
        None => argv0.clone(),
    };
    let err = std::process::Command::new(&program)
        .arg0(argv0)
        .args(rest)
        .env("LISTEN_PID", pid.to_string())
        .exec();
    eprintln!(
        "baton: cannot run {}: {err}",
        std::path::Path::new(argv0).display()
    );
    ExitCode::from(match err.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    })
}

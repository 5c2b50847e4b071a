//! Starting the next generation: the one test seam for process effects.

use std::ffi::OsString;
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use baton_sys as sys;

// The handoff channel has no address anyone else could reach: the old
// generation spawns the new one with its end at `HANDOFF_FD` and names it
// in the environment, with its own pid, so that a copy of that environment
// inherited by some other descendant is not mistaken for a handoff.

/// Environment variable naming the handoff channel's fd in a new generation.
pub const ENV_HANDOFF_FD: &str = "BATON_HANDOFF_FD";
/// Environment variable with the old generation's pid (checked against
/// `getppid()` so a stray copy of the environment is ignored).
pub const ENV_PARENT_PID: &str = "BATON_PARENT_PID";
/// Environment variable with the old generation's `oom_score_adj`: the new
/// one returns to it once its predecessor is gone.
pub const ENV_OOM_SCORE_ADJ: &str = "BATON_OOM_SCORE_ADJ";
/// The fd number of the handoff channel in the new generation.
pub const HANDOFF_FD: RawFd = 3;

/// How long a child may take to be reaped after `SIGKILL` before baton stops
/// waiting and reports it as not reaped (a process in uninterruptible sleep,
/// e.g. on a hung mount, cannot die at once). The one bound for both faces:
/// the library's upgrade and the `baton run` supervisor.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// What to start.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct SpawnSpec {
    /// Path of the executable.
    pub program: PathBuf,
    /// argv\[0\] (defaults to `program`).
    pub arg0: Option<OsString>,
    /// argv\[1..\].
    pub args: Vec<OsString>,
    /// Environment variables to remove (inherited otherwise).
    pub env_remove: Vec<OsString>,
    /// Environment variables to set.
    pub env_set: Vec<(OsString, OsString)>,
    /// Fds to place in the child at fixed numbers (not `CLOEXEC` there).
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// `oom_score_adj` for the child (the newcomer goes first under memory
    /// pressure during the overlap).
    pub oom_score_adj: Option<i32>,
}

impl SpawnSpec {
    /// A spec for `program` with nothing else set.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        SpawnSpec {
            program: program.into(),
            ..SpawnSpec::default()
        }
    }
}

/// A future returned by [`ChildProcess::wait`].
pub type WaitFuture<'a> = Pin<Box<dyn Future<Output = io::Result<ExitStatus>> + Send + 'a>>;

/// A started child.
pub trait ChildProcess: Send + Sync + Debug {
    /// Its pid.
    fn pid(&self) -> u32;
    /// Send `SIGKILL`.
    ///
    /// # Errors
    /// The OS error (ESRCH once it is reaped).
    fn kill(&mut self) -> io::Result<()>;
    /// Wait for it to exit (and reap it).
    ///
    /// # Cancel safety
    /// Cancel safe.
    fn wait(&mut self) -> WaitFuture<'_>;
    /// Reap it if it exited.
    ///
    /// # Errors
    /// The OS error.
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>>;
}

/// Starts processes.
pub trait Spawner: Send + Sync + Debug {
    /// Start `spec`.
    ///
    /// # Errors
    /// The OS error from the spawn (e.g. ENOENT, EACCES, ENOEXEC).
    fn spawn(&self, spec: SpawnSpec) -> io::Result<Box<dyn ChildProcess>>;
}

/// The real spawner: `posix_spawn` (in glibc, `clone(CLONE_VM |
/// CLONE_VFORK)` then `execve`), so the cost of starting the next generation does not grow
/// with this process's resident memory, as a `fork` would (it copies the
/// page tables, with the parent stalled meanwhile). The child is watched
/// through a pidfd.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsSpawner;

#[derive(Debug)]
struct OsChild {
    pid: u32,
    /// Readable once the child exits.
    pidfd: tokio::io::unix::AsyncFd<OwnedFd>,
    /// Its status, once reaped.
    status: Option<ExitStatus>,
}

impl ChildProcess for OsChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        sys::process::pidfd_signal(self.pidfd.get_ref().as_fd(), sys::process::Signal::KILL)
    }

    fn wait(&mut self) -> WaitFuture<'_> {
        let OsChild { pid, pidfd, status } = self;
        Box::pin(async move {
            loop {
                if let Some(st) = reap(*pid, status)? {
                    return Ok(st);
                }
                let mut ready = pidfd.readable().await?;
                if reap(*pid, status)?.is_none() {
                    ready.clear_ready();
                }
            }
        })
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        reap(self.pid, &mut self.status)
    }
}

/// Reap `pid` into `status` if it exited (once).
fn reap(pid: u32, status: &mut Option<ExitStatus>) -> io::Result<Option<ExitStatus>> {
    if status.is_none()
        && let Some(raw) = sys::process::try_reap_status(pid)?
    {
        use std::os::unix::process::ExitStatusExt;
        *status = Some(ExitStatus::from_raw(raw));
    }
    Ok(*status)
}

impl Spawner for OsSpawner {
    fn spawn(&self, spec: SpawnSpec) -> io::Result<Box<dyn ChildProcess>> {
        let argv: Vec<OsString> = std::iter::once(
            spec.arg0
                .clone()
                .unwrap_or_else(|| spec.program.clone().into_os_string()),
        )
        .chain(spec.args.iter().cloned())
        .collect();
        let env = child_env(std::env::vars_os(), &spec.env_remove, &spec.env_set);
        // Move every source fd above every target number first, so placing
        // one never clobbers another's source.
        let top = spec.fds.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
        let mut sources = Vec::with_capacity(spec.fds.len());
        for (fd, target) in &spec.fds {
            sources.push((sys::fd::dup_at_least(fd.as_fd(), top.max(10))?, *target));
        }
        let fds: Vec<_> = sources.iter().map(|(fd, t)| (fd.as_fd(), *t)).collect();
        let pid = sys::process::spawn(&sys::process::SpawnRequest {
            program: &spec.program,
            argv: &argv,
            env: &env,
            fds: &fds,
        })?;
        // Ours until reaped, so the pid cannot be reused before this.
        let pidfd = sys::process::pidfd_open(pid)
            .and_then(|fd| sys::fd::async_fd(fd, tokio::io::Interest::READABLE));
        let pidfd = match pidfd {
            Ok(p) => p,
            Err(e) => {
                // Never leave a child nobody watches.
                let _ = sys::process::kill(pid, sys::process::Signal::KILL);
                let _ = reap_blocking(pid);
                return Err(e);
            }
        };
        if let Some(adj) = spec.oom_score_adj {
            // Best effort: a container may forbid it.
            if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string()) {
                tracing::debug!(pid, error = %e, "could not set oom_score_adj");
            }
        }
        Ok(Box::new(OsChild {
            pid,
            pidfd,
            status: None,
        }))
    }
}

/// Reap a child we just killed (it dies at once; bounded anyway).
fn reap_blocking(pid: u32) -> io::Result<()> {
    for _ in 0..1000 {
        if sys::process::try_reap_status(pid)?.is_some() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("child {pid} did not exit after SIGKILL"),
    ))
}

/// The child's environment, `KEY=VALUE` each: ours, minus `remove` and the
/// keys `set` overrides, plus `set`.
fn child_env(
    ours: impl Iterator<Item = (OsString, OsString)>,
    remove: &[OsString],
    set: &[(OsString, OsString)],
) -> Vec<OsString> {
    let kv = |k: &OsString, v: &OsString| {
        let mut e = k.clone();
        e.push("=");
        e.push(v);
        e
    };
    ours.filter(|(k, _)| !remove.contains(k) && !set.iter().any(|(s, _)| s == k))
        .map(|(k, v)| kv(&k, &v))
        .chain(set.iter().map(|(k, v)| kv(k, v)))
        .collect()
}

/// Work out, once at start-up, which file to exec at upgrade: argv\[0\] made
/// absolute (searched in `PATH` if it has no `/`), **not** symlink-resolved,
/// so that swapping `current -> releases/N` upgrades to the new release.
/// Falls back to `/proc/self/exe` (minus a `" (deleted)"` suffix).
pub fn resolve_executable(argv0: Option<&std::ffi::OsStr>) -> io::Result<PathBuf> {
    if let Some(a0) = argv0 {
        let p = Path::new(a0);
        if a0.as_encoded_bytes().contains(&b'/') {
            let abs = if p.is_absolute() {
                p.to_path_buf()
            } else {
                std::env::current_dir()?.join(p)
            };
            // Drop `.` components lexically (never resolving symlinks).
            let abs: PathBuf = abs
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect();
            if abs.exists() {
                return Ok(abs);
            }
        } else if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let cand = dir.join(p);
                if is_executable(&cand) {
                    return Ok(if cand.is_absolute() {
                        cand
                    } else {
                        std::env::current_dir()?.join(cand)
                    });
                }
            }
        }
    }
    let exe = std::fs::read_link("/proc/self/exe")?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => exe,
    })
}

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

//! A generation's process: start it through the exec shim with its
//! sockets at fds 3.., watch it with a pidfd, stop it, reap it.
//!
//! Each generation runs in a process group of its own, so a terminal's ^C
//! reaches only baton (which then stops the app gracefully), and the whole
//! group can be killed when the main process is gone or past the drain
//! timeout (gunicorn workers, for example, outlive a SIGKILLed master).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_sys as sys;
use baton_sys::process::Signal;
use tokio::io::unix::AsyncFd;

use super::ready::NotifySocket;

pub use baton::spawn::REAP_TIMEOUT;

/// Environment variables a generation never inherits from baton.
const ENV_REMOVE: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "BATON_PROBE_PORT",
    "BATON_GENERATION",
    "BATON_HANDOFF_FD",
    "BATON_PARENT_PID",
    "BATON_SELF_STATE",
    "BATON_SELF_RETURN",
    "BATON_SELF_RETURNED",
];

/// The executable a generation was started from, kept open so that a
/// restart can run exactly that file even if a broken one replaced it on
/// disk since.
#[derive(Debug)]
pub struct KeptExe {
    file: OwnedFd,
    /// The path it was opened at.
    pub path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    /// An ELF binary (exec through /proc/self/fd works); scripts cannot be
    /// exec'd that way (their interpreter reopens the path).
    pub elf: bool,
}

impl KeptExe {
    /// Open `path` (`CLOEXEC`) and remember what it is.
    pub fn open(path: &Path) -> std::io::Result<KeptExe> {
        Self::from_file(path, std::fs::File::open(path)?)
    }

    /// Keep `f`, opened at `path` (`CLOEXEC`): the file pre-flight hashed
    /// for `--expect-sha256`, executed through this very fd.
    pub fn from_file(path: &Path, f: std::fs::File) -> std::io::Result<KeptExe> {
        use std::io::{Read, Seek};
        let mut f = f;
        let m = f.metadata()?;
        let mut magic = [0u8; 4];
        f.seek(std::io::SeekFrom::Start(0))?;
        let elf = f.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
        Ok(KeptExe {
            file: OwnedFd::from(f),
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            elf,
        })
    }

    /// The open file (carried across `baton upgrade --self`).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether the file at `path` is still exactly this one.
    pub fn unchanged_at(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| {
            (m.dev(), m.ino(), m.size(), m.mtime()) == (self.dev, self.ino, self.size, self.mtime)
        })
    }
}

/// Find a command's executable the way `execvp` will: a name with a `/` is
/// a path (relative to the working directory), else it is searched in
/// `PATH`.
///
/// # Errors
/// A message saying it was not found or is not executable.
pub fn resolve_program(argv0: &OsStr) -> Result<PathBuf, String> {
    let p = Path::new(argv0);
    if argv0.is_empty() {
        return Err("the command is empty".into());
    }
    if argv0.as_encoded_bytes().contains(&b'/') {
        if baton::spawn::is_executable(p) {
            return Ok(p.to_path_buf());
        }
        return Err(if p.exists() {
            format!("{} is not an executable file", p.display())
        } else {
            format!("{} does not exist", p.display())
        });
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(p);
        if baton::spawn::is_executable(&cand) {
            return Ok(cand);
        }
    }
    Err(format!(
        "'{}' is not found in PATH ({})",
        p.display(),
        Path::new(&path).display()
    ))
}

/// How to exec a generation's program.
#[derive(Debug, Clone)]
pub enum ExecHow {
    /// Look the command up on disk (new versions come from disk).
    Disk,
    /// Run the kept copy of a previous good generation's executable.
    Kept(Arc<KeptExe>),
}

/// What to start.
#[derive(Debug)]
pub struct SpawnPlan {
    /// Generation number (`BATON_GENERATION`).
    pub generation: u64,
    /// Command line.
    pub argv: Vec<OsString>,
    /// Disk or kept executable.
    pub exec: ExecHow,
    /// Sockets, placed at 3, 4, ... (`CLOEXEC` duplicates).
    pub fds: Vec<OwnedFd>,
    /// `LISTEN_FDNAMES`.
    pub fd_names: String,
    /// `NOTIFY_SOCKET` of its own.
    pub notify: Option<NotifySocket>,
    /// `BATON_PROBE_PORT`.
    pub probe_port: Option<u16>,
    /// `oom_score_adj` the app starts with (the newcomer's, during the
    /// overlap with its predecessor).
    pub oom_score_adj: Option<i32>,
    /// `NOTIFY_SOCKET` (when `notify` is `None`: delegate mode's socket).
    pub notify_env: Option<std::ffi::OsString>,
    /// Set `BATON_GENERATION` (not in delegate mode: the app numbers its
    /// own generations).
    pub generation_env: bool,
}

/// A running (or exited, not yet reaped) generation.
#[derive(Debug)]
pub struct GenProc {
    /// Generation number.
    pub generation: u64,
    /// Main pid (also its process group).
    pub pid: u32,
    /// Command line.
    pub argv: Vec<OsString>,
    /// When it was started.
    pub started: Instant,
    /// The executable it was started from (kept open), if it could be
    /// opened.
    pub exe: Option<Arc<KeptExe>>,
    /// Its notify socket.
    pub notify: Option<NotifySocket>,
    /// Its `BATON_PROBE_PORT`.
    pub probe_port: Option<u16>,
    /// `None` for a generation adopted across `baton upgrade --self` (still
    /// our child, reaped by pid once its pidfd says it exited).
    child: Option<tokio::process::Child>,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<String>,
    /// Exit code, or 128 + the signal that killed it, once reaped.
    exit_code: Option<u8>,
}

/// An exit status as a shell's `$?`: the code, or 128 + the signal.
pub fn shell_status(st: &ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        _ => 1,
    }
}

/// Describe an exit status like a shell would.
pub fn describe_exit(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => st.to_string(),
    }
}

/// Start a generation.
///
/// # Errors
/// The OS error from fork/exec of the shim, or from opening the pidfd.
pub fn spawn(plan: SpawnPlan) -> std::io::Result<GenProc> {
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg0("baton").arg("__exec-shim");
    let n = plan.fds.len() as RawFd;
    let mut fds: Vec<(OwnedFd, RawFd)> = plan
        .fds
        .into_iter()
        .zip(3..)
        .collect::<Vec<(OwnedFd, RawFd)>>();
    let (exe, exec_fd) = match &plan.exec {
        ExecHow::Kept(k) => {
            fds.push((sys::fd::dup(k.file.as_fd())?, 3 + n));
            if !k.elf {
                // A script: its interpreter opens /proc/self/fd/N after
                // the exec.
                cmd.arg("--keep-exec-fd");
            }
            (Some(Arc::clone(k)), Some(3 + n))
        }
        ExecHow::Disk => {
            let kept = resolve_program(plan.argv.first().map_or(OsStr::new(""), |a| a.as_os_str()))
                .ok()
                .and_then(|p| KeptExe::open(&p).ok())
                .map(Arc::new);
            (kept, None)
        }
    };
    if let Some(fd) = exec_fd {
        cmd.arg("--exec-fd").arg(fd.to_string());
    }
    if let Some(adj) = plan.oom_score_adj {
        cmd.arg(format!("--oom-score-adj={adj}"));
    }
    cmd.arg("--").args(&plan.argv);
    for k in ENV_REMOVE {
        cmd.env_remove(k);
    }
    if n > 0 {
        cmd.env("LISTEN_FDS", n.to_string())
            .env("LISTEN_FDNAMES", &plan.fd_names);
    }
    if plan.generation_env {
        cmd.env("BATON_GENERATION", plan.generation.to_string());
    }
    if let Some(ns) = &plan.notify {
        cmd.env("NOTIFY_SOCKET", &ns.env_value);
    } else if let Some(v) = &plan.notify_env {
        cmd.env("NOTIFY_SOCKET", v);
    }
    if let Some(p) = plan.probe_port {
        cmd.env("BATON_PROBE_PORT", p.to_string());
    }
    cmd.stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    // Move every source above every target first, so placing one never
    // clobbers another's source.
    let top = fds.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
    let mut placements = Vec::with_capacity(fds.len());
    for (fd, target) in fds {
        placements.push(sys::process::FdPlacement {
            src: sys::fd::dup_at_least(fd.as_fd(), top.max(10))?,
            target,
        });
    }
    sys::process::place_fds_before_exec(&mut cmd, placements);
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("the child was reaped before its pid was read"))?;
    // Before any await: the zombie reaper (PID 1, --delegate) must leave it
    // to us.
    super::reaper::manage(pid);
    let pidfd = sys::fd::async_fd(
        sys::process::pidfd_open(pid)?,
        tokio::io::Interest::READABLE,
    )?;
    let mut notify = plan.notify;
    if let Some(ns) = notify.as_mut() {
        ns.start(plan.generation, pid)?;
    }
    Ok(GenProc {
        generation: plan.generation,
        pid,
        argv: plan.argv,
        started: Instant::now(),
        exe,
        notify,
        probe_port: plan.probe_port,
        child: Some(child),
        pidfd,
        status: None,
        exit_code: None,
    })
}

impl GenProc {
    /// The generation the previous image of baton started, after `baton
    /// upgrade --self`: `pid` is still our child (exec keeps children).
    ///
    /// # Errors
    /// The pidfd cannot be opened (the pid is gone: it was reaped, or is
    /// not ours).
    pub fn adopt(
        generation: u64,
        pid: u32,
        argv: Vec<OsString>,
        started: Instant,
        exe: Option<Arc<KeptExe>>,
        probe_port: Option<u16>,
    ) -> std::io::Result<GenProc> {
        super::reaper::manage(pid);
        let pidfd = sys::fd::async_fd(
            sys::process::pidfd_open(pid)?,
            tokio::io::Interest::READABLE,
        )?;
        Ok(GenProc {
            generation,
            pid,
            argv,
            started,
            exe,
            notify: None,
            probe_port,
            child: None,
            pidfd,
            status: None,
            exit_code: None,
        })
    }

    /// Wait for the main process's exit status.
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(c) = self.child.as_mut() {
            return c.wait().await;
        }
        loop {
            self.exited().await;
            if let Some(raw) = sys::process::try_reap_status(self.pid)? {
                return Ok(ExitStatus::from_raw(raw));
            }
            // Readable but not yet reapable: the pidfd polls readable a
            // moment before the zombie can be waited for.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resolves when the main process has exited (it stays a zombie until
    /// [`GenProc::reap`]).
    ///
    /// # Cancel safety
    /// Cancel safe, and can be awaited again.
    pub async fn exited(&self) {
        if self.status.is_some() {
            return;
        }
        // A pidfd stays readable once the process exited: never clear it.
        let _ = self.pidfd.readable().await;
    }

    /// Whether the main process has exited.
    pub fn has_exited(&self) -> bool {
        self.status.is_some()
            || sys::fd::poll_readable_now(self.pidfd.get_ref().as_fd()).unwrap_or(false)
    }

    /// Send a signal to the main process.
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none()
            && let Err(e) = sys::process::kill(self.pid, sig)
        {
            tracing::debug!(generation = self.generation, pid = self.pid, error = %e, "signal not sent");
        }
    }

    /// Kill the whole process group (the main process and anything it
    /// started that stayed in its group).
    fn kill_group(&self) {
        if self.status.is_none() {
            let _ = sys::process::kill_group(self.pid, Signal::KILL);
        }
    }

    /// After the main process exited: kill what is left of its process
    /// group and reap it. Returns how it ended.
    pub async fn reap(&mut self) -> String {
        if let Some(s) = &self.status {
            return s.clone();
        }
        self.kill_group();
        let s = match tokio::time::timeout(REAP_TIMEOUT, self.wait()).await {
            Ok(Ok(st)) => {
                self.exit_code = Some(shell_status(&st));
                describe_exit(&st)
            }
            Ok(Err(e)) => format!("unknown status ({e})"),
            Err(_) => format!("not reaped within {REAP_TIMEOUT:?}"),
        };
        if self.exit_code.is_some() {
            super::reaper::forget(self.pid);
        }
        self.status = Some(s.clone());
        s
    }

    /// After the main process exited: reap it, leaving its process group
    /// alone (delegate mode: the server's next generation lives in it).
    pub async fn reap_alone(&mut self) -> String {
        if let Some(s) = &self.status {
            return s.clone();
        }
        let s = match tokio::time::timeout(REAP_TIMEOUT, self.wait()).await {
            Ok(Ok(st)) => {
                self.exit_code = Some(shell_status(&st));
                super::reaper::forget(self.pid);
                describe_exit(&st)
            }
            Ok(Err(e)) => format!("unknown status ({e})"),
            Err(_) => format!("not reaped within {REAP_TIMEOUT:?}"),
        };
        self.status = Some(s.clone());
        s
    }

    /// Kill the generation now and reap it.
    pub async fn abort(&mut self) -> String {
        if self.status.is_none() && !self.has_exited() {
            self.kill_group();
        }
        self.reap().await
    }

    /// Graceful stop: `sig`, then up to `drain_timeout` for the main process
    /// to exit, then SIGKILL to the whole group. `hurry` cuts the wait
    /// short (a second stop request).
    pub async fn stop(
        &mut self,
        sig: Signal,
        drain_timeout: Duration,
        hurry: &tokio_util::sync::CancellationToken,
    ) -> StopOutcome {
        let t = Instant::now();
        self.signal(sig);
        let graceful = tokio::select! {
            () = self.exited() => true,
            () = tokio::time::sleep(drain_timeout) => false,
            () = hurry.cancelled() => false,
        };
        if !graceful {
            tracing::warn!(
                generation = self.generation,
                pid = self.pid,
                "still running {:?} after the stop signal: SIGKILL to its process group",
                t.elapsed()
            );
            self.kill_group();
            let _ = tokio::time::timeout(REAP_TIMEOUT, self.exited()).await;
        }
        let status = self.reap().await;
        StopOutcome {
            graceful,
            after: t.elapsed(),
            status,
        }
    }

    /// How it ended (exit code, or 128 + signal), once reaped.
    pub fn exit_code(&self) -> Option<u8> {
        self.exit_code
    }

    /// The command line, for logs and status.
    pub fn command_line(&self) -> String {
        join_argv(&self.argv)
    }
}

/// Every process of the tree rooted at `root`, `root` first (through
/// `/proc/PID/task/TID/children`, bounded).
pub fn process_tree(root: u32) -> Vec<u32> {
    const MAX_PROCESSES: usize = 65_536;
    let mut pids = vec![root];
    let mut i = 0;
    while i < pids.len() && pids.len() < MAX_PROCESSES {
        let p = pids[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                    for c in text
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok())
                    {
                        if !pids.contains(&c) {
                            pids.push(c);
                        }
                    }
                }
            }
        }
        i += 1;
    }
    pids
}

/// This process's `oom_score_adj` (0 if it cannot be read).
pub fn own_oom_score_adj() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl GenProc {
    /// Set the `oom_score_adj` of every process of this generation (after
    /// the overlap: the newcomer is no longer the first to sacrifice). Best
    /// effort: lowering it may need `CAP_SYS_RESOURCE`.
    pub fn set_oom_score_adj(&self, adj: i32) {
        if self.status.is_some() {
            return;
        }
        let mut failed = 0;
        for p in process_tree(self.pid) {
            if std::fs::write(format!("/proc/{p}/oom_score_adj"), adj.to_string()).is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            tracing::debug!(
                generation = self.generation,
                pid = self.pid,
                failed,
                oom_score_adj = adj,
                "could not set oom_score_adj of every process"
            );
        }
    }
}

/// How a stop went.
#[derive(Debug)]
pub struct StopOutcome {
    /// Exited by itself within the drain timeout.
    pub graceful: bool,
    /// How long it took.
    pub after: Duration,
    /// Exit status.
    pub status: String,
}

/// A command line for humans.
pub fn join_argv(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                format!("{s:?}")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_like_execvp() {
        assert!(resolve_program(OsStr::new("sh")).is_ok());
        let e = resolve_program(OsStr::new("no-such-command-here")).unwrap_err();
        assert!(e.contains("not found in PATH"), "{e}");
        let e = resolve_program(OsStr::new("/no/such/file")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = resolve_program(OsStr::new("/etc/passwd")).unwrap_err();
        assert!(e.contains("not an executable"), "{e}");
        assert!(resolve_program(OsStr::new("")).is_err());
    }

    #[test]
    fn kept_executables_know_elf_from_scripts() {
        let sh = resolve_program(OsStr::new("sh")).unwrap();
        let k = KeptExe::open(&std::fs::canonicalize(sh).unwrap()).unwrap();
        assert!(k.elf);
        assert!(k.unchanged_at(&k.path));
    }

    #[test]
    fn command_lines_for_humans() {
        let argv: Vec<OsString> = vec!["gunicorn".into(), "app:app".into(), "a b".into()];
        assert_eq!(join_argv(&argv), "gunicorn app:app \"a b\"");
    }
}

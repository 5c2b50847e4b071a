//! Processes: ids, signals, pidfds, reaping, resource limits, and placing
//! fds in a child between `fork` and `exec`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

pub use rustix::process::Signal;

use crate::to_io;

/// This process's effective uid.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// This process's pid.
pub fn getpid() -> u32 {
    rustix::process::getpid()
        .as_raw_nonzero()
        .get()
        .unsigned_abs()
}

/// Our parent's pid (0 if we have none, e.g. in a fresh PID namespace).
pub fn getppid() -> u32 {
    rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs())
}

/// Raise `RLIMIT_NOFILE`'s soft limit to the hard limit (handed-over
/// connections arrive by the thousand). Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .map_err(to_io)?;
    }
    Ok(lim.maximum.unwrap_or(u64::MAX))
}

/// Make this process a child subreaper: orphaned descendants are reparented
/// to us instead of PID 1, so we can reap them.
pub fn set_child_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(to_io)
}

/// Send a signal to a process by pid.
pub fn kill(pid: u32, signal: rustix::process::Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"))?;
    rustix::process::kill_process(pid, signal).map_err(to_io)
}

/// Open a pidfd for a process (readable once it exits).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"))?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).map_err(to_io)
}

/// Reap any exited child without blocking; returns its pid, if one was reaped.
pub fn reap_any() -> io::Result<Option<u32>> {
    match rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {
        Ok(Some((pid, _))) => Ok(Some(pid.as_raw_nonzero().get().unsigned_abs())),
        Ok(None) => Ok(None),
        Err(rustix::io::Errno::CHILD) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// A fd placement for a child: `src` appears at number `target` in the child,
/// without `CLOEXEC`.
#[derive(Debug)]
pub struct FdPlacement {
    /// The fd in the parent. Must not be a number in any placement's `target`
    /// range; use [`crate::fd::dup_at_least`] to move it out of the way first.
    pub src: OwnedFd,
    /// The fd number in the child.
    pub target: RawFd,
}

/// Arrange for `placements` to be installed in the child just before `exec`.
///
/// Every other fd of ours stays `CLOEXEC` and is closed by `exec`.
pub fn place_fds_before_exec(cmd: &mut tokio::process::Command, placements: Vec<FdPlacement>) {
    let plan: Vec<(RawFd, RawFd)> = placements
        .iter()
        .map(|p| (p.src.as_raw_fd(), p.target))
        .collect();
    // The closure keeps the OwnedFds alive until the Command is dropped.
    let keep = placements;
    // SAFETY: the closure runs in the forked child before exec. It only makes
    // raw `dup2`/`fcntl` system calls (async-signal-safe), does not
    // allocate, and touches only data captured by value (`plan` is a Vec
    // allocated before fork; reading it does not allocate). It never makes
    // an `OwnedFd`/`BorrowedFd` of a target number, which may not be open.
    // Sources were moved above every target number by the caller, so no dup
    // clobbers a source.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            for &(src, target) in &plan {
                if src == target {
                    // dup2(fd, fd) is a no-op that would leave FD_CLOEXEC set.
                    if libc::fcntl(src, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(src, target) == -1 {
                    // dup2 leaves the target without FD_CLOEXEC: inherited.
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Send a signal to every process of a process group.
pub fn kill_group(pgid: u32, signal: rustix::process::Signal) -> io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid process group"))?;
    rustix::process::kill_process_group(pid, signal).map_err(to_io)
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this status code.
    Code(i32),
    /// A signal (this number) terminated it.
    Signal(i32),
    /// Anything else the kernel reported.
    Other,
}

/// Reap one exited child, `pid`, without blocking. `Ok(None)`: it has not
/// exited (or is not our child).
pub fn try_reap(pid: u32) -> io::Result<Option<ChildExit>> {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"));
    };
    match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
        Ok(Some((_, st))) => Ok(Some(match (st.exit_status(), st.terminating_signal()) {
            (Some(c), _) => ChildExit::Code(c),
            (None, Some(sig)) => ChildExit::Signal(sig),
            _ => ChildExit::Other,
        })),
        Ok(None) | Err(rustix::io::Errno::CHILD) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// `CLOCK_MONOTONIC` in microseconds (systemd's `MONOTONIC_USEC=`).
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64).saturating_mul(1_000_000) + (ts.tv_nsec as u64) / 1000
}

/// What [`spawn`] starts: an executable, its full argv and environment, and
/// fds to place at fixed numbers in the child.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    /// The executable's path (not searched in `PATH`).
    pub program: &'a std::path::Path,
    /// argv, argv\[0\] included.
    pub argv: &'a [std::ffi::OsString],
    /// The whole environment, `KEY=VALUE` each.
    pub env: &'a [std::ffi::OsString],
    /// `(source, target)`: `source` appears at `target` in the child, without
    /// `CLOEXEC`. Every source must be `CLOEXEC` and numbered above every
    /// target (use [`crate::fd::dup_at_least`]), so that no placement
    /// clobbers another's source and no source leaks into the child.
    pub fds: &'a [(BorrowedFd<'a>, RawFd)],
}

/// Start a process with `posix_spawn`: glibc runs it as
/// `clone(CLONE_VM | CLONE_VFORK)` + `execve`, so — unlike `fork` — the
/// parent's page tables are not copied and the cost does not grow with the
/// parent's resident memory. The fds are placed by `dup2` file actions (no
/// code of ours runs in the child); the signal mask is emptied and
/// `SIGPIPE` (which the Rust runtime ignores) is reset to its default, as
/// `std::process::Command` does. Returns the child's pid; the caller reaps
/// it (see [`pidfd_open`] and [`try_reap_status`]).
///
/// # Errors
/// `InvalidInput` for a NUL byte in the program, an argument or a variable,
/// or a source fd not above every target; the error of the `exec` (ENOENT,
/// EACCES, ENOEXEC...) otherwise.
pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<u32> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn cstr(s: &std::ffi::OsStr) -> io::Result<CString> {
        CString::new(s.as_bytes()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("a NUL byte in {s:?}"))
        })
    }
    let top = req.fds.iter().map(|&(_, t)| t).max().unwrap_or(-1);
    if let Some((src, _)) = req.fds.iter().find(|(s, _)| s.as_raw_fd() <= top) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fd {} is not above every placement target (up to {top})",
                src.as_raw_fd()
            ),
        ));
    }
    let program = cstr(req.program.as_os_str())?;
    let argv: Vec<CString> = req.argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let env: Vec<CString> = req.env.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut env_ptrs: Vec<*mut libc::c_char> = env.iter().map(|a| a.as_ptr().cast_mut()).collect();
    env_ptrs.push(std::ptr::null_mut());

    let mut actions = SpawnFileActions::new()?;
    for &(src, target) in req.fds {
        actions.add_dup2(src.as_raw_fd(), target)?;
    }
    let mut attr = SpawnAttr::new()?;
    attr.set_signals()?;
    let mut pid: libc::pid_t = 0;
    // SAFETY: `program`, every argv and envp string, and both pointer arrays
    // (each ending with a null pointer) are alive until the call returns;
    // `actions` and `attr` are initialized and not shared. posix_spawn does
    // not keep any of these pointers after returning (glibc's child copies
    // nothing back; the parent waits for the exec through CLONE_VFORK). The
    // source fds stay open for the call because the caller borrows them.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attr.0,
            argv_ptrs.as_ptr(),
            env_ptrs.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    u32::try_from(pid).map_err(|_| io::Error::other(format!("posix_spawn returned pid {pid}")))
}

/// An initialized `posix_spawn_file_actions_t`, destroyed on drop.
struct SpawnFileActions(libc::posix_spawn_file_actions_t);

impl SpawnFileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: a zeroed struct is valid storage for the init call, which
        // initializes it fully.
        let mut a: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
        // SAFETY: `a` is valid, exclusively borrowed storage.
        let rc = unsafe { libc::posix_spawn_file_actions_init(&mut a) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SpawnFileActions(a))
    }

    fn add_dup2(&mut self, src: RawFd, target: RawFd) -> io::Result<()> {
        // SAFETY: `self.0` was initialized by `posix_spawn_file_actions_init`.
        // `src != target` (checked by the caller), so the child's `dup2`
        // creates `target` without `FD_CLOEXEC`.
        let rc = unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, src, target) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
}

impl Drop for SpawnFileActions {
    fn drop(&mut self) {
        // SAFETY: initialized in `new`, destroyed exactly once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

impl std::fmt::Debug for SpawnFileActions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpawnFileActions")
    }
}

/// An initialized `posix_spawnattr_t`, destroyed on drop.
struct SpawnAttr(libc::posix_spawnattr_t);

impl SpawnAttr {
    fn new() -> io::Result<Self> {
        // SAFETY: a zeroed struct is valid storage for the init call.
        let mut a: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
        // SAFETY: `a` is valid, exclusively borrowed storage.
        let rc = unsafe { libc::posix_spawnattr_init(&mut a) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SpawnAttr(a))
    }

    /// An empty signal mask, and `SIGPIPE` back to its default action.
    fn set_signals(&mut self) -> io::Result<()> {
        // SAFETY: `sigset_t`s are plain data initialized by sigemptyset /
        // sigaddset before use; `self.0` was initialized in `new`.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            let mut default: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut default);
            libc::sigaddset(&mut default, libc::SIGPIPE);
            for rc in [
                libc::posix_spawnattr_setsigmask(&mut self.0, &empty),
                libc::posix_spawnattr_setsigdefault(&mut self.0, &default),
                libc::posix_spawnattr_setflags(
                    &mut self.0,
                    (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
                ),
            ] {
                if rc != 0 {
                    return Err(io::Error::from_raw_os_error(rc));
                }
            }
        }
        Ok(())
    }
}

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialized in `new`, destroyed exactly once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

impl std::fmt::Debug for SpawnAttr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpawnAttr")
    }
}

/// Reap `pid` if it exited, without blocking, and return its raw wait
/// status (for `std::os::unix::process::ExitStatusExt::from_raw`).
/// `Ok(None)`: it is still running.
///
/// # Errors
/// The OS error (ECHILD if it is not our child or was reaped already).
pub fn try_reap_status(pid: u32) -> io::Result<Option<i32>> {
    let p = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"))?;
    match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
        Ok(Some((_, st))) => Ok(Some(st.as_raw())),
        Ok(None) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// Send a signal through a pidfd: it cannot reach another process that
/// reused the pid.
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: Signal) -> io::Result<()> {
    rustix::process::pidfd_send_signal(pidfd, signal).map_err(to_io)
}

/// Replace this process's image with `path` (`execve`): same pid, same
/// children, every fd without `CLOEXEC` stays open in the new image. Returns
/// only if the exec failed, with the OS error; this process is then exactly
/// as it was (`execve` changes nothing when it fails).
///
/// Strings with a NUL byte cannot be passed and are refused before anything
/// is called.
pub fn exec_in_place(
    path: &std::path::Path,
    argv: &[std::ffi::OsString],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let nul = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    };
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return nul("the executable's path");
    };
    let mut c_args = Vec::with_capacity(argv.len());
    for a in argv {
        let Ok(c) = CString::new(a.as_bytes()) else {
            return nul("an argument");
        };
        c_args.push(c);
    }
    let mut c_env = Vec::with_capacity(env.len());
    for (k, v) in env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        let Ok(c) = CString::new(kv) else {
            return nul("an environment variable");
        };
        c_env.push(c);
    }
    let mut p_args: Vec<*const libc::c_char> = c_args.iter().map(|c| c.as_ptr()).collect();
    p_args.push(std::ptr::null());
    let mut p_env: Vec<*const libc::c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
    p_env.push(std::ptr::null());
    // SAFETY: every pointer is a NUL-terminated string owned by the
    // `CString`s above, both arrays end with a null pointer, and all of it
    // lives until after the call; `execve` only returns on failure, leaving
    // the process unchanged.
    unsafe {
        libc::execve(c_path.as_ptr(), p_args.as_ptr(), p_env.as_ptr());
    }
    io::Error::last_os_error()
}

/// The signals `baton run` handles (stop, reload): SIGHUP, SIGTERM,
/// SIGINT.
fn handled_signals() -> libc::sigset_t {
    // SAFETY: `sigemptyset`/`sigaddset` only write the set they are given,
    // a local owned here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block (`true`) or unblock SIGHUP, SIGTERM and SIGINT in the calling
/// thread. The mask and pending signals survive `execve`: blocked before
/// [`exec_in_place`], a signal sent while the new image has no handler yet
/// stays pending (instead of its default action killing the process) until
/// the new image unblocks it after installing its handlers.
pub fn block_handled_signals(block: bool) -> io::Result<()> {
    let set = handled_signals();
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: `pthread_sigmask` reads the set (a valid local) and changes
    // only the calling thread's mask; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Give the kernel back the heap memory the allocator holds free (glibc's
/// `malloc_trim(0)`: the top of the heap and whole free pages inside it).
/// Returns whether any was released. A no-op outside glibc.
pub fn release_free_heap() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: `malloc_trim` takes a size and touches only the
        // allocator's own state, under the allocator's locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::path::Path;

    use super::*;

    fn wait(pid: u32) -> i32 {
        for _ in 0..10_000 {
            if let Some(raw) = try_reap_status(pid).unwrap() {
                return raw;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("child {pid} did not exit");
    }

    /// Run `argv` with a pipe's write end placed at fd 1; its output.
    fn run_to_pipe(program: &str, argv: &[&str], env: &[&str]) -> String {
        let (r, w) = crate::fd::pipe_cloexec().unwrap();
        let w_high = crate::fd::dup_at_least(w.as_fd(), 300).unwrap();
        drop(w);
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let env: Vec<OsString> = env.iter().map(OsString::from).collect();
        let pid = spawn(&SpawnRequest {
            program: Path::new(program),
            argv: &argv,
            env: &env,
            fds: &[(w_high.as_fd(), 1)],
        })
        .unwrap();
        drop(w_high);
        assert_eq!(wait(pid), 0);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn spawn_sets_argv_and_the_environment() {
        let out = run_to_pipe("/bin/sh", &["sh", "-c", "echo \"$0 $X\""], &["X=hello"]);
        assert_eq!(out, "sh hello\n");
    }

    #[test]
    fn spawn_places_fds_and_passes_no_cloexec_fd() {
        // The pipe is open in the child only at the placed number: neither
        // its read end nor the placement's source (both CLOEXEC) leak.
        let out = run_to_pipe("/bin/ls", &["ls", "-l", "/proc/self/fd"], &[]);
        fn target(l: &str) -> Option<String> {
            l.split(" -> ").nth(1).map(str::to_owned)
        }
        fn fd(l: &str) -> Option<&str> {
            l.split(" -> ").next()?.split_whitespace().last()
        }
        let ours = out
            .lines()
            .find(|l| fd(l) == Some("1"))
            .and_then(target)
            .unwrap_or_default();
        assert!(ours.starts_with("pipe:["), "{out}");
        let with_it: Vec<&str> = out
            .lines()
            .filter(|l| target(l).as_deref() == Some(ours.as_str()))
            .filter_map(fd)
            .collect();
        assert_eq!(with_it, ["1"], "{out}");
    }

    #[test]
    fn spawn_reports_the_exec_error() {
        let e = spawn(&SpawnRequest {
            program: Path::new("/nonexistent/baton"),
            argv: &[OsString::from("x")],
            env: &[],
            fds: &[],
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn spawn_refuses_a_source_below_a_target() {
        let (_r, w) = crate::fd::pipe_cloexec().unwrap();
        let e = spawn(&SpawnRequest {
            program: Path::new("/bin/true"),
            argv: &[OsString::from("true")],
            env: &[],
            fds: &[(w.as_fd(), 1000)],
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}

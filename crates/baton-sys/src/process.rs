//! Processes: ids, signals, pidfds, reaping, resource limits, and placing
//! fds in a child between `fork` and `exec`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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
    /// range; use [`dup_at_least`] to move it out of the way first.
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
    // SAFETY: the closure runs in the forked child before exec. It only calls
    // `dup3`/`fcntl` (async-signal-safe raw syscalls through rustix), does not
    // allocate, and touches only data captured by value (`plan` is a Vec
    // allocated before fork; reading it does not allocate). Sources were moved
    // above every target number by the caller, so no dup clobbers a source.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            for &(src, target) in &plan {
                let src_fd = BorrowedFd::borrow_raw(src);
                if src == target {
                    rustix::io::fcntl_setfd(src_fd, rustix::io::FdFlags::empty())?;
                } else {
                    // dup3 without O_CLOEXEC leaves the target inheritable.
                    let mut tgt = std::mem::ManuallyDrop::new(OwnedFd::from_raw_fd(target));
                    rustix::io::dup3(src_fd, &mut tgt, rustix::io::DupFlags::empty())?;
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

//! `baton upgrade --self`: baton replaces its own image in place.
//!
//! The model: `execve` of baton's own executable path (resolved once at
//! start, so a new file there is what runs next), in the same process:
//! the pid does not change (systemd's main pid, the pid file, a
//! container's PID 1), and the app stays baton's child (`waitpid` and its
//! pidfd work in the new image). What the new image needs crosses the exec
//! in two ways: fds left open without `CLOEXEC` (the listeners, the
//! control socket, `--metrics`, the kept executables, with `--front` its
//! public listeners and its parked idle client connections), and a sealed
//! memfd with the rest ([`state::SelfState`]: numbers, pids, counters, and
//! which fd is what), named by `BATON_SELF_STATE`. The new image marks
//! every inherited fd `CLOEXEC` again first thing, then adopts exactly the
//! numbers the state names.
//!
//! Invariants:
//! - nothing is closed or re-bound: connections queue in the kernel while
//!   no image accepts;
//! - it runs as a job of the supervisor's owner, so it never overlaps an
//!   upgrade, a start or a stop ("in progress" otherwise);
//! - with `--front`, the exec waits (at most `--drain-timeout`) for the
//!   requests in flight; idle connections are parked, not closed;
//! - an exec that fails leaves baton as it was (`execve` changes nothing
//!   when it fails; the fds get `CLOEXEC` back, the front thaws) and the
//!   caller gets the error;
//! - a new image that cannot read the state (another format, corrupt)
//!   executes the previous image again (an fd of it is carried in
//!   `BATON_SELF_RETURN`), which reads its own state and says so in status;
//!   if even that fails, it logs and keeps every fd open without serving
//!   (the app keeps running on its own copies of the listeners; a stop
//!   signal ends baton, and its service manager the rest).
//!
//! Files: `state.rs` (the format), `send.rs` (the old image: freeze, write,
//! exec, undo), `recv.rs` (the new image: read, adopt, or go back).

pub mod recv;
pub mod send;
pub mod state;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Mutex;

/// What `--self` needs that is fixed when baton starts.
#[derive(Debug)]
pub struct SelfCtx {
    /// baton's own executable path, resolved at start.
    pub exe: PathBuf,
    /// baton's own command line.
    pub argv: Vec<OsString>,
    /// A duplicate of the control socket.
    pub control: OwnedFd,
    /// A duplicate of `--metrics`'s socket.
    pub metrics: Option<OwnedFd>,
    /// Carried numbers, updated by each attempt.
    pub book: Mutex<Book>,
}

/// The numbers `baton status` shows about baton itself.
#[derive(Debug, Clone)]
pub struct Book {
    /// Images that took over so far.
    pub execs: u64,
    /// `--self` requests that reached the exec.
    pub attempts: u64,
    /// How the last one ended.
    pub last: Option<String>,
    /// When the first image started (Unix ms).
    pub first_started_unix_ms: u64,
    /// When this image started (Unix ms).
    pub image_started_unix_ms: u64,
    /// The inode of the file this image runs from (a marker of which
    /// binary it is).
    pub exe_ino: u64,
    /// `--front`'s idle client connections the last exec carried.
    pub carried: u64,
}

/// The prefix of the status note about baton itself.
pub const NOTE_PREFIX: &str = "baton: ";

impl Book {
    /// The status note: `baton: pid=P version=V exe_ino=I execs=N
    /// attempts=A first_started_unix_ms=T image_started_unix_ms=T
    /// last=...` (`last` is the rest of the line).
    pub fn note(&self) -> String {
        format!(
            "{NOTE_PREFIX}pid={} version={} exe_ino={} execs={} attempts={} carried={} first_started_unix_ms={} image_started_unix_ms={} last={}",
            baton_sys::process::getpid(),
            env!("CARGO_PKG_VERSION"),
            self.exe_ino,
            self.execs,
            self.attempts,
            self.carried,
            self.first_started_unix_ms,
            self.image_started_unix_ms,
            self.last.as_deref().unwrap_or("none"),
        )
    }
}

/// A parsed [`Book::note`] (for `baton upgrade --self`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteView {
    /// Images that took over.
    pub execs: u64,
    /// Attempts.
    pub attempts: u64,
    /// The last outcome.
    pub last: String,
    /// The executable's inode.
    pub exe_ino: u64,
    /// baton's version.
    pub version: String,
}

/// Find and parse the note among a status report's notes.
pub fn parse_note(notes: &[String]) -> Option<NoteView> {
    let line = notes.iter().find_map(|n| n.strip_prefix(NOTE_PREFIX))?;
    let (head, last) = line.split_once(" last=")?;
    let field = |k: &str| {
        head.split(' ')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
    };
    Some(NoteView {
        execs: field("execs")?.parse().ok()?,
        attempts: field("attempts")?.parse().ok()?,
        exe_ino: field("exe_ino")?.parse().ok()?,
        version: field("version")?.to_owned(),
        last: last.to_owned(),
    })
}

/// The outcome written when the new image took over.
pub const LAST_OK: &str = "ok";

/// The inode of the file at `/proc/self/exe`.
pub fn own_exe_ino() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/exe").map_or(0, |m| m.ino())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_note_parses_back() {
        let b = Book {
            execs: 3,
            attempts: 4,
            last: Some("returned: state format 9 unknown".into()),
            first_started_unix_ms: 1,
            image_started_unix_ms: 2,
            exe_ino: 77,
            carried: 5,
        };
        let v = parse_note(&["x".into(), b.note()]).unwrap();
        assert_eq!(v.execs, 3);
        assert_eq!(v.attempts, 4);
        assert_eq!(v.exe_ino, 77);
        assert_eq!(v.last, "returned: state format 9 unknown");
    }
}

//! Fds a parent passed on purpose, and the only way to own an fd number this
//! process did not open itself. Each convention is checked before an fd is
//! owned (the environment names this process, the fd is the kind of socket
//! announced), and each number can be adopted once per process: safe code
//! cannot make an `OwnedFd` of an arbitrary number.

use std::io;
use std::os::fd::{OwnedFd, RawFd};

use crate::fd::{adopt_checked, adopt_inherited_fd, adopt_inherited_listener};
use crate::socket::{SocketKind, is_seqpacket};

/// The sockets systemd's socket activation passed to this process: fds 3,
/// 4, ... (`LISTEN_FDS`, at most 1024 of them), named by `LISTEN_FDNAMES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenFds {
    count: i32,
    names: Vec<String>,
}

/// One fd named by `LISTEN_FDS`, adopted (or why not).
#[derive(Debug)]
pub struct PassedFd {
    /// Its number (for messages).
    pub raw: RawFd,
    /// Its `LISTEN_FDNAMES` entry, if any.
    pub name: Option<String>,
    /// The listening socket, `Ok(None)` if nothing is open at that number,
    /// or why it is not a listening stream socket (it is then left alone,
    /// never closed).
    pub socket: io::Result<Option<(OwnedFd, SocketKind)>>,
}

impl ListenFds {
    /// From the environment. `None` when `LISTEN_FDS` is unset or not a
    /// number, or `LISTEN_PID` is not this process (an environment
    /// inherited by accident).
    pub fn from_env() -> Option<ListenFds> {
        let count = std::env::var("LISTEN_FDS").ok()?.parse::<i32>().ok()?;
        let for_us = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| p == crate::process::getpid());
        if !for_us {
            return None;
        }
        let names = std::env::var("LISTEN_FDNAMES")
            .map(|s| s.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        Some(ListenFds {
            count: count.clamp(0, 1024),
            names,
        })
    }

    /// How many fds, from fd 3 on.
    pub fn count(&self) -> i32 {
        self.count
    }

    /// Each fd number with its name, if `LISTEN_FDNAMES` gives one.
    pub fn fds(&self) -> impl Iterator<Item = (RawFd, Option<&str>)> {
        (0..self.count).map(|i| {
            let name = self
                .names
                .get(i as usize)
                .map(String::as_str)
                .filter(|s| !s.is_empty());
            (3 + i, name)
        })
    }

    /// Own the passed sockets. Each must be a listening stream socket: the
    /// check runs before the fd is owned, so a number that is open but is
    /// something else — typically because the parent left it closed and
    /// this process has since opened an fd of its own there — is refused
    /// and left alone. A number adopted before in this process is refused
    /// too.
    pub fn adopt(&self) -> Vec<PassedFd> {
        self.fds()
            .map(|(raw, name)| PassedFd {
                raw,
                name: name.map(str::to_owned),
                socket: adopt_inherited_listener(raw),
            })
            .collect()
    }
}

/// Own baton's handoff channel, the fd its parent placed at `raw` and named
/// in `BATON_HANDOFF_FD` (the caller checks the parent is who the
/// environment says). It must be a `SOCK_SEQPACKET` Unix socket, checked
/// before it is owned.
///
/// # Errors
/// `InvalidInput` if it is another kind of fd; `AlreadyExists` if adopted
/// before. `Ok(None)`: nothing is open there.
pub fn adopt_handoff_channel(raw: RawFd) -> io::Result<Option<OwnedFd>> {
    Ok(adopt_checked(raw, |fd| {
        if is_seqpacket(fd) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {raw} is not a SOCK_SEQPACKET Unix socket"),
            ))
        }
    })?
    .map(|(fd, ())| fd))
}

/// Own the fd a parent placed at `raw` for this process to exec through
/// (`baton run`'s exec shim, `--exec-fd`): any kind of fd.
///
/// # Errors
/// `AlreadyExists` if adopted before; `InvalidInput` below 3. `Ok(None)`:
/// nothing is open there.
pub fn adopt_exec_fd(raw: RawFd) -> io::Result<Option<OwnedFd>> {
    adopt_inherited_fd(raw)
}

/// Own an fd the previous image of this very process left open for it
/// across `baton upgrade --self` (named in its carried state): any kind of
/// fd, checked open, each number once.
///
/// # Errors
/// `AlreadyExists` if adopted before; `InvalidInput` below 3. `Ok(None)`:
/// nothing is open there.
pub fn adopt_self_exec_fd(raw: RawFd) -> io::Result<Option<OwnedFd>> {
    adopt_inherited_fd(raw)
}

/// [`adopt_self_exec_fd`] for a listening stream socket: checked to be one
/// before it is owned (left alone otherwise).
///
/// # Errors
/// As [`ListenFds::adopt`] reports for one fd.
pub fn adopt_self_exec_listener(raw: RawFd) -> io::Result<Option<(OwnedFd, SocketKind)>> {
    adopt_inherited_listener(raw)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn a_number_is_adopted_once() {
        let (r, _w) = crate::fd::pipe_cloexec().unwrap();
        let raw = r.into_raw_fd();
        let fd = adopt_exec_fd(raw).unwrap().unwrap();
        assert_eq!(fd.as_raw_fd(), raw);
        let again = adopt_exec_fd(raw).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists, "{again}");
    }

    #[test]
    fn a_handoff_channel_must_be_a_seqpacket_socket_and_is_left_alone_otherwise() {
        let (r, _w) = crate::fd::pipe_cloexec().unwrap();
        let e = adopt_handoff_channel(r.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        // Still ours, still open.
        assert!(crate::fd::is_cloexec(std::os::fd::AsFd::as_fd(&r)).unwrap());
        let (a, _b) = crate::fd::seqpacket_pair().unwrap();
        let raw = a.into_raw_fd();
        assert!(adopt_handoff_channel(raw).unwrap().is_some());
        assert!(adopt_inherited_fd(2).is_err(), "stdio is never adopted");
    }
}

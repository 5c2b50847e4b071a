//! # baton-sys — every system call baton makes, in one place
//!
//! This is the only crate of the workspace that contains `unsafe` code;
//! every other crate is `#![forbid(unsafe_code)]`. Almost everything here is
//! a thin, safe wrapper over `rustix`, split by role:
//!
//! * [`fd`] — fds: `CLOEXEC` by default, duplication, adopting inherited fd
//!   numbers, `SCM_RIGHTS` passing, sealed memfds, tokio registration;
//! * [`process`] — ids, signals, pidfds, reaping, and placing fds in a child
//!   between `fork` and `exec`;
//! * [`socket`] — binding and checking listeners, the accept queue, peer
//!   credentials, reuseport steering with classic BPF;
//! * [`procfs`] — `/proc/net/tcp{,6}` parsing;
//! * [`inherit`] — fds a parent passed on purpose (`LISTEN_FDS`, baton's
//!   handoff channel, the exec shim's fd): the only way to own an fd number
//!   this process did not open, checked first, once per number.
//!
//! The `unsafe` blocks, each with its `// SAFETY:` line, are:
//!
//! * starting a process with `posix_spawn` and its file actions
//!   ([`process::spawn`]: no copy of the address space, fds placed by `dup2`
//!   actions);
//! * placing fds at fixed numbers in a child between `fork` and `exec`
//!   ([`process::place_fds_before_exec`]: `pre_exec` runs in a forked child
//!   of a multi-threaded process; raw `dup2`/`fcntl` only);
//! * adopting fd numbers inherited from our parent (through [`inherit`]
//!   only, checked first, each number once);
//! * registering an owned fd with tokio ([`fd::async_fd`]);
//! * one raw `setsockopt` ([`socket::attach_reuseport_cbpf`], which rustix
//!   does not wrap);
//! * the peer-credential reads ([`socket::peer_cred`],
//!   [`socket::recv_with_creds`]: raw, so a pid 0 never lands in a non-zero
//!   pid type);
//! * the raw `fcntl` calls of [`fd::cloexec_inherited`];
//! * replacing this process's image in place ([`process::exec_in_place`],
//!   `baton upgrade --self`), with the handled signals blocked across it
//!   ([`process::block_handled_signals`]);
//! * `malloc_trim` ([`process::release_free_heap`]).
//!
//! Every fd this crate creates is `CLOEXEC`; functions return [`OwnedFd`]
//! and take [`BorrowedFd`].
//!
//! [`OwnedFd`]: std::os::fd::OwnedFd
//! [`BorrowedFd`]: std::os::fd::BorrowedFd

#![allow(unsafe_code)]
#![warn(missing_docs)]

pub mod fd;
pub mod inherit;
pub mod process;
pub mod procfs;
pub mod socket;

fn to_io(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

//! The new image's side of `baton upgrade --self`: read the state the
//! previous image left, adopt the fds it names, or — if it cannot be read —
//! go back to the previous image. Mirror of `send.rs`.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd, RawFd};

use baton_sys as sys;
use baton_sys::socket::SocketKind;

use super::state::{self, ENV_RETURN, ENV_RETURNED, ENV_STATE, MAX_STATE, SelfState};

/// What the previous image left.
#[derive(Debug)]
pub struct Taken {
    /// Its state.
    pub state: SelfState,
    /// Set when this image is the *previous* one again: why the new one
    /// gave up.
    pub returned: Option<String>,
}

/// Read the state named by `BATON_SELF_STATE`, if any. An unreadable
/// state does not return: this process executes the previous image again
/// (or, if that fails too, holds every fd without serving; see the module
/// doc of `self_exec`).
pub fn take() -> Option<Taken> {
    let spec = std::env::var(ENV_STATE).ok()?;
    let returned = std::env::var(ENV_RETURNED).ok();
    // The previous image's executable: only needed on failure; closed
    // otherwise (no fd leaks across repeated --self).
    let back = std::env::var(ENV_RETURN)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
        .and_then(|raw| sys::inherit::adopt_self_exec_fd(raw).ok().flatten());
    let mut memfd = None;
    match read(&spec, &mut memfd) {
        Ok(state) => {
            drop(back);
            Some(Taken { state, returned })
        }
        Err(why) => go_back(why, back, memfd, returned.is_some()),
    }
}

/// Read the state; the memfd is left in `memfd` (to hand it back).
fn read(spec: &str, memfd: &mut Option<OwnedFd>) -> Result<SelfState, String> {
    let (fd, len) = spec
        .split_once(':')
        .and_then(|(f, l)| Some((f.parse::<RawFd>().ok()?, l.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("{ENV_STATE}={spec} is not FD:LEN"))?;
    let m = memfd.insert(
        sys::inherit::adopt_self_exec_fd(fd)
            .map_err(|e| format!("state fd {fd}: {e}"))?
            .ok_or_else(|| format!("state fd {fd} is not open"))?,
    );
    let dup = sys::fd::dup(m.as_fd()).map_err(|e| format!("state fd {fd}: {e}"))?;
    let bytes = sys::fd::read_sealed_memfd(dup, len, MAX_STATE)
        .map_err(|e| format!("reading the state: {e}"))?;
    state::decode(&bytes).map_err(|e| e.to_string())
}

/// The previous image gets the state back under its real size (the
/// memfd is sealed: its size is the truth, whatever the environment
/// said).
fn state_spec(memfd: &OwnedFd) -> Option<String> {
    let size = std::fs::File::from(sys::fd::dup(memfd.as_fd()).ok()?)
        .metadata()
        .ok()?
        .len();
    Some(format!("{}:{size}", sys::fd::raw(memfd)))
}

fn go_back(
    why: String,
    back: Option<OwnedFd>,
    memfd: Option<OwnedFd>,
    already_returned: bool,
) -> ! {
    tracing::error!(reason = %why, "baton upgrade --self: this baton cannot read the state the previous one left");
    if let (Some(b), false) = (back, already_returned) {
        let path = format!("/proc/self/fd/{}", sys::fd::raw(&b));
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| k != ENV_RETURNED && k != ENV_RETURN && k != ENV_STATE)
            .collect();
        env.push((ENV_RETURNED.into(), why.clone().into()));
        if let Some(spec) = memfd.as_ref().and_then(state_spec) {
            env.push((ENV_STATE.into(), spec.into()));
        }
        let argv: Vec<OsString> = std::env::args_os().collect();
        let memfd_kept = memfd
            .as_ref()
            .is_none_or(|m| sys::fd::clear_cloexec(m.as_fd()).is_ok());
        match sys::fd::clear_cloexec(b.as_fd()) {
            Ok(()) if !memfd_kept => {
                tracing::error!("cannot pass the state memfd back");
            }
            Ok(()) => {
                tracing::error!("going back to the previous baton image");
                let e = sys::process::exec_in_place(std::path::Path::new(&path), &argv, &env);
                tracing::error!(error = %e, "executing the previous baton image failed too");
            }
            Err(e) => tracing::error!(error = %e, "cannot pass the previous image's fd"),
        }
    }
    tracing::error!(
        "baton cannot resume supervising: every inherited socket stays open and the app keeps running \
         on its own copies of the listeners, but baton no longer serves or upgrades. Restart the service \
         (a stop signal ends this process)."
    );
    loop {
        std::thread::park();
    }
}

/// Adopt a listening socket the state names.
///
/// # Errors
/// Not open, not a listening socket, adopted before.
pub fn listener(raw: RawFd) -> Result<(OwnedFd, SocketKind), String> {
    sys::inherit::adopt_self_exec_listener(raw)
        .map_err(|e| format!("carried listener fd {raw}: {e}"))?
        .ok_or_else(|| format!("carried listener fd {raw} is not open"))
}

/// Adopt any fd the state names.
///
/// # Errors
/// Not open, adopted before.
pub fn fd(raw: RawFd) -> Result<OwnedFd, String> {
    sys::inherit::adopt_self_exec_fd(raw)
        .map_err(|e| format!("carried fd {raw}: {e}"))?
        .ok_or_else(|| format!("carried fd {raw} is not open"))
}

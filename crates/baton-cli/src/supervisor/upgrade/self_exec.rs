//! `baton upgrade --self` as a job of the owner: the supervisor's state in
//! and out of [`SelfState`] (the exec itself is in `supervisor/self_exec`).

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::control::{Failure, FailureKind};
use baton_sys as sys;

use super::{LastGood, Sup, failed, view};
use crate::supervisor::child::{GenProc, KeptExe};
use crate::supervisor::ready::NotifySocket;
use crate::supervisor::self_exec::state::{
    CarriedConn, CarriedExe, CarriedFront, CarriedGen, CarriedGood, CarriedListener, CarriedNotify,
    Extensions, SelfState,
};
use crate::supervisor::self_exec::{self, recv, send};

fn argv_out(a: &[OsString]) -> Vec<Vec<u8>> {
    a.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn argv_in(a: Vec<Vec<u8>>) -> Vec<OsString> {
    a.into_iter().map(OsString::from_vec).collect()
}

fn exe_out<'a>(k: &'a Option<Arc<KeptExe>>, fds: &mut Vec<BorrowedFd<'a>>) -> Option<CarriedExe> {
    let k = k.as_ref()?;
    fds.push(k.fd());
    Some(CarriedExe {
        fd: sys::fd::raw(&k.fd()),
        path: k.path.as_os_str().as_bytes().to_vec(),
    })
}

fn exe_in(c: Option<CarriedExe>) -> Option<Arc<KeptExe>> {
    let c = c?;
    let path = std::path::PathBuf::from(OsString::from_vec(c.path));
    let fd = recv::fd(c.fd)
        .map_err(|e| tracing::warn!(error = %e, "kept executable not carried"))
        .ok()?;
    KeptExe::from_file(&path, std::fs::File::from(fd))
        .map_err(|e| tracing::warn!(error = %e, "kept executable not carried"))
        .ok()
        .map(Arc::new)
}

/// Re-execute baton in place. Returns only if it did not happen (the
/// failure, everything as it was before).
pub(super) async fn run(sup: &mut Sup, drain_timeout: Duration) -> Failure {
    let cfg = Arc::clone(&sup.cfg);
    let ctx = &cfg.self_exec;
    let Some(serving) = sup.serving.as_ref() else {
        return failed(
            FailureKind::Refused,
            "no generation serves (restarting?); try `baton upgrade --self` again when one does"
                .into(),
        );
    };
    if !baton::spawn::is_executable(&ctx.exe) {
        return failed(
            FailureKind::Refused,
            format!(
                "{} is not an executable file; baton keeps running as before",
                ctx.exe.display()
            ),
        );
    }
    // --front: requests in flight finish, idle connections park.
    let front = cfg.front.clone();
    let mut parked = Vec::new();
    let mut public = Vec::new();
    let mut not_carried = 0;
    if let Some(f) = &front {
        public = match f.public_fds() {
            Ok(p) => p,
            Err(e) => {
                return failed(
                    FailureKind::Refused,
                    format!("front: duplicating its listeners: {e}; baton keeps running as before"),
                );
            }
        };
        f.carry().freeze();
        let (busy, other) = f
            .carry()
            .wait_parked(tokio::time::Instant::now() + drain_timeout)
            .await;
        if busy > 0 {
            tracing::warn!(
                busy,
                "front: requests still in flight after --drain-timeout; their connections are closed by the exec"
            );
        }
        if other > 0 {
            tracing::info!(
                count = other,
                "front: HTTP/2 and upgraded connections are not carried; the exec closes them"
            );
        }
        match f.carry().take_parked() {
            Ok((p, closed)) => {
                parked = p;
                not_carried = closed;
            }
            Err(e) => {
                f.carry().thaw();
                return failed(
                    FailureKind::Failed,
                    format!(
                        "front: duplicating idle connections: {e}; baton keeps running as before"
                    ),
                );
            }
        }
    }
    let mut fds: Vec<BorrowedFd<'_>> = vec![ctx.control.as_fd()];
    if let Some(m) = &ctx.metrics {
        fds.push(m.as_fd());
    }
    let mut listeners = Vec::new();
    for l in &sup.listeners.items {
        let socks = l.sockets();
        fds.extend(socks.iter().map(AsFd::as_fd));
        listeners.push(CarriedListener {
            name: l.name.clone(),
            systemd: l.origin == crate::supervisor::sockets::Origin::Systemd,
            shared_reason: l.shared_reason.clone(),
            fds: socks.iter().map(sys::fd::raw).collect(),
        });
    }
    let serving_state = CarriedGen {
        generation: serving.generation,
        pid: serving.pid,
        argv: argv_out(&serving.argv),
        uptime_ms: serving.started.elapsed().as_millis() as u64,
        probe_port: serving.probe_port,
        exe: exe_out(&serving.exe, &mut fds),
    };
    // The app's NOTIFY_SOCKET: its later STATUS= (and other) lines still
    // reach baton.
    let serving_notify =
        serving
            .notify
            .as_ref()
            .and_then(|n| n.carried())
            .map(|(fd, env_value, path, status)| {
                fds.push(fd);
                CarriedNotify {
                    fd: sys::fd::raw(&fd),
                    env_value: env_value.as_bytes().to_vec(),
                    path: path.map(|p| p.as_os_str().as_bytes().to_vec()),
                    status,
                }
            });
    let last_good = sup.last_good.as_ref().map(|lg| CarriedGood {
        argv: argv_out(&lg.argv),
        generation: lg.generation,
        exe: exe_out(&lg.exe, &mut fds),
    });
    let front_state = front.as_ref().map(|f| {
        let (epoch, counters) = f.carried_numbers();
        fds.extend(public.iter().map(AsFd::as_fd));
        fds.extend(parked.iter().map(|p| p.fd.as_fd()));
        CarriedFront {
            epoch,
            public: public.iter().map(sys::fd::raw).collect(),
            conns: parked
                .iter()
                .map(|p| CarriedConn {
                    fd: sys::fd::raw(&p.fd),
                    listener: p.listener as u32,
                    peer: p.peer,
                    prefix: p.prefix.clone(),
                })
                .collect(),
            counters,
            closed: not_carried,
        }
    });
    let book = {
        let mut b = ctx.book.lock().unwrap_or_else(|p| p.into_inner());
        b.attempts += 1;
        b.clone()
    };
    let st = {
        let v = view(&sup.view);
        SelfState {
            baton_version: env!("CARGO_PKG_VERSION").into(),
            execs: book.execs,
            attempts: book.attempts,
            last: book.last.clone(),
            first_started_unix_ms: book.first_started_unix_ms,
            exe_path: ctx.exe.as_os_str().as_bytes().to_vec(),
            control: sys::fd::raw(&ctx.control),
            metrics: ctx.metrics.as_ref().map(sys::fd::raw),
            listeners,
            serving_slot: sup.serving_slot as u64,
            next_generation: sup.next_generation,
            serving: serving_state,
            last_good,
            counters: v.counters.clone(),
            last_upgrade: v.last_upgrade.clone(),
            recent: v.recent.clone(),
            announced_ready: sup.announced_ready,
            front: front_state,
            ext: Extensions {
                serving_notify,
                upstream: sup.listeners.carried_upstream(),
            },
        }
    };
    tracing::info!(
        carried_connections = parked.len(),
        not_carried,
        "baton upgrade --self: state ready"
    );
    let why = send::exec(ctx, &st, &fds);
    // Still here: the exec failed; nothing changed.
    drop(parked);
    if let Some(f) = &front {
        f.carry().thaw();
    }
    {
        let mut b = ctx.book.lock().unwrap_or_else(|p| p.into_inner());
        b.last = Some(format!("failed: {why}"));
    }
    tracing::error!(reason = %why, "baton upgrade --self failed");
    failed(FailureKind::Failed, why)
}

/// What the previous image carried, adopted: the parts of [`Sup`] and the
/// view that [`super::run`] fills in.
#[derive(Debug)]
pub struct Resumed {
    serving: GenProc,
    serving_slot: usize,
    next_generation: u64,
    last_good: Option<LastGood>,
    counters: baton::control::Counters,
    last_upgrade: Option<baton::control::LastUpgrade>,
    recent: Vec<String>,
    announced_ready: bool,
}

/// Adopt the serving generation and the rest of the owner's state.
///
/// # Errors
/// The serving generation cannot be adopted (its pid is not our child any
/// more).
pub fn resume(st: &mut SelfState) -> Result<Resumed, String> {
    let g = &mut st.serving;
    let serving_exe_fd = g.exe.as_ref().map(|e| e.fd);
    let started = Instant::now()
        .checked_sub(Duration::from_millis(g.uptime_ms))
        .unwrap_or_else(Instant::now);
    let serving = GenProc::adopt(
        g.generation,
        g.pid,
        argv_in(std::mem::take(&mut g.argv)),
        started,
        exe_in(g.exe.take()),
        g.probe_port,
    )
    .map_err(|e| format!("adopting generation {} (pid {}): {e}", g.generation, g.pid))?;
    let mut serving = serving;
    if let Some(n) = st.ext.serving_notify.take() {
        // Without it the app's later notifications are lost, nothing
        // else: not a reason to give up the state.
        let adopted = recv::fd(n.fd).and_then(|fd| {
            NotifySocket::adopt(
                fd,
                OsString::from_vec(n.env_value),
                n.path.map(|p| PathBuf::from(OsString::from_vec(p))),
                n.status,
                serving.generation,
                serving.pid,
            )
            .map_err(|e| format!("notify socket: {e}"))
        });
        match adopted {
            Ok(ns) => serving.notify = Some(ns),
            Err(e) => tracing::warn!(
                error = %e,
                "baton upgrade --self: the app's NOTIFY_SOCKET could not be adopted; its notifications are no longer read"
            ),
        }
    }
    let last_good = st.last_good.take().map(|lg| LastGood {
        argv: argv_in(lg.argv),
        // Usually the serving generation's very file (one fd, one Arc).
        exe: match lg.exe {
            Some(e) if Some(e.fd) == serving_exe_fd => serving.exe.clone(),
            other => exe_in(other),
        },
        generation: lg.generation,
    });
    Ok(Resumed {
        serving,
        serving_slot: st.serving_slot as usize,
        next_generation: st.next_generation,
        last_good,
        counters: std::mem::take(&mut st.counters),
        last_upgrade: st.last_upgrade.take(),
        recent: std::mem::take(&mut st.recent),
        announced_ready: st.announced_ready,
    })
}

impl Resumed {
    /// Fill the owner's state in.
    pub(super) fn apply(self, sup: &mut Sup) {
        {
            let mut v = view(&sup.view);
            v.counters = self.counters;
            v.last_upgrade = self.last_upgrade;
            v.recent = self.recent;
            v.phase = "serving";
            v.serving(&self.serving);
        }
        sup.serving = Some(self.serving);
        sup.serving_slot = self.serving_slot;
        sup.next_generation = self.next_generation;
        sup.last_good = self.last_good;
        sup.announced_ready = self.announced_ready;
    }
}

/// The front's part of a carried state, adopted.
///
/// # Errors
/// A public listener cannot be adopted.
pub fn resume_front(
    f: CarriedFront,
) -> Result<(Vec<std::os::fd::OwnedFd>, crate::front::Resumed), String> {
    let public = f
        .public
        .iter()
        .map(|&raw| recv::listener(raw).map(|(fd, _)| fd))
        .collect::<Result<Vec<_>, _>>()?;
    let mut conns = Vec::with_capacity(f.conns.len());
    for c in f.conns {
        match recv::fd(c.fd) {
            Ok(fd) => conns.push(crate::front::carry::Parked {
                fd,
                listener: c.listener as usize,
                peer: c.peer,
                prefix: c.prefix,
            }),
            Err(e) => tracing::warn!(error = %e, "front: a carried connection is lost"),
        }
    }
    tracing::info!(
        connections = conns.len(),
        closed_at_exec = f.closed,
        "front: idle client connections carried across baton upgrade --self"
    );
    Ok((
        public,
        crate::front::Resumed {
            epoch: f.epoch,
            counters: f.counters,
            conns,
        },
    ))
}

/// The listeners of the generations, adopted.
///
/// # Errors
/// A socket cannot be adopted.
pub fn resume_listeners(
    ls: Vec<CarriedListener>,
    upstream: Option<crate::supervisor::self_exec::state::CarriedUpstream>,
    serving_slot: u64,
) -> Result<crate::supervisor::sockets::ListenerSet, String> {
    use crate::supervisor::sockets::{Listener, ListenerSet, Origin};
    let mut items = Vec::new();
    for l in ls {
        let socks = l
            .fds
            .iter()
            .map(|&raw| recv::listener(raw))
            .collect::<Result<Vec<_>, _>>()?;
        let origin = if l.systemd {
            Origin::Systemd
        } else {
            Origin::Bound
        };
        items.push(Listener::carried(l.name, origin, socks, l.shared_reason)?);
    }
    let mut set = ListenerSet { items };
    if let Some(u) = upstream {
        set.resume_unix(u, serving_slot as usize)?;
    }
    Ok(set)
}

/// The book of the image that takes over.
pub fn book_after(st: &SelfState, returned: Option<&str>) -> self_exec::Book {
    let (execs, last) = match returned {
        None => (st.execs + 1, self_exec::LAST_OK.to_owned()),
        Some(why) => (
            st.execs,
            format!(
                "returned: the new baton could not read the state ({why}); this is the previous baton again"
            ),
        ),
    };
    self_exec::Book {
        execs,
        attempts: st.attempts,
        last: Some(last),
        first_started_unix_ms: st.first_started_unix_ms,
        image_started_unix_ms: self_exec::unix_ms(),
        exe_ino: self_exec::own_exe_ino(),
        carried: st.front.as_ref().map_or(0, |f| f.conns.len() as u64),
    }
}

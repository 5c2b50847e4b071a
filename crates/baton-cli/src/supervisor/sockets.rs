//! The supervisor's listening sockets, and steering between generations.
//!
//! # Steer before stop
//!
//! With one shared listening socket, the old app accepts until the moment
//! it handles its stop signal, and many servers then close connections they
//! accepted but had not read yet. So each steerable TCP listener is a pair
//! of sockets in one `SO_REUSEPORT` group, both bound by baton at start-up:
//! group index 0 and index 1. Generations alternate between them. A
//! one-instruction classic-BPF program attached to the group ("return index
//! N") decides which socket gets each new connection:
//!
//! 1. the new generation starts on the idle socket; the program still sends
//!    every connection to the serving one, so nothing queues for a process
//!    that may never become ready;
//! 2. once it is ready, the program is swapped to return the new index: the
//!    old socket gets nothing new, and the old app accepts what is left in
//!    its queue;
//! 3. when that queue has stayed empty for a quiet period, the old
//!    generation is told to stop; connections it still closes unread cannot
//!    exist, because it has none it has not started on.
//!
//! Why a fixed pair instead of a new socket per generation: the kernel
//! numbers a group's sockets in the order they started listening, and when
//! one is closed the last one takes its index. A program returning "index
//! N" is exact only while nothing is closed; with two sockets that are never
//! closed, indices never move. It also keeps every listener's address bound
//! at every instant, so a connection is never refused.
//!
//! A canary splits new connections between the two sockets: the program
//! draws a random number per connection (the `SKF_AD_RANDOM` ancillary
//! load) and sends a fixed share of them to the new generation.
//!
//! Readiness probes reach the new generation only: the probe connects from
//! a socket baton bound first, and while the new generation is not yet
//! promoted the program also says "a SYN from exactly this source address
//! and port goes to the new index".
//!
//! Steering cannot apply to Unix sockets, to sockets inherited from systemd
//! without `ReusePort=yes`, or with `--no-steer`: those listeners are one
//! shared socket, passed to every generation, and the log and `status` say
//! so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use baton::{ListenAddr, ListenSpec, ListenerInfo};
use baton_sys as sys;
use baton_sys::socket::CbpfInsn;

/// Classic BPF opcodes (`linux/filter.h`).
mod op {
    pub const LD_W_ABS: u16 = 0x20;
    pub const LD_H_ABS: u16 = 0x28;
    pub const LD_B_ABS: u16 = 0x30;
    pub const ALU_RSH_K: u16 = 0x74;
    pub const ALU_MOD_K: u16 = 0x94;
    pub const JMP_JEQ_K: u16 = 0x15;
    pub const JMP_JGE_K: u16 = 0x35;
    pub const RET_K: u16 = 0x06;
    /// `SKF_AD_OFF + SKF_AD_RANDOM`: a load from here is a random `u32`.
    pub const AD_RANDOM: u32 = (-0x1000_i32 + 56) as u32;
    /// `SKF_NET_OFF`: negative offsets from here address the network
    /// header (the program's data starts after the TCP header).
    pub const NET_OFF: u32 = (-0x10_0000_i32) as u32;
}

/// Where new connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// Every one to this group index.
    Slot(usize),
    /// `percent` % of them (drawn at random, per connection) to index
    /// `new`, the others to index `old` (a canary).
    Split {
        /// The canary's index.
        new: usize,
        /// The serving generation's index.
        old: usize,
        /// Share of new connections for `new`, 0 to 100.
        percent: u32,
    },
}

impl Steer {
    /// The instructions that return the index for a regular connection.
    fn block(self) -> Vec<CbpfInsn> {
        let ins = |code, jt, jf, k| CbpfInsn { code, jt, jf, k };
        match self {
            Steer::Slot(i) => vec![ins(op::RET_K, 0, 0, i as u32)],
            Steer::Split { new, old, percent } => vec![
                ins(op::LD_W_ABS, 0, 0, op::AD_RANDOM),
                ins(op::ALU_MOD_K, 0, 0, 100),
                // random % 100 >= percent: the old one; else the new one.
                ins(op::JMP_JGE_K, 1, 0, percent.min(100)),
                ins(op::RET_K, 0, 0, new as u32),
                ins(op::RET_K, 0, 0, old as u32),
            ],
        }
    }
}

/// The steering program: every connection goes where `regular` says,
/// except a SYN from exactly `probe.0` (a readiness or health probe's own
/// address), which goes to group index `probe.1`.
///
/// The probe's packets come from this host with no IP options, so the
/// TCP source port sits right after the fixed IPv4 (20 bytes) or IPv6
/// (40 bytes) header.
pub fn steer_program(regular: Steer, probe: Option<(SocketAddr, u32)>) -> Vec<CbpfInsn> {
    let ins = |code, k| CbpfInsn {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let block = regular.block();
    let Some((src, probe_index)) = probe else {
        return block;
    };
    // Each check is "load; jeq value, next, regular". Build the loads and
    // values, then fill in the jumps to the two `ret`s at the end.
    let mut checks: Vec<(u16, u32, u32)> = Vec::new(); // (load op, offset, value)
    let ip = match src.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    let (version, port_off) = match ip {
        IpAddr::V4(v4) => {
            checks.push((op::LD_W_ABS, 12, u32::from_be_bytes(v4.octets())));
            (4, 20)
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            for w in 0..4 {
                let word = u32::from_be_bytes([o[w * 4], o[w * 4 + 1], o[w * 4 + 2], o[w * 4 + 3]]);
                checks.push((op::LD_W_ABS, 8 + 4 * w as u32, word));
            }
            (6, 40)
        }
    };
    checks.push((op::LD_H_ABS, port_off, u32::from(src.port())));
    let mut prog = vec![
        ins(op::LD_B_ABS, op::NET_OFF),
        ins(op::ALU_RSH_K, 4),
        ins(op::JMP_JEQ_K, version),
    ];
    for (load, off, value) in &checks {
        prog.push(ins(*load, op::NET_OFF.wrapping_add(*off)));
        prog.push(ins(op::JMP_JEQ_K, *value));
    }
    let regular_at = prog.len();
    let probe_at = regular_at + block.len();
    let last_check = prog.len() - 1;
    for (i, insn) in prog.iter_mut().enumerate() {
        if insn.code == op::JMP_JEQ_K {
            // Offsets are relative to the next instruction; every program
            // here is far shorter than 255 instructions.
            let to = |target: usize| (target - i - 1) as u8;
            insn.jt = if i == last_check { to(probe_at) } else { 0 };
            insn.jf = to(regular_at);
        }
    }
    prog.extend(block);
    prog.push(ins(op::RET_K, probe_index));
    prog
}

/// Where a listener came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Bound by baton at start-up.
    Bound,
    /// systemd socket activation of baton itself (`LISTEN_FDS`).
    Systemd,
}

/// One named listener.
#[derive(Debug)]
pub struct Listener {
    /// Name (`LISTEN_FDNAMES` entry).
    pub name: String,
    /// Address (TCP: the bound one, with the real port).
    pub addr: ListenAddr,
    /// Where it came from.
    pub origin: Origin,
    /// One shared socket, or the two sockets of a steering group (index 0
    /// and 1, in that order).
    sockets: Vec<OwnedFd>,
    /// Why this listener is one shared socket, if it is.
    pub shared_reason: Option<String>,
    /// `--front-upstream unix`: the pair is two Unix sockets, steered by
    /// the front choosing which one it connects to.
    pub unix: Option<UnixPair>,
}

/// Where the front's new upstream connections of one listener go with
/// `--front-upstream unix` (shared by the listener and the front's pool;
/// cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct UnixRoute {
    path: std::sync::Arc<std::sync::Mutex<PathBuf>>,
}

impl UnixRoute {
    /// The path new upstream connections go to now.
    pub fn current(&self) -> PathBuf {
        self.path.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, to: PathBuf) {
        *self.path.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }
}

/// `--front-upstream unix`: a listener's two Unix sockets, one per
/// generation slot, each bound at a path of its own generation in the
/// private directory. A slot's path is unlinked once its generation is
/// gone; the next generation on that slot gets a new socket at a new path,
/// so a path is never served by two generations.
#[derive(Debug)]
pub struct UnixPair {
    /// The private directory (0700).
    pub dir: PathBuf,
    /// Each slot's path while it exists (`None`: unlinked).
    pub paths: [Option<PathBuf>; 2],
    /// Where the front connects.
    pub route: UnixRoute,
}

impl Listener {
    /// A listener carried across `baton upgrade --self`: its sockets were
    /// adopted from the previous image (checked to be listening sockets),
    /// its steering program is still attached in the kernel.
    ///
    /// # Errors
    /// No socket, more than two, or an address that cannot be read.
    pub fn carried(
        name: String,
        origin: Origin,
        sockets: Vec<(OwnedFd, sys::socket::SocketKind)>,
        shared_reason: Option<String>,
    ) -> Result<Listener, OpenError> {
        let Some((first, kind)) = sockets.first() else {
            return Err(format!("carried listener '{name}' has no socket"));
        };
        if sockets.len() > 2 {
            return Err(format!(
                "carried listener '{name}' has {} sockets",
                sockets.len()
            ));
        }
        let addr = describe(first, *kind)?;
        Ok(Listener {
            name,
            addr,
            origin,
            sockets: sockets.into_iter().map(|(fd, _)| fd).collect(),
            shared_reason,
            unix: None,
        })
    }

    /// Its sockets (one shared, or the two of a steering group), to carry
    /// across `baton upgrade --self`.
    pub fn sockets(&self) -> &[OwnedFd] {
        &self.sockets
    }

    /// Whether generations get their own socket of a steering group.
    pub fn steered(&self) -> bool {
        self.sockets.len() == 2
    }

    /// The socket a generation in `slot` gets.
    pub fn fd(&self, slot: usize) -> BorrowedFd<'_> {
        if self.steered() {
            self.sockets[slot & 1].as_fd()
        } else {
            self.sockets[0].as_fd()
        }
    }

    /// The TCP address, if this is a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.addr {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }

    /// An address a local client reaches this listener at (a wildcard
    /// address becomes the loopback of its family).
    pub fn local_target(&self) -> Option<SocketAddr> {
        let a = self.tcp_addr()?;
        let ip = match a.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Some(SocketAddr::new(ip, a.port()))
    }

    /// For status.
    pub fn info(&self) -> ListenerInfo {
        let origin = match self.origin {
            Origin::Bound => "bound by baton",
            Origin::Systemd => "inherited from systemd (LISTEN_FDS)",
        };
        let how = match &self.shared_reason {
            None if self.unix.is_some() => {
                "--front-upstream unix: one Unix socket per generation".to_owned()
            }
            None => "steered: one SO_REUSEPORT socket per generation".to_owned(),
            Some(r) => format!("shared socket, no steering ({r})"),
        };
        // A Unix upstream's path changes with every generation.
        let addr = match &self.unix {
            Some(u) => format!(
                "unix:{}",
                unix_path(&u.dir, &self.name, "GENERATION").display()
            ),
            None => self.addr.to_string(),
        };
        ListenerInfo {
            name: self.name.clone(),
            addr,
            origin: format!("{origin}; {how}"),
        }
    }
}

/// Every listener of the supervisor, for its whole life.
#[derive(Debug)]
pub struct ListenerSet {
    /// In `--listen` order (then unnamed inherited ones): fd 3, 4, ...
    pub items: Vec<Listener>,
}

/// What went wrong opening the listeners.
pub type OpenError = String;

impl ListenerSet {
    /// Adopt systemd's sockets meant for us, bind the rest, and set up
    /// steering groups where possible.
    pub fn open(specs: &[ListenSpec], no_steer: bool, backlog: i32) -> Result<Self, OpenError> {
        let mut inherited = adopt_systemd()?;
        let mut items = Vec::new();
        for spec in specs {
            if items.iter().any(|l: &Listener| l.name == spec.name) {
                return Err(format!(
                    "listener name '{}' is used twice; give each --listen its own NAME=",
                    spec.name
                ));
            }
            let pos = inherited
                .iter()
                .position(|(n, _, _)| *n == spec.name)
                .or_else(|| {
                    inherited.iter().position(|(n, fd, _)| {
                        (n == "unknown" || n.starts_with("LISTEN_FD_"))
                            && spec.addr.is_bound_by(fd.as_fd())
                    })
                });
            if let Some(i) = pos {
                let (_, fd, kind) = inherited.remove(i);
                let addr = describe(&fd, kind)?;
                if !spec.addr.is_bound_by(fd.as_fd()) {
                    if !spec.named && spec.name != baton::DEFAULT_LISTENER_NAME {
                        return Err(format!(
                            "listener '{}': systemd passed a socket of that name listening on {addr}, \
                             but the name was derived from --listen {}; name the listener explicitly \
                             (--listen NAME=ADDR) or fix the .socket unit",
                            spec.name, spec.addr
                        ));
                    }
                    tracing::warn!(listener = %spec.name, inherited = %addr, configured = %spec.addr,
                        "the socket systemd passed has another address than --listen; using systemd's");
                }
                items.push(Listener {
                    name: spec.name.clone(),
                    addr,
                    origin: Origin::Systemd,
                    sockets: vec![fd],
                    shared_reason: None,
                    unix: None,
                });
            } else {
                items.push(bind(spec, backlog, no_steer)?);
            }
        }
        // Sockets systemd passed that no --listen names: keep them too (the
        // app gets every socket, as it would from systemd).
        for (name, fd, kind) in inherited {
            let addr = describe(&fd, kind)?;
            tracing::info!(listener = %name, %addr, "using a socket systemd passed without a matching --listen");
            items.push(Listener {
                name,
                addr,
                origin: Origin::Systemd,
                sockets: vec![fd],
                shared_reason: None,
                unix: None,
            });
        }
        if items.is_empty() {
            return Err(
                "no listeners: give --listen NAME=ADDR, or start baton with systemd socket activation"
                    .into(),
            );
        }
        for l in &mut items {
            if l.origin == Origin::Systemd {
                setup_inherited_steering(l, no_steer);
            }
        }
        Ok(ListenerSet { items })
    }

    /// Log how each listener is shared between generations (for the
    /// listeners the generations get: not `--front`'s public ones, which
    /// baton serves itself, nor delegate mode's, which the server hands on).
    pub fn log_steering(&self) {
        for l in &self.items {
            match &l.shared_reason {
                None => {
                    tracing::info!(listener = %l.name, addr = %l.addr, "listener ready; new connections will be steered between generations")
                }
                Some(r) => tracing::warn!(listener = %l.name, addr = %l.addr, reason = %r,
                    "no steering for this listener: generations share one socket, and the old one is stopped as soon as the new one is ready"),
            }
        }
    }

    /// `baton run --front`: one private steering pair on a free
    /// `127.0.0.1` port per name (never systemd's sockets), the sockets the
    /// generations get while baton serves the public listeners itself.
    pub fn open_private(names: &[String], backlog: i32) -> Result<Self, OpenError> {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let items = names
            .iter()
            .map(|n| {
                bind(
                    &ListenSpec::new(n.clone(), ListenAddr::Tcp(loopback)),
                    backlog,
                    false,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ListenerSet { items })
    }

    /// `baton run --front --front-upstream unix`: per name, two Unix
    /// listening sockets in the private directory `dir` (created 0700 if
    /// missing): slot 0 at the path of `generation` (the first one), slot 1
    /// idle and unreachable (its path unlinked) until an upgrade renews it.
    pub fn open_private_unix(
        names: &[String],
        dir: &Path,
        generation: u64,
        backlog: i32,
    ) -> Result<Self, OpenError> {
        make_private_dir(dir)?;
        let mut items = Vec::new();
        for n in names {
            let path = unix_path(dir, n, &generation.to_string());
            let first = bind_upstream_unix(n, &path, backlog)?;
            let idle_path = unix_path(dir, n, "idle");
            let idle = bind_upstream_unix(n, &idle_path, backlog)?;
            let _ = std::fs::remove_file(&idle_path);
            let route = UnixRoute::default();
            route.set(path.clone());
            items.push(Listener {
                name: n.clone(),
                addr: ListenAddr::Unix(path.clone()),
                origin: Origin::Bound,
                sockets: vec![first, idle],
                shared_reason: None,
                unix: Some(UnixPair {
                    dir: dir.to_path_buf(),
                    paths: [Some(path), None],
                    route,
                }),
            });
        }
        Ok(ListenerSet { items })
    }

    /// `--front-upstream unix`: the next generation, `generation`, starts
    /// on `slot`, whose previous generation is gone: a new socket at a
    /// path of its own replaces the slot's (whose path is unlinked).
    ///
    /// # Errors
    /// The bind failed; nothing changed.
    pub fn renew_unix(
        &mut self,
        slot: usize,
        generation: u64,
        backlog: i32,
    ) -> Result<(), OpenError> {
        let mut fresh = Vec::new();
        for l in &self.items {
            if let Some(u) = &l.unix {
                let path = unix_path(&u.dir, &l.name, &generation.to_string());
                fresh.push(bind_upstream_unix(&l.name, &path, backlog).map(|fd| (fd, path)));
            }
        }
        let fresh = fresh.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut fresh = fresh.into_iter();
        for l in &mut self.items {
            let Some(u) = &mut l.unix else { continue };
            let Some((fd, path)) = fresh.next() else {
                break;
            };
            if let Some(old) = u.paths[slot & 1].take() {
                let _ = std::fs::remove_file(&old);
            }
            l.sockets[slot & 1] = fd;
            u.paths[slot & 1] = Some(path);
        }
        Ok(())
    }

    /// `--front-upstream unix`: the generation of `slot` is gone; its
    /// socket path is removed (the socket stays, unreachable, until the
    /// slot is renewed).
    pub fn unlink_unix(&mut self, slot: usize) {
        for l in &mut self.items {
            if let Some(u) = &mut l.unix
                && let Some(p) = u.paths[slot & 1].take()
            {
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        tracing::debug!(path = %p.display(), "front: a retired generation's upstream socket removed")
                    }
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "front: could not remove a retired generation's upstream socket")
                    }
                }
            }
        }
    }

    /// `--front-upstream unix`: baton stops; every path and the private
    /// directory (if empty) are removed.
    pub fn remove_unix(&mut self) {
        self.unlink_unix(0);
        self.unlink_unix(1);
        if let Some(u) = self.items.iter().find_map(|l| l.unix.as_ref()) {
            let _ = std::fs::remove_dir(&u.dir);
        }
    }

    /// `--front-upstream unix`: the route of each listener (in order).
    pub fn unix_routes(&self) -> Vec<Option<UnixRoute>> {
        self.items
            .iter()
            .map(|l| l.unix.as_ref().map(|u| u.route.clone()))
            .collect()
    }

    /// `--front-upstream unix`, for `baton upgrade --self`: the directory
    /// and each slot's live path (`None` for a TCP upstream).
    pub fn carried_upstream(&self) -> Option<crate::supervisor::self_exec::state::CarriedUpstream> {
        use std::os::unix::ffi::OsStrExt;
        let dir = self.items.iter().find_map(|l| l.unix.as_ref())?.dir.clone();
        let bytes = |p: &Option<PathBuf>| p.as_ref().map(|p| p.as_os_str().as_bytes().to_vec());
        Some(crate::supervisor::self_exec::state::CarriedUpstream {
            dir: dir.as_os_str().as_bytes().to_vec(),
            paths: self
                .items
                .iter()
                .map(|l| match &l.unix {
                    Some(u) => [bytes(&u.paths[0]), bytes(&u.paths[1])],
                    None => [None, None],
                })
                .collect(),
        })
    }

    /// `--front-upstream unix` after `baton upgrade --self`: the carried
    /// pairs get their paths back, and new upstream connections go to
    /// `serving_slot`'s.
    ///
    /// # Errors
    /// The record does not match the carried listeners.
    pub fn resume_unix(
        &mut self,
        u: crate::supervisor::self_exec::state::CarriedUpstream,
        serving_slot: usize,
    ) -> Result<(), OpenError> {
        use std::os::unix::ffi::OsStrExt;
        if u.paths.len() != self.items.len() {
            return Err(format!(
                "carried --front-upstream unix state names {} listeners, {} were carried",
                u.paths.len(),
                self.items.len()
            ));
        }
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&u.dir));
        let path = |b: &Option<Vec<u8>>| {
            b.as_ref()
                .map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(b)))
        };
        for (l, [p0, p1]) in self.items.iter_mut().zip(&u.paths) {
            if l.sockets.len() != 2 || !matches!(l.addr, ListenAddr::Unix(_)) {
                return Err(format!(
                    "carried listener '{}' is not a pair of Unix sockets",
                    l.name
                ));
            }
            let paths = [path(p0), path(p1)];
            let route = UnixRoute::default();
            if let Some(p) = &paths[serving_slot & 1] {
                route.set(p.clone());
            }
            l.unix = Some(UnixPair {
                dir: dir.clone(),
                paths,
                route,
            });
        }
        Ok(())
    }

    /// Whether any listener is steered.
    pub fn any_steered(&self) -> bool {
        self.items.iter().any(Listener::steered)
    }

    /// `LISTEN_FDNAMES`.
    pub fn fd_names(&self) -> String {
        self.items
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// `CLOEXEC` duplicates of the sockets a generation in `slot` gets, in fd
    /// order.
    pub fn dup_for(&self, slot: usize) -> std::io::Result<Vec<OwnedFd>> {
        self.items
            .iter()
            .map(|l| sys::fd::dup(l.fd(slot)))
            .collect()
    }

    /// Send every new connection of every steered listener to `slot`. On an
    /// error, the listeners already switched are switched back to `back`.
    pub fn steer(&self, slot: usize, back: usize) -> std::io::Result<()> {
        self.steer_to(Steer::Slot(slot), back)
    }

    /// Steer every new connection of every steered listener as `to` says.
    /// On an error, the listeners already switched are switched back to
    /// `back`.
    pub fn steer_to(&self, to: Steer, back: usize) -> std::io::Result<()> {
        for l in &self.items {
            if let Some(u) = &l.unix {
                let Steer::Slot(slot) = to else {
                    return Err(std::io::Error::other(format!(
                        "listener '{}': --front-upstream unix steers to one generation at a time (no canary)",
                        l.name
                    )));
                };
                let Some(p) = &u.paths[slot & 1] else {
                    return Err(std::io::Error::other(format!(
                        "listener '{}': the generation's upstream socket is gone",
                        l.name
                    )));
                };
                u.route.set(p.clone());
            }
        }
        let steered: Vec<&Listener> = self
            .items
            .iter()
            .filter(|l| l.steered() && l.unix.is_none())
            .collect();
        for (i, l) in steered.iter().enumerate() {
            if let Err(e) = sys::socket::attach_reuseport_cbpf(l.fd(0), &steer_program(to, None)) {
                for undo in &steered[..i] {
                    let _ = sys::socket::attach_reuseport_cbpf(
                        undo.fd(0),
                        &steer_program(Steer::Slot(back), None),
                    );
                }
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("steering listener '{}': {e}", l.name),
                ));
            }
        }
        Ok(())
    }

    /// Steer listener `index` as `regular` says, except connections from
    /// `probe` (a local socket address), which go to `probe_slot`.
    pub fn steer_probe(
        &self,
        index: usize,
        regular: Steer,
        probe: SocketAddr,
        probe_slot: usize,
    ) -> std::io::Result<()> {
        let l = &self.items[index];
        if !l.steered() {
            return Err(std::io::Error::other(format!(
                "listener '{}' is not steered",
                l.name
            )));
        }
        if l.unix.is_some() {
            // The probe connects to the new generation's own path.
            return Ok(());
        }
        sys::socket::attach_reuseport_cbpf(
            l.fd(0),
            &steer_program(regular, Some((probe, probe_slot as u32))),
        )
    }

    /// Whether any steered listener's socket in `slot` has connections
    /// waiting to be accepted.
    pub fn pending(&self, slot: usize) -> std::io::Result<bool> {
        for l in self.items.iter().filter(|l| l.steered()) {
            if sys::socket::accept_queue_nonempty(l.fd(slot))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Accept and close what waits in the steered sockets of `slot` (no
    /// process uses that slot now). Returns how many.
    pub fn close_pending(&self, slot: usize) -> usize {
        let mut n = 0;
        for l in self.items.iter().filter(|l| l.steered()) {
            match sys::socket::close_pending_connections(l.fd(slot), 100_000) {
                Ok(k) => n += k,
                Err(e) => {
                    tracing::warn!(listener = %l.name, error = %e, "could not empty an idle socket's queue")
                }
            }
        }
        n
    }

    /// Take the connections waiting in the steered sockets of `slot` —
    /// they queued for a generation that died before accepting them — and
    /// relay each one to its listener's own address, which the steering
    /// program now sends to the serving generation. No process ever read
    /// them, so the client sees an answer instead of a reset (the serving
    /// app sees baton as the peer). A relay ends when both sides are done,
    /// or after `limit`. Returns how many were relayed and how many could
    /// only be closed.
    pub fn relay_pending(&self, slot: usize, limit: std::time::Duration) -> (usize, usize) {
        let (mut relayed, mut closed) = (0, 0);
        for l in self.items.iter().filter(|l| l.steered()) {
            let conns = match sys::socket::accept_pending_connections(l.fd(slot), 100_000) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(listener = %l.name, error = %e, "could not take the connections queued for a dead generation");
                    closed +=
                        sys::socket::close_pending_connections(l.fd(slot), 100_000).unwrap_or(0);
                    continue;
                }
            };
            let Some(target) = l.local_target() else {
                closed += conns.len();
                continue;
            };
            for c in conns {
                relayed += 1;
                tokio::spawn(relay(c, target, limit));
            }
        }
        (relayed, closed)
    }

    /// Status lines.
    pub fn infos(&self) -> Vec<ListenerInfo> {
        self.items.iter().map(Listener::info).collect()
    }
}

/// Relay one connection to `target` until both directions are done, at
/// most `limit`.
async fn relay(client: OwnedFd, target: SocketAddr, limit: std::time::Duration) {
    let client = std::net::TcpStream::from(client);
    let mut client = match client
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(client))
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "relay: cannot use a queued connection");
            return;
        }
    };
    let work = async {
        let mut upstream = tokio::net::TcpStream::connect(target).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    };
    match tokio::time::timeout(limit, work).await {
        Ok(Ok((up, down))) => {
            tracing::debug!(%target, bytes_up = up, bytes_down = down, "relayed a queued connection")
        }
        Ok(Err(e)) => tracing::warn!(%target, error = %e, "relaying a queued connection failed"),
        Err(_) => tracing::warn!(%target, ?limit, "relayed connection cut after the limit"),
    }
}

fn kind_name(k: sys::socket::SocketKind) -> &'static str {
    match k {
        sys::socket::SocketKind::Tcp => "TCP",
        sys::socket::SocketKind::Unix => "Unix",
    }
}

fn describe(fd: &OwnedFd, kind: sys::socket::SocketKind) -> Result<ListenAddr, OpenError> {
    match kind {
        sys::socket::SocketKind::Tcp => sys::socket::tcp_local_addr(fd.as_fd())
            .map(ListenAddr::Tcp)
            .map_err(|e| format!("inherited {} socket: {e}", kind_name(kind))),
        sys::socket::SocketKind::Unix => Ok(ListenAddr::Unix(
            sys::socket::unix_local_path(fd.as_fd())
                .ok()
                .flatten()
                .unwrap_or_else(|| PathBuf::from("<unnamed>")),
        )),
    }
}

/// systemd's `LISTEN_FDS` meant for this process: (name, fd, kind).
fn adopt_systemd() -> Result<Vec<(String, OwnedFd, sys::socket::SocketKind)>, OpenError> {
    let Some(passed) = baton::ListenFds::from_env() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for p in passed.adopt() {
        let raw = p.raw;
        let name = p.name.unwrap_or_else(|| format!("LISTEN_FD_{raw}"));
        match p.socket {
            Ok(Some((fd, kind))) => out.push((name, fd, kind)),
            Ok(None) => {
                tracing::warn!(fd = raw, "LISTEN_FDS names fd {raw} but it is not open")
            }
            Err(e) => {
                return Err(format!(
                    "fd {raw} ('{name}') named by LISTEN_FDS is not a listening socket ({e}); \
                     was it passed close-on-exec?"
                ));
            }
        }
    }
    tracing::info!(
        count = out.len(),
        "adopted systemd socket-activation listeners"
    );
    Ok(out)
}

fn tcp_bind_error(name: &str, addr: SocketAddr, e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there; is another instance running?)"
        }
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
        _ => "",
    };
    format!("listener '{name}': cannot bind {addr}: {e}{hint}")
}

fn bind(spec: &ListenSpec, backlog: i32, no_steer: bool) -> Result<Listener, OpenError> {
    let name = &spec.name;
    match &spec.addr {
        ListenAddr::Unix(path) => {
            let fd =
                baton::bind_unix_listener(name, path, backlog, None).map_err(|e| e.to_string())?;
            // Sockets passed systemd-style are blocking; apps set what they
            // need.
            sys::fd::set_nonblocking(fd.as_fd(), false)
                .map_err(|e| format!("listener '{name}': {e}"))?;
            Ok(Listener {
                name: name.clone(),
                addr: spec.addr.clone(),
                origin: Origin::Bound,
                sockets: vec![fd],
                shared_reason: Some("a Unix socket: SO_REUSEPORT steering is TCP only".into()),
                unix: None,
            })
        }
        ListenAddr::Tcp(addr) => {
            let opts = |reuseport| sys::socket::TcpBindOptions {
                backlog,
                reuseport,
                nonblocking: false,
            };
            if no_steer {
                let fd = sys::socket::bind_tcp(*addr, opts(false))
                    .map_err(|e| tcp_bind_error(name, *addr, &e))?;
                let actual = sys::socket::tcp_local_addr(fd.as_fd()).map_err(|e| e.to_string())?;
                return Ok(Listener {
                    name: name.clone(),
                    addr: ListenAddr::Tcp(actual),
                    origin: Origin::Bound,
                    sockets: vec![fd],
                    shared_reason: Some("--no-steer".into()),
                    unix: None,
                });
            }
            // SO_REUSEPORT would let us join someone else's group silently:
            // first make sure nobody listens there.
            if addr.port() != 0 {
                std::net::TcpListener::bind(addr).map_err(|e| tcp_bind_error(name, *addr, &e))?;
            }
            let first = sys::socket::bind_tcp(*addr, opts(true))
                .map_err(|e| tcp_bind_error(name, *addr, &e))?;
            let actual = sys::socket::tcp_local_addr(first.as_fd()).map_err(|e| e.to_string())?;
            let mut l = Listener {
                name: name.clone(),
                addr: ListenAddr::Tcp(actual),
                origin: Origin::Bound,
                sockets: vec![first],
                shared_reason: None,
                unix: None,
            };
            add_second_socket(&mut l, actual, backlog);
            Ok(l)
        }
    }
}

/// Make `l` (one listening socket with `SO_REUSEPORT`, index 0 of its
/// group) a steering pair, or record why not.
fn add_second_socket(l: &mut Listener, addr: SocketAddr, backlog: i32) {
    // The program goes on first: the second socket must get nothing from
    // the moment it joins the group.
    if let Err(e) = sys::socket::attach_reuseport_cbpf(
        l.sockets[0].as_fd(),
        &steer_program(Steer::Slot(0), None),
    ) {
        l.shared_reason = Some(format!("cannot attach a reuseport BPF program: {e}"));
        return;
    }
    let second = match sys::socket::bind_tcp(
        addr,
        sys::socket::TcpBindOptions {
            backlog,
            reuseport: true,
            nonblocking: false,
        },
    ) {
        Ok(fd) => fd,
        Err(e) => {
            l.shared_reason = Some(format!(
                "cannot add a second socket to its SO_REUSEPORT group: {e}"
            ));
            return;
        }
    };
    match sys::procfs::count_tcp_listeners(addr) {
        Ok(2) => l.sockets.push(second),
        Ok(n) => {
            l.shared_reason = Some(format!(
                "{n} sockets listen on {addr}, not baton's 2: group indices would be unknown"
            ));
        }
        Err(e) => l.shared_reason = Some(format!("cannot read /proc/net/tcp: {e}")),
    }
}

fn setup_inherited_steering(l: &mut Listener, no_steer: bool) {
    let Some(addr) = l.tcp_addr() else {
        l.shared_reason = Some("a Unix socket: SO_REUSEPORT steering is TCP only".into());
        return;
    };
    if no_steer {
        l.shared_reason = Some("--no-steer".into());
        return;
    }
    match sys::socket::socket_reuseport(l.sockets[0].as_fd()) {
        Ok(true) => add_second_socket(l, addr, baton::DEFAULT_BACKLOG),
        Ok(false) => {
            l.shared_reason =
                Some("inherited from systemd without ReusePort=yes in the .socket unit".into())
        }
        Err(e) => l.shared_reason = Some(format!("cannot read SO_REUSEPORT: {e}")),
    }
}

/// `--front-upstream unix`: the private directory for the generations'
/// sockets, 0700 and ours (created if missing; a leftover one is reused,
/// its stale sockets replaced at bind).
fn make_private_dir(dir: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let what = |e: std::io::Error| {
        format!(
            "--front-upstream unix: cannot create the private directory {} for the generations' sockets: {e}; \
             make its parent writable by baton, or pick another --control path (the directory is next to it)",
            dir.display()
        )
    };
    // The control socket's directory may not exist yet (it is made next).
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(what)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(what(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(what)?;
    // Only its owner can change its mode: the chmod below fails otherwise.
    if !meta.is_dir() {
        return Err(format!(
            "--front-upstream unix: {} exists but is not a directory; remove it",
            dir.display()
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(what)?;
    Ok(())
}

fn unix_path(dir: &Path, name: &str, tag: &str) -> PathBuf {
    dir.join(format!("{name}.{tag}.sock"))
}

/// A generation's upstream Unix socket (`CLOEXEC`, blocking like every
/// socket passed systemd-style).
fn bind_upstream_unix(name: &str, path: &Path, backlog: i32) -> Result<OwnedFd, OpenError> {
    if path.as_os_str().len() >= 108 {
        return Err(format!(
            "--front-upstream unix: the socket path {} is too long for a Unix socket (at most 107 bytes); \
             use a shorter --control path or --name",
            path.display()
        ));
    }
    let fd =
        baton::bind_unix_listener(name, path, backlog, Some(0o600)).map_err(|e| e.to_string())?;
    sys::fd::set_nonblocking(fd.as_fd(), false).map_err(|e| format!("listener '{name}': {e}"))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn pair() -> ListenerSet {
        pair_at("http=127.0.0.1:0")
    }

    fn pair_at(spec: &str) -> ListenerSet {
        let spec: ListenSpec = spec.parse().unwrap();
        ListenerSet::open(&[spec], false, 64).unwrap()
    }

    #[test]
    fn plain_program_is_one_return() {
        assert_eq!(
            steer_program(Steer::Slot(1), None),
            vec![CbpfInsn {
                code: op::RET_K,
                jt: 0,
                jf: 0,
                k: 1
            }]
        );
    }

    #[test]
    fn probe_program_jumps_land_on_the_returns() {
        for src in ["127.0.0.1:40000", "[::1]:40000"] {
            let p = steer_program(Steer::Slot(0), Some((src.parse().unwrap(), 1)));
            let n = p.len();
            assert_eq!(p[n - 2].k, 0);
            assert_eq!(p[n - 1].k, 1);
            for (i, insn) in p.iter().enumerate() {
                if insn.code == op::JMP_JEQ_K {
                    assert_eq!(i + 1 + insn.jf as usize, n - 2, "false branch of {i}");
                    let t = i + 1 + insn.jt as usize;
                    assert!(t == i + 1 || t == n - 1, "true branch of {i}");
                }
            }
        }
    }

    #[test]
    fn a_bound_tcp_listener_is_a_steering_pair() {
        let set = pair();
        let l = &set.items[0];
        assert!(l.steered(), "{:?}", l.shared_reason);
        assert_eq!(
            sys::procfs::count_tcp_listeners(l.tcp_addr().unwrap()).unwrap(),
            2,
            "both sockets listen"
        );
        // Initially everything goes to index 0.
        let addr = l.local_target().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(set.pending(0).unwrap());
        assert!(!set.pending(1).unwrap());
        assert_eq!(set.close_pending(0), 1);
        drop(c);
        // Steered to 1.
        set.steer(1, 0).unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!set.pending(0).unwrap());
        assert!(set.pending(1).unwrap());
        assert_eq!(set.close_pending(1), 1);
        drop(c);
    }

    #[test]
    fn a_probe_from_a_known_port_reaches_the_other_socket() {
        probe_routing("http=127.0.0.1:0");
        // IPv6, and IPv4 on a dual-stack wildcard socket.
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            probe_routing("http=[::1]:0");
            probe_routing("http=[::]:0");
        }
    }

    fn probe_routing(spec: &str) {
        let set = pair_at(spec);
        let l = &set.items[0];
        assert!(l.steered(), "{spec}: {:?}", l.shared_reason);
        let target = l.local_target().unwrap();
        // A probe socket bound first, so its source port is known.
        let probe = std::net::TcpListener::bind(SocketAddr::new(target.ip(), 0)).unwrap();
        let src = probe.local_addr().unwrap();
        drop(probe);
        set.steer_probe(0, Steer::Slot(0), src, 1).unwrap();
        let regular = std::net::TcpStream::connect(target).unwrap();
        let from_src = connect_from(src, target);
        std::thread::sleep(std::time::Duration::from_millis(30));
        // Exactly one connection on each socket.
        assert_eq!(
            sys::socket::close_pending_connections(l.fd(0), 10).unwrap(),
            1
        );
        assert_eq!(
            sys::socket::close_pending_connections(l.fd(1), 10).unwrap(),
            1
        );
        drop((regular, from_src));
    }

    /// Connect from a given local address (std cannot bind before connect;
    /// the supervisor uses tokio's TcpSocket, and so does this test).
    fn connect_from(src: SocketAddr, to: SocketAddr) -> std::net::TcpStream {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = if src.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .unwrap();
            s.set_reuseaddr(true).unwrap();
            s.bind(src).unwrap();
            s.connect(to).await.unwrap().into_std().unwrap()
        })
    }

    #[test]
    fn a_split_program_shares_new_connections_and_keeps_the_probe_rule() {
        let split = Steer::Split {
            new: 1,
            old: 0,
            percent: 30,
        };
        let p = steer_program(split, Some(("127.0.0.1:40000".parse().unwrap(), 1)));
        // Every probe check's false branch lands on the split block.
        let block_at = p.len() - 6;
        assert_eq!(p[block_at].k, op::AD_RANDOM);
        for (i, insn) in p.iter().enumerate() {
            if insn.code == op::JMP_JEQ_K {
                assert_eq!(i + 1 + insn.jf as usize, block_at, "false branch of {i}");
            }
        }
        // A backlog for all 400 (connects past it would wait for retries).
        let spec: ListenSpec = "http=127.0.0.1:0".parse().unwrap();
        let set = ListenerSet::open(&[spec], false, 1024).unwrap();
        let l = &set.items[0];
        let addr = l.local_target().unwrap();
        set.steer_to(split, 0).unwrap();
        let conns: Vec<_> = (0..400)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let new = sys::socket::close_pending_connections(l.fd(1), 1000).unwrap();
        let old = sys::socket::close_pending_connections(l.fd(0), 1000).unwrap();
        drop(conns);
        assert_eq!(new + old, 400);
        // 30 % of 400 = 120; the chance of falling outside 60..=180 is nil.
        assert!((60..=180).contains(&new), "{new} of 400 to the canary");
        // 0 % and 100 % are exact.
        for (percent, want_new) in [(0, 0), (100, 50)] {
            set.steer_to(
                Steer::Split {
                    new: 1,
                    old: 0,
                    percent,
                },
                0,
            )
            .unwrap();
            let conns: Vec<_> = (0..50)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(30));
            assert_eq!(
                sys::socket::close_pending_connections(l.fd(1), 100).unwrap(),
                want_new
            );
            assert_eq!(
                sys::socket::close_pending_connections(l.fd(0), 100).unwrap(),
                50 - want_new
            );
            drop(conns);
        }
    }

    #[test]
    fn unix_and_no_steer_listeners_are_shared_and_say_why() {
        let dir = std::env::temp_dir().join(format!("baton-cli-ut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let specs: Vec<ListenSpec> = vec![
            format!("api=unix:{}", path.display()).parse().unwrap(),
            "http=127.0.0.1:0".parse().unwrap(),
        ];
        let set = ListenerSet::open(&specs, true, 16).unwrap();
        assert!(!set.any_steered());
        assert!(
            set.items[0]
                .shared_reason
                .as_deref()
                .unwrap()
                .contains("Unix")
        );
        assert_eq!(set.items[1].shared_reason.as_deref(), Some("--no-steer"));
        assert_eq!(set.fd_names(), "api:http");
        // The shared Unix socket works.
        let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        c.write_all(b"x").unwrap();
        let (mut s, _) =
            std::os::unix::net::UnixListener::from(sys::fd::dup(set.items[0].fd(1)).unwrap())
                .accept()
                .unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_taken_port_is_refused_even_with_reuseport() {
        let set = pair();
        let addr = set.items[0].tcp_addr().unwrap();
        let spec: ListenSpec = format!("http={addr}").parse().unwrap();
        let err = ListenerSet::open(&[spec], false, 16).unwrap_err();
        assert!(err.contains("another process listens there"), "{err}");
    }
}

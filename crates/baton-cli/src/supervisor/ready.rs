//! Readiness: how baton knows a new generation can take the traffic.
//!
//! A readiness check must be able to fail. A TCP connect to a socket baton
//! owns succeeds in the kernel with no app at all, and a probe sent to the
//! shared address may be answered by the *old* generation. So:
//!
//! * `notify`: the generation gets a `NOTIFY_SOCKET` of its own (never
//!   systemd's); only `READY=1` from a process of that generation counts,
//!   checked with `SCM_CREDENTIALS`. `STATUS=` lines show up in status.
//! * `tcp`: baton connects to the new generation's *own* socket of a
//!   steered listener (the probe's source address is steered there) and
//!   waits until the app has accepted that connection: the kernel shows an
//!   inode for it in `/proc/net/tcp` once a process holds it.
//! * `http://HOST:PORT/PATH`: the same routing when PORT is a steered
//!   listener's port; or `{port}` in place of PORT: each generation gets a
//!   free port of its own in `BATON_PROBE_PORT` and must serve the probe
//!   there. Any 2xx or 3xx answer is ready (the library's one probe,
//!   `baton::probe`, which the observation window uses too).
//! * `delay=DUR`: waits DUR and checks the process is alive; when a TCP
//!   listener is steered it then also checks, like `tcp`, that the app
//!   accepts (steering traffic to a socket nobody accepts would stall it).
//!
//! All of them are bounded by `--ready-timeout`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::sockets::{ListenerSet, Steer};

/// Pause between two HTTP probe attempts.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait for one HTTP probe's answer.
pub const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a probe connection to be established.
pub const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the `tcp` check looks whether its connection was accepted.
pub const ACCEPT_CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// Largest notification datagram read.
const MAX_NOTIFY_DATAGRAM: usize = 4096;

/// `--ready`, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadySpec {
    /// `notify`.
    Notify,
    /// `tcp` or `tcp=NAME`.
    Tcp(Option<String>),
    /// `http://HOST:PORT/PATH`.
    Http(HttpUrl),
    /// `delay=DUR`.
    Delay(Duration),
}

/// The port of a probe URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbePort {
    /// A fixed port: must be a steered listener's.
    Fixed(u16),
    /// `{port}`: a port of the generation's own (`BATON_PROBE_PORT`).
    PerGeneration,
}

/// An `http://` probe URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// The host as written (an IP literal or `localhost`).
    pub host: String,
    /// The host's address.
    pub ip: IpAddr,
    /// The port.
    pub port: ProbePort,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = match self.port {
            ProbePort::Fixed(p) => p.to_string(),
            ProbePort::PerGeneration => "{port}".into(),
        };
        write!(f, "http://{}:{port}{}", self.host, self.path)
    }
}

impl FromStr for HttpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "'{s}': {why}; use http://HOST:PORT/PATH with HOST an IP address or localhost, and PORT a number or {{port}}"
            )
        };
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// probes are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("the path may not contain spaces or control characters"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once("]:").ok_or_else(|| bad("missing port"))?;
            (h, p)
        } else {
            authority
                .rsplit_once(':')
                .ok_or_else(|| bad("missing port"))?
        };
        let ip = if host == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse::<IpAddr>()
                .map_err(|_| bad("the host must be an IP address or localhost"))?
        };
        let port = if port == "{port}" {
            ProbePort::PerGeneration
        } else {
            match port.parse::<u16>() {
                Ok(p) if p != 0 => ProbePort::Fixed(p),
                _ => return Err(bad("bad port")),
            }
        };
        Ok(HttpUrl {
            host: host.to_owned(),
            ip,
            port,
            path: path.to_owned(),
        })
    }
}

impl FromStr for ReadySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "notify" {
            return Ok(ReadySpec::Notify);
        }
        if s == "tcp" {
            return Ok(ReadySpec::Tcp(None));
        }
        if let Some(name) = s.strip_prefix("tcp=") {
            baton::validate_listener_name(name).map_err(|e| e.to_string())?;
            return Ok(ReadySpec::Tcp(Some(name.to_owned())));
        }
        if let Some(d) = s.strip_prefix("delay=") {
            return baton::parse_duration(d)
                .map(ReadySpec::Delay)
                .map_err(|e| e.to_string());
        }
        if s.starts_with("http") {
            return s.parse().map(ReadySpec::Http);
        }
        Err(format!(
            "'{s}' is not a readiness check: use notify, tcp, tcp=LISTENER, http://HOST:PORT/PATH (PORT may be {{port}}), or delay=DUR"
        ))
    }
}

/// A probe connection routed to one listener's socket of the new
/// generation.
#[derive(Debug, Clone, Copy)]
pub struct ListenerProbe {
    /// Index of the listener in the set.
    pub listener: usize,
    /// Where to connect.
    pub target: ProbeTarget,
}

/// Where a probe connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeTarget {
    /// The listener's TCP address, steered to the new generation for the
    /// probe's source address.
    Tcp(SocketAddr),
    /// `--front-upstream unix`: the new generation's own socket path.
    Unix,
}

/// A connected probe.
enum ProbeStream {
    Tcp(tokio::net::TcpStream),
    /// With the listening socket it reached (the probe was accepted once
    /// that socket's queue is empty: nothing else connects to a new
    /// generation's socket before it is ready).
    Unix(tokio::net::UnixStream, usize),
}

/// Readiness, resolved against the listeners at start-up.
#[derive(Debug, Clone)]
pub enum ReadyPlan {
    /// `READY=1` on the generation's own notify socket.
    Notify,
    /// The app accepts a connection on its own socket.
    Tcp(ListenerProbe),
    /// An HTTP answer from the generation's own socket.
    Http {
        /// Through a steered listener, or `None` for the per-generation
        /// probe port.
        via: Option<ListenerProbe>,
        /// The URL.
        url: HttpUrl,
    },
    /// Alive after a delay (then an accept check when possible).
    Delay {
        /// The delay.
        delay: Duration,
        /// The accept check.
        accept: Option<ListenerProbe>,
    },
}

impl ReadyPlan {
    /// Whether generations get a `NOTIFY_SOCKET`.
    pub fn wants_notify(&self) -> bool {
        matches!(self, ReadyPlan::Notify)
    }

    /// Whether generations get a `BATON_PROBE_PORT`.
    pub fn wants_probe_port(&self) -> bool {
        matches!(self, ReadyPlan::Http { via: None, .. })
    }

    /// For logs and status.
    pub fn describe(&self, listeners: &ListenerSet) -> String {
        let name = |p: &ListenerProbe| listeners.items[p.listener].name.clone();
        match self {
            ReadyPlan::Notify => "READY=1 on the generation's own NOTIFY_SOCKET".into(),
            ReadyPlan::Tcp(p) => format!(
                "the app accepts a connection on its own socket of listener '{}'",
                name(p)
            ),
            ReadyPlan::Http { via: Some(p), url } => format!(
                "GET {url} answered 2xx/3xx through the generation's own socket of listener '{}'",
                name(p)
            ),
            ReadyPlan::Http { via: None, url } => {
                format!("GET {url} answered 2xx/3xx on the generation's BATON_PROBE_PORT")
            }
            ReadyPlan::Delay { delay, accept } => match accept {
                Some(p) => format!(
                    "alive after {delay:?}, then accepts a connection on its own socket of listener '{}'",
                    name(p)
                ),
                None => format!(
                    "alive after {delay:?} (no steered TCP listener: a hung app cannot be detected)"
                ),
            },
        }
    }
}

fn probe_for(listeners: &ListenerSet, index: usize) -> Option<ListenerProbe> {
    let l = &listeners.items[index];
    if !l.steered() {
        return None;
    }
    let target = match l.unix {
        Some(_) => ProbeTarget::Unix,
        None => ProbeTarget::Tcp(l.local_target()?),
    };
    Some(ListenerProbe {
        listener: index,
        target,
    })
}

fn first_steered(listeners: &ListenerSet) -> Option<ListenerProbe> {
    (0..listeners.items.len()).find_map(|i| probe_for(listeners, i))
}

fn why_not_steered(listeners: &ListenerSet) -> String {
    listeners
        .items
        .iter()
        .map(|l| {
            format!(
                "'{}' {}",
                l.name,
                l.shared_reason.as_deref().unwrap_or("is steered")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Check `--ready` against the listeners.
///
/// # Errors
/// A message saying why this check could not tell a new generation from
/// the old one (or from no app at all), and what to use instead.
pub fn plan(spec: &ReadySpec, listeners: &ListenerSet) -> Result<ReadyPlan, String> {
    match spec {
        ReadySpec::Notify => Ok(ReadyPlan::Notify),
        ReadySpec::Delay(d) => Ok(ReadyPlan::Delay {
            delay: *d,
            accept: first_steered(listeners),
        }),
        ReadySpec::Tcp(name) => {
            let probe = match name {
                Some(n) => {
                    let i = listeners
                        .items
                        .iter()
                        .position(|l| &l.name == n)
                        .ok_or_else(|| format!("--ready tcp={n}: no listener named '{n}'"))?;
                    probe_for(listeners, i).ok_or_else(|| {
                        format!(
                            "--ready tcp={n}: listener '{n}' is a shared socket ({}); a connect to it proves nothing about the new generation. Use --ready notify or --ready http://127.0.0.1:{{port}}/PATH",
                            listeners.items[i].shared_reason.as_deref().unwrap_or("")
                        )
                    })?
                }
                None => first_steered(listeners).ok_or_else(|| {
                    format!(
                        "--ready tcp needs a TCP listener that baton steers (no listener is: {}); a connect to a shared socket proves nothing about the new generation. Use --ready notify or --ready http://127.0.0.1:{{port}}/PATH",
                        why_not_steered(listeners)
                    )
                })?,
            };
            Ok(ReadyPlan::Tcp(probe))
        }
        ReadySpec::Http(url) => http_plan("--ready", url, listeners),
    }
}

/// Check `--health` against the listeners: like an `http` readiness check,
/// it must reach the new generation only.
///
/// # Errors
/// Why the check could be answered by another generation, and what to use
/// instead.
pub fn health_plan(url: &HttpUrl, listeners: &ListenerSet) -> Result<ReadyPlan, String> {
    http_plan("--health", url, listeners)
}

fn http_plan(flag: &str, url: &HttpUrl, listeners: &ListenerSet) -> Result<ReadyPlan, String> {
    match url.port {
        ProbePort::PerGeneration => Ok(ReadyPlan::Http {
            via: None,
            url: url.clone(),
        }),
        ProbePort::Fixed(port) => {
            let found = listeners.items.iter().enumerate().find(|(_, l)| {
                l.tcp_addr().is_some_and(|a| {
                    a.port() == port
                        && (a.ip() == url.ip
                            || (a.ip().is_unspecified()
                                && (url.ip.is_loopback() || url.ip.is_unspecified())))
                })
            });
            let Some((i, l)) = found else {
                return Err(format!(
                    "{flag} {url}: no listener has that address. The probe must go to a listener baton steers (so it reaches the new generation only), or use {{port}}: http://127.0.0.1:{{port}}{} with the app serving it on $BATON_PROBE_PORT",
                    url.path
                ));
            };
            if !l.steered() {
                return Err(format!(
                    "{flag} {url}: listener '{}' is a shared socket ({}), so the old generation could answer the probe. Use http://127.0.0.1:{{port}}{} with the app serving it on $BATON_PROBE_PORT",
                    l.name,
                    l.shared_reason.as_deref().unwrap_or(""),
                    url.path
                ));
            }
            let target = SocketAddr::new(
                if url.ip.is_unspecified() {
                    match l.tcp_addr().map(|a| a.ip()) {
                        Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    }
                } else {
                    url.ip
                },
                port,
            );
            Ok(ReadyPlan::Http {
                via: Some(ListenerProbe {
                    listener: i,
                    target: ProbeTarget::Tcp(target),
                }),
                url: url.clone(),
            })
        }
    }
}

/// `--front-upstream unix`: an HTTP check whose port is public listener
/// `index`'s goes to the new generation's own Unix socket of that
/// listener.
pub fn unix_http_plan(url: &HttpUrl, index: usize) -> ReadyPlan {
    ReadyPlan::Http {
        via: Some(ListenerProbe {
            listener: index,
            target: ProbeTarget::Unix,
        }),
        url: url.clone(),
    }
}

/// A fresh free TCP port on the loopback (for `{port}`).
pub fn free_probe_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// Where the probe of one generation goes, and with which steering.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Where new connections go meanwhile (the serving generation's slot,
    /// or a canary's split).
    pub regular: Steer,
    /// The new generation's slot.
    pub new: usize,
}

/// Connect to `probe.target` from a socket whose address is steered to
/// `route.new` on the probe's listener.
async fn routed_connect(
    listeners: &ListenerSet,
    probe: &ListenerProbe,
    route: Route,
) -> Result<ProbeStream, String> {
    let target = match probe.target {
        ProbeTarget::Tcp(t) => t,
        ProbeTarget::Unix => {
            let l = &listeners.items[probe.listener];
            let path = l
                .unix
                .as_ref()
                .and_then(|u| u.paths[route.new & 1].clone())
                .ok_or_else(|| {
                    format!(
                        "listener '{}': no socket path for the new generation",
                        l.name
                    )
                })?;
            return match tokio::time::timeout(
                PROBE_CONNECT_TIMEOUT,
                tokio::net::UnixStream::connect(&path),
            )
            .await
            {
                Ok(Ok(s)) => Ok(ProbeStream::Unix(s, route.new)),
                Ok(Err(e)) => Err(format!("probe connect to {}: {e}", path.display())),
                Err(_) => Err(format!(
                    "probe connect to {} took longer than {PROBE_CONNECT_TIMEOUT:?}",
                    path.display()
                )),
            };
        }
    };
    let sock = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| format!("probe socket: {e}"))?;
    sock.bind(SocketAddr::new(target.ip(), 0))
        .map_err(|e| format!("binding the probe socket: {e}"))?;
    let src = sock
        .local_addr()
        .map_err(|e| format!("probe socket address: {e}"))?;
    listeners
        .steer_probe(probe.listener, route.regular, src, route.new)
        .map_err(|e| format!("routing the probe: {e}"))?;
    match tokio::time::timeout(PROBE_CONNECT_TIMEOUT, sock.connect(target)).await {
        Ok(Ok(s)) => Ok(ProbeStream::Tcp(s)),
        Ok(Err(e)) => Err(format!("probe connect to {target}: {e}")),
        Err(_) => Err(format!(
            "probe connect to {target} took longer than {PROBE_CONNECT_TIMEOUT:?}"
        )),
    }
}

/// Wait until the app accepted a probe connection on its own socket.
/// Returns only when it did (the caller bounds the wait).
async fn accept_check(
    listeners: &ListenerSet,
    probe: &ListenerProbe,
    route: Route,
    last_error: &Mutex<String>,
) {
    loop {
        let stream = match routed_connect(listeners, probe, route).await {
            Ok(ProbeStream::Tcp(s)) => s,
            Ok(ProbeStream::Unix(s, slot)) => {
                set(
                    last_error,
                    "the probe connection to the new generation's Unix socket was never accepted by the app".into(),
                );
                loop {
                    let mut b = [0u8; 1];
                    match s.try_read(&mut b) {
                        Ok(_) => return,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                    let l = &listeners.items[probe.listener];
                    match baton_sys::socket::accept_queue_nonempty(l.fd(slot)) {
                        Ok(false) => return,
                        Ok(true) => {}
                        Err(e) => set(last_error, format!("polling the upstream socket: {e}")),
                    }
                    tokio::time::sleep(ACCEPT_CHECK_INTERVAL).await;
                }
            }
            Err(e) => {
                set(last_error, e);
                tokio::time::sleep(PROBE_INTERVAL).await;
                continue;
            }
        };
        let (local, peer) = match (stream.local_addr(), stream.peer_addr()) {
            (Ok(l), Ok(p)) => (l, p),
            _ => {
                tokio::time::sleep(PROBE_INTERVAL).await;
                continue;
            }
        };
        set(
            last_error,
            format!("the probe connection {local} -> {peer} was never accepted by the app"),
        );
        loop {
            // The app closed it, reset it, or wrote to it: it accepted it.
            let mut b = [0u8; 1];
            match stream.try_read(&mut b) {
                Ok(_) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            // The server side of the connection has an inode once a process
            // holds it; a closed one is no longer ESTABLISHED.
            match baton_sys::procfs::proc_tcp_entry(peer, local) {
                Ok(Some(e)) if e.inode != 0 || e.state != baton_sys::procfs::TCP_ESTABLISHED => {
                    return;
                }
                Ok(_) => {}
                Err(e) => set(last_error, format!("reading /proc/net/tcp: {e}")),
            }
            tokio::time::sleep(ACCEPT_CHECK_INTERVAL).await;
        }
    }
}

fn set(m: &Mutex<String>, s: String) {
    *m.lock().unwrap_or_else(|p| p.into_inner()) = s;
}

/// One HTTP probe ([`baton::probe`]: a status from 200 to 399 passes):
/// `true` ready, `false` not yet (with the reason in `last_error`).
async fn http_once(stream: &mut ProbeStream, url: &HttpUrl, last_error: &Mutex<String>) -> bool {
    match stream {
        ProbeStream::Tcp(s) => http_once_on(s, url, last_error).await,
        ProbeStream::Unix(s, _) => http_once_on(s, url, last_error).await,
    }
}

async fn http_once_on<S>(stream: &mut S, url: &HttpUrl, last_error: &Mutex<String>) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let probe = baton::probe::http_get(stream, &host, &url.path, "baton-readiness-probe");
    match tokio::time::timeout(PROBE_ATTEMPT_TIMEOUT, probe).await {
        Err(_) => {
            set(
                last_error,
                format!(
                    "GET {url}: no answer within {PROBE_ATTEMPT_TIMEOUT:?} (is the app accepting?)"
                ),
            );
            false
        }
        Ok(Err(e)) => {
            set(last_error, format!("GET {url}: {e}"));
            false
        }
        Ok(Ok(())) => true,
    }
}

/// One health check of the generation in `route.new` (`plan` is an `Http`
/// plan from [`health_plan`]), bounded by `limit` (`--health-timeout`).
///
/// # Errors
/// Why it failed, in words.
pub async fn health_once(
    listeners: &ListenerSet,
    plan: &ReadyPlan,
    route: Route,
    probe_port: Option<u16>,
    limit: Duration,
) -> Result<(), String> {
    let ReadyPlan::Http { via, url } = plan else {
        return Ok(());
    };
    let check = async {
        let mut stream = match via {
            Some(p) => routed_connect(listeners, p, route).await?,
            None => {
                let to = SocketAddr::new(url.ip, probe_port.unwrap_or(0));
                tokio::net::TcpStream::connect(to)
                    .await
                    .map(ProbeStream::Tcp)
                    .map_err(|e| format!("connect to {to} (BATON_PROBE_PORT): {e}"))?
            }
        };
        let last_error = Mutex::new(String::new());
        if http_once(&mut stream, url, &last_error).await {
            Ok(())
        } else {
            Err(last_error.lock().unwrap_or_else(|p| p.into_inner()).clone())
        }
    };
    tokio::time::timeout(limit, check)
        .await
        .map_err(|_| format!("GET {url}: no answer within {limit:?}"))?
}

/// What a generation's readiness wait needs.
#[derive(Debug)]
pub struct ReadyCtx<'a> {
    /// The plan.
    pub plan: &'a ReadyPlan,
    /// The listeners.
    pub listeners: &'a ListenerSet,
    /// Steering while probing.
    pub route: Route,
    /// The generation's `BATON_PROBE_PORT`.
    pub probe_port: Option<u16>,
    /// The generation's notify socket.
    pub notify: Option<&'a NotifySocket>,
}

/// Wait until the generation is ready. Never returns an error: the caller
/// bounds it with `--ready-timeout` and reads `last_error` for the reason.
///
/// # Cancel safety
/// Cancel safe; steering is restored by the caller.
pub async fn wait_ready(ctx: &ReadyCtx<'_>, last_error: &Mutex<String>) {
    match ctx.plan {
        ReadyPlan::Notify => {
            let Some(n) = ctx.notify else {
                set(last_error, "no notify socket".into());
                return std::future::pending().await;
            };
            set(last_error, "no READY=1 from the new generation".into());
            let mut rx = n.ready.clone();
            let _ = rx.wait_for(|r| *r).await;
        }
        ReadyPlan::Tcp(p) => accept_check(ctx.listeners, p, ctx.route, last_error).await,
        ReadyPlan::Delay { delay, accept } => {
            set(last_error, format!("waiting {delay:?} (delay=)"));
            tokio::time::sleep(*delay).await;
            if let Some(p) = accept {
                accept_check(ctx.listeners, p, ctx.route, last_error).await;
            }
        }
        ReadyPlan::Http { via, url } => loop {
            let stream = match via {
                Some(p) => routed_connect(ctx.listeners, p, ctx.route).await,
                None => {
                    let port = ctx.probe_port.unwrap_or(0);
                    let to = SocketAddr::new(url.ip, port);
                    match tokio::time::timeout(
                        PROBE_CONNECT_TIMEOUT,
                        tokio::net::TcpStream::connect(to),
                    )
                    .await
                    {
                        Ok(Ok(s)) => Ok(ProbeStream::Tcp(s)),
                        Ok(Err(e)) => Err(format!(
                            "probe connect to {to} (BATON_PROBE_PORT={port}): {e}"
                        )),
                        Err(_) => Err(format!("probe connect to {to} timed out")),
                    }
                }
            };
            match stream {
                Ok(mut s) => {
                    if http_once(&mut s, url, last_error).await {
                        return;
                    }
                }
                Err(e) => set(last_error, e),
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        },
    }
}

/// Bind a notification socket `NAME.notify.TAG` in the private directory
/// `dir` (an abstract address if the path would be too long), with
/// `SO_PASSCRED`, non-blocking, `CLOEXEC`. Returns it, the value for
/// `NOTIFY_SOCKET`, and the path to remove when done.
///
/// # Errors
/// The OS error.
pub fn bind_notify(
    dir: &Path,
    name: &str,
    tag: &str,
) -> std::io::Result<(
    std::os::unix::net::UnixDatagram,
    std::ffi::OsString,
    Option<PathBuf>,
)> {
    let path = dir.join(format!("{name}.notify.{tag}"));
    let (sock, env_value, path) = if path.as_os_str().len() < 100 {
        let _ = std::fs::remove_file(&path);
        let s = std::os::unix::net::UnixDatagram::bind(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        (s, path.clone().into_os_string(), Some(path))
    } else {
        use std::os::linux::net::SocketAddrExt;
        let abs = format!("baton/{}/{name}/{tag}", baton_sys::process::getpid());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())?;
        let s = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        (s, format!("@{abs}").into(), None)
    };
    baton_sys::socket::set_passcred(sock.as_fd())?;
    sock.set_nonblocking(true)?;
    Ok((sock, env_value, path))
}

/// A generation's own `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct NotifySocket {
    /// The value for `NOTIFY_SOCKET`.
    pub env_value: std::ffi::OsString,
    path: Option<PathBuf>,
    sock: Option<std::os::unix::net::UnixDatagram>,
    /// Becomes true at `READY=1`.
    pub ready: watch::Receiver<bool>,
    ready_tx: Option<watch::Sender<bool>>,
    /// The last `STATUS=` line.
    pub status: Arc<Mutex<Option<String>>>,
    /// The socket, once [`NotifySocket::start`] reads it (also held by its
    /// task): what `baton upgrade --self` carries.
    live: Option<Arc<tokio::net::UnixDatagram>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl NotifySocket {
    /// Bind the socket for generation `generation` of service `name` in
    /// the private directory `dir` (an abstract address if the path would
    /// be too long).
    pub fn bind(dir: &Path, name: &str, generation: u64) -> std::io::Result<NotifySocket> {
        let (sock, env_value, path) = bind_notify(dir, name, &generation.to_string())?;
        Ok(NotifySocket::unstarted(sock, env_value, path, false, None))
    }

    /// A socket not read yet ([`NotifySocket::start`] reads it), `ready`
    /// already or not, with the last `STATUS=` line `status`.
    fn unstarted(
        sock: std::os::unix::net::UnixDatagram,
        env_value: std::ffi::OsString,
        path: Option<PathBuf>,
        ready: bool,
        status: Option<String>,
    ) -> NotifySocket {
        let (tx, rx) = watch::channel(ready);
        NotifySocket {
            env_value,
            path,
            sock: Some(sock),
            ready: rx,
            ready_tx: Some(tx),
            status: Arc::new(Mutex::new(status)),
            live: None,
            task: None,
        }
    }

    /// What `baton upgrade --self` carries of a started socket: the
    /// socket, the value of `NOTIFY_SOCKET`, its path (if not abstract)
    /// and the last `STATUS=` line.
    pub fn carried(
        &self,
    ) -> Option<(
        BorrowedFd<'_>,
        &std::ffi::OsStr,
        Option<&Path>,
        Option<String>,
    )> {
        let sock = self.live.as_ref()?;
        let status = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some((sock.as_fd(), &self.env_value, self.path.as_deref(), status))
    }

    /// The socket a previous image of baton carried (`baton upgrade
    /// --self`) for generation `generation` (main process `pid`), which
    /// was ready: read again from now on.
    ///
    /// # Errors
    /// The socket cannot be registered with the runtime.
    pub fn adopt(
        fd: std::os::fd::OwnedFd,
        env_value: std::ffi::OsString,
        path: Option<PathBuf>,
        status: Option<String>,
        generation: u64,
        pid: u32,
    ) -> std::io::Result<NotifySocket> {
        let sock = std::os::unix::net::UnixDatagram::from(fd);
        sock.set_nonblocking(true)?;
        let mut ns = NotifySocket::unstarted(sock, env_value, path, true, status);
        ns.start(generation, pid)?;
        Ok(ns)
    }

    /// Start reading notifications from the generation whose main process
    /// is `pid`.
    pub fn start(&mut self, generation: u64, pid: u32) -> std::io::Result<()> {
        let (Some(sock), Some(tx)) = (self.sock.take(), self.ready_tx.take()) else {
            return Ok(());
        };
        let sock = Arc::new(tokio::net::UnixDatagram::from_std(sock)?);
        self.live = Some(Arc::clone(&sock));
        let status = Arc::clone(&self.status);
        self.task = Some(tokio::spawn(async move {
            let ours = baton_sys::process::euid();
            let mut buf = vec![0u8; MAX_NOTIFY_DATAGRAM];
            while let Some((c, len, truncated)) =
                recv_notification(&sock, &mut buf, Some(generation)).await
            {
                if (c.uid != ours && c.uid != 0) || !in_tree(c.pid, pid) {
                    tracing::warn!(
                        generation,
                        sender_pid = c.pid,
                        sender_uid = c.uid,
                        "notification from a process outside generation {generation} ignored"
                    );
                    continue;
                }
                if truncated {
                    tracing::warn!(
                        generation,
                        sender_pid = c.pid,
                        "notification larger than {MAX_NOTIFY_DATAGRAM} bytes ignored"
                    );
                    continue;
                }
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                for line in text.lines() {
                    let Some((k, v)) = line.split_once('=') else {
                        continue;
                    };
                    match k {
                        "READY" if v == "1" => {
                            tracing::info!(generation, pid = c.pid, "READY=1 received");
                            tx.send_replace(true);
                        }
                        "STATUS" => {
                            tracing::info!(generation, pid = c.pid, status = v, "app status");
                            *status.lock().unwrap_or_else(|p| p.into_inner()) = Some(v.to_owned());
                        }
                        "STOPPING" | "RELOADING" | "ERRNO" | "BUSERROR" | "EXIT_STATUS" => {
                            tracing::info!(generation, pid = c.pid, "{k}={v}");
                        }
                        _ => {
                            tracing::debug!(generation, pid = c.pid, "notification {k}={v} ignored")
                        }
                    }
                }
            }
        }));
        Ok(())
    }
}

/// The next datagram on a notify socket that carries its sender's
/// credentials (`SO_PASSCRED`): the sender, the datagram's length in `buf`,
/// and whether it was truncated. Read errors and datagrams without
/// credentials are logged (with `generation`, if any) and skipped; `None`
/// once the socket can no longer be read.
pub async fn recv_notification(
    sock: &tokio::net::UnixDatagram,
    buf: &mut [u8],
    generation: Option<u64>,
) -> Option<(baton_sys::socket::SenderCreds, usize, bool)> {
    loop {
        sock.readable().await.ok()?;
        let got = sock.try_io(tokio::io::Interest::READABLE, || {
            baton_sys::socket::recv_with_creds(sock.as_fd(), buf)
        });
        let d = match got {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(generation, error = %e, "notify socket read failed");
                continue;
            }
        };
        let Some(c) = d.creds else {
            tracing::warn!(generation, "notification without credentials ignored");
            continue;
        };
        return Some((c, d.len, d.truncated));
    }
}

/// Whether `pid` is `root` or one of its descendants (walks `/proc`
/// parents, bounded).
pub fn in_tree(pid: u32, root: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        if p == root {
            return true;
        }
        if p <= 1 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            return false;
        };
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            return false;
        };
        p = ppid;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!("notify".parse::<ReadySpec>().unwrap(), ReadySpec::Notify);
        assert_eq!("tcp".parse::<ReadySpec>().unwrap(), ReadySpec::Tcp(None));
        assert_eq!(
            "tcp=api".parse::<ReadySpec>().unwrap(),
            ReadySpec::Tcp(Some("api".into()))
        );
        assert_eq!(
            "delay=1.5s".parse::<ReadySpec>().unwrap(),
            ReadySpec::Delay(Duration::from_millis(1500))
        );
        let ReadySpec::Http(u) = "http://127.0.0.1:8080/health?x=1".parse().unwrap() else {
            panic!()
        };
        assert_eq!(u.port, ProbePort::Fixed(8080));
        assert_eq!(u.path, "/health?x=1");
        let ReadySpec::Http(u) = "http://[::1]:{port}".parse().unwrap() else {
            panic!()
        };
        assert_eq!(u.port, ProbePort::PerGeneration);
        assert_eq!(u.ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(u.path, "/");
        assert_eq!(u.to_string(), "http://::1:{port}/");
        let ReadySpec::Http(u) = "http://localhost:9/h".parse().unwrap() else {
            panic!()
        };
        assert!(u.ip.is_loopback());
        for bad in [
            "https://127.0.0.1:1/",
            "http://example.com:80/",
            "http://127.0.0.1/",
            "http://127.0.0.1:0/",
            "http://127.0.0.1:1/a b",
            "tcp=bad name",
            "delay=soon",
            "later",
        ] {
            assert!(bad.parse::<ReadySpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_refuse_checks_that_cannot_fail() {
        let specs: Vec<baton::ListenSpec> = vec!["http=127.0.0.1:0".parse().unwrap()];
        let shared = ListenerSet::open(&specs, true, 16).unwrap();
        let port = shared.items[0].tcp_addr().unwrap().port();
        let e = plan(&ReadySpec::Tcp(None), &shared).unwrap_err();
        assert!(e.contains("--no-steer"), "{e}");
        let url: HttpUrl = format!("http://127.0.0.1:{port}/health").parse().unwrap();
        let e = plan(&ReadySpec::Http(url), &shared).unwrap_err();
        assert!(e.contains("shared socket"), "{e}");
        let url: HttpUrl = "http://127.0.0.1:{port}/health".parse().unwrap();
        assert!(plan(&ReadySpec::Http(url), &shared).is_ok());
        assert!(matches!(
            plan(&ReadySpec::Delay(Duration::from_secs(1)), &shared).unwrap(),
            ReadyPlan::Delay { accept: None, .. }
        ));

        let steered = ListenerSet::open(&specs, false, 16).unwrap();
        let port = steered.items[0].tcp_addr().unwrap().port();
        assert!(matches!(
            plan(&ReadySpec::Tcp(None), &steered).unwrap(),
            ReadyPlan::Tcp(_)
        ));
        let url: HttpUrl = format!("http://localhost:{port}/health").parse().unwrap();
        assert!(matches!(
            plan(&ReadySpec::Http(url), &steered).unwrap(),
            ReadyPlan::Http { via: Some(_), .. }
        ));
        let url: HttpUrl = "http://127.0.0.1:1/health".parse().unwrap();
        assert!(plan(&ReadySpec::Http(url), &steered).is_err());
        assert!(plan(&ReadySpec::Tcp(Some("nope".into())), &steered).is_err());
    }

    /// Readiness over HTTP is the library's probe: 2xx and 3xx are ready,
    /// 4xx and 5xx are not (and say why).
    #[tokio::test]
    async fn http_readiness_passes_2xx_and_3xx_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const ANSWERS: [(&str, bool); 4] = [
            ("200 OK", true),
            ("302 Found", true),
            ("404 Not Found", false),
            ("503 Service Unavailable", false),
        ];
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for (status, _) in ANSWERS {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let url: HttpUrl = format!("http://127.0.0.1:{}/ready", addr.port())
            .parse()
            .unwrap();
        for (status, ready) in ANSWERS {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let last_error = Mutex::new(String::new());
            assert_eq!(
                http_once_on(&mut s, &url, &last_error).await,
                ready,
                "{status}"
            );
            let e = last_error.lock().unwrap().clone();
            if ready {
                assert!(e.is_empty(), "{e}");
            } else {
                assert!(e.contains(status), "{e}");
            }
        }
    }

    #[test]
    fn process_tree() {
        let me = std::process::id();
        assert!(in_tree(me, me));
        assert!(in_tree(me, baton_sys::process::getppid()));
        assert!(!in_tree(1, me));
    }
}

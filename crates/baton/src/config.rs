//! Configuration as types: every knob has a named default.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

/// Default time a new generation has to report ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time an old generation has to finish its connections.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time the new generation has to acknowledge a batch of connections.
pub const DEFAULT_HANDOFF_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `listen()` backlog for sockets baton binds.
pub const DEFAULT_BACKLOG: i32 = 1024;
/// Default cap on imported state (protects the new generation).
pub const DEFAULT_STATE_LIMIT: u64 = 1 << 30;
/// Default time the exact state mode waits for requests in flight to finish.
pub const DEFAULT_QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `oom_score_adj` bump for the new generation during the overlap.
pub const DEFAULT_NEWCOMER_OOM_SCORE_ADJ: i32 = 100;
/// Default interval between health checks in the observation window.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(250);
/// Name of the listener used when none is given.
pub const DEFAULT_LISTENER_NAME: &str = "http";

/// How a baton generation behaves. Build with [`Config::default`] and set
/// what you need.
///
/// ```
/// use std::time::Duration;
/// let mut cfg = baton::Config::default();
/// cfg.ready_timeout = Duration::from_secs(10);
/// cfg.pid_file = Some("/run/myapp.pid".into());
/// assert_eq!(cfg.drain_timeout, baton::DEFAULT_DRAIN_TIMEOUT);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Time the new generation has, from spawn, to report `Ready`.
    pub ready_timeout: Duration,
    /// Time the old generation has, after promotion, to finish (or hand over)
    /// its connections before it exits anyway.
    pub drain_timeout: Duration,
    /// Time the new generation has to acknowledge a batch of handed-over
    /// connections; past it the new generation is considered hung and the
    /// upgrade is rolled back.
    pub handoff_ack_timeout: Duration,
    /// Pid file, rewritten atomically by the serving generation.
    pub pid_file: Option<PathBuf>,
    /// Control socket path (`baton upgrade --control PATH`); `None` = no
    /// control socket.
    pub control_socket: Option<PathBuf>,
    /// Version string of the application (reported in `Hello` and status).
    pub app_version: String,
    /// `listen()` backlog for sockets baton binds.
    pub backlog: i32,
    /// Upgrade on `SIGUSR2`.
    pub upgrade_on_sigusr2: bool,
    /// The executable to start at upgrade. Default: argv\[0\] made absolute
    /// at start-up (not symlink-resolved, so a swapped `current -> release`
    /// symlink upgrades to the new release).
    pub executable: Option<PathBuf>,
    /// Largest state the new generation will import.
    pub state_limit: u64,
    /// Live (default) or exact state snapshots (see [`StateMode`](crate::StateMode)).
    pub state_mode: StateMode,
    /// Exact mode: how long to wait for requests in flight before the
    /// snapshot; past it the upgrade fails and this generation resumes.
    pub quiesce_timeout: Duration,
    /// Send systemd notifications when `NOTIFY_SOCKET` is set.
    pub systemd_notify: bool,
    /// Called in a new generation at each point of the handoff (fault
    /// injection in tests; tracing in production).
    pub handoff_hook: Option<HandoffHook>,
    /// Pre-flight command that must exit 0 before an upgrade starts (e.g.
    /// `myserver --config-test`).
    pub check_command: Option<Vec<String>>,
    /// How long the check command may run.
    pub check_timeout: Duration,
    /// Memory headroom admission.
    pub memory: crate::admission::MemoryPolicy,
    /// `oom_score_adj` added to the new generation's during the overlap, so
    /// the kernel sacrifices the newcomer first; it lowers it back (best
    /// effort) once its predecessor is gone.
    pub newcomer_oom_score_adj: i32,
    /// Observation window after promotion (zero: off). See
    /// [`observe`](crate::observe).
    pub observe: Duration,
    /// Health URL polled during the observation window
    /// (`http://127.0.0.1:8080/health`); a status outside 200–399 or no
    /// answer fails it ([`probe`](crate::probe)).
    pub health_url: Option<String>,
    /// Interval between health checks.
    pub health_interval: Duration,
    /// Consecutive failed health checks that roll the new generation back
    /// (default [`HEALTH_FAILURES_TO_ROLL_BACK`](crate::observe::HEALTH_FAILURES_TO_ROLL_BACK); at least 1).
    pub health_failures: u32,
    /// How long one health check may take (default
    /// [`HEALTH_TIMEOUT`](crate::observe::HEALTH_TIMEOUT)).
    pub health_timeout: Duration,
    /// Canary: both generations accept for a window; the new one is
    /// promoted only if its error rate is good enough.
    pub canary: Option<crate::observe::CanaryPolicy>,
}

/// How the snapshot relates to the old generation's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum StateMode {
    /// Keep serving until promotion; writes after the snapshot are lost.
    #[default]
    Live,
    /// Pause at the snapshot (stop accepting, stop reading new requests,
    /// finish in-flight ones); nothing written is lost.
    Exact,
}

/// A point in a new generation's side of the handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffPoint {
    /// Just started, before talking to the old generation.
    Started,
    /// The listening sockets arrived.
    ListenersReceived,
    /// The state arrived (only if the app imports state).
    StateReceived,
    /// `Ready` was sent; `Promote` not yet received.
    ReadySent,
    /// Promoted: this generation serves, confirmed it to the old one and
    /// wrote the pid file.
    Promoted,
    /// In the *old* generation: drained, its last report sent, about to
    /// exit. The last check that the successor is alive comes right after.
    Exiting,
}

impl HandoffPoint {
    /// Parse `started`, `listeners`, `state`, `ready`, `promoted`,
    /// `exiting`.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "started" => HandoffPoint::Started,
            "listeners" => HandoffPoint::ListenersReceived,
            "state" => HandoffPoint::StateReceived,
            "ready" => HandoffPoint::ReadySent,
            "promoted" => HandoffPoint::Promoted,
            "exiting" => HandoffPoint::Exiting,
            _ => return None,
        })
    }
}

impl Config {
    /// Run the [`HandoffHook`], if any, at `point`.
    pub(crate) fn run_hook(&self, point: HandoffPoint) {
        if let Some(h) = &self.handoff_hook {
            (h.0)(point);
        }
    }
}

/// A callback run at each [`HandoffPoint`].
#[derive(Clone)]
pub struct HandoffHook(pub std::sync::Arc<dyn Fn(HandoffPoint) + Send + Sync>);

impl fmt::Debug for HandoffHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandoffHook(..)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ready_timeout: DEFAULT_READY_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            handoff_ack_timeout: DEFAULT_HANDOFF_ACK_TIMEOUT,
            pid_file: None,
            control_socket: None,
            app_version: String::from("unknown"),
            backlog: DEFAULT_BACKLOG,
            upgrade_on_sigusr2: true,
            executable: None,
            state_limit: DEFAULT_STATE_LIMIT,
            state_mode: StateMode::Live,
            quiesce_timeout: DEFAULT_QUIESCE_TIMEOUT,
            systemd_notify: true,
            handoff_hook: None,
            check_command: None,
            check_timeout: crate::admission::DEFAULT_CHECK_TIMEOUT,
            memory: crate::admission::MemoryPolicy::default(),
            newcomer_oom_score_adj: DEFAULT_NEWCOMER_OOM_SCORE_ADJ,
            observe: Duration::ZERO,
            health_url: None,
            health_interval: DEFAULT_HEALTH_INTERVAL,
            health_failures: crate::observe::HEALTH_FAILURES_TO_ROLL_BACK,
            health_timeout: crate::observe::HEALTH_TIMEOUT,
            canary: None,
        }
    }
}

/// Where to listen: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `127.0.0.1:8080`, `[::1]:8080`, `0.0.0.0:80`.
    Tcp(SocketAddr),
    /// `unix:/run/app.sock`.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::Config(
                    "unix: needs a path, e.g. unix:/run/app.sock".into(),
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            Error::Config(format!(
                "'{s}' is not an address: use IP:PORT (127.0.0.1:8080, [::1]:8080) or unix:/path"
            ))
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddr {
    /// Whether `fd` is a socket bound to this address (a TCP address with
    /// port 0 matches any port on its IP). For an inherited socket: is it
    /// still the one the configuration names?
    ///
    /// ```no_run
    /// # use std::os::fd::AsFd;
    /// let addr: baton::ListenAddr = "127.0.0.1:8080".parse()?;
    /// let listener = std::net::TcpListener::bind("127.0.0.1:8080")?;
    /// assert!(addr.is_bound_by(listener.as_fd()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_bound_by(&self, fd: std::os::fd::BorrowedFd<'_>) -> bool {
        match self {
            ListenAddr::Tcp(a) => baton_sys::socket::tcp_local_addr(fd)
                .is_ok_and(|got| got == *a || (a.port() == 0 && got.ip() == a.ip())),
            ListenAddr::Unix(p) => baton_sys::socket::unix_local_path(fd)
                .is_ok_and(|got| got.as_deref() == Some(p.as_path())),
        }
    }

    /// A listener name derived from this address, for listeners given
    /// without one: `http-` then the address, each run of characters a name
    /// cannot hold replaced by one `-`, an IPv6 address's colons by `_`
    /// (`127.0.0.1:8080` → `http-127.0.0.1-8080`, `[::1]:8080` →
    /// `http-__1-8080`, `unix:/run/app.sock` → `http-unix-run-app.sock`).
    /// A name longer than 64 characters ends in a hash of the address.
    pub fn derived_name(&self) -> String {
        let raw = match self {
            ListenAddr::Tcp(SocketAddr::V4(a)) => format!("{}-{}", a.ip(), a.port()),
            ListenAddr::Tcp(SocketAddr::V6(a)) => {
                format!("{}-{}", a.ip().to_string().replace(':', "_"), a.port())
            }
            ListenAddr::Unix(p) => format!("unix-{}", p.display()),
        };
        let mut name = String::from("http-");
        for c in raw.chars() {
            let ok = c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
            if !ok && name.ends_with('-') {
                continue;
            }
            name.push(if ok { c } else { '-' });
        }
        let name = name.trim_end_matches('-').to_owned();
        if name.len() <= 64 {
            return name;
        }
        // FNV-1a: stable across builds and releases (the name is a handoff
        // key between versions).
        let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{}-{hash:016x}", &name[..64 - 17])
    }
}

/// A named listener: `NAME=ADDR`, or just `ADDR` (named by
/// [`name_listeners`]: `http`, or a name derived from the address).
///
/// ```
/// let s: baton::ListenSpec = "admin=unix:/run/admin.sock".parse().unwrap();
/// assert_eq!(s.name, "admin");
/// let s: baton::ListenSpec = "127.0.0.1:8080".parse().unwrap();
/// assert_eq!(s.name, "http");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name (`LISTEN_FDNAMES` entry, handoff key).
    pub name: String,
    /// The address.
    pub addr: ListenAddr,
    /// The name was given (`NAME=ADDR`), not chosen by baton: see
    /// [`name_listeners`].
    pub named: bool,
}

impl ListenSpec {
    /// A named listener.
    pub fn new(name: impl Into<String>, addr: ListenAddr) -> Self {
        ListenSpec {
            name: name.into(),
            addr,
            named: true,
        }
    }
}

/// Name the listeners given without a name, in a way that does not depend
/// on the order of the flags: a single unnamed listener is
/// [`DEFAULT_LISTENER_NAME`] (unless a named one already has that name);
/// several get a name derived from their address
/// ([`ListenAddr::derived_name`]), as nginx tells its `listen` lines apart
/// by address.
///
/// ```
/// let mut specs: Vec<baton::ListenSpec> = ["127.0.0.1:8080", "unix:/run/app.sock"]
///     .iter()
///     .map(|s| s.parse().unwrap())
///     .collect();
/// baton::name_listeners(&mut specs).unwrap();
/// assert_eq!(specs[0].name, "http-127.0.0.1-8080");
/// assert_eq!(specs[1].name, "http-unix-run-app.sock");
/// ```
///
/// # Errors
/// [`Error::Config`] when two listeners end up with the same name, saying
/// which flags to rename.
pub fn name_listeners(specs: &mut [ListenSpec]) -> Result<(), Error> {
    let unnamed = specs.iter().filter(|s| !s.named).count();
    let default_taken = specs
        .iter()
        .any(|s| s.named && s.name == DEFAULT_LISTENER_NAME);
    for s in specs.iter_mut().filter(|s| !s.named) {
        s.name = if unnamed == 1 && !default_taken {
            DEFAULT_LISTENER_NAME.to_owned()
        } else {
            s.addr.derived_name()
        };
    }
    for (i, a) in specs.iter().enumerate() {
        if let Some(b) = specs[i + 1..].iter().find(|b| b.name == a.name) {
            let flag = |s: &ListenSpec| {
                if s.named {
                    format!("--listen {s}")
                } else {
                    format!("--listen {}", s.addr)
                }
            };
            return Err(Error::Config(format!(
                "two listeners are named '{}' ({} and {}): give one of them another name with --listen NAME=ADDR",
                a.name,
                flag(a),
                flag(b)
            )));
        }
    }
    Ok(())
}

/// Check a listener name: 1–64 of `[A-Za-z0-9_.-]` (no `:`, which separates
/// `LISTEN_FDNAMES`), and not starting with the reserved `baton.` prefix.
///
/// # Errors
/// [`Error::Config`] saying which rule was broken.
pub fn validate_listener_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 64 {
        return Err(Error::Config(format!(
            "listener name '{name}' must be 1 to 64 characters"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(Error::Config(format!(
            "listener name '{name}' may only contain letters, digits, '_', '-' and '.'"
        )));
    }
    if name.starts_with("baton.") {
        return Err(Error::Config(format!(
            "listener name '{name}': the 'baton.' prefix is reserved"
        )));
    }
    Ok(())
}

impl FromStr for ListenSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        // A name never contains ':' or '[' or '/', so the first '=' before any
        // of those separates NAME from ADDR.
        let (name, addr, named) = match s.split_once('=') {
            Some((n, a)) if !n.contains([':', '[', '/']) => (n.to_owned(), a, true),
            _ => (DEFAULT_LISTENER_NAME.to_owned(), s, false),
        };
        validate_listener_name(&name)?;
        Ok(ListenSpec {
            name,
            addr: addr.parse()?,
            named,
        })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.addr)
    }
}

/// Parse a duration: `250ms`, `2s`, `1.5s`, `3m`, `1h`, or bare seconds
/// (`30`).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(baton::parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// assert_eq!(baton::parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
/// assert_eq!(baton::parse_duration("2m").unwrap(), Duration::from_secs(120));
/// assert!(baton::parse_duration("soon").is_err());
/// ```
///
/// # Errors
/// [`Error::Config`] with the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let t = s.trim();
    let bad = || {
        Error::Config(format!(
            "'{s}' is not a duration: use e.g. 500ms, 2s, 1.5s, 3m, 1h"
        ))
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "us" | "µs" => 0.000_001,
        _ => return Err(bad()),
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse a byte size: `1048576`, `512K`, `64M`, `2G` (powers of 1024;
/// an optional `iB`/`B` suffix is accepted).
///
/// ```
/// assert_eq!(baton::parse_bytes("64M").unwrap(), 64 << 20);
/// assert_eq!(baton::parse_bytes("2GiB").unwrap(), 2 << 30);
/// ```
///
/// # Errors
/// [`Error::Config`] with the accepted forms.
pub fn parse_bytes(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let bad = || {
        Error::Config(format!(
            "'{s}' is not a size: use e.g. 1048576, 512K, 64M, 2G"
        ))
    };
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mul).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("10").unwrap(), 10);
        assert_eq!(parse_bytes("1K").unwrap(), 1024);
        assert_eq!(parse_bytes("3 G").unwrap(), 3 << 30);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn listen_specs() {
        let s: ListenSpec = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(s.name, "http");
        assert_eq!(s.addr, ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()));
        let s: ListenSpec = "api=[::1]:9000".parse().unwrap();
        assert_eq!(s.name, "api");
        let s: ListenSpec = "unix:/tmp/a=b.sock".parse().unwrap();
        assert_eq!(s.name, "http");
        assert_eq!(s.addr, ListenAddr::Unix("/tmp/a=b.sock".into()));
        let s: ListenSpec = "adm=unix:/tmp/x.sock".parse().unwrap();
        assert_eq!(s.name, "adm");
        assert!("bad name=127.0.0.1:1".parse::<ListenSpec>().is_err());
        assert!(!"127.0.0.1:1".parse::<ListenSpec>().unwrap().named);
        assert!("a=127.0.0.1:1".parse::<ListenSpec>().unwrap().named);
        assert!("baton.x=127.0.0.1:1".parse::<ListenSpec>().is_err());
        assert!("localhost:80".parse::<ListenSpec>().is_err());
        assert!("unix:".parse::<ListenSpec>().is_err());
        assert_eq!(
            "api=[::1]:9000".parse::<ListenSpec>().unwrap().to_string(),
            "api=[::1]:9000"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1 parsec").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1e9h").is_err());
    }

    fn specs(v: &[&str]) -> Vec<ListenSpec> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn names(v: &[&str]) -> Result<Vec<String>, Error> {
        let mut s = specs(v);
        name_listeners(&mut s)?;
        Ok(s.into_iter().map(|s| s.name).collect())
    }

    #[test]
    fn unnamed_listeners_are_named_by_address_whatever_their_order() {
        assert_eq!(names(&["127.0.0.1:8080"]).unwrap(), ["http"]);
        assert_eq!(
            names(&["127.0.0.1:8080", "unix:/run/app.sock"]).unwrap(),
            ["http-127.0.0.1-8080", "http-unix-run-app.sock"]
        );
        assert_eq!(
            names(&["unix:/run/app.sock", "127.0.0.1:8080"]).unwrap(),
            ["http-unix-run-app.sock", "http-127.0.0.1-8080"]
        );
        assert_eq!(
            names(&["[::1]:8080", "0.0.0.0:80"]).unwrap(),
            ["http-__1-8080", "http-0.0.0.0-80"]
        );
        // A named `http` leaves the default name to nobody else.
        assert_eq!(
            names(&["http=127.0.0.1:1", "127.0.0.1:2"]).unwrap(),
            ["http", "http-127.0.0.1-2"]
        );
        assert_eq!(
            names(&["admin=127.0.0.1:1", "127.0.0.1:2"]).unwrap(),
            ["admin", "http"]
        );
        let long = format!("unix:/{}", "d/".repeat(60));
        let n = &names(&[&long, "127.0.0.1:1"]).unwrap()[0];
        assert_eq!(n.len(), 64, "{n}");
        validate_listener_name(n).unwrap();
    }

    #[test]
    fn a_real_duplicate_says_which_flag_to_rename() {
        let e = names(&["127.0.0.1:8080", "127.0.0.1:8080"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("--listen 127.0.0.1:8080 and --listen 127.0.0.1:8080"),
            "{e}"
        );
        let e = names(&["api=127.0.0.1:1", "api=unix:/x"]).unwrap_err();
        assert!(e.to_string().contains("--listen api=unix:/x"), "{e}");
        assert!(e.to_string().contains("another name"), "{e}");
    }
}

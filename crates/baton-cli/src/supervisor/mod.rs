//! `baton run`: the supervisor.
//!
//! baton owns the listening sockets for its whole life and starts each
//! generation of the app with them at fds 3.. (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID` = the app's own pid). An upgrade starts the
//! next generation on the same sockets, waits until it is ready (bounded),
//! steers new connections to it, waits until the old generation's queue is
//! empty, and only then stops the old one. A generation that fails to
//! become ready is killed and the old one keeps serving; a serving
//! generation that dies is restarted with backoff while its sockets keep
//! queueing connections.
//!
//! Structure: `sockets` (listeners and steering), `ready` (readiness
//! checks), `child` (a generation's process), `upgrade` (the single task
//! that owns all of it: one upgrade at a time falls out of the structure;
//! its phases are files of their own: `start`, `run`, `observe`, `drain`).

mod admission;
mod child;
mod delegate;
mod metrics;
mod ready;
mod reaper;
pub mod self_exec;
mod sockets;
mod upgrade;

pub use sockets::UnixRoute;

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use baton::ListenSpec;
use baton_sys::process::Signal;
use tokio::sync::mpsc;

use crate::exit::{self, CliError};

/// Default `--canary-percent`.
pub const DEFAULT_CANARY_PERCENT: u32 = 10;

/// Service name when `--name` is not given.
pub const DEFAULT_NAME: &str = "baton";

/// Longest wait for the old generation's accept queue to empty after
/// steering (an app that stopped accepting would never empty it).
pub const STEER_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause before restarting a generation that died.
pub const RESTART_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest pause between restarts.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A generation that served this long resets the backoff when it dies.
pub const RESTART_BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

const RUN_AFTER_HELP: &str = "\
Readiness (--ready), each bounded by --ready-timeout; each can fail:
  tcp              the app accepts a connection on its own socket (default)
  http://HOST:PORT/PATH
                   2xx/3xx from the new generation: PORT is a listener's port (the
                   probe is steered to the new generation's own socket), or {port}
                   (each generation gets a free port in $BATON_PROBE_PORT)
  notify           READY=1 on the generation's own $NOTIFY_SOCKET (sender checked)
  delay=DUR        alive after DUR (then an accept check, if a TCP listener is steered)

Steering: each TCP listener is two SO_REUSEPORT sockets; a classic-BPF program
sends new connections to the ready generation's socket, the old one empties its
queue, and only then gets --stop-signal. Unix sockets, systemd sockets without
ReusePort=yes and --no-steer use one shared socket (said in the log and status).

Keep-alive clients (--front http): baton serves the clients' HTTP/1.1 (and h2c)
connections itself and forwards each request to the serving generation, which gets a private
127.0.0.1 socket (same LISTEN_FDNAMES; with --front-upstream unix a Unix socket of its own, in
NAME.upstream/ next to the control socket); client connections survive upgrades, the
old generation is stopped once its requests are done. The app sees baton's
address; the client's is in X-Forwarded-For and Forwarded. WebSockets (any
Upgrade but h2c) are tunnelled to the generation that accepted them; the old
one is stopped once its tunnels close, at most --drain-timeout after the switch.
On SIGTERM the front closes its listeners (after serving what is queued), closes
idle client connections, lets requests finish (--drain-timeout), then stops the
app (which closes its WebSockets).

baton itself: `baton upgrade --self` re-executes the baton binary at its path in
place (same pid; the app, the listeners, the control socket and --front's idle
client connections are kept; --front's requests in flight finish first).

Safety: before anything is spawned, the executable is checked (exists, is
executable, matches `baton upgrade --expect-sha256`), --check must exit 0 and
memory headroom must allow a second generation (refused: exit 3, nothing
changes). --canary DUR shares new connections between both generations and
--observe DUR keeps the old one standing by; either rolls the new one back if
it dies or fails --health.

Containers: as PID 1, baton reaps every zombie and exits with the app's status.
--delegate runs a library-mode baton server that upgrades itself and follows
its MAINPID= notifications (`baton upgrade` is forwarded to --app-control).

Signals: SIGHUP upgrades; SIGTERM/SIGINT stop gracefully (a second one kills).
Exit status: 0 after a requested stop (as PID 1 or with --delegate: the app's
exit status, 128+N if killed by signal N), 1 if baton could not start, 2 usage.

Examples:
  baton run --name web --listen http=0.0.0.0:8080 -- gunicorn --workers 4 app:app
  baton run --listen 127.0.0.1:8000 --observe 30s --health http://127.0.0.1:8000/health -- ./server
  baton run --delegate --listen http=0.0.0.0:8080 --app-control /run/app.sock \
      -- /app/server --listen http=0.0.0.0:8080 --control /run/app.sock
  baton run --listen 127.0.0.1:8000 -- uvicorn --fd 3 app:app
  baton run --listen 127.0.0.1:3000 --ready http://127.0.0.1:3000/health -- node server.js";

/// `baton run --front` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FrontMode {
    /// HTTP/1.1 and h2c (HTTP/2 with prior knowledge) from clients,
    /// HTTP/1.1 to the app.
    Http,
}

/// `--front-upstream`: how the front reaches the generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FrontUpstream {
    /// A private 127.0.0.1 port per listener (the kernel steers between
    /// the generations' sockets).
    Tcp,
    /// A Unix stream socket per generation in a private directory next to
    /// the control socket: less kernel work per request on both sides.
    Unix,
}

/// `--front-upstream unix`: the private directory of the generations'
/// sockets, next to the control socket.
fn upstream_dir(args: &RunArgs) -> PathBuf {
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| baton::control::default_socket_path(&args.name));
    control
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(format!("{}.upstream", args.name))
}

/// Where the front's pools connect, per private listener.
fn upstream_targets(private: &sockets::ListenerSet) -> Vec<crate::front::Target> {
    private
        .items
        .iter()
        .zip(private.unix_routes())
        .filter_map(|(l, r)| match r {
            Some(r) => Some(crate::front::Target::Unix(r)),
            None => l.local_target().map(crate::front::Target::Tcp),
        })
        .collect()
}

/// `--front http`: the generations get private sockets (returned); the
/// front serves `public` (its sockets are duplicated, the set may go).
fn start_front(
    args: &RunArgs,
    public: &sockets::ListenerSet,
) -> anyhow::Result<(sockets::ListenerSet, crate::front::Front)> {
    let names: Vec<String> = public.items.iter().map(|l| l.name.clone()).collect();
    let private = match args.front_upstream {
        FrontUpstream::Tcp => sockets::ListenerSet::open_private(&names, baton::DEFAULT_BACKLOG),
        FrontUpstream::Unix => sockets::ListenerSet::open_private_unix(
            &names,
            &upstream_dir(args),
            1,
            baton::DEFAULT_BACKLOG,
        ),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let front = crate::front::Front::start(
        front_config(args),
        public.dup_for(0)?,
        upstream_targets(&private),
        Default::default(),
    )?;
    for (p, q) in public.items.iter().zip(&private.items) {
        tracing::info!(listener = %p.name, public = %p.addr, generations = %q.addr, "front: serving HTTP clients; generations get a private socket");
    }
    Ok((private, front))
}

/// `--front`: a probe URL whose port is a public listener's is sent to the
/// same listener's private socket (the one the generations get); `pairs`:
/// (public port, private address).
fn to_private(url: &mut ready::HttpUrl, pairs: &[(u16, std::net::SocketAddr)]) {
    let ready::ProbePort::Fixed(port) = url.port else {
        return;
    };
    if let Some((_, a)) = pairs.iter().find(|(p, _)| *p == port) {
        tracing::info!(public_port = port, private = %a, "front: the probe goes to the generation's private socket");
        url.host = a.ip().to_string();
        url.ip = a.ip();
        url.port = ready::ProbePort::Fixed(a.port());
    }
}

/// The listeners of a fresh start: bound (or systemd's), and with
/// `--front` the front on them and the generations' private sockets
/// (returned instead).
fn open_listeners(
    args: &RunArgs,
) -> Result<(sockets::ListenerSet, Option<crate::front::Front>), CliError> {
    let listeners = sockets::ListenerSet::open(
        &args.listen,
        args.no_steer || args.front.is_some(),
        baton::DEFAULT_BACKLOG,
    )
    .map_err(|e| CliError::new(exit::FAILED, anyhow::anyhow!("{e}")))?;
    match args.front {
        None => {
            listeners.log_steering();
            Ok((listeners, None))
        }
        Some(FrontMode::Http) => {
            let (private, front) = start_front(args, &listeners)
                .map_err(|e| CliError::new(exit::FAILED, e.context("starting --front http")))?;
            // The front holds the public sockets now: at its stop it closes
            // them (new connections are refused, not left unanswered).
            drop(listeners);
            Ok((private, Some(front)))
        }
    }
}

/// The front's configuration from the flags.
fn front_config(args: &RunArgs) -> crate::front::FrontConfig {
    crate::front::FrontConfig {
        header_timeout: args.front_header_timeout,
        max_connections: args.front_max_connections,
        upstream_idle: args.front_upstream_idle,
        trust_forwarded: args.front_trust_forwarded,
        max_body: args.front_max_body,
        max_header: args.front_max_header,
    }
}

/// `baton run` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = RUN_AFTER_HELP)]
pub struct RunArgs {
    /// Service name (default control socket, logs, notify sockets).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_NAME)]
    name: String,
    /// A listening socket, repeatable: [NAME=]ADDR with ADDR = IP:PORT
    /// (127.0.0.1:8080, [::]:80) or unix:/path. Passed at fd 3, 4, ... in
    /// this order, named in LISTEN_FDNAMES. An unnamed one is `http`; when
    /// several are unnamed, each is named after its address
    /// (http-127.0.0.1-8080, http-unix-run-app.sock). Sockets systemd passes
    /// to baton are used instead when their name or address matches.
    #[arg(long = "listen", value_name = "[NAME=]ADDR", value_parser = parse_listen)]
    listen: Vec<ListenSpec>,
    /// How baton knows a new generation is ready (see below) [default:
    /// tcp].
    #[arg(long, value_name = "CHECK", value_parser = parse_ready)]
    ready: Option<ready::ReadySpec>,
    /// Time a new generation has to become ready; past it, it is killed and
    /// the old one keeps serving.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_dur)]
    ready_timeout: Duration,
    /// Signal that asks a generation to stop gracefully.
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = parse_signal)]
    stop_signal: Signal,
    /// Time a generation has to exit after the stop signal, before SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_dur)]
    drain_timeout: Duration,
    /// Control socket (default: from --name, see `baton upgrade --help`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Write baton's own pid here (it never changes across upgrades).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// One shared socket per listener, and the old generation is signalled
    /// as soon as the new one is ready (a plain handover: for comparison or
    /// troubleshooting).
    #[arg(long)]
    no_steer: bool,
    /// With steering: how long the old generation's accept queue must stay
    /// empty after new connections go to the new one, before the old one is
    /// stopped (a handshake begun before the switch lands there up to one
    /// round trip later). Raise it for clients far away; 0 stops at once.
    #[arg(long, value_name = "DUR", default_value = "250ms", value_parser = parse_dur)]
    steer_quiet: Duration,
    /// Pre-flight check run (with `sh -c`) before every upgrade and every
    /// restart; it must exit 0, e.g. `"/srv/app/bin/app --config-test"`.
    #[arg(long, value_name = "CMD")]
    check: Option<String>,
    /// Time the --check command may run.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_dur)]
    check_timeout: Duration,
    /// Refuse an upgrade that would bring memory use above this share of the
    /// tightest limit (cgroup v2/v1, else the machine).
    #[arg(long, value_name = "PCT", default_value_t = baton::admission::DEFAULT_MAX_MEMORY_PERCENT, value_parser = parse_percent)]
    max_memory_percent: f64,
    /// Use this memory limit instead of the cgroup's or the machine's
    /// (e.g. 512M, 2G).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Assume a new generation needs this much memory [default: what the
    /// serving generation's process tree uses, PSS].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    memory_estimate: Option<u64>,
    /// Skip the memory headroom check.
    #[arg(long)]
    no_memory_check: bool,
    /// Added to baton's own oom_score_adj for a new generation while the
    /// old one still runs, so that the kernel sacrifices the newcomer first
    /// (0 = off).
    #[arg(long, value_name = "N", default_value_t = baton::DEFAULT_NEWCOMER_OOM_SCORE_ADJ, allow_hyphen_values = true)]
    newcomer_oom_score_adj: i32,
    /// Observation window after the new generation takes the new
    /// connections: the old one keeps running, idle, and takes them back if
    /// the new one dies or fails --health (0 = off).
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_dur)]
    observe: Duration,
    /// Canary before that: for DUR, both generations take new connections
    /// (--canary-percent of them go to the new one); the new one is rolled
    /// back if it dies or fails --health.
    #[arg(long, value_name = "DUR", value_parser = parse_dur)]
    canary: Option<Duration>,
    /// Share of new connections the new generation gets during --canary.
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT_CANARY_PERCENT, value_parser = clap::value_parser!(u32).range(1..=99))]
    canary_percent: u32,
    /// Health check during --canary and --observe: http://HOST:PORT/PATH on
    /// a steered listener's port (routed to the new generation only), or
    /// http://127.0.0.1:{port}/PATH (its $BATON_PROBE_PORT); 2xx/3xx is
    /// healthy [default: the --ready URL, if it is one].
    #[arg(long, value_name = "URL", value_parser = parse_health)]
    health: Option<ready::HttpUrl>,
    /// Interval between health checks.
    #[arg(long, value_name = "DUR", default_value = "250ms", value_parser = parse_dur)]
    health_interval: Duration,
    /// Consecutive failed health checks that roll the new generation back.
    #[arg(long, value_name = "N", default_value_t = baton::observe::HEALTH_FAILURES_TO_ROLL_BACK, value_parser = clap::value_parser!(u32).range(1..))]
    health_failures: u32,
    /// How long one health check may take.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_dur)]
    health_timeout: Duration,
    /// Serve baton's own Prometheus metrics at http://ADDR/metrics
    /// (upgrades by result, durations, restarts, generation).
    #[arg(long, value_name = "IP:PORT", conflicts_with = "delegate")]
    metrics: Option<std::net::SocketAddr>,
    /// Delegate mode, for a library-mode baton server (a container's PID
    /// 1): start it once with a NOTIFY_SOCKET of baton's, and follow its own
    /// upgrades through its MAINPID= notifications instead of starting
    /// generations; reap every process, forward SIGTERM/SIGINT, exit with
    /// its status.
    #[arg(long, conflicts_with_all = ["ready", "check", "observe", "canary", "health", "no_steer"])]
    delegate: bool,
    /// Delegate mode: the server's own control socket (its --control), to
    /// which `baton upgrade` is forwarded.
    #[arg(long, value_name = "PATH", requires = "delegate")]
    app_control: Option<PathBuf>,
    /// Delegate mode: the signal SIGHUP to baton is turned into for the
    /// server (a library-mode server upgrades itself on SIGUSR2).
    #[arg(long, value_name = "SIG", default_value = "USR2", value_parser = parse_signal, requires = "delegate")]
    upgrade_signal: Signal,
    /// Serve the clients' HTTP connections in baton and forward each request
    /// to the serving generation (`http`: HTTP/1.1 and h2c from clients,
    /// HTTP/1.1 to the app). Client connections then
    /// survive upgrades: no keep-alive client sees an error. Each generation
    /// gets a private 127.0.0.1 socket instead of the listeners (same names
    /// in LISTEN_FDNAMES); the app sees baton's address, the client's is in
    /// X-Forwarded-For and Forwarded. See docs/supervisor.md.
    #[arg(long, value_name = "MODE", conflicts_with_all = ["delegate", "no_steer"])]
    front: Option<FrontMode>,
    /// --front: keep the clients' Forwarded and X-Forwarded-* headers (baton
    /// is behind a proxy that sets them) and append to them; without it they
    /// are replaced.
    #[arg(long, requires = "front")]
    front_trust_forwarded: bool,
    /// --front: time a client has to send a request's headers; also
    /// the longest idle time of a keep-alive connection between requests
    /// (closed after it, counted in header_timeouts).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_dur, requires = "front")]
    front_header_timeout: Duration,
    /// --front: client connections served at once (past it, baton stops
    /// accepting until one ends).
    #[arg(long, value_name = "N", default_value_t = crate::front::DEFAULT_MAX_CONNECTIONS, requires = "front")]
    front_max_connections: usize,
    /// --front: an idle upstream connection older than this is closed by
    /// baton instead of reused; keep it below the app's keep-alive timeout.
    #[arg(long, value_name = "DUR", default_value = "1500ms", value_parser = parse_dur, requires = "front")]
    front_upstream_idle: Duration,
    /// --front: largest request body (e.g. 10M, 1G). A larger declared
    /// Content-Length gets 413 before the app sees anything; a chunked body
    /// is cut where it passes the limit (413 if the app has not answered).
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_size, requires = "front")]
    front_max_body: u64,
    /// --front: largest request head, request line and headers (at least
    /// 8K); a larger one gets 431 and the connection is closed.
    #[arg(long, value_name = "BYTES", default_value = "64K", value_parser = parse_max_header, requires = "front")]
    front_max_header: usize,
    /// --front: how baton reaches the app. `tcp`: a private 127.0.0.1 port
    /// per listener. `unix`: a Unix stream socket per generation, in a
    /// private directory (0700) next to the control socket, removed once
    /// its generation is gone; less kernel work per request for baton and
    /// the app (use it when they share CPUs and the app accepts a Unix
    /// socket from LISTEN_FDS). The app then sees no peer address at all
    /// (X-Forwarded-For and Forwarded still carry the client's). Not with
    /// --canary.
    #[arg(long, value_name = "KIND", value_enum, default_value_t = FrontUpstream::Tcp, requires = "front")]
    front_upstream: FrontUpstream,
    /// The app's command line.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    s.parse().map_err(|e: baton::Error| e.to_string())
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    baton::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    baton::parse_bytes(s).map_err(|e| e.to_string())
}

fn parse_max_header(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    match usize::try_from(n) {
        Ok(n) if n >= crate::front::MIN_MAX_HEADER => Ok(n),
        _ => Err(format!(
            "'{s}' is too small: a request head limit is at least {} bytes (8K)",
            crate::front::MIN_MAX_HEADER
        )),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!("'{s}' is not a percentage between 0 and 100")),
    }
}

fn parse_health(s: &str) -> Result<ready::HttpUrl, String> {
    s.parse()
}

fn parse_ready(s: &str) -> Result<ready::ReadySpec, String> {
    s.parse()
}

/// Parse a signal name: `TERM`, `SIGTERM`, `INT`, `QUIT`, `HUP`, `USR1`,
/// `USR2`, `WINCH`, `KILL`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let up = s.trim().to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    Ok(match name {
        "TERM" | "15" => Signal::TERM,
        "INT" | "2" => Signal::INT,
        "QUIT" | "3" => Signal::QUIT,
        "HUP" | "1" => Signal::HUP,
        "USR1" | "10" => Signal::USR1,
        "USR2" | "12" => Signal::USR2,
        "WINCH" | "28" => Signal::WINCH,
        "KILL" | "9" => Signal::KILL,
        _ => {
            return Err(format!(
                "'{s}' is not a stop signal: use TERM, INT, QUIT, HUP, USR1, USR2, WINCH or KILL"
            ));
        }
    })
}

/// The name of a stop signal, for logs.
pub fn signal_name(sig: Signal) -> &'static str {
    [
        (Signal::TERM, "SIGTERM"),
        (Signal::INT, "SIGINT"),
        (Signal::QUIT, "SIGQUIT"),
        (Signal::HUP, "SIGHUP"),
        (Signal::USR1, "SIGUSR1"),
        (Signal::USR2, "SIGUSR2"),
        (Signal::WINCH, "SIGWINCH"),
        (Signal::KILL, "SIGKILL"),
    ]
    .iter()
    .find(|(s, _)| *s == sig)
    .map_or("signal", |(_, n)| n)
}

/// Check a service name: it becomes a file name.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(format!(
            "service name '{name}': use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'"
        ));
    }
    Ok(())
}

/// Everything the owner needs to know, fixed at start-up.
#[derive(Debug)]
pub struct RunConfig {
    /// Service name.
    pub name: String,
    /// Command line from `baton run -- ...`.
    pub argv: Vec<OsString>,
    /// Readiness bound.
    pub ready_timeout: Duration,
    /// Stop signal.
    pub stop_signal: Signal,
    /// Bound after the stop signal.
    pub drain_timeout: Duration,
    /// Private directory for notify sockets.
    pub run_dir: PathBuf,
    /// Pre-flight and memory gates.
    pub admission: admission::AdmissionConfig,
    /// `--observe` (zero: off).
    pub observe: Duration,
    /// `--canary`.
    pub canary: Option<Duration>,
    /// `--canary-percent`.
    pub canary_percent: u32,
    /// `--health-interval`.
    pub health_interval: Duration,
    /// `--steer-quiet`.
    pub steer_quiet: Duration,
    /// `--health-failures`.
    pub health_failures: u32,
    /// `--health-timeout`.
    pub health_timeout: Duration,
    /// `--front`: baton serves the clients and forwards to the generations.
    pub front: Option<crate::front::Front>,
    /// `baton upgrade --self`.
    pub self_exec: self_exec::SelfCtx,
}

/// The control socket file, removed when baton exits (if it is still
/// ours).
struct ControlSocketFile {
    path: PathBuf,
    ino: u64,
}

impl Drop for ControlSocketFile {
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            == Some(baton_sys::process::getpid());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn open_control(
    path: &Path,
    tx: mpsc::Sender<baton::control::Command>,
    carried: Option<OwnedFd>,
) -> Result<(ControlSocketFile, OwnedFd), String> {
    let fd = match carried {
        // `baton upgrade --self`: the same socket, still bound at `path`.
        Some(fd) => fd,
        None => {
            baton::control::prepare_dir(path).map_err(|e| e.to_string())?;
            baton::bind_unix_listener("control", path, 64, Some(0o600)).map_err(|e| {
                format!("{e} (is another `baton run` with this --name or --control running?)")
            })?
        }
    };
    let keep = baton_sys::fd::dup(fd.as_fd()).map_err(|e| format!("control socket: {e}"))?;
    let ino = std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let listener = tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
        .map_err(|e| format!("control socket: {e}"))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(baton::control::serve_connection(s, tx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok((
        ControlSocketFile {
            path: path.to_path_buf(),
            ino,
        },
        keep,
    ))
}

/// Mark every fd baton inherited by accident close-on-exec, so that only
/// the sockets it places reach the app (a shell, a CI runner or a test
/// harness may leave pipes open). systemd's `LISTEN_FDS` meant for us are
/// left alone: the listener set adopts them. Call it first thing, before
/// any thread or runtime opens fds of its own.
pub fn cloexec_inherited_fds() {
    let listen = baton::ListenFds::from_env().map_or(0, |l| l.count());
    let n = baton_sys::fd::cloexec_inherited(|fd| (3..3 + listen).contains(&fd));
    if n > 0 {
        tracing::debug!(count = n, "inherited fds marked close-on-exec");
    }
}

/// `baton run`.
///
/// `taken`: the state a previous image of this process left (`baton
/// upgrade --self`), read by `main` first thing.
pub async fn run(
    args: RunArgs,
    mut taken: Option<self_exec::recv::Taken>,
) -> Result<ExitCode, CliError> {
    validate_name(&args.name).map_err(CliError::usage)?;
    if let Some(first) = args.command.first() {
        child::resolve_program(first)
            .map_err(|e| CliError::usage(format!("cannot run the command: {e}")))?;
    }
    let mut ready_spec = args.ready.clone().unwrap_or(ready::ReadySpec::Tcp(None));
    if let ready::ReadySpec::Delay(d) = &ready_spec
        && *d >= args.ready_timeout
    {
        return Err(CliError::usage(format!(
            "--ready delay={d:?} is not shorter than --ready-timeout {:?}",
            args.ready_timeout
        )));
    }
    if let Err(e) = baton_sys::process::raise_nofile_limit() {
        tracing::debug!(error = %e, "could not raise RLIMIT_NOFILE");
    }
    // Signal handlers before anything can announce readiness.
    let signals = upgrade::Signals::install().map_err(|e| {
        CliError::new(
            exit::FAILED,
            anyhow::anyhow!("installing signal handlers: {e}"),
        )
    })?;
    // `baton upgrade --self` blocked them across the exec: one sent
    // meanwhile is delivered now, to the handlers.
    if let Err(e) = baton_sys::process::block_handled_signals(false) {
        tracing::warn!(error = %e, "could not unblock SIGHUP/SIGTERM/SIGINT");
    }
    // As PID 1 (a container's init) every orphan of the container becomes
    // baton's child; in delegate mode each generation of the server becomes
    // one when its predecessor exits. Reap them all.
    let pid1 = baton_sys::process::getpid() == 1;
    if pid1 || args.delegate {
        reaper::start().map_err(|e| {
            CliError::new(
                exit::FAILED,
                anyhow::anyhow!("starting the zombie reaper: {e}"),
            )
        })?;
        if !pid1 {
            baton_sys::process::set_child_subreaper().map_err(|e| {
                CliError::new(exit::FAILED, anyhow::anyhow!("PR_SET_CHILD_SUBREAPER: {e}"))
            })?;
        }
        tracing::info!(pid1, "reaping every exited process");
    }
    let control_path = args
        .control
        .clone()
        .unwrap_or_else(|| baton::control::default_socket_path(&args.name));
    let mut args = args;
    baton::name_listeners(&mut args.listen).map_err(|e| CliError::usage(e.to_string()))?;
    if args.delegate {
        return run_delegate(args, signals, control_path).await;
    }
    if args.front_upstream == FrontUpstream::Unix && args.canary.is_some() {
        return Err(CliError::usage(
            "--canary cannot be used with --front-upstream unix: the front sends each new upstream connection to one generation's socket; use --front-upstream tcp for a canary, or --observe",
        ));
    }
    // The path `--self` executes: resolved by the first image (this one's
    // may be a /proc/self/fd path, or a file since replaced).
    let exe = match &taken {
        Some(t) => PathBuf::from(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&t.state.exe_path),
        ),
        None => std::env::current_exe().map_err(|e| {
            CliError::new(
                exit::FAILED,
                anyhow::anyhow!("finding baton's own executable: {e}"),
            )
        })?,
    };
    let fail = |e: String| CliError::new(exit::FAILED, anyhow::anyhow!("{e}"));
    let book = match &taken {
        Some(t) => {
            let b = upgrade::book_after(&t.state, t.returned.as_deref());
            match &t.returned {
                None => {
                    tracing::info!(execs = b.execs, from = %t.state.baton_version, "baton upgrade --self: this new image takes over")
                }
                Some(why) => {
                    tracing::error!(reason = %why, "baton upgrade --self rolled back: the new baton could not read the state; the previous one resumes")
                }
            }
            b
        }
        None => self_exec::Book {
            execs: 0,
            attempts: 0,
            last: None,
            first_started_unix_ms: self_exec::unix_ms(),
            image_started_unix_ms: self_exec::unix_ms(),
            exe_ino: self_exec::own_exe_ino(),
            carried: 0,
        },
    };
    let carried_front = match taken.as_mut().and_then(|t| t.state.front.take()) {
        Some(f) => Some(upgrade::resume_front(f).map_err(fail)?),
        None => None,
    };
    let (listeners, front) = match (taken.as_mut(), carried_front) {
        (Some(t), carried_front) => {
            let private = upgrade::resume_listeners(
                std::mem::take(&mut t.state.listeners),
                t.state.ext.upstream.take(),
                t.state.serving_slot,
            )
            .map_err(fail)?;
            if private.items.iter().any(|l| l.unix.is_some())
                != (args.front_upstream == FrontUpstream::Unix)
            {
                return Err(fail(
                    "the carried state and the command line disagree about --front-upstream".into(),
                ));
            }
            let front = match (args.front, carried_front) {
                (Some(FrontMode::Http), Some((public, resumed))) => {
                    let upstream = upstream_targets(&private);
                    Some(
                        crate::front::Front::start(front_config(&args), public, upstream, resumed)
                            .map_err(|e| {
                                CliError::new(exit::FAILED, e.context("resuming --front http"))
                            })?,
                    )
                }
                (None, None) => None,
                _ => {
                    return Err(fail(
                        "the carried state and the command line disagree about --front".into(),
                    ));
                }
            };
            (private, front)
        }
        (None, _) => open_listeners(&args)?,
    };
    let mut unix_ports: Vec<(u16, usize)> = Vec::new();
    if let Some(f) = &front {
        // A probe URL naming a public listener goes to the generation's
        // private socket of that listener instead.
        let public = f.public_fds().map_err(|e| fail(format!("--front: {e}")))?;
        let pairs: Vec<(u16, std::net::SocketAddr)> = public
            .iter()
            .zip(&listeners.items)
            .filter_map(|(p, q)| {
                let port = baton_sys::socket::tcp_local_addr(p.as_fd()).ok()?.port();
                Some((port, q.tcp_addr()?))
            })
            .collect();
        if let ready::ReadySpec::Http(u) = &mut ready_spec {
            to_private(u, &pairs);
        }
        if let Some(u) = &mut args.health {
            to_private(u, &pairs);
        }
        // --front-upstream unix: such a URL goes to the new generation's
        // own Unix socket of that listener.
        unix_ports = public
            .iter()
            .zip(&listeners.items)
            .enumerate()
            .filter(|(_, (_, q))| q.unix.is_some())
            .filter_map(|(i, (p, _))| {
                Some((baton_sys::socket::tcp_local_addr(p.as_fd()).ok()?.port(), i))
            })
            .collect();
    }
    let unix_plan = |u: &ready::HttpUrl| match u.port {
        ready::ProbePort::Fixed(port) => unix_ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, i)| ready::unix_http_plan(u, *i)),
        ready::ProbePort::PerGeneration => None,
    };
    let unix_ready = match &ready_spec {
        ready::ReadySpec::Http(u) => unix_plan(u),
        _ => None,
    };
    let plan = match unix_ready {
        Some(p) => Ok(p),
        None => ready::plan(&ready_spec, &listeners),
    }
    .map_err(|e| {
        if args.ready.is_none() {
            CliError::usage(format!("{e} (tcp is the default readiness check)"))
        } else {
            CliError::usage(e)
        }
    })?;
    tracing::info!(readiness = %plan.describe(&listeners), "readiness check");
    let windowed = !args.observe.is_zero() || args.canary.is_some();
    if windowed && !listeners.any_steered() {
        return Err(CliError::usage(
            "--observe and --canary need a TCP listener that baton steers (to send new connections to one generation or the other); none is steered here",
        ));
    }
    let health = match (&args.health, &plan) {
        (Some(url), _) => match unix_plan(url) {
            Some(p) => Some(p),
            None => Some(ready::health_plan(url, &listeners).map_err(CliError::usage)?),
        },
        (None, ready::ReadyPlan::Http { .. }) => Some(plan.clone()),
        (None, _) => None,
    };
    if windowed {
        match &health {
            Some(h) => {
                tracing::info!(health = %h.describe(&listeners), "health check during the canary and the observation window")
            }
            None => tracing::info!(
                "no --health: during the canary and the observation window only the new generation's exit rolls it back"
            ),
        }
    }
    let carried_metrics = taken.as_ref().and_then(|t| t.state.metrics);
    let metrics = match (args.metrics, carried_metrics) {
        (Some(addr), Some(raw)) => {
            let fd = self_exec::recv::listener(raw).map_err(fail)?.0;
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l))
                .map(Some)
                .map_err(|e| fail(format!("--metrics {addr}: {e}")))?
        }
        (Some(addr), None) => {
            let l = metrics::bind(addr)
                .map_err(|e| CliError::new(exit::FAILED, anyhow::anyhow!("{e}")))?;
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            Some(l)
        }
        (None, _) => None,
    };
    let metrics_dup = match &metrics {
        Some(l) => {
            Some(baton_sys::fd::dup(l.as_fd()).map_err(|e| fail(format!("--metrics: {e}")))?)
        }
        None => None,
    };
    let carried_control = match &taken {
        Some(t) => Some(self_exec::recv::fd(t.state.control).map_err(fail)?),
        None => None,
    };
    let (rx, run_dir, (_control, control_dup), _pid_file) =
        open_common(&control_path, args.pid_file.as_deref(), carried_control)?;
    let resumed = match taken.as_mut() {
        Some(t) => match upgrade::resume(&mut t.state) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "baton upgrade --self: the serving generation cannot be adopted; starting one");
                None
            }
        },
        None => None,
    };
    let mut memory = baton::admission::MemoryPolicy::default();
    memory.enabled = !args.no_memory_check;
    memory.max_percent = args.max_memory_percent;
    memory.limit = args.memory_limit;
    memory.estimate = args.memory_estimate;
    let cfg = RunConfig {
        name: args.name,
        argv: args.command,
        ready_timeout: args.ready_timeout,
        stop_signal: args.stop_signal,
        drain_timeout: args.drain_timeout,
        run_dir,
        admission: admission::AdmissionConfig {
            check: args
                .check
                .map(|c| vec!["sh".to_owned(), "-c".to_owned(), c]),
            check_timeout: args.check_timeout,
            memory,
            newcomer_oom_score_adj: args.newcomer_oom_score_adj,
        },
        observe: args.observe,
        canary: args.canary,
        canary_percent: args.canary_percent,
        health_interval: args.health_interval,
        steer_quiet: args.steer_quiet,
        health_failures: args.health_failures,
        health_timeout: args.health_timeout,
        front,
        self_exec: self_exec::SelfCtx {
            exe,
            argv: std::env::args_os().collect(),
            control: control_dup,
            metrics: metrics_dup,
            book: std::sync::Mutex::new(book),
        },
    };
    let status = upgrade::run(cfg, listeners, plan, health, rx, signals, metrics, resumed).await;
    // A container's init exits with its app's status; under systemd or a
    // shell, a requested stop is a success.
    Ok(if pid1 {
        ExitCode::from(status.unwrap_or(0))
    } else {
        ExitCode::SUCCESS
    })
}

type Common = (
    mpsc::Receiver<baton::control::Command>,
    PathBuf,
    (ControlSocketFile, OwnedFd),
    Option<PidFile>,
);

/// The control socket (bound, or carried by `baton upgrade --self`), the
/// private directory next to it, the pid file.
fn open_common(
    control_path: &Path,
    pid_file: Option<&Path>,
    carried: Option<OwnedFd>,
) -> Result<Common, CliError> {
    let (tx, rx) = mpsc::channel(64);
    let control = open_control(control_path, tx, carried)
        .map_err(|e| CliError::new(exit::FAILED, anyhow::anyhow!("control socket: {e}")))?;
    tracing::info!(path = %control_path.display(), "control socket");
    let run_dir = control_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let pid_file = match pid_file {
        Some(p) => {
            baton::write_pid_file(p, baton_sys::process::getpid()).map_err(|e| {
                CliError::new(
                    exit::FAILED,
                    anyhow::anyhow!("pid file {}: {e}", p.display()),
                )
            })?;
            Some(PidFile(p.to_path_buf()))
        }
        None => None,
    };
    Ok((rx, run_dir, control, pid_file))
}

/// `baton run --delegate`.
async fn run_delegate(
    args: RunArgs,
    signals: upgrade::Signals,
    control_path: PathBuf,
) -> Result<ExitCode, CliError> {
    let inherited = std::env::var_os("LISTEN_FDS").is_some();
    let listeners = if args.listen.is_empty() && !inherited {
        None
    } else {
        // One shared socket per listener: the server hands them on itself.
        Some(
            sockets::ListenerSet::open(&args.listen, true, baton::DEFAULT_BACKLOG)
                .map_err(|e| CliError::new(exit::FAILED, anyhow::anyhow!("{e}")))?,
        )
    };
    let (rx, run_dir, _control, _pid_file) =
        open_common(&control_path, args.pid_file.as_deref(), None)?;
    let cfg = delegate::DelegateConfig {
        name: args.name,
        argv: args.command,
        ready_timeout: args.ready_timeout,
        stop_signal: args.stop_signal,
        drain_timeout: args.drain_timeout,
        upgrade_signal: args.upgrade_signal,
        app_control: args.app_control,
        run_dir,
    };
    let status = delegate::run(cfg, listeners, rx, signals)
        .await
        .map_err(|e| CliError::new(exit::FAILED, anyhow::anyhow!("{e}")))?;
    Ok(ExitCode::from(status.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_and_names() {
        assert_eq!(parse_signal("TERM").unwrap(), Signal::TERM);
        assert_eq!(parse_signal("sigquit").unwrap(), Signal::QUIT);
        assert_eq!(parse_signal("15").unwrap(), Signal::TERM);
        assert!(parse_signal("STOP").is_err());
        assert_eq!(signal_name(Signal::QUIT), "SIGQUIT");
        assert!(validate_name("web-1.prod").is_ok());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name(".hidden").is_err());
    }
}

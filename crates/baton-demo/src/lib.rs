//! The baton demo server, as a library so that test fixtures can wrap it
//! (the binary is `src/main.rs`).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton::{Baton, Config, HandoffHook, ListenSpec, Schema, StateMode};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

mod plain;
mod routes;
pub mod ws;

/// The version string: `BATON_DEMO_VERSION` at build time, else the crate
/// version. Build twice with different values to watch an upgrade switch
/// versions.
pub const VERSION: &str = match option_env!("BATON_DEMO_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Largest `PUT /kv/{key}` value.
const MAX_KV_VALUE: usize = 1 << 20;
/// Most keys in the cache.
const MAX_KV_KEYS: usize = 100_000;
/// Name of the listener serving `/metrics`.
pub const METRICS_LISTENER: &str = "metrics";
/// Name of the demo's exported state.
pub const STATE_NAME: &str = "demo";
/// The demo's state type name.
pub const STATE_TYPE: &str = "baton-demo.State";

/// Schema v1 of the demo's state: the counter and the cache.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StateV1 {
    /// `POST /counter` count.
    pub counter: u64,
    /// `PUT /kv/{key}` cache.
    #[serde(with = "baton::state::map_as_bytes")]
    pub kv: BTreeMap<String, Vec<u8>>,
}

/// Schema v2 (used by test fixtures): v1 plus the number of migrations it
/// went through.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StateV2 {
    /// `POST /counter` count.
    pub counter: u64,
    /// `PUT /kv/{key}` cache.
    #[serde(with = "baton::state::map_as_bytes")]
    pub kv: BTreeMap<String, Vec<u8>>,
    /// Migrations from v1 this state went through.
    pub migrated_from_v1: u64,
}

/// Largest `POST /echo` body.
const MAX_ECHO: usize = 16 << 20;
/// Longest `GET /slow` delay.
const MAX_SLOW_MS: u64 = 600_000;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// Command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-demo",
    version = VERSION,
    about = "A demo HTTP server that upgrades itself in place with baton.",
    long_about = "A demo HTTP server that upgrades itself in place with baton.\n\n\
        Upgrade it with `kill -USR2 $(cat PIDFILE)` or `baton upgrade --control PATH`: the binary on disk \
        is started, receives the listening sockets and the idle keep-alive connections, and the old \
        process drains and exits. If the new one fails, the old one keeps serving.\n\n\
        Endpoints: GET / (hello, version, generation, pid), GET /version (JSON), GET /slow?ms=N, \
        POST /echo, GET /health, POST|GET /counter, PUT|GET|DELETE /kv/{key}, GET /state. \
        The counter and the key-value cache are carried across upgrades.\n\n\
        With --tls-cert and --tls-key, listeners serve HTTPS (HTTP/2 or HTTP/1.1 by ALPN). Each generation \
        reads the certificate files at start, so replacing them and upgrading rotates the certificate; \
        session-ticket keys are carried to the new generation in memory, so clients resume their TLS \
        sessions. Idle HTTP/1.1 TLS connections move to the new generation with their session keys (no \
        new handshake; --no-tls-handoff turns that off); HTTP/2 TLS connections, and those that \
        cannot move, finish on the old one, closing at moments spread over --close-spread.",
    after_help = "Examples:\n  baton-demo --listen 127.0.0.1:8080 --pid-file demo.pid\n  \
        baton-demo --listen http=[::1]:8080 --listen admin=unix:/tmp/demo.sock --control /tmp/demo/ctl.sock\n  \
        baton-demo --listen http=127.0.0.1:8080 --listen https=127.0.0.1:8443 --tls-listener https \\\n      \
        --tls-cert cert.pem --tls-key key.pem"
)]
pub struct Args {
    /// Where to listen, repeatable: [NAME=]ADDR with ADDR = IP:PORT
    /// (127.0.0.1:8080, [::1]:8080) or unix:/path. An unnamed listener is
    /// called `http`; when several are unnamed, each is named after its
    /// address (http-127.0.0.1-8080, http-unix-run-app.sock). Without
    /// --listen: every socket systemd passes (LISTEN_FDS, whatever their
    /// names), else 127.0.0.1:8080. With --listen, a socket systemd passes
    /// that no --listen names is an error.
    #[arg(long = "listen", value_name = "[NAME=]ADDR", value_parser = parse_listen)]
    pub listen: Vec<ListenSpec>,
    /// Pid file, rewritten atomically by the serving generation.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Time a new generation has to become ready before the upgrade is
    /// rolled back.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_dur)]
    pub ready_timeout: Duration,
    /// Time the old generation has to finish its connections after
    /// promotion.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_dur)]
    pub drain_timeout: Duration,
    /// Control socket for `baton upgrade|status|stop --control PATH` (its
    /// directory is created 0700 if missing).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// State snapshot mode: `live` (keep serving until promotion; writes
    /// after the snapshot are lost) or `exact` (pause at the snapshot; none
    /// lost).
    #[arg(long, value_enum, default_value = "live")]
    pub state_mode: StateModeArg,
    /// Largest state (bytes) this generation accepts from its predecessor.
    #[arg(long, value_name = "BYTES", default_value_t = baton::DEFAULT_STATE_LIMIT)]
    pub state_limit: u64,
    /// Pre-flight check run (with `sh -c`) before every upgrade; it must
    /// exit 0, e.g. `"/srv/app/bin/app --config-test"`.
    #[arg(long, value_name = "CMD")]
    pub check: Option<String>,
    /// Refuse an upgrade that would bring memory use above this share of the
    /// tightest limit (cgroup v2/v1, else the machine).
    #[arg(long, value_name = "PCT", default_value_t = baton::admission::DEFAULT_MAX_MEMORY_PERCENT)]
    pub max_memory_percent: f64,
    /// Use this memory limit instead of the cgroup's or the machine's.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Assume the new generation needs this much memory (default: what the
    /// current generation's process tree uses, PSS).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub memory_estimate: Option<u64>,
    /// Skip the memory headroom check.
    #[arg(long)]
    pub no_memory_check: bool,
    /// Observation window after promotion: the old generation stops accepting
    /// but stays ready to resume until it ends (0 = off).
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_dur)]
    pub observe: Duration,
    /// Health URL polled during the observation window, e.g.
    /// http://127.0.0.1:8080/health.
    #[arg(long, value_name = "URL")]
    pub health: Option<String>,
    /// Interval between health checks.
    #[arg(long, value_name = "DUR", default_value = "250ms", value_parser = parse_dur)]
    pub health_interval: Duration,
    /// Consecutive failed health checks that roll the new generation back.
    #[arg(long, value_name = "N", default_value_t = baton::observe::HEALTH_FAILURES_TO_ROLL_BACK, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_failures: u32,
    /// How long one health check may take.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_dur)]
    pub health_timeout: Duration,
    /// Canary: both generations accept for DUR; the new one is promoted only
    /// if its 5xx rate is not worse than the old one's (refused with state
    /// handoff).
    #[arg(long, value_name = "DUR", value_parser = parse_dur)]
    pub canary: Option<Duration>,
    /// Canary: requests the new generation must serve to be judged.
    #[arg(long, value_name = "N", default_value_t = baton::observe::DEFAULT_CANARY_MIN_REQUESTS)]
    pub canary_min_requests: u64,
    /// Canary: allowed increase of the 5xx rate, in percentage points.
    #[arg(long, value_name = "POINTS", default_value_t = baton::observe::DEFAULT_CANARY_MAX_ERROR_INCREASE * 100.0)]
    pub canary_max_error_increase: f64,
    /// Canary: how many times the window is extended when the new generation
    /// served fewer than --canary-min-requests; after that it is rolled back
    /// (0: roll back at once).
    #[arg(long, value_name = "N", default_value_t = baton::observe::DEFAULT_CANARY_EXTENSIONS)]
    pub canary_extensions: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (a listener like the
    /// others: handed over at each upgrade). Counters are cumulative across
    /// upgrades.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<baton::ListenAddr>,
    /// Do not export or import the demo state (counter, cache).
    #[arg(long)]
    pub no_state: bool,
    /// Serve HTTPS with this PEM certificate chain (leaf first). Read
    /// afresh by every generation: replace the file and upgrade to rotate
    /// the certificate; a missing or malformed file makes the upgrade roll
    /// back.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve TLS only on the listener with this name (repeatable); the
    /// others stay plain HTTP. Default: every listener serves TLS.
    #[arg(long = "tls-listener", value_name = "NAME", requires = "tls_cert")]
    pub tls_listeners: Vec<String>,
    /// During an upgrade, TLS connections close (HTTP/1.1: `Connection:
    /// close` or `close_notify`; HTTP/2: GOAWAY) at moments spread over this
    /// window after the new generation serves [default: 1s].
    #[arg(long, value_name = "DUR", value_parser = parse_dur)]
    pub close_spread: Option<Duration>,
    /// How often the TLS session-ticket key changes; tickets stay valid for
    /// one to two periods, across upgrades [default: 6h].
    #[arg(long, value_name = "DUR", value_parser = parse_dur)]
    pub tls_ticket_rotation: Option<Duration>,
    /// Do not take over the previous generation's HTTP/1.1 TLS connections
    /// (by default they move here with their session keys, no new
    /// handshake): it then ends them politely, as it does HTTP/2 ones.
    #[arg(long, requires = "tls_cert")]
    pub no_tls_handoff: bool,
    /// Benchmark aid: once ready, allocate and touch this many MiB, so that
    /// this generation is a parent with a large resident set at its next
    /// upgrade (the cost of starting a child must not grow with it).
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub ballast_mib: usize,
    /// Log filter, e.g. `info`, `debug`, `baton=debug,info`.
    #[arg(long, value_name = "FILTER", default_value = "info", env = "BATON_LOG")]
    pub log: String,
    /// Benchmark baseline: serve the same handler with plain hyper
    /// (hyper-util's auto builder), no baton at all: no upgrade, no handoff,
    /// no state. Takes fd 3 when `LISTEN_FDS=1` and `LISTEN_PID` is this
    /// process (systemd / `baton run`), else binds the first `--listen`
    /// address (TCP). SIGTERM/SIGINT: stop accepting, close idle
    /// connections, finish the others (up to `--drain-timeout`), exit.
    #[arg(long)]
    pub plain: bool,
}

/// `--state-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateModeArg {
    /// Keep serving until promotion.
    Live,
    /// Pause at the snapshot.
    Exact,
}

fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    s.parse().map_err(|e: baton::Error| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    baton::parse_bytes(s).map_err(|e| e.to_string())
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    baton::parse_duration(s).map_err(|e| e.to_string())
}

/// Set up logging to stderr.
pub fn init_logging(format: LogFormat, filter: &str) {
    use tracing_subscriber::prelude::*;
    let targets: tracing_subscriber::filter::Targets = filter.parse().unwrap_or_else(|_| {
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(targets);
    match format {
        LogFormat::Human => registry.with(fmt.with_target(false)).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
}

/// Answers some requests instead of the demo's routes (fixtures).
pub type Intercept = Arc<dyn Fn(&Request<Incoming>) -> Option<Response<Full<Bytes>>> + Send + Sync>;

/// Hooks for test fixtures built on the demo.
#[derive(Default)]
pub struct Custom {
    /// Version string to report instead of [`VERSION`].
    pub version: Option<String>,
    /// Handoff hook (fault injection).
    pub handoff_hook: Option<HandoffHook>,
    /// Run after listeners are set up, before `ready()`; an `Err` is
    /// reported to the old generation as the reason for failing.
    #[allow(clippy::type_complexity)]
    pub before_ready: Option<Box<dyn FnOnce(&Baton) -> Result<(), String> + Send>>,
    /// Answer some requests differently (e.g. inject errors); `None` falls
    /// through to the demo's routes.
    pub intercept: Option<Intercept>,
    /// State schema version to write and read (default 1; 2 migrates from
    /// 1; anything else reads only itself).
    pub state_schema: Option<u32>,
    /// Export garbage instead of the state (fault injection).
    pub export_garbage: bool,
    /// Put this many filler bytes in the cache at start (large-state tests).
    pub state_fill: Option<usize>,
    /// Override `--state-limit`.
    pub state_limit: Option<u64>,
    /// Kind of the `/ws` connections (default [`ws::WS_KIND`]): another one
    /// does not take the previous generation's WebSockets.
    pub ws_kind: Option<String>,
    /// Act as `--no-tls-handoff` (a fixture then registers the TLS kind
    /// itself, e.g. with a check that refuses every batch).
    pub no_tls_handoff: bool,
}

impl std::fmt::Debug for Custom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Custom")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

struct App {
    /// `None` in `--plain` mode.
    baton: Option<Baton>,
    requests: Arc<std::sync::atomic::AtomicU64>,
    version: String,
    generation: u64,
    pid: u32,
    state: Arc<Mutex<StateV2>>,
    intercept: Option<Intercept>,
    /// `GET /ws` (absent in `--plain` mode).
    ws: Option<baton_http::ws::Endpoint>,
}

/// Parse the command line and run the demo server. Returns the process
/// exit code.
pub fn main_with(custom: Custom) -> ExitCode {
    use clap::Parser;
    baton::trace::step("new: main");
    let args = Args::parse();
    baton::trace::step("new: args parsed");
    init_logging(args.log_format, &args.log);
    baton::trace::step("new: logging set up");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            baton::trace::step("new: runtime built");
            rt
        }
        Err(e) => {
            eprintln!("baton-demo: cannot start the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args, custom)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// Run the demo server until it is upgraded away or stopped.
///
/// # Errors
/// Start-up failures (listeners, handoff, readiness).
pub async fn run(mut args: Args, mut custom: Custom) -> anyhow::Result<()> {
    args.no_tls_handoff |= custom.no_tls_handoff;
    let version = custom.version.clone().unwrap_or_else(|| VERSION.to_owned());
    if args.plain {
        return plain::run(args, version, custom.intercept.take()).await;
    }
    let mut config = Config::default();
    config.ready_timeout = args.ready_timeout;
    config.drain_timeout = args.drain_timeout;
    config.pid_file = args.pid_file.clone();
    config.control_socket = args.control.clone();
    config.app_version = version.clone();
    config.handoff_hook = custom.handoff_hook.take();
    config.state_limit = custom.state_limit.unwrap_or(args.state_limit);
    config.state_mode = match args.state_mode {
        StateModeArg::Live => StateMode::Live,
        StateModeArg::Exact => StateMode::Exact,
    };
    config.check_command = args
        .check
        .as_ref()
        .map(|c| vec!["/bin/sh".to_owned(), "-c".to_owned(), c.clone()]);
    config.memory.enabled = !args.no_memory_check;
    config.memory.max_percent = args.max_memory_percent;
    config.memory.limit = args.memory_limit;
    config.memory.estimate = args.memory_estimate;
    config.observe = args.observe;
    config.health_url = args.health.clone();
    config.health_interval = args.health_interval;
    config.health_failures = args.health_failures;
    config.health_timeout = args.health_timeout;
    config.canary = args.canary.map(|w| {
        let mut c = baton::observe::CanaryPolicy::new(w);
        c.min_requests = args.canary_min_requests;
        c.max_error_increase = args.canary_max_error_increase / 100.0;
        c.extensions = args.canary_extensions;
        c
    });
    let baton = Baton::start(config).await?;
    baton::trace::step("new: Baton::start returned");

    let listeners = match open_listeners(&args, &baton) {
        Ok(l) => l,
        Err(e) => {
            baton.fail(&e.to_string()).await;
            return Err(e.into());
        }
    };
    let names: Vec<String> = listeners.iter().map(|l| l.name().to_owned()).collect();
    baton::trace::step("new: listeners opened");

    let tls = match load_tls(&args, &names, &baton).await {
        Ok(tls) => tls,
        Err(e) => {
            // Before ready(): the upgrade rolls back with this reason.
            baton.fail(&e.to_string()).await;
            return Err(e);
        }
    };

    // Everything that does not depend on state is ready: now import it (the
    // old generation snapshots as late as possible).
    let schema_version = custom.state_schema.unwrap_or(1);
    let state = if args.no_state {
        Ok(None)
    } else {
        import_state(&baton, schema_version).await
    };
    let state = match state {
        Ok(s) => s,
        Err(e) => {
            baton.fail(&e.to_string()).await;
            return Err(e.into());
        }
    };
    let mut state = state.unwrap_or_default();
    if let Some(n) = custom.state_fill {
        state.kv.insert("__filler".into(), vec![0x5a; n]);
    }
    tracing::info!(counter = state.counter, keys = state.kv.len(), "state");
    let state = Arc::new(Mutex::new(state));
    if !args.no_state {
        export_state(&baton, &state, schema_version, custom.export_garbage);
    }

    let requests = baton.carried_counter(
        "demo_requests",
        "Requests answered by baton-demo, across upgrades",
    )?;
    let ws_kind = custom.ws_kind.take();
    let ws = ws::endpoint(&baton, ws_kind.as_deref().unwrap_or(ws::WS_KIND))?;
    let app = Arc::new(App {
        ws: Some(ws),
        baton: Some(baton.clone()),
        requests,
        version,
        generation: baton.generation(),
        pid: std::process::id(),
        state,
        intercept: custom.intercept.take(),
    });
    let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&app), req));
    let server = baton_http::Server::new(&baton, svc);
    for l in listeners {
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        match &tls {
            Some((tls, names)) if names.is_empty() || names.iter().any(|n| n == l.name()) => {
                tracing::info!(listener = l.name(), %addr, "listening (HTTPS)");
                server.serve_tls(l, tls);
            }
            _ => {
                tracing::info!(listener = l.name(), %addr, "listening");
                server.serve(l);
            }
        }
    }

    baton::trace::step("new: serving tasks spawned");
    // Signal handlers before readiness: a deploy script may signal as soon as
    // the pid file changes.
    install_stop_signals(&baton)?;

    if let Some(f) = custom.before_ready.take()
        && let Err(reason) = f(&baton)
    {
        baton.fail(&reason).await;
        anyhow::bail!("start-up failed: {reason}");
    }
    baton.ready().await?;
    // Touched page by page, after ready (not to delay it), kept until exit.
    let ballast = (args.ballast_mib > 0).then(|| {
        let mut b = vec![0u8; args.ballast_mib << 20];
        for page in b.chunks_mut(4096) {
            page[0] = 1;
        }
        tracing::info!(mib = args.ballast_mib, "ballast resident");
        b
    });
    baton.done().await;
    drop(ballast);
    tracing::info!(generation = baton.generation(), "exiting");
    Ok(())
}

fn lock_state(m: &Mutex<StateV2>) -> std::sync::MutexGuard<'_, StateV2> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn import_state(baton: &Baton, version: u32) -> Result<Option<StateV2>, baton::Error> {
    let schema = Schema::new(STATE_TYPE, version);
    match version {
        1 => Ok(baton
            .import_state::<StateV1>(STATE_NAME, schema)
            .await?
            .map(|v1| StateV2 {
                counter: v1.counter,
                kv: v1.kv,
                migrated_from_v1: 0,
            })),
        2 => {
            let migrate = |old: u32, payload: &[u8]| -> Result<StateV2, String> {
                if old != 1 {
                    return Err(format!("no migration from v{old}"));
                }
                let v1: StateV1 = postcard_decode(payload)?;
                Ok(StateV2 {
                    counter: v1.counter,
                    kv: v1.kv,
                    migrated_from_v1: 1,
                })
            };
            baton
                .import_state_with(STATE_NAME, schema, Some(migrate))
                .await
        }
        _ => baton.import_state::<StateV2>(STATE_NAME, schema).await,
    }
}

fn postcard_decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    // The demo does not depend on postcard directly: baton's envelope
    // helpers decode a payload of the given schema.
    baton::state::decode_payload(b).map_err(|e| e.to_string())
}

fn export_state(baton: &Baton, state: &Arc<Mutex<StateV2>>, version: u32, garbage: bool) {
    if garbage {
        baton.export_raw(STATE_NAME, || Ok(b"\x07this is not an envelope".to_vec()));
        return;
    }
    let schema = Schema::new(STATE_TYPE, version);
    let st = Arc::clone(state);
    if version == 1 {
        baton.export_state(STATE_NAME, schema, move || {
            let s = lock_state(&st);
            StateV1 {
                counter: s.counter,
                kv: s.kv.clone(),
            }
        });
    } else {
        baton.export_state(STATE_NAME, schema, move || lock_state(&st).clone());
    }
}

/// The listeners to serve, `/metrics`'s included (taken first, by name).
/// With `--listen`: those, unnamed ones named by address when there are
/// several. Without: every socket inherited (systemd's `LISTEN_FDS`, or the
/// previous generation's), else the default address.
fn open_listeners(args: &Args, baton: &Baton) -> Result<Vec<baton::Listener>, baton::Error> {
    let mut listeners = Vec::with_capacity(args.listen.len() + 1);
    if let Some(addr) = &args.metrics {
        listeners.push(baton.listen(METRICS_LISTENER, addr)?);
    }
    if args.listen.is_empty() {
        let inherited = baton.listen_inherited()?;
        if inherited.is_empty() {
            listeners.push(baton.listen(baton::DEFAULT_LISTENER_NAME, &DEFAULT_LISTEN.parse()?)?);
        } else {
            listeners.extend(inherited);
        }
        return Ok(listeners);
    }
    let mut specs = args.listen.clone();
    baton::name_listeners(&mut specs)?;
    for s in &specs {
        listeners.push(baton.listen_spec(s)?);
    }
    Ok(listeners)
}

/// The address served when neither `--listen` nor an inherited socket says
/// otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Load the TLS settings if asked for: the certificate files, and the
/// session-ticket keys of the previous generation. Returns them with the
/// names of the listeners that serve TLS (empty: all).
async fn load_tls(
    args: &Args,
    listeners: &[String],
    baton: &Baton,
) -> anyhow::Result<Option<(baton_http::Tls, Vec<String>)>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    for name in &args.tls_listeners {
        if !listeners.iter().any(|l| l == name) {
            anyhow::bail!(
                "--tls-listener {name}: there is no listener named {name} (see --listen NAME=ADDR)"
            );
        }
    }
    let mut cfg = baton_http::TlsConfig::new(cert, key);
    if let Some(d) = args.close_spread {
        cfg.close_spread = d;
    }
    if let Some(d) = args.tls_ticket_rotation {
        cfg.ticket_rotation = d;
    }
    cfg.take_connections = !args.no_tls_handoff;
    if cfg.close_spread >= args.drain_timeout {
        anyhow::bail!(
            "--close-spread ({:?}) must be shorter than --drain-timeout ({:?}): TLS connections \
             still open at the drain deadline are cut",
            cfg.close_spread,
            args.drain_timeout
        );
    }
    let tls = baton_http::Tls::load(baton, cfg).await?;
    Ok(Some((tls, args.tls_listeners.clone())))
}

fn install_stop_signals(baton: &Baton) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let b = baton.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: graceful stop"),
            _ = int.recv() => tracing::info!("SIGINT: graceful stop"),
        }
        b.shutdown().await;
    });
    Ok(())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    app.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if req
        .extensions()
        .get::<baton_http::ConnInfo>()
        .is_some_and(|i| &*i.listener == METRICS_LISTENER)
    {
        return Ok(match (req.uri().path(), &app.baton) {
            ("/metrics", Some(baton)) => {
                let mut r = text(StatusCode::OK, baton.metrics_text());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            _ => text(StatusCode::NOT_FOUND, "only /metrics here\n"),
        });
    }
    if let Some(f) = &app.intercept
        && let Some(r) = f(&req)
    {
        return Ok(r);
    }
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => text(
            StatusCode::OK,
            format!(
                "hello from baton-demo {} generation {} pid {}\n",
                app.version, app.generation, app.pid
            ),
        ),
        (&Method::GET, "/version") => {
            let info = req.extensions().get::<baton_http::ConnInfo>();
            let body = serde_json::json!({
                "version": app.version,
                "generation": app.generation,
                "pid": app.pid,
                "peer": info.map(baton_http::ConnInfo::peer_string),
                "handed_over": info.map(|i| i.handed_over),
                "tls": info.map(|i| i.tls),
                "http": format!("{:?}", req.version()),
            });
            let mut r = text(StatusCode::OK, format!("{body}\n"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        (&Method::GET, "/health") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/counter") => {
            let v = {
                let mut s = lock_state(&app.state);
                s.counter += 1;
                s.counter
            };
            text(StatusCode::OK, format!("{v}\n"))
        }
        (&Method::GET, "/counter") => text(
            StatusCode::OK,
            format!("{}\n", lock_state(&app.state).counter),
        ),
        (&Method::GET, "/state") => {
            let s = lock_state(&app.state);
            let body = serde_json::json!({
                "counter": s.counter,
                "keys": s.kv.len(),
                "migrated_from_v1": s.migrated_from_v1,
                "generation": app.generation,
            });
            text(StatusCode::OK, format!("{body}\n"))
        }
        // The routes that wait (for a body, a timer) keep their state in a
        // boxed future of their own: inline, it would double the size of
        // every request's future, which the serving layers move by value on
        // the hot path (the per-request cost the steady benchmark saw).
        (method, path) if path.starts_with("/kv/") => {
            let (method, key) = (method.clone(), path[4..].to_owned());
            Box::pin(async move { routes::kv(&app, method, key, req).await }).await
        }
        (&Method::GET, "/upgrade") => routes::echo_upgrade(req),
        (&Method::GET, "/ws") => match &app.ws {
            Some(ws) => ws.upgrade(req),
            None => text(StatusCode::NOT_FOUND, "no WebSockets in --plain mode\n"),
        },
        (&Method::GET, "/slow") => {
            let ms = query_u64(&req, "ms").unwrap_or(1000).min(MAX_SLOW_MS);
            Box::pin(tokio::time::sleep(Duration::from_millis(ms))).await;
            text(
                StatusCode::OK,
                format!(
                    "slept {ms} ms in generation {} pid {}\n",
                    app.generation, app.pid
                ),
            )
        }
        (&Method::POST, "/echo") => {
            match Box::pin(Limited::new(req.into_body(), MAX_ECHO).collect()).await {
                Ok(b) => {
                    let mut r = Response::new(Full::new(b.to_bytes()));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/octet-stream"),
                    );
                    r
                }
                Err(e) => text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("cannot read the body: {e}\n"),
                ),
            }
        }
        (
            _,
            "/" | "/version" | "/health" | "/slow" | "/echo" | "/counter" | "/state" | "/upgrade"
            | "/ws",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

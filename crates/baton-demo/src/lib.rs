//! The baton demo server, as a library so that test fixtures can wrap it
//! (the binary is `src/main.rs`).

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use baton::{Baton, Config, HandoffHook, ListenSpec};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

/// The version string: `BATON_DEMO_VERSION` at build time, else the crate
/// version. Build twice with different values to watch an upgrade switch
/// versions.
pub const VERSION: &str = match option_env!("BATON_DEMO_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

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
        POST /echo, GET /health.\n\n\
        With --tls-cert and --tls-key, listeners serve HTTPS (HTTP/2 or HTTP/1.1 by ALPN). Each generation \
        reads the certificate files at start, so replacing them and upgrading rotates the certificate; \
        session-ticket keys are carried to the new generation in memory, so clients resume their TLS \
        sessions. TLS connections cannot move to the new generation: they finish on the old one, \
        closing at moments spread over --close-spread.",
    after_help = "Examples:\n  baton-demo --listen 127.0.0.1:8080 --pid-file demo.pid\n  \
        baton-demo --listen http=[::1]:8080 --listen admin=unix:/tmp/demo.sock --control /tmp/demo/ctl.sock\n  \
        baton-demo --listen http=127.0.0.1:8080 --listen https=127.0.0.1:8443 --tls-listener https \\\n      \
        --tls-cert cert.pem --tls-key key.pem"
)]
pub struct Args {
    /// Where to listen, repeatable: [NAME=]ADDR with ADDR = IP:PORT
    /// (127.0.0.1:8080, [::1]:8080) or unix:/path. An unnamed listener is
    /// called `http`. Default: 127.0.0.1:8080.
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
    /// Log filter, e.g. `info`, `debug`, `baton=debug,info`.
    #[arg(long, value_name = "FILTER", default_value = "info", env = "BATON_LOG")]
    pub log: String,
}

fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    s.parse().map_err(|e: baton::Error| e.to_string())
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
    #[allow(clippy::type_complexity)]
    pub intercept:
        Option<Arc<dyn Fn(&Request<Incoming>) -> Option<Response<Full<Bytes>>> + Send + Sync>>,
}

impl std::fmt::Debug for Custom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Custom")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

struct App {
    version: String,
    generation: u64,
    pid: u32,
    intercept: Option<Intercept>,
}

/// Parse the command line and run the demo server. Returns the process
/// exit code.
pub fn main_with(custom: Custom) -> ExitCode {
    use clap::Parser;
    let args = Args::parse();
    init_logging(args.log_format, &args.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
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
pub async fn run(args: Args, mut custom: Custom) -> anyhow::Result<()> {
    let version = custom.version.clone().unwrap_or_else(|| VERSION.to_owned());
    let mut config = Config::default();
    config.ready_timeout = args.ready_timeout;
    config.drain_timeout = args.drain_timeout;
    config.pid_file = args.pid_file.clone();
    config.control_socket = args.control.clone();
    config.app_version = version.clone();
    config.handoff_hook = custom.handoff_hook.take();
    let baton = Baton::start(config).await?;

    let specs = if args.listen.is_empty() {
        vec!["127.0.0.1:8080".parse::<ListenSpec>()?]
    } else {
        args.listen.clone()
    };
    let mut listeners = Vec::with_capacity(specs.len());
    for s in &specs {
        match baton.listen(&s.name, &s.addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                baton.fail(&e.to_string()).await;
                return Err(e.into());
            }
        }
    }

    let tls = match load_tls(&args, &specs, &baton).await {
        Ok(tls) => tls,
        Err(e) => {
            // Before ready(): the upgrade rolls back with this reason.
            baton.fail(&e.to_string()).await;
            return Err(e);
        }
    };

    let app = Arc::new(App {
        version,
        generation: baton.generation(),
        pid: std::process::id(),
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
    baton.done().await;
    tracing::info!(generation = baton.generation(), "exiting");
    Ok(())
}

/// Load the TLS settings if asked for: the certificate files, and the
/// session-ticket keys of the previous generation. Returns them with the
/// names of the listeners that serve TLS (empty: all).
async fn load_tls(
    args: &Args,
    specs: &[ListenSpec],
    baton: &Baton,
) -> anyhow::Result<Option<(baton_http::Tls, Vec<String>)>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    for name in &args.tls_listeners {
        if !specs.iter().any(|s| &s.name == name) {
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
        (&Method::GET, "/slow") => {
            let ms = query_u64(&req, "ms").unwrap_or(1000).min(MAX_SLOW_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(
                StatusCode::OK,
                format!(
                    "slept {ms} ms in generation {} pid {}\n",
                    app.generation, app.pid
                ),
            )
        }
        (&Method::POST, "/echo") => match Limited::new(req.into_body(), MAX_ECHO).collect().await {
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
        },
        (_, "/" | "/version" | "/health" | "/slow" | "/echo") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

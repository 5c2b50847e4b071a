//! `baton`: zero-downtime upgrades for servers in any language.
//!
//! * `baton run … -- CMD` supervises a server that takes its listening
//!   sockets systemd-style (`LISTEN_FDS`), and upgrades it in place: the next
//!   generation starts on the same sockets, new connections are steered to it
//!   once it is ready, and only then is the old one stopped.
//! * `baton upgrade|status|stop` talk to `baton run` or to a library-mode
//!   server (`baton-demo --control PATH`) over the same control socket.
//!
//! Exit codes are documented in [`exit`] and in `--help`.

#![forbid(unsafe_code)]

mod client;
mod exit;
mod front;
mod shim;
mod supervisor;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Top-level `--help` text after the list of commands.
const AFTER_HELP: &str = "\
Examples:
  baton run --name web --listen http=0.0.0.0:8080 -- gunicorn app:app
  baton run --listen 127.0.0.1:8000 --ready http://127.0.0.1:8000/health -- uvicorn --fd 3 app:app
  baton upgrade --name web              # or: kill -HUP <pid of baton run>
  baton upgrade --name web -- gunicorn --workers 8 app:app
  baton upgrade --self --name web       # baton itself: exec in place, same pid, app kept
  baton status --name web --json

Exit codes of upgrade/status/stop:
  0 success, 1 upgrade failed and rolled back, 2 usage, 3 refused,
  4 another upgrade in progress, 5 cannot connect, 6 timeout, 7 internal error";

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Zero-downtime in-place upgrades for servers in any language.",
    long_about = "Zero-downtime in-place upgrades for servers in any language.\n\n\
        `baton run` owns the listening sockets and starts your server with systemd-style socket \
        activation (LISTEN_FDS, fds 3..). `baton upgrade` (or SIGHUP to `baton run`) starts the \
        next generation on the same sockets, waits until it is ready, steers new connections to \
        it, and only then stops the old one. If the new one fails, the old one keeps serving.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Log format (stderr).
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    /// Log filter, e.g. `info`, `debug`, `baton=debug,info`.
    #[arg(
        long,
        value_name = "FILTER",
        default_value = "info",
        env = "BATON_LOG",
        global = true
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One human-readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Supervise a server: own its sockets, start it, upgrade it in place.
    Run(Box<supervisor::RunArgs>),
    /// Upgrade a running server (`baton run` or a library-mode server).
    #[command(after_help = exit::HELP)]
    Upgrade(UpgradeArgs),
    /// Show the serving generation, its pid, listeners and the last upgrade.
    #[command(after_help = exit::HELP)]
    Status(StatusArgs),
    /// Stop a running server gracefully.
    #[command(after_help = exit::HELP)]
    Stop(StopArgs),
    /// Internal: set LISTEN_PID to our own pid and exec the app.
    #[command(name = "__exec-shim", hide = true)]
    ExecShim(shim::ShimArgs),
}

/// Which control socket to talk to.
#[derive(Debug, clap::Args)]
struct Target {
    /// Control socket path.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    control: Option<PathBuf>,
    /// Service name: the control socket is $RUNTIME_DIRECTORY/NAME.sock,
    /// else $XDG_RUNTIME_DIR/baton/NAME.sock, else /run/baton/NAME.sock (root).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

impl Target {
    fn path(&self) -> Result<PathBuf, exit::CliError> {
        if let Some(p) = &self.control {
            return Ok(p.clone());
        }
        let name = self.name.as_deref().unwrap_or(supervisor::DEFAULT_NAME);
        supervisor::validate_name(name).map_err(exit::CliError::usage)?;
        Ok(baton::control::default_socket_path(name))
    }
}

#[derive(Debug, clap::Args)]
struct UpgradeArgs {
    #[command(flatten)]
    target: Target,
    /// Print one JSON object with the result on stdout (progress goes to
    /// stderr).
    #[arg(long)]
    json: bool,
    /// Give up waiting after this long (the upgrade itself may still finish;
    /// check with `baton status`).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = parse_dur)]
    timeout: Duration,
    /// Refuse (exit 3) unless the new executable's SHA-256 is HEX; the file
    /// is hashed through an open fd and that very fd is executed, so it
    /// cannot be swapped in between.
    #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
    expect_sha256: Option<String>,
    /// `baton run` only: while a generation is starting (the first start, or
    /// a restart after a crash), refuse at once (exit 4) instead of waiting
    /// for it to be ready (bounded by its --ready-timeout) and then
    /// upgrading.
    #[arg(long)]
    no_wait: bool,
    /// Upgrade baton itself, not the app (`baton run` only): once the
    /// front's requests in flight are done (at most --drain-timeout; new
    /// ones wait in the kernel), baton execs the baton binary now at its
    /// path, in place: same pid, the app stays its child and keeps running,
    /// the listeners, the control socket and --front's idle client
    /// connections are carried over. Waits for the new baton to answer and
    /// prints its version and exec count. If the exec fails, baton keeps
    /// running as before (exit 1); see docs/supervisor.md.
    #[arg(long = "self", conflicts_with_all = ["expect_sha256", "no_wait", "command"])]
    self_: bool,
    /// A new command line for the next generation (`baton run` only).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// Give up waiting after this long.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_dur)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct StopArgs {
    #[command(flatten)]
    target: Target,
    /// Give up waiting for the answer after this long.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_dur)]
    timeout: Duration,
}

fn parse_sha256(s: &str) -> Result<String, String> {
    let h = s.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(format!(
            "'{s}' is not a SHA-256: 64 hex digits, as `sha256sum FILE` prints"
        ))
    }
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    baton::parse_duration(s).map_err(|e| e.to_string())
}

fn init_logging(format: LogFormat, filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let targets: tracing_subscriber::filter::Targets = filter.parse().unwrap_or_else(|_| {
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(targets);
    match format {
        LogFormat::Human => registry.with(fmt.with_target(false)).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, exit::CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // SIGHUP, SIGTERM and SIGINT go to the main thread only: `baton
        // upgrade --self` blocks them there across the exec, and one taken
        // meanwhile by a blocking-pool thread's handler would be lost with
        // the old image.
        .on_thread_start(|| {
            if let Err(e) = baton_sys::process::block_handled_signals(true) {
                tracing::warn!(error = %e, "could not block SIGHUP/SIGTERM/SIGINT in a runtime thread");
            }
        })
        .build()
        .map_err(|e| exit::CliError::internal(anyhow::anyhow!("starting the runtime: {e}")))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version on stdout (exit 0) and errors on
            // stderr (exit 2 = usage, as documented).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Command::ExecShim(args) = cli.command {
        // No logging, no runtime: this process becomes the app.
        return shim::main(args);
    }
    let client_cmd = !matches!(cli.command, Command::Run(_));
    // Client commands log only problems unless asked.
    let filter = if client_cmd && std::env::var_os("BATON_LOG").is_none() && cli.log == "info" {
        "warn"
    } else {
        cli.log.as_str()
    };
    init_logging(cli.log_format, filter);
    // `baton upgrade --self`: the state the previous image of this process
    // left, read before the sweep below (if this image cannot read it, it
    // goes back to the previous one with every inherited fd still open).
    let taken = if matches!(cli.command, Command::Run(_)) {
        supervisor::self_exec::recv::take()
    } else {
        None
    };
    if !client_cmd {
        // Before the runtime opens fds of its own.
        supervisor::cloexec_inherited_fds();
    }
    let result = runtime().and_then(|rt| {
        rt.block_on(async move {
            match cli.command {
                Command::Run(args) => supervisor::run(*args, taken).await,
                Command::Upgrade(a) if a.self_ => {
                    let path = a.target.path()?;
                    client::upgrade_self(&path, a.json, a.timeout).await
                }
                Command::Upgrade(a) => {
                    let path = a.target.path()?;
                    client::upgrade(
                        &path,
                        a.json,
                        a.timeout,
                        a.expect_sha256,
                        a.no_wait,
                        a.command,
                    )
                    .await
                }
                Command::Status(a) => {
                    let path = a.target.path()?;
                    client::status(&path, a.json, a.timeout).await
                }
                Command::Stop(a) => {
                    let path = a.target.path()?;
                    client::stop(&path, a.timeout).await
                }
                Command::ExecShim(_) => Ok(ExitCode::SUCCESS),
            }
        })
    });
    match result {
        Ok(code) => code,
        Err(e) => e.report(),
    }
}

//! `baton-sidecar`: the release side of an in-place Kubernetes rollout.
//!
//! The app container runs its server under baton (`baton run --delegate`,
//! or `baton run` for a server in any language) from
//! `APP/current/BINARY`; this sidecar shares `APP` (an `emptyDir`) and the
//! control socket's directory with it, as the same uid. It polls a release
//! marker (a ConfigMap key or a pod annotation, mounted as a file; see
//! [`marker`]) and, when the marker names another release:
//!
//! 1. **delivers** the executable from its `source` (a mounted volume)
//!    to `APP/releases/RELEASE/BINARY`, and **verifies** its SHA-256 — a
//!    mismatch is refused and reported, nothing changes;
//! 2. **flips** `APP/current` to `releases/RELEASE`;
//! 3. **upgrades** the server over its control socket, pinning the same
//!    SHA-256 (the server hashes the file through an open fd and executes
//!    that fd);
//! 4. **reports** in the status file (see [`status`]): `upgraded`, or
//!    `rolled_back` / `refused` with the reason after flipping `current`
//!    back, or `retrying` for what may pass.
//!
//! The pod is never restarted and its listening sockets never close, so
//! its readiness and liveness probes stay green through the upgrade.
//!
//! Exit codes: `watch` runs until killed (1 if it cannot write its status
//! file at start, 2 for bad arguments); `probe` exits 0 when the status
//! meets what is asked, 1 (with the reason) when it does not;
//! `check-marker` exits 0 for a marker that names a release, 1 otherwise.

#![forbid(unsafe_code)]

mod deliver;
mod marker;
mod status;
mod upgrade;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The release side of an in-place Kubernetes rollout with baton.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Watch the release marker; deliver, verify, flip current and upgrade
    /// when it changes; report in the status file.
    Watch(WatchArgs),
    /// Check the status file (for a Kubernetes probe or a rollout walker).
    Probe(ProbeArgs),
    /// Check a release marker (e.g. in CI, before committing it to the
    /// GitOps repository): print the release, or what is wrong.
    CheckMarker {
        /// The marker file.
        path: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct WatchArgs {
    /// The release marker: `release=NAME sha256=HEX source=file:///PATH`.
    #[arg(long, value_name = "PATH")]
    marker: PathBuf,
    /// The app directory shared with the server: releases/ and current.
    #[arg(long, value_name = "DIR")]
    app_dir: PathBuf,
    /// The executable's file name inside a release directory (the server
    /// runs APP_DIR/current/BINARY).
    #[arg(long, value_name = "NAME")]
    binary: String,
    /// The server's control socket (baton run's, or the library-mode
    /// server's).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// The status file this sidecar writes.
    #[arg(long, value_name = "PATH")]
    status: PathBuf,
    /// Time between two reads of the marker [default: 2s].
    #[arg(long, value_name = "DUR", value_parser = duration)]
    poll: Option<Duration>,
    /// Time before a release that could not be applied for a reason that
    /// may pass (server unreachable, another upgrade in progress) is tried
    /// again [default: 30s].
    #[arg(long, value_name = "DUR", value_parser = duration)]
    retry_after: Option<Duration>,
    /// Bound on one upgrade [default: 5m].
    #[arg(long, value_name = "DUR", value_parser = duration)]
    upgrade_timeout: Option<Duration>,
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// The status file `watch` writes.
    #[arg(long, value_name = "PATH")]
    status: PathBuf,
    /// Fail if the watch loop has not run for this long (liveness)
    /// [default: 60s].
    #[arg(long, value_name = "DUR", value_parser = duration)]
    max_age: Option<Duration>,
    /// Fail until a release has been delivered (startup: the server can
    /// start from current).
    #[arg(long)]
    serving: bool,
    /// Fail unless this release serves (a rollout walker's check; prints
    /// the reason a release was refused or rolled back).
    #[arg(long, value_name = "NAME")]
    release: Option<String>,
}

fn duration(s: &str) -> Result<Duration, String> {
    baton::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Watch(a) => {
            let cfg = watch::Config {
                marker: a.marker,
                app: a.app_dir,
                binary: a.binary,
                control: a.control,
                status: a.status,
                poll: a.poll.unwrap_or(watch::DEFAULT_POLL),
                retry_after: a.retry_after.unwrap_or(watch::DEFAULT_RETRY_AFTER),
                upgrade_timeout: a.upgrade_timeout.unwrap_or(watch::DEFAULT_UPGRADE_TIMEOUT),
            };
            if let Err(e) = watch::prepare(&cfg) {
                eprintln!("baton-sidecar: {e}");
                return ExitCode::FAILURE;
            }
            match watch::Watcher::new(cfg).run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton-sidecar: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::CheckMarker { path } => {
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|t| marker::parse(&t));
            match parsed {
                Ok(Some(r)) => {
                    println!(
                        "release {} sha256 {} source {}",
                        r.name,
                        r.sha256,
                        r.source.display()
                    );
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    println!("{}: names no release", path.display());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    println!("{}: {e}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Probe(a) => {
            let req = status::Require {
                max_age: Some(a.max_age.unwrap_or(status::DEFAULT_MAX_AGE)),
                serving: a.serving,
                release: a.release,
            };
            let verdict = status::Status::read(&a.status)
                .and_then(|st| status::check(&st, &req, status::now_ms()));
            match verdict {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    println!("{why}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

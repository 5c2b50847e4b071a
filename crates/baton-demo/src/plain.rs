//! `--plain`: the demo's handler served by plain hyper, without baton.
//!
//! This is the benchmark baseline (`scripts/bench/run.sh`): the same
//! [`handle`](super::handle) function behind hyper-util's auto builder
//! (HTTP/1.1 and HTTP/2 on one port), the way a hyper server without baton
//! is usually written. It is also the app `baton run` upgrades in the
//! benchmark: it takes its listener from systemd-style socket activation.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;

use super::{App, Args, Intercept, StateV2, handle};

/// Run the plain server until SIGTERM/SIGINT, then drain (bounded by
/// `--drain-timeout`).
pub(crate) async fn run(
    args: Args,
    version: String,
    intercept: Option<Intercept>,
) -> anyhow::Result<()> {
    let listener = listener(&args)?;
    tracing::info!(addr = %listener.local_addr()?, "plain hyper server (no baton) listening");
    if let Some(path) = &args.pid_file {
        write_pid_file(path)?;
    }
    notify_ready();
    let app = Arc::new(App {
        baton: None,
        requests: Arc::new(AtomicU64::new(0)),
        version,
        generation: 0,
        pid: std::process::id(),
        state: Arc::new(Mutex::new(StateV2::default())),
        intercept,
        ws: None,
    });
    let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&app), req));
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc.clone());
                    let conn = graceful.watch(conn.into_owned());
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(listener);
    tracing::info!("stopping: draining connections");
    if tokio::time::timeout(args.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?args.drain_timeout, "drain timeout: closing the remaining connections");
    }
    Ok(())
}

/// fd 3 from socket activation (`LISTEN_FDS=1`, `LISTEN_PID` = us), else a
/// bind of the first `--listen` address.
fn listener(args: &Args) -> anyhow::Result<tokio::net::TcpListener> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds = std::env::var("LISTEN_FDS").ok();
    let passed = baton_sys::inherit::ListenFds::from_env();
    let std_listener = if let Some(passed) = passed.filter(|_| fds.as_deref() == Some("1")) {
        let p = passed
            .adopt()
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("LISTEN_FDS=1 names no fd"))?;
        let (fd, kind) = p
            .socket
            .map_err(|e| anyhow::anyhow!("fd 3 named by LISTEN_FDS: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("LISTEN_FDS=1 but fd 3 is not open"))?;
        if kind != baton_sys::socket::SocketKind::Tcp {
            anyhow::bail!("fd 3 is a {kind:?} listener; --plain serves TCP only");
        }
        std::net::TcpListener::from(fd)
    } else {
        if for_us {
            anyhow::bail!(
                "--plain takes exactly one socket-activated listener (LISTEN_FDS={})",
                fds.unwrap_or_default()
            );
        }
        let addr = match args.listen.first().map(|s| &s.addr) {
            None => "127.0.0.1:8080".parse()?,
            Some(baton::ListenAddr::Tcp(a)) => *a,
            Some(other) => anyhow::bail!("--plain serves TCP only, not {other:?}"),
        };
        std::net::TcpListener::bind(addr)?
    };
    std_listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(std_listener)?)
}

/// `READY=1` to `NOTIFY_SOCKET` if set (systemd `Type=notify`, `baton run
/// --ready notify`), like many servers do; best effort.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot send READY=1 to NOTIFY_SOCKET");
    }
}

fn write_pid_file(path: &std::path::Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

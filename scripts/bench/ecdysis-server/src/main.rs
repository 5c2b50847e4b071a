//! An ecdysis 1.x HTTP server for baton's benchmark (scripts/bench/run.sh).
//!
//! `bench-ecdysis-server --listen ADDR --pid-file PATH [--drain-timeout SECS]`
//!
//! Every request gets `200 hello from ecdysis pid N`. Upgraded the way
//! ecdysis' example (`examples/tokio_echo.rs`) shows: `TokioEcdysisBuilder`
//! with SIGHUP as the upgrade signal (SIGTERM stops), the listener built
//! with `build_listen_tcp(StopOnShutdown::Yes, ..)` (in an upgraded child
//! it is the inherited socket), `ready()`, then await the ecdysis future.
//! When it resolves (the new process said it is ready) the listener stream
//! has ended; the old process then finishes its connections and exits:
//! hyper-util's `GracefulShutdown` closes idle keep-alive connections and
//! lets requests in flight finish, bounded by --drain-timeout (the example's
//! "exit after upgrade" bound), as Go's `http.Server.Shutdown` does for the
//! tableflip peer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ecdysis::tokio_ecdysis::{SignalKind, StopOnShutdown, TokioEcdysisBuilder};
use futures::StreamExt;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = arg(&args, "--listen")
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()
        .expect("--listen IP:PORT");
    let drain = Duration::from_secs(
        arg(&args, "--drain-timeout").map_or(30, |s| s.parse().expect("--drain-timeout SECS")),
    );

    let mut builder = TokioEcdysisBuilder::new(SignalKind::hangup()).expect("ecdysis builder");
    builder
        .stop_on_signal(SignalKind::terminate())
        .expect("stop signal");
    if let Some(p) = arg(&args, "--pid-file") {
        builder.set_pid_file(p);
    }
    let stream = builder
        .build_listen_tcp(StopOnShutdown::Yes, addr, |b, addr| {
            b.set_reuse_address(true)?;
            b.bind(&addr.into())?;
            b.listen(1024)?;
            Ok(b.into())
        })
        .expect("listen");

    let body = Bytes::from(format!("hello from ecdysis pid {}\n", std::process::id()));
    let server = tokio::spawn(async move {
        let mut stream = stream;
        let graceful = GracefulShutdown::new();
        // Ends when ecdysis stops the listener (after a successful upgrade,
        // or on SIGTERM).
        while let Some(conn) = stream.next().await {
            let Ok(conn) = conn else { continue };
            let body = body.clone();
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/plain")
                            .body(Full::new(body))
                            .expect("static response"),
                    )
                }
            });
            let conn = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(conn), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
    });

    let (_ecdysis, exit) = builder.ready().expect("ecdysis ready");
    let reason = exit.await;
    eprintln!("ecdysis pid {}: exiting ({reason:?})", std::process::id());
    let _ = tokio::time::timeout(drain + Duration::from_secs(1), server).await;
}

//! An HTTP/2 (prior knowledge) load client that behaves like a browser or
//! gRPC client: on GOAWAY it finishes the streams it has and opens a new
//! connection. A stream counts as failed unless it got a full 200 response,
//! except streams the protocol says were never processed (canceled before
//! being sent, or refused with REFUSED_STREAM), which are counted apart
//! ("retry-safe").

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Longest wait for one stream's response head, then for its body.
const STREAM_TIMEOUT: Duration = Duration::from_secs(20);

/// Counts of an HTTP/2 load run.
#[derive(Debug, Default, Clone, Copy)]
pub struct H2Stats {
    pub ok: u64,
    pub failed: u64,
    pub retry_safe: u64,
    pub connections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    retry_safe: AtomicU64,
    connections: AtomicU64,
}

/// A running HTTP/2 load.
#[derive(Debug)]
pub struct H2Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

fn retry_safe(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<h2::Error>() {
            return h.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR));
        }
        src = s.source();
    }
    false
}

impl H2Load {
    /// `conns` connections with `streams` concurrent streams each, `GET path`.
    pub fn start(
        addr: SocketAddr,
        path: &'static str,
        conns: usize,
        streams: usize,
        max_time: Duration,
    ) -> H2Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (stop2, c2) = (stop.clone(), counters.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let deadline = Instant::now() + max_time;
                let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
                let mut tasks = Vec::new();
                for _ in 0..conns {
                    let (stop, c, errors) = (stop2.clone(), c2.clone(), errors.clone());
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            let tcp = match tokio::net::TcpStream::connect(addr).await {
                                Ok(t) => t,
                                Err(e) => {
                                    c.failed.fetch_add(1, Ordering::Relaxed);
                                    errors.lock().unwrap().push(format!("connect: {e}"));
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            };
                            c.connections.fetch_add(1, Ordering::Relaxed);
                            let (sender, conn) =
                                match http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                                    .await
                                {
                                    Ok(x) => x,
                                    Err(e) => {
                                        c.failed.fetch_add(1, Ordering::Relaxed);
                                        errors.lock().unwrap().push(format!("handshake: {e}"));
                                        continue;
                                    }
                                };
                            let conn_task = tokio::spawn(conn);
                            let mut streams_tasks = Vec::new();
                            for _ in 0..streams {
                                let (mut sender, stop, c, errors) =
                                    (sender.clone(), stop.clone(), c.clone(), errors.clone());
                                streams_tasks.push(tokio::spawn(async move {
                                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline
                                    {
                                        match tokio::time::timeout(STREAM_TIMEOUT, sender.ready())
                                            .await
                                        {
                                            Ok(Ok(())) => {}
                                            // the connection is going away: reconnect
                                            Ok(Err(_)) => return,
                                            Err(_) => {
                                                c.failed.fetch_add(1, Ordering::Relaxed);
                                                errors.lock().unwrap().push(format!(
                                                    "no stream slot in {STREAM_TIMEOUT:?}"
                                                ));
                                                return;
                                            }
                                        }
                                        let req =
                                            hyper::Request::get(format!("http://{addr}{path}"))
                                                .body(Empty::<Bytes>::new())
                                                .unwrap();
                                        // Every wait is bounded: a stream that gets
                                        // no answer is a failure, not a hung test.
                                        let answer = tokio::time::timeout(
                                            STREAM_TIMEOUT,
                                            sender.send_request(req),
                                        );
                                        let Ok(answer) = answer.await else {
                                            c.failed.fetch_add(1, Ordering::Relaxed);
                                            errors.lock().unwrap().push(format!(
                                                "no response head in {STREAM_TIMEOUT:?}"
                                            ));
                                            return;
                                        };
                                        match answer {
                                            Ok(resp) => {
                                                let status = resp.status();
                                                let body = tokio::time::timeout(
                                                    STREAM_TIMEOUT,
                                                    resp.into_body().collect(),
                                                );
                                                let Ok(body) = body.await else {
                                                    c.failed.fetch_add(1, Ordering::Relaxed);
                                                    errors.lock().unwrap().push(format!(
                                                        "no complete body in {STREAM_TIMEOUT:?}"
                                                    ));
                                                    return;
                                                };
                                                match body {
                                                    Ok(_) if status == 200 => {
                                                        c.ok.fetch_add(1, Ordering::Relaxed);
                                                    }
                                                    Ok(_) => {
                                                        c.failed.fetch_add(1, Ordering::Relaxed);
                                                        errors
                                                            .lock()
                                                            .unwrap()
                                                            .push(format!("status {status}"));
                                                    }
                                                    Err(e) => {
                                                        c.failed.fetch_add(1, Ordering::Relaxed);
                                                        errors
                                                            .lock()
                                                            .unwrap()
                                                            .push(format!("body: {e}"));
                                                    }
                                                }
                                            }
                                            Err(e) if retry_safe(&e) => {
                                                c.retry_safe.fetch_add(1, Ordering::Relaxed);
                                                return;
                                            }
                                            Err(e) => {
                                                c.failed.fetch_add(1, Ordering::Relaxed);
                                                errors
                                                    .lock()
                                                    .unwrap()
                                                    .push(format!("request: {e} ({e:?})"));
                                                return;
                                            }
                                        }
                                    }
                                }));
                            }
                            for t in streams_tasks {
                                let _ = t.await;
                            }
                            drop(sender);
                            let _ = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
                errors.lock().unwrap().clone()
            })
        });
        H2Load {
            stop,
            counters,
            thread: Some(thread),
        }
    }

    /// Successful streams so far.
    pub fn ok(&self) -> u64 {
        self.counters.ok.load(Ordering::Relaxed)
    }

    /// Stop and return the counts and the first errors.
    pub fn stop(mut self) -> (H2Stats, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .thread
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        let c = &self.counters;
        (
            H2Stats {
                ok: c.ok.load(Ordering::Relaxed),
                failed: c.failed.load(Ordering::Relaxed),
                retry_safe: c.retry_safe.load(Ordering::Relaxed),
                connections: c.connections.load(Ordering::Relaxed),
            },
            errors.into_iter().take(20).collect(),
        )
    }
}

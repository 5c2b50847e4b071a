//! A no-retry load client. Every request is counted: ok, failed (with the
//! error), wrong (unexpected status or body). Bounded in time and count.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Version;
use crate::http;

/// What the load saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub wrong: u64,
    /// Responses that asked to close the connection (keep-alive mode).
    pub closes: u64,
    pub errors: Vec<String>,
    pub pids: BTreeSet<u32>,
    pub generations: BTreeSet<u64>,
}

impl Stats {
    fn error(&mut self, e: String) {
        self.failed += 1;
        if self.errors.len() < 20 {
            self.errors.push(e);
        }
    }

    fn wrong(&mut self, e: String) {
        self.wrong += 1;
        if self.errors.len() < 20 {
            self.errors.push(e);
        }
    }
}

/// A running load.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Requests started and not finished.
    pub in_flight: Arc<AtomicUsize>,
    /// Requests finished (any outcome).
    pub done: Arc<AtomicU64>,
    stats: Arc<Mutex<Stats>>,
    threads: Vec<JoinHandle<()>>,
}

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `GET /version` with `Connection: close`, a new connection each time.
    Close,
    /// `GET /version` on a kept-alive connection (reconnect on close, counted).
    KeepAlive,
    /// `POST /echo` with a unique body on a kept-alive connection; the body
    /// must come back.
    EchoKeepAlive,
    /// `POST /counter` on a kept-alive connection; the answer is the new
    /// value.
    CounterKeepAlive,
    /// `POST /counter` with `Connection: close`.
    CounterClose,
}

impl Load {
    /// Start `concurrency` client threads. Each stops after `max_time` or
    /// `max_requests` requests at most.
    pub fn start(
        addr: SocketAddr,
        mode: Mode,
        concurrency: usize,
        max_time: Duration,
        max_requests: u64,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let deadline = Instant::now() + max_time;
        let per_thread = max_requests / concurrency as u64 + 1;
        let threads = (0..concurrency)
            .map(|t| {
                let (stop, in_flight, done, stats) =
                    (stop.clone(), in_flight.clone(), done.clone(), stats.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<http::Conn> = None;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && i < per_thread
                    {
                        i += 1;
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let res = one(addr, mode, &mut conn, t, i);
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::Relaxed);
                        let mut s = stats.lock().unwrap();
                        match res {
                            Ok(Outcome::Ok(v, closes)) => {
                                s.ok += 1;
                                s.pids.insert(v.pid);
                                s.generations.insert(v.generation);
                                if closes {
                                    s.closes += 1;
                                }
                            }
                            Ok(Outcome::EchoOk(closes)) => {
                                s.ok += 1;
                                if closes {
                                    s.closes += 1;
                                }
                            }
                            Ok(Outcome::Wrong(e)) => s.wrong(e),
                            Err(e) => {
                                conn = None;
                                s.error(e);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            in_flight,
            done,
            stats,
            threads,
        }
    }

    /// Requests finished so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Wait (at most `timeout`) until `n` more requests have finished.
    pub fn wait_progress(&self, n: u64, timeout: Duration) {
        let start = self.done();
        crate::wait_for(timeout, "load progress", || {
            (self.done() >= start + n).then_some(())
        });
    }

    /// A copy of the stats so far.
    pub fn snapshot(&self) -> Stats {
        self.stats.lock().unwrap().clone()
    }

    /// Stop and return the final stats.
    pub fn stop(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.stats.lock().unwrap().clone()
    }
}

enum Outcome {
    Ok(Version, bool),
    EchoOk(bool),
    Wrong(String),
}

fn one(
    addr: SocketAddr,
    mode: Mode,
    conn: &mut Option<http::Conn>,
    t: usize,
    i: u64,
) -> Result<Outcome, String> {
    match mode {
        Mode::Close => {
            let r = http::get(addr, "/version").map_err(|e| format!("GET /version: {e}"))?;
            check_version(&r).map(|v| Outcome::Ok(v, false))
        }
        Mode::KeepAlive => {
            if conn.is_none() {
                *conn = Some(http::connect(addr).map_err(|e| format!("connect: {e}"))?);
            }
            let c = conn.as_mut().unwrap();
            let r = c
                .get("/version")
                .map_err(|e| format!("GET /version (keep-alive): {e}"))?;
            let closes = r.closes();
            if closes {
                *conn = None;
            }
            check_version(&r).map(|v| Outcome::Ok(v, closes))
        }
        Mode::CounterKeepAlive | Mode::CounterClose => {
            let close = mode == Mode::CounterClose;
            if conn.is_none() || close {
                *conn = Some(http::connect(addr).map_err(|e| format!("connect: {e}"))?);
            }
            let c = conn.as_mut().unwrap();
            let r = c
                .request("POST", "/counter", close, b"")
                .map_err(|e| format!("POST /counter: {e}"))?;
            let closes = r.closes() || close;
            if closes {
                *conn = None;
            }
            if r.status != 200 || r.text().trim().parse::<u64>().is_err() {
                return Ok(Outcome::Wrong(format!(
                    "POST /counter: {} {}",
                    r.status,
                    r.text()
                )));
            }
            Ok(Outcome::EchoOk(r.closes()))
        }
        Mode::EchoKeepAlive => {
            if conn.is_none() {
                *conn = Some(http::connect(addr).map_err(|e| format!("connect: {e}"))?);
            }
            let c = conn.as_mut().unwrap();
            let body = format!(
                "thread {t} request {i} {}",
                "x".repeat((i % 50) as usize * 20)
            );
            let r = c
                .request("POST", "/echo", false, body.as_bytes())
                .map_err(|e| format!("POST /echo (keep-alive): {e}"))?;
            let closes = r.closes();
            if closes {
                *conn = None;
            }
            if r.status != 200 {
                return Ok(Outcome::Wrong(format!("POST /echo status {}", r.status)));
            }
            if r.body != body.as_bytes() {
                return Ok(Outcome::Wrong(format!(
                    "POST /echo wrong body: sent {body:?} got {:?}",
                    r.text()
                )));
            }
            Ok(Outcome::EchoOk(closes))
        }
    }
}

fn check_version(r: &http::Resp) -> Result<Version, String> {
    if r.status != 200 {
        return Err(format!("status {}: {}", r.status, r.text()));
    }
    Version::parse(&r.body).ok_or_else(|| format!("bad /version body {:?}", r.text()))
}

//! A no-retry load client. Every request is counted: ok, failed (by kind:
//! refused, reset, EOF, timeout, other), wrong (unexpected status or body).
//! No count is capped; only the kept example messages are. Bounded in time
//! and count.

use std::collections::BTreeSet;
use std::io;
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
    /// Requests that got no response: the sum of every [`Failures`] kind.
    pub failed: u64,
    /// Each failed request, counted by kind (no cap).
    pub failures: Failures,
    /// Responses with an unexpected status or body.
    pub wrong: u64,
    /// Responses that asked to close the connection (keep-alive mode).
    pub closes: u64,
    /// The first [`MAX_KEPT_ERRORS`] messages, for the failure report only:
    /// count with `failed`, `failures` and `wrong`, never with this list.
    pub errors: Vec<String>,
    pub pids: BTreeSet<u32>,
    pub generations: BTreeSet<u64>,
}

/// How many error messages [`Stats::errors`] keeps as examples.
pub const MAX_KEPT_ERRORS: usize = 20;

/// Failed requests by kind, each counted without a cap.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    /// The connection was refused (`ECONNREFUSED`): nobody was listening.
    pub refused: u64,
    /// The connection was reset (`ECONNRESET`, `EPIPE`, `ECONNABORTED`).
    pub reset: u64,
    /// The server closed the connection before a whole response.
    pub eof: u64,
    /// No answer within the client's timeout.
    pub timeout: u64,
    /// A response whose status was not the one expected.
    pub bad_status: u64,
    /// Anything else (a malformed response, another OS error).
    pub other: u64,
}

/// The kind of one failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    Refused,
    Reset,
    Eof,
    Timeout,
    BadStatus,
    Other,
}

impl FailKind {
    /// Classify an I/O error by its kind (never by its message).
    pub fn of(e: &io::Error) -> FailKind {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => FailKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => FailKind::Reset,
            io::ErrorKind::UnexpectedEof => FailKind::Eof,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailKind::Timeout,
            _ => FailKind::Other,
        }
    }
}

/// A failed request: its kind and what happened.
#[derive(Debug)]
struct Fail {
    kind: FailKind,
    msg: String,
}

/// `what: e`, classified.
fn fail(what: &str) -> impl FnOnce(io::Error) -> Fail + '_ {
    move |e| Fail {
        kind: FailKind::of(&e),
        msg: format!("{what}: {e}"),
    }
}

impl Stats {
    fn error(&mut self, e: Fail) {
        self.failed += 1;
        let f = &mut self.failures;
        *match e.kind {
            FailKind::Refused => &mut f.refused,
            FailKind::Reset => &mut f.reset,
            FailKind::Eof => &mut f.eof,
            FailKind::Timeout => &mut f.timeout,
            FailKind::BadStatus => &mut f.bad_status,
            FailKind::Other => &mut f.other,
        } += 1;
        self.keep(format!("{:?}: {}", e.kind, e.msg));
    }

    fn wrong(&mut self, e: String) {
        self.wrong += 1;
        self.keep(e);
    }

    fn keep(&mut self, e: String) {
        if self.errors.len() < MAX_KEPT_ERRORS {
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

    /// Wait (at most `timeout`) until `n` requests have finished in all,
    /// then stop and return the final stats.
    pub fn stop_after(self, n: u64, timeout: Duration) -> Stats {
        crate::wait_for(timeout, "load progress", || {
            (self.done() >= n).then_some(())
        });
        self.stop()
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
) -> Result<Outcome, Fail> {
    match mode {
        Mode::Close => {
            let r = http::get(addr, "/version").map_err(fail("GET /version"))?;
            check_version(&r).map(|v| Outcome::Ok(v, false))
        }
        Mode::KeepAlive => {
            if conn.is_none() {
                *conn = Some(http::connect(addr).map_err(fail("connect"))?);
            }
            let c = conn.as_mut().unwrap();
            let r = c
                .get("/version")
                .map_err(fail("GET /version (keep-alive)"))?;
            let closes = r.closes();
            if closes {
                *conn = None;
            }
            check_version(&r).map(|v| Outcome::Ok(v, closes))
        }
        Mode::CounterKeepAlive | Mode::CounterClose => {
            let close = mode == Mode::CounterClose;
            if conn.is_none() || close {
                *conn = Some(http::connect(addr).map_err(fail("connect"))?);
            }
            let c = conn.as_mut().unwrap();
            let r = c
                .request("POST", "/counter", close, b"")
                .map_err(fail("POST /counter"))?;
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
                *conn = Some(http::connect(addr).map_err(fail("connect"))?);
            }
            let c = conn.as_mut().unwrap();
            let body = format!(
                "thread {t} request {i} {}",
                "x".repeat((i % 50) as usize * 20)
            );
            let r = c
                .request("POST", "/echo", false, body.as_bytes())
                .map_err(fail("POST /echo (keep-alive)"))?;
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

/// A `/version` answer's version; a bad status or body is a failed request.
fn check_version(r: &http::Resp) -> Result<Version, Fail> {
    if r.status != 200 {
        return Err(Fail {
            kind: FailKind::BadStatus,
            msg: format!("status {}: {}", r.status, r.text()),
        });
    }
    Version::parse(&r.body).ok_or_else(|| Fail {
        kind: FailKind::Other,
        msg: format!("bad /version body {:?}", r.text()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client itself must see a refusal: with nothing listening, every
    /// request is a failure of kind `refused`, counted past the kept
    /// examples.
    #[test]
    fn every_refused_connection_is_counted_with_no_cap() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let load = Load::start(addr, Mode::Close, 2, Duration::from_secs(30), 100);
        let stats = load.stop_after(100, Duration::from_secs(30));
        assert!(stats.failed >= 100, "{stats:?}");
        assert_eq!(stats.failures.refused, stats.failed, "{stats:?}");
        assert_eq!(stats.errors.len(), MAX_KEPT_ERRORS);
        assert_eq!(stats.ok, 0);
    }
}

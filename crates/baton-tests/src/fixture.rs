//! The fixture server: the demo, plus faults read from a file.
//!
//! `BATON_FIXTURE_FAULT_FILE=PATH` names a file that each generation reads
//! (and deletes) at start. So a test arms a fault *for the next generation
//! only*: write the file, trigger the upgrade. Faults, one per line:
//!
//! * `exit-at-start` — exit 3 before doing anything.
//! * `never-ready` — set up, then never report ready.
//! * `fail-ready:REASON` — report `Failed{REASON}` and exit 1.
//! * `slow-start:MS` — sleep MS before reporting ready.
//! * `ready-when:PATH` — report ready only once PATH exists, so a test
//!   holds an upgrade in progress for as long as it needs (at most 60 s,
//!   then report `Failed`).
//! * `exit-at:POINT` — exit 4 at a handoff point (`started`, `listeners`,
//!   `state`, `ready`, `promoted`; and `exiting`, which this generation
//!   reaches as the *old* one, at its next upgrade, after its drain).
//! * `stop-at:POINT` — SIGSTOP itself at that point (the test then kills it).
//! * `hold-at:POINT:GATE` — at that point, write `GATE.reached` and block
//!   (the thread running the hook) until `GATE` exists: a test acts while
//!   the process is exactly there.
//! * `state-schema:N` — write and read the demo state with schema version N
//!   (2 migrates from 1; other versions read only themselves).
//! * `export-garbage` — export bytes that are not a state envelope.
//! * `state-limit:BYTES` — accept at most BYTES of state.
//! * `state-fill:BYTES` — put BYTES of filler in the cache at start.
//! * `health-bad-after:MS` — `GET /health` answers 503 from MS after start.
//! * `health-bad-when:PATH` — `GET /health` answers 503 once PATH exists
//!   (the test decides when the window fails).
//! * `error-rate:PCT` — answer 500 to PCT % of requests (every n-th), but
//!   never to `/health` and `/ws`.
//! * `self-upgrade:MS` — MS after it is ready, upgrade itself through the
//!   library call `Baton::upgrade` and log the result.
//! * `nofile:N` — lower this process's `RLIMIT_NOFILE` (soft and hard) to N
//!   before baton starts, so a batch of handed-over connections cannot fit.
//! * `ws-kind:NAME` — serve `/ws` under this kind instead of the demo's, so
//!   this generation does not take its predecessor's WebSockets.
//! * `ws-refuse` — take the predecessor's WebSockets' kind with a check
//!   that refuses every batch (and serve `/ws` under another kind), so
//!   they stay with the predecessor.
//! * `tls-refuse` — take the predecessor's TLS connections' kind with a
//!   check that refuses every batch, so their keys are extracted and they
//!   stay with the predecessor (on its record layer).
//! * `tls-state:garbage` / `tls-state:v2` — export, for the *next*
//!   generation, TLS session-ticket state that is not a ticket-key state at
//!   all / claims format version 2 (so that generation must refuse it).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use baton::{HandoffHook, HandoffPoint};

fn error_response(
    status: u16,
    body: &'static str,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
        body.as_bytes(),
    )));
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// Read and consume the fault file, if any.
fn take_faults() -> Vec<String> {
    let Some(path) = std::env::var_os("BATON_FIXTURE_FAULT_FILE") else {
        return Vec::new();
    };
    // Rename first so exactly one process gets the faults.
    let claimed =
        std::path::PathBuf::from(format!("{}.{}", path.to_string_lossy(), std::process::id()));
    if std::fs::rename(&path, &claimed).is_err() {
        return Vec::new();
    }
    let text = std::fs::read_to_string(&claimed).unwrap_or_default();
    let _ = std::fs::remove_file(&claimed);
    text.lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// What a fault does at a handoff point.
enum AtPoint {
    Exit,
    /// SIGSTOP the process. Asynchronous in a multi-threaded process: the
    /// thread that runs the hook may go on for a moment.
    Stop,
    /// Block the thread that runs the hook until this file exists.
    Hold(std::path::PathBuf),
}

/// `hold-at`: say so in `GATE.reached`, then wait (60 s at most) for `GATE`.
fn hold(me: u32, point: HandoffPoint, gate: &std::path::Path) {
    eprintln!(
        "fixture pid {me}: holding at {point:?} until {} exists",
        gate.display()
    );
    let mut reached = gate.as_os_str().to_owned();
    reached.push(".reached");
    let _ = std::fs::write(&reached, me.to_string());
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !gate.exists() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("fixture pid {me}: going on from {point:?}");
}

/// Run the fixture with `version` as its version string.
pub fn main(version: &str) -> ExitCode {
    let faults = take_faults();
    let mut custom = baton_demo::Custom {
        version: Some(version.to_owned()),
        ..baton_demo::Custom::default()
    };
    let mut hooks: Vec<(HandoffPoint, AtPoint)> = Vec::new();
    for f in &faults {
        eprintln!("fixture pid {}: fault armed: {f}", std::process::id());
        let (name, arg) = f.split_once(':').unwrap_or((f.as_str(), ""));
        match name {
            "exit-at-start" => return ExitCode::from(3),
            "never-ready" => {
                custom.before_ready = Some(Box::new(|_| {
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }));
            }
            "fail-ready" => {
                let reason = arg.to_owned();
                custom.before_ready = Some(Box::new(move |_| Err(reason)));
            }
            "slow-start" => {
                let ms: u64 = arg.parse().unwrap_or(1000);
                custom.before_ready = Some(Box::new(move |_| {
                    std::thread::sleep(Duration::from_millis(ms));
                    Ok(())
                }));
            }
            "ready-when" => {
                let path = std::path::PathBuf::from(arg);
                custom.before_ready = Some(Box::new(move |_| {
                    let deadline = std::time::Instant::now() + Duration::from_secs(60);
                    while !path.exists() {
                        if std::time::Instant::now() > deadline {
                            return Err(format!("{} did not appear within 60 s", path.display()));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(())
                }));
            }
            "health-bad-after" => {
                let after = Duration::from_millis(arg.parse().unwrap_or(3000));
                let start = std::time::Instant::now();
                custom.intercept = Some(Arc::new(move |req| {
                    (req.uri().path() == "/health" && start.elapsed() >= after)
                        .then(|| error_response(503, "unhealthy (fixture)\n"))
                }));
            }
            "health-bad-when" => {
                let gate = std::path::PathBuf::from(arg);
                custom.intercept = Some(Arc::new(move |req| {
                    (req.uri().path() == "/health" && gate.exists())
                        .then(|| error_response(503, "unhealthy (fixture)\n"))
                }));
            }
            "error-rate" => {
                let pct: u64 = arg.parse().unwrap_or(20).clamp(1, 100);
                let n = std::sync::atomic::AtomicU64::new(0);
                custom.intercept = Some(Arc::new(move |req| {
                    if matches!(req.uri().path(), "/health" | "/ws") {
                        return None;
                    }
                    let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    ((i * pct) % 100 < pct)
                        .then(|| error_response(500, "injected error (fixture)\n"))
                }));
            }
            "self-upgrade" => {
                let ms: u64 = arg.parse().unwrap_or(500);
                custom.before_ready = Some(Box::new(move |b| {
                    let b = b.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        match b.upgrade(baton::control::UpgradeOptions::default()).await {
                            Ok(r) => eprintln!(
                                "fixture: self-upgrade ok: {} -> {} (generation {} -> {})",
                                r.old_pid, r.new_pid, r.from_generation, r.to_generation
                            ),
                            Err(e) => eprintln!("fixture: self-upgrade failed: {e}"),
                        }
                    });
                    Ok(())
                }));
            }
            "ws-kind" => custom.ws_kind = Some(arg.to_owned()),
            "ws-refuse" => {
                custom.ws_kind = Some("fixture.ws-refusing".to_owned());
                custom.before_ready = Some(Box::new(|b| {
                    let rx = b
                        .receive_owned_checked(baton_demo::ws::WS_KIND, |_| {
                            Err("the fixture refuses every WebSocket (ws-refuse)".into())
                        })
                        .map_err(|e| e.to_string())?;
                    // Kept for the process's life: a refused batch never
                    // reaches it, and a dropped receiver is another case.
                    std::mem::forget(rx);
                    Ok(())
                }));
            }
            "tls-refuse" => {
                custom.no_tls_handoff = true;
                custom.before_ready = Some(Box::new(|b| {
                    let rx = b
                        .receive_owned_checked(baton_http::TLS_KIND, |_| {
                            Err("the fixture refuses every TLS connection (tls-refuse)".into())
                        })
                        .map_err(|e| e.to_string())?;
                    // Kept for the process's life, as for ws-refuse.
                    std::mem::forget(rx);
                    Ok(())
                }));
            }
            "nofile" => {
                let n: u64 = arg.parse().unwrap_or(128);
                let lim = rustix::process::Rlimit {
                    current: Some(n),
                    maximum: Some(n),
                };
                if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Nofile, lim) {
                    eprintln!("fixture: setrlimit(NOFILE, {n}): {e}");
                }
            }
            "state-schema" => custom.state_schema = arg.parse().ok(),
            "export-garbage" => custom.export_garbage = true,
            "state-limit" => custom.state_limit = arg.parse().ok(),
            "state-fill" => custom.state_fill = arg.parse().ok(),
            "tls-state" => {
                let blob: Vec<u8> = if arg == "v2" {
                    let mut b = b"BTTK\x00\x02\x01".to_vec();
                    b.extend_from_slice(&[7u8; 56]);
                    b
                } else {
                    b"not a ticket-key state".to_vec()
                };
                // Runs after the demo loaded TLS, so it replaces the real
                // exporter.
                custom.before_ready = Some(Box::new(move |b| {
                    b.export_raw(baton_http::TICKET_STATE_NAME, move || Ok(blob.clone()));
                    Ok(())
                }));
            }
            "exit-at" | "stop-at" | "hold-at" => {
                let (point, gate) = arg.split_once(':').unwrap_or((arg, ""));
                let what = match name {
                    "exit-at" => AtPoint::Exit,
                    "stop-at" => AtPoint::Stop,
                    _ => AtPoint::Hold(std::path::PathBuf::from(gate)),
                };
                match HandoffPoint::from_name(point) {
                    Some(p) => hooks.push((p, what)),
                    None => eprintln!("fixture: unknown handoff point {point}"),
                }
            }
            other => eprintln!("fixture: unknown fault {other}"),
        }
    }
    if !hooks.is_empty() {
        custom.handoff_hook = Some(HandoffHook(Arc::new(move |point| {
            for (p, what) in &hooks {
                if *p != point {
                    continue;
                }
                let me = std::process::id();
                match what {
                    AtPoint::Stop => {
                        eprintln!("fixture pid {me}: stopping myself at {point:?}");
                        let _ = rustix::process::kill_process(
                            rustix::process::getpid(),
                            rustix::process::Signal::STOP,
                        );
                    }
                    AtPoint::Exit => {
                        eprintln!("fixture pid {me}: exiting at {point:?}");
                        std::process::exit(4);
                    }
                    AtPoint::Hold(gate) => hold(me, point, gate),
                }
            }
        })));
    }
    baton_demo::main_with(custom)
}

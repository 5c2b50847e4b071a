//! `baton upgrade`, `baton status`, `baton stop`: control-socket clients.
//!
//! They speak the core's control protocol, so they work the same against
//! `baton run` and against a library-mode server started with `--control`.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use baton::control::{
    Client, Event, Failure, Reply, Request, StatusReport, UpgradeOptions, UpgradeReport,
};

use crate::exit::{self, CliError};

async fn connect(path: &Path) -> Result<Client, CliError> {
    Client::connect(path)
        .await
        .map_err(|e| CliError::new(exit::CANNOT_CONNECT, anyhow::anyhow!("{e}")))
}

/// One request over the control socket, progress events to `on_event`,
/// the whole exchange bounded by `timeout` (`--timeout`); `late` words the
/// error when it runs out.
async fn call(
    path: &Path,
    req: &Request,
    on_event: impl FnMut(&Event),
    timeout: Duration,
    late: impl FnOnce(Duration) -> String,
) -> Result<Reply, CliError> {
    let exchange = async {
        connect(path)
            .await?
            .call(req, on_event)
            .await
            .map_err(|e| CliError::internal(anyhow::anyhow!("{e}")))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CliError::new(exit::TIMEOUT, anyhow::anyhow!("{}", late(timeout))))?
}

/// The answer of a server that refused or failed a request.
fn failed(f: Failure) -> CliError {
    CliError::new(exit::for_failure(f.kind), anyhow::anyhow!("{}", f.message))
}

/// `--timeout` ran out waiting for a short request.
fn no_answer(timeout: Duration) -> String {
    format!("no answer within {timeout:?} (--timeout)")
}

/// One line of progress for an event.
pub fn event_line(e: &Event) -> String {
    match e {
        Event::Spawned { pid, generation } => {
            format!("spawned generation {generation} (pid {pid})")
        }
        Event::Ready { pid, after_ms } => format!("pid {pid} ready after {after_ms} ms"),
        Event::Promoted { pid } => format!("pid {pid} promoted: it serves new connections"),
        Event::Drained {
            after_ms,
            handed_over,
            closed,
        } => {
            let mut s = format!("old generation drained in {after_ms} ms");
            if *handed_over > 0 || *closed > 0 {
                s.push_str(&format!(
                    " ({handed_over} idle connections handed over, {closed} closed)"
                ));
            }
            s
        }
        Event::Note(n) => n.clone(),
    }
}

fn event_json(e: &Event) -> serde_json::Value {
    use serde_json::json;
    match e {
        Event::Spawned { pid, generation } => {
            json!({"event": "spawned", "pid": pid, "generation": generation})
        }
        Event::Ready { pid, after_ms } => {
            json!({"event": "ready", "pid": pid, "after_ms": after_ms})
        }
        Event::Promoted { pid } => json!({"event": "promoted", "pid": pid}),
        Event::Drained {
            after_ms,
            handed_over,
            closed,
        } => {
            json!({"event": "drained", "after_ms": after_ms, "handed_over": handed_over, "closed": closed})
        }
        Event::Note(n) => json!({"event": "note", "message": n}),
    }
}

fn report_json(r: &UpgradeReport) -> serde_json::Value {
    serde_json::json!({
        "from_generation": r.from_generation,
        "to_generation": r.to_generation,
        "old_pid": r.old_pid,
        "new_pid": r.new_pid,
        "ready_ms": r.ready_ms,
        "drain_ms": r.drain_ms,
        "total_ms": r.total_ms,
        "handed_over": r.handed_over,
        "closed_at_deadline": r.closed_at_deadline,
    })
}

fn print_json(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// `baton upgrade`.
pub async fn upgrade(
    path: &Path,
    json: bool,
    timeout: Duration,
    expect_sha256: Option<String>,
    no_wait: bool,
    command: Vec<OsString>,
) -> Result<ExitCode, CliError> {
    let started = Instant::now();
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut opts = UpgradeOptions::default();
    opts.expect_sha256 = expect_sha256;
    opts.no_wait = no_wait;
    let outcome = upgrade_inner(path, json, timeout, opts, command, &mut events).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(report) => {
            if json {
                let mut v = serde_json::json!({
                    "ok": true,
                    "result": "upgraded",
                    "exit_code": exit::OK,
                    "control": path.display().to_string(),
                    "events": events,
                    "elapsed_ms": elapsed_ms,
                });
                if let (Some(obj), serde_json::Value::Object(r)) =
                    (v.as_object_mut(), report_json(&report))
                {
                    obj.extend(r);
                }
                print_json(&v);
            } else {
                println!(
                    "upgraded: generation {} (pid {}) -> generation {} (pid {}) in {} ms (ready after {} ms, drained in {} ms)",
                    report.from_generation,
                    report.old_pid,
                    report.to_generation,
                    report.new_pid,
                    report.total_ms,
                    report.ready_ms,
                    report.drain_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                print_json(&serde_json::json!({
                    "ok": false,
                    "result": exit::category(e.code),
                    "exit_code": e.code,
                    "message": format!("{:#}", e.error),
                    "control": path.display().to_string(),
                    "events": events,
                    "elapsed_ms": elapsed_ms,
                }));
            }
            Err(e)
        }
    }
}

async fn upgrade_inner(
    path: &Path,
    json: bool,
    timeout: Duration,
    mut opts: UpgradeOptions,
    command: Vec<OsString>,
    events: &mut Vec<serde_json::Value>,
) -> Result<UpgradeReport, CliError> {
    if !command.is_empty() {
        let mut argv = Vec::with_capacity(command.len());
        for a in command {
            argv.push(a.into_string().map_err(|a| {
                CliError::usage(format!(
                    "the command line must be valid UTF-8 (got {:?})",
                    Path::new(&a).display()
                ))
            })?);
        }
        opts.command = Some(argv);
    }
    let on_event = |e: &Event| {
        let line = event_line(e);
        if json {
            eprintln!("{line}");
            events.push(event_json(e));
        } else {
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
    };
    let request = if opts.no_wait {
        Request::UpgradeNoWait(opts)
    } else {
        Request::Upgrade(opts)
    };
    let reply = call(path, &request, on_event, timeout, |t| {
        format!(
            "no result within {t:?} (--timeout); the upgrade may still finish: check `baton status`"
        )
    })
    .await?;
    match reply {
        Reply::Upgraded(r) => Ok(r),
        Reply::Failed(f) => Err(failed(f)),
        other => Err(CliError::internal(anyhow::anyhow!(
            "unexpected answer to an upgrade request: {other:?}"
        ))),
    }
}

/// One status request, parsed into baton's note about itself.
async fn self_view(
    path: &Path,
    timeout: Duration,
) -> Result<(StatusReport, crate::supervisor::self_exec::NoteView), CliError> {
    let reply = call(path, &Request::Status, |_| {}, timeout, no_answer).await?;
    let Reply::Status(s) = reply else {
        return Err(CliError::internal(anyhow::anyhow!(
            "unexpected answer to a status request: {reply:?}"
        )));
    };
    match crate::supervisor::self_exec::parse_note(&s.notes) {
        Some(v) => Ok((*s, v)),
        None => Err(CliError::usage(
            "this server does not re-execute itself: `baton upgrade --self` is for a `baton run` supervisor of this release or later (a library-mode server upgrades itself with a plain `baton upgrade`)",
        )),
    }
}

/// `baton upgrade --self`: ask the supervisor to re-execute itself in
/// place, then wait for the new image to answer (the control socket is
/// carried: a connection made meanwhile queues until it does).
pub async fn upgrade_self(
    path: &Path,
    json: bool,
    timeout: Duration,
) -> Result<ExitCode, CliError> {
    let started = Instant::now();
    let left = || timeout.saturating_sub(started.elapsed());
    let (before, v0) = self_view(path, left()).await?;
    let sent = call(
        path,
        &Request::UpgradeSelf,
        |_| {},
        left(),
        |t| format!("no result within {t:?} (--timeout); check `baton status`"),
    )
    .await;
    match sent {
        Ok(Reply::Failed(f)) => {
            let e = failed(f);
            if json {
                print_json(&serde_json::json!({
                    "ok": false, "result": exit::category(e.code), "exit_code": e.code,
                    "message": format!("{:#}", e.error),
                }));
            }
            return Err(e);
        }
        Ok(other) => {
            return Err(CliError::internal(anyhow::anyhow!(
                "unexpected answer to `baton upgrade --self`: {other:?}"
            )));
        }
        // The exec closed the connection (it is not carried): expected.
        Err(e) if e.code == exit::TIMEOUT => return Err(e),
        Err(_) => {}
    }
    let (after, v1) = self_view(path, left()).await.map_err(|e| {
        CliError::new(
            e.code,
            anyhow::anyhow!(
                "after the exec, the new baton did not answer: {:#}",
                e.error
            ),
        )
    })?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let ok = v1.attempts > v0.attempts && v1.last == crate::supervisor::self_exec::LAST_OK;
    if json {
        print_json(&serde_json::json!({
            "ok": ok,
            "result": if ok { "re-executed" } else { "failed" },
            "exit_code": if ok { exit::OK } else { exit::FAILED },
            "pid": after.answered_by,
            "pid_before": before.answered_by,
            "version": v1.version,
            "version_before": v0.version,
            "execs": v1.execs,
            "app_pid": after.pid,
            "app_pid_before": before.pid,
            "last": v1.last,
            "elapsed_ms": elapsed_ms,
        }));
    }
    if !ok {
        return Err(CliError::new(
            exit::FAILED,
            anyhow::anyhow!("baton upgrade --self did not take: {}", v1.last),
        ));
    }
    if !json {
        println!(
            "baton re-executed in place: pid {} (was {}), version {} (was {}), exec #{}, app generation {} pid {} (was {}) in {elapsed_ms} ms",
            after.answered_by,
            before.answered_by,
            v1.version,
            v0.version,
            v1.execs,
            after.generation,
            after.pid,
            before.pid
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton status`.
pub async fn status(path: &Path, json: bool, timeout: Duration) -> Result<ExitCode, CliError> {
    let reply = call(path, &Request::Status, |_| {}, timeout, no_answer).await?;
    match reply {
        Reply::Status(s) => {
            if json {
                let v = serde_json::to_value(&*s)
                    .map_err(|e| CliError::internal(anyhow::anyhow!("encoding status: {e}")))?;
                print_json(&v);
            } else {
                print!("{}", human_status(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Failed(f) => Err(failed(f)),
        other => Err(CliError::internal(anyhow::anyhow!(
            "unexpected answer to a status request: {other:?}"
        ))),
    }
}

/// `baton stop`.
pub async fn stop(path: &Path, timeout: Duration) -> Result<ExitCode, CliError> {
    let reply = call(path, &Request::Stop, |_| {}, timeout, no_answer).await?;
    match reply {
        Reply::Stopping => {
            println!("stopping");
            Ok(ExitCode::SUCCESS)
        }
        Reply::Failed(f) => Err(failed(f)),
        other => Err(CliError::internal(anyhow::anyhow!(
            "unexpected answer to a stop request: {other:?}"
        ))),
    }
}

/// `baton status` for humans.
pub fn human_status(s: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let name = s
        .name
        .as_deref()
        .map(|n| format!(" {n:?}"))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "{}{name}: generation {} (pid {}) {}, up {:.1} s",
        s.mode,
        s.generation,
        s.pid,
        s.phase,
        s.uptime_ms as f64 / 1000.0
    );
    if s.answered_by != s.pid {
        let _ = writeln!(o, "answered by pid {}", s.answered_by);
    }
    if s.app_version != "unknown" && !s.app_version.is_empty() {
        let _ = writeln!(o, "app: {}", s.app_version);
    }
    if s.upgrade_in_progress {
        let _ = writeln!(o, "an upgrade is in progress");
    }
    let _ = writeln!(o, "listeners:");
    for l in &s.listeners {
        let _ = writeln!(o, "  {:<10} {:<24} {}", l.name, l.addr, l.origin);
    }
    match &s.last_upgrade {
        None => {
            let _ = writeln!(o, "last upgrade: none");
        }
        Some(u) => {
            let _ = write!(o, "last upgrade: {}", u.result);
            if let Some(r) = &u.report {
                let _ = write!(
                    o,
                    ", generation {} (pid {}) -> {} (pid {}), ready after {} ms, drained in {} ms, {} ms in all",
                    r.from_generation,
                    r.old_pid,
                    r.to_generation,
                    r.new_pid,
                    r.ready_ms,
                    r.drain_ms,
                    r.total_ms
                );
            }
            if let Some(reason) = &u.reason {
                let _ = write!(o, ": {reason}");
            }
            let _ = writeln!(o);
        }
    }
    let c = &s.counters;
    let _ = writeln!(
        o,
        "upgrades: {} succeeded, {} failed, {} refused; restarts: {}",
        c.upgrades_succeeded, c.upgrades_failed, c.upgrades_refused, c.restarts
    );
    for n in &s.notes {
        let _ = writeln!(o, "note: {n}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(
            event_line(&Event::Spawned {
                pid: 7,
                generation: 2
            }),
            "spawned generation 2 (pid 7)"
        );
        assert_eq!(
            event_line(&Event::Ready {
                pid: 7,
                after_ms: 120
            }),
            "pid 7 ready after 120 ms"
        );
        assert_eq!(
            event_line(&Event::Drained {
                after_ms: 30,
                handed_over: 0,
                closed: 0
            }),
            "old generation drained in 30 ms"
        );
    }

    #[test]
    fn human_status_mentions_the_essentials() {
        let s = StatusReport {
            mode: "supervisor".into(),
            name: Some("web".into()),
            generation: 3,
            pid: 42,
            answered_by: 7,
            notes: vec!["listener x: shared socket".into()],
            ..StatusReport::default()
        };
        let h = human_status(&s);
        assert!(h.contains("generation 3 (pid 42)"), "{h}");
        assert!(h.contains("answered by pid 7"), "{h}");
        assert!(h.contains("note: listener x"), "{h}");
    }
}

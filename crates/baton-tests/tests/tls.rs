//! Issue 10: HTTPS across upgrades — rustls serving, TLS connections that
//! finish politely on the old generation (HTTP/2, and HTTP/1.1 with
//! `--no-tls-handoff`; the handoff itself is in `tls_handoff.rs`), session tickets that survive the
//! upgrade, certificate rotation, and rollback on a bad certificate.
//!
//! Real processes and real clients: curl, and Python's `ssl` module
//! (`tls_client.py`: HTTP/1.1 and a small HTTP/2 client, both by ALPN),
//! with a throwaway CA made by the `openssl` CLI in each test's directory.
//! Every client counts each request once and never retries.

use std::path::Path;
use std::time::{Duration, Instant};

use baton::control::{FailureKind, Reply, Request, UpgradeReport};
use baton_tests::load::{Load, Mode};
use baton_tests::tls::{CurlLoad, PyIdle, PyLoad, PySession, PyStats, TlsServer, install};
use baton_tests::{proc, wait_for};
use serde_json::Value;

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const T: Duration = Duration::from_secs(30);

fn fixture() -> &'static Path {
    Path::new(FIXTURE)
}

fn upgrade_reply(s: &TlsServer) -> Reply {
    baton_tests::control_call_within(
        &s.server.control,
        &Request::Upgrade(Default::default()),
        |_| {},
        Duration::from_secs(120),
    )
}

/// Upgrade through the control socket and wait until the old process is
/// gone and the new one knows it (until then it refuses to upgrade).
fn upgrade(s: &TlsServer) -> UpgradeReport {
    match upgrade_reply(s) {
        Reply::Upgraded(r) => {
            wait_for(T, "the old generation to exit", || {
                (!proc::alive(r.old_pid)).then_some(())
            });
            wait_for(T, "the new generation to see its predecessor gone", || {
                let st = baton_tests::control_status(&s.server.control);
                (!st.notes.iter().any(|n| n.contains("still draining"))).then_some(())
            });
            r
        }
        other => panic!("upgrade failed: {other:?}"),
    }
}

/// The reason of an upgrade that must fail.
fn failed_upgrade(s: &TlsServer) -> String {
    match upgrade_reply(s) {
        Reply::Failed(f) => {
            assert_eq!(f.kind, FailureKind::Failed, "{f:?}");
            f.message
        }
        other => panic!("expected a failed upgrade, got {other:?}"),
    }
}

fn wait_progress(what: &str, f: impl Fn() -> u64, at_least: u64) {
    let start = f();
    wait_for(T, what, || (f() >= start + at_least).then_some(()));
}

fn generation(v: &Value) -> u64 {
    v["version"]["generation"].as_u64().unwrap()
}

fn check_py(name: &str, st: &PyStats) {
    eprintln!("{name}: {st:?}");
    assert_eq!(st.failed, 0, "{name}: failed requests: {:?}", st.errors);
    assert_eq!(st.wrong, 0, "{name}: wrong responses: {:?}", st.errors);
    assert_eq!(st.refused, 0, "{name}: refused streams: {:?}", st.errors);
    assert_eq!(
        st.handed_over, 0,
        "{name}: a TLS connection was handed over"
    );
    assert!(
        st.server_closes >= 10,
        "{name}: the drains ended connections ({} times)",
        st.server_closes
    );
    assert_eq!(
        st.close_endings.keys().collect::<Vec<_>>(),
        ["clean"],
        "{name}: every connection the server ended, ended with close_notify: {:?}",
        st.close_endings
    );
    assert_eq!(
        st.reconnects_resumed, st.reconnects,
        "{name}: every reconnection resumed its TLS session"
    );
}

#[test]
fn python_ssl_http1_and_http2_fail_nothing_across_ten_upgrades_and_plain_handoff_still_works() {
    // With TLS handoff off: this test is about the polite close (the
    // handoff is tests/tls_handoff.rs').
    let s = TlsServer::start(fixture(), "tls-py-load", &["--no-tls-handoff"]);
    let max = Duration::from_secs(200);
    let h1 = PyLoad::start(&s, "h1", 4, max);
    let h2 = PyLoad::start(&s, "h2", 4, max);
    // Plain keep-alive clients on the other listener of the same process:
    // their connections are still handed over.
    let plain = Load::start(s.server.addr, Mode::KeepAlive, 4, max, u64::MAX);
    wait_progress("Python HTTP/1.1 load", || h1.progress(), 100);
    wait_progress("Python HTTP/2 load", || h2.progress(), 100);
    let mut handed = 0;
    for i in 0..10 {
        let r = upgrade(&s);
        assert_eq!(r.to_generation, i + 2);
        handed += r.handed_over;
        eprintln!(
            "upgrade {}: drain {} ms, plain connections handed over {}",
            i + 1,
            r.drain_ms,
            r.handed_over
        );
        wait_progress("Python HTTP/1.1 load", || h1.progress(), 50);
        wait_progress("Python HTTP/2 load", || h2.progress(), 50);
        wait_progress("plain load", || plain.done(), 50);
    }
    let (h1, h2, plain) = (h1.stop(), h2.stop(), plain.stop());
    check_py("python HTTP/1.1", &h1);
    check_py("python HTTP/2", &h2);
    eprintln!("plain keep-alive: {plain:?}, handed over {handed}");
    assert_eq!(plain.failed, 0, "plain: {:?}", plain.errors);
    assert_eq!(
        plain.closes, 0,
        "plain connections are handed over, not closed"
    );
    assert!(handed > 0);
    for st in [&h1, &h2] {
        assert!(
            st.generations.len() >= 8,
            "the clients met most generations: {:?}",
            st.generations
        );
    }
    assert_eq!(s.server.version().generation, 11);
}

#[test]
fn curl_http1_and_http2_over_https_fail_nothing_across_ten_upgrades() {
    // Long curl runs (1000 requests on one connection each, about a second)
    // and a short close spread, so that most upgrades end a connection in
    // the middle of a run and curl has to follow `Connection: close` /
    // GOAWAY to a new connection.
    let s = TlsServer::start(
        fixture(),
        "tls-curl-load",
        &["--close-spread", "300ms", "--no-tls-handoff"],
    );
    let max = Duration::from_secs(200);
    let h1 = CurlLoad::start(&s, false, 2, 1000, max);
    let h2 = CurlLoad::start(&s, true, 2, 1000, max);
    wait_progress("curl HTTP/1.1 load", || h1.done(), 400);
    wait_progress("curl HTTP/2 load", || h2.done(), 400);
    for i in 0..10 {
        let r = upgrade(&s);
        assert_eq!(r.to_generation, i + 2);
        wait_progress("curl HTTP/1.1 load", || h1.done(), 400);
        wait_progress("curl HTTP/2 load", || h2.done(), 400);
    }
    let (h1, h2) = (h1.stop(), h2.stop());
    for (name, st) in [("curl --http1.1", &h1), ("curl --http2", &h2)] {
        eprintln!(
            "{name}: {st:?}; connections opened within runs: {}",
            st.connects - st.runs
        );
        assert_eq!(st.failed, 0, "{name}: failed requests: {:?}", st.errors);
        assert_eq!(
            st.retried, 0,
            "{name}: curl silently retried a request on a dead connection"
        );
        assert!(
            st.connects - st.runs >= 3,
            "{name}: drains ended connections in the middle of curl runs"
        );
        assert!(
            st.generations.len() >= 8,
            "{name} met most generations: {:?}",
            st.generations
        );
    }
}

#[test]
fn a_saved_session_resumes_after_one_upgrade_and_after_five() {
    let s = TlsServer::start(fixture(), "tls-resume", &[]);
    let mut py = PySession::start(&s);
    for (name, tls12, want) in [("t13", false, "TLSv1.3"), ("t12", true, "TLSv1.2")] {
        let v = py.fresh(name, tls12);
        assert_eq!(v["tls"], want, "{v}");
        assert_eq!(v["reused"], false);
        assert_eq!(v["has_ticket"], true, "a session ticket was issued: {v}");
        // Resumption works at all (same generation).
        let v = py.resume(name);
        assert_eq!(v["reused"], true, "{v}");
    }
    // One generation later.
    upgrade(&s);
    for name in ["t13", "t12"] {
        let v = py.resume(name);
        eprintln!("after 1 upgrade, {name}: {v}");
        assert_eq!(generation(&v), 2);
        assert_eq!(v["offered"], true);
        assert_eq!(v["reused"], true, "{name} resumed after one upgrade: {v}");
    }
    // Five upgrades between saving and resuming.
    for name in ["f13", "f12"] {
        let v = py.fresh(name, name == "f12");
        assert_eq!(generation(&v), 2);
    }
    for _ in 0..5 {
        upgrade(&s);
    }
    for name in ["f13", "f12"] {
        let v = py.resume(name);
        eprintln!("after 5 upgrades, {name}: {v}");
        assert_eq!(generation(&v), 7);
        assert_eq!(v["reused"], true, "{name} resumed after five upgrades: {v}");
    }
    // The control: an unrelated server (same certificate, its own keys)
    // does not resume these sessions, so `reused` above means what it says.
    let other = TlsServer::start_like(&s, fixture(), "tls-resume-other");
    let v = py.cmd(&format!("resume f13 {}", other.tls_port));
    eprintln!("offered to another server: {v}");
    assert_eq!(v["offered"], true);
    assert_eq!(
        v["version"]["pid"].as_u64(),
        Some(other.server.pid() as u64)
    );
    assert_eq!(v["reused"], false, "{v}");
}

#[test]
fn ticket_keys_rotate_on_a_schedule_that_survives_upgrades() {
    // Rotation every 5 s: a ticket's key creation time is visible in the
    // lifetime hint (hint = created + 2 × 5 s − now, whole seconds).
    const R: f64 = 5.0;
    let s = TlsServer::start(
        fixture(),
        "tls-rotation",
        &["--tls-ticket-rotation", "5s", "--close-spread", "200ms"],
    );
    let mut py = PySession::start(&s);
    let created = |v: &Value| v["time"].as_f64().unwrap() + v["hint"].as_f64().unwrap() - 2.0 * R;
    let a = py.fresh("a", false);
    let c1 = created(&a);
    let t_a = a["time"].as_f64().unwrap();
    eprintln!("a: {a}");
    // Upgrade 2 s later: if a new generation restarted the schedule, the
    // key would look 2 s younger.
    std::thread::sleep(Duration::from_secs(2));
    upgrade(&s);
    let b = py.fresh("b", false);
    eprintln!("b: {b}");
    assert_eq!(generation(&b), 2);
    assert!(
        b["time"].as_f64().unwrap() < c1 + R - 0.5,
        "the test ran too slowly to check the key before its rotation"
    );
    assert!(
        (created(&b) - c1).abs() < 1.1,
        "generation 2 kept the key's creation time: key created at {c1:.1} by generation 1, \
         {:.1} as generation 2 reports it",
        created(&b)
    );
    // Another upgrade, then past the rotation time.
    std::thread::sleep(Duration::from_millis(1500));
    upgrade(&s);
    let wait_until = c1 + R + 1.5;
    while now_unix() < wait_until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = py.fresh("c", false);
    eprintln!("c: {c}");
    assert_eq!(generation(&c), 3);
    assert!(
        created(&c) > c1 + R - 1.1,
        "generation 3 rotated the key on schedule (about {:.1}): new key created at {:.1}",
        c1 + R,
        created(&c)
    );
    // The ticket from generation 1's key still works: the previous key
    // travelled and is kept for one more period.
    let age = now_unix() - t_a;
    assert!(
        age < a["hint"].as_f64().unwrap(),
        "a's ticket is still within its lifetime"
    );
    let r = py.resume("a");
    eprintln!("resume a after {age:.1} s: {r}");
    assert_eq!(generation(&r), 3);
    assert_eq!(r["reused"], true, "{r}");
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn replacing_the_certificate_files_and_upgrading_serves_the_new_certificate() {
    let s = TlsServer::start(fixture(), "tls-rotate-cert", &[]);
    let mut py = PySession::start(&s);
    let v = py.fresh("a", false);
    assert_eq!(v["serial"], s.first.serial.as_str(), "{v}");
    assert_eq!(v["subject"]["commonName"], s.first.cn.as_str());
    let next = s.pki.issue("b", 0x1002);
    install(&next.key, &s.key_path);
    install(&next.cert, &s.cert_path);
    // Until the upgrade the running generation keeps its certificate.
    let v = py.fresh("a", false);
    assert_eq!(v["serial"], s.first.serial.as_str());
    upgrade(&s);
    let v = py.fresh("b", false);
    eprintln!("after the upgrade: {v}");
    assert_eq!(generation(&v), 2);
    assert_eq!(v["serial"], next.serial.as_str(), "{v}");
    assert_eq!(v["subject"]["commonName"], next.cn.as_str());
}

#[test]
fn a_missing_or_malformed_certificate_rolls_the_upgrade_back_with_a_clear_reason() {
    let s = TlsServer::start(fixture(), "tls-bad-cert", &[]);
    let load = PyLoad::start(&s, "h1", 2, Duration::from_secs(120));
    wait_progress("Python load", || load.progress(), 50);
    let other = s.pki.issue("other", 0x2001);
    let cert = s.cert_path.display().to_string();
    let key = s.key_path.display().to_string();
    // (what, how to break the files, what the reason must say)
    type Case<'a> = (&'static str, Box<dyn Fn() + 'a>, Vec<String>);
    let cases: Vec<Case> = vec![
        (
            "missing certificate",
            Box::new(|| std::fs::remove_file(&s.cert_path).unwrap()),
            vec![
                format!("TLS certificate chain {cert}"),
                "cannot read it".into(),
                "No such file".into(),
            ],
        ),
        (
            "garbage certificate",
            Box::new(|| std::fs::write(&s.cert_path, "not a certificate\n").unwrap()),
            vec![
                format!("TLS certificate chain {cert}"),
                "no PEM CERTIFICATE block".into(),
            ],
        ),
        (
            "truncated certificate",
            Box::new(|| {
                let pem = std::fs::read_to_string(&s.first.cert).unwrap();
                std::fs::write(&s.cert_path, &pem[..pem.len() / 2]).unwrap()
            }),
            vec![
                format!("TLS certificate chain {cert}"),
                "not valid PEM".into(),
            ],
        ),
        (
            "certificate of another key",
            Box::new(|| install(&other.cert, &s.cert_path)),
            vec![format!(
                "the certificate chain {cert} and the private key {key} cannot be used together"
            )],
        ),
        (
            "missing key",
            Box::new(|| {
                install(&s.first.cert, &s.cert_path);
                std::fs::remove_file(&s.key_path).unwrap()
            }),
            vec![format!("TLS private key {key}"), "cannot read it".into()],
        ),
    ];
    let old = s.server.version();
    for (what, break_it, want) in &cases {
        break_it();
        let reason = failed_upgrade(&s);
        eprintln!("{what}: {reason}");
        for w in want {
            assert!(
                reason.contains(w.as_str()),
                "{what}: {w:?} not in {reason:?}"
            );
        }
        assert!(
            s.server.log().contains(&want[0]),
            "{what}: the reason is in the log"
        );
        // The old generation keeps serving, over TLS too.
        let v = s.server.version();
        assert_eq!((v.pid, v.generation), (old.pid, old.generation), "{what}");
        wait_progress("Python load", || load.progress(), 20);
        wait_for(T, "no child left", || {
            proc::children(old.pid).is_empty().then_some(())
        });
    }
    let st = load.stop();
    eprintln!("load during the failed upgrades: {st:?}");
    assert_eq!(st.failed, 0, "{:?}", st.errors);
    assert_eq!(st.wrong, 0, "{:?}", st.errors);
    assert_eq!(st.generations.iter().copied().collect::<Vec<_>>(), [1]);
    assert!(!s.server.log().contains("panicked"));
    // Fixed files: the next upgrade works.
    install(&s.first.cert, &s.cert_path);
    install(&s.first.key, &s.key_path);
    let r = upgrade(&s);
    assert_eq!(r.to_generation, 2);
    let mut py = PySession::start(&s);
    assert_eq!(generation(&py.fresh("a", false)), 2);
}

#[test]
fn unreadable_ticket_state_from_the_previous_generation_rolls_the_upgrade_back() {
    for (fault, want) in [
        ("tls-state:garbage", "wrong magic bytes"),
        (
            "tls-state:v2",
            "format version 2; this build reads version 1",
        ),
    ] {
        let s = TlsServer::start(fixture(), "tls-bad-state", &[]);
        // Generation 2 exports the bad state; generation 3 must refuse it.
        s.server.arm_fault(fault);
        upgrade(&s);
        let serving = s.server.version();
        assert_eq!(serving.generation, 2);
        let reason = failed_upgrade(&s);
        eprintln!("{fault}: {reason}");
        assert!(
            reason.contains("TLS session-ticket keys from the previous generation"),
            "{reason}"
        );
        assert!(reason.contains(want), "{reason}");
        let v = s.server.version();
        assert_eq!((v.pid, v.generation), (serving.pid, 2));
        let mut py = PySession::start(&s);
        assert_eq!(generation(&py.fresh("a", false)), 2);
        assert!(!s.server.log().contains("panicked"));
    }
}

#[test]
fn idle_tls_connections_close_cleanly_spread_out_after_the_new_generation_serves() {
    const N: usize = 20;
    let s = TlsServer::start(
        fixture(),
        "tls-idle",
        &["--close-spread", "2s", "--no-tls-handoff"],
    );
    let idle = PyIdle::start(&s, N, Duration::from_secs(60));
    let old = s.server.pid() as u64;
    assert!(idle.pids.iter().all(|p| *p == old));
    // Idle for longer than the quiet period (1 s), so each closes at its
    // own moment in the spread.
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let r = upgrade(&s);
    eprintln!("drain {} ms, total {:?}", r.drain_ms, t0.elapsed());
    assert_eq!(r.handed_over, 0, "TLS connections are never handed over");
    let report = idle.finish(Duration::from_secs(60));
    eprintln!("{report}");
    assert_eq!(report["still_open"], 0);
    let closes = report["closes"].as_array().unwrap();
    assert_eq!(closes.len(), N);
    for c in closes {
        assert_eq!(c["ending"], "clean", "closed with close_notify: {c}");
        assert_eq!(
            c["serving_pid"].as_u64(),
            Some(r.new_pid as u64),
            "closed only once the new generation served: {c}"
        );
    }
    let times: Vec<f64> = closes.iter().map(|c| c["time"].as_f64().unwrap()).collect();
    let first = times.iter().copied().fold(f64::MAX, f64::min);
    let last = times.iter().copied().fold(f64::MIN, f64::max);
    eprintln!("closes spread over {:.2} s", last - first);
    assert!(
        last - first > 1.0,
        "closes spread over the 2 s window, not all at once: {:.2} s",
        last - first
    );
    assert!(
        last - first < 3.0,
        "all within the window: {:.2} s",
        last - first
    );
    assert!(
        r.drain_ms >= 1000 && r.drain_ms < 5000,
        "the old generation drained for about the spread: {} ms",
        r.drain_ms
    );
}

//! Issue 16: TLS connections survive an upgrade. An idle HTTP/1.1
//! connection over TLS moves to the new generation with its session keys
//! (no new handshake), is served there on baton's record layer, and moves
//! again at the next upgrade. What the record layer cannot follow (a TLS
//! 1.3 KeyUpdate) ends the connection cleanly.
//!
//! Real processes and real clients: Python's `ssl` (`tls_client.py hold`)
//! and a small rustls client (`tls-keyupdate-client`, for the KeyUpdate
//! Python cannot send). The server's own counters (`/metrics`) say how
//! many handshakes it did and how many TLS connections moved.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use baton::control::{Reply, Request, UpgradeReport};
use baton_tests::tls::{PyHold, PyIdle, TlsServer};
use baton_tests::{free_port, proc, wait_for};
use serde_json::Value;

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const KEYUPDATE_CLIENT: &str = env!("CARGO_BIN_EXE_tls-keyupdate-client");
const T: Duration = Duration::from_secs(30);

/// A TLS server with `/metrics` on a plain listener of its own. The close
/// spread is long (5 s): a connection that did not move would keep the old
/// generation for seconds.
fn start(name: &str, extra: &[&str]) -> (TlsServer, SocketAddr) {
    start_spread(name, "5s", extra)
}

fn start_spread(name: &str, spread: &str, extra: &[&str]) -> (TlsServer, SocketAddr) {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let m = metrics.to_string();
    let mut args = vec!["--metrics", &m, "--close-spread", spread];
    args.extend_from_slice(extra);
    (TlsServer::start(Path::new(FIXTURE), name, &args), metrics)
}

/// A counter from the server's `/metrics` (0 if absent).
fn counter(metrics: SocketAddr, name: &str) -> u64 {
    let r = baton_tests::http::get(metrics, "/metrics").expect("GET /metrics");
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

/// Upgrade and wait until the old process is gone and the new one knows it.
fn upgrade(s: &TlsServer) -> UpgradeReport {
    let reply = baton_tests::control_call_within(
        &s.server.control,
        &Request::Upgrade(Default::default()),
        |_| {},
        Duration::from_secs(120),
    );
    match reply {
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

/// Every connection answered `GET /version` from `pid` in `generation`,
/// on a connection handed over.
fn all_answered_by(results: &[Value], pid: u32, generation: u64) {
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["ok"], true, "connection {i}: {r}");
        assert_eq!(
            r["body"]["pid"].as_u64(),
            Some(pid as u64),
            "connection {i}: {r}"
        );
        assert_eq!(
            r["body"]["generation"].as_u64(),
            Some(generation),
            "connection {i}: {r}"
        );
        assert_eq!(r["body"]["handed_over"], true, "connection {i}: {r}");
        assert_eq!(r["body"]["tls"], true, "connection {i}: {r}");
        assert!(r["connection"].is_null(), "connection {i} kept alive: {r}");
    }
}

/// `POST /echo` of `n` bytes on each connection comes back intact.
fn echo_all(h: &mut PyHold, n: usize) {
    let v = h.cmd(&format!("echo {n}"));
    for (i, r) in v["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["ok"], true, "echo of {n} bytes on connection {i}: {r}");
    }
}

#[test]
fn idle_tls13_and_tls12_connections_move_across_ten_upgrades_without_a_new_handshake() {
    // TLS 1.3 (Python's default suite), and TLS 1.2 with AES-256-GCM,
    // AES-128-GCM and ChaCha20-Poly1305.
    const N: usize = 4;
    let (s, metrics) = start("tls-handoff-idle", &[]);
    let mut t13 = PyHold::start(&s, N, false);
    let mut t12 = PyHold::start(&s, N, true);
    // The other two TLS 1.2 AEADs (the certificate is ECDSA).
    let mut chacha = PyHold::start_with(&s, 1, true, Some("ECDHE-ECDSA-CHACHA20-POLY1305"));
    let mut aes128 = PyHold::start_with(&s, 1, true, Some("ECDHE-ECDSA-AES128-GCM-SHA256"));
    for (h, want) in [
        (&t13, "TLSv1.3"),
        (&t12, "TLSv1.2"),
        (&chacha, "TLSv1.2"),
        (&aes128, "TLSv1.2"),
    ] {
        for r in &h.ready {
            assert_eq!(r["tls"], want, "{r}");
            assert_eq!(r["pid"].as_u64(), Some(s.server.pid() as u64));
        }
    }
    eprintln!(
        "suites: {} / {} / {} / {}",
        t13.ready[0]["cipher"],
        t12.ready[0]["cipher"],
        chacha.ready[0]["cipher"],
        aes128.ready[0]["cipher"]
    );
    assert_eq!(chacha.ready[0]["cipher"], "ECDHE-ECDSA-CHACHA20-POLY1305");
    assert_eq!(aes128.ready[0]["cipher"], "ECDHE-ECDSA-AES128-GCM-SHA256");
    const ALL: u64 = 2 * N as u64 + 2;
    let handshakes = counter(metrics, "baton_tls_handshakes_total");
    assert_eq!(handshakes, ALL, "one handshake per connection");
    let mut r = None;
    for i in 0..10 {
        let up = upgrade(&s);
        eprintln!(
            "upgrade {}: drain {} ms, TLS connections moved so far {}",
            i + 1,
            up.drain_ms,
            counter(metrics, "baton_tls_handed_over_total")
        );
        // Nothing held the old generation: no TLS connection waited for
        // its moment in the 5 s close spread.
        assert!(
            up.drain_ms < 1000,
            "upgrade {}: the old generation exited within 1 s of promotion ({} ms)",
            i + 1,
            up.drain_ms
        );
        if i == 4 {
            // Halfway: big bodies both ways on the moved connections (many
            // records each way; the sequence numbers move on with them).
            for h in [&mut t13, &mut t12, &mut chacha, &mut aes128] {
                echo_all(h, 200_000);
            }
        }
        r = Some(up);
    }
    let r = r.unwrap();
    assert_eq!(r.to_generation, 11);
    all_answered_by(&t13.get_all("/version"), r.new_pid, 11);
    all_answered_by(&t12.get_all("/version"), r.new_pid, 11);
    all_answered_by(&chacha.get_all("/version"), r.new_pid, 11);
    all_answered_by(&aes128.get_all("/version"), r.new_pid, 11);
    // And again, on the same sockets.
    all_answered_by(&t13.get_all("/version"), r.new_pid, 11);
    echo_all(&mut t13, 1 << 20);
    assert_eq!(
        counter(metrics, "baton_tls_handshakes_total"),
        handshakes,
        "no new TLS handshake in ten upgrades"
    );
    let moved = counter(metrics, "baton_tls_handed_over_total");
    assert_eq!(moved, 10 * ALL, "each connection moved at each upgrade");
    assert_eq!(counter(metrics, "baton_tls_received_total"), moved);
    for c in ["key_update", "renegotiation", "alert", "limit", "refused"] {
        assert_eq!(
            counter(metrics, &format!("baton_tls_closed_{c}_total")),
            0,
            "{c}"
        );
    }
    assert!(!s.server.log().contains("panicked"));
}

#[test]
fn a_tls_connection_busy_with_a_request_moves_after_its_response() {
    let (s, metrics) = start("tls-handoff-busy", &[]);
    let mut h = PyHold::start(&s, 1, false);
    let old = s.server.pid();
    // A request the old generation holds for 4 s, sent before the upgrade.
    assert_eq!(h.cmd("send /slow?ms=4000")["sent"], true);
    let r = upgrade(&s);
    let resp = h.cmd("recv");
    eprintln!("the slow response: {resp}");
    assert_eq!(resp["ok"], true, "{resp}");
    assert!(
        resp["body"]
            .as_str()
            .unwrap()
            .contains(&format!("generation 1 pid {old}")),
        "the old generation answered the request it had: {resp}"
    );
    assert!(resp["connection"].is_null(), "no Connection: close: {resp}");
    all_answered_by(&h.get_all("/version"), r.new_pid, 2);
    assert_eq!(counter(metrics, "baton_tls_handshakes_total"), 1);
    assert_eq!(counter(metrics, "baton_tls_handed_over_total"), 1);
}

#[test]
fn half_a_request_read_before_the_handoff_is_finished_and_answered_by_the_new_generation() {
    let (s, metrics) = start("tls-handoff-half", &[]);
    let mut h = PyHold::start(&s, 1, false);
    // The old generation decrypts and reads the first half of a request
    // (hyper holds it, waiting for the rest): the connection is idle, and
    // that plaintext must travel with the keys.
    assert_eq!(h.cmd("part /version")["sent"], true);
    // (The upgrade takes milliseconds to start the new generation; the
    // half request is read long before. Were it not, it would travel in
    // the socket instead, and this test would still pass: the mutation
    // that drops the carried plaintext makes it fail, see the report of
    // the commit that added it.)
    let r = upgrade(&s);
    let resp = h.cmd("rest");
    eprintln!("the finished request: {resp}");
    assert_eq!(resp["ok"], true, "{resp}");
    let body: Value = serde_json::from_str(resp["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["pid"].as_u64(), Some(r.new_pid as u64), "{resp}");
    assert_eq!(body["handed_over"], true);
    assert_eq!(counter(metrics, "baton_tls_handed_over_total"), 1);
    assert_eq!(counter(metrics, "baton_tls_handshakes_total"), 1);
}

/// The rustls client: started, connected, first answer read.
struct KeyUpdateClient {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl KeyUpdateClient {
    fn start(s: &TlsServer) -> (KeyUpdateClient, Value) {
        Self::start_suite(s, None)
    }

    fn start_suite(s: &TlsServer, suite: Option<&str>) -> (KeyUpdateClient, Value) {
        let mut cmd = Command::new(KEYUPDATE_CLIENT);
        cmd.arg(s.tls_port.to_string())
            .arg(&s.pki.ca)
            .args(suite)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = baton_tests::spawn_owned(&mut cmd).unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut c = KeyUpdateClient {
            child,
            stdin,
            lines,
        };
        let first = c.line();
        (c, first)
    }

    fn line(&mut self) -> Value {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the rustls client answered within 60 s");
        serde_json::from_str(&l).unwrap()
    }

    fn cmd(&mut self, c: &str) -> Value {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for KeyUpdateClient {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        if baton_tests::wait_owned(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn a_key_update_on_a_handed_over_connection_closes_it_cleanly() {
    let (s, metrics) = start("tls-handoff-keyupdate", &[]);
    let (mut c, first) = KeyUpdateClient::start(&s);
    assert_eq!(first["pid"].as_u64(), Some(s.server.pid() as u64));
    let r = upgrade(&s);
    let v = c.cmd("get");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pid"].as_u64(), Some(r.new_pid as u64), "{v}");
    // The record layer cannot follow a KeyUpdate: close_notify, not a hang.
    let v = c.cmd("keyupdate");
    eprintln!("after the KeyUpdate: {v}");
    assert_eq!(v["ending"], "clean", "ended with close_notify: {v}");
    wait_for(T, "the close to be counted", || {
        (counter(metrics, "baton_tls_closed_key_update_total") == 1).then_some(())
    });
    // The server goes on serving, and the next connection handshakes anew.
    let (_c2, first) = KeyUpdateClient::start(&s);
    assert_eq!(first["pid"].as_u64(), Some(r.new_pid as u64));
    assert_eq!(counter(metrics, "baton_tls_handshakes_total"), 2);
    assert!(!s.server.log().contains("panicked"));
}

#[test]
fn a_tls_connection_whose_successor_refuses_it_continues_here_and_closes_cleanly() {
    const N: usize = 4;
    let (s, metrics) = start_spread("tls-handoff-refused", "1s", &[]);
    let idle = PyIdle::start(&s, N, Duration::from_secs(60));
    // The next generation takes the TLS kind but refuses every batch: the
    // keys are out of rustls by then, so the old generation carries on with
    // its record layer and ends each connection politely at its moment.
    s.server.arm_fault("tls-refuse");
    let r = upgrade(&s);
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
    assert_eq!(counter(metrics, "baton_tls_handed_over_total"), 0);
    assert!(!s.server.log().contains("panicked"));
}

#[test]
fn a_key_update_in_the_middle_of_a_request_body_ends_the_connection_instead_of_hanging() {
    let (s, metrics) = start("tls-handoff-keyupdate-body", &[]);
    let (mut c, _) = KeyUpdateClient::start(&s);
    let r = upgrade(&s);
    assert_eq!(c.cmd("get")["pid"].as_u64(), Some(r.new_pid as u64));
    // The rest of the body is under a key the record layer does not have:
    // the request cannot finish; after a bounded time (10 s) the
    // connection is dropped.
    let v = c.cmd("keyupdate-mid-body");
    eprintln!("after the KeyUpdate inside a body: {v}");
    assert_ne!(v["ending"], "timeout", "the connection ended: {v}");
    assert_eq!(v["answered"], false, "{v}");
    wait_for(T, "the close to be counted", || {
        (counter(metrics, "baton_tls_closed_key_update_total") == 1).then_some(())
    });
    let (_c2, first) = KeyUpdateClient::start(&s);
    assert_eq!(first["pid"].as_u64(), Some(r.new_pid as u64));
}

#[test]
fn every_tls13_suite_moves_from_a_rustls_client() {
    let (s, metrics) = start("tls-handoff-tls13-suites", &[]);
    let suites = [
        "TLS13_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256",
    ];
    let mut clients: Vec<KeyUpdateClient> = suites
        .iter()
        .map(|suite| {
            let (c, first) = KeyUpdateClient::start_suite(&s, Some(suite));
            assert_eq!(first["suite"], *suite, "{first}");
            c
        })
        .collect();
    let mut last = None;
    for _ in 0..3 {
        last = Some(upgrade(&s));
    }
    let r = last.unwrap();
    for (c, suite) in clients.iter_mut().zip(suites) {
        let v = c.cmd("get");
        assert_eq!(v["ok"], true, "{suite}: {v}");
        assert_eq!(v["pid"].as_u64(), Some(r.new_pid as u64), "{suite}: {v}");
    }
    assert_eq!(counter(metrics, "baton_tls_handshakes_total"), 3);
    assert_eq!(counter(metrics, "baton_tls_handed_over_total"), 9);
}

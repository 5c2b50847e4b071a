//! Issue 16's acceptance: TLS connections move to the new generation with
//! their session keys — no new handshake, same socket — for every client
//! stack, TLS version, cipher suite and certificate type.
//!
//! Clients (`baton_tests::tls_matrix`): a rustls client (`baton-tls-client`),
//! `openssl s_client` and Python's `ssl`, each holding idle HTTP/1.1
//! keep-alive connections of exactly one (version, suite). Servers: the
//! fixture with an RSA certificate and one with an ECDSA certificate
//! (TLS 1.2 suites name the key type), `--metrics` on, so the test reads
//! `baton_tls_*_total`. Every wait has a timeout; no client ever opens a
//! second connection, so an answer after the upgrades is an answer on the
//! socket and the TLS session of the first request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use baton::control::{Reply, UpgradeReport};
use baton_tests::tls::TlsServer;
use baton_tests::tls_matrix::{
    Aead, Answer, Combo, Held, HeldClient, KeyKind, SClient, TlsVersion, check_same_socket,
    openssl_clients, python_client, rustls_client,
};
use baton_tests::{Version, free_port, http, openmetrics, proc, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const CLIENT: &str = env!("CARGO_BIN_EXE_baton-tls-client");
const T: Duration = Duration::from_secs(30);
const UPGRADES: u64 = 10;

/// TLS handshakes completed, across generations.
const HANDSHAKES: &str = "baton_tls_handshakes_total";
/// TLS connections handed to a successor with their keys, across
/// generations.
const HANDED_OVER: &str = "baton_tls_handed_over_total";
/// TLS connections closed after a KeyUpdate.
const CLOSED_KEY_UPDATE: &str = "baton_tls_closed_key_update_total";
/// TLS connections closed after a TLS 1.2 renegotiation request.
const CLOSED_RENEGOTIATION: &str = "baton_tls_closed_renegotiation_total";

struct Srv {
    tls: TlsServer,
    metrics: std::net::SocketAddr,
}

fn server(name: &str, key: KeyKind) -> Srv {
    let port = free_port();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let m = metrics.to_string();
    let tls = TlsServer::start_with_key(Path::new(FIXTURE), name, &["--metrics", &m], key);
    Srv { tls, metrics }
}

/// A counter from `/metrics`; `None` if the server does not have it.
fn metric(s: &Srv, series: &str) -> Option<f64> {
    let r = http::get(s.metrics, "/metrics").expect("GET /metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    openmetrics::parse(&r.text())
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}"))
        .get(series)
}

fn require_metric(s: &Srv, series: &str) -> f64 {
    metric(s, series).unwrap_or_else(|| {
        panic!("the server's /metrics has no {series} (the TLS handoff counters)")
    })
}

/// Upgrade and wait until the old process is gone and the new one knows it.
fn upgrade(s: &Srv) -> UpgradeReport {
    let r = match baton_tests::control_upgrade(&s.tls.server.control) {
        Reply::Upgraded(r) => r,
        other => panic!("upgrade failed: {other:?}"),
    };
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(r.old_pid)).then_some(())
    });
    wait_for(T, "the new generation to see its predecessor gone", || {
        let st = baton_tests::control_status(&s.tls.server.control);
        (!st.notes.iter().any(|n| n.contains("still draining"))).then_some(())
    });
    r
}

/// The end of a handoff with requests in flight: none of `bad` (requests
/// lost while the upgrade ran), the upgrade succeeded, the old generation
/// exits, then every client's connection answers from the new generation
/// on its socket with no new TLS handshake (`handshakes_before`).
fn finish_handoff(
    s: &Srv,
    up: std::thread::JoinHandle<Reply>,
    old_pid: u32,
    clients: &mut [Held],
    mut bad: Vec<String>,
    handshakes_before: Option<f64>,
) -> UpgradeReport {
    assert!(bad.is_empty(), "lost requests:\n{}", bad.join("\n"));
    let report = match up.join().unwrap() {
        Reply::Upgraded(r) => r,
        other => panic!("upgrade failed: {other:?}"),
    };
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(old_pid)).then_some(())
    });
    for h in clients.iter_mut() {
        let now = h.get();
        bad.extend(check_same_socket(h, &now, report.new_pid as u64));
    }
    assert!(
        bad.is_empty(),
        "after the handoff, on the same connection:\n{}",
        bad.join("\n")
    );
    assert_eq!(
        Some(require_metric(s, HANDSHAKES)),
        handshakes_before,
        "no new TLS handshake"
    );
    report
}

/// A command only the rustls client has.
fn rustls_cmd(h: &mut Held, cmd: &str) -> serde_json::Value {
    match &mut h.client {
        HeldClient::Rustls(c) => c.cmd(cmd),
        _ => panic!("{}: `{cmd}` is a rustls client command", h.name()),
    }
}

/// Every client of every combination on `s`'s certificate type.
fn clients_for(s: &Srv, key: KeyKind) -> Vec<Held> {
    let (port, ca) = (s.tls.tls_port, s.tls.pki.ca.clone());
    let dir = s.tls.server.dir.path.clone();
    let mut v = Vec::new();
    for combo in Combo::all().into_iter().filter(|c| c.key == key) {
        v.push(rustls_client(Path::new(CLIENT), port, &ca, combo, 2));
        v.push(python_client(&dir, port, &ca, combo, 2));
        v.push(openssl_clients(port, &ca, combo, 1));
    }
    v
}

#[test]
fn idle_tls_connections_of_every_client_version_and_suite_answer_on_their_socket_after_ten_upgrades()
 {
    let servers: Vec<(KeyKind, Srv)> = [KeyKind::Rsa, KeyKind::Ecdsa]
        .into_iter()
        .map(|k| (k, server(&format!("tls-matrix-{}", k.name()), k)))
        .collect();
    let mut held: Vec<(usize, Held)> = Vec::new();
    for (i, (k, s)) in servers.iter().enumerate() {
        let first = s.tls.server.pid() as u64;
        for h in clients_for(s, *k) {
            for a in &h.first {
                assert!(a.ok, "{}: first request: {}", h.name(), a.error);
                assert_eq!(a.pid, first, "{}", h.name());
            }
            held.push((i, h));
        }
    }
    let conns: Vec<u64> = (0..servers.len())
        .map(|i| {
            held.iter()
                .filter(|(j, _)| *j == i)
                .map(|(_, h)| h.first.len() as u64)
                .sum()
        })
        .collect();
    eprintln!(
        "{} clients, {:?} connections (rsa, ecdsa)",
        held.len(),
        conns
    );
    let before: Vec<Option<f64>> = servers.iter().map(|(_, s)| metric(s, HANDSHAKES)).collect();
    // Ten upgrades of both servers at once; the connections stay idle.
    let reports: Vec<Vec<UpgradeReport>> = std::thread::scope(|sc| {
        let hs: Vec<_> = servers
            .iter()
            .map(|(_, s)| sc.spawn(move || (0..UPGRADES).map(|_| upgrade(s)).collect::<Vec<_>>()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Then one request on every connection.
    let mut bad = Vec::new();
    for (i, h) in &mut held {
        let pid = servers[*i].1.tls.server.pid() as u64;
        let now = h.get();
        for a in now.iter().filter(|a| a.ok) {
            assert_eq!(a.generation, UPGRADES + 1, "{}", h.name());
        }
        bad.extend(check_same_socket(h, &now, pid));
    }
    let total: u64 = conns.iter().sum();
    assert!(
        bad.is_empty(),
        "{} of {total} connections were not answered by the new generation on their socket:\n{}",
        bad.len(),
        bad.join("\n")
    );
    for ((k, s), (rs, n)) in servers.iter().zip(reports.iter().zip(&conns)) {
        eprintln!(
            "{}: drain_ms {:?}, handed over {:?}",
            k.name(),
            rs.iter().map(|r| r.drain_ms).collect::<Vec<_>>(),
            rs.iter().map(|r| r.handed_over).collect::<Vec<_>>()
        );
        for (u, r) in rs.iter().enumerate() {
            assert_eq!(
                r.handed_over,
                *n,
                "{}: upgrade {}: every connection handed over",
                k.name(),
                u + 1
            );
            assert!(
                r.drain_ms < 1000,
                "{}: upgrade {}: the old generation took {} ms after promotion to exit",
                k.name(),
                u + 1,
                r.drain_ms
            );
        }
        let b = before[servers.iter().position(|(kk, _)| kk == k).unwrap()];
        let after = require_metric(s, HANDSHAKES);
        assert_eq!(
            Some(after),
            b,
            "{}: no new TLS handshake across {UPGRADES} upgrades",
            k.name()
        );
        assert_eq!(
            require_metric(s, HANDED_OVER),
            (n * UPGRADES) as f64,
            "{}: every connection handed over with its keys at every upgrade",
            k.name()
        );
    }
}

/// A held `POST /echo` on a TLS connection: its body and the next request
/// arrive in one write (one TLS record) while the new generation already
/// serves. Both are answered, and the connection then lives on in the new
/// generation, on the same socket, with no new handshake.
#[test]
fn a_request_pipelined_at_the_handoff_is_answered_and_its_tls_connection_moves() {
    let s = server("tls-pipelined", KeyKind::Ecdsa);
    let (port, ca) = (s.tls.tls_port, s.tls.pki.ca.clone());
    let old = s.tls.server.version();
    let mut clients: Vec<Held> = Combo::all()
        .into_iter()
        .filter(|c| c.key == KeyKind::Ecdsa && c.aead == Aead::Aes128Gcm)
        .map(|c| rustls_client(Path::new(CLIENT), port, &ca, c, 2))
        .collect();
    let before = metric(&s, HANDSHAKES);
    for h in &mut clients {
        let v = rustls_cmd(h, "hold");
        for a in v["held"].as_array().unwrap() {
            assert_eq!(a["ok"], true, "{}: {v}", h.combo.label());
        }
    }
    let ctl = s.tls.server.control.clone();
    let up = std::thread::spawn(move || baton_tests::control_upgrade(&ctl));
    let new = wait_for(T, "the new generation to serve", || {
        let v = Version::parse(&http::get(s.tls.server.addr, "/version").ok()?.body)?;
        (v.pid != old.pid).then_some(v)
    });
    let mut bad = Vec::new();
    for h in &mut clients {
        let v = rustls_cmd(h, "release");
        for (i, r) in v["released"].as_array().unwrap().iter().enumerate() {
            if r["echo"]["ok"] != true {
                bad.push(format!(
                    "{} #{i}: the held request: {}",
                    h.combo.label(),
                    r["echo"]
                ));
            }
            if r["next"]["ok"] != true {
                bad.push(format!(
                    "{} #{i}: the pipelined request: {}",
                    h.combo.label(),
                    r["next"]
                ));
            }
        }
    }
    let report = finish_handoff(&s, up, old.pid, &mut clients, bad, before);
    assert_eq!(report.new_pid, new.pid);
}

/// A TLS 1.3 KeyUpdate on a connection the record layer carries (handed
/// over once) ends it with close_notify — not a hang, not a reset — from
/// `openssl s_client` (`k`) and from rustls (`refresh_traffic_keys`), for
/// each TLS 1.3 suite; the server counts each close and serves on.
#[test]
fn a_key_update_on_a_handed_over_tls_connection_closes_it_cleanly() {
    let s = server("tls-keyupdate", KeyKind::Ecdsa);
    let (port, ca) = (s.tls.tls_port, s.tls.pki.ca.clone());
    let t13: Vec<Combo> = Combo::all()
        .into_iter()
        .filter(|c| c.key == KeyKind::Ecdsa && c.version == TlsVersion::V13)
        .collect();
    let mut ossl: Vec<(Combo, SClient, Answer)> = t13
        .iter()
        .map(|c| {
            let (sc, a) = SClient::start(port, &ca, *c);
            assert!(a.ok, "{}: {}", c.label(), a.error);
            (*c, sc, a)
        })
        .collect();
    let mut rustls: Vec<Held> = t13
        .iter()
        .map(|c| rustls_client(Path::new(CLIENT), port, &ca, *c, 1))
        .collect();
    let r = upgrade(&s);
    let pid = r.new_pid as u64;
    let mut bad = Vec::new();
    for (c, sc, first) in &mut ossl {
        let a = sc.get();
        if !a.ok || a.pid != pid || a.peer != first.peer || !a.handed_over {
            bad.push(format!(
                "openssl s_client {}: not answered by the new generation on its socket: {a:?}",
                c.label()
            ));
        }
    }
    for h in &mut rustls {
        let now = h.get();
        bad.extend(check_same_socket(h, &now, pid));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let before = metric(&s, CLOSED_KEY_UPDATE).unwrap_or(0.0);
    for (c, sc, _) in &mut ossl {
        let ending = sc.key_update(Duration::from_secs(15));
        if ending != "clean" {
            bad.push(format!(
                "openssl s_client {}: KeyUpdate ended the connection with {ending}\n{}",
                c.label(),
                sc.transcript()
            ));
        }
    }
    for h in &mut rustls {
        let v = rustls_cmd(h, "keyupdate");
        for e in v["endings"].as_array().unwrap() {
            if e != "clean" {
                bad.push(format!(
                    "rustls {}: KeyUpdate ended the connection with {e}",
                    h.combo.label()
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(
        require_metric(&s, CLOSED_KEY_UPDATE) - before,
        (ossl.len() + rustls.len()) as f64,
        "each KeyUpdate close counted"
    );
    // The server serves on, over TLS too.
    let h = rustls_client(Path::new(CLIENT), port, &ca, t13[0], 1);
    assert!(h.first[0].ok && h.first[0].pid == pid, "{:?}", h.first);
}

/// Requests sent on idle TLS connections while they are being handed over:
/// the new generation is held at its promotion (`hold-at:promoted`), so the
/// old one is draining — detaching, extracting keys, handing over — when
/// the requests arrive, and cannot finish until the test lets the new one
/// go on. Every request is answered, and the connections then answer from
/// the new generation on their socket, with no new handshake.
#[test]
fn requests_sent_while_tls_connections_are_being_handed_over_are_answered() {
    let s = server("tls-inflight", KeyKind::Rsa);
    let (port, ca) = (s.tls.tls_port, s.tls.pki.ca.clone());
    let old = s.tls.server.version();
    let mut clients: Vec<Held> = Combo::all()
        .into_iter()
        .filter(|c| c.key == KeyKind::Rsa && c.aead == Aead::Chacha20Poly1305)
        .map(|c| rustls_client(Path::new(CLIENT), port, &ca, c, 4))
        .collect();
    let before = metric(&s, HANDSHAKES);
    let gate = s.tls.server.dir.join("promoted-gate");
    let reached = s.tls.server.dir.join("promoted-gate.reached");
    s.tls
        .server
        .arm_fault(&format!("hold-at:promoted:{}", gate.display()));
    let ctl = s.tls.server.control.clone();
    let up = std::thread::spawn(move || baton_tests::control_upgrade(&ctl));
    wait_for(T, "the new generation to reach its promotion", || {
        reached.exists().then_some(())
    });
    let mut bad = Vec::new();
    for h in &mut clients {
        let v = rustls_cmd(h, "send");
        for (i, a) in v["sent"].as_array().unwrap().iter().enumerate() {
            if a["ok"] != true {
                bad.push(format!("{} #{i}: send: {a}", h.combo.label()));
            }
        }
    }
    std::fs::write(&gate, b"go").unwrap();
    for h in &mut clients {
        let v = rustls_cmd(h, "recv");
        eprintln!("{}: {v}", h.combo.label());
        for (i, a) in v["answers"].as_array().unwrap().iter().enumerate() {
            if a["ok"] != true {
                bad.push(format!(
                    "{} #{i}: the request sent during the handoff: {a}",
                    h.combo.label()
                ));
            }
        }
    }
    finish_handoff(&s, up, old.pid, &mut clients, bad, before);
}

/// A TLS 1.2 renegotiation request (`openssl s_client`'s `R`: a new
/// ClientHello) on a connection the record layer carries: it cannot follow
/// one, so the connection ends with close_notify — not a hang — for each
/// TLS 1.2 suite; the server counts each close and serves on.
#[test]
fn a_renegotiation_request_on_a_handed_over_tls12_connection_closes_it_cleanly() {
    let s = server("tls-renegotiation", KeyKind::Rsa);
    let (port, ca) = (s.tls.tls_port, s.tls.pki.ca.clone());
    let t12: Vec<Combo> = Combo::all()
        .into_iter()
        .filter(|c| c.key == KeyKind::Rsa && c.version == TlsVersion::V12)
        .collect();
    let mut ossl: Vec<(Combo, SClient, Answer)> = t12
        .iter()
        .map(|c| {
            let (sc, a) = SClient::start(port, &ca, *c);
            assert!(a.ok, "{}: {}", c.label(), a.error);
            (*c, sc, a)
        })
        .collect();
    let r = upgrade(&s);
    let pid = r.new_pid as u64;
    let before = metric(&s, CLOSED_RENEGOTIATION).unwrap_or(0.0);
    let mut bad = Vec::new();
    for (c, sc, first) in &mut ossl {
        let a = sc.get();
        if !a.ok || a.pid != pid || a.peer != first.peer || !a.handed_over {
            bad.push(format!(
                "openssl s_client {}: not answered by the new generation on its socket: {a:?}",
                c.label()
            ));
            continue;
        }
        let ending = sc.renegotiate(Duration::from_secs(15));
        if ending != "clean" {
            bad.push(format!(
                "openssl s_client {}: a renegotiation request ended the connection with {ending}\n{}",
                c.label(),
                sc.transcript()
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(
        require_metric(&s, CLOSED_RENEGOTIATION) - before,
        ossl.len() as f64,
        "each renegotiation close counted"
    );
    // The server serves on, over TLS too.
    let h = rustls_client(Path::new(CLIENT), port, &ca, t12[0], 1);
    assert!(h.first[0].ok && h.first[0].pid == pid, "{:?}", h.first);
}

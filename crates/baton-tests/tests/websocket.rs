//! WebSockets across upgrades, with real clients: Python's `websockets` and
//! Node's `ws` against the demo's `GET /ws` echo
//! (`crates/baton-demo/src/ws.rs`, `crates/baton-http/src/ws.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use baton::control::Reply;
use baton_tests::ws::{ClientReport, Lang, WsClients};
use baton_tests::{Server, ServerOpts, control_upgrade, proc, wait_for_opt};

fn fixture() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_baton-fixture"))
}

fn start(name: &str, drain_timeout: &str) -> Server {
    let opts = ServerOpts {
        args: vec!["--drain-timeout".into(), drain_timeout.into()],
        ..ServerOpts::default()
    };
    Server::start_with(fixture(), name, opts)
}

fn url(s: &Server) -> String {
    format!("ws://{}/ws", s.addr)
}

/// One upgrade over the control socket; the report.
fn upgrade(s: &Server) -> baton::UpgradeReport {
    match control_upgrade(&s.control) {
        Reply::Upgraded(r) => r,
        other => panic!("upgrade failed: {other:?}"),
    }
}

/// The acceptance test of issue 15: 20 clients (10 Python `websockets`, 10
/// Node `ws`), a message every ~50 ms each, 10 upgrades. Every client keeps
/// its TCP connection (one local port), `seq` goes on by one, each new pid
/// answers it, no close frame, no error; the old generation is gone within
/// 1 s of its promotion each time.
#[test]
fn twenty_websocket_clients_keep_their_connections_and_seq_across_ten_upgrades() {
    let s = start("ws-ten-upgrades", "30s");
    let every = Duration::from_millis(50);
    let py = WsClients::start(Lang::Python, &url(&s), 10, every, Duration::from_secs(300));
    let node = WsClients::start(Lang::Node, &url(&s), 10, every, Duration::from_secs(300));
    py.wait_ready(Duration::from_secs(30));
    node.wait_ready(Duration::from_secs(30));
    let mut pids = vec![s.pid()];
    for i in 1..=10 {
        let r = upgrade(&s);
        let replied = Instant::now();
        assert_eq!(r.old_pid, *pids.last().unwrap());
        let gone = wait_for_opt(Duration::from_secs(1), || {
            (!proc::alive(r.old_pid)).then_some(())
        });
        assert!(
            gone.is_some(),
            "upgrade {i}: the old generation (pid {}) was still alive 1 s after its drain ended",
            r.old_pid
        );
        assert!(
            r.drain_ms < 1000,
            "upgrade {i}: promotion to the old generation's end took {} ms (report {r:?})",
            r.drain_ms
        );
        assert_eq!(r.closed_at_deadline, 0, "upgrade {i}: {r:?}");
        assert!(
            r.handed_over >= 20,
            "upgrade {i}: only {} connections handed over",
            r.handed_over
        );
        eprintln!(
            "upgrade {i}: pid {} -> {}, drain {} ms, old gone {} ms after the reply, {} handed over",
            r.old_pid,
            r.new_pid,
            r.drain_ms,
            replied.elapsed().as_millis(),
            r.handed_over
        );
        pids.push(r.new_pid);
        py.wait_all_answered_by(r.new_pid, Duration::from_secs(10));
        node.wait_all_answered_by(r.new_pid, Duration::from_secs(10));
        // Traffic between upgrades: 10 more messages each (~0.5 s).
        let (p0, n0) = (py.answers(), node.answers());
        py.wait_more_answers(&p0, 10, Duration::from_secs(20));
        node.wait_more_answers(&n0, 10, Duration::from_secs(20));
    }
    let mut all = py.finish(Duration::from_secs(30));
    all.extend(node.finish(Duration::from_secs(30)));
    assert_eq!(all.len(), 20);
    for c in &all {
        let who = format!("{} client {}", c.lang, c.client);
        assert!(c.errors.is_empty(), "{who}: errors {:?}", c.errors);
        assert!(c.closes.is_empty(), "{who}: close frames {:?}", c.closes);
        assert_eq!((c.seq_errors, c.echo_errors), (0, 0), "{who}");
        assert_eq!(c.sent, c.answers, "{who}: every message answered");
        assert_eq!(
            c.ports.len(),
            1,
            "{who}: one TCP connection, ports {:?}",
            c.ports
        );
        assert_eq!(c.pids, pids, "{who}: answered by every generation in turn");
    }
    let total: u64 = all.iter().map(|c| c.answers).sum();
    eprintln!("20 clients, 10 upgrades: {total} messages answered, 0 errors, 0 close frames");
}

/// Every client ended with exactly one close frame from the server, `code`.
fn assert_closed_with(all: &[ClientReport], code: u64) {
    for c in all {
        let who = format!("{} client {}", c.lang, c.client);
        assert_eq!(c.closes, vec![code], "{who}: {:?}", c.errors);
        assert_eq!((c.seq_errors, c.echo_errors), (0, 0), "{who}");
        assert_eq!(c.ports.len(), 1, "{who}");
    }
}

/// A successor that does not take the demo's WebSocket kind: the
/// connections stay on the old generation, are served there until the
/// drain deadline, then get a close frame with code 1012 (Service Restart),
/// never a bare cut.
#[test]
fn websockets_of_a_kind_the_successor_does_not_take_get_1012_at_the_drain_deadline() {
    let s = start("ws-untaken-kind", "3s");
    let py = WsClients::start(
        Lang::Python,
        &url(&s),
        3,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    let node = WsClients::start(
        Lang::Node,
        &url(&s),
        3,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    py.wait_ready(Duration::from_secs(30));
    node.wait_ready(Duration::from_secs(30));
    let old = s.pid();
    s.arm_fault("ws-kind:fixture.another-kind");
    let r = upgrade(&s);
    assert!(
        r.drain_ms >= 3000,
        "the old generation kept its WebSockets until the deadline: {r:?}"
    );
    assert_eq!(r.closed_at_deadline, 6, "{r:?}");
    let mut all = py.wait_ended(Duration::from_secs(20));
    all.extend(node.wait_ended(Duration::from_secs(20)));
    assert_closed_with(&all, 1012);
    for c in &all {
        assert_eq!(c.pids, vec![old], "served by the old generation only");
    }
}

/// A successor that takes the kind but refuses the batch (its check fails,
/// as for a state format it cannot read): the old generation gets the
/// connections back, goes on serving them, and closes them with 1012 at the
/// drain deadline.
#[test]
fn a_refused_websocket_batch_stays_with_the_old_generation_and_gets_1012_at_the_deadline() {
    let s = start("ws-refused", "3s");
    let py = WsClients::start(
        Lang::Python,
        &url(&s),
        4,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    py.wait_ready(Duration::from_secs(30));
    let old = s.pid();
    s.arm_fault("ws-refuse");
    let r = upgrade(&s);
    assert_eq!(r.closed_at_deadline, 4, "{r:?}");
    assert!(r.drain_ms >= 3000, "{r:?}");
    let all = py.wait_ended(Duration::from_secs(20));
    assert_closed_with(&all, 1012);
    for c in &all {
        assert_eq!(c.pids, vec![old]);
        assert!(c.answers > 40, "served on while the drain ran: {c:?}");
    }
    assert!(
        s.log().contains("refused a batch of owned connections"),
        "the old generation logs the refusal"
    );
}

/// Demote (issue 15 item 4): connections opened to a new generation during
/// its observation window go back to the old generation when the window
/// fails — idle keep-alive HTTP connections and WebSockets alike — and the
/// clients see no close: the same connections are answered by the old pid.
#[test]
fn a_rolled_back_generation_gives_its_keepalive_and_websocket_connections_back() {
    let opts = ServerOpts {
        args: baton_tests::apps::strings(&[
            "--observe",
            "20s",
            "--health-interval",
            "200ms",
            "--health-failures",
            "3",
        ]),
        health_path: Some("/health".into()),
        ..ServerOpts::default()
    };
    let s = Server::start_with(fixture(), "ws-demote", opts);
    let old = s.pid();
    let gate = s.dir.join("go-bad");
    s.arm_fault(&format!("health-bad-when:{}", gate.display()));
    let control = s.control.clone();
    let upgrading = std::thread::spawn(move || control_upgrade(&control));
    // The new generation accepts every new connection during the window.
    let new = baton_tests::wait_for(
        Duration::from_secs(30),
        "the new generation to serve",
        || {
            let v = baton_tests::http::get(s.addr, "/version").ok()?;
            let v = baton_tests::Version::parse(&v.body)?;
            (v.pid != old).then_some(v.pid)
        },
    );
    let mut keepalive: Vec<_> = (0..4)
        .map(|_| {
            let mut c = baton_tests::http::connect(s.addr).unwrap();
            let v = baton_tests::Version::parse(&c.get("/version").unwrap().body).unwrap();
            assert_eq!(
                v.pid, new,
                "opened during the window: served by the new generation"
            );
            c
        })
        .collect();
    let every = Duration::from_millis(50);
    let py = WsClients::start(Lang::Python, &url(&s), 3, every, Duration::from_secs(120));
    let node = WsClients::start(Lang::Node, &url(&s), 3, every, Duration::from_secs(120));
    py.wait_ready(Duration::from_secs(30));
    node.wait_ready(Duration::from_secs(30));
    py.wait_all_answered_by(new, Duration::from_secs(10));
    node.wait_all_answered_by(new, Duration::from_secs(10));
    // Now the new generation's health turns bad: the window fails.
    std::fs::write(&gate, b"").unwrap();
    match upgrading.join().unwrap() {
        Reply::Failed(f) => assert!(f.message.contains("health check"), "{}", f.message),
        other => panic!("expected a rollback, got {other:?}"),
    }
    py.wait_all_answered_by(old, Duration::from_secs(10));
    node.wait_all_answered_by(old, Duration::from_secs(10));
    for (i, c) in keepalive.iter_mut().enumerate() {
        let r = c.get("/version").unwrap();
        assert_eq!(r.status, 200, "keep-alive connection {i}");
        assert!(!r.closes(), "keep-alive connection {i}: {r:?}");
        let v = baton_tests::Version::parse(&r.body).unwrap();
        assert_eq!(v.pid, old, "keep-alive connection {i} went back");
        assert!(v.handed_over, "keep-alive connection {i}");
    }
    let gone = wait_for_opt(Duration::from_secs(30), || {
        (!proc::alive(new)).then_some(())
    });
    assert!(gone.is_some(), "the rolled-back generation exits");
    let mut all = py.finish(Duration::from_secs(30));
    all.extend(node.finish(Duration::from_secs(30)));
    for c in &all {
        let who = format!("{} client {}", c.lang, c.client);
        assert!(c.errors.is_empty(), "{who}: errors {:?}", c.errors);
        assert!(c.closes.is_empty(), "{who}: close frames {:?}", c.closes);
        assert_eq!((c.seq_errors, c.echo_errors), (0, 0), "{who}");
        assert_eq!(c.ports.len(), 1, "{who}");
        assert_eq!(c.pids, vec![new, old], "{who}");
    }
}

/// The message boundary, byte by byte: half a frame already sent when the
/// upgrade starts moves with the connection (the new generation answers it
/// with the next `seq`); a fragmented message begun before the upgrade
/// holds the connection on the old generation until its last fragment,
/// which the old generation answers, and the connection moves right after.
#[test]
fn a_websocket_moves_at_a_message_boundary_with_half_a_frame_and_not_inside_a_fragmented_message() {
    use baton_tests::ws::RawWs;
    let s = start("ws-boundary", "30s");
    let old = s.pid();
    let mut ws = RawWs::connect(s.addr).unwrap();
    ws.send_raw(&RawWs::frame(true, 1, b"one")).unwrap();
    let a = ws.read_json().unwrap();
    assert_eq!(
        (a["seq"].as_u64(), a["pid"].as_u64()),
        (Some(1), Some(old.into()))
    );

    // Half a frame, then an upgrade, then the rest.
    let two = RawWs::frame(true, 1, b"two, split across an upgrade");
    ws.send_raw(&two[..5]).unwrap();
    let r = upgrade(&s);
    assert!(r.drain_ms < 1000, "{r:?}");
    ws.send_raw(&two[5..]).unwrap();
    let a = ws.read_json().unwrap();
    assert_eq!(a["echo"], "two, split across an upgrade");
    assert_eq!(
        (a["seq"].as_u64(), a["pid"].as_u64()),
        (Some(2), Some(r.new_pid.into()))
    );

    // A fragmented message under way: the connection stays until it ends.
    let gen2 = r.new_pid;
    ws.send_raw(&RawWs::frame(false, 1, b"three, ")).unwrap();
    let control = s.control.clone();
    let upgrading = std::thread::spawn(move || control_upgrade(&control));
    let gen3 = baton_tests::wait_for(Duration::from_secs(30), "the next generation", || {
        s.try_pid().filter(|p| *p != gen2)
    });
    ws.send_raw(&RawWs::frame(true, 0, b"in two fragments"))
        .unwrap();
    let a = ws.read_json().unwrap();
    assert_eq!(a["echo"], "three, in two fragments");
    assert_eq!(
        (a["seq"].as_u64(), a["pid"].as_u64()),
        (Some(3), Some(gen2.into())),
        "the old generation answers the message it had begun"
    );
    let r = match upgrading.join().unwrap() {
        Reply::Upgraded(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.new_pid, r.closed_at_deadline), (gen3, 0), "{r:?}");
    ws.send_raw(&RawWs::frame(true, 1, b"four")).unwrap();
    let a = ws.read_json().unwrap();
    assert_eq!(
        (a["seq"].as_u64(), a["pid"].as_u64()),
        (Some(4), Some(gen3.into()))
    );
    // A ping is answered by the generation that has the connection now.
    ws.send_raw(&RawWs::frame(true, 9, b"ping")).unwrap();
    assert_eq!(ws.read_frame().unwrap(), (10, b"ping".to_vec()));
}

/// A WebSocket over TLS cannot move (its session keys live in the old
/// process's rustls state): it is served by the old generation until the
/// drain deadline, then closed with 1012 — never a bare cut — while a plain
/// one on the same server moves.
#[test]
fn a_websocket_over_tls_stays_and_gets_1012_at_the_deadline_while_a_plain_one_moves() {
    let t = baton_tests::tls::TlsServer::start(fixture(), "ws-tls", &["--drain-timeout", "3s"]);
    let s = &t.server;
    let old = s.pid();
    let every = Duration::from_millis(50);
    let wss = format!("wss://localhost:{}/ws", t.tls_port);
    let tls = WsClients::start_tls(
        Lang::Python,
        &wss,
        2,
        every,
        Duration::from_secs(120),
        Some(&t.pki.ca),
    );
    let plain = WsClients::start(Lang::Python, &url(s), 2, every, Duration::from_secs(120));
    tls.wait_ready(Duration::from_secs(30));
    plain.wait_ready(Duration::from_secs(30));
    let r = upgrade(s);
    assert_eq!(
        r.closed_at_deadline, 2,
        "the TLS WebSockets, and only they: {r:?}"
    );
    plain.wait_all_answered_by(r.new_pid, Duration::from_secs(10));
    let ended = tls.wait_ended(Duration::from_secs(20));
    assert_closed_with(&ended, 1012);
    for c in &ended {
        assert_eq!(c.pids, vec![old]);
    }
    for c in plain.finish(Duration::from_secs(30)) {
        assert!(c.errors.is_empty() && c.closes.is_empty(), "{c:?}");
        assert_eq!(c.pids, vec![old, r.new_pid]);
    }
}

/// The canary's rollback gives connections back too: during a canary both
/// generations accept; the new one answers 500 to everything but `/ws` and
/// `/health` (fault `error-rate:100`), so the canary fails. Keep-alive and
/// WebSocket connections that landed on the new generation go back to the
/// old one: same connections, next answers from the old pid.
#[test]
fn a_failed_canary_gives_its_keepalive_and_websocket_connections_back() {
    use baton_tests::ws::RawWs;
    let opts = ServerOpts {
        args: baton_tests::apps::strings(&[
            "--no-state",
            "--canary",
            "3s",
            "--canary-min-requests",
            "2",
            "--canary-extensions",
            "0",
        ]),
        ..ServerOpts::default()
    };
    let s = Server::start_with(fixture(), "ws-canary", opts);
    let old = s.pid();
    s.arm_fault("error-rate:100");
    let control = s.control.clone();
    let upgrading = std::thread::spawn(move || control_upgrade(&control));
    // Both generations accept: open connections until 3 of each kind sit
    // on the new one (a 500 can only come from it; a WebSocket answer
    // names its pid). Bounded: 400 attempts.
    let (mut on_new_http, mut on_new_ws, mut new_pid) = (Vec::new(), Vec::new(), None);
    for _ in 0..400 {
        if on_new_http.len() < 3 {
            let mut c = baton_tests::http::connect(s.addr).unwrap();
            if c.get("/version").unwrap().status == 500 {
                on_new_http.push(c);
            }
        }
        if on_new_ws.len() < 3 {
            let mut ws = RawWs::connect(s.addr).unwrap();
            ws.send_raw(&RawWs::frame(true, 1, b"where")).unwrap();
            let a = ws.read_json().unwrap();
            let pid = a["pid"].as_u64().unwrap() as u32;
            if pid != old {
                new_pid = Some(pid);
                on_new_ws.push(ws);
            }
        }
        if on_new_http.len() == 3 && on_new_ws.len() == 3 {
            break;
        }
    }
    assert_eq!(
        (on_new_http.len(), on_new_ws.len()),
        (3, 3),
        "connections reached the canary"
    );
    match upgrading.join().unwrap() {
        Reply::Failed(f) => assert!(f.message.contains("canary"), "{}", f.message),
        other => panic!("expected the canary to fail, got {other:?}"),
    }
    for (i, c) in on_new_http.iter_mut().enumerate() {
        let r = c.get("/version").unwrap();
        assert_eq!(
            r.status, 200,
            "keep-alive connection {i} (no 500: the old generation)"
        );
        let v = baton_tests::Version::parse(&r.body).unwrap();
        assert_eq!(v.pid, old, "keep-alive connection {i} went back");
    }
    for (i, ws) in on_new_ws.iter_mut().enumerate() {
        ws.send_raw(&RawWs::frame(true, 1, b"again")).unwrap();
        let a = ws.read_json().unwrap();
        assert_eq!(
            a["pid"].as_u64(),
            Some(old.into()),
            "WebSocket {i} went back"
        );
        assert_eq!(
            a["seq"].as_u64(),
            Some(2),
            "WebSocket {i}: its seq moved with it"
        );
    }
    let new_pid = new_pid.unwrap();
    let gone = wait_for_opt(Duration::from_secs(30), || {
        (!proc::alive(new_pid)).then_some(())
    });
    assert!(gone.is_some(), "the rolled-back generation exits");
}

/// The refusal the kernel makes: a successor whose fd limit is 64 (fault
/// `nofile:64`) takes the first batches of 100 WebSockets, then one is
/// truncated (`MSG_CTRUNC`) and refused whole; the old generation keeps
/// serving the rest and closes them with 1012 at the deadline. Every
/// connection is either moved or closed with 1012 — none lost, none served
/// twice — and the report's counts match what the clients saw.
#[test]
fn websockets_beyond_the_successors_fd_limit_stay_and_get_1012() {
    let s = start("ws-nofile", "3s");
    let py = WsClients::start(
        Lang::Python,
        &url(&s),
        100,
        Duration::from_millis(200),
        Duration::from_secs(120),
    );
    py.wait_ready(Duration::from_secs(60));
    let old = s.pid();
    s.arm_fault("nofile:64");
    let r = upgrade(&s);
    assert_eq!(r.handed_over + r.closed_at_deadline, 100, "{r:?}");
    assert!(r.closed_at_deadline > 0, "the fd limit refused some: {r:?}");
    assert!(
        s.log().contains("MSG_CTRUNC"),
        "the refusal says why (the kernel truncated the fds)"
    );
    py.wait_answered_by_count(r.new_pid, r.handed_over as usize, Duration::from_secs(20));
    let all = py.finish(Duration::from_secs(30));
    let (mut moved, mut closed) = (0, 0);
    for c in &all {
        let who = format!("client {}", c.client);
        assert_eq!(
            (c.seq_errors, c.echo_errors, c.ports.len()),
            (0, 0, 1),
            "{who}"
        );
        if c.closes.is_empty() {
            assert!(c.errors.is_empty(), "{who}: {:?}", c.errors);
            assert_eq!(c.pids, vec![old, r.new_pid], "{who}");
            moved += 1;
        } else {
            assert_eq!(c.closes, vec![1012], "{who}");
            assert_eq!(c.pids, vec![old], "{who}");
            closed += 1;
        }
    }
    assert_eq!((moved, closed), (r.handed_over, r.closed_at_deadline));
}

/// A plain stop (no successor): every WebSocket gets a close frame with
/// 1001 (Going Away) at once, not a cut at the drain deadline, and the
/// generation exits without waiting for the deadline.
#[test]
fn a_plain_stop_closes_websockets_with_1001_at_once() {
    let s = start("ws-stop", "30s");
    let py = WsClients::start(
        Lang::Python,
        &url(&s),
        3,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    let node = WsClients::start(
        Lang::Node,
        &url(&s),
        3,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    py.wait_ready(Duration::from_secs(30));
    node.wait_ready(Duration::from_secs(30));
    let pid = s.pid();
    let t = Instant::now();
    match baton_tests::control_call(&s.control, &baton::control::Request::Stop, |_| {}) {
        Reply::Stopping => {}
        other => panic!("{other:?}"),
    }
    let gone = wait_for_opt(Duration::from_secs(10), || {
        (!proc::alive(pid)).then_some(())
    });
    assert!(gone.is_some(), "exited well before the 30 s drain deadline");
    eprintln!("stopped in {} ms", t.elapsed().as_millis());
    let mut all = py.wait_ended(Duration::from_secs(20));
    all.extend(node.wait_ended(Duration::from_secs(20)));
    assert_closed_with(&all, 1001);
}

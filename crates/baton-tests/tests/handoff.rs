//! Issue 4: idle keep-alive connection handoff — the client never notices.

use std::path::Path;
use std::time::{Duration, Instant};

use baton::control::{Reply, UpgradeReport};
use baton_tests::apps::which;
use baton_tests::load::{Load, Mode};
use baton_tests::{Server, Version, http, proc, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const T: Duration = Duration::from_secs(30);

fn upgrade_via_control(s: &Server) -> UpgradeReport {
    match baton_tests::control_upgrade(&s.control) {
        Reply::Upgraded(r) => r,
        other => panic!("upgrade failed: {other:?}"),
    }
}

/// 600 connections: more than two batches of 253 fds (the per-message
/// limit), so batching and per-batch acknowledgements are exercised.
const IDLE_CONNS: usize = 600;

#[test]
fn six_hundred_idle_keepalive_connections_move_to_the_new_generation_on_the_same_socket() {
    let s = Server::start(Path::new(FIXTURE), "idle600");
    let old = s.version();
    let mut conns = Vec::new();
    for _ in 0..IDLE_CONNS {
        let mut c = http::connect(s.addr).unwrap();
        let r = c.get("/version").unwrap();
        let v = Version::parse(&r.body).unwrap();
        assert_eq!(v.pid, old.pid);
        assert!(!r.closes());
        conns.push(c);
    }
    let report = upgrade_via_control(&s);
    eprintln!("{report:?}");
    assert_eq!(
        report.handed_over, IDLE_CONNS as u64,
        "every idle connection handed over"
    );
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(old.pid)).then_some(())
    });
    let mut ok = 0;
    for c in &mut conns {
        let local = c.stream.local_addr().unwrap().to_string();
        let r = c
            .get("/version")
            .expect("a second request on the same socket");
        assert_eq!(r.status, 200);
        assert!(!r.closes(), "no Connection: close");
        let v = Version::parse(&r.body).unwrap();
        assert_eq!(v.pid, report.new_pid, "answered by the new generation");
        assert!(v.handed_over, "the new generation knows it was handed over");
        assert_eq!(
            v.peer, local,
            "the server sees the same client address and port: same TCP connection"
        );
        ok += 1;
    }
    assert_eq!(ok, IDLE_CONNS);
    let st = baton_tests::control_status(&s.control);
    assert_eq!(st.counters.conns_received, IDLE_CONNS as u64);
}

/// A new generation whose fd limit cannot take a batch refuses it
/// (`MSG_CTRUNC` → `ConnsNack`): the old generation keeps those connections
/// and answers their next request itself; nothing fails, nothing is served
/// twice, and the new generation serves on.
#[test]
fn a_batch_the_new_generation_cannot_take_stays_with_the_old_one() {
    let s = Server::start(Path::new(FIXTURE), "nofile");
    let old = s.version();
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut c = http::connect(s.addr).unwrap();
        assert_eq!(c.get("/version").unwrap().status, 200);
        conns.push(c);
    }
    s.arm_fault("nofile:64");
    // The upgrade ends when the old generation has drained, which takes
    // these connections' next requests: send them meanwhile.
    let control = s.control.clone();
    let upgrading = std::thread::spawn(move || baton_tests::control_upgrade(&control));
    wait_for(T, "the refused batch", || {
        s.log().contains("refused a connection batch").then_some(())
    });
    let mut by_old = 0;
    for c in &mut conns {
        let r = c.get("/version").expect("the next request is answered");
        assert_eq!(r.status, 200);
        let v = Version::parse(&r.body).unwrap();
        if v.pid == old.pid {
            by_old += 1;
        }
    }
    drop(conns);
    let report = match upgrading.join().unwrap() {
        Reply::Upgraded(r) => r,
        other => panic!("upgrade failed: {other:?}"),
    };
    eprintln!("{report:?}");
    assert!(
        report.handed_over < 300,
        "a batch of up to 253 fds cannot fit under 64: {report:?}"
    );
    assert_eq!(
        by_old,
        300 - report.handed_over,
        "every connection not handed over was answered by the old generation"
    );
    assert!(
        s.log().contains("refused a connection batch"),
        "the old generation says why it kept them"
    );
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(old.pid)).then_some(())
    });
    let v = http::get(s.addr, "/version").unwrap();
    assert_eq!(Version::parse(&v.body).unwrap().pid, report.new_pid);
}

/// A keep-alive connection busy with a request when the drain starts
/// finishes it on the old generation, then moves: its next request, sent at
/// once on the same socket, is answered by the new generation, and neither
/// response closes the connection. The request is held open until the new
/// generation serves (a `/slow?ms=1500` one could end before the drain
/// started, and the connection then moved idle, not busy).
#[test]
fn a_busy_keepalive_connection_moves_after_its_request_finishes() {
    let s = Server::start(Path::new(FIXTURE), "busy-moves");
    let old = s.version();
    let mut c = http::connect(s.addr).unwrap();
    assert_eq!(c.get("/version").unwrap().status, 200);
    let local = c.stream.local_addr().unwrap();
    let held = http::hold(c).expect("a held request");
    let ctl = s.control.clone();
    let up = std::thread::spawn(move || baton_tests::control_upgrade(&ctl));
    let new = wait_for(T, "the new generation to serve", || {
        let v = Version::parse(&http::get(s.addr, "/version").ok()?.body)?;
        (v.pid != old.pid).then_some(v)
    });
    assert!(
        proc::serves_connection(old.pid, s.addr.port(), local.port())
            && !proc::serves_connection(new.pid, s.addr.port(), local.port()),
        "the busy connection stays on the old generation while its request runs"
    );
    let (busy, mut c) = held.release().expect("the held request");
    assert_eq!(busy.status, 200);
    assert!(!busy.closes(), "no Connection: close on the busy response");
    let next = c.get("/version").expect("the next request, same socket");
    assert_eq!(next.status, 200);
    assert!(!next.closes());
    let v = Version::parse(&next.body).unwrap();
    assert_eq!(v.pid, new.pid, "answered by the new generation");
    assert!(v.handed_over);
    assert_eq!(v.peer, local.to_string(), "same TCP connection");
    let report = match up.join().unwrap() {
        Reply::Upgraded(r) => r,
        other => panic!("upgrade failed: {other:?}"),
    };
    assert_eq!(report.new_pid, new.pid);
    // This connection, and possibly one of the polls above: a poll the old
    // generation accepted but had not read yet when it stopped is handed
    // over idle too (and answered by the new one), as it should be.
    assert!(report.handed_over >= 1, "{report:?}");
}

#[test]
fn a_half_written_request_is_replayed_in_the_new_generation() {
    let s = Server::start(Path::new(FIXTURE), "half");
    let old = s.version();
    let mut c = http::connect(s.addr).unwrap();
    assert_eq!(c.get("/version").unwrap().status, 200);
    // Half of the next request, then let the old generation read it.
    let full = http::format_request("GET", "/version", false, b"");
    let (first, rest) = full.split_at(20);
    c.send_raw(first).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let report = upgrade_via_control(&s);
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(old.pid)).then_some(())
    });
    c.send_raw(rest).unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let v = Version::parse(&r.body).unwrap();
    assert_eq!(v.pid, report.new_pid);
    let st = baton_tests::control_status(&s.control);
    assert_eq!(st.counters.conns_received, 1);
    assert_eq!(
        st.counters.conns_received_prefix_bytes, 20,
        "the 20 bytes the old generation had read travelled with the connection and were replayed"
    );
}

#[test]
fn keepalive_echo_clients_race_twenty_upgrades_without_a_failure_or_a_forced_reconnect() {
    let s = Server::start(Path::new(FIXTURE), "echo-race");
    let load = Load::start(
        s.addr,
        Mode::EchoKeepAlive,
        32,
        Duration::from_secs(240),
        u64::MAX,
    );
    wait_for(T, "load", || (load.done() > 200).then_some(()));
    let mut handed = 0;
    for _ in 0..20 {
        let before = load.done();
        let r = upgrade_via_control(&s);
        handed += r.handed_over;
        wait_for(T, "the old generation to exit", || {
            (!proc::alive(r.old_pid)).then_some(())
        });
        wait_for(T, "load progress", || {
            (load.done() > before + 100).then_some(())
        });
    }
    let stats = load.stop();
    eprintln!(
        "echo load: ok={} failed={} wrong={} closes={} handed over={handed}",
        stats.ok, stats.failed, stats.wrong, stats.closes
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(stats.wrong, 0, "{:?}", stats.errors);
    assert_eq!(
        stats.closes, 0,
        "the drain must never put Connection: close on a response"
    );
    assert!(handed > 0);
    assert_eq!(s.version().generation, 21);
}

#[test]
fn the_old_generation_is_gone_within_a_second_under_keepalive_load() {
    let s = Server::start(Path::new(FIXTURE), "gone-fast");
    let load = Load::start(
        s.addr,
        Mode::KeepAlive,
        64,
        Duration::from_secs(60),
        u64::MAX,
    );
    wait_for(T, "load", || (load.done() > 500).then_some(()));
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let old = s.pid();
        let t = Instant::now();
        let r = upgrade_via_control(&s);
        wait_for(T, "the old generation to exit", || {
            (!proc::alive(old)).then_some(())
        });
        worst = worst.max(t.elapsed());
        eprintln!(
            "drain {} ms, handed over {}, total {:?}",
            r.drain_ms,
            r.handed_over,
            t.elapsed()
        );
        assert!(r.handed_over > 0);
    }
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(stats.closes, 0);
    assert!(
        worst < Duration::from_secs(1),
        "old generation took {worst:?} to go"
    );
}

#[test]
fn http2_streams_survive_ten_upgrades() {
    let s = Server::start(Path::new(FIXTURE), "h2");
    let load =
        baton_tests::h2load::H2Load::start(s.addr, "/version", 4, 8, Duration::from_secs(120));
    wait_for(T, "HTTP/2 load", || (load.ok() > 500).then_some(()));
    for _ in 0..10 {
        let old = s.pid();
        let before = load.ok();
        upgrade_via_control(&s);
        wait_for(T, "the old generation to exit", || {
            (!proc::alive(old)).then_some(())
        });
        wait_for(T, "HTTP/2 load progress", || {
            (load.ok() > before + 300).then_some(())
        });
    }
    let (stats, errors) = load.stop();
    eprintln!("HTTP/2 load: {stats:?} {errors:?}");
    assert_eq!(stats.failed, 0, "failed streams: {errors:?}");
    assert!(
        stats.connections > 10,
        "clients reconnected after GOAWAY: {stats:?}"
    );
}

/// h2load (nghttp2's benchmark), run back to back, against ten upgrades. It does not reconnect
/// after a GOAWAY, and counts requests it queued but never sent as
/// "started" and failed, so only what it saw *done* is checked: every
/// completed stream has a 2xx status, and the run is otherwise error-free
/// apart from requests cut off by the GOAWAY.
#[test]
fn h2load_sees_no_error_status_across_upgrades() {
    let s = Server::start(Path::new(FIXTURE), "h2load");
    let h2load = which("h2load").expect("h2load is required (apt-get install nghttp2-client)");
    let addr = s.addr;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let runner = std::thread::spawn(move || {
        let mut outs = Vec::new();
        // Back-to-back h2load runs until the upgrades are over (bounded).
        while outs.len() < 300 && !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let out = baton_tests::output(
                std::process::Command::new(&h2load)
                    .args(["-n", "2000", "-c", "4", "-m", "8", "-t", "1", "-T", "10"])
                    .arg(format!("http://{addr}/version")),
            )
            .unwrap();
            outs.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        outs
    });
    for _ in 0..10 {
        let old = s.pid();
        upgrade_via_control(&s);
        wait_for(T, "the old generation to exit", || {
            (!proc::alive(old)).then_some(())
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let outs = runner.join().unwrap();
    eprintln!("{} h2load runs across 10 upgrades", outs.len());
    assert!(outs.len() >= 2, "h2load ran during the upgrades");
    for o in outs {
        let status = o
            .lines()
            .find(|l| l.starts_with("status codes:"))
            .unwrap_or_else(|| panic!("{o}"));
        eprintln!("{status}");
        assert!(status.contains(" 0 3xx, 0 4xx, 0 5xx"), "{o}");
    }
}

fn open_echo(s: &Server) -> http::Conn {
    let mut c = http::connect(s.addr).unwrap();
    c.send_raw(b"GET /upgrade HTTP/1.1\r\nHost: t\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n")
        .unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 101, "{r:?}");
    c
}

fn echo(c: &mut http::Conn, msg: &[u8]) -> Vec<u8> {
    use std::io::Read;
    c.send_raw(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.stream.read_exact(&mut got).unwrap();
    got
}

#[test]
fn an_upgraded_connection_stays_on_the_old_generation_until_it_closes() {
    let s = Server::start(Path::new(FIXTURE), "upgraded");
    let old = s.version();
    let mut ws = open_echo(&s);
    assert_eq!(echo(&mut ws, b"ping 1"), b"ping 1");
    let ctl = s.control.clone();
    let up = std::thread::spawn(move || baton_tests::control_upgrade(&ctl));
    let new = wait_for(T, "the new generation to serve", || {
        let v = Version::parse(&http::get(s.addr, "/version").ok()?.body)?;
        (v.pid != old.pid).then_some(v)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        proc::alive(old.pid),
        "the old generation waits for the upgraded connection"
    );
    assert_eq!(
        echo(&mut ws, b"ping 2"),
        b"ping 2",
        "still served by the old generation"
    );
    drop(ws);
    match up.join().unwrap() {
        Reply::Upgraded(r) => {
            assert_eq!(r.new_pid, new.pid);
            assert_eq!(r.closed_at_deadline, 0);
        }
        other => panic!("{other:?}"),
    }
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(old.pid)).then_some(())
    });
}

#[test]
fn an_upgraded_connection_is_cut_at_the_drain_deadline_and_counted() {
    let s = baton_tests::Server::start_with(
        Path::new(FIXTURE),
        "upgraded-deadline",
        baton_tests::ServerOpts {
            args: vec!["--drain-timeout".into(), "1s".into()],
            ..Default::default()
        },
    );
    let mut ws = open_echo(&s);
    assert_eq!(echo(&mut ws, b"x"), b"x");
    let r = upgrade_via_control(&s);
    assert_eq!(r.closed_at_deadline, 1, "{r:?}");
    assert!(r.drain_ms >= 1000, "{r:?}");
    use std::io::Read;
    let mut b = [0u8; 1];
    assert!(
        matches!(ws.stream.read(&mut b), Ok(0) | Err(_)),
        "the upgraded connection was closed"
    );
}

/// The README's axum example (`crates/baton-http/examples/axum.rs`): an axum
/// `Router` served through baton-http keeps its idle connections across an
/// upgrade.
#[test]
fn an_axum_router_hands_its_idle_connections_over() {
    baton_tests::init();
    let exe = baton_tests::workspace_bin("baton-demo")
        .parent()
        .unwrap()
        .join("examples/axum");
    assert!(
        exe.exists(),
        "{} not built: cargo build --workspace --all-targets",
        exe.display()
    );
    let dir = baton_tests::TestDir::new("axum");
    let bin = dir.join("axum");
    baton_tests::copy_exe(&exe, &bin);
    let port = baton_tests::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let pid_file = dir.join("axum.pid");
    let mut child = baton_tests::spawn(
        std::process::Command::new(&bin)
            .arg(addr.to_string())
            .arg(&pid_file)
            .stderr(std::fs::File::create(dir.join("log")).unwrap()),
    )
    .unwrap();
    let pid_of = |text: &str| -> u32 { text.split_whitespace().nth(4).unwrap().parse().unwrap() };
    let first = wait_for(T, "axum example to serve", || {
        http::get(addr, "/").ok().filter(|r| r.status == 200)
    });
    let old_pid = pid_of(&first.text());
    let mut conns: Vec<_> = (0..10).map(|_| http::connect(addr).unwrap()).collect();
    for c in &mut conns {
        assert_eq!(c.get("/").unwrap().status, 200);
    }
    proc::signal(old_pid, rustix::process::Signal::USR2);
    wait_for(T, "the old axum generation to exit", || {
        (!proc::alive(old_pid)).then_some(())
    });
    for c in &mut conns {
        let r = c.get("/").expect("same socket after the upgrade");
        assert!(!r.closes());
        let t = r.text();
        assert_ne!(pid_of(&t), old_pid, "{t}");
        assert!(t.contains("generation 2 handed_over true"), "{t}");
    }
    let new_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    proc::signal(new_pid, rustix::process::Signal::KILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// A successor that dies after its promotion but before it acknowledged
/// any connection batch takes none with it: the old generation takes every
/// unacknowledged batch back, serves again, and each idle client's next
/// request on its own socket is answered by the old generation. Nothing is
/// counted lost.
#[test]
fn idle_connections_stay_when_the_successor_dies_before_acknowledging_them() {
    let s = Server::start(Path::new(FIXTURE), "successor-dies");
    let old = s.version();
    let mut conns: Vec<_> = (0..50)
        .map(|_| {
            let mut c = http::connect(s.addr).unwrap();
            assert_eq!(c.get("/version").unwrap().status, 200);
            c
        })
        .collect();
    s.arm_fault("stop-at:promoted");
    s.usr2();
    let new_pid = wait_for(T, "the successor stopped at its promotion", || {
        proc::children(old.pid)
            .into_iter()
            .find(|p| proc::state(*p) == Some('T'))
    });
    // Let the old generation queue its idle connections for the successor.
    std::thread::sleep(Duration::from_millis(300));
    proc::signal(new_pid, rustix::process::Signal::KILL);
    wait_for(T, "the old generation to serve again", || {
        (s.try_pid() == Some(old.pid)).then_some(())
    });
    for c in &mut conns {
        let r = c
            .get("/version")
            .expect("the next request on the same socket");
        assert_eq!(r.status, 200);
        assert_eq!(Version::parse(&r.body).unwrap().pid, old.pid);
    }
    let log = s.log();
    for l in log
        .lines()
        .filter(|l| l.contains("taking back") || l.contains("resum") || l.contains("died"))
    {
        eprintln!("{l}");
    }
    assert!(
        log.contains("taking back a connection batch"),
        "batches were in flight to the successor when it died: {log}"
    );
    let st = baton_tests::control_status(&s.control);
    assert_eq!(st.counters.conns_lost, 0, "{:?}", st.counters);
    assert_eq!(st.pid, old.pid);
}

/// The other side of the test above: a successor that *acknowledged* its
/// connection batches (it serves them) dies during the drain. Those
/// connections die with it — the old generation cannot take back what it
/// no longer holds — and each is counted in `conns_lost`, exactly; the old
/// generation serves again (a request it still held completes) and says how
/// many were lost.
#[test]
fn connections_a_dead_successor_acknowledged_are_counted_lost() {
    const N: usize = 30;
    let s = Server::start(Path::new(FIXTURE), "successor-dies-acked");
    let old = s.version();
    let mut conns: Vec<_> = (0..N)
        .map(|_| {
            let mut c = http::connect(s.addr).unwrap();
            assert_eq!(c.get("/version").unwrap().status, 200);
            c
        })
        .collect();
    // Keeps the old generation draining until released.
    let held = http::hold(http::connect(s.addr).unwrap()).unwrap();
    s.usr2();
    wait_for(T, "the successor's promotion", || {
        s.try_pid().filter(|p| *p != old.pid)
    });
    // Each idle connection answers from the successor: it was handed over
    // and acknowledged.
    let mut new_pid = 0;
    for c in &mut conns {
        let v = Version::parse(&c.get("/version").unwrap().body).unwrap();
        assert_ne!(v.pid, old.pid, "moved to the successor");
        new_pid = v.pid;
    }
    proc::signal(new_pid, rustix::process::Signal::KILL);
    wait_for(T, "the old generation to serve again", || {
        (s.try_pid() == Some(old.pid)
            && http::get(s.addr, "/version")
                .is_ok_and(|r| Version::parse(&r.body).is_some_and(|v| v.pid == old.pid)))
        .then_some(())
    });
    let (r, _) = held.release().unwrap();
    assert_eq!(r.status, 200, "the held request completes on the old one");
    let dead = conns
        .iter_mut()
        .map(|c| c.get("/version"))
        .filter(Result::is_err)
        .count();
    assert_eq!(
        dead, N,
        "every acknowledged connection died with the successor"
    );
    let st = baton_tests::control_status(&s.control);
    assert_eq!(st.counters.conns_lost, N as u64, "{:?}", st.counters);
    assert_eq!(st.pid, old.pid);
    assert!(
        s.log()
            .contains(&format!("{N} connections handed to it were lost")),
        "{}",
        s.log()
    );
}

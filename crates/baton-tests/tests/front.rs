//! Issue 17: `baton run --front http`. baton serves the clients' HTTP
//! connections and forwards each request to the serving generation, so the
//! third-party keep-alive clients that lose requests at every reload of
//! nginx, HAProxy or a plain `baton run` (Java Apache HttpClient 4.5 without
//! retries, Node's `http.Agent`, Python `requests`) see none. The clients
//! are the benchmark's (`scripts/bench/clients/`, `CLIENT_METHOD=POST` for
//! POST); the apps are the suite's Node server, gunicorn, uvicorn and the Go
//! server. Then WebSockets through the front across an upgrade, the limits
//! (body, head, header-read timeout, connections) and the front's graceful
//! stop.

use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use apps::uvicorn_cmd as uvicorn_app;
use apps::{go_server_cmd as go_app, gunicorn_cmd as gunicorn_app, node_server_cmd as node_app};
use baton_tests::apps::{self, strings as s};
use baton_tests::keepalive::{Clients, Counts, compile_java};
use baton_tests::supervisor::{RunOpts, Supervised, upgrade_in_thread};
use baton_tests::wait_for;
use baton_tests::ws::{ClientReport, Lang, WsClients};

const T: Duration = Duration::from_secs(30);

/// The three clients, GET and POST at once, across ten upgrades of `app`
/// (with `--front http` or without). Returns what each client counted.
/// With `--front`, readiness is the app's `/health` on the public address
/// (baton sends the probe to the new generation's private socket).
fn clients_across_ten_upgrades(name: &str, app: Vec<String>, front: bool) -> Vec<Counts> {
    let sup = Supervised::start(
        name,
        RunOpts {
            ready: front.then(|| "http://{addr}/health".to_owned()),
            args: if front {
                s(&["--front", "http"])
            } else {
                vec![]
            },
            command: app,
            ..RunOpts::default()
        },
    );
    let java_cp = compile_java(&sup.dir.path);
    let url = format!("http://{}/", sup.addr);
    let clients = Clients::start(&["GET", "POST"], &url, &sup.dir, &java_cp);
    clients.wait_total(20, "every client to complete requests");
    for i in 0..10 {
        let out = sup.upgrade(&["--json"]);
        assert_eq!(out.code, 0, "{name}: upgrade {i} failed: {out:?}");
        // Each client goes on across the new generation before the next one.
        clients.wait_more(10, "every client to go on after the upgrade");
    }
    let counts: Vec<Counts> = clients.finish();
    let front_note = sup
        .status()
        .notes
        .into_iter()
        .find(|n| n.starts_with("front:"));
    for c in &counts {
        eprintln!(
            "{name} ({}): {}: {} ok, {} errors {} {}",
            if front { "--front http" } else { "no front" },
            c.label,
            c.ok,
            c.errors,
            c.kinds,
            c.samples
        );
    }
    eprintln!("{name}: {front_note:?}");
    for c in &counts {
        assert!(c.ok > 0, "{name}: {} completed no request", c.label);
    }
    // The warning for shared sockets concerns the generations' listeners
    // only: baton serves --front's public ones itself.
    let log = sup.log_text();
    assert!(
        !front || !log.contains("no steering for this listener"),
        "{name}: a --front start warns of unsteered sockets:\n{log}"
    );
    counts
}

fn assert_no_errors(name: &str, counts: &[Counts]) {
    for c in counts {
        assert_eq!(
            c.errors, 0,
            "{name}: {} failed {} requests: {} {}",
            c.label, c.errors, c.kinds, c.samples
        );
    }
}

#[test]
fn keepalive_clients_through_the_front_see_no_errors_across_ten_node_upgrades() {
    let counts = clients_across_ten_upgrades("front-node", node_app(), true);
    assert_no_errors("front-node", &counts);
}

#[test]
fn keepalive_clients_through_the_front_see_no_errors_across_ten_gunicorn_upgrades() {
    let counts = clients_across_ten_upgrades("front-gunicorn", gunicorn_app(), true);
    assert_no_errors("front-gunicorn", &counts);
}

#[test]
fn keepalive_clients_through_the_front_see_no_errors_across_ten_uvicorn_upgrades() {
    let counts = clients_across_ten_upgrades("front-uvicorn", uvicorn_app(), true);
    assert_no_errors("front-uvicorn", &counts);
}

#[test]
fn keepalive_clients_through_the_front_see_no_errors_across_ten_go_upgrades() {
    let counts = clients_across_ten_upgrades("front-go", go_app(), true);
    assert_no_errors("front-go", &counts);
}

/// The same load without `--front`: the race the front removes. Not
/// asserted (it is a race); the counts are printed for comparison.
#[test]
fn without_the_front_the_same_clients_are_counted_for_comparison() {
    let counts = clients_across_ten_upgrades("nofront-node", node_app(), false);
    let total: u64 = counts.iter().map(|c| c.errors).sum();
    eprintln!("nofront-node: {total} client errors in all without --front");
}

/// A field of the front's line in `baton status`'s notes.
fn front_count(sup: &Supervised, field: &str) -> u64 {
    let note = sup
        .status()
        .notes
        .into_iter()
        .find(|n| n.starts_with("front:"))
        .expect("a front line in the status notes");
    note.split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {note}"))
}

fn front_node(name: &str, more: &[&str]) -> Supervised {
    let mut args = s(&["--front", "http"]);
    args.extend(s(more));
    Supervised::start(
        name,
        RunOpts {
            args,
            command: node_app(),
            ..RunOpts::default()
        },
    )
}

fn curl(args: &[&str]) -> std::process::Output {
    let o = baton_tests::output(
        Command::new(apps::in_path("curl", "install curl"))
            .args(["-sS", "--max-time", "60"])
            .args(args),
    )
    .expect("running curl");
    assert!(o.status.success(), "curl {args:?}: {o:?}");
    o
}

const TEN_MIB: usize = 10 << 20;

#[test]
fn ten_mib_request_and_response_bodies_stream_through_unchanged() {
    let metrics = format!("127.0.0.1:{}", baton_tests::free_port());
    let sup = front_node("front-bodies", &["--metrics", &metrics]);
    // Status names the address the clients use, then the generations'
    // private socket.
    let ls = sup.status().listeners;
    assert_eq!(ls.len(), 2, "{ls:?}");
    assert_eq!(ls[0].addr, sup.addr.to_string(), "{ls:?}");
    assert!(ls[0].origin.starts_with("public"), "{ls:?}");
    assert_ne!(ls[1].addr, sup.addr.to_string(), "{ls:?}");
    assert!(ls[1].origin.contains("private"), "{ls:?}");
    // The request body: not a repeated pattern, so a lost or moved chunk
    // shows.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let body: Vec<u8> = (0..TEN_MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let input = sup.dir.join("body.in");
    std::fs::write(&input, &body).unwrap();
    let echoed = sup.dir.join("body.echo");
    curl(&[
        "--data-binary",
        &format!("@{}", input.display()),
        "-H",
        "Content-Type: application/octet-stream",
        "-o",
        &echoed.display().to_string(),
        &format!("http://{}/echo", sup.addr),
    ]);
    let back = std::fs::read(&echoed).unwrap();
    assert_eq!(back.len(), body.len(), "echoed length");
    assert!(back == body, "the echoed 10 MiB body differs");

    let got = sup.dir.join("bytes.out");
    curl(&[
        "-o",
        &got.display().to_string(),
        &format!("http://{}/bytes/{TEN_MIB}", sup.addr),
    ]);
    let got = std::fs::read(&got).unwrap();
    assert_eq!(got.len(), TEN_MIB, "response length");
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
        "the 10 MiB response body differs"
    );
    assert_eq!(front_count(&sup, "bad_gateway"), 0);
    // The front's counters are metrics too (the two bodies at least).
    let text = String::from_utf8(curl(&[&format!("http://{metrics}/metrics")]).stdout).unwrap();
    let requests: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("baton_front_requests_total ")?.parse().ok())
        .unwrap_or_else(|| panic!("no baton_front_requests_total in {text}"));
    assert!(requests >= 2, "{text}");
    assert!(text.contains("baton_front_bad_gateway_total 0"), "{text}");
    for name in [
        "baton_front_tunnels_opened_total 0",
        "baton_front_tunnels_closed_total 0",
        "baton_front_tunnels_closed_at_drain_total 0",
        "baton_front_body_too_large_total 0",
        "baton_front_header_too_large_total 0",
        "baton_front_header_timeouts_total 0",
        "baton_front_closed_at_stop_total 0",
    ] {
        assert!(text.contains(name), "{name} in {text}");
    }
}

#[test]
fn a_slow_request_in_flight_during_an_upgrade_completes_on_the_old_generation() {
    let sup = front_node("front-slow", &[]);
    let before = sup.status();
    let addr = sup.addr;
    let slow = std::thread::spawn(move || {
        use std::io::Read as _;
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        c.write_all(b"GET /slow/3000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    });
    // The request has its upstream connection (to generation 1) before the
    // upgrade starts.
    wait_for(T, "the slow request to be in flight upstream", || {
        (front_count(&sup, "upstream_busy") == 1).then_some(())
    });
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "upgrade: {out:?}");
    let j = out.json();
    assert_eq!(j["to_generation"], 2, "{j}");
    let answer = slow.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["generation"], 1, "{answer}");
    assert_eq!(v["pid"], before.pid, "{answer}");
    assert_eq!(sup.version().generation, 2);
    assert_eq!(front_count(&sup, "bad_gateway"), 0);
    assert_eq!(front_count(&sup, "upstream_busy"), 0);
}

/// A generation that dies under load: the keep-alive GET clients see no
/// error. Requests that were in flight on it were written upstream but got
/// no answer; idempotent and bodiless, they are sent again, and the private
/// socket (baton's, never closed) queues them until the restarted
/// generation accepts.
#[test]
fn get_clients_see_no_errors_when_the_generation_is_killed_three_times() {
    let sup = front_node("front-crash", &[]);
    let java_cp = compile_java(&sup.dir.path);
    let url = format!("http://{}/", sup.addr);
    let clients = Clients::start(&["GET"], &url, &sup.dir, &java_cp);
    clients.wait_total(20, "every client to complete requests");
    for i in 1..=3u64 {
        sup.kill_serving_and_wait_restart(i, T);
        clients.wait_more(10, "every client to go on after the restart");
    }
    let counts: Vec<Counts> = clients.finish();
    for c in &counts {
        eprintln!(
            "front-crash: {}: {} ok, {} errors {} {}",
            c.label, c.ok, c.errors, c.kinds, c.samples
        );
    }
    eprintln!(
        "front-crash: upstream_errors={} retries={} bad_gateway={}",
        front_count(&sup, "upstream_errors"),
        front_count(&sup, "retries"),
        front_count(&sup, "bad_gateway")
    );
    assert_no_errors("front-crash", &counts);
    assert_eq!(front_count(&sup, "bad_gateway"), 0);
}

#[test]
fn the_app_gets_baton_forwarding_headers_and_no_hop_by_hop_ones() {
    let sup = front_node("front-headers", &[]);
    let o = curl(&[
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "Forwarded: for=6.6.6.6",
        "-H",
        "Connection: keep-alive, X-Secret",
        "-H",
        "X-Secret: 1",
        "-H",
        "X-Kept: 1",
        &format!("http://{}/headers", sup.addr),
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let h = &j["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{j}");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http", "{j}");
    assert_eq!(h["x-forwarded-proto"], "http", "{j}");
    assert_eq!(h["x-kept"], "1", "{j}");
    assert!(h.get("x-secret").is_none(), "{j}");
    assert_eq!(h["host"], sup.addr.to_string(), "{j}");
    // The app's peer is baton.
    assert_eq!(j["peer"], "127.0.0.1", "{j}");
}

#[test]
fn with_trust_forwarded_the_clients_forwarding_headers_are_extended() {
    let sup = front_node("front-trust", &["--front-trust-forwarded"]);
    let o = curl(&[
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        &format!("http://{}/headers", sup.addr),
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["headers"]["x-forwarded-for"], "6.6.6.6, 127.0.0.1", "{j}");
}

#[test]
fn h2c_clients_are_served_and_forwarded_over_http1() {
    let sup = front_node("front-h2c", &[]);
    let o = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version}",
        &format!("http://{}/headers", sup.addr),
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    let (body, version) = text.rsplit_once('\n').unwrap();
    assert_eq!(version, "2", "{text}");
    let j: serde_json::Value = serde_json::from_str(body).unwrap();
    // The app gets a Host header made from :authority.
    assert_eq!(j["headers"]["host"], sup.addr.to_string(), "{j}");
    let input = sup.dir.join("h2.in");
    std::fs::write(&input, vec![7u8; 1 << 20]).unwrap();
    let out = sup.dir.join("h2.out");
    curl(&[
        "--http2-prior-knowledge",
        "--data-binary",
        &format!("@{}", input.display()),
        "-o",
        &out.display().to_string(),
        &format!("http://{}/echo", sup.addr),
    ]);
    assert!(
        std::fs::read(&out).unwrap() == vec![7u8; 1 << 20],
        "h2c echo differs"
    );
}

/// What a WebSocket client must have seen: every answer in order, no error,
/// no close it did not ask for, one TCP connection, one generation.
fn assert_ws_clean(label: &str, reports: &[ClientReport], pid: u32) {
    for r in reports {
        assert!(
            r.answers > 0,
            "{label}: client {} got no answer: {r:?}",
            r.client
        );
        assert_eq!(r.answers, r.sent, "{label}: {r:?}");
        assert_eq!((r.seq_errors, r.echo_errors), (0, 0), "{label}: {r:?}");
        assert!(r.errors.is_empty() && r.closes.is_empty(), "{label}: {r:?}");
        assert_eq!(r.ports.len(), 1, "{label}: one TCP connection: {r:?}");
        assert_eq!(r.pids, vec![pid], "{label}: {r:?}");
    }
}

/// Issue 17: a WebSocket through the front keeps working across an
/// upgrade. It is a tunnel to the generation that accepted it: after the
/// upgrade new requests and new WebSockets go to generation 2 while the
/// open ones go on, on the same connections, with generation 1; the old
/// generation is stopped once its last tunnel closed (not at the drain
/// deadline: nothing is counted closed).
#[test]
fn websockets_through_the_front_stay_on_their_generation_across_an_upgrade() {
    let sup = front_node("front-ws", &["--drain-timeout", "60s"]);
    let gen1 = sup.status().pid;
    let url = format!("ws://{}/ws", sup.addr);
    let every = Duration::from_millis(50);
    let old = WsClients::start(Lang::Node, &url, 4, every, Duration::from_secs(120));
    old.wait_ready(T);
    old.wait_all_answered_by(gen1, T);
    let up = upgrade_in_thread(&sup, &["--json"]);
    wait_for(T, "generation 2 to take new requests", || {
        (sup.try_version()?.generation == 2).then_some(())
    });
    let gen2 = sup.version().pid;
    assert_ne!(gen1, gen2);
    // Messages after the switch: still generation 1, same connections.
    let since = old.answers();
    old.wait_more_answers(&since, 10, T);
    let st = sup.status();
    assert!(
        st.upgrade_in_progress,
        "the old generation's tunnels hold the drain: {st:?}"
    );
    assert_eq!(front_count(&sup, "tunnels_open"), 4);
    // New WebSockets go to generation 2.
    let new = WsClients::start(Lang::Python, &url, 3, every, Duration::from_secs(120));
    new.wait_ready(T);
    new.wait_all_answered_by(gen2, T);
    // The drain waits for their tunnels (and says so)...
    wait_for(T, "the drain to wait for the old tunnels", || {
        sup.log_text()
            .contains("waiting for 4 WebSocket tunnel(s) on generation 1")
            .then_some(())
    });
    // ... the old clients close: the drain ends, the upgrade completes.
    let old_reports = old.finish(T);
    let out = up.join().unwrap();
    assert_eq!(out.code, 0, "upgrade: {out:?}");
    assert_eq!(out.json()["closed_at_deadline"], 0, "{out:?}");
    // `baton upgrade` said what it waited for.
    let notes = out.json()["events"].to_string();
    assert!(
        notes.contains("waiting for 4 WebSocket tunnel(s) on generation 1"),
        "{notes}"
    );
    assert!(!baton_tests::proc::alive(gen1), "generation 1 was stopped");
    let since = new.answers();
    new.wait_more_answers(&since, 5, T);
    let new_reports = new.finish(T);
    assert_ws_clean("old clients", &old_reports, gen1);
    assert_ws_clean("new clients", &new_reports, gen2);
    assert_eq!(front_count(&sup, "tunnels_opened"), 7);
    assert_eq!(front_count(&sup, "tunnels_open"), 0);
    assert_eq!(front_count(&sup, "tunnels_closed_at_drain"), 0);
    assert_eq!(front_count(&sup, "bad_gateway"), 0);
}

/// WebSockets the clients keep open past `--drain-timeout`: the old
/// generation is stopped under them (counted), and they get the app's own
/// close (1001 from the Node server's SIGTERM handler), not a bare cut.
#[test]
fn websockets_open_past_the_drain_timeout_are_counted_and_closed_by_the_app() {
    let sup = front_node("front-ws-deadline", &["--drain-timeout", "2s"]);
    let gen1 = sup.status().pid;
    let url = format!("ws://{}/ws", sup.addr);
    let clients = WsClients::start(
        Lang::Python,
        &url,
        3,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    clients.wait_ready(T);
    clients.wait_all_answered_by(gen1, T);
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "upgrade: {out:?}");
    assert_eq!(out.json()["closed_at_deadline"], 3, "{out:?}");
    let reports = clients.wait_ended(T);
    for r in &reports {
        assert_eq!(r.closes, vec![1001], "the app's close: {r:?}");
        assert_eq!(r.pids, vec![gen1], "{r:?}");
        assert_eq!((r.seq_errors, r.echo_errors), (0, 0), "{r:?}");
    }
    assert_eq!(front_count(&sup, "tunnels_closed_at_drain"), 3);
    wait_for(T, "the tunnels to be closed", || {
        (front_count(&sup, "tunnels_open") == 0).then_some(())
    });
    // The front goes on: a new WebSocket goes to generation 2.
    let gen2 = sup.version().pid;
    let again = WsClients::start(
        Lang::Node,
        &url,
        1,
        Duration::from_millis(50),
        Duration::from_secs(60),
    );
    again.wait_ready(T);
    let r = again.finish(T);
    assert_ws_clean("after the upgrade", &r, gen2);
}

/// Raw HTTP/1.1 on a connection of its own (exact bytes on the wire).
fn raw(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c
}

/// Read one response whose body has a Content-Length (or none, to EOF):
/// (status, head, body).
fn read_response(c: &mut std::net::TcpStream) -> (u16, String, Vec<u8>) {
    use std::io::Read as _;
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = c.read(&mut b).expect("reading a response");
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head[9..12].parse().unwrap();
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let mut body = buf[head_end..].to_vec();
    match len {
        Some(n) => {
            while body.len() < n {
                let k = c.read(&mut b).expect("reading a body");
                assert!(k > 0, "closed in the body");
                body.extend_from_slice(&b[..k]);
            }
        }
        None => {
            c.read_to_end(&mut body).unwrap();
        }
    }
    (status, head, body)
}

/// The connection is closed by the other side (EOF or reset), within T.
fn closed(c: &mut std::net::TcpStream) -> bool {
    use std::io::Read as _;
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn get_ok(sup: &Supervised) {
    let mut c = raw(sup.addr);
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut c).0, 200, "the front serves the others");
}

#[test]
fn request_bodies_over_front_max_body_get_413_and_the_front_keeps_serving() {
    let sup = front_node("front-max-body", &["--front-max-body", "1M"]);
    let limit = 1usize << 20;
    // Declared too large (Expect: 100-continue): refused before a byte of
    // the body is sent, the app sees nothing.
    let mut c = raw(sup.addr);
    c.write_all(
        format!(
            "POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            limit + 1
        )
        .as_bytes(),
    )
    .unwrap();
    let (status, _, body) = read_response(&mut c);
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("--front-max-body"),
        "a clear body: {}",
        String::from_utf8_lossy(&body)
    );
    // Declared too large, no Expect (Python requests, browsers): the client
    // sends the whole body before it reads its answer. baton answers at
    // once and lingers, reading what the client still sends, so that the
    // close does not reset the connection under the 413.
    let mut c = raw(sup.addr);
    let body = 4 * limit;
    c.write_all(
        format!("POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: {body}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    c.write_all(&vec![b'x'; body])
        .expect("baton reads the refused body");
    let (status, _, _) = read_response(&mut c);
    assert_eq!(status, 413);
    assert!(closed(&mut c));
    // Chunked (no declared length): cut where it passes the limit; the app
    // (which reads the whole body before answering) had not answered.
    let mut c = raw(sup.addr);
    c.write_all(b"POST /sink HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    c.write_all(format!("{:x}\r\n", limit + 1).as_bytes())
        .unwrap();
    c.write_all(&vec![b'x'; limit + 1]).unwrap();
    let (status, _, _) = read_response(&mut c);
    assert_eq!(status, 413);
    // At the limit: forwarded whole.
    let mut c = raw(sup.addr);
    c.write_all(b"POST /sink HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    c.write_all(format!("{:x}\r\n", limit).as_bytes()).unwrap();
    c.write_all(&vec![b'x'; limit]).unwrap();
    c.write_all(b"\r\n0\r\n\r\n").unwrap();
    let (status, _, body) = read_response(&mut c);
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["received"], limit, "{j}");
    // HTTP/2 (h2c) with a declared length: the same 413, then the stream
    // is reset with NO_ERROR (RFC 9113 8.1). Node's http2 client (curl 7.88
    // takes that reset for an error).
    let script = r#"
        setTimeout(() => { console.log('no answer within 20 s'); process.exit(1); }, 20000).unref();
        const http2 = require('http2');
        const s = http2.connect(process.argv[1]);
        const n = 2 << 20;
        const req = s.request({ ':method': 'POST', ':path': '/sink', 'content-length': n });
        req.on('response', (h) => { console.log(h[':status']); s.close(); });
        req.on('error', (e) => { console.log('error ' + e.code); s.close(); });
        req.end(Buffer.alloc(n));
    "#;
    let o = baton_tests::output(
        Command::new(apps::node())
            .args(["-e", script])
            .arg(format!("http://{}", sup.addr)),
    )
    .expect("running node");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "413", "{o:?}");
    get_ok(&sup);
    assert_eq!(front_count(&sup, "body_too_large"), 4);
    assert_eq!(front_count(&sup, "bad_gateway"), 0);
}

#[test]
fn request_heads_over_front_max_header_get_431_and_the_front_keeps_serving() {
    let sup = front_node("front-max-header", &["--front-max-header", "16K"]);
    // Exactly 16 KiB of head without its end: the buffer is full.
    let mut head = b"GET /headers HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    head.resize(16 << 10, b'a');
    let mut c = raw(sup.addr);
    c.write_all(&head).unwrap();
    let (status, _, _) = read_response(&mut c);
    assert_eq!(status, 431);
    // A big head under the limit goes through.
    let mut c = raw(sup.addr);
    let big = "b".repeat(12 << 10);
    c.write_all(format!("GET /headers HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .unwrap();
    let (status, _, body) = read_response(&mut c);
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["headers"]["x-big"], big.as_str());
    get_ok(&sup);
    assert_eq!(front_count(&sup, "header_too_large"), 1);
    // Too small a limit is a usage error.
    let o = baton_tests::supervisor::baton_cli(&[
        "run",
        "--listen",
        "127.0.0.1:1",
        "--front",
        "http",
        "--front-max-header",
        "1K",
        "--",
        "true",
    ]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("at least 8192 bytes"), "{o:?}");
    // Every limit is in `baton run --help`, with its default.
    let help = baton_tests::supervisor::baton_cli(&["run", "--help"]).stdout;
    for (flag, default) in [
        ("--front-max-body", "1G"),
        ("--front-max-header", "64K"),
        ("--front-header-timeout", "30s"),
        ("--front-max-connections", "10000"),
    ] {
        let at = help
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} in {help}"));
        let entry = &help[at..];
        let entry = &entry[..entry.find("\n\n      --").unwrap_or(entry.len())];
        assert!(
            entry.contains(&format!("[default: {default}]")),
            "{flag}: {entry}"
        );
    }
}

/// `--front-header-timeout`: a client that sends half a head, and an idle
/// keep-alive connection, are closed after it; others are served meanwhile.
#[test]
fn the_header_read_timeout_closes_slow_and_idle_clients_and_the_front_keeps_serving() {
    let sup = front_node("front-header-timeout", &["--front-header-timeout", "1s"]);
    let mut slow = raw(sup.addr);
    slow.write_all(b"GET / HTTP/1.1\r\nHost:").unwrap();
    let mut idle = raw(sup.addr);
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).0, 200);
    get_ok(&sup);
    assert!(closed(&mut slow), "the half head's connection is closed");
    assert!(closed(&mut idle), "the idle connection is closed");
    get_ok(&sup);
    assert_eq!(front_count(&sup, "header_timeouts"), 2);
}

/// `--front-max-connections`: past it a new connection waits in the listen
/// queue (not refused, not reset) until one ends; the others are served.
#[test]
fn past_front_max_connections_a_client_waits_for_a_slot_and_the_others_are_served() {
    let sup = front_node("front-max-conns", &["--front-max-connections", "2"]);
    let base = front_count(&sup, "connections");
    let mut a = raw(sup.addr);
    let mut b = raw(sup.addr);
    for c in [&mut a, &mut b] {
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(c).0, 200);
    }
    let mut third = raw(sup.addr);
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    // The two keep being served; the third is not accepted meanwhile.
    for c in [&mut a, &mut b] {
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(c).0, 200);
    }
    assert_eq!(front_count(&sup, "connections"), base + 2);
    drop(a);
    assert_eq!(
        read_response(&mut third).0,
        200,
        "served once a slot is free"
    );
    assert_eq!(front_count(&sup, "connections"), base + 3);
}

/// SIGTERM with `--front`: baton stops accepting (new connections are
/// refused once its listeners are closed), closes idle client connections,
/// lets the request in flight finish, then stops the app and exits 0.
#[test]
fn on_sigterm_the_front_finishes_the_request_in_flight_refuses_new_ones_and_exits_0() {
    let mut sup = front_node("front-stop", &[]);
    let app = sup.status().pid;
    let mut idle = raw(sup.addr);
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).0, 200);
    // A request held open: half its body sent.
    let mut held = raw(sup.addr);
    held.write_all(b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n12345")
        .unwrap();
    wait_for(T, "the held request to be in flight upstream", || {
        (front_count(&sup, "upstream_busy") == 1).then_some(())
    });
    sup.signal(rustix::process::Signal::TERM);
    assert!(closed(&mut idle), "the idle client connection is closed");
    wait_for(
        T,
        "new connections to be refused",
        || match std::net::TcpStream::connect(sup.addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        },
    );
    assert!(
        baton_tests::proc::alive(app),
        "the app runs while a request is in flight"
    );
    held.write_all(b"67890").unwrap();
    let (status, head, body) = read_response(&mut held);
    assert_eq!(status, 200, "{head}");
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["received"], 10, "{j}");
    let st = sup.wait_exit(T).expect("baton exits");
    assert_eq!(st.code(), Some(0), "{st:?}\n{}", sup.log_text());
    assert!(!baton_tests::proc::alive(app), "the app was stopped");
    let log = sup.log_text();
    assert!(log.contains("front: client connections done"), "{log}");
}

/// A connection that completed its handshake but still sits in the listen
/// queue when baton stops (here: past `--front-max-connections`) is
/// answered — one request, then `Connection: close` — not reset by the
/// listener's close.
#[test]
fn on_sigterm_a_connection_still_in_the_listen_queue_is_answered_not_reset() {
    let mut sup = front_node("front-stop-queued", &["--front-max-connections", "1"]);
    let mut first = raw(sup.addr);
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut first).0, 200);
    let base = front_count(&sup, "connections");
    let mut queued = raw(sup.addr);
    queued
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    // `first` holds the only slot: `queued` waits in the listen queue.
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut first).0, 200);
    assert_eq!(front_count(&sup, "connections"), base);
    sup.signal(rustix::process::Signal::TERM);
    let (status, head, _) = read_response(&mut queued);
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(closed(&mut queued));
    assert!(closed(&mut first));
    let st = sup.wait_exit(T).expect("baton exits");
    assert_eq!(st.code(), Some(0), "{st:?}");
}

/// SIGTERM with WebSockets open through the front: baton does not wait
/// for them (there is no generation to come); the app, stopped once the
/// requests are done, closes them with its protocol's close (1001 from the
/// Node server), and baton exits 0.
#[test]
fn on_sigterm_open_websockets_get_the_apps_close_and_baton_exits_0() {
    let mut sup = front_node("front-stop-ws", &[]);
    let url = format!("ws://{}/ws", sup.addr);
    let clients = WsClients::start(
        Lang::Node,
        &url,
        3,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    clients.wait_ready(T);
    sup.signal(rustix::process::Signal::TERM);
    let reports = clients.wait_ended(T);
    for r in &reports {
        assert_eq!(r.closes, vec![1001], "the app's close: {r:?}");
        assert_eq!((r.seq_errors, r.echo_errors), (0, 0), "{r:?}");
    }
    let st = sup.wait_exit(T).expect("baton exits");
    assert_eq!(st.code(), Some(0), "{st:?}");
}

/// After a load, the front gives back what it allocated for it: its idle
/// upstream connections close at `--front-upstream-idle` without waiting
/// for a request, and the freed heap goes back to the kernel once no
/// client connection is left. The supervisor does not stay at its peak.
#[test]
fn the_front_gives_its_memory_back_after_a_load() {
    use baton_tests::load::{Load, Mode};
    use baton_tests::proc;
    let sup = Supervised::start(
        "front-memory",
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            args: s(&["--front", "http", "--front-upstream-idle", "500ms"]),
            command: go_app(),
            env: vec![("BATON_LOG".into(), "info,baton::front=debug".into())],
            ..RunOpts::default()
        },
    );
    let anon = || proc::rss_anon_kib(sup.pid).expect("RssAnon of baton");
    let idle = anon();
    let load = Load::start(
        sup.addr,
        Mode::KeepAlive,
        128,
        Duration::from_secs(60),
        50_000,
    );
    load.wait_progress(5_000, T);
    let peak = anon();
    let st = load.stop();
    assert_eq!((st.failed, st.wrong), (0, 0), "{:?}", st.errors);
    assert!(
        peak >= idle + 4096,
        "128 keep-alive clients did not raise baton's anonymous memory: {idle} KiB idle, {peak} KiB under load"
    );
    let target = idle + (peak - idle) / 4;
    let settled = baton_tests::wait_for_opt(T, || {
        let now = anon();
        (now <= target).then_some(now)
    });
    eprintln!("RssAnon: {idle} KiB idle, {peak} KiB under load, {settled:?} KiB after");
    assert!(
        settled.is_some(),
        "baton's anonymous memory stays at {} KiB after the load ({idle} KiB idle, {peak} KiB under \
         load, expected at most {target} KiB)\n{}",
        anon(),
        sup.log_text()
    );
}

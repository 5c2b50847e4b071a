//! A rustls client for the TLS handoff tests: holds N idle HTTP/1.1
//! keep-alive connections of one TLS version and cipher suite, and acts on
//! them when told. No retries, no reconnections: every connection is the
//! one opened at start, so an answer on it is an answer on the same TLS
//! session (a new handshake would need a new connection).
//!
//! ```text
//! baton-tls-client --port P --ca CA.pem --version 1.2|1.3 --suite NAME --conns N
//! ```
//!
//! `NAME` is rustls' name of the suite (`TLS13_AES_128_GCM_SHA256`,
//! `TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256`, ...); only that suite is
//! offered. At start each connection sends `GET /version`; one JSON line
//! `{"ready": [answer...], "version": V, "suite": S}` (or `{"error": ..}`).
//! Then commands on stdin, one JSON line answered on stdout for each:
//!
//! * `get` — `GET /version` on every connection: `{"answers": [answer...]}`,
//!   an answer being `{"ok": true, "pid", "generation", "handed_over",
//!   "peer", "local"}` or `{"ok": false, "error"}`.
//! * `hold` — on every connection, the head of `POST /echo` with
//!   `Expect: 100-continue`, and wait for `100 Continue`: the request is
//!   open in the server until `release` (`{"held": [ok...]}`).
//! * `release` — on every connection, the held request's body and a
//!   pipelined `GET /version` in the same write; both answers are read
//!   (`{"released": [{"echo": answer, "next": answer}...]}`).
//! * `send` — `GET /version` written on every connection, nothing read
//!   (`{"sent": [ok...]}`); `recv` reads those answers (`{"answers": [..]}`).
//!   A test sends while something happens in the server, then reads.
//! * `keyupdate` — TLS 1.3 KeyUpdate (`refresh_traffic_keys`, update
//!   requested) on every connection, then read until the server ends it:
//!   `{"endings": [..]}`, each `clean` (close_notify), `eof` (closed
//!   without close_notify), `timeout` (a hang: nothing within 10 s),
//!   `data: ..` or `error: ..`.
//! * `quit`.

#![forbid(unsafe_code)]

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{Value, json};

/// How long one read may wait: longer than any upgrade step the tests
/// make a connection wait through, short enough to call a hang a hang.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response head or body this client reads.
const MAX_RESPONSE: usize = 1 << 20;
/// The body of a held `POST /echo`.
const HELD_BODY: &[u8] = b"held-request-body";

type Conn = StreamOwned<ClientConnection, TcpStream>;

struct Args {
    port: u16,
    ca: String,
    version: String,
    suite: String,
    conns: usize,
}

const USAGE: &str = "usage: baton-tls-client --port P --ca CA.pem --version 1.2|1.3 \
    --suite RUSTLS_SUITE_NAME --conns N\n\
    Opens N HTTP/1.1 keep-alive connections to 127.0.0.1:P (name localhost) offering only that \
    TLS version and suite (rustls' name, e.g. TLS13_AES_128_GCM_SHA256), one GET /version each, \
    then reads commands on stdin, one JSON line answered for each: get, hold, release, send, \
    recv, keyupdate, quit.";

/// The arguments, or `None` for `--help`.
fn parse_args() -> Result<Option<Args>, String> {
    let mut a = Args {
        port: 0,
        ca: String::new(),
        version: "1.3".into(),
        suite: String::new(),
        conns: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => a.port = val()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--ca" => a.ca = val()?,
            "--version" => a.version = val()?,
            "--suite" => a.suite = val()?,
            "--conns" => a.conns = val()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "--help" | "-h" => return Ok(None),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if a.port == 0 || a.ca.is_empty() || a.suite.is_empty() {
        return Err("--port, --ca and --suite are required (see --help)".into());
    }
    Ok(Some(a))
}

fn config(a: &Args) -> Result<Arc<ClientConfig>, String> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| format!("{:?}", s.suite()) == a.suite);
    if provider.cipher_suites.is_empty() {
        return Err(format!("rustls (ring) has no cipher suite {:?}", a.suite));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match a.version.as_str() {
        "1.2" => &[&rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        v => return Err(format!("--version {v}: 1.2 or 1.3")),
    };
    let pem = std::fs::read(&a.ca).map_err(|e| format!("{}: {e}", a.ca))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{}: {e}", a.ca))?;
        roots.add(c).map_err(|e| format!("{}: {e}", a.ca))?;
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: every connection is a full handshake, once.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

fn connect(a: &Args, cfg: &Arc<ClientConfig>) -> Result<Conn, String> {
    let sock = TcpStream::connect(("127.0.0.1", a.port)).map_err(|e| format!("connect: {e}"))?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(Arc::clone(cfg), name).map_err(|e| e.to_string())?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(s)
}

/// A response: status and body.
struct Resp {
    status: u16,
    body: Vec<u8>,
}

/// Read one response; `buf` keeps bytes that arrived after it.
fn read_response(s: &mut Conn, buf: &mut Vec<u8>) -> Result<Resp, String> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_RESPONSE {
            return Err("response head too large".into());
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("closed by the server ({} bytes read)", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("bad status line: {head:?}"))?;
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if len > MAX_RESPONSE {
        return Err(format!("body of {len} bytes"));
    }
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed by the server inside a body".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Ok(Resp { status, body })
}

fn send(s: &mut Conn, bytes: &[u8]) -> Result<(), String> {
    s.write_all(bytes)
        .and_then(|()| s.flush())
        .map_err(|e| format!("write: {e}"))
}

const GET_VERSION: &[u8] = b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// A `/version` answer as JSON.
fn version_answer(s: &Conn, r: Result<Resp, String>) -> Value {
    let local = s.sock.local_addr().map(|a| a.to_string()).ok();
    match r {
        Ok(r) if r.status == 200 => match serde_json::from_slice::<Value>(&r.body) {
            Ok(v) => json!({
                "ok": true,
                "pid": v["pid"],
                "generation": v["generation"],
                "handed_over": v["handed_over"],
                "tls": v["tls"],
                "peer": v["peer"],
                "local": local,
            }),
            Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
        },
        Ok(r) => json!({"ok": false, "error": format!("status {}", r.status)}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn get(s: &mut Conn, buf: &mut Vec<u8>) -> Value {
    let r = send(s, GET_VERSION).and_then(|()| read_response(s, buf));
    version_answer(s, r)
}

fn hold(s: &mut Conn, buf: &mut Vec<u8>) -> Value {
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        HELD_BODY.len()
    );
    match send(s, head.as_bytes()).and_then(|()| read_response(s, buf)) {
        Ok(r) if r.status == 100 => json!({"ok": true}),
        Ok(r) => json!({"ok": false, "error": format!("status {} instead of 100", r.status)}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn release(s: &mut Conn, buf: &mut Vec<u8>) -> Value {
    // The body and the next request in one write: the next request
    // arrives while the first is still being answered.
    let mut bytes = HELD_BODY.to_vec();
    bytes.extend_from_slice(GET_VERSION);
    if let Err(e) = send(s, &bytes) {
        return json!({"echo": {"ok": false, "error": e}, "next": {"ok": false, "error": "not read"}});
    }
    let echo = match read_response(s, buf) {
        Ok(r) if r.status == 200 && r.body == HELD_BODY => json!({"ok": true}),
        Ok(r) => json!({"ok": false, "error": format!("status {} body {:?}", r.status,
            String::from_utf8_lossy(&r.body))}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    let next = read_response(s, buf);
    json!({"echo": echo, "next": version_answer(s, next)})
}

fn key_update(s: &mut Conn, buf: &mut Vec<u8>) -> Value {
    if let Err(e) = s.conn.refresh_traffic_keys() {
        return json!(format!("error: refresh_traffic_keys: {e}"));
    }
    if let Err(e) = s.flush() {
        return json!(format!("error: sending KeyUpdate: {e}"));
    }
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return json!("clean"),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_RESPONSE {
                    return json!(format!("data: {:?}", String::from_utf8_lossy(&buf[..64])));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return json!("eof"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return json!(if buf.is_empty() {
                    "timeout".to_owned()
                } else {
                    format!("data: {:?}", String::from_utf8_lossy(buf))
                });
            }
            Err(e) => return json!(format!("error: {e}")),
        }
    }
}

fn out(v: Value) {
    let mut o = std::io::stdout().lock();
    // Nothing to do if the test stopped listening.
    let _ = writeln!(o, "{v}").and_then(|()| o.flush());
}

fn main() -> std::process::ExitCode {
    let a = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("baton-tls-client: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cfg = match config(&a) {
        Ok(c) => c,
        Err(e) => {
            out(json!({"error": e}));
            return std::process::ExitCode::from(1);
        }
    };
    let mut conns: Vec<(Conn, Vec<u8>)> = Vec::with_capacity(a.conns);
    let mut ready = Vec::with_capacity(a.conns);
    for _ in 0..a.conns {
        match connect(&a, &cfg) {
            Ok(mut s) => {
                let mut buf = Vec::new();
                ready.push(get(&mut s, &mut buf));
                conns.push((s, buf));
            }
            Err(e) => {
                out(json!({"error": e}));
                return std::process::ExitCode::from(1);
            }
        }
    }
    let negotiated = conns.first().map(|(s, _)| {
        (
            s.conn.protocol_version().map(|v| format!("{v:?}")),
            s.conn
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite())),
        )
    });
    let (version, suite) = negotiated.unwrap_or_default();
    out(json!({"ready": ready, "version": version, "suite": suite}));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let v = match line.trim() {
            "get" => {
                json!({"answers": conns.iter_mut().map(|(s, b)| get(s, b)).collect::<Vec<_>>()})
            }
            "hold" => {
                json!({"held": conns.iter_mut().map(|(s, b)| hold(s, b)).collect::<Vec<_>>()})
            }
            "release" => {
                json!({"released": conns.iter_mut().map(|(s, b)| release(s, b)).collect::<Vec<_>>()})
            }
            "send" => json!({"sent": conns.iter_mut().map(|(s, _)| match send(s, GET_VERSION) {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e}),
            }).collect::<Vec<_>>()}),
            "recv" => json!({"answers": conns.iter_mut().map(|(s, b)| {
                let r = read_response(s, b);
                version_answer(s, r)
            }).collect::<Vec<_>>()}),
            "keyupdate" => {
                json!({"endings": conns.iter_mut().map(|(s, b)| key_update(s, b)).collect::<Vec<_>>()})
            }
            "quit" => break,
            other => json!({"error": format!("unknown command {other:?}")}),
        };
        out(v);
    }
    std::process::ExitCode::SUCCESS
}

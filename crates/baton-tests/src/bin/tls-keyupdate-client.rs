//! A small rustls client for the TLS handoff tests (issue 16): Python's
//! `ssl` cannot send a TLS 1.3 KeyUpdate, rustls can
//! (`refresh_traffic_keys`).
//!
//! `tls-keyupdate-client PORT CA_PEM [TLS13_SUITE]`: connects to
//! 127.0.0.1:PORT (name `localhost`, TLS 1.3, only that suite if given,
//! ALPN http/1.1), sends `GET /version` and prints `{"pid": N, "suite": S}`. Then reads commands on stdin, one JSON line answered each:
//!
//! * `get` — another `GET /version` on the same connection: `{"ok": true, "pid": N, "body": ...}`;
//! * `keyupdate` — send a KeyUpdate, then a `GET /version` under the new key,
//!   and read until the connection ends: `{"ending": "clean" | "eof-without-close_notify" | "error: ..." | "timeout", "answered": bool}`;
//! * `keyupdate-mid-body` — send half of a `POST /echo` body, a KeyUpdate,
//!   the other half; then as `keyupdate` (reads time out after 30 s);
//! * `quit`.
//!
//! Every read has a 10 s timeout (reported as `timeout`: the hang a test
//! must not see).

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const TIMEOUT: Duration = Duration::from_secs(10);
/// For `keyupdate-mid-body`: longer than the server's limit for a request
/// stuck after a KeyUpdate (10 s).
const LONG_TIMEOUT: Duration = Duration::from_secs(30);

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tls-keyupdate-client: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (port, ca, suite) = match &args[..] {
        [_, port, ca] => (port, ca, None),
        [_, port, ca, suite] => (port, ca, Some(suite.as_str())),
        _ => return Err("usage: tls-keyupdate-client PORT CA_PEM [TLS13_SUITE]".into()),
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(name) = suite {
        use rustls::crypto::ring::cipher_suite as cs;
        let chosen = match name {
            "TLS13_AES_128_GCM_SHA256" => cs::TLS13_AES_128_GCM_SHA256,
            "TLS13_AES_256_GCM_SHA384" => cs::TLS13_AES_256_GCM_SHA384,
            "TLS13_CHACHA20_POLY1305_SHA256" => cs::TLS13_CHACHA20_POLY1305_SHA256,
            other => return Err(format!("unknown TLS 1.3 suite {other}").into()),
        };
        provider.cipher_suites = vec![chosen];
    }
    let provider = Arc::new(provider);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from("localhost")?.to_owned(),
    )?;
    let sock = TcpStream::connect(("127.0.0.1", port.parse::<u16>()?))?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.set_nodelay(true)?;
    let mut tls = Tls::new(conn, sock);
    let (_, body) = get(&mut tls)?;
    let suite = tls
        .conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    println!("{{\"pid\": {}, \"suite\": {suite:?}}}", pid(&body));
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        match line.trim() {
            "quit" => return Ok(()),
            "get" => match get(&mut tls) {
                Ok((ok, body)) => println!(
                    "{{\"ok\": {ok}, \"pid\": {}, \"body\": {:?}}}",
                    pid(&body),
                    body
                ),
                Err(e) => println!("{{\"ok\": false, \"error\": {:?}}}", e.to_string()),
            },
            "keyupdate-mid-body" => {
                // Half a request body, the KeyUpdate, the other half.
                let head =
                    "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nhello";
                tls.write_all(head.as_bytes())?;
                tls.flush()?;
                tls.conn.refresh_traffic_keys()?;
                let sent = tls.write_all(b"world").and_then(|()| tls.flush());
                tls.sock.set_read_timeout(Some(LONG_TIMEOUT))?;
                let (ending, got) = read_to_end(&mut tls);
                println!(
                    "{{\"ending\": {ending:?}, \"sent\": {}, \"answered\": {}}}",
                    sent.is_ok(),
                    String::from_utf8_lossy(&got).contains(" 200 ")
                );
            }
            "keyupdate" => {
                tls.conn.refresh_traffic_keys()?;
                let sent = tls.write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n");
                let (ending, got) = read_to_end(&mut tls);
                println!(
                    "{{\"ending\": {ending:?}, \"sent\": {}, \"answered\": {}}}",
                    sent.is_ok(),
                    String::from_utf8_lossy(&got).contains(" 200 ")
                );
            }
            other => println!("{{\"ok\": false, \"error\": \"unknown command {other}\"}}"),
        }
    }
    Ok(())
}

/// One `GET /version`: (status 200, body).
fn get(tls: &mut Tls) -> Result<(bool, String), Box<dyn std::error::Error>> {
    tls.write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    tls.flush()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = tls.read(&mut chunk)?;
                if n == 0 {
                    return Err("connection closed inside a response".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return Ok((head.contains(" 200 "), body));
        }
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn read_to_end(tls: &mut Tls) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => return ("clean".into(), got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return ("eof-without-close_notify".into(), got);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return ("timeout".into(), got);
            }
            Err(e) => return (format!("error: {e}"), got),
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn pid(body: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["pid"].as_u64())
        .unwrap_or(0)
}

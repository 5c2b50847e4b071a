//! The TLS handoff acceptance's clients (issue 16): idle HTTP/1.1
//! keep-alive connections held by three TLS stacks, each one version and
//! one cipher suite, asked on command to send a request on the connection
//! they already have (never a new one):
//!
//! * rustls — the `baton-tls-client` binary (this crate), which can also
//!   hold a request open, pipeline the next one, and send a KeyUpdate;
//! * OpenSSL — `openssl s_client`, one process per connection, driven
//!   through its stdin (`k` asks it for a KeyUpdate) and read from its
//!   stdout;
//! * Python's `ssl` — `tls_client.py held` (TLS 1.3 suites chosen through
//!   an `OPENSSL_CONF` file, the only way Python's `ssl` offers).
//!
//! [`Combo::all`] is the matrix: TLS 1.3 × AES-128-GCM, AES-256-GCM,
//! ChaCha20-Poly1305, and TLS 1.2 ECDHE × the same three, each with an RSA
//! and an ECDSA certificate (a TLS 1.2 suite names the certificate's key
//! type, so both are needed to reach all six TLS 1.2 suites). Every wait
//! has a timeout; a missing tool fails the test.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::Value;

use crate::tls::{CLIENT_PY, require};
use crate::wait_for_opt;

/// How long a client may take to answer one command.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The certificate's key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyKind {
    /// RSA 2048.
    Rsa,
    /// ECDSA P-256.
    Ecdsa,
}

impl KeyKind {
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "rsa",
            KeyKind::Ecdsa => "ecdsa",
        }
    }

    /// `openssl req -newkey` arguments.
    pub fn newkey_args(self) -> &'static [&'static str] {
        match self {
            KeyKind::Rsa => &["-newkey", "rsa:2048"],
            KeyKind::Ecdsa => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        }
    }
}

/// TLS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsVersion {
    V12,
    V13,
}

/// The AEAD of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Combo {
    pub version: TlsVersion,
    pub aead: Aead,
    pub key: KeyKind,
}

impl Combo {
    /// Every (version, suite, certificate) combination: 12.
    pub fn all() -> Vec<Combo> {
        let mut v = Vec::new();
        for key in [KeyKind::Rsa, KeyKind::Ecdsa] {
            for version in [TlsVersion::V13, TlsVersion::V12] {
                for aead in [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::Chacha20Poly1305] {
                    v.push(Combo { version, aead, key });
                }
            }
        }
        v
    }

    /// rustls' name of the suite.
    pub fn rustls_suite(&self) -> String {
        let key = match self.key {
            KeyKind::Rsa => "RSA",
            KeyKind::Ecdsa => "ECDSA",
        };
        match (self.version, self.aead) {
            (TlsVersion::V13, Aead::Aes128Gcm) => "TLS13_AES_128_GCM_SHA256".into(),
            (TlsVersion::V13, Aead::Aes256Gcm) => "TLS13_AES_256_GCM_SHA384".into(),
            (TlsVersion::V13, Aead::Chacha20Poly1305) => "TLS13_CHACHA20_POLY1305_SHA256".into(),
            (TlsVersion::V12, Aead::Aes128Gcm) => {
                format!("TLS_ECDHE_{key}_WITH_AES_128_GCM_SHA256")
            }
            (TlsVersion::V12, Aead::Aes256Gcm) => {
                format!("TLS_ECDHE_{key}_WITH_AES_256_GCM_SHA384")
            }
            (TlsVersion::V12, Aead::Chacha20Poly1305) => {
                format!("TLS_ECDHE_{key}_WITH_CHACHA20_POLY1305_SHA256")
            }
        }
    }

    /// OpenSSL's name of the suite (`-ciphersuites` for TLS 1.3, `-cipher`
    /// for TLS 1.2; also what Python's `ssl` reports).
    pub fn openssl_suite(&self) -> String {
        let key = match self.key {
            KeyKind::Rsa => "RSA",
            KeyKind::Ecdsa => "ECDSA",
        };
        match (self.version, self.aead) {
            (TlsVersion::V13, Aead::Aes128Gcm) => "TLS_AES_128_GCM_SHA256".into(),
            (TlsVersion::V13, Aead::Aes256Gcm) => "TLS_AES_256_GCM_SHA384".into(),
            (TlsVersion::V13, Aead::Chacha20Poly1305) => "TLS_CHACHA20_POLY1305_SHA256".into(),
            (TlsVersion::V12, Aead::Aes128Gcm) => format!("ECDHE-{key}-AES128-GCM-SHA256"),
            (TlsVersion::V12, Aead::Aes256Gcm) => format!("ECDHE-{key}-AES256-GCM-SHA384"),
            (TlsVersion::V12, Aead::Chacha20Poly1305) => format!("ECDHE-{key}-CHACHA20-POLY1305"),
        }
    }

    pub fn version_arg(&self) -> &'static str {
        match self.version {
            TlsVersion::V12 => "1.2",
            TlsVersion::V13 => "1.3",
        }
    }

    /// `rsa TLS13_AES_128_GCM_SHA256`.
    pub fn label(&self) -> String {
        format!("{} {}", self.key.name(), self.rustls_suite())
    }
}

/// One connection's answer to `GET /version`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub ok: bool,
    pub pid: u64,
    pub generation: u64,
    /// The serving generation received this connection from its
    /// predecessor.
    pub handed_over: bool,
    /// The client address the server sees.
    pub peer: String,
    /// The client's own address (empty for `s_client`, which does not say):
    /// equal to `peer` on the same TCP connection.
    pub local: String,
    pub error: String,
}

impl Answer {
    pub fn parse(v: &Value) -> Answer {
        if v["ok"] != Value::Bool(true) {
            return Answer {
                error: v["error"]
                    .as_str()
                    .map_or_else(|| v.to_string(), str::to_owned),
                ..Answer::default()
            };
        }
        Answer {
            ok: true,
            pid: v["pid"].as_u64().unwrap_or_default(),
            generation: v["generation"].as_u64().unwrap_or_default(),
            handed_over: v["handed_over"] == Value::Bool(true),
            peer: v["peer"].as_str().unwrap_or_default().to_owned(),
            local: v["local"].as_str().unwrap_or_default().to_owned(),
            error: String::new(),
        }
    }

    fn failed(error: impl Into<String>) -> Answer {
        Answer {
            error: error.into(),
            ..Answer::default()
        }
    }
}

/// A client process answering one JSON line per command line.
#[derive(Debug)]
pub struct LineClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl LineClient {
    fn spawn(mut cmd: Command, what: String) -> LineClient {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = crate::spawn_owned(&mut cmd)
            .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        LineClient {
            child,
            stdin,
            lines,
            what,
        }
    }

    /// The next JSON line.
    pub fn next_line(&mut self) -> Value {
        let line = self
            .lines
            .recv_timeout(ANSWER_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: no answer within {ANSWER_TIMEOUT:?}: {e}", self.what));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{}: {line:?}: {e}", self.what))
    }

    /// Send a command, return its answer.
    pub fn cmd(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {line:?}: {e}", self.what));
        self.next_line()
    }
}

impl Drop for LineClient {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        if wait_for_opt(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `openssl s_client` holding one connection.
#[derive(Debug)]
pub struct SClient {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    /// Set when stdout / stderr reached their end.
    read_all: [Arc<AtomicBool>; 2],
    /// Where the next response is looked for in `out`.
    pos: usize,
    what: String,
}

const GET_VERSION: &[u8] = b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Everything `r` gives, in a buffer; the flag is set at its end.
fn collect(mut r: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let (b, d) = (Arc::clone(&buf), Arc::clone(&done));
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
        d.store(true, Ordering::SeqCst);
    });
    (buf, done)
}

/// A complete HTTP/1.1 response in `out` from `pos`: its end and body.
fn find_response(out: &[u8], pos: usize) -> Option<(usize, u16, Vec<u8>)> {
    let rest = &out[pos.min(out.len())..];
    let start = rest.windows(9).position(|w| w == b"HTTP/1.1 ")?;
    let rest = &rest[start..];
    let head_end = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&rest[..head_end]);
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let body = rest.get(head_end..head_end + len)?.to_vec();
    Some((pos + start + head_end + len, status, body))
}

impl SClient {
    /// Connect with exactly this version and suite, and send one request.
    pub fn start(port: u16, ca: &Path, combo: Combo) -> (SClient, Answer) {
        let bin = require("openssl", "the openssl package");
        let mut cmd = Command::new(bin);
        cmd.args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args([
                "-servername",
                "localhost",
                "-verify_return_error",
                "-CAfile",
            ])
            .arg(ca);
        match combo.version {
            TlsVersion::V13 => cmd.args(["-tls1_3", "-ciphersuites"]),
            TlsVersion::V12 => cmd.args(["-tls1_2", "-cipher"]),
        };
        cmd.arg(combo.openssl_suite())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("openssl s_client ({})", combo.label());
        let mut child =
            crate::spawn_owned(&mut cmd).unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        let stdin = child.stdin.take().unwrap();
        let (out, out_done) = collect(child.stdout.take().unwrap());
        let (err, err_done) = collect(child.stderr.take().unwrap());
        let mut c = SClient {
            child,
            stdin,
            out,
            err,
            read_all: [out_done, err_done],
            pos: 0,
            what,
        };
        let a = c.get();
        let text = String::from_utf8_lossy(&c.out.lock().unwrap()).into_owned();
        let want = format!("Cipher is {}", combo.openssl_suite());
        assert!(
            text.contains(&want),
            "{}: {want:?} not in its output:\n{text}",
            c.what
        );
        (c, a)
    }

    /// What it printed, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&self.out.lock().unwrap()),
            String::from_utf8_lossy(&self.err.lock().unwrap())
        )
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /version` on its connection.
    pub fn get(&mut self) -> Answer {
        if self.exited() {
            return Answer::failed(format!(
                "{}: s_client has exited (its connection ended)",
                self.what
            ));
        }
        if let Err(e) = self
            .stdin
            .write_all(GET_VERSION)
            .and_then(|()| self.stdin.flush())
        {
            return Answer::failed(format!("{}: write: {e}", self.what));
        }
        let pos = self.pos;
        let out = Arc::clone(&self.out);
        let mut gone = false;
        let found = wait_for_opt(ANSWER_TIMEOUT, || {
            if let Some(r) = find_response(&out.lock().unwrap(), pos) {
                return Some(Some(r));
            }
            // Exited: one last look at what it printed.
            if gone {
                return Some(find_response(&out.lock().unwrap(), pos));
            }
            gone = !matches!(self.child.try_wait(), Ok(None));
            None
        });
        match found {
            Some(Some((end, status, body))) => {
                self.pos = end;
                if status != 200 {
                    return Answer::failed(format!("{}: status {status}", self.what));
                }
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => Answer {
                        ok: true,
                        pid: v["pid"].as_u64().unwrap_or_default(),
                        generation: v["generation"].as_u64().unwrap_or_default(),
                        handed_over: v["handed_over"] == Value::Bool(true),
                        peer: v["peer"].as_str().unwrap_or_default().to_owned(),
                        local: String::new(),
                        error: String::new(),
                    },
                    Err(e) => Answer::failed(format!("{}: body not JSON: {e}", self.what)),
                }
            }
            Some(None) => Answer::failed(format!(
                "{}: the connection ended with no answer; {}",
                self.what,
                self.tail()
            )),
            None => Answer::failed(format!(
                "{}: no answer within {ANSWER_TIMEOUT:?}; {}",
                self.what,
                self.tail()
            )),
        }
    }

    fn tail(&self) -> String {
        let out = self.out.lock().unwrap();
        let from = self.pos.min(out.len());
        let t = String::from_utf8_lossy(&out[from..]).into_owned();
        let t: String = t
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("its output since the last answer ends with {t:?}")
    }

    /// Type `k` (TLS 1.3 KeyUpdate), then wait for the connection to end:
    /// `clean` (close_notify: s_client prints `closed`), `eof` (ended
    /// without close_notify), `timeout` (still open: a hang), or `error`.
    pub fn key_update(&mut self, timeout: Duration) -> String {
        self.command_then_end(b"k\n", "KEYUPDATE", timeout)
    }

    /// Type `R` (TLS 1.2 renegotiation: a new ClientHello), then wait for
    /// the connection to end, as [`SClient::key_update`].
    pub fn renegotiate(&mut self, timeout: Duration) -> String {
        self.command_then_end(b"R\n", "RENEGOTIATING", timeout)
    }

    fn command_then_end(&mut self, cmd: &[u8], said: &str, timeout: Duration) -> String {
        if let Err(e) = self.stdin.write_all(cmd).and_then(|()| self.stdin.flush()) {
            return format!("error: write: {e}");
        }
        let exited = wait_for_opt(timeout, || self.child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return "timeout".into();
        }
        // Everything it printed, read to the end.
        let all = wait_for_opt(Duration::from_secs(5), || {
            self.read_all
                .iter()
                .all(|d| d.load(Ordering::SeqCst))
                .then_some(())
        });
        if all.is_none() {
            return "error: s_client exited but its output did not end".into();
        }
        let err = String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned();
        if !err.contains(said) {
            return format!("error: s_client did not say {said}: {err}");
        }
        let out = self.out.lock().unwrap();
        let from = self.pos.min(out.len());
        let t = String::from_utf8_lossy(&out[from..]);
        if t.lines().any(|l| l.trim() == "closed") {
            "clean".into()
        } else if t.contains("read:errno") {
            "eof".into()
        } else {
            format!("error: {}", t.chars().take(300).collect::<String>())
        }
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A client of the matrix.
#[derive(Debug)]
pub enum HeldClient {
    Rustls(LineClient),
    Python(LineClient),
    OpenSsl(Vec<SClient>),
}

/// The clients of one combination against one server.
#[derive(Debug)]
pub struct Held {
    pub combo: Combo,
    pub client: HeldClient,
    /// The answers to the first request of each connection.
    pub first: Vec<Answer>,
}

impl Held {
    pub fn name(&self) -> String {
        let c = match self.client {
            HeldClient::Rustls(_) => "rustls",
            HeldClient::Python(_) => "python ssl",
            HeldClient::OpenSsl(_) => "openssl s_client",
        };
        format!("{c} {}", self.combo.label())
    }

    /// `GET /version` on every connection it holds.
    pub fn get(&mut self) -> Vec<Answer> {
        match &mut self.client {
            HeldClient::Rustls(c) | HeldClient::Python(c) => answers(&c.cmd("get")["answers"]),
            HeldClient::OpenSsl(v) => v.iter_mut().map(SClient::get).collect(),
        }
    }
}

fn answers(v: &Value) -> Vec<Answer> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of answers: {v}"))
        .iter()
        .map(Answer::parse)
        .collect()
}

/// The rustls client with `conns` connections.
pub fn rustls_client(bin: &Path, port: u16, ca: &Path, combo: Combo, conns: usize) -> Held {
    let mut cmd = Command::new(bin);
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--ca")
        .arg(ca)
        .args(["--version", combo.version_arg(), "--suite"])
        .arg(combo.rustls_suite())
        .arg("--conns")
        .arg(conns.to_string());
    let mut c = LineClient::spawn(cmd, format!("rustls client ({})", combo.label()));
    let v = c.next_line();
    assert_eq!(
        v["suite"].as_str(),
        Some(combo.rustls_suite().as_str()),
        "rustls client ({}): {v}",
        combo.label()
    );
    let first = answers(&v["ready"]);
    Held {
        combo,
        client: HeldClient::Rustls(c),
        first,
    }
}

/// Python's `ssl` with `conns` connections; `dir` gets the script and the
/// OpenSSL configuration that picks a TLS 1.3 suite.
pub fn python_client(dir: &Path, port: u16, ca: &Path, combo: Combo, conns: usize) -> Held {
    let py = require("python3", "python3 (3.11 or later)");
    let script = dir.join("tls_client.py");
    if !script.exists() {
        std::fs::write(&script, CLIENT_PY).unwrap();
    }
    let mut cmd = Command::new(py);
    cmd.arg(&script)
        .args(["held", "--port"])
        .arg(port.to_string())
        .arg("--ca")
        .arg(ca)
        .arg("--conns")
        .arg(conns.to_string())
        .current_dir(dir);
    match combo.version {
        TlsVersion::V12 => {
            cmd.args(["--tls12", "--cipher"]).arg(combo.openssl_suite());
        }
        TlsVersion::V13 => {
            cmd.env("OPENSSL_CONF", openssl_conf(dir, &combo.openssl_suite()));
        }
    }
    let mut c = LineClient::spawn(cmd, format!("python ssl ({})", combo.label()));
    let v = c.next_line();
    assert_eq!(
        v["cipher"].as_str(),
        Some(combo.openssl_suite().as_str()),
        "python ssl ({}): {v}",
        combo.label()
    );
    let first = answers(&v["ready"]);
    Held {
        combo,
        client: HeldClient::Python(c),
        first,
    }
}

/// An OpenSSL configuration file that offers only this TLS 1.3 suite.
fn openssl_conf(dir: &Path, suite: &str) -> PathBuf {
    let p = dir.join(format!("openssl-{suite}.cnf"));
    std::fs::write(
        &p,
        format!(
            "openssl_conf = openssl_init\n[openssl_init]\nssl_conf = ssl_sect\n\
             [ssl_sect]\nsystem_default = system_default_sect\n\
             [system_default_sect]\nCiphersuites = {suite}\n"
        ),
    )
    .unwrap();
    p
}

/// `conns` `openssl s_client` processes.
pub fn openssl_clients(port: u16, ca: &Path, combo: Combo, conns: usize) -> Held {
    let mut v = Vec::with_capacity(conns);
    let mut first = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (c, a) = SClient::start(port, ca, combo);
        v.push(c);
        first.push(a);
    }
    Held {
        combo,
        client: HeldClient::OpenSsl(v),
        first,
    }
}

/// Check that every answer came from `pid` on the connection that asked
/// the first time: returns one line per problem (all of them, uncounted
/// ones never dropped).
pub fn check_same_socket(h: &Held, now: &[Answer], pid: u64) -> Vec<String> {
    let mut bad = Vec::new();
    if now.len() != h.first.len() {
        bad.push(format!(
            "{}: {} answers for {} connections",
            h.name(),
            now.len(),
            h.first.len()
        ));
    }
    for (i, (a, b)) in h.first.iter().zip(now).enumerate() {
        let n = h.name();
        if !a.ok {
            bad.push(format!("{n} #{i}: its first request failed: {}", a.error));
        } else if !b.ok {
            bad.push(format!("{n} #{i}: {}", b.error));
        } else if b.pid != pid {
            bad.push(format!(
                "{n} #{i}: answered by pid {} instead of {pid}",
                b.pid
            ));
        } else if b.peer != a.peer || (!b.local.is_empty() && b.local != b.peer) {
            bad.push(format!(
                "{n} #{i}: another TCP connection ({} then {}, local {})",
                a.peer, b.peer, b.local
            ));
        } else if !b.handed_over {
            bad.push(format!("{n} #{i}: the server says it was not handed over"));
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_has_every_suite_of_both_versions_for_both_key_types() {
        let all = Combo::all();
        assert_eq!(all.len(), 12);
        let names: std::collections::BTreeSet<String> =
            all.iter().map(Combo::rustls_suite).collect();
        // TLS 1.3 suites do not name the key type: 3 + 2 × 3.
        assert_eq!(names.len(), 9, "{names:?}");
        let c = Combo {
            version: TlsVersion::V12,
            aead: Aead::Chacha20Poly1305,
            key: KeyKind::Ecdsa,
        };
        assert_eq!(c.openssl_suite(), "ECDHE-ECDSA-CHACHA20-POLY1305");
        assert_eq!(
            c.rustls_suite(),
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        );
    }

    #[test]
    fn s_client_output_yields_whole_responses_only() {
        let out = b"---\nSSL-Session:\n---\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab";
        assert_eq!(find_response(out, 0), None, "the body is not complete yet");
        let mut out = out.to_vec();
        out.extend_from_slice(b"cdHTTP/1.1 503 No\r\ncontent-length: 0\r\n\r\n");
        let (end, status, body) = find_response(&out, 0).unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"abcd"[..]));
        let (end2, status, body) = find_response(&out, end).unwrap();
        assert_eq!((status, body.len(), end2), (503, 0, out.len()));
    }
}

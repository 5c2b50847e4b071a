//! WebSocket clients in other languages as test loads: Python's
//! `websockets` (`apps/ws_clients.py`) and Node's `ws`
//! (`apps/ws_clients.js`), which share one contract: N connections, a
//! message every interval, every answer checked (echo, `seq` going on by
//! one), the pids that answered, the local ports, the close frames the
//! server sent and every error — counted, never retried.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// Which client library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Python `websockets` (from the venv).
    Python,
    /// Node `ws` (from `apps/node_modules`).
    Node,
}

#[derive(Debug, Default)]
struct Seen {
    ready: bool,
    /// Pid → the clients it has answered.
    by_pid: BTreeMap<u32, BTreeSet<u64>>,
    /// Client → answers so far (reported every 5).
    answers: BTreeMap<u64, u64>,
    summary: Option<Value>,
    other: Vec<String>,
}

/// What one client counted.
#[derive(Debug, Clone)]
pub struct ClientReport {
    pub client: u64,
    pub lang: String,
    pub sent: u64,
    pub answers: u64,
    pub seq_errors: u64,
    pub echo_errors: u64,
    /// Close codes the server sent (before the client stopped).
    pub closes: Vec<u64>,
    pub errors: Vec<String>,
    /// The pids that answered, in order.
    pub pids: Vec<u32>,
    /// The local ports the connection had (one: the same TCP connection).
    pub ports: Vec<u64>,
}

/// A running client process.
#[derive(Debug)]
pub struct WsClients {
    lang: Lang,
    n: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    seen: Arc<Mutex<Seen>>,
}

impl WsClients {
    /// `n` clients of `lang` on `url`, one message every `interval`; they
    /// stop by themselves after `max_time`.
    pub fn start(lang: Lang, url: &str, n: usize, interval: Duration, max_time: Duration) -> Self {
        Self::start_tls(lang, url, n, interval, max_time, None)
    }

    /// [`start`](Self::start) for a `wss://` URL, trusting the CA in `ca`
    /// (Python only).
    pub fn start_tls(
        lang: Lang,
        url: &str,
        n: usize,
        interval: Duration,
        max_time: Duration,
        ca: Option<&std::path::Path>,
    ) -> Self {
        let mut cmd = match lang {
            Lang::Python => {
                let mut c = Command::new(crate::apps::venv_tool("python"));
                c.arg(crate::apps::apps_dir().join("ws_clients.py"));
                c
            }
            Lang::Node => {
                let modules = crate::apps::apps_dir().join("node_modules/ws");
                assert!(
                    modules.exists(),
                    "{} is missing: run scripts/setup-test-deps.sh (npm ci in crates/baton-tests/apps)",
                    modules.display()
                );
                let mut c = Command::new(crate::apps::node());
                c.arg(crate::apps::apps_dir().join("ws_clients.js"));
                c
            }
        };
        cmd.arg(url)
            .arg(n.to_string())
            .arg(interval.as_millis().to_string())
            .arg(max_time.as_secs().to_string())
            .args(ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = crate::spawn_owned(&mut cmd).expect("start the WebSocket clients");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let seen2 = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = seen2.lock().unwrap();
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v["event"] == "ready" => s.ready = true,
                    Ok(v) if v["event"] == "pid" => {
                        let pid = v["pid"].as_u64().unwrap_or(0) as u32;
                        let client = v["client"].as_u64().unwrap_or(u64::MAX);
                        s.by_pid.entry(pid).or_default().insert(client);
                    }
                    Ok(v) if v["event"] == "count" => {
                        let client = v["client"].as_u64().unwrap_or(u64::MAX);
                        let n = v["answers"].as_u64().unwrap_or(0);
                        s.answers.insert(client, n);
                    }
                    Ok(v) if v["event"] == "summary" => s.summary = Some(v),
                    _ => s.other.push(line),
                }
            }
        });
        WsClients {
            lang,
            n,
            child,
            stdin,
            seen,
        }
    }

    /// Wait until every client got its first answer.
    pub fn wait_ready(&self, timeout: Duration) {
        let what = format!("{:?} WebSocket clients to connect", self.lang);
        crate::wait_for(timeout, &what, || {
            let s = self.seen.lock().unwrap();
            assert!(
                s.summary.is_none(),
                "{:?} clients ended early: {:?}",
                self.lang,
                s.summary
            );
            s.ready.then_some(())
        });
    }

    /// Wait until `pid` has answered `n` clients.
    pub fn wait_answered_by_count(&self, pid: u32, n: usize, timeout: Duration) {
        let what = format!("pid {pid} to answer {n} {:?} clients", self.lang);
        crate::wait_for(timeout, &what, || {
            let s = self.seen.lock().unwrap();
            (s.by_pid.get(&pid).map_or(0, BTreeSet::len) >= n).then_some(())
        });
    }

    /// Wait until `pid` has answered every client.
    pub fn wait_all_answered_by(&self, pid: u32, timeout: Duration) {
        let what = format!("pid {pid} to answer every {:?} client", self.lang);
        crate::wait_for(timeout, &what, || {
            let s = self.seen.lock().unwrap();
            (s.by_pid.get(&pid).map_or(0, BTreeSet::len) == self.n).then_some(())
        });
    }

    /// Answers each client has reported so far (every 5th).
    pub fn answers(&self) -> BTreeMap<u64, u64> {
        self.seen.lock().unwrap().answers.clone()
    }

    /// Wait until every client has at least `more` answers beyond `since`
    /// (from [`answers`](Self::answers)).
    pub fn wait_more_answers(&self, since: &BTreeMap<u64, u64>, more: u64, timeout: Duration) {
        let what = format!("every {:?} client to get {more} more answers", self.lang);
        crate::wait_for(timeout, &what, || {
            let s = self.seen.lock().unwrap();
            (0..self.n as u64)
                .all(|c| {
                    s.answers.get(&c).copied().unwrap_or(0)
                        >= since.get(&c).copied().unwrap_or(0) + more
                })
                .then_some(())
        });
    }

    /// Wait until the clients ended by themselves (every connection closed),
    /// and return what they counted.
    pub fn wait_ended(mut self, timeout: Duration) -> Vec<ClientReport> {
        self.collect(timeout)
    }

    /// Stop the clients (close stdin: each finishes its exchange and closes
    /// normally) and return what they counted.
    pub fn finish(mut self, timeout: Duration) -> Vec<ClientReport> {
        drop(self.stdin.take());
        self.collect(timeout)
    }

    fn collect(&mut self, timeout: Duration) -> Vec<ClientReport> {
        let what = format!("the {:?} WebSocket clients' summary", self.lang);
        let v = crate::wait_for(timeout, &what, || self.seen.lock().unwrap().summary.clone());
        // The Python client's stdin reader thread holds its exit until stdin
        // closes.
        drop(self.stdin.take());
        let exited = crate::wait_owned(&mut self.child, Duration::from_secs(10));
        assert!(
            exited.is_some(),
            "the {:?} clients did not exit after their summary",
            self.lang
        );
        let other = self.seen.lock().unwrap().other.clone();
        assert!(other.is_empty(), "unexpected client output: {other:?}");
        let u = |c: &Value, k: &str| c[k].as_u64().unwrap_or(u64::MAX);
        v["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .map(|c| ClientReport {
                client: u(c, "client"),
                lang: c["lang"].as_str().unwrap_or_default().to_owned(),
                sent: u(c, "sent"),
                answers: u(c, "answers"),
                seq_errors: u(c, "seq_errors"),
                echo_errors: u(c, "echo_errors"),
                closes: c["closes"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default(),
                errors: c["errors"]
                    .as_array()
                    .map(|a| a.iter().map(|e| e.to_string()).collect())
                    .unwrap_or_default(),
                pids: c["pids"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_u64)
                            .map(|p| p as u32)
                            .collect()
                    })
                    .unwrap_or_default(),
                ports: c["ports"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

impl Drop for WsClients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket client by hand, for tests that need to put exact bytes on
/// the wire (half a frame, a fragmented message): handshake, masked
/// frames out, the server's frames in.
#[derive(Debug)]
pub struct RawWs {
    pub stream: std::net::TcpStream,
}

impl RawWs {
    /// Connect and upgrade on `GET /ws`.
    pub fn connect(addr: std::net::SocketAddr) -> std::io::Result<RawWs> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )?;
        // Read the head byte by byte: nothing of the first frame is taken.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            stream.read_exact(&mut b)?;
            head.push(b[0]);
            if head.len() > 4096 {
                return Err(std::io::Error::other("handshake answer too long"));
            }
        }
        let text = String::from_utf8_lossy(&head);
        if !text.starts_with("HTTP/1.1 101")
            || !text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            || text
                .to_ascii_lowercase()
                .contains("sec-websocket-extensions")
        {
            return Err(std::io::Error::other(format!(
                "bad handshake answer: {text}"
            )));
        }
        Ok(RawWs { stream })
    }

    /// One client frame (masked): `fin`, `opcode`, `payload`.
    pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Write raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Read one server frame: `(opcode, payload)`.
    pub fn read_frame(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        use std::io::Read;
        let mut h = [0u8; 2];
        self.stream.read_exact(&mut h)?;
        let mut n = u64::from(h[1] & 0x7f);
        if n == 126 {
            let mut b = [0u8; 2];
            self.stream.read_exact(&mut b)?;
            n = u64::from(u16::from_be_bytes(b));
        } else if n == 127 {
            let mut b = [0u8; 8];
            self.stream.read_exact(&mut b)?;
            n = u64::from_be_bytes(b);
        }
        let mut p = vec![0u8; n as usize];
        self.stream.read_exact(&mut p)?;
        Ok((h[0] & 0x0f, p))
    }

    /// Read the answer to a text message: the demo's JSON.
    pub fn read_json(&mut self) -> std::io::Result<Value> {
        let (op, p) = self.read_frame()?;
        if op != 1 {
            return Err(std::io::Error::other(format!("opcode {op}: {p:?}")));
        }
        serde_json::from_slice(&p).map_err(std::io::Error::other)
    }
}

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

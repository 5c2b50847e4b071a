//! The third-party keep-alive clients of issue 17 (Java Apache HttpClient
//! 4.5 without retries, Node's `http.Agent`, Python `requests`), as the
//! benchmark runs them (`scripts/bench/clients/`): each counts every
//! request, ok or error, and prints `progress OK ERRORS` lines.
//! (Shared by `tests/front.rs` and `tests/front_self.rs`.)

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{TestDir, apps, spawn_owned, wait_owned};

/// Bound of each wait.
const T: Duration = Duration::from_secs(30);
/// Workers per client (3 clients × 2 methods run at once on 2 cores).
const WORKERS: &str = "4";
/// Longest idle gap between two requests of a worker, ms.
const MAX_GAP_MS: &str = "40";
/// The clients' own deadline, s (they are told to stop long before).
const CLIENT_DEADLINE_S: &str = "240";

/// A keep-alive client.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Apache HttpClient 4.5, no retries.
    Java,
    /// Node's `http.Agent`.
    Node,
    /// Python `requests`.
    Python,
}

/// The three clients.
pub const KINDS: [Kind; 3] = [Kind::Java, Kind::Node, Kind::Python];

/// `scripts/bench/clients/`.
pub fn clients_dir() -> PathBuf {
    apps::workspace_root().join("scripts/bench/clients")
}

const JAVA_JARS: [&str; 4] = [
    "/usr/share/java/httpclient.jar",
    "/usr/share/java/httpcore.jar",
    "/usr/share/java/commons-logging.jar",
    "/usr/share/java/commons-codec.jar",
];

/// `HttpClientBench.java` compiled into `dir`; returns the class path.
pub fn compile_java(dir: &Path) -> String {
    for j in JAVA_JARS {
        assert!(
            Path::new(j).exists(),
            "{j} is missing: apt-get install libhttpclient-java (the Java keep-alive client)"
        );
    }
    let out = dir.join("java");
    let cp = format!("{}:{}", out.display(), JAVA_JARS.join(":"));
    let o = crate::output(
        Command::new(apps::in_path("javac", "install default-jdk-headless"))
            .args(["-nowarn", "-cp", &cp, "-d"])
            .arg(&out)
            .arg(clients_dir().join("HttpClientBench.java")),
    )
    .expect("running javac");
    assert!(o.status.success(), "javac failed: {o:?}");
    cp
}

/// A running keep-alive client.
pub struct Client {
    label: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

/// What a client counted.
#[derive(Debug)]
pub struct Counts {
    pub label: String,
    pub ok: u64,
    pub errors: u64,
    pub kinds: serde_json::Value,
    pub samples: serde_json::Value,
}

impl Client {
    /// Start `kind` with `method` against `url`, its output in `dir`.
    pub fn start(kind: Kind, method: &str, url: &str, dir: &TestDir, java_cp: &str) -> Client {
        let mut cmd = match kind {
            Kind::Java => {
                let mut c = Command::new("java");
                c.args([
                    "-Dorg.apache.commons.logging.Log=org.apache.commons.logging.impl.NoOpLog",
                    "-cp",
                    java_cp,
                    "HttpClientBench",
                ]);
                c
            }
            Kind::Node => {
                let mut c = Command::new(apps::node());
                c.arg(clients_dir().join("node_client.js"));
                c
            }
            Kind::Python => {
                let mut c = Command::new(apps::venv_tool("python"));
                c.arg(clients_dir().join("python_client.py"));
                c
            }
        };
        let label = format!("{kind:?} {method}");
        let out = dir.join(&format!("client-{kind:?}-{method}.out"));
        let err = dir.join(&format!("client-{kind:?}-{method}.err"));
        cmd.args([url, WORKERS, MAX_GAP_MS, CLIENT_DEADLINE_S])
            .env("CLIENT_METHOD", method)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let child = spawn_owned(&mut cmd).expect("starting a client");
        Client {
            label,
            child,
            out,
            err,
        }
    }

    /// The client's last `progress OK ERRORS` line.
    pub fn progress(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(&self.err).unwrap_or_default();
        text.lines()
            .rev()
            .find_map(|l| {
                let mut w = l.strip_prefix("progress ")?.split_whitespace();
                Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .unwrap_or((0, 0))
    }

    /// Stop it and read what it counted.
    pub fn finish(mut self) -> Counts {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let st = wait_owned(&mut self.child, T).expect("the client stops within 30 s");
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| {
                panic!(
                    "{}: no result line ({st}); stderr: {}",
                    self.label,
                    std::fs::read_to_string(&self.err).unwrap_or_default()
                )
            });
        let j: serde_json::Value = serde_json::from_str(line).unwrap();
        Counts {
            label: self.label,
            ok: j["ok"].as_u64().unwrap(),
            errors: j["errors"].as_u64().unwrap(),
            kinds: j["kinds"].clone(),
            samples: j["samples"].clone(),
        }
    }
}

/// Several clients at once, and the waits the tests make on them.
pub struct Clients(Vec<Client>);

impl Clients {
    /// Every kind with each of `methods` against `url`.
    pub fn start(methods: &[&str], url: &str, dir: &TestDir, java_cp: &str) -> Clients {
        Clients(
            methods
                .iter()
                .flat_map(|m| KINDS.map(|k| (k, *m)))
                .map(|(k, m)| Client::start(k, m, url, dir, java_cp))
                .collect(),
        )
    }

    /// Each client's (ok, errors) so far.
    pub fn progress(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(Client::progress).collect()
    }

    /// Wait (bounded) until every client completed `n` requests (ok or
    /// not) beyond `base`, one entry per client.
    pub fn wait_beyond(&self, base: &[(u64, u64)], n: u64, what: &str) {
        crate::wait_for(T, what, || {
            self.0
                .iter()
                .zip(base)
                .all(|(c, b)| {
                    let (ok, errors) = c.progress();
                    ok + errors >= b.0 + b.1 + n
                })
                .then_some(())
        });
    }

    /// Wait until every client completed `n` requests in all.
    pub fn wait_total(&self, n: u64, what: &str) {
        self.wait_beyond(&vec![(0, 0); self.0.len()], n, what);
    }

    /// Wait until every client completed `n` more requests than now.
    pub fn wait_more(&self, n: u64, what: &str) {
        self.wait_beyond(&self.progress(), n, what);
    }

    /// Stop them all and read what each counted.
    pub fn finish(self) -> Vec<Counts> {
        self.0.into_iter().map(Client::finish).collect()
    }
}

//! TLS test helpers: a throwaway CA made with the `openssl` CLI, a server
//! with an HTTPS listener next to its plain one, the Python `ssl` client
//! (`tls_client.py`: load, session and idle modes) and a curl load. Every
//! wait has a timeout; a missing tool fails the test with a clear message.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Server, ServerOpts, TestDir, free_port, wait_for_opt};

/// The Python client, written into each test's directory.
pub const CLIENT_PY: &str = include_str!("tls_client.py");

/// How long a client process may take to answer one command or to finish
/// after being told to stop.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The path of `tool` on `PATH`, or a panic that says what to install.
pub fn require(tool: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("`{tool}` is required for the TLS tests and is not on PATH: install {package}")
        })
}

/// Run a command to completion, killing it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = crate::spawn_owned(cmd).unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let status = match wait_for_opt(timeout, || child.try_wait().ok().flatten()) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    };
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

/// A throwaway certificate authority in a test directory.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    ca_key: PathBuf,
}

/// A server certificate and its key.
#[derive(Debug, Clone)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// As Python's `getpeercert()` shows it (upper-case hex).
    pub serial: String,
    pub cn: String,
}

fn openssl(dir: &Path, args: &[&str]) {
    let bin = require("openssl", "the openssl package");
    let out = run_with_timeout(
        Command::new(bin).args(args).current_dir(dir),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA (EC P-256) in `dir`.
    pub fn new(dir: &Path) -> Pki {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=baton test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        std::fs::write(
            dir.join("server-ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        Pki {
            dir: dir.to_owned(),
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
        }
    }

    /// A server certificate for `localhost` / 127.0.0.1 with this serial,
    /// subject `CN=baton-tls-<name>`, in `<name>.pem` / `<name>.key`.
    pub fn issue(&self, name: &str, serial: u32) -> Cert {
        self.issue_key(name, serial, crate::tls_matrix::KeyKind::Ecdsa)
    }

    /// [`Pki::issue`] with an RSA or an ECDSA key.
    pub fn issue_key(&self, name: &str, serial: u32, kind: crate::tls_matrix::KeyKind) -> Cert {
        let cn = format!("baton-tls-{name}");
        let (pem, key, csr) = (
            format!("{name}.pem"),
            format!("{name}.key"),
            format!("{name}.csr"),
        );
        openssl(
            &self.dir,
            &[
                &["req", "-new"][..],
                kind.newkey_args(),
                &[
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            ]
            .concat(),
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &self.ca.to_string_lossy(),
                "-CAkey",
                &self.ca_key.to_string_lossy(),
                "-set_serial",
                &serial.to_string(),
                "-days",
                "2",
                "-extfile",
                "server-ext.cnf",
                "-out",
                &pem,
            ],
        );
        Cert {
            cert: self.dir.join(pem),
            key: self.dir.join(key),
            serial: format!("{serial:X}"),
            cn,
        }
    }
}

/// Put a file in place atomically (like a deploy or certbot would).
pub fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A fixture server with a plain listener (`http`, used by [`Server`]'s
/// helpers) and an HTTPS one (`https`), serving the certificate installed
/// at `cert_path` / `key_path`.
#[derive(Debug)]
pub struct TlsServer {
    pub server: Server,
    pub tls_port: u16,
    pub pki: Arc<Pki>,
    /// The certificate the server was started with.
    pub first: Cert,
    /// Where the server reads its certificate chain and key.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    _pki_dir: Arc<TestDir>,
}

impl TlsServer {
    /// A new CA and certificate (serial 0x1001, `CN=baton-tls-a`), and the
    /// server with `extra` arguments.
    pub fn start(binary: &Path, name: &str, extra: &[&str]) -> TlsServer {
        Self::start_with_key(binary, name, extra, crate::tls_matrix::KeyKind::Ecdsa)
    }

    /// [`TlsServer::start`] with an RSA or an ECDSA certificate.
    pub fn start_with_key(
        binary: &Path,
        name: &str,
        extra: &[&str],
        kind: crate::tls_matrix::KeyKind,
    ) -> TlsServer {
        crate::init();
        let dir = Arc::new(TestDir::new(&format!("{name}-pki")));
        let pki = Arc::new(Pki::new(&dir.path));
        let first = pki.issue_key("a", 0x1001, kind);
        Self::start_inner(binary, name, extra, dir, pki, first)
    }

    /// Another server with the same CA and certificate as `other` (its own
    /// process, port and ticket keys).
    pub fn start_like(other: &TlsServer, binary: &Path, name: &str) -> TlsServer {
        Self::start_inner(
            binary,
            name,
            &[],
            Arc::clone(&other._pki_dir),
            Arc::clone(&other.pki),
            other.first.clone(),
        )
    }

    fn start_inner(
        binary: &Path,
        name: &str,
        extra: &[&str],
        dir: Arc<TestDir>,
        pki: Arc<Pki>,
        first: Cert,
    ) -> TlsServer {
        let live = dir.join(&format!("live-{name}"));
        std::fs::create_dir_all(&live).unwrap();
        let cert_path = live.join("cert.pem");
        let key_path = live.join("key.pem");
        install(&first.cert, &cert_path);
        install(&first.key, &key_path);
        let tls_port = free_port();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("https=127.0.0.1:{tls_port}"),
            "--tls-listener".into(),
            "https".into(),
            "--tls-cert".into(),
            cert_path.to_string_lossy().into_owned(),
            "--tls-key".into(),
            key_path.to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = Server::start_with(
            binary,
            name,
            ServerOpts {
                args,
                ..ServerOpts::default()
            },
        );
        TlsServer {
            server,
            tls_port,
            pki,
            first,
            cert_path,
            key_path,
            _pki_dir: dir,
        }
    }

    fn client_script(&self) -> PathBuf {
        let p = self.server.dir.join("tls_client.py");
        if !p.exists() {
            std::fs::write(&p, CLIENT_PY).unwrap();
        }
        p
    }

    fn python(&self, mode: &str, extra: &[String]) -> Command {
        let py = require("python3", "python3 (3.11 or later)");
        let mut cmd = Command::new(py);
        cmd.arg(self.client_script())
            .arg(mode)
            .arg("--port")
            .arg(self.tls_port.to_string())
            .arg("--ca")
            .arg(&self.pki.ca)
            .args(extra)
            .current_dir(&self.server.dir.path);
        cmd
    }
}

/// Lines of a child's stdout, read in a thread.
fn line_reader(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Counts from a Python load run.
#[derive(Debug, Clone, Default)]
pub struct PyStats {
    pub ok: u64,
    pub failed: u64,
    pub wrong: u64,
    /// Streams the server did not process (safe to retry; not failures by
    /// the protocol, but counted).
    pub refused: u64,
    /// Connections the server ended after a complete response.
    pub server_closes: u64,
    /// Kept-alive connections found closed by the server before reuse
    /// (the client was silent for longer than the server's quiet period).
    pub idle_closes: u64,
    /// How those connections ended (`clean` = close_notify).
    pub close_endings: BTreeMap<String, u64>,
    pub reconnects: u64,
    pub reconnects_resumed: u64,
    /// Responses that said the connection was handed over (must be 0: TLS
    /// connections never move).
    pub handed_over: u64,
    pub errors: Vec<String>,
    pub pids: BTreeSet<u64>,
    pub generations: BTreeSet<u64>,
}

impl PyStats {
    fn parse(v: &Value) -> PyStats {
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
        let set = |k: &str| {
            v[k].as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_u64)
                .collect()
        };
        PyStats {
            ok: n("ok"),
            failed: n("failed"),
            wrong: n("wrong"),
            refused: n("refused"),
            server_closes: n("server_closes"),
            idle_closes: n("idle_closes"),
            close_endings: v["close_endings"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, c)| (k.clone(), c.as_u64().unwrap()))
                .collect(),
            reconnects: n("reconnects"),
            reconnects_resumed: n("reconnects_resumed"),
            handed_over: n("handed_over"),
            errors: v["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap_or_default().to_owned())
                .collect(),
            pids: set("pids"),
            generations: set("generations"),
        }
    }
}

/// A running Python `ssl` load (`tls_client.py load`).
#[derive(Debug)]
pub struct PyLoad {
    child: Child,
    progress: Arc<AtomicU64>,
    last: Arc<Mutex<Option<Value>>>,
    stop_file: PathBuf,
    proto: String,
}

impl PyLoad {
    /// `conns` connections speaking `proto` (`h1` or `h2`), for at most
    /// `max_time`.
    pub fn start(s: &TlsServer, proto: &str, conns: usize, max_time: Duration) -> PyLoad {
        let stop_file = s.server.dir.join(&format!("stop-{proto}"));
        let _ = std::fs::remove_file(&stop_file);
        let mut cmd = s.python(
            "load",
            &[
                "--proto".into(),
                proto.into(),
                "--conns".into(),
                conns.to_string(),
                "--seconds".into(),
                max_time.as_secs_f64().to_string(),
                "--stop-file".into(),
                stop_file.to_string_lossy().into_owned(),
            ],
        );
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = crate::spawn_owned(&mut cmd).unwrap();
        let rx = line_reader(&mut child);
        let progress = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(None));
        let (p2, l2) = (Arc::clone(&progress), Arc::clone(&last));
        std::thread::spawn(move || {
            while let Ok(line) = rx.recv() {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("tls_client: {line}");
                    continue;
                };
                if let Some(n) = v["progress"].as_u64() {
                    p2.store(n, Ordering::SeqCst);
                } else if v.get("final").is_some() {
                    *l2.lock().unwrap() = Some(v["final"].clone());
                }
            }
        });
        PyLoad {
            child,
            progress,
            last,
            stop_file,
            proto: proto.into(),
        }
    }

    /// Requests finished so far.
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    /// Stop, and return the counts.
    pub fn stop(mut self) -> PyStats {
        std::fs::write(&self.stop_file, b"stop").unwrap();
        let exited = wait_for_opt(CLIENT_TIMEOUT, || self.child.try_wait().ok().flatten());
        if exited.is_none() {
            kill(&mut self.child);
            panic!(
                "the Python {} load did not stop within {CLIENT_TIMEOUT:?}",
                self.proto
            );
        }
        let last = wait_for_opt(Duration::from_secs(5), || self.last.lock().unwrap().clone())
            .unwrap_or_else(|| panic!("the Python {} load printed no final counts", self.proto));
        PyStats::parse(&last)
    }
}

impl Drop for PyLoad {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill(&mut self.child);
        }
    }
}

/// A Python `ssl` client driven line by line (`tls_client.py session`).
#[derive(Debug)]
pub struct PySession {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl PySession {
    pub fn start(s: &TlsServer) -> PySession {
        let mut cmd = s.python("session", &[]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = crate::spawn_owned(&mut cmd).unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = line_reader(&mut child);
        PySession {
            child,
            stdin,
            lines,
        }
    }

    /// Send one command, return its JSON answer.
    pub fn cmd(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let answer = self
            .lines
            .recv_timeout(CLIENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("no answer to {line:?} within {CLIENT_TIMEOUT:?}: {e}"));
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["ok"], Value::Bool(true), "{line}: {v}");
        v
    }

    /// `fresh NAME` (optionally TLS 1.2): a full handshake.
    pub fn fresh(&mut self, name: &str, tls12: bool) -> Value {
        self.cmd(&format!(
            "fresh {name}{}",
            if tls12 { " tls12" } else { "" }
        ))
    }

    /// `resume NAME`: offer the saved session.
    pub fn resume(&mut self, name: &str) -> Value {
        self.cmd(&format!("resume {name}"))
    }
}

impl Drop for PySession {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        if wait_for_opt(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            kill(&mut self.child);
        }
    }
}

/// Idle HTTP/1.1 TLS connections watched until the server closes them
/// (`tls_client.py idle`).
#[derive(Debug)]
pub struct PyIdle {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The pid that answered each connection's one request.
    pub pids: Vec<u64>,
}

impl PyIdle {
    /// Open `conns` connections; returns once each has had its answer.
    pub fn start(s: &TlsServer, conns: usize, max_time: Duration) -> PyIdle {
        let mut cmd = s.python(
            "idle",
            &[
                "--conns".into(),
                conns.to_string(),
                "--seconds".into(),
                max_time.as_secs_f64().to_string(),
            ],
        );
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = crate::spawn_owned(&mut cmd).unwrap();
        let lines = line_reader(&mut child);
        let ready = lines
            .recv_timeout(CLIENT_TIMEOUT)
            .expect("the idle client opened its connections");
        let v: Value = serde_json::from_str(&ready).unwrap();
        let pids = v["ready"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        PyIdle { child, lines, pids }
    }

    /// Wait for the report: `{"closes": [{time, ending, serving_pid}], "still_open": n}`.
    pub fn finish(mut self, timeout: Duration) -> Value {
        let line = self
            .lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("the idle client did not report within {timeout:?}: {e}"));
        let _ = wait_for_opt(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        });
        kill(&mut self.child);
        serde_json::from_str(&line).unwrap()
    }
}

/// Counts from a curl load.
#[derive(Debug, Clone, Default)]
pub struct CurlStats {
    pub ok: u64,
    pub failed: u64,
    /// curl runs (each several requests, reusing its connection).
    pub runs: u64,
    /// TCP connections curl opened.
    pub connects: u64,
    /// curl's own silent retry of a request on a connection that died
    /// ("retrying a fresh connect"); must stay 0.
    pub retried: u64,
    pub errors: Vec<String>,
    pub pids: BTreeSet<u64>,
    pub generations: BTreeSet<u64>,
}

/// A running curl load over HTTPS: each worker runs curl again and again,
/// each run fetching `GET /version` `per_run` times on one connection.
#[derive(Debug)]
pub struct CurlLoad {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    stats: Arc<Mutex<CurlStats>>,
    threads: Vec<JoinHandle<()>>,
}

/// Longest one curl request may take (`--max-time`).
const CURL_MAX_TIME_S: u64 = 10;

impl CurlLoad {
    pub fn start(
        s: &TlsServer,
        http2: bool,
        workers: usize,
        per_run: usize,
        max_time: Duration,
    ) -> CurlLoad {
        let curl = require("curl", "the curl package");
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(Mutex::new(CurlStats::default()));
        let deadline = Instant::now() + max_time;
        let url = format!("https://localhost:{}/version", s.tls_port);
        let resolve = format!("localhost:{}:127.0.0.1", s.tls_port);
        let ca = s.pki.ca.clone();
        let threads = (0..workers)
            .map(|_| {
                let (stop, done, stats) = (stop.clone(), done.clone(), stats.clone());
                let (curl, url, resolve, ca) =
                    (curl.clone(), url.clone(), resolve.clone(), ca.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let mut cmd = Command::new(&curl);
                        cmd.args(["-sS", "-v", "--connect-timeout", "5", "--max-time"])
                            .arg(CURL_MAX_TIME_S.to_string())
                            .arg(if http2 { "--http2" } else { "--http1.1" })
                            .arg("--cacert")
                            .arg(&ca)
                            .arg("--resolve")
                            .arg(&resolve)
                            .arg("-w")
                            .arg("\nBATON %{http_code} %{http_version} %{exitcode}\n");
                        for _ in 0..per_run {
                            cmd.arg(&url);
                        }
                        let out = run_with_timeout(
                            &mut cmd,
                            Duration::from_secs(CURL_MAX_TIME_S * per_run as u64 + 30),
                        );
                        let mut st = stats.lock().unwrap();
                        st.runs += 1;
                        let n = tally(&mut st, &out, http2, per_run);
                        done.fetch_add(n, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        CurlLoad {
            stop,
            done,
            stats,
            threads,
        }
    }

    /// Requests finished so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn stop(self) -> CurlStats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.stats.lock().unwrap().clone()
    }
}

/// Count one curl run's transfers; returns how many it reported.
fn tally(st: &mut CurlStats, out: &Output, http2: bool, per_run: usize) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    st.retried += stderr.matches("retrying a fresh connect").count() as u64;
    st.connects += stderr
        .lines()
        .filter(|l| l.starts_with("* Connected to "))
        .count() as u64;
    let want_version = if http2 { "2" } else { "1.1" };
    let mut body = "";
    let mut seen = 0;
    for line in stdout.lines() {
        let Some(w) = line.strip_prefix("BATON ") else {
            if !line.is_empty() {
                body = line;
            }
            continue;
        };
        seen += 1;
        let f: Vec<&str> = w.split(' ').collect();
        let json: Option<Value> = serde_json::from_str(body).ok();
        body = "";
        let good = f.len() == 3
            && f[0] == "200"
            && f[1] == want_version
            && f[2] == "0"
            && json.as_ref().is_some_and(|v| v["tls"] == Value::Bool(true));
        if good {
            st.ok += 1;
            if let Some(v) = json {
                st.pids.extend(v["pid"].as_u64());
                st.generations.extend(v["generation"].as_u64());
            }
        } else {
            st.failed += 1;
            if st.errors.len() < 20 {
                let curl_err: Vec<&str> =
                    stderr.lines().filter(|l| l.starts_with("curl:")).collect();
                st.errors.push(format!("{w} {curl_err:?}"));
            }
        }
    }
    if seen < per_run {
        // curl died without reporting every transfer.
        st.failed += (per_run - seen) as u64;
        if st.errors.len() < 20 {
            st.errors.push(format!(
                "curl reported {seen} of {per_run} transfers ({}): {}",
                out.status,
                stderr.lines().last().unwrap_or_default()
            ));
        }
    }
    per_run as u64
}

/// HTTP/1.1 keep-alive TLS connections held open by the Python client
/// (`tls_client.py hold`), used on demand.
#[derive(Debug)]
pub struct PyHold {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// Per connection: the pid that answered its first request, its TLS
    /// version and cipher.
    pub ready: Vec<Value>,
}

impl PyHold {
    /// Open `conns` connections (TLS 1.2 only if `tls12`); returns once each
    /// has had its first answer.
    pub fn start(s: &TlsServer, conns: usize, tls12: bool) -> PyHold {
        Self::start_with(s, conns, tls12, None)
    }

    /// [`start`](Self::start) with a TLS 1.2 cipher suite (OpenSSL name).
    pub fn start_with(s: &TlsServer, conns: usize, tls12: bool, cipher: Option<&str>) -> PyHold {
        let mut extra = vec!["--conns".to_string(), conns.to_string()];
        if tls12 {
            extra.push("--tls12".into());
        }
        if let Some(c) = cipher {
            extra.push("--cipher".into());
            extra.push(c.into());
        }
        let mut cmd = s.python("hold", &extra);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = crate::spawn_owned(&mut cmd).unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = line_reader(&mut child);
        let first = lines
            .recv_timeout(CLIENT_TIMEOUT)
            .expect("the hold client opened its connections");
        let v: Value = serde_json::from_str(&first).unwrap();
        let ready = v["ready"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .clone();
        PyHold {
            child,
            stdin,
            lines,
            ready,
        }
    }

    /// Send one command, return its JSON answer.
    pub fn cmd(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let answer = self
            .lines
            .recv_timeout(CLIENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("no answer to {line:?} within {CLIENT_TIMEOUT:?}: {e}"));
        serde_json::from_str(&answer).unwrap()
    }

    /// One request on each connection: the per-connection results.
    pub fn get_all(&mut self, path: &str) -> Vec<Value> {
        self.cmd(&format!("get {path}"))["results"]
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for PyHold {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        if wait_for_opt(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            kill(&mut self.child);
        }
    }
}

//! Node's `http2` module as an HTTP/2 load client (`apps/h2_client.js`):
//! real sessions that follow RFC 9113 on GOAWAY (no new stream, a new
//! session), with streams counted as ok, refused (by the server: an
//! RST_STREAM(REFUSED_STREAM) or an id above a GOAWAY's last stream id),
//! retry (never sent: the session was already closing) or failed.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

/// A running Node HTTP/2 load.
#[derive(Debug)]
pub struct NodeH2 {
    child: Child,
    stdin: Option<ChildStdin>,
    ok: Arc<AtomicU64>,
}

/// What the Node client counted.
#[derive(Debug, Clone)]
pub struct NodeH2Stats {
    pub ok: u64,
    pub refused: u64,
    pub retry: u64,
    pub failed: u64,
    pub sessions: u64,
    pub goaways: u64,
    /// Every GOAWAY frame the client saw: `{slot, code, lastStreamID, at}`.
    pub goaway_frames: Vec<Value>,
    /// Pids that answered, with their counts.
    pub pids: Vec<u32>,
    pub errors: Vec<String>,
}

impl NodeH2 {
    /// `conns` sessions with `streams` concurrent streams each, `GET path`,
    /// to `url` (`http://` for h2c prior knowledge, `https://` with `ca`).
    /// Stops by itself after `max_time`.
    pub fn start(
        url: &str,
        conns: usize,
        streams: usize,
        path: &str,
        ca: Option<&Path>,
        max_time: Duration,
    ) -> NodeH2 {
        let node = crate::tls::require("node", "nodejs");
        let mut cmd = Command::new(node);
        cmd.arg(crate::apps::apps_dir().join("h2_client.js"))
            .arg(url)
            .arg(conns.to_string())
            .arg(streams.to_string())
            .arg(path)
            .arg(max_time.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ca) = ca {
            cmd.arg(format!("--ca={}", ca.display()));
        }
        let mut child = crate::spawn_owned(&mut cmd).expect("start node h2_client.js");
        let stdin = child.stdin.take();
        let ok = Arc::new(AtomicU64::new(0));
        let stderr = child.stderr.take().expect("piped stderr");
        let ok2 = Arc::clone(&ok);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match line.strip_prefix("progress ") {
                    Some(n) => ok2.store(n.trim().parse().unwrap_or(0), Ordering::Relaxed),
                    None => eprintln!("h2_client.js: {line}"),
                }
            }
        });
        NodeH2 { child, stdin, ok }
    }

    /// Streams answered 200 so far (updated a few times a second).
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Wait (at most `timeout`) until `n` more streams have been answered.
    pub fn wait_progress(&self, n: u64, timeout: Duration) {
        let start = self.ok();
        crate::wait_for(timeout, "HTTP/2 load progress", || {
            (self.ok() >= start + n).then_some(())
        });
    }

    /// Stop, let streams in flight finish, and return the totals.
    pub fn stop(mut self) -> NodeH2Stats {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let mut out = String::new();
        if let Some(stdout) = self.child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut out);
        }
        let status = crate::wait_owned(&mut self.child, Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "h2_client.js exited with {status:?}; stdout {out:?}"
        );
        let v: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("h2_client.js printed {out:?}: {e}"));
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
        NodeH2Stats {
            ok: n("ok"),
            refused: n("refused"),
            retry: n("retry"),
            failed: n("failed"),
            sessions: n("sessions"),
            goaways: n("goaways"),
            goaway_frames: v["goaway_frames"].as_array().cloned().unwrap_or_default(),
            pids: v["pids"]
                .as_object()
                .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
                .unwrap_or_default(),
            errors: v["errors"]
                .as_array()
                .map(|a| a.iter().map(|e| e.to_string()).collect())
                .unwrap_or_default(),
        }
    }
}

impl Drop for NodeH2 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `http://ADDR` for h2c prior knowledge.
pub fn h2c_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

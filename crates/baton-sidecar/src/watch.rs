//! The watch loop: poll the marker; when it names another release,
//! deliver → verify → flip `current` → upgrade → report, or undo the flip
//! and report why. The loop is the only writer of the status file.
//!
//! Polling, not inotify: the kubelet replaces a ConfigMap or downward-API
//! volume by swapping a `..data` symlink in the volume's directory, which
//! a watch on the file itself does not see; reading a small file every
//! couple of seconds always does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton::control::FailureKind;

use crate::deliver::{self, DeliverError};
use crate::marker::{self, Release};
use crate::status::{Serving, State, Status};
use crate::upgrade::{self, Outcome};

/// Default time between two reads of the marker.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// Default time before a `retrying` release is tried again.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Default bound on one upgrade (as `baton upgrade --timeout`).
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the loop works on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The release marker (a ConfigMap key or a downward-API file).
    pub marker: PathBuf,
    /// The shared app directory: `releases/` and `current`.
    pub app: PathBuf,
    /// The executable's file name inside a release directory.
    pub binary: String,
    /// The server's control socket.
    pub control: PathBuf,
    /// The status file.
    pub status: PathBuf,
    /// Time between two reads of the marker.
    pub poll: Duration,
    /// Time before a `retrying` release is tried again.
    pub retry_after: Duration,
    /// Bound on one upgrade.
    pub upgrade_timeout: Duration,
}

/// The loop's state: the status it reports and what it last acted on.
#[derive(Debug)]
pub struct Watcher {
    cfg: Config,
    status: Status,
    /// The marker text last acted on (or why it could not be read).
    last: Option<Result<String, String>>,
    retry_at: Option<Instant>,
}

impl Watcher {
    /// A watcher that resumes from the status file if there is one: after
    /// a restart of the sidecar container, what it delivered still serves,
    /// and a marker it already acted on (upgraded, refused, rolled back) is
    /// not acted on again — a rolled-back release is not retried because
    /// the sidecar restarted; only a marker that changed, or a `retrying`
    /// state, leads to a new attempt.
    pub fn new(cfg: Config) -> Watcher {
        let (status, last) = match Status::read(&cfg.status) {
            Ok(st) => {
                eprintln!(
                    "baton-sidecar: resuming: {:?} for {}: {}",
                    st.state,
                    st.release.as_deref().unwrap_or("(no release)"),
                    st.message
                );
                let done = !matches!(st.state, State::Retrying | State::Starting);
                let last = st.marker.clone().filter(|_| done).map(Ok);
                (st, last)
            }
            Err(_) => (Status::default(), None),
        };
        Watcher {
            cfg,
            status,
            last,
            retry_at: Some(Instant::now()),
        }
    }

    /// Run forever.
    ///
    /// # Errors
    /// The status file cannot be written at start (a misconfigured volume).
    pub fn run(mut self) -> std::io::Result<()> {
        self.status.write(&self.cfg.status).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot write the status file {}: {e}",
                    self.cfg.status.display()
                ),
            )
        })?;
        loop {
            self.tick();
            std::thread::sleep(self.cfg.poll);
        }
    }

    /// One poll: act on a changed marker or a due retry, then write the
    /// status (the heartbeat).
    pub fn tick(&mut self) {
        let text = std::fs::read_to_string(&self.cfg.marker)
            .map_err(|e| format!("cannot read the marker {}: {e}", self.cfg.marker.display()));
        let changed = self.last.as_ref() != Some(&text);
        let due = self.status.state == State::Retrying
            && self.retry_at.is_some_and(|t| Instant::now() >= t);
        if changed || due {
            match &text {
                Ok(t) => self.apply(t),
                Err(e) => self.report(State::Invalid, None, e.clone()),
            }
            self.status.marker = text.as_ref().ok().cloned();
            self.last = Some(text);
        }
        if let Err(e) = self.status.write(&self.cfg.status) {
            eprintln!(
                "baton-sidecar: cannot write the status file {}: {e}",
                self.cfg.status.display()
            );
        }
    }

    fn report(&mut self, state: State, release: Option<&str>, message: String) {
        eprintln!(
            "baton-sidecar: {}: {state:?}: {message}",
            release.unwrap_or("(no release)")
        );
        let attempts =
            if self.status.release.as_deref() == release && self.status.state == State::Retrying {
                self.status.attempts + 1
            } else {
                1
            };
        self.status.set(state, release, message);
        self.status.attempts = attempts;
        self.retry_at = (state == State::Retrying).then(|| Instant::now() + self.cfg.retry_after);
    }

    fn apply(&mut self, text: &str) {
        match marker::parse(text) {
            Err(e) => self.report(
                State::Invalid,
                None,
                format!("marker {}: {e}", self.cfg.marker.display()),
            ),
            Ok(None) => self.report(State::Idle, None, "the marker names no release".into()),
            Ok(Some(rel)) => self.apply_release(&rel),
        }
    }

    fn apply_release(&mut self, rel: &Release) {
        let app = self.cfg.app.clone();
        let name = Some(rel.name.as_str());
        let serving = Serving {
            release: rel.name.clone(),
            sha256: rel.sha256.clone(),
        };
        if self.status.serving.as_ref() == Some(&serving)
            && deliver::current_release(&app).as_deref() == name
        {
            let msg = format!("release {} already serves", rel.name);
            return self.report(State::Upgraded, name, msg);
        }
        if let Err(e) = deliver::deliver(rel, &app, &self.cfg.binary) {
            return match e {
                DeliverError::Mismatch { got } => self.report(
                    State::Refused,
                    name,
                    format!(
                        "SHA-256 of {} is {got}, the marker says {}: not delivered, nothing changed",
                        rel.source.display(),
                        rel.sha256
                    ),
                ),
                DeliverError::Io(e) => self.report(State::Retrying, name, format!("cannot deliver: {e}")),
            };
        }
        let Some(previous) = deliver::current(&app) else {
            // First start: no server runs yet; it will start from `current`.
            if let Err(e) = deliver::flip_current(&app, &rel.name) {
                return self.report(
                    State::Retrying,
                    name,
                    format!("cannot point current at it: {e}"),
                );
            }
            self.status.serving = Some(serving);
            let msg = format!(
                "release {} delivered; current points at it (no server yet)",
                rel.name
            );
            return self.report(State::Delivered, name, msg);
        };
        // Where to point `current` back to if this release does not make it:
        // what serves, as far as we know, else where it pointed.
        let back = self
            .status
            .serving
            .as_ref()
            .map_or(previous, |s| format!("releases/{}", s.release));
        if let Err(e) = deliver::flip_current(&app, &rel.name) {
            return self.report(
                State::Retrying,
                name,
                format!("cannot point current at it: {e}"),
            );
        }
        let (state, msg) =
            match upgrade::upgrade(&self.cfg.control, &rel.sha256, self.cfg.upgrade_timeout) {
                Outcome::Upgraded(r) => return self.upgraded(serving, &back, r),
                Outcome::Failed(FailureKind::Failed, m) => (State::RolledBack, m),
                Outcome::Failed(FailureKind::Refused | FailureKind::Invalid, m) => {
                    (State::Refused, m)
                }
                Outcome::Failed(FailureKind::InProgress, m) => (State::Retrying, m),
                Outcome::Failed(FailureKind::Internal, m) => {
                    (State::Retrying, format!("internal error: {m}"))
                }
                Outcome::Unreachable(m) => (State::Retrying, m),
                Outcome::TimedOut(d) => (
                    State::Retrying,
                    format!("no answer within {d:?}; the upgrade may still finish"),
                ),
            };
        // Not upgraded: the old generation serves; `current` goes back to it.
        let undo = match deliver::point_current(&app, &back) {
            Ok(()) => format!("current points back at {back}"),
            Err(e) => format!("CANNOT point current back at {back}: {e}"),
        };
        self.report(state, name, format!("{msg}; {undo}"));
    }

    /// The new generation serves `serving`: record it, and remove the
    /// releases that are neither it nor the one before (`back`).
    fn upgraded(&mut self, serving: Serving, back: &str, r: baton::UpgradeReport) {
        let before = back.strip_prefix("releases/").unwrap_or_default();
        let removed = deliver::collect_garbage(&self.cfg.app, &[serving.release.as_str(), before]);
        let msg = format!(
            "upgraded generation {} -> {} (pid {} -> {}) in {} ms, {} idle connections handed over{}",
            r.from_generation,
            r.to_generation,
            r.old_pid,
            r.new_pid,
            r.total_ms,
            r.handed_over,
            if removed.is_empty() {
                String::new()
            } else {
                format!("; removed releases {}", removed.join(", "))
            }
        );
        let release = serving.release.clone();
        self.status.serving = Some(serving);
        self.status.upgrade = Some(r);
        self.report(State::Upgraded, Some(&release), msg);
    }
}

/// Create the app directory and the status file's directory.
///
/// # Errors
/// The I/O error.
pub fn prepare(cfg: &Config) -> std::io::Result<()> {
    std::fs::create_dir_all(&cfg.app)?;
    if let Some(d) = cfg.status.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    Ok(())
}

//! The status file: what the sidecar last did, for probes, `kubectl exec`
//! and a rollout walker. JSON, replaced atomically (written next to its
//! name, then renamed), so a reader never sees half of it. The watch loop
//! rewrites it at every poll (the heartbeat a liveness probe checks).
//!
//! `state` is one of:
//!
//! | state | meaning |
//! |---|---|
//! | `starting` | the sidecar started and has not read the marker yet |
//! | `idle` | the marker is empty: nothing to run |
//! | `delivered` | first start: the release was delivered and `current` points at it; no server was running yet |
//! | `upgraded` | the server runs the marker's release (upgraded in place, or already running it) |
//! | `refused` | nothing changed: the binary's SHA-256 is not the marker's, or the server refused the upgrade (pre-flight) |
//! | `rolled_back` | the new generation was started and did not make it; the old one still serves, `current` points back at it |
//! | `invalid` | the marker cannot be read as a release |
//! | `retrying` | something that may pass (the server not reachable, another upgrade in progress, a source not there yet): tried again after `--retry-after` |

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Default age past which `probe` calls the watch loop stuck.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);

/// How many outcomes the status file keeps.
pub const MAX_HISTORY: usize = 20;

/// See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Starting,
    Idle,
    Delivered,
    Upgraded,
    Refused,
    RolledBack,
    Invalid,
    Retrying,
}

/// A release as delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    pub release: String,
    pub sha256: String,
}

/// One past outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub at_unix_ms: u64,
    pub release: Option<String>,
    pub state: State,
    pub message: String,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    /// The release the state is about (the marker's).
    pub release: Option<String>,
    /// What happened, in a sentence (the reason, on failure).
    pub message: String,
    /// The release `current` points at and the server runs, as far as the
    /// sidecar knows (it delivered it and the upgrade succeeded).
    pub serving: Option<Serving>,
    /// The last successful upgrade's report.
    pub upgrade: Option<baton::UpgradeReport>,
    /// Tries of the current release so far (more than one when retrying).
    pub attempts: u32,
    /// When `state` last changed.
    pub updated_at_unix_ms: u64,
    /// When the watch loop last ran.
    pub heartbeat_unix_ms: u64,
    /// The last [`MAX_HISTORY`] outcomes, oldest first.
    pub history: Vec<Entry>,
    /// The marker's text the state is about (so that a restarted sidecar
    /// does not act on it again).
    #[serde(default)]
    pub marker: Option<String>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            state: State::Starting,
            release: None,
            message: "started".into(),
            serving: None,
            upgrade: None,
            attempts: 0,
            updated_at_unix_ms: now_ms(),
            heartbeat_unix_ms: now_ms(),
            history: Vec::new(),
            marker: None,
        }
    }
}

impl Status {
    /// Record an outcome.
    pub fn set(&mut self, state: State, release: Option<&str>, message: String) {
        let at = now_ms();
        self.state = state;
        self.release = release.map(str::to_owned);
        self.message = message.clone();
        self.updated_at_unix_ms = at;
        self.history.push(Entry {
            at_unix_ms: at,
            release: self.release.clone(),
            state,
            message,
        });
        if self.history.len() > MAX_HISTORY {
            let extra = self.history.len() - MAX_HISTORY;
            self.history.drain(..extra);
        }
    }

    /// Write to `path` atomically.
    ///
    /// # Errors
    /// The I/O error.
    pub fn write(&mut self, path: &Path) -> std::io::Result<()> {
        self.heartbeat_unix_ms = now_ms();
        let mut text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Read `path`.
    ///
    /// # Errors
    /// Why it cannot be read.
    pub fn read(path: &Path) -> Result<Status, String> {
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a status file: {e}", path.display()))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a probe requires.
#[derive(Debug, Clone, Default)]
pub struct Require {
    /// The heartbeat is at most this old.
    pub max_age: Option<Duration>,
    /// Something has been delivered (`serving` is set).
    pub serving: bool,
    /// This release serves (it was delivered first, or upgraded to).
    pub release: Option<String>,
}

/// Check a status against a probe's requirements.
///
/// # Errors
/// Why the probe fails, in a line.
pub fn check(st: &Status, req: &Require, now_unix_ms: u64) -> Result<String, String> {
    if let Some(max) = req.max_age {
        let age = Duration::from_millis(now_unix_ms.saturating_sub(st.heartbeat_unix_ms));
        if age > max {
            return Err(format!(
                "the watch loop last ran {:.1} s ago (more than {:.1} s): stuck?",
                age.as_secs_f64(),
                max.as_secs_f64()
            ));
        }
    }
    let serving = st.serving.as_ref().map(|s| s.release.as_str());
    if req.serving && serving.is_none() {
        return Err(format!(
            "nothing delivered yet: {:?}: {}",
            st.state, st.message
        ));
    }
    if let Some(want) = &req.release
        && serving != Some(want.as_str())
    {
        return Err(format!(
            "release {want} does not serve (serving: {}; last: {:?} for {}: {})",
            serving.unwrap_or("nothing"),
            st.state,
            st.release.as_deref().unwrap_or("no release"),
            st.message
        ));
    }
    Ok(format!(
        "{:?}: {} (serving {})",
        st.state,
        st.message,
        serving.unwrap_or("nothing")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_read_the_state_the_loop_wrote() {
        let mut st = Status::default();
        let now = st.heartbeat_unix_ms;
        let live = Require {
            max_age: Some(Duration::from_secs(10)),
            ..Require::default()
        };
        assert!(check(&st, &live, now + 5_000).is_ok());
        assert!(
            check(&st, &live, now + 11_000)
                .unwrap_err()
                .contains("stuck")
        );
        let startup = Require {
            serving: true,
            ..Require::default()
        };
        assert!(check(&st, &startup, now).is_err());

        st.serving = Some(Serving {
            release: "1".into(),
            sha256: "a".into(),
        });
        st.set(State::Delivered, Some("1"), "delivered".into());
        assert!(check(&st, &startup, now).is_ok());
        let two = Require {
            release: Some("2".into()),
            ..Require::default()
        };
        st.set(State::RolledBack, Some("2"), "not ready: bad config".into());
        let e = check(&st, &two, now).unwrap_err();
        assert!(e.contains("serving: 1") && e.contains("bad config"), "{e}");
        st.serving = Some(Serving {
            release: "2".into(),
            sha256: "b".into(),
        });
        st.set(State::Upgraded, Some("2"), "upgraded".into());
        assert!(check(&st, &two, now).is_ok());
        // A later release that fails leaves 2 serving, and says why 3 does not.
        st.set(State::RolledBack, Some("3"), "exited at start".into());
        assert!(check(&st, &two, now).is_ok());
        let three = Require {
            release: Some("3".into()),
            ..Require::default()
        };
        let e = check(&st, &three, now).unwrap_err();
        assert!(e.contains("RolledBack for 3: exited at start"), "{e}");
        assert_eq!(st.history.len(), 4);
        for _ in 0..MAX_HISTORY {
            st.set(State::Upgraded, Some("2"), "again".into());
        }
        assert_eq!(st.history.len(), MAX_HISTORY);
    }
}

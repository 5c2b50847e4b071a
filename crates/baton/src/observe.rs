//! After the new generation is ready: an optional canary and an optional
//! observation window decide whether it stays.
//!
//! **Observation window** (`Config::observe`, default off): the new
//! generation is promoted provisionally — it accepts every new connection —
//! while the old one stops accepting but keeps its listeners, keeps serving
//! the connections it has, and holds back the idle-connection handoff,
//! `MAINPID=` and the pid file until the window ends. The new generation's
//! health URL is polled meanwhile (in library mode a fresh connection can
//! only reach the new generation: the old one does not accept). If the new
//! generation dies or fails `Config::health_failures` (default
//! [`HEALTH_FAILURES_TO_ROLL_BACK`]) checks in a row, the old one resumes accepting and tells the new one to stop
//! gracefully (`Demote`): its in-flight requests complete. **What a rollback
//! loses**: state written on the new generation during the window, and any
//! connection it was serving idle (closed).
//!
//! **Canary** (`Config::canary`): both generations accept new connections
//! for the window; then the new one's 5xx rate (counted by the serving
//! layer) is compared with the old one's over the same window. It is
//! promoted if it served at least `min_requests` and its error rate is at
//! most `max_error_increase` above the old one's; with too few requests the
//! window is extended up to `extensions` times, then it is rolled back.
//! Canary and state handoff are refused together (two generations would
//! write diverging copies of the state).

use std::time::Duration;

/// Default: consecutive failed health checks that roll the new generation
/// back (`Config::health_failures`, `--health-failures`).
pub const HEALTH_FAILURES_TO_ROLL_BACK: u32 = 2;
/// Default: how long one health check may take (`Config::health_timeout`,
/// `--health-timeout`).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default canary: minimum requests the new generation must serve.
pub const DEFAULT_CANARY_MIN_REQUESTS: u64 = 100;
/// Default canary: allowed error-rate increase (absolute, 0.01 = 1 point).
pub const DEFAULT_CANARY_MAX_ERROR_INCREASE: f64 = 0.01;
/// Default canary: extensions of the window when too few requests came.
pub const DEFAULT_CANARY_EXTENSIONS: u32 = 2;

/// Canary settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CanaryPolicy {
    /// How long both generations accept.
    pub window: Duration,
    /// Requests the new generation must have served to be judged.
    pub min_requests: u64,
    /// Allowed increase of the 5xx rate over the old generation's.
    pub max_error_increase: f64,
    /// Extensions of the window when too few requests came.
    pub extensions: u32,
}

impl CanaryPolicy {
    /// A canary of `window` with the default thresholds.
    pub fn new(window: Duration) -> Self {
        CanaryPolicy {
            window,
            min_requests: DEFAULT_CANARY_MIN_REQUESTS,
            max_error_increase: DEFAULT_CANARY_MAX_ERROR_INCREASE,
            extensions: DEFAULT_CANARY_EXTENSIONS,
        }
    }
}

/// The verdict on a canary window.
#[derive(Debug, Clone, PartialEq)]
pub enum CanaryVerdict {
    /// Promote.
    Pass(String),
    /// Not enough requests yet.
    Extend(String),
    /// Roll back.
    Fail(String),
}

/// Compare the new generation's `(requests, errors)` with the old one's.
pub fn judge(
    policy: &CanaryPolicy,
    new: (u64, u64),
    old: (u64, u64),
    extensions_left: u32,
) -> CanaryVerdict {
    let rate = |(r, e): (u64, u64)| if r == 0 { 0.0 } else { e as f64 / r as f64 };
    let (nr, or) = (rate(new), rate(old));
    let summary = format!(
        "new generation {}/{} errors ({:.1}%), old {}/{} ({:.1}%)",
        new.1,
        new.0,
        nr * 100.0,
        old.1,
        old.0,
        or * 100.0
    );
    if new.0 < policy.min_requests {
        let s = format!(
            "{summary}: fewer than {} requests to judge",
            policy.min_requests
        );
        return if extensions_left > 0 {
            CanaryVerdict::Extend(s)
        } else {
            CanaryVerdict::Fail(s)
        };
    }
    if nr > or + policy.max_error_increase {
        return CanaryVerdict::Fail(format!(
            "{summary}: more than {:.1} points worse",
            policy.max_error_increase * 100.0
        ));
    }
    CanaryVerdict::Pass(summary)
}

/// The health check of the observation window, under its old name: see
/// [`probe::get`](crate::probe::get) (a status from 200 to 399 passes).
pub use crate::probe::get as probe;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_verdicts() {
        let p = CanaryPolicy::new(Duration::from_secs(1));
        assert!(matches!(
            judge(&p, (1000, 5), (1000, 4), 0),
            CanaryVerdict::Pass(_)
        ));
        assert!(matches!(
            judge(&p, (1000, 200), (1000, 0), 2),
            CanaryVerdict::Fail(_)
        ));
        assert!(matches!(
            judge(&p, (10, 0), (1000, 0), 1),
            CanaryVerdict::Extend(_)
        ));
        assert!(matches!(
            judge(&p, (10, 0), (1000, 0), 0),
            CanaryVerdict::Fail(_)
        ));
        // An old generation that errs too does not fail an equal new one.
        assert!(matches!(
            judge(&p, (1000, 100), (1000, 100), 0),
            CanaryVerdict::Pass(_)
        ));
        match judge(&p, (1000, 200), (1000, 0), 0) {
            CanaryVerdict::Fail(m) => assert!(m.contains("20.0%"), "{m}"),
            other => panic!("a 20% error rate must fail the canary: {other:?}"),
        }
    }
}

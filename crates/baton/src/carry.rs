//! Counters and histograms that survive upgrades.
//!
//! The old generation exports them with its state (blob `baton.counters`);
//! the new one starts from those values, then counts the upgrade that made
//! it when the old one reports `Done`. So `baton_upgrades_total` keeps
//! growing across generations, and an app's own counters
//! ([`Baton::carried_counter`](crate::Baton::carried_counter)) do not reset.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Name of the state blob carrying them.
pub(crate) const BLOB: &str = "baton.counters";

/// Bucket upper bounds (seconds) of the duration histograms.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// A histogram with fixed buckets whose counts can be carried.
#[derive(Debug, Default)]
pub struct CarriedHistogram {
    inner: Mutex<HistData>,
}

/// The data of a [`CarriedHistogram`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistData {
    /// Per-bucket counts (not cumulative); one more than the bounds (+Inf).
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl CarriedHistogram {
    /// Record a duration in seconds.
    pub fn observe(&self, secs: f64) {
        let mut d = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.counts.len() != DURATION_BUCKETS.len() + 1 {
            d.counts = vec![0; DURATION_BUCKETS.len() + 1];
        }
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        d.counts[i] += 1;
        d.sum += secs;
        d.count += 1;
    }

    /// A copy of the data.
    pub fn data(&self) -> HistData {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Add carried data (ignored if the bucket layout differs).
    pub(crate) fn absorb(&self, other: &HistData) {
        if other.counts.len() != DURATION_BUCKETS.len() + 1 {
            return;
        }
        let mut d = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.counts.len() != other.counts.len() {
            d.counts = vec![0; other.counts.len()];
        }
        for (a, b) in d.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        d.sum += other.sum;
        d.count += other.count;
    }
}

/// Everything carried.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Carried {
    pub(crate) upgrades_succeeded: u64,
    pub(crate) upgrades_failed: u64,
    pub(crate) upgrades_refused: u64,
    pub(crate) handed_over: u64,
    pub(crate) closed_at_deadline: u64,
    pub(crate) lost: u64,
    pub(crate) app: Vec<(String, u64)>,
    pub(crate) upgrade_seconds: HistData,
    pub(crate) ready_seconds: HistData,
    pub(crate) drain_seconds: HistData,
}

/// The histograms of a generation.
#[derive(Debug, Default)]
pub(crate) struct Histograms {
    pub(crate) upgrade_seconds: CarriedHistogram,
    pub(crate) ready_seconds: CarriedHistogram,
    pub(crate) drain_seconds: CarriedHistogram,
}

/// An app counter registered with [`Baton::carried_counter`](crate::Baton::carried_counter).
#[derive(Debug, Clone)]
pub(crate) struct AppCounter {
    pub(crate) name: String,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) help: String,
    pub(crate) value: Arc<AtomicU64>,
}

/// Carried values not yet claimed by an app counter (registered later).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) app: Mutex<Vec<(String, u64)>>,
}

impl Pending {
    pub(crate) fn claim(&self, name: &str) -> u64 {
        let mut app = self
            .app
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match app.iter().position(|(n, _)| n == name) {
            Some(i) => app.swap_remove(i).1,
            None => 0,
        }
    }
}

pub(crate) fn add(a: &AtomicU64, v: u64) {
    a.fetch_add(v, Ordering::Relaxed);
}

/// Whether `name` is a valid Prometheus metric name.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_metric_name("app_requests"));
        assert!(valid_metric_name("a:b_c1"));
        assert!(!valid_metric_name("1abc"));
        assert!(!valid_metric_name("a-b"));
        assert!(!valid_metric_name(""));
    }

    #[test]
    fn histogram_carries() {
        let a = CarriedHistogram::default();
        a.observe(0.003);
        a.observe(100.0);
        let b = CarriedHistogram::default();
        b.absorb(&a.data());
        b.observe(0.003);
        let d = b.data();
        assert_eq!(d.count, 3);
        assert_eq!(d.counts[2], 2);
        assert_eq!(*d.counts.last().unwrap(), 1);
        b.absorb(&HistData {
            counts: vec![1],
            sum: 1.0,
            count: 1,
        }); // wrong layout: ignored
        assert_eq!(b.data().count, 3);
    }
}

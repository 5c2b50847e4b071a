//! Prometheus (OpenMetrics) text (feature `metrics`).
//!
//! One renderer for both faces of baton: a library-mode generation
//! ([`Baton::metrics_text`](crate::Baton::metrics_text)) and the `baton run` supervisor fill a
//! [`Snapshot`] and call [`render`], so the metric names, types and help
//! texts are the same wherever they come from.
//!
//! ```
//! let mut s = baton::metrics::Snapshot::default();
//! s.generation = 3;
//! s.upgrades_succeeded = 2;
//! let text = baton::metrics::render(&s);
//! assert!(text.contains("baton_upgrades_total{result=\"success\"} 2"));
//! assert!(text.ends_with("# EOF\n"));
//! ```

use std::sync::atomic::Ordering;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::carry::{DURATION_BUCKETS, HistData};
use crate::generation::Baton;
use crate::inner::lock;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What [`render`] shows. Fields left `None` are not rendered (a metric
/// that does not apply: the supervisor hands no connection over, a
/// library-mode generation has no restarts).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Snapshot {
    /// `baton_generation`: the serving generation's number.
    pub generation: u64,
    /// `baton_process_start_time_seconds`: start of the process that
    /// answers, seconds since the Unix epoch.
    pub process_start_time_seconds: f64,
    /// `baton_upgrades_total{result="success"}`.
    pub upgrades_succeeded: u64,
    /// `baton_upgrades_total{result="failed"}`.
    pub upgrades_failed: u64,
    /// `baton_upgrades_total{result="refused"}`.
    pub upgrades_refused: u64,
    /// `baton_upgrade_duration_seconds`: trigger to the old generation
    /// drained.
    pub upgrade_seconds: HistData,
    /// `baton_upgrade_ready_seconds`: spawn to ready.
    pub ready_seconds: HistData,
    /// `baton_drain_duration_seconds`: promotion to the old generation
    /// drained.
    pub drain_seconds: HistData,
    /// `baton_connections_handed_over_total`.
    pub connections_handed_over: Option<u64>,
    /// `baton_connections_closed_at_drain_total`.
    pub connections_closed_at_drain: u64,
    /// `baton_connections_lost_total`.
    pub connections_lost: Option<u64>,
    /// `baton_requests_in_flight`.
    pub requests_in_flight: Option<i64>,
    /// `baton_restarts_total`: generations started again after the serving
    /// one died.
    pub restarts: Option<u64>,
    /// More counters: (name without `_total`, help, value).
    pub counters: Vec<(String, String, u64)>,
}

#[derive(Debug)]
struct Hist(HistData);

impl TypedMetric for Hist {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Hist {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|b| (b, 0))
            .collect();
        if self.0.counts.len() == buckets.len() {
            // Per-bucket counts: the encoder makes them cumulative.
            for (b, c) in buckets.iter_mut().zip(&self.0.counts) {
                b.1 = *c;
            }
        }
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum,
            self.0.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Render a snapshot as OpenMetrics text (ends with `# EOF`).
pub fn render(s: &Snapshot) -> String {
    let mut reg = Registry::default();
    reg.register(
        "baton_generation",
        "Generation number of this process (1 for a fresh start, +1 per upgrade)",
        ConstGauge::new(s.generation as i64),
    );
    reg.register(
        "baton_process_start_time_seconds",
        "Start time of this process, seconds since the Unix epoch",
        ConstGauge::new(s.process_start_time_seconds),
    );
    let upgrades = Family::<Vec<(String, String)>, Counter>::default();
    for (result, v) in [
        ("success", s.upgrades_succeeded),
        ("failed", s.upgrades_failed),
        ("refused", s.upgrades_refused),
    ] {
        upgrades
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc_by(v);
    }
    reg.register(
        "baton_upgrades",
        "Upgrades by result, across generations",
        upgrades,
    );
    reg.register(
        "baton_upgrade_duration_seconds",
        "Upgrade duration, trigger to the old generation drained",
        Hist(s.upgrade_seconds.clone()),
    );
    reg.register(
        "baton_upgrade_ready_seconds",
        "Time from spawning the new generation to its Ready",
        Hist(s.ready_seconds.clone()),
    );
    reg.register(
        "baton_drain_duration_seconds",
        "Time from promotion to the old generation drained",
        Hist(s.drain_seconds.clone()),
    );
    if let Some(v) = s.connections_handed_over {
        reg.register(
            "baton_connections_handed_over",
            "Idle connections moved to a newer generation",
            ConstCounter::new(v),
        );
    }
    reg.register(
        "baton_connections_closed_at_drain",
        "Connections closed because the drain deadline passed",
        ConstCounter::new(s.connections_closed_at_drain),
    );
    if let Some(v) = s.connections_lost {
        reg.register(
            "baton_connections_lost",
            "Connections handed to a generation that then died",
            ConstCounter::new(v),
        );
    }
    if let Some(v) = s.requests_in_flight {
        reg.register(
            "baton_requests_in_flight",
            "Requests being served by this generation",
            ConstGauge::new(v),
        );
    }
    if let Some(v) = s.restarts {
        reg.register(
            "baton_restarts",
            "Generations started again after the serving one died",
            ConstCounter::new(v),
        );
    }
    for (name, help, v) in &s.counters {
        reg.register(name.clone(), help.clone(), ConstCounter::new(*v));
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

impl Baton {
    /// This generation's metrics in the Prometheus text format. Counters
    /// and histograms are cumulative across upgrades (they are carried to
    /// each new generation).
    pub fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let c = inner.counters_snapshot();
        let snapshot = Snapshot {
            generation: inner.generation,
            process_start_time_seconds: inner.started_unix_secs as f64,
            upgrades_succeeded: c.upgrades_succeeded,
            upgrades_failed: c.upgrades_failed,
            upgrades_refused: c.upgrades_refused,
            upgrade_seconds: inner.histograms.upgrade_seconds.data(),
            ready_seconds: inner.histograms.ready_seconds.data(),
            drain_seconds: inner.histograms.drain_seconds.data(),
            connections_handed_over: Some(c.conns_handed_over),
            connections_closed_at_drain: c.conns_closed_at_deadline,
            connections_lost: Some(c.conns_lost),
            requests_in_flight: Some(inner.activity.in_flight.load(Ordering::Relaxed) as i64),
            restarts: None,
            counters: lock(&inner.app_counters)
                .iter()
                .map(|a| {
                    (
                        a.name.clone(),
                        a.help.clone(),
                        a.value.load(Ordering::Relaxed),
                    )
                })
                .collect(),
        };
        render(&snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carry::CarriedHistogram;

    #[test]
    fn histogram_buckets_are_cumulative_and_optional_metrics_are_left_out() {
        let h = CarriedHistogram::default();
        h.observe(0.003);
        h.observe(0.2);
        h.observe(100.0);
        let mut s = Snapshot {
            upgrade_seconds: h.data(),
            restarts: Some(4),
            ..Snapshot::default()
        };
        s.counters
            .push(("app_requests".into(), "Requests".into(), 9));
        let text = render(&s);
        assert!(
            text.contains("baton_upgrade_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("baton_upgrade_duration_seconds_bucket{le=\"0.25\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("baton_upgrade_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(text.contains("baton_upgrade_duration_seconds_count 3"));
        assert!(text.contains("baton_restarts_total 4"), "{text}");
        assert!(text.contains("app_requests_total 9"), "{text}");
        assert!(!text.contains("handed_over"), "{text}");
        assert!(!text.contains("in_flight"), "{text}");
    }
}

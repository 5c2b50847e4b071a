//! Prometheus text for a generation (feature `metrics`).

use std::sync::atomic::Ordering;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::carry::{DURATION_BUCKETS, HistData};
use crate::generation::{Baton, lock};

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

impl Baton {
    /// This generation's metrics in the Prometheus text format. Counters
    /// and histograms are cumulative across upgrades (they are carried to
    /// each new generation).
    pub fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let c = inner.counters_snapshot();
        let mut reg = Registry::default();
        reg.register(
            "baton_generation",
            "Generation number of this process (1 for a fresh start, +1 per upgrade)",
            ConstGauge::new(inner.generation as i64),
        );
        reg.register(
            "baton_process_start_time_seconds",
            "Start time of this process, seconds since the Unix epoch",
            ConstGauge::new(inner.started_unix_secs as f64),
        );
        let upgrades = Family::<Vec<(String, String)>, Counter>::default();
        for (result, v) in [
            ("success", c.upgrades_succeeded),
            ("failed", c.upgrades_failed),
            ("refused", c.upgrades_refused),
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
            Hist(inner.histograms.upgrade_seconds.data()),
        );
        reg.register(
            "baton_upgrade_ready_seconds",
            "Time from spawning the new generation to its Ready",
            Hist(inner.histograms.ready_seconds.data()),
        );
        reg.register(
            "baton_drain_duration_seconds",
            "Time from promotion to the old generation drained",
            Hist(inner.histograms.drain_seconds.data()),
        );
        reg.register(
            "baton_connections_handed_over",
            "Idle connections moved to a newer generation",
            ConstCounter::new(c.conns_handed_over),
        );
        reg.register(
            "baton_connections_closed_at_drain",
            "Connections closed because the drain deadline passed",
            ConstCounter::new(c.conns_closed_at_deadline),
        );
        reg.register(
            "baton_connections_lost",
            "Connections handed to a generation that then died",
            ConstCounter::new(c.conns_lost),
        );
        reg.register(
            "baton_requests_in_flight",
            "Requests being served by this generation",
            ConstGauge::new(inner.activity.in_flight.load(Ordering::Relaxed) as i64),
        );
        for a in lock(&inner.app_counters).iter() {
            reg.register(
                a.name.clone(),
                a.help.clone(),
                ConstCounter::new(a.value.load(Ordering::Relaxed)),
            );
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

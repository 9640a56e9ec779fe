//! Every metric of streamscore, in one place.
//!
//! Naming: `streamscore_<what>_<unit>`; counters end in `_total`, times are
//! `_seconds`, sizes `_bytes`. Labels take bounded values only (topic names
//! from `topics/`, reason codes from [`crate::events::Reason`], store names).
//! docs/METRICS.md is the reference table; a test checks it lists every name
//! registered here.

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::events::Reason;

/// The process's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounterVec,
    pub events_scored: IntCounter,
    pub events_flagged: IntCounter,
    pub dead_letter: IntCounterVec,
    pub late_events: IntCounter,
    pub event_to_score_latency: Histogram,
    pub processing_latency: Histogram,
    pub batch_size: Histogram,
    pub fraud_score: Histogram,
    pub window_keys: IntGaugeVec,
    pub window_state_bytes: IntGaugeVec,
    pub evicted_keys: IntCounterVec,
    pub model_info: IntGaugeVec,
    pub redis_errors: IntCounter,
    pub recs_rebuild_duration: Histogram,
    pub recs_rebuild_events: IntCounter,
    pub recs_rebuild_failures: IntCounter,
    pub recs_users: IntGauge,
    pub recs_generation: IntGauge,
    pub recs_built_at: IntGauge,
    pub redis_written: IntCounter,
    pub redis_skipped: IntCounter,
    pub redis_lag_messages: IntGauge,
    pub redis_lag_seconds: Gauge,
    pub kafka_produce_errors: IntCounter,
    pub newest_event_time: IntGauge,
    pub partition_newest_event_time: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub warmup_events: IntCounter,
    pub warmup_duration: Histogram,
    pub resume_gap_events: IntCounter,
    pub redelivered_skipped: IntCounter,
    pub partitions_settling: IntGauge,
    pub partitions_warming: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_request_duration: prometheus::HistogramVec,
    pub recs_served: IntCounterVec,
    pub merchant_features_age: Histogram,
    pub merchant_features_missing: IntCounter,
    pub merchant_table_rows: IntGauge,
    pub merchant_table_propagation: Histogram,
    pub merchant_rows_published: IntCounter,
    pub merchant_forwarded_duplicates: IntCounter,
    pub merchant_warmup_events: IntCounter,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric definition");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Metrics {
    /// Registers every metric in a fresh registry. The definitions are
    /// constants, so a failure here is a programming error caught by tests.
    pub fn new() -> Metrics {
        let r = Registry::new();
        // 0.5 ms .. ~65 s
        let latency = exponential_buckets(0.000_5, 2.0, 18).expect("valid buckets");
        let http_request_duration = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "streamscore_http_request_duration_seconds",
                "Server-side time of an HTTP request, by route.",
            )
            .buckets(exponential_buckets(0.000_05, 2.0, 16).expect("valid buckets")),
            &["route"],
        )
        .expect("valid metric definition");
        r.register(Box::new(http_request_duration.clone()))
            .expect("metric registered once");
        let m = Metrics {
            http_requests: counter_vec(
                &r,
                "streamscore_http_requests_total",
                "HTTP requests answered, by route and status code.",
                &["route", "status"],
            ),
            http_request_duration,
            recs_served: counter_vec(
                &r,
                "streamscore_recs_served_total",
                "Recommendation responses, by source (hybrid, batch, popular).",
                &["source"],
            ),
            events_consumed: counter_vec(
                &r,
                "streamscore_events_consumed_total",
                "Messages taken from an input topic.",
                &["topic"],
            ),
            events_scored: counter(
                &r,
                "streamscore_events_scored_total",
                "Transactions scored and acknowledged by Kafka.",
            ),
            events_flagged: counter(
                &r,
                "streamscore_events_flagged_total",
                "Scored transactions at or above the decision threshold.",
            ),
            dead_letter: counter_vec(
                &r,
                "streamscore_dead_letter_total",
                "Messages sent to the dead-letter topic, by reason.",
                &["reason"],
            ),
            late_events: counter(
                &r,
                "streamscore_late_events_total",
                "Events older than the grace period: scored, not folded into windows.",
            ),
            event_to_score_latency: histogram(
                &r,
                "streamscore_event_to_score_latency_seconds",
                "From the event's own time to its score being acknowledged.",
                latency.clone(),
            ),
            processing_latency: histogram(
                &r,
                "streamscore_processing_latency_seconds",
                "From a batch being taken from Kafka to its outputs being acknowledged.",
                latency.clone(),
            ),
            batch_size: histogram(
                &r,
                "streamscore_batch_size_events",
                "Events per micro-batch.",
                exponential_buckets(1.0, 2.0, 12).expect("valid buckets"),
            ),
            fraud_score: histogram(
                &r,
                "streamscore_fraud_score",
                "Distribution of the fraud scores computed (0..1).",
                (1..=10).map(|i| f64::from(i) / 10.0).collect(),
            ),
            window_keys: gauge_vec(
                &r,
                "streamscore_window_keys",
                "Keys held in a window store.",
                &["store"],
            ),
            window_state_bytes: gauge_vec(
                &r,
                "streamscore_window_state_bytes",
                "Estimated bytes held by a window store.",
                &["store"],
            ),
            evicted_keys: counter_vec(
                &r,
                "streamscore_window_evicted_keys_total",
                "Keys dropped from a window store: idle for 24 h + grace, or over the store's key limit.",
                &["store", "reason"],
            ),
            model_info: gauge_vec(
                &r,
                "streamscore_model_info",
                "Always 1; the label says which model version scores.",
                &["version"],
            ),
            redis_errors: counter(
                &r,
                "streamscore_redis_errors_total",
                "Failed Redis writes (each is retried).",
            ),
            recs_rebuild_duration: histogram(
                &r,
                "streamscore_recs_rebuild_duration_seconds",
                "Time of one successful recommendation rebuild (replay, rank, publish).",
                exponential_buckets(0.1, 2.0, 16).expect("valid buckets"),
            ),
            recs_rebuild_events: counter(
                &r,
                "streamscore_recs_rebuild_events_total",
                "Interactions replayed by successful recommendation rebuilds.",
            ),
            recs_rebuild_failures: counter(
                &r,
                "streamscore_recs_rebuild_failures_total",
                "Recommendation rebuilds that failed (the previous generation keeps serving).",
            ),
            recs_users: int_gauge(
                &r,
                "streamscore_recs_users",
                "Users written by the newest recommendation generation.",
            ),
            recs_generation: int_gauge(
                &r,
                "streamscore_recs_generation",
                "Number of the newest recommendation generation published.",
            ),
            recs_built_at: int_gauge(
                &r,
                "streamscore_recs_built_at_seconds",
                "When the newest recommendation generation was built, epoch seconds; time() - this is its age.",
            ),
            redis_written: counter(
                &r,
                "streamscore_redis_written_total",
                "Fraud scores the Redis writer cached from the fraud-scores topic.",
            ),
            redis_skipped: counter(
                &r,
                "streamscore_redis_skipped_total",
                "fraud-scores records that are not scores; not cached.",
            ),
            redis_lag_messages: int_gauge(
                &r,
                "streamscore_redis_lag_messages",
                "fraud-scores records not yet in Redis (high watermark minus the writer's position).",
            ),
            redis_lag_seconds: float_gauge(
                &r,
                "streamscore_redis_lag_seconds",
                "While Redis is behind: now minus the scored_at of the newest score written; 0 when caught up.",
            ),
            kafka_produce_errors: counter(
                &r,
                "streamscore_kafka_produce_errors_total",
                "Failed Kafka deliveries (each is retried).",
            ),
            newest_event_time: {
                let g = IntGauge::new(
                    "streamscore_newest_event_time_seconds",
                    "Event time of the newest scored event, epoch seconds.",
                )
                .expect("valid metric definition");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            partition_newest_event_time: gauge_vec(
                &r,
                "streamscore_partition_newest_event_time_seconds",
                "Newest event time taken from each input partition, epoch seconds.",
                &["partition"],
            ),
            consumer_lag: gauge_vec(
                &r,
                "streamscore_consumer_lag_messages",
                "Messages behind the high watermark per input partition (librdkafka statistics, every 5 s).",
                &["partition"],
            ),
            warmup_events: counter(
                &r,
                "streamscore_warmup_replayed_events_total",
                "Events replayed from the log to rebuild windows (nothing emitted).",
            ),
            warmup_duration: histogram(
                &r,
                "streamscore_warmup_duration_seconds",
                "Time to rebuild one partition's windows from the log.",
                exponential_buckets(0.01, 2.0, 16).expect("valid buckets"),
            ),
            resume_gap_events: counter(
                &r,
                "streamscore_resume_gap_events_total",
                "Messages the broker skipped when a partition was resumed, recovered from the log and scored.",
            ),
            redelivered_skipped: counter(
                &r,
                "streamscore_redelivered_skipped_total",
                "Messages delivered again at an offset already taken in this assignment; skipped.",
            ),
            partitions_settling: int_gauge(
                &r,
                "streamscore_partitions_settling",
                "Partitions new to this instance, paused after an assignment until their previous owner's last commit is due (heartbeat + commit interval); the others keep flowing.",
            ),
            partitions_warming: int_gauge(
                &r,
                "streamscore_partitions_warming",
                "Partitions whose windows are being rebuilt from the log, paused meanwhile (the others keep flowing).",
            ),
            merchant_features_age: histogram(
                &r,
                "streamscore_merchant_features_age_seconds",
                "At score time: how long ago the merchant-features row used was published (wall clock).",
                latency.clone(),
            ),
            merchant_features_missing: counter(
                &r,
                "streamscore_merchant_features_missing_total",
                "Events scored with no merchant-features row for their merchant (merchant features 0).",
            ),
            merchant_table_rows: int_gauge(
                &r,
                "streamscore_merchant_table_rows",
                "Merchants in this instance's replicated merchant-features table.",
            ),
            merchant_table_propagation: histogram(
                &r,
                "streamscore_merchant_table_propagation_seconds",
                "From the stream forwarding a merchant's newest event to this instance's table holding it (the repartition round trip).",
                latency.clone(),
            ),
            merchant_rows_published: counter(
                &r,
                "streamscore_merchant_rows_published_total",
                "Rows (and tombstones) the merchant stage published to merchant-features.",
            ),
            merchant_forwarded_duplicates: counter(
                &r,
                "streamscore_merchant_forwarded_duplicates_total",
                "Repartition records forwarded again by a restarted stream; dropped by the merchant stage.",
            ),
            merchant_warmup_events: counter(
                &r,
                "streamscore_merchant_warmup_replayed_events_total",
                "Repartition records replayed to rebuild the merchant stage's windows.",
            ),
            registry: r,
        };
        for reason in Reason::ALL {
            m.dead_letter.with_label_values(&[reason.as_str()]);
        }
        for store in ["user", "merchant"] {
            m.window_keys.with_label_values(&[store]);
            m.window_state_bytes.with_label_values(&[store]);
            for reason in ["idle", "limit"] {
                m.evicted_keys.with_label_values(&[store, reason]);
            }
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented_and_well_named() {
        let m = Metrics::new();
        m.events_consumed.with_label_values(&["transactions"]).inc();
        m.model_info.with_label_values(&["v"]).set(1);
        let doc = include_str!("../docs/METRICS.md");
        let families = m.registry.gather();
        assert!(families.len() >= 15);
        for f in families {
            let name = f.name();
            assert!(name.starts_with("streamscore_"), "{name}");
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} missing from docs/METRICS.md"
            );
            if f.get_field_type() == prometheus::proto::MetricType::COUNTER {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }
}

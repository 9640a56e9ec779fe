//! `[recs]`: the knobs of the recommendation rebuild.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Batch recommendation candidates rebuilt from the whole `interactions`
/// log (docs/RECOMMENDATIONS.md explains the algorithm and every knob).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecsConfig {
    /// How often `streamscore run` rebuilds the candidates from the whole
    /// log ("0s": never; `streamscore rebuild` still works). A run starts with
    /// a rebuild when the newest generation in Redis is older than this.
    #[serde(with = "humantime_serde")]
    pub rebuild_interval: Duration,
    /// How much lower than the stream the periodic rebuild inside `run`
    /// runs (Linux nice added to the process's, 0..=19; 19 at most): its
    /// replay, fold, ranking and publishing
    /// threads yield the CPU to the scoring when both are busy. The
    /// one-shot `streamscore rebuild` runs at normal priority.
    pub nice: i32,
    /// Items per user.
    pub top_k: usize,
    /// Most recent items kept per user while replaying.
    pub history_cap: usize,
    /// A new interaction co-occurs with the distinct items among the
    /// user's last this-many interactions (at most `history_cap`). The
    /// fold's cost is proportional to it.
    pub cooccurrence_window: usize,
    /// Neighbours kept per item (co-occurrence lists are pruned to this).
    pub max_neighbours: usize,
    /// Neighbours per item published for the serving layer's session
    /// re-ranking (`recs:item:{item_id}`).
    pub serve_neighbours: usize,
    /// Half-life of an interaction's weight in the co-occurrence counts.
    #[serde(with = "humantime_serde")]
    pub decay_half_life: Duration,
    /// Half-life of the popularity list (recent items count most).
    #[serde(with = "humantime_serde")]
    pub popular_half_life: Duration,
    /// Items in `recs:popular`.
    pub popular_k: usize,
    /// TTL of `recs:{user_id}`, `recs:popular` and `recs:meta`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Publish each generation to the `recommendations` topic inside one
    /// Kafka transaction, so a rebuild that dies half-way leaves no record
    /// of its generation visible to `read_committed` readers. Needs a broker
    /// with transactions (Kafka ≥ 0.11); tansu 0.6 has none (set false).
    pub topic_transactions: bool,
    /// Compression of the records a rebuild produces to the
    /// `recommendations` topic (librdkafka `compression.type` of its
    /// producer, set over `[kafka.producer]`). A generation's records
    /// repeat the same field names and offsets; with lz4 the broker takes
    /// half the CPU to store them (docs/BENCHMARKS.md).
    pub compression: Compression,
    /// Weights of view, click, add_to_cart and purchase.
    pub weight_view: f64,
    pub weight_click: f64,
    pub weight_add_to_cart: f64,
    pub weight_purchase: f64,
}

/// A Kafka producer compression codec this build of librdkafka has
/// (zstd is not built in).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

impl Default for RecsConfig {
    fn default() -> Self {
        RecsConfig {
            rebuild_interval: Duration::from_secs(3600),
            nice: 10,
            top_k: 20,
            history_cap: 30,
            cooccurrence_window: 10,
            max_neighbours: 50,
            serve_neighbours: 20,
            decay_half_life: Duration::from_secs(7 * 24 * 3600),
            popular_half_life: Duration::from_secs(24 * 3600),
            popular_k: 100,
            ttl: Duration::from_secs(24 * 3600),
            topic_transactions: true,
            compression: Compression::Lz4,
            weight_view: 1.0,
            weight_click: 2.0,
            weight_add_to_cart: 4.0,
            weight_purchase: 8.0,
        }
    }
}

impl RecsConfig {
    /// Cross-field checks; each problem names its field.
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        let r = self;
        if !(0..=19).contains(&r.nice) {
            errs.push("recs.nice: must be between 0 and 19".into());
        }
        for (name, v) in [
            ("recs.top_k", r.top_k),
            ("recs.history_cap", r.history_cap),
            ("recs.cooccurrence_window", r.cooccurrence_window),
            ("recs.max_neighbours", r.max_neighbours),
            ("recs.serve_neighbours", r.serve_neighbours),
            ("recs.popular_k", r.popular_k),
        ] {
            if v == 0 {
                errs.push(format!("{name}: must be at least 1"));
            }
        }
        if r.cooccurrence_window > r.history_cap {
            errs.push(format!(
                "recs.cooccurrence_window: {} is more than recs.history_cap ({}), the interactions kept per user",
                r.cooccurrence_window, r.history_cap
            ));
        }
        for (name, d) in [
            ("recs.decay_half_life", r.decay_half_life),
            ("recs.popular_half_life", r.popular_half_life),
            ("recs.ttl", r.ttl),
        ] {
            if d.as_secs() == 0 {
                errs.push(format!("{name}: must be at least 1s"));
            }
        }
        for (name, w) in [
            ("recs.weight_view", r.weight_view),
            ("recs.weight_click", r.weight_click),
            ("recs.weight_add_to_cart", r.weight_add_to_cart),
            ("recs.weight_purchase", r.weight_purchase),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                errs.push(format!("{name}: must be a finite number >= 0"));
            }
        }
    }
}

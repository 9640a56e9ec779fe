//! `[sessions]` and `[serving]`: the live session windows and the HTTP
//! serving layer (docs/SERVING.md).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Per-user session windows, kept from the `interactions` stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// A session ends after this much event time without an interaction of
    /// the user (its items are then forgotten).
    #[serde(with = "humantime_serde")]
    pub idle_gap: Duration,
    /// Most recent interactions kept per session.
    pub max_items: usize,
    /// Most sessions held; beyond it the least recently active are evicted.
    pub max_users: usize,
    /// Consumer group of the session follower; default
    /// `{kafka.group_id}.sessions`.
    pub group: Option<String>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            idle_gap: Duration::from_secs(30 * 60),
            max_items: 50,
            max_users: 1_000_000,
            group: None,
        }
    }
}

/// The HTTP API (`/v1/...`), served on `[http] bind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServingConfig {
    /// Weight of the live session against the batch score in the hybrid
    /// ranking (0: plain batch order).
    pub session_boost: f64,
    /// Largest `k` a request may ask for.
    pub max_k: usize,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Longest wait for Redis within one request (then 503).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Worker threads of the HTTP server's own runtime (apart from the
    /// stream's, so a flood of requests cannot starve the stream).
    pub threads: usize,
    /// How much lower than the stream the HTTP threads run (Linux nice,
    /// 0..=19): when CPU is short the stream, the source of every answer,
    /// goes first and requests wait.
    pub nice: i32,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig {
            session_boost: 1.0,
            max_k: 200,
            max_body_bytes: 64 * 1024,
            redis_timeout: Duration::from_millis(50),
            threads: 1,
            nice: 10,
        }
    }
}

impl SessionsConfig {
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        if self.idle_gap.as_secs() == 0 {
            errs.push("sessions.idle_gap: must be at least 1s".into());
        }
        for (name, v) in [
            ("sessions.max_items", self.max_items),
            ("sessions.max_users", self.max_users),
        ] {
            if v == 0 {
                errs.push(format!("{name}: must be at least 1"));
            }
        }
    }
}

impl ServingConfig {
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        if !(self.session_boost.is_finite() && self.session_boost >= 0.0) {
            errs.push("serving.session_boost: must be a finite number >= 0".into());
        }
        if !(0..=19).contains(&self.nice) {
            errs.push("serving.nice: must be between 0 and 19".into());
        }
        if self.threads == 0 {
            errs.push("serving.threads: must be at least 1".into());
        }
        if self.max_k == 0 {
            errs.push("serving.max_k: must be at least 1".into());
        }
        if self.max_body_bytes < 256 {
            errs.push("serving.max_body_bytes: must be at least 256".into());
        }
        if self.redis_timeout.is_zero() {
            errs.push("serving.redis_timeout: must be more than 0".into());
        }
    }
}

/// The merchant stage and the replicated merchant-feature table
/// (docs/ARCHITECTURE.md, "Scale-out").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MerchantsConfig {
    /// A merchant's features are published to `merchant-features` at most
    /// once per this interval (wall clock); changes in between are merged.
    #[serde(with = "humantime_serde")]
    pub publish_interval: Duration,
    /// Consumer group of the merchant stage (the reader of the repartition
    /// topic); default `{kafka.group_id}.merchants`.
    pub group: Option<String>,
}

impl Default for MerchantsConfig {
    fn default() -> Self {
        MerchantsConfig {
            publish_interval: Duration::from_millis(500),
            group: None,
        }
    }
}

impl MerchantsConfig {
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        if self.publish_interval < Duration::from_millis(10) {
            errs.push("merchants.publish_interval: must be at least 10ms".into());
        }
    }
}

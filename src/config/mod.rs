//! Pipeline configuration: typed, strict, layered.
//!
//! Layers, later wins: built-in defaults (the functions below), then the TOML
//! file (`config/streamscore.toml` documents every key), then environment
//! variables `STREAMSCORE__SECTION__KEY` (e.g. `STREAMSCORE__KAFKA__BROKERS`).
//! Unknown keys are errors that name the key. [`Config::load`] then runs the
//! cross-field checks of [`Config::validate`] and reports every problem at
//! once, each naming its field, before any work starts.
//!
//! librdkafka options pass straight through (`[kafka.common]`,
//! `[kafka.consumer]`, `[kafka.producer]`), so SASL/TLS settings need no code.
//! Values of keys that look secret are masked in `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod kafka;
mod recs;
mod serving;
pub use kafka::KafkaConfig;
pub use recs::{Compression, RecsConfig};
pub use serving::{MerchantsConfig, ServingConfig, SessionsConfig};

/// Prefix of environment overrides; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "STREAMSCORE__";

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub processing: ProcessingConfig,
    pub windows: WindowConfig,
    pub model: ModelConfig,
    pub redis: RedisConfig,
    pub http: HttpConfig,
    pub recs: RecsConfig,
    pub sessions: SessionsConfig,
    pub serving: ServingConfig,
    pub merchants: MerchantsConfig,
}

/// How events are taken, batched, validated and acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    /// Most events in one micro-batch (features, one model run, one Redis pipeline).
    pub batch_max_events: usize,
    /// Longest wait for a batch to fill once its first event arrived.
    #[serde(with = "humantime_serde")]
    pub batch_max_wait: Duration,
    /// Batches whose outputs may await acknowledgement at once (bounds memory).
    pub max_in_flight_batches: usize,
    /// Larger messages go to the dead-letter topic as `oversize`.
    pub max_message_bytes: usize,
    /// Events stamped further than this in the future are rejected.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// How often stored offsets are committed to the group.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Longest graceful shutdown (drain, flush, commit) before exiting anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        ProcessingConfig {
            batch_max_events: 512,
            batch_max_wait: Duration::from_millis(2),
            max_in_flight_batches: 8,
            max_message_bytes: 64 * 1024,
            max_future_skew: Duration::from_secs(3600),
            commit_interval: Duration::from_secs(1),
            shutdown_deadline: Duration::from_secs(30),
        }
    }
}

/// Event-time windows. Horizons are fixed by the feature set (1 min, 1 h,
/// 24 h); the bucket width of each is configurable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Bucket width of the 1-minute windows.
    #[serde(with = "humantime_serde")]
    pub minute_bucket: Duration,
    /// Bucket width of the 1-hour windows.
    #[serde(with = "humantime_serde")]
    pub hour_bucket: Duration,
    /// Bucket width of the 24-hour windows.
    #[serde(with = "humantime_serde")]
    pub day_bucket: Duration,
    /// Events up to this far behind the newest event time of their partition
    /// update their bucket; older ones are counted as late and scored only.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How often idle keys (no event for 24 h + grace of event time) are evicted.
    #[serde(with = "humantime_serde")]
    pub eviction_interval: Duration,
    /// Most users held; beyond it the least recently active are evicted
    /// (about 1.7 KB each: the default bounds user state near 1.7 GB).
    pub max_users: usize,
    /// Most merchants held; beyond it the least recently active are evicted.
    pub max_merchants: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            minute_bucket: Duration::from_secs(5),
            hour_bucket: Duration::from_secs(300),
            day_bucket: Duration::from_secs(3600),
            grace: Duration::from_secs(300),
            eviction_interval: Duration::from_secs(30),
            max_users: 1_000_000,
            max_merchants: 200_000,
        }
    }
}

/// The fraud model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// ONNX file: float32 input `[N, n_features]`, probability output.
    pub path: PathBuf,
    /// Sidecar JSON: version, input/output names and feature names in order.
    pub signature: PathBuf,
    /// Score at or above which the decision is `flag`.
    pub threshold: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: PathBuf::from("models/fraud.onnx"),
            signature: PathBuf::from("models/fraud.json"),
            threshold: 0.5,
        }
    }
}

/// Redis sink.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix put before every key (isolates environments and tests).
    pub key_prefix: String,
    /// TTL of `fraud:txn:{txn_id}` and `fraud:user:{user_id}:latest`.
    #[serde(with = "humantime_serde")]
    pub score_ttl: Duration,
    /// Consumer group of the Redis writer that follows `fraud-scores` into
    /// Redis; default `{kafka.group_id}.redis-writer`.
    pub writer_group: Option<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: String::new(),
            score_ttl: Duration::from_secs(7 * 24 * 3600),
            writer_group: None,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: show only what follows '@'.
        let url = match self.url.rsplit_once('@') {
            Some((_, host)) => format!("redis://***@{host}"),
            None => self.url.clone(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &url)
            .field("key_prefix", &self.key_prefix)
            .field("score_ttl", &self.score_ttl)
            .field("writer_group", &self.writer_group)
            .finish()
    }
}

/// HTTP endpoint: the `/v1` API, `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub bind: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// A configuration that could not be loaded; the message names the field(s).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Extract {
        path: String,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Defaults, then `path` (if given; it must exist), then `STREAMSCORE__…`
    /// environment variables; then validation.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, Env::prefixed(ENV_PREFIX).split("__"))
    }

    fn load_with_env(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let shown = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(none)".into());
        if let Some(p) = path {
            if !p.is_file() {
                return Err(ConfigError::Invalid(vec![format!(
                    "config file {} does not exist",
                    p.display()
                )]));
            }
            fig = fig.merge(Toml::file(p));
        }
        let cfg: Config = fig.merge(env).extract().map_err(|e| ConfigError::Extract {
            path: shown,
            source: Box::new(e),
        })?;
        cfg.validate().map_err(ConfigError::Invalid)?;
        Ok(cfg)
    }

    /// Parses a TOML string over the defaults (no environment); for tests and tools.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Extract {
                path: "(string)".into(),
                source: Box::new(e),
            })?;
        cfg.validate().map_err(ConfigError::Invalid)?;
        Ok(cfg)
    }

    /// Cross-field checks; every problem found, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        self.recs.validate(&mut errs);
        self.sessions.validate(&mut errs);
        self.serving.validate(&mut errs);
        self.merchants.validate(&mut errs);
        self.kafka.validate(&mut errs);
        let p = &self.processing;
        if p.batch_max_events == 0 {
            errs.push("processing.batch_max_events: must be at least 1".into());
        }
        if p.max_in_flight_batches == 0 {
            errs.push("processing.max_in_flight_batches: must be at least 1".into());
        }
        if p.max_message_bytes < 64 {
            errs.push("processing.max_message_bytes: must be at least 64".into());
        }
        if p.commit_interval.is_zero() {
            errs.push("processing.commit_interval: must be positive".into());
        }
        let w = &self.windows;
        for (name, bucket, horizon) in [
            ("windows.minute_bucket", w.minute_bucket, 60u64),
            ("windows.hour_bucket", w.hour_bucket, 3_600),
            ("windows.day_bucket", w.day_bucket, 86_400),
        ] {
            let ms = bucket.as_millis() as u64;
            if ms < 1_000 || (horizon * 1_000) % ms != 0 {
                errs.push(format!(
                    "{name}: must be at least 1s and divide the {horizon}s horizon evenly (got {})",
                    humantime::format_duration(bucket)
                ));
            } else if horizon * 1_000 / ms > 1_440 {
                errs.push(format!(
                    "{name}: more than 1440 buckets per window; use a wider bucket"
                ));
            }
        }
        if w.max_users < 10 {
            errs.push("windows.max_users: must be at least 10".into());
        }
        if w.max_merchants < 10 {
            errs.push("windows.max_merchants: must be at least 10".into());
        }
        if w.eviction_interval.is_zero() {
            errs.push("windows.eviction_interval: must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.model.threshold) || !self.model.threshold.is_finite() {
            errs.push(format!(
                "model.threshold: must be within [0, 1] (got {})",
                self.model.threshold
            ));
        }
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            errs.push("redis.url: must start with redis:// or rediss://".into());
        }
        if self.redis.score_ttl.as_secs() == 0 {
            errs.push("redis.score_ttl: must be at least 1s".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// The full topic name of a logical topic (`transactions` → `{prefix}transactions`).
    pub fn topic(&self, logical: &str) -> String {
        format!("{}{}", self.kafka.topic_prefix, logical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_file_parses_and_equals_defaults_where_documented() {
        let text = include_str!("../../config/streamscore.toml");
        let cfg = Config::from_toml_str(text).expect("shipped config must load");
        assert_eq!(cfg.processing, ProcessingConfig::default());
        assert_eq!(cfg.windows, WindowConfig::default());
        assert_eq!(cfg.kafka.consumer, kafka::default_consumer_options());
        assert_eq!(cfg.recs.compression, RecsConfig::default().compression);
        assert_eq!(cfg.recs.nice, RecsConfig::default().nice);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml_str("[kafka]\nbrokerz = \"x\"\n").unwrap_err();
        let msg = format!("{err}");
        assert!(msg.contains("brokerz"), "{msg}");
    }

    #[test]
    fn unknown_section_is_an_error_naming_it() {
        let err = Config::from_toml_str("[kafak]\nbrokers = \"x\"\n").unwrap_err();
        assert!(format!("{err}").contains("kafak"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = Config::from_toml_str("[model]\nthreshold = \"high\"\n").unwrap_err();
        let msg = format!("{err}");
        assert!(msg.contains("threshold"), "{msg}");
    }

    #[test]
    fn bad_duration_names_the_field() {
        let err = Config::from_toml_str("[processing]\nbatch_max_wait = \"soon\"\n").unwrap_err();
        assert!(format!("{err}").contains("batch_max_wait"), "{err}");
    }

    #[test]
    fn bad_compression_names_the_field_and_a_codec() {
        let err = Config::from_toml_str("[recs]\ncompression = \"zstd\"\n").unwrap_err();
        let msg = format!("{err}");
        assert!(msg.contains("compression"), "{msg}");
        assert!(msg.contains("lz4"), "{msg}");
        let cfg = Config::from_toml_str("[recs]\ncompression = \"none\"\n").expect("loads");
        assert_eq!(cfg.recs.compression, Compression::None);
    }

    #[test]
    fn cross_field_errors_are_all_reported() {
        let err = Config::from_toml_str(
            "[model]\nthreshold = 1.5\n[windows]\nhour_bucket = \"7m\"\n[processing]\nbatch_max_events = 0\n",
        )
        .unwrap_err();
        let msg = format!("{err}");
        assert!(msg.contains("model.threshold"), "{msg}");
        assert!(msg.contains("windows.hour_bucket"), "{msg}");
        assert!(msg.contains("processing.batch_max_events"), "{msg}");
        let err = Config::from_toml_str("[recs]\nnice = 20\n").unwrap_err();
        assert!(format!("{err}").contains("recs.nice"), "{err}");
    }

    #[test]
    fn librdkafka_options_are_checked_at_load_naming_section_and_key() {
        let err = Config::from_toml_str(
            "[kafka.producer]\n\"compression.type\" = \"zstd\"\n[kafka.consumer]\n\"fetch.wait.max.mz\" = \"10\"\n",
        )
        .unwrap_err();
        let msg = format!("{err}");
        assert!(msg.contains("kafka.producer.\"compression.type\""), "{msg}");
        assert!(msg.contains("zstd"), "{msg}");
        assert!(
            msg.contains("kafka.consumer.\"fetch.wait.max.mz\""),
            "{msg}"
        );
        Config::from_toml_str("[kafka.producer]\n\"compression.type\" = \"lz4\"\n")
            .expect("a valid option loads");
    }

    #[test]
    fn owned_consumer_options_are_rejected() {
        let err =
            Config::from_toml_str("[kafka.consumer]\n\"enable.auto.offset.store\" = \"true\"\n")
                .unwrap_err();
        assert!(
            format!("{err}").contains("enable.auto.offset.store"),
            "{err}"
        );
    }

    #[test]
    fn the_cooperative_assignor_is_rejected_naming_the_key() {
        for (section, value) in [
            ("consumer", "cooperative-sticky"),
            ("common", "range, Cooperative-Sticky"),
        ] {
            let err = Config::from_toml_str(&format!(
                "[kafka.{section}]\n\"partition.assignment.strategy\" = \"{value}\"\n"
            ))
            .unwrap_err();
            let msg = format!("{err}");
            assert!(
                msg.contains(&format!(
                    "kafka.{section}.\"partition.assignment.strategy\""
                )) && msg.contains("eager"),
                "{msg}"
            );
        }
        Config::from_toml_str(
            "[kafka.consumer]\n\"partition.assignment.strategy\" = \"roundrobin\"\n",
        )
        .expect("an eager assignor loads");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn env_overrides_file_and_unknown_env_key_is_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", "[kafka]\nbrokers = \"file:1\"\n")?;
            jail.set_env("STREAMSCORE__KAFKA__BROKERS", "env:2");
            let cfg = Config::load(Some(Path::new("s.toml"))).expect("loads");
            assert_eq!(cfg.kafka.brokers, "env:2");
            jail.set_env("STREAMSCORE__REDIS__URLL", "x");
            let err = Config::load(Some(Path::new("s.toml"))).unwrap_err();
            assert!(format!("{err}").contains("urll"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::load(Some(Path::new("/nonexistent/streamscore.toml"))).unwrap_err();
        assert!(format!("{err}").contains("/nonexistent/streamscore.toml"));
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let mut cfg = Config::default();
        cfg.kafka
            .common
            .insert("sasl.password".into(), "hunter2".into());
        cfg.redis.url = "redis://user:hunter2@host:6379".into();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sasl.password"));
    }
}

//! `[kafka]`: broker connection, group, topic naming and the librdkafka
//! pass-through options, which librdkafka itself checks at load.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Broker connection, group, topic naming and librdkafka pass-through.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group of `streamscore run`.
    pub group_id: String,
    /// Prefix put before every logical topic name of `topics/` (isolates
    /// environments and tests on one broker, like Kafka Streams' application id).
    pub topic_prefix: String,
    /// Static group membership (`group.instance.id`), unique per instance:
    /// a restarted instance takes its partitions back at once instead of
    /// waiting for its old session to expire.
    pub instance_id: Option<String>,
    /// librdkafka options for every client (security settings go here).
    pub common: BTreeMap<String, String>,
    /// librdkafka options for consumers only.
    pub consumer: BTreeMap<String, String>,
    /// librdkafka options for producers only.
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "streamscore".into(),
            topic_prefix: String::new(),
            instance_id: None,
            common: BTreeMap::new(),
            consumer: default_consumer_options(),
            producer: default_producer_options(),
        }
    }
}

/// Consumer defaults. `fetch.wait.max.ms` low keeps latency down on brokers
/// that hold every fetch for the full wait (seen on tansu); a 100 ms
/// `fetch.queue.backoff.ms` avoids ~1 s stalls during catch-up. Heartbeats
/// every second (librdkafka: 3 s): tansu counts only heartbeats as signs of
/// life, and a member's first one after a rebalance comes one interval
/// after its sync; a member silent for `session.timeout.ms` across revoke,
/// rejoin and that interval is evicted while it still processes.
pub(super) fn default_consumer_options() -> BTreeMap<String, String> {
    [
        ("fetch.wait.max.ms", "10"),
        ("fetch.queue.backoff.ms", "100"),
        ("auto.offset.reset", "earliest"),
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Producer defaults: a few ms of linger (0 falls behind at 5,000 msg/s),
/// acks from all replicas, idempotence so retries do not duplicate.
fn default_producer_options() -> BTreeMap<String, String> {
    [
        ("linger.ms", "5"),
        ("acks", "all"),
        ("enable.idempotence", "true"),
        ("compression.type", "none"),
        // Dead letters carry their input base64-encoded: an input of up to
        // 1 MB (a broker's default limit) needs 1.33 MB (topics/: the
        // dead-letter topic allows 4 MiB).
        ("message.max.bytes", "4194304"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with(".key") || k.contains("token")
}

fn masked(map: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter()
        .map(|(k, v)| {
            let v = if is_secret_key(k) { "***" } else { v.as_str() };
            (k.as_str(), v)
        })
        .collect()
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("instance_id", &self.instance_id)
            .field("common", &masked(&self.common))
            .field("consumer", &masked(&self.consumer))
            .field("producer", &masked(&self.producer))
            .finish()
    }
}

impl KafkaConfig {
    /// Checks naming their field. librdkafka options are checked by
    /// librdkafka itself (name and value), so a bad one stops every command
    /// at start-up rather than when its client is created (for `rebuild`,
    /// after the replay).
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        if self.brokers.trim().is_empty() {
            errs.push("kafka.brokers: must not be empty".into());
        }
        if self
            .instance_id
            .as_deref()
            .is_some_and(|i| i.trim().is_empty())
        {
            errs.push("kafka.instance_id: must not be empty when set".into());
        }
        if self.group_id.trim().is_empty() {
            errs.push("kafka.group_id: must not be empty".into());
        }
        for (section, map) in [
            ("kafka.common", &self.common),
            ("kafka.consumer", &self.consumer),
            ("kafka.producer", &self.producer),
        ] {
            for (key, value) in map {
                if let Err(why) = librdkafka_accepts(key, value) {
                    errs.push(format!("{section}.\"{key}\": {why}"));
                }
                if matches!(
                    key.as_str(),
                    "bootstrap.servers" | "group.id" | "group.instance.id"
                ) {
                    errs.push(format!(
                    "{section}.\"{key}\": set it with kafka.brokers / kafka.group_id / kafka.instance_id instead"
                ));
                }
                if section != "kafka.producer"
                    && key == "partition.assignment.strategy"
                    && (value.split(','))
                        .any(|s| s.trim().eq_ignore_ascii_case("cooperative-sticky"))
                {
                    errs.push(format!(
                    "{section}.\"{key}\": cooperative-sticky is not supported: the revocation drain, the windows kept across a rebalance and the hold of gained partitions are built and tested for the eager protocol (range, roundrobin)"
                ));
                }
                if section == "kafka.consumer"
                    && matches!(
                        key.as_str(),
                        "enable.auto.offset.store" | "enable.auto.commit"
                    )
                {
                    errs.push(format!(
                    "{section}.\"{key}\": owned by streamscore (offsets are stored only after outputs are acknowledged)"
                ));
                }
            }
        }
    }
}

/// Whether librdkafka takes `key = value` (a known property, a valid
/// value); its reason when it does not. Only sets the option on a
/// configuration object: no client is created.
fn librdkafka_accepts(key: &str, value: &str) -> Result<(), String> {
    match rdkafka::ClientConfig::new()
        .set(key, value)
        .create_native_config()
    {
        Ok(_) => Ok(()),
        Err(rdkafka::error::KafkaError::ClientConfig(_, why, _, _)) => Err(why),
        Err(e) => Err(e.to_string()),
    }
}

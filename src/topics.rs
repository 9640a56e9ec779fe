//! Topic definitions as code: `topics/topics.toml`, compiled into the binary
//! so `streamscore topics apply` works from anywhere, and overridable with a
//! file for other layouts.

use std::path::Path;

use serde::Deserialize;

/// Logical name of the transaction log.
pub const TRANSACTIONS: &str = "transactions";
/// Logical name of the interaction log.
pub const INTERACTIONS: &str = "interactions";
/// Logical name of the fraud score output.
pub const FRAUD_SCORES: &str = "fraud-scores";
/// Logical name of the recommendation output (compacted).
pub const RECOMMENDATIONS: &str = "recommendations";
/// Logical name of the dead-letter topic.
pub const DEAD_LETTER: &str = "dead-letter";
/// Logical name of the internal topic the stream re-keys accepted
/// transactions onto by merchant (the merchant stage's input).
pub const MERCHANT_REPARTITION: &str = "merchant-repartition";
/// Logical name of the compacted merchant-feature table (changelog).
pub const MERCHANT_FEATURES: &str = "merchant-features";

/// The shipped definitions.
pub const BUILTIN: &str = include_str!("../topics/topics.toml");

/// One topic: name and the settings `topics apply` enforces.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// What the message key is (documentation).
    pub key: String,
    /// `retention.ms`; -1 is unlimited.
    pub retention_ms: i64,
    /// `cleanup.policy`: `delete` or `compact`.
    pub cleanup_policy: String,
    /// `max.message.bytes`, when the broker default (1 MB on Kafka) is not
    /// enough (the dead-letter topic carries inputs base64-encoded).
    #[serde(default)]
    pub max_message_bytes: Option<i64>,
    pub description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFile {
    topic: Vec<TopicSpec>,
}

/// Parses and checks a definitions file's text.
pub fn parse(text: &str) -> anyhow::Result<Vec<TopicSpec>> {
    let file: TopicsFile = toml::from_str(text)?;
    let mut errs = Vec::new();
    for t in &file.topic {
        if t.name.is_empty() {
            errs.push("topic.name: must not be empty".to_string());
        }
        if t.partitions < 1 {
            errs.push(format!("topic {}: partitions must be at least 1", t.name));
        }
        if t.replication_factor < 1 {
            errs.push(format!(
                "topic {}: replication_factor must be at least 1",
                t.name
            ));
        }
        if !matches!(t.cleanup_policy.as_str(), "delete" | "compact") {
            errs.push(format!(
                "topic {}: cleanup_policy must be delete or compact (got {})",
                t.name, t.cleanup_policy
            ));
        }
        if t.retention_ms < -1 || t.retention_ms == 0 {
            errs.push(format!(
                "topic {}: retention_ms must be -1 or positive",
                t.name
            ));
        }
    }
    for required in [
        TRANSACTIONS,
        INTERACTIONS,
        FRAUD_SCORES,
        RECOMMENDATIONS,
        DEAD_LETTER,
        MERCHANT_REPARTITION,
        MERCHANT_FEATURES,
    ] {
        if !file.topic.iter().any(|t| t.name == required) {
            errs.push(format!("topic {required}: missing from the definitions"));
        }
    }
    if !errs.is_empty() {
        anyhow::bail!("invalid topic definitions:\n  - {}", errs.join("\n  - "));
    }
    Ok(file.topic)
}

/// The shipped definitions, or those of `path`.
pub fn load(path: Option<&Path>) -> anyhow::Result<Vec<TopicSpec>> {
    match path {
        None => parse(BUILTIN),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
            parse(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", p.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_definitions_are_valid_and_logs_keep_everything() {
        let topics = parse(BUILTIN).unwrap();
        for log in [TRANSACTIONS, INTERACTIONS] {
            let t = topics.iter().find(|t| t.name == log).unwrap();
            assert_eq!(t.retention_ms, -1, "{log} is the kappa log");
            assert_eq!(t.cleanup_policy, "delete");
        }
        let recs = topics.iter().find(|t| t.name == RECOMMENDATIONS).unwrap();
        assert_eq!(recs.cleanup_policy, "compact");
        let table = topics.iter().find(|t| t.name == MERCHANT_FEATURES).unwrap();
        assert_eq!(table.cleanup_policy, "compact");
        // The merchant stage's warm-up replays the window horizon (25 h 5 m)
        // of the repartition topic.
        let rep = topics
            .iter()
            .find(|t| t.name == MERCHANT_REPARTITION)
            .unwrap();
        assert!(rep.retention_ms >= 2 * 86_400_000, "{}", rep.retention_ms);
    }

    #[test]
    fn bad_definitions_are_reported() {
        let err = parse(
            "[[topic]]\nname='x'\npartitions=0\nreplication_factor=1\nkey='k'\nretention_ms=-1\ncleanup_policy='nope'\ndescription=''\n",
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("partitions"), "{msg}");
        assert!(msg.contains("cleanup_policy"), "{msg}");
        assert!(msg.contains("topic transactions: missing"), "{msg}");
    }
}

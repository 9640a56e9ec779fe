//! `streamscore topics apply`: creates the topics of `topics/` that are
//! missing and checks those that exist. Idempotent.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::Config;
use crate::topics::TopicSpec;

/// What `apply` did with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    Created,
    Exists,
    /// The topic exists with another partition count than declared.
    PartitionMismatch {
        declared: i32,
        actual: i32,
    },
}

/// One line of the apply report.
#[derive(Debug, Clone)]
pub struct TopicReport {
    pub name: String,
    pub outcome: TopicOutcome,
}

/// Creates missing topics (with retention and cleanup policy) and reports
/// existing ones, with any partition-count difference.
pub async fn apply(cfg: &Config, specs: &[TopicSpec]) -> anyhow::Result<Vec<TopicReport>> {
    let admin: AdminClient<DefaultClientContext> =
        crate::kafka::base_config(&cfg.kafka).create()?;
    let timeout = Duration::from_secs(15);
    let retention: Vec<String> = specs.iter().map(|s| s.retention_ms.to_string()).collect();
    let max_bytes: Vec<Option<String>> = specs
        .iter()
        .map(|s| s.max_message_bytes.map(|b| b.to_string()))
        .collect();
    let names: Vec<String> = specs.iter().map(|s| cfg.topic(&s.name)).collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&names)
        .zip(retention.iter().zip(&max_bytes))
        .map(|((s, name), (ret, max))| {
            let t = NewTopic::new(
                name,
                s.partitions,
                TopicReplication::Fixed(s.replication_factor),
            )
            .set("retention.ms", ret)
            .set("cleanup.policy", &s.cleanup_policy);
            match max {
                Some(m) => t.set("max.message.bytes", m),
                None => t,
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let results = admin.create_topics(new_topics.iter(), &opts).await?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, timeout)
        .map_err(|e| anyhow::anyhow!("fetching metadata from {}: {e}", cfg.kafka.brokers))?;
    let mut report = Vec::new();
    for (res, (spec, name)) in results.into_iter().zip(specs.iter().zip(&names)) {
        let created = match res {
            Ok(_) => true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => false,
            Err((t, code)) => anyhow::bail!("creating topic {t}: {code}"),
        };
        let actual = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.partitions().len() as i32);
        let outcome = match actual {
            Some(a) if a != spec.partitions && !created => TopicOutcome::PartitionMismatch {
                declared: spec.partitions,
                actual: a,
            },
            _ if created => TopicOutcome::Created,
            _ => TopicOutcome::Exists,
        };
        report.push(TopicReport {
            name: name.clone(),
            outcome,
        });
    }
    Ok(report)
}

//! Kafka clients: configuration, topic administration, producing with
//! backpressure, and the consumer context that logs rebalances.

pub mod admin;
pub mod batch;
pub mod follow;
pub mod produce;
pub mod replay;

use rdkafka::config::ClientConfig;
use rdkafka::TopicPartitionList;

use crate::config::KafkaConfig;

/// The client configuration shared by every client: brokers plus the
/// `[kafka.common]` pass-through options.
pub fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.common {
        cc.set(k, v);
    }
    cc
}

/// Producer configuration: common, then `[kafka.producer]` options.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = base_config(cfg);
    for (k, v) in &cfg.producer {
        cc.set(k, v);
    }
    cc
}

/// Consumer configuration for `group`: common, then `[kafka.consumer]`
/// options, then the settings streamscore owns: offsets are stored by the
/// pipeline only after a message's outputs are acknowledged, and committed in
/// the background every `commit_interval`; pre-fetch bounded
/// ([`bound_prefetch`]).
pub fn consumer_config(cfg: &KafkaConfig, group: &str, commit_interval_ms: u64) -> ClientConfig {
    let mut cc = base_config(cfg);
    cc.set("group.id", group);
    if let Some(id) = &cfg.instance_id {
        cc.set("group.instance.id", id);
    }
    bound_prefetch(&mut cc, cfg);
    for (k, v) in &cfg.consumer {
        cc.set(k, v);
    }
    cc.set("enable.auto.commit", "true");
    cc.set("auto.commit.interval.ms", commit_interval_ms.to_string());
    cc.set("enable.auto.offset.store", "false");
    cc.set("enable.partition.eof", "false");
    cc
}

/// The partitions of a list. rdkafka 0.36 builds a slice from the list's
/// element pointer even when the list is empty (null), which a debug build
/// of current Rust rejects with a panic: never touch the elements of an
/// empty list.
pub fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    if tpl.count() == 0 {
        return Vec::new();
    }
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// Configuration of a consumer that only reads (replays, rebuilds): common
/// and `[kafka.consumer]` options, a one-off `group` that never commits.
pub fn reader_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    let mut cc = base_config(cfg);
    for (k, v) in &cfg.consumer {
        cc.set(k, v);
    }
    cc.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    cc
}

/// Most pre-fetched data a consumer of `run` (the stream, the Redis writer,
/// the sessions follower, the merchant stage and table) queues, unless
/// `[kafka.consumer]` sets `queued.max.messages.kbytes`. librdkafka's
/// default, 64 MB per consumer, let every consumer that runs behind hold 64
/// MB of backlog in memory: a 3 M key flood grew RSS by 230 MB with the key
/// store full, all of it pre-fetched records. 16 MB is still ~50,000
/// transactions ahead of the stream.
pub const CONSUMER_QUEUE_KBYTES: &str = "16384";

/// Bounds a consumer's pre-fetch queue ([`CONSUMER_QUEUE_KBYTES`]).
pub fn bound_prefetch(cc: &mut ClientConfig, cfg: &KafkaConfig) {
    if !cfg.consumer.contains_key("queued.max.messages.kbytes") {
        cc.set("queued.max.messages.kbytes", CONSUMER_QUEUE_KBYTES);
    }
}

/// The partitions of `topic` on the broker, sorted; an error naming the
/// fix when the topic does not exist.
pub fn topic_partitions<C, X>(c: &C, topic: &str) -> anyhow::Result<Vec<i32>>
where
    C: rdkafka::consumer::Consumer<X>,
    X: rdkafka::consumer::ConsumerContext,
{
    use anyhow::Context;
    let md = c
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(15))
        .with_context(|| format!("fetching metadata of topic {topic}"))?;
    let mut partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        anyhow::bail!(
            "topic {topic} does not exist on the broker; create the topics with `streamscore topics apply`"
        );
    }
    partitions.sort_unstable();
    Ok(partitions)
}

/// Drops a consumer (librdkafka closes it: leaves the group, which serves a
/// last revoke) on its own thread and waits at most `within`. Closing while
/// a rebalance is in progress can wait for the group for minutes (seen with
/// tansu 0.6 when several instances stop at once); offsets are committed
/// before this, so a close that does not finish in time is left behind and
/// the process exits anyway.
pub fn close_within<T: Send + 'static>(
    consumer: T,
    what: &'static str,
    within: std::time::Duration,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("close {what}"))
        .spawn(move || {
            drop(consumer);
            let _ = tx.send(());
        });
    match spawned {
        Ok(_) => {
            if rx.recv_timeout(within).is_err() {
                tracing::warn!(
                    "{what}: consumer close did not finish within {within:?}; not waiting for it"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "{what}: no thread to close the consumer on"),
    }
}

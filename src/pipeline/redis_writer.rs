//! The Redis writer: Redis is a cache of the `fraud-scores` topic, kept by a
//! follower of that topic with its own consumer group and committed offsets.
//!
//! Scoring never waits for Redis: the fraud path's offsets depend on Kafka
//! acknowledgements only. This task reads `fraud-scores` in micro-batches,
//! writes each batch in one Redis pipeline (retried with backoff until it
//! succeeds) and only then stores the batch's offsets. While Redis is down the
//! writer stops reading (its backlog stays in Kafka, so memory does not grow)
//! and scoring goes on; when Redis returns the writer catches up from its
//! committed offsets, so nothing that belongs in Redis is missing.
//!
//! A user's scores can sit in different partitions (the topic is keyed by
//! txn id), so `fraud:user:{id}:latest` is only replaced by a score whose
//! event time is not older than the one it holds (a compare-and-set script).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka;
use crate::metrics::Metrics;
use crate::sinks::redis::{RedisSink, ScoreEntry};

/// The consumer group of the Redis writer for a pipeline group.
pub fn writer_group(cfg: &Config) -> String {
    cfg.redis
        .writer_group
        .clone()
        .unwrap_or_else(|| format!("{}.redis-writer", cfg.kafka.group_id))
}

/// Tells the writer that its assignment changed (positions start over).
#[derive(Default)]
pub struct WriterContext {
    rebalanced: AtomicBool,
}

impl ClientContext for WriterContext {}

impl ConsumerContext for WriterContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if !matches!(rebalance, Rebalance::Error(_)) {
            self.rebalanced.store(true, Ordering::Release);
        }
    }
}

type WriterConsumer = StreamConsumer<WriterContext>;

/// The fields of a score the cache needs (the value is the record itself).
#[derive(Deserialize)]
struct ScoreHead<'a> {
    #[serde(borrow)]
    txn_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    user_id: std::borrow::Cow<'a, str>,
    event_time: i64,
    scored_at: i64,
}

/// One micro-batch of scores to cache.
struct Batch {
    entries: Vec<ScoreEntry>,
    /// Next offset per partition once the batch is written.
    offsets: HashMap<i32, i64>,
    /// Newest `scored_at` in the batch.
    newest: i64,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            entries: Vec::new(),
            offsets: HashMap::new(),
            newest: i64::MIN,
        }
    }
}

impl Batch {
    fn take(
        &mut self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        next_expected: &mut HashMap<i32, i64>,
        metrics: &Metrics,
    ) {
        let (p, o) = (m.partition(), m.offset());
        let next = next_expected.entry(p).or_insert(i64::MIN);
        if o < *next {
            // Delivered again (tansu 0.6): already written.
            metrics.redelivered_skipped.inc();
            return;
        }
        *next = o + 1;
        self.offsets.insert(p, o + 1);
        let payload = m.payload().unwrap_or_default();
        match serde_json::from_slice::<ScoreHead<'_>>(payload) {
            Ok(h) => {
                self.newest = self.newest.max(h.scored_at);
                self.entries.push(ScoreEntry {
                    txn_id: h.txn_id.into_owned(),
                    user_id: h.user_id.into_owned(),
                    event_time: h.event_time,
                    json: payload.into(),
                });
            }
            Err(e) => {
                // Only streamscore writes this topic; say so and go on.
                metrics.redis_skipped.inc();
                tracing::warn!(error = %e, partition = p, offset = o,
                    "a fraud-scores record is not a score; not cached");
            }
        }
    }
}

/// What the lag reporter needs from the writer loop.
#[derive(Default)]
struct Progress {
    /// Next offset to write, per partition.
    positions: Mutex<HashMap<i32, i64>>,
    /// `scored_at` of the newest score written (epoch ms).
    newest_scored_at: std::sync::atomic::AtomicI64,
}

/// Follows `fraud-scores` into Redis until `shutdown`, then commits what it
/// wrote. Runs inside `streamscore run`.
pub async fn run(cfg: Config, metrics: Metrics, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topic = cfg.topic(crate::topics::FRAUD_SCORES);
    let group = writer_group(&cfg);
    let mut cc = kafka::consumer_config(
        &cfg.kafka,
        &group,
        cfg.processing.commit_interval.as_millis() as u64,
    );
    // Static membership follows the pipeline's: a restarted instance takes
    // its writer partitions back at once too.
    if let Some(id) = &cfg.kafka.instance_id {
        cc.set("group.instance.id", format!("{id}.redis-writer"));
    }
    let consumer: Arc<WriterConsumer> = Arc::new(
        cc.create_with_context(WriterContext::default())
            .context("creating the Redis writer's consumer")?,
    );
    consumer
        .subscribe(&[&topic])
        .with_context(|| format!("subscribing the Redis writer to {topic}"))?;
    // Connected lazily, and afresh after any failed write: Redis may be
    // down at start or go away later, and scoring is not waiting for it.
    let mut redis: Option<RedisSink> = None;
    tracing::info!(topic = %topic, group = %group, "Redis writer following");
    let progress = Arc::new(Progress::default());
    let reporter = tokio::spawn(report_lag(
        consumer.clone(),
        topic.clone(),
        progress.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let max = cfg.processing.batch_max_events;
    let wait = cfg.processing.batch_max_wait.max(Duration::from_millis(5));
    let mut next_expected: HashMap<i32, i64> = HashMap::new();
    let result = loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            m = consumer.recv() => m,
        };
        if consumer.context().rebalanced.swap(false, Ordering::AcqRel) {
            next_expected.clear();
        }
        let mut batch = Batch::default();
        match first {
            Ok(m) => batch.take(&m, &mut next_expected, &metrics),
            Err(e) => {
                tracing::warn!(error = %e, "Redis writer: Kafka consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while batch.entries.len() < max {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.take(&m, &mut next_expected, &metrics),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Redis writer: Kafka consumer error; continuing");
                    break;
                }
                Err(_) => break,
            }
        }
        let Batch {
            entries,
            offsets,
            newest,
        } = batch;
        // Retry until written; a shutdown meanwhile leaves the batch to be
        // re-read (its offsets are not stored).
        let mut backoff = Duration::from_millis(50);
        let written = loop {
            match write(&mut redis, &cfg, &entries).await {
                Ok(()) => break true,
                Err(e) => {
                    redis = None;
                    metrics.redis_errors.inc();
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?backoff,
                        "Redis write failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        if !written {
            break Ok(());
        }
        metrics.redis_written.inc_by(entries.len() as u64);
        if newest != i64::MIN {
            progress
                .newest_scored_at
                .fetch_max(newest, Ordering::Relaxed);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &offsets {
            tpl.add_partition_offset(&topic, *p, Offset::Offset(*next))?;
        }
        if let Ok(mut pos) = progress.positions.lock() {
            pos.extend(offsets.iter().map(|(p, o)| (*p, *o)));
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "Redis writer: offsets not stored (revoked)");
        }
    };
    reporter.abort();
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "Redis writer: final commit");
    }
    kafka::close_within(consumer, "the Redis writer", Duration::from_secs(5));
    result
}

/// Longest wait for one Redis pipeline (a hung connection counts as failed).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes one batch, connecting first if needed.
async fn write(
    redis: &mut Option<RedisSink>,
    cfg: &Config,
    entries: &[ScoreEntry],
) -> anyhow::Result<()> {
    let sink = match redis {
        Some(s) => s,
        None => redis.insert(RedisSink::connect(&cfg.redis).await?),
    };
    match tokio::time::timeout(WRITE_TIMEOUT, sink.write_scores(entries)).await {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("no answer from Redis within {WRITE_TIMEOUT:?}"),
    }
}

/// Every few seconds: how far Redis is behind `fraud-scores`, in messages
/// (high watermark − next offset to write, summed over the writer's
/// partitions) and in seconds (now − newest score written, while behind).
async fn report_lag(
    consumer: Arc<WriterConsumer>,
    topic: String,
    progress: Arc<Progress>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let positions: Vec<(i32, i64)> = match progress.positions.lock() {
            Ok(p) => p.iter().map(|(k, v)| (*k, *v)).collect(),
            Err(_) => return,
        };
        let assigned = consumer
            .assignment()
            .ok()
            .map(|tpl| crate::kafka::partitions_of(&tpl))
            .unwrap_or_default();
        // High watermarks from the broker (a blocking call: off the runtime).
        let highs = {
            let (consumer, topic, assigned) = (consumer.clone(), topic.clone(), assigned.clone());
            tokio::task::spawn_blocking(move || {
                assigned
                    .into_iter()
                    .filter_map(|p| {
                        consumer
                            .fetch_watermarks(&topic, p, Duration::from_secs(1))
                            .ok()
                            .map(|(_, high)| (p, high))
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default()
        };
        let mut behind = 0i64;
        for (p, high) in highs {
            let written = positions.iter().find(|(q, _)| *q == p).map(|(_, o)| *o);
            // Nothing written yet since assignment: the consumer's position.
            let pos = match written {
                Some(o) => o,
                None => match position_of(&consumer, &topic, p) {
                    Some(o) => o,
                    None => continue,
                },
            };
            if high > pos {
                behind += high - pos;
            }
        }
        metrics.redis_lag_messages.set(behind);
        let newest = progress.newest_scored_at.load(Ordering::Relaxed);
        let secs = if behind > 0 && newest > 0 {
            (crate::now_ms() - newest).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        metrics.redis_lag_seconds.set(secs);
    }
}

fn position_of(consumer: &WriterConsumer, topic: &str, partition: i32) -> Option<i64> {
    let tpl = consumer.position().ok()?;
    match tpl.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

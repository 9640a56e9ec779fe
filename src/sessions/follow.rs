//! The session follower: consumes `interactions` with its own consumer
//! group (`sessions.group`, default `{kafka.group_id}.sessions`) and folds
//! every valid interaction into the [`SessionStore`]. A malformed
//! interaction goes to the dead-letter topic with its reason; its offset is
//! stored only once Kafka acknowledged the dead letter (at least once).
//!
//! Sessions live in memory. When the follower takes the first message of a
//! partition (start-up, or a rebalance gave it the partition), it first
//! replays that partition from the offset for (the message's event time −
//! idle gap) up to the message, folding without dead-lettering, so a
//! restarted instance serves the same sessions as one that never stopped.
//! As in the fraud path's warm-up, an imprecise offsets-for-times answer
//! (the message before it already inside the gap) falls back to the
//! beginning of the partition.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use super::SessionStore;
use crate::config::Config;
use crate::events::{parse_interaction, Limits};
use crate::kafka::follow::{committed_offset, AssignContext};
use crate::kafka::replay::{self, Start};
use crate::kafka::{self, produce};
use crate::metrics::Metrics;
use crate::pipeline::output::{DeadLetter, SourcePosition};
use crate::topics;

/// The consumer group of the follower.
pub fn group(cfg: &Config) -> String {
    cfg.sessions
        .group
        .clone()
        .unwrap_or_else(|| format!("{}.sessions", cfg.kafka.group_id))
}

/// Follows `interactions` into `store` until `stop` is cancelled.
/// `warming` is true while a partition's sessions are replayed.
pub async fn run(
    cfg: Config,
    store: Arc<SessionStore>,
    metrics: Metrics,
    warming: Arc<AtomicBool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let topic = cfg.topic(topics::INTERACTIONS);
    let dead_topic = cfg.topic(topics::DEAD_LETTER);
    let mut kcfg = cfg.kafka.clone();
    kcfg.instance_id = kcfg.instance_id.map(|id| format!("{id}.sessions"));
    let consumer: StreamConsumer<AssignContext> = kafka::consumer_config(
        &kcfg,
        &group(&cfg),
        cfg.processing.commit_interval.as_millis() as u64,
    )
    .create_with_context(AssignContext::new("sessions"))
    .context("creating the session consumer")?;
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka)
        .create()
        .context("creating the dead-letter producer")?;
    consumer
        .subscribe(&[&topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    tracing::info!(%topic, group = %group(&cfg), "following interactions into sessions");
    let limits = Limits::from_config(&cfg.processing);
    let consumed = metrics
        .events_consumed
        .with_label_values(&[topics::INTERACTIONS]);
    // Per partition: the next offset the sessions hold everything before.
    let mut warmed: HashMap<i32, i64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let replay_limits = limits.for_replay();
    let warm = |partition: i32, start: Start, until: i64| {
        let (kafka, topic, store, limits, warming) = (
            cfg.kafka.clone(),
            topic.clone(),
            store.clone(),
            replay_limits,
            warming.clone(),
        );
        async move {
            warming.store(true, Ordering::Relaxed);
            let r = tokio::task::spawn_blocking(move || {
                replay(&kafka, &topic, partition, start, until, &limits, &store)
            })
            .await;
            warming.store(false, Ordering::Relaxed);
            match r {
                Ok(Ok(n)) => {
                    tracing::info!(
                        partition,
                        events = n,
                        until,
                        "sessions rebuilt from the log"
                    )
                }
                // Serving without the older part of the sessions is better
                // than not following at all.
                Ok(Err(e)) => {
                    tracing::warn!(
                        partition,
                        error = format!("{e:#}"),
                        "session warm-up failed"
                    )
                }
                Err(e) => tracing::warn!(partition, error = %e, "session warm-up task failed"),
            }
        }
    };
    loop {
        if let Some((revoked, assigned)) = consumer.context().take() {
            for p in &revoked {
                warmed.remove(p);
            }
            store.drop_partitions(&revoked);
            // Newly assigned: rebuild their sessions up to the committed
            // offset now, not at their next message (a quiet partition's
            // sessions must be served too).
            for p in assigned {
                if warmed.contains_key(&p) {
                    continue;
                }
                let committed = committed_offset(&consumer, &topic, p);
                if let Some(c) = committed.filter(|c| *c > 0) {
                    warm(p, Start::HorizonBefore, c).await;
                    warmed.insert(p, c);
                }
            }
        }
        let m = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = consumer.context().wake.notified() => continue,
            _ = tick.tick() => {
                store.expire();
                report(&store, &metrics);
                continue;
            }
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "session consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let partition = m.partition();
        let payload = m.payload().unwrap_or_default();
        let parsed = parse_interaction(payload, crate::now_ms(), &limits);
        match warmed.get(&partition).copied() {
            // Never warmed (no committed offset): the gap before this message.
            None => warm(partition, Start::HorizonBefore, m.offset()).await,
            // A broker that resumes past the committed offset (tansu 0.6
            // skips the rest of a record batch): fold what it skipped.
            Some(next) if m.offset() > next => {
                warm(partition, Start::Offset(next), m.offset()).await
            }
            Some(next) if m.offset() < next => continue, // delivered again
            Some(_) => {}
        }
        warmed.insert(partition, m.offset() + 1);
        consumed.inc();
        match parsed {
            Ok(i) => store.add(partition, &i),
            Err(rej) => {
                let source = SourcePosition {
                    topic: m.topic().to_string(),
                    partition,
                    offset: m.offset(),
                };
                let dl = DeadLetter::new(&rej, &source, m.key(), payload, crate::now_ms());
                let json = serde_json::to_vec(&dl).context("serialising a dead letter")?;
                let key = dl.key();
                // Retried until Kafka takes it: an offset is never stored
                // before its dead letter is acknowledged.
                loop {
                    let r =
                        match produce::enqueue(&producer, &dead_topic, key.as_bytes(), &json, None)
                            .await
                        {
                            Ok(f) => produce::acknowledged(f).await,
                            Err(e) => Err(e),
                        };
                    match r {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "dead letter not delivered; retrying");
                            tokio::select! {
                                _ = stop.cancelled() => return Ok(()),
                                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                    }
                }
                metrics
                    .dead_letter
                    .with_label_values(&[rej.reason.as_str()])
                    .inc();
            }
        }
        if let Err(e) = consumer.store_offset(m.topic(), partition, m.offset()) {
            // Revoked meanwhile: the new owner reads it again.
            tracing::debug!(error = %e, "storing a session offset");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "final session commit");
    }
    kafka::close_within(consumer, "the session follower", Duration::from_secs(5));
    Ok(())
}

fn report(store: &SessionStore, metrics: &Metrics) {
    let (idle, limit) = store.take_evictions();
    metrics
        .evicted_keys
        .with_label_values(&["session", "idle"])
        .inc_by(idle);
    metrics
        .evicted_keys
        .with_label_values(&["session", "limit"])
        .inc_by(limit);
    metrics
        .window_keys
        .with_label_values(&["session"])
        .set(store.len() as i64);
}

/// Replays `partition` from `start` up to `until` (exclusive) into `store`
/// (the idle gap before `until` for [`Start::HorizonBefore`]); returns the
/// interactions folded. Blocking.
pub fn replay(
    kafka_cfg: &crate::config::KafkaConfig,
    topic: &str,
    partition: i32,
    start: Start,
    until: i64,
    limits: &Limits,
    store: &SessionStore,
) -> anyhow::Result<u64> {
    let parse = |b: &[u8]| {
        parse_interaction(b, 0, limits)
            .ok()
            .map(|i| (i.event_time, i))
    };
    let r = replay::Replay {
        kafka: kafka_cfg,
        what: "sessions",
        topic,
        partition,
        start,
        until,
        horizon_ms: store.gap_ms(),
        deadline: Duration::from_secs(300),
        parse: &parse,
    };
    replay::replay(&r, &mut |_, i| store.add(partition, &i))
}

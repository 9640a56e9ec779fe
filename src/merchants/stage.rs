//! The merchant stage: consumes `merchant-repartition` with its own
//! consumer group (`merchants.group`, default `{kafka.group_id}.merchants`),
//! keeps the windows of the merchants of its partitions, and publishes them
//! to `merchant-features`, at most once per `merchants.publish_interval`
//! per merchant.
//!
//! Offsets are stored once a record is folded. When a partition is
//! assigned (start-up, rebalance) the stage first rebuilds its merchants'
//! windows by replaying the window horizon before the committed offset
//! ([`crate::kafka::replay`]), then publishes every merchant it rebuilt: so
//! what a crashed or revoked owner folded but had not published yet reaches
//! the table too. Records the stream forwarded twice (it re-reads from its
//! committed offset after a crash) are recognised by their source position
//! and dropped ([`super::StageState::fold`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use super::{Forwarded, StageState};
use crate::config::Config;
use crate::features::WindowSpec;
use crate::kafka::follow::{committed_offset, AssignContext};
use crate::kafka::replay::{self, Start};
use crate::kafka::{self, produce};
use crate::metrics::Metrics;
use crate::topics;

/// The consumer group of the merchant stage.
pub fn group(cfg: &Config) -> String {
    cfg.merchants
        .group
        .clone()
        .unwrap_or_else(|| format!("{}.merchants", cfg.kafka.group_id))
}

/// Runs the merchant stage until `stop` is cancelled. `warming` is true
/// while a partition's merchants are rebuilt from the log.
pub async fn run(
    cfg: Config,
    metrics: Metrics,
    warming: Arc<AtomicBool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let topic = cfg.topic(topics::MERCHANT_REPARTITION);
    let out_topic = cfg.topic(topics::MERCHANT_FEATURES);
    let mut kcfg = cfg.kafka.clone();
    kcfg.instance_id = kcfg.instance_id.map(|id| format!("{id}.merchants"));
    let cc = kafka::consumer_config(
        &kcfg,
        &group(&cfg),
        cfg.processing.commit_interval.as_millis() as u64,
    );
    let consumer: StreamConsumer<AssignContext> = cc
        .create_with_context(AssignContext::new("merchant stage"))
        .context("creating the merchant stage consumer")?;
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka)
        .create()
        .context("creating the merchant-features producer")?;
    consumer
        .subscribe(&[&topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    tracing::info!(%topic, group = %group(&cfg), "merchant stage consuming");
    let spec = WindowSpec::from(&cfg.windows);
    let interval = cfg.merchants.publish_interval;
    let mut state = StageState::new(spec);
    // Per partition: the next offset the state holds everything before.
    let mut warmed: HashMap<i32, i64> = HashMap::new();
    let mut publish_tick = tokio::time::interval((interval / 2).max(Duration::from_millis(5)));
    publish_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut evict_tick = tokio::time::interval(cfg.windows.eviction_interval);
    evict_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Publisher {
        producer,
        topic: out_topic,
        metrics: metrics.clone(),
    };
    let warm = Warm {
        cfg: &cfg,
        topic: &topic,
        metrics: &metrics,
        warming: &warming,
    };
    loop {
        if let Some((revoked, assigned)) = consumer.context().take() {
            for p in revoked {
                warmed.remove(&p);
                let n = state.drop_partition(p);
                tracing::info!(
                    partition = p,
                    merchants = n,
                    "merchant stage: partition revoked"
                );
            }
            // Rebuild newly assigned partitions now, not at their next
            // message: a quiet partition's merchants must reach the table.
            for p in assigned {
                if warmed.contains_key(&p) {
                    continue;
                }
                if let Some(c) = committed_offset(&consumer, &topic, p).filter(|c| *c > 0) {
                    state = warm.run(state, p, Start::HorizonBefore, c).await;
                    warmed.insert(p, c);
                }
            }
        }
        let m = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = consumer.context().wake.notified() => continue,
            _ = publish_tick.tick() => {
                out.publish(&mut state, interval).await;
                continue;
            }
            _ = evict_tick.tick() => {
                let gone = state.evict_idle();
                out.tombstones(&gone).await;
                report(&state, &metrics);
                metrics.evicted_keys.with_label_values(&["merchant", "idle"]).inc_by(gone.len() as u64);
                continue;
            }
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "merchant stage consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let partition = m.partition();
        match warmed.get(&partition).copied() {
            // Never warmed (no committed offset): the horizon before it.
            None => {
                state = warm
                    .run(state, partition, Start::HorizonBefore, m.offset())
                    .await
            }
            // A broker that resumes past the committed offset (tansu 0.6
            // skips the rest of a record batch): fold what it skipped.
            Some(next) if m.offset() > next => {
                state = warm
                    .run(state, partition, Start::Offset(next), m.offset())
                    .await
            }
            Some(next) if m.offset() < next => continue, // delivered again
            Some(_) => {}
        }
        warmed.insert(partition, m.offset() + 1);
        match serde_json::from_slice::<Forwarded>(m.payload().unwrap_or_default()) {
            Ok(f) => {
                state.fold(partition, m.offset(), &f);
            }
            // Only the stream writes this topic; a record it cannot read is
            // a bug or a foreign writer, not input to dead-letter.
            Err(e) => tracing::warn!(
                partition, offset = m.offset(), error = %e,
                "unreadable merchant-repartition record; skipped"
            ),
        }
        metrics
            .merchant_forwarded_duplicates
            .inc_by(state.take_duplicates());
        if let Err(e) = consumer.store_offset(m.topic(), partition, m.offset()) {
            // Revoked meanwhile: the new owner reads it again.
            tracing::debug!(error = %e, "storing a merchant stage offset");
        }
    }
    // What changed since the last publish goes out before the stop.
    out.publish(&mut state, Duration::ZERO).await;
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "final merchant stage commit");
    }
    kafka::close_within(consumer, "the merchant stage", Duration::from_secs(5));
    Ok(())
}

fn report(state: &StageState, metrics: &Metrics) {
    metrics
        .window_keys
        .with_label_values(&["merchant"])
        .set(state.len() as i64);
    metrics
        .window_state_bytes
        .with_label_values(&["merchant"])
        .set(state.state_bytes() as i64);
}

/// Rebuilds a partition's merchants from the repartition topic.
struct Warm<'a> {
    cfg: &'a Config,
    topic: &'a str,
    metrics: &'a Metrics,
    warming: &'a AtomicBool,
}

impl Warm<'_> {
    /// Replays `[start, until)` of `partition` into `state` and marks the
    /// partition's merchants for publishing. A failed replay is logged:
    /// serving the merchants without their older events is better than not
    /// keeping them at all.
    async fn run(&self, state: StageState, partition: i32, start: Start, until: i64) -> StageState {
        self.warming.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let (kafka_cfg, topic) = (self.cfg.kafka.clone(), self.topic.to_string());
        let horizon_ms = WindowSpec::from(&self.cfg.windows).retention_ms();
        let task = tokio::task::spawn_blocking(move || {
            let mut state = state;
            let parse = |b: &[u8]| {
                serde_json::from_slice::<Forwarded>(b)
                    .ok()
                    .map(|f| (f.event_time, f))
            };
            let r = replay::Replay {
                kafka: &kafka_cfg,
                what: "merchants",
                topic: &topic,
                partition,
                start,
                until,
                horizon_ms,
                deadline: Duration::from_secs(600),
                parse: &parse,
            };
            let res = replay::replay(&r, &mut |offset, f| {
                state.fold(partition, offset, &f);
            });
            (state, res)
        })
        .await;
        self.warming.store(false, Ordering::Relaxed);
        let mut state = match task {
            Ok((state, Ok(n))) => {
                self.metrics.merchant_warmup_events.inc_by(n);
                tracing::info!(
                    partition,
                    events = n,
                    until,
                    seconds = started.elapsed().as_secs_f64(),
                    "merchant stage: windows rebuilt from the log"
                );
                state
            }
            Ok((state, Err(e))) => {
                tracing::warn!(
                    partition,
                    error = format!("{e:#}"),
                    "merchant warm-up failed"
                );
                state
            }
            Err(e) => {
                // The task panicked and took the state with it: start over.
                tracing::error!(partition, error = %e, "merchant warm-up task failed");
                StageState::new(WindowSpec::from(&self.cfg.windows))
            }
        };
        self.metrics
            .merchant_forwarded_duplicates
            .inc_by(state.take_duplicates());
        state.mark_partition_dirty(partition);
        state
    }
}

/// Publishes rows and tombstones to `merchant-features`.
struct Publisher {
    producer: FutureProducer,
    topic: String,
    metrics: Metrics,
}

impl Publisher {
    /// Publishes the rows due and waits for Kafka to take them; a row not
    /// delivered is marked changed again and goes out at the next tick.
    async fn publish(&mut self, state: &mut StageState, interval: Duration) {
        let rows = state.due(Instant::now(), interval, crate::now_ms());
        if rows.is_empty() {
            return;
        }
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let r = match serde_json::to_vec(row) {
                Ok(json) => {
                    produce::enqueue(
                        &self.producer,
                        &self.topic,
                        row.merchant_id.as_bytes(),
                        &json,
                        None,
                    )
                    .await
                }
                Err(e) => {
                    tracing::error!(error = %e, "serialising a merchant row");
                    continue;
                }
            };
            pending.push((row, r));
        }
        for (row, r) in pending {
            let ok = match r {
                Ok(f) => produce::acknowledged(f).await,
                Err(e) => Err(e),
            };
            match ok {
                Ok(()) => self.metrics.merchant_rows_published.inc(),
                Err(e) => {
                    tracing::warn!(merchant = %row.merchant_id, error = %e, "merchant row not delivered; retrying");
                    self.metrics.kafka_produce_errors.inc();
                    state.mark_dirty(&row.merchant_id);
                }
            }
        }
        report(state, &self.metrics);
    }

    /// Tombstones for evicted merchants (best effort: a lost one leaves an
    /// empty-windowed row, which reads as zeros anyway).
    async fn tombstones(&self, ids: &[String]) {
        let mut pending = Vec::with_capacity(ids.len());
        for id in ids {
            match produce::enqueue_opt(&self.producer, &self.topic, id.as_bytes(), None, None).await
            {
                Ok(f) => pending.push(f),
                Err(e) => tracing::warn!(merchant = %id, error = %e, "tombstone not enqueued"),
            }
        }
        for f in pending {
            if produce::acknowledged(f).await.is_ok() {
                self.metrics.merchant_rows_published.inc();
            }
        }
    }
}

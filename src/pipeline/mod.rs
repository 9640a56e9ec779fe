//! `streamscore run`: the fraud path.
//!
//! One consumer group over `transactions`. Messages are taken in micro-batches
//! (up to `batch_max_events`, or `batch_max_wait` after the first). For each
//! message, in log order: parse and validate (a rejection becomes a
//! dead-letter record), compute point-in-time features and fold the event into
//! the windows. The batch is then scored in one model call, its records are
//! enqueued to `fraud-scores` / `dead-letter`, and the batch is handed to the
//! acker through a bounded channel (`max_in_flight_batches`: backpressure).
//!
//! The acker, in batch order, waits for every Kafka delivery of a batch and
//! only then stores its offsets; librdkafka commits stored offsets every
//! `commit_interval`. So an offset is committed only after its outputs are
//! acknowledged by Kafka (at least once; outputs are idempotent by txn id).
//! Failed deliveries are retried, never dropped.
//!
//! Redis is not on this path: [`redis_writer`] follows `fraud-scores` into
//! Redis with its own consumer group, so Redis being down or slow never stops
//! scoring, and Redis catches up from its own committed offsets.

mod ack;
mod consume;
mod context;
mod followers;
pub mod output;
pub mod redis_writer;
mod resume;
mod state;
mod warm_ups;
mod warming;
pub mod warmup;

use ack::{ack_loop, OutRecord, PendingBatch};
pub use context::PipelineContext;
pub use state::{Health, Shared};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::{self, Limits, Reason, Rejection, Transaction};
use crate::features::{FeatureEngine, Features, Lateness};
use crate::kafka::{self, produce};
use crate::merchants::{Forwarded, MerchantTable};
use crate::metrics::Metrics;
use crate::model::FraudModel;
use crate::sinks::redis::RedisSink;
use crate::topics;
use output::{DeadLetter, Decision, FraudScore, MerchantTableUse, SourcePosition};

pub(crate) type Consumer_ = StreamConsumer<PipelineContext>;

/// One accepted transaction waiting for its score.
struct Scored {
    txn: Transaction,
    features: Features,
    late: bool,
    source: SourcePosition,
    /// The merchant-features row used (None: no row for the merchant).
    merchant_row: Option<crate::merchants::RowUsed>,
}

/// One input message, from the stream or recovered from the log.
struct Input<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
}

/// One rejected message, kept whole for its dead-letter record.
struct Rejected {
    rejection: Rejection,
    source: SourcePosition,
    key: Option<Vec<u8>>,
    raw: Vec<u8>,
}

/// Everything the loop needs, built once at start-up.
struct Stage {
    cfg: Config,
    limits: Limits,
    engine: Arc<FeatureEngine>,
    model: Arc<FraudModel>,
    metrics: Metrics,
    producer: FutureProducer,
    scores_topic: Arc<str>,
    dead_topic: Arc<str>,
    lateness: Lateness,
    /// `events_consumed{topic="transactions"}`, resolved once.
    consumed: prometheus::IntCounter,
    in_topic: String,
    health: Arc<Health>,
    /// Partitions whose windows were rebuilt since they were assigned.
    warmed: HashSet<i32>,
    /// The partitions of the last revocation this process had taken
    /// (warmed): it committed their offsets itself, synchronously, so
    /// taking one back needs no settle.
    last_revoked: HashSet<i32>,
    /// How long after an assignment a partition new to this process waits
    /// before its committed offset is read (see `resume::settle_plan`).
    assign_settle: Duration,
    /// Partitions paused for that wait, with the messages they delivered.
    settling: std::collections::BTreeMap<i32, resume::Settling>,
    /// Partitions revoked with their windows kept, in case the next
    /// assignment gives them back (see `resume::forget_revoked`).
    parked: HashMap<i32, resume::Parked>,
    /// Partitions whose windows are rebuilt off the loop (paused), and
    /// warm-ups cancelled by a revocation whose task has not ended.
    warm_ups: warm_ups::WarmUps<rdkafka::message::OwnedMessage>,
    /// Where warm-up tasks report (the consume loop holds the receiver).
    warm_tx: tokio::sync::mpsc::UnboundedSender<warming::WarmDone>,
    /// Held by the warm-up that runs: one at a time.
    warm_lock: Arc<std::sync::Mutex<()>>,
    /// The replicated merchant-features table.
    table: Arc<MerchantTable>,
    /// Where accepted events are forwarded, keyed by merchant.
    repartition_topic: Arc<str>,
    revoked: Arc<context::Revocations>,
    in_flight: Arc<context::InFlight>,
    /// Next offset expected per partition in the current assignment.
    next_offset: HashMap<i32, i64>,
}

impl Stage {
    /// Validates one message and, if good, computes its features (the batch
    /// collects rejections and accepted events in log order).
    fn take<M: Message>(
        &mut self,
        m: &M,
        accepted: &mut Vec<Scored>,
        rejected: &mut Vec<Rejected>,
        offsets: &mut HashMap<i32, i64>,
    ) {
        let input = Input {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload().unwrap_or_default(),
        };
        self.take_input(&input, accepted, rejected, offsets);
    }

    fn take_input(
        &mut self,
        m: &Input<'_>,
        accepted: &mut Vec<Scored>,
        rejected: &mut Vec<Rejected>,
        offsets: &mut HashMap<i32, i64>,
    ) {
        // Offsets only move forward within an assignment; a message at or
        // below one already taken is a redelivery (tansu 0.6 can send the
        // last batch again) and must not be folded or scored twice.
        let next_expected = self.next_offset.entry(m.partition).or_insert(i64::MIN);
        if m.offset < *next_expected {
            self.metrics.redelivered_skipped.inc();
            return;
        }
        *next_expected = m.offset + 1;
        let source = SourcePosition {
            topic: m.topic.to_string(),
            partition: m.partition,
            offset: m.offset,
        };
        self.consumed.inc();
        let next = offsets.entry(source.partition).or_insert(0);
        *next = (*next).max(source.offset + 1);
        let raw = m.payload;
        match events::parse_transaction(raw, crate::now_ms(), &self.limits) {
            Ok(txn) => {
                let late = self.lateness.is_late(source.partition, txn.event_time);
                if late {
                    self.metrics.late_events.inc();
                }
                let mut features = self.engine.process_user_from(source.partition, &txn, !late);
                let merchant_row = self
                    .table
                    .fill(&txn.merchant_id, txn.event_time, &mut features);
                if !features.all_finite() {
                    let rej = Rejection::new(
                        Reason::NonFiniteFeature,
                        format!(
                            "features of {} are not all finite: {:?}",
                            txn.txn_id, features.0
                        ),
                    );
                    rejected.push(Rejected {
                        rejection: rej,
                        source,
                        key: m.key.map(<[u8]>::to_vec),
                        raw: raw.to_vec(),
                    });
                    return;
                }
                accepted.push(Scored {
                    txn,
                    features,
                    late,
                    source,
                    merchant_row,
                });
            }
            Err(rejection) => {
                rejected.push(Rejected {
                    rejection,
                    source,
                    key: m.key.map(<[u8]>::to_vec),
                    raw: raw.to_vec(),
                });
            }
        }
    }

    /// Scores the accepted events and enqueues every output record.
    async fn emit(
        &self,
        accepted: Vec<Scored>,
        rejected: Vec<Rejected>,
        offsets: HashMap<i32, i64>,
        taken_at: Instant,
    ) -> anyhow::Result<PendingBatch> {
        let rows: Vec<Features> = accepted.iter().map(|s| s.features).collect();
        let scores = self.model.score(&rows).context("scoring a batch")?;
        let mut batch = PendingBatch {
            deliveries: Vec::with_capacity(accepted.len() + rejected.len()),
            offsets: offsets.into_iter().collect(),
            event_times: Vec::with_capacity(accepted.len()),
            flagged: 0,
            dead: Vec::new(),
            newest_event_time: i64::MIN,
            taken_at,
        };
        let scored_at = crate::now_ms();
        let version = self.model.version();
        for (s, score) in accepted.into_iter().zip(scores) {
            let used = s.merchant_row.map(|r| MerchantTableUse::new(&r, scored_at));
            match &used {
                Some(u) => self
                    .metrics
                    .merchant_features_age
                    .observe(u.age_ms.max(0) as f64 / 1000.0),
                None => self.metrics.merchant_features_missing.inc(),
            }
            let out = FraudScore::new(
                &s.txn,
                score,
                self.cfg.model.threshold,
                version,
                scored_at,
                s.late,
                &s.features,
                &s.source,
                used,
            );
            self.metrics.fraud_score.observe(f64::from(score));
            if out.decision == Decision::Flag {
                batch.flagged += 1;
            }
            let mut buf = Vec::with_capacity(1024);
            serde_json::to_writer(&mut buf, &out).context("serialising a score")?;
            let rec = OutRecord {
                topic: self.scores_topic.clone(),
                key: s.txn.txn_id.as_bytes().to_vec(),
                payload: buf.into(),
            };
            let fut = produce::enqueue(&self.producer, &rec.topic, &rec.key, &rec.payload, None)
                .await
                .with_context(|| format!("producing to {}", self.scores_topic))?;
            batch.deliveries.push((fut, rec));
            if !s.late {
                // The merchant stage's input; acknowledged before the
                // offset is committed, like the score. (A late event is
                // not folded into windows, here or there.)
                let fwd = Forwarded::new(&s.txn, s.source.partition, s.source.offset, scored_at);
                let rec = OutRecord {
                    topic: self.repartition_topic.clone(),
                    key: s.txn.merchant_id.as_bytes().to_vec(),
                    payload: serde_json::to_vec(&fwd)
                        .context("serialising a forwarded event")?
                        .into(),
                };
                let fut =
                    produce::enqueue(&self.producer, &rec.topic, &rec.key, &rec.payload, None)
                        .await
                        .with_context(|| format!("producing to {}", self.repartition_topic))?;
                batch.deliveries.push((fut, rec));
            }
            batch.event_times.push(s.txn.event_time);
            batch.newest_event_time = batch.newest_event_time.max(s.txn.event_time);
        }
        for r in &rejected {
            let (rej, source) = (&r.rejection, &r.source);
            let dl = DeadLetter::new(rej, source, r.key.as_deref(), &r.raw, scored_at);
            tracing::debug!(reason = dl.reason, detail = %rej.detail, topic = %source.topic,
                partition = source.partition, offset = source.offset, "dead-lettered");
            let rec = OutRecord {
                topic: self.dead_topic.clone(),
                key: dl.key().into_bytes(),
                payload: serde_json::to_vec(&dl)
                    .context("serialising a dead letter")?
                    .into(),
            };
            let fut = produce::enqueue(&self.producer, &rec.topic, &rec.key, &rec.payload, None)
                .await
                .with_context(|| format!("producing to {}", self.dead_topic))?;
            batch.deliveries.push((fut, rec));
            batch.dead.push(rej.reason);
        }
        for (p, _) in &batch.offsets {
            if let Some(t) = self.lateness.newest().get(p) {
                self.metrics
                    .partition_newest_event_time
                    .with_label_values(&[&p.to_string()])
                    .set(t / 1000);
            }
        }
        Ok(batch)
    }

    /// Idle and limit eviction of the user windows (the merchant windows
    /// are the merchant stage's, which evicts and reports its own).
    fn evict(&self) {
        let ((eu, _), stats) = self.engine.evict_idle_by(self.lateness.newest());
        let m = &self.metrics;
        let (lu, _) = self.engine.take_limit_evictions();
        for (store, reason, n) in [("user", "idle", eu as u64), ("user", "limit", lu)] {
            m.evicted_keys.with_label_values(&[store, reason]).inc_by(n);
        }
        m.window_keys
            .with_label_values(&["user"])
            .set(stats.user_keys as i64);
        m.window_state_bytes
            .with_label_values(&["user"])
            .set(stats.user_bytes as i64);
    }
}

/// Fails start-up when a topic the pipeline needs does not exist.
fn check_topics(consumer: &Consumer_, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        kafka::topic_partitions(consumer, name)?;
    }
    Ok(())
}

/// Runs the fraud path until `shutdown` is cancelled, then drains, commits
/// and returns.
pub async fn run(
    cfg: Config,
    metrics: Metrics,
    health: Arc<Health>,
    shared: Shared,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Shared {
        engine,
        model,
        sessions,
        table,
    } = shared;
    metrics
        .model_info
        .with_label_values(&[model.version()])
        .set(1);
    tracing::info!(version = model.version(), path = %cfg.model.path.display(), "model loaded");
    let in_topic = cfg.topic(topics::TRANSACTIONS);
    let revoked = Arc::new(context::Revocations::default());
    let in_flight = Arc::new(context::InFlight::default());
    let scores_topic = cfg.topic(topics::FRAUD_SCORES);
    let dead_topic = cfg.topic(topics::DEAD_LETTER);
    let consumer: Arc<Consumer_> = Arc::new(
        kafka::consumer_config(
            &cfg.kafka,
            &cfg.kafka.group_id,
            cfg.processing.commit_interval.as_millis() as u64,
        )
        .set("statistics.interval.ms", "5000")
        .create_with_context(PipelineContext {
            revoked: revoked.clone(),
            in_flight: in_flight.clone(),
            revoke_wait: cfg.processing.shutdown_deadline,
            consumer_lag: metrics.consumer_lag.clone(),
        })
        .context("creating the Kafka consumer")?,
    );
    let repartition_topic = cfg.topic(topics::MERCHANT_REPARTITION);
    check_topics(
        &consumer,
        &[
            &in_topic,
            &scores_topic,
            &dead_topic,
            &repartition_topic,
            &cfg.topic(topics::MERCHANT_FEATURES),
        ],
    )?;
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka)
        .create()
        .context("creating the Kafka producer")?;
    // A bad URL stops start-up; an unreachable Redis does not (the writer
    // connects and reconnects on its own).
    RedisSink::check_url(&cfg.redis)?;
    consumer.subscribe(&[&in_topic])?;
    tracing::info!(topic = %in_topic, group = %cfg.kafka.group_id, "consuming");

    let (tx, rx) = mpsc::channel::<PendingBatch>(cfg.processing.max_in_flight_batches);
    let acker = tokio::spawn(ack_loop(
        rx,
        consumer.clone(),
        producer.clone(),
        metrics.clone(),
        in_topic.clone(),
        in_flight.clone(),
    ));
    // Redis follows the output topic on its own, and the live sessions
    // follow `interactions` (own groups); both stop with the pipeline. One
    // that fails for good (not Redis being down: that is retried) stops
    // the pipeline, which then exits non-zero.
    let followers_stop = CancellationToken::new();
    let writer = followers::spawn(
        "the Redis writer",
        shutdown.clone(),
        redis_writer::run(cfg.clone(), metrics.clone(), followers_stop.clone()),
    );
    let sessions_task = followers::spawn(
        "the session follower",
        shutdown.clone(),
        crate::sessions::follow::run(
            cfg.clone(),
            sessions,
            metrics.clone(),
            health.sessions_warming.clone(),
            followers_stop.clone(),
        ),
    );
    // The merchant stage (windows of the merchants of the repartition
    // partitions this instance owns) and the replicated table every
    // instance scores with.
    let stage_task = followers::spawn(
        "the merchant stage",
        shutdown.clone(),
        crate::merchants::stage::run(
            cfg.clone(),
            metrics.clone(),
            health.merchants_warming.clone(),
            followers_stop.clone(),
        ),
    );
    let table_task = followers::spawn(
        "the merchant table",
        shutdown.clone(),
        crate::merchants::table::run(
            cfg.clone(),
            table.clone(),
            metrics.clone(),
            followers_stop.clone(),
        ),
    );
    // The periodic recommendation rebuild (recs.rebuild_interval).
    let recs = tokio::spawn(crate::recs::periodic::run(
        cfg.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let (warm_tx, warm_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stage = Stage {
        limits: Limits::from_config(&cfg.processing),
        lateness: Lateness::new(cfg.windows.grace.as_millis() as i64),
        engine,
        model,
        metrics: metrics.clone(),
        producer: producer.clone(),
        scores_topic: scores_topic.into(),
        dead_topic: dead_topic.into(),
        consumed: metrics
            .events_consumed
            .with_label_values(&[topics::TRANSACTIONS]),
        in_topic: in_topic.clone(),
        health: health.clone(),
        warmed: HashSet::new(),
        last_revoked: HashSet::new(),
        assign_settle: resume::assign_settle(&cfg),
        settling: Default::default(),
        parked: HashMap::new(),
        warm_ups: Default::default(),
        warm_tx,
        warm_lock: Arc::default(),
        table: table.clone(),
        repartition_topic: repartition_topic.into(),
        revoked,
        in_flight,
        next_offset: HashMap::new(),
        cfg,
    };
    // Like a GlobalKTable: the table is read to its end before the first
    // event is scored, so a restarted instance scores with every merchant.
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = table.wait_loaded() => {}
    }
    health.running.store(true, Ordering::Relaxed);
    let result = consume::consume_loop(&mut stage, &consumer, &tx, warm_rx, &shutdown).await;
    stage.cancel_warm_ups();
    health.running.store(false, Ordering::Relaxed);
    drop(tx);

    // Drain: every enqueued batch is acknowledged and its offsets stored,
    // within the deadline.
    let deadline = stage.cfg.processing.shutdown_deadline;
    let drained = match tokio::time::timeout(deadline, acker).await {
        Ok(Ok(Ok(()))) => true,
        Ok(Ok(Err(e))) => return Err(e.context("acknowledging outputs")),
        Ok(Err(e)) => anyhow::bail!("acker task failed: {e}"),
        Err(_) => false,
    };
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        // NoOffset: nothing was stored since the last commit.
        if !matches!(
            e,
            KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
        ) {
            tracing::warn!(error = %e, "final commit failed");
        }
    }
    if let Err(e) = producer.flush(Duration::from_secs(5)) {
        tracing::warn!(error = %e, "producer flush at shutdown");
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), recs).await;
    // The writer commits what it cached; the rest is cached on restart.
    followers_stop.cancel();
    followers::join("the Redis writer", writer).await?;
    followers::join("the session follower", sessions_task).await?;
    followers::join("the merchant stage", stage_task).await?;
    followers::join("the merchant table", table_task).await?;
    // Offsets are committed: leaving the group must not hold the exit.
    drop(stage);
    kafka::close_within(consumer, "the pipeline", Duration::from_secs(5));
    result?;
    if !drained {
        anyhow::bail!(
            "shutdown deadline of {} passed with outputs unacknowledged; their events will be re-read on restart",
            humantime::format_duration(deadline)
        );
    }
    tracing::info!("stopped cleanly: outputs acknowledged, offsets committed");
    Ok(())
}

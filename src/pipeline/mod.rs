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
//! A Redis task writes each batch's scores in one pipeline, in batch order,
//! while Kafka acknowledges. The acker, in batch order, waits for every Kafka
//! delivery and the batch's Redis write, and only then stores its offsets;
//! librdkafka commits stored offsets every `commit_interval`. So an offset is
//! committed only after its outputs are acknowledged by Kafka and Redis (at
//! least once; outputs are idempotent by txn id). Failed deliveries and Redis
//! writes are retried, never dropped.

pub mod output;
pub mod warmup;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::{self, Limits, Reason, Rejection, Transaction};
use crate::features::{FeatureEngine, Features, Lateness, WindowSpec};
use crate::kafka::{self, produce};
use crate::metrics::Metrics;
use crate::model::FraudModel;
use crate::sinks::redis::{RedisSink, ScoreEntry};
use crate::topics;
use output::{DeadLetter, Decision, FraudScore, SourcePosition};

/// Shared liveness/readiness flags, read by `/healthz` and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// Subscribed and processing.
    pub running: AtomicBool,
    /// Rebuilding a partition's windows from the log.
    pub warming: AtomicBool,
}

/// Logs partition assignment changes and tells the loop which partitions
/// were revoked (their users are dropped and rebuilt if they come back).
pub struct PipelineContext {
    revoked: Arc<Mutex<Vec<i32>>>,
}

impl ClientContext for PipelineContext {}

/// The partitions of a list. rdkafka 0.36 builds a slice from the list's
/// element pointer even when the list is empty (null), which a debug build
/// of current Rust rejects with a panic: never touch the elements of an
/// empty list.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    if tpl.count() == 0 {
        return Vec::new();
    }
    tpl.elements().iter().map(|e| e.partition()).collect()
}

fn describe(rebalance: &Rebalance<'_>) -> (&'static str, Vec<i32>) {
    match rebalance {
        Rebalance::Assign(tpl) => ("assign", partitions_of(tpl)),
        Rebalance::Revoke(tpl) => ("revoke", partitions_of(tpl)),
        Rebalance::Error(_) => ("error", Vec::new()),
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, rebalance: &Rebalance<'_>) {
        let (kind, partitions) = describe(rebalance);
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(error = %e, "rebalance error");
        }
        tracing::info!(kind, ?partitions, "rebalance: before");
    }
    fn post_rebalance(&self, rebalance: &Rebalance<'_>) {
        let (kind, partitions) = describe(rebalance);
        tracing::info!(kind, ?partitions, "rebalance: after");
        if let Rebalance::Revoke(_) = rebalance {
            if let Ok(mut r) = self.revoked.lock() {
                r.extend(partitions);
            }
        }
    }
}

type Consumer_ = StreamConsumer<PipelineContext>;

/// A record enqueued to Kafka, kept until acknowledged so it can be re-sent.
struct OutRecord {
    topic: Arc<str>,
    key: Vec<u8>,
    /// Shared with the Redis entry of the same score (one serialisation).
    payload: Arc<[u8]>,
}

/// A batch whose outputs are on their way.
struct PendingBatch {
    deliveries: Vec<(DeliveryFuture, OutRecord)>,
    /// Fires when the batch's Redis pipeline succeeded.
    redis_done: oneshot::Receiver<()>,
    /// Next offset to consume, per partition.
    offsets: Vec<(i32, i64)>,
    event_times: Vec<i64>,
    flagged: u64,
    dead: Vec<Reason>,
    newest_event_time: i64,
    taken_at: Instant,
}

/// One accepted transaction waiting for its score.
struct Scored {
    txn: Transaction,
    features: Features,
    late: bool,
    source: SourcePosition,
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
    model: FraudModel,
    metrics: Metrics,
    producer: FutureProducer,
    scores_topic: Arc<str>,
    dead_topic: Arc<str>,
    lateness: Lateness,
    /// `events_consumed{topic="transactions"}`, resolved once.
    consumed: prometheus::IntCounter,
    /// Redis writes, in batch order, to the Redis task.
    redis_tx: mpsc::Sender<RedisJob>,
    in_topic: String,
    health: Arc<Health>,
    /// Partitions whose windows were rebuilt since they were assigned.
    warmed: HashSet<i32>,
    /// Partitions whose events are already in the merchant windows.
    ever_warmed: HashSet<i32>,
    revoked: Arc<Mutex<Vec<i32>>>,
}

/// One batch's Redis entries and who to tell when they are written.
type RedisJob = (Vec<ScoreEntry>, oneshot::Sender<()>);

fn now_ms() -> i64 {
    crate::now_ms()
}

impl Stage {
    /// Validates one message and, if good, computes its features (the batch
    /// collects rejections and accepted events in log order).
    fn take(
        &mut self,
        m: &BorrowedMessage<'_>,
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
        let source = SourcePosition {
            topic: m.topic.to_string(),
            partition: m.partition,
            offset: m.offset,
        };
        self.consumed.inc();
        let next = offsets.entry(source.partition).or_insert(0);
        *next = (*next).max(source.offset + 1);
        let raw = m.payload;
        match events::parse_transaction(raw, now_ms(), &self.limits) {
            Ok(txn) => {
                let late = self.lateness.is_late(source.partition, txn.event_time);
                if late {
                    self.metrics.late_events.inc();
                }
                let features = self.engine.process_from(source.partition, &txn, !late);
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
        let (redis_tx, redis_done) = oneshot::channel();
        let mut redis_entries = Vec::with_capacity(accepted.len());
        let mut batch = PendingBatch {
            deliveries: Vec::with_capacity(accepted.len() + rejected.len()),
            redis_done,
            offsets: offsets.into_iter().collect(),
            event_times: Vec::with_capacity(accepted.len()),
            flagged: 0,
            dead: Vec::new(),
            newest_event_time: i64::MIN,
            taken_at,
        };
        let scored_at = now_ms();
        let version = self.model.version();
        for (s, score) in accepted.into_iter().zip(scores) {
            let out = FraudScore::new(
                &s.txn,
                score,
                self.cfg.model.threshold,
                version,
                scored_at,
                s.late,
                &s.features,
                &s.source,
            );
            if out.decision == Decision::Flag {
                batch.flagged += 1;
            }
            let mut buf = Vec::with_capacity(1024);
            serde_json::to_writer(&mut buf, &out).context("serialising a score")?;
            let json: Arc<[u8]> = buf.into();
            let rec = OutRecord {
                topic: self.scores_topic.clone(),
                key: s.txn.txn_id.as_bytes().to_vec(),
                payload: json.clone(),
            };
            let fut = produce::enqueue(&self.producer, &rec.topic, &rec.key, &rec.payload, None)
                .await
                .with_context(|| format!("producing to {}", self.scores_topic))?;
            batch.deliveries.push((fut, rec));
            batch.event_times.push(s.txn.event_time);
            batch.newest_event_time = batch.newest_event_time.max(s.txn.event_time);
            redis_entries.push(ScoreEntry {
                txn_id: s.txn.txn_id,
                user_id: s.txn.user_id,
                json,
            });
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
        // The Redis task writes batches in order while Kafka acknowledges.
        if self.redis_tx.send((redis_entries, redis_tx)).await.is_err() {
            anyhow::bail!("the Redis writer stopped");
        }
        Ok(batch)
    }

    /// Warms up the message's partition first if it was not yet, and takes
    /// any message the broker skipped between the committed offset and this
    /// one into the batch (before this one).
    async fn before_take(
        &mut self,
        consumer: &Consumer_,
        m: &BorrowedMessage<'_>,
        accepted: &mut Vec<Scored>,
        rejected: &mut Vec<Rejected>,
        offsets: &mut HashMap<i32, i64>,
    ) -> anyhow::Result<()> {
        // Revocations happen inside `recv`: apply them before this message,
        // which already belongs to the new assignment.
        self.forget_revoked();
        if self.warmed.contains(&m.partition()) {
            return Ok(());
        }
        let score_from = self
            .committed_offset(consumer, m.partition())
            .unwrap_or(m.offset());
        let limits = Limits {
            max_future_skew_ms: i64::MAX / 4,
            ..self.limits
        };
        let event_time =
            match events::parse_transaction(m.payload().unwrap_or_default(), 0, &limits) {
                Ok(t) => t.event_time,
                Err(_) => m.timestamp().to_millis().unwrap_or_else(now_ms),
            };
        let gap = self
            .warm_up(
                m.partition(),
                m.offset(),
                score_from.min(m.offset()),
                event_time,
            )
            .await?;
        if !gap.is_empty() {
            tracing::warn!(
                partition = m.partition(), committed = score_from, delivered = m.offset(),
                recovered = gap.len(),
                "the broker resumed past the committed offset; scoring the skipped messages from the log"
            );
            self.metrics.resume_gap_events.inc_by(gap.len() as u64);
        }
        for g in &gap {
            let input = Input {
                topic: m.topic(),
                partition: m.partition(),
                offset: g.offset,
                key: g.key.as_deref(),
                payload: &g.payload,
            };
            self.take_input(&input, accepted, rejected, offsets);
        }
        Ok(())
    }

    /// The group's committed offset of `partition`, if there is one.
    fn committed_offset(&self, consumer: &Consumer_, partition: i32) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.in_topic, partition);
        let res = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| tracing::warn!(error = %e, partition, "committed offset unknown"))
            .ok()?;
        match res.find_partition(&self.in_topic, partition)?.offset() {
            Offset::Offset(o) if o >= 0 => Some(o),
            _ => None,
        }
    }

    /// Drops the state of partitions revoked since the last call.
    fn forget_revoked(&mut self) {
        let revoked: Vec<i32> = match self.revoked.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => return,
        };
        for p in revoked {
            if self.warmed.remove(&p) {
                let dropped = self.engine.drop_partition_users(p);
                self.lateness.forget(p);
                tracing::info!(
                    partition = p,
                    users = dropped,
                    "partition revoked: its users dropped"
                );
            }
        }
    }

    /// Rebuilds the windows of `partition` from the log before the message
    /// at `offset` (event time `event_time`) is scored.
    async fn warm_up(
        &mut self,
        partition: i32,
        offset: i64,
        score_from: i64,
        event_time: i64,
    ) -> anyhow::Result<Vec<warmup::GapMessage>> {
        let merchants = !self.ever_warmed.contains(&partition);
        let kafka = self.cfg.kafka.clone();
        let topic = self.in_topic.clone();
        let engine = self.engine.clone();
        let grace_ms = self.cfg.windows.grace.as_millis() as i64;
        let limits = self.limits;
        let mut lateness = std::mem::replace(&mut self.lateness, Lateness::new(grace_ms));
        self.health.warming.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let (lateness, result) = tokio::task::spawn_blocking(move || {
            let r = warmup::Replay {
                kafka: &kafka,
                topic: &topic,
                partition,
                at_event_time: event_time,
                until_offset: offset,
                score_from,
                grace_ms,
                merchants,
                limits,
                deadline: Duration::from_secs(600),
            };
            let res = warmup::replay(&r, &engine, &mut lateness);
            (lateness, res)
        })
        .await
        .context("warm-up task")?;
        self.lateness = lateness;
        self.health.warming.store(false, Ordering::Relaxed);
        let stats = result?;
        let secs = started.elapsed().as_secs_f64();
        self.metrics.warmup_events.inc_by(stats.events);
        self.metrics.warmup_duration.observe(secs);
        tracing::info!(
            partition,
            from = stats.from_offset,
            until = offset,
            events = stats.events,
            fell_back = stats.fell_back_to_beginning,
            seconds = secs,
            "warm-up: windows rebuilt from the log"
        );
        self.warmed.insert(partition);
        self.ever_warmed.insert(partition);
        Ok(stats.gap)
    }

    fn evict(&self) {
        let ((eu, em), stats) = self.engine.evict_idle();
        let m = &self.metrics;
        let (lu, lm) = self.engine.take_limit_evictions();
        for (store, reason, n) in [
            ("user", "idle", eu as u64),
            ("merchant", "idle", em as u64),
            ("user", "limit", lu),
            ("merchant", "limit", lm),
        ] {
            m.evicted_keys.with_label_values(&[store, reason]).inc_by(n);
        }
        m.window_keys
            .with_label_values(&["user"])
            .set(stats.user_keys as i64);
        m.window_keys
            .with_label_values(&["merchant"])
            .set(stats.merchant_keys as i64);
        m.window_state_bytes
            .with_label_values(&["user"])
            .set(stats.user_bytes as i64);
        m.window_state_bytes
            .with_label_values(&["merchant"])
            .set(stats.merchant_bytes as i64);
    }
}

/// Writes each batch's scores to Redis, one pipeline per batch, in batch
/// order (so `:latest` keys end in log order), retrying until it succeeds.
async fn redis_loop(mut rx: mpsc::Receiver<RedisJob>, redis: RedisSink, metrics: Metrics) {
    while let Some((entries, done)) = rx.recv().await {
        let mut backoff = Duration::from_millis(50);
        while let Err(e) = redis.write_scores(&entries).await {
            metrics.redis_errors.inc();
            tracing::warn!(error = %e, "Redis write failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        let _ = done.send(());
    }
}

/// Waits for every output of each batch, in order, then stores its offsets.
async fn ack_loop(
    mut rx: mpsc::Receiver<PendingBatch>,
    consumer: Arc<Consumer_>,
    producer: FutureProducer,
    metrics: Metrics,
    in_topic: String,
) -> anyhow::Result<()> {
    while let Some(b) = rx.recv().await {
        for (fut, rec) in b.deliveries {
            let mut fut = fut;
            let mut backoff = Duration::from_millis(50);
            loop {
                match produce::acknowledged(fut).await {
                    Ok(()) => break,
                    Err(e) => {
                        metrics.kafka_produce_errors.inc();
                        tracing::warn!(error = %e, topic = %rec.topic, "delivery failed; re-sending");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        fut = produce::enqueue(&producer, &rec.topic, &rec.key, &rec.payload, None)
                            .await
                            .with_context(|| format!("re-sending to {}", rec.topic))?;
                    }
                }
            }
        }
        if b.redis_done.await.is_err() {
            anyhow::bail!("the Redis writer stopped");
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &b.offsets {
            tpl.add_partition_offset(&in_topic, *p, Offset::Offset(*next))?;
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile: its new owner re-reads
            // these events (at least once).
            tracing::debug!(error = %e, "offsets not stored");
        }
        let now = now_ms();
        metrics.events_scored.inc_by(b.event_times.len() as u64);
        metrics.events_flagged.inc_by(b.flagged);
        for t in &b.event_times {
            metrics
                .event_to_score_latency
                .observe(((now - t).max(0)) as f64 / 1000.0);
        }
        for r in &b.dead {
            metrics.dead_letter.with_label_values(&[r.as_str()]).inc();
        }
        if b.newest_event_time != i64::MIN {
            let secs = b.newest_event_time / 1000;
            if secs > metrics.newest_event_time.get() {
                metrics.newest_event_time.set(secs);
            }
        }
        metrics
            .processing_latency
            .observe(b.taken_at.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Fails start-up when a topic the pipeline needs does not exist.
fn check_topics(consumer: &Consumer_, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let md = consumer
            .fetch_metadata(Some(name), Duration::from_secs(15))
            .with_context(|| format!("fetching metadata of topic {name}"))?;
        let ok = md
            .topics()
            .iter()
            .any(|t| t.name() == *name && t.error().is_none() && !t.partitions().is_empty());
        if !ok {
            anyhow::bail!(
                "topic {name} does not exist on the broker; create the topics with `streamscore topics apply`"
            );
        }
    }
    Ok(())
}

/// Runs the fraud path until `shutdown` is cancelled, then drains, commits
/// and returns.
pub async fn run(
    cfg: Config,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let model = FraudModel::load(&cfg.model.path, &cfg.model.signature)?;
    metrics
        .model_info
        .with_label_values(&[model.version()])
        .set(1);
    tracing::info!(version = model.version(), path = %cfg.model.path.display(), "model loaded");
    let engine = Arc::new(FeatureEngine::new(WindowSpec::from(&cfg.windows)));

    let in_topic = cfg.topic(topics::TRANSACTIONS);
    let revoked = Arc::new(Mutex::new(Vec::new()));
    let scores_topic = cfg.topic(topics::FRAUD_SCORES);
    let dead_topic = cfg.topic(topics::DEAD_LETTER);
    let consumer: Arc<Consumer_> = Arc::new(
        kafka::consumer_config(
            &cfg.kafka,
            &cfg.kafka.group_id,
            cfg.processing.commit_interval.as_millis() as u64,
        )
        .create_with_context(PipelineContext {
            revoked: revoked.clone(),
        })
        .context("creating the Kafka consumer")?,
    );
    check_topics(&consumer, &[&in_topic, &scores_topic, &dead_topic])?;
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka)
        .create()
        .context("creating the Kafka producer")?;
    let redis = RedisSink::connect(&cfg.redis, Duration::from_secs(30)).await?;
    consumer.subscribe(&[&in_topic])?;
    tracing::info!(topic = %in_topic, group = %cfg.kafka.group_id, "consuming");

    let (tx, rx) = mpsc::channel::<PendingBatch>(cfg.processing.max_in_flight_batches);
    let acker = tokio::spawn(ack_loop(
        rx,
        consumer.clone(),
        producer.clone(),
        metrics.clone(),
        in_topic.clone(),
    ));
    let (redis_tx, redis_rx) = mpsc::channel::<RedisJob>(cfg.processing.max_in_flight_batches);
    tokio::spawn(redis_loop(redis_rx, redis, metrics.clone()));
    let mut stage = Stage {
        limits: Limits {
            max_message_bytes: cfg.processing.max_message_bytes,
            max_future_skew_ms: cfg.processing.max_future_skew.as_millis() as i64,
        },
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
        redis_tx,
        in_topic: in_topic.clone(),
        health: health.clone(),
        warmed: HashSet::new(),
        ever_warmed: HashSet::new(),
        revoked,
        cfg,
    };
    health.running.store(true, Ordering::Relaxed);
    let result = consume_loop(&mut stage, &consumer, &tx, &shutdown).await;
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

async fn consume_loop(
    stage: &mut Stage,
    consumer: &Consumer_,
    tx: &mpsc::Sender<PendingBatch>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let max = stage.cfg.processing.batch_max_events;
    let wait = stage.cfg.processing.batch_max_wait;
    let mut evict_tick = tokio::time::interval(stage.cfg.windows.eviction_interval);
    evict_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        stage.forget_revoked();
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = evict_tick.tick() => {
                stage.evict();
                continue;
            }
            m = consumer.recv() => m,
        };
        let taken_at = Instant::now();
        let mut accepted = Vec::with_capacity(max);
        let mut rejected = Vec::new();
        let mut offsets = HashMap::new();
        match first {
            Ok(m) => {
                stage
                    .before_take(consumer, &m, &mut accepted, &mut rejected, &mut offsets)
                    .await?;
                stage.take(&m, &mut accepted, &mut rejected, &mut offsets)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while accepted.len() + rejected.len() < max {
            // A message already waiting is taken without arming a timer
            // (recv is cancel-safe); only an empty queue waits for the deadline.
            let ready = tokio::select! {
                biased;
                m = consumer.recv() => Some(m),
                _ = std::future::ready(()) => None,
            };
            let next = match ready {
                Some(m) => Ok(m),
                None => tokio::time::timeout_at(deadline, consumer.recv()).await,
            };
            match next {
                Ok(Ok(m)) => {
                    stage
                        .before_take(consumer, &m, &mut accepted, &mut rejected, &mut offsets)
                        .await?;
                    stage.take(&m, &mut accepted, &mut rejected, &mut offsets)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consumer error; continuing");
                    break;
                }
                Err(_) => break,
            }
        }
        stage
            .metrics
            .batch_size
            .observe((accepted.len() + rejected.len()) as f64);
        let batch = stage.emit(accepted, rejected, offsets, taken_at).await?;
        if tx.send(batch).await.is_err() {
            anyhow::bail!("the acker stopped; see the error above");
        }
    }
}

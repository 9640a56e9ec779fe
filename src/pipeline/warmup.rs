//! Warm-up: rebuilding the window state of a partition from the log.
//!
//! When the pipeline first takes a message from a partition (at start-up or
//! after a rebalance gave it the partition), it replays that partition from
//! the offset for (that message's event time − retention) up to the
//! message's offset, folding every valid event into the windows and emitting
//! nothing. Scoring then resumes at the message: events already scored are
//! not scored again, and their features equal those of an uninterrupted run
//! (every feature depends only on that horizon, docs/FEATURES.md).
//!
//! Brokers answer offsets-for-times imprecisely (tansu: 0 on its memory
//! engine, wrong for future times on sqlite), and producer timestamps are not
//! event times. The replay therefore checks what it got: it starts one
//! message before the answer, and if that message is already inside the
//! horizon, events may have been skipped, so it starts again from the
//! beginning (safe, only slower). Events before the horizon are read but not
//! folded in, so both paths build the same state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::events::{parse_transaction, Limits};
use crate::features::{FeatureEngine, Lateness};

/// A message between the committed offset and the first message the
/// consumer delivered: never scored, so it must be scored now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapMessage {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// What one partition's warm-up did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupStats {
    pub from_offset: i64,
    pub events: u64,
    pub skipped_invalid: u64,
    /// True when the broker's offset-for-time answer could not be trusted.
    pub fell_back_to_beginning: bool,
    /// Messages in `[score_from, until)`, returned unprocessed, in order.
    pub gap: Vec<GapMessage>,
}

/// One replay request.
pub struct Replay<'a> {
    pub kafka: &'a KafkaConfig,
    pub topic: &'a str,
    pub partition: i32,
    /// Event time of the first message to be scored.
    pub at_event_time: i64,
    /// Offset of the first message the consumer delivered (exclusive end).
    pub until_offset: i64,
    /// First offset never scored (the committed offset). Messages from here
    /// to `until_offset` are returned in [`WarmupStats::gap`] instead of
    /// folded: some brokers (tansu 0.6) answer a fetch from an offset inside
    /// a record batch with the *next* batch, so a consumer resuming there
    /// silently skips the rest of that batch.
    pub score_from: i64,
    /// How far back from `at_event_time` to replay
    /// ([`crate::features::WindowSpec::retention_ms`]).
    pub retention_ms: i64,
    pub limits: Limits,
    /// Give up (error) after this long.
    pub deadline: Duration,
    /// Set when the partition was revoked (or the pipeline stops) while
    /// it warms up: the replay ends with [`Cancelled`].
    pub cancel: &'a AtomicBool,
}

/// The error of a replay whose [`Replay::cancel`] was set.
#[derive(Debug, thiserror::Error)]
#[error("warm-up cancelled")]
pub struct Cancelled;

fn replay_consumer(kafka: &KafkaConfig) -> anyhow::Result<BaseConsumer> {
    let group = format!("streamscore-warmup-{}", std::process::id());
    crate::kafka::reader_config(kafka, &group)
        .create()
        .context("creating the warm-up consumer")
}

/// Replays `[offset for (at − retention), until)` of one partition into
/// `engine` and `lateness`. Blocking: run it off the async reactor.
pub fn replay(
    r: &Replay<'_>,
    engine: &FeatureEngine,
    lateness: &mut Lateness,
) -> anyhow::Result<WarmupStats> {
    let horizon_start = r.at_event_time - r.retention_ms;
    let mut stats = WarmupStats {
        from_offset: 0,
        events: 0,
        skipped_invalid: 0,
        fell_back_to_beginning: false,
        gap: Vec::new(),
    };
    if r.cancel.load(Ordering::Relaxed) {
        return Err(Cancelled.into());
    }
    if r.until_offset <= 0 {
        return Ok(stats);
    }
    let c = replay_consumer(r.kafka)?;
    let (low, _) = c
        .fetch_watermarks(r.topic, r.partition, Duration::from_secs(10))
        .with_context(|| format!("watermarks of {}/{}", r.topic, r.partition))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(r.topic, r.partition, Offset::Offset(horizon_start))?;
    let start = match c.offsets_for_times(tpl, Duration::from_secs(10)) {
        Ok(res) => match res.find_partition(r.topic, r.partition).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= low && o < r.until_offset => o,
            Some(Offset::Offset(o)) if o >= r.until_offset => r.until_offset,
            // End: no message at or after that time, or an answer out of range.
            _ => low,
        },
        Err(e) => {
            tracing::warn!(error = %e, "offsets-for-times failed; replaying from the beginning");
            low
        }
    };
    // Never start after the first unscored message.
    let start = start.min(r.score_from.max(low));
    stats.from_offset = start;
    if start >= r.until_offset {
        return Ok(stats);
    }
    // Validation as in the stream, without the future-time check.
    let limits = r.limits.for_replay();
    let started = Instant::now();
    // Start one message early: that message must lie before the horizon.
    let probe_from = if start > low { start - 1 } else { start };
    let mut checking = start > low;
    let mut offset = probe_from;
    let assign = |from: i64| -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(r.topic, r.partition, Offset::Offset(from))?;
        c.assign(&tpl).context("assigning the warm-up partition")
    };
    assign(probe_from)?;
    while offset < r.until_offset {
        if r.cancel.load(Ordering::Relaxed) {
            return Err(Cancelled.into());
        }
        if started.elapsed() > r.deadline {
            anyhow::bail!(
                "warm-up of {}/{} did not reach offset {} within {:?} (at {offset})",
                r.topic,
                r.partition,
                r.until_offset,
                r.deadline
            );
        }
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.with_context(|| format!("warm-up read of {}/{}", r.topic, r.partition))?;
        if m.offset() < offset {
            continue; // a batch delivered again
        }
        offset = m.offset() + 1;
        if m.offset() >= r.until_offset {
            break;
        }
        if m.offset() >= r.score_from && !checking {
            stats.gap.push(GapMessage {
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
            });
            continue;
        }
        let Ok(t) = parse_transaction(m.payload().unwrap_or_default(), 0, &limits) else {
            stats.skipped_invalid += 1;
            continue;
        };
        if checking {
            checking = false;
            if t.event_time >= horizon_start {
                // The broker's answer may have skipped events in the horizon.
                tracing::warn!(
                    topic = r.topic,
                    partition = r.partition,
                    offset = m.offset(),
                    "offset for time is inside the horizon; replaying from the beginning"
                );
                stats.fell_back_to_beginning = true;
                stats.from_offset = low;
                stats.gap.clear();
                offset = low;
                assign(low)?;
                continue;
            }
        }
        let late = lateness.is_late(r.partition, t.event_time);
        if t.event_time >= horizon_start && !late {
            // User windows only: merchant windows are the merchant stage's.
            engine.update_from(r.partition, &t, false);
            stats.events += 1;
        }
    }
    Ok(stats)
}

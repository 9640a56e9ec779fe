//! Reads the whole `interactions` log for a rebuild: partitions one after
//! another in partition order (so the fold order, and the output, depend
//! only on the log range), each from its low watermark to the high
//! watermark captured when the rebuild started. A consumer of its own, with
//! a one-off group id, that never commits: the live group is not touched.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::KafkaConfig;
use crate::events::{self, InteractionRef, Limits};
use crate::kafka::batch::Batch;

/// The log range one partition contributed (`to` exclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Range {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

/// How a replay went.
#[derive(Debug, Clone, Default)]
pub struct ReplayStats {
    pub ranges: Vec<Range>,
    pub events: u64,
    /// Malformed messages, skipped and counted (a rebuild never aborts on one).
    pub skipped_invalid: u64,
}

/// Messages taken off the consumer queue per call (see `kafka::batch`).
const READ_BATCH: usize = 1024;
/// Longest wait for the next message before the end is reached.
const STALL: Duration = Duration::from_secs(30);
/// tansu 0.6 reports a high watermark one past the *first* offset of the
/// last record batch, not past its last record; after reaching it the
/// replay reads on until the consumer queue stays empty for `TAIL_GAP`
/// (at most `TAIL_MAX`), and records the range it really read. The rest
/// of that batch is already queued by then: a record batch comes whole in
/// one fetch response (a partial one at the end of a response is dropped
/// and fetched again, so its first record is never handed out alone), and
/// librdkafka queues a response's messages together. (It waited 200 ms
/// of silence until session 14: 0.8 s of a 6 s read of four partitions.)
const TAIL_GAP: Duration = Duration::from_millis(10);
const TAIL_MAX: Duration = Duration::from_secs(2);
/// How long a fill waits for messages while the end is not reached.
const FILL_WAIT: Duration = Duration::from_millis(50);

/// Reads every partition of `topic`, calling `fold` for each valid
/// interaction in log order and `progress(done, total)` now and then.
/// Setting `cancel` stops it with an error.
/// Blocking: run it off the async reactor.
pub fn read_all(
    kafka: &KafkaConfig,
    topic: &str,
    limits: &Limits,
    cancel: &std::sync::atomic::AtomicBool,
    mut fold: impl FnMut(InteractionRef<'_>),
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<ReplayStats> {
    let group = format!("streamscore-rebuild-{}", std::process::id());
    let c: BaseConsumer = crate::kafka::reader_config(kafka, &group)
        .create()
        .context("creating the rebuild consumer")?;
    let partitions = crate::kafka::topic_partitions(&c, topic)?;
    // The end of the range is fixed now, before anything is read.
    let mut ends = Vec::new();
    for p in &partitions {
        let (low, high) = c
            .fetch_watermarks(topic, *p, Duration::from_secs(15))
            .with_context(|| format!("watermarks of {topic}/{p}"))?;
        ends.push((*p, low, high));
    }
    let total: u64 = ends.iter().map(|(_, l, h)| (h - l).max(0) as u64).sum();
    let limits = limits.for_replay();
    let mut stats = ReplayStats::default();
    let mut done = 0u64;
    let mut last_progress = Instant::now();
    let mut batch = Batch::new(&c, READ_BATCH);
    for (p, low, high) in ends {
        let mut range = Range {
            topic: topic.to_string(),
            partition: p,
            from: low,
            to: low,
        };
        if high > low {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            c.assign(&tpl).context("assigning a partition to replay")?;
            let mut next = low;
            let mut last_msg = Instant::now();
            let mut idle = false;
            let mut reached: Option<Instant> = None;
            loop {
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    anyhow::bail!("replay of {topic} cancelled at {topic}/{p} offset {next}");
                }
                // Past the end, a fill only checks that nothing more is
                // queued (librdkafka waits out the timeout for a full batch).
                let wait = if reached.is_some() {
                    TAIL_GAP
                } else {
                    FILL_WAIT
                };
                let n = batch
                    .fill(wait)
                    .with_context(|| format!("reading {topic}/{p}"))?;
                for m in batch.iter() {
                    if let Some(e) = m.error() {
                        return Err(e).with_context(|| format!("reading {topic}/{p}"));
                    }
                    if m.partition() != p || m.offset() < next {
                        // Delivered again, or left over from the previous
                        // partition's assignment.
                        continue;
                    }
                    next = m.offset() + 1;
                    done += 1;
                    // The clock only now and then while messages stream
                    // (reading it per message was 2.4 % of a rebuild's
                    // CPU); always after an empty batch.
                    if idle || done % 1024 == 0 || next >= high {
                        last_msg = Instant::now();
                        idle = false;
                    }
                    match events::parse_interaction_ref(m.payload(), 0, &limits) {
                        Ok(ev) => {
                            stats.events += 1;
                            fold(ev);
                        }
                        Err(_) => stats.skipped_invalid += 1,
                    }
                    if next >= high && reached.is_none() {
                        reached = Some(Instant::now());
                    }
                    if done % 1024 == 0 && last_progress.elapsed() >= Duration::from_millis(500) {
                        progress(done, total);
                        last_progress = Instant::now();
                    }
                }
                if n == 0 {
                    idle = true;
                    if reached.is_some() {
                        break;
                    } else if last_msg.elapsed() >= STALL {
                        anyhow::bail!(
                            "replay of {topic}/{p} stalled at offset {next} (end {high})"
                        );
                    }
                }
                if reached.is_some_and(|r| r.elapsed() >= TAIL_MAX) {
                    break;
                }
            }
            range.to = next;
        }
        stats.ranges.push(range);
    }
    progress(done, total.max(done));
    Ok(stats)
}

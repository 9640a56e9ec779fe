//! Replaying part of one partition into in-memory state (the warm-up of the
//! followers that keep state beside the fraud path: live sessions, merchant
//! windows), with a consumer that commits nothing.
//!
//! [`Start::HorizonBefore`] replays the event-time horizon before `until`:
//! from the offset for (the newest event time before `until` − horizon).
//! Brokers answer offsets-for-times imprecisely (tansu: 0 on its memory
//! engine), so the message before the answer is checked: if it already lies
//! inside the horizon the answer skipped part of it and the replay starts
//! from the beginning of the partition (safe, only slower). Events before
//! the horizon are read but not folded, so both paths build the same state.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// Where a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The horizon before the last message before `until`.
    HorizonBefore,
    /// Exactly this offset, everything folded.
    Offset(i64),
}

/// Reads a record's value and event time; None: skipped (invalid).
pub type Parse<'a, T> = &'a dyn Fn(&[u8]) -> Option<(i64, T)>;

/// What to replay and how to read it.
pub struct Replay<'a, T> {
    pub kafka: &'a KafkaConfig,
    /// For the consumer's name and errors ("session", "merchant").
    pub what: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub start: Start,
    /// Exclusive end offset.
    pub until: i64,
    /// Event-time horizon of [`Start::HorizonBefore`], ms.
    pub horizon_ms: i64,
    /// Give up (error) after this long.
    pub deadline: Duration,
    pub parse: Parse<'a, T>,
}

/// Replays `[start, until)` of the partition, calling `fold(offset, value)`
/// for each valid record inside the horizon, in offset order (batches a
/// broker delivers again are skipped). Returns the records folded. Blocking.
pub fn replay<T>(r: &Replay<'_, T>, fold: &mut dyn FnMut(i64, T)) -> anyhow::Result<u64> {
    if r.until <= 0 {
        return Ok(0);
    }
    let (topic, partition, until) = (r.topic, r.partition, r.until);
    let c: BaseConsumer = super::reader_config(
        r.kafka,
        &format!("streamscore-{}-warmup-{}", r.what, std::process::id()),
    )
    .create()
    .with_context(|| format!("creating the {} warm-up consumer", r.what))?;
    let (low, _) = c
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .with_context(|| format!("watermarks of {topic}/{partition}"))?;
    let assign = |from: i64| -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
        c.assign(&tpl)
            .with_context(|| format!("assigning the {} warm-up partition", r.what))
    };
    let deadline = Instant::now() + r.deadline;
    // Reads [from, until) in order, calling `f` with each valid record;
    // `f` returns false to stop.
    // tansu 0.6 answers a fetch from an offset inside a record batch with
    // the *next* batch, silently skipping the rest of that one. So reading
    // starts up to REWIND messages early (records before `from` are passed
    // over), and if the first message delivered still lies after `from`,
    // it starts again from the beginning of the partition.
    const REWIND: i64 = 5_000;
    let read = |from: i64, f: &mut dyn FnMut(i64, i64, T) -> bool| -> anyhow::Result<()> {
        let mut at = (from - REWIND).max(low);
        assign(at)?;
        let mut first = true;
        let mut offset = from;
        while offset < until {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} warm-up of {topic}/{partition} did not reach offset {until} within {:?}",
                    r.what,
                    r.deadline
                );
            }
            let Some(m) = c.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.with_context(|| format!("{} warm-up read of {topic}/{partition}", r.what))?;
            if std::mem::take(&mut first) && m.offset() > at && m.offset() > from && at > low {
                tracing::debug!(
                    topic,
                    partition,
                    asked = at,
                    got = m.offset(),
                    "the broker skipped part of a record batch; reading from the beginning"
                );
                at = low;
                first = true;
                assign(at)?;
                continue;
            }
            if m.offset() < offset {
                continue;
            }
            offset = m.offset() + 1;
            if m.offset() >= until {
                break;
            }
            if let Some((t, v)) = (r.parse)(m.payload().unwrap_or_default()) {
                if !f(m.offset(), t, v) {
                    break;
                }
            }
        }
        Ok(())
    };
    let (from, from_time) = match r.start {
        Start::Offset(o) => (o.max(low), i64::MIN),
        Start::HorizonBefore => {
            // The newest event time before `until` (read from a little
            // earlier: tansu 0.6 answers a fetch from inside a record batch
            // with the next batch).
            let mut newest: Option<i64> = None;
            read((until - 1_000).max(low), &mut |_, t, _| {
                newest = Some(newest.map_or(t, |n| n.max(t)));
                true
            })?;
            let Some(t) = newest else {
                return Ok(0);
            };
            let from_time = t - r.horizon_ms;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(from_time.max(0)))?;
            let start = match c.offsets_for_times(tpl, Duration::from_secs(10)) {
                Ok(res) => match res.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o >= low && o < until => o,
                    Some(Offset::Offset(o)) if o >= until => until,
                    _ => low,
                },
                Err(_) => low,
            };
            // The message before the answer must lie before the horizon, or
            // the answer skipped part of it: then start from the beginning.
            let mut trusted = start <= low;
            if !trusted {
                let mut first = None;
                read(start - 1, &mut |_, t, _| {
                    first = Some(t);
                    false
                })?;
                trusted = first.is_some_and(|t| t < from_time);
            }
            (if trusted { start } else { low }, from_time)
        }
    };
    let mut folded = 0;
    read(from, &mut |offset, t, v| {
        if t >= from_time {
            fold(offset, v);
            folded += 1;
        }
        true
    })?;
    Ok(folded)
}

//! A partition's warm-up off the consume loop: the partition is paused
//! with its first message kept while a blocking task rebuilds its windows
//! from the log ([`super::warmup`]), one warm-up at a time; the task
//! reports to the loop, which takes the partition up from that message.
//! The others keep flowing meanwhile.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::Offset;

use super::warm_ups::{Report, Revoked, Start};
use super::{warmup, Consumer_, Input, Rejected, Scored, Stage};
use crate::events;
use crate::features::Lateness;

/// What a warm-up task reports to the consume loop.
pub(super) struct WarmDone {
    partition: i32,
    id: u64,
    /// The partition's lateness clock after the replay.
    clock: Option<i64>,
    result: anyhow::Result<warmup::WarmupStats>,
    /// How long the replay took (its wait for its turn not counted).
    seconds: f64,
}

impl Stage {
    /// Starts rebuilding the windows of `m`'s partition from the log on a
    /// blocking thread ([`warmup::replay`]), scoring to start from
    /// `score_from` (the committed offset). The partition is paused with
    /// `m` (its first message) kept; the other partitions keep flowing.
    /// If a cancelled warm-up of the partition is still running, this one
    /// starts when that one ends.
    pub(super) fn start_warm_up(&mut self, consumer: &Consumer_, m: OwnedMessage, score_from: i64) {
        let partition = m.partition();
        // Kept windows that could not be taken back are rebuilt.
        self.drop_parked(partition);
        self.pause_or_resume(consumer, partition, true);
        let limits = self.limits.for_replay();
        let event_time =
            match events::parse_transaction(m.payload().unwrap_or_default(), 0, &limits) {
                Ok(t) => t.event_time,
                Err(_) => m.timestamp().to_millis().unwrap_or_else(crate::now_ms),
            };
        let first = m.offset();
        let (id, cancel) = match self.warm_ups.start(partition, m, score_from) {
            Start::Now { id, cancel } => (id, cancel),
            Start::AfterCancelled => {
                tracing::info!(
                    partition,
                    "a cancelled warm-up of this partition is still running; this one starts when it ends"
                );
                self.warming_changed();
                return;
            }
        };
        // A broker may also resume *before* the committed offset (tansu 0.6
        // answers with the whole record batch around it; seen as events
        // scored twice after a rebalance). Everything before the committed
        // offset has acknowledged outputs: it is folded by the warm-up and
        // its messages are skipped as redeliveries, never scored again.
        let until = if score_from > first {
            tracing::warn!(
                partition,
                committed = score_from,
                delivered = first,
                "the broker resumed before the committed offset; skipping what was already scored"
            );
            score_from
        } else {
            first
        };
        let kafka = self.cfg.kafka.clone();
        let topic = self.in_topic.clone();
        let engine = self.engine.clone();
        let grace_ms = self.cfg.windows.grace.as_millis() as i64;
        let retention_ms = self.engine.spec().retention_ms();
        let tx = self.warm_tx.clone();
        let task_cancel = cancel.clone();
        self.revoked.warm_up_started(partition, cancel.clone());
        let one_at_a_time = self.warm_lock.clone();
        tokio::task::spawn_blocking(move || {
            // One warm-up at a time: side by side (four partitions at a
            // restart) they took 4x as long each and 1.7x as long in all,
            // contending for the window store and both cores.
            let _turn = one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
            let started = Instant::now();
            let r = warmup::Replay {
                kafka: &kafka,
                topic: &topic,
                partition,
                at_event_time: event_time,
                until_offset: until,
                score_from: score_from.min(until),
                retention_ms,
                limits,
                deadline: Duration::from_secs(600),
                cancel: &task_cancel,
            };
            // The partition's clock starts empty (it is new here, or was
            // forgotten at its revocation) and is handed over when done.
            let mut lateness = Lateness::new(grace_ms);
            let result = warmup::replay(&r, &engine, &mut lateness);
            // The loop may have stopped; then nothing waits for this.
            let _ = tx.send(WarmDone {
                partition,
                id,
                clock: lateness.clock(partition),
                result,
                seconds: started.elapsed().as_secs_f64(),
            });
        });
        tracing::info!(
            partition,
            until,
            score_from,
            "warm-up started: the partition is paused, the others keep flowing"
        );
        self.warming_changed();
    }

    /// Takes a warm-up's report: the partition's windows are complete, so
    /// what the broker skipped between the committed offset and its first
    /// message goes into the batch, and the partition is read again from
    /// that first message. Not from after it: tansu 0.6 answers a fetch
    /// from inside a record batch with the *next* batch, and librdkafka
    /// resumes a paused partition after the last message it handed out, so
    /// the rest of that message's batch would be skipped (seen: 15 events
    /// lost per held partition). A first message is always a batch start
    /// there, and anywhere on Kafka; it is then delivered again and scored.
    /// The report of a cancelled warm-up drops what it folded and starts
    /// the warm-up that waited for it.
    pub(super) fn take_warmed(
        &mut self,
        consumer: &Consumer_,
        done: WarmDone,
        accepted: &mut Vec<Scored>,
        rejected: &mut Vec<Rejected>,
        offsets: &mut HashMap<i32, i64>,
    ) -> anyhow::Result<()> {
        self.forget_revoked(consumer);
        let partition = done.partition;
        let (msg, score_from) = match self.warm_ups.report(partition, done.id) {
            Report::CancelledEnded { deferred } => {
                tracing::info!(partition, seconds = done.seconds, "cancelled warm-up ended");
                self.drop_users(partition);
                if let Some((m, score_from)) = deferred {
                    self.start_warm_up(consumer, m, score_from);
                }
                self.warming_changed();
                return Ok(());
            }
            Report::Unknown => {
                tracing::warn!(partition, "report of an unknown warm-up ignored");
                return Ok(());
            }
            Report::Done { msg, score_from } => (msg, score_from),
        };
        let secs = done.seconds;
        self.warming_changed();
        let stats = done
            .result
            .with_context(|| format!("warm-up of partition {partition}"))?;
        if let Some(clock) = done.clock {
            self.lateness.set_clock(partition, clock);
        }
        self.metrics.warmup_events.inc_by(stats.events);
        self.metrics.warmup_duration.observe(secs);
        tracing::info!(
            partition,
            from = stats.from_offset,
            until = msg.offset().max(score_from),
            events = stats.events,
            fell_back = stats.fell_back_to_beginning,
            seconds = secs,
            "warm-up: windows rebuilt from the log"
        );
        self.warmed.insert(partition);
        if score_from > msg.offset() {
            self.next_offset.insert(partition, score_from);
        }
        let gap = stats.gap;
        if !gap.is_empty() {
            tracing::warn!(
                partition, committed = score_from, delivered = msg.offset(),
                recovered = gap.len(),
                "the broker resumed past the committed offset; scoring the skipped messages from the log"
            );
            self.metrics.resume_gap_events.inc_by(gap.len() as u64);
        }
        for g in &gap {
            let input = Input {
                topic: msg.topic(),
                partition,
                offset: g.offset,
                key: g.key.as_deref(),
                payload: &g.payload,
            };
            self.take_input(&input, accepted, rejected, offsets);
        }
        // What lies below the committed offset comes again and is skipped
        // as a redelivery (`next_offset`).
        let from = msg.offset();
        if let Err(e) = consumer.seek(
            &self.in_topic,
            partition,
            Offset::Offset(from),
            Duration::from_secs(10),
        ) {
            anyhow::bail!(
                "seeking partition {partition} back to offset {from} after its warm-up failed: {e}; \
                 resuming after it could skip messages, so the pipeline stops \
                 (its offsets are committed only up to what was scored)"
            );
        }
        self.pause_or_resume(consumer, partition, false);
        Ok(())
    }

    /// `partition` was revoked: a warm-up of it is cancelled (its flag is
    /// set; its users are dropped when the task reports, as it may still
    /// be folding), and a first message waiting for a cancelled one is
    /// left to the next owner. Either way the partition is resumed
    /// (librdkafka keeps an application's pause across assignments).
    pub(super) fn cancel_revoked_warm_up(&mut self, consumer: &Consumer_, partition: i32) {
        let Revoked { cancelled, waiting } = self.warm_ups.revoke(partition);
        if cancelled {
            self.pause_or_resume(consumer, partition, false);
            self.warming_changed();
            tracing::info!(
                partition,
                "partition revoked while warming up: warm-up cancelled, its messages left to its next owner"
            );
        }
        if let Some(m) = waiting {
            self.pause_or_resume(consumer, partition, false);
            self.warming_changed();
            tracing::info!(
                partition,
                held_offset = m.offset(),
                "waiting partition revoked: its messages are left to its next owner"
            );
        }
    }

    /// Cancels every running warm-up (the pipeline stops).
    pub(super) fn cancel_warm_ups(&mut self) {
        self.warm_ups.cancel_all();
        self.warming_changed();
    }

    /// Publishes how many partitions warm up (gauge, readiness).
    fn warming_changed(&self) {
        let n = self.warm_ups.paused();
        self.metrics.partitions_warming.set(n as i64);
        self.health.warming.store(n > 0, Ordering::Relaxed);
    }
}

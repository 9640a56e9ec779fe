//! A partition's warm-up off the consume loop: the partition is paused
//! with its first message kept while a blocking task rebuilds its windows
//! from the log ([`super::warmup`]), one warm-up at a time; the task
//! reports to the loop, which takes the partition up from that message.
//! The others keep flowing meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::Offset;

use super::{warmup, Consumer_, Input, Rejected, Scored, Stage};
use crate::events;
use crate::features::Lateness;

/// A partition whose windows are rebuilt from the log off the consume
/// loop: paused, its first message kept, while the instance's other
/// partitions keep flowing. [`Stage::take_warmed`] takes it when its
/// warm-up task reports.
struct Warming<M> {
    /// Tells this warm-up's report from a cancelled one's.
    id: u64,
    /// The partition's first message of this assignment; read again from
    /// it once warm.
    msg: M,
    /// The first offset to score (the committed offset).
    score_from: i64,
    /// Set when the entry goes (revocation, shutdown): the task stops.
    _cancel: CancelOnDrop,
}

/// A warm-up task's cancel flag, set when its entry goes.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A warm-up cancelled by a revocation whose task has not ended yet: it
/// may still be folding events into its partition's users, so their
/// windows are dropped when it ends, and a warm-up of the same partition
/// (`deferred`: its first message and committed offset) starts only then.
struct CancelledWarmUp<M> {
    id: u64,
    deferred: Option<(M, i64)>,
}

/// The bookkeeping of a stage's warm-ups, apart from the consumer and the
/// tasks (the stage pauses, resumes, spawns and drops windows as it
/// answers): which partitions warm up, which cancelled warm-ups still
/// run, and which first message waits for one of those to end. `M` is the
/// kept first message.
pub(super) struct WarmUps<M> {
    warming: HashMap<i32, Warming<M>>,
    cancelled: HashMap<i32, CancelledWarmUp<M>>,
    /// The last warm-up's id.
    ids: u64,
}

/// What to do with a partition's first message ([`WarmUps::start`]).
#[derive(Debug)]
pub(super) enum Start {
    /// Start warm-up `id` now; `cancel` is its task's flag.
    Now { id: u64, cancel: Arc<AtomicBool> },
    /// A cancelled warm-up of the partition still runs: the message is
    /// kept and handed back by [`WarmUps::report`] when that one ends.
    AfterCancelled,
}

/// What a warm-up's report means ([`WarmUps::report`]).
#[derive(Debug, PartialEq)]
pub(super) enum Report<M> {
    /// A cancelled warm-up ended: what it folded is dropped, then the
    /// first message that waited for it (with its committed offset), if
    /// any, starts a warm-up.
    CancelledEnded { deferred: Option<(M, i64)> },
    /// The warm-up is done: the partition is taken up from `msg`.
    Done { msg: M, score_from: i64 },
    /// No warm-up this stage knows (ignored).
    Unknown,
}

/// What a revocation did to a partition's warm-ups ([`WarmUps::revoke`]).
#[derive(Debug, PartialEq)]
pub(super) struct Revoked<M> {
    /// A running warm-up was cancelled (its flag is set).
    pub cancelled: bool,
    /// A first message that waited for a cancelled warm-up, now left to
    /// the partition's next owner.
    pub waiting: Option<M>,
}

impl<M> Default for WarmUps<M> {
    fn default() -> Self {
        WarmUps {
            warming: HashMap::new(),
            cancelled: HashMap::new(),
            ids: 0,
        }
    }
}

impl<M> WarmUps<M> {
    /// A partition's first message `msg` (scoring from `score_from`) needs
    /// its windows rebuilt: now, or after a cancelled warm-up of the
    /// partition ends.
    pub fn start(&mut self, partition: i32, msg: M, score_from: i64) -> Start {
        // One already running (not seen: a partition's messages are
        // dropped while it warms up) is cancelled and waited for like a
        // revoked one: two warm-ups never fold one partition at once.
        if let Some(w) = self.warming.remove(&partition) {
            let c = CancelledWarmUp {
                id: w.id,
                deferred: None,
            };
            self.cancelled.insert(partition, c);
        }
        if let Some(c) = self.cancelled.get_mut(&partition) {
            c.deferred = Some((msg, score_from));
            return Start::AfterCancelled;
        }
        self.ids += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let w = Warming {
            id: self.ids,
            msg,
            score_from,
            _cancel: CancelOnDrop(cancel.clone()),
        };
        self.warming.insert(partition, w);
        Start::Now {
            id: self.ids,
            cancel,
        }
    }

    /// Warm-up `id` of `partition` reported (its task has ended).
    pub fn report(&mut self, partition: i32, id: u64) -> Report<M> {
        if (self.cancelled.get(&partition)).is_some_and(|c| c.id == id) {
            let deferred = self.cancelled.remove(&partition).and_then(|c| c.deferred);
            return Report::CancelledEnded { deferred };
        }
        // Looked up before it is removed: taking out (and so cancelling) a
        // running warm-up on a stray report would leave it paused for good.
        if (self.warming.get(&partition)).is_none_or(|w| w.id != id) {
            return Report::Unknown;
        }
        match self.warming.remove(&partition) {
            Some(w) => Report::Done {
                msg: w.msg,
                score_from: w.score_from,
            },
            None => Report::Unknown,
        }
    }

    /// `partition` was revoked: its running warm-up is cancelled (its task
    /// reports later, [`Report::CancelledEnded`]) and a first message that
    /// waited for a cancelled one is given up.
    pub fn revoke(&mut self, partition: i32) -> Revoked<M> {
        let cancelled = match self.warming.remove(&partition) {
            Some(w) => {
                self.cancelled.insert(
                    partition,
                    CancelledWarmUp {
                        id: w.id,
                        deferred: None,
                    },
                );
                true
            }
            None => false,
        };
        let waiting = (self.cancelled.get_mut(&partition))
            .and_then(|c| c.deferred.take())
            .map(|(m, _)| m);
        Revoked { cancelled, waiting }
    }

    /// Whether `partition` warms up now.
    pub fn running(&self, partition: i32) -> bool {
        self.warming.contains_key(&partition)
    }

    /// Whether a first message of `partition` waits for its cancelled
    /// warm-up to end.
    pub fn waits(&self, partition: i32) -> bool {
        (self.cancelled.get(&partition)).is_some_and(|c| c.deferred.is_some())
    }

    /// Partitions paused for a warm-up: running, or waiting for a
    /// cancelled one.
    pub fn paused(&self) -> usize {
        self.warming.len()
            + (self.cancelled.values())
                .filter(|c| c.deferred.is_some())
                .count()
    }

    /// Cancels every running warm-up (the pipeline stops).
    pub fn cancel_all(&mut self) {
        self.warming.clear();
    }
}

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

    /// Whether a first message of `partition` waits for its cancelled
    /// warm-up to end (the partition is paused meanwhile).
    pub(super) fn waits_for_cancelled(&self, partition: i32) -> bool {
        self.warm_ups.waits(partition)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A first message, by its offset.
    type Msg = i64;

    fn started(s: Start) -> (u64, Arc<AtomicBool>) {
        match s {
            Start::Now { id, cancel } => (id, cancel),
            Start::AfterCancelled => panic!("deferred where it should start"),
        }
    }

    #[test]
    fn a_warm_up_reports_done_with_its_first_message() {
        let mut w = WarmUps::<Msg>::default();
        let (id, cancel) = started(w.start(0, 100, 120));
        assert!(w.running(0) && !w.waits(0));
        assert_eq!(w.paused(), 1);
        assert_eq!(
            w.report(0, id),
            Report::Done {
                msg: 100,
                score_from: 120
            }
        );
        assert!(!w.running(0));
        assert_eq!(w.paused(), 0);
        // Its task has ended; the flag going up then stops nothing.
        assert!(cancel.load(Ordering::Relaxed));
        assert_eq!(w.report(0, id), Report::Unknown, "reported twice");
    }

    /// The deferred branch: a partition revoked while warming up comes back
    /// before its cancelled task has ended (a rebalance, then another; the
    /// task may still be folding into the partition's users, or wait for
    /// the one-at-a-time lock). Its new first message waits for that task;
    /// its report hands the message back to start the warm-up, once.
    #[test]
    fn a_partition_back_before_its_cancelled_warm_up_ended_waits_for_it() {
        let mut w = WarmUps::<Msg>::default();
        let (first, cancel) = started(w.start(3, 10, 10));
        let (other, other_cancel) = started(w.start(1, 50, 50));
        assert_eq!(
            w.revoke(3),
            Revoked {
                cancelled: true,
                waiting: None
            }
        );
        assert!(
            cancel.load(Ordering::Relaxed),
            "the revoked warm-up goes on"
        );
        assert!(
            !other_cancel.load(Ordering::Relaxed),
            "another partition's warm-up was cancelled"
        );
        assert!(!w.running(3));
        assert_eq!(w.paused(), 1);

        // Back (a later assignment) while the cancelled task still runs.
        assert!(matches!(w.start(3, 12, 11), Start::AfterCancelled));
        assert!(w.waits(3) && !w.running(3));
        assert_eq!(w.paused(), 2, "the waiting partition is paused too");
        // A newer first message replaces the one that waited.
        assert!(matches!(w.start(3, 14, 11), Start::AfterCancelled));

        // A stray report (an id of another partition) changes nothing.
        assert_eq!(w.report(3, other), Report::Unknown);
        assert!(w.waits(3));
        // The cancelled task ends: its users are dropped, and the message
        // that waited starts the warm-up.
        assert_eq!(
            w.report(3, first),
            Report::CancelledEnded {
                deferred: Some((14, 11))
            }
        );
        assert!(!w.waits(3));
        let (second, _) = started(w.start(3, 14, 11));
        assert_ne!(second, first);
        assert!(w.running(3));
        // The old id reports nothing more about the partition.
        assert_eq!(w.report(3, first), Report::Unknown);
        assert!(w.running(3));
        assert_eq!(
            w.report(3, second),
            Report::Done {
                msg: 14,
                score_from: 11
            }
        );
        assert_eq!(
            w.report(1, other),
            Report::Done {
                msg: 50,
                score_from: 50
            }
        );
        assert_eq!(w.paused(), 0);
    }

    /// Revoked again while waiting: the message is given up (its next owner
    /// reads it), and the cancelled task's report then starts nothing.
    #[test]
    fn a_waiting_partition_revoked_again_is_given_up() {
        let mut w = WarmUps::<Msg>::default();
        let (first, _) = started(w.start(2, 5, 5));
        assert!(w.revoke(2).cancelled);
        assert!(matches!(w.start(2, 7, 6), Start::AfterCancelled));
        assert_eq!(
            w.revoke(2),
            Revoked {
                cancelled: false,
                waiting: Some(7)
            }
        );
        assert!(!w.waits(2));
        assert_eq!(w.paused(), 0);
        // Back once more, still before the task ended: it waits again.
        assert!(matches!(w.start(2, 9, 9), Start::AfterCancelled));
        assert_eq!(
            w.report(2, first),
            Report::CancelledEnded {
                deferred: Some((9, 9))
            }
        );
        // And after the report, a revocation finds nothing of it.
        assert_eq!(
            w.revoke(2),
            Revoked {
                cancelled: false,
                waiting: None
            }
        );
        assert_eq!(w.report(2, first), Report::Unknown);
    }

    #[test]
    fn a_cancelled_warm_up_that_ends_with_nothing_waiting_starts_nothing() {
        let mut w = WarmUps::<Msg>::default();
        let (id, _) = started(w.start(0, 1, 1));
        assert!(w.revoke(0).cancelled);
        assert_eq!(w.report(0, id), Report::CancelledEnded { deferred: None });
        // The partition comes back after that: it starts at once.
        let (again, _) = started(w.start(0, 4, 4));
        assert_ne!(again, id);
    }

    #[test]
    fn a_second_first_message_of_a_warming_partition_waits_for_the_first_warm_up() {
        let mut w = WarmUps::<Msg>::default();
        let (first, cancel) = started(w.start(0, 1, 1));
        assert!(matches!(w.start(0, 3, 3), Start::AfterCancelled));
        assert!(cancel.load(Ordering::Relaxed), "the first warm-up goes on");
        assert!(!w.running(0) && w.waits(0));
        assert_eq!(
            w.report(0, first),
            Report::CancelledEnded {
                deferred: Some((3, 3))
            }
        );
    }

    #[test]
    fn stopping_cancels_every_running_warm_up() {
        let mut w = WarmUps::<Msg>::default();
        let flags: Vec<_> = (0..3).map(|p| started(w.start(p, 0, 0)).1).collect();
        w.cancel_all();
        assert!(flags.iter().all(|f| f.load(Ordering::Relaxed)));
        assert_eq!(w.paused(), 0);
    }
}

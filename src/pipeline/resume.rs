//! Taking partitions: before the first message of a partition is scored,
//! revocations are applied and the partition's windows are rebuilt from the
//! log ([`super::warmup`]) on a blocking thread while the partition is
//! paused, so the instance's other partitions keep flowing; messages the
//! broker skipped between the committed offset and the first delivered one
//! are scored too, and the partition is read again from its first message.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::{warmup, Consumer_, Input, Rejected, Scored, Stage};
use crate::events;
use crate::features::Lateness;

/// A partition new to this process, paused until its previous owner's
/// last commit is due (see [`Stage::settle_plan`]). Only this partition
/// waits: the others of the assignment keep flowing.
pub(super) struct Settling {
    /// When the committed offset is read again and the warm-up starts.
    due: Instant,
    /// The committed offset when its first message arrived.
    first: i64,
    /// The partition's first message of this assignment: its event time and
    /// offset are what the warm-up needs. On resume the partition is read
    /// again from this offset (see [`Stage::take_warmed`]), so messages
    /// that arrive during the hold (queued before the pause took effect)
    /// are dropped.
    msg: OwnedMessage,
}

/// A partition revoked from this process whose windows are kept: an eager
/// rebalance revokes every partition and gives most of them straight back,
/// and rebuilding those from the log would stall the consume loop for
/// nothing.
pub(super) struct Parked {
    /// The offset after the last message folded into its windows.
    next: i64,
    /// [`super::context::Revocations::assignments`] at its revocation: an
    /// assignment counted after that is the one that followed it.
    assignments: u64,
}

/// A partition whose windows are rebuilt from the log off the consume
/// loop: paused, its first message kept, while the instance's other
/// partitions keep flowing. [`Stage::take_warmed`] takes it when its
/// warm-up task reports.
pub(super) struct Warming {
    /// Tells this warm-up's report from a cancelled one's.
    id: u64,
    /// The partition's first message of this assignment; read again from
    /// it once warm.
    msg: OwnedMessage,
    /// The first offset to score (the committed offset).
    score_from: i64,
    /// Set when the entry goes (revocation, shutdown): the task stops.
    cancel: Arc<AtomicBool>,
}

impl Drop for Warming {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A warm-up cancelled by a revocation whose task has not ended yet: it
/// may still be folding events into its partition's users, so their
/// windows are dropped when it ends, and a warm-up of the same partition
/// (`deferred`: its first message and committed offset) starts only then.
pub(super) struct CancelledWarmUp {
    id: u64,
    deferred: Option<(OwnedMessage, i64)>,
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

/// What to do with a partition's first message.
enum Plan {
    /// Score from this committed offset (None: none committed, score from
    /// the message).
    Now(Option<i64>),
    /// Hold the partition until `due`; `first` is committed now.
    Hold { due: Instant, first: i64 },
}

impl Stage {
    /// Before `m` is taken: applies revocations; true when `m` can be
    /// taken now (its partition is warm, or was taken back with its kept
    /// windows). False when its partition is new to this assignment: it is
    /// paused with `m` kept, and either held for its previous owner's
    /// commit ([`Stage::take_settled`] starts its warm-up when due) or
    /// warmed up at once off the loop ([`Stage::take_warmed`] resumes it
    /// from `m`). Messages of a paused partition that were already queued
    /// are dropped (false): they come again from `m`.
    pub(super) fn before_take(&mut self, consumer: &Consumer_, m: &BorrowedMessage<'_>) -> bool {
        // Revocations happen inside `recv`: apply them before this message,
        // which already belongs to the new assignment.
        self.forget_revoked(consumer);
        let partition = m.partition();
        if self.warmed.contains(&partition) {
            return true;
        }
        if self.is_paused_here(partition) {
            return false; // read again from the held message on resume
        }
        let score_from = match self.settle_plan(consumer, partition) {
            Plan::Now(committed) if self.take_back(partition, committed, m.offset()) => {
                return true;
            }
            Plan::Now(committed) => committed.unwrap_or(m.offset()),
            Plan::Hold { due, first } => {
                self.hold(consumer, partition, due, first, m.detach());
                return false;
            }
        };
        self.start_warm_up(consumer, m.detach(), score_from);
        false
    }

    /// Whether `partition` is paused by this stage (held for its previous
    /// owner's commit, warming up, or waiting for a cancelled warm-up):
    /// its messages already queued are dropped, and it is read again from
    /// its first message when resumed.
    fn is_paused_here(&self, partition: i32) -> bool {
        self.settling.contains_key(&partition)
            || self.warming.contains_key(&partition)
            || (self.cancelled.get(&partition)).is_some_and(|c| c.deferred.is_some())
    }

    /// Takes `partition` back with the windows kept when it was revoked, if
    /// they are exactly what its committed offset says was processed: the
    /// group's committed offset equals the offset after the last message
    /// folded (so nobody processed it since, and nothing folded here was
    /// left unacknowledged: a batch dropped at the revocation, or outputs
    /// not acknowledged in time, leave the commit behind), and the first
    /// message is not past it (a broker that skipped messages needs the
    /// warm-up's gap read). Otherwise the kept windows are dropped and the
    /// partition is warmed up from the log as usual.
    fn take_back(&mut self, partition: i32, committed: Option<i64>, first: i64) -> bool {
        let Some(parked) = self.parked.get(&partition) else {
            return false;
        };
        let next = parked.next;
        if committed != Some(next) || first > next {
            tracing::info!(
                partition,
                folded_until = next,
                ?committed,
                delivered = first,
                "partition back, but its kept windows do not match its committed offset: rebuilding"
            );
            self.drop_parked(partition);
            return false;
        }
        self.parked.remove(&partition);
        if first < next {
            // Delivered again below the commit: skipped as redeliveries.
            self.next_offset.insert(partition, next);
        }
        self.warmed.insert(partition);
        tracing::info!(
            partition,
            from = next,
            "partition back: its windows kept, no warm-up"
        );
        true
    }

    /// Drops the windows kept for a parked partition.
    fn drop_parked(&mut self, partition: i32) {
        if self.parked.remove(&partition).is_some() {
            self.drop_users(partition);
        }
    }

    /// Drops the windows of `partition`'s users and its lateness clock.
    fn drop_users(&mut self, partition: i32) {
        let dropped = self.engine.drop_partition_users(partition);
        self.lateness.forget(partition);
        tracing::info!(
            partition,
            users = dropped,
            "partition revoked: its users dropped"
        );
    }

    /// Drops the kept windows of parked partitions the assignment received
    /// since they were parked does not include.
    fn drop_unassigned_parked(&mut self, consumer: &Consumer_) {
        let now = self.revoked.assignments();
        if self.parked.values().all(|p| p.assignments >= now) {
            return;
        }
        let assigned: HashSet<i32> = match consumer.assignment() {
            Ok(tpl) => crate::kafka::partitions_of(&tpl).into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "assignment unknown; dropping every kept partition");
                HashSet::new()
            }
        };
        let gone: Vec<i32> = (self.parked.iter())
            .filter(|(p, k)| k.assignments < now && !assigned.contains(p))
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            self.drop_parked(p);
        }
        for k in self.parked.values_mut() {
            k.assignments = now;
        }
    }

    /// When the earliest held partition is due (None: none is held).
    pub(super) fn next_settle_due(&self) -> Option<Instant> {
        self.settling.values().map(|s| s.due).min()
    }

    /// Starts the warm-up of every held partition whose wait is over, from
    /// its committed offset read again (the partition stays paused until
    /// the warm-up reports, [`Stage::take_warmed`]).
    pub(super) fn take_settled(&mut self, consumer: &Consumer_) {
        self.forget_revoked(consumer);
        let now = Instant::now();
        let due: Vec<i32> = (self.settling.iter())
            .filter(|(_, s)| s.due <= now)
            .map(|(p, _)| *p)
            .collect();
        for partition in due {
            let Some(s) = self.settling.remove(&partition) else {
                continue;
            };
            self.metrics
                .partitions_settling
                .set(self.settling.len() as i64);
            let settled = self
                .committed_offset(consumer, partition)
                .unwrap_or(s.first);
            if settled != s.first {
                tracing::info!(
                    partition,
                    at_assignment = s.first,
                    settled,
                    "the previous owner committed after the assignment"
                );
            }
            self.start_warm_up(consumer, s.msg, settled.max(s.first));
        }
    }

    /// Pauses `partition` and keeps `m` (its first message) until `due`.
    fn hold(
        &mut self,
        consumer: &Consumer_,
        partition: i32,
        due: Instant,
        first: i64,
        m: OwnedMessage,
    ) {
        self.pause_or_resume(consumer, partition, true);
        tracing::info!(
            partition,
            committed = first,
            delivered = m.offset(),
            wait_ms = due.saturating_duration_since(Instant::now()).as_millis() as u64,
            "partition held until its previous owner's last commit is due; the others keep flowing"
        );
        self.settling
            .insert(partition, Settling { due, first, msg: m });
        self.metrics
            .partitions_settling
            .set(self.settling.len() as i64);
    }

    /// Pauses or resumes fetching `partition`. A failure is logged: a
    /// partition that could not be paused keeps arriving and its messages
    /// are dropped until it is read again from its held message; one that
    /// could not be resumed would stall, so that is an error in the log.
    fn pause_or_resume(&self, consumer: &Consumer_, partition: i32, pause: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.in_topic, partition);
        let res = if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        if let Err(e) = res {
            if pause {
                tracing::warn!(error = %e, partition, "pausing a held partition failed; its messages are dropped until it is read again");
            } else {
                tracing::error!(error = %e, partition, "resuming a held partition failed");
            }
        }
    }

    /// Starts rebuilding the windows of `m`'s partition from the log on a
    /// blocking thread ([`warmup::replay`]), scoring to start from
    /// `score_from` (the committed offset). The partition is paused with
    /// `m` (its first message) kept; the other partitions keep flowing.
    /// If a cancelled warm-up of the partition is still running, this one
    /// starts when that one ends.
    fn start_warm_up(&mut self, consumer: &Consumer_, m: OwnedMessage, score_from: i64) {
        let partition = m.partition();
        // Kept windows that could not be taken back are rebuilt.
        self.drop_parked(partition);
        self.pause_or_resume(consumer, partition, true);
        if let Some(c) = self.cancelled.get_mut(&partition) {
            tracing::info!(
                partition,
                "a cancelled warm-up of this partition is still running; this one starts when it ends"
            );
            c.deferred = Some((m, score_from));
            self.warming_changed();
            return;
        }
        let limits = self.limits.for_replay();
        let event_time =
            match events::parse_transaction(m.payload().unwrap_or_default(), 0, &limits) {
                Ok(t) => t.event_time,
                Err(_) => m.timestamp().to_millis().unwrap_or_else(crate::now_ms),
            };
        // A broker may also resume *before* the committed offset (tansu 0.6
        // answers with the whole record batch around it; seen as events
        // scored twice after a rebalance). Everything before the committed
        // offset has acknowledged outputs: it is folded by the warm-up and
        // its messages are skipped as redeliveries, never scored again.
        let until = if score_from > m.offset() {
            tracing::warn!(
                partition,
                committed = score_from,
                delivered = m.offset(),
                "the broker resumed before the committed offset; skipping what was already scored"
            );
            score_from
        } else {
            m.offset()
        };
        self.warm_ids += 1;
        let id = self.warm_ids;
        let cancel = Arc::new(AtomicBool::new(false));
        let kafka = self.cfg.kafka.clone();
        let topic = self.in_topic.clone();
        let engine = self.engine.clone();
        let grace_ms = self.cfg.windows.grace.as_millis() as i64;
        let retention_ms = self.engine.spec().retention_ms();
        let tx = self.warm_tx.clone();
        let task_cancel = cancel.clone();
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
        self.warming.insert(
            partition,
            Warming {
                id,
                msg: m,
                score_from,
                cancel,
            },
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
        if (self.cancelled.get(&partition)).is_some_and(|c| c.id == done.id) {
            let deferred = self.cancelled.remove(&partition).and_then(|c| c.deferred);
            self.drop_users(partition);
            if let Some((m, score_from)) = deferred {
                self.start_warm_up(consumer, m, score_from);
            }
            self.warming_changed();
            return Ok(());
        }
        if (self.warming.get(&partition)).is_none_or(|w| w.id != done.id) {
            tracing::warn!(partition, "report of an unknown warm-up ignored");
            return Ok(());
        }
        let Some(w) = self.warming.remove(&partition) else {
            return Ok(());
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
            until = w.msg.offset().max(w.score_from),
            events = stats.events,
            fell_back = stats.fell_back_to_beginning,
            seconds = secs,
            "warm-up: windows rebuilt from the log"
        );
        self.warmed.insert(partition);
        if w.score_from > w.msg.offset() {
            self.next_offset.insert(partition, w.score_from);
        }
        let gap = stats.gap;
        if !gap.is_empty() {
            tracing::warn!(
                partition, committed = w.score_from, delivered = w.msg.offset(),
                recovered = gap.len(),
                "the broker resumed past the committed offset; scoring the skipped messages from the log"
            );
            self.metrics.resume_gap_events.inc_by(gap.len() as u64);
        }
        for g in &gap {
            let input = Input {
                topic: w.msg.topic(),
                partition,
                offset: g.offset,
                key: g.key.as_deref(),
                payload: &g.payload,
            };
            self.take_input(&input, accepted, rejected, offsets);
        }
        // What lies below the committed offset comes again and is skipped
        // as a redelivery (`next_offset`).
        let from = w.msg.offset();
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

    /// Cancels every running warm-up (the pipeline stops).
    pub(super) fn cancel_warm_ups(&mut self) {
        self.warming.clear();
        self.warming_changed();
    }

    /// Publishes how many partitions warm up (gauge, readiness).
    fn warming_changed(&self) {
        let n = self.warming.len()
            + (self.cancelled.values())
                .filter(|c| c.deferred.is_some())
                .count();
        self.metrics.partitions_warming.set(n as i64);
        self.health.warming.store(n > 0, Ordering::Relaxed);
    }

    /// Whether `partition`'s first message can be scored now, and from
    /// which committed offset. A partition this process did not just hold
    /// may still be worked on by its previous owner: tansu 0.6 hands
    /// partitions to a joining member without waiting for their owner to
    /// rejoin (Kafka's coordinator waits), and the owner only learns of the
    /// rebalance at its next heartbeat, then revokes and commits. So the
    /// offset is read again once a heartbeat interval and a commit interval
    /// have passed since the assignment; what the previous owner scored
    /// meanwhile is then below it and skipped as a redelivery (seen in CI:
    /// 30 events of a partition scored by both). Until then the partition
    /// is paused and its messages held, and the rest of the assignment
    /// keeps flowing. A partition with no committed offset, or one this
    /// process revoked itself (its offsets committed synchronously), does
    /// not wait.
    fn settle_plan(&self, consumer: &Consumer_, partition: i32) -> Plan {
        let Some(first) = self.committed_offset(consumer, partition) else {
            return Plan::Now(None);
        };
        if self.last_revoked.contains(&partition) {
            return Plan::Now(Some(first));
        }
        let Some(at) = self.revoked.assigned_at() else {
            return Plan::Now(Some(first));
        };
        let due = at + self.assign_settle;
        if due <= Instant::now() {
            return Plan::Now(Some(first));
        }
        Plan::Hold { due, first }
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
    /// A held partition's messages go unscored (their offsets were never
    /// stored, so its next owner scores them) and its pause is lifted
    /// (librdkafka keeps an application's pause across assignments).
    pub(super) fn forget_revoked(&mut self, consumer: &Consumer_) -> Vec<i32> {
        let revoked = self.revoked.take();
        if !revoked.is_empty() {
            // Only partitions this process took (warmed, or parked and
            // given back untouched) had their offsets committed by it; one
            // still held, or never delivered, may still be moving under its
            // previous owner.
            self.last_revoked = (revoked.iter().copied())
                .filter(|p| self.warmed.contains(p) || self.parked.contains_key(p))
                .collect();
        }
        for &p in &revoked {
            let next = self.next_offset.remove(&p);
            if let Some(w) = self.warming.remove(&p) {
                // Dropping the entry cancels the task; its users are
                // dropped when it reports (it may still be folding).
                self.cancelled.insert(
                    p,
                    CancelledWarmUp {
                        id: w.id,
                        deferred: None,
                    },
                );
                self.pause_or_resume(consumer, p, false);
                self.warming_changed();
                tracing::info!(
                    partition = p,
                    "partition revoked while warming up: warm-up cancelled, its messages left to its next owner"
                );
            }
            if let Some((m, _)) = (self.cancelled.get_mut(&p)).and_then(|c| c.deferred.take()) {
                self.pause_or_resume(consumer, p, false);
                self.warming_changed();
                tracing::info!(
                    partition = p,
                    held_offset = m.offset(),
                    "waiting partition revoked: its messages are left to its next owner"
                );
            }
            if let Some(s) = self.settling.remove(&p) {
                self.metrics
                    .partitions_settling
                    .set(self.settling.len() as i64);
                self.pause_or_resume(consumer, p, false);
                tracing::info!(
                    partition = p,
                    held_offset = s.msg.offset(),
                    "held partition revoked: its messages are left to its next owner"
                );
            }
            let assignments = self.revoked.revoked_at();
            if let Some(k) = self.parked.get_mut(&p) {
                k.assignments = assignments; // given back, revoked again untaken
            } else if self.warmed.remove(&p) {
                match next {
                    Some(next) => {
                        self.parked.insert(p, Parked { next, assignments });
                        tracing::info!(
                            partition = p,
                            folded_until = next,
                            "partition revoked: its windows kept until the next assignment"
                        );
                    }
                    None => self.drop_users(p),
                }
            }
        }
        if !self.parked.is_empty() {
            self.drop_unassigned_parked(consumer);
        }
        revoked
    }
}

/// [`Stage::settle_plan`]'s wait: the previous owner's heartbeat
/// interval (`heartbeat.interval.ms` of `[kafka.consumer]`, librdkafka's
/// 3 s when unset) plus its commit interval (the group's instances share
/// their configuration).
pub(super) fn assign_settle(cfg: &crate::config::Config) -> Duration {
    let heartbeat_ms = cfg
        .kafka
        .consumer
        .get("heartbeat.interval.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(3_000);
    Duration::from_millis(heartbeat_ms) + cfg.processing.commit_interval
}

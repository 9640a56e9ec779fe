//! Taking partitions: before the first message of a partition is scored,
//! revocations are applied and the partition's windows are rebuilt from the
//! log ([`super::warmup`]) on a blocking thread while the partition is
//! paused, so the instance's other partitions keep flowing; messages the
//! broker skipped between the committed offset and the first delivered one
//! are scored too, and the partition is read again from its first message.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::{Consumer_, Stage};

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
            || self.warm_ups.running(partition)
            || self.warm_ups.waits(partition)
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
    pub(super) fn drop_parked(&mut self, partition: i32) {
        if self.parked.remove(&partition).is_some() {
            self.drop_users(partition);
        }
    }

    /// Drops the windows of `partition`'s users and its lateness clock.
    pub(super) fn drop_users(&mut self, partition: i32) {
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
    pub(super) fn pause_or_resume(&self, consumer: &Consumer_, partition: i32, pause: bool) {
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
            self.cancel_revoked_warm_up(consumer, p);
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

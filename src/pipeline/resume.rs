//! Taking partitions: before the first message of a partition is scored,
//! revocations are applied and the partition's windows are rebuilt from the
//! log ([`super::warmup`]); messages the broker skipped between the
//! committed offset and the first delivered one are scored too.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{warmup, Consumer_, Input, Rejected, Scored, Stage};
use crate::events;
use crate::features::Lateness;

impl Stage {
    /// Warms up the message's partition first if it was not yet, and takes
    /// any message the broker skipped between the committed offset and this
    /// one into the batch (before this one).
    pub(super) async fn before_take(
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
            .settled_offset(consumer, m.partition())
            .await
            .unwrap_or(m.offset());
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
                partition = m.partition(),
                committed = score_from,
                delivered = m.offset(),
                "the broker resumed before the committed offset; skipping what was already scored"
            );
            self.next_offset.insert(m.partition(), score_from);
            score_from
        } else {
            m.offset()
        };
        let gap = self
            .warm_up(m.partition(), until, score_from.min(until), event_time)
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

    /// The committed offset to score `partition` from. A partition this
    /// process did not just hold may still be worked on by its previous
    /// owner: tansu 0.6 hands partitions to a joining member without
    /// waiting for their owner to rejoin (Kafka's coordinator waits), and
    /// the owner only learns of the rebalance at its next heartbeat, then
    /// revokes and commits. So the offset is read once a heartbeat interval
    /// and a commit interval have passed since the assignment; what the
    /// previous owner scored meanwhile is then below it and skipped as a
    /// redelivery (seen in CI: 30 events of a partition scored by both).
    /// A partition with no committed offset, or one this process revoked
    /// itself (its offsets committed synchronously), does not wait.
    async fn settled_offset(&self, consumer: &Consumer_, partition: i32) -> Option<i64> {
        let first = self.committed_offset(consumer, partition)?;
        if self.last_revoked.contains(&partition) {
            return Some(first);
        }
        let Some(at) = self.revoked.assigned_at() else {
            return Some(first);
        };
        let wait = (at + self.assign_settle).saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Some(first);
        }
        tokio::time::sleep(wait).await;
        let settled = self.committed_offset(consumer, partition).unwrap_or(first);
        if settled != first {
            tracing::info!(
                partition,
                at_assignment = first,
                settled,
                "the previous owner committed after the assignment"
            );
        }
        Some(settled.max(first))
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
    pub(super) fn forget_revoked(&mut self) -> Vec<i32> {
        let revoked = self.revoked.take();
        if !revoked.is_empty() {
            self.last_revoked = revoked.iter().copied().collect();
        }
        for &p in &revoked {
            self.next_offset.remove(&p);
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
        revoked
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
        let kafka = self.cfg.kafka.clone();
        let topic = self.in_topic.clone();
        let engine = self.engine.clone();
        let grace_ms = self.cfg.windows.grace.as_millis() as i64;
        let retention_ms = self.engine.spec().retention_ms();
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
                retention_ms,
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
        Ok(stats.gap)
    }
}

/// [`Stage::settled_offset`]'s wait: the previous owner's heartbeat
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

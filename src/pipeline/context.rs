//! The consumer context: logs rebalances and hands revoked partitions to
//! the loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{ConsumerContext, Rebalance};
use rdkafka::ClientContext;

/// Partitions revoked since the loop last looked. The loop looks before
/// every message, so the common "nothing revoked" case is one atomic load.
#[derive(Debug, Default)]
pub(crate) struct Revocations {
    pending: AtomicBool,
    partitions: Mutex<Vec<i32>>,
    /// When the current assignment was received.
    assigned_at: Mutex<Option<Instant>>,
    /// How many assignments were received.
    assignments: std::sync::atomic::AtomicU64,
    /// [`Self::assignments`] at the last revocation.
    revoked_at: std::sync::atomic::AtomicU64,
    /// The cancel flags of warm-ups started since their partition's last
    /// revocation: a revocation sets them at once, from the rebalance
    /// callback, so a revoked warm-up stops reading then and not at the
    /// loop's next wake-up (up to a second later on an idle instance).
    warm_ups: Mutex<HashMap<i32, Arc<AtomicBool>>>,
}

impl Revocations {
    fn assigned(&self) {
        if let Ok(mut t) = self.assigned_at.lock() {
            *t = Some(Instant::now());
        }
        self.assignments.fetch_add(1, Ordering::Release);
    }

    /// How many assignments were received so far.
    pub(crate) fn assignments(&self) -> u64 {
        self.assignments.load(Ordering::Acquire)
    }

    /// When the current assignment was received (None before the first).
    pub(crate) fn assigned_at(&self) -> Option<Instant> {
        self.assigned_at.lock().ok().and_then(|t| *t)
    }

    /// [`Self::assignments`] when the last revocation came: an assignment
    /// counted after it is the one that followed it.
    pub(crate) fn revoked_at(&self) -> u64 {
        self.revoked_at.load(Ordering::Acquire)
    }

    fn push(&self, partitions: Vec<i32>) {
        self.revoked_at
            .store(self.assignments.load(Ordering::Acquire), Ordering::Release);
        let cancels: Vec<_> = match self.warm_ups.lock() {
            Ok(mut w) => (partitions.iter()).filter_map(|p| w.remove(p)).collect(),
            Err(_) => Vec::new(),
        };
        if let Ok(mut p) = self.partitions.lock() {
            p.extend(partitions);
            self.pending.store(true, Ordering::Release);
        }
        // After the revocation is pending: a cancelled task's report finds
        // it there (the loop takes revocations before a report).
        for c in cancels {
            c.store(true, Ordering::Release);
        }
    }

    /// Registers the cancel flag of a warm-up of `partition`: the
    /// partition's next revocation sets it.
    pub(crate) fn warm_up_started(&self, partition: i32, cancel: Arc<AtomicBool>) {
        if let Ok(mut w) = self.warm_ups.lock() {
            w.insert(partition, cancel);
        }
    }

    /// Whether a revocation is waiting to be taken (one atomic load).
    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// The partitions revoked since the last call (usually none).
    pub(crate) fn take(&self) -> Vec<i32> {
        if !self.pending.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        self.partitions
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }
}

/// Next offsets handed to the acker and stored by it, per partition, so a
/// revocation can wait for the outputs of what was already processed.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    state: Mutex<(HashMap<i32, i64>, HashMap<i32, i64>)>,
    cv: Condvar,
}

impl InFlight {
    fn raise(map: &mut HashMap<i32, i64>, offsets: &[(i32, i64)]) {
        for (p, o) in offsets {
            let e = map.entry(*p).or_insert(i64::MIN);
            *e = (*e).max(*o);
        }
    }

    /// A batch with these next offsets went to the acker.
    pub(crate) fn emitted(&self, offsets: &[(i32, i64)]) {
        if let Ok(mut s) = self.state.lock() {
            Self::raise(&mut s.0, offsets);
        }
    }

    /// The acker stored these offsets (their outputs are acknowledged).
    pub(crate) fn stored(&self, offsets: &[(i32, i64)]) {
        if let Ok(mut s) = self.state.lock() {
            Self::raise(&mut s.1, offsets);
        }
        self.cv.notify_all();
    }

    /// Waits until every batch emitted for `partitions` is stored, at most
    /// `within`; then forgets those partitions. False on timeout.
    pub(crate) fn drain(&self, partitions: &[i32], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let done = loop {
            let behind = partitions.iter().any(|p| match s.0.get(p) {
                Some(e) => s.1.get(p).is_none_or(|a| a < e),
                None => false,
            });
            if !behind {
                break true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            s = match self.cv.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        };
        for p in partitions {
            s.0.remove(p);
            s.1.remove(p);
        }
        done
    }
}

/// Logs partition assignment changes and tells the loop which partitions
/// were revoked (their users are dropped and rebuilt if they come back).
///
/// On a revocation it first waits (up to `revoke_wait`) until the acker has
/// stored the offsets of every batch already processed for those
/// partitions, so librdkafka's commit on revoke (auto commit is on) commits
/// them: the new owner starts after the last scored event. Messages of the
/// revoked partitions still in the batch being collected are dropped by the
/// loop, unscored; their offsets were never stored, so the new owner scores
/// them.
pub struct PipelineContext {
    pub(crate) revoked: Arc<Revocations>,
    pub(crate) in_flight: Arc<InFlight>,
    pub(crate) revoke_wait: Duration,
    /// Consumer lag per partition, from librdkafka's statistics.
    pub(crate) consumer_lag: prometheus::IntGaugeVec,
}

impl ClientContext for PipelineContext {
    /// librdkafka statistics (every `statistics.interval.ms`): the consumer
    /// lag of each assigned partition (high watermark − position; librdkafka
    /// reports -1 while unknown, which is not exported).
    fn stats(&self, statistics: rdkafka::Statistics) {
        for topic in statistics.topics.values() {
            for (p, part) in &topic.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.consumer_lag
                        .with_label_values(&[&p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
    }
}

use crate::kafka::partitions_of;

fn describe(rebalance: &Rebalance<'_>) -> (&'static str, Vec<i32>) {
    match rebalance {
        Rebalance::Assign(tpl) => ("assign", partitions_of(tpl)),
        Rebalance::Revoke(tpl) => ("revoke", partitions_of(tpl)),
        Rebalance::Error(_) => ("error", Vec::new()),
    }
}

impl ConsumerContext for PipelineContext {
    /// A failed commit means the next owner of those partitions re-reads
    /// from an older offset (duplicates, never loss): worth a warning.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &rdkafka::TopicPartitionList,
    ) {
        match result {
            Ok(()) => {}
            // Nothing stored since the last commit.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                tracing::warn!(error = %e, partitions = ?partitions_of(offsets), "offset commit failed")
            }
        }
    }

    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let (kind, partitions) = describe(rebalance);
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(error = %e, "rebalance error");
        }
        tracing::info!(kind, ?partitions, "rebalance: before");
        if let Rebalance::Revoke(_) = rebalance {
            if partitions.is_empty() {
                return;
            }
            let started = Instant::now();
            let drain = || self.in_flight.drain(&partitions, self.revoke_wait);
            // Called from the loop's recv on a runtime worker: let the
            // runtime move its other tasks (the acker) elsewhere meanwhile.
            let done = match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(drain)
                }
                _ => drain(),
            };
            // Commit now, synchronously, while this member still belongs
            // to the generation that owns the partitions. librdkafka's own
            // commit on revoke is asynchronous and races the rejoin: a
            // broker that has moved to the next generation rejects it, and
            // the new owner scores again what was processed here.
            let committed = {
                use rdkafka::consumer::{CommitMode, Consumer};
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) => "committed",
                    Err(rdkafka::error::KafkaError::ConsumerCommit(
                        rdkafka::types::RDKafkaErrorCode::NoOffset,
                    )) => "nothing new to commit",
                    Err(e) => {
                        tracing::warn!(error = %e, ?partitions, "revoke: commit failed; the new owner re-reads from the last commit");
                        "commit failed"
                    }
                }
            };
            if done {
                tracing::info!(
                    ?partitions,
                    waited_ms = started.elapsed().as_millis() as u64,
                    committed,
                    "revoke: outputs of processed events acknowledged, offsets stored and committed"
                );
            } else {
                tracing::warn!(
                    ?partitions,
                    "revoke: outputs not all acknowledged in time; the new owner re-reads them"
                );
            }
        }
    }
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let (kind, partitions) = describe(rebalance);
        tracing::info!(kind, ?partitions, "rebalance: after");
        match rebalance {
            Rebalance::Revoke(_) => self.revoked.push(partitions),
            Rebalance::Assign(_) => self.revoked.assigned(),
            Rebalance::Error(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_waits_for_the_acker_and_times_out_otherwise() {
        let f = Arc::new(InFlight::default());
        f.emitted(&[(0, 10), (1, 5)]);
        // Nothing stored for partition 1: times out.
        assert!(!f.drain(&[1], Duration::from_millis(20)));
        f.emitted(&[(0, 20)]);
        let g = f.clone();
        let acker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            g.stored(&[(0, 10)]);
            std::thread::sleep(Duration::from_millis(30));
            g.stored(&[(0, 20)]);
        });
        let t = Instant::now();
        assert!(f.drain(&[0], Duration::from_secs(5)));
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "returned before the second store"
        );
        acker.join().unwrap();
        // Partitions never emitted need no wait.
        assert!(f.drain(&[7], Duration::from_millis(0)));
    }

    #[test]
    fn revocations_are_handed_over_once() {
        let r = Revocations::default();
        assert!(r.take().is_empty());
        r.push(vec![1, 3]);
        r.push(vec![2]);
        assert_eq!(r.take(), vec![1, 3, 2]);
        assert!(r.take().is_empty());
    }

    #[test]
    fn a_revocation_cancels_its_partitions_warm_ups_at_once() {
        let r = Revocations::default();
        let (w1, w2) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        r.warm_up_started(1, w1.clone());
        r.warm_up_started(2, w2.clone());
        r.push(vec![1, 3]);
        assert!(
            w1.load(Ordering::Acquire),
            "the revoked partition's warm-up goes on"
        );
        assert!(
            !w2.load(Ordering::Acquire),
            "a kept partition's warm-up was cancelled"
        );
        // A later warm-up of partition 1 has a flag of its own; an old
        // revocation does not reach it, the next one does.
        let w1b = Arc::new(AtomicBool::new(false));
        r.warm_up_started(1, w1b.clone());
        assert_eq!(r.take(), vec![1, 3]);
        assert!(!w1b.load(Ordering::Acquire));
        r.push(vec![1, 2]);
        assert!(w1b.load(Ordering::Acquire) && w2.load(Ordering::Acquire));
    }
}

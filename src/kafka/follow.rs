//! What the followers beside the fraud path share (the session follower,
//! the merchant stage): a consumer context that hands rebalances to the
//! loop, and the group's committed offset of a partition.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::partitions_of;

/// Hands assigned and revoked partitions to the loop (and wakes it: the
/// callbacks run inside `recv`, which returns only with a message).
pub struct AssignContext {
    what: &'static str,
    revoked: Mutex<Vec<i32>>,
    assigned: Mutex<Vec<i32>>,
    pending: AtomicBool,
    /// Notified on every rebalance.
    pub wake: tokio::sync::Notify,
}

impl AssignContext {
    /// `what` names the follower in log lines.
    pub fn new(what: &'static str) -> Self {
        AssignContext {
            what,
            revoked: Mutex::default(),
            assigned: Mutex::default(),
            pending: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// The partitions (revoked, assigned) since the last call, if any.
    pub fn take(&self) -> Option<(Vec<i32>, Vec<i32>)> {
        if !self.pending.swap(false, Ordering::Acquire) {
            return None;
        }
        let take = |m: &Mutex<Vec<i32>>| {
            m.lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default()
        };
        Some((take(&self.revoked), take(&self.assigned)))
    }
}

impl ClientContext for AssignContext {}

impl ConsumerContext for AssignContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let (list, ps) = match rebalance {
            Rebalance::Revoke(tpl) => (&self.revoked, partitions_of(tpl)),
            Rebalance::Assign(tpl) => (&self.assigned, partitions_of(tpl)),
            Rebalance::Error(_) => return,
        };
        tracing::info!(partitions = ?ps, assign = matches!(rebalance, Rebalance::Assign(_)), "{}: rebalance", self.what);
        if let Ok(mut r) = list.lock() {
            r.extend(ps);
            self.pending.store(true, Ordering::Release);
        }
        self.wake.notify_one();
    }
}

/// The committed offset of `partition` for the consumer's group, if any.
pub fn committed_offset<C: Consumer<X>, X: ConsumerContext>(
    c: &C,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
    match got.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

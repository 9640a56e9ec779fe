//! The consumer context: logs rebalances and hands revoked partitions to
//! the loop.

use std::sync::{Arc, Mutex};

use rdkafka::consumer::{ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};

/// Logs partition assignment changes and tells the loop which partitions
/// were revoked (their users are dropped and rebuilt if they come back).
pub struct PipelineContext {
    pub(crate) revoked: Arc<Mutex<Vec<i32>>>,
}

impl ClientContext for PipelineContext {}

/// The partitions of a list. rdkafka 0.36 builds a slice from the list's
/// element pointer even when the list is empty (null), which a debug build
/// of current Rust rejects with a panic: never touch the elements of an
/// empty list.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    if tpl.count() == 0 {
        return Vec::new();
    }
    tpl.elements().iter().map(|e| e.partition()).collect()
}

fn describe(rebalance: &Rebalance<'_>) -> (&'static str, Vec<i32>) {
    match rebalance {
        Rebalance::Assign(tpl) => ("assign", partitions_of(tpl)),
        Rebalance::Revoke(tpl) => ("revoke", partitions_of(tpl)),
        Rebalance::Error(_) => ("error", Vec::new()),
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, rebalance: &Rebalance<'_>) {
        let (kind, partitions) = describe(rebalance);
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(error = %e, "rebalance error");
        }
        tracing::info!(kind, ?partitions, "rebalance: before");
    }
    fn post_rebalance(&self, rebalance: &Rebalance<'_>) {
        let (kind, partitions) = describe(rebalance);
        tracing::info!(kind, ?partitions, "rebalance: after");
        if let Rebalance::Revoke(_) = rebalance {
            if let Ok(mut r) = self.revoked.lock() {
                r.extend(partitions);
            }
        }
    }
}

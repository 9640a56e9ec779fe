//! The consumer context: logs rebalances and hands revoked partitions to
//! the loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{ConsumerContext, Rebalance};
use rdkafka::ClientContext;

/// Partitions revoked since the loop last looked. The loop looks before
/// every message, so the common "nothing revoked" case is one atomic load.
#[derive(Debug, Default)]
pub(crate) struct Revocations {
    pending: AtomicBool,
    partitions: Mutex<Vec<i32>>,
}

impl Revocations {
    fn push(&self, partitions: Vec<i32>) {
        if let Ok(mut p) = self.partitions.lock() {
            p.extend(partitions);
            self.pending.store(true, Ordering::Release);
        }
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

/// Logs partition assignment changes and tells the loop which partitions
/// were revoked (their users are dropped and rebuilt if they come back).
pub struct PipelineContext {
    pub(crate) revoked: Arc<Revocations>,
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
            self.revoked.push(partitions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_are_handed_over_once() {
        let r = Revocations::default();
        assert!(r.take().is_empty());
        r.push(vec![1, 3]);
        r.push(vec![2]);
        assert_eq!(r.take(), vec![1, 3, 2]);
        assert!(r.take().is_empty());
    }
}

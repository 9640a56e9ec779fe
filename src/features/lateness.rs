//! Lateness: which events are older than the grace period of their partition.

use std::collections::HashMap;

/// Decides which events are late beyond the grace period: older than the
/// newest event time seen on their partition minus the grace. Such events
/// are still scored but not folded into the windows.
#[derive(Debug, Clone)]
pub struct Lateness {
    grace_ms: i64,
    newest: HashMap<i32, i64>,
}

impl Lateness {
    pub fn new(grace_ms: i64) -> Self {
        Lateness {
            grace_ms,
            newest: HashMap::new(),
        }
    }

    /// Forgets a partition's clock (it was revoked).
    pub fn forget(&mut self, partition: i32) {
        self.newest.remove(&partition);
    }

    /// `partition`'s clock: the newest event time seen on it.
    pub fn clock(&self, partition: i32) -> Option<i64> {
        self.newest.get(&partition).copied()
    }

    /// Sets `partition`'s clock (taken from a warm-up's own [`Lateness`]).
    pub fn set_clock(&mut self, partition: i32, newest: i64) {
        self.newest.insert(partition, newest);
    }

    /// The newest event time seen on each partition (the partition clocks).
    pub fn newest(&self) -> &HashMap<i32, i64> {
        &self.newest
    }

    /// Observes an event of `partition` at `event_time`; true when it is late
    /// beyond the grace period.
    pub fn is_late(&mut self, partition: i32, event_time: i64) -> bool {
        let newest = self.newest.entry(partition).or_insert(i64::MIN);
        let late = *newest != i64::MIN && event_time < *newest - self.grace_ms;
        *newest = (*newest).max(event_time);
        late
    }
}

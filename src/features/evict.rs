//! Bounding the window state: idle eviction by each partition's event-time
//! clock, key limits (least recently active first), and the measures of it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use dashmap::DashMap;

use super::{FeatureEngine, MerchantState, StoreStats, UserState};

/// Drops the least recently active keys of `map` down to 90 % of `limit`.
fn shrink<V>(map: &DashMap<String, V>, limit: usize, last: impl Fn(&V) -> i64) -> usize {
    let target = limit - limit / 10;
    let mut times: Vec<i64> = map.iter().map(|e| last(e.value())).collect();
    if times.len() <= target {
        return 0;
    }
    let k = times.len() - target;
    let (_, cutoff, _) = times.select_nth_unstable(k - 1);
    let cutoff = *cutoff;
    let mut removed = 0;
    map.retain(|_, v| {
        if removed < k && last(v) <= cutoff {
            removed += 1;
            false
        } else {
            true
        }
    });
    removed
}

impl FeatureEngine {
    /// Keeps each store under its key limit: every `check_every` updates,
    /// a store over its limit drops its least recently active keys down to
    /// 90 % of the limit (so a flood of new ids costs amortised O(1)).
    pub(super) fn enforce_limits(&self) {
        let n = self.updates.fetch_add(1, Ordering::Relaxed);
        if n % self.check_every != 0 {
            return;
        }
        if self.users.len() > self.spec.max_users {
            let dropped = shrink(&self.users, self.spec.max_users, |u| u.last_event_time);
            self.limit_evicted
                .0
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        if self.merchants.len() > self.spec.max_merchants {
            let dropped = shrink(&self.merchants, self.spec.max_merchants, |m| {
                m.last_event_time()
            });
            self.limit_evicted
                .1
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    /// Keys evicted by the limits since the last call: (users, merchants).
    pub fn take_limit_evictions(&self) -> (u64, u64) {
        (
            self.limit_evicted.0.swap(0, Ordering::Relaxed),
            self.limit_evicted.1.swap(0, Ordering::Relaxed),
        )
    }

    /// Newest event time folded into the state, if any.
    pub fn max_event_time(&self) -> Option<i64> {
        let v = self.max_event_time.load(Ordering::Relaxed);
        (v != i64::MIN).then_some(v)
    }

    /// [`FeatureEngine::evict_idle_by`] with one clock: the newest event
    /// time folded in (for state fed from a single ordered stream).
    pub fn evict_idle(&self) -> ((usize, usize), StoreStats) {
        let Some(newest) = self.max_event_time() else {
            return ((0, 0), self.stats_only());
        };
        self.evict_idle_by(&HashMap::from([(-1, newest)]))
    }

    /// Drops keys with no event within the longest horizon plus grace, and
    /// measures what stays. Returns the evicted (users, merchants) and the
    /// stats after eviction.
    ///
    /// Time is per input partition (`newest`: newest event time seen on
    /// each): partitions move through event time at their own pace (during
    /// catch-up one can be hours ahead of another), so a user is idle by its
    /// own partition's clock, and a merchant, whose events come from every
    /// partition, by the slowest one. A user of a partition with no clock is
    /// kept.
    pub fn evict_idle_by(&self, newest: &HashMap<i32, i64>) -> ((usize, usize), StoreStats) {
        let Some(slowest) = newest.values().copied().min() else {
            return ((0, 0), self.stats_only());
        };
        let keep_for = self.spec.retention_ms();
        let merchant_cutoff = slowest - keep_for;
        let (mut eu, mut em) = (0, 0);
        let mut stats = StoreStats::default();
        self.users.retain(|k, u| {
            let keep = match newest.get(&u.partition) {
                Some(n) => u.last_event_time >= n - keep_for,
                None => true,
            };
            if keep {
                stats.user_bytes += u.heap_bytes() + k.len() + std::mem::size_of::<UserState>();
            } else {
                eu += 1;
            }
            keep
        });
        self.merchants.retain(|k, m| {
            let keep = m.last_event_time() >= merchant_cutoff;
            if keep {
                stats.merchant_bytes +=
                    m.heap_bytes() + k.len() + std::mem::size_of::<MerchantState>();
            } else {
                em += 1;
            }
            keep
        });
        stats.user_keys = self.users.len();
        stats.merchant_keys = self.merchants.len();
        ((eu, em), stats)
    }

    /// Drops the users whose events come from `partition` (it was revoked:
    /// their state will be rebuilt from the log if it comes back). Returns
    /// how many were dropped.
    pub fn drop_partition_users(&self, partition: i32) -> usize {
        let before = self.users.len();
        self.users.retain(|_, u| u.partition != partition);
        before - self.users.len()
    }

    fn stats_only(&self) -> StoreStats {
        StoreStats {
            user_keys: self.users.len(),
            merchant_keys: self.merchants.len(),
            ..StoreStats::default()
        }
    }

    /// Number of (user, merchant) keys held.
    pub fn key_counts(&self) -> (usize, usize) {
        (self.users.len(), self.merchants.len())
    }
}

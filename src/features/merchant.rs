//! Window state of one merchant, and its snapshot as a `merchant-features`
//! record carries it (the merchant stage and the replicated table share it).

use serde::{Deserialize, Serialize};

use super::window::{self, stable_hash, DistinctWindow, SumWindow};
use super::{mean, WindowSpec, N_FEATURES};

/// Window state of one merchant.
#[derive(Debug, Clone)]
pub struct MerchantState {
    hour: SumWindow,
    day: SumWindow,
    users_hour: DistinctWindow,
    last_event_time: i64,
}

/// A merchant's window state as a `merchant-features` record carries it
/// (schemas/merchant-features.json): the live buckets of each window, so a
/// reader evaluates the windows at its own event's time exactly as the
/// owner of the merchant would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSnapshot {
    pub hour_bucket_ms: i64,
    pub day_bucket_ms: i64,
    /// Newest event time folded in, epoch ms.
    pub last_event_time: i64,
    /// `(bucket, count, sum)` of the 1 h window.
    pub hour: Vec<(i64, u32, f32)>,
    /// `(bucket, count, sum)` of the 24 h window.
    pub day: Vec<(i64, u32, f32)>,
    /// `(bucket, bitmap)` of the 1 h distinct-users window.
    pub users_hour: Vec<(i64, [u64; window::DISTINCT_WORDS])>,
}

impl MerchantState {
    /// An empty state for windows of `spec`.
    pub fn new(spec: &WindowSpec) -> Self {
        MerchantState {
            hour: SumWindow::new(spec.hour_n()),
            day: SumWindow::new(spec.day_n()),
            users_hour: DistinctWindow::new(spec.hour_n()),
            last_event_time: i64::MIN,
        }
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.hour.heap_bytes() + self.day.heap_bytes() + self.users_hour.heap_bytes()
    }

    /// Newest event time folded in (`i64::MIN`: none).
    pub fn last_event_time(&self) -> i64 {
        self.last_event_time
    }

    /// Folds one transaction (its time, amount and user) in.
    pub fn fold(&mut self, spec: &WindowSpec, event_time: i64, amount: f64, user_id: &str) {
        let (ts, amount) = (event_time, amount as f32);
        self.hour.add(ts.div_euclid(spec.hour_bucket_ms), amount);
        self.day.add(ts.div_euclid(spec.day_bucket_ms), amount);
        self.users_hour
            .add(ts.div_euclid(spec.hour_bucket_ms), stable_hash(user_id));
        self.last_event_time = self.last_event_time.max(ts);
    }

    /// The five merchant features as of `event_time`, into `out[15..20]`.
    pub fn features_at(&self, spec: &WindowSpec, event_time: i64, out: &mut [f32; N_FEATURES]) {
        let hb = event_time.div_euclid(spec.hour_bucket_ms);
        let h = self.hour.query(hb);
        let d = self.day.query(event_time.div_euclid(spec.day_bucket_ms));
        out[15] = h.count as f32;
        out[16] = mean(h);
        out[17] = d.count as f32;
        out[18] = mean(d);
        out[19] = self.users_hour.query(hb) as f32;
    }

    pub fn snapshot(&self, spec: &WindowSpec) -> MerchantSnapshot {
        MerchantSnapshot {
            hour_bucket_ms: spec.hour_bucket_ms,
            day_bucket_ms: spec.day_bucket_ms,
            last_event_time: self.last_event_time,
            hour: self.hour.parts(),
            day: self.day.parts(),
            users_hour: self.users_hour.parts(),
        }
    }

    /// The state a snapshot describes; an error when it was made with other
    /// bucket widths than `spec` (instances must share the window config).
    pub fn from_snapshot(spec: &WindowSpec, s: &MerchantSnapshot) -> anyhow::Result<Self> {
        if s.hour_bucket_ms != spec.hour_bucket_ms || s.day_bucket_ms != spec.day_bucket_ms {
            anyhow::bail!(
                "merchant snapshot has buckets {} ms / {} ms, this instance {} ms / {} ms (windows.hour_bucket / windows.day_bucket must be equal on every instance)",
                s.hour_bucket_ms,
                s.day_bucket_ms,
                spec.hour_bucket_ms,
                spec.day_bucket_ms
            );
        }
        Ok(MerchantState {
            hour: SumWindow::from_parts(spec.hour_n(), &s.hour),
            day: SumWindow::from_parts(spec.day_n(), &s.day),
            users_hour: DistinctWindow::from_parts(spec.hour_n(), &s.users_hour),
            last_event_time: s.last_event_time,
        })
    }
}

//! Per-user and per-merchant window state, and the feature vector computed
//! from it.
//!
//! [`FeatureEngine::process`] computes an event's features from the state
//! *before* the event (point-in-time correct), then folds the event into the
//! state. The same code serves the stream, `streamscore features export` (the
//! training data) and, read-only, synchronous scoring, so training and serving
//! features cannot drift apart. docs/FEATURES.md defines every feature.

mod evict;
mod lateness;
mod merchant;
pub mod window;

pub use lateness::Lateness;
pub use merchant::{MerchantSnapshot, MerchantState};

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;
use serde::ser::SerializeMap;
use serde::Serialize;

use crate::config::WindowConfig;
use crate::events::Transaction;
use window::{stable_hash, DistinctWindow, SumWindow};

/// Number of features, the model's input width.
pub const N_FEATURES: usize = 20;

/// Feature names in model input order (the model sidecar must list the same).
pub const FEATURE_NAMES: [&str; N_FEATURES] = [
    "amount",
    "amount_log",
    "user_txn_count_1m",
    "user_amount_sum_1m",
    "user_txn_count_1h",
    "user_amount_sum_1h",
    "user_txn_count_24h",
    "user_amount_sum_24h",
    "user_distinct_merchants_1h",
    "user_seconds_since_last_txn",
    "user_amount_mean_24h",
    "user_amount_std_24h",
    "user_amount_zscore_24h",
    "user_new_device",
    "user_new_country",
    "merchant_txn_count_1h",
    "merchant_amount_mean_1h",
    "merchant_txn_count_24h",
    "merchant_amount_mean_24h",
    "merchant_distinct_users_1h",
];

/// Seconds-since-last for a user with no previous transaction: 30 days.
pub const NO_PREVIOUS_SECONDS: f32 = 2_592_000.0;
/// Known devices remembered per user (least recently seen forgotten first).
pub const MAX_DEVICES: usize = 8;
/// Known countries remembered per user.
pub const MAX_COUNTRIES: usize = 4;
/// The longest window horizon, 24 h, in ms.
pub const LONGEST_HORIZON_MS: i64 = 86_400_000;

/// One event's feature values, in [`FEATURE_NAMES`] order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features(pub [f32; N_FEATURES]);

impl Features {
    /// True when every value is finite (the model must never see NaN/inf).
    pub fn all_finite(&self) -> bool {
        self.0.iter().all(|v| v.is_finite())
    }
}

impl Serialize for Features {
    /// A JSON object `name → value`, for the audit trail in every score.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(N_FEATURES))?;
        for (name, v) in FEATURE_NAMES.iter().zip(self.0.iter()) {
            m.serialize_entry(name, v)?;
        }
        m.end()
    }
}

/// Bucket widths in ms, derived from [`WindowConfig`].
#[derive(Debug, Clone, Copy)]
pub struct WindowSpec {
    pub minute_bucket_ms: i64,
    pub hour_bucket_ms: i64,
    pub day_bucket_ms: i64,
    pub grace_ms: i64,
    pub max_users: usize,
    pub max_merchants: usize,
}

impl From<&WindowConfig> for WindowSpec {
    fn from(w: &WindowConfig) -> Self {
        WindowSpec {
            minute_bucket_ms: w.minute_bucket.as_millis() as i64,
            hour_bucket_ms: w.hour_bucket.as_millis() as i64,
            day_bucket_ms: w.day_bucket.as_millis() as i64,
            grace_ms: w.grace.as_millis() as i64,
            max_users: w.max_users,
            max_merchants: w.max_merchants,
        }
    }
}

impl WindowSpec {
    /// How far back (event time) an event can still change a feature: the
    /// longest horizon, plus one bucket of it (a window counts whole
    /// buckets, so its oldest bucket reaches up to a bucket further back),
    /// plus the grace for late events. Warm-up replays this much; idle
    /// eviction keeps keys this long.
    pub fn retention_ms(&self) -> i64 {
        LONGEST_HORIZON_MS + self.day_bucket_ms + self.grace_ms
    }

    fn minute_n(&self) -> usize {
        (60_000 / self.minute_bucket_ms) as usize
    }
    fn hour_n(&self) -> usize {
        (3_600_000 / self.hour_bucket_ms) as usize
    }
    fn day_n(&self) -> usize {
        (LONGEST_HORIZON_MS / self.day_bucket_ms) as usize
    }
}

/// A small set of recently seen hashed values with their last-seen time.
#[derive(Debug, Clone, Default)]
struct RecentSet {
    items: Vec<(u64, i64)>,
}

impl RecentSet {
    /// Whether `h` was seen at or after `since`.
    fn seen_since(&self, h: u64, since: i64) -> bool {
        self.items.iter().any(|(x, t)| *x == h && *t >= since)
    }
    /// Whether anything was seen at or after `since`.
    fn any_since(&self, since: i64) -> bool {
        self.items.iter().any(|(_, t)| *t >= since)
    }
    fn touch(&mut self, h: u64, at: i64, cap: usize) {
        if let Some(e) = self.items.iter_mut().find(|(x, _)| *x == h) {
            e.1 = e.1.max(at);
            return;
        }
        if self.items.len() >= cap {
            // Forget the least recently seen (ties: smallest hash, deterministic).
            if let Some(idx) = self
                .items
                .iter()
                .enumerate()
                .min_by_key(|(_, (x, t))| (*t, *x))
                .map(|(i, _)| i)
            {
                self.items.swap_remove(idx);
            }
        }
        self.items.push((h, at));
    }
}

/// Window state of one user.
#[derive(Debug, Clone)]
pub struct UserState {
    minute: SumWindow,
    hour: SumWindow,
    day: SumWindow,
    /// Squared amounts over 24 h, for the deviation.
    day_sq: SumWindow,
    merchants_hour: DistinctWindow,
    last_event_time: i64,
    /// Input partition the user's events come from (-1: unknown), so the
    /// keys of a revoked partition can be dropped.
    partition: i32,
    devices: RecentSet,
    countries: RecentSet,
}

impl UserState {
    fn new(spec: &WindowSpec) -> Self {
        UserState {
            minute: SumWindow::new(spec.minute_n()),
            hour: SumWindow::new(spec.hour_n()),
            day: SumWindow::new(spec.day_n()),
            day_sq: SumWindow::new(spec.day_n()),
            merchants_hour: DistinctWindow::new(spec.hour_n()),
            last_event_time: i64::MIN,
            partition: -1,
            devices: RecentSet::default(),
            countries: RecentSet::default(),
        }
    }

    fn heap_bytes(&self) -> usize {
        self.minute.heap_bytes()
            + self.hour.heap_bytes()
            + self.day.heap_bytes()
            + self.day_sq.heap_bytes()
            + self.merchants_hour.heap_bytes()
            + (self.devices.items.capacity() + self.countries.items.capacity()) * 16
    }
}

pub(super) fn mean(c: window::CountSum) -> f32 {
    if c.count == 0 {
        0.0
    } else {
        c.sum / c.count as f32
    }
}

/// A key's window values evaluated at `as_of` (the feature views of the
/// serving API).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowView {
    /// The event time the windows end at.
    pub as_of: i64,
    /// The key's newest event time.
    pub last_event_time: i64,
    /// Values in [`FEATURE_NAMES`] order.
    pub features: Features,
}

/// Sizes of the window stores, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub user_keys: usize,
    pub merchant_keys: usize,
    pub user_bytes: usize,
    pub merchant_bytes: usize,
}

/// The window stores: users and merchants, concurrent maps so readers (the
/// serving layer) never block the stream for long.
pub struct FeatureEngine {
    spec: WindowSpec,
    users: DashMap<String, UserState>,
    merchants: DashMap<String, MerchantState>,
    /// Newest event time folded into state (for idle eviction).
    max_event_time: AtomicI64,
    /// Updates since start; the key limits are checked every `check_every`.
    updates: AtomicU64,
    check_every: u64,
    /// Keys evicted by the limits (users, merchants), read by metrics.
    limit_evicted: (AtomicU64, AtomicU64),
}

impl FeatureEngine {
    pub fn new(spec: WindowSpec) -> Self {
        FeatureEngine {
            spec,
            users: DashMap::new(),
            merchants: DashMap::new(),
            max_event_time: AtomicI64::new(i64::MIN),
            updates: AtomicU64::new(0),
            check_every: (spec.max_users.min(spec.max_merchants) / 10).clamp(1, 1024) as u64,
            limit_evicted: (AtomicU64::new(0), AtomicU64::new(0)),
        }
    }

    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    fn user_features(&self, u: Option<&UserState>, t: &Transaction, out: &mut [f32; N_FEATURES]) {
        let s = &self.spec;
        let amount = t.amount;
        let Some(u) = u else {
            out[9] = NO_PREVIOUS_SECONDS;
            return;
        };
        let m = u.minute.query(t.event_time.div_euclid(s.minute_bucket_ms));
        let h = u.hour.query(t.event_time.div_euclid(s.hour_bucket_ms));
        let d = u.day.query(t.event_time.div_euclid(s.day_bucket_ms));
        out[2] = m.count as f32;
        out[3] = m.sum;
        out[4] = h.count as f32;
        out[5] = h.sum;
        out[6] = d.count as f32;
        out[7] = d.sum;
        out[8] = u
            .merchants_hour
            .query(t.event_time.div_euclid(s.hour_bucket_ms)) as f32;
        // Only a previous transaction within the longest horizon counts: a
        // replay of that horizon (warm-up) must give the same value as a run
        // that never stopped, so older history reads as "none".
        out[9] = match t.event_time.checked_sub(u.last_event_time) {
            Some(gap) if u.last_event_time != i64::MIN && gap <= LONGEST_HORIZON_MS => {
                gap.max(0) as f32 / 1000.0
            }
            _ => NO_PREVIOUS_SECONDS,
        };
        // Amount statistics over the same 24 h window (so a replay of the
        // window horizon rebuilds them exactly).
        let db = t.event_time.div_euclid(s.day_bucket_ms);
        let sq = u.day_sq.query(db);
        let n = f64::from(d.count);
        let mean = if d.count > 0 {
            f64::from(d.sum) / n
        } else {
            0.0
        };
        let std = if d.count >= 2 {
            ((f64::from(sq.sum) - n * mean * mean) / (n - 1.0))
                .max(0.0)
                .sqrt()
        } else {
            0.0
        };
        out[10] = mean as f32;
        out[11] = std as f32;
        out[12] = if d.count >= 2 && std > 1e-6 {
            ((amount - mean) / std).clamp(-50.0, 50.0) as f32
        } else {
            0.0
        };
        let since = t.event_time - LONGEST_HORIZON_MS;
        out[13] = f32::from(
            u.devices.any_since(since) && !u.devices.seen_since(stable_hash(&t.device_id), since),
        );
        out[14] = f32::from(
            u.countries.any_since(since) && !u.countries.seen_since(stable_hash(&t.country), since),
        );
    }

    fn merchant_features(
        &self,
        m: Option<&MerchantState>,
        t: &Transaction,
        out: &mut [f32; N_FEATURES],
    ) {
        if let Some(m) = m {
            m.features_at(&self.spec, t.event_time, out);
        }
    }

    /// The features of `t` as of its event time, from the current state,
    /// without changing anything (synchronous scoring uses this).
    pub fn features(&self, t: &Transaction) -> Features {
        let mut out = Self::event_features(t);
        {
            let u = self.users.get(&t.user_id);
            self.user_features(u.as_deref(), t, &mut out);
        }
        {
            let m = self.merchants.get(&t.merchant_id);
            self.merchant_features(m.as_deref(), t, &mut out);
        }
        Features(out)
    }

    /// The features of `t` from its user's windows only (entries 15.. are
    /// zero: the stream takes merchant features from the replicated
    /// merchant table), without changing anything.
    pub fn user_features_only(&self, t: &Transaction) -> Features {
        let mut out = Self::event_features(t);
        let u = self.users.get(&t.user_id);
        self.user_features(u.as_deref(), t, &mut out);
        Features(out)
    }

    /// Point-in-time features of `t` from its user's windows (merchant
    /// entries zero), then, when `update`, `t` folded into the user's
    /// windows. The merchant windows live in the merchant stage
    /// (`crate::merchants`), which the stream feeds through the
    /// repartition topic.
    pub fn process_user_from(&self, partition: i32, t: &Transaction, update: bool) -> Features {
        if !update {
            return self.user_features_only(t);
        }
        let mut out = Self::event_features(t);
        {
            let mut u = self.user_entry(t);
            self.user_features(Some(&*u), t, &mut out);
            u.partition = partition;
            self.fold_user(&mut u, t);
        }
        self.max_event_time
            .fetch_max(t.event_time, Ordering::Relaxed);
        self.enforce_limits();
        Features(out)
    }

    /// A user's current window values as of `at` (default: the newest
    /// event time folded in), computed by the same code as a score's
    /// features; the event-specific
    /// entries (amount, z-score, new device/country) are meaningless here.
    /// None: unknown user.
    pub fn user_view(&self, user_id: &str, at: Option<i64>) -> Option<WindowView> {
        let u = self.users.get(user_id)?;
        let as_of = at.unwrap_or_else(|| self.max_event_time().unwrap_or(u.last_event_time));
        let probe = Self::probe(user_id, "", as_of);
        let mut out = [0f32; N_FEATURES];
        self.user_features(Some(&*u), &probe, &mut out);
        Some(WindowView {
            as_of,
            last_event_time: u.last_event_time,
            features: Features(out),
        })
    }

    /// A merchant's current window values as of `at` (see
    /// [`FeatureEngine::user_view`]). None: unknown merchant.
    pub fn merchant_view(&self, merchant_id: &str, at: Option<i64>) -> Option<WindowView> {
        let m = self.merchants.get(merchant_id)?;
        let as_of = at.unwrap_or_else(|| self.max_event_time().unwrap_or(m.last_event_time()));
        let probe = Self::probe("", merchant_id, as_of);
        let mut out = [0f32; N_FEATURES];
        self.merchant_features(Some(&*m), &probe, &mut out);
        Some(WindowView {
            as_of,
            last_event_time: m.last_event_time(),
            features: Features(out),
        })
    }

    fn probe(user_id: &str, merchant_id: &str, at: i64) -> Transaction {
        Transaction {
            txn_id: String::new(),
            user_id: user_id.into(),
            merchant_id: merchant_id.into(),
            amount: 0.0,
            currency: String::new(),
            country: String::new(),
            device_id: String::new(),
            event_time: at,
            fraud_pattern: None,
        }
    }

    fn event_features(t: &Transaction) -> [f32; N_FEATURES] {
        let mut out = [0f32; N_FEATURES];
        out[0] = t.amount as f32;
        out[1] = t.amount.ln_1p() as f32;
        out
    }

    fn user_entry(&self, t: &Transaction) -> dashmap::mapref::one::RefMut<'_, String, UserState> {
        match self.users.get_mut(&t.user_id) {
            Some(u) => u,
            None => self
                .users
                .entry(t.user_id.clone())
                .or_insert_with(|| UserState::new(&self.spec)),
        }
    }

    fn merchant_entry(
        &self,
        t: &Transaction,
    ) -> dashmap::mapref::one::RefMut<'_, String, MerchantState> {
        match self.merchants.get_mut(&t.merchant_id) {
            Some(m) => m,
            None => self
                .merchants
                .entry(t.merchant_id.clone())
                .or_insert_with(|| MerchantState::new(&self.spec)),
        }
    }

    fn fold_user(&self, u: &mut UserState, t: &Transaction) {
        let s = &self.spec;
        let (ts, amount) = (t.event_time, t.amount as f32);
        u.minute.add(ts.div_euclid(s.minute_bucket_ms), amount);
        u.hour.add(ts.div_euclid(s.hour_bucket_ms), amount);
        u.day.add(ts.div_euclid(s.day_bucket_ms), amount);
        u.day_sq
            .add(ts.div_euclid(s.day_bucket_ms), amount * amount);
        u.merchants_hour
            .add(ts.div_euclid(s.hour_bucket_ms), stable_hash(&t.merchant_id));
        u.last_event_time = u.last_event_time.max(ts);
        u.devices.touch(stable_hash(&t.device_id), ts, MAX_DEVICES);
        u.countries
            .touch(stable_hash(&t.country), ts, MAX_COUNTRIES);
    }

    fn fold_merchant(&self, m: &mut MerchantState, t: &Transaction) {
        m.fold(&self.spec, t.event_time, t.amount, &t.user_id);
    }

    /// Folds `t` into the state of its user and merchant.
    pub fn update(&self, t: &Transaction) {
        self.update_from(-1, t, true);
    }

    /// Folds `t`, read from input `partition`, into its user's state and,
    /// when `merchant` is true, its merchant's (a warm-up that replays a
    /// partition already counted in the merchant windows passes false).
    pub fn update_from(&self, partition: i32, t: &Transaction, merchant: bool) {
        {
            let mut u = self.user_entry(t);
            u.partition = partition;
            self.fold_user(&mut u, t);
        }
        if merchant {
            self.fold_merchant(&mut self.merchant_entry(t), t);
        }
        self.max_event_time
            .fetch_max(t.event_time, Ordering::Relaxed);
        self.enforce_limits();
    }

    /// Point-in-time features of `t`, then (when `update`) `t` folded into
    /// the state. `update` is false for events later than the grace period.
    pub fn process(&self, t: &Transaction, update: bool) -> Features {
        self.process_from(-1, t, update)
    }

    /// [`FeatureEngine::process`] for an event read from input `partition`.
    /// One map lookup per store: features and update happen under the same
    /// entry lock (a fresh entry gives the same features as no entry).
    pub fn process_from(&self, partition: i32, t: &Transaction, update: bool) -> Features {
        if !update {
            return self.features(t);
        }
        let mut out = Self::event_features(t);
        {
            let mut u = self.user_entry(t);
            self.user_features(Some(&*u), t, &mut out);
            u.partition = partition;
            self.fold_user(&mut u, t);
        }
        {
            let mut m = self.merchant_entry(t);
            self.merchant_features(Some(&*m), t, &mut out);
            self.fold_merchant(&mut m, t);
        }
        self.max_event_time
            .fetch_max(t.event_time, Ordering::Relaxed);
        self.enforce_limits();
        Features(out)
    }
}

#[cfg(test)]
mod tests;

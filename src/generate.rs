//! `streamscore generate`: synthetic transactions (and interactions) with
//! labelled fraud patterns, deterministic for a given `--seed`.
//!
//! Normal traffic: users (activity-weighted) pay mostly at a few favourite
//! merchants, from their own device and home country, amounts log-normal
//! around a per-user typical amount; a little honest noise (travel, a new
//! phone) keeps the flags from being perfect labels.
//!
//! Fraud patterns, each labelled in `fraud_pattern`:
//! - `card_testing`: a burst of 6–15 small amounts (0.5–5) a few seconds
//!   apart at many merchants, often from a foreign device;
//! - `account_takeover`: a new device in a foreign country, 1–3 payments of
//!   5–20× the user's typical amount;
//! - `compromised_merchant`: for a few minutes, 15–40 payments at one
//!   merchant from many users, at 3–6× the user's typical amount.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::events::{Interaction, InteractionKind, Transaction};

/// SplitMix64: tiny, fast, and the same sequence on every platform and
/// version (what `--seed` promises).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.f64() * n as f64) as usize % n.max(1)
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-12);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).max(1e-12).ln()
    }
    /// Index in [0, n) skewed to small values (popularity).
    pub fn skewed(&mut self, n: usize) -> usize {
        let r = self.f64();
        ((r * r * r) * n as f64) as usize % n.max(1)
    }
}

/// Sampling proportional to fixed log-normal weights (σ = 1): a heavy tail
/// of busy users and merchants whose *per-key rate* does not depend on how
/// many keys there are (a power-law index would give the top key a share
/// that shrinks only as N^-1/3, so scaling users up would not scale the
/// busiest users' rates down, and their window counts would drift away from
/// the training stream's).
#[derive(Debug, Clone)]
pub struct Weighted {
    cumulative: Vec<f64>,
}

impl Weighted {
    pub fn new(rng: &mut Rng, n: usize) -> Self {
        let mut acc = 0.0;
        let cumulative = (0..n.max(1))
            .map(|_| {
                acc += rng.normal().exp();
                acc
            })
            .collect();
        Weighted { cumulative }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.f64() * total;
        self.cumulative
            .partition_point(|c| *c <= x)
            .min(self.cumulative.len() - 1)
    }
}

const COUNTRIES: [&str; 12] = [
    "FR", "DE", "ES", "IT", "NL", "BE", "PT", "IE", "US", "BR", "NG", "VN",
];
/// Countries users live in; fraud comes from the rest.
const HOME_COUNTRIES: usize = 8;

#[derive(Debug, Clone)]
struct User {
    country: usize,
    typical: f64,
    favourites: [usize; 3],
    devices: u32,
}

/// Options of the generator.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub seed: u64,
    pub users: usize,
    pub merchants: usize,
    /// Target share of fraudulent transactions (0..1).
    pub fraud_rate: f64,
    /// Mean simulated gap between events, ms.
    pub mean_gap_ms: f64,
    /// Simulated time of the first event, epoch ms.
    pub start_ms: i64,
}

/// An endless, deterministic stream of transactions in event-time order.
pub struct TxnGenerator {
    rng: Rng,
    opts: GenOptions,
    users: Vec<User>,
    user_weights: Weighted,
    merchant_weights: Weighted,
    merchant_typical: Vec<f64>,
    clock: i64,
    seq: u64,
    pending: BinaryHeap<Reverse<(i64, u64, PendingTxn)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PendingTxn {
    user: usize,
    merchant: usize,
    amount_cents: i64,
    country: usize,
    device: String,
    pattern: &'static str,
}

impl TxnGenerator {
    pub fn new(opts: GenOptions) -> Self {
        let mut rng = Rng::new(opts.seed);
        let user_weights = Weighted::new(&mut rng, opts.users);
        let merchant_weights = Weighted::new(&mut rng, opts.merchants);
        let users = (0..opts.users.max(1))
            .map(|_| User {
                country: rng.below(HOME_COUNTRIES),
                typical: (3.0 + 0.8 * rng.normal()).exp().clamp(2.0, 2_000.0),
                favourites: [
                    merchant_weights.sample(&mut rng),
                    merchant_weights.sample(&mut rng),
                    rng.below(opts.merchants.max(1)),
                ],
                devices: 1,
            })
            .collect();
        let merchant_typical = (0..opts.merchants.max(1))
            .map(|_| (3.2 + 0.6 * rng.normal()).exp())
            .collect();
        TxnGenerator {
            clock: opts.start_ms,
            rng,
            users,
            user_weights,
            merchant_weights,
            merchant_typical,
            seq: 0,
            pending: BinaryHeap::new(),
            opts,
        }
    }

    fn schedule(&mut self, at: i64, p: PendingTxn) {
        self.seq += 1;
        self.pending.push(Reverse((at, self.seq, p)));
    }

    fn cents(x: f64) -> i64 {
        (x * 100.0).round() as i64
    }

    fn start_fraud(&mut self) {
        let users = self.users.len();
        let merchants = self.merchant_typical.len();
        let pick = self.rng.f64();
        let mut at = self.clock;
        if pick < 0.45 {
            let u = self.rng.below(users);
            let n = 6 + self.rng.below(10);
            let device = if self.rng.chance(0.6) {
                format!("fraud-dev-{}", self.rng.next_u64() % 1_000_000)
            } else {
                format!("dev-{u}-0")
            };
            let country = self.users[u].country;
            for _ in 0..n {
                at += self.rng.range(1_000.0, 8_000.0) as i64;
                let p = PendingTxn {
                    user: u,
                    merchant: self.rng.below(merchants),
                    amount_cents: Self::cents(self.rng.range(0.5, 5.0)),
                    country,
                    device: device.clone(),
                    pattern: "card_testing",
                };
                self.schedule(at, p);
            }
        } else if pick < 0.8 {
            let u = self.rng.below(users);
            let country = HOME_COUNTRIES + self.rng.below(COUNTRIES.len() - HOME_COUNTRIES);
            let device = format!("ato-dev-{}", self.rng.next_u64() % 1_000_000);
            let n = 1 + self.rng.below(3);
            for _ in 0..n {
                at += self.rng.range(30_000.0, 300_000.0) as i64;
                let typical = self.users[u].typical;
                let p = PendingTxn {
                    user: u,
                    merchant: self.rng.below(merchants),
                    amount_cents: Self::cents(typical * self.rng.range(5.0, 20.0)),
                    country,
                    device: device.clone(),
                    pattern: "account_takeover",
                };
                self.schedule(at, p);
            }
        } else {
            let m = self.rng.below(merchants);
            let n = 15 + self.rng.below(26);
            for _ in 0..n {
                at += self.rng.range(2_000.0, 15_000.0) as i64;
                let u = self.rng.below(users);
                let user = &self.users[u];
                let (country, typical) = (user.country, user.typical);
                let p = PendingTxn {
                    user: u,
                    merchant: m,
                    amount_cents: Self::cents(typical * self.rng.range(3.0, 6.0)),
                    country,
                    device: format!("dev-{u}-0"),
                    pattern: "compromised_merchant",
                };
                self.schedule(at, p);
            }
        }
    }

    fn normal_txn(&mut self) -> PendingTxn {
        let u = self.user_weights.sample(&mut self.rng);
        let merchant = if self.rng.chance(0.7) {
            self.users[u].favourites[self.rng.below(3)]
        } else {
            self.merchant_weights.sample(&mut self.rng)
        };
        let user = &mut self.users[u];
        if self.rng.chance(0.002) {
            user.devices += 1; // a new phone
        }
        let device = format!("dev-{u}-{}", self.rng.below(user.devices as usize));
        let country = if self.rng.chance(0.01) {
            self.rng.below(HOME_COUNTRIES) // travel
        } else {
            user.country
        };
        let amount = user.typical * (0.6 * self.rng.normal()).exp();
        PendingTxn {
            user: u,
            merchant,
            amount_cents: Self::cents(amount.max(0.5)),
            country,
            device,
            pattern: "",
        }
    }

    fn build(&self, at: i64, seq: u64, p: PendingTxn) -> Transaction {
        Transaction {
            txn_id: format!("txn-{}-{seq:010}", self.opts.seed),
            user_id: format!("user-{}", p.user),
            merchant_id: format!("merchant-{}", p.merchant),
            amount: p.amount_cents as f64 / 100.0,
            currency: "EUR".into(),
            country: COUNTRIES[p.country].into(),
            device_id: p.device,
            event_time: at,
            fraud_pattern: (!p.pattern.is_empty()).then(|| p.pattern.to_string()),
        }
    }
}

impl Iterator for TxnGenerator {
    type Item = Transaction;

    fn next(&mut self) -> Option<Transaction> {
        loop {
            if let Some(Reverse((at, _, _))) = self.pending.peek() {
                if *at <= self.clock {
                    let Reverse((at, _, p)) = self.pending.pop()?;
                    self.seq += 1;
                    return Some(self.build(at, self.seq, p));
                }
            }
            self.clock += self.rng.exp(self.opts.mean_gap_ms).round() as i64;
            // A fraud episode carries ~10 events on average.
            if self.rng.chance(self.opts.fraud_rate / 10.0) {
                self.start_fraud();
            } else {
                // Through the heap too, so it comes out after any fraud
                // event that is due earlier.
                let p = self.normal_txn();
                self.schedule(self.clock, p);
            }
        }
    }
}

/// Interactions with taste structure: users belong to one of `groups` taste
/// groups, each preferring a slice of the catalogue; 80 % of a user's events
/// fall in their group's items, the rest anywhere (popularity-skewed).
pub struct InteractionGenerator {
    rng: Rng,
    users: usize,
    items: usize,
    groups: usize,
    clock: i64,
    mean_gap_ms: f64,
    seq: u64,
}

impl InteractionGenerator {
    pub fn new(seed: u64, users: usize, items: usize, start_ms: i64, mean_gap_ms: f64) -> Self {
        InteractionGenerator {
            rng: Rng::new(seed.wrapping_add(7)),
            users: users.max(1),
            items: items.max(1),
            groups: 20.min(items.max(1)),
            clock: start_ms,
            mean_gap_ms,
            seq: 0,
        }
    }
}

impl Iterator for InteractionGenerator {
    type Item = Interaction;

    fn next(&mut self) -> Option<Interaction> {
        self.clock += self.rng.exp(self.mean_gap_ms).round() as i64;
        self.seq += 1;
        let u = self.rng.skewed(self.users);
        let per_group = (self.items / self.groups).max(1);
        let item = if self.rng.chance(0.8) {
            (u % self.groups) * per_group + self.rng.skewed(per_group)
        } else {
            self.rng.skewed(self.items)
        };
        let r = self.rng.f64();
        let kind = if r < 0.6 {
            InteractionKind::View
        } else if r < 0.85 {
            InteractionKind::Click
        } else if r < 0.95 {
            InteractionKind::AddToCart
        } else {
            InteractionKind::Purchase
        };
        Some(Interaction {
            event_id: format!("ev-{}", self.seq),
            user_id: format!("user-{u}"),
            item_id: format!("item-{}", item.min(self.items - 1)),
            kind,
            event_time: self.clock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seed: u64) -> GenOptions {
        GenOptions {
            seed,
            users: 1_000,
            merchants: 100,
            fraud_rate: 0.02,
            mean_gap_ms: 50.0,
            start_ms: 1_764_000_000_000,
        }
    }

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let a: Vec<_> = TxnGenerator::new(opts(1)).take(500).collect();
        let b: Vec<_> = TxnGenerator::new(opts(1)).take(500).collect();
        let c: Vec<_> = TxnGenerator::new(opts(2)).take(500).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn stream_is_in_event_time_order_with_unique_ids_and_all_patterns() {
        let v: Vec<_> = TxnGenerator::new(opts(3)).take(50_000).collect();
        assert!(v.windows(2).all(|w| w[0].event_time <= w[1].event_time));
        let ids: std::collections::HashSet<_> = v.iter().map(|t| &t.txn_id).collect();
        assert_eq!(ids.len(), v.len());
        let fraud = v.iter().filter(|t| t.fraud_pattern.is_some()).count() as f64;
        let share = fraud / v.len() as f64;
        assert!((0.01..0.04).contains(&share), "fraud share {share}");
        for p in ["card_testing", "account_takeover", "compromised_merchant"] {
            assert!(
                v.iter().any(|t| t.fraud_pattern.as_deref() == Some(p)),
                "{p}"
            );
        }
        let card: Vec<_> = v
            .iter()
            .filter(|t| t.fraud_pattern.as_deref() == Some("card_testing"))
            .collect();
        assert!(card.iter().all(|t| t.amount <= 5.0));
    }

    #[test]
    fn busiest_user_rate_does_not_grow_with_the_user_count() {
        // The top user's share must fall roughly like 1/N, so the same
        // per-user traffic is had with N users at rate R and 20N at 20R.
        let share = |users: usize| {
            let mut rng = Rng::new(1);
            let w = Weighted::new(&mut rng, users);
            let mut hits = vec![0u32; users];
            for _ in 0..200_000 {
                hits[w.sample(&mut rng)] += 1;
            }
            f64::from(*hits.iter().max().unwrap()) / 200_000.0
        };
        let small = share(5_000);
        let large = share(100_000);
        assert!(small < 0.01, "top user share {small}");
        assert!(large * 5.0 < small, "{large} vs {small}");
    }

    #[test]
    fn interactions_follow_taste_groups() {
        let v: Vec<_> = InteractionGenerator::new(1, 100, 1_000, 0, 10.0)
            .take(10_000)
            .collect();
        // user-0's group owns items 0..50: most of their events land there.
        let mine: Vec<_> = v.iter().filter(|i| i.user_id == "user-0").collect();
        let in_group = mine
            .iter()
            .filter(|i| i.item_id[5..].parse::<usize>().unwrap() < 50)
            .count();
        assert!(in_group * 10 >= mine.len() * 7, "{in_group}/{}", mine.len());
    }
}

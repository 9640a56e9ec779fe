//! Batch recommendation candidates: item-to-item co-occurrence over user
//! histories, rebuilt from the whole `interactions` log (the kappa "batch
//! layer"). docs/RECOMMENDATIONS.md describes the algorithm and its knobs.
//!
//! [`Builder`] folds interactions in log order; [`Builder::finish`] ranks.
//! Everything is deterministic for a given input order: ties are broken by
//! item id and users are emitted sorted by id, so the same log range gives
//! byte-identical output.

mod eval;
mod fold;
pub mod hybrid;
mod merge;
pub mod periodic;
pub mod publish;
mod rank;
mod rebuild;
pub mod replay;
pub mod store;

pub use eval::{evaluate, holdout_eval, Quality};
pub use fold::{Builder, FoldBatch};
pub use rank::{Encoded, Ranker};
pub use rebuild::rebuild_once;

use serde::{Deserialize, Serialize};

use fold::UserState;

/// One recommended item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub item_id: String,
    pub score: f64,
}

/// Where a user's list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Neighbours of the user's own history.
    Batch,
    /// The popularity list (the user's history gave no candidate).
    Popular,
}

/// One user's candidates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserRecs {
    pub user_id: String,
    pub items: Vec<Scored>,
    pub source: Source,
}

/// What a build produces.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// Sorted by user id.
    pub users: Vec<UserRecs>,
    pub popular: Vec<Scored>,
    /// Interactions folded in.
    pub events: u64,
    /// Distinct items seen.
    pub items: usize,
    /// Per item (sorted by item id), its strongest co-occurring items: the
    /// serving layer boosts these when the item is in a live session.
    pub neighbours: Vec<(String, Vec<Scored>)>,
}

/// A hint to the CPU to load the line of `p` (no effect elsewhere than
/// x86_64; never faults).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it reads nothing and never faults,
    // whatever the address.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Growing exponential weight: 2^((t − t0) / half_life). Dividing by the
/// weight of the newest event at the end turns it into the usual decay by
/// age (ranking only needs the ratios).
fn growth(t0: Option<i64>, t: i64, half_life_ms: f64) -> f64 {
    let t0 = t0.unwrap_or(t);
    ((t - t0) as f64 / half_life_ms).exp2()
}

/// Keeps the `max` strongest of `v` (ties by item index), in no order.
fn strongest(v: &mut Vec<(u32, f32)>, max: usize) {
    if v.len() <= max {
        return;
    }
    let by_strength = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if max > 0 {
        v.select_nth_unstable_by(max - 1, by_strength);
    }
    v.truncate(max);
}

/// The `k` best by score, ties by item id.
fn top(it: impl Iterator<Item = (u32, f64)>, names: &[String], k: usize) -> Vec<Scored> {
    // Collected first: the caller's iterator may reset scratch state.
    let mut v: Vec<(u32, f64)> = it.collect();
    top_into(&mut v, names, k);
    v.into_iter()
        .map(|(i, score)| Scored {
            item_id: names[i as usize].clone(),
            score,
        })
        .collect()
}

/// Cuts `v` to its `k` best by score (ties by item id), best first, with
/// scores rounded to 6 decimals.
fn top_into(v: &mut Vec<(u32, f64)>, names: &[String], k: usize) {
    top_by(v, k, |a, b| names[a as usize].cmp(&names[b as usize]));
}

/// [`top_into`] with ties broken by `tie(item, item)`, which must order
/// items as their ids do (the ranking passes each item's place in id
/// order: comparing the ids themselves read two strings from memory on
/// every tie, a fifth of the ranking's time).
fn top_by(v: &mut Vec<(u32, f64)>, k: usize, tie: impl Fn(u32, u32) -> std::cmp::Ordering) {
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then_with(|| tie(a.0, b.0));
    if k == 0 {
        v.clear();
        return;
    }
    if v.len() > k {
        // The best k so far, sorted, at the front; one pass over the rest
        // (most are below the k-th and cost one comparison).
        v[..k].sort_unstable_by(order);
        for i in k..v.len() {
            let c = v[i];
            if c.1 < v[k - 1].1 || order(&c, &v[k - 1]).is_ge() {
                continue;
            }
            let mut j = k - 1;
            while j > 0 && order(&c, &v[j - 1]).is_lt() {
                v[j] = v[j - 1];
                j -= 1;
            }
            v[j] = c;
        }
        v.truncate(k);
    } else {
        v.sort_unstable_by(order);
    }
    for s in v.iter_mut() {
        s.1 = round6(s.1);
    }
}

/// Scores are rounded so their text form is stable and short.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests;

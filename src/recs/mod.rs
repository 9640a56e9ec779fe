//! Batch recommendation candidates: item-to-item co-occurrence over user
//! histories, rebuilt from the whole `interactions` log (the kappa "batch
//! layer"). docs/RECOMMENDATIONS.md describes the algorithm and its knobs.
//!
//! [`Builder`] folds interactions in log order; [`Builder::finish`] ranks.
//! Everything is deterministic for a given input order: ties are broken by
//! item id and users are emitted sorted by id, so the same log range gives
//! byte-identical output.

mod eval;
pub mod hybrid;
pub mod periodic;
pub mod publish;
mod rebuild;
pub mod replay;
pub mod store;

pub use eval::{evaluate, holdout_eval, Quality};
pub use rebuild::rebuild_once;

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use crate::config::RecsConfig;
use crate::events::{Interaction, InteractionKind};

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

struct UserState {
    /// Most recent interactions: (item, kind weight, event time).
    history: VecDeque<(u32, f64, i64)>,
    /// Items bought (bounded like the history).
    bought: VecDeque<u32>,
}

/// Folds interactions, in log order, into co-occurrence counts.
pub struct Builder {
    cfg: RecsConfig,
    /// Item and user indices (a fast non-cryptographic hasher: the keys
    /// are ids from our own log, and this is the hottest lookup).
    ids: FxHashMap<String, u32>,
    names: Vec<String>,
    user_ids: FxHashMap<String, u32>,
    users: Vec<(String, UserState)>,
    /// Neighbours per item, weighted (f32: half the memory traffic of the
    /// fold's hottest tables; sums of one pair stay well within its
    /// precision for ranking).
    co: Vec<FxHashMap<u32, f32>>,
    /// Scratch list of the items touched by one event (reused).
    touched: Vec<u32>,
    /// Decayed popularity per item (log2 scale reference below).
    popularity: Vec<f64>,
    /// Time origin of the exponential weights (the first event).
    t0: Option<i64>,
    newest: i64,
    events: u64,
}

/// Growing exponential weight: 2^((t − t0) / half_life). Dividing by the
/// weight of the newest event at the end turns it into the usual decay by
/// age (ranking only needs the ratios).
fn growth(t0: Option<i64>, t: i64, half_life_ms: f64) -> f64 {
    let t0 = t0.unwrap_or(t);
    ((t - t0) as f64 / half_life_ms).exp2()
}

impl Builder {
    pub fn new(cfg: &RecsConfig) -> Builder {
        Builder {
            cfg: cfg.clone(),
            ids: FxHashMap::default(),
            names: Vec::new(),
            user_ids: FxHashMap::default(),
            users: Vec::new(),
            co: Vec::new(),
            touched: Vec::new(),
            popularity: Vec::new(),
            t0: None,
            newest: i64::MIN,
            events: 0,
        }
    }

    fn kind_weight(&self, k: InteractionKind) -> f64 {
        match k {
            InteractionKind::View => self.cfg.weight_view,
            InteractionKind::Click => self.cfg.weight_click,
            InteractionKind::AddToCart => self.cfg.weight_add_to_cart,
            InteractionKind::Purchase => self.cfg.weight_purchase,
        }
    }

    fn item(&mut self, name: &str) -> u32 {
        if let Some(i) = self.ids.get(name) {
            return *i;
        }
        let i = self.names.len() as u32;
        self.ids.insert(name.to_string(), i);
        self.names.push(name.to_string());
        self.co.push(FxHashMap::default());
        self.popularity.push(0.0);
        i
    }

    fn user(&mut self, id: &str) -> usize {
        if let Some(u) = self.user_ids.get(id) {
            return *u as usize;
        }
        let u = self.users.len();
        self.user_ids.insert(id.to_string(), u as u32);
        self.users.push((
            id.to_string(),
            UserState {
                history: VecDeque::new(),
                bought: VecDeque::new(),
            },
        ));
        u
    }

    /// Folds one interaction.
    pub fn add(&mut self, ev: &Interaction) {
        self.add_parts(&ev.user_id, &ev.item_id, ev.kind, ev.event_time);
    }

    /// Folds one interaction given by its fields.
    pub fn add_parts(&mut self, user_id: &str, item_id: &str, kind: InteractionKind, time: i64) {
        if self.t0.is_none() {
            self.t0 = Some(time);
        }
        self.newest = self.newest.max(time);
        self.events += 1;
        let item = self.item(item_id);
        let w = self.kind_weight(kind);
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let pop_ms = self.cfg.popular_half_life.as_millis() as f64;
        let g = growth(self.t0, time, decay_ms);
        self.popularity[item as usize] += w * growth(self.t0, time, pop_ms);
        let cap = self.cfg.history_cap;
        let window = self.cfg.cooccurrence_window;
        let max_n = self.cfg.max_neighbours;
        let u = self.user(user_id);
        let user = &mut self.users[u].1;
        // Co-occurrence with each distinct item of the user's last
        // cooccurrence_window interactions (a linear scan beats a set here).
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        for &(other, ow, _) in user.history.iter().rev().take(window) {
            if other == item || touched.contains(&other) {
                continue;
            }
            touched.push(other);
            let pair = (w * ow * g) as f32;
            *self.co[item as usize].entry(other).or_insert(0.0) += pair;
            *self.co[other as usize].entry(item).or_insert(0.0) += pair;
        }
        user.history.push_back((item, w, time));
        while user.history.len() > cap {
            user.history.pop_front();
        }
        if kind == InteractionKind::Purchase && !user.bought.contains(&item) {
            user.bought.push_back(item);
            while user.bought.len() > cap {
                user.bought.pop_front();
            }
        }
        touched.push(item);
        for i in &touched {
            prune(&mut self.co[*i as usize], max_n);
        }
        self.touched = touched;
    }

    /// Ends the fold: what ranking needs, with every neighbour list cut to
    /// its `max_neighbours` strongest (ties by item index) and sorted by
    /// item (a fixed summation order, so scores do not depend on hash
    /// iteration order), and the users sorted by id.
    pub fn into_ranker(self) -> Ranker {
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let pop_ms = self.cfg.popular_half_life.as_millis() as f64;
        let norm = growth(self.t0, self.newest, decay_ms);
        let pop_norm = growth(self.t0, self.newest, pop_ms);
        let popular = top(
            self.popularity
                .iter()
                .enumerate()
                .filter(|(_, s)| **s > 0.0)
                .map(|(i, s)| (i as u32, s / pop_norm)),
            &self.names,
            self.cfg.popular_k,
        );
        let max_n = self.cfg.max_neighbours;
        // All lists in one array (an item's list is contiguous, its start
        // in nb_start): ranking reads them at random.
        let mut nb_start = Vec::with_capacity(self.co.len() + 1);
        let mut nb = Vec::new();
        nb_start.push(0u32);
        for ns in self.co {
            let mut v: Vec<(u32, f32)> = ns.into_iter().collect();
            strongest(&mut v, max_n);
            v.sort_unstable_by_key(|(n, _)| *n);
            nb.extend(v);
            nb_start.push(nb.len() as u32);
        }
        let popular_idx = popular
            .iter()
            .map(|s| self.ids.get(&s.item_id).copied().unwrap_or(u32::MAX))
            .collect();
        let mut users = self.users;
        users.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ranker {
            cfg: self.cfg,
            names: self.names,
            users,
            nb_start,
            nb,
            popular,
            popular_idx,
            t0: self.t0,
            norm,
            events: self.events,
        }
    }

    /// Ranks every user at once (see [`Ranker`] for ranking in chunks).
    pub fn finish(self) -> Candidates {
        let r = self.into_ranker();
        let users = r.rank(0..r.user_count(), 1);
        Candidates {
            users,
            popular: r.popular.clone(),
            neighbours: r.serve_neighbours(),
            events: r.events,
            items: r.names.len(),
        }
    }
}

/// The folded state, ready to rank: users can be ranked in chunks (in user
/// id order) and on several threads, so publishing can start before the
/// last user is ranked.
pub struct Ranker {
    cfg: RecsConfig,
    names: Vec<String>,
    /// Sorted by user id.
    users: Vec<(String, UserState)>,
    /// Item `i`'s neighbours are `nb[nb_start[i]..nb_start[i + 1]]`,
    /// sorted by item.
    nb_start: Vec<u32>,
    nb: Vec<(u32, f32)>,
    popular: Vec<Scored>,
    /// Item indices of `popular`.
    popular_idx: Vec<u32>,
    t0: Option<i64>,
    norm: f64,
    events: u64,
}

/// Per-thread scratch of the ranking: a dense accumulator over all items
/// and the items it touched.
struct Scratch {
    acc: Vec<f64>,
    hit: Vec<bool>,
    touched: Vec<u32>,
    hist: Vec<(u32, f64)>,
}

impl Ranker {
    fn neighbours(&self, item: u32) -> &[(u32, f32)] {
        let i = item as usize;
        &self.nb[self.nb_start[i] as usize..self.nb_start[i + 1] as usize]
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn items(&self) -> usize {
        self.names.len()
    }

    pub fn popular(&self) -> &[Scored] {
        &self.popular
    }

    /// Ranks the users in `range` (indices in user id order), split over
    /// `threads` threads; the result is in user id order and the same for
    /// any thread count.
    pub fn rank(&self, range: std::ops::Range<usize>, threads: usize) -> Vec<UserRecs> {
        let threads = threads.clamp(1, range.len().max(1));
        if threads == 1 {
            return self.rank_seq(range);
        }
        let per = range.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let from = range.start + t * per;
                    let to = (from + per).min(range.end);
                    s.spawn(move || self.rank_seq(from..to))
                })
                .collect();
            let mut out = Vec::with_capacity(range.len());
            for h in handles {
                // A panic in a ranking thread is a bug: pass it on.
                out.extend(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
            }
            out
        })
    }

    fn rank_seq(&self, range: std::ops::Range<usize>) -> Vec<UserRecs> {
        let mut sc = Scratch {
            acc: vec![0.0; self.names.len()],
            hit: vec![false; self.names.len()],
            touched: Vec::new(),
            hist: Vec::new(),
        };
        self.users[range]
            .iter()
            .map(|(id, u)| {
                let (items, source) = self.rank_user(u, &mut sc);
                UserRecs {
                    user_id: id.clone(),
                    items,
                    source,
                }
            })
            .collect()
    }

    /// One user: the neighbours of their history weighted by how strongly
    /// and how recently they interacted, minus what they bought.
    fn rank_user(&self, u: &UserState, sc: &mut Scratch) -> (Vec<Scored>, Source) {
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let k = self.cfg.top_k;
        let norm = self.norm;
        // History weight per item, summed in history order, by item.
        sc.hist.clear();
        sc.hist.extend(
            u.history
                .iter()
                .map(|&(item, w, t)| (item, w * growth(self.t0, t, decay_ms) / norm)),
        );
        sc.hist.sort_by_key(|(i, _)| *i);
        let bought = &u.bought;
        sc.touched.clear();
        let mut i = 0;
        while i < sc.hist.len() {
            let item = sc.hist[i].0;
            let mut hw = 0.0;
            while i < sc.hist.len() && sc.hist[i].0 == item {
                hw += sc.hist[i].1;
                i += 1;
            }
            for &(n, c) in self.neighbours(item) {
                let c = f64::from(c);
                if bought.contains(&n) {
                    continue;
                }
                let slot = n as usize;
                if !sc.hit[slot] {
                    sc.hit[slot] = true;
                    sc.touched.push(n);
                }
                sc.acc[slot] += hw * c / norm;
            }
        }
        if sc.touched.is_empty() {
            let items = self
                .popular
                .iter()
                .zip(&self.popular_idx)
                .filter(|(_, i)| !bought.contains(i))
                .take(k)
                .map(|(s, _)| s.clone())
                .collect();
            return (items, Source::Popular);
        }
        let acc = &mut sc.acc;
        let hit = &mut sc.hit;
        let list = top(
            sc.touched.iter().map(|&n| {
                let v = acc[n as usize];
                acc[n as usize] = 0.0;
                hit[n as usize] = false;
                (n, v)
            }),
            &self.names,
            k,
        );
        (list, Source::Batch)
    }

    /// Per item (sorted by item id), its `serve_neighbours` strongest
    /// co-occurring items, for the serving layer's session re-ranking.
    pub fn serve_neighbours(&self) -> Vec<(String, Vec<Scored>)> {
        let serve_n = self.cfg.serve_neighbours;
        let mut item_order: Vec<u32> = (0..self.names.len() as u32).collect();
        item_order.sort_unstable_by(|a, b| self.names[*a as usize].cmp(&self.names[*b as usize]));
        item_order
            .into_iter()
            .filter(|i| !self.neighbours(*i).is_empty())
            .map(|i| {
                let list = top(
                    self.neighbours(i)
                        .iter()
                        .map(|(n, c)| (*n, f64::from(*c) / self.norm)),
                    &self.names,
                    serve_n,
                );
                (self.names[i as usize].clone(), list)
            })
            .collect()
    }
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

/// Keeps the `max` strongest neighbours once a list is twice that long
/// (amortised; ties by item index, so pruning is deterministic).
fn prune(ns: &mut FxHashMap<u32, f32>, max: usize) {
    if ns.len() <= 2 * max {
        return;
    }
    let mut v: Vec<(u32, f32)> = ns.drain().collect();
    strongest(&mut v, max);
    ns.extend(v);
}

/// The `k` best by score, ties by item id.
fn top(it: impl Iterator<Item = (u32, f64)>, names: &[String], k: usize) -> Vec<Scored> {
    // Collected first: the caller's iterator may reset scratch state.
    let mut v: Vec<(u32, f64)> = it.collect();
    let order = |a: &(u32, f64), b: &(u32, f64)| {
        b.1.total_cmp(&a.1)
            .then_with(|| names[a.0 as usize].cmp(&names[b.0 as usize]))
    };
    if k == 0 {
        return Vec::new();
    }
    if v.len() > k {
        v.select_nth_unstable_by(k - 1, order);
        v.truncate(k);
    }
    v.sort_unstable_by(order);
    v.into_iter()
        .map(|(i, s)| Scored {
            item_id: names[i as usize].clone(),
            score: round6(s),
        })
        .collect()
}

/// Scores are rounded so their text form is stable and short.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests;

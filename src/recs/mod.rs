//! Batch recommendation candidates: item-to-item co-occurrence over user
//! histories, rebuilt from the whole `interactions` log (the kappa "batch
//! layer"). docs/RECOMMENDATIONS.md describes the algorithm and its knobs.
//!
//! [`Builder`] folds interactions in log order; [`Builder::finish`] ranks.
//! Everything is deterministic for a given input order: ties are broken by
//! item id and users are emitted sorted by id, so the same log range gives
//! byte-identical output.

pub mod hybrid;
pub mod periodic;
pub mod publish;
pub mod replay;
pub mod store;

use std::collections::{HashMap, HashSet, VecDeque};

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use crate::config::RecsConfig;
use crate::events::{Interaction, InteractionKind};

/// One rebuild: replays the whole `interactions` log, ranks, and publishes
/// the next generation. `progress(done, total)` is called now and then
/// from the replay thread; setting `cancel` aborts the replay (nothing is
/// published then, the previous generation stays).
pub async fn rebuild_once(
    cfg: &crate::config::Config,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    progress: impl FnMut(u64, u64) + Send + 'static,
) -> anyhow::Result<(publish::Meta, replay::ReplayStats)> {
    use anyhow::Context;
    let kafka = cfg.kafka.clone();
    let topic = cfg.topic(crate::topics::INTERACTIONS);
    let limits = crate::events::Limits::from_config(&cfg.processing);
    let recs_cfg = cfg.recs.clone();
    let (candidates, stats, replay_secs, rank_secs) = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut b = Builder::new(&recs_cfg);
        let stats = replay::read_all(&kafka, &topic, &limits, &cancel, |e| b.add(&e), progress)?;
        let replay_secs = started.elapsed().as_secs_f64();
        let c = b.finish();
        let rank_secs = started.elapsed().as_secs_f64() - replay_secs;
        anyhow::Ok((c, stats, replay_secs, rank_secs))
    })
    .await
    .context("rebuild task")??;
    let started = std::time::Instant::now();
    let meta = publish::publish(cfg, &candidates, stats.ranges.clone(), crate::now_ms()).await?;
    tracing::info!(
        replay_seconds = replay_secs,
        rank_seconds = rank_secs,
        publish_seconds = started.elapsed().as_secs_f64(),
        users = meta.users,
        "rebuild phases"
    );
    Ok((meta, stats))
}

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
    ids: HashMap<String, u32>,
    names: Vec<String>,
    users: HashMap<String, UserState>,
    /// Neighbours per item, weighted (a fast non-cryptographic hasher:
    /// keys are our own item indices).
    co: Vec<FxHashMap<u32, f64>>,
    /// Scratch list of the items touched by one event (reused).
    touched: Vec<u32>,
    /// Decayed popularity per item (log2 scale reference below).
    popularity: Vec<f64>,
    /// Time origin of the exponential weights (the first event).
    t0: Option<i64>,
    newest: i64,
    events: u64,
}

impl Builder {
    pub fn new(cfg: &RecsConfig) -> Builder {
        Builder {
            cfg: cfg.clone(),
            ids: HashMap::new(),
            names: Vec::new(),
            users: HashMap::new(),
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

    /// Growing exponential weight: 2^((t − t0) / half_life). Dividing by
    /// the weight of the newest event at the end turns it into the usual
    /// decay by age (ranking only needs the ratios).
    fn growth(&self, t: i64, half_life_ms: f64) -> f64 {
        let t0 = self.t0.unwrap_or(t);
        ((t - t0) as f64 / half_life_ms).exp2()
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

    /// Folds one interaction.
    pub fn add(&mut self, ev: &Interaction) {
        if self.t0.is_none() {
            self.t0 = Some(ev.event_time);
        }
        self.newest = self.newest.max(ev.event_time);
        self.events += 1;
        let item = self.item(&ev.item_id);
        let w = self.kind_weight(ev.kind);
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let pop_ms = self.cfg.popular_half_life.as_millis() as f64;
        let g = self.growth(ev.event_time, decay_ms);
        self.popularity[item as usize] += w * self.growth(ev.event_time, pop_ms);
        let cap = self.cfg.history_cap;
        let max_n = self.cfg.max_neighbours;
        let user = self
            .users
            .entry(ev.user_id.clone())
            .or_insert_with(|| UserState {
                history: VecDeque::new(),
                bought: VecDeque::new(),
            });
        // Co-occurrence with each distinct item of the user's recent history
        // (at most history_cap: a linear scan beats a set here).
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        for &(other, ow, _) in user.history.iter().rev() {
            if other == item || touched.contains(&other) {
                continue;
            }
            touched.push(other);
            let pair = w * ow * g;
            *self.co[item as usize].entry(other).or_insert(0.0) += pair;
            *self.co[other as usize].entry(item).or_insert(0.0) += pair;
        }
        user.history.push_back((item, w, ev.event_time));
        while user.history.len() > cap {
            user.history.pop_front();
        }
        if ev.kind == InteractionKind::Purchase && !user.bought.contains(&item) {
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

    /// Ranks: per user, the neighbours of their history weighted by how
    /// strongly and how recently they interacted, minus what they bought.
    pub fn finish(self) -> Candidates {
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let pop_ms = self.cfg.popular_half_life.as_millis() as f64;
        let k = self.cfg.top_k;
        let norm = self.growth(self.newest, decay_ms);
        let pop_norm = self.growth(self.newest, pop_ms);
        let popular_all = top(
            self.popularity
                .iter()
                .enumerate()
                .filter(|(_, s)| **s > 0.0)
                .map(|(i, s)| (i as u32, s / pop_norm)),
            &self.names,
            self.cfg.popular_k,
        );
        // Neighbour lists sorted once by item (a fixed summation order, so
        // the scores do not depend on hash iteration order).
        let neighbours: Vec<Vec<(u32, f64)>> = self
            .co
            .iter()
            .map(|ns| {
                let mut v: Vec<(u32, f64)> = ns.iter().map(|(n, c)| (*n, *c)).collect();
                v.sort_unstable_by_key(|(n, _)| *n);
                v
            })
            .collect();
        let mut user_ids: Vec<&String> = self.users.keys().collect();
        user_ids.sort_unstable();
        let mut users = Vec::with_capacity(user_ids.len());
        let mut cand: FxHashMap<u32, f64> = FxHashMap::default();
        for uid in user_ids {
            let u = &self.users[uid];
            let mut hist: HashMap<u32, f64> = HashMap::new();
            for &(item, w, t) in &u.history {
                *hist.entry(item).or_insert(0.0) += w * self.growth(t, decay_ms) / norm;
            }
            let bought: HashSet<u32> = u.bought.iter().copied().collect();
            cand.clear();
            // Deterministic order of accumulation (floating point sums).
            let mut hist: Vec<(u32, f64)> = hist.into_iter().collect();
            hist.sort_unstable_by_key(|(i, _)| *i);
            for (item, hw) in hist {
                for (n, c) in &neighbours[item as usize] {
                    if !bought.contains(n) {
                        *cand.entry(*n).or_insert(0.0) += hw * c / norm;
                    }
                }
            }
            let (items, source) = if cand.is_empty() {
                let items: Vec<Scored> = popular_all
                    .iter()
                    .filter(|s| self.ids.get(&s.item_id).is_none_or(|i| !bought.contains(i)))
                    .take(k)
                    .cloned()
                    .collect();
                (items, Source::Popular)
            } else {
                (top(cand.drain(), &self.names, k), Source::Batch)
            };
            users.push(UserRecs {
                user_id: uid.clone(),
                items,
                source,
            });
        }
        let serve_n = self.cfg.serve_neighbours;
        let mut item_order: Vec<u32> = (0..self.names.len() as u32).collect();
        item_order.sort_unstable_by(|a, b| self.names[*a as usize].cmp(&self.names[*b as usize]));
        let neighbours = item_order
            .into_iter()
            .filter(|i| !neighbours[*i as usize].is_empty())
            .map(|i| {
                let list = top(
                    neighbours[i as usize].iter().map(|(n, c)| (*n, c / norm)),
                    &self.names,
                    serve_n,
                );
                (self.names[i as usize].clone(), list)
            })
            .collect();
        Candidates {
            users,
            popular: popular_all,
            neighbours,
            events: self.events,
            items: self.names.len(),
        }
    }
}

/// Keeps the `max` strongest neighbours once a list is twice that long
/// (amortised; ties by item index, so pruning is deterministic).
fn prune(ns: &mut FxHashMap<u32, f64>, max: usize) {
    if ns.len() <= 2 * max {
        return;
    }
    let mut v: Vec<(u32, f64)> = ns.drain().collect();
    v.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(max);
    ns.extend(v);
}

/// The `k` best by score, ties by item id.
fn top(it: impl Iterator<Item = (u32, f64)>, names: &[String], k: usize) -> Vec<Scored> {
    let mut v: Vec<(u32, f64)> = it.collect();
    v.sort_unstable_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| names[a.0 as usize].cmp(&names[b.0 as usize]))
    });
    v.truncate(k);
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

/// Offline quality: recall@k and NDCG@k of held-out items.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Quality {
    pub users: usize,
    pub recall: f64,
    pub ndcg: f64,
}

/// Scores ranked lists against one held-out item per user.
pub fn evaluate<'a>(lists: impl Iterator<Item = (&'a [Scored], &'a str)>, k: usize) -> Quality {
    let (mut n, mut hits, mut dcg) = (0usize, 0usize, 0.0f64);
    for (list, held) in lists {
        n += 1;
        if let Some(pos) = list.iter().take(k).position(|s| s.item_id == held) {
            hits += 1;
            dcg += 1.0 / ((pos + 2) as f64).log2();
        }
    }
    let d = n.max(1) as f64;
    Quality {
        users: n,
        recall: hits as f64 / d,
        ndcg: dcg / d,
    }
}

/// Holds out each user's last interaction (of users with at least two),
/// builds on the rest, and measures the candidates and the popularity list
/// against the held-out items: (candidates, popular).
pub fn holdout_eval(events: &[Interaction], cfg: &RecsConfig) -> (Quality, Quality) {
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        last.insert(&e.user_id, i);
        *count.entry(&e.user_id).or_insert(0) += 1;
    }
    let held: HashSet<usize> = last
        .iter()
        .filter(|(u, _)| count[*u] >= 2)
        .map(|(_, i)| *i)
        .collect();
    let mut b = Builder::new(cfg);
    for (i, e) in events.iter().enumerate() {
        if !held.contains(&i) {
            b.add(e);
        }
    }
    let c = b.finish();
    let by_user: HashMap<&str, &UserRecs> =
        c.users.iter().map(|u| (u.user_id.as_str(), u)).collect();
    let mut held: Vec<usize> = held.into_iter().collect();
    held.sort_unstable();
    let pairs: Vec<(&[Scored], &str)> = held
        .iter()
        .filter_map(|i| {
            let e = &events[*i];
            by_user
                .get(e.user_id.as_str())
                .map(|u| (u.items.as_slice(), e.item_id.as_str()))
        })
        .collect();
    let k = cfg.top_k;
    let cands = evaluate(pairs.iter().copied(), k);
    let popular = evaluate(pairs.iter().map(|(_, h)| (c.popular.as_slice(), *h)), k);
    (cands, popular)
}

#[cfg(test)]
mod tests;

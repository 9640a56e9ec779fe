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

/// Parsed interactions handed from the replay to the fold thread at once.
const FOLD_BATCH: usize = 4_096;

/// A batch of parsed interactions for the fold thread: their ids in one
/// buffer (no allocation per event, none freed across threads).
#[derive(Default)]
struct FoldBatch {
    text: String,
    /// End of the user id and of the item id in `text` (each row starts
    /// where the previous one ended), kind, event time.
    rows: Vec<(u32, u32, InteractionKind, i64)>,
}

impl FoldBatch {
    fn with_capacity(n: usize) -> FoldBatch {
        FoldBatch {
            text: String::with_capacity(n * 24),
            rows: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, e: &crate::events::InteractionRef<'_>) {
        self.text.push_str(&e.user_id);
        let user_end = self.text.len() as u32;
        self.text.push_str(&e.item_id);
        self.rows
            .push((user_end, self.text.len() as u32, e.kind, e.event_time));
    }

    fn fold_into(&self, b: &mut Builder) {
        let mut start = 0usize;
        for &(user_end, item_end, kind, time) in &self.rows {
            let (u, i) = (user_end as usize, item_end as usize);
            b.add_parts(&self.text[start..u], &self.text[u..i], kind, time);
            start = i;
        }
    }
}
/// Users ranked per chunk handed to the publisher.
const RANK_CHUNK: usize = 10_000;

/// One rebuild: replays the whole `interactions` log, ranks, and publishes
/// the next generation. `progress(done, total)` is called now and then
/// from the replay thread; setting `cancel` aborts the replay (nothing is
/// published then, the previous generation stays).
///
/// Three stages overlap: the replay thread reads and parses while a fold
/// thread folds (bounded channel); then ranking threads rank users in
/// chunks, in user id order, while the publisher writes the previous chunk
/// to the topic and Redis.
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
    let started = std::time::Instant::now();
    let (ranker, stats) = tokio::task::spawn_blocking(move || {
        let (tx, rx) = std::sync::mpsc::sync_channel::<FoldBatch>(64);
        let folder = std::thread::Builder::new()
            .name("rebuild-fold".into())
            .spawn(move || {
                let mut b = Builder::new(&recs_cfg);
                for batch in rx {
                    batch.fold_into(&mut b);
                }
                b
            })
            .context("starting the fold thread")?;
        let mut batch = FoldBatch::with_capacity(FOLD_BATCH);
        let read = replay::read_all(
            &kafka,
            &topic,
            &limits,
            &cancel,
            |e| {
                batch.push(&e);
                // Sent by count, or by size (offsets are u32; ids can be
                // as long as a message).
                if batch.rows.len() >= FOLD_BATCH || batch.text.len() >= 1 << 26 {
                    let full = std::mem::replace(&mut batch, FoldBatch::with_capacity(FOLD_BATCH));
                    // Fails only when the fold thread is gone (a panic,
                    // reported by the join below).
                    let _ = tx.send(full);
                }
            },
            progress,
        );
        if !batch.rows.is_empty() {
            let _ = tx.send(batch);
        }
        drop(tx);
        let b = folder
            .join()
            .map_err(|_| anyhow::anyhow!("the rebuild's fold thread panicked"))?;
        let stats = read?;
        anyhow::Ok((b.into_ranker(), stats))
    })
    .await
    .context("rebuild task")??;
    let replay_secs = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let ranker = std::sync::Arc::new(ranker);
    let mut publisher =
        publish::Publisher::start(cfg, stats.ranges.clone(), crate::now_ms()).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<UserRecs>>(2);
    let r = ranker.clone();
    let ranking = tokio::task::spawn_blocking(move || {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = std::time::Instant::now();
        let n = r.user_count();
        let mut from = 0;
        while from < n {
            let to = (from + RANK_CHUNK).min(n);
            if tx.blocking_send(r.rank(from..to, threads)).is_err() {
                break; // the publisher failed; its error is reported
            }
            from = to;
        }
        busy.elapsed().as_secs_f64()
    });
    while let Some(chunk) = rx.recv().await {
        publisher.users(&chunk).await?;
    }
    let rank_secs = ranking.await.context("ranking task")?;
    let publish_wait = publisher.wait;
    let neighbours = ranker.serve_neighbours();
    let meta = publisher
        .finish(
            ranker.popular(),
            &neighbours,
            ranker.events(),
            ranker.items(),
        )
        .await?;
    tracing::info!(
        replay_seconds = replay_secs,
        rank_seconds = rank_secs,
        rank_and_publish_seconds = started.elapsed().as_secs_f64(),
        publish_wait_seconds = publish_wait.as_secs_f64(),
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

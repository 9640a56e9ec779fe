//! The rebuild's fold: interactions, in log order, into per-user histories,
//! item co-occurrence and popularity (docs/RECOMMENDATIONS.md, "How a
//! rebuild runs").
//!
//! With a million users the fold is bound by memory latency, not
//! arithmetic: each event reads its user's slot in the id table, the
//! user's state and the user's history, three dependent cache misses. A
//! batch of events is therefore folded as a pipeline: while event `i` is
//! folded, the history of event `i + D`, the state of event `i + 2D` and
//! the table slot of event `i + 3D` are prefetched, so the misses of many
//! events overlap. Events are still folded one by one in log order: the
//! result is exactly that of folding them singly.

use std::collections::VecDeque;
use std::hash::Hasher;

use compact_str::CompactString;
use rustc_hash::{FxHashMap, FxHasher};

use super::merge::{Merging, Pair};
use super::rank::{ItemOut, Ranker};
use super::{growth, prefetch, strongest, top, Candidates};
use crate::config::RecsConfig;
use crate::events::{Interaction, InteractionKind};

/// One interaction of a user's recent history.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hist {
    pub item: u32,
    pub kind: InteractionKind,
    pub time: i64,
}

/// A user's state, one cache line: id, recent history, purchases (boxed:
/// most users have none).
#[repr(align(64))]
pub(super) struct UserState {
    pub name: CompactString,
    /// Most recent interactions, oldest first.
    pub history: VecDeque<Hist>,
    /// Items bought (bounded like the history). Boxed so that the state
    /// stays one cache line (a VecDeque alone is half of one).
    #[allow(clippy::box_collection)]
    pub bought: Option<Box<VecDeque<u32>>>,
}

const _: () = assert!(std::mem::size_of::<UserState>() == 64);

impl UserState {
    pub fn bought(&self) -> impl Iterator<Item = u32> + '_ {
        self.bought.iter().flat_map(|b| b.iter().copied())
    }
}

/// Open-addressing index from user id to user (linear probing). A slot
/// holds 32 bits of the id's hash and the user's index + 1 (0: empty);
/// a match is confirmed against the id in the user's own state, which the
/// fold reads anyway.
struct UserIndex {
    slots: Vec<(u32, u32)>,
    len: usize,
}

fn hash_id(id: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(id.as_bytes());
    // Mixed again: FxHasher's low bits are weak, and the slot comes from
    // the top bits.
    (h.finish() ^ (id.len() as u64)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl UserIndex {
    fn new() -> UserIndex {
        UserIndex {
            slots: vec![(0, 0); 1024],
            len: 0,
        }
    }

    fn home(&self, h: u64) -> usize {
        // slots.len() is a power of two.
        (h >> (64 - self.slots.len().trailing_zeros())) as usize
    }

    fn tag(h: u64) -> u32 {
        h as u32
    }

    /// Walks the probe sequence of `h`: the first user whose tag matches
    /// and whom `confirm` accepts.
    fn scan(&self, h: u64, confirm: impl Fn(usize) -> bool) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut at = self.home(h);
        loop {
            let (tag, u) = self.slots[at];
            if u == 0 {
                return None;
            }
            if tag == Self::tag(h) && confirm(u as usize - 1) {
                return Some(u as usize - 1);
            }
            at = (at + 1) & mask;
        }
    }

    /// The first user whose tag matches (a hint: not confirmed).
    fn probe(&self, h: u64) -> Option<usize> {
        self.scan(h, |_| true)
    }

    /// The user with id `id` (hash `h`), if indexed.
    fn find(&self, h: u64, id: &str, users: &[UserState]) -> Option<usize> {
        self.scan(h, |u| users[u].name == id)
    }

    fn insert(&mut self, h: u64, u: usize, users: &[UserState]) {
        // At most half full: linear probing stays short.
        if (self.len + 1) * 2 > self.slots.len() {
            let bigger = vec![(0, 0); self.slots.len() * 2];
            let old = std::mem::replace(&mut self.slots, bigger);
            self.len = 0;
            for (_, v) in old.into_iter().filter(|s| s.1 != 0) {
                let v = v as usize - 1;
                self.insert(hash_id(&users[v].name), v, users);
            }
        }
        let mask = self.slots.len() - 1;
        let mut at = self.home(h);
        while self.slots[at].1 != 0 {
            at = (at + 1) & mask;
        }
        self.slots[at] = (Self::tag(h), u as u32 + 1);
        self.len += 1;
    }

    fn slot_ptr(&self, h: u64) -> *const (u32, u32) {
        &self.slots[self.home(h)]
    }
}

/// Parsed interactions folded together ([`Builder::add_batch`]): their ids
/// back to back in one buffer (no allocation per event, none freed across
/// threads when a batch is handed to a fold thread).
#[derive(Debug, Default)]
pub struct FoldBatch {
    text: String,
    /// End of the user id and of the item id in `text` (each row starts
    /// where the previous one ended), kind, event time.
    rows: Vec<(u32, u32, InteractionKind, i64)>,
}

impl FoldBatch {
    pub fn with_capacity(n: usize) -> FoldBatch {
        FoldBatch {
            text: String::with_capacity(n * 24),
            rows: Vec::with_capacity(n),
        }
    }

    pub fn push(&mut self, user_id: &str, item_id: &str, kind: InteractionKind, time: i64) {
        self.text.push_str(user_id);
        let user_end = self.text.len() as u32;
        self.text.push_str(item_id);
        self.rows
            .push((user_end, self.text.len() as u32, kind, time));
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Bytes of ids held (offsets are u32: a batch is sent on well before).
    pub fn text_len(&self) -> usize {
        self.text.len()
    }
}

/// Events between the pipeline's stages (see the module documentation).
const AHEAD: usize = 8;

/// Pairs buffered before they are added to the neighbour lists (12 bytes
/// each: 48 MB per buffer, and as much again for the merge's sorted copy;
/// with a merge thread, a second buffer fills meanwhile: 144 MB in all).
const PAIR_BATCH: usize = 1 << 22;

/// Folds interactions, in log order, into co-occurrence counts.
///
/// An interaction pairs its item with the distinct items of the user's last
/// `cooccurrence_window` interactions. Pairs are not added to the neighbour
/// lists one by one (two random hash-table updates each, a cache miss
/// apiece on a large catalogue): both directions of each pair go to a
/// buffer, and every 4,194,304 (2^22) pairs the buffer is sorted by item
/// (a stable counting sort, so each list still sums in log order) and each
/// touched list is merged once, then pruned to its `max_neighbours`
/// strongest if it grew past twice that. The merge runs on the folding
/// thread ([`Builder::new`]) or on a thread of its own, beside the fold of
/// the next pairs ([`Builder::with_merge_thread`], what a rebuild uses):
/// the same merges in the same order either way, so the same lists.
pub struct Builder {
    pub(super) cfg: RecsConfig,
    /// Weight of each interaction kind (by `InteractionKind as usize`).
    weights: [f64; 4],
    /// Item indices, keyed by the id stored inline (ids up to 24 bytes: no
    /// pointer to chase when a lookup compares keys), with a fast
    /// non-cryptographic hasher (the keys are ids from our own log).
    ids: FxHashMap<CompactString, u32>,
    names: Vec<CompactString>,
    user_index: UserIndex,
    pub(super) users: Vec<UserState>,
    /// The neighbour lists (pairs still in `pairs`, or on their way to
    /// the merge thread, are not in them yet).
    merging: Merging,
    pub(super) pairs: Vec<Pair>,
    /// Pairs buffered before a merge (PAIR_BATCH; smaller in tests).
    pub(super) pair_batch: usize,
    /// Scratch list of the distinct items of one event's window.
    recent: Vec<u32>,
    /// Scratch of a batch: each event's user id hash and user hint.
    hashes: Vec<u64>,
    hints: Vec<Option<usize>>,
    /// Decayed popularity per item (log2 scale reference below).
    popularity: Vec<f64>,
    /// Time origin of the exponential weights (the first event).
    t0: Option<i64>,
    newest: i64,
    events: u64,
}

fn kind_weights(cfg: &RecsConfig) -> [f64; 4] {
    let mut w = [0.0; 4];
    w[InteractionKind::View as usize] = cfg.weight_view;
    w[InteractionKind::Click as usize] = cfg.weight_click;
    w[InteractionKind::AddToCart as usize] = cfg.weight_add_to_cart;
    w[InteractionKind::Purchase as usize] = cfg.weight_purchase;
    w
}

impl Builder {
    pub fn new(cfg: &RecsConfig) -> Builder {
        Builder {
            cfg: cfg.clone(),
            weights: kind_weights(cfg),
            ids: FxHashMap::default(),
            names: Vec::new(),
            user_index: UserIndex::new(),
            users: Vec::new(),
            merging: Merging::here(cfg.max_neighbours),
            pairs: Vec::new(),
            pair_batch: PAIR_BATCH,
            recent: Vec::new(),
            hashes: Vec::new(),
            hints: Vec::new(),
            popularity: Vec::new(),
            t0: None,
            newest: i64::MIN,
            events: 0,
        }
    }

    /// A builder that merges pairs on a thread of its own (named
    /// `rebuild-merge`), beside the fold: the same result as
    /// [`Builder::new`]'s, with the merges off the folding thread.
    pub fn with_merge_thread(cfg: &RecsConfig) -> std::io::Result<Builder> {
        let mut b = Builder::new(cfg);
        b.merging = Merging::apart(cfg.max_neighbours)?;
        Ok(b)
    }

    /// The neighbour lists merged so far (tests: a builder without a merge
    /// thread).
    #[cfg(test)]
    pub(super) fn co(&self) -> &[Vec<(u32, f32)>] {
        self.merging.co()
    }

    fn item(&mut self, name: &str) -> u32 {
        if let Some(i) = self.ids.get(name) {
            return *i;
        }
        let i = self.names.len() as u32;
        let name = CompactString::from(name);
        self.ids.insert(name.clone(), i);
        self.names.push(name);
        self.popularity.push(0.0);
        i
    }

    fn user(&mut self, h: u64, id: &str) -> usize {
        if let Some(u) = self.user_index.find(h, id, &self.users) {
            return u;
        }
        let u = self.users.len();
        self.users.push(UserState {
            name: CompactString::from(id),
            history: VecDeque::new(),
            bought: None,
        });
        self.user_index.insert(h, u, &self.users);
        u
    }

    /// Folds one interaction.
    pub fn add(&mut self, ev: &Interaction) {
        self.add_parts(&ev.user_id, &ev.item_id, ev.kind, ev.event_time);
    }

    /// Folds one interaction given by its fields.
    pub fn add_parts(&mut self, user_id: &str, item_id: &str, kind: InteractionKind, time: i64) {
        self.fold_one(hash_id(user_id), user_id, item_id, kind, time);
    }

    /// Folds a batch of interactions, in order. The same result as
    /// [`Builder::add_parts`] on each row, with the memory accesses of
    /// later rows prefetched meanwhile.
    pub fn add_batch(&mut self, batch: &FoldBatch) {
        let (text, rows) = (batch.text.as_str(), batch.rows.as_slice());
        // Row i's user id starts where row i − 1's item id ended.
        let start = |i: usize| if i == 0 { 0 } else { rows[i - 1].1 as usize };
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.clear();
        hashes.extend(
            rows.iter()
                .enumerate()
                .map(|(i, r)| hash_id(&text[start(i)..r.0 as usize])),
        );
        let mut hints = std::mem::take(&mut self.hints);
        hints.clear();
        hints.resize(rows.len(), None);
        let n = rows.len();
        for i in 0..n + 3 * AHEAD {
            // Stage 1: the table slot of a later event.
            if i < n {
                prefetch(self.user_index.slot_ptr(hashes[i]));
            }
            // Stage 2: its state (the slot is in cache by now; the tag
            // match is only a hint, confirmed when the event is folded).
            if let Some(j) = i.checked_sub(AHEAD).filter(|j| *j < n) {
                hints[j] = self.user_index.probe(hashes[j]);
                if let Some(u) = hints[j] {
                    prefetch(&self.users[u]);
                }
            }
            // Stage 3: the tail of its history.
            if let Some(j) = i.checked_sub(2 * AHEAD).filter(|j| *j < n) {
                if let Some(u) = hints[j].and_then(|u| self.users.get(u)) {
                    let (a, b) = u.history.as_slices();
                    if let Some(last) = b.last().or(a.last()) {
                        prefetch(last);
                        // The window reaches ~160 bytes back.
                        prefetch((last as *const Hist).wrapping_sub(4));
                        prefetch((last as *const Hist).wrapping_sub(8));
                    }
                }
            }
            // Fold.
            if let Some(j) = i.checked_sub(3 * AHEAD).filter(|j| *j < n) {
                let (user_end, item_end, kind, time) = rows[j];
                let (s, u, it) = (start(j), user_end as usize, item_end as usize);
                self.fold_one(hashes[j], &text[s..u], &text[u..it], kind, time);
            }
        }
        self.hashes = hashes;
        self.hints = hints;
    }

    fn fold_one(&mut self, h: u64, user_id: &str, item_id: &str, kind: InteractionKind, time: i64) {
        if self.t0.is_none() {
            self.t0 = Some(time);
        }
        self.newest = self.newest.max(time);
        self.events += 1;
        let item = self.item(item_id);
        let w = self.weights[kind as usize];
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let pop_ms = self.cfg.popular_half_life.as_millis() as f64;
        let g = growth(self.t0, time, decay_ms);
        self.popularity[item as usize] += w * growth(self.t0, time, pop_ms);
        let cap = self.cfg.history_cap;
        let window = self.cfg.cooccurrence_window;
        let u = self.user(h, user_id);
        let user = &mut self.users[u];
        // Pairs with each distinct item of the user's last
        // cooccurrence_window interactions (a linear scan beats a set here).
        self.recent.clear();
        for past in user.history.iter().rev().take(window) {
            if past.item == item || self.recent.contains(&past.item) {
                continue;
            }
            self.recent.push(past.item);
            let pair = (w * self.weights[past.kind as usize] * g) as f32;
            self.pairs.push(Pair::new(item, past.item, pair));
            self.pairs.push(Pair::new(past.item, item, pair));
        }
        user.history.push_back(Hist { item, kind, time });
        while user.history.len() > cap {
            user.history.pop_front();
        }
        if kind == InteractionKind::Purchase {
            let bought = user.bought.get_or_insert_with(Default::default);
            if !bought.contains(&item) {
                bought.push_back(item);
                while bought.len() > cap {
                    bought.pop_front();
                }
            }
        }
        if self.pairs.len() >= self.pair_batch {
            self.merge_pairs();
        }
    }

    /// Adds the buffered pairs to the neighbour lists, here or on the
    /// merge thread.
    fn merge_pairs(&mut self) {
        self.merging.merge(&mut self.pairs, self.names.len());
    }

    /// Ends the fold: what ranking needs, with every neighbour list cut to
    /// its `max_neighbours` strongest (ties by item index) and sorted by
    /// item (a fixed summation order, so scores do not depend on the
    /// order lists were merged in), and the users sorted by id.
    pub fn into_ranker(mut self) -> Ranker {
        let co = self
            .merging
            .finish(std::mem::take(&mut self.pairs), self.names.len());
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let pop_ms = self.cfg.popular_half_life.as_millis() as f64;
        let norm = growth(self.t0, self.newest, decay_ms);
        let pop_norm = growth(self.t0, self.newest, pop_ms);
        let names: Vec<String> = self.names.iter().map(|n| n.to_string()).collect();
        let popular = top(
            self.popularity
                .iter()
                .enumerate()
                .filter(|(_, s)| **s > 0.0)
                .map(|(i, s)| (i as u32, s / pop_norm)),
            &names,
            self.cfg.popular_k,
        );
        let max_n = self.cfg.max_neighbours;
        // All lists in one array (an item's list is contiguous, its start
        // in nb_start): ranking reads them at random.
        let mut nb_start = Vec::with_capacity(co.len() + 1);
        let mut nb = Vec::new();
        nb_start.push(0u32);
        for mut v in co {
            strongest(&mut v, max_n);
            v.sort_unstable_by_key(|(n, _)| *n);
            nb.extend(v);
            nb_start.push(nb.len() as u32);
        }
        let popular_idx = popular
            .iter()
            .filter_map(|s| Some((*self.ids.get(s.item_id.as_str())?, s.score)))
            .collect();
        drop(self.user_index);
        let mut users = self.users;
        users.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let mut by_name: Vec<u32> = (0..names.len() as u32).collect();
        by_name.sort_unstable_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
        let mut name_rank = vec![0u32; names.len()];
        for (place, i) in by_name.into_iter().enumerate() {
            name_rank[i as usize] = place as u32;
        }
        let item_json: Vec<String> = names
            .iter()
            .map(|n| {
                let mut b = br#"{"item_id":"#.to_vec();
                super::rank::write_json_str(&mut b, n);
                b.extend_from_slice(br#","score":"#);
                // Serialised from a str: UTF-8.
                String::from_utf8_lossy(&b).into_owned()
            })
            .collect();
        let item_out = names
            .iter()
            .zip(&item_json)
            .map(|(n, json)| ItemOut::new(super::publish::name_hash(n), json))
            .collect();
        Ranker {
            weights: self.weights,
            cfg: self.cfg,
            names,
            item_out,
            item_json,
            name_rank,
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

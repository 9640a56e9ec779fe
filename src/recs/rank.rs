//! Ranking the folded state: per user, the neighbours of their history
//! weighted by how strongly and how recently they interacted, minus what
//! they bought; and encoding each user's record for publishing straight
//! from the ranking threads.

use super::prefetch;
use super::publish::user_hash;
use super::{growth, Scored, Source, UserRecs, UserState};
use crate::config::RecsConfig;

/// The folded state, ready to rank: users can be ranked in chunks (in user
/// id order) and on several threads, so publishing can start before the
/// last user is ranked.
pub struct Ranker {
    pub(super) cfg: RecsConfig,
    pub(super) weights: [f64; 4],
    pub(super) names: Vec<String>,
    /// What a record needs of each item, one cache line per item.
    pub(super) item_out: Vec<ItemOut>,
    /// Each item's start in a record's items: `{"item_id":<id as a JSON
    /// string>,"score":` (read for those too long for their [`ItemOut`]).
    pub(super) item_json: Vec<String>,
    /// Each item's place in item id order (ties in ranking compare these).
    pub(super) name_rank: Vec<u32>,
    /// Sorted by user id.
    pub(super) users: Vec<UserState>,
    /// Item `i`'s neighbours are `nb[nb_start[i]..nb_start[i + 1]]`,
    /// sorted by item.
    pub(super) nb_start: Vec<u32>,
    pub(super) nb: Vec<(u32, f32)>,
    pub(super) popular: Vec<Scored>,
    /// `popular` as (item index, score).
    pub(super) popular_idx: Vec<(u32, f64)>,
    pub(super) t0: Option<i64>,
    pub(super) norm: f64,
    pub(super) events: u64,
}

/// Per-thread scratch of the ranking: a dense accumulator over all items,
/// the items it touched, and the current user's list.
struct Scratch {
    acc: Vec<f64>,
    /// Per item: [`FREE`], [`TOUCHED`] (in `touched`) or [`BANNED`]
    /// (bought by the current user).
    mark: Vec<u8>,
    /// The items touched, in the order first touched (its first `len`
    /// entries; sized for the user's lists beforehand).
    cand: Vec<u32>,
    touched: Vec<(u32, f64)>,
    hist: Vec<(u32, f64)>,
    /// The user's ranked list: (item, score rounded to 6 decimals).
    out: Vec<(u32, f64)>,
    /// The previous user's list, encoded after the next user is ranked.
    prev: Vec<(u32, f64)>,
}

/// What encoding a record reads of an item, in one cache line: its
/// [`super::publish::name_hash`] and, when short enough (ids of up to 33
/// bytes), the start of its entry in a record, `{"item_id":"…","score":`.
/// The 20 items of a user lie anywhere in the item table and were two or
/// three cache misses each (a `String`'s header, its text, the hash): now
/// one, prefetched while the next user is ranked.
#[repr(C, align(64))]
pub(super) struct ItemOut {
    hash: u64,
    /// Bytes of `text` used; [`ItemOut::LONG`]: in `Ranker::item_json`.
    len: u8,
    text: [u8; ItemOut::INLINE],
}

const _: () = assert!(std::mem::size_of::<ItemOut>() == 64);

impl ItemOut {
    const LONG: u8 = u8::MAX;
    /// Longest entry kept inline.
    pub(super) const INLINE: usize = 55;

    pub(super) fn new(hash: u64, json: &str) -> ItemOut {
        let mut text = [0u8; Self::INLINE];
        let len = if json.len() <= text.len() {
            text[..json.len()].copy_from_slice(json.as_bytes());
            json.len() as u8
        } else {
            Self::LONG
        };
        ItemOut { hash, len, text }
    }
}

const FREE: u8 = 0;
const TOUCHED: u8 = 1;
const BANNED: u8 = 2;

/// Users' records encoded for publishing, back to back in one buffer.
#[derive(Debug, Default)]
pub struct Encoded {
    /// Each user's id (the record key) then their record (JSON,
    /// schemas/recommendation.json).
    pub buf: Vec<u8>,
    /// Per user, where its key ends and where its record ends in `buf`
    /// (each key starts where the previous record ended).
    pub ends: Vec<(usize, usize)>,
    /// Per user, [`user_hash`] of its list (for the generation's digest).
    pub hashes: Vec<u64>,
}

impl Encoded {
    /// (key, record) of every user, in order.
    pub fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(k, r)| {
            let kv = (&self.buf[start..k], &self.buf[k..r]);
            start = r;
            kv
        })
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

impl Ranker {
    pub(super) fn neighbours(&self, item: u32) -> &[(u32, f32)] {
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

    fn scratch(&self) -> Scratch {
        Scratch {
            acc: vec![0.0; self.names.len()],
            mark: vec![FREE; self.names.len()],
            cand: Vec::new(),
            touched: Vec::new(),
            hist: Vec::new(),
            out: Vec::new(),
            prev: Vec::new(),
        }
    }

    /// `f` over `range` split in `threads` consecutive parts, on that many
    /// threads; the results in range order.
    fn split<T: Send>(
        &self,
        range: std::ops::Range<usize>,
        threads: usize,
        f: impl Fn(usize, std::ops::Range<usize>) -> T + Sync,
    ) -> Vec<T> {
        let threads = threads.clamp(1, range.len().max(1));
        if threads == 1 {
            return vec![f(0, range)];
        }
        let per = range.len().div_ceil(threads);
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let from = (range.start + t * per).min(range.end);
                    let to = (from + per).min(range.end);
                    s.spawn(move || f(t, from..to))
                })
                .collect();
            handles
                .into_iter()
                // A panic in a ranking thread is a bug: pass it on.
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// Ranks the users in `range` (indices in user id order), split over
    /// `threads` threads; the result is in user id order and the same for
    /// any thread count.
    pub fn rank(&self, range: std::ops::Range<usize>, threads: usize) -> Vec<UserRecs> {
        self.split(range, threads, |_, r| {
            let mut sc = self.scratch();
            r.map(|i| {
                let u = &self.users[i];
                self.prefetch_ahead(i);
                let source = self.rank_user(u, &mut sc);
                UserRecs {
                    user_id: u.name.to_string(),
                    items: sc
                        .out
                        .iter()
                        .map(|&(i, score)| Scored {
                            item_id: self.names[i as usize].clone(),
                            score,
                        })
                        .collect(),
                    source,
                }
            })
            .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Ranks the users in `range` like [`Ranker::rank`] and encodes their
    /// records, each ending with `tail` (the generation's fields after
    /// `source`, closing brace included): one [`Encoded`] per thread, in
    /// user id order. `spare` holds used ones to write into again (their
    /// memory already mapped: a fresh buffer page-faults on every page).
    pub fn encode(
        &self,
        range: std::ops::Range<usize>,
        threads: usize,
        tail: &str,
        spare: &mut Vec<Encoded>,
    ) -> Vec<Encoded> {
        let reuse: Vec<std::sync::Mutex<Option<Encoded>>> = (0..threads.max(1))
            .map(|_| std::sync::Mutex::new(spare.pop()))
            .collect();
        self.split(range, threads, |t, r| {
            let mut sc = self.scratch();
            let old = reuse.get(t).and_then(|m| m.lock().ok()?.take());
            let mut e = old.unwrap_or_default();
            e.buf.clear();
            e.ends.clear();
            e.hashes.clear();
            e.buf.reserve(r.len() * 1_300);
            // Each user is written after the next one is ranked, so the
            // cache lines of their items, prefetched when they were
            // ranked, have arrived.
            let mut prev: Option<(&str, Source)> = None;
            for i in r {
                let u = &self.users[i];
                self.prefetch_ahead(i);
                let source = self.rank_user(u, &mut sc);
                for &(item, _) in &sc.out {
                    prefetch(&self.item_out[item as usize]);
                }
                if let Some((id, source)) = prev {
                    self.push_record(&mut e, id, source, &sc.prev, tail);
                }
                std::mem::swap(&mut sc.out, &mut sc.prev);
                prev = Some((u.name.as_str(), source));
            }
            if let Some((id, source)) = prev {
                self.push_record(&mut e, id, source, &sc.prev, tail);
            }
            e
        })
    }

    /// A user's key, record and hash onto `e`.
    fn push_record(
        &self,
        e: &mut Encoded,
        id: &str,
        source: Source,
        items: &[(u32, f64)],
        tail: &str,
    ) {
        e.hashes.push(user_hash(
            id,
            source,
            items
                .iter()
                .map(|&(i, s)| (self.item_out[i as usize].hash, s)),
        ));
        e.buf.extend_from_slice(id.as_bytes());
        let key_end = e.buf.len();
        self.write_record(&mut e.buf, id, source, items, tail);
        e.ends.push((key_end, e.buf.len()));
    }

    /// One record, the same JSON as serialising
    /// [`super::publish::RecRecord`] (scores written from their
    /// millionths, without an exponent).
    fn write_record(
        &self,
        buf: &mut Vec<u8>,
        user_id: &str,
        source: Source,
        items: &[(u32, f64)],
        tail: &str,
    ) {
        buf.extend_from_slice(b"{\"user_id\":");
        write_json_str(buf, user_id);
        buf.extend_from_slice(b",\"items\":[");
        for (n, &(i, score)) in items.iter().enumerate() {
            if n > 0 {
                buf.push(b',');
            }
            let it = &self.item_out[i as usize];
            if it.len == ItemOut::LONG {
                buf.extend_from_slice(self.item_json[i as usize].as_bytes());
            } else {
                buf.extend_from_slice(&it.text[..usize::from(it.len)]);
            }
            write_score(buf, score);
            buf.push(b'}');
        }
        buf.extend_from_slice(match source {
            Source::Batch => b"],\"source\":\"batch\"",
            Source::Popular => b"],\"source\":\"popular\"",
        });
        buf.extend_from_slice(tail.as_bytes());
    }

    /// One user into `sc.out`: the neighbours of their history weighted by
    /// how strongly and how recently they interacted, minus what they
    /// bought; the popular list (minus what they bought) when their history
    /// has no neighbour.
    fn rank_user(&self, u: &UserState, sc: &mut Scratch) -> Source {
        let decay_ms = self.cfg.decay_half_life.as_millis() as f64;
        let k = self.cfg.top_k;
        let norm = self.norm;
        // History weight per item, summed in history order, by item.
        sc.hist.clear();
        sc.hist.extend(u.history.iter().map(|h| {
            (
                h.item,
                self.weights[h.kind as usize] * growth(self.t0, h.time, decay_ms) / norm,
            )
        }));
        sc.hist.sort_by_key(|(i, _)| *i);
        for b in u.bought() {
            sc.mark[b as usize] = BANNED;
        }
        let mut room = 0;
        for w in sc.hist.chunk_by(|a, b| a.0 == b.0) {
            room += self.neighbours(w[0].0).len();
        }
        if sc.cand.len() < room {
            sc.cand.resize(room, 0);
        }
        // The accumulation is written without branches on the item's mark
        // (whether it was touched before is a coin flip for the branch
        // predictor): a bought item adds 0 and is not listed.
        let mut len = 0;
        let mut i = 0;
        while i < sc.hist.len() {
            let item = sc.hist[i].0;
            let mut hw = 0.0;
            while i < sc.hist.len() && sc.hist[i].0 == item {
                hw += sc.hist[i].1;
                i += 1;
            }
            let hw = hw / norm;
            for &(n, c) in self.neighbours(item) {
                let slot = n as usize;
                let m = sc.mark[slot];
                let keep = f64::from(u8::from(m != BANNED));
                sc.acc[slot] += hw * f64::from(c) * keep;
                sc.cand[len] = n;
                len += usize::from(m == FREE);
                sc.mark[slot] = m | (TOUCHED * u8::from(m == FREE));
            }
        }
        sc.touched.clear();
        sc.touched.extend(sc.cand[..len].iter().map(|&n| {
            let slot = n as usize;
            let score = sc.acc[slot];
            sc.acc[slot] = 0.0;
            sc.mark[slot] = FREE;
            (n, score)
        }));
        sc.out.clear();
        let source = if sc.touched.is_empty() {
            sc.out.extend(
                self.popular_idx
                    .iter()
                    .filter(|(i, _)| sc.mark[*i as usize] != BANNED)
                    .take(k),
            );
            Source::Popular
        } else {
            let rank = &self.name_rank;
            super::top_by(&mut sc.touched, k, |a, b| {
                rank[a as usize].cmp(&rank[b as usize])
            });
            sc.out.extend_from_slice(&sc.touched);
            Source::Batch
        };
        for b in u.bought() {
            sc.mark[b as usize] = FREE;
        }
        source
    }

    /// Ranking is bound by memory latency (a user's history, then the
    /// neighbour list of each item in it): before user `i` is ranked, the
    /// history of user `i + 2` and the neighbour lists of user `i + 1` are
    /// prefetched.
    fn prefetch_ahead(&self, i: usize) {
        if let Some(u) = self.users.get(i + 2) {
            let (a, b) = u.history.as_slices();
            for part in [a, b] {
                for line in part.chunks(4) {
                    prefetch(line.as_ptr());
                }
            }
        }
        if let Some(u) = self.users.get(i + 1) {
            for h in &u.history {
                let list = self.neighbours(h.item);
                for line in list.chunks(8) {
                    prefetch(line.as_ptr());
                }
            }
        }
    }

    /// Per item (sorted by item id), its `serve_neighbours` strongest
    /// co-occurring items, for the serving layer's session re-ranking.
    pub fn serve_neighbours(&self) -> Vec<(String, Vec<Scored>)> {
        let serve_n = self.cfg.serve_neighbours;
        let mut item_order: Vec<u32> = (0..self.names.len() as u32).collect();
        item_order.sort_unstable_by_key(|i| self.name_rank[*i as usize]);
        item_order
            .into_iter()
            .filter(|i| !self.neighbours(*i).is_empty())
            .map(|i| {
                let list = super::top(
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

/// `s` as a JSON string (quoted, escaped like serde_json).
pub(super) fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// A score already rounded to 6 decimals, as JSON: its millionths in
/// plain decimal notation (`0.1234`, `3.0`), which parses back to the same
/// f64; scores of 10^9 and more (or not finite) as serde_json writes them.
pub(super) fn write_score(buf: &mut Vec<u8>, score: f64) {
    let m = (score * 1e6).round();
    if m.is_nan() || m.abs() >= 1e15 {
        let _ = serde_json::to_writer(&mut *buf, &score);
        return;
    }
    let m = m as i64;
    if m < 0 {
        buf.push(b'-');
    }
    let m = m.unsigned_abs();
    write_u64(buf, m / 1_000_000);
    buf.push(b'.');
    let mut frac = m % 1_000_000;
    if frac == 0 {
        buf.push(b'0');
        return;
    }
    let mut digits = 6;
    while frac % 10 == 0 {
        frac /= 10;
        digits -= 1;
    }
    write_digits(buf, frac, digits);
}

/// `v` as exactly `n` decimal digits (zero-padded), written straight into
/// `buf`.
fn write_digits(buf: &mut Vec<u8>, mut v: u64, n: usize) {
    let start = buf.len();
    buf.resize(start + n, b'0');
    for d in buf[start..].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn write_u64(buf: &mut Vec<u8>, v: u64) {
    write_digits(buf, v, v.checked_ilog10().unwrap_or(0) as usize + 1);
}

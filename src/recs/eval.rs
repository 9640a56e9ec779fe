//! Offline quality of the candidates (`streamscore eval-recs`).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::{Builder, Scored, UserRecs};
use crate::config::RecsConfig;
use crate::events::Interaction;

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

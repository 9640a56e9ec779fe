//! The hybrid ranking of the serving layer: a user's batch candidates (or
//! the popular list) re-ranked by their live session.
//!
//! Both signals are put on one scale first: batch scores divided by the
//! list's best, each session item's neighbour scores divided by that list's
//! best. An item's hybrid score is
//!
//! `batch(i) + boost × Σ_s w_s × neighbour_s(i)`
//!
//! where `s` runs over the distinct items of the live session and `w_s` is
//! the share of the session's interaction weight (kind weights of
//! `[recs]`) that went to `s`. So a neighbour of what the user is looking
//! at now moves up, and can enter the list even if the batch did not have
//! it. Items bought in the session are dropped (the batch already left out
//! earlier purchases). Ties go to the smaller item id.

use std::collections::{HashMap, HashSet};

use super::Scored;

/// Where a served list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServedSource {
    /// Batch candidates or the popular list, re-ranked by a live session.
    Hybrid,
    /// The user's batch candidates as built.
    Batch,
    /// The popular list (no batch candidates for this user).
    Popular,
}

impl ServedSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ServedSource::Hybrid => "hybrid",
            ServedSource::Batch => "batch",
            ServedSource::Popular => "popular",
        }
    }
}

/// What the ranking works from.
pub struct Inputs<'a> {
    /// The user's batch candidates, if the current generation has them.
    pub batch: Option<&'a [Scored]>,
    pub popular: &'a [Scored],
    /// The live session's distinct items with their summed kind weights.
    pub session: &'a [(String, f64)],
    /// Neighbour lists of (some of) the session's items.
    pub neighbours: &'a HashMap<String, Vec<Scored>>,
    /// Items bought in the live session.
    pub bought: &'a HashSet<String>,
    pub boost: f64,
    pub k: usize,
}

fn best(list: &[Scored]) -> f64 {
    list.iter()
        .map(|s| s.score)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE)
}

/// Ranks: the top `k` and where they come from.
pub fn rank(i: &Inputs<'_>) -> (Vec<Scored>, ServedSource) {
    let (base, base_source) = match i.batch {
        Some(b) if !b.is_empty() => (b, ServedSource::Batch),
        _ => (i.popular, ServedSource::Popular),
    };
    let source = if i.session.is_empty() {
        base_source
    } else {
        ServedSource::Hybrid
    };
    let mut scores: HashMap<&str, f64> = HashMap::new();
    let top = best(base);
    for s in base {
        *scores.entry(&s.item_id).or_insert(0.0) += s.score / top;
    }
    let total: f64 = i.session.iter().map(|(_, w)| *w).sum();
    if total > 0.0 && i.boost > 0.0 {
        for (item, w) in i.session {
            let Some(ns) = i.neighbours.get(item) else {
                continue;
            };
            let nbest = best(ns);
            for n in ns {
                *scores.entry(&n.item_id).or_insert(0.0) +=
                    i.boost * (w / total) * (n.score / nbest);
            }
        }
    }
    let mut v: Vec<(&str, f64)> = scores
        .into_iter()
        .filter(|(item, _)| !i.bought.contains(*item))
        .collect();
    v.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    v.truncate(i.k);
    let items = v
        .into_iter()
        .map(|(item, s)| Scored {
            item_id: item.to_string(),
            score: (s * 1e6).round() / 1e6,
        })
        .collect();
    (items, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[(&str, f64)]) -> Vec<Scored> {
        items
            .iter()
            .map(|(i, s)| Scored {
                item_id: i.to_string(),
                score: *s,
            })
            .collect()
    }

    /// Ranks with no session, no purchase, boost 1.
    fn plain(
        batch: Option<&[Scored]>,
        popular: &[Scored],
        k: usize,
    ) -> (Vec<Scored>, ServedSource) {
        rank(&Inputs {
            batch,
            popular,
            session: &[],
            neighbours: &HashMap::new(),
            bought: &HashSet::new(),
            boost: 1.0,
            k,
        })
    }

    fn ids(v: &[Scored]) -> Vec<&str> {
        v.iter().map(|s| s.item_id.as_str()).collect()
    }

    #[test]
    fn without_a_session_the_batch_order_stands() {
        let batch = list(&[("a", 3.0), ("b", 2.0), ("c", 1.0)]);
        let (v, src) = plain(Some(&batch), &[], 2);
        assert_eq!(ids(&v), ["a", "b"]);
        assert_eq!(src, ServedSource::Batch);
    }

    #[test]
    fn a_session_items_neighbours_move_up_and_purchases_drop_out() {
        let batch = list(&[("a", 3.0), ("b", 2.0), ("c", 1.0), ("d", 0.5)]);
        let mut nbrs = HashMap::new();
        nbrs.insert("x".to_string(), list(&[("c", 9.0), ("z", 3.0)]));
        let session = vec![("x".to_string(), 1.0)];
        let bought: HashSet<String> = ["a".to_string()].into();
        let (v, src) = rank(&Inputs {
            batch: Some(&batch),
            popular: &[],
            session: &session,
            neighbours: &nbrs,
            bought: &bought,
            boost: 1.0,
            k: 10,
        });
        assert_eq!(src, ServedSource::Hybrid);
        // c: 1/3 + 1 = 1.33 > b: 0.67; z enters from the session: 1/3.
        assert_eq!(ids(&v), ["c", "b", "z", "d"]);
        // boost 0: plain batch order, minus the purchase.
        let (v, _) = rank(&Inputs {
            batch: Some(&batch),
            popular: &[],
            session: &session,
            neighbours: &nbrs,
            bought: &bought,
            boost: 0.0,
            k: 10,
        });
        assert_eq!(ids(&v), ["b", "c", "d"]);
    }

    #[test]
    fn no_batch_falls_back_to_popular() {
        let popular = list(&[("p", 5.0), ("q", 4.0)]);
        let (v, src) = plain(None, &popular, 20);
        assert_eq!(ids(&v), ["p", "q"]);
        assert_eq!(src, ServedSource::Popular);
    }

    #[test]
    fn ties_break_by_item_id() {
        let batch = list(&[("b", 1.0), ("a", 1.0)]);
        let (v, _) = plain(Some(&batch), &[], 5);
        assert_eq!(ids(&v), ["a", "b"]);
    }
}

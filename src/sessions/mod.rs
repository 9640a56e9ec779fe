//! Live per-user sessions: the "speed layer" of the recommendations.
//!
//! [`follow`] consumes `interactions` in stream (its own consumer group) and
//! folds each interaction into the user's session here: the most recent
//! items with their kind and event time, bounded by `sessions.max_items`. A
//! session ends after `sessions.idle_gap` of event time without an
//! interaction of the user: the next interaction starts a new one, and a
//! read of a session whose user has been idle that long (against the newest
//! event time of its partition) finds nothing. The serving layer re-ranks
//! the batch candidates with these items (docs/SERVING.md).

pub mod follow;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use dashmap::DashMap;
use serde::Serialize;

use crate::config::SessionsConfig;
use crate::events::{Interaction, InteractionKind};

/// One interaction of a session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionItem {
    pub item_id: String,
    pub kind: InteractionKind,
    pub event_time: i64,
}

#[derive(Debug, Clone, Default)]
struct Session {
    items: VecDeque<SessionItem>,
    last: i64,
    partition: i32,
}

/// Every live session, keyed by user id.
pub struct SessionStore {
    gap_ms: i64,
    max_items: usize,
    max_users: usize,
    users: DashMap<String, Session>,
    /// Newest event time seen per input partition (the session clock).
    clocks: RwLock<HashMap<i32, i64>>,
    evicted_idle: AtomicU64,
    evicted_limit: AtomicU64,
}

impl SessionStore {
    pub fn new(cfg: &SessionsConfig) -> SessionStore {
        SessionStore {
            gap_ms: cfg.idle_gap.as_millis() as i64,
            max_items: cfg.max_items,
            max_users: cfg.max_users,
            users: DashMap::new(),
            clocks: RwLock::new(HashMap::new()),
            evicted_idle: AtomicU64::new(0),
            evicted_limit: AtomicU64::new(0),
        }
    }

    /// The idle gap, ms.
    pub fn gap_ms(&self) -> i64 {
        self.gap_ms
    }

    fn clock(&self, partition: i32) -> Option<i64> {
        self.clocks
            .read()
            .ok()
            .and_then(|c| c.get(&partition).copied())
    }

    /// Folds one interaction read from `partition`.
    pub fn add(&self, partition: i32, ev: &Interaction) {
        if let Ok(mut c) = self.clocks.write() {
            let t = c.entry(partition).or_insert(i64::MIN);
            *t = (*t).max(ev.event_time);
        }
        {
            let mut s = match self.users.get_mut(&ev.user_id) {
                Some(s) => s,
                None => self.users.entry(ev.user_id.clone()).or_default(),
            };
            if !s.items.is_empty() && ev.event_time > s.last.saturating_add(self.gap_ms) {
                s.items.clear(); // idle too long: a new session starts
            }
            s.partition = partition;
            s.last = if s.items.is_empty() {
                ev.event_time
            } else {
                s.last.max(ev.event_time)
            };
            s.items.push_back(SessionItem {
                item_id: ev.item_id.clone(),
                kind: ev.kind,
                event_time: ev.event_time,
            });
            while s.items.len() > self.max_items {
                s.items.pop_front();
            }
        }
        if self.users.len() > self.max_users {
            self.shrink();
        }
    }

    /// The user's live session, oldest first (empty when there is none or
    /// it ended).
    pub fn get(&self, user_id: &str) -> Vec<SessionItem> {
        let Some(s) = self.users.get(user_id) else {
            return Vec::new();
        };
        let clock = self.clock(s.partition).unwrap_or(s.last);
        if clock.saturating_sub(s.last) > self.gap_ms {
            return Vec::new();
        }
        s.items.iter().cloned().collect()
    }

    /// Drops the sessions that ended; returns how many.
    pub fn expire(&self) -> usize {
        let clocks = self.clocks.read().map(|c| c.clone()).unwrap_or_default();
        let before = self.users.len();
        self.users.retain(|_, s| {
            let clock = clocks.get(&s.partition).copied().unwrap_or(s.last);
            clock.saturating_sub(s.last) <= self.gap_ms
        });
        let n = before.saturating_sub(self.users.len());
        self.evicted_idle.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Drops the sessions of users whose events come from `partitions`
    /// (revoked: another instance owns them now).
    pub fn drop_partitions(&self, partitions: &[i32]) {
        self.users.retain(|_, s| !partitions.contains(&s.partition));
        if let Ok(mut c) = self.clocks.write() {
            c.retain(|p, _| !partitions.contains(p));
        }
    }

    /// Evicts the least recently active sessions down to 90 % of the limit.
    fn shrink(&self) {
        let keep = self.max_users - self.max_users / 10;
        let mut lasts: Vec<(i64, String)> = self
            .users
            .iter()
            .map(|e| (e.value().last, e.key().clone()))
            .collect();
        if lasts.len() <= keep {
            return;
        }
        let excess = lasts.len() - keep;
        lasts.select_nth_unstable(excess - 1);
        for (_, k) in &lasts[..excess] {
            self.users.remove(k);
        }
        self.evicted_limit
            .fetch_add(excess as u64, Ordering::Relaxed);
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Sessions evicted since the last call: (ended, over the limit).
    pub fn take_evictions(&self) -> (u64, u64) {
        (
            self.evicted_idle.swap(0, Ordering::Relaxed),
            self.evicted_limit.swap(0, Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ev(user: &str, item: &str, kind: InteractionKind, t: i64) -> Interaction {
        Interaction {
            event_id: format!("{user}-{item}-{t}"),
            user_id: user.into(),
            item_id: item.into(),
            kind,
            event_time: t,
        }
    }

    fn store(max_items: usize, max_users: usize) -> SessionStore {
        SessionStore::new(&SessionsConfig {
            idle_gap: Duration::from_secs(60),
            max_items,
            max_users,
            group: None,
        })
    }

    #[test]
    fn a_session_keeps_recent_items_in_order_and_bounded() {
        let s = store(3, 100);
        for (i, item) in ["a", "b", "c", "d"].iter().enumerate() {
            s.add(0, &ev("u", item, InteractionKind::View, 1_000 * i as i64));
        }
        let items: Vec<String> = s.get("u").into_iter().map(|i| i.item_id).collect();
        assert_eq!(items, ["b", "c", "d"]);
        assert!(s.get("nobody").is_empty());
    }

    #[test]
    fn an_idle_gap_ends_the_session() {
        let s = store(10, 100);
        s.add(0, &ev("u", "a", InteractionKind::View, 0));
        s.add(0, &ev("u", "b", InteractionKind::Click, 30_000));
        assert_eq!(s.get("u").len(), 2);
        // Another user's event moves the partition clock past the gap.
        s.add(0, &ev("v", "x", InteractionKind::View, 30_000 + 60_001));
        assert!(s.get("u").is_empty(), "ended sessions read as empty");
        assert_eq!(s.expire(), 1);
        assert_eq!(s.len(), 1);
        // The user comes back: a new session without the old items.
        s.add(0, &ev("v", "y", InteractionKind::View, 200_000));
        s.add(0, &ev("u", "c", InteractionKind::Purchase, 200_000));
        let items = s.get("u");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].kind, InteractionKind::Purchase);
    }

    #[test]
    fn clocks_are_per_partition() {
        let s = store(10, 100);
        s.add(0, &ev("u", "a", InteractionKind::View, 0));
        // Partition 1 is far ahead: it must not end partition 0's sessions.
        s.add(1, &ev("v", "x", InteractionKind::View, 10_000_000));
        assert_eq!(s.get("u").len(), 1);
        assert_eq!(s.expire(), 0);
    }

    #[test]
    fn a_flood_of_users_is_bounded_and_counted() {
        let s = store(10, 1_000);
        for i in 0..10_000 {
            s.add(0, &ev(&format!("u{i}"), "a", InteractionKind::View, i));
        }
        assert!(s.len() <= 1_000, "{} sessions", s.len());
        let (_, limit) = s.take_evictions();
        assert_eq!(limit as usize + s.len(), 10_000);
        // The most recent users survive.
        assert_eq!(s.get("u9999").len(), 1);
        assert!(s.get("u0").is_empty());
    }

    #[test]
    fn revoked_partitions_lose_their_sessions() {
        let s = store(10, 100);
        s.add(0, &ev("u", "a", InteractionKind::View, 0));
        s.add(1, &ev("v", "b", InteractionKind::View, 0));
        s.drop_partitions(&[1]);
        assert_eq!(s.get("u").len(), 1);
        assert!(s.get("v").is_empty());
    }
}

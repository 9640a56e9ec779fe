//! Merchant windows when several instances share the work (the way Kafka
//! Streams and Flink do it, on Kafka itself).
//!
//! `transactions` is keyed by user, so an instance sees only a slice of a
//! merchant's events. The stream therefore forwards every accepted
//! transaction, re-keyed by merchant, to the internal `merchant-repartition`
//! topic ([`Forwarded`]). The merchant stage ([`stage`]) of the instance
//! that owns a repartition partition keeps the windows of that partition's
//! merchants ([`StageState`]) and publishes each merchant's window state,
//! at most once per `merchants.publish_interval`, to the compacted
//! `merchant-features` topic ([`MerchantRow`]). Every instance follows that
//! topic in full into a [`MerchantTable`] ([`table`]; a replicated table,
//! like a GlobalKTable) and scores with the newest row it holds, evaluated
//! at the scored event's time. One instance runs the same path.

pub mod stage;
pub mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::events::Transaction;
use crate::features::{Features, MerchantSnapshot, MerchantState, WindowSpec, WindowView};

/// One accepted transaction on `merchant-repartition` (key: merchant id;
/// schemas/merchant-repartition.json): what the merchant windows need, and
/// where it came from, so the stage recognises a record forwarded again
/// after a crash of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forwarded {
    pub txn_id: String,
    pub user_id: String,
    pub merchant_id: String,
    pub amount: f64,
    pub event_time: i64,
    /// Partition and offset in `transactions`.
    pub source_partition: i32,
    pub source_offset: i64,
    /// When the stream forwarded it, epoch ms.
    pub forwarded_at: i64,
}

impl Forwarded {
    pub fn new(t: &Transaction, source_partition: i32, source_offset: i64, now: i64) -> Self {
        Forwarded {
            txn_id: t.txn_id.clone(),
            user_id: t.user_id.clone(),
            merchant_id: t.merchant_id.clone(),
            amount: t.amount,
            event_time: t.event_time,
            source_partition,
            source_offset,
            forwarded_at: now,
        }
    }
}

/// One row of `merchant-features` (key: merchant id;
/// schemas/merchant-features.json). A tombstone (no value) removes the
/// merchant (evicted after its windows emptied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantRow {
    pub merchant_id: String,
    /// The `merchant-repartition` partition and the last offset folded in.
    pub partition: i32,
    pub offset: i64,
    /// When the row was published, epoch ms.
    pub published_at: i64,
    /// When the newest event folded in was forwarded by the stream.
    pub newest_forwarded_at: i64,
    pub windows: MerchantSnapshot,
}

/// A merchant owned by this instance's stage.
struct Owned {
    state: MerchantState,
    partition: i32,
    offset: i64,
    newest_forwarded_at: i64,
    dirty: bool,
    published: Option<Instant>,
}

/// The windows of the merchants of the repartition partitions this
/// instance owns, with what is needed to publish them rate-limited and to
/// drop records forwarded twice.
pub struct StageState {
    spec: WindowSpec,
    merchants: HashMap<String, Owned>,
    /// Per (repartition partition, source partition): the highest source
    /// offset folded. The stream forwards a source partition's records in
    /// offset order, so one at or below it was forwarded again (a crashed
    /// or revoked stream re-reads from its committed offset).
    seen: HashMap<(i32, i32), i64>,
    /// Newest event time per repartition partition (idle eviction).
    clocks: HashMap<i32, i64>,
    duplicates: u64,
}

impl StageState {
    pub fn new(spec: WindowSpec) -> Self {
        StageState {
            spec,
            merchants: HashMap::new(),
            seen: HashMap::new(),
            clocks: HashMap::new(),
            duplicates: 0,
        }
    }

    /// Folds the record at `offset` of repartition `partition`; false (and
    /// nothing changes) when it was forwarded again.
    pub fn fold(&mut self, partition: i32, offset: i64, f: &Forwarded) -> bool {
        let seen = self
            .seen
            .entry((partition, f.source_partition))
            .or_insert(i64::MIN);
        if f.source_offset <= *seen {
            self.duplicates += 1;
            return false;
        }
        *seen = f.source_offset;
        let spec = self.spec;
        let m = self
            .merchants
            .entry(f.merchant_id.clone())
            .or_insert_with(|| Owned {
                state: MerchantState::new(&spec),
                partition,
                offset: -1,
                newest_forwarded_at: i64::MIN,
                dirty: false,
                published: None,
            });
        m.state.fold(&spec, f.event_time, f.amount, &f.user_id);
        m.partition = partition;
        m.offset = m.offset.max(offset);
        m.newest_forwarded_at = m.newest_forwarded_at.max(f.forwarded_at);
        m.dirty = true;
        let clock = self.clocks.entry(partition).or_insert(i64::MIN);
        *clock = (*clock).max(f.event_time);
        true
    }

    /// Records dropped as forwarded again, since the last call.
    pub fn take_duplicates(&mut self) -> u64 {
        std::mem::take(&mut self.duplicates)
    }

    /// The rows of changed merchants not published within `interval`
    /// (all changed ones when `interval` is zero), marked published.
    pub fn due(&mut self, now: Instant, interval: Duration, now_ms: i64) -> Vec<MerchantRow> {
        let mut out = Vec::new();
        for (id, m) in self.merchants.iter_mut() {
            if !m.dirty
                || m.published
                    .is_some_and(|p| now.duration_since(p) < interval)
            {
                continue;
            }
            m.dirty = false;
            m.published = Some(now);
            out.push(MerchantRow {
                merchant_id: id.clone(),
                partition: m.partition,
                offset: m.offset,
                published_at: now_ms,
                newest_forwarded_at: m.newest_forwarded_at,
                windows: m.state.snapshot(&self.spec),
            });
        }
        // Deterministic order (tests, diffs).
        out.sort_by(|a, b| a.merchant_id.cmp(&b.merchant_id));
        out
    }

    /// Marks a merchant changed again (its publish failed).
    pub fn mark_dirty(&mut self, merchant_id: &str) {
        if let Some(m) = self.merchants.get_mut(merchant_id) {
            m.dirty = true;
            m.published = None;
        }
    }

    /// Marks every merchant of `partition` changed (after a warm-up: what
    /// the previous owner folded but had not published yet is published).
    pub fn mark_partition_dirty(&mut self, partition: i32) {
        for m in self.merchants.values_mut() {
            if m.partition == partition {
                m.dirty = true;
            }
        }
    }

    /// Drops the merchants and bookkeeping of a revoked partition.
    pub fn drop_partition(&mut self, partition: i32) -> usize {
        let before = self.merchants.len();
        self.merchants.retain(|_, m| m.partition != partition);
        self.seen.retain(|(p, _), _| *p != partition);
        self.clocks.remove(&partition);
        before - self.merchants.len()
    }

    /// Removes merchants idle for the whole retention on their partition's
    /// clock (their windows are empty); returns their ids, for tombstones.
    pub fn evict_idle(&mut self) -> Vec<String> {
        let keep = self.spec.retention_ms();
        let clocks = &self.clocks;
        let mut gone = Vec::new();
        self.merchants.retain(|id, m| {
            let clock = clocks.get(&m.partition).copied().unwrap_or(i64::MIN);
            let idle = m.state.last_event_time() < clock.saturating_sub(keep);
            if idle {
                gone.push(id.clone());
            }
            !idle
        });
        gone.sort();
        gone
    }

    pub fn len(&self) -> usize {
        self.merchants.len()
    }

    /// Approximate bytes held by the merchants' windows and ids.
    pub fn state_bytes(&self) -> usize {
        self.merchants
            .iter()
            .map(|(id, m)| id.len() + std::mem::size_of::<Owned>() + m.state.heap_bytes())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.merchants.is_empty()
    }
}

/// The row a score used: which state of its merchant, and how old.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RowUsed {
    /// Newest event time in the row, epoch ms.
    pub as_of: i64,
    /// When the row was published, epoch ms.
    pub published_at: i64,
    /// The repartition partition and last offset the row covers.
    pub partition: i32,
    pub offset: i64,
}

struct TableRow {
    state: MerchantState,
    used: RowUsed,
}

/// Every merchant's newest published window state (the replicated table).
pub struct MerchantTable {
    spec: WindowSpec,
    rows: DashMap<String, TableRow>,
    loaded: AtomicBool,
    loaded_notify: tokio::sync::Notify,
}

/// What applying one `merchant-features` record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// With the row's newest forwarded time, epoch ms.
    Upserted {
        newest_forwarded_at: i64,
    },
    Removed,
    /// Older than the row held (a republish after a rebalance).
    Stale,
}

impl MerchantTable {
    pub fn new(spec: WindowSpec) -> Self {
        MerchantTable {
            spec,
            rows: DashMap::new(),
            loaded: AtomicBool::new(false),
            loaded_notify: tokio::sync::Notify::new(),
        }
    }

    /// Applies one record of `merchant-features`: a row replaces the one
    /// held unless it covers less of the repartition partition; a tombstone
    /// removes it.
    pub fn apply(&self, key: &[u8], value: Option<&[u8]>) -> anyhow::Result<Applied> {
        let Some(v) = value else {
            let id = std::str::from_utf8(key)?;
            self.rows.remove(id);
            return Ok(Applied::Removed);
        };
        let row: MerchantRow = serde_json::from_slice(v)?;
        let state = MerchantState::from_snapshot(&self.spec, &row.windows)?;
        let used = RowUsed {
            as_of: row.windows.last_event_time,
            published_at: row.published_at,
            partition: row.partition,
            offset: row.offset,
        };
        if let Some(held) = self.rows.get(&row.merchant_id) {
            if held.used.partition == used.partition && held.used.offset > used.offset {
                return Ok(Applied::Stale);
            }
        }
        self.rows.insert(row.merchant_id, TableRow { state, used });
        Ok(Applied::Upserted {
            newest_forwarded_at: row.newest_forwarded_at,
        })
    }

    /// Fills the merchant entries of `f` for an event of `merchant_id` at
    /// `event_time` from the merchant's row; None (entries left zero) when
    /// the table has no row for it.
    pub fn fill(&self, merchant_id: &str, event_time: i64, f: &mut Features) -> Option<RowUsed> {
        let row = self.rows.get(merchant_id)?;
        row.state.features_at(&self.spec, event_time, &mut f.0);
        Some(row.used)
    }

    /// A merchant's window values as of `at` (default: its newest event).
    pub fn view(&self, merchant_id: &str, at: Option<i64>) -> Option<WindowView> {
        let row = self.rows.get(merchant_id)?;
        let as_of = at.unwrap_or(row.used.as_of);
        let mut f = Features([0.0; crate::features::N_FEATURES]);
        row.state.features_at(&self.spec, as_of, &mut f.0);
        Some(WindowView {
            as_of,
            last_event_time: row.used.as_of,
            features: f,
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// True once the table read `merchant-features` up to the end offsets
    /// it found at start.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub(crate) fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
        self.loaded_notify.notify_waiters();
    }

    /// Waits until the table is loaded.
    pub async fn wait_loaded(&self) {
        loop {
            let notified = self.loaded_notify.notified();
            if self.is_loaded() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests;

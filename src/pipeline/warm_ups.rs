//! The bookkeeping of a stage's warm-ups, apart from the consumer and
//! the tasks ([`super::warming`] acts on its answers): which partitions
//! warm up, which cancelled warm-ups still run, and which first message
//! waits for one of those to end.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A partition whose windows are rebuilt from the log off the consume
/// loop: paused, its first message kept, while the instance's other
/// partitions keep flowing. `Stage::take_warmed` takes it when its
/// warm-up task reports.
struct Warming<M> {
    /// Tells this warm-up's report from a cancelled one's.
    id: u64,
    /// The partition's first message of this assignment; read again from
    /// it once warm.
    msg: M,
    /// The first offset to score (the committed offset).
    score_from: i64,
    /// Set when the entry goes (revocation, shutdown): the task stops.
    _cancel: CancelOnDrop,
}

/// A warm-up task's cancel flag, set when its entry goes.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A warm-up cancelled by a revocation whose task has not ended yet: it
/// may still be folding events into its partition's users, so their
/// windows are dropped when it ends, and a warm-up of the same partition
/// (`deferred`: its first message and committed offset) starts only then.
struct CancelledWarmUp<M> {
    id: u64,
    deferred: Option<(M, i64)>,
}

/// The bookkeeping of a stage's warm-ups, apart from the consumer and the
/// tasks (the stage pauses, resumes, spawns and drops windows as it
/// answers): which partitions warm up, which cancelled warm-ups still
/// run, and which first message waits for one of those to end. `M` is the
/// kept first message.
pub(super) struct WarmUps<M> {
    warming: HashMap<i32, Warming<M>>,
    cancelled: HashMap<i32, CancelledWarmUp<M>>,
    /// The last warm-up's id.
    ids: u64,
}

/// What to do with a partition's first message ([`WarmUps::start`]).
#[derive(Debug)]
pub(super) enum Start {
    /// Start warm-up `id` now; `cancel` is its task's flag.
    Now { id: u64, cancel: Arc<AtomicBool> },
    /// A cancelled warm-up of the partition still runs: the message is
    /// kept and handed back by [`WarmUps::report`] when that one ends.
    AfterCancelled,
}

/// What a warm-up's report means ([`WarmUps::report`]).
#[derive(Debug, PartialEq)]
pub(super) enum Report<M> {
    /// A cancelled warm-up ended: what it folded is dropped, then the
    /// first message that waited for it (with its committed offset), if
    /// any, starts a warm-up.
    CancelledEnded { deferred: Option<(M, i64)> },
    /// The warm-up is done: the partition is taken up from `msg`.
    Done { msg: M, score_from: i64 },
    /// No warm-up this stage knows (ignored).
    Unknown,
}

/// What a revocation did to a partition's warm-ups ([`WarmUps::revoke`]).
#[derive(Debug, PartialEq)]
pub(super) struct Revoked<M> {
    /// A running warm-up was cancelled (its flag is set).
    pub cancelled: bool,
    /// A first message that waited for a cancelled warm-up, now left to
    /// the partition's next owner.
    pub waiting: Option<M>,
}

impl<M> Default for WarmUps<M> {
    fn default() -> Self {
        WarmUps {
            warming: HashMap::new(),
            cancelled: HashMap::new(),
            ids: 0,
        }
    }
}

impl<M> WarmUps<M> {
    /// A partition's first message `msg` (scoring from `score_from`) needs
    /// its windows rebuilt: now, or after a cancelled warm-up of the
    /// partition ends.
    pub fn start(&mut self, partition: i32, msg: M, score_from: i64) -> Start {
        // One already running (not seen: a partition's messages are
        // dropped while it warms up) is cancelled and waited for like a
        // revoked one: two warm-ups never fold one partition at once.
        if let Some(w) = self.warming.remove(&partition) {
            let c = CancelledWarmUp {
                id: w.id,
                deferred: None,
            };
            self.cancelled.insert(partition, c);
        }
        if let Some(c) = self.cancelled.get_mut(&partition) {
            c.deferred = Some((msg, score_from));
            return Start::AfterCancelled;
        }
        self.ids += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let w = Warming {
            id: self.ids,
            msg,
            score_from,
            _cancel: CancelOnDrop(cancel.clone()),
        };
        self.warming.insert(partition, w);
        Start::Now {
            id: self.ids,
            cancel,
        }
    }

    /// Warm-up `id` of `partition` reported (its task has ended).
    pub fn report(&mut self, partition: i32, id: u64) -> Report<M> {
        if (self.cancelled.get(&partition)).is_some_and(|c| c.id == id) {
            let deferred = self.cancelled.remove(&partition).and_then(|c| c.deferred);
            return Report::CancelledEnded { deferred };
        }
        // Only the warm-up of this id: taking out (and so cancelling) a
        // running warm-up on a stray report would leave it paused for good.
        match self.warming.entry(partition) {
            Entry::Occupied(e) if e.get().id == id => {
                let w = e.remove();
                Report::Done {
                    msg: w.msg,
                    score_from: w.score_from,
                }
            }
            _ => Report::Unknown,
        }
    }

    /// `partition` was revoked: its running warm-up is cancelled (its task
    /// reports later, [`Report::CancelledEnded`]) and a first message that
    /// waited for a cancelled one is given up.
    pub fn revoke(&mut self, partition: i32) -> Revoked<M> {
        let cancelled = match self.warming.remove(&partition) {
            Some(w) => {
                self.cancelled.insert(
                    partition,
                    CancelledWarmUp {
                        id: w.id,
                        deferred: None,
                    },
                );
                true
            }
            None => false,
        };
        let waiting = (self.cancelled.get_mut(&partition))
            .and_then(|c| c.deferred.take())
            .map(|(m, _)| m);
        Revoked { cancelled, waiting }
    }

    /// Whether `partition` warms up now.
    pub fn running(&self, partition: i32) -> bool {
        self.warming.contains_key(&partition)
    }

    /// Whether a first message of `partition` waits for its cancelled
    /// warm-up to end.
    pub fn waits(&self, partition: i32) -> bool {
        (self.cancelled.get(&partition)).is_some_and(|c| c.deferred.is_some())
    }

    /// Partitions paused for a warm-up: running, or waiting for a
    /// cancelled one.
    pub fn paused(&self) -> usize {
        self.warming.len()
            + (self.cancelled.values())
                .filter(|c| c.deferred.is_some())
                .count()
    }

    /// Cancels every running warm-up (the pipeline stops).
    pub fn cancel_all(&mut self) {
        self.warming.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A first message, by its offset.
    type Msg = i64;

    fn started(s: Start) -> (u64, Arc<AtomicBool>) {
        match s {
            Start::Now { id, cancel } => (id, cancel),
            Start::AfterCancelled => panic!("deferred where it should start"),
        }
    }

    #[test]
    fn a_warm_up_reports_done_with_its_first_message() {
        let mut w = WarmUps::<Msg>::default();
        let (id, cancel) = started(w.start(0, 100, 120));
        assert!(w.running(0) && !w.waits(0));
        assert_eq!(w.paused(), 1);
        assert_eq!(
            w.report(0, id),
            Report::Done {
                msg: 100,
                score_from: 120
            }
        );
        assert!(!w.running(0));
        assert_eq!(w.paused(), 0);
        // Its task has ended; the flag going up then stops nothing.
        assert!(cancel.load(Ordering::Relaxed));
        assert_eq!(w.report(0, id), Report::Unknown, "reported twice");
    }

    /// The deferred branch: a partition revoked while warming up comes back
    /// before its cancelled task has ended (a rebalance, then another; the
    /// task may still be folding into the partition's users, or wait for
    /// the one-at-a-time lock). Its new first message waits for that task;
    /// its report hands the message back to start the warm-up, once.
    #[test]
    fn a_partition_back_before_its_cancelled_warm_up_ended_waits_for_it() {
        let mut w = WarmUps::<Msg>::default();
        let (first, cancel) = started(w.start(3, 10, 10));
        let (other, other_cancel) = started(w.start(1, 50, 50));
        assert_eq!(
            w.revoke(3),
            Revoked {
                cancelled: true,
                waiting: None
            }
        );
        assert!(
            cancel.load(Ordering::Relaxed),
            "the revoked warm-up goes on"
        );
        assert!(
            !other_cancel.load(Ordering::Relaxed),
            "another partition's warm-up was cancelled"
        );
        assert!(!w.running(3));
        assert_eq!(w.paused(), 1);

        // Back (a later assignment) while the cancelled task still runs.
        assert!(matches!(w.start(3, 12, 11), Start::AfterCancelled));
        assert!(w.waits(3) && !w.running(3));
        assert_eq!(w.paused(), 2, "the waiting partition is paused too");
        // A newer first message replaces the one that waited.
        assert!(matches!(w.start(3, 14, 11), Start::AfterCancelled));

        // A stray report (an id of another partition) changes nothing.
        assert_eq!(w.report(3, other), Report::Unknown);
        assert!(w.waits(3));
        // The cancelled task ends: its users are dropped, and the message
        // that waited starts the warm-up.
        assert_eq!(
            w.report(3, first),
            Report::CancelledEnded {
                deferred: Some((14, 11))
            }
        );
        assert!(!w.waits(3));
        let (second, _) = started(w.start(3, 14, 11));
        assert_ne!(second, first);
        assert!(w.running(3));
        // The old id reports nothing more about the partition.
        assert_eq!(w.report(3, first), Report::Unknown);
        assert!(w.running(3));
        assert_eq!(
            w.report(3, second),
            Report::Done {
                msg: 14,
                score_from: 11
            }
        );
        assert_eq!(
            w.report(1, other),
            Report::Done {
                msg: 50,
                score_from: 50
            }
        );
        assert_eq!(w.paused(), 0);
    }

    /// Revoked again while waiting: the message is given up (its next owner
    /// reads it), and the cancelled task's report then starts nothing.
    #[test]
    fn a_waiting_partition_revoked_again_is_given_up() {
        let mut w = WarmUps::<Msg>::default();
        let (first, _) = started(w.start(2, 5, 5));
        assert!(w.revoke(2).cancelled);
        assert!(matches!(w.start(2, 7, 6), Start::AfterCancelled));
        assert_eq!(
            w.revoke(2),
            Revoked {
                cancelled: false,
                waiting: Some(7)
            }
        );
        assert!(!w.waits(2));
        assert_eq!(w.paused(), 0);
        // Back once more, still before the task ended: it waits again.
        assert!(matches!(w.start(2, 9, 9), Start::AfterCancelled));
        assert_eq!(
            w.report(2, first),
            Report::CancelledEnded {
                deferred: Some((9, 9))
            }
        );
        // And after the report, a revocation finds nothing of it.
        assert_eq!(
            w.revoke(2),
            Revoked {
                cancelled: false,
                waiting: None
            }
        );
        assert_eq!(w.report(2, first), Report::Unknown);
    }

    #[test]
    fn a_cancelled_warm_up_that_ends_with_nothing_waiting_starts_nothing() {
        let mut w = WarmUps::<Msg>::default();
        let (id, _) = started(w.start(0, 1, 1));
        assert!(w.revoke(0).cancelled);
        assert_eq!(w.report(0, id), Report::CancelledEnded { deferred: None });
        // The partition comes back after that: it starts at once.
        let (again, _) = started(w.start(0, 4, 4));
        assert_ne!(again, id);
    }

    #[test]
    fn a_second_first_message_of_a_warming_partition_waits_for_the_first_warm_up() {
        let mut w = WarmUps::<Msg>::default();
        let (first, cancel) = started(w.start(0, 1, 1));
        assert!(matches!(w.start(0, 3, 3), Start::AfterCancelled));
        assert!(cancel.load(Ordering::Relaxed), "the first warm-up goes on");
        assert!(!w.running(0) && w.waits(0));
        assert_eq!(
            w.report(0, first),
            Report::CancelledEnded {
                deferred: Some((3, 3))
            }
        );
    }

    #[test]
    fn stopping_cancels_every_running_warm_up() {
        let mut w = WarmUps::<Msg>::default();
        let flags: Vec<_> = (0..3).map(|p| started(w.start(p, 0, 0)).1).collect();
        w.cancel_all();
        assert!(flags.iter().all(|f| f.load(Ordering::Relaxed)));
        assert_eq!(w.paused(), 0);
    }
}

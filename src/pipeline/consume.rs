//! The consume loop of `run`: micro-batches taken from the consumer (up to
//! `batch_max_events` or `batch_max_wait`), revocations applied between
//! messages, each batch emitted and handed to the acker. A partition held
//! after an assignment (`resume`) starts a batch of its own when its wait
//! is over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ack::PendingBatch;
use super::{Consumer_, Stage};

pub(super) async fn consume_loop(
    stage: &mut Stage,
    consumer: &Consumer_,
    tx: &mpsc::Sender<PendingBatch>,
    mut warmed: mpsc::UnboundedReceiver<super::warming::WarmDone>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let max = stage.cfg.processing.batch_max_events;
    let wait = stage.cfg.processing.batch_max_wait;
    let mut evict_tick = tokio::time::interval(stage.cfg.windows.eviction_interval);
    evict_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        stage.forget_revoked(consumer);
        let settle_due = stage.next_settle_due();
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = evict_tick.tick() => {
                stage.evict();
                continue;
            }
            // A partition's warm-up is done: what the broker skipped
            // before its first message starts the next batch, and it is
            // read again from that message.
            Some(done) = warmed.recv() => Next::Warmed(done),
            // A partition held for its previous owner's commit is due: its
            // warm-up starts.
            _ = sleep_until(settle_due) => {
                stage.take_settled(consumer);
                continue;
            }
            m = consumer.recv() => Next::Message(m),
        };
        let taken_at = Instant::now();
        let mut accepted = Vec::with_capacity(max);
        let mut rejected = Vec::new();
        let mut offsets = HashMap::new();
        match first {
            Next::Warmed(done) => {
                stage.take_warmed(consumer, done, &mut accepted, &mut rejected, &mut offsets)?
            }
            Next::Message(Ok(m)) => {
                if !stage.before_take(consumer, &m) {
                    continue; // held: its partition waits, the others flow
                }
                stage.take(&m, &mut accepted, &mut rejected, &mut offsets)
            }
            Next::Message(Err(e)) => {
                tracing::warn!(error = %e, "Kafka consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while accepted.len() + rejected.len() < max {
            // A message already waiting is taken without arming a timer
            // (recv is cancel-safe); only an empty queue waits for the deadline.
            let ready = tokio::select! {
                biased;
                m = consumer.recv() => Some(m),
                _ = std::future::ready(()) => None,
            };
            let next = match ready {
                Some(m) => Ok(m),
                None => tokio::time::timeout_at(deadline, consumer.recv()).await,
            };
            match next {
                Ok(Ok(m)) => {
                    // A revocation inside this recv: what the batch holds
                    // of those partitions goes, before `m` (of the new
                    // assignment) is taken.
                    drop_revoked(stage, consumer, &mut accepted, &mut rejected, &mut offsets);
                    if stage.before_take(consumer, &m) {
                        stage.take(&m, &mut accepted, &mut rejected, &mut offsets)
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consumer error; continuing");
                    break;
                }
                Err(_) => break,
            }
        }
        // A revocation inside a recv that returned no message (the batch's
        // deadline passed, or an error): the batch must not be emitted
        // with those partitions' messages. Their offsets are committed
        // already, so the next owner starts after what was *processed*:
        // scored now, these would be scored twice (seen in CI).
        drop_revoked(stage, consumer, &mut accepted, &mut rejected, &mut offsets);
        stage
            .metrics
            .batch_size
            .observe((accepted.len() + rejected.len()) as f64);
        if accepted.is_empty() && rejected.is_empty() {
            continue; // everything taken belonged to a revoked partition
        }
        let batch = stage.emit(accepted, rejected, offsets, taken_at).await?;
        stage.in_flight.emitted(&batch.offsets);
        if tx.send(batch).await.is_err() {
            anyhow::bail!("the acker stopped; see the error above");
        }
    }
}

/// What starts a batch.
enum Next<M> {
    Message(M),
    Warmed(super::warming::WarmDone),
}

/// Removes from the batch being collected every message of a partition
/// revoked since the last call (revocations happen inside `recv`).
fn drop_revoked(
    stage: &mut Stage,
    consumer: &Consumer_,
    accepted: &mut Vec<super::Scored>,
    rejected: &mut Vec<super::Rejected>,
    offsets: &mut HashMap<i32, i64>,
) {
    if !stage.revoked.pending() {
        return;
    }
    let gone = stage.forget_revoked(consumer);
    accepted.retain(|s| !gone.contains(&s.source.partition));
    rejected.retain(|r| !gone.contains(&r.source.partition));
    offsets.retain(|p, _| !gone.contains(p));
}

/// Sleeps until `at`; forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

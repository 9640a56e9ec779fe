//! Acknowledgement: the acker stores a batch's offsets only after Kafka
//! acknowledged all its outputs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::Consumer_;
use crate::events::Reason;
use crate::kafka::produce;
use crate::metrics::Metrics;

/// A record enqueued to Kafka, kept until acknowledged so it can be re-sent.
pub(crate) struct OutRecord {
    pub(crate) topic: Arc<str>,
    pub(crate) key: Vec<u8>,
    /// Shared with the Redis entry of the same score (one serialisation).
    pub(crate) payload: Arc<[u8]>,
}

/// A batch whose outputs are on their way.
pub(crate) struct PendingBatch {
    pub(crate) deliveries: Vec<(DeliveryFuture, OutRecord)>,
    /// Next offset to consume, per partition.
    pub(crate) offsets: Vec<(i32, i64)>,
    pub(crate) event_times: Vec<i64>,
    pub(crate) flagged: u64,
    pub(crate) dead: Vec<Reason>,
    pub(crate) newest_event_time: i64,
    pub(crate) taken_at: Instant,
}

/// Waits for every output of each batch, in order, then stores its offsets.
pub(crate) async fn ack_loop(
    mut rx: mpsc::Receiver<PendingBatch>,
    consumer: Arc<Consumer_>,
    producer: FutureProducer,
    metrics: Metrics,
    in_topic: String,
    in_flight: Arc<super::context::InFlight>,
) -> anyhow::Result<()> {
    while let Some(b) = rx.recv().await {
        for (fut, rec) in b.deliveries {
            let mut fut = fut;
            let mut backoff = Duration::from_millis(50);
            loop {
                match produce::acknowledged(fut).await {
                    Ok(()) => break,
                    Err(e) => {
                        metrics.kafka_produce_errors.inc();
                        tracing::warn!(error = %e, topic = %rec.topic, "delivery failed; re-sending");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        fut = produce::enqueue(&producer, &rec.topic, &rec.key, &rec.payload, None)
                            .await
                            .with_context(|| format!("re-sending to {}", rec.topic))?;
                    }
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &b.offsets {
            tpl.add_partition_offset(&in_topic, *p, Offset::Offset(*next))?;
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile: its new owner re-reads
            // these events (at least once).
            tracing::debug!(error = %e, "offsets not stored");
        }
        in_flight.stored(&b.offsets);
        let now = crate::now_ms();
        metrics.events_scored.inc_by(b.event_times.len() as u64);
        metrics.events_flagged.inc_by(b.flagged);
        for t in &b.event_times {
            metrics
                .event_to_score_latency
                .observe(((now - t).max(0)) as f64 / 1000.0);
        }
        for r in &b.dead {
            metrics.dead_letter.with_label_values(&[r.as_str()]).inc();
        }
        if b.newest_event_time != i64::MIN {
            let secs = b.newest_event_time / 1000;
            if secs > metrics.newest_event_time.get() {
                metrics.newest_event_time.set(secs);
            }
        }
        metrics
            .processing_latency
            .observe(b.taken_at.elapsed().as_secs_f64());
    }
    Ok(())
}

//! The replicated merchant table: every instance reads `merchant-features`
//! in full, from the beginning, with a consumer that never commits (like a
//! Kafka Streams GlobalKTable). The table counts as loaded once it has read
//! up to the end offsets found at start; the stream waits for that before
//! scoring, and `/readyz` says not ready until then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{Applied, MerchantTable};
use crate::config::Config;
use crate::kafka;
use crate::metrics::Metrics;
use crate::topics;

/// Follows `merchant-features` into `table` until `stop` is cancelled.
pub async fn run(
    cfg: Config,
    table: Arc<MerchantTable>,
    metrics: Metrics,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let topic = cfg.topic(topics::MERCHANT_FEATURES);
    let group = format!(
        "streamscore-merchant-table-{}-{}",
        std::process::id(),
        crate::now_ms()
    );
    let mut cc = kafka::reader_config(&cfg.kafka, &group);
    kafka::bound_prefetch(&mut cc, &cfg.kafka);
    let consumer: StreamConsumer = cc
        .create()
        .context("creating the merchant table consumer")?;
    let partitions = kafka::topic_partitions(&consumer, &topic)?;
    // Loaded once every partition is read up to its end at start. A slow
    // broker (several instances starting at once) is waited for, not fatal.
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let mut tries = 0;
        let (low, high) = loop {
            match consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)) {
                Ok(w) => break w,
                Err(e) if tries < 6 => {
                    tries += 1;
                    tracing::warn!(error = %e, partition = p, "merchant table: watermarks unknown; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("watermarks of {topic}/{p}"));
                }
            }
        };
        if high > low {
            remaining.insert(p, high);
        }
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer
        .assign(&tpl)
        .with_context(|| format!("assigning {topic}"))?;
    let started = std::time::Instant::now();
    let mut read = 0u64;
    if remaining.is_empty() {
        table.set_loaded();
    }
    tracing::info!(%topic, partitions = partitions.len(), "loading the merchant table");
    loop {
        let m = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "merchant table consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        read += 1;
        match table.apply(m.key().unwrap_or_default(), m.payload()) {
            Ok(Applied::Upserted {
                newest_forwarded_at,
            }) if table.is_loaded() => {
                let secs = (crate::now_ms() - newest_forwarded_at).max(0) as f64 / 1000.0;
                metrics.merchant_table_propagation.observe(secs);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                partition = m.partition(),
                offset = m.offset(),
                error = format!("{e:#}"),
                "unreadable merchant-features record; skipped"
            ),
        }
        metrics.merchant_table_rows.set(table.len() as i64);
        if !table.is_loaded() {
            if let Some(&end) = remaining.get(&m.partition()) {
                if m.offset() + 1 >= end {
                    remaining.remove(&m.partition());
                }
            }
            if remaining.is_empty() {
                table.set_loaded();
                tracing::info!(
                    records = read,
                    merchants = table.len(),
                    seconds = started.elapsed().as_secs_f64(),
                    "merchant table loaded"
                );
            }
        }
    }
}

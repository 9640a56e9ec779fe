//! Reads a whole topic (default `interactions`) through the rebuild's own
//! replay path without building anything: the "just read the events"
//! baseline of scripts/bench_rebuild.sh and scripts/bench_warmup.sh.
//! Usage: bench_read CONFIG [TOPIC]. Messages that are not interactions
//! (e.g. of `transactions`) are read and counted as skipped.
use std::sync::atomic::AtomicBool;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_read CONFIG"))?;
    let cfg = streamscore::config::Config::load(Some(std::path::Path::new(&path)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let limits = streamscore::events::Limits {
        max_message_bytes: cfg.processing.max_message_bytes,
        max_future_skew_ms: i64::MAX / 4,
    };
    let started = Instant::now();
    let mut n = 0u64;
    let topic = std::env::args()
        .nth(2)
        .unwrap_or_else(|| streamscore::topics::INTERACTIONS.to_string());
    let stats = streamscore::recs::replay::read_all(
        &cfg.kafka,
        &cfg.topic(&topic),
        &limits,
        &AtomicBool::new(false),
        |_| n += 1,
        |_, _| {},
    )?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "read only: {} messages in {secs:.2} s ({:.0} messages/s)",
        stats.events + stats.skipped_invalid,
        (stats.events + stats.skipped_invalid) as f64 / secs
    );
    Ok(())
}

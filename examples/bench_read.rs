//! Reads the whole interactions log through the rebuild's own replay path
//! without building anything: the "just read the events" baseline of
//! scripts/bench_rebuild.sh. Usage: bench_read CONFIG
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
    let stats = streamscore::recs::replay::read_all(
        &cfg.kafka,
        &cfg.topic(streamscore::topics::INTERACTIONS),
        &limits,
        &AtomicBool::new(false),
        |_| n += 1,
        |_, _| {},
    )?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "read only: {} events in {secs:.2} s ({:.0} events/s)",
        stats.events,
        stats.events as f64 / secs
    );
    Ok(())
}

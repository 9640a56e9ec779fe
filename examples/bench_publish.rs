//! The rebuild's second phase without its ranking: every user's record,
//! ranked and encoded beforehand (in memory, untimed), then published to
//! the `recommendations` topic and Redis by the rebuild's own
//! [`Publisher`], timed. With `bench_read` (the first phase without its
//! fold) this is the floor of a rebuild on the same machine: a rebuild
//! cannot take less than reading the log plus publishing its output
//! (docs/BENCHMARKS.md, "Eighth look").
//!
//! The interactions are generated in memory as in `bench_fold` (same
//! generator and seed as `streamscore generate --seed 5`). Publishing
//! writes a real generation: run it against a bench broker and Redis.
//!
//! Usage: bench_publish CONFIG [COUNT=10000000] [USERS=1000000]
//! [ITEMS=50000]
use std::time::Instant;

use streamscore::generate::InteractionGenerator;
use streamscore::recs::publish::Publisher;
use streamscore::recs::{Builder, FoldBatch};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_publish CONFIG [COUNT] [USERS] [ITEMS]"))?;
    let cfg = streamscore::config::Config::load(Some(std::path::Path::new(&path)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (count, users, items) = (arg(2, 10_000_000), arg(3, 1_000_000), arg(4, 50_000));
    let mut b = Builder::with_merge_thread(&cfg.recs)?;
    let mut batch = FoldBatch::with_capacity(4_096);
    for e in InteractionGenerator::new(5, users, items, 1_764_000_000_000, 10.0).take(count) {
        batch.push(&e.user_id, &e.item_id, e.kind, e.event_time);
        if batch.len() == 4_096 {
            b.add_batch(&batch);
            batch = FoldBatch::with_capacity(4_096);
        }
    }
    b.add_batch(&batch);
    let ranker = b.into_ranker();
    let offsets = vec![
        streamscore::recs::replay::Range {
            topic: cfg.topic(streamscore::topics::INTERACTIONS),
            partition: 0,
            from: 0,
            to: count as i64,
        };
        4
    ];
    // Started before ranking only for its record tail; it sends nothing
    // until the first part.
    let mut publisher = Publisher::start(&cfg, offsets, streamscore::now_ms()).await?;
    let tail = publisher.record_tail();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    let mut parts = Vec::new();
    let n = ranker.user_count();
    let mut from = 0;
    while from < n {
        // The rebuild's chunk of users.
        let to = (from + 10_000).min(n);
        parts.extend(ranker.encode(from..to, threads, &tail, &mut Vec::new()));
        from = to;
    }
    let rank = t.elapsed().as_secs_f64();
    let bytes: usize = parts.iter().map(|p| p.buf.len()).sum();
    let busy = busy_seconds();
    let t = Instant::now();
    for part in &parts {
        publisher.encoded(part).await?;
    }
    let wait = publisher.wait.as_secs_f64();
    let meta = publisher.finish_ranked(&ranker).await?;
    let publish = t.elapsed().as_secs_f64();
    let cores = match (busy, busy_seconds()) {
        (Some(a), Some(b)) => format!("{:.1} core-seconds", b - a),
        _ => "core-seconds unknown".to_string(),
    };
    println!(
        "publish only: {} users ({} MB of keys and records) in {publish:.2} s \
         (waiting for chunks in flight {wait:.2} s; the machine busy {cores}), \
         generation {}; ranked and encoded beforehand in {rank:.2} s on {threads} threads",
        meta.users,
        bytes / 1_000_000,
        meta.generation
    );
    Ok(())
}

/// Seconds all cores of the machine were busy since boot (`/proc/stat`:
/// user, nice, system, irq, softirq, steal): publishing's own, the
/// broker's and Redis' CPU together.
fn busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // USER_HZ is 100 on Linux.
    Some(
        [0, 1, 2, 5, 6, 7]
            .iter()
            .map(|&i| cpu.get(i).copied().unwrap_or(0.0))
            .sum::<f64>()
            / 100.0,
    )
}

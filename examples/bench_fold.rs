//! The rebuild's CPU stages without a broker or Redis: fold, ranking and
//! serialising the records, timed one after another on interactions
//! generated in memory (the same generator and seed as
//! `streamscore generate --seed 5`), so a change to any stage can be
//! measured on its own and its output compared by digest.
//!
//! Usage: cargo run --release --example bench_fold -- [COUNT=10000000]
//! [USERS=1000000] [ITEMS=50000] [here]
//!
//! The fold merges its pairs on a thread of its own, as a rebuild does;
//! with `here` on the folding thread (the same digest either way).
use std::time::Instant;

use streamscore::config::RecsConfig;
use streamscore::generate::InteractionGenerator;
use streamscore::recs::{Builder, FoldBatch};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let (count, users, items) = (arg(1, 10_000_000), arg(2, 1_000_000), arg(3, 50_000));
    let t = Instant::now();
    // Batches of 4,096, like the rebuild's.
    let mut batches: Vec<FoldBatch> = Vec::new();
    for (n, e) in InteractionGenerator::new(5, users, items, 1_764_000_000_000, 10.0)
        .take(count)
        .enumerate()
    {
        if n % 4_096 == 0 {
            batches.push(FoldBatch::with_capacity(4_096));
        }
        if let Some(b) = batches.last_mut() {
            b.push(&e.user_id, &e.item_id, e.kind, e.event_time);
        }
    }
    eprintln!(
        "generated {count} interactions in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let cfg = RecsConfig::default();
    let t = Instant::now();
    let here = std::env::args().nth(4).as_deref() == Some("here");
    let mut b = if here {
        Builder::new(&cfg)
    } else {
        Builder::with_merge_thread(&cfg)?
    };
    for batch in &batches {
        b.add_batch(batch);
    }
    let fold = t.elapsed().as_secs_f64();
    drop(batches);
    let t = Instant::now();
    // Includes the last merges, which a merge thread may still be doing.
    let ranker = b.into_ranker();
    let ready = t.elapsed().as_secs_f64();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let offsets = vec![
        streamscore::recs::replay::Range {
            topic: "interactions".into(),
            partition: 0,
            from: 0,
            to: count as i64,
        };
        4
    ];
    // What Publisher::record_tail gives for generation 1.
    let tail = format!(
        ",\"generation\":1,\"built_at\":1764000000000,\"offsets\":{}}}",
        serde_json::to_string(&offsets)?
    );
    let t = Instant::now();
    let mut digest = streamscore::recs::publish::Digest::new();
    let mut bytes = 0usize;
    let n = ranker.user_count();
    let mut from = 0;
    let mut spare = Vec::new();
    while from < n {
        let to = (from + 10_000).min(n);
        for part in ranker.encode(from..to, threads, &tail, &mut spare) {
            digest.user_hashes(&part.hashes);
            bytes += part.buf.len();
            spare.push(part);
        }
        from = to;
    }
    let rank = t.elapsed().as_secs_f64();
    println!(
        "fold {fold:.2} s ({:.0} events/s; merges {}), ranker {ready:.2} s, rank+encode {rank:.2} s on {threads} threads \
         ({n} users, {} MB of keys and records), digest {}",
        count as f64 / fold,
        if here { "on the folding thread" } else { "on a thread of their own" },
        bytes / 1_000_000,
        digest.hex()
    );
    Ok(())
}

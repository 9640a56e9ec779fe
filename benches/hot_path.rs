//! Per-event cost of the hot path, against parsing the same event alone.
//!
//! `cargo bench --bench hot_path`. Groups:
//! - `parse`: serde_json parse + validation of one transaction (the floor);
//! - `features`: point-in-time features + state update of one event;
//! - `score`: the model on one row, and per batch of 64 rows;
//! - `event`: parse + features + score per event at batch 64 (what `run` does
//!   per message before producing);
//! - `interaction`: parse + validation of one interaction (what the
//!   rebuild's replay and the sessions do per message) against the plain
//!   serde pass it replaced, in the same run.
//!
//! The state is warmed with 200,000 generated events over 50,000 users first,
//! so lookups hit a realistically sized map.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use streamscore::config::WindowConfig;
use streamscore::events::{parse_interaction_ref, parse_transaction, InteractionRef, Limits};
use streamscore::features::{FeatureEngine, Features, WindowSpec};
use streamscore::generate::{GenOptions, InteractionGenerator, TxnGenerator};
use streamscore::model::{FraudModel, BATCH};

fn setup() -> (FeatureEngine, Vec<Vec<u8>>, FraudModel, i64) {
    let start = 1_764_000_000_000;
    let engine = FeatureEngine::new(WindowSpec::from(&WindowConfig::default()));
    let mut gen = TxnGenerator::new(GenOptions {
        seed: 1,
        users: 50_000,
        merchants: 2_000,
        fraud_rate: 0.01,
        mean_gap_ms: 100.0,
        start_ms: start,
    });
    for t in gen.by_ref().take(200_000) {
        engine.update(&t);
    }
    let raws: Vec<Vec<u8>> = gen
        .take(4_096)
        .map(|t| serde_json::to_vec(&t).unwrap())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = FraudModel::load(
        &root.join("models/fraud.onnx"),
        &root.join("models/fraud.json"),
    )
    .unwrap();
    (engine, raws, model, start + 200_000 * 100 + 3_600_000)
}

fn bench(c: &mut Criterion) {
    let (engine, raws, model, now) = setup();
    let limits = Limits {
        max_message_bytes: 65_536,
        max_future_skew_ms: 3_600_000 * 24 * 365,
    };
    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("parse", |b| {
        b.iter(|| {
            i = (i + 1) % raws.len();
            black_box(parse_transaction(&raws[i], now, &limits).unwrap())
        })
    });
    let txns: Vec<_> = raws
        .iter()
        .map(|r| parse_transaction(r, now, &limits).unwrap())
        .collect();
    g.bench_function("features", |b| {
        b.iter(|| {
            i = (i + 1) % txns.len();
            black_box(engine.process(&txns[i], true))
        })
    });
    let rows: Vec<Features> = txns
        .iter()
        .take(BATCH)
        .map(|t| engine.features(t))
        .collect();
    g.bench_function("score_batch1", |b| {
        b.iter(|| black_box(model.score(&rows[..1]).unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("per_batch_64");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("score", |b| {
        b.iter(|| black_box(model.score(&rows).unwrap()))
    });
    let mut j = 0;
    g.bench_function("parse_only", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                j = (j + 1) % raws.len();
                black_box(parse_transaction(&raws[j], now, &limits).unwrap());
            }
        })
    });
    g.bench_function("parse_features_score", |b| {
        b.iter(|| {
            let mut batch = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                j = (j + 1) % raws.len();
                let t = parse_transaction(&raws[j], now, &limits).unwrap();
                batch.push(engine.process(&t, true));
            }
            black_box(model.score(&batch).unwrap())
        })
    });
    g.finish();

    let interactions: Vec<Vec<u8>> = InteractionGenerator::new(1, 50_000, 5_000, now, 10.0)
        .take(4_096)
        .map(|e| serde_json::to_vec(&e).unwrap())
        .collect();
    let mut g = c.benchmark_group("interaction");
    g.throughput(Throughput::Elements(1));
    let mut k = 0;
    g.bench_function("parse", |b| {
        b.iter(|| {
            k = (k + 1) % interactions.len();
            black_box(parse_interaction_ref(&interactions[k], now, &limits).unwrap())
        })
    });
    g.bench_function("serde_only", |b| {
        b.iter(|| {
            k = (k + 1) % interactions.len();
            black_box(serde_json::from_slice::<InteractionRef>(&interactions[k]).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

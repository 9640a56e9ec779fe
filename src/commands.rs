//! The tool subcommands: `generate`, `features export`, `watch`, `topics apply`.
//! (`run` is the pipeline itself, in [`crate::pipeline`].)

use std::collections::VecDeque;
use std::io::{BufRead, BufWriter, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use tokio_util::sync::CancellationToken;

use crate::cli::GenerateArgs;
use crate::config::Config;
use crate::events::Transaction;
use crate::features::{FeatureEngine, Lateness, WindowSpec, FEATURE_NAMES};
use crate::generate::{GenOptions, InteractionGenerator, TxnGenerator};
use crate::kafka::{self, admin, produce};
use crate::topics;

/// A malformed variant of a valid transaction, one defect per `k`.
pub fn malformed(t: &Transaction, k: u64) -> Vec<u8> {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    match k % 7 {
        0 => return b"{\"txn_id\": \"broken".to_vec(),
        1 => {
            if let Some(o) = v.as_object_mut() {
                o.remove("merchant_id");
            }
        }
        2 => v["amount"] = serde_json::json!("12.50"),
        3 => v["amount"] = serde_json::json!(-3.0),
        4 => v["event_time"] = serde_json::json!(t.event_time / 1000),
        5 => v["user_id"] = serde_json::json!(""),
        _ => v["padding"] = serde_json::json!("x".repeat(100 * 1024)),
    }
    v.to_string().into_bytes()
}

/// `streamscore generate`.
pub async fn generate(
    cfg: &Config,
    args: &GenerateArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let live = args.rate > 0.0;
    let count = args.count.unwrap_or(if live || args.duration.is_some() {
        u64::MAX
    } else {
        10_000
    });
    let span_ms = if count == u64::MAX {
        0
    } else {
        (count as f64 * args.mean_gap_ms) as i64
    };
    let start_ms = args.start_ms.unwrap_or_else(|| crate::now_ms() - span_ms);
    let mut txns = TxnGenerator::new(GenOptions {
        seed: args.seed,
        users: args.users,
        merchants: args.merchants,
        fraud_rate: args.fraud_rate,
        mean_gap_ms: args.mean_gap_ms,
        start_ms,
    });
    let mut inters = InteractionGenerator::new(
        args.seed,
        args.users,
        args.merchants * 10,
        start_ms,
        args.mean_gap_ms / args.interactions_per_txn.max(1e-9),
    );
    let mut sink = match &args.output {
        Some(p) => {
            let create = |p: &std::path::Path| {
                std::fs::File::create(p)
                    .map(BufWriter::new)
                    .with_context(|| format!("creating {}", p.display()))
            };
            let inters = match &args.interactions_output {
                Some(i) => Some(create(i)?),
                None => None,
            };
            Sink::File(create(p)?, inters)
        }
        None => Sink::Kafka(KafkaSink {
            producer: kafka::producer_config(&cfg.kafka).create()?,
            prefix: cfg.kafka.topic_prefix.clone(),
            inflight: VecDeque::new(),
        }),
    };
    let started = Instant::now();
    let mut produced: u64 = 0;
    let mut bad: u64 = 0;
    let mut inter_debt = 0.0;
    let mut last_report = Instant::now();
    while produced < count {
        if shutdown.is_cancelled() || args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if live {
            let due = Duration::from_secs_f64(produced as f64 / args.rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let Some(mut t) = txns.next() else { break };
        if live {
            t.event_time = crate::now_ms();
        }
        let payload = serde_json::to_vec(&t)?;
        sink.send(topics::TRANSACTIONS, t.user_id.as_bytes(), &payload)
            .await?;
        produced += 1;
        if args.malformed_every > 0 && produced % args.malformed_every == 0 {
            let raw = malformed(&t, bad);
            bad += 1;
            sink.send(topics::TRANSACTIONS, t.user_id.as_bytes(), &raw)
                .await?;
        }
        inter_debt += args.interactions_per_txn;
        while inter_debt >= 1.0 {
            inter_debt -= 1.0;
            if let Some(mut i) = inters.next() {
                if live {
                    i.event_time = crate::now_ms();
                }
                sink.send(
                    topics::INTERACTIONS,
                    i.user_id.as_bytes(),
                    &serde_json::to_vec(&i)?,
                )
                .await?;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "generate: {produced} transactions in {secs:.1}s ({:.0}/s)",
                produced as f64 / secs
            );
        }
    }
    sink.finish().await?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "generate: done, {produced} transactions and {bad} malformed messages in {secs:.1}s ({:.0}/s)",
        produced as f64 / secs
    );
    Ok(())
}

/// Where generated events go.
enum Sink {
    /// JSON lines of transactions (the training input), and optionally of
    /// interactions.
    File(BufWriter<std::fs::File>, Option<BufWriter<std::fs::File>>),
    Kafka(KafkaSink),
}

struct KafkaSink {
    producer: FutureProducer,
    prefix: String,
    inflight: VecDeque<DeliveryFuture>,
}

impl Sink {
    async fn send(
        &mut self,
        logical_topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> anyhow::Result<()> {
        match self {
            Sink::File(txns, inters) => {
                let w = if logical_topic == topics::TRANSACTIONS {
                    Some(txns)
                } else {
                    inters.as_mut()
                };
                if let Some(w) = w {
                    w.write_all(payload)?;
                    w.write_all(b"\n")?;
                }
            }
            Sink::Kafka(k) => {
                let topic = format!("{}{logical_topic}", k.prefix);
                let f = produce::enqueue(&k.producer, &topic, key, payload, None).await?;
                k.inflight.push_back(f);
                // Bound what is in flight; check acks as we go so failures surface.
                while k.inflight.len() > 50_000 {
                    if let Some(f) = k.inflight.pop_front() {
                        produce::acknowledged(f)
                            .await
                            .with_context(|| format!("producing to {topic}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        match self {
            Sink::File(w, inters) => {
                w.flush()?;
                if let Some(i) = inters {
                    i.flush()?;
                }
            }
            Sink::Kafka(k) => {
                while let Some(f) = k.inflight.pop_front() {
                    produce::acknowledged(f).await.context("producing")?;
                }
                k.producer.flush(Duration::from_secs(30))?;
            }
        }
        Ok(())
    }
}

/// `streamscore features export`: the training data, computed by the
/// window code of the pipeline over a transaction file in log order.
pub fn export_features(
    cfg: &Config,
    input: &std::path::Path,
    output: &std::path::Path,
) -> anyhow::Result<u64> {
    let engine = FeatureEngine::new(WindowSpec::from(&cfg.windows));
    let mut lateness = Lateness::new(cfg.windows.grace.as_millis() as i64);
    let reader = std::io::BufReader::new(
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?,
    );
    let mut out = BufWriter::new(
        std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?,
    );
    write!(out, "txn_id,event_time,label,pattern")?;
    for n in FEATURE_NAMES {
        write!(out, ",{n}")?;
    }
    writeln!(out)?;
    let mut rows = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let t: Transaction = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", input.display(), i + 1))?;
        let late = lateness.is_late(0, t.event_time);
        let f = engine.process(&t, !late);
        let pattern = t.fraud_pattern.as_deref().unwrap_or("");
        write!(
            out,
            "{},{},{},{}",
            t.txn_id,
            t.event_time,
            u8::from(!pattern.is_empty()),
            pattern
        )?;
        for v in f.0 {
            write!(out, ",{v}")?;
        }
        writeln!(out)?;
        rows += 1;
    }
    out.flush()?;
    Ok(rows)
}

/// `streamscore watch`: a live summary of `fraud-scores`, once a second.
pub async fn watch(
    cfg: &Config,
    duration: Option<Duration>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let group = format!("streamscore-watch-{}", std::process::id());
    let mut cc = kafka::consumer_config(&cfg.kafka, &group, 5_000);
    cc.set("auto.offset.reset", "latest");
    let consumer: StreamConsumer = cc.create()?;
    let topic = cfg.topic(topics::FRAUD_SCORES);
    consumer.subscribe(&[&topic])?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut total, mut flagged) = (0u64, 0u64);
    let mut lat: Vec<i64> = Vec::new();
    let mut n_tick = 0u64;
    let mut example: Option<String> = None;
    println!("watching {topic} (Ctrl-C to stop)");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                n_tick += 1;
                lat.sort_unstable();
                let pct = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
                println!(
                    "scores/s {:>6} | total {:>8} | flagged {:>6} | event->score p50 {:>4} ms  p99 {:>4} ms",
                    lat.len(), total, flagged, pct(0.5), pct(0.99)
                );
                if n_tick % 5 == 0 {
                    if let Some(e) = example.take() {
                        println!("  latest flagged: {e}");
                    }
                }
                lat.clear();
                if duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
            }
            m = consumer.recv() => {
                let Ok(m) = m else { continue };
                let Some(p) = m.payload() else { continue };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(p) else { continue };
                total += 1;
                if let (Some(s), Some(e)) = (v["scored_at"].as_i64(), v["event_time"].as_i64()) {
                    lat.push(s - e);
                }
                if v["decision"] == "flag" {
                    flagged += 1;
                    example = Some(format!(
                        "txn {} user {} amount {} score {:.3}",
                        v["txn_id"].as_str().unwrap_or("?"),
                        v["user_id"].as_str().unwrap_or("?"),
                        v["amount"], v["score"].as_f64().unwrap_or(0.0)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `streamscore topics apply`; returns the process exit code.
pub async fn topics_apply(cfg: &Config, file: Option<&std::path::Path>) -> anyhow::Result<i32> {
    let specs = topics::load(file)?;
    let report = admin::apply(cfg, &specs).await?;
    let mut code = 0;
    for r in report {
        match r.outcome {
            admin::TopicOutcome::Created => println!("created  {}", r.name),
            admin::TopicOutcome::Exists => println!("exists   {}", r.name),
            admin::TopicOutcome::PartitionMismatch { declared, actual } => {
                println!(
                    "MISMATCH {}: {actual} partitions on the broker, {declared} declared (not changed: repartitioning moves keys)",
                    r.name
                );
                code = 3;
            }
        }
    }
    Ok(code)
}

/// Prints replay progress: events done, events/s, ETA.
fn progress_printer(started: std::time::Instant) -> impl FnMut(u64, u64) + Send + 'static {
    move |done, total| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            total.saturating_sub(done) as f64 / rate
        } else {
            0.0
        };
        eprintln!("rebuild: {done}/{total} events replayed, {rate:.0} events/s, ETA {eta:.0}s");
    }
}

/// Reads every valid interaction of the log off the reactor, printing progress.
async fn read_interactions(
    cfg: &Config,
) -> anyhow::Result<(
    Vec<crate::events::Interaction>,
    crate::recs::replay::ReplayStats,
)> {
    let kafka = cfg.kafka.clone();
    let topic = cfg.topic(crate::topics::INTERACTIONS);
    let limits = crate::events::Limits::from_config(&cfg.processing);
    tokio::task::spawn_blocking(move || {
        let never = std::sync::atomic::AtomicBool::new(false);
        let progress = progress_printer(std::time::Instant::now());
        let mut events = Vec::new();
        let stats = crate::recs::replay::read_all(
            &kafka,
            &topic,
            &limits,
            &never,
            |e| events.push(e.into_owned()),
            progress,
        )?;
        anyhow::Ok((events, stats))
    })
    .await
    .context("replay task")?
}

/// `streamscore rebuild`: one generation of candidates from the whole log.
pub async fn rebuild(cfg: &Config) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (meta, stats) = crate::recs::rebuild_once(
        cfg,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        progress_printer(started),
    )
    .await?;
    eprintln!(
        "rebuild: generation {} with {} users from {} events ({} malformed skipped) in {:.1}s",
        meta.generation,
        meta.users,
        stats.events,
        stats.skipped_invalid,
        started.elapsed().as_secs_f64()
    );
    println!("{}", serde_json::to_string(&meta)?);
    Ok(())
}

/// `streamscore eval-recs`: hold-out quality of candidates vs popularity.
pub async fn eval_recs(cfg: &Config) -> anyhow::Result<()> {
    let (events, stats) = read_interactions(cfg).await?;
    let (cands, popular) = crate::recs::holdout_eval(&events, &cfg.recs);
    let out = serde_json::json!({
        "k": cfg.recs.top_k,
        "events": stats.events,
        "skipped_invalid": stats.skipped_invalid,
        "held_out_users": cands.users,
        "candidates": { "recall": cands.recall, "ndcg": cands.ndcg },
        "popular": { "recall": popular.recall, "ndcg": popular.ndcg },
    });
    println!("{out}");
    Ok(())
}

//! End-to-end benchmark of `streamscore run` against the limit this broker
//! and machine allow: a minimal rdkafka pass-through (consume each message,
//! produce it unchanged to another topic, nothing else) measured in the same
//! run. Started by `scripts/bench_e2e.sh`, which provides the services.
//!
//! 1. catch-up: COUNT pre-produced transactions; time from the first message
//!    taken to the last output acknowledged, for the pass-through and for
//!    `streamscore run` (from its metrics), one after the other;
//! 2. latency: both running at once while `streamscore generate` produces
//!    RATE transactions/s for SECONDS with event time = wall clock; a probe
//!    consumer on each output topic records receipt time − event time.
//!
//! Usage: bench_e2e BROKERS REDIS_URL STREAMSCORE_BIN [COUNT] [RATE] [SECONDS]

use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

mod common;
use common::{free_port, pct, scrape, stop_child, Res};

fn consumer(brokers: &str, group: &str, reset: &str) -> Res<StreamConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", reset)
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "100")
        .create()?)
}

fn producer(brokers: &str) -> Res<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()?)
}

/// Consume `from`, produce each message unchanged to `to`; counts acks.
async fn passthrough(
    brokers: String,
    from: String,
    to: String,
    group: String,
    acked: Arc<AtomicU64>,
    first_at: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
) -> Res<()> {
    let c = consumer(&brokers, &group, "earliest")?;
    c.subscribe(&[&from])?;
    let p = producer(&brokers)?;
    let mut inflight = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        let m = match tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
            Ok(m) => m?,
            Err(_) => {
                while let Some(f) = inflight.pop_front() {
                    let _ = f.await;
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        first_at
            .lock()
            .map_err(|_| "poisoned")?
            .get_or_insert_with(Instant::now);
        let key = m.key().unwrap_or_default().to_vec();
        let payload = m.payload().unwrap_or_default().to_vec();
        loop {
            match p.send_result(FutureRecord::to(&to).key(&key).payload(&payload)) {
                Ok(f) => {
                    inflight.push_back(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        while inflight.len() > 10_000 {
            if let Some(f) = inflight.pop_front() {
                let _ = f.await;
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Receipt time − event time of every message on `topic` (ms).
async fn probe(
    brokers: String,
    topic: String,
    out: Arc<Mutex<Vec<i64>>>,
    stop: Arc<AtomicBool>,
) -> Res<()> {
    let c = consumer(&brokers, &format!("probe-{topic}"), "latest")?;
    c.subscribe(&[&topic])?;
    while !stop.load(Ordering::Relaxed) {
        let Ok(m) = tokio::time::timeout(Duration::from_millis(200), c.recv()).await else {
            continue;
        };
        let m = m?;
        let now = streamscore::now_ms();
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        if let Some(t) = v["event_time"].as_i64() {
            out.lock().map_err(|_| "poisoned")?.push(now - t);
        }
    }
    Ok(())
}

fn write_config(
    dir: &std::path::Path,
    brokers: &str,
    redis: &str,
    prefix: &str,
    port: u16,
) -> Res<std::path::PathBuf> {
    let root = env!("CARGO_MANIFEST_DIR");
    let p = dir.join(format!("{prefix}toml"));
    std::fs::write(
        &p,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{prefix}ss\"\ntopic_prefix = \"{prefix}\"\n\
             [model]\npath = \"{root}/models/fraud.onnx\"\nsignature = \"{root}/models/fraud.json\"\n\
             [redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}\"\nscore_ttl = \"10m\"\n\
             [http]\nbind = \"127.0.0.1:{port}\"\n"
        ),
    )?;
    Ok(p)
}

fn ss(bin: &str, cfg: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.arg("--config").arg(cfg).args(args);
    c
}

#[tokio::main]
async fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        return Err(
            "usage: bench_e2e BROKERS REDIS_URL STREAMSCORE_BIN [COUNT] [RATE] [SECONDS]".into(),
        );
    }
    let (brokers, redis, bin) = (a[1].clone(), a[2].clone(), a[3].clone());
    let count: u64 = a
        .get(4)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let rate: u64 = a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(5_000);
    let secs: u64 = a.get(6).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let dir = tempfile::tempdir()?;
    let tag = std::process::id();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;

    // ---------- 1. catch-up ----------
    let pre = format!("bench{tag}a.");
    let port = free_port()?;
    let cfg = write_config(dir.path(), &brokers, &redis, &pre, port)?;
    let st = ss(&bin, &cfg, &["topics", "apply"])
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        return Err("topics apply failed".into());
    }
    let pt_topic = format!("{pre}passthrough");
    admin
        .create_topics(
            &[NewTopic::new(&pt_topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    eprintln!("producing {count} transactions…");
    let t0 = Instant::now();
    let st = ss(
        &bin,
        &cfg,
        &[
            "generate",
            "--count",
            &count.to_string(),
            "--users",
            "1000000",
            "--merchants",
            "40000",
        ],
    )
    .status()?;
    if !st.success() {
        return Err("generate failed".into());
    }
    eprintln!("produced in {:.1}s", t0.elapsed().as_secs_f64());

    let acked = Arc::new(AtomicU64::new(0));
    let first = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let h = tokio::spawn(passthrough(
        brokers.clone(),
        format!("{pre}transactions"),
        pt_topic.clone(),
        format!("{pre}pt"),
        acked.clone(),
        first.clone(),
        stop.clone(),
    ));
    while acked.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pt_secs = first
        .lock()
        .map_err(|_| "poisoned")?
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(f64::NAN);
    stop.store(true, Ordering::Relaxed);
    h.await??;
    eprintln!("pass-through: {count} in {pt_secs:.2}s");

    let mut run = ss(&bin, &cfg, &["run"]).stderr(Stdio::null()).spawn()?;
    let mut started: Option<Instant> = None;
    loop {
        let consumed = scrape(
            port,
            "streamscore_events_consumed_total{topic=\"transactions\"}",
        )
        .unwrap_or(0.0);
        if started.is_none() && consumed > 0.0 {
            started = Some(Instant::now());
        }
        if scrape(port, "streamscore_events_scored_total").unwrap_or(0.0) >= count as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ss_secs = started
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(f64::NAN);
    let rss_kb = std::fs::read_to_string(format!("/proc/{}/status", run.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .unwrap_or_default();
    let _ = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status();
    let _ = run.wait();
    eprintln!("streamscore run: {count} in {ss_secs:.2}s ({rss_kb})");

    // ---------- 2. latency at RATE ----------
    let pre = format!("bench{tag}b.");
    let port = free_port()?;
    let cfg = write_config(dir.path(), &brokers, &redis, &pre, port)?;
    ss(&bin, &cfg, &["topics", "apply"])
        .stdout(Stdio::null())
        .status()?;
    let pt_topic = format!("{pre}passthrough");
    admin
        .create_topics(
            &[NewTopic::new(&pt_topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    let run = ss(&bin, &cfg, &["run"]).stderr(Stdio::null()).spawn()?;
    let stop = Arc::new(AtomicBool::new(false));
    let pt = tokio::spawn(passthrough(
        brokers.clone(),
        format!("{pre}transactions"),
        pt_topic.clone(),
        format!("{pre}pt"),
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(None)),
        stop.clone(),
    ));
    let lat_pt = Arc::new(Mutex::new(Vec::new()));
    let lat_ss = Arc::new(Mutex::new(Vec::new()));
    let p1 = tokio::spawn(probe(
        brokers.clone(),
        pt_topic.clone(),
        lat_pt.clone(),
        stop.clone(),
    ));
    let p2 = tokio::spawn(probe(
        brokers.clone(),
        format!("{pre}fraud-scores"),
        lat_ss.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await; // groups assigned
    let st = ss(
        &bin,
        &cfg,
        &[
            "generate",
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{secs}s"),
            "--users",
            "1000000",
            "--merchants",
            "40000",
        ],
    )
    .status()?;
    if !st.success() {
        return Err("generate failed".into());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    pt.await??;
    p1.await??;
    p2.await??;
    stop_child(run);
    // Skip the first 2 s of samples (warm-up).
    let skip = (rate * 2) as usize;
    let take = |v: &Arc<Mutex<Vec<i64>>>| -> Res<Vec<i64>> {
        let all = std::mem::take(&mut *v.lock().map_err(|_| "poisoned")?);
        Ok(all.into_iter().skip(skip).collect())
    };
    let mut a = take(&lat_pt)?;
    let mut b = take(&lat_ss)?;
    let (a50, a99) = (pct(&mut a, 0.5), pct(&mut a, 0.99));
    let (b50, b99) = (pct(&mut b, 0.5), pct(&mut b, 0.99));

    println!("| figure | pass-through | streamscore run | ratio (run / pass-through) |");
    println!("|---|---|---|---|");
    println!(
        "| catch-up, {count} transactions | {:.0} msg/s ({pt_secs:.2} s) | {:.0} events/s ({ss_secs:.2} s) | {:.2}× the time |",
        count as f64 / pt_secs,
        count as f64 / ss_secs,
        ss_secs / pt_secs
    );
    println!(
        "| latency at {rate}/s for {secs} s, p50 | {a50} ms | {b50} ms | {:.2} |",
        b50 as f64 / a50.max(1) as f64
    );
    println!(
        "| latency at {rate}/s for {secs} s, p99 | {a99} ms | {b99} ms | {:.2} |",
        b99 as f64 / a99.max(1) as f64
    );
    println!("| samples | {} | {} | |", a.len(), b.len());
    println!("\nstreamscore run peak RSS during catch-up: {rss_kb}");
    Ok(())
}

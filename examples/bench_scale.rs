//! Throughput of `streamscore run` with 1, 2 and 3 instances in one group
//! over 6-partition topics, and the age of the merchant features used at
//! score time. Started by `scripts/bench_scale.sh`, which provides the
//! services. For each instance count, in one run:
//!
//! 1. fresh topics (prefix per round), COUNT transactions pre-produced by
//!    `streamscore generate` (USERS users, MERCHANTS merchants);
//! 2. k instances started at once; catch-up time = first score to the sum
//!    of their `streamscore_events_scored_total` reaching COUNT;
//! 3. every score read back: `merchant_table.age_ms` p50/p99 and how many
//!    scored without a row.
//!
//! Usage: bench_scale BROKERS REDIS_URL STREAMSCORE_BIN [COUNT] [MAX_INSTANCES]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;

mod common;
use common::{free_ports, pct, scrape, stop_child, Res};

const PARTITIONS: i32 = 6;

/// Every record of `topic` (all partitions from the start) until `n` read.
fn read_scores(brokers: &str, topic: &str, n: u64) -> Res<Vec<serde_json::Value>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("bench-scale-reader-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while (out.len() as u64) < n && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            out.push(serde_json::from_slice(m?.payload().unwrap_or_default())?);
        }
    }
    Ok(out)
}

fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        return Err(
            "usage: bench_scale BROKERS REDIS_URL STREAMSCORE_BIN [COUNT] [MAX_INSTANCES]".into(),
        );
    }
    let (brokers, redis, bin) = (&a[1], &a[2], &a[3]);
    let count: u64 = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(300_000);
    let max_k: usize = a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dir = tempfile::tempdir()?;
    let root = env!("CARGO_MANIFEST_DIR");
    let topics = dir.path().join("topics.toml");
    std::fs::write(
        &topics,
        streamscore::topics::BUILTIN.replace(
            "\npartitions = 4\n",
            &format!("\npartitions = {PARTITIONS}\n"),
        ),
    )?;
    let tag = streamscore::now_ms();
    println!("| instances | events | catch-up s | events/s | vs 1 instance | merchant row age p50 ms | p99 ms | scored without a row |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut base = None;
    for k in 1..=max_k {
        let pre = format!("bscale{tag}k{k}.");
        let ports = free_ports(k)?;
        let cfg = dir.path().join(format!("k{k}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{pre}ss\"\ntopic_prefix = \"{pre}\"\n\
                 [model]\npath = \"{root}/models/fraud.onnx\"\nsignature = \"{root}/models/fraud.json\"\n\
                 [redis]\nurl = \"{redis}\"\nkey_prefix = \"{pre}\"\nscore_ttl = \"10m\"\n\
                 [recs]\ntopic_transactions = false\nrebuild_interval = \"0s\"\n"
            ),
        )?;
        let ss = |args: &[&str]| {
            let mut c = Command::new(bin);
            c.arg("--config").arg(&cfg).args(args);
            c
        };
        let st = ss(&["topics", "apply", "--file", &topics.to_string_lossy()])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            return Err("topics apply failed".into());
        }
        let st = ss(&[
            "generate",
            "--count",
            &count.to_string(),
            "--users",
            "100000",
            "--merchants",
            "2000",
        ])
        .stderr(Stdio::null())
        .status()?;
        if !st.success() {
            return Err("generate failed".into());
        }
        let logs = std::env::var("BENCH_LOGS").unwrap_or_else(|_| "/tmp".into());
        let children: Vec<Child> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| -> Res<Child> {
                let log = std::fs::File::create(format!("{logs}/bench_scale-k{k}-{i}.log"))?;
                Ok(ss(&["run"])
                    .env("STREAMSCORE__HTTP__BIND", format!("127.0.0.1:{p}"))
                    .env("RUST_LOG", "info,rdkafka=warn")
                    .stderr(log)
                    .spawn()?)
            })
            .collect::<Res<_>>()?;
        let scored = || -> f64 {
            ports
                .iter()
                .filter_map(|p| scrape(*p, "streamscore_events_scored_total"))
                .sum()
        };
        let mut first = None;
        let (mut last_n, mut last_change) = (0.0, Instant::now());
        loop {
            let n = scored();
            if n > 0.0 && first.is_none() {
                first = Some(Instant::now());
            }
            if n >= count as f64 {
                break;
            }
            if n > last_n {
                (last_n, last_change) = (n, Instant::now());
            }
            if last_change.elapsed() > Duration::from_secs(120) {
                for c in children {
                    stop_child(c);
                }
                return Err(format!(
                    "k={k}: no progress for 120 s at {n} of {count} scored (the broker stopped delivering)"
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
        for c in children {
            stop_child(c);
        }
        let scores = read_scores(brokers, &format!("{pre}fraud-scores"), count)?;
        let mut ages: Vec<i64> = scores
            .iter()
            .filter_map(|v| v["merchant_table"]["age_ms"].as_i64())
            .collect();
        ages.sort_unstable();
        let without = scores.len() - ages.len();
        let rate = count as f64 / secs;
        let b = *base.get_or_insert(rate);
        println!(
            "| {k} | {count} | {secs:.1} | {rate:.0} | {:.2}× | {} | {} | {without} |",
            rate / b,
            pct(&mut ages, 0.5),
            pct(&mut ages, 0.99)
        );
    }
    Ok(())
}

//! Key flood (issue #3): three million distinct user ids through one
//! `streamscore run` whose user store is limited to 10,000 keys. Resident
//! memory stops growing once the store is full (measured from /proc), the
//! evictions are counted, and every event is still scored. The flood runs
//! on a broker (memory engine) and a redis-server (a 256 MB LRU cache) of
//! its own, so its millions of records and scores leave with the test
//! instead of weighing on the shared services.

use std::time::Duration;

use super::util::*;

const N: usize = 3_000_000;
const LIMIT: usize = 10_000;
/// Produced and measured in chunks of this many events.
const CHUNK: usize = 50_000;

/// Resident memory of a process, in kB (Linux).
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The flood, a chunk at a time (3 M events would be ~1 GB in the test
/// process): event `i` belongs to user `flood-user-{i}`, in event-time
/// order ending about now.
fn flood_chunks() -> impl Iterator<Item = Vec<(String, Vec<u8>)>> {
    let mut gen = live_txn_stream(51, N, 1_000, 500, 1.0).enumerate();
    std::iter::from_fn(move || {
        let chunk: Vec<_> = gen
            .by_ref()
            .take(CHUNK)
            .map(|(i, mut t)| {
                t.user_id = format!("flood-user-{i}");
                (
                    t.user_id.clone(),
                    serde_json::to_vec(&t).expect("serialise"),
                )
            })
            .collect();
        (!chunk.is_empty()).then_some(chunk)
    })
}

#[test]
fn a_flood_of_distinct_users_stays_within_the_key_limit() {
    let _heavy = heavy();
    let broker = OwnBroker::start_in_memory();
    use_own_broker(&broker.brokers());
    let env = TestEnv::new("key-flood", "");
    let redis = OwnRedis::start_cache(&env.dir.path().join("redis"));
    let redis_url = redis.url();
    let mut chunks = flood_chunks();
    let limit = LIMIT.to_string();
    // The release build: a debug build scores ~3,000 events/s, which
    // would make this one test take 17 minutes.
    let mut run = env.spawn_run_of(
        &release_bin(),
        "flood",
        env.http_port,
        &[
            ("STREAMSCORE__WINDOWS__MAX_USERS", limit.as_str()),
            ("STREAMSCORE__WINDOWS__MAX_MERCHANTS", "1000"),
            ("STREAMSCORE__REDIS__URL", redis_url.as_str()),
        ],
    );
    let pid = run.child.id();
    // The first 100,000: the store is full long before; the baseline.
    for c in chunks.by_ref().take(100_000 / CHUNK) {
        produce_all(&env.topic("transactions"), &c);
    }
    // A wait, not a speed check (debug build, and the suite runs two tests
    // at once); a stall shows the run's warnings.
    let first = std::time::Instant::now();
    while scrape(&env.metrics_url())
        .and_then(|t| metric(&t, "streamscore_events_scored_total"))
        .unwrap_or(0.0)
        < 100_000.0
    {
        if first.elapsed() > Duration::from_secs(600) {
            let log = run.log_text();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            panic!(
                "the first 100,000 not scored in 600 s; metrics:\n{}\nwarnings:\n{}",
                scrape(&env.metrics_url())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("streamscore_events_scored_total")
                        || l.starts_with("streamscore_consumer_lag"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                warnings[warnings.len().saturating_sub(20)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("first 100,000 scored after {:?}", first.elapsed());
    let base = rss_kb(pid);
    let mut peak = base;
    for (i, c) in chunks.enumerate() {
        produce_all(&env.topic("transactions"), &c);
        let rss = rss_kb(pid);
        peak = peak.max(rss);
        if i % 10 == 9 {
            let scored = scrape(&env.metrics_url())
                .and_then(|t| metric(&t, "streamscore_events_scored_total"))
                .unwrap_or(0.0);
            eprintln!(
                "produced {}, scored {scored}: RSS {rss} kB",
                100_000 + (i + 1) * CHUNK
            );
        }
    }
    let mut last_report = std::time::Instant::now();
    wait_for(Duration::from_secs(1800), "all scored", || {
        let rss = rss_kb(pid);
        peak = peak.max(rss);
        let t = scrape(&env.metrics_url())?;
        let scored = metric(&t, "streamscore_events_scored_total")?;
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("scored {scored}: RSS {rss} kB");
            last_report = std::time::Instant::now();
        }
        (scored >= N as f64).then_some(())
    });
    // Evictions are reported every eviction_interval: wait until every user
    // is either held or counted as evicted.
    let (evicted, keys) = wait_for(Duration::from_secs(30), "evictions reported", || {
        let text = scrape(&env.metrics_url())?;
        let evicted = metric(
            &text,
            r#"streamscore_window_evicted_keys_total{reason="limit",store="user"}"#,
        )?;
        let keys = metric(&text, r#"streamscore_window_keys{store="user"}"#)?;
        (evicted + keys >= N as f64).then_some((evicted, keys))
    });
    eprintln!(
        "key flood: {N} users, limit {LIMIT}: RSS {base} kB after 100,000, peak {peak} kB after {N}; {evicted} evicted, {keys} held"
    );
    // The limit is enforced every max_users / 10 updates, so the store may
    // hold up to that many keys more between two checks.
    assert!(keys <= (LIMIT + LIMIT / 10) as f64, "{keys} user keys held");
    assert!(
        evicted >= (N - LIMIT) as f64 * 0.99,
        "{evicted} evictions counted"
    );
    // Unbounded, 2,900,000 more users would take ~4.9 GB (about 1.7 kB
    // each).
    assert!(
        peak < base + 150_000,
        "RSS grew from {base} kB to {peak} kB with the store full"
    );
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "run died:\n{}",
        run.log_text()
    );
    let st = run.terminate(Duration::from_secs(60));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
}

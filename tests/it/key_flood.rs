//! Key flood (issue #3): a million distinct user ids through one `streamscore
//! run` whose user store is limited to 10,000 keys. Resident memory stops
//! growing once the store is full (measured from /proc), the evictions are
//! counted, and every event is still scored.

use std::time::Duration;

use super::util::*;

const N: usize = 1_000_000;
const LIMIT: usize = 10_000;

/// Resident memory of a process, in kB (Linux).
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_flood_of_distinct_users_stays_within_the_key_limit() {
    let env = TestEnv::new("key-flood", "");
    let mut txns = live_txns(51, N, 1_000, 500, 1.0);
    for (i, t) in txns.iter_mut().enumerate() {
        t.user_id = format!("flood-user-{i}");
    }
    let records = keyed_records(&txns);
    drop(txns);
    let limit = LIMIT.to_string();
    let mut run = env.spawn_run_with(
        "flood",
        env.http_port,
        &[
            ("STREAMSCORE__WINDOWS__MAX_USERS", limit.as_str()),
            ("STREAMSCORE__WINDOWS__MAX_MERCHANTS", "1000"),
        ],
    );
    let pid = run.child.id();
    // The first 100,000: the store is full long before; the baseline.
    for c in records[..100_000].chunks(50_000) {
        produce_all(&env.topic("transactions"), c);
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
    for c in records[100_000..].chunks(50_000) {
        produce_all(&env.topic("transactions"), c);
        peak = peak.max(rss_kb(pid));
    }
    wait_for(Duration::from_secs(900), "all scored", || {
        peak = peak.max(rss_kb(pid));
        let t = scrape(&env.metrics_url())?;
        (metric(&t, "streamscore_events_scored_total")? >= N as f64).then_some(())
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
    // Unbounded, 900,000 more users would take ~1.5 GB (about 1.7 kB each).
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

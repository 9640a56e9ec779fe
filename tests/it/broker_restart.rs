//! Broker outage: the broker (tansu on its durable sqlite engine) is killed
//! with SIGKILL and restarted a few seconds later on the same data, while
//! `streamscore run` is connected. The processor keeps running (no
//! operator), reconnects by itself, scores everything produced after the
//! restart without losing or repeating anything, and still stops cleanly.
//!
//! The kill comes once the processor has caught up and committed: tansu 0.6 after a
//! restart serves `transactions` only from the offset its log ended at
//! (the low watermark jumps there; seen here: records acknowledged to the
//! producer but not yet consumed became unreadable), which no client can
//! work around. Against such a broker "zero lost" can only be asked of what
//! it still serves.

use std::collections::HashSet;
use std::time::Duration;

use super::util::*;

const N: usize = 5_000;

fn generate(env: &TestEnv, seed: &str) {
    let out = env
        .command(&[
            "generate",
            "--count",
            &N.to_string(),
            "--users",
            "2000",
            "--seed",
            seed,
        ])
        .output()
        .expect("run generate");
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broker_killed_and_restarted_the_processor_reconnects_and_loses_nothing() {
    let mut broker = OwnBroker::start();
    use_own_broker(&broker.brokers());
    // Dynamic membership: after the restart tansu answered the static
    // member's heartbeats with "Unknown member" and, in two parallel CI
    // runs, never gave its partitions back (300 s).
    let env = TestEnv::dynamic("broker-restart");
    let mut run = env.spawn_run("r");
    generate(&env, "17");
    wait_scored(&env.metrics_url(), N as f64, "the first half scored");
    // ... and committed: the processor is at-least-once, so what it scored
    // but had not committed when the broker died is scored again (a CI
    // run that killed the broker within the 200 ms commit interval of the
    // last scores saw 499 scored twice). No duplicate is asked of what was
    // committed.
    wait_committed(&env, "transactions");

    broker.kill();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "run exited while the broker was down:\n{}",
        run.log_text()
    );
    let text = scrape(&env.metrics_url()).expect("metrics while the broker is down");
    assert!(text.contains("streamscore_events_scored_total"));
    broker.restart();

    generate(&env, "18");
    let url = env.metrics_url();
    let scored = || {
        scrape(&url)
            .and_then(|t| metric(&t, "streamscore_events_scored_total"))
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while scored() < 2.0 * N as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second half not scored within 300 s ({} scored); run log:\n{}\nbroker log:\n{}",
            scored(),
            run.log_text(),
            std::fs::read_to_string(broker.dir.path().join("tansu.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let scores = read_topic(
        &env.topic("fraud-scores"),
        Duration::from_secs(120),
        Duration::from_secs(2),
        |r| txn_counts(r).len() >= 2 * N,
        || run.log_text(),
    );
    let counts = txn_counts(&scores);
    let ids: HashSet<&String> = counts.keys().collect();
    assert_eq!(
        ids.len(),
        2 * N,
        "transactions lost across the broker restart"
    );
    let dups: usize = counts.values().map(|c| c - 1).sum();
    assert_eq!(dups, 0, "scored twice across the broker restart");
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "run exited:\n{}",
        run.log_text()
    );
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
}

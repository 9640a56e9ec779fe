//! Redis goes away mid-stream and comes back: scoring to `fraud-scores`
//! never pauses, and afterwards Redis holds every score (the Redis writer
//! follows the topic with its own committed offsets).

use std::time::{Duration, Instant};

use super::util::*;

const N: usize = 24_000;

/// `scored_at` of every score, sorted.
fn scored_at(scores: &[Record]) -> Vec<i64> {
    let mut v: Vec<i64> = scores
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("score JSON");
            v["scored_at"].as_i64().expect("scored_at")
        })
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn redis_outage_never_pauses_scoring_and_redis_catches_up() {
    let env = TestEnv::new("redis-outage", "");
    let mut redis = OwnRedis::start(&env.dir.path().join("redis"));
    let url = redis.url();
    // ~2,000 events/s for ~12 s.
    let txns = live_txns(31, N, 3_000, 100, 50.0);
    let ids: Vec<String> = txns.iter().map(|t| t.txn_id.clone()).collect();
    let feeder = spawn_feeder(env.topic("transactions"), keyed_records(&txns), 200);
    let mut run = env.spawn_run_with(
        "outage",
        env.http_port,
        &[("STREAMSCORE__REDIS__URL", url.as_str())],
    );
    wait_scored(&env.metrics_url(), 2_000.0, "some events to be scored");

    // Redis down for 4 s while events keep arriving.
    redis.stop();
    let down_from = streamscore::now_ms();
    let t0 = Instant::now();
    let before = metric(
        &scrape(&env.metrics_url()).expect("metrics"),
        "streamscore_events_scored_total",
    )
    .expect("scored");
    let mut saw_lag = false;
    while t0.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(500));
        let text = scrape(&env.metrics_url()).expect("metrics");
        saw_lag |= metric(&text, "streamscore_redis_lag_messages").unwrap_or(0.0) > 0.0;
    }
    let text = scrape(&env.metrics_url()).expect("metrics");
    let during = metric(&text, "streamscore_events_scored_total").expect("scored") - before;
    let errors = metric(&text, "streamscore_redis_errors_total").expect("redis errors");
    let down_to = streamscore::now_ms();
    redis.restart();

    // ~2,000/s arrive: scoring went on at (nearly) that pace without Redis.
    assert!(
        during >= 3_000.0,
        "only {during} events scored in the 4 s without Redis; log:\n{}",
        run.log_text()
    );
    assert!(errors > 0.0, "the outage must show as Redis errors");
    assert!(
        saw_lag,
        "streamscore_redis_lag_messages never rose during the outage"
    );

    feeder.join().expect("feeder");
    let scores = read_all_scores(&env, N, || run.log_text());
    // The topic output never paused: no gap over 1 s between consecutive
    // scores while Redis was down.
    let times = scored_at(&scores);
    let gap = times
        .windows(2)
        .filter(|w| w[0] >= down_from && w[1] <= down_to)
        .map(|w| w[1] - w[0])
        .max()
        .expect("scores during the outage");
    assert!(
        gap < 1_000,
        "scoring paused for {gap} ms while Redis was down"
    );

    // Redis catches up: every score is there, with its TTL.
    let ttls = wait_redis_scores(
        &url,
        &env.redis_prefix,
        &ids,
        Duration::from_secs(60),
        || {
            format!(
                "metrics:\n{}\nlog:\n{}",
                scrape(&env.metrics_url()).unwrap_or_default(),
                run.log_text()
            )
        },
    );
    assert!(
        ttls.iter().all(|t| (1..=3600).contains(t)),
        "TTL must be set"
    );
    wait_for(
        Duration::from_secs(20),
        "the Redis lag to return to 0",
        || {
            let t = scrape(&env.metrics_url())?;
            (metric(&t, "streamscore_redis_lag_messages")? == 0.0).then_some(())
        },
    );
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
}

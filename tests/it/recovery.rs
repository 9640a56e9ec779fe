//! Crash recovery: `run` is killed (SIGKILL) mid-stream and restarted; no
//! transaction is lost, duplicates stay within what can be in flight, and
//! the windows are rebuilt from the log: every score, before or after the
//! crash, carries the features an uninterrupted run computes.

use std::collections::HashMap;
use std::time::Duration;

use streamscore::config::WindowConfig;
use streamscore::features::{FeatureEngine, WindowSpec, FEATURE_NAMES};
use streamscore::generate::{GenOptions, TxnGenerator};

use super::util::*;

const N: usize = 20_000;
/// Features 0..15 are the event's and its user's; merchant features (15..)
/// depend on how partitions interleave (see the scale-out issue).
const USER_FEATURES: usize = 15;

#[test]
fn crash_mid_stream_loses_nothing_and_rebuilds_windows_from_the_log() {
    let env = TestEnv::new("crash", "");
    let now = streamscore::now_ms();
    let txns: Vec<_> = TxnGenerator::new(GenOptions {
        seed: 21,
        users: 2_000,
        merchants: 100,
        fraud_rate: 0.01,
        mean_gap_ms: 100.0,
        start_ms: now - N as i64 * 100,
    })
    .take(N)
    .collect();
    // The uninterrupted reference, with the same window code and config.
    let reference = FeatureEngine::new(WindowSpec::from(&WindowConfig::default()));
    let want: HashMap<String, Vec<f32>> = txns
        .iter()
        .map(|t| (t.txn_id.clone(), reference.process(t, true).0.to_vec()))
        .collect();
    let feeder = spawn_feeder(env.topic("transactions"), keyed_records(&txns), 400);

    let mut first = env.spawn_run("first");
    wait_for(
        Duration::from_secs(120),
        "the first run to score some events",
        || {
            let t = scrape(&env.metrics_url())?;
            (metric(&t, "streamscore_events_scored_total")? >= 4_000.0).then_some(())
        },
    );
    first.child.kill().expect("SIGKILL");
    let _ = first.child.wait();

    let second = env.spawn_run("second");
    feeder.join().expect("feeder");
    let scores = read_topic(
        &env.topic("fraud-scores"),
        Duration::from_secs(180),
        Duration::from_secs(3),
        |r| key_counts(r).len() >= N,
        || format!("second run log:\n{}", second.log_text()),
    );
    let counts = key_counts(&scores);
    let missing = want.keys().filter(|id| !counts.contains_key(*id)).count();
    assert_eq!(missing, 0, "txn ids lost in the crash");
    // At most what was in flight: max_in_flight_batches x batch_max_events,
    // plus one commit interval (200 ms here) at up to 20,000 events/s.
    let dups: usize = counts.values().map(|c| c - 1).sum();
    assert!(dups <= 8 * 512 + 4_000, "{dups} duplicates");

    let mut mismatches = Vec::new();
    for r in &scores {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let id = v["txn_id"].as_str().unwrap();
        let expect = &want[id];
        for (i, name) in FEATURE_NAMES.iter().enumerate().take(USER_FEATURES) {
            let got = v["features"][name].as_f64().unwrap() as f32;
            if got != expect[i] {
                mismatches.push(format!(
                    "{id} {name}: got {got}, uninterrupted {}",
                    expect[i]
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} feature values differ from the uninterrupted run, e.g. {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );

    let log = second.log_text();
    assert!(
        log.contains("warm-up: windows rebuilt from the log"),
        "{log}"
    );
    let text = scrape(&env.metrics_url()).expect("metrics");
    assert!(metric(&text, "streamscore_warmup_replayed_events_total").unwrap() > 0.0);
    assert!(metric(&text, "streamscore_warmup_duration_seconds_count").unwrap() >= 1.0);
}

//! Crash recovery: `run` is killed (SIGKILL) mid-stream and restarted; no
//! transaction is lost, duplicates stay within what can be in flight, and
//! the windows are rebuilt from the log: every score, before or after the
//! crash, carries the features an uninterrupted run computes.

use super::util::*;

const N: usize = 20_000;

#[test]
fn crash_mid_stream_loses_nothing_and_rebuilds_windows_from_the_log() {
    let env = TestEnv::new("crash", "");
    let txns = live_txns(21, N, 2_000, 100, 100.0);
    let want = reference_features(&txns);
    let feeder = spawn_feeder(env.topic("transactions"), keyed_records(&txns), 400);

    let mut first = env.spawn_run("first");
    wait_scored(
        &env.metrics_url(),
        4_000.0,
        "the first run to score some events",
    );
    first.child.kill().expect("SIGKILL");
    let _ = first.child.wait();

    let second = env.spawn_run("second");
    feeder.join().expect("feeder");
    let scores = read_all_scores(&env, N, || {
        format!(
            "first run log:\n{}\nsecond run log:\n{}",
            first.log_text(),
            second.log_text()
        )
    });
    let counts = txn_counts(&scores);
    let missing = want.keys().filter(|id| !counts.contains_key(*id)).count();
    assert_eq!(missing, 0, "txn ids lost in the crash");
    // At most what was in flight: max_in_flight_batches x batch_max_events,
    // plus one commit interval (200 ms here) at up to 20,000 events/s.
    let dups: usize = counts.values().map(|c| c - 1).sum();
    assert!(dups <= 8 * 512 + 4_000, "{dups} duplicates");

    let mismatches = user_feature_mismatches(&scores, &want);
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

//! Stop `run` mid-stream (SIGTERM) while events keep arriving, start it
//! again: no transaction is missing, none is scored twice.

use std::collections::HashSet;
use std::time::Duration;

use super::util::*;

const N: usize = 30_000;

#[test]
fn graceful_restart_mid_stream_loses_nothing_and_duplicates_nothing() {
    let env = TestEnv::new("restart", "");
    let txns = live_txns(5, N, 5_000, 200, 50.0);
    // The stream keeps flowing (~5,000 events/s) across the restart.
    let feeder = spawn_feeder(env.topic("transactions"), keyed_records(&txns), 500);

    let mut first = env.spawn_run("first");
    wait_scored(
        &env.metrics_url(),
        2_000.0,
        "the first run to score some events",
    );
    let st = first.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", first.log_text());
    let before = read_topic(
        &env.topic("fraud-scores"),
        Duration::from_secs(30),
        Duration::from_millis(500),
        |r| !r.is_empty(),
        || first.log_text(),
    )
    .len();
    assert!(
        before < N,
        "the first run must stop mid-stream for this test to mean anything"
    );

    let mut second = env.spawn_run("second");
    feeder.join().expect("feeder");
    let scores = read_all_scores(&env, N, || {
        format!(
            "first run log:\n{}\nsecond run log:\n{}",
            first.log_text(),
            second.log_text()
        )
    });
    let counts = txn_counts(&scores);
    let want: HashSet<&String> = txns.iter().map(|t| &t.txn_id).collect();
    let missing = want.iter().filter(|id| !counts.contains_key(**id)).count();
    assert_eq!(missing, 0, "txn ids missing after restart");
    let dups = counts.values().filter(|c| **c > 1).count();
    assert_eq!(
        dups, 0,
        "a graceful stop commits every acknowledged offset: nothing may be scored twice"
    );
    let st = second.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", second.log_text());
}

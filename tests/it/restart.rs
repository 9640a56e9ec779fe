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

/// A partition with a long history to rebuild warms up off the consume
/// loop: while its windows are rebuilt (paused, `partitions_warming` > 0)
/// the instance's other partitions are scored; nothing is lost or scored
/// twice, and none of the warming partition's events is scored before its
/// windows are complete.
#[test]
fn a_partition_warming_up_does_not_stall_the_others() {
    const HISTORY: usize = 200_000;
    const M: usize = 20_000;
    let _heavy = heavy();
    let env = TestEnv::dynamic("warmup-off-loop");
    let topic = env.topic("transactions");
    // Partition 0's history, already processed by the group (its offsets
    // committed at the end), within the windows' horizon: the first
    // instance must fold all of it before it scores partition 0. It ends
    // 100 s ago, before the live stream's first event time.
    use streamscore::generate::{GenOptions, TxnGenerator};
    let history: Vec<_> = TxnGenerator::new(GenOptions {
        seed: 41,
        users: 50_000,
        merchants: 500,
        fraud_rate: 0.01,
        mean_gap_ms: 1.0,
        start_ms: streamscore::now_ms() - 100_000 - HISTORY as i64,
    })
    .take(HISTORY)
    .collect();
    produce_to_partition(&topic, 0, &keyed_records(&history));
    let end = HISTORY as i64; // the partition was empty
    commit_offset(&env, &topic, 0, end);
    // 500 events/s for 40 s on every partition, before and after the start.
    let txns = live_txns(42, M, 2_000, 100, 2.0);
    let feeder = spawn_feeder_every(
        topic.clone(),
        keyed_records(&txns),
        50,
        Duration::from_millis(100),
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut a = env.spawn_run("a");
    // The window in which partition 0 was seen warming up, from a's log:
    // first and last sight, so both ends are inside it.
    let logged = |what: &str| {
        a.log_text()
            .lines()
            .map(strip_ansi)
            .any(|l| l.contains(what) && l.contains(" partition=0 "))
    };
    let first_seen = wait_for(
        Duration::from_secs(60),
        "partition 0's warm-up to start",
        || logged("warm-up started").then(streamscore::now_ms),
    );
    let mut last_seen = first_seen;
    let mut gauge_seen: f64 = 0.0;
    let url = env.metrics_url();
    wait_for(
        Duration::from_secs(120),
        "partition 0's warm-up to end",
        || {
            let gauge = scrape(&url).and_then(|t| metric(&t, "streamscore_partitions_warming"));
            if !logged("warm-up: windows rebuilt") {
                gauge_seen = gauge_seen.max(gauge.unwrap_or(0.0));
                last_seen = streamscore::now_ms();
                return None;
            }
            Some(())
        },
    );
    assert!(
        gauge_seen >= 1.0,
        "streamscore_partitions_warming never showed the warm-up"
    );
    let warming = metric(
        &scrape(&url).expect("metrics"),
        "streamscore_partitions_warming",
    );
    assert_eq!(
        warming,
        Some(0.0),
        "partitions still warming after the last one ended"
    );
    feeder.join().expect("feeder");
    let scores = read_all_scores(&env, M, || a.log_text());
    let counts = txn_counts(&scores);
    let live: HashSet<&str> = txns.iter().map(|t| t.txn_id.as_str()).collect();
    let history_scored = counts
        .keys()
        .filter(|id| !live.contains(id.as_str()))
        .count();
    assert_eq!(
        history_scored, 0,
        "events below the committed offset {end} scored"
    );
    assert_eq!(counts.len(), M, "txn ids lost");
    let dups: usize = counts.values().map(|c| c - 1).sum();
    assert_eq!(dups, 0, "events scored twice");

    let log = a.log_text();
    let warmed = log
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains("warm-up: windows rebuilt") && l.contains(" partition=0 "))
        .unwrap_or_else(|| panic!("no warm-up of partition 0 logged:\n{log}"));
    let (zero_in_window, others_in_window) =
        scored_in_window(&scores, first_seen..=last_seen, |p| p == 0);
    eprintln!(
        "{warmed}\nwarming seen for {} ms; {others_in_window} events of partitions 1-3 scored meanwhile",
        last_seen - first_seen
    );
    assert!(
        zero_in_window.is_empty(),
        "partition 0 scored while it warmed up: {:?}",
        &zero_in_window[..zero_in_window.len().min(5)]
    );
    assert!(
        others_in_window > 0,
        "nothing was scored while partition 0 warmed up ({} ms): its warm-up stalled the others",
        last_seen - first_seen
    );
    let st = a.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", a.log_text());
}

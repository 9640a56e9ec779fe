//! Rebalance: a second instance joins mid-stream, then the first leaves;
//! no transaction is lost, none is scored twice (a revocation waits for the
//! outputs of what was processed and commits them), and every score carries
//! the user features a single uninterrupted run computes (windows rebuilt
//! from the log on assignment).

use std::time::Duration;

use super::util::*;

const N: usize = 20_000;

#[test]
fn second_instance_joins_first_leaves_nothing_lost_user_features_exact() {
    join_then_leave("rebalance", false);
}

/// The same with events in bursts (1,000 every second) and micro-batches
/// collected for up to 900 ms: the second instance's join nearly always
/// finds the first holding part of a burst in a batch and waiting for more
/// that does not come before the deadline. A batch emitted then still
/// held the revoked partitions' messages: scored after their offsets were
/// committed, and again by their next owner (seen in CI with the default
/// 2 ms: 3 duplicates in `scale_out`, likely the 72 in the test above).
#[test]
fn a_revocation_while_a_batch_is_collected_scores_nothing_twice() {
    join_then_leave("rebalance-bursts", true);
}

/// Instance a scores, b joins, a leaves; events fed while both run, in
/// bursts into long batches with `bursts`.
fn join_then_leave(name: &str, bursts: bool) {
    let _heavy = heavy();
    let env = TestEnv::dynamic(name);
    let txns = live_txns(33, N, 2_000, 100, 100.0);
    let want = reference_features(&txns);
    let (chunk, pause, vars): (usize, u64, &[(&str, &str)]) = if bursts {
        (
            1_000,
            1_000,
            &[("STREAMSCORE__PROCESSING__BATCH_MAX_WAIT", "900ms")],
        )
    } else {
        (200, 100, &[])
    };
    let feeder = spawn_feeder_every(
        env.topic("transactions"),
        keyed_records(&txns),
        chunk,
        Duration::from_millis(pause),
    );

    let mut a = env.spawn_run_with("a", env.http_port, vars);
    wait_scored(&env.metrics_url(), 2_000.0, "instance a to score");
    let port_b = free_port();
    let mut b = env.spawn_run_with("b", port_b, vars);
    let b_url = format!("http://127.0.0.1:{port_b}/metrics");
    wait_scored(&b_url, 500.0, "instance b to get partitions and score");
    let st = a.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", a.log_text());
    feeder.join().expect("feeder");

    let scores = read_all_scores(&env, N, || {
        format!("a:\n{}\nb:\n{}", a.log_text(), b.log_text())
    });
    let counts = txn_counts(&scores);
    let missing = want.keys().filter(|id| !counts.contains_key(*id)).count();
    assert_eq!(missing, 0, "txn ids lost across the rebalance");
    // Revocations wait for the outputs of what was processed and commit
    // them, and a graceful stop commits everything: nothing is scored twice.
    let dups: usize = counts.values().map(|c| c - 1).sum();
    eprintln!("duplicates across join + leave: {dups}");
    if dups > 0 {
        let report = duplicate_report(&scores, &counts, &[&a, &b], name);
        panic!("{dups} events scored twice across a graceful rebalance\n{report}");
    }
    assert!(
        a.log_text()
            .contains("revoke: outputs of processed events acknowledged"),
        "instance a never drained a revocation:\n{}",
        a.log_text()
    );
    let mismatches = user_feature_mismatches(&scores, &want);
    assert!(
        mismatches.is_empty(),
        "{} feature values differ from the single run, e.g. {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    let st = b.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", b.log_text());
}

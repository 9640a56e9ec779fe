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
    // The partitions a kept through the join (an eager rebalance revokes
    // them all) were taken back with their windows, not rebuilt from the
    // log: at least one of the two (one can miss, when the revocation fell
    // inside a batch being collected or tansu resumed it past the commit;
    // the feature check above covers both paths). With bursts into 900 ms
    // batches a revocation nearly always falls inside one, so not there.
    if !bursts {
        assert!(
            a.log_text()
                .contains("partition back: its windows kept, no warm-up"),
            "instance a rebuilt every partition it kept:\n{}",
            a.log_text()
        );
    }
}

/// At a leave, the partitions the remaining instance gains are held
/// (paused, their first messages kept) until their previous owner's last
/// commit is due, and the partitions it kept are scored meanwhile. Before,
/// the wait slept inside the consume loop and stalled every partition of
/// the instance (docs/BENCHMARKS.md, "Latency through a rebalance"). The
/// commit interval is made 10 s (wait = 3 s heartbeat + 10 s) so the hold
/// is unmistakable; nothing may be lost or scored twice through it.
#[test]
fn a_partition_held_for_its_previous_owner_does_not_stall_the_others() {
    const M: usize = 30_000;
    let _heavy = heavy();
    let env = TestEnv::dynamic("rebalance-held");
    let txns = live_txns(34, M, 2_000, 100, 100.0);
    let vars: &[(&str, &str)] = &[("STREAMSCORE__PROCESSING__COMMIT_INTERVAL", "10s")];
    // 500 events/s for a minute: through b's join, its hold, b's leave
    // and a's hold.
    let feeder = spawn_feeder_every(
        env.topic("transactions"),
        keyed_records(&txns),
        50,
        Duration::from_millis(100),
    );
    let mut a = env.spawn_run_with("a", env.http_port, vars);
    let a_url = env.metrics_url();
    wait_scored(&a_url, 1_000.0, "instance a to score");
    let port_b = free_port();
    let mut b = env.spawn_run_with("b", port_b, vars);
    let b_url = format!("http://127.0.0.1:{port_b}/metrics");
    wait_scored(&b_url, 200.0, "instance b to get partitions and score");
    let st = b.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", b.log_text());

    // a gains b's partitions and holds them: the window in which a was
    // seen holding (first and last sight, so both ends are inside it).
    let settling = || metric(&scrape(&a_url)?, "streamscore_partitions_settling");
    let first_seen = wait_for(
        Duration::from_secs(30),
        "instance a to hold the partitions it gained",
        || (settling()? > 0.0).then(streamscore::now_ms),
    );
    let mut last_seen = first_seen;
    wait_for(Duration::from_secs(60), "instance a to resume them", || {
        let n = settling()?;
        if n > 0.0 {
            last_seen = streamscore::now_ms();
            return None;
        }
        Some(())
    });
    feeder.join().expect("feeder");
    let scores = read_all_scores(&env, M, || {
        format!("a:\n{}\nb:\n{}", a.log_text(), b.log_text())
    });
    let counts = txn_counts(&scores);
    assert_eq!(counts.len(), M, "txn ids lost across the hold");
    let dups: usize = counts.values().map(|c| c - 1).sum();
    if dups > 0 {
        let report = duplicate_report(&scores, &counts, &[&a, &b], "rebalance-held");
        panic!("{dups} events scored twice across a held partition\n{report}");
    }

    let log = a.log_text();
    let held: std::collections::HashSet<i64> = log
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("partition held until"))
        .filter_map(|l| {
            let rest = &l[l.find(" partition=")? + " partition=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(!held.is_empty(), "a never logged a held partition:\n{log}");
    let (held_in_window, kept_in_window) =
        scored_in_window(&scores, first_seen..=last_seen, |p| held.contains(&p));
    eprintln!(
        "held {held:?} for at least {} ms; {kept_in_window} events of the kept partitions scored meanwhile",
        last_seen - first_seen
    );
    assert!(
        held_in_window.is_empty(),
        "held partitions scored during their hold: {:?}",
        &held_in_window[..held_in_window.len().min(5)]
    );
    assert!(
        kept_in_window > 0,
        "nothing was scored while a held the partitions it gained ({} ms): the hold stalled the kept partitions too",
        last_seen - first_seen
    );
    let st = a.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", a.log_text());
}

/// A revocation while a partition warms up: the first instance is
/// rebuilding partition 0's windows (a long history, off the consume loop)
/// when a second instance joins. The warm-up is cancelled; what it had
/// folded is dropped once its task has ended, before any new warm-up of
/// the partition (here or on the other instance) starts, so nothing is
/// folded twice: every later event of the history's users gets exactly
/// the user features of one uninterrupted run over history and events.
#[test]
fn a_revocation_during_a_warm_up_cancels_it_and_folds_nothing_twice() {
    const HISTORY: usize = 400_000;
    const PROBES: usize = 2_000;
    const FIRST: usize = 100;
    let _heavy = heavy();
    let env = TestEnv::dynamic("warmup-cancel");
    let topic = env.topic("transactions");
    use streamscore::generate::{GenOptions, TxnGenerator};
    let gen = |seed, n: usize, start_ms| {
        TxnGenerator::new(GenOptions {
            seed,
            users: 20_000,
            merchants: 500,
            fraud_rate: 0.01,
            mean_gap_ms: 1.0,
            start_ms,
        })
        .take(n)
        .map(|mut t| {
            t.user_id = format!("hist-{}", t.user_id);
            t
        })
        .collect::<Vec<_>>()
    };
    // Partition 0's history (already processed: offsets committed at its
    // end), ending 100 s ago; then later events of the same users, all on
    // partition 0 (as their keys would put them with one partition).
    let now = streamscore::now_ms();
    let history = gen(51, HISTORY, now - 100_000 - HISTORY as i64);
    produce_to_partition(&topic, 0, &keyed_records(&history));
    commit_offset(&env, &topic, 0, HISTORY as i64);
    let probes = gen(52, PROBES, now - 50_000);
    produce_to_partition(&topic, 0, &keyed_records(&probes[..FIRST]));

    let mut a = env.spawn_run("a");
    let logged = |p: &RunningProcess, what: &str| {
        p.log_text()
            .lines()
            .map(strip_ansi)
            .any(|l| l.contains(what) && l.contains(" partition=0"))
    };
    wait_for(
        Duration::from_secs(60),
        "a to start warming partition 0 up",
        || logged(&a, "warm-up started").then_some(()),
    );
    let port_b = free_port();
    let mut b = env.spawn_run_with("b", port_b, &[]);
    wait_for(
        Duration::from_secs(60),
        "a's warm-up of partition 0 to be cancelled by the rebalance",
        || {
            if logged(&a, "warm-up: windows rebuilt") && !logged(&a, "revoked while warming up") {
                panic!(
                    "a finished warming partition 0 up before the rebalance: the test did not exercise a cancel\n{}",
                    a.log_text()
                );
            }
            logged(&a, "revoked while warming up").then_some(())
        },
    );
    wait_for(
        Duration::from_secs(120),
        "partition 0 warmed up by its new owner",
        || {
            (logged(&a, "warm-up: windows rebuilt") || logged(&b, "warm-up: windows rebuilt"))
                .then_some(())
        },
    );
    for c in probes[FIRST..].chunks(100) {
        produce_to_partition(&topic, 0, &keyed_records(c));
        std::thread::sleep(Duration::from_millis(50));
    }
    let scores = read_all_scores(&env, PROBES, || {
        format!("a:\n{}\nb:\n{}", a.log_text(), b.log_text())
    });
    for (name, p) in [("a", &a), ("b", &b)] {
        for l in p.log_text().lines().map(strip_ansi) {
            if l.contains(" partition=0") || l.contains("rebalance:") {
                eprintln!("{name}: {l}");
            }
        }
    }
    let counts = txn_counts(&scores);
    assert_eq!(counts.len(), PROBES, "events lost or history scored");
    let dups: usize = counts.values().map(|c| c - 1).sum();
    assert_eq!(dups, 0, "events scored twice");
    let all: Vec<_> = history.iter().chain(&probes).cloned().collect();
    let want = reference_features(&all);
    let bad = user_feature_mismatches(&scores, &want);
    assert!(
        bad.is_empty(),
        "{} user features differ from one uninterrupted run (first: {:?})\na:\n{}\nb:\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        a.log_text(),
        b.log_text()
    );
    for (name, p) in [("a", &mut a), ("b", &mut b)] {
        let st = p.terminate(Duration::from_secs(30));
        assert!(st.success(), "{name} exit {st:?}; log:\n{}", p.log_text());
    }
}

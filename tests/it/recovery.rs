//! Crash recovery: `run` is killed (SIGKILL) at several random points of a
//! 200,000-event stream and restarted each time; no transaction is lost,
//! duplicates stay within what can be in flight at each kill, and the
//! windows are rebuilt from the log: every score, before or after a crash,
//! carries the features an uninterrupted run computes.

use std::time::Duration;

use streamscore::generate::Rng;

use super::util::*;

const N: usize = 200_000;
const KILLS: usize = 3;

#[test]
fn crashes_mid_stream_lose_nothing_and_rebuild_windows_from_the_log() {
    let env = TestEnv::new("crash", "");
    // 20,000 users over ~55 h of event time: warm-ups replay real history.
    let txns = live_txns(21, N, 20_000, 300, 1_000.0);
    let want = reference_features(&txns);
    // ~20,000 events/s offered, so the processor is busy at every kill.
    let feeder = spawn_feeder(env.topic("transactions"), keyed_records(&txns), 2_000);

    // Random kill points (the seed is printed so a failure can be replayed).
    let seed = std::process::id() as u64 ^ streamscore::now_ms() as u64;
    eprintln!("kill points seed {seed}");
    let mut rng = Rng::new(seed);
    let mut logs = Vec::new();
    for k in 0..KILLS {
        let mut run = env.spawn_run(&format!("run-{k}"));
        // Each run scores something (its own counter), then dies 0.5-3 s later.
        wait_scored(&env.metrics_url(), 1.0, "a run to score events");
        std::thread::sleep(Duration::from_millis(500 + rng.below(2_500) as u64));
        run.child.kill().expect("SIGKILL");
        let _ = run.child.wait();
        logs.push(run.log.clone());
    }
    let last = env.spawn_run("last");
    feeder.join().expect("feeder");
    let scores = read_all_scores(&env, N, || {
        let mut s = format!("last run log:\n{}", last.log_text());
        for l in &logs {
            s += &format!(
                "\n{}:\n{}",
                l.display(),
                std::fs::read_to_string(l).unwrap_or_default()
            );
        }
        s
    });
    let counts = txn_counts(&scores);
    let missing = want.keys().filter(|id| !counts.contains_key(*id)).count();
    assert_eq!(missing, 0, "txn ids lost in {KILLS} crashes");
    // Per crash at most what was in flight: max_in_flight_batches x
    // batch_max_events, plus one commit interval (200 ms here) at up to
    // 40,000 events/s (the catch-up rate measured on this machine).
    let dups: usize = counts.values().map(|c| c - 1).sum();
    let bound = KILLS * (8 * 512 + 8_000);
    assert!(
        dups <= bound,
        "{dups} duplicates over {KILLS} crashes (bound {bound})"
    );
    eprintln!("{dups} duplicates over {KILLS} crashes (bound {bound})");

    let mismatches = user_feature_mismatches(&scores, &want);
    if !mismatches.is_empty() {
        // Where the differing scores came from, and what each run rebuilt.
        let bad: std::collections::HashSet<&str> = mismatches
            .iter()
            .filter_map(|m| m.split_whitespace().next())
            .collect();
        let mut sources = Vec::new();
        for r in &scores {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("score");
            if bad.contains(v["txn_id"].as_str().unwrap_or("")) && sources.len() < 10 {
                sources.push(format!(
                    "{} scored_at {} {}",
                    v["txn_id"], v["scored_at"], v["source"]
                ));
            }
        }
        let mut warm = String::new();
        for l in logs.iter().chain(std::iter::once(&last.log)) {
            let text = std::fs::read_to_string(l).unwrap_or_default();
            warm += &format!("\n{}:\n", l.display());
            for line in text
                .lines()
                .filter(|x| x.contains("warm-up") || x.contains("rebalance") || x.contains("WARN"))
            {
                warm += line;
                warm.push('\n');
            }
        }
        panic!(
            "{} feature values ({} txns) differ from the uninterrupted run, e.g. {:?}\nsources: {sources:#?}\n{warm}",
            mismatches.len(),
            bad.len(),
            &mismatches[..mismatches.len().min(5)]
        );
    }

    let log = last.log_text();
    assert!(
        log.contains("warm-up: windows rebuilt from the log"),
        "{log}"
    );
    let text = scrape(&env.metrics_url()).expect("metrics");
    assert!(metric(&text, "streamscore_warmup_replayed_events_total").unwrap() > 0.0);
    assert!(metric(&text, "streamscore_warmup_duration_seconds_count").unwrap() >= 1.0);
}

//! Scale-out: three instances in one group over 6-partition topics, one
//! stopped and another started mid-stream. Merchant windows are kept by the
//! merchant stage (repartition topic) and reach every instance through the
//! replicated `merchant-features` table:
//! - no transaction lost, none scored twice (graceful rebalances);
//! - user features equal a single uninterrupted run;
//! - every score's merchant features equal the merchant windows of exactly
//!   the repartition records its row says it covers (so every instance
//!   scores with what the merchant's owner computed, across the moves);
//! - once the table has caught up (bound: [`CATCH_UP`] after the last
//!   score), every instance's table equals the single-run reference;
//! - after every instance stopped, a new one loads the table from the
//!   compacted topic before it scores.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use streamscore::config::WindowConfig;
use streamscore::features::{FeatureEngine, MerchantState, WindowSpec, N_FEATURES};
use streamscore::http::api::MERCHANT_FIELDS;
use streamscore::merchants::Forwarded;

use super::util::*;

const N: usize = 24_000;
const MERCHANTS: usize = 40;
/// How long after the last score every instance's table must equal the
/// reference: publish_interval (200 ms here) plus the repartition round
/// trip, with a wide margin for three instances and a broker sharing two
/// cores.
const CATCH_UP: Duration = Duration::from_secs(20);

/// The merchant features of every merchant over all `txns`, at `at`, as a
/// single process computes them.
fn single_run_merchants(
    txns: &[streamscore::events::Transaction],
    at: i64,
) -> HashMap<String, [f32; N_FEATURES]> {
    let engine = FeatureEngine::new(WindowSpec::from(&WindowConfig::default()));
    for t in txns {
        engine.update(t);
    }
    txns.iter()
        .map(|t| {
            let v = engine
                .merchant_view(&t.merchant_id, Some(at))
                .expect("merchant");
            (t.merchant_id.clone(), v.features.0)
        })
        .collect()
}

/// Differences between an instance's merchant views and the reference.
/// Counts must be equal; means may differ in the last bits only (f32 sums
/// in another order), so they are compared to 1e-5 relative.
fn table_differences(port: u16, want: &HashMap<String, [f32; N_FEATURES]>, at: i64) -> Vec<String> {
    let mut out = Vec::new();
    for (m, f) in want {
        let Some((200, body)) = http(
            port,
            "GET",
            &format!("/v1/features/merchants/{m}?at={at}"),
            None,
        ) else {
            out.push(format!("{m}: no row"));
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("view JSON");
        for (name, i) in MERCHANT_FIELDS {
            let got = v["features"][name].as_f64().expect("value") as f32;
            let ok = if name.contains("mean") {
                (got - f[i]).abs() <= 1e-5 * f[i].abs().max(1.0)
            } else {
                got == f[i]
            };
            if !ok {
                out.push(format!("{m} {name}: got {got}, reference {}", f[i]));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn three_instances_merchant_features_from_the_replicated_table() {
    let _heavy = heavy();
    let env = TestEnv::dynamic_with_partitions(
        "scaleout",
        "[merchants]\npublish_interval = \"200ms\"\n",
        6,
    );
    // ~40 min of event time ending now: every window is inside 24 h.
    let txns = live_txns(71, N, 3_000, MERCHANTS, 100.0);
    let want_users = reference_features(&txns);
    let feeder = spawn_feeder(env.topic("transactions"), keyed_records(&txns), 150);

    let ports = free_ports(4);
    let url = |p: u16| format!("http://127.0.0.1:{p}/metrics");
    let mut a = env.spawn_run_on("a", ports[0]);
    let mut b = env.spawn_run_on("b", ports[1]);
    let mut c = env.spawn_run_on("c", ports[2]);
    for p in &ports[..3] {
        wait_scored(&url(*p), 300.0, "each of three instances to score");
    }
    // One instance leaves mid-stream, another joins.
    let st = a.terminate(Duration::from_secs(30));
    assert!(st.success(), "a exit {st:?}; log:\n{}", a.log_text());
    let mut d = env.spawn_run_on("d", ports[3]);
    wait_scored(
        &url(ports[3]),
        300.0,
        "instance d to get partitions and score",
    );
    feeder.join().expect("feeder");

    let logs = || {
        [&a, &b, &c, &d]
            .iter()
            .map(|r| format!("{}:\n{}", r.log.display(), r.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let scores = read_all_scores(&env, N, logs);
    let last_score_read = Instant::now();
    let counts = txn_counts(&scores);
    let missing = want_users
        .keys()
        .filter(|id| !counts.contains_key(*id))
        .count();
    assert_eq!(missing, 0, "txn ids lost across join + leave");
    let dups: usize = counts.values().map(|c| c - 1).sum();
    let resumed_before: usize = [&a, &b, &c, &d]
        .iter()
        .map(|r| {
            r.log_text()
                .matches("resumed before the committed offset")
                .count()
        })
        .sum();
    eprintln!("partitions resumed by the broker before their committed offset (skipped, not rescored): {resumed_before}");
    if dups > 0 {
        let report = duplicate_report(&scores, &counts, &[&a, &b, &c, &d], "scale_out");
        panic!("{dups} events scored twice across graceful rebalances\n{report}");
    }
    let mismatches = user_feature_mismatches(&scores, &want_users);
    assert!(
        mismatches.is_empty(),
        "{} user feature values differ from the single run, e.g. {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );

    // Every score's merchant features are those of the row it names:
    // the merchant's repartition records up to that offset (records the
    // stream forwarded twice dropped, as the stage does).
    let repartition = read_topic(
        &env.topic("merchant-repartition"),
        Duration::from_secs(60),
        Duration::from_secs(2),
        |r| r.len() >= N,
        logs,
    );
    let mut by_partition: HashMap<i32, Vec<(i64, Forwarded)>> = HashMap::new();
    for r in &repartition {
        let f: Forwarded = serde_json::from_slice(&r.payload).expect("forwarded record");
        assert_eq!(
            r.key.as_deref(),
            Some(f.merchant_id.as_str()),
            "keyed by merchant"
        );
        by_partition
            .entry(r.partition)
            .or_default()
            .push((r.offset, f));
    }
    // (merchant, partition, offset) → scores that used that row.
    let mut wanted: HashMap<(String, i32, i64), Vec<serde_json::Value>> = HashMap::new();
    let mut no_row = Vec::new();
    let mut ages = Vec::new();
    for r in &scores {
        let v = json(r);
        let mt = &v["merchant_table"];
        if mt.is_null() {
            for (name, _) in MERCHANT_FIELDS {
                let got = v["features"][format!("merchant_{name}")]
                    .as_f64()
                    .expect("f");
                assert_eq!(got, 0.0, "no row, yet {name} = {got}: {v}");
            }
            no_row.push(v);
            continue;
        }
        ages.push(mt["age_ms"].as_i64().expect("age"));
        let key = (
            v["merchant_id"].as_str().expect("merchant").to_string(),
            mt["partition"].as_i64().expect("partition") as i32,
            mt["offset"].as_i64().expect("offset"),
        );
        wanted.entry(key).or_default().push(v);
    }
    let spec = WindowSpec::from(&WindowConfig::default());
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (p, recs) in by_partition.iter_mut() {
        recs.sort_by_key(|(o, _)| *o);
        let mut seen: HashMap<i32, i64> = HashMap::new();
        let mut states: HashMap<String, MerchantState> = HashMap::new();
        for (o, f) in recs.iter() {
            let s = seen.entry(f.source_partition).or_insert(i64::MIN);
            if f.source_offset <= *s {
                continue;
            }
            *s = f.source_offset;
            let st = states
                .entry(f.merchant_id.clone())
                .or_insert_with(|| MerchantState::new(&spec));
            st.fold(&spec, f.event_time, f.amount, &f.user_id);
            let Some(vs) = wanted.remove(&(f.merchant_id.clone(), *p, *o)) else {
                continue;
            };
            for v in vs {
                let mut out = [0f32; N_FEATURES];
                st.features_at(&spec, v["event_time"].as_i64().expect("t"), &mut out);
                for (name, i) in MERCHANT_FIELDS {
                    let got = v["features"][format!("merchant_{name}")]
                        .as_f64()
                        .expect("f") as f32;
                    if got != out[i] {
                        wrong.push(format!(
                            "{} {name}: got {got}, row's records give {}",
                            v["txn_id"], out[i]
                        ));
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(
        wanted.is_empty(),
        "{} rows named by scores cover no record of their merchant, e.g. {:?}",
        wanted.len(),
        wanted.keys().take(3).collect::<Vec<_>>()
    );
    assert!(
        wrong.is_empty(),
        "{} merchant features differ from their row's records, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // A score without a row is one of its merchant's first events: scored
    // before the merchant's first row could reach the table (published_at
    // of the first row + the catch-up bound).
    let table_records = read_topic(
        &env.topic("merchant-features"),
        Duration::from_secs(60),
        Duration::from_secs(1),
        |r| !r.is_empty(),
        logs,
    );
    let mut first_row: HashMap<String, i64> = HashMap::new();
    for r in &table_records {
        let v = json(r);
        let t = first_row
            .entry(v["merchant_id"].as_str().expect("merchant").to_string())
            .or_insert(i64::MAX);
        *t = (*t).min(v["published_at"].as_i64().expect("published_at"));
    }
    for v in &no_row {
        let m = v["merchant_id"].as_str().expect("merchant");
        let first = first_row.get(m).copied().expect("every merchant has a row");
        let scored = v["scored_at"].as_i64().expect("scored_at");
        assert!(
            scored <= first + CATCH_UP.as_millis() as i64,
            "{} scored without a row {} ms after its merchant's first row was published",
            v["txn_id"],
            scored - first
        );
    }
    assert_eq!(checked + no_row.len(), scores.len());
    ages.sort_unstable();
    eprintln!(
        "{checked} scores checked against their rows, {} before their merchant's first row; row age at score time p50 {} ms p99 {} ms",
        no_row.len(),
        ages[ages.len() / 2],
        ages[ages.len() * 99 / 100]
    );

    // Once caught up, every instance's table equals the single run.
    let at = txns.iter().map(|t| t.event_time).max().expect("events") + 1;
    let want_merchants = single_run_merchants(&txns, at);
    assert_eq!(want_merchants.len(), MERCHANTS);
    for (name, port) in [("b", ports[1]), ("c", ports[2]), ("d", ports[3])] {
        let mut diffs = Vec::new();
        while last_score_read.elapsed() < CATCH_UP {
            diffs = table_differences(port, &want_merchants, at);
            if diffs.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            diffs.is_empty(),
            "instance {name}'s table differs from the single run {CATCH_UP:?} after the last score: {:?}",
            &diffs[..diffs.len().min(5)]
        );
        let text = scrape(&url(port)).expect("metrics");
        assert!(metric(&text, "streamscore_merchant_table_rows").unwrap() >= MERCHANTS as f64);
    }
    eprintln!(
        "every instance's table equals the single run {:?} after the last score",
        last_score_read.elapsed()
    );
    // The merchant stage's work is shared: every remaining instance
    // published rows of the merchants of its partitions.
    for (name, port) in [("b", ports[1]), ("c", ports[2]), ("d", ports[3])] {
        let text = scrape(&url(port)).expect("metrics");
        let published = metric(&text, "streamscore_merchant_rows_published_total").unwrap();
        assert!(published > 0.0, "instance {name} published no merchant row");
    }

    // Every instance stops; a new one loads the table from the compacted
    // topic before it scores anything.
    for (name, r) in [("b", &mut b), ("c", &mut c), ("d", &mut d)] {
        let st = r.terminate(Duration::from_secs(30));
        assert!(st.success(), "{name} exit {st:?}; log:\n{}", r.log_text());
    }
    let mut e = env.spawn_run_on("e", ports[0]);
    wait_for(
        Duration::from_secs(60),
        "instance e to load its table",
        || e.log_text().contains("merchant table loaded").then_some(()),
    );
    let log = e.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("merchant table loaded"))
        .map(strip_ansi)
        .expect("line");
    assert!(line.contains(&format!("merchants={MERCHANTS}")), "{line}");
    let diffs = table_differences(ports[0], &want_merchants, at);
    assert!(
        diffs.is_empty(),
        "restarted table differs: {:?}",
        &diffs[..diffs.len().min(5)]
    );
    let st = e.terminate(Duration::from_secs(30));
    assert!(st.success(), "e exit {st:?}; log:\n{}", e.log_text());
}

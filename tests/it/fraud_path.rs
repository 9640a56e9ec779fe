//! The fraud path end to end: generated transactions plus every class of
//! malformed message through `streamscore run`, against the real broker and
//! Redis.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use streamscore::commands::malformed;
use streamscore::generate::{GenOptions, TxnGenerator};

use super::util::*;

const N: usize = 3_000;
const BAD_EVERY: usize = 100;

#[test]
fn every_valid_event_scored_once_bad_ones_dead_lettered_and_counted() {
    let env = TestEnv::new("e2e", "");
    let now = streamscore::now_ms();
    let txns: Vec<_> = TxnGenerator::new(GenOptions {
        seed: 11,
        users: 500,
        merchants: 50,
        fraud_rate: 0.02,
        mean_gap_ms: 200.0,
        start_ms: now - N as i64 * 200,
    })
    .take(N)
    .collect();
    let mut records = Vec::new();
    let mut bad = Vec::new();
    for (i, t) in txns.iter().enumerate() {
        records.push((t.user_id.clone(), serde_json::to_vec(t).unwrap()));
        if (i + 1) % BAD_EVERY == 0 {
            let raw = malformed(t, bad.len() as u64);
            bad.push(raw.clone());
            records.push((t.user_id.clone(), raw));
        }
    }
    // Ten minutes older than its partition's newest event: beyond the 5 min
    // grace, so scored and marked late, not folded into the windows.
    let mut late = txns.last().unwrap().clone();
    late.txn_id = "late-one".into();
    late.event_time -= 600_000;
    records.push((late.user_id.clone(), serde_json::to_vec(&late).unwrap()));
    let mut txns = txns;
    txns.push(late);
    let n = txns.len();
    // A message with no payload at all.
    records.push(("tombstone".into(), Vec::new()));
    bad.push(Vec::new());
    produce_all(&env.topic("transactions"), &records);

    let mut run = env.spawn_run("e2e");

    // fraud-scores: every valid txn id, exactly once.
    let want: HashSet<String> = txns.iter().map(|t| t.txn_id.clone()).collect();
    let scores = read_topic(
        &env.topic("fraud-scores"),
        Duration::from_secs(120),
        Duration::from_secs(2),
        |r| r.len() >= n,
        || run.log_text(),
    );
    let counts = txn_counts(&scores);
    let got: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(got, want, "scored ids differ from produced ids");
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dups.is_empty(), "duplicates in a clean run: {dups:?}");

    let score_schema = schema("fraud-score");
    let version = model_version();
    let mut flagged = 0;
    for r in &scores {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let errs = schema_errors(&score_schema, &v);
        assert!(errs.is_empty(), "invalid score {v}: {errs:?}");
        let s = v["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s));
        assert_eq!(v["decision"] == "flag", s >= 0.5);
        assert_eq!(v["txn_id"].as_str(), r.key.as_deref());
        assert_eq!(v["model_version"], version.as_str());
        assert_eq!(v["late"], v["txn_id"] == "late-one", "{v}");
        flagged += usize::from(v["decision"] == "flag");
    }
    // The model separates: some flagged, far fewer than all.
    assert!(flagged > 0 && flagged < N / 5, "flagged {flagged} of {N}");

    // dead-letter: every malformed message, with its reason and raw bytes.
    let dead = read_topic(
        &env.topic("dead-letter"),
        Duration::from_secs(60),
        Duration::from_secs(1),
        |r| r.len() >= bad.len(),
        || run.log_text(),
    );
    assert_eq!(dead.len(), bad.len(), "dead letters");
    let dl_schema = schema("dead-letter");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut reasons = HashSet::new();
    let mut raws = HashSet::new();
    for r in &dead {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let errs = schema_errors(&dl_schema, &v);
        assert!(errs.is_empty(), "invalid dead letter {v}: {errs:?}");
        assert!(!v["detail"].as_str().unwrap().is_empty());
        assert_eq!(v["source"]["topic"], env.topic("transactions").as_str());
        reasons.insert(v["reason"].as_str().unwrap().to_string());
        raws.insert(b64.decode(v["raw_base64"].as_str().unwrap()).unwrap());
    }
    for want in [
        "invalid_json",
        "missing_field",
        "wrong_type",
        "invalid_amount",
        "invalid_timestamp",
        "empty_field",
        "oversize",
    ] {
        assert!(
            reasons.contains(want),
            "no dead letter with reason {want}: {reasons:?}"
        );
    }
    let bad_set: HashSet<Vec<u8>> = bad.iter().cloned().collect();
    assert_eq!(raws, bad_set, "dead letters must carry the exact raw bytes");

    // Redis (written by the follower of fraud-scores): every score with a
    // TTL, and the users' latest.
    let ids: Vec<String> = want.iter().cloned().collect();
    let ttls = wait_redis_scores(
        &redis_url(),
        &env.redis_prefix,
        &ids,
        Duration::from_secs(30),
        || run.log_text(),
    );
    let mut con = redis_conn();
    assert!(
        ttls.iter().all(|t| (1..=3600).contains(t)),
        "TTL must be set (1h)"
    );
    let last = &txns[N - 1];
    let latest: String = redis::cmd("GET")
        .arg(format!(
            "{}fraud:user:{}:latest",
            env.redis_prefix, last.user_id
        ))
        .query(&mut con)
        .unwrap();
    let latest: serde_json::Value = serde_json::from_str(&latest).unwrap();
    assert_eq!(latest["user_id"], last.user_id.as_str());
    // `:latest` is the user's newest transaction by event time (not the
    // late one, produced after it but ten minutes older).
    let newest = txns
        .iter()
        .filter(|t| t.user_id == last.user_id)
        .max_by_key(|t| t.event_time)
        .unwrap();
    assert_eq!(latest["txn_id"], newest.txn_id.as_str(), "{latest}");
    let cached: String = redis::cmd("GET")
        .arg(format!("{}fraud:txn:{}", env.redis_prefix, last.txn_id))
        .query(&mut con)
        .unwrap();
    assert!(schema_errors(&score_schema, &serde_json::from_str(&cached).unwrap()).is_empty());

    // Metrics report the counts.
    let text = wait_for(
        Duration::from_secs(30),
        "metrics to report all events",
        || {
            let t = scrape(&env.metrics_url())?;
            let keys = metric(&t, "streamscore_window_keys{store=\"user\"}")?;
            (metric(&t, "streamscore_events_scored_total")? >= n as f64 && keys > 0.0).then_some(t)
        },
    );
    assert_eq!(metric(&text, "streamscore_late_events_total"), Some(1.0));
    assert_eq!(
        metric(&text, "streamscore_events_scored_total"),
        Some(n as f64)
    );
    assert_eq!(
        metric(
            &text,
            "streamscore_events_consumed_total{topic=\"transactions\"}"
        ),
        Some((n + bad.len()) as f64)
    );
    assert_eq!(
        metric_sum(&text, "streamscore_dead_letter_total"),
        bad.len() as f64
    );
    assert_eq!(
        metric(&text, "streamscore_events_flagged_total"),
        Some(flagged as f64)
    );
    assert_eq!(
        metric(&text, "streamscore_event_to_score_latency_seconds_count"),
        Some(n as f64)
    );
    assert_eq!(
        metric(
            &text,
            &format!("streamscore_model_info{{version=\"{version}\"}}")
        ),
        Some(1.0)
    );
    assert!(metric(&text, "streamscore_window_state_bytes{store=\"merchant\"}").unwrap() > 0.0);
    assert!(scrape(&format!("http://127.0.0.1:{}/healthz", env.http_port)).is_some());

    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
    assert!(run.log_text().contains("stopped cleanly"));
}

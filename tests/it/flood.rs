//! Poison flood (issue #3): 100,000 malformed messages of every class mixed
//! with valid ones through one `streamscore run`: every malformed message
//! is in `dead-letter` with its reason, every valid one is scored, and the
//! process stays up.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use super::util::*;

const BAD: usize = 100_000;
const GOOD: usize = 20_000;

/// The i-th malformed payload and the reason it must be rejected with.
fn poison(i: usize, t: &Value, now: i64) -> (Vec<u8>, &'static str) {
    let mut v = t.clone();
    let set = |v: &mut Value, k: &str, x: Value| v[k] = x;
    match i % 14 {
        0 => (vec![0xff, 0xfe, b'{', 0x80], "invalid_json"),
        1 => (b"{\"txn_id\": \"t\", ".to_vec(), "invalid_json"),
        2 => (b"[1, 2, 3]".to_vec(), "wrong_type"),
        3 => {
            v.as_object_mut().unwrap().remove("amount");
            (v.to_string().into_bytes(), "missing_field")
        }
        4 => {
            set(&mut v, "amount", json!("12.5"));
            (v.to_string().into_bytes(), "wrong_type")
        }
        5 => {
            set(&mut v, "event_time", json!("yesterday"));
            (v.to_string().into_bytes(), "wrong_type")
        }
        6 => {
            set(&mut v, "amount", json!(-1.0));
            (v.to_string().into_bytes(), "invalid_amount")
        }
        // JSON has no NaN literal; the closest a producer can send.
        7 => (
            v.to_string()
                .replace(&format!("\"amount\":{}", t["amount"]), "\"amount\":NaN")
                .into_bytes(),
            "invalid_json",
        ),
        8 => {
            set(&mut v, "amount", json!(1e300));
            (v.to_string().into_bytes(), "invalid_amount")
        }
        9 => {
            set(&mut v, "event_time", json!(now + 400 * 86_400_000_i64));
            (v.to_string().into_bytes(), "invalid_timestamp")
        }
        10 => {
            set(&mut v, "event_time", json!(12_345));
            (v.to_string().into_bytes(), "invalid_timestamp")
        }
        11 => {
            set(&mut v, "user_id", json!(""));
            (v.to_string().into_bytes(), "empty_field")
        }
        12 => (Vec::new(), "invalid_json"),
        // Oversize: ~100 KB usually, ~1 MB for the first few.
        _ => {
            let size = if i < 14 * 5 { 900_000 } else { 100_000 };
            set(&mut v, "padding", json!("x".repeat(size)));
            (v.to_string().into_bytes(), "oversize")
        }
    }
}

#[test]
fn a_poison_flood_is_dead_lettered_with_reasons_and_every_valid_event_scored() {
    let env = TestEnv::new("flood", "");
    let now = streamscore::now_ms();
    let txns = live_txns(41, GOOD, 5_000, 200, 20.0);
    let mut records = Vec::with_capacity(BAD + GOOD);
    let mut want_reason: HashMap<String, &str> = HashMap::new();
    let per_good = BAD / GOOD;
    let mut b = 0;
    for t in &txns {
        let tv = serde_json::to_value(t).unwrap();
        records.push((t.user_id.clone(), serde_json::to_vec(t).unwrap()));
        for _ in 0..per_good {
            let (raw, reason) = poison(b, &tv, now);
            let key = format!("poison-{b}");
            want_reason.insert(key.clone(), reason);
            records.push((key, raw));
            b += 1;
        }
    }
    assert_eq!(b, BAD);
    for chunk in records.chunks(20_000) {
        produce_all(&env.topic("transactions"), chunk);
    }
    let mut run = env.spawn_run("flood");

    let dead = read_topic(
        &env.topic("dead-letter"),
        Duration::from_secs(600),
        Duration::from_secs(2),
        |r| r.len() >= BAD,
        || run.log_text(),
    );
    let mut seen = HashSet::new();
    let mut wrong = Vec::new();
    for r in &dead {
        let v: Value = serde_json::from_slice(&r.payload).expect("dead letter is JSON");
        let key = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            v["key_base64"].as_str().expect("key kept"),
        )
        .unwrap();
        let key = String::from_utf8(key).unwrap();
        let want = want_reason.get(&key).copied();
        if want != v["reason"].as_str() {
            wrong.push(format!("want {want:?}, got {}", v["reason"]));
        }
        seen.insert(key);
    }
    let mut kinds: HashMap<&String, usize> = HashMap::new();
    for w in &wrong {
        *kinds.entry(w).or_insert(0) += 1;
    }
    assert!(wrong.is_empty(), "{} wrong reasons: {kinds:?}", wrong.len());
    assert_eq!(seen.len(), BAD, "every malformed message dead-lettered");

    let scores = read_all_scores(&env, GOOD, || run.log_text());
    let ids: HashSet<String> = txn_counts(&scores).into_keys().collect();
    assert!(
        txns.iter().all(|t| ids.contains(&t.txn_id)),
        "valid events not scored"
    );
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "run died:\n{}",
        run.log_text()
    );
    let text = scrape(&env.metrics_url()).expect("metrics");
    assert_eq!(
        metric_sum(&text, "streamscore_dead_letter_total"),
        BAD as f64
    );
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
}

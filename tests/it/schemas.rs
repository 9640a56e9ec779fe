//! The JSON Schemas of schemas/ accept what the code writes and reject what
//! the validators reject.

use streamscore::events::Interaction;
use streamscore::generate::{GenOptions, InteractionGenerator, TxnGenerator};

use super::util::*;

#[test]
fn generated_events_match_their_schemas() {
    let txn = schema("transaction");
    for t in TxnGenerator::new(GenOptions {
        seed: 3,
        users: 100,
        merchants: 10,
        fraud_rate: 0.05,
        mean_gap_ms: 100.0,
        start_ms: 1_764_000_000_000,
    })
    .take(2_000)
    {
        let v = serde_json::to_value(&t).unwrap();
        assert!(schema_errors(&txn, &v).is_empty(), "{v}");
    }
    let inter = schema("interaction");
    for i in InteractionGenerator::new(3, 100, 1000, 1_764_000_000_000, 10.0).take(500) {
        let v = serde_json::to_value(&i).unwrap();
        assert!(schema_errors(&inter, &v).is_empty(), "{v}");
        let back: Interaction = serde_json::from_value(v).unwrap();
        assert_eq!(back, i);
    }
}

#[test]
fn schemas_reject_what_validation_rejects() {
    let txn = schema("transaction");
    let bad = serde_json::json!({"txn_id":"t","user_id":"u","merchant_id":"m","amount":-1.0,
        "currency":"EUR","country":"FR","device_id":"d","event_time":1_764_000_000_000i64});
    assert!(!schema_errors(&txn, &bad).is_empty());
    let score = schema("fraud-score");
    assert!(!schema_errors(&score, &serde_json::json!({"txn_id": "t"})).is_empty());
    let recs = schema("recommendation");
    let ok = serde_json::json!({"user_id":"u","items":[{"item_id":"i","score":0.5}],"source":"popular",
        "generation":1,"built_at":1_764_000_000_000i64,"offsets":[{"topic":"interactions","partition":0,"from":0,"to":10}]});
    assert!(schema_errors(&recs, &ok).is_empty());
    let mut wrong = ok.clone();
    wrong["source"] = serde_json::json!("hybrid");
    assert!(!schema_errors(&recs, &wrong).is_empty());
}

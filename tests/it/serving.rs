//! The serving layer of `streamscore run`, against the real broker and
//! Redis: hybrid recommendations (a session item's neighbours move up, a
//! purchase disappears, a new user gets `popular`, sessions survive a
//! restart), `/v1/score` agreeing with the stream, the feature views, every
//! error class, and every response checked against docs/openapi.yaml.

use std::time::Duration;

use serde_json::{json, Value};
use streamscore::events::{Interaction, InteractionKind, Transaction};
use streamscore::generate::InteractionGenerator;

use super::util::*;

/// docs/openapi.yaml, and a validator per (path, method, status).
struct Spec {
    doc: Value,
}

impl Spec {
    fn load() -> Spec {
        let text = std::fs::read_to_string(root().join("docs/openapi.yaml")).expect("openapi.yaml");
        let doc: Value = serde_yaml::from_str(&text).expect("openapi.yaml is YAML");
        assert!(
            doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
            "OpenAPI 3.1 (its schemas are JSON Schema 2020-12)"
        );
        Spec { doc }
    }

    /// Checks `body` against the schema the spec gives for this answer;
    /// returns the parsed body.
    fn check(&self, path: &str, method: &str, status: u16, body: &str) -> Value {
        let op = &self.doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not in the spec");
        let resp = &op["responses"][status.to_string()];
        assert!(
            resp.is_object(),
            "{method} {path} answered {status}, which the spec does not list: {body}"
        );
        let schema = &resp["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} {status}: no JSON schema"
        );
        let mut root = schema.clone();
        root["components"] = self.doc["components"].clone();
        let v = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&root)
            .expect("the spec's schema compiles");
        let body: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {body}"));
        let errs: Vec<String> = v.iter_errors(&body).map(|e| e.to_string()).collect();
        assert!(
            errs.is_empty(),
            "{method} {path} {status} does not match the spec: {errs:?}\n{body}"
        );
        body
    }
}

struct Client<'a> {
    port: u16,
    spec: &'a Spec,
}

impl Client<'_> {
    fn get(&self, spec_path: &str, path: &str) -> (u16, Value) {
        let (st, body) = http(self.port, "GET", path, None).expect("server answers");
        (st, self.spec.check(spec_path, "get", st, &body))
    }
    fn post(&self, spec_path: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let (st, b) = http(self.port, "POST", path, Some(body)).expect("server answers");
        (st, self.spec.check(spec_path, "post", st, &b))
    }
    fn recs(&self, user: &str) -> Value {
        let (st, v) = self.get(
            "/v1/recommendations/{user_id}",
            &format!("/v1/recommendations/{user}?k=20"),
        );
        assert_eq!(st, 200, "{v}");
        v
    }
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("an item list")
        .iter()
        .map(|i| i["item_id"].as_str().expect("item_id").to_string())
        .collect()
}

/// The value of generation `gen` in hash `key` (the field of its parity;
/// values that carry their generation must carry `gen`).
fn hget(con: &mut redis::Connection, key: &str, gen: u64) -> Option<Value> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(key)
        .arg(streamscore::recs::publish::generation_field(gen))
        .query(con)
        .unwrap();
    let v: Value = serde_json::from_str(&raw?).unwrap();
    if let Some(g) = v.get("generation") {
        assert_eq!(g, gen, "{key}: {v}");
    }
    Some(v)
}

fn interaction(user: &str, item: &str, kind: InteractionKind, t: i64, n: u32) -> (String, Vec<u8>) {
    let i = Interaction {
        event_id: format!("serve-{n}"),
        user_id: user.into(),
        item_id: item.into(),
        kind,
        event_time: t,
    };
    (user.to_string(), serde_json::to_vec(&i).unwrap())
}

fn txn(id: &str, amount: f64, t: i64) -> Transaction {
    Transaction {
        txn_id: id.into(),
        user_id: "serve-user".into(),
        merchant_id: "serve-merchant".into(),
        amount,
        currency: "EUR".into(),
        country: "FR".into(),
        device_id: "serve-device".into(),
        event_time: t,
        fraud_pattern: None,
    }
}

#[test]
fn serving_layer_end_to_end() {
    // Redis answers within the default 50 ms budget here, except when the
    // suite runs this beside a million-event test on the same two cores
    // (seen once: a 503 "timed out"); the budget itself is not what this
    // test is about.
    let env = TestEnv::new("serving", "[serving]\nredis_timeout = \"2s\"\n");
    let spec = Spec::load();
    let c = Client {
        port: env.http_port,
        spec: &spec,
    };
    let now = streamscore::now_ms();
    // An interactions log that ended two hours ago (no session of it is
    // live once the test's own interactions move the clock), one rebuild.
    let n = 20_000;
    let events: Vec<_> =
        InteractionGenerator::new(5, 600, 1_500, now - n as i64 * 50 - 7_200_000, 50.0)
            .take(n)
            .collect();
    let records = interaction_records(&events);
    produce_all(&env.topic("interactions"), &records);
    let out = env.command(&["rebuild"]).output().expect("rebuild");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gen = meta["generation"].as_u64().unwrap();
    let p = env.redis_prefix.clone();
    let mut con = redis_conn();

    // A user with batch candidates, and an item X whose strongest neighbour
    // Y is not already first in that user's batch list.
    let mut pick = None;
    'users: for u in 0..600 {
        let user = format!("user-{u}");
        let Some(rec) = hget(&mut con, &format!("{p}recs:{user}"), gen) else {
            continue;
        };
        if rec["source"] != "batch" {
            continue;
        }
        let batch = ids(&rec["items"]);
        for x in 0..1_500 {
            let item = format!("item-{x}");
            let Some(nb) = hget(&mut con, &format!("{p}item:{item}:neighbours"), gen) else {
                continue;
            };
            let nb = ids(&nb);
            let y = nb[0].clone();
            let pos = batch.iter().position(|b| *b == y);
            // Some item above Y is no neighbour of X: the session lifts Y
            // past it (Y gains the full boost, it gains nothing).
            if pos.is_some_and(|p| p >= 3 && batch[..p].iter().any(|z| !nb.contains(z))) {
                pick = Some((user, batch, item, y));
                break 'users;
            }
        }
    }
    let (user, batch, x, y) =
        pick.expect("a user whose batch list has a session item's neighbour below the top");
    let batch_pos = batch.iter().position(|b| *b == y).unwrap();

    let mut run = env.spawn_run("serving");
    wait_for(Duration::from_secs(60), "ready", || {
        http(env.http_port, "GET", "/readyz", None).filter(|(s, _)| *s == 200)
    });
    let plain = c.recs(&user);
    assert_eq!(plain["source"], "batch", "{plain}");
    assert_eq!(
        ids(&plain["items"]),
        batch,
        "no session: the batch list as built"
    );
    let t0 = streamscore::now_ms();
    produce_all(
        &env.topic("interactions"),
        &[
            interaction(&user, &x, InteractionKind::View, t0, 1),
            interaction(&user, &x, InteractionKind::Click, t0 + 1, 2),
        ],
    );
    let hybrid = wait_for(Duration::from_secs(30), "a hybrid answer", || {
        let v = c.recs(&user);
        (v["source"] == "hybrid" && v["session_items"] == 2).then_some(v)
    });
    assert_eq!(hybrid["generation"].as_u64(), Some(gen));
    assert!(hybrid["age_seconds"].as_f64().unwrap() < 600.0);
    let h = ids(&hybrid["items"]);
    assert_ne!(h, batch, "the session changed nothing");
    let hybrid_pos = h
        .iter()
        .position(|i| *i == y)
        .expect("Y is still recommended");
    assert!(
        hybrid_pos < batch_pos,
        "{y} (X={x}'s strongest neighbour) at {hybrid_pos} in hybrid, {batch_pos} in batch"
    );

    // A purchase in the session drops the item.
    let bought = h[0].clone();
    produce_all(
        &env.topic("interactions"),
        &[interaction(
            &user,
            &bought,
            InteractionKind::Purchase,
            t0 + 2,
            3,
        )],
    );
    wait_for(
        Duration::from_secs(30),
        "the bought item to disappear",
        || {
            let v = c.recs(&user);
            (!ids(&v["items"]).contains(&bought)).then_some(())
        },
    );

    // A new user: the popular list of the generation.
    let fresh = c.recs("user-never-seen-anywhere");
    assert_eq!(fresh["source"], "popular");
    assert_eq!(fresh["session_items"], 0);
    let popular = hget(&mut con, &format!("{p}recs:popular"), gen).expect("recs:popular");
    assert_eq!(ids(&fresh["items"]), ids(&popular["items"])[..20].to_vec());

    // A malformed interaction goes to the dead-letter topic with its reason.
    produce_all(
        &env.topic("interactions"),
        &[("bad".to_string(), b"{not json".to_vec())],
    );
    let dead = read_topic(
        &env.topic("dead-letter"),
        Duration::from_secs(30),
        Duration::from_millis(500),
        |r| !r.is_empty(),
        || run.log_text(),
    );
    let d: Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(d["reason"], "invalid_json");
    assert_eq!(d["source"]["topic"], env.topic("interactions"));

    // /v1/score agrees with the stream for the same event and state.
    let base = streamscore::now_ms() - 10_000;
    let history: Vec<Transaction> = (0..3)
        .map(|i| txn(&format!("serve-t{i}"), 20.0 + i as f64, base + i * 1_000))
        .collect();
    produce_all(&env.topic("transactions"), &keyed_records(&history));
    wait_for(Duration::from_secs(30), "the history to be folded", || {
        let (st, v) = c.get("/v1/features/users/{id}", "/v1/features/users/serve-user");
        (st == 200 && v["features"]["txn_count_24h"] == 3.0).then_some(())
    });
    // Merchant windows reach the API and the stream through the replicated
    // table, a repartition round trip later: "same state" includes it.
    wait_for(
        Duration::from_secs(30),
        "the merchant's row in the table",
        || {
            let (st, v) = c.get(
                "/v1/features/merchants/{id}",
                "/v1/features/merchants/serve-merchant",
            );
            (st == 200 && v["features"]["txn_count_24h"] == 3.0).then_some(())
        },
    );
    let probe = txn("serve-t3", 930.0, base + 5_000);
    let (st, sync) = c.post(
        "/v1/score",
        "/v1/score",
        &serde_json::to_vec(&probe).unwrap(),
    );
    assert_eq!(st, 200, "{sync}");
    assert!(sync["latency_ms"].as_f64().unwrap() < 100.0, "{sync}");
    assert_eq!(sync["model_version"], model_version());
    // Read-only: the windows still hold three transactions.
    let (_, v) = c.get("/v1/features/users/{id}", "/v1/features/users/serve-user");
    assert_eq!(v["features"]["txn_count_24h"], 3.0, "{v}");
    produce_all(
        &env.topic("transactions"),
        &keyed_records(std::slice::from_ref(&probe)),
    );
    let scores = read_topic(
        &env.topic("fraud-scores"),
        Duration::from_secs(30),
        Duration::from_millis(500),
        |r| r.iter().any(|r| r.key.as_deref() == Some("serve-t3")),
        || run.log_text(),
    );
    let streamed: Value = scores
        .iter()
        .find(|r| r.key.as_deref() == Some("serve-t3"))
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .unwrap();
    assert_eq!(
        streamed["features"], sync["features"],
        "same state, same features"
    );
    let (a, b) = (
        sync["score"].as_f64().unwrap(),
        streamed["score"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-6, "sync {a} vs stream {b}");
    assert_eq!(sync["decision"], streamed["decision"]);
    let (st, m) = c.get(
        "/v1/features/merchants/{id}",
        "/v1/features/merchants/serve-merchant",
    );
    assert_eq!(st, 200);
    wait_for(
        Duration::from_secs(10),
        "the fourth transaction folded",
        || {
            let (_, m) = c.get(
                "/v1/features/merchants/{id}",
                "/v1/features/merchants/serve-merchant",
            );
            (m["features"]["txn_count_24h"] == 4.0).then_some(())
        },
    );
    assert_eq!(m["merchant_id"], "serve-merchant");
    // `at` moves the end of the windows: three hours later the 1 m and 1 h
    // windows are empty, the 24 h window still holds all four.
    let (_, later) = c.get(
        "/v1/features/users/{id}",
        &format!("/v1/features/users/serve-user?at={}", base + 3 * 3_600_000),
    );
    assert_eq!(later["features"]["txn_count_1m"], 0.0, "{later}");
    assert_eq!(later["features"]["txn_count_1h"], 0.0, "{later}");
    assert_eq!(later["features"]["txn_count_24h"], 4.0, "{later}");

    // Every error class: status and JSON body naming the problem.
    let valid = serde_json::to_value(txn("e1", 1.0, base)).unwrap();
    let mut missing = valid.clone();
    missing.as_object_mut().unwrap().remove("merchant_id");
    let mut negative = valid.clone();
    negative["amount"] = json!(-5.0);
    let mut wrong = valid.clone();
    wrong["amount"] = json!("ten");
    let mut empty = valid.clone();
    empty["user_id"] = json!("");
    let mut future = valid.clone();
    future["event_time"] = json!(streamscore::now_ms() + 10 * 86_400_000);
    let big = vec![b' '; 70_000];
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"txn_id\": ".to_vec(),
            400,
            "invalid_json",
        ),
        ("not UTF-8", vec![0xff, 0xfe, b'{'], 400, "invalid_json"),
        (
            "missing field",
            serde_json::to_vec(&missing).unwrap(),
            422,
            "missing_field",
        ),
        (
            "negative amount",
            serde_json::to_vec(&negative).unwrap(),
            422,
            "invalid_amount",
        ),
        (
            "wrong type",
            serde_json::to_vec(&wrong).unwrap(),
            422,
            "wrong_type",
        ),
        (
            "empty field",
            serde_json::to_vec(&empty).unwrap(),
            422,
            "empty_field",
        ),
        (
            "far future",
            serde_json::to_vec(&future).unwrap(),
            422,
            "invalid_timestamp",
        ),
        ("oversize", big, 413, "oversize"),
    ];
    for (what, body, status, code) in cases {
        let (st, v) = c.post("/v1/score", "/v1/score", &body);
        assert_eq!(
            (st, v["error"].as_str()),
            (status, Some(code)),
            "{what}: {v}"
        );
        assert!(!v["message"].as_str().unwrap().is_empty(), "{what}: {v}");
    }
    for (path, status, code) in [
        ("/v1/recommendations/u?k=0", 400, "invalid_parameter"),
        ("/v1/recommendations/u?k=abc", 400, "invalid_parameter"),
        ("/v1/recommendations/u?k=100000", 400, "invalid_parameter"),
    ] {
        let (st, v) = c.get("/v1/recommendations/{user_id}", path);
        assert_eq!(
            (st, v["error"].as_str()),
            (status, Some(code)),
            "{path}: {v}"
        );
    }
    let (st, v) = c.get(
        "/v1/features/users/{id}",
        "/v1/features/users/nobody-at-all",
    );
    assert_eq!((st, v["error"].as_str()), (404, Some("not_found")));
    let (st, v) = c.get(
        "/v1/features/users/{id}",
        "/v1/features/users/serve-user?at=soon",
    );
    assert_eq!((st, v["error"].as_str()), (400, Some("invalid_parameter")));
    let (st, body) = http(env.http_port, "GET", "/v2/nothing", None).unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (st, v["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (st, body) = http(env.http_port, "GET", "/v1/score", None).unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (st, v["error"].as_str()),
        (405, Some("method_not_allowed")),
        "{body}"
    );

    // Metrics by route and status, and by source.
    let text = scrape(&env.metrics_url()).expect("metrics");
    assert!(
        metric(
            &text,
            r#"streamscore_http_requests_total{route="/v1/score",status="200"}"#
        ) >= Some(1.0)
    );
    assert!(
        metric(
            &text,
            r#"streamscore_http_requests_total{route="/v1/score",status="422"}"#
        ) >= Some(5.0)
    );
    assert!(metric(&text, r#"streamscore_recs_served_total{source="hybrid"}"#) >= Some(1.0));
    assert!(metric(&text, r#"streamscore_recs_served_total{source="popular"}"#) >= Some(1.0));
    assert!(metric_sum(&text, "streamscore_http_request_duration_seconds_count") >= 10.0);

    // Sessions are rebuilt from the log: after a restart the same user's
    // answer is still hybrid, with the same session, without new events.
    let before = c.recs(&user);
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
    let mut run = env.spawn_run("serving-2");
    wait_for(Duration::from_secs(60), "ready again", || {
        http(env.http_port, "GET", "/readyz", None).filter(|(s, _)| *s == 200)
    });
    let after = wait_for(Duration::from_secs(30), "the session back", || {
        let v = c.recs(&user);
        (v["session_items"] == before["session_items"]).then_some(v)
    });
    assert_eq!(after["source"], "hybrid");
    assert_eq!(after["items"], before["items"]);
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
}

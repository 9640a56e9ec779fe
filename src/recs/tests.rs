use super::*;
use crate::config::RecsConfig;
use crate::events::{Interaction, InteractionKind};
use crate::generate::InteractionGenerator;

fn ev(user: &str, item: &str, kind: InteractionKind, t: i64) -> Interaction {
    Interaction {
        event_id: format!("{user}-{item}-{t}"),
        user_id: user.into(),
        item_id: item.into(),
        kind,
        event_time: t,
    }
}

fn build(events: &[Interaction]) -> Candidates {
    let mut b = Builder::new(&RecsConfig::default());
    for e in events {
        b.add(e);
    }
    b.finish()
}

#[test]
fn neighbours_of_history_are_recommended_and_bought_items_are_not() {
    use InteractionKind::*;
    let t = 1_764_000_000_000;
    let events = vec![
        // a and b co-occur for two users; c goes with a once.
        ev("u1", "a", View, t),
        ev("u1", "b", Click, t + 1),
        ev("u2", "a", View, t + 2),
        ev("u2", "b", View, t + 3),
        ev("u2", "c", Purchase, t + 4),
        // u3 saw only a: b ranks above c.
        ev("u3", "a", View, t + 5),
        // u4 saw a and bought b: b is excluded.
        ev("u4", "a", View, t + 6),
        ev("u4", "b", Purchase, t + 7),
    ];
    let c = build(&events);
    let u3 = c.users.iter().find(|u| u.user_id == "u3").unwrap();
    assert_eq!(u3.source, Source::Batch);
    let names: Vec<&str> = u3.items.iter().map(|s| s.item_id.as_str()).collect();
    assert_eq!(&names[..2], &["b", "c"], "{u3:?}");
    let u4 = c.users.iter().find(|u| u.user_id == "u4").unwrap();
    assert!(u4.items.iter().all(|s| s.item_id != "b"), "{u4:?}");
    // Users are sorted; the popular list has every item.
    let ids: Vec<&str> = c.users.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(ids, ["u1", "u2", "u3", "u4"]);
    assert_eq!(c.popular.len(), 3);
    assert_eq!(c.events, 8);
}

#[test]
fn a_user_whose_history_has_no_neighbour_gets_the_popular_list() {
    use InteractionKind::*;
    let t = 1_764_000_000_000;
    let c = build(&[
        ev("u1", "a", View, t),
        ev("u1", "b", View, t + 1),
        ev("lonely", "z", View, t + 2),
    ]);
    let l = c.users.iter().find(|u| u.user_id == "lonely").unwrap();
    assert_eq!(l.source, Source::Popular);
    assert_eq!(l.items, c.popular);
}

#[test]
fn same_input_same_output() {
    let events = generated(3, 500, 2_000, 50.0, 20_000);
    assert_eq!(build(&events), build(&events));
}

#[test]
fn neighbour_lists_stay_bounded() {
    let cfg = RecsConfig {
        max_neighbours: 5,
        ..RecsConfig::default()
    };
    let mut b = Builder::new(&cfg);
    // Pairs are merged into the lists (and pruned) every 1,000 here.
    b.pair_batch = 1_000;
    for e in generated(4, 200, 500, 50.0, 20_000) {
        b.add(&e);
        assert!(b.pairs.len() < 1_000);
    }
    assert!(b.co().iter().all(|ns| ns.len() <= 10));
    assert!(b.co().iter().filter(|ns| ns.len() > 5).count() > 100);
    assert!(b.users.iter().all(|u| u.history.len() <= cfg.history_cap));
    // Ranking uses the max_neighbours strongest of each list.
    let r = b.into_ranker();
    let lists: Vec<&[(u32, f32)]> = (0..r.items() as u32).map(|i| r.neighbours(i)).collect();
    assert!(lists.iter().all(|ns| ns.len() <= 5));
    assert!(lists.iter().filter(|ns| ns.len() == 5).count() > 100);
    assert!(lists
        .iter()
        .all(|ns| ns.windows(2).all(|w| w[0].0 < w[1].0)));
}

#[test]
fn ranking_in_chunks_on_threads_equals_ranking_at_once() {
    let events = generated(6, 3_000, 2_000, 50.0, 30_000);
    let whole = build(&events);
    let mut b = Builder::new(&RecsConfig::default());
    for e in &events {
        b.add(e);
    }
    let r = b.into_ranker();
    let n = r.user_count();
    assert_eq!(n, whole.users.len());
    for threads in [1, 2, 3] {
        let mut users = Vec::new();
        let mut digest = publish::Digest::new();
        let mut from = 0;
        while from < n {
            let to = (from + 701).min(n);
            let chunk = r.rank(from..to, threads);
            digest.users(&chunk);
            users.extend(chunk);
            from = to;
        }
        assert_eq!(users, whole.users, "{threads} threads");
        digest.popular(r.popular());
        digest.neighbours(&r.serve_neighbours());
        assert_eq!(digest.hex(), publish::digest(&whole), "{threads} threads");
    }
    assert!(whole.users.iter().any(|u| u.source == Source::Batch));
}

#[test]
fn candidates_beat_popularity_on_taste_structured_data() {
    let events = generated(5, 2_000, 5_000, 100.0, 60_000);
    let (cands, popular) = holdout_eval(&events, &RecsConfig::default());
    assert!(cands.users > 1_000);
    assert!(
        cands.recall >= 2.0 * popular.recall,
        "recall@20 {} vs popular {}",
        cands.recall,
        popular.recall
    );
}

/// `n` generated interactions (seed, users, items, mean gap in ms), from
/// the generator's fixed start time.
fn generated(seed: u64, users: usize, items: usize, gap_ms: f64, n: usize) -> Vec<Interaction> {
    InteractionGenerator::new(seed, users, items, 1_764_000_000_000, gap_ms)
        .take(n)
        .collect()
}

fn fold_batches(events: &[Interaction], cfg: &RecsConfig, batch: usize) -> Builder {
    fold_batches_into(Builder::new(cfg), events, batch)
}

/// `events` folded into `b` in batches of `batch`.
fn fold_batches_into(mut b: Builder, events: &[Interaction], batch: usize) -> Builder {
    for chunk in events.chunks(batch) {
        let mut fb = FoldBatch::with_capacity(chunk.len());
        for e in chunk {
            fb.push(&e.user_id, &e.item_id, e.kind, e.event_time);
        }
        b.add_batch(&fb);
    }
    b
}

#[test]
fn folding_in_prefetched_batches_equals_folding_one_by_one() {
    // Enough users for the user index to grow several times.
    let events = generated(7, 20_000, 3_000, 50.0, 60_000);
    let one_by_one = build(&events);
    for batch in [1, 7, 4_096] {
        let b = fold_batches(&events, &RecsConfig::default(), batch);
        assert_eq!(b.finish(), one_by_one, "batches of {batch}");
    }
    assert!(one_by_one.users.len() > 15_000);
}

#[test]
fn when_nothing_is_pruned_merging_pairs_late_changes_nothing() {
    // max_neighbours above any list's length: pruning never drops a pair,
    // so merging after every pair or after many sums the same values in
    // the same order.
    let cfg = RecsConfig {
        max_neighbours: 10_000,
        ..RecsConfig::default()
    };
    let events = generated(8, 300, 400, 50.0, 10_000);
    let mut every = Builder::new(&cfg);
    every.pair_batch = 1;
    let mut late = Builder::new(&cfg);
    for e in &events {
        every.add(e);
        late.add(e);
    }
    assert!(late.pairs.len() > 10_000, "pairs were merged early");
    assert_eq!(every.finish(), late.finish());
}

#[test]
fn merging_on_a_thread_of_its_own_equals_merging_here() {
    // Small buffers and lists: many merges, each pruning lists, so the
    // result depends on every merge's contents and order.
    let cfg = RecsConfig {
        max_neighbours: 5,
        ..RecsConfig::default()
    };
    let events = generated(10, 2_000, 1_000, 50.0, 30_000);
    let mut here = Builder::new(&cfg);
    here.pair_batch = 997;
    for e in &events {
        here.add(e);
    }
    let mut apart = Builder::with_merge_thread(&cfg).unwrap();
    apart.pair_batch = 997;
    let apart = fold_batches_into(apart, &events, 100);
    let (here, apart) = (here.finish(), apart.finish());
    assert_eq!(here, apart);
    assert_eq!(publish::digest(&here), publish::digest(&apart));
    assert!(
        here.users
            .iter()
            .filter(|u| u.source == Source::Batch)
            .count()
            > 1_000
    );
    // Nothing folded: no lists, no users, on either.
    let empty = Builder::with_merge_thread(&cfg).unwrap().finish();
    assert_eq!(empty, Builder::new(&cfg).finish());
    assert!(empty.users.is_empty() && empty.neighbours.iter().all(|(_, l)| l.is_empty()));
}

#[test]
fn encoded_records_are_the_serialised_records_and_hash_like_the_digest() {
    use publish::{Digest, RecRecord};
    let mut events = generated(9, 400, 500, 50.0, 8_000);
    // Ids that need escaping, and a user with no neighbours.
    events.push(ev(
        "quote\"d\\user\u{1}é",
        "item-1",
        InteractionKind::View,
        1_764_000_900_000,
    ));
    events.push(ev(
        "lonely",
        "only-mine",
        InteractionKind::Purchase,
        1_764_000_900_001,
    ));
    // Two candidates of "tie-user" with equal scores: listed by id, not by
    // first appearance ("tie-b" is seen first); one id too long to be
    // kept inline (ItemOut), with characters to escape.
    let long = "tie-a-an-id-longer-than-33-bytes-with-a-\"quote\"";
    for (user, second) in [("tie-x1", "tie-b"), ("tie-x2", long)] {
        events.push(ev(
            user,
            "tie-rare",
            InteractionKind::View,
            1_764_000_950_000,
        ));
        events.push(ev(user, second, InteractionKind::View, 1_764_000_951_000));
    }
    events.push(ev(
        "tie-user",
        "tie-rare",
        InteractionKind::View,
        1_764_000_952_000,
    ));
    let mut b = Builder::new(&RecsConfig::default());
    for e in &events {
        b.add(e);
    }
    let r = b.into_ranker();
    let offsets = vec![replay::Range {
        topic: "t".into(),
        partition: 3,
        from: 10,
        to: 20,
    }];
    let tail = r#","generation":7,"built_at":1764000000000,"offsets":[{"topic":"t","partition":3,"from":10,"to":20}]}"#;
    let n = r.user_count();
    let users = r.rank(0..n, 1);
    let parts = r.encode(0..n, 3, tail, &mut Vec::new());
    assert_eq!(parts.len(), 3);
    let mut digest = Digest::new();
    let mut expected = Digest::new();
    expected.users(&users);
    let mut i = 0;
    for part in &parts {
        digest.user_hashes(&part.hashes);
        for (key, json) in part.records() {
            let u = &users[i];
            assert_eq!(key, u.user_id.as_bytes());
            let want = serde_json::to_value(RecRecord {
                user_id: &u.user_id,
                items: &u.items,
                source: u.source,
                generation: 7,
                built_at: 1_764_000_000_000,
                offsets: &offsets,
            })
            .unwrap();
            let got: serde_json::Value = serde_json::from_slice(json).unwrap();
            assert_eq!(got, want, "{}", String::from_utf8_lossy(json));
            i += 1;
        }
    }
    assert_eq!(i, n);
    assert_eq!(digest.hex(), expected.hex());
    // Written again into the same (used) buffers: the same records.
    let first: Vec<(Vec<u8>, Vec<u8>)> = parts
        .iter()
        .flat_map(|p| p.records().map(|(k, v)| (k.to_vec(), v.to_vec())))
        .collect();
    let mut spare = parts;
    let again = r.encode(0..n, 3, tail, &mut spare);
    assert!(spare.is_empty(), "the spare buffers were not reused");
    let second: Vec<(Vec<u8>, Vec<u8>)> = again
        .iter()
        .flat_map(|p| p.records().map(|(k, v)| (k.to_vec(), v.to_vec())))
        .collect();
    assert_eq!(first, second);
    assert!(users.iter().any(|u| u.user_id.contains('"')));
    assert!(users.iter().any(|u| u.source == Source::Popular));
    let tie = users.iter().find(|u| u.user_id == "tie-user").unwrap();
    let ids: Vec<&str> = tie.items.iter().map(|s| s.item_id.as_str()).collect();
    assert_eq!(ids, [long, "tie-b"], "{tie:?}");
    assert_eq!(tie.items[0].score, tie.items[1].score);
}

#[test]
fn scores_are_written_in_plain_decimals_that_parse_back_exactly() {
    for (score, text) in [
        (0.0, "0.0"),
        (3.0, "3.0"),
        (0.5, "0.5"),
        (0.123456, "0.123456"),
        (0.000001, "0.000001"),
        (12.0001, "12.0001"),
        (987654321.5, "987654321.5"),
        (1e10, "10000000000.0"),
    ] {
        let mut buf = Vec::new();
        rank::write_score(&mut buf, score);
        assert_eq!(String::from_utf8_lossy(&buf), text);
        assert_eq!(serde_json::from_slice::<f64>(&buf).unwrap(), score);
    }
    // Beyond 10^9 × 10^6 millionths: serde_json's own form.
    let mut buf = Vec::new();
    rank::write_score(&mut buf, 1e300);
    assert_eq!(serde_json::from_slice::<f64>(&buf).unwrap(), 1e300);
}

#[test]
fn the_recommendations_producer_compresses_with_recs_compression_over_kafka_producer() {
    let mut cfg = crate::config::Config::default();
    cfg.kafka
        .producer
        .insert("compression.type".into(), "snappy".into());
    assert_eq!(
        publish::producer_config(&cfg).get("compression.type"),
        Some("lz4")
    );
    cfg.recs.compression = crate::config::Compression::None;
    assert_eq!(
        publish::producer_config(&cfg).get("compression.type"),
        Some("none")
    );
    // Other producers keep [kafka.producer].
    assert_eq!(
        crate::kafka::producer_config(&cfg.kafka).get("compression.type"),
        Some("snappy")
    );
}

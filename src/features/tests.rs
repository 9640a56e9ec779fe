//! Unit tests of the window state and features, with injected event times.
use super::*;

const T0: i64 = 1_764_000_000_000;

fn spec() -> WindowSpec {
    WindowSpec::from(&WindowConfig::default())
}

fn txn(id: u32, user: &str, merchant: &str, amount: f64, ts: i64) -> Transaction {
    Transaction {
        txn_id: format!("t{id}"),
        user_id: user.into(),
        merchant_id: merchant.into(),
        amount,
        currency: "EUR".into(),
        country: "FR".into(),
        device_id: "d1".into(),
        event_time: ts,
        fraud_pattern: None,
    }
}

fn f(fs: &Features, name: &str) -> f32 {
    let i = FEATURE_NAMES.iter().position(|n| *n == name).unwrap();
    fs.0[i]
}

#[test]
fn features_are_point_in_time_the_event_itself_is_not_counted() {
    let e = FeatureEngine::new(spec());
    let a = e.process(&txn(1, "u", "m", 10.0, T0), true);
    assert_eq!(f(&a, "user_txn_count_1m"), 0.0);
    assert_eq!(f(&a, "user_seconds_since_last_txn"), NO_PREVIOUS_SECONDS);
    assert_eq!(f(&a, "merchant_txn_count_1h"), 0.0);
    let b = e.process(&txn(2, "u", "m", 30.0, T0 + 20_000), true);
    assert_eq!(f(&b, "user_txn_count_1m"), 1.0);
    assert_eq!(f(&b, "user_amount_sum_1m"), 10.0);
    assert_eq!(f(&b, "user_seconds_since_last_txn"), 20.0);
    assert_eq!(f(&b, "merchant_txn_count_1h"), 1.0);
    assert_eq!(f(&b, "merchant_amount_mean_1h"), 10.0);
    // A previous transaction beyond the 24 h horizon reads as none (a replay
    // of the horizon could not know it).
    let day = 24 * 3600 * 1000;
    let late = FeatureEngine::new(spec());
    late.process(&txn(10, "v", "m", 10.0, T0), true);
    let within = late.process(&txn(11, "v", "m", 10.0, T0 + day), true);
    assert_eq!(f(&within, "user_seconds_since_last_txn"), 86_400.0);
    let beyond = late.process(&txn(12, "v", "m", 10.0, T0 + 2 * day + 1), true);
    assert_eq!(
        f(&beyond, "user_seconds_since_last_txn"),
        NO_PREVIOUS_SECONDS
    );
    let c = e.process(&txn(3, "u", "m2", 20.0, T0 + 40_000), true);
    assert_eq!(f(&c, "user_txn_count_1m"), 2.0);
    assert_eq!(f(&c, "user_amount_sum_1m"), 40.0);
    assert_eq!(f(&c, "user_amount_mean_24h"), 20.0);
    assert!((f(&c, "user_amount_std_24h") - 14.142_136).abs() < 1e-4);
    assert_eq!(f(&c, "user_distinct_merchants_1h"), 1.0);
    assert_eq!(f(&c, "merchant_txn_count_1h"), 0.0, "m2 is new");
}

#[test]
fn process_equals_features_then_update() {
    let a = FeatureEngine::new(spec());
    let b = FeatureEngine::new(spec());
    let gen = crate::generate::TxnGenerator::new(crate::generate::GenOptions {
        seed: 4,
        users: 50,
        merchants: 10,
        fraud_rate: 0.05,
        mean_gap_ms: 2_000.0,
        start_ms: T0,
    });
    for t in gen.take(5_000) {
        let fa = a.process(&t, true);
        let fb = b.features(&t);
        b.update(&t);
        assert_eq!(fa, fb, "{t:?}");
    }
}

#[test]
fn windows_roll_over_by_event_time() {
    let e = FeatureEngine::new(spec());
    e.process(&txn(1, "u", "m", 10.0, T0), true);
    // Two minutes later: out of the 1 min window, inside 1 h and 24 h.
    let b = e.process(&txn(2, "u", "m", 5.0, T0 + 120_000), true);
    assert_eq!(f(&b, "user_txn_count_1m"), 0.0);
    assert_eq!(f(&b, "user_txn_count_1h"), 1.0);
    // Two hours later: only the 24 h window remembers.
    let c = e.process(&txn(3, "u", "m", 5.0, T0 + 2 * 3_600_000 + 120_000), true);
    assert_eq!(f(&c, "user_txn_count_1h"), 0.0);
    assert_eq!(f(&c, "user_txn_count_24h"), 2.0);
    assert_eq!(f(&c, "merchant_txn_count_24h"), 2.0);
    assert_eq!(f(&c, "merchant_amount_mean_24h"), 7.5);
    // Two days later: nothing.
    let d = e.process(&txn(4, "u", "m", 5.0, T0 + 2 * 86_400_000), true);
    assert_eq!(f(&d, "user_txn_count_24h"), 0.0);
    assert_eq!(f(&d, "merchant_txn_count_24h"), 0.0);
}

#[test]
fn late_event_in_grace_updates_its_bucket_and_sees_only_its_past() {
    let e = FeatureEngine::new(spec());
    e.process(&txn(1, "u", "m", 10.0, T0), true);
    e.process(&txn(2, "u", "m", 10.0, T0 + 50 * 60_000), true);
    // Late by 40 min: features as of T0+10min see only the first event.
    let late = e.process(&txn(3, "u", "m", 1.0, T0 + 10 * 60_000), true);
    assert_eq!(f(&late, "user_txn_count_1h"), 1.0);
    // ...and it lands in its bucket: a later event counts all three.
    let after = e.process(&txn(4, "u", "m", 1.0, T0 + 55 * 60_000), true);
    assert_eq!(f(&after, "user_txn_count_1h"), 3.0);
}

#[test]
fn late_event_beyond_grace_is_scored_but_not_folded_in() {
    let e = FeatureEngine::new(spec());
    e.process(&txn(1, "u", "m", 10.0, T0 - 2 * 3_600_000), true);
    e.process(&txn(2, "u", "m", 10.0, T0), true);
    // As of its own time (an hour bucket before T0) it sees only the first.
    let late = e.process(&txn(3, "u", "m", 10.0, T0 - 3_600_000), false);
    assert_eq!(f(&late, "user_txn_count_24h"), 1.0);
    let next = e.process(&txn(4, "u", "m", 10.0, T0 + 1_000), true);
    assert_eq!(
        f(&next, "user_txn_count_24h"),
        2.0,
        "late one was not added"
    );
}

#[test]
fn new_device_and_country_flags() {
    let e = FeatureEngine::new(spec());
    let first = e.process(&txn(1, "u", "m", 10.0, T0), true);
    assert_eq!(
        f(&first, "user_new_device"),
        0.0,
        "no history, nothing to compare"
    );
    let mut t = txn(2, "u", "m", 10.0, T0 + 1000);
    t.device_id = "d2".into();
    t.country = "BR".into();
    let g = e.process(&t, true);
    assert_eq!(f(&g, "user_new_device"), 1.0);
    assert_eq!(f(&g, "user_new_country"), 1.0);
    let again = e.process(&t, true);
    assert_eq!(f(&again, "user_new_device"), 0.0);
}

#[test]
fn user_history_features_cover_only_the_24h_window() {
    let e = FeatureEngine::new(spec());
    e.process(&txn(1, "u", "m", 1_000.0, T0), true);
    let mut t = txn(2, "u", "m", 10.0, T0 + 25 * 3_600_000);
    t.device_id = "d2".into();
    let g = e.process(&t, true);
    // The day-old payment and device are outside the window: nothing is
    // known, so nothing is new, and the mean ignores the 1,000.
    assert_eq!(f(&g, "user_new_device"), 0.0);
    assert_eq!(f(&g, "user_amount_mean_24h"), 0.0);
    let mut t3 = txn(3, "u", "m", 30.0, T0 + 25 * 3_600_000 + 60_000);
    t3.device_id = "d1".into();
    let h = e.process(&t3, true);
    assert_eq!(f(&h, "user_new_device"), 1.0, "d1 was last seen 25 h ago");
    assert_eq!(f(&h, "user_amount_mean_24h"), 10.0);
}

#[test]
fn users_of_a_revoked_partition_can_be_dropped() {
    let e = FeatureEngine::new(spec());
    e.process_from(0, &txn(1, "a", "m", 10.0, T0), true);
    e.process_from(1, &txn(2, "b", "m", 10.0, T0), true);
    e.update_from(1, &txn(3, "c", "m2", 10.0, T0), false);
    assert_eq!(e.drop_partition_users(1), 2);
    assert_eq!(e.key_counts(), (1, 1), "m2 was never folded in");
}

#[test]
fn a_flood_of_new_ids_stays_under_the_key_limit_evicting_the_least_recent() {
    let mut sp = spec();
    sp.max_users = 100;
    sp.max_merchants = 50;
    let e = FeatureEngine::new(sp);
    e.process(&txn(0, "loyal", "m-loyal", 10.0, T0), true);
    for i in 1..5_000u32 {
        let ts = T0 + i64::from(i) * 10;
        e.process(&txn(i, &format!("u{i}"), &format!("m{i}"), 1.0, ts), true);
        if i % 7 == 0 {
            // "loyal" stays active, so it is never the least recent.
            e.process(&txn(i, "loyal", "m-loyal", 10.0, ts), true);
        }
        let (users, merchants) = e.key_counts();
        assert!(
            users <= 100 + 10 && merchants <= 50 + 5,
            "{users} {merchants}"
        );
    }
    assert!(e.users.contains_key("loyal"));
    let (eu, em) = e.take_limit_evictions();
    assert!(eu > 4_000 && em > 4_000, "{eu} {em}");
    assert_eq!(e.take_limit_evictions(), (0, 0));
}

#[test]
fn idle_keys_are_evicted_after_the_longest_horizon_plus_grace() {
    let e = FeatureEngine::new(spec());
    e.process(&txn(1, "old", "m-old", 10.0, T0), true);
    e.process(&txn(2, "new", "m-new", 10.0, T0 + 3_600_000), true);
    let ((eu, em), stats) = e.evict_idle();
    assert_eq!((eu, em), (0, 0));
    assert_eq!(stats.user_keys, 2);
    assert!(stats.user_bytes > 0 && stats.merchant_bytes > 0);
    e.process(
        &txn(3, "new", "m-new", 10.0, T0 + spec().retention_ms() + 1),
        true,
    );
    let ((eu, em), stats) = e.evict_idle();
    assert_eq!((eu, em), (1, 1));
    assert_eq!((stats.user_keys, stats.merchant_keys), (1, 1));
}

#[test]
fn idleness_is_judged_by_each_partition_own_clock() {
    // Partition 1 runs a day and more ahead of partition 0 (catch-up): the
    // users of partition 0 are not idle by their own partition's clock.
    let e = FeatureEngine::new(spec());
    let far = T0 + spec().retention_ms() + 3_600_000;
    e.process_from(0, &txn(1, "slow-user", "m-shared", 10.0, T0), true);
    e.process_from(1, &txn(2, "fast-user", "m-shared", 10.0, far), true);
    e.process_from(1, &txn(3, "fast-old", "m-fast", 10.0, T0), true);
    let clocks = std::collections::HashMap::from([(0, T0), (1, far)]);
    let ((eu, em), stats) = e.evict_idle_by(&clocks);
    // fast-old is idle on partition 1's clock; slow-user is not on its own.
    assert_eq!(eu, 1);
    assert_eq!(stats.user_keys, 2);
    // Merchants go by the slowest clock: none is idle yet.
    assert_eq!(em, 0);
    let ((eu, em), _) = e.evict_idle_by(&std::collections::HashMap::from([(0, far), (1, far)]));
    assert_eq!(
        (eu, em),
        (1, 1),
        "slow-user and m-fast once partition 0 caught up"
    );
}

#[test]
fn lateness_is_per_partition_and_relative_to_the_newest_event() {
    let mut l = Lateness::new(1_000);
    assert!(!l.is_late(0, T0));
    assert!(!l.is_late(0, T0 - 1_000), "within grace");
    assert!(l.is_late(0, T0 - 1_001), "beyond grace");
    assert!(
        !l.is_late(1, T0 - 50_000),
        "other partition has its own clock"
    );
    assert!(!l.is_late(0, T0 + 5_000));
    assert!(l.is_late(0, T0 + 3_000));
}

#[test]
fn features_serialize_with_names() {
    let e = FeatureEngine::new(spec());
    let v = serde_json::to_value(e.features(&txn(1, "u", "m", 2.5, T0))).unwrap();
    assert_eq!(v["amount"], 2.5);
    assert_eq!(v.as_object().unwrap().len(), N_FEATURES);
}

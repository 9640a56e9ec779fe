use std::time::{Duration, Instant};

use super::*;
use crate::config::WindowConfig;
use crate::features::{FeatureEngine, N_FEATURES};

fn spec() -> WindowSpec {
    WindowSpec::from(&WindowConfig::default())
}

fn fwd(merchant: &str, user: &str, t: i64, amount: f64, sp: i32, so: i64) -> Forwarded {
    Forwarded {
        txn_id: format!("t{sp}-{so}"),
        user_id: user.into(),
        merchant_id: merchant.into(),
        amount,
        event_time: t,
        source_partition: sp,
        source_offset: so,
        forwarded_at: 1,
    }
}

const T0: i64 = 1_700_000_000_000;

/// The events of one merchant, with the same features the single-process
/// engine computes for a probe at `at`.
fn engine_features(events: &[Forwarded], at: i64) -> [f32; N_FEATURES] {
    let engine = FeatureEngine::new(spec());
    for f in events {
        let t = Transaction {
            txn_id: f.txn_id.clone(),
            user_id: f.user_id.clone(),
            merchant_id: f.merchant_id.clone(),
            amount: f.amount,
            currency: "EUR".into(),
            country: "DE".into(),
            device_id: "d".into(),
            event_time: f.event_time,
            fraud_pattern: None,
        };
        engine.update(&t);
    }
    engine
        .merchant_view(&events[0].merchant_id, Some(at))
        .expect("merchant")
        .features
        .0
}

fn events() -> Vec<Forwarded> {
    (0..300)
        .map(|i| {
            fwd(
                "m1",
                &format!("u{}", i % 37),
                T0 + i * 97_000,
                10.0 + (i % 13) as f64,
                (i % 3) as i32,
                i,
            )
        })
        .collect()
}

#[test]
fn a_published_row_gives_the_features_the_owner_computes_at_any_time() {
    let evs = events();
    let mut st = StageState::new(spec());
    for (o, f) in evs.iter().enumerate() {
        assert!(st.fold(2, o as i64, f));
    }
    let rows = st.due(Instant::now(), Duration::ZERO, 5);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].offset, 299);
    assert_eq!(rows[0].partition, 2);
    // Through JSON, as on the topic.
    let json = serde_json::to_vec(&rows[0]).unwrap();
    let table = MerchantTable::new(spec());
    assert!(matches!(
        table.apply(b"m1", Some(&json)).unwrap(),
        Applied::Upserted { .. }
    ));
    let last = evs.last().unwrap().event_time;
    for at in [
        T0 + 3_600_000,
        last,
        last + 1_800_000,
        last + 30 * 3_600_000,
    ] {
        let mut f = Features([0.0; N_FEATURES]);
        let used = table.fill("m1", at, &mut f).expect("row");
        assert_eq!(used.offset, 299);
        assert_eq!(used.as_of, last);
        let want = engine_features(&evs, at);
        assert_eq!(&f.0[15..], &want[15..], "at {at}");
    }
    // A day and more after the last event the windows are empty.
    let mut f = Features([0.0; N_FEATURES]);
    table.fill("m1", last + 26 * 3_600_000, &mut f);
    assert_eq!(f.0[17], 0.0);
    assert!(table.fill("other", last, &mut f).is_none());
}

#[test]
fn records_forwarded_again_are_dropped_per_source_partition() {
    let mut st = StageState::new(spec());
    assert!(st.fold(0, 0, &fwd("m", "u", T0, 1.0, 0, 10)));
    assert!(st.fold(0, 1, &fwd("m", "u", T0, 1.0, 1, 10)));
    assert!(st.fold(0, 2, &fwd("m", "u", T0, 1.0, 0, 11)));
    // A restarted stream forwards 10 and 11 of source partition 0 again.
    assert!(!st.fold(0, 3, &fwd("m", "u", T0, 1.0, 0, 10)));
    assert!(!st.fold(0, 4, &fwd("m", "u", T0, 1.0, 0, 11)));
    assert!(st.fold(0, 5, &fwd("m", "u", T0, 1.0, 0, 12)));
    assert_eq!(st.take_duplicates(), 2);
    let row = st.due(Instant::now(), Duration::ZERO, 0).remove(0);
    assert_eq!(row.windows.day.iter().map(|d| d.1).sum::<u32>(), 4);
    // Each repartition partition keeps its own sequence.
    assert!(st.fold(1, 0, &fwd("n", "u", T0, 1.0, 0, 10)));
}

#[test]
fn a_merchant_is_published_at_most_once_per_interval() {
    let mut st = StageState::new(spec());
    let now = Instant::now();
    let iv = Duration::from_millis(500);
    st.fold(0, 0, &fwd("m", "u", T0, 1.0, 0, 0));
    assert_eq!(st.due(now, iv, 0).len(), 1);
    st.fold(0, 1, &fwd("m", "u", T0, 1.0, 0, 1));
    assert!(st.due(now + Duration::from_millis(100), iv, 0).is_empty());
    let later = st.due(now + Duration::from_millis(600), iv, 0);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].offset, 1);
    // Nothing changed: nothing due, however late.
    assert!(st.due(now + Duration::from_secs(60), iv, 0).is_empty());
    // A failed publish is retried at once.
    st.fold(0, 2, &fwd("m", "u", T0, 1.0, 0, 2));
    assert_eq!(st.due(now + Duration::from_secs(61), iv, 0).len(), 1);
    st.mark_dirty("m");
    assert_eq!(st.due(now + Duration::from_secs(61), iv, 0).len(), 1);
}

#[test]
fn the_table_keeps_the_newest_row_and_removes_on_tombstones() {
    let mut st = StageState::new(spec());
    st.fold(3, 7, &fwd("m", "u", T0, 5.0, 0, 0));
    let old = serde_json::to_vec(&st.due(Instant::now(), Duration::ZERO, 0)[0]).unwrap();
    st.fold(3, 8, &fwd("m", "u", T0 + 1, 5.0, 0, 1));
    let new = serde_json::to_vec(&st.due(Instant::now(), Duration::ZERO, 0)[0]).unwrap();
    let table = MerchantTable::new(spec());
    table.apply(b"m", Some(&new)).unwrap();
    assert_eq!(table.apply(b"m", Some(&old)).unwrap(), Applied::Stale);
    assert_eq!(table.view("m", None).unwrap().features.0[17], 2.0);
    assert_eq!(table.apply(b"m", None).unwrap(), Applied::Removed);
    assert!(table.is_empty());
    assert!(table.apply(b"m", Some(b"{not json")).is_err());
}

#[test]
fn a_row_made_with_other_buckets_is_refused_naming_the_fields() {
    let mut st = StageState::new(spec());
    st.fold(0, 0, &fwd("m", "u", T0, 5.0, 0, 0));
    let mut row = st.due(Instant::now(), Duration::ZERO, 0).remove(0);
    row.windows.hour_bucket_ms = 60_000;
    let table = MerchantTable::new(spec());
    let err = table
        .apply(b"m", Some(&serde_json::to_vec(&row).unwrap()))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("windows.hour_bucket"),
        "{err:#}"
    );
}

#[test]
fn idle_merchants_are_evicted_by_their_partitions_clock_and_revocation_drops_a_partition() {
    let mut st = StageState::new(spec());
    st.fold(0, 0, &fwd("old", "u", T0, 1.0, 0, 0));
    st.fold(0, 1, &fwd("new", "u", T0 + 30 * 3_600_000, 1.0, 0, 1));
    // Partition 1's clock is far behind: its merchant stays.
    st.fold(1, 0, &fwd("slow", "u", T0 - 3_600_000, 1.0, 0, 2));
    assert_eq!(st.evict_idle(), vec!["old".to_string()]);
    assert_eq!(st.len(), 2);
    assert_eq!(st.drop_partition(1), 1);
    assert_eq!(st.len(), 1);
}

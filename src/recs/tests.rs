use super::*;
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
    let events: Vec<Interaction> =
        InteractionGenerator::new(3, 500, 2_000, 1_764_000_000_000, 50.0)
            .take(20_000)
            .collect();
    assert_eq!(build(&events), build(&events));
}

#[test]
fn neighbour_lists_stay_bounded() {
    let cfg = RecsConfig {
        max_neighbours: 5,
        ..RecsConfig::default()
    };
    let mut b = Builder::new(&cfg);
    for e in InteractionGenerator::new(4, 200, 500, 1_764_000_000_000, 50.0).take(20_000) {
        b.add(&e);
    }
    assert!(b.co.iter().all(|ns| ns.len() <= 10));
    assert!(b
        .users
        .iter()
        .all(|(_, u)| u.history.len() <= cfg.history_cap));
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
    let events: Vec<Interaction> =
        InteractionGenerator::new(6, 3_000, 2_000, 1_764_000_000_000, 50.0)
            .take(30_000)
            .collect();
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
    let events: Vec<Interaction> =
        InteractionGenerator::new(5, 2_000, 5_000, 1_764_000_000_000, 100.0)
            .take(60_000)
            .collect();
    let (cands, popular) = holdout_eval(&events, &RecsConfig::default());
    assert!(cands.users > 1_000);
    assert!(
        cands.recall >= 2.0 * popular.recall,
        "recall@20 {} vs popular {}",
        cands.recall,
        popular.recall
    );
}

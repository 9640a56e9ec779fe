//! Holdout quality of the candidates as two knobs vary, on the generator's
//! taste-structured interactions (the same data as the unit test
//! `candidates_beat_popularity_on_taste_structured_data`): the figures of
//! docs/RECOMMENDATIONS.md for `recs.cooccurrence_window` and
//! `recs.max_neighbours`. Usage: cargo run --release --example recs_knobs
use streamscore::config::RecsConfig;
use streamscore::events::Interaction;
use streamscore::generate::InteractionGenerator;
use streamscore::recs::holdout_eval;

fn main() {
    let events: Vec<Interaction> =
        InteractionGenerator::new(5, 2_000, 5_000, 1_764_000_000_000, 100.0)
            .take(60_000)
            .collect();
    let report = |what: &str, cfg: &RecsConfig| {
        let (c, p) = holdout_eval(&events, cfg);
        println!(
            "{what}: recall@{k} {:.4} NDCG@{k} {:.4} (popular recall {:.4}; {} users)",
            c.recall,
            c.ndcg,
            p.recall,
            c.users,
            k = cfg.top_k
        );
    };
    for w in [3, 5, 10, 20, 30] {
        let cfg = RecsConfig {
            cooccurrence_window: w,
            ..RecsConfig::default()
        };
        report(&format!("cooccurrence_window {w:>2}"), &cfg);
    }
    for n in [10, 20, 30, 50] {
        let cfg = RecsConfig {
            max_neighbours: n,
            serve_neighbours: n.min(20),
            ..RecsConfig::default()
        };
        report(&format!("max_neighbours {n:>2}"), &cfg);
    }
}

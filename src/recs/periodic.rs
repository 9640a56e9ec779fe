//! The periodic rebuild inside `streamscore run`: one rebuild at a time,
//! every `recs.rebuild_interval`; a failed one leaves the previous
//! generation serving, is counted, and is retried sooner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use anyhow::Context;

use super::{publish, replay};
use crate::config::Config;
use crate::metrics::Metrics;

/// Wait before retrying a failed rebuild (or the interval, if shorter).
const RETRY: Duration = Duration::from_secs(60);

fn show(metrics: &Metrics, m: &publish::Meta) {
    metrics.recs_generation.set(m.generation as i64);
    metrics.recs_built_at.set(m.built_at / 1000);
    metrics.recs_users.set(m.users as i64);
}

/// One rebuild on a thread and a runtime of its own, `recs.nice` below the
/// stream: everything it starts (the replay, fold and merge threads, the ranking
/// threads, its Kafka clients' threads, the Redis writer's tasks) inherits
/// that priority, and none of it runs on the stream's runtime. Measured
/// (docs/BENCHMARKS.md, "Scoring during a periodic rebuild"): a small
/// gain, the shared broker and Redis being most of the rebuild's cost to
/// the stream on one machine.
async fn rebuild_niced(
    cfg: &Config,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<(publish::Meta, replay::ReplayStats)> {
    let nice = cfg.recs.nice;
    let cfg = cfg.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("streamscore-rebuild".into())
        .spawn(move || {
            if !crate::priority::lower_thread_priority(nice) {
                tracing::warn!(nice, "could not lower the rebuild's priority");
            }
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let result = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("streamscore-rebuild")
                .enable_all()
                .build()
                .context("starting the rebuild's runtime")
                .and_then(|rt| rt.block_on(super::rebuild_once(&cfg, cancel, |_, _| {})));
            // The loop may have stopped; then nothing waits for this.
            let _ = tx.send(result);
        })
        .context("starting the rebuild thread")?;
    rx.await
        .context("the rebuild thread ended without a result")?
}

/// Runs until `shutdown`. A rebuild in progress at shutdown is abandoned
/// (nothing of it is published after `recs:meta`, which it writes last).
pub async fn run(cfg: Config, metrics: Metrics, shutdown: CancellationToken) {
    let interval = cfg.recs.rebuild_interval;
    if interval.is_zero() {
        return;
    }
    // Due now unless Redis holds a generation younger than the interval.
    let mut wait = Duration::ZERO;
    match publish::current_meta(&cfg).await {
        Ok(Some(m)) => {
            show(&metrics, &m);
            let age = Duration::from_millis((crate::now_ms() - m.built_at).max(0) as u64);
            wait = interval.saturating_sub(age);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "reading recs:meta; rebuilding now"
        ),
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (cancel, shutdown) = (cancel.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                cancel.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        let result = rebuild_niced(&cfg, cancel).await;
        watcher.abort();
        match result {
            Ok((meta, stats)) => {
                let secs = started.elapsed().as_secs_f64();
                metrics.recs_rebuild_duration.observe(secs);
                metrics.recs_rebuild_events.inc_by(stats.events);
                show(&metrics, &meta);
                tracing::info!(
                    generation = meta.generation,
                    users = meta.users,
                    events = stats.events,
                    skipped_invalid = stats.skipped_invalid,
                    seconds = secs,
                    "recommendations rebuilt from the log"
                );
                wait = interval;
            }
            Err(e) => {
                if shutdown.is_cancelled() {
                    return;
                }
                metrics.recs_rebuild_failures.inc();
                wait = interval.min(RETRY);
                tracing::warn!(error = format!("{e:#}"), retry_in = ?wait,
                    "recommendation rebuild failed; the previous generation keeps serving");
            }
        }
    }
}

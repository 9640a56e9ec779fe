//! One rebuild end to end: replay ∥ fold ∥ merge, then rank ∥ publish
//! (docs/RECOMMENDATIONS.md, "How a rebuild runs").

use super::{publish, replay, Builder, Encoded, FoldBatch};

/// Parsed interactions handed from the replay to the fold thread at once.
const FOLD_BATCH: usize = 4_096;

/// Users ranked per chunk handed to the publisher.
const RANK_CHUNK: usize = 10_000;

/// One rebuild: replays the whole `interactions` log, ranks, and publishes
/// the next generation. `progress(done, total)` is called now and then
/// from the replay thread; setting `cancel` aborts the replay (nothing is
/// published then, the previous generation stays).
///
/// Stages overlap: the replay thread reads and parses while a fold thread
/// folds (bounded channel) and a merge thread merges the fold's pairs into
/// the neighbour lists (two pair buffers); then ranking threads rank users in
/// chunks, in user id order, and encode their records, while the publisher
/// writes the previous chunk to the topic and Redis.
pub async fn rebuild_once(
    cfg: &crate::config::Config,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    progress: impl FnMut(u64, u64) + Send + 'static,
) -> anyhow::Result<(publish::Meta, replay::ReplayStats)> {
    use anyhow::Context;
    let kafka = cfg.kafka.clone();
    let topic = cfg.topic(crate::topics::INTERACTIONS);
    let limits = crate::events::Limits::from_config(&cfg.processing);
    let recs_cfg = cfg.recs.clone();
    // Redis is needed to publish: a rebuild that cannot reach it stops
    // now, not after the replay.
    publish::current_meta(cfg)
        .await
        .context("reading recs:meta before the replay")?;
    let started = std::time::Instant::now();
    let (ranker, stats, fold_finish_secs) = tokio::task::spawn_blocking(move || {
        let (tx, rx) = std::sync::mpsc::sync_channel::<FoldBatch>(64);
        // The fold is the replay phase's longest chain: merging its pairs
        // into the neighbour lists goes to a thread of its own.
        let mut b = Builder::with_merge_thread(&recs_cfg).context("starting the merge thread")?;
        let folder = std::thread::Builder::new()
            .name("rebuild-fold".into())
            .spawn(move || {
                for batch in rx {
                    b.add_batch(&batch);
                }
                b
            })
            .context("starting the fold thread")?;
        let mut batch = FoldBatch::with_capacity(FOLD_BATCH);
        let read = replay::read_all(
            &kafka,
            &topic,
            &limits,
            &cancel,
            |e| {
                batch.push(&e.user_id, &e.item_id, e.kind, e.event_time);
                // Sent by count, or by size (offsets are u32; ids can be
                // as long as a message).
                if batch.len() >= FOLD_BATCH || batch.text_len() >= 1 << 26 {
                    let full = std::mem::replace(&mut batch, FoldBatch::with_capacity(FOLD_BATCH));
                    // Fails only when the fold thread is gone (a panic,
                    // reported by the join below).
                    let _ = tx.send(full);
                }
            },
            progress,
        );
        if !batch.is_empty() {
            let _ = tx.send(batch);
        }
        drop(tx);
        let b = folder
            .join()
            .map_err(|_| anyhow::anyhow!("the rebuild's fold thread panicked"))?;
        let stats = read?;
        let finishing = std::time::Instant::now();
        let ranker = b.into_ranker();
        anyhow::Ok((ranker, stats, finishing.elapsed().as_secs_f64()))
    })
    .await
    .context("rebuild task")??;
    let replay_secs = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let ranker = std::sync::Arc::new(ranker);
    let mut publisher =
        publish::Publisher::start(cfg, stats.ranges.clone(), crate::now_ms()).await?;
    let tail = publisher.record_tail();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Encoded>(4);
    // Published parts come back to be written into again.
    let (back, spares) = std::sync::mpsc::channel::<Encoded>();
    let r = ranker.clone();
    let ranking = tokio::task::spawn_blocking(move || {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = std::time::Instant::now();
        let n = r.user_count();
        let mut from = 0;
        while from < n {
            let to = (from + RANK_CHUNK).min(n);
            let mut spare: Vec<Encoded> = spares.try_iter().collect();
            for part in r.encode(from..to, threads, &tail, &mut spare) {
                if tx.blocking_send(part).is_err() {
                    // The publisher failed; its error is reported.
                    return busy.elapsed().as_secs_f64();
                }
            }
            from = to;
        }
        busy.elapsed().as_secs_f64()
    });
    while let Some(part) = rx.recv().await {
        publisher.encoded(&part).await?;
        // Fails only once ranking is over.
        let _ = back.send(part);
    }
    let rank_secs = ranking.await.context("ranking task")?;
    let publish_wait = publisher.wait;
    let finishing = std::time::Instant::now();
    let meta = publisher.finish_ranked(&ranker).await?;
    tracing::info!(
        replay_seconds = replay_secs,
        fold_finish_seconds = fold_finish_secs,
        rank_seconds = rank_secs,
        finish_seconds = finishing.elapsed().as_secs_f64(),
        rank_and_publish_seconds = started.elapsed().as_secs_f64(),
        publish_wait_seconds = publish_wait.as_secs_f64(),
        users = meta.users,
        "rebuild phases"
    );
    Ok((meta, stats))
}

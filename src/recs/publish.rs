//! Publishes one generation of candidates: every user's record to the
//! compacted `recommendations` topic (key user id), then Redis
//! `recs:{user_id}` and `recs:popular` with the configured TTL, and
//! `recs:meta` last, so a reader that sees a generation in `recs:meta` finds
//! all of it.

use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{FutureProducer, Producer};
use serde::{Deserialize, Serialize};

use super::replay::Range;
use super::{Candidates, Scored, Source};
use crate::config::Config;
use crate::kafka::{self, produce};
use crate::sinks::redis::{item_neighbours_key, recs_key, recs_meta_key, recs_popular_key};
use crate::topics;

/// One user's record (schemas/recommendation.json).
#[derive(Debug, Serialize)]
pub struct RecRecord<'a> {
    pub user_id: &'a str,
    pub items: &'a [Scored],
    pub source: Source,
    pub generation: u64,
    pub built_at: i64,
    pub offsets: &'a [Range],
}

/// `recs:meta`: which generation Redis holds and what it covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub generation: u64,
    pub built_at: i64,
    pub offsets: Vec<Range>,
    pub users: usize,
    pub events: u64,
    pub items: usize,
    /// FNV-1a 64 of every user's ranked items (hex): equal for equal
    /// candidates, whatever the generation and build time.
    pub digest: String,
}

/// FNV-1a 64 over the candidates' canonical text.
pub fn digest(c: &Candidates) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: &[u8]| {
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for u in &c.users {
        feed(u.user_id.as_bytes());
        feed(if u.source == Source::Batch {
            b"B"
        } else {
            b"P"
        });
        for s in &u.items {
            feed(s.item_id.as_bytes());
            feed(format!("{:.6}", s.score).as_bytes());
        }
        feed(b"\n");
    }
    for s in &c.popular {
        feed(s.item_id.as_bytes());
        feed(format!("{:.6}", s.score).as_bytes());
    }
    for (item, list) in &c.neighbours {
        feed(b"\n");
        feed(item.as_bytes());
        for s in list {
            feed(s.item_id.as_bytes());
            feed(format!("{:.6}", s.score).as_bytes());
        }
    }
    format!("{h:016x}")
}

async fn redis_conn(cfg: &Config) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(cfg.redis.url.as_str())
        .map_err(|e| anyhow::anyhow!("redis.url: {e}"))?;
    client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")
}

/// The generation Redis holds now, if any.
pub async fn current_meta(cfg: &Config) -> anyhow::Result<Option<Meta>> {
    super::store::read_meta(&mut redis_conn(cfg).await?, &cfg.redis.key_prefix).await
}

/// Writes one generation's values into a pipeline: field `generation` of
/// `key` (a hash), the field two generations back dropped (the current one
/// stays until `recs:meta` names the new one), TTL renewed.
fn hset_generation(
    pipe: &mut redis::Pipeline,
    key: String,
    generation: u64,
    json: &[u8],
    ttl: u64,
) {
    pipe.cmd("HSET")
        .arg(&key)
        .arg(generation)
        .arg(json)
        .ignore();
    if generation >= 2 {
        pipe.cmd("HDEL").arg(&key).arg(generation - 2).ignore();
    }
    pipe.cmd("EXPIRE").arg(key).arg(ttl).ignore();
}

/// Publishes `c` as the next generation; returns its `recs:meta`.
///
/// Every Redis value of a generation is a field named by the generation
/// number in a hash (`recs:{user}`, `recs:popular`,
/// `item:{item}:neighbours`); readers take the field that `recs:meta`
/// names, and `recs:meta` is written last. A rebuild that dies half-way
/// has only added fields nobody reads: the previous generation stays whole.
/// On the topic, the generation is one Kafka transaction
/// (`recs.topic_transactions`): a reader with `isolation.level=read_committed`
/// never sees half of one. Without it (brokers without transactions) a dead
/// rebuild leaves part of its generation on the topic, recognisable by a
/// `generation` above the one `recs:meta` names.
pub async fn publish(
    cfg: &Config,
    c: &Candidates,
    offsets: Vec<Range>,
    built_at: i64,
) -> anyhow::Result<Meta> {
    let prefix = &cfg.redis.key_prefix;
    let mut con = redis_conn(cfg).await?;
    let generation = super::store::read_meta(&mut con, prefix)
        .await?
        .map_or(1, |m| m.generation + 1);
    let topic = cfg.topic(topics::RECOMMENDATIONS);
    let transactional = cfg.recs.topic_transactions;
    let producer = if transactional {
        let p = transactional_producer(cfg).await?;
        p.begin_transaction()
            .context("beginning the recommendations transaction")?;
        p
    } else {
        kafka::producer_config(&cfg.kafka)
            .create()
            .context("creating the Kafka producer")?
    };
    let ttl = cfg.recs.ttl.as_secs().max(1);
    let kafka_timeout = Duration::from_secs(30);
    // Topic and Redis, in chunks (bounded memory), every write acknowledged.
    for chunk in c.users.chunks(1_000) {
        let mut futs = Vec::with_capacity(chunk.len());
        let mut pipe = redis::pipe();
        for u in chunk {
            let rec = RecRecord {
                user_id: &u.user_id,
                items: &u.items,
                source: u.source,
                generation,
                built_at,
                offsets: &offsets,
            };
            let json = serde_json::to_vec(&rec).context("serialising a recommendation")?;
            futs.push(
                produce::enqueue(&producer, &topic, u.user_id.as_bytes(), &json, None)
                    .await
                    .with_context(|| format!("producing to {topic}"))?,
            );
            hset_generation(
                &mut pipe,
                recs_key(prefix, &u.user_id),
                generation,
                &json,
                ttl,
            );
        }
        for f in futs {
            produce::acknowledged(f)
                .await
                .with_context(|| format!("delivering to {topic}"))?;
        }
        pipe.query_async::<()>(&mut con)
            .await
            .context("writing recs:{user} to Redis")?;
    }
    for chunk in c.neighbours.chunks(1_000) {
        let mut pipe = redis::pipe();
        for (item, list) in chunk {
            let json = serde_json::to_vec(list).context("serialising neighbours")?;
            hset_generation(
                &mut pipe,
                item_neighbours_key(prefix, item),
                generation,
                &json,
                ttl,
            );
        }
        pipe.query_async::<()>(&mut con)
            .await
            .context("writing item neighbours to Redis")?;
    }
    let popular = serde_json::json!({
        "items": c.popular,
        "source": "popular",
        "generation": generation,
        "built_at": built_at,
    });
    let mut pipe = redis::pipe();
    hset_generation(
        &mut pipe,
        recs_popular_key(prefix),
        generation,
        popular.to_string().as_bytes(),
        ttl,
    );
    pipe.query_async::<()>(&mut con)
        .await
        .context("writing recs:popular")?;
    // The topic's generation becomes visible, then Redis' (a crash between
    // the two leaves Redis one generation behind the topic, never ahead).
    let p = producer.clone();
    if transactional {
        tokio::task::spawn_blocking(move || p.commit_transaction(kafka_timeout))
            .await
            .context("commit task")?
            .context(
                "committing the recommendations transaction (a broker without transactions needs recs.topic_transactions = false)",
            )?;
    } else {
        tokio::task::spawn_blocking(move || p.flush(kafka_timeout))
            .await
            .context("flush task")?
            .context("flushing the recommendations producer")?;
    }
    let meta = Meta {
        generation,
        built_at,
        offsets,
        users: c.users.len(),
        events: c.events,
        items: c.items,
        digest: digest(c),
    };
    redis::cmd("SET")
        .arg(recs_meta_key(prefix))
        .arg(serde_json::to_string(&meta).context("serialising recs:meta")?)
        .arg("EX")
        .arg(ttl)
        .query_async::<()>(&mut con)
        .await
        .context("writing recs:meta")?;
    Ok(meta)
}

/// The producer of the `recommendations` topic: transactional, with a fixed
/// id per consumer group, so starting it fences (and aborts) the open
/// transaction of a rebuild that died.
async fn transactional_producer(cfg: &Config) -> anyhow::Result<FutureProducer> {
    let id = format!("{}.recs-publisher", cfg.kafka.group_id);
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka)
        .set("transactional.id", &id)
        .create()
        .context("creating the Kafka producer")?;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30)))
        .await
        .context("init task")?
        .with_context(|| format!("initialising Kafka transactions (transactional.id {id})"))?;
    Ok(producer)
}

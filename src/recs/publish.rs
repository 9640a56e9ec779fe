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
use super::{Candidates, Scored, Source, UserRecs};
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

/// FNV-1a 64 over the candidates (ids, sources, scores in millionths).
pub fn digest(c: &Candidates) -> String {
    let mut d = Digest::new();
    d.users(&c.users);
    d.popular(&c.popular);
    d.neighbours(&c.neighbours);
    d.hex()
}

/// [`digest`], fed in parts: users (in order, in chunks), then the popular
/// list, then the item neighbours.
pub struct Digest(u64);

impl Digest {
    pub fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    fn feed(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= u64::from(*x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn scored(&mut self, list: &[Scored]) {
        for s in list {
            self.feed(s.item_id.as_bytes());
            // Scores are rounded to 6 decimals: their millionths are exact
            // (and far cheaper than formatting the text).
            self.feed(&((s.score * 1e6).round() as i64).to_le_bytes());
        }
    }

    pub fn users(&mut self, users: &[UserRecs]) {
        for u in users {
            self.feed(u.user_id.as_bytes());
            self.feed(if u.source == Source::Batch {
                b"B"
            } else {
                b"P"
            });
            self.scored(&u.items);
            self.feed(b"\n");
        }
    }

    pub fn popular(&mut self, popular: &[Scored]) {
        self.scored(popular);
    }

    pub fn neighbours(&mut self, neighbours: &[(String, Vec<Scored>)]) {
        for (item, list) in neighbours {
            self.feed(b"\n");
            self.feed(item.as_bytes());
            self.scored(list);
        }
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

impl Default for Digest {
    fn default() -> Self {
        Digest::new()
    }
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

/// Users per chunk: their topic records are produced together, and once
/// all are delivered their Redis values go in one pipeline.
const CHUNK: usize = 1_000;
/// Chunks that may be in flight at once (20,000 users: bounded memory,
/// and librdkafka batches meanwhile).
const CHUNKS_IN_FLIGHT: usize = 20;

/// Publishes one generation in parts: [`Publisher::users`] for each chunk
/// of users (in user id order), then [`Publisher::finish`].
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
pub struct Publisher {
    con: redis::aio::MultiplexedConnection,
    producer: FutureProducer,
    transactional: bool,
    topic: String,
    prefix: String,
    generation: u64,
    built_at: i64,
    offsets: Vec<Range>,
    ttl: u64,
    digest: Digest,
    users: usize,
    /// Chunks in flight: each task awaits its topic deliveries, then
    /// writes its Redis pipeline (Redis never holds a value whose topic
    /// record was not delivered), while the next users are serialised.
    in_flight: std::collections::VecDeque<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Time spent waiting for chunks in flight (topic and Redis).
    pub wait: Duration,
}

impl Publisher {
    /// Reads the current generation from Redis and opens the topic's
    /// producer (and transaction) for the next one.
    pub async fn start(cfg: &Config, offsets: Vec<Range>, built_at: i64) -> anyhow::Result<Self> {
        let prefix = cfg.redis.key_prefix.clone();
        let mut con = redis_conn(cfg).await?;
        let generation = super::store::read_meta(&mut con, &prefix)
            .await?
            .map_or(1, |m| m.generation + 1);
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
        Ok(Publisher {
            con,
            producer,
            transactional,
            topic: cfg.topic(topics::RECOMMENDATIONS),
            prefix,
            generation,
            built_at,
            offsets,
            ttl: cfg.recs.ttl.as_secs().max(1),
            digest: Digest::new(),
            users: 0,
            in_flight: std::collections::VecDeque::new(),
            wait: Duration::ZERO,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next users (in user id order) to the topic and Redis, in
    /// chunks of 1,000; at most 20 chunks unfinished.
    pub async fn users(&mut self, users: &[UserRecs]) -> anyhow::Result<()> {
        self.digest.users(users);
        self.users += users.len();
        for chunk in users.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            let mut deliveries = Vec::with_capacity(chunk.len());
            for u in chunk {
                let rec = RecRecord {
                    user_id: &u.user_id,
                    items: &u.items,
                    source: u.source,
                    generation: self.generation,
                    built_at: self.built_at,
                    offsets: &self.offsets,
                };
                let json = serde_json::to_vec(&rec).context("serialising a recommendation")?;
                deliveries.push(
                    produce::enqueue(
                        &self.producer,
                        &self.topic,
                        u.user_id.as_bytes(),
                        &json,
                        None,
                    )
                    .await
                    .with_context(|| format!("producing to {}", self.topic))?,
                );
                hset_generation(
                    &mut pipe,
                    recs_key(&self.prefix, &u.user_id),
                    self.generation,
                    &json,
                    self.ttl,
                );
            }
            let mut con = self.con.clone();
            let topic = self.topic.clone();
            self.in_flight.push_back(tokio::spawn(async move {
                for f in deliveries {
                    produce::acknowledged(f)
                        .await
                        .with_context(|| format!("delivering to {topic}"))?;
                }
                pipe.query_async::<()>(&mut con)
                    .await
                    .context("writing recs:{user} to Redis")
            }));
            let t = std::time::Instant::now();
            while self.in_flight.len() > CHUNKS_IN_FLIGHT {
                self.oldest_done().await?;
            }
            self.wait += t.elapsed();
        }
        Ok(())
    }

    /// Waits for the oldest chunk in flight.
    async fn oldest_done(&mut self) -> anyhow::Result<()> {
        if let Some(h) = self.in_flight.pop_front() {
            h.await.context("publishing task")??;
        }
        Ok(())
    }

    /// Item neighbours and the popular list to Redis, every topic record
    /// acknowledged (and the transaction committed), then `recs:meta`.
    pub async fn finish(
        mut self,
        popular: &[Scored],
        neighbours: &[(String, Vec<Scored>)],
        events: u64,
        items: usize,
    ) -> anyhow::Result<Meta> {
        let (generation, ttl, prefix) = (self.generation, self.ttl, self.prefix.clone());
        while !self.in_flight.is_empty() {
            self.oldest_done().await?;
        }
        for chunk in neighbours.chunks(1_000) {
            let mut pipe = redis::pipe();
            for (item, list) in chunk {
                let json = serde_json::to_vec(list).context("serialising neighbours")?;
                hset_generation(
                    &mut pipe,
                    item_neighbours_key(&prefix, item),
                    generation,
                    &json,
                    ttl,
                );
            }
            pipe.query_async::<()>(&mut self.con)
                .await
                .context("writing item neighbours to Redis")?;
        }
        let popular_json = serde_json::json!({
            "items": popular,
            "source": "popular",
            "generation": generation,
            "built_at": self.built_at,
        });
        let mut pipe = redis::pipe();
        hset_generation(
            &mut pipe,
            recs_popular_key(&prefix),
            generation,
            popular_json.to_string().as_bytes(),
            ttl,
        );
        pipe.query_async::<()>(&mut self.con)
            .await
            .context("writing recs:popular")?;
        // The topic's generation becomes visible, then Redis' (a crash
        // between the two leaves Redis one generation behind the topic,
        // never ahead).
        let kafka_timeout = Duration::from_secs(30);
        let p = self.producer.clone();
        if self.transactional {
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
        self.digest.popular(popular);
        self.digest.neighbours(neighbours);
        let meta = Meta {
            generation,
            built_at: self.built_at,
            offsets: self.offsets,
            users: self.users,
            events,
            items,
            digest: self.digest.hex(),
        };
        redis::cmd("SET")
            .arg(recs_meta_key(&prefix))
            .arg(serde_json::to_string(&meta).context("serialising recs:meta")?)
            .arg("EX")
            .arg(ttl)
            .query_async::<()>(&mut self.con)
            .await
            .context("writing recs:meta")?;
        Ok(meta)
    }
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

//! Publishes one generation of candidates: every user's record to the
//! compacted `recommendations` topic (key user id), then Redis
//! `recs:{user_id}` and `recs:popular` with the configured TTL, and
//! `recs:meta` last, so a reader that sees a generation in `recs:meta` finds
//! all of it.

use std::time::Duration;

use anyhow::Context;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};

use super::replay::Range;
use super::{Candidates, Encoded, Scored, Source, UserRecs};
use crate::config::Config;
use crate::kafka::{self, produce};
use crate::sinks::redis::{item_neighbours_key, recs_meta_key, recs_popular_key};
use crate::sinks::redis_bulk::{push_hset_expire_parts, BulkWriter};
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

/// The generation's digest of the candidates: [`Digest`] fed every
/// user's list, the popular list and the item neighbours.
pub fn digest(c: &Candidates) -> String {
    let mut d = Digest::new();
    d.users(&c.users);
    d.popular(&c.popular);
    d.neighbours(&c.neighbours);
    d.hex()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv(mut h: u64, b: &[u8]) -> u64 {
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// One FNV-1a step over a 64-bit word.
fn mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(FNV_PRIME)
}

/// FNV-1a 64 of an item id (what [`user_hash`] takes for each item; the
/// ranker computes it once per item).
pub fn name_hash(name: &str) -> u64 {
    fnv(FNV_OFFSET, name.as_bytes())
}

/// A score's millionths (scores are rounded to 6 decimals: exact, and far
/// cheaper to hash than their text).
fn millionths(score: f64) -> i64 {
    (score * 1e6).round() as i64
}

/// The hash of one user's list: FNV-1a 64 of their id, then FNV-1a steps
/// over 64-bit words: the source, then each item's [`name_hash`] and score
/// in millionths. Computed by the ranking threads; [`Digest`] chains them
/// in user id order.
pub fn user_hash(user_id: &str, source: Source, items: impl Iterator<Item = (u64, f64)>) -> u64 {
    let mut h = fnv(FNV_OFFSET, user_id.as_bytes());
    h = mix(h, if source == Source::Batch { 1 } else { 2 });
    for (name, score) in items {
        h = mix(mix(h, name), millionths(score) as u64);
    }
    h
}

/// FNV-1a 64 over the [`user_hash`] of every user (in user id order), then
/// the popular list and the item neighbours: equal candidates give equal
/// digests, whatever the generation, build time or thread count.
pub struct Digest(u64);

impl Digest {
    pub fn new() -> Digest {
        Digest(FNV_OFFSET)
    }

    fn feed(&mut self, b: &[u8]) {
        self.0 = fnv(self.0, b);
    }

    fn scored(&mut self, list: &[Scored]) {
        for s in list {
            self.feed(s.item_id.as_bytes());
            self.feed(&millionths(s.score).to_le_bytes());
        }
    }

    pub fn users(&mut self, users: &[UserRecs]) {
        for u in users {
            self.user_hashes(&[user_hash(
                &u.user_id,
                u.source,
                u.items.iter().map(|s| (name_hash(&s.item_id), s.score)),
            )]);
        }
    }

    /// The next users, given by their [`user_hash`].
    pub fn user_hashes(&mut self, hashes: &[u64]) {
        for h in hashes {
            self.feed(&h.to_le_bytes());
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

/// The fields after `source` of every record of one generation, closing
/// brace included: on the topic (generation, built-at, the offsets
/// covered), and in Redis, where `recs:meta` holds the offsets (generation
/// and built-at: a fifth less to store per user).
fn record_tails(
    generation: u64,
    built_at: i64,
    offsets: &[Range],
) -> anyhow::Result<(String, String)> {
    #[derive(Serialize)]
    struct Tail<'a> {
        generation: u64,
        built_at: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        offsets: Option<&'a [Range]>,
    }
    let tail = |offsets| {
        serde_json::to_string(&Tail {
            generation,
            built_at,
            offsets,
        })
        .map(|t| format!(",{}", &t[1..]))
        .context("serialising the records' offsets")
    };
    Ok((tail(Some(offsets))?, tail(None)?))
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

/// The hash field that holds generation `generation`'s value: its parity.
/// Two fields per key, double-buffered: generation N+1 is written over
/// N−1 while N, the one `recs:meta` names, stays whole. (A field per
/// generation number needed a third command per key to drop N−1: with a
/// million users, a third of the rebuild's Redis commands.)
pub fn generation_field(generation: u64) -> u64 {
    generation % 2
}

/// Appends one generation's value (the concatenation of `json`) as RESP:
/// field [`generation_field`] of `key` (a hash), TTL renewed.
fn hset_generation(buf: &mut Vec<u8>, key: &[u8], generation: u64, json: &[&[u8]], ttl: u64) {
    push_hset_expire_parts(buf, key, generation_field(generation), json, ttl);
}

/// The delivery reports of one chunk's topic records, counted down by
/// the producer's polling thread (one counter per chunk, not a future per
/// record: the publisher sends a million records per rebuild).
struct ChunkAcks {
    pending: AtomicUsize,
    /// The first delivery error.
    error: Mutex<Option<KafkaError>>,
    done: tokio::sync::Notify,
}

impl ChunkAcks {
    fn new(records: usize) -> Arc<ChunkAcks> {
        Arc::new(ChunkAcks {
            pending: AtomicUsize::new(records),
            error: Mutex::new(None),
            done: tokio::sync::Notify::new(),
        })
    }

    fn report(&self, error: Option<&KafkaError>) {
        if let Some(e) = error {
            if let Ok(mut first) = self.error.lock() {
                first.get_or_insert_with(|| e.clone());
            }
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Stores a permit if nobody waits yet.
            self.done.notify_one();
        }
    }

    /// Waits for every record of the chunk; the first delivery error.
    async fn delivered(&self) -> Result<(), KafkaError> {
        if self.pending.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
        match self.error.lock().ok().and_then(|mut e| e.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Producer context of the recommendations topic: delivery reports go to
/// their chunk's [`ChunkAcks`].
struct RecsProducerContext;

impl ClientContext for RecsProducerContext {}

impl ProducerContext for RecsProducerContext {
    type DeliveryOpaque = Arc<ChunkAcks>;

    fn delivery(&self, result: &DeliveryResult<'_>, chunk: Arc<ChunkAcks>) {
        chunk.report(result.as_ref().err().map(|(e, _)| e));
    }
}

type RecsProducer = ThreadedProducer<RecsProducerContext>;

/// Users per chunk: their topic records are produced together, and once
/// all are delivered their Redis values are sent together.
const CHUNK: usize = 1_000;
/// Chunks that may be in flight at once (20,000 users: bounded memory,
/// and librdkafka batches meanwhile).
const CHUNKS_IN_FLIGHT: usize = 20;

/// Publishes one generation in parts: [`Publisher::encoded`] for each chunk
/// of users (in user id order), then [`Publisher::finish`].
///
/// Every Redis value of a generation is a field of a hash (`recs:{user}`,
/// `recs:popular`, `item:{item}:neighbours`), the field of the
/// generation's parity ([`generation_field`]); readers take the field of
/// the generation `recs:meta` names (and check the generation the value
/// carries), and `recs:meta` is written last. A rebuild that dies half-way
/// has only overwritten fields of the generation before the current one,
/// which nobody reads: the current generation stays whole.
/// On the topic, the generation is one Kafka transaction
/// (`recs.topic_transactions`): a reader with `isolation.level=read_committed`
/// never sees half of one. Without it (brokers without transactions) a dead
/// rebuild leaves part of its generation on the topic, recognisable by a
/// `generation` above the one `recs:meta` names.
pub struct Publisher {
    /// `recs:meta` is read and written through it.
    con: redis::aio::MultiplexedConnection,
    /// Every other value of the generation goes through it.
    bulk: BulkWriter,
    producer: RecsProducer,
    transactional: bool,
    topic: String,
    prefix: String,
    generation: u64,
    built_at: i64,
    offsets: Vec<Range>,
    /// What every topic record of the generation ends with
    /// ([`record_tails`]).
    tail: String,
    /// What every Redis copy ends with instead: no offsets.
    redis_tail: String,
    ttl: u64,
    digest: Digest,
    users: usize,
    /// Chunks whose topic records are on their way, oldest first, each with
    /// its Redis commands (RESP), sent once the records are delivered
    /// (Redis never holds a value whose topic record was not delivered),
    /// while the next users are produced.
    in_flight: std::collections::VecDeque<Chunk>,
    /// Command buffers sent, to be written into again.
    spare: Vec<Vec<u8>>,
    /// Time spent waiting for chunks in flight (topic and Redis).
    pub wait: Duration,
}

struct Chunk {
    acks: Arc<ChunkAcks>,
    resp: Vec<u8>,
    commands: u64,
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
        let bulk = BulkWriter::connect(&cfg.redis.url).await?;
        let (tail, redis_tail) = record_tails(generation, built_at, &offsets)?;
        let transactional = cfg.recs.topic_transactions;
        let producer = if transactional {
            let p = transactional_producer(cfg).await?;
            p.begin_transaction()
                .context("beginning the recommendations transaction")?;
            p
        } else {
            producer_config(cfg)
                .create_with_context(RecsProducerContext)
                .context("creating the Kafka producer")?
        };
        Ok(Publisher {
            con,
            bulk,
            producer,
            transactional,
            topic: cfg.topic(topics::RECOMMENDATIONS),
            prefix,
            generation,
            built_at,
            offsets,
            tail,
            redis_tail,
            ttl: cfg.recs.ttl.as_secs().max(1),
            digest: Digest::new(),
            users: 0,
            in_flight: std::collections::VecDeque::new(),
            spare: Vec::new(),
            wait: Duration::ZERO,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The fields of every record of this generation after `source`,
    /// closing brace included (what [`super::Ranker::encode`] appends).
    pub fn record_tail(&self) -> String {
        self.tail.clone()
    }

    /// The next users' encoded records (in user id order) to the topic and
    /// Redis, in chunks of 1,000; at most 20 chunks unfinished.
    pub async fn encoded(&mut self, users: &Encoded) -> anyhow::Result<()> {
        self.digest.user_hashes(&users.hashes);
        self.users += users.len();
        let records: Vec<(&[u8], &[u8])> = users.records().collect();
        let mut key = format!("{}recs:", self.prefix).into_bytes();
        let key_prefix = key.len();
        for chunk in records.chunks(CHUNK) {
            let mut resp = self.spare.pop().unwrap_or_default();
            resp.clear();
            let acks = ChunkAcks::new(chunk.len());
            for (user, json) in chunk {
                let head = json
                    .strip_suffix(self.tail.as_bytes())
                    .context("a ranked record without its generation's tail")?;
                let rec = BaseRecord::with_opaque_to(&self.topic, acks.clone())
                    .key(*user)
                    .payload(*json);
                produce::enqueue_threaded(&self.producer, rec)
                    .await
                    .with_context(|| format!("producing to {}", self.topic))?;
                key.truncate(key_prefix);
                key.extend_from_slice(user);
                hset_generation(
                    &mut resp,
                    &key,
                    self.generation,
                    &[head, self.redis_tail.as_bytes()],
                    self.ttl,
                );
            }
            self.in_flight.push_back(Chunk {
                acks,
                resp,
                commands: 2 * chunk.len() as u64,
            });
            let t = std::time::Instant::now();
            while self.in_flight.len() > CHUNKS_IN_FLIGHT {
                self.oldest_done().await?;
            }
            self.wait += t.elapsed();
        }
        Ok(())
    }

    /// Waits for the oldest chunk's topic deliveries, then sends its Redis
    /// commands.
    async fn oldest_done(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.in_flight.pop_front() {
            c.acks
                .delivered()
                .await
                .with_context(|| format!("delivering to {}", self.topic))?;
            self.bulk
                .send(&c.resp, c.commands)
                .await
                .context("writing recs:{user} to Redis")?;
            self.spare.push(c.resp);
        }
        Ok(())
    }

    /// [`Publisher::finish`] with what `ranker` folded: its popular list,
    /// the neighbours it serves, its event and item counts.
    pub async fn finish_ranked(self, ranker: &super::Ranker) -> anyhow::Result<Meta> {
        let neighbours = ranker.serve_neighbours();
        self.finish(
            ranker.popular(),
            &neighbours,
            ranker.events(),
            ranker.items(),
        )
        .await
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
        let mut resp = self.spare.pop().unwrap_or_default();
        for chunk in neighbours.chunks(1_000) {
            resp.clear();
            for (item, list) in chunk {
                let json = serde_json::to_vec(list).context("serialising neighbours")?;
                hset_generation(
                    &mut resp,
                    item_neighbours_key(&prefix, item).as_bytes(),
                    generation,
                    &[&json],
                    ttl,
                );
            }
            self.bulk
                .send(&resp, 2 * chunk.len() as u64)
                .await
                .context("writing item neighbours to Redis")?;
        }
        let popular_json = serde_json::json!({
            "items": popular,
            "source": "popular",
            "generation": generation,
            "built_at": self.built_at,
        });
        resp.clear();
        hset_generation(
            &mut resp,
            recs_popular_key(&prefix).as_bytes(),
            generation,
            &[popular_json.to_string().as_bytes()],
            ttl,
        );
        self.bulk
            .send(&resp, 2)
            .await
            .context("writing recs:popular")?;
        // Every value of the generation answered by Redis without an error.
        self.bulk
            .finish()
            .await
            .context("writing the generation to Redis")?;
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

/// The configuration of the `recommendations` producer: `[kafka.producer]`,
/// then `recs.compression`.
pub fn producer_config(cfg: &Config) -> rdkafka::ClientConfig {
    let mut cc = kafka::producer_config(&cfg.kafka);
    cc.set("compression.type", cfg.recs.compression.as_str());
    cc
}

/// The producer of the `recommendations` topic: transactional, with a fixed
/// id per consumer group, so starting it fences (and aborts) the open
/// transaction of a rebuild that died.
async fn transactional_producer(cfg: &Config) -> anyhow::Result<RecsProducer> {
    let id = format!("{}.recs-publisher", cfg.kafka.group_id);
    let producer: RecsProducer = producer_config(cfg)
        .set("transactional.id", &id)
        .create_with_context(RecsProducerContext)
        .context("creating the Kafka producer")?;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30)))
        .await
        .context("init task")?
        .with_context(|| format!("initialising Kafka transactions (transactional.id {id})"))?;
    Ok(producer)
}

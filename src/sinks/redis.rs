//! Redis: the serving cache of the output topics.
//!
//! Every key streamscore writes is built here, and docs/REDIS.md lists them
//! with their TTLs. Writes are pipelined, one round trip per micro-batch, and
//! idempotent (plain `SET … EX`), so a redelivered batch rewrites the same
//! values.

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::config::RedisConfig;

/// Key of one transaction's score.
pub fn txn_key(prefix: &str, txn_id: &str) -> String {
    format!("{prefix}fraud:txn:{txn_id}")
}

/// Key of a user's latest score.
pub fn user_latest_key(prefix: &str, user_id: &str) -> String {
    format!("{prefix}fraud:user:{user_id}:latest")
}

/// Sets `KEYS[1]` to `ARGV[1]` with TTL `ARGV[3]` unless it holds a score
/// whose `event_time` is newer than `ARGV[2]`.
pub const LATEST_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, d = pcall(cjson.decode, cur)
  if ok and type(d) == 'table' and tonumber(d['event_time']) ~= nil
     and tonumber(d['event_time']) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"#;

/// Key of a user's recommendation candidates: a hash whose fields are
/// generation numbers (the current one is named by `recs:meta`).
pub fn recs_key(prefix: &str, user_id: &str) -> String {
    format!("{prefix}recs:{user_id}")
}

/// Key of the popularity list (the fallback of users without `recs:{id}`).
pub fn recs_popular_key(prefix: &str) -> String {
    format!("{prefix}recs:popular")
}

/// Key of the generation metadata, written after the rest of a generation.
pub fn recs_meta_key(prefix: &str) -> String {
    format!("{prefix}recs:meta")
}

/// Key of an item's strongest co-occurring items (the serving layer's
/// session re-ranking reads these).
pub fn item_neighbours_key(prefix: &str, item_id: &str) -> String {
    format!("{prefix}item:{item_id}:neighbours")
}

/// One score to cache.
#[derive(Debug, Clone)]
pub struct ScoreEntry {
    pub txn_id: String,
    pub user_id: String,
    /// The transaction's event time (orders `:latest`).
    pub event_time: i64,
    /// The score JSON (shared with the Kafka record).
    pub json: std::sync::Arc<[u8]>,
}

/// Pipelined writer of fraud scores.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    prefix: String,
    ttl_secs: u64,
}

impl RedisSink {
    fn client(cfg: &RedisConfig) -> anyhow::Result<redis::Client> {
        redis::Client::open(cfg.url.as_str()).map_err(|e| anyhow::anyhow!("redis.url: {e}"))
    }

    /// Checks `redis.url` without connecting.
    pub fn check_url(cfg: &RedisConfig) -> anyhow::Result<()> {
        Self::client(cfg).map(|_| ())
    }

    /// One bounded connection attempt (a Redis that is down or hung fails
    /// fast; the caller decides when to try again). The error names the
    /// URL's host, never its password.
    pub async fn connect(cfg: &RedisConfig) -> anyhow::Result<RedisSink> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(5));
        let conn = Self::client(cfg)?
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| {
                let host = cfg.url.rsplit('@').next().unwrap_or(&cfg.url);
                anyhow::anyhow!("cannot connect to Redis at {host}: {e}")
            })?;
        Ok(RedisSink {
            conn,
            prefix: cfg.key_prefix.clone(),
            ttl_secs: cfg.score_ttl.as_secs().max(1),
        })
    }

    /// Writes `fraud:txn:{id}` and `fraud:user:{user}:latest` for each entry
    /// in one pipeline. `:latest` is replaced only by a score whose event
    /// time is not older than the one it holds ([`LATEST_SCRIPT`]), so scores
    /// of one user arriving from different partitions, or again after a
    /// crash, never move it back.
    pub async fn write_scores(&self, entries: &[ScoreEntry]) -> redis::RedisResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let script = redis::Script::new(LATEST_SCRIPT);
        let mut pipe = redis::pipe();
        pipe.load_script(&script).ignore();
        for e in entries {
            pipe.cmd("SET")
                .arg(txn_key(&self.prefix, &e.txn_id))
                .arg(&*e.json)
                .arg("EX")
                .arg(self.ttl_secs)
                .ignore();
            pipe.invoke_script(
                script
                    .key(user_latest_key(&self.prefix, &e.user_id))
                    .arg(&*e.json)
                    .arg(e.event_time)
                    .arg(self.ttl_secs),
            )
            .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await
    }
}

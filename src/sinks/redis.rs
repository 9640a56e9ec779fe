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

/// One score to cache.
#[derive(Debug, Clone)]
pub struct ScoreEntry {
    pub txn_id: String,
    pub user_id: String,
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
    /// Connects, retrying until `wait` has passed; the error names the URL's host.
    pub async fn connect(cfg: &RedisConfig, wait: Duration) -> anyhow::Result<RedisSink> {
        let client =
            redis::Client::open(cfg.url.as_str()).map_err(|e| anyhow::anyhow!("redis.url: {e}"))?;
        let deadline = tokio::time::Instant::now() + wait;
        let conn = loop {
            match client.get_connection_manager().await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "Redis not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    let host = cfg.url.rsplit('@').next().unwrap_or(&cfg.url);
                    anyhow::bail!("cannot connect to Redis at {host}: {e}");
                }
            }
        };
        Ok(RedisSink {
            conn,
            prefix: cfg.key_prefix.clone(),
            ttl_secs: cfg.score_ttl.as_secs().max(1),
        })
    }

    /// Writes `fraud:txn:{id}` and `fraud:user:{user}:latest` for each entry
    /// in one pipeline. Entries are in log order, so the last score of a user
    /// in the batch is the one left in `:latest`.
    pub async fn write_scores(&self, entries: &[ScoreEntry]) -> redis::RedisResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.cmd("SET")
                .arg(txn_key(&self.prefix, &e.txn_id))
                .arg(&*e.json)
                .arg("EX")
                .arg(self.ttl_secs)
                .ignore();
            pipe.cmd("SET")
                .arg(user_latest_key(&self.prefix, &e.user_id))
                .arg(&*e.json)
                .arg("EX")
                .arg(self.ttl_secs)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await
    }
}

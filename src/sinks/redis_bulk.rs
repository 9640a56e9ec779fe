//! Bulk loading into Redis: commands written as RESP bytes by the caller,
//! sent over a connection of their own, replies counted and checked by a
//! reader task. This is Redis' "mass insertion" (what `redis-cli --pipe`
//! does): a rebuild writes two commands for each of a million users, and
//! building each through the client's command objects (an argument vector
//! per command, then packed again into bytes, a reply value per command)
//! cost more CPU than the server spent executing them.
//!
//! Only simple replies are expected (`+OK`, `:n`): an error reply (`-ERR
//! …`) fails the load with Redis' message, and so does any other reply
//! type. Plain TCP only (the only transport `redis.url` allows).

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Appends one command (a RESP array of bulk strings) to `buf`.
pub fn push_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    push_len(buf, b'*', args.len());
    for a in args {
        push_bulk(buf, &[a]);
    }
}

/// Appends one bulk string: the concatenation of `parts`.
fn push_bulk(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    push_len(buf, b'$', parts.iter().map(|p| p.len()).sum());
    for p in parts {
        buf.extend_from_slice(p);
    }
    buf.extend_from_slice(b"\r\n");
}

/// `HSET key field value` then `EXPIRE key ttl`: two commands.
pub fn push_hset_expire(buf: &mut Vec<u8>, key: &[u8], field: u64, value: &[u8], ttl: u64) {
    push_hset_expire_parts(buf, key, field, &[value], ttl);
}

/// [`push_hset_expire`] with the value given in parts (sent as their
/// concatenation).
pub fn push_hset_expire_parts(
    buf: &mut Vec<u8>,
    key: &[u8],
    field: u64,
    value: &[&[u8]],
    ttl: u64,
) {
    let mut f = itoa::Buffer::new();
    let mut t = itoa::Buffer::new();
    push_len(buf, b'*', 4);
    push_bulk(buf, &[b"HSET"]);
    push_bulk(buf, &[key]);
    push_bulk(buf, &[f.format(field).as_bytes()]);
    push_bulk(buf, value);
    push_command(buf, &[b"EXPIRE", key, t.format(ttl).as_bytes()]);
}

fn push_len(buf: &mut Vec<u8>, kind: u8, n: usize) {
    buf.push(kind);
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// One bulk-loading connection. [`BulkWriter::send`] writes commands as
/// they come; [`BulkWriter::finish`] returns once every command sent has
/// been answered without an error.
pub struct BulkWriter {
    write: OwnedWriteHalf,
    /// Commands sent, the handshake's (`AUTH`, `SELECT`) included.
    sent: u64,
    handshake: u64,
    /// The number of commands sent, once no more will be (the reader stops
    /// when it has counted that many replies).
    done_tx: watch::Sender<Option<u64>>,
    /// Taken when awaited (once: its error is the load's).
    reader: Option<JoinHandle<anyhow::Result<u64>>>,
}

impl BulkWriter {
    /// Connects to the server `url` names, authenticates and selects the
    /// database as the URL says.
    pub async fn connect(url: &str) -> anyhow::Result<BulkWriter> {
        let client = redis::Client::open(url).map_err(|e| anyhow!("redis.url: {e}"))?;
        let info = client.get_connection_info();
        let (host, port) = match &info.addr {
            redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
            other => bail!("redis.url: bulk loading supports plain TCP only, not {other}"),
        };
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to Redis at {host}:{port}"))?;
        stream.set_nodelay(true).ok();
        let (mut read, write) = stream.into_split();
        let (done_tx, mut done_rx) = watch::channel(None::<u64>);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut start, mut end) = (0usize, 0usize);
            let mut replies = 0u64;
            loop {
                // Count the complete replies buffered.
                while let Some(nl) = buf[start..end].windows(2).position(|w| w == b"\r\n") {
                    let line = &buf[start..start + nl];
                    match line.first() {
                        Some(b'+') | Some(b':') => replies += 1,
                        Some(b'-') => bail!("Redis replied {}", String::from_utf8_lossy(line)),
                        _ => bail!(
                            "unexpected Redis reply to a bulk load: {}",
                            String::from_utf8_lossy(line)
                        ),
                    }
                    start += nl + 2;
                }
                if let Some(want) = *done_rx.borrow() {
                    if replies >= want {
                        return Ok(replies);
                    }
                }
                // Keep a partial reply, make room for more.
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                if end == buf.len() {
                    bail!("a Redis reply longer than {} bytes", buf.len());
                }
                tokio::select! {
                    n = read.read(&mut buf[end..]) => {
                        let n = n.context("reading Redis replies")?;
                        if n == 0 {
                            bail!("Redis closed the connection after {replies} replies");
                        }
                        end += n;
                    }
                    changed = done_rx.changed() => {
                        changed.context("bulk writer dropped")?;
                    }
                }
            }
        });
        let mut w = BulkWriter {
            write,
            sent: 0,
            handshake: 0,
            done_tx,
            reader: Some(reader),
        };
        let mut hello = Vec::new();
        if let Some(pass) = &info.redis.password {
            match &info.redis.username {
                Some(user) => {
                    push_command(&mut hello, &[b"AUTH", user.as_bytes(), pass.as_bytes()])
                }
                None => push_command(&mut hello, &[b"AUTH", pass.as_bytes()]),
            }
            w.sent += 1;
        }
        if info.redis.db != 0 {
            let db = info.redis.db.to_string();
            push_command(&mut hello, &[b"SELECT", db.as_bytes()]);
            w.sent += 1;
        }
        w.handshake = w.sent;
        if !hello.is_empty() {
            w.write
                .write_all(&hello)
                .await
                .context("writing to Redis")?;
        }
        Ok(w)
    }

    /// Sends `resp`, which holds `commands` whole commands.
    pub async fn send(&mut self, resp: &[u8], commands: u64) -> anyhow::Result<()> {
        if self.reader.as_ref().is_none_or(JoinHandle::is_finished) {
            // The reader only stops early on an error: report it.
            return Err(self.finish_reader().await.err().unwrap_or_else(|| {
                anyhow!("the Redis reply reader stopped before the load finished")
            }));
        }
        self.write
            .write_all(resp)
            .await
            .context("writing to Redis")?;
        self.sent += commands;
        Ok(())
    }

    /// Waits for the reply to every command sent; the first error reply
    /// (or a closed connection) is the error. Returns the number of
    /// commands [`BulkWriter::send`] sent, all answered.
    pub async fn finish(mut self) -> anyhow::Result<u64> {
        self.write.flush().await.context("writing to Redis")?;
        let _ = self.done_tx.send(Some(self.sent));
        let got = self.finish_reader().await?;
        Ok(got - self.handshake)
    }

    async fn finish_reader(&mut self) -> anyhow::Result<u64> {
        match self.reader.take() {
            Some(r) => r.await.context("Redis reply reader")?,
            None => bail!("the bulk load to Redis already failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        let mut b = Vec::new();
        push_hset_expire(&mut b, b"recs:u1", 1, b"{\"a\":1}", 86400);
        assert_eq!(
            b,
            b"*4\r\n$4\r\nHSET\r\n$7\r\nrecs:u1\r\n$1\r\n1\r\n$7\r\n{\"a\":1}\r\n\
              *3\r\n$6\r\nEXPIRE\r\n$7\r\nrecs:u1\r\n$5\r\n86400\r\n"
        );
        let mut e = Vec::new();
        push_command(&mut e, &[b"SET", b"k", b""]);
        assert_eq!(e, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
        // A value in parts is one bulk string.
        let mut p = Vec::new();
        push_hset_expire_parts(&mut p, b"recs:u1", 1, &[b"{\"a\"", b":1}"], 86400);
        assert_eq!(p, b);
    }
}

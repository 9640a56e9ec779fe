//! The rebuild's Redis writes on their own: USERS values of ~1.2 KB (the
//! size of a recommendations record) written as `HSET recs:{user} 0 …` +
//! `EXPIRE`, once through redis-rs pipelines of 1,000 users with 20 in
//! flight (the publisher before the bulk writer), once as RESP through
//! [`streamscore::sinks::redis_bulk::BulkWriter`]; ROUNDS rounds,
//! alternating, so both are measured in the same conditions. Prints wall
//! time, this process's CPU time and redis-server's (`INFO cpu`).
//!
//! The keys (`bench-redis-load:…`) expire after 10 minutes.
//!
//! Usage: cargo run --release --example bench_redis_load -- REDIS_URL
//! [USERS=1000000] [ROUNDS=3]
use std::time::Instant;

use anyhow::Context;
use streamscore::sinks::redis_bulk::{push_hset_expire, BulkWriter};

const TTL: u64 = 600;
const CHUNK: usize = 1_000;
const IN_FLIGHT: usize = 20;

fn cpu_self() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

async fn cpu_server(con: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(con).await?;
    let mut s = 0.0;
    for l in info.lines() {
        if let Some((k, v)) = l.split_once(':') {
            if k == "used_cpu_sys" || k == "used_cpu_user" {
                s += v.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(s)
}

fn value(user: usize) -> Vec<u8> {
    let mut v = format!("{{\"user_id\":\"user-{user:07}\",\"items\":[");
    for i in 0..20 {
        if i > 0 {
            v.push(',');
        }
        v.push_str(&format!(
            "{{\"item_id\":\"item-{:06}\",\"score\":0.{:06}}}",
            (user * 31 + i * 977) % 50_000,
            (user * 7 + i) % 1_000_000
        ));
    }
    v.push_str("],\"source\":\"batch\",\"generation\":7,\"built_at\":1764000000000,\"offsets\":[{\"partition\":0,\"from\":0,\"to\":2500000},{\"partition\":1,\"from\":0,\"to\":2500000},{\"partition\":2,\"from\":0,\"to\":2500000},{\"partition\":3,\"from\":0,\"to\":2500000}]}");
    v.into_bytes()
}

async fn pipelines(url: &str, keys: &[Vec<u8>], values: &[Vec<u8>]) -> anyhow::Result<()> {
    let mut con = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut in_flight = std::collections::VecDeque::new();
    for (ks, vs) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut pipe = redis::Pipeline::with_capacity(2 * ks.len());
        for (k, v) in ks.iter().zip(vs) {
            pipe.cmd("HSET").arg(k).arg(0u64).arg(v).ignore();
            pipe.cmd("EXPIRE").arg(k).arg(TTL).ignore();
        }
        let mut c = con.clone();
        in_flight.push_back(tokio::spawn(
            async move { pipe.query_async::<()>(&mut c).await },
        ));
        while in_flight.len() > IN_FLIGHT {
            if let Some(h) = in_flight.pop_front() {
                h.await??;
            }
        }
    }
    for h in in_flight {
        h.await??;
    }
    let _: () = redis::cmd("PING").query_async(&mut con).await?;
    Ok(())
}

async fn bulk(url: &str, keys: &[Vec<u8>], values: &[Vec<u8>]) -> anyhow::Result<()> {
    let mut w = BulkWriter::connect(url).await?;
    let mut buf = Vec::new();
    for (ks, vs) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        buf.clear();
        for (k, v) in ks.iter().zip(vs) {
            push_hset_expire(&mut buf, k, 0, v, TTL);
        }
        w.send(&buf, 2 * ks.len() as u64).await?;
    }
    let n = w.finish().await?;
    anyhow::ensure!(n == 2 * keys.len() as u64, "{n} replies");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .context("usage: bench_redis_load REDIS_URL [USERS] [ROUNDS]")?;
    let arg = |n: usize, d: usize| {
        std::env::args()
            .nth(n)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (users, rounds) = (arg(2, 1_000_000), arg(3, 3));
    let keys: Vec<Vec<u8>> = (0..users)
        .map(|u| format!("bench-redis-load:recs:user-{u:07}").into_bytes())
        .collect();
    let values: Vec<Vec<u8>> = (0..users).map(value).collect();
    let bytes: usize = values.iter().map(Vec::len).sum();
    eprintln!("{users} users, {:.0} MB of values", bytes as f64 / 1e6);
    let mut info = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    for round in 1..=rounds {
        for mode in ["pipelines", "bulk"] {
            let (c0, s0, t) = (cpu_self(), cpu_server(&mut info).await?, Instant::now());
            match mode {
                "pipelines" => pipelines(&url, &keys, &values).await?,
                _ => bulk(&url, &keys, &values).await?,
            }
            let wall = t.elapsed().as_secs_f64();
            let (c1, s1) = (cpu_self(), cpu_server(&mut info).await?);
            println!(
                "round {round} {mode:<9} wall {wall:6.2} s  client cpu {:6.2} s  redis-server cpu {:6.2} s",
                c1 - c0,
                s1 - s0
            );
        }
    }
    Ok(())
}

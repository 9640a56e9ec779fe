//! The rebuild's bulk writer against a real redis-server: values arrive
//! with their TTL in the database the URL names, an error reply fails the
//! load with Redis' message, the URL's password is sent.

use redis::Commands;
use streamscore::sinks::redis_bulk::{push_command, push_hset_expire, BulkWriter};

use super::util::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn bulk_writes_arrive_with_ttl_and_errors_are_reported() {
    let base = redis_url();
    let prefix = unique("bulk");
    // Database 3, as the URL says.
    let url = format!("{base}/3");
    let n = 25_000u64;
    let got = rt().block_on(async {
        let mut w = BulkWriter::connect(&url).await.expect("connect");
        let mut buf = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
            buf.clear();
            for i in chunk {
                let key = format!("{prefix}:recs:u{i}");
                push_hset_expire(
                    &mut buf,
                    key.as_bytes(),
                    i % 2,
                    format!("v{i}").as_bytes(),
                    900,
                );
            }
            w.send(&buf, 2 * chunk.len() as u64).await.expect("send");
        }
        w.finish().await.expect("finish")
    });
    assert_eq!(got, 2 * n, "one reply per command");
    let mut db3 = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    for i in [0, 1, 4_321, n - 1] {
        let key = format!("{prefix}:recs:u{i}");
        let v: Option<String> = db3.hget(&key, i % 2).expect("hget");
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()), "{key}");
        let ttl: i64 = db3.ttl(&key).expect("ttl");
        assert!((1..=900).contains(&ttl), "{key} ttl {ttl}");
    }
    let mut db0 = redis::Client::open(base.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let in_db0: bool = db0.exists(format!("{prefix}:recs:u0")).expect("exists");
    assert!(!in_db0, "written to database 0, not the URL's 3");

    // A key of another type: HSET fails; the load fails with the reply.
    let clash = format!("{prefix}:clash");
    let _: () = db3.set(&clash, "a string").expect("set");
    let err = rt()
        .block_on(async {
            let mut w = BulkWriter::connect(&url).await?;
            let mut buf = Vec::new();
            push_hset_expire(&mut buf, b"ok-before", 0, b"x", 60);
            push_hset_expire(&mut buf, clash.as_bytes(), 0, b"x", 60);
            push_command(&mut buf, &[b"PING"]);
            w.send(&buf, 5).await?;
            w.finish().await
        })
        .expect_err("WRONGTYPE must fail the load");
    assert!(format!("{err:#}").contains("WRONGTYPE"), "{err:#}");

    // The URL's password is sent (this server has none: Redis refuses it).
    let with_pass = base.replacen("redis://", "redis://:not-the-password@", 1);
    let err = rt()
        .block_on(async {
            let w = BulkWriter::connect(&with_pass).await?;
            w.finish().await
        })
        .expect_err("AUTH must be sent and refused");
    assert!(format!("{err:#}").contains("AUTH"), "{err:#}");
}

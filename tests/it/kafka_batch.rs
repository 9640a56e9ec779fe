//! `kafka::batch::Batch` (the rebuild's replay reads through it) against
//! the real broker: every message of the assigned partition in log order
//! with its payload (a null one too), none of a partition it was not
//! given, an empty fill at the end, and a consumer error handed out as one.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use streamscore::kafka::batch::Batch;

use super::util::*;

fn consumer(extra: &[(&str, &str)]) -> BaseConsumer {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers())
        .set("group.id", unique("batch-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (k, v) in extra {
        cc.set(*k, *v);
    }
    cc.create().expect("consumer")
}

fn assign(c: &BaseConsumer, topic: &str, partition: i32, offset: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .expect("tpl");
    c.assign(&tpl).expect("assign");
}

/// (partition, offset, payload) of the first `n` messages, 30 s at most.
fn read(batch: &mut Batch<'_>, n: usize) -> Vec<(i32, i64, Vec<u8>)> {
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(
            Instant::now() < until,
            "read {} of {n} messages in 30 s",
            got.len()
        );
        batch.fill(Duration::from_millis(100)).expect("fill");
        for m in batch.iter() {
            assert!(m.error().is_none(), "unexpected error {:?}", m.error());
            got.push((m.partition(), m.offset(), m.payload().to_vec()));
        }
    }
    got
}

#[test]
fn a_batch_reads_its_partition_in_order_and_hands_out_consumer_errors() {
    let topic = unique("batch");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (n0, n1) = (3_000usize, 500usize);
    rt.block_on(async {
        let admin: AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .expect("admin");
        let made = admin
            .create_topics(
                &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create topic");
        assert!(made.iter().all(|r| r.is_ok()), "{made:?}");
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let mut acks = Vec::new();
        for i in 0..n0 + n1 {
            let (partition, payload) = if i < n0 {
                (0, format!("p0-{i}"))
            } else {
                (1, format!("p1-{}", i - n0))
            };
            let rec = FutureRecord::<(), String>::to(&topic).partition(partition);
            // Message 7 of partition 0 has no payload at all.
            let rec = if i == 7 { rec } else { rec.payload(&payload) };
            acks.push(p.send_result(rec).map_err(|(e, _)| e).expect("enqueue"));
        }
        for a in acks {
            a.await.expect("not cancelled").expect("delivered");
        }
    });

    let c = consumer(&[]);
    assign(&c, &topic, 0, 0);
    let mut batch = Batch::new(&c, 64);
    let got = read(&mut batch, n0);
    assert_eq!(got.len(), n0, "more than the partition holds");
    for (i, (partition, offset, payload)) in got.iter().enumerate() {
        assert_eq!((*partition, *offset), (0, i as i64), "out of order");
        let want = if i == 7 {
            Vec::new()
        } else {
            format!("p0-{i}").into_bytes()
        };
        assert_eq!(payload, &want, "payload of offset {i}");
    }
    // The end: a fill that waits and brings nothing.
    assert_eq!(batch.fill(Duration::from_millis(300)).expect("fill"), 0);

    // Another partition through the same batch: only its messages.
    assign(&c, &topic, 1, 0);
    let got = read(&mut batch, n1);
    assert_eq!(got.len(), n1);
    for (i, (partition, offset, payload)) in got.iter().enumerate() {
        assert_eq!((*partition, *offset), (1, i as i64));
        assert_eq!(payload, format!("p1-{i}").as_bytes());
    }
    drop(batch);

    // A consumer error comes out of the batch as a message carrying it
    // (librdkafka's consumer errors; its global errors, such as a
    // partition the topic does not have, are logged and retried instead).
    // The end-of-partition event is one: asked for, it follows the last
    // message.
    let c = consumer(&[("enable.partition.eof", "true")]);
    assign(&c, &topic, 1, 0);
    let mut batch = Batch::new(&c, 64);
    let until = Instant::now() + Duration::from_secs(30);
    let mut before = 0;
    let err = 'read: loop {
        assert!(Instant::now() < until, "no consumer error in 30 s");
        batch.fill(Duration::from_millis(100)).expect("fill");
        for m in batch.iter() {
            match m.error() {
                Some(e) => break 'read e,
                None => before += 1,
            }
        }
    };
    assert_eq!(before, n1, "messages before the end-of-partition error");
    assert_eq!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::PartitionEOF),
        "{err}"
    );
}

//! Producing with backpressure: a full local queue makes the caller wait
//! and retry instead of buffering without bound.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{
    BaseRecord, DeliveryFuture, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer,
};

/// Enqueues one record; while librdkafka's queue is full, waits a little and
/// tries again (backpressure). Returns the delivery future to await the ack.
pub async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    headers: Option<OwnedHeaders>,
) -> Result<DeliveryFuture, KafkaError> {
    enqueue_opt(producer, topic, key, Some(payload), headers).await
}

/// [`enqueue`] of a record whose payload may be absent (a tombstone of a
/// compacted topic).
pub async fn enqueue_opt(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: Option<&[u8]>,
    headers: Option<OwnedHeaders>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(p) = payload {
            rec = rec.payload(p);
        }
        if let Some(h) = headers.clone() {
            rec = rec.headers(h);
        }
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// [`enqueue`] for a producer whose delivery reports go to its context
/// (the record's opaque) instead of a future per record.
pub async fn enqueue_threaded<C: ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    mut rec: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Awaits a delivery future and turns both failure layers into one error.
pub async fn acknowledged(f: DeliveryFuture) -> Result<(), KafkaError> {
    match f.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

//! Reading a consumer's messages many at a time, for the loops that read a
//! log range as fast as they can (the rebuild's replay).
//!
//! `BaseConsumer::poll` hands out one message per call, and each call
//! reads the clock several times (rust-rdkafka's deadline, librdkafka's
//! timeout and its poll-interval bookkeeping) and allocates the event the
//! message lives in: a `perf` of a 10 M-event rebuild put 4.8 % of all its
//! samples in `clock_gettime` on the replay thread alone. librdkafka's
//! `rd_kafka_consume_batch_queue` takes up to a batch of messages off the
//! consumer queue in one call (the call confluent-kafka-python's
//! `Consumer.consume(num_messages)` makes on the same queue).
//!
//! The consumer must be one that is only ever read through this (its
//! partitions set with `assign`, no group subscription): the batch call
//! serves no rebalance callbacks. Consumer errors (a failed fetch, the
//! end of a partition when asked for) come out as messages carrying them
//! ([`Msg::error`]); librdkafka's global errors (a broker connection
//! lost, a partition the topic does not have) do not: librdkafka logs
//! them (through the `log` facade, into the process' tracing) and
//! retries, so a caller that needs progress bounds its wait by time, as
//! the replay does.

use std::marker::PhantomData;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;

/// A batch of messages taken off a consumer's queue; they stay valid until
/// the next [`Batch::fill`] or until the batch is dropped (which the
/// borrow of the consumer orders before the consumer's own drop).
pub struct Batch<'c> {
    queue: *mut rdsys::rd_kafka_queue_t,
    messages: Vec<*mut rdsys::rd_kafka_message_t>,
    len: usize,
    _consumer: PhantomData<&'c ()>,
}

/// One message of a [`Batch`].
pub struct Msg<'b> {
    m: &'b rdsys::rd_kafka_message_t,
}

impl Msg<'_> {
    pub fn offset(&self) -> i64 {
        self.m.offset
    }

    pub fn partition(&self) -> i32 {
        self.m.partition
    }

    /// The payload (empty for a null one).
    pub fn payload(&self) -> &[u8] {
        if self.m.payload.is_null() || self.m.len == 0 {
            return &[];
        }
        // SAFETY: librdkafka's message owns `len` bytes at `payload` for as
        // long as the message lives, which the batch's borrow bounds.
        unsafe { std::slice::from_raw_parts(self.m.payload as *const u8, self.m.len) }
    }

    /// The error this message stands for (a fetch error), if any.
    pub fn error(&self) -> Option<KafkaError> {
        (self.m.err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| KafkaError::MessageConsumption(RDKafkaErrorCode::from(self.m.err)))
    }
}

impl<'c> Batch<'c> {
    /// A batch of up to `size` messages over `consumer`'s queue.
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>, size: usize) -> Batch<'c> {
        // SAFETY: the client pointer is valid while `consumer` is, which
        // outlives the batch ('c); the returned handle is destroyed in Drop.
        let queue = unsafe { rdsys::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        Batch {
            queue,
            messages: vec![std::ptr::null_mut(); size.max(1)],
            len: 0,
            _consumer: PhantomData,
        }
    }

    fn release(&mut self) {
        for m in &mut self.messages[..self.len] {
            // SAFETY: each of the first `len` pointers is a message the
            // batch call returned and that was not destroyed yet.
            unsafe { rdsys::rd_kafka_message_destroy(*m) };
            *m = std::ptr::null_mut();
        }
        self.len = 0;
    }

    /// Releases the previous messages and takes the next ones: returns as
    /// soon as the batch is full, or after `timeout` with what came (none:
    /// nothing arrived in time). An error when the consumer has no queue.
    pub fn fill(&mut self, timeout: Duration) -> Result<usize, KafkaError> {
        self.release();
        if self.queue.is_null() {
            return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::Fail));
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the queue handle is valid (checked above, destroyed only
        // in Drop), and the array has room for `messages.len()` pointers.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.queue,
                ms,
                self.messages.as_mut_ptr(),
                self.messages.len(),
            )
        };
        if n < 0 {
            return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::Fail));
        }
        self.len = (n as usize).min(self.messages.len());
        Ok(self.len)
    }

    /// The messages of the last [`Batch::fill`], in queue order.
    pub fn iter(&self) -> impl Iterator<Item = Msg<'_>> {
        self.messages[..self.len].iter().filter_map(|p| {
            // SAFETY: a live message returned by the batch call (non-null
            // as returned; checked anyway).
            unsafe { p.as_ref() }.map(|m| Msg { m })
        })
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.release();
        if !self.queue.is_null() {
            // SAFETY: the handle from rd_kafka_queue_get_consumer, once.
            unsafe { rdsys::rd_kafka_queue_destroy(self.queue) };
        }
    }
}

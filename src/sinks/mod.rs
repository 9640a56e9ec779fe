//! Output sinks other than Kafka.

pub mod redis;
pub mod redis_bulk;

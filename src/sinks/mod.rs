//! Output sinks other than Kafka.

pub mod redis;

//! Integration tests: one binary, against a real Kafka-protocol broker and a
//! real redis-server. `scripts/test.sh` starts both and exports
//! STREAMSCORE_TEST_BROKERS and STREAMSCORE_TEST_REDIS; without them every
//! test here fails with a message saying so (they never skip).

mod it;

/*!
streamscore: a kappa-style stream processor for real-time machine learning.

The Kafka log is the single source of truth. `streamscore run` consumes the
`transactions` topic, keeps per-user and per-merchant windows in memory on
event time, scores each transaction with an ONNX fraud model (tract-onnx) and
publishes the score to the `fraud-scores` topic and to Redis. Malformed input
goes to the `dead-letter` topic with its reason. docs/ARCHITECTURE.md tells
the whole design; this page tells where each part lives.

# Layout

- [`config`]: the typed, strict, layered configuration (file + env).
- [`topics`]: topic definitions as code (`topics/topics.toml`).
- [`events`]: input event types and their validation (reasons for rejection).
- [`features`]: window state (bucketed rings on event time) and the
  point-in-time feature vector; [`features::window`] the ring buffers.
- [`model`]: ONNX loading, signature check, batch scoring.
- [`pipeline`]: the `run` loop (micro-batches, acker, offsets after acks),
  [`pipeline::warmup`] the rebuild of a partition's windows from the log,
  and [`pipeline::output`] the records it writes.
- [`kafka`]: client configuration, topic administration, producing with
  backpressure.
- [`sinks`]: Redis (keys, TTLs, pipelined writes).
- [`http`]: the `/v1` serving API ([`http::api`]), `/metrics`, `/healthz`, `/readyz`.
- [`sessions`]: live per-user sessions from the `interactions` stream.
- [`metrics`]: every metric, in one place.
- [`priority`]: lower CPU priority for the threads that must not slow the
  stream.
- [`generate`]: the synthetic event generator; [`commands`] the tool
  subcommands (`generate`, `features export`, `watch`, `topics apply`).
- [`cli`]: the command line.
*/

pub mod cli;
pub mod commands;
pub mod config;
pub mod events;
pub mod features;
pub mod generate;
pub mod http;
pub mod kafka;
pub mod merchants;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod priority;
pub mod recs;
pub mod sessions;
pub mod sinks;
pub mod topics;

/// Wall-clock now, epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#!/usr/bin/env bash
# End-to-end figures for docs/BENCHMARKS.md: catch-up throughput over COUNT
# pre-produced transactions and latency at RATE/s, for `streamscore run` and a
# minimal rdkafka pass-through on the same broker in the same run.
#
#   scripts/bench_e2e.sh [COUNT=1000000] [RATE=5000] [SECONDS=30]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_all
cargo build --release --quiet --bin streamscore --example bench_e2e
start_local_services bench
target/release/examples/bench_e2e "127.0.0.1:$TANSU_PORT" "redis://127.0.0.1:$REDIS_PORT" \
  "$PWD/target/release/streamscore" "${1:-1000000}" "${2:-5000}" "${3:-30}"

#!/usr/bin/env bash
# Throughput with 1, 2 and 3 instances of `streamscore run` in one group over
# 6-partition topics, and the age of the merchant features at score time
# (docs/BENCHMARKS.md, "Scale-out"). All instances share this machine.
#
#   scripts/bench_scale.sh [COUNT=300000] [MAX_INSTANCES=3]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_all
cargo build --release --quiet --bin streamscore --example bench_scale
start_local_services bench
target/release/examples/bench_scale "127.0.0.1:$TANSU_PORT" "redis://127.0.0.1:$REDIS_PORT" \
  "$PWD/target/release/streamscore" "${1:-300000}" "${2:-3}"

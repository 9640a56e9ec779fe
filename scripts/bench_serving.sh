#!/usr/bin/env bash
# Serving figures for docs/BENCHMARKS.md: wrk (Debian) on loopback against
# GET /v1/recommendations/{user} and POST /v1/score of a `streamscore run`
# whose stream is fed at RATE transactions/s (plus as many interactions)
# meanwhile; prints wrk's latency distribution and what the stream did.
#
#   scripts/bench_serving.sh [RATE=5000] [SECONDS=30] [CONNECTIONS=16]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
RATE=${1:-5000}
SECS=${2:-30}
CONNS=${3:-16}
USERS=10000
ensure_all
apt_install wrk curl
cargo build --release --quiet --bin streamscore
start_local_services bench-serving
HTTP_PORT=$(free_port)
CFG=$RUN_DIR/streamscore.toml
write_local_config "$CFG" '[recs]
rebuild_interval = "0s"'
BIN=$PWD/target/release/streamscore
"$BIN" --config "$CFG" topics apply >/dev/null
log "history: 100,000 transactions and 500,000 interactions of $USERS users, one rebuild"
"$BIN" --config "$CFG" generate --count 100000 --interactions-per-txn 5 --users $USERS \
  --start-ms $(( $(date +%s) * 1000 - 3600 * 1000 )) --mean-gap-ms 30 --seed 3 2>&1 | tail -1
"$BIN" --config "$CFG" rebuild 2>/dev/null | cut -c1-200
RUST_LOG=warn "$BIN" --config "$CFG" run 2>"$RUN_DIR/run.log" &
RUN_PID=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null || { tail -20 "$RUN_DIR/run.log"; die "run never became ready"; }
scored() { metric_at "$HTTP_PORT" streamscore_events_scored_total; }
log "stream at $RATE tx/s (+ interactions) for the whole measurement"
"$BIN" --config "$CFG" generate --rate "$RATE" --duration $((2 * SECS + 20))s \
  --interactions-per-txn 1 --users $USERS --seed 4 >/dev/null 2>&1 &
GEN_PID=$!
sleep 10
for target in recs score; do
  before=$(scored)
  log "wrk: $target, $CONNS connections, ${SECS}s"
  # wrk runs at the lowest priority: in production the clients are other
  # machines, not a co-tenant of the stream.
  USERS=$USERS nice -n 19 wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "scripts/wrk/$target.lua" \
    "http://127.0.0.1:$HTTP_PORT"
  after=$(scored)
  echo "stream meanwhile: $(( (${after%.*} - ${before%.*}) / SECS )) transactions scored/s"
done
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E '^streamscore_recs_served_total|^streamscore_http_requests_total' || true
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E '^streamscore_event_to_score_latency_seconds_(count|sum)' || true
grep -E "WARN|ERROR" "$RUN_DIR/run.log" | tail -5 || true
kill "$GEN_PID" 2>/dev/null || true
kill -TERM "$RUN_PID"; wait "$RUN_PID" || true

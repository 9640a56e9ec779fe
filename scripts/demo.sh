#!/usr/bin/env bash
# The demo: installs what is missing, starts a local broker (tansu) and
# redis-server on free loopback ports, creates the topics, starts
# `streamscore run`, produces generated transactions (with some malformed
# ones), and shows scores arriving, a few Redis keys, a recommendation
# rebuild and the serving API. Ctrl-C stops everything it started.
#
#   scripts/demo.sh [RATE]      (default 200 transactions/s)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
RATE=${1:-200}

ensure_all
apt_install curl
log "building streamscore (release)"
cargo build --release --quiet
BIN=$PWD/target/release/streamscore

RUN_DIR=$PWD/.run/demo
rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
cleanup() {
  trap - INT TERM EXIT
  log "stopping"
  [ -n "${GEN_PID:-}" ] && kill "$GEN_PID" 2>/dev/null || true
  if [ -n "${RUN_PID:-}" ]; then
    kill -TERM "$RUN_PID" 2>/dev/null || true
    wait "$RUN_PID" 2>/dev/null || true
    grep -E "stopped|ERROR" "$RUN_DIR/run.log" | tail -1 >&2
  fi
  stop_started
}
trap cleanup INT TERM EXIT

start_tansu "$RUN_DIR/tansu"
start_redis "$RUN_DIR/redis"
HTTP_PORT=$(free_port)
write_local_config "$RUN_DIR/streamscore.toml"
export STREAMSCORE_CONFIG=$RUN_DIR/streamscore.toml

"$BIN" topics apply
# History for recommendations: 30,000 interactions of 2,000 users over 2,000
# items in taste groups (and 10,000 past transactions, scored at start-up).
"$BIN" generate --count 10000 --users 2000 --merchants 200 --interactions-per-txn 3 --seed 11 \
  2>"$RUN_DIR/history.log"
# Own sessions: Ctrl-C reaches `watch` only; cleanup stops these in order.
setsid "$BIN" run 2>"$RUN_DIR/run.log" &
RUN_PID=$!
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
  kill -0 "$RUN_PID" 2>/dev/null || { cat "$RUN_DIR/run.log"; die "streamscore run exited"; }
  sleep 0.2
done
log "streamscore run is up: metrics at http://127.0.0.1:$HTTP_PORT/metrics, log in $RUN_DIR/run.log"

# Traffic shaped like the model's training stream (see models/MODEL_CARD.md),
# one malformed message in 500 (they go to the dead-letter topic).
setsid "$BIN" generate --rate "$RATE" --users 1000000 --merchants 40000 --malformed-every 500 \
  2>"$RUN_DIR/generate.log" &
GEN_PID=$!

(
  set +e +o pipefail # `head` closing a pipe is not an error here
  sleep 8
  echo
  echo "---- a few Redis keys (redis-cli -p $REDIS_PORT) ----"
  key=$(redis-cli -p "$REDIS_PORT" --scan --pattern 'fraud:txn:*' | head -1)
  redis-cli -p "$REDIS_PORT" --scan --pattern 'fraud:*' | head -4
  echo "GET $key"
  redis-cli -p "$REDIS_PORT" GET "$key" | cut -c1-400
  echo "TTL $key = $(redis-cli -p "$REDIS_PORT" TTL "$key") s"
  echo "dead-lettered so far: $(curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk '/^streamscore_dead_letter_total/ {s+=$2} END {print s+0}')"
  echo
  echo "---- streamscore rebuild: recommendations from the whole interactions log ----"
  "$BIN" rebuild >"$RUN_DIR/rebuild.json" 2>"$RUN_DIR/rebuild.log"
  tail -1 "$RUN_DIR/rebuild.log"
  echo "GET recs:meta"
  redis-cli -p "$REDIS_PORT" GET recs:meta | cut -c1-300
  gen=$(redis-cli -p "$REDIS_PORT" GET recs:meta | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
  echo "HGET recs:user-7 $((gen % 2))   (generation $gen: two fields, double-buffered by parity; recs:meta names the current generation)"
  redis-cli -p "$REDIS_PORT" HGET recs:user-7 "$((gen % 2))" | cut -c1-300
  echo
  echo "---- the serving API (docs/openapi.yaml) ----"
  echo "GET /v1/recommendations/user-7?k=5"
  curl -s "http://127.0.0.1:$HTTP_PORT/v1/recommendations/user-7?k=5"; echo
  now=$(($(date +%s) * 1000))
  body='{"txn_id":"demo-1","user_id":"user-7","merchant_id":"merchant-3","amount":950.0,"currency":"EUR","country":"FR","device_id":"new-device","event_time":'$now'}'
  echo "POST /v1/score $body"
  curl -s -X POST -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:$HTTP_PORT/v1/score" | cut -c1-400; echo
  echo "POST /v1/score with a negative amount"
  curl -s -X POST -d "${body/950.0/-5}" "http://127.0.0.1:$HTTP_PORT/v1/score"; echo
  echo "-----------------------------------------------------"
  echo
) &

log "live summary of fraud-scores (Ctrl-C stops everything)"
"$BIN" watch || true

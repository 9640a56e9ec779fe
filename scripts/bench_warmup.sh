#!/usr/bin/env bash
# Restart-to-ready figure for docs/BENCHMARKS.md: COUNT transactions of
# USERS distinct users, all within the 24 h horizon, are scored by
# `streamscore run`, which is then stopped (SIGTERM) and started again; one
# new transaction per partition makes every partition warm up (replay its
# horizon from the log). Reports the warm-up time and events replayed next to
# the time to just read the same topic through the replay path.
#
#   scripts/bench_warmup.sh [COUNT=1000000] [USERS=1000000]
#
# STREAMSCORE_BIN=<path> runs another build (a before/after in one
# sitting) instead of this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
COUNT=${1:-1000000}
USERS=${2:-1000000}
ensure_all
apt_install curl
cargo build --release --quiet --bin streamscore --example bench_read
BIN=${STREAMSCORE_BIN:-$PWD/target/release/streamscore}
start_local_services bench-warmup
HTTP_PORT=$(free_port)
CFG=$RUN_DIR/streamscore.toml
write_local_config "$CFG" '[recs]
rebuild_interval = "0s"'
M="http://127.0.0.1:$HTTP_PORT/metrics"
metric() { metric_at "$HTTP_PORT" "$1"; }
"$BIN" --config "$CFG" topics apply >/dev/null
# 40 ms apart: COUNT events span well under 24 h of event time.
"$BIN" --config "$CFG" generate --count "$COUNT" --users "$USERS" --mean-gap-ms 40 --seed 8 2>&1 | tail -1
STREAMSCORE__KAFKA__INSTANCE_ID=bench-1 "$BIN" --config "$CFG" run 2>"$RUN_DIR/run1.log" &
PID=$!
wait_scored "$HTTP_PORT" "$COUNT" "$PID"
log "first run: $COUNT scored; peak RSS $(awk '/VmHWM/ {print $2, $3}' /proc/$PID/status), users held $(curl -s "$M" | awk '/^streamscore_window_keys\{store="user"\}/ {print $2}')"
kill -TERM "$PID"; wait "$PID" || true
target/release/examples/bench_read "$CFG" transactions
STREAMSCORE__KAFKA__INSTANCE_ID=bench-1 "$BIN" --config "$CFG" run 2>"$RUN_DIR/run2.log" &
PID=$!
STARTED=$(date +%s.%N)
until curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null; do sleep 0.1; done
"$BIN" --config "$CFG" generate --count 200 --users "$USERS" --seed 9 2>/dev/null
until [ "$(metric streamscore_events_scored_total | cut -d. -f1)" -ge 200 ] 2>/dev/null; do sleep 0.2; done
until curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null; do sleep 0.1; done
READY=$(date +%s.%N)
# Seconds from the assignment to the last partition's windows rebuilt
# (warm-ups may run side by side, so the metric's sum is not wall time).
ts() { date -d "$(sed 's/\x1b\[[0-9;]*m//g' "$RUN_DIR/run2.log" | grep -- "$1" | "$2" -1 | cut -d' ' -f1)" +%s.%N; }
WARM_WALL=$(awk "BEGIN {printf \"%.2f\", $(ts 'warm-up: windows rebuilt' tail) - $(ts 'after kind="assign"' head)}")
log "second run: ready $(awk "BEGIN {printf \"%.1f\", $READY - $STARTED}") s after start; warm-up replayed $(metric streamscore_warmup_replayed_events_total) events, $(metric streamscore_warmup_duration_seconds_sum) s summed over partitions, $WARM_WALL s from the assignment to the last partition rebuilt; merchant stage replayed $(metric streamscore_merchant_warmup_replayed_events_total); merchant table rows $(metric streamscore_merchant_table_rows)"
log "peak RSS after warm-up: $(awk '/VmHWM/ {print $2, $3}' /proc/$PID/status)"
kill -TERM "$PID"; wait "$PID" || true

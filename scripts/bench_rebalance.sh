#!/usr/bin/env bash
# Event-to-score latency, second by second, while a second instance of
# `streamscore run` joins the group and later leaves it, under steady
# traffic (docs/BENCHMARKS.md, "Latency through a rebalance"). Prints the
# `streamscore watch` lines (scores/s, p50, p99 per second) and the
# instances' rebalance log lines.
#
#   scripts/bench_rebalance.sh [RATE=300] [JOIN_AT=20] [LEAVE_AT=45]
#
# STREAMSCORE_BIN=<path> runs another build (e.g. an older one, for a
# before/after in one sitting) instead of building this tree's.
# PRELOAD=<n> first produces n transactions (n users, 40 ms apart, event
# times ending now: all inside the windows' horizon) and waits until the
# first instance has scored them, so every warm-up at the rebalances
# replays that much state.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
RATE=${1:-300}
JOIN_AT=${2:-20}
LEAVE_AT=${3:-45}
ensure_all
if [[ -z "${STREAMSCORE_BIN:-}" ]]; then
  cargo build --release --quiet --bin streamscore
fi
start_local_services bench-rebalance
CFG=$RUN_DIR/streamscore.toml
FIRST_PORT=$(free_port)
HTTP_PORT=$FIRST_PORT write_local_config "$CFG" "[recs]
topic_transactions = false
rebuild_interval = \"0s\""
SECOND_PORT=$(free_port)
BIN=${STREAMSCORE_BIN:-$PWD/target/release/streamscore}
"$BIN" --config "$CFG" topics apply >/dev/null
PRELOAD=${PRELOAD:-0}
if ((PRELOAD > 0)); then
  "$BIN" --config "$CFG" generate --count "$PRELOAD" --users "$PRELOAD" --mean-gap-ms 40 --seed 8 2>&1 | tail -1
fi
"$BIN" --config "$CFG" run >"$RUN_DIR/a.log" 2>&1 &
FIRST=$!
sleep 8
if ((PRELOAD > 0)); then
  wait_scored "$FIRST_PORT" "$PRELOAD" "$FIRST"
  log "the first instance has scored the $PRELOAD preloaded transactions"
fi
DURATION=$((LEAVE_AT + 20))
"$BIN" --config "$CFG" generate --rate "$RATE" --duration "${DURATION}s" >/dev/null 2>&1 &
"$BIN" --config "$CFG" watch --duration "$((DURATION + 5))s" >"$RUN_DIR/watch.out" 2>&1 &
WATCH=$!
sleep "$JOIN_AT"
log "second ${JOIN_AT}: a second instance starts"
STREAMSCORE__HTTP__BIND=127.0.0.1:$SECOND_PORT "$BIN" --config "$CFG" run >"$RUN_DIR/b.log" 2>&1 &
SECOND=$!
sleep "$((LEAVE_AT - JOIN_AT))"
log "second ${LEAVE_AT}: it stops (SIGTERM)"
kill -TERM "$SECOND"
wait "$SECOND" || true
wait "$WATCH" || true
kill -TERM "$FIRST"
wait "$FIRST" || true
sed "s/\x1b\[[0-9;]*m//g" "$RUN_DIR/watch.out" | grep "scores/s" | awk '{print "second " NR ": " $0}'
log "rebalances (first instance, then second)"
for f in a b; do
  sed "s/\x1b\[[0-9;]*m//g" "$RUN_DIR/$f.log" | grep -E "rebalance: after|previous owner committed|partition held|partition back|kept windows do not match|warm-up: windows rebuilt" | cut -c1-160 || true
done

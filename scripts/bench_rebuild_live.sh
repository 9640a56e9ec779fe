#!/usr/bin/env bash
# Event-to-score latency, second by second, while `streamscore run`
# rebuilds the recommendations inside the same process, under steady
# traffic (docs/BENCHMARKS.md, "Scoring during a periodic rebuild").
#
#   scripts/bench_rebuild_live.sh [RATE=300] [HISTORY=300000] [USERS=300000]
#
# HISTORY transactions with 10 interactions each are produced first (so
# the rebuild replays 10 x HISTORY interactions of USERS users), a first
# generation is built by `streamscore rebuild`, then `run` starts, scores
# the history, and the live traffic and `streamscore watch` start 20 s
# before its first periodic rebuild is due. Prints the watch lines with
# the rebuild's window marked, then p50/p99 of the per-second p99s inside
# and outside that window.
#
# STREAMSCORE_BIN=<path> runs another build (a before/after in one
# sitting); extra [recs] settings go in RECS_EXTRA (TOML lines);
# INTERVAL=0 runs the same traffic with no rebuild (the control).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
RATE=${1:-300}
HISTORY=${2:-300000}
USERS=${3:-300000}
INTERVAL=${INTERVAL:-150}
ensure_all
if [[ -z "${STREAMSCORE_BIN:-}" ]]; then
  cargo build --release --quiet --bin streamscore
fi
BIN=${STREAMSCORE_BIN:-$PWD/target/release/streamscore}
start_local_services bench-rebuild-live
CFG=$RUN_DIR/streamscore.toml
HTTP_PORT=$(free_port)
HTTP_PORT=$HTTP_PORT write_local_config "$CFG" "[recs]
topic_transactions = false
rebuild_interval = \"${INTERVAL}s\"
${RECS_EXTRA:-}"
"$BIN" --config "$CFG" topics apply >/dev/null
log "producing $HISTORY transactions and $((HISTORY * 10)) interactions of history"
"$BIN" --config "$CFG" generate --count "$HISTORY" --interactions-per-txn 10 \
  --users "$USERS" --merchants 5000 --seed 5 2>&1 | tail -1
"$BIN" --config "$CFG" rebuild 2>&1 >/dev/null | tail -1
"$BIN" --config "$CFG" run >"$RUN_DIR/run.log" 2>&1 &
RUN=$!
wait_scored "$HTTP_PORT" "$HISTORY" "$RUN"
if ((INTERVAL > 0)); then
  built=$(redis-cli -p "$REDIS_PORT" GET recs:meta | python3 -c 'import json,sys; print(json.load(sys.stdin)["built_at"] // 1000)')
  lead=$((built + INTERVAL - $(date +%s) - 20))
  ((lead >= 0)) || die "run took too long to score the history; raise INTERVAL (now ${INTERVAL}s)"
  log "history scored; the periodic rebuild is due in $((lead + 20)) s; traffic starts in $lead s"
  sleep "$lead"
else
  log "history scored; INTERVAL=0: no periodic rebuild (the control)"
fi
DURATION=90
# The threads of `run` by nice value, 5 s into the rebuild.
(sleep 25 && ps -L -o ni=,comm= -p "$RUN" | sort | uniq -c >"$RUN_DIR/threads.txt") &
"$BIN" --config "$CFG" generate --rate "$RATE" --duration "${DURATION}s" --users 1000000 >/dev/null 2>&1 &
"$BIN" --config "$CFG" watch --duration "$((DURATION + 3))s" 2>&1 | sed -u "s/\x1b\[[0-9;]*m//g" |
  while IFS= read -r line; do
    [[ "$line" == *"scores/s"* ]] && printf '%s %s\n' "$(date +%s.%N)" "$line"
  done >"$RUN_DIR/watch.out"
kill -TERM "$RUN"
wait "$RUN" || true
sed "s/\x1b\[[0-9;]*m//g" "$RUN_DIR/run.log" | grep -E "rebuild phases|recommendations rebuilt|rebuild failed" | cut -c1-300 || true
log "threads of run 5 s into the rebuild (count, nice, name)"
cat "$RUN_DIR/threads.txt" || true
python3 - "$RUN_DIR/run.log" "$RUN_DIR/watch.out" <<'EOF'
import re, sys, datetime, statistics
log, watch = sys.argv[1:]
ends = []
for line in open(log):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "recommendations rebuilt from the log" in line:
        t = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
        secs = float(re.search(r"seconds=([0-9.]+)", line).group(1))
        ends.append((t - secs, t))
inside, outside = [], []
for line in open(watch):
    t = float(line.split()[0])
    m = re.search(r"scores/s\s+(\d+).*p50\s+(\d+) ms\s+p99\s+(\d+) ms", line)
    if not m:
        continue
    rate, p50, p99 = map(int, m.groups())
    # A watch line covers the second before it is printed.
    during = any(a <= t - 0.5 <= b for a, b in ends)
    (inside if during else outside).append(p99)
    print(f"{'REBUILD' if during else '       '} {line.split(' ', 1)[1].rstrip()}")
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
for name, xs in (("during the rebuild", inside), ("outside it", outside)):
    print(f"{name}: {len(xs)} s; per-second p99: median {q(xs, 0.5)} ms, max {max(xs) if xs else 'n/a'} ms")
EOF

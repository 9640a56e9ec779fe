#!/usr/bin/env bash
# Rebuild figures for docs/BENCHMARKS.md: produces COUNT interactions of
# USERS users over ITEMS items, then times (1) reading them through the
# rebuild's replay path and nothing else, (2) `streamscore rebuild`, in the
# same run on the same broker, and reports the rebuild's peak RSS and its
# wall time over the read's just before it (the issue's target: under 2x).
#
#   scripts/bench_rebuild.sh [COUNT=1000000] [USERS=100000] [ITEMS=50000]
#
# ROUNDS=N repeats read-then-rebuild N times (this machine is noisy: compare
# each rebuild with the reads beside it); a last read ends the run.
# BASELINE_BIN=path/to/another/streamscore also times that build's rebuild
# on the same data right after each round's rebuild (a before/after
# comparison in one run, alternating).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
COUNT=${1:-1000000}
USERS=${2:-100000}
ITEMS=${3:-50000}
ensure_all
apt_install time
cargo build --release --quiet --bin streamscore --example bench_read
start_local_services bench-rebuild
CFG=$RUN_DIR/streamscore.toml
write_local_config "$CFG"
BIN=$PWD/target/release/streamscore
"$BIN" --config "$CFG" topics apply >/dev/null
# generate writes interactions-per-txn interactions per transaction over
# merchants x 10 items.
TXNS=$((COUNT / 10))
"$BIN" --config "$CFG" generate --count "$TXNS" --interactions-per-txn 10 \
  --users "$USERS" --merchants $((ITEMS / 10)) --seed 5 2>&1 | tail -1
# wall_seconds FILE: the "Elapsed (wall clock)" of a `/usr/bin/time -v`
# report, in seconds.
wall_seconds() {
  awk -F': ' '/Elapsed \(wall clock\)/ {
    n = split($2, t, ":"); s = 0
    for (i = 1; i <= n; i++) s = s * 60 + t[i]
    printf "%.2f", s }' "$1"
}
# read_only: runs the read, prints its line, sets READ (seconds).
read_only() {
  local line
  line=$(target/release/examples/bench_read "$CFG")
  echo "$line"
  READ=$(awk '{for (i = 1; i < NF; i++) if ($i == "in") {print $(i + 1); exit}}' <<<"$line")
}
# report NAME FILE: the rebuild's phases, time and memory, and its ratio to
# the read just before it.
report() {
  local name=$1 file=$2 wall
  grep -E "^rebuild: generation|rebuild phases" "$file" | sed "s/\x1b\[[0-9;]*m//g"
  grep -E "Maximum resident|Elapsed|User time|System time" "$file"
  wall=$(wall_seconds "$file")
  awk -v n="$name" -v w="$wall" -v r="$READ" \
    'BEGIN { printf "%s: %.2f s, %.2fx the read before it (%.2f s)\n", n, w, w / r, r }'
}
for round in $(seq 1 "${ROUNDS:-1}"); do
  log "round $round: read only, then rebuild"
  read_only
  /usr/bin/time -v "$BIN" --config "$CFG" rebuild 2>"$RUN_DIR/rebuild.err" >"$RUN_DIR/meta.json"
  report "rebuild" "$RUN_DIR/rebuild.err"
  if [ -n "${BASELINE_BIN:-}" ]; then
    log "round $round: baseline $BASELINE_BIN"
    /usr/bin/time -v "$BASELINE_BIN" --config "$CFG" rebuild 2>"$RUN_DIR/baseline.err" >/dev/null
    report "baseline rebuild" "$RUN_DIR/baseline.err"
  fi
done
log "read only, again"
read_only

#!/usr/bin/env bash
# The batch-system baseline for docs/BENCHMARKS.md: COUNT interactions of
# USERS users over ITEMS items, produced to the local broker and written to
# a JSON-lines file with the same seed and start time (identical events);
# then, in one run, `streamscore rebuild` (release) and the same candidates
# computed by DuckDB over the data exported to Parquet
# (scripts/bench_duckdb.py), with how much their top-20 lists agree.
#
#   scripts/bench_duckdb.sh [COUNT=1000000] [USERS=100000] [ITEMS=50000]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
COUNT=${1:-1000000}
USERS=${2:-100000}
ITEMS=${3:-50000}
ensure_all
apt_install time
python3 -c 'import duckdb' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check 'duckdb==2.0.1' \
  || die "pip install duckdb failed"
cargo build --release --quiet --bin streamscore
start_local_services bench-duckdb
CFG=$RUN_DIR/streamscore.toml
write_local_config "$CFG"
BIN=$PWD/target/release/streamscore
"$BIN" --config "$CFG" topics apply >/dev/null
TXNS=$((COUNT / 10))
START=$(( ($(date +%s) - 30 * 86400) * 1000 ))
GEN=(generate --count "$TXNS" --interactions-per-txn 10 --users "$USERS" --merchants $((ITEMS / 10)) --seed 5 --start-ms "$START")
"$BIN" --config "$CFG" "${GEN[@]}" 2>&1 | tail -1
"$BIN" --config "$CFG" "${GEN[@]}" --output "$RUN_DIR/txns.jsonl" --interactions-output "$RUN_DIR/interactions.jsonl" 2>&1 | tail -1
log "streamscore rebuild"
/usr/bin/time -v "$BIN" --config "$CFG" rebuild 2>"$RUN_DIR/rebuild.err" >/dev/null
grep -E "^rebuild: generation|rebuild phases" "$RUN_DIR/rebuild.err" | sed "s/\x1b\[[0-9;]*m//g"
grep -E "Maximum resident|Elapsed" "$RUN_DIR/rebuild.err"
log "DuckDB"
/usr/bin/time -v python3 scripts/bench_duckdb.py "$RUN_DIR/interactions.jsonl" "$RUN_DIR" "$REDIS_PORT" 2>"$RUN_DIR/duckdb.err"
grep -E "Maximum resident|Elapsed" "$RUN_DIR/duckdb.err"

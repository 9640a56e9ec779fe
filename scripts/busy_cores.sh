#!/usr/bin/env bash
# Busy cores of the whole machine (from /proc/stat) every INTERVAL seconds
# while COMMAND runs: where a run leaves cores idle (docs/BENCHMARKS.md,
# "Seventh look"), and the busy core-seconds of the whole run (what the
# command, the broker and Redis used in all). COMMAND's own output goes to
# busy_cores.out.
#
#   scripts/busy_cores.sh INTERVAL COMMAND [ARGS...]
#   e.g. scripts/busy_cores.sh 0.2 target/release/streamscore --config c.toml rebuild
set -euo pipefail
interval=${1:?usage: busy_cores.sh INTERVAL COMMAND [ARGS...]}
shift
[ $# -gt 0 ] || { echo "usage: busy_cores.sh INTERVAL COMMAND [ARGS...]" >&2; exit 2; }
cores=$(nproc)
sample() { awk '/^cpu / {b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6}' /proc/stat; }
started=$(date +%s.%N)
read -r b0 _ < <(sample)
"$@" >busy_cores.out 2>&1 &
pid=$!
read -r pb pt < <(sample)
line=""
while kill -0 "$pid" 2>/dev/null; do
  sleep "$interval"
  read -r b t < <(sample)
  line+=" $(awk -v c="$cores" -v db=$((b - pb)) -v dt=$((t - pt)) 'BEGIN {printf "%.1f", dt ? c * db / dt : 0}')"
  pb=$b pt=$t
done
wait "$pid" || { echo "command failed; its output: busy_cores.out" >&2; exit 1; }
echo "busy cores (of $cores) every ${interval}s:$line"
read -r b _ < <(sample)
awk -v db=$((b - b0)) -v hz="$(getconf CLK_TCK)" -v t0="$started" -v t1="$(date +%s.%N)" \
  'BEGIN {printf "busy core-seconds: %.1f in %.2f s\n", db / hz, t1 - t0}'

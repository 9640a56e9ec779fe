#!/usr/bin/env bash
# Renders docs/img/freshness.png: a local broker, Redis, streamscore run fed
# at RATE/s for SECONDS (with a periodic recommendation rebuild), a real
# Prometheus scraping it, then the dashboard's freshness panels plotted from
# Prometheus' own data.
#
#   scripts/render_dashboard.sh [SECONDS=120] [RATE=500]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
SECONDS_RUN=${1:-120}
RATE=${2:-500}
ensure_all
python3 -c "import matplotlib" 2>/dev/null || pip install -q matplotlib
cargo build --release --quiet --bin streamscore
BIN=$PWD/target/release/streamscore
start_local_services render
HTTP_PORT=$(free_port)
PROM_PORT=$(free_port)
CFG=$RUN_DIR/streamscore.toml
write_local_config "$CFG" $'[recs]\nrebuild_interval = "30s"'
export STREAMSCORE_CONFIG=$CFG
"$BIN" topics apply >/dev/null
"$BIN" generate --count 10000 --users 2000 --merchants 200 --interactions-per-txn 3 --seed 11 2>/dev/null
setsid "$BIN" run 2>"$RUN_DIR/run.log" &
SS_PIDS+=($!)
cat >"$RUN_DIR/prometheus.yml" <<YML
global: {scrape_interval: 2s, evaluation_interval: 2s}
scrape_configs:
  - job_name: streamscore
    static_configs: [{targets: ["127.0.0.1:$HTTP_PORT"]}]
YML
setsid prometheus --config.file="$RUN_DIR/prometheus.yml" --storage.tsdb.path="$RUN_DIR/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" 2>"$RUN_DIR/prometheus.log" &
SS_PIDS+=($!)
wait_port "$PROM_PORT" 30 prometheus
log "traffic at $RATE/s for ${SECONDS_RUN}s"
timeout "$SECONDS_RUN" "$BIN" generate --rate "$RATE" --users 100000 --merchants 5000 \
  --interactions-per-txn 2 2>/dev/null || true
mkdir -p docs/img
python3 scripts/render_dashboard.py "http://127.0.0.1:$PROM_PORT" "$SECONDS_RUN" docs/img/freshness.png

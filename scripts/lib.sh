# shellcheck shell=bash
# Shared helpers of scripts/*.sh: install what is missing, start local
# services on free loopback ports, and stop only what we started.
#
# Tool installs are cached outside the clone, in $STREAMSCORE_CACHE
# (default ~/.cache/streamscore), so CI on the same machine reuses them.

STREAMSCORE_CACHE="${STREAMSCORE_CACHE:-$HOME/.cache/streamscore}"
TANSU_VERSION="0.6.0"
TANSU_BIN="$STREAMSCORE_CACHE/tansu-$TANSU_VERSION/bin/tansu"
SS_PIDS=()

log() { printf '\033[1m[streamscore]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[streamscore] error:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ "$APT_UPDATED" = 0 ]; then
    as_root apt-get update -qq || die "apt-get update failed"
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# Build dependencies of the crate (librdkafka with TLS is built from source).
ensure_build_deps() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
  apt_install build-essential pkg-config libssl-dev cmake
}

ensure_redis() { apt_install redis-server redis-tools; }

# A real Prometheus (and promtool) for the metrics and alert-rule tests.
ensure_prometheus() { apt_install prometheus; }

# docker-compose (v1, Debian) checks docker-compose.yml; no engine needed.
ensure_compose() { apt_install docker-compose; }

# A real OpenAPI validator (PyPI) for docs/openapi.yaml.
ensure_openapi_validator() {
  python3 -c 'import openapi_spec_validator' 2>/dev/null && return 0
  log "installing openapi-spec-validator (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check 'openapi-spec-validator==0.7.1' \
    || die "pip install openapi-spec-validator failed"
}

# The Kafka-protocol broker, built once per machine into the cache (~9 min).
ensure_tansu() {
  if [ -x "$TANSU_BIN" ]; then return 0; fi
  log "building the tansu $TANSU_VERSION broker into $STREAMSCORE_CACHE (about 9 minutes, once per machine)"
  mkdir -p "$STREAMSCORE_CACHE"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore \
    --root "$STREAMSCORE_CACHE/tansu-$TANSU_VERSION" >"$STREAMSCORE_CACHE/tansu-install.log" 2>&1 \
    || { tail -20 "$STREAMSCORE_CACHE/tansu-install.log" >&2; die "cargo install tansu failed"; }
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT SECONDS NAME
wait_port() {
  local port=$1 secs=$2 name=$3 i
  for ((i = 0; i < secs * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$name did not open 127.0.0.1:$port within ${secs}s"
}

# start_tansu DIR [ENGINE]: sets TANSU_PORT. ENGINE: memory (default) or sqlite.
start_tansu() {
  local dir=$1 engine=${2:-memory} storage
  mkdir -p "$dir"
  TANSU_PORT=$(free_port)
  if [ "$engine" = sqlite ]; then storage="sqlite://tansu.db"; else storage="memory://tansu/"; fi
  # Own session: a Ctrl-C in the terminal must not stop the broker before the
  # processor has drained and committed; stop_started stops it afterwards.
  (cd "$dir" && exec setsid "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$TANSU_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$TANSU_PORT" \
    --storage-engine "$storage" >"$dir/tansu.log" 2>&1) &
  SS_PIDS+=($!)
  wait_port "$TANSU_PORT" 30 "tansu broker (log: $dir/tansu.log)"
  log "broker (tansu $TANSU_VERSION, $engine) on 127.0.0.1:$TANSU_PORT"
}

# start_redis DIR: sets REDIS_PORT. No persistence.
start_redis() {
  local dir=$1
  mkdir -p "$dir"
  REDIS_PORT=$(free_port)
  setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/redis.log" --daemonize no &
  SS_PIDS+=($!)
  wait_port "$REDIS_PORT" 15 "redis-server (log: $dir/redis.log)"
  redis-cli -p "$REDIS_PORT" ping >/dev/null || die "redis-server does not answer PING"
  log "redis-server on 127.0.0.1:$REDIS_PORT"
}

# Stops what this script started (and only that).
stop_started() {
  local pid
  for pid in "${SS_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${SS_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  SS_PIDS=()
}

# ensure_all: everything the tests, demo and benchmarks need on this machine.
ensure_all() {
  ensure_build_deps
  ensure_redis
  ensure_prometheus
  ensure_compose
  ensure_openapi_validator
  ensure_tansu
}

# tansu 0.6 has no Kafka transactions (EndTxn unsupported): every
# streamscore these scripts start publishes recommendations without one.
export STREAMSCORE__RECS__TOPIC_TRANSACTIONS=false

# write_local_config FILE [EXTRA_TOML]: a streamscore config for the local
# broker and Redis started here (TANSU_PORT, REDIS_PORT), with http.bind on
# HTTP_PORT when set, then EXTRA_TOML.
write_local_config() {
  local file=$1 extra=${2:-}
  {
    printf '[kafka]\nbrokers = "127.0.0.1:%s"\n[redis]\nurl = "redis://127.0.0.1:%s"\n' \
      "$TANSU_PORT" "$REDIS_PORT"
    if [ -n "${HTTP_PORT:-}" ]; then printf '[http]\nbind = "127.0.0.1:%s"\n' "$HTTP_PORT"; fi
    if [ -n "$extra" ]; then printf '%s\n' "$extra"; fi
  } >"$file"
}

# metric_at PORT NAME: the value of an unlabelled metric of the streamscore
# serving /metrics on 127.0.0.1:PORT (empty when it does not answer).
metric_at() { { curl -s "http://127.0.0.1:$1/metrics" || true; } | awk -v n="$2" '$1 == n {print $2}'; }

# wait_scored PORT N PID: waits until that streamscore has scored N events;
# dies if PID exits first.
wait_scored() {
  local port=$1 n=$2 pid=$3 v
  while :; do
    v=$(metric_at "$port" streamscore_events_scored_total | awk '{printf "%d", $1}')
    [ -n "$v" ] && [ "$v" -ge "$n" ] && return 0
    kill -0 "$pid" 2>/dev/null || die "streamscore (pid $pid) exited before scoring $n events"
    sleep 2
  done
}

# start_local_services NAME: a throw-away folder, a broker and redis-server
# in it, and a trap that stops them and removes the folder on exit. Sets
# RUN_DIR, TANSU_PORT, REDIS_PORT. TANSU_ENGINE=sqlite picks tansu's
# durable engine (default: memory).
start_local_services() {
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/streamscore-$1.XXXXXX")
  trap 'stop_started; rm -rf "$RUN_DIR"' EXIT
  start_tansu "$RUN_DIR/tansu" "${TANSU_ENGINE:-memory}"
  start_redis "$RUN_DIR/redis"
}

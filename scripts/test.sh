#!/usr/bin/env bash
# The test command: installs what is missing (Debian packages, the tansu
# broker), starts a broker and redis-server on free loopback ports, then runs
# formatting, lint, docs and the whole test suite against them. Stops what it
# started. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ensure_all
start_local_services test

export STREAMSCORE_TEST_BROKERS="127.0.0.1:$TANSU_PORT"
export STREAMSCORE_TEST_REDIS="redis://127.0.0.1:$REDIS_PORT"
export STREAMSCORE_TEST_TANSU_BIN="$TANSU_BIN"
# The key flood pushes millions of events through the optimised binary.
log "cargo build --release --bin streamscore"
cargo build --release --quiet --bin streamscore
export STREAMSCORE_TEST_RELEASE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/streamscore"

log "openapi-spec-validator docs/openapi.yaml"
python3 -m openapi_spec_validator docs/openapi.yaml
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
log "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
log "cargo test (unit + integration, real broker and Redis)"
cargo test --lib --bins --tests -- --test-threads 2 "$@"

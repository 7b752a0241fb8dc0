#!/usr/bin/env bash
# Runs every test of pushgate on a fresh machine: installs what the tests
# need (promtool, from the Debian package `prometheus`; the wasm32-wasip2
# target; the RocketMQ name server and broker, built once from crates.io
# into /opt/rocketmq), then `cargo test`. The cluster tests start and stop
# their own name server and broker on free loopback ports.
# README.md and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (Debian package prometheus)"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# Browser tests drive Debian's Chromium (never a downloaded browser)
# through playwright-core; the JavaScript client builds with TypeScript.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (Debian package)"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
# JavaScript plugins build with componentize-js (npm).
(cd plugins/js && npm ci --no-audit --no-fund --loglevel=error)
# The Pusher protocol's tests drive npm's pusher-js, laravel-echo and pusher.
(cd tests/pusher && npm ci --no-audit --no-fund --loglevel=error)

# Cluster tests run against a real RocketMQ name server and broker.
bash scripts/rocketmq.sh install

# Plugin tests build the plugins in plugins/ from source, as components.
rustup target add wasm32-wasip2 >/dev/null

# Integration tests open many sockets; use all the descriptors we may.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The fuzz targets (`fuzz` tests, see src/fuzzing.rs) run this long each
# here; scripts/fuzz.sh runs them for longer.
export ARBTEST_BUDGET_MS="${ARBTEST_BUDGET_MS:-2000}"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --all-targets "$@" 2>&1 | tee "$log"
# The plugin SDK's own unit tests (plain Rust, run natively).
cargo test --manifest-path plugins/Cargo.toml -p pushgate-plugin-sdk --lib \
  --target-dir plugins/target/native 2>&1 | tee -a "$log"

# The JavaScript client's own unit tests (Node.js).
(cd clients/js && npm test --silent) 2>&1 | tee -a "$log"

# One line for the whole run (test binaries without tests print "0 passed").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

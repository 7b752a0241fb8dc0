#!/usr/bin/env bash
# Runs every test of pushgate on a fresh machine: installs what the tests
# need (promtool, from the Debian package `prometheus`; the wasm32-wasip2
# target), then `cargo test`.
# README.md and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (Debian package prometheus)"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# Plugin tests build the plugins in plugins/ from source, as components.
rustup target add wasm32-wasip2 >/dev/null

# Integration tests open many sockets; use all the descriptors we may.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --all-targets "$@"
# The plugin SDK's own unit tests (plain Rust, run natively).
cargo test --manifest-path plugins/Cargo.toml -p pushgate-plugin-sdk --target-dir plugins/target/native

#!/usr/bin/env bash
# Builds the plugins in plugins/ and runs the plugin benchmark
# (tools/plugin_bench.rs) in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null
cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release
(cd plugins/js && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
cargo run --release --example plugin_bench

#!/usr/bin/env bash
# Runs every test of pushgate on a fresh machine: installs what the tests
# need, then `cargo test`. README.md and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

# Integration tests open many sockets; use all the descriptors we may.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --all-targets "$@"

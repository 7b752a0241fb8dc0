#!/usr/bin/env bash
# Builds pushgate and its load generator in release mode, starts a node with
# tools/loadgen.toml, runs the load generator against it, and stops the
# node. Arguments go to the load generator, e.g.:
#   scripts/bench.sh --connections 19000 --procs 2 --broadcasts 20 --rates 5000,20000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pushgate --example loadgen
ulimit -n "$(ulimit -Hn)"
target/release/pushgate serve --config tools/loadgen.toml &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:8081/readyz >/dev/null && break
  sleep 0.1
done
echo "# $(nproc) cores; $(uname -r); server pid $server"
target/release/examples/loadgen --server-pid "$server" "$@"

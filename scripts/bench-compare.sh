#!/usr/bin/env bash
# Runs the same load against several node setups, alternating, twice:
# each argument is "BINARY CONFIG" (quoted), e.g.
#   scripts/bench-compare.sh "target/release/pushgate tools/loadgen.toml" \
#     "/tmp/old/pushgate tools/loadgen.toml"
# LOADGEN_ARGS (default: 10,000 clients, unicast at 20,000/s for 4 s) goes to
# the load generator. Every setup listens on 127.0.0.1:8080/8081.
set -u
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
args=${LOADGEN_ARGS:---connections 10000 --procs 1 --broadcasts 0 --rates 20000 --seconds 4}
for round in 1 2; do
  for setup in "$@"; do
    read -r binary config <<<"$setup"
    "$binary" serve --config "$config" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf http://127.0.0.1:8081/readyz >/dev/null && break; sleep 0.1; done
    # shellcheck disable=SC2086
    out=$(target/release/examples/loadgen --server-pid "$server" $args 2>&1)
    echo "== round $round, $setup"
    echo "$out" | grep -E "^(idle|broadcast|unicast)"
    kill "$server"; wait "$server" 2>/dev/null
  done
done

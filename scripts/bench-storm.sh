#!/usr/bin/env bash
# A reconnect storm (tools/resume_storm.rs): starts a release node with
# tenant `storm` (the plugin PLUGIN, default personalize, serving its
# on-deliver hook) and tenant `quiet`, has CLIENTS clients of `storm` resume
# at once having missed MISSED broadcasts each, and prints what it cost the
# quiet tenant and the node. Runs it twice — with MISSED and with none —
# so that the difference gives the node's CPU time per replayed message
# without the handshakes. The node is stopped by its PID at the end.
#   scripts/bench-storm.sh [CLIENTS] [MISSED] [PLUGIN] [DATA]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-5000}
missed=${2:-20}
plugin=${3:-personalize}
data=${4:-'{"i18n": {"en": "hello", "fr": "bonjour"}}'}
cargo build --release --bin pushgate --example resume_storm
cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release -p "$plugin" >/dev/null
component="plugins/target/wasm32-wasip2/release/${plugin//-/_}.wasm"
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
public=$(port); internal=$(port)
cat > "$work/pushgate.toml" <<TOML
[listen]
public = "127.0.0.1:$public"
internal = "127.0.0.1:$internal"
[admin]
token = "storm-admin"
[state]
dir = "$work/state"
[log]
filter = "warn"
[tenants.storm]
push_keys = ["storm-key"]
auth = "development"
[tenants.storm.plugin]
timeout = "1s"
[tenants.quiet]
push_keys = ["quiet-key"]
auth = "development"
TOML
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
run() {
  target/release/pushgate serve --config "$work/pushgate.toml" &
  server=$!
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$internal/readyz" >/dev/null && break
    sleep 0.1
  done
  curl -sf -X POST -H "Authorization: Bearer storm-admin" --data-binary "@$component" \
    "http://127.0.0.1:$internal/admin/v1/tenants/storm/plugins" >/dev/null
  target/release/examples/resume_storm --ws-addr "127.0.0.1:$public" \
    --http-addr "127.0.0.1:$internal" --server-pid "$server" \
    --clients "$clients" --missed "$1" --data "$data"
  kill "$server"; wait "$server" 2>/dev/null || true; server=""
  rm -rf "$work/state"
}
echo "# $(nproc) cores; $clients clients; plugin $plugin"
run "$missed"
run 0

#!/usr/bin/env bash
# NODES release nodes (default 3, at most 9) clustered through one RocketMQ
# name server and broker (scripts/rocketmq.sh, on 127.0.0.1:9876 / :10911),
# and the load generator against all of them: clients spread over the
# nodes, pushes sent to the nodes in turn. First each node's CPU while idle
# (IDLE_SECONDS, default 60; 0 skips it). Stops everything it started when
# it ends. Arguments go to the load generator, e.g.:
#   scripts/bench-cluster.sh --connections 3000 --broadcasts 10 --rates 2000,5000,10000 --seconds 5
#   NODES=6 scripts/bench-cluster.sh --connections 100000 --procs 6 --broadcasts 10 --rates 1000,5000 --seconds 5
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pushgate --example loadgen
bash scripts/rocketmq.sh install
ulimit -n "$(ulimit -Hn)"

NODES=${NODES:-3}
IDLE_SECONDS=${IDLE_SECONDS:-60}
[ "$NODES" -ge 2 ] && [ "$NODES" -le 9 ] || { echo "NODES: 2 to 9" >&2; exit 2; }
nodes=$(seq "$NODES")
# The broker's store on tmpfs where there is one (see scripts/rocketmq.sh).
work=$(mktemp -d -p "$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp )")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  bash scripts/rocketmq.sh stop "$work/rocketmq" >/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
bash scripts/rocketmq.sh start "$work/rocketmq"
broker=$(cat "$work/rocketmq/broker.pid")

for n in $nodes; do
  PUSHGATE_LISTEN__PUBLIC="127.0.0.1:808$n" PUSHGATE_LISTEN__INTERNAL="127.0.0.1:909$n" \
  PUSHGATE_BUS__ENGINE=rocketmq PUSHGATE_BUS__ROCKETMQ__INSTANCE_NAME="bench-$n" \
  PUSHGATE_BUS__ROCKETMQ__TOPIC="pushgate_bench_$$" PUSHGATE_STATE__DIR="$work/state-$n" \
  PUSHGATE_ADMIN__TOKEN=bench-admin \
    target/release/pushgate serve --config tools/loadgen.toml &
  pids+=($!)
done
for n in $nodes; do
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:909$n/readyz" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:909$n/readyz" >/dev/null || { echo "node $n not ready" >&2; exit 1; }
done

# How long a plugin change made through node 1 takes to be active on every
# other node: an upload (compiled by every node), then activations.
cargo build --quiet --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
wasm=plugins/target/wasm32-wasip2/release
admin() { curl -sf -H "Authorization: Bearer bench-admin" "$@"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
active_everywhere() {
  for n in $(seq 2 "$NODES"); do
    admin "http://127.0.0.1:909$n/admin/v1/tenants/bench/plugins" | grep -q "\"active\":\"$1\"" || return 1
  done
}
wait_active() {
  local start=$1 version=$2
  until active_everywhere "$version"; do sleep 0.005; done
  echo $(( $(now_ms) - start ))
}
start=$(now_ms)
first=$(admin --data-binary "@$wasm/keyword_filter.wasm" http://127.0.0.1:9091/admin/v1/tenants/bench/plugins | sed 's/.*"version":"\([0-9a-f]*\)".*/\1/')
echo "plugin upload through node 1 active on nodes 2 to $NODES after $(wait_active "$start" "$first") ms"
second=$(admin --data-binary "@$wasm/pass_through.wasm" "http://127.0.0.1:9091/admin/v1/tenants/bench/plugins?activate=false" | sed 's/.*"version":"\([0-9a-f]*\)".*/\1/')
until admin "http://127.0.0.1:909$NODES/admin/v1/tenants/bench/plugins" | grep -q "$second"; do sleep 0.01; done
times=()
for round in 1 2 3 4 5; do
  for version in "$second" "$first"; do
    start=$(now_ms)
    admin -X POST "http://127.0.0.1:9091/admin/v1/tenants/bench/plugins/$version/activate" >/dev/null
    times+=("$(wait_active "$start" "$version")")
  done
done
echo "plugin activation through node 1 active on nodes 2 to $NODES after (ms): ${times[*]}"
# The load below runs without a plugin.
admin -X DELETE "http://127.0.0.1:9091/admin/v1/tenants/bench/plugins/$first" >/dev/null
admin -X DELETE "http://127.0.0.1:9091/admin/v1/tenants/bench/plugins/$second" >/dev/null

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
if [ "$IDLE_SECONDS" -gt 0 ]; then
  before=()
  for pid in "${pids[@]}"; do before+=("$(ticks "$pid")"); done
  sleep "$IDLE_SECONDS"
  idle=()
  for i in "${!pids[@]}"; do
    idle+=("$(awk -v a="${before[$i]}" -v b="$(ticks "${pids[$i]}")" -v s="$IDLE_SECONDS" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { printf "%.3f", (b - a) / hz / s * 100 }')")
  done
  echo "idle CPU per node over $IDLE_SECONDS s, % of a core: ${idle[*]}"
fi
broker_before=$(ticks "$broker")
join() { local IFS=,; echo "$*"; }
ws=(); http=()
for n in $nodes; do ws+=("127.0.0.1:808$n"); http+=("127.0.0.1:909$n"); done
echo "# $(nproc) cores; $(uname -r); node pids ${pids[*]}; broker pid $broker"
target/release/examples/loadgen \
  --ws-addr "$(join "${ws[@]}")" \
  --http-addr "$(join "${http[@]}")" \
  --server-pid "$(join "${pids[@]}")" "$@"
broker_after=$(ticks "$broker")
# What each node did not deliver, and why (a cluster node drops every
# message it holds no recipient of: `no_local_recipient` is not a loss).
for n in $nodes; do
  metrics=$(curl -sf "http://127.0.0.1:909$n/metrics" || true)
  drops=$(echo "$metrics" | { grep '^pushgate_messages_dropped_total' || true; } \
    | { grep -v no_local_recipient || true; } | sed 's/.*reason="\([^"]*\)".* \([0-9.e+]*\)$/\1=\2/' | sort | tr '\n' ' ')
  delivered=$(echo "$metrics" | awk '/^pushgate_messages_delivered_total/ { sum += $NF } END { print sum + 0 }')
  echo "node $n: frames delivered $delivered; not delivered, by reason: ${drops:-none}"
done
awk -v a="$broker_before" -v b="$broker_after" 'BEGIN { printf "broker CPU over the whole run: %.2f s\n", (b - a) / 100 }'

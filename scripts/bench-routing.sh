#!/usr/bin/env bash
# What a unicast push costs the fleet, one node against NODES (default
# six) on one RocketMQ name server and broker (scripts/rocketmq.sh,
# 127.0.0.1:9876 / :10911):
#  1. one node alone: clients and pushes on it;
#  2. NODES nodes, clients spread over them, pushes through each in turn;
#  3. NODES nodes, every client on node 1, pushes through node 2: the
#     others hold no recipient.
# Each phase prints the load generator's figures and each node's CPU per
# push. ROUTE=false runs the nodes without `bus.rocketmq.route_to_holders`
# (every push to every node), for comparison. Arguments go to the load
# generator (default: 600 clients, 1,000 and 2,000 pushes/s for 10 s).
# Stops everything it started when it ends.
#   scripts/bench-routing.sh
#   ROUTE=false scripts/bench-routing.sh --connections 600 --rates 1000 --seconds 10
#   NODES=24 SKIP_ONE=1 scripts/bench-routing.sh   # without phase 1
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pushgate --example loadgen
bash scripts/rocketmq.sh install
ulimit -n "$(ulimit -Hn)"

ROUTE=${ROUTE:-true}
NODES=${NODES:-6}
SKIP_ONE=${SKIP_ONE:-}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--connections 600 --broadcasts 1 --rates 1000,2000 --seconds 10)
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

# start_nodes TOPIC COUNT: starts COUNT nodes on TOPIC, waits until ready.
start_nodes() {
  local topic=$1 count=$2
  pids=()
  for n in $(seq "$count"); do
    PUSHGATE_LISTEN__PUBLIC="127.0.0.1:$((18000 + n))" PUSHGATE_LISTEN__INTERNAL="127.0.0.1:$((19000 + n))" \
    PUSHGATE_BUS__ENGINE=rocketmq PUSHGATE_BUS__ROCKETMQ__INSTANCE_NAME="route-$n" \
    PUSHGATE_BUS__ROCKETMQ__TOPIC="$topic" PUSHGATE_STATE__DIR="$work/state-$topic-$n" \
    PUSHGATE_BUS__ROCKETMQ__ROUTE_TO_HOLDERS="$ROUTE" \
      target/release/pushgate serve --config tools/loadgen.toml >"$work/node-$topic-$n.log" 2>&1 &
    pids+=($!)
  done
  for n in $(seq "$count"); do
    for _ in $(seq 600); do
      curl -sf "http://127.0.0.1:$((19000 + n))/readyz" >/dev/null && break
      sleep 0.1
    done
    curl -sf "http://127.0.0.1:$((19000 + n))/readyz" >/dev/null || { echo "node $n not ready" >&2; exit 1; }
  done
  # A routing node routes once it listened ten heartbeats for nodes of an
  # older version and every node says it routes.
  if [ "$ROUTE" = true ] && [ "$count" -gt 1 ]; then
    for n in $(seq "$count"); do
      for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$((19000 + n))/metrics" | grep -q '^pushgate_bus_routing 1' && break
        sleep 0.1
      done
      curl -sf "http://127.0.0.1:$((19000 + n))/metrics" | grep -q '^pushgate_bus_routing 1' \
        || { echo "node $n does not route" >&2; exit 1; }
    done
  fi
}
stop_nodes() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}
join() { local IFS=,; echo "$*"; }

echo "# $(nproc) cores; $(uname -r); route_to_holders=$ROUTE"
if [ -z "$SKIP_ONE" ]; then
  echo "## one node alone"
  start_nodes "pushgate_route1_$$" 1
  target/release/examples/loadgen --ws-addr 127.0.0.1:18001 --http-addr 127.0.0.1:19001 \
    --server-pid "${pids[0]}" "${args[@]}"
  stop_nodes
fi

start_nodes "pushgate_route_$$" "$NODES"
ws=(); http=()
for n in $(seq "$NODES"); do ws+=("127.0.0.1:$((18000 + n))"); http+=("127.0.0.1:$((19000 + n))"); done
echo "## $NODES nodes, clients on all, pushes through all"
target/release/examples/loadgen --ws-addr "$(join "${ws[@]}")" --http-addr "$(join "${http[@]}")" \
  --server-pid "$(join "${pids[@]}")" "${args[@]}"
echo "## $NODES nodes, clients on node 1, pushes through node 2 (the others hold none)"
target/release/examples/loadgen --ws-addr 127.0.0.1:18001 --http-addr 127.0.0.1:19002 \
  --server-pid "$(join "${pids[@]}")" "${args[@]}"
stop_nodes

#!/usr/bin/env bash
# The seed's million on this one box: a RocketMQ name server and broker,
# as many routing nodes as the open-file limit per process needs (PER_NODE
# connections each: 52 for a million under this machine's 20,000), and the
# load generator in as many worker processes, its clients spread over
# loopback source addresses, every client pinging every 25 s as the
# JavaScript client does. It opens CONNECTIONS WebSocket connections (user
# u on node u % nodes: its owner is mostly another node), holds them
# HOLD_SECONDS without traffic (the nodes' CPU meanwhile is the idle
# figure), broadcasts BROADCASTS times to all, pushes UNICAST_RATE unicasts
# per second for UNICAST_SECONDS, then kills the last node with SIGKILL
# while pushing KILL_RATE unicasts per second through the others, until its
# clients are back elsewhere with `since`. It stops everything it started,
# by PID, puts back every kernel setting it changed, and prints one JSON
# summary as its last line.
#
#   scripts/bench-million.sh                      # the million (not yet held here)
#   CONNECTIONS=100000 HOLD_SECONDS=60 scripts/bench-million.sh   # ~5 min
#   CONNECTIONS=500000 HOLD_SECONDS=120 scripts/bench-million.sh  # 27 nodes
#   KEEP_LOGS=/tmp/million ...   # keeps the nodes', broker's and client's logs
#
# It needs `cargo build --release` and `scripts/rocketmq.sh install` done
# (it runs both; they return at once when done), and refuses to start when
# the machine lacks the memory or limits it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-1000000}
PER_NODE=${PER_NODE:-19500}
HOLD_SECONDS=${HOLD_SECONDS:-600}
BROADCASTS=${BROADCASTS:-5}
UNICAST_RATE=${UNICAST_RATE:-1000}
UNICAST_SECONDS=${UNICAST_SECONDS:-60}
KILL_RATE=${KILL_RATE:-100}
# What the run needs per connection, all told (the node's, the client's and
# both sockets' in the kernel: 2.9 + 2.6 + ~9.3 KiB measured, see
# BENCHMARKS.md "Toward the seed's million"), and per node before its
# clients.
KIB_PER_CONNECTION=${KIB_PER_CONNECTION:-15}
MIB_PER_NODE=${MIB_PER_NODE:-40}
# And each routing node's map of where every user is: bytes per user of
# the whole fleet, on every node.
LOCATION_BYTES=${LOCATION_BYTES:-50}
PUBLIC_BASE=20000
INTERNAL_BASE=22000

# ---- what the machine must have, checked before anything starts
refuse() { echo "bench-million: refusing to start: $*" >&2; exit 3; }
# PER_NODE clients per node at most, and room on the others for a killed
# node's: a node's open files are its clients and ~200 of its own.
limit=$(ulimit -Hn)
[ "$PER_NODE" -le $(( limit - 200 )) ] \
  || refuse "PER_NODE $PER_NODE needs $(( PER_NODE + 200 )) open files per process; the hard limit is $limit"
nodes=$(( (CONNECTIONS + PER_NODE - 1) / PER_NODE ))
[ "$nodes" -ge 2 ] || nodes=2
while [ $(( (CONNECTIONS + nodes - 2) / (nodes - 1) + 200 )) -gt "$limit" ]; do nodes=$((nodes + 1)); done
[ "$nodes" -le 1000 ] || refuse "$nodes nodes is too many"
file_max=$(cat /proc/sys/fs/file-max)
[ "$file_max" -ge $(( CONNECTIONS * 2 + 100000 )) ] \
  || refuse "fs.file-max is $file_max; two sockets per connection need $(( CONNECTIONS * 2 + 100000 ))"
available_kib=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
locations_kib=$(( CONNECTIONS * nodes * LOCATION_BYTES / 1024 ))
needed_kib=$(( CONNECTIONS * KIB_PER_CONNECTION + nodes * MIB_PER_NODE * 1024 + locations_kib + 1024 * 1024 ))
[ "$available_kib" -ge "$needed_kib" ] \
  || refuse "$(( needed_kib / 1024 )) MiB of memory needed ($KIB_PER_CONNECTION KiB per connection, $MIB_PER_NODE MiB per node, $(( locations_kib / 1024 )) MiB for $nodes copies of where users are, 1 GiB for the broker), $(( available_kib / 1024 )) MiB available"
ports=$(awk '{ print $2 - $1 + 1 }' /proc/sys/net/ipv4/ip_local_port_range)
# The load generator spreads each worker over 8 source addresses of
# 127.0.1.0/24; 255 addresses hold the clients' ports.
[ $(( ports * 255 )) -ge "$CONNECTIONS" ] || refuse "ephemeral ports $ports × 255 addresses < $CONNECTIONS"
for n in $(seq "$nodes"); do
  for port in $((PUBLIC_BASE + n)) $((INTERNAL_BASE + n)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then refuse "port $port is in use"; fi
  done
done

cargo build --release --bin pushgate --example loadgen
bash scripts/rocketmq.sh install
ulimit -n "$(ulimit -Hn)"

# ---- kernel settings, put back at the end
declare -A changed=()
set_sysctl() {
  local key=$1 value=$2 file="/proc/sys/${1//./\/}"
  [ -w "$file" ] || { echo "# $key: not settable here, left as $(cat "$file" 2>/dev/null || echo absent)"; return; }
  local was
  was=$(cat "$file")
  [ "$was" -ge "$value" ] && return
  changed[$key]=$was
  echo "$value" >"$file"
  echo "# $key: $was -> $value (put back at the end)"
}

work=$(mktemp -d -p "$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp )")
pids=()
cleaned=
cleanup() {
  [ -n "$cleaned" ] && return
  cleaned=1
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  bash scripts/rocketmq.sh stop "$work/rocketmq" >/dev/null 2>&1 || true
  if [ -n "${KEEP_LOGS:-}" ]; then
    mkdir -p "$KEEP_LOGS" && cp "$work"/*.log "$work"/*.out "$work/rocketmq"/*.log "$KEEP_LOGS"/ 2>/dev/null || true
    echo "# logs kept in $KEEP_LOGS"
  fi
  for key in "${!changed[@]}"; do
    echo "${changed[$key]}" >"/proc/sys/${key//./\/}"
    echo "# $key put back to ${changed[$key]}"
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Loopback connections are tracked like any other where connection
# tracking is loaded: its table must hold every one.
set_sysctl net.netfilter.nf_conntrack_max $(( CONNECTIONS * 2 + 100000 ))
# Accepts queue up while a ramp or a killed node's clients arrive at once.
set_sysctl net.core.somaxconn 4096
set_sysctl net.ipv4.tcp_max_syn_backlog 8192

bash scripts/rocketmq.sh start "$work/rocketmq"
topic="pushgate_million_$$"
for n in $(seq "$nodes"); do
  PUSHGATE_LISTEN__PUBLIC="127.0.0.1:$((PUBLIC_BASE + n))" PUSHGATE_LISTEN__INTERNAL="127.0.0.1:$((INTERNAL_BASE + n))" \
  PUSHGATE_BUS__ENGINE=rocketmq PUSHGATE_BUS__ROCKETMQ__INSTANCE_NAME="million-$n" \
  PUSHGATE_BUS__ROCKETMQ__TOPIC="$topic" PUSHGATE_STATE__DIR="$work/state-$n" \
  PUSHGATE_BUS__ROCKETMQ__ROUTE_TO_HOLDERS=true \
    target/release/pushgate serve --config tools/loadgen.toml >"$work/node-$n.log" 2>&1 &
  pids+=($!)
done
started=$(date +%s)
metric() { curl -sf "http://127.0.0.1:$((INTERNAL_BASE + $1))/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
for n in $(seq "$nodes"); do
  until [ "$(metric "$n" pushgate_bus_routing)" = 1 ]; do
    kill -0 "${pids[$((n - 1))]}" 2>/dev/null || { echo "node $n exited:" >&2; tail -5 "$work/node-$n.log" >&2; exit 1; }
    [ $(( $(date +%s) - started )) -lt 600 ] || { echo "node $n does not route after 600 s" >&2; exit 1; }
    sleep 0.5
  done
done
echo "# $nodes nodes routing $(( $(date +%s) - started )) s after their start; $(nproc) cores; $(uname -r)"

join() { local IFS=,; echo "$*"; }
ws=(); http=()
for n in $(seq "$nodes"); do
  ws+=("127.0.0.1:$((PUBLIC_BASE + n))")
  http+=("127.0.0.1:$((INTERNAL_BASE + n))")
done
target/release/examples/loadgen \
  --ws-addr "$(join "${ws[@]}")" --http-addr "$(join "${http[@]}")" \
  --server-pid "$(join "${pids[@]}")" \
  --connections "$CONNECTIONS" --procs "$nodes" --source-ips 8 \
  --ping-seconds 25 --reconnect --hold-seconds "$HOLD_SECONDS" \
  --broadcasts "$BROADCASTS" --rates "$UNICAST_RATE" --seconds "$UNICAST_SECONDS" \
  --concurrency 256 --kill-node "$nodes" --kill-rate "$KILL_RATE" --summary | tee "$work/loadgen.out"
summary=$(tail -1 "$work/loadgen.out")
# What each node did not deliver, and why (`no_local_recipient` is a node
# holding none of a push's recipients: not a loss).
for n in $(seq $((nodes - 1))); do
  drops=$(curl -sf "http://127.0.0.1:$((INTERNAL_BASE + n))/metrics" | { grep '^pushgate_messages_dropped_total' || true; } \
    | { grep -v -e no_local_recipient -e ' 0$' || true; } | sed 's/.*reason="\([^"]*\)".* \([0-9.e+]*\)$/\1=\2/' | tr '\n' ' ')
  [ -z "$drops" ] || echo "node $n: not delivered, by reason: $drops"
done
cleanup
python3 -c 'import json, sys; s = json.loads(sys.argv[1]); s["nodes"] = int(sys.argv[2]); print(json.dumps(s))' \
  "$summary" "$nodes"

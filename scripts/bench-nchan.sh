#!/usr/bin/env bash
# Runs the same load (tools/loadgen.rs) against pushgate and against
# nginx + nchan, alternating, ROUNDS times (default 3), and prints each
# run's figures prefixed by the server: one pushgate node (its runtime
# sized to the machine) and nginx with WORKERS worker processes (default
# 1); server CPU and RSS are summed over nginx's workers.
#
#   scripts/bench-nchan.sh --connections 10000 --broadcasts 10 --rates 5000,20000 --seconds 5
#
# Installs nginx and its nchan module (Debian packages `nginx` and
# `libnginx-mod-nchan`) when missing. nginx runs from a temporary
# directory on 127.0.0.1:9080 (subscribers) and :9081 (publishers);
# pushgate with tools/loadgen.toml on :8080/:8081.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
workers=${WORKERS:-1}

if [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
  echo "== installing nginx and nchan (Debian packages)"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    nginx libnginx-mod-nchan >/dev/null
  # The package starts a system nginx on port 80: not ours.
  $sudo nginx -s stop 2>/dev/null || true
fi
cargo build --release --bin pushgate --example loadgen
ulimit -n "$(ulimit -Hn)"

dir=$(mktemp -d)
server=""
stop_server() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
trap 'stop_server; rm -rf "$dir"' EXIT

# nchan: every client subscribes to its own channel and to `all`
# (multiplexed on one WebSocket); a publish carries the message itself.
# The message buffer keeps nchan's defaults (10 messages per channel),
# as pushgate keeps its history for resuming clients.
mkdir -p "$dir/logs"
cat >"$dir/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
worker_processes $workers;
worker_rlimit_nofile 200000;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events {
  worker_connections 200000;
  multi_accept on;
}
http {
  access_log off;
  client_body_temp_path $dir/body;
  nchan_shared_memory_size 1024M;
  server {
    listen 127.0.0.1:9080 backlog=4096;
    listen 127.0.0.1:9081 backlog=4096;
    location ~ ^/sub/(\w+)\$ {
      nchan_subscriber websocket;
      nchan_channel_id \$1 all;
    }
    location ~ ^/pub/(\w+)\$ {
      nchan_publisher http;
      nchan_channel_id \$1;
    }
  }
}
EOF

wait_ready() {
  for _ in $(seq 200); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "server did not answer at $1" >&2
  return 1
}

run_pushgate() {
  target/release/pushgate serve --config tools/loadgen.toml >"$dir/pushgate.log" 2>&1 &
  server=$!
  wait_ready http://127.0.0.1:8081/readyz
  target/release/examples/loadgen --server-pid "$server" "$@" 2>&1 | sed 's/^/pushgate: /'
  stop_server
}

run_nchan() {
  nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
  server=$!
  wait_ready http://127.0.0.1:9081/
  # The workers do the work; the master only starts them.
  pids=$(pgrep -d, -P "$server")
  target/release/examples/loadgen --server nchan --ws-addr 127.0.0.1:9080 \
    --http-addr 127.0.0.1:9081 --server-pid "$pids" "$@" 2>&1 | sed 's/^/nchan: /'
  stop_server
}

echo "# $(nproc) cores; $(uname -r); $(nginx -v 2>&1); nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null); pushgate $(git rev-parse --short HEAD)"
for round in $(seq "$rounds"); do
  echo "== round $round"
  run_pushgate "$@"
  run_nchan "$@"
done

#!/usr/bin/env bash
# RocketMQ for pushgate's cluster mode, on this machine: installs the name
# server and broker (the Rust port from crates.io, which speaks the standard
# remoting protocol), and starts or stops a loopback pair by hand.
#
#   scripts/rocketmq.sh install          # once; 15-30 min on 2 cores, then cached
#   scripts/rocketmq.sh start [DIR]      # name server :9876, broker :10911
#   scripts/rocketmq.sh stop [DIR]
#
# DIR defaults to /dev/shm/pushgate-rocketmq: the broker refuses to start
# ("Service lifecycle operation failed", no cause named) when the file
# system of its store is nearly full, which a build machine's disk can be;
# tmpfs is not.
#
# The tests start their own pair on free ports (tests/support/rocketmq.rs);
# they find the binaries where `install` puts them.
#
# PUSHGATE_ROCKETMQ_ROOT  install root (default /opt/rocketmq; bin/ below it)
# PUSHGATE_CACHE_DIR      build cache kept between installs (default /var/cache/pushgate)
set -euo pipefail

ROOT="${PUSHGATE_ROCKETMQ_ROOT:-/opt/rocketmq}"
CACHE="${PUSHGATE_CACHE_DIR:-/var/cache/pushgate}"
VERSION="1.0.0"
NAMESRV="$ROOT/bin/rocketmq-namesrv-rust"
BROKER="$ROOT/bin/rocketmq-broker-rust"
DEFAULT_DIR=$( [ -d /dev/shm ] && echo /dev/shm/pushgate-rocketmq || echo /tmp/pushgate-rocketmq )

install() {
  if [ -x "$NAMESRV" ] && [ -x "$BROKER" ]; then
    echo "rocketmq: name server and broker already in $ROOT/bin"
    return
  fi
  echo "== installing the RocketMQ name server and broker $VERSION into $ROOT (takes a while the first time)"
  mkdir -p "$ROOT" "$CACHE"
  # One target directory for both: the broker reuses what the name server built.
  CARGO_TARGET_DIR="$CACHE/rocketmq-build" CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo install --locked --root "$ROOT" "rocketmq-namesrv@$VERSION" "rocketmq-broker@$VERSION"
}

# Writes the configuration of a pair into DIR: name server on $1, broker on $2.
configure() {
  local dir=$1 namesrv_port=$2 broker_port=$3 ha_port=$4
  mkdir -p "$dir/home" "$dir/store"
  cat >"$dir/namesrv.toml" <<EOF
rocketmqHome = "$dir/home"
kvConfigPath = "$dir/home/kvConfig.json"
configStorePath = "$dir/home/namesrv.properties"
listenPort = $namesrv_port
bindAddress = "127.0.0.1"
EOF
  cat >"$dir/broker.toml" <<EOF
[broker]
namesrvAddr = "127.0.0.1:$namesrv_port"
brokerIp1 = "127.0.0.1"
listenPort = $broker_port
storePathRootDir = "$dir/store"
autoCreateTopicEnable = true
autoCreateSubscriptionGroup = true

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "pushgate-broker"
brokerClusterName = "pushgate"
brokerId = 0

[store]
storeType = "LocalFile"
brokerRole = "ASYNC_MASTER"
storePathRootDir = "$dir/store"
haListenAddress = "127.0.0.1"
haListenPort = $ha_port
mappedFileSizeCommitLog = 67108864
EOF
}

start() {
  local dir=${1:-$DEFAULT_DIR}
  [ -x "$NAMESRV" ] || { echo "rocketmq: $NAMESRV missing: run scripts/rocketmq.sh install" >&2; exit 1; }
  configure "$dir" 9876 10911 10912
  export ROCKETMQ_HOME="$dir/home" ROCKETMQ_SECURITY_PROFILE=development-insecure-loopback
  unset NAMESRV_ADDR
  "$NAMESRV" -c "$dir/namesrv.toml" --bindAddress 127.0.0.1 --listenPort 9876 >"$dir/namesrv.log" 2>&1 &
  echo $! >"$dir/namesrv.pid"
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/9876) 2>/dev/null && break; sleep 0.1; done
  RUST_LOG="${RUST_LOG:-warn}" ROCKETMQ_HEALTH_BIND_ADDR=127.0.0.1:5558 "$BROKER" -c "$dir/broker.toml" -n 127.0.0.1:9876 >"$dir/broker.log" 2>&1 &
  echo $! >"$dir/broker.pid"
  for _ in $(seq 300); do
    if curl -fsS http://127.0.0.1:5558/readyz >/dev/null 2>&1; then
      echo "rocketmq: name server 127.0.0.1:9876, broker 127.0.0.1:10911 (logs in $dir)"
      return
    fi
    sleep 0.1
  done
  echo "rocketmq: the broker did not become ready; see $dir/broker.log" >&2
  exit 1
}

stop() {
  local dir=${1:-$DEFAULT_DIR}
  for name in broker namesrv; do
    if [ -f "$dir/$name.pid" ]; then
      local pid
      pid=$(cat "$dir/$name.pid")
      kill "$pid" 2>/dev/null || true
      # Wait for it to be gone (then kill it) so that its files can go too.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$name.pid"
    fi
  done
  echo "rocketmq: stopped"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 install | start [DIR] | stop [DIR]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# CPU an idle node uses: starts `binary` (default target/release/pushgate)
# with the embedded bus and one tenant, waits until it is ready, and reads
# its user + system time from /proc over `seconds` (default 60) without
# any client or push. Prints the share of one core.
#   scripts/idle-cpu.sh [binary] [seconds]
set -euo pipefail
binary="${1:-target/release/pushgate}"
seconds="${2:-60}"
dir=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
internal=$(port)
cat > "$dir/idle.toml" <<TOML
[listen]
public = "127.0.0.1:$(port)"
internal = "127.0.0.1:$internal"
[log]
filter = "warn"
[tenants.idle]
push_keys = ["idle-key"]
auth = "development"
TOML
"$binary" serve --config "$dir/idle.toml" >/dev/null 2>&1 &
node=$!
trap 'kill $node 2>/dev/null; wait $node 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$internal/readyz" >/dev/null && break; sleep 0.1; done
sleep 2
ticks() { awk '{ print $14 + $15 }' "/proc/$node/stat"; }
hz=$(getconf CLK_TCK)
before=$(ticks)
sleep "$seconds"
after=$(ticks)
awk -v t=$((after - before)) -v hz="$hz" -v s="$seconds" -v b="$binary" \
  'BEGIN { printf "%s: %.3f %% of a core (%d ticks of 1/%d s in %d s)\n", b, 100 * t / hz / s, t, hz, s }'

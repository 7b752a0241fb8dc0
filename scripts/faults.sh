#!/usr/bin/env bash
# The fault suite in its long form (tests/faults.rs): a real name server
# and broker, three nodes, a resuming client per user, 200 pushes/s through
# the nodes in turn, and one fault per scenario (8 s broker outages, 10 s of
# calm before and after). Prints one line per scenario; BENCHMARKS.md keeps
# the table. The test command runs the same scenarios in short form.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/rocketmq.sh install
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
PUSHGATE_FAULTS=long cargo test --test faults -- --nocapture --test-threads 1 2>&1 \
  | grep -E '^test .*(pushes|ok|FAILED)|^test result|panicked'

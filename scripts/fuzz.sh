#!/usr/bin/env bash
# Fuzzes every parser that takes outside input (push bodies, client commands,
# handshake headers and tokens, bus envelopes and control records, topic
# patterns, plugin output bounds) for longer than the test command does.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     # default 60
#
# A failure prints its seed; replay it with
#   ARBTEST_SEED=0x… cargo test --lib <test name>
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
ARBTEST_BUDGET_MS=$((seconds * 1000)) cargo test --lib fuzz -- --test-threads=2

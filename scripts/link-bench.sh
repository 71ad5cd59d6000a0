#!/usr/bin/env bash
# The link benchmark: runs the uplink scenarios of tests/uplink_thin.rs (a link emulator in
# front of a real Mosquitto with mutual TLS) one at a time and prints their figures as the
# README's table. About 8 minutes. Usage: scripts/link-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --test uplink_thin -- --nocapture --test-threads=1 >"$log" 2>&1 || {
  tail -50 "$log" >&2
  echo "link-bench: a scenario failed (its assertion is above)" >&2
  exit 1
}
echo "| link profile | live p50 | live p95 | backlog | re-sent | reconnects |"
echo "|---|---|---|---|---|---|"
grep '^LINK | ' "$log" | sed 's/^LINK //'
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"

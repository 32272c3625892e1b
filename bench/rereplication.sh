#!/usr/bin/env bash
# Time from SIGKILL of a storage node to `ringkv check` healthy, and the re-replication rate.
#
#   bench/rereplication.sh [KEYS] [VALUE_BYTES]      (defaults: 100000 keys of 1024 B, 5 nodes)
#
# Builds release binaries, starts a 5-node cluster in a temporary directory on a free
# loopback port, loads the keys, kills one node with SIGKILL and polls `check` until every
# key has three healthy replicas again. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${1:-100000}
SIZE=${2:-1024}
cargo build --release --workspace --quiet
cargo build --release -p ringkv-common --example load --quiet
BIN=${CARGO_TARGET_DIR:-target}/release
DIR=$(mktemp -d)
cleanup() {
  [[ -n "${COORD:-}" ]] && kill -TERM "$COORD" 2>/dev/null && wait "$COORD" 2>/dev/null || true
  pkill -KILL -f "$DIR" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

"$BIN/ringkv-coordinator" --listen 127.0.0.1:0 --data-dir "$DIR/data" --nodes 5 \
  >"$DIR/stdout" 2>"$DIR/coordinator.log" &
COORD=$!
for _ in $(seq 1 600); do grep -q "listening on" "$DIR/stdout" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's/^listening on //p' "$DIR/stdout")
[[ -n "$ADDR" ]] || { echo "coordinator did not start" >&2; exit 1; }
export RINGKV_COORDINATOR=$ADDR

"$BIN/examples/load" "$ADDR" "$KEYS" "$SIZE" 512
until "$BIN/ringkv" check >/dev/null 2>&1; do sleep 0.2; done

STATUS=$("$BIN/ringkv" --json status)
read -r VICTIM PID HELD < <(python3 -c '
import json, sys
n = json.loads(sys.argv[1])["nodes"][0]
print(n["id"], n["pid"], n["keys"])' "$STATUS")
echo "killing node $VICTIM (pid $PID), which holds $HELD replicas"
START=$(date +%s.%N)
kill -KILL "$PID"
until "$BIN/ringkv" check >/dev/null 2>&1; do sleep 0.1; done
END=$(date +%s.%N)
python3 -c '
import sys
start, end, held, size = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
secs = end - start
mb = held * size / 1e6
print(f"healthy again after {secs:.2f} s: {held} replicas re-created, {mb:.1f} MB, {mb / secs:.1f} MB/s")
' "$START" "$END" "$HELD" "$SIZE"

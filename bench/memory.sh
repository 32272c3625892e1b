#!/usr/bin/env bash
# Memory per key: load KEYS keys (1 million by default) into a fresh cluster on loopback and
# report, for the coordinator and for each node, the resident memory (VmRSS) it grew by, per
# key it holds, and what is left after taking away the key and value bytes themselves.
#
#   bench/memory.sh                          # build (release), 1,000,000 keys of 100 B values
#   KEYS=200000 VALUE_SIZE=16 bench/memory.sh
#   SKIP_BUILD=1 bench/memory.sh             # reuse target/release
#
# The coordinator holds every key (and its metadata, not its value); with RF 3 each node holds
# about 3/NODES of the keys, with their values. Nodes run `--node-fsync never` so loading is
# quick; durability settings do not change what is held in memory. On-disk sizes (the
# metadata journal, the nodes' logs) are printed too. Everything started here stops on exit.
set -euo pipefail

KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-100}
NODES=${NODES:-5}
# Every benchmark key is `bench:` and ten digits.
KEY_LEN=16

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

start_ringkv memory never
COORD_PID=$RINGKV_PID
ADDR=$RINGKV_ADDR
DATA="$WORK/memory/data"
ringkv() { "$BIN/ringkv" --coordinator "$ADDR" "$@"; }

NODE_PIDS=$(ringkv --json status | jq -r '.nodes[] | "\(.id) \(.pid)"')
declare -A BEFORE
BEFORE[coordinator]=$(rss_kib "$COORD_PID")
while read -r id pid; do BEFORE[$id]=$(rss_kib "$pid"); done <<< "$NODE_PIDS"

echo "loading $KEYS keys of $VALUE_SIZE B values (RF 3, $NODES nodes)..." >&2
START=$(date +%s)
# The `get` workload writes every key once before it starts; its 1 s of reads is incidental.
ringkv bench --workload get --keys "$KEYS" --value-size "$VALUE_SIZE" --connections 50 \
    --duration 1s --warmup 0 --timeout 60s --json > "$WORK/load.json"
echo "loaded in $(( $(date +%s) - START )) s" >&2
# Let heartbeats carry the nodes' final key counts.
sleep 2
STATUS=$(ringkv --json status)
[ "$(echo "$STATUS" | jq .keys)" -ge "$KEYS" ] || { echo "only $(echo "$STATUS" | jq .keys) keys stored" >&2; exit 1; }

echo
echo "Memory per key, $(date -u +%Y-%m-%d), $KEYS keys of $KEY_LEN B with $VALUE_SIZE B values"
echo
echo "| process | keys held | RSS growth | bytes per key | minus key and value | on disk per key |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
report() { # NAME KEYS DELTA_KIB PAYLOAD DISK_BYTES
    awk -v n="$1" -v k="$2" -v d="$3" -v p="$4" -v disk="$5" 'BEGIN {
        per = d * 1024 / k
        printf "| %s | %d | %.1f MiB | %.0f | %.0f | %.0f |\n", n, k, d / 1024, per, per - p, disk / k
    }'
}
meta_bytes=$(du -sb "$DATA/meta.log" | cut -f1)
report coordinator "$KEYS" $(( $(rss_kib "$COORD_PID") - BEFORE[coordinator] )) "$KEY_LEN" "$meta_bytes"
while read -r id pid; do
    held=$(echo "$STATUS" | jq --argjson id "$id" '.nodes[] | select(.id == $id) | .keys')
    disk=$(du -sb "$DATA/nodes/node-$id" | cut -f1)
    report "node $id" "$held" $(( $(rss_kib "$pid") - BEFORE[$id] )) $(( KEY_LEN + VALUE_SIZE )) "$disk"
done <<< "$NODE_PIDS"
echo
echo "RSS growth is VmRSS after loading minus before; 'minus key and value' subtracts the"
echo "$KEY_LEN B key (and, on nodes, the $VALUE_SIZE B value) from bytes per key. The coordinator's"
echo "figure is its in-memory metadata map; 'on disk' is meta.log or the node's data directory."

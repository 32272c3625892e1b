#!/usr/bin/env bash
# How long `ringkv check` takes: load KEYS keys into a fresh cluster on loopback, then time a
# full check (every node scanned, every key compared with the metadata), with the CPU time the
# coordinator and the nodes spent on it.
#
#   bench/check.sh                 # build (release), 500,000 keys of 16 B values, 5 nodes
#   KEYS=1000000 SKIP_BUILD=1 bench/check.sh
#
# Everything started here stops on exit.
set -euo pipefail

KEYS=${KEYS:-500000}
NODES=${NODES:-5}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
sum_ticks() {
    local total=0 pid
    for pid in "$@"; do total=$((total + $(cpu_ticks "$pid"))); done
    echo "$total"
}

start_ringkv check never
ringkv() { "$BIN/ringkv" --coordinator "$RINGKV_ADDR" "$@"; }
echo "loading $KEYS keys (RF 3, $NODES nodes)..." >&2
# The `get` workload writes every key once before it starts; its 1 s of reads is incidental.
ringkv bench --workload get --keys "$KEYS" --value-size 16 --connections 50 --duration 1s \
    --warmup 0s --timeout 60s --json > /dev/null
# Let late replicas and repairs finish, so the check measures a settled cluster.
until ringkv check > /dev/null 2>&1; do sleep 1; done

read -r -a NODE_PIDS <<< "$(pgrep -P "$RINGKV_PID" | tr '\n' ' ')"
TICKS=$(getconf CLK_TCK)
coord_before=$(cpu_ticks "$RINGKV_PID")
nodes_before=$(sum_ticks "${NODE_PIDS[@]}")
start=$(date +%s.%N)
ringkv --timeout 10m --json check > "$WORK/check.json"
end=$(date +%s.%N)
coord=$(( $(cpu_ticks "$RINGKV_PID") - coord_before ))
nodes=$(( $(sum_ticks "${NODE_PIDS[@]}") - nodes_before ))

echo
echo "ringkv check, $(date -u +%Y-%m-%d), $(nproc) cores, $KEYS keys, $NODES nodes, RF 3"
awk -v s="$start" -v e="$end" -v c="$coord" -v n="$nodes" -v t="$TICKS" 'BEGIN {
    printf "wall %.1f s; CPU: coordinator %.1f s, nodes %.1f s\n", e - s, c / t, n / t
}'
jq -c . "$WORK/check.json"

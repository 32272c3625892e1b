#!/usr/bin/env bash
# Write syscalls per operation of the coordinator and of the nodes (`syscw` in /proc/PID/io):
# a count that does not depend on how busy the machine is, so it shows what batching saves
# where timings are too noisy to. One bench run per workload against a fresh cluster.
#
#   bench/syscalls.sh                                  # build (release), every workload
#   SKIP_BUILD=1 WORKLOADS="put:16" RINGKV_ARGS=--no-node-batching bench/syscalls.sh
#
# Settings (environment): DURATION (5s), CONNECTIONS (50), NODES (5), WORKLOADS
# ("never:get:1 never:put:1 never:get:16 never:put:16 always:put:1 always:put:16", as
# FSYNC:WORKLOAD:PIPELINE, FSYNC being the nodes' and the metadata's), RINGKV_ARGS.
set -euo pipefail

DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}
NODES=${NODES:-5}
WORKLOADS=${WORKLOADS:-"never:get:1 never:put:1 never:get:16 never:put:16 always:put:1 always:put:16"}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

# Write syscalls made so far by the given processes.
writes() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '/^syscw:/ { print $2 }' "/proc/$pid/io")))
    done
    echo "$total"
}

echo "| workload | fsync | ops/s | coordinator writes per op | node writes per op (all) |"
echo "| --- | --- | ---: | ---: | ---: |"
for w in $WORKLOADS; do
    IFS=: read -r fsync workload depth <<< "$w"
    start_ringkv "sys-$fsync-$workload-$depth" "$fsync"
    # shellcheck disable=SC2046
    nodes=$(pgrep -P "$RINGKV_PID" | tr '\n' ' ')
    # shellcheck disable=SC2086
    c0=$(writes "$RINGKV_PID"); n0=$(writes $nodes)
    "$BIN/ringkv" --coordinator "$RINGKV_ADDR" bench --workload "$workload" --pipeline "$depth" \
        --connections "$CONNECTIONS" --duration "$DURATION" --warmup 0s --json \
        > "$WORK/run.json" 2> "$WORK/bench.err" || true
    # shellcheck disable=SC2086
    c1=$(writes "$RINGKV_PID"); n1=$(writes $nodes)
    if ! jq -e '.ops > 0' "$WORK/run.json" >/dev/null 2>&1; then
        echo "bench failed ($w): $(cat "$WORK/bench.err")" >&2
        exit 1
    fi
    awk -v w="$workload $depth" -v f="$fsync" -v ops="$(jq .ops "$WORK/run.json")" \
        -v tput="$(jq .throughput "$WORK/run.json")" -v c=$((c1 - c0)) -v n=$((n1 - n0)) \
        'BEGIN { printf "| %s | %s | %.0f | %.2f | %.2f |\n", w, f, tput, c / ops, n / ops }'
    stop_pid "$RINGKV_PID"
done

#!/usr/bin/env bash
# A against B: alternating runs of two builds, or of two sets of coordinator flags, with the
# CPU time per operation of the coordinator, the nodes and the load generator. On a shared
# machine single runs move by 10-20%; alternating and repeating is what makes a difference of
# a few percent visible.
#
#   BIN_A=/path/to/old/release BIN_B=target/release bench/ab.sh          # two builds
#   A_ARGS=--no-node-batching bench/ab.sh                                  # two flag sets
#
# Settings (environment): BIN_A, BIN_B (default: target/release), A_ARGS, B_ARGS, REPS (4),
# DURATION (5s), CONNECTIONS (50), NODES (5), VALUE_SIZE (100), WORKLOADS ("never:get:1
# never:put:1 never:get:16 never:put:16", as FSYNC:WORKLOAD:PIPELINE). Prints every run, then
# the means.
set -euo pipefail

REPS=${REPS:-4}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}
VALUE_SIZE=${VALUE_SIZE:-100}
NODES=${NODES:-5}
WORKLOADS=${WORKLOADS:-"never:get:1 never:put:1 never:get:16 never:put:16"}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
BIN_A=${BIN_A:-$BIN}
BIN_B=${BIN_B:-$BIN}
TICKS=$(getconf CLK_TCK)
ROWS="$WORK/rows"
: > "$ROWS"

# CPU ticks used so far by the given processes.
ticks() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')))
    done
    echo "$total"
}

for w in $WORKLOADS; do
    IFS=: read -r fsync workload depth <<< "$w"
    for rep in $(seq "$REPS"); do
        for side in A B; do
            if [ "$side" = A ]; then BIN=$BIN_A RINGKV_ARGS=${A_ARGS:-}; else BIN=$BIN_B RINGKV_ARGS=${B_ARGS:-}; fi
            export RINGKV_ARGS
            start_ringkv "ab-$side-$rep-$fsync-$workload-$depth" "$fsync"
            nodes=$(pgrep -P "$RINGKV_PID" | tr '\n' ' ')
            # shellcheck disable=SC2086
            c0=$(ticks "$RINGKV_PID"); n0=$(ticks $nodes)
            TIMEFORMAT='%3U %3S'
            { time "$BIN_B/ringkv" --coordinator "$RINGKV_ADDR" bench --workload "$workload" \
                --pipeline "$depth" --connections "$CONNECTIONS" --value-size "$VALUE_SIZE" \
                --duration "$DURATION" --warmup 0s --json > "$WORK/run.json" 2> "$WORK/bench.err" || true; } 2> "$WORK/time"
            # shellcheck disable=SC2086
            c1=$(ticks "$RINGKV_PID"); n1=$(ticks $nodes)
            if ! jq -e '.ops > 0' "$WORK/run.json" >/dev/null 2>&1; then
                echo "bench failed ($side, $w): $(cat "$WORK/bench.err")" >&2
                exit 1
            fi
            awk -v s="$side" -v w="$w" -v ops="$(jq .ops "$WORK/run.json")" \
                -v tput="$(jq .throughput "$WORK/run.json")" -v p99="$(jq .latency_us.p99 "$WORK/run.json")" \
                -v c=$((c1 - c0)) -v n=$((n1 - n0)) -v t="$TICKS" -v g="$(awk '{ print $1 + $2 }' "$WORK/time")" \
                'BEGIN { printf "%s\t%s\t%.0f\t%d\t%.2f\t%.2f\t%.2f\n", s, w, tput, p99, c / t * 1e6 / ops, n / t * 1e6 / ops, g * 1e6 / ops }' \
                | tee -a "$ROWS" | awk -F'\t' '{ printf "  %s %-16s %8d ops/s  p99 %6d us  coordinator %5.2f  nodes %5.2f  generator %5.2f us/op\n", $1, $2, $3, $4, $5, $6, $7 }' >&2
            stop_pid "$RINGKV_PID"
        done
    done
done

echo "| workload | side | ops/s | p99 ms | coordinator µs/op | nodes µs/op | generator µs/op |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
awk -F'\t' '
    { k = $2 "\t" $1; n[k]++; o[k] += $3; p[k] += $4; c[k] += $5; d[k] += $6; g[k] += $7; order[k] = NR }
    END {
        for (k in n) {
            split(k, part, "\t")
            printf "| %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f |\n", part[1], part[2], o[k] / n[k], p[k] / n[k] / 1000, c[k] / n[k], d[k] / n[k], g[k] / n[k]
        }
    }' "$ROWS" | sort

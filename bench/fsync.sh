#!/usr/bin/env bash
# Where PUT with fsync on every write spends the machine: RingKV (`--node-fsync always
# --meta-fsync always`, or META_FSYNC's policy) against Redis (`appendfsync always`), the same workload from the same
# generator. For each run, over the whole machine: the shares of user, system, softirq,
# iowait, idle and steal time (/proc/stat; steal is time the hypervisor gave other guests),
# context switches per operation, fdatasync calls per operation (if `perf` is installed),
# and for RingKV the stores each node fsync covered and where the writes waited. Before the
# runs, the disk's own speed: 2,000 synced 150-byte writes from one stream (dd with O_DSYNC),
# appended to a new file and written into space written before, each with the machine's CPU
# time per write; on a shared machine that speed moves by 2x within an hour.
#
#   bench/fsync.sh
#   SKIP_BUILD=1 PIPELINES="1 16" bench/fsync.sh
#
# Settings (environment): DURATION (5s), CONNECTIONS (50), NODES (5), VALUE_SIZE (100),
# PIPELINES ("1"), META_FSYNC (the coordinator's `--meta-fsync`, "always"), RINGKV_ARGS.
set -euo pipefail

DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}
NODES=${NODES:-5}
VALUE_SIZE=${VALUE_SIZE:-100}
PIPELINES=${PIPELINES:-1}
META_FSYNC=${META_FSYNC:-always}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
need_redis

# The machine's CPU time by kind (user nice system idle iowait irq softirq steal) and its
# context switches since boot, on one line.
machine() {
    awk '/^cpu / { printf "%s %s %s %s %s %s %s %s ", $2, $3, $4, $5, $6, $7, $8, $9 } /^ctxt/ { print $2 }' /proc/stat
}

# Node fsyncs and node requests so far, summed over the nodes: "syncs ops".
node_counts() {
    "$BIN/ringkv" --coordinator "$RINGKV_ADDR" --json status \
        | jq -r '[([.nodes[].syncs] | add), ([.nodes[].ops] | add)] | @tsv'
}

# Runs the generator against RingKV, or with `redis ADDR` against Redis, with the machine's counters read around
# it; writes "ops/s ops fdatasyncs" to $WORK/figures and the counters to $WORK/m0, $WORK/m1.
measured_run() {
    machine > "$WORK/m0"
    local perf=()
    if command -v perf >/dev/null 2>&1; then
        perf=(perf stat -a -x, -e syscalls:sys_enter_fdatasync -o "$WORK/perf" --)
    fi
    local target=(--coordinator "$RINGKV_ADDR" bench)
    if [ "${1:-}" = redis ]; then target=(bench --redis "$2"); fi
    "${perf[@]}" "$BIN/ringkv" "${target[@]}" --workload put --pipeline "$depth" \
        --connections "$CONNECTIONS" --value-size "$VALUE_SIZE" --duration "$DURATION" \
        --warmup 0s --json > "$WORK/run.json" 2> "$WORK/bench.err" || true
    machine > "$WORK/m1"
    if ! jq -e '.ops > 0' "$WORK/run.json" >/dev/null 2>&1; then
        echo "bench failed ($*): $(cat "$WORK/bench.err")" >&2
        exit 1
    fi
    local syncs="-"
    if [ -s "$WORK/perf" ]; then
        syncs=$(awk -F, '/fdatasync/ { print $1 }' "$WORK/perf")
    fi
    echo "$(jq .throughput "$WORK/run.json") $(jq .ops "$WORK/run.json") $syncs" > "$WORK/figures"
}

# One table row from the last measured run: SYSTEM DEPTH NODE-COLUMNS...
row() {
    read -r tput ops syncs < "$WORK/figures"
    awk -v sys="$1" -v depth="$2" -v tput="$tput" -v ops="$ops" -v syncs="$syncs" -v extra="$3" '
        NR == FNR { for (i = 1; i <= 9; i++) a[i] = $i; next }
        {
            t = 0
            for (i = 1; i <= 8; i++) { d[i] = $i - a[i]; t += d[i] }
            per = (syncs == "-") ? "-" : sprintf("%.3f", syncs / ops)
            printf "| %s | %d | %.0f | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.2f | %s | %s |\n",
                sys, depth, tput, 100 * (d[1] + d[2]) / t, 100 * (d[3] + d[6]) / t, 100 * d[7] / t,
                100 * d[5] / t, 100 * d[4] / t, 100 * d[8] / t, ($9 - a[9]) / ops, per, extra
        }' "$WORK/m0" "$WORK/m1"
}

# Busy jiffies of the whole machine so far: user, nice, system, irq and softirq (not idle,
# iowait or steal; guest time is already counted in user).
machine_jiffies() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat
}

# probe_disk LABEL [notrunc]: 2,000 synced 150-byte writes from one stream, appended to a new
# file or (notrunc) into a file whose blocks were written and synced before, as a log in
# preallocated space would; prints the rate and the machine's busy CPU time per write.
probe_disk() {
    local label=$1 conv=${2:-} probe="$WORK/disk-probe" b0 b1 secs
    rm -f "$probe"
    if [ -n "$conv" ]; then
        dd if=/dev/zero of="$probe" bs=1M count=1 conv=fsync status=none
        conv="conv=notrunc"
    fi
    b0=$(machine_jiffies)
    secs=$(dd if=/dev/zero of="$probe" bs=150 count=2000 oflag=dsync ${conv:+"$conv"} 2>&1 | awk '/copied/ { print $(NF-3) }')
    b1=$(machine_jiffies)
    rm -f "$probe"
    awk -v l="$label" -v s="$secs" -v j=$((b1 - b0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {
        printf "disk, %s: 2,000 synced writes from one stream in %s s, %.0f per second, %.0f µs of machine CPU each\n",
            l, s, 2000 / s, j / hz / 2000 * 1e6 }'
}

probe_disk "appended"
probe_disk "into space written before" notrunc
echo

echo "| system | pipeline | ops/s | user | system | softirq | iowait | idle | steal | context switches per op | fdatasync per op | RingKV: stores per node fsync; waits per write (quorum, metadata commit) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
for depth in $PIPELINES; do
    start_ringkv "ringkv-$depth" always "$META_FSYNC"
    read -r s0 o0 <<< "$(node_counts)"
    before=$("$BIN/ringkv" --coordinator "$RINGKV_ADDR" --json status | jq -c .writes)
    measured_run
    read -r s1 o1 <<< "$(node_counts)"
    after=$("$BIN/ringkv" --coordinator "$RINGKV_ADDR" --json status | jq -c .writes)
    waits=$(jq -rn --argjson a "$before" --argjson b "$after" '
        ($b.count - $a.count) as $n
        | "\(((($b.quorum_wait_us - $a.quorum_wait_us) / $n) | floor)) µs, \(((($b.commit_wait_us - $a.commit_wait_us) / $n) | floor)) µs"')
    row RingKV "$depth" "$(awk -v o=$((o1 - o0)) -v s=$((s1 - s0)) 'BEGIN { printf "%.1f", o / s }'); $waits"
    stop_pid "$RINGKV_PID"

    start_redis "redis-$depth" --appendonly yes --appendfsync always
    measured_run redis "$REDIS_ADDR"
    row Redis "$depth" "-"
    stop_pid "$REDIS_PID"
done

#!/usr/bin/env bash
# Where the CPU goes: CPU time per operation of every process in a benchmark run, RingKV's
# coordinator, its nodes and the load generator, then Redis and the same load generator, for
# the workloads of compare.sh. compare.sh says how fast; this says what each operation costs
# and so how fast two cores could possibly go (the last column).
#
#   bench/cpu.sh                              # build (release), run (about two minutes)
#   SKIP_BUILD=1 WORKLOADS="get:1 put:16" FSYNC_WORKLOADS="" bench/cpu.sh
#
# Settings (environment): DURATION (8s), CONNECTIONS (50), KEYS (10000), NODES (5),
# VALUE_SIZE (100), WORKLOADS ("get:1 put:1 get:16 put:16", WORKLOAD:PIPELINE), and
# FSYNC_WORKLOADS ("put:1 put:16", run with fsync on every write on both systems).
# WORKLOAD is get, put, or miss: reads of keys never written (`--no-preload`), which RingKV's
# coordinator answers from its metadata without a node, so the row is the coordinator's own
# cost of a request against Redis's (e.g. WORKLOADS="miss:16 get:16").
#
# CPU is user + system time from /proc/PID/stat (servers) and from the shell's `time` (the
# load generator), over the whole run: connecting and, for GET, writing every key once are
# included (about 3% of an 8 s run), so the figures err a little high for both systems alike.
# The runs use no warm-up, so every operation is counted.
set -euo pipefail

DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-50}
KEYS=${KEYS:-10000}
NODES=${NODES:-5}
VALUE_SIZE=${VALUE_SIZE:-100}
WORKLOADS=${WORKLOADS:-"get:1 put:1 get:16 put:16"}
FSYNC_WORKLOADS=${FSYNC_WORKLOADS-"put:1 put:16"}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
need_redis
TICKS=$(getconf CLK_TCK)
CORES=$(nproc)
ROWS="$WORK/rows.tsv"
: > "$ROWS"

# CPU seconds used so far by the given processes (user + system).
cpu_secs() {
    local ticks=0 t
    for pid in "$@"; do
        if [ ! -r "/proc/$pid/stat" ]; then
            echo "process $pid is gone: a server died during the run" >&2
            exit 1
        fi
        # Fields after "PID (COMM) ": utime and stime are the 12th and 13th.
        t=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')
        ticks=$((ticks + t))
    done
    echo "$ticks $TICKS" | awk '{ printf "%.3f", $1 / $2 }'
}

# measure LABEL SYSTEM SERVER-PIDS -- RINGKV-ARGS...: one bench run; appends a row to ROWS.
# SERVER-PIDS is "COORDINATOR-PID NODE-PIDS..." for RingKV and "REDIS-PID" for Redis.
measure() {
    local label=$1 system=$2 pids=$3
    shift 4
    local before after json timing client
    # shellcheck disable=SC2086
    before=$(for p in $pids; do cpu_secs "$p"; echo; done)
    json="$WORK/run.json"
    timing="$WORK/time"
    TIMEFORMAT='%3U %3S'
    { time "$BIN/ringkv" "$@" --json --duration "$DURATION" --warmup 0s \
        --connections "$CONNECTIONS" --keys "$KEYS" > "$json" 2> "$WORK/bench.err" || true; } \
        2> "$timing"
    # shellcheck disable=SC2086
    after=$(for p in $pids; do cpu_secs "$p"; echo; done)
    if ! jq -e '.ops > 0' "$json" >/dev/null 2>&1; then
        echo "bench failed ($label, $system): $(cat "$WORK/bench.err")" >&2
        return
    fi
    client=$(awk '{ print $1 + $2 }' "$timing")
    # One line: label, system, ops, ops/s, client CPU, then each server process's CPU.
    paste <(echo "$before") <(echo "$after") | awk -v l="$label" -v s="$system" \
        -v ops="$(jq .ops "$json")" -v tput="$(jq .throughput "$json")" -v c="$client" '
        BEGIN { printf "%s\t%s\t%s\t%s\t%s", l, s, ops, tput, c }
        { printf "\t%s", $2 - $1 }
        END { printf "\n" }' >> "$ROWS"
    tail -n1 "$ROWS" | awk -F'\t' '{ printf "  %-7s %s: %d ops/s\n", $2, $1, $4 }' >&2
}

# runs WORKLOADS SUFFIX: every workload against the running RingKV cluster and Redis server.
runs() {
    local w workload depth label nodes flags
    nodes=$(pgrep -P "$RINGKV_PID" | tr '\n' ' ' || true)
    if [ -z "$nodes" ]; then
        echo "the coordinator has no node processes" >&2
        exit 1
    fi
    for w in $1; do
        workload=${w%%:*}
        depth=${w##*:}
        label="$workload ${VALUE_SIZE}B pipeline $depth$2"
        flags=(--workload "$workload")
        [ "$workload" = miss ] && flags=(--workload get --no-preload)
        measure "$label" ringkv "$RINGKV_PID $nodes" -- --coordinator "$RINGKV_ADDR" bench \
            "${flags[@]}" --value-size "$VALUE_SIZE" --pipeline "$depth"
        measure "$label" redis "$REDIS_PID" -- bench --redis "$REDIS_ADDR" \
            "${flags[@]}" --value-size "$VALUE_SIZE" --pipeline "$depth"
    done
}

if [ -n "$WORKLOADS" ]; then
    echo "plain: ringkv --node-fsync never --meta-fsync never, redis without persistence" >&2
    start_ringkv ringkv-plain never
    start_redis redis-plain --appendonly no
    runs "$WORKLOADS" ""
    stop_pid "$REDIS_PID"
    stop_pid "$RINGKV_PID"
fi
if [ -n "$FSYNC_WORKLOADS" ]; then
    echo "fsync: ringkv --node-fsync always --meta-fsync always, redis appendfsync always" >&2
    start_ringkv ringkv-fsync always
    start_redis redis-fsync --appendonly yes --appendfsync always
    runs "$FSYNC_WORKLOADS" " fsync"
    stop_pid "$REDIS_PID"
    stop_pid "$RINGKV_PID"
fi

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo
echo "CPU per operation, $(date -u +%Y-%m-%d), $CORES cores ($CPU), loopback, $CONNECTIONS connections,"
echo "$KEYS keys, $DURATION per run; RingKV: $NODES nodes, RF 3, W 2. Microseconds of CPU per operation;"
echo "the ceiling is what $CORES fully used cores would give at that cost (Redis's server is one thread)."
echo
echo "| workload | system | ops/s | load generator µs | coordinator µs | nodes µs (all) | Redis µs | servers + generator µs | CPU ceiling ops/s |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
awk -F'\t' -v cores="$CORES" '
    {
        per = 1e6 / $3; client = $5 * per
        coord = "-"; nodes = "-"; redis = "-"
        if ($2 == "ringkv") {
            coord = $6 * per; n = 0
            for (i = 7; i <= NF; i++) n += $i
            nodes = n * per; servers = coord + nodes
            ceiling = cores * 1e6 / (client + servers)
        } else {
            redis = $6 * per; servers = redis
            # One server thread: it cannot use more than one core.
            ceiling = cores * 1e6 / (client + servers)
            if (1e6 / redis < ceiling) ceiling = 1e6 / redis
        }
        f = "%.1f"
        printf "| %s | %s | %d | " f " | %s | %s | %s | " f " | %d |\n", $1, $2, $4, client,
            (coord == "-" ? "-" : sprintf(f, coord)), (nodes == "-" ? "-" : sprintf(f, nodes)),
            (redis == "-" ? "-" : sprintf(f, redis)), client + servers, ceiling
    }' "$ROWS"

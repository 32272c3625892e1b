#!/usr/bin/env bash
# What one forwarding hop costs on this machine: Redis measured directly, Redis behind a
# forwarder that does nothing but copy bytes (HAProxy in TCP mode, one thread), and RingKV,
# all by the same load generator in one run. A RingKV GET must cross the coordinator to a node
# and back (the design: the coordinator routes every read to a replica the metadata names), so
# "Redis behind a null forwarder" is what the same work costs with one such hop and none of
# RingKV's own: no parsing, no routing, no replication. It puts a ceiling on the ratios a
# design with a routing tier can reach here, whatever its code.
#
#   bench/hop.sh                                 # build (release), install redis/haproxy if missing
#   SKIP_BUILD=1 REPS=3 WORKLOADS="get:1" bench/hop.sh
#
# Settings (environment): DURATION (5s), WARMUP (1s), CONNECTIONS (50), KEYS (10000),
# NODES (5), VALUE_SIZE (100), REPS (2, alternating the three targets), WORKLOADS
# ("get:1 put:1 get:16 put:16", WORKLOAD:PIPELINE). RingKV runs with --node-fsync never and
# --meta-fsync never, Redis without persistence.
set -euo pipefail

DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
CONNECTIONS=${CONNECTIONS:-50}
KEYS=${KEYS:-10000}
NODES=${NODES:-5}
VALUE_SIZE=${VALUE_SIZE:-100}
REPS=${REPS:-2}
WORKLOADS=${WORKLOADS:-"get:1 put:1 get:16 put:16"}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
need_redis
need_package haproxy

start_redis redis-plain --appendonly no

# The forwarder: one thread, TCP mode (bytes are copied, never parsed), one backend
# connection per client connection.
PROXY_PORT=$(free_port)
cat > "$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend forward
    bind 127.0.0.1:$PROXY_PORT
    default_backend redis
backend redis
    server redis $REDIS_ADDR
EOF
haproxy -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy.log" 2>&1 &
PIDS+=("$!")
PROXY_ADDR="127.0.0.1:$PROXY_PORT"
wait_for_ping "$PROXY_PORT" haproxy "$WORK/haproxy.log"

start_ringkv ringkv-plain never

ROWS="$WORK/rows"
: > "$ROWS"
# run TARGET WORKLOAD DEPTH ADDR: one bench run, a row "target workload depth ops/s p99".
# ADDR is RingKV's coordinator for the target ringkv, a Redis address for the others.
run() {
    local target=$1 workload=$2 depth=$3 addr=$4 to
    if [ "$target" = ringkv ]; then to=(--coordinator "$addr" bench); else to=(bench --redis "$addr"); fi
    "$BIN/ringkv" "${to[@]}" --workload "$workload" --value-size "$VALUE_SIZE" \
        --pipeline "$depth" --connections "$CONNECTIONS" --keys "$KEYS" --duration "$DURATION" \
        --warmup "$WARMUP" --json > "$WORK/run.json" 2> "$WORK/bench.err" || true
    if ! jq -e '.ops > 0' "$WORK/run.json" >/dev/null 2>&1; then
        echo "bench failed ($target, $workload:$depth): $(cat "$WORK/bench.err")" >&2
        exit 1
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$target" "$workload" "$depth" \
        "$(jq .throughput "$WORK/run.json")" "$(jq .latency_us.p99 "$WORK/run.json")" | tee -a "$ROWS" \
        | awk -F'\t' '{ printf "  %-14s %s pipeline %s: %d ops/s\n", $1, $2, $3, $4 }' >&2
}

for w in $WORKLOADS; do
    workload=${w%%:*}
    depth=${w##*:}
    for _ in $(seq "$REPS"); do
        run redis "$workload" "$depth" "$REDIS_ADDR"
        run redis-forwarded "$workload" "$depth" "$PROXY_ADDR"
        run ringkv "$workload" "$depth" "$RINGKV_ADDR"
    done
done

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo
echo "One forwarding hop, $(date -u +%Y-%m-%d), $(nproc) cores ($CPU), loopback, $CONNECTIONS connections,"
echo "$KEYS keys, values of $VALUE_SIZE B, $DURATION per run after $WARMUP of warm-up, mean of $REPS runs each."
echo "'forwarded' is Redis behind HAProxy (TCP mode, one thread); ratios are to Redis direct."
echo
echo "| workload | Redis ops/s | forwarded ops/s | forwarded ratio | RingKV ops/s | RingKV ratio |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
awk -F'\t' '
    { k = $2 " pipeline " $3; if (!(k in seen)) { seen[k] = 1; order[++n] = k }
      sum[k, $1] += $4; cnt[k, $1]++ }
    END {
        for (i = 1; i <= n; i++) {
            k = order[i]
            r = sum[k, "redis"] / cnt[k, "redis"]
            f = sum[k, "redis-forwarded"] / cnt[k, "redis-forwarded"]
            g = sum[k, "ringkv"] / cnt[k, "ringkv"]
            printf "| %s | %.0f | %.0f | %.2f | %.0f | %.2f |\n", k, r, f, f / r, g, g / r
        }
    }' "$ROWS"

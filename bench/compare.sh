#!/usr/bin/env bash
# RingKV and Redis side by side: the same workloads from the same client (`ringkv bench`) on
# the same machine, over loopback, and one table of RingKV/Redis ratios at the end.
#
#   bench/compare.sh                  # build (release), run everything (a few minutes)
#   DURATION=10s bench/compare.sh     # longer measured windows
#   SKIP_BUILD=1 bench/compare.sh     # reuse target/release
#   ROUNDS=3 bench/compare.sh         # every workload three times: medians and ranges
#
# Settings (environment): DURATION (5s), WARMUP (1s), CONNECTIONS (50), PIPELINE (16),
# KEYS (10000), NODES (5), VALUE_SIZES ("100 1024"), ROUNDS (1), OUT (a file to keep every
# run's JSON).
#
# Single runs of one workload move by 10-20% here, and a ratio by up to 0.2 between runs. With
# ROUNDS above 1, each cluster runs all its workloads that many times over, each RingKV run
# next to its Redis run, and the table shows the median of each row's ratios with their range.
#
# Plain runs: Redis without persistence, RingKV with `--node-fsync never --meta-fsync never`
# (every write still reaches the files before it is acknowledged, so it survives a SIGKILL).
# Fsync runs: Redis with `appendonly yes` + `appendfsync always`, RingKV with
# `--node-fsync always` and `--meta-fsync never` (rows "fsync"), then `--meta-fsync always`
# (rows "fsync, metadata synced"). RingKV runs RF 3 with a write quorum of 2 (the defaults).
# Every process started here is stopped on exit, whatever happens.
set -euo pipefail

DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
CONNECTIONS=${CONNECTIONS:-50}
PIPELINE=${PIPELINE:-16}
KEYS=${KEYS:-10000}
NODES=${NODES:-5}
VALUE_SIZES=${VALUE_SIZES:-"100 1024"}
ROUNDS=${ROUNDS:-1}
ROUND=1
if ! [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "ROUNDS must be a whole number of at least 1, not '$ROUNDS'" >&2
    exit 2
fi

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
need_redis
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
on_exit() { if [ -n "${OUT:-}" ]; then cp "$RESULTS" "$OUT"; fi; }

# The machine's CPU time so far, as "total steal" (jiffies): steal is time the hypervisor gave
# to other guests, which no process here could use.
cpu_ticks() {
    awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9 }' /proc/stat
}

# run LABEL TARGET-ARGS... -- BENCH-ARGS...: one bench run, its JSON appended to RESULTS with
# the share of the machine's CPU stolen during it (`steal_pct`). A RingKV run's report also
# says where its writes waited (`write_stages_us`).
run() {
    local label=$1 system=$2
    shift 2
    local out t0 s0 t1 s1
    read -r t0 s0 <<< "$(cpu_ticks)"
    # `ringkv bench` exits 1 when some operations failed; the report says how many.
    out=$("$BIN/ringkv" "$@" --json --duration "$DURATION" --warmup "$WARMUP" \
        --connections "$CONNECTIONS" --keys "$KEYS" || true)
    if ! echo "$out" | jq -e .throughput >/dev/null 2>&1; then
        echo "bench failed ($label, $system): $out" >&2
        out='{"throughput":0,"latency_us":{"p99":0},"error_total":-1}'
    fi
    read -r t1 s1 <<< "$(cpu_ticks)"
    out=$(echo "$out" | jq -c --arg lab "$label" --arg sys "$system" \
        --argjson steal "$(awk -v t=$((t1 - t0)) -v s=$((s1 - s0)) 'BEGIN { printf "%.1f", (t > 0 ? 100 * s / t : 0) }')" \
        --argjson round "$ROUND" \
        '. + {"label": $lab, "system": $sys, "steal_pct": $steal, "round": $round}')
    echo "$out" >> "$RESULTS"
    echo "$out" | jq -r \
        '"  \(.system | . + "      " | .[0:6]) \(.label): \(.throughput | floor) ops/s, p99 \(.latency_us.p99 / 1000) ms, errors \(.error_total), steal \(.steal_pct)%"' >&2
}

# pair LABEL BENCH-ARGS...: the same run against RingKV, then Redis.
pair() {
    local label=$1
    shift
    run "$label" ringkv --coordinator "$RINGKV_ADDR" bench "$@"
    run "$label" redis bench --redis "$REDIS_ADDR" "$@"
}

plain_runs() {
    for size in $VALUE_SIZES; do
        for depth in 1 "$PIPELINE"; do
            for workload in get put; do
                pair "$workload ${size}B pipeline $depth" \
                    --workload "$workload" --value-size "$size" --pipeline "$depth"
            done
        done
    done
}

# fsync_runs SUFFIX: the fsync workloads, labelled with SUFFIX.
fsync_runs() {
    for depth in 1 "$PIPELINE"; do
        pair "put 100B pipeline $depth fsync$1" --workload put --value-size 100 --pipeline "$depth"
    done
}

# rounds COMMAND...: COMMAND once per round, with ROUND set.
rounds() {
    for ROUND in $(seq "$ROUNDS"); do
        [ "$ROUNDS" -eq 1 ] || echo "  round $ROUND of $ROUNDS" >&2
        "$@"
    done
}

echo "plain (no fsync): ringkv --node-fsync never --meta-fsync never, redis without AOF or RDB" >&2
start_ringkv ringkv-plain never
start_redis redis-plain --appendonly no
rounds plain_runs
stop_pid "$REDIS_PID"
stop_pid "$RINGKV_PID"

# Both RingKV rows sync every write on the nodes before it is acknowledged, so an acknowledged
# write survives a power loss, as under Redis's appendfsync always. The first leaves the
# metadata journal unsynced (after a crash, reads wait until the nodes are reconciled); the
# second, the default, syncs it too.
echo "fsync on every write: ringkv --node-fsync always --meta-fsync never, redis appendfsync always" >&2
start_ringkv ringkv-fsync always never
start_redis redis-fsync --appendonly yes --appendfsync always
rounds fsync_runs ""
stop_pid "$RINGKV_PID"
echo "fsync on every write: ringkv --node-fsync always --meta-fsync always, redis appendfsync always" >&2
start_ringkv ringkv-fsync-meta always always
rounds fsync_runs ", metadata synced"
stop_pid "$REDIS_PID"
stop_pid "$RINGKV_PID"

# The table: one row per workload, RingKV/Redis ratios for throughput and p99 latency.
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo
echo "RingKV vs Redis, $(date -u +%Y-%m-%d), $(nproc) cores ($CPU), loopback,"
echo "$CONNECTIONS connections, $KEYS keys, ${DURATION} measured after ${WARMUP} warm-up; RingKV: $NODES nodes, RF 3, W 2"
if [ "$ROUNDS" -gt 1 ]; then
    echo "Medians of $ROUNDS rounds: ops/s and p99 of each system on its own, and of the rounds'"
    echo "ratios (a RingKV run against the Redis run next to it), their range in square brackets."
fi
echo
jq -rs '
  def target(l):
    if (l | test("fsync")) then 0.5 elif (l | startswith("get")) then 0.6 else 0.4 end;
  def r2(x): (x * 100 | round) / 100;
  def median: sort | if length == 0 then null
    elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def ratios(f): map(if (.rd | f) > 0 then (.rk | f) / (.rd | f) else empty end);
  def shown(xs): if (xs | length) == 0 then "-"
    elif (xs | length) == 1 then "\(r2(xs[0]))"
    else "\(r2(xs | median)) [\(r2(xs | min))-\(r2(xs | max))]" end;
  . as $all
  | ($all | map(.round) | unique) as $rounds
  | (reduce $all[].label as $l ([]; if any(.[]; . == $l) then . else . + [$l] end)) as $labels
  | "| workload | RingKV ops/s | Redis ops/s | throughput ratio (target) | RingKV p99 ms | Redis p99 ms | p99 ratio (target <= 2) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ( $labels[] as $l
      | [ $rounds[] as $r
          | { rk: ([$all[] | select(.label == $l and .system == "ringkv" and .round == $r)][0]),
              rd: ([$all[] | select(.label == $l and .system == "redis" and .round == $r)][0]) }
          | select(.rk != null and .rd != null) ] as $both
      # A run whose bench failed (error_total -1) takes its round out of the row.
      | [ $both[] | select(.rk.error_total >= 0 and .rd.error_total >= 0) ] as $pairs
      | (($both | length) - ($pairs | length)) as $failed
      | select($both | length > 0)
      | ($pairs | map(.rk.error_total) | add // 0) as $rk_errors
      | ($pairs | map(.rd.error_total) | add // 0) as $rd_errors
      | "| \($l) | "
        + (if ($pairs | length) == 0 then "- | - | - (>= \(target($l))) | - | - | -" else
          "\($pairs | map(.rk.throughput) | median | floor) | \($pairs | map(.rd.throughput) | median | floor) | "
          + "\(shown($pairs | ratios(.throughput))) (>= \(target($l))) | "
          + "\(r2($pairs | map(.rk.latency_us.p99) | median / 1000)) | \(r2($pairs | map(.rd.latency_us.p99) | median / 1000)) | "
          + "\(shown($pairs | ratios(.latency_us.p99)))" end)
        + (if ($rk_errors != 0 or $rd_errors != 0)
           then " (errors: ringkv \($rk_errors), redis \($rd_errors))" else "" end)
        + (if $failed > 0 then " (\($failed) of \($both | length) rounds failed)" else "" end)
        + " |" )
' "$RESULTS"
jq -rs '
  [.[].steal_pct] | "\nCPU stolen by other guests of the machine during the runs: \(min)-\(max)% (above a few"
    + " percent, the runs of the two systems did not have the same machine)."
' "$RESULTS"

# Where RingKV's writes waited: the mean latency the client saw, and the coordinator's own
# average per write (each report's write_stages_us, warm-up included) for the key lock, the
# write quorum (node log appends and their fsyncs) and the metadata commit; the rest is
# reading, queueing for a core and answering.
echo
echo "Where RingKV's PUTs waited (mean, microseconds):"
echo
jq -rs '
  def r(x): x | round;
  "| workload | client mean | key lock | write quorum | metadata commit | rest |",
  "| --- | ---: | ---: | ---: | ---: | ---: |",
  ( (map(.round) | unique | length) as $n
    | .[] | select(.system == "ringkv" and .write_stages_us != null)
    | .write_stages_us as $w
    | "| \(.label)\(if $n > 1 then ", round \(.round)" else "" end) | \(r(.latency_us.mean)) | \(r($w.lock)) | \(r($w.quorum)) | "
      + "\(r($w.commit)) | \(r(.latency_us.mean - $w.lock - $w.quorum - $w.commit)) |" )
' "$RESULTS"

# Shared by the benchmark scripts (sourced, not run): release binaries, a work directory that
# is removed on exit together with every process started in it, and starting a RingKV cluster
# or a Redis server on a free loopback port.
#
# Before sourcing, set NODES (nodes per cluster). After it: ROOT, BIN, WORK, and the functions
# below. SKIP_BUILD=1 reuses target/release; BIN=DIR takes the binaries from DIR.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}

if [ -z "${SKIP_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release --bins -q)
fi
for b in ringkv ringkv-coordinator ringkv-node; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (build with cargo build --release)" >&2; exit 2; }
done

# need_package COMMAND: install Debian's package of that name unless COMMAND is on the PATH.
need_package() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "$1 not found; installing Debian's $1 package" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo apt-get update -qq && $sudo apt-get install -y -qq "$1" >/dev/null
    fi
}

# need_redis: redis-server (and redis-cli) from Debian's package unless installed.
need_redis() {
    need_package redis-server
}

# wait_for_ping PORT NAME LOG: wait (10 s at most) until a Redis-protocol server answers PING
# on 127.0.0.1:PORT; if none does, print LOG and exit.
wait_for_ping() {
    for _ in $(seq 100); do
        if redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG; then return; fi
        sleep 0.1
    done
    echo "$2 did not start; log:" >&2
    cat "$3" >&2
    exit 1
}

WORK=$(mktemp -d -t ringkv-bench.XXXXXX)
PIDS=()

# stop_pid PID: stop a process started here, wait for it, and forget it (so the exit handler
# never signals a pid the system may have reused).
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local kept=() pid
    for pid in "${PIDS[@]}"; do
        [ "$pid" = "$1" ] || kept+=("$pid")
    done
    PIDS=("${kept[@]}")
}

# Runs on exit: stop what was started, kill anything left that mentions $WORK (nodes stop with
# their coordinator, unless it died), and remove $WORK. A script may define on_exit to keep
# something first.
cleanup() {
    if declare -F on_exit >/dev/null; then on_exit || true; fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    for cmdline in /proc/[0-9]*/cmdline; do
        if grep -qF -- "$WORK/" "$cmdline" 2>/dev/null; then
            pid=${cmdline#/proc/}
            kill -KILL "${pid%/cmdline}" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's range of
# ephemeral ports: a port from that range could be taken by a connection (the nodes', the
# client's) between this check and the server's bind.
free_port() {
    local port low
    read -r low _ < /proc/sys/net/ipv4/ip_local_port_range
    [ "$low" -gt 2048 ] || low=30000
    for _ in $(seq 100); do
        port=$((1024 + RANDOM % (low - 1024)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "no free port found" >&2
    exit 1
}

# start_redis NAME EXTRA-ARGS...: start a Redis server, set REDIS_ADDR and REDIS_PID.
start_redis() {
    local name=$1
    shift
    local port dir
    port=$(free_port)
    dir="$WORK/$name"
    mkdir -p "$dir"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' \
        --daemonize no --logfile "$dir/redis.log" "$@" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    REDIS_ADDR="127.0.0.1:$port"
    wait_for_ping "$port" "redis ($name)" "$dir/redis.log"
}

# start_ringkv NAME FSYNC [META_FSYNC]: start a coordinator with NODES nodes, set RINGKV_ADDR
# and RINGKV_PID. RINGKV_ARGS (environment) adds coordinator flags, e.g.
# RINGKV_ARGS=--no-node-batching. FSYNC is the nodes' log policy (always or never), and the
# metadata journal's too unless META_FSYNC says otherwise. Returns once every node has
# registered, so the first measurement does not race the start.
start_ringkv() {
    local name=$1 fsync=$2 meta_fsync=${3:-$2}
    local dir="$WORK/$name"
    mkdir -p "$dir"
    "$BIN/ringkv-coordinator" --listen 127.0.0.1:0 --data-dir "$dir/data" --nodes "$NODES" \
        --node-fsync "$fsync" --meta-fsync "$meta_fsync" --node-binary "$BIN/ringkv-node" \
        ${RINGKV_ARGS:-} \
        > "$dir/stdout" 2> "$dir/coordinator.log" &
    RINGKV_PID=$!
    PIDS+=("$RINGKV_PID")
    RINGKV_ADDR=""
    for _ in $(seq 600); do
        RINGKV_ADDR=$(sed -n 's/^listening on //p' "$dir/stdout" | head -n1)
        if [ -n "$RINGKV_ADDR" ]; then break; fi
        kill -0 "$RINGKV_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ -n "$RINGKV_ADDR" ]; then
        for _ in $(seq 600); do
            local up
            up=$("$BIN/ringkv" --coordinator "$RINGKV_ADDR" --json nodes 2>/dev/null \
                | jq '[.nodes[] | select(.state == "up")] | length' 2>/dev/null || echo 0)
            if [ "${up:-0}" -ge "$NODES" ]; then return; fi
            kill -0 "$RINGKV_PID" 2>/dev/null || break
            sleep 0.1
        done
    fi
    echo "ringkv ($name) did not start; log:" >&2
    tail -n 30 "$dir/coordinator.log" >&2
    exit 1
}

//! `ringkv-node`: parse flags, bind, print the address, run until SIGTERM or ctrl-c.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ringkv_common::config::parse_max_frame_len;
use ringkv_common::protocol::DEFAULT_MAX_FRAME_LEN;
use ringkv_common::NodeId;
use ringkv_node::log::{CompactThreshold, FsyncPolicy};
use ringkv_node::NodeConfig;
use tokio_util::sync::CancellationToken;

/// mimalloc: about 15% less CPU per request than the system allocator (bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// RingKV storage node: holds replicas in memory, backed by a checksummed log.
///
/// Usually spawned by `ringkv-coordinator`; start one by hand to join a running cluster,
/// with the token from the coordinator's data directory:
///
///   RINGKV_CLUSTER_TOKEN=$(cat ringkv-data/cluster.token) \
///     ringkv-node --coordinator 127.0.0.1:7400 --data-dir ./node-a
#[derive(Parser, Debug)]
#[command(version, about, verbatim_doc_comment)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the first line on stdout names it).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address the coordinator reaches this node at (default: the address it listens on),
    /// e.g. `--listen 0.0.0.0:7500 --advertise 10.0.0.5:7500` on another machine.
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for the log and the node id.
    #[arg(long)]
    data_dir: PathBuf,
    /// Coordinator to register and heartbeat with.
    #[arg(long, env = "RINGKV_COORDINATOR")]
    coordinator: Option<String>,
    /// Node id (set by the coordinator when it spawns the node; otherwise assigned at join).
    #[arg(long)]
    id: Option<NodeId>,
    /// When to fsync the log: `always` (group commit; an acknowledged write is on disk),
    /// `interval[:DURATION]` (fsync at least every DURATION, default 100ms), or `never`.
    #[arg(long, default_value = "always")]
    fsync: FsyncPolicy,
    /// Time between heartbeats, e.g. `250ms`.
    #[arg(long, default_value = "250ms", value_parser = ringkv_common::parse_period)]
    heartbeat_interval: Duration,
    /// Compact the log once it is at least this many bytes...
    #[arg(long, default_value_t = CompactThreshold::default().min_bytes)]
    compact_min_bytes: u64,
    /// ...and at least this fraction of it is garbage.
    #[arg(long, default_value_t = CompactThreshold::default().garbage_ratio)]
    compact_garbage_ratio: f64,
    /// Largest frame accepted, in bytes (at least 17.06 MiB: a frame must hold the
    /// largest key and value).
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_LEN, value_parser = parse_max_frame_len)]
    max_frame_len: usize,
    /// The cluster token: the contents of the coordinator's `cluster.token` file (in its data
    /// directory). Prefer the environment variable: a flag's value is visible to every user
    /// of the machine. With it, this node presents it to the coordinator and refuses a peer
    /// that says it is the coordinator without it; the coordinator passes it to the nodes it
    /// spawns, and refuses a node that registers without it. Without it, any peer may act as
    /// the coordinator here (a node on its own, for tests and tools). An empty value is an
    /// error, not "no token".
    #[arg(
        long,
        env = ringkv_common::cluster_token::ENV,
        hide_env_values = true,
        value_parser = parse_token
    )]
    cluster_token: Option<String>,
    /// Async worker threads (default: half the cores, at least 1, leaving the rest to the
    /// other nodes and the coordinator on the same machine). One worker runs
    /// every task on the main thread (a single-threaded runtime).
    #[arg(long)]
    worker_threads: Option<std::num::NonZeroUsize>,
}

fn main() -> anyhow::Result<()> {
    // Before any file is written, the lock file and the logs included.
    ringkv_common::signals::ignore_file_size_limit_signal();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _failpoints = fail::FailScenario::setup();
    let args = Args::parse();
    // No second process may write this directory's log.
    let lock = ringkv_common::dir_lock::lock_dir(&args.data_dir)?;
    let workers = args
        .worker_threads
        .map_or_else(ringkv_common::runtime::default_worker_threads, |n| n.get());
    let runtime = ringkv_common::runtime::server_runtime(workers, "node")?;
    runtime.block_on(serve(args, lock))
}

/// A cluster token as given (surrounding whitespace dropped): an empty one is refused, since
/// `$(cat PATH)` of a wrong path gives one, and it would pass for no token at all.
fn parse_token(given: &str) -> Result<String, String> {
    let token = given.trim();
    if token.is_empty() {
        return Err(format!(
            "the cluster token is empty; give the contents of the coordinator's {} file",
            ringkv_common::cluster_token::FILE
        ));
    }
    Ok(token.to_string())
}

async fn serve(args: Args, lock: ringkv_common::dir_lock::DirLock) -> anyhow::Result<()> {
    // Before the readiness line, so that no SIGHUP stops a node that is up.
    ringkv_common::signals::ignore_hangups();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let config = NodeConfig {
        data_dir: args.data_dir,
        coordinator: args.coordinator,
        advertise: args.advertise,
        id: args.id,
        fsync: args.fsync,
        heartbeat_interval: args.heartbeat_interval,
        compact: CompactThreshold {
            min_bytes: args.compact_min_bytes,
            garbage_ratio: args.compact_garbage_ratio,
        },
        max_frame_len: args.max_frame_len,
        cluster_token: args.cluster_token,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(ringkv_common::signals::cancel_on_signal(shutdown.clone()));
    ringkv_node::run(config, listener, lock, shutdown).await
}

//! `ringkv-coordinator`: parse flags, bind, run until SIGTERM or ctrl-c.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ringkv_common::config::{parse_max_frame_len, FsyncPolicy};
use ringkv_common::protocol::DEFAULT_MAX_FRAME_LEN;
use ringkv_common::{parse_duration, parse_period};
use ringkv_coordinator::failure_detector::DetectorConfig;
use ringkv_coordinator::metadata::MetaFsync;
use ringkv_coordinator::supervisor::NodeLaunch;
use ringkv_coordinator::CoordinatorConfig;
use tokio_util::sync::CancellationToken;

/// mimalloc: about 15% less CPU per request than the system allocator (bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// RingKV coordinator: owns the hash ring and the metadata, spawns and watches the storage
/// nodes, keeps three replicas of every key, and serves clients.
///
/// Start a 5-node cluster on the default address and data directory:
///
///   ringkv-coordinator
///
/// Once it accepts clients and its nodes have registered, it prints `listening on ADDR`.
/// A flag given twice takes its last value, so scripts can append overrides.
#[derive(Parser, Debug)]
#[command(version, about, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// Address for clients and nodes.
    #[arg(long, default_value = ringkv_common::DEFAULT_COORDINATOR_ADDR)]
    listen: String,
    /// Directory for the metadata journal, the cluster token (`cluster.token`, which a node
    /// started by hand needs in RINGKV_CLUSTER_TOKEN) and the spawned nodes' data.
    #[arg(long, default_value = "./ringkv-data")]
    data_dir: PathBuf,
    /// Storage nodes to spawn (at least; `ringkv node add` spawns more).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Replicas per key.
    #[arg(long, default_value_t = 3)]
    rf: usize,
    /// Replicas that must acknowledge a write before it is acknowledged.
    #[arg(long, default_value_t = 2)]
    write_quorum: usize,
    /// Virtual nodes per node on the hash ring.
    #[arg(long, default_value_t = ringkv_common::ring::DEFAULT_VNODES)]
    vnodes: u32,
    /// Heartbeat interval of spawned nodes.
    #[arg(long, default_value = "250ms", value_parser = parse_period)]
    heartbeat_interval: Duration,
    /// Silence after which a node is suspect (gets no new replicas).
    #[arg(long, default_value = "750ms", value_parser = parse_duration)]
    suspect_timeout: Duration,
    /// Silence after which a node is down (its keys are re-replicated).
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    down_timeout: Duration,
    /// Timeout of one request to a node.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    node_timeout: Duration,
    /// Background key transfers in flight at once.
    #[arg(long, default_value_t = 128)]
    transfer_concurrency: usize,
    /// Background transfer limit in bytes per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    transfer_bytes_per_sec: u64,
    /// fsync policy of spawned nodes: always, interval[:DURATION] or never.
    #[arg(long, default_value = "always")]
    node_fsync: FsyncPolicy,
    /// Largest frame accepted from clients and nodes, and passed to spawned nodes, in bytes
    /// (at least 17.06 MiB: a frame must hold the largest key and value).
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_LEN, value_parser = parse_max_frame_len)]
    max_frame_len: usize,
    /// When key changes in the metadata journal are synced: `always` (before the write is
    /// acknowledged) or `never` (buffered, written within 10 ms, not synced). After a stop
    /// that was not a clean shutdown, the metadata is learnt back from the nodes, and under
    /// `never` reads wait until fewer than --write-quorum nodes are still to be reconciled:
    /// with `--node-fsync always`, acknowledged writes survive a machine crash and no read
    /// serves the version before one; `always` also serves reads while nodes are missing.
    #[arg(long, value_enum, default_value = "always")]
    meta_fsync: MetaFsync,
    /// How long answers to a pipelining client may wait for its other requests in flight,
    /// so that they go out in one write (0 writes each answer as soon as it is ready).
    #[arg(long, default_value = "200us", value_parser = parse_duration)]
    answer_hold: Duration,
    /// How often deleted keys are collected: their tombstones leave the metadata and the
    /// nodes, and a copy a node kept from before the delete is forgotten when that node is
    /// reconciled (0 keeps every tombstone).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    collect_tombstones_every: Duration,
    /// Send every request to a node as a frame of its own, instead of carrying the requests
    /// queued together to a node in one batch (for measuring what batching gains).
    #[arg(long)]
    no_node_batching: bool,
    /// The `ringkv-node` executable (default: next to this one, else on PATH).
    #[arg(long)]
    node_binary: Option<PathBuf>,
    /// Async worker threads (default: half the cores, at least 1, leaving the rest to the
    /// spawned nodes and the clients on the same machine). One worker runs
    /// every task on the main thread (a single-threaded runtime).
    #[arg(long)]
    worker_threads: Option<std::num::NonZeroUsize>,
    /// Async worker threads of each spawned node (default: the node's own, half the cores).
    #[arg(long)]
    node_worker_threads: Option<std::num::NonZeroUsize>,
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
    anyhow::ensure!(
        args.down_timeout > args.suspect_timeout,
        "--down-timeout must be longer than --suspect-timeout"
    );
    let mut config = CoordinatorConfig::new(args.data_dir);
    config.nodes = args.nodes;
    config.rf = args.rf;
    config.write_quorum = args.write_quorum;
    config.vnodes = args.vnodes;
    config.node_timeout = args.node_timeout;
    config.detector = DetectorConfig {
        suspect_after: args.suspect_timeout,
        down_after: args.down_timeout,
    };
    config.transfer_concurrency = args.transfer_concurrency;
    config.meta_fsync = args.meta_fsync;
    config.answer_hold = args.answer_hold;
    config.collect_tombstones_every = args.collect_tombstones_every;
    if args.no_node_batching {
        config.node_batching = ringkv_common::client::Batching::Off;
    }
    config.transfer_bytes_per_sec = args.transfer_bytes_per_sec;
    config.max_frame_len = args.max_frame_len;
    let mut node_args = vec![
        "--heartbeat-interval".into(),
        ringkv_common::duration_arg(args.heartbeat_interval),
        "--fsync".into(),
        args.node_fsync.to_string(),
        "--max-frame-len".into(),
        args.max_frame_len.to_string(),
    ];
    if let Some(n) = args.node_worker_threads {
        node_args.extend(["--worker-threads".into(), n.to_string()]);
    }
    config.launch = NodeLaunch {
        binary: args.node_binary.unwrap_or_else(NodeLaunch::default_binary),
        args: node_args,
    };
    let workers = args
        .worker_threads
        .map_or_else(ringkv_common::runtime::default_worker_threads, |n| n.get());
    let runtime = ringkv_common::runtime::server_runtime(workers, "coordinator")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(ringkv_common::signals::cancel_on_signal(shutdown.clone()));
        ringkv_coordinator::run(config, listener, shutdown, |addr| {
            println!("listening on {addr}");
        })
        .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_given_twice_takes_its_last_value() {
        let args = Args::try_parse_from([
            "ringkv-coordinator",
            "--meta-fsync",
            "always",
            "--node-fsync",
            "always",
            "--meta-fsync",
            "never",
        ])
        .expect("repeated flags parse");
        assert_eq!(args.meta_fsync, MetaFsync::Never);
        assert_eq!(args.node_fsync, FsyncPolicy::Always);
    }

    #[test]
    fn node_flags_are_checked_before_anything_starts() {
        let parse = |extra: &[&str]| {
            Args::try_parse_from(std::iter::once("ringkv-coordinator").chain(extra.iter().copied()))
        };
        assert!(parse(&["--node-fsync", "bogus"]).is_err());
        assert!(parse(&["--node-fsync", "interval:0ms"]).is_err());
        let args = parse(&["--node-fsync", "interval:250ms"]).unwrap();
        assert_eq!(
            args.node_fsync,
            FsyncPolicy::Interval(Duration::from_millis(250))
        );
        assert!(parse(&["--max-frame-len", "1048576"]).is_err());
        assert_eq!(
            parse(&["--max-frame-len", "67108864"])
                .unwrap()
                .max_frame_len,
            64 << 20
        );
    }
}

//! The coordinator's configuration, built by `main` from flags and by tests directly.

use std::path::PathBuf;
use std::time::Duration;

use crate::failure_detector::DetectorConfig;
use crate::supervisor::NodeLaunch;

/// Everything the coordinator needs to run.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Metadata database and spawned nodes' data directories live here.
    pub data_dir: PathBuf,
    /// Spawned nodes to keep (at least); more can be added later.
    pub nodes: usize,
    /// Replicas per key.
    pub rf: usize,
    /// Acknowledgements a write waits for.
    pub write_quorum: usize,
    /// Virtual nodes per node on the ring.
    pub vnodes: u32,
    /// How long a request to a node may take before it counts as failed.
    pub node_timeout: Duration,
    pub detector: DetectorConfig,
    pub launch: NodeLaunch,
    /// Background transfers (re-replication, migration) in flight at once.
    pub transfer_concurrency: usize,
    /// Background transfer rate limit in bytes per second (0 = unlimited).
    pub transfer_bytes_per_sec: u64,
    /// How long start-up waits for nodes to register before serving anyway.
    pub startup_timeout: Duration,
    pub max_frame_len: usize,
    /// When metadata changes are synced to disk before a write is acknowledged.
    pub meta_fsync: crate::metadata::MetaFsync,
    /// Whether node requests queued together travel in one `Batch` frame.
    pub node_batching: ringkv_common::client::Batching,
    /// How long a client connection may hold ready answers while more of its requests are
    /// in flight, to answer a pipelining client in one write (zero: never hold).
    pub answer_hold: Duration,
    /// How often deleted keys are collected (zero: never).
    pub collect_tombstones_every: Duration,
}

impl CoordinatorConfig {
    /// A configuration with the documented defaults for `data_dir`.
    pub fn new(data_dir: PathBuf) -> CoordinatorConfig {
        CoordinatorConfig {
            data_dir,
            nodes: 5,
            rf: 3,
            write_quorum: 2,
            vnodes: ringkv_common::ring::DEFAULT_VNODES,
            node_timeout: Duration::from_secs(2),
            detector: DetectorConfig::default(),
            launch: NodeLaunch {
                binary: NodeLaunch::default_binary(),
                args: Vec::new(),
            },
            transfer_concurrency: 128,
            transfer_bytes_per_sec: 0,
            startup_timeout: Duration::from_secs(30),
            max_frame_len: ringkv_common::protocol::DEFAULT_MAX_FRAME_LEN,
            meta_fsync: crate::metadata::MetaFsync::Always,
            node_batching: ringkv_common::client::Batching::On,
            answer_hold: Duration::from_micros(200),
            collect_tombstones_every: Duration::from_secs(60),
        }
    }

    /// Where spawned node `id` keeps its data.
    pub fn node_dir(&self, id: ringkv_common::NodeId) -> PathBuf {
        self.data_dir.join("nodes").join(format!("node-{id}"))
    }
}

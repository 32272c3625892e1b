//! `ringkv-node`: a storage server holding replicas for the coordinator.
//!
//! # Layout
//! - [`store`]: the in-memory hash table with the newer-version-wins rule.
//! - [`log`]: the append-only, CRC-checked log that makes the table durable, its recovery,
//!   group commit and compaction.
//! - [`server`]: the request handler the coordinator talks to.
//! - [`heartbeat`]: registration with the coordinator and periodic heartbeats.
//!
//! [`run`] is what `main` calls and what in-process tests call.

pub mod heartbeat;
pub mod log;
pub mod server;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ringkv_common::NodeId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::log::{CompactThreshold, FsyncPolicy, Log};
use crate::server::Node;
use crate::store::Store;

/// How often the node checks whether its log needs compaction.
const COMPACTION_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a node needs to run.
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub coordinator: Option<String>,
    /// The address registered with the coordinator; `None`: the address listened on.
    pub advertise: Option<String>,
    pub id: Option<NodeId>,
    pub fsync: FsyncPolicy,
    pub heartbeat_interval: Duration,
    pub compact: CompactThreshold,
    pub max_frame_len: usize,
    /// See [`ringkv_common::cluster_token`]: presented to the coordinator, and required of
    /// peers acting as one. `None`: every peer may.
    pub cluster_token: Option<String>,
}

/// Open the log, serve on `listener` and heartbeat to the coordinator until `shutdown`;
/// then drain connections and close the log. `_lock` is the lock on `config.data_dir`
/// (taken first by the caller, so that a second process on the directory fails before it
/// says it is listening), held until this returns.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    _lock: ringkv_common::dir_lock::DirLock,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = config.data_dir.clone();
    let (fsync, compact) = (config.fsync, config.compact);
    let (log, records, report) =
        tokio::task::spawn_blocking(move || Log::open(&dir, fsync, compact)).await??;
    if report.truncated_tail_bytes > 0 || !report.corrupt_regions.is_empty() {
        warn!(
            truncated = report.truncated_tail_bytes,
            corrupt = ?report.corrupt_regions,
            "log recovered with damage; affected keys are repaired from other replicas"
        );
    }
    if report.preallocated_bytes > 0 && fsync != FsyncPolicy::Always {
        // Under `always` these are the zeros the log is written ahead in. Under the other
        // policies they may also be unsynced appends a machine crash left as zeros.
        warn!(
            bytes = report.preallocated_bytes,
            "log ended in zeros: space written ahead by a run under --fsync always, or \
             unsynced writes a machine crash took"
        );
    }
    let store = Store::from_records(records);
    info!(
        records = report.records,
        keys = store.stats().keys,
        "log replayed"
    );
    let set_aside = report.corrupt_regions.iter().map(|(_, len)| len).sum();
    let node = Arc::new(
        Node::new(store, log)
            .with_cluster_token(config.cluster_token.clone())
            .with_log_set_aside(set_aside),
    );

    let addr = listener.local_addr()?;
    let id = config
        .id
        .or_else(|| heartbeat::load_node_id(&config.data_dir));
    if let Some(id) = config.id {
        heartbeat::store_node_id(&config.data_dir, id)?;
    }
    let tracker = tokio_util::task::TaskTracker::new();
    if config.coordinator.is_some() && config.advertise.is_none() && addr.ip().is_unspecified() {
        warn!(
            %addr,
            "listening on every interface without --advertise: the coordinator is told {addr}, \
             which only reaches this node from its own machine"
        );
    }
    if config.coordinator.is_some() && config.cluster_token.is_none() {
        warn!(
            "no cluster token ({}): the coordinator will refuse this node",
            ringkv_common::cluster_token::ENV
        );
    }
    if let Some(coordinator) = config.coordinator.clone() {
        let cfg = heartbeat::HeartbeatConfig {
            coordinator,
            advertise_addr: config.advertise.clone().unwrap_or_else(|| addr.to_string()),
            data_dir: config.data_dir.clone(),
            interval: config.heartbeat_interval,
            id,
            cluster_token: config.cluster_token.clone(),
        };
        tracker.spawn(heartbeat::run(cfg, node.clone(), shutdown.clone()));
    }
    let compactor = node.clone();
    let compactor_stop = shutdown.clone();
    tracker.spawn(async move {
        let mut ticker = tokio::time::interval(COMPACTION_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = compactor_stop.cancelled() => return,
                _ = ticker.tick() => compactor.maybe_compact().await,
            }
        }
    });
    // A failed log stops the node: what its table holds may no longer be what its file does.
    let log_failed = node.log_failed().clone();
    let stop = shutdown.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = log_failed.cancelled() => stop.cancel(),
        }
    });
    tracker.close();

    ringkv_common::server::serve(listener, node.clone(), config.max_frame_len, shutdown).await;
    tracker.wait().await;
    if let Err(e) = node.log().close().await {
        error!(error = %e, "closing the log failed");
    }
    if node.log_failed().is_cancelled() {
        anyhow::bail!("the node's log failed; stopped so that a restart replays it");
    }
    info!("node stopped");
    Ok(())
}

//! Registration with the coordinator and the periodic heartbeat.
//!
//! The node keeps running when the coordinator goes away: it retries with capped exponential
//! backoff and registers again when the coordinator returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ringkv_common::client::{Batching, CallError, Client};
use ringkv_common::protocol::{Request, Response, Role, DEFAULT_MAX_FRAME_LEN};
use ringkv_common::NodeId;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::server::Node;

/// Longest wait between attempts to reach the coordinator. Short, so that a restarted
/// coordinator hears from its nodes well within its start-up grace period.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Name of the file in the data directory that remembers the node's id.
pub const NODE_ID_FILE: &str = "node-id";

/// Read the node id remembered in `dir`, if any.
pub fn load_node_id(dir: &Path) -> Option<NodeId> {
    std::fs::read_to_string(dir.join(NODE_ID_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Remember `id` in `dir`, replacing the file whole.
pub fn store_node_id(dir: &Path, id: NodeId) -> std::io::Result<()> {
    let text = format!("{id}\n");
    ringkv_common::durable_file::replace(dir, NODE_ID_FILE, text.as_bytes(), 0o666)
}

/// What the heartbeat task needs to know.
pub struct HeartbeatConfig {
    pub coordinator: String,
    pub advertise_addr: String,
    pub data_dir: PathBuf,
    pub interval: Duration,
    pub id: Option<NodeId>,
    /// Presented in the hello; the coordinator refuses a node without it.
    pub cluster_token: Option<String>,
}

/// Register and heartbeat until `shutdown`.
pub async fn run(cfg: HeartbeatConfig, node: Arc<Node>, shutdown: CancellationToken) {
    let mut id = cfg.id;
    let mut backoff = Duration::from_millis(50);
    // Whether the last warning was of a refusal; each kind is said once in a row.
    let mut warned: Option<bool> = None;
    while !shutdown.is_cancelled() {
        match session(&cfg, &node, &mut id, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                // An error answer: the coordinator was reached and said no (a missing cluster
                // token, an id it does not hand out), which retrying alone will not change.
                let refused = matches!(e.downcast_ref::<CallError>(), Some(CallError::Remote(_)));
                if warned != Some(refused) {
                    if refused {
                        warn!(coordinator = %cfg.coordinator, error = %e, "the coordinator refused this node; retrying");
                    } else {
                        warn!(coordinator = %cfg.coordinator, error = %e, "coordinator unreachable; retrying");
                    }
                    warned = Some(refused);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's worth of registration and heartbeats. Returns `Ok` only on shutdown.
async fn session(
    cfg: &HeartbeatConfig,
    node: &Arc<Node>,
    id: &mut Option<NodeId>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let client = Client::connect_as(
        &cfg.coordinator,
        Role::Node,
        cfg.cluster_token.as_deref(),
        DEFAULT_MAX_FRAME_LEN,
        Batching::Off,
    )
    .await?;
    let reg = Request::Register {
        node: *id,
        addr: cfg.advertise_addr.clone(),
        pid: std::process::id(),
        data_dir: cfg.data_dir.display().to_string(),
    };
    let assigned = match client
        .call_timeout(reg, cfg.interval * 8 + Duration::from_secs(2))
        .await?
    {
        Response::Registered { node } => node,
        other => anyhow::bail!("unexpected answer to register: {other:?}"),
    };
    if *id != Some(assigned) {
        store_node_id(&cfg.data_dir, assigned)?;
        *id = Some(assigned);
    }
    info!(node = %assigned, coordinator = %cfg.coordinator, "registered");
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let beat = Request::Heartbeat {
            node: assigned,
            stats: node.stats(),
        };
        client
            .call_timeout(beat, cfg.interval * 4 + Duration::from_secs(1))
            .await?;
    }
}

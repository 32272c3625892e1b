//! The coordinator's shared state: one value, shared by every connection and background task.

use std::sync::Arc;

use ringkv_common::NodeId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CoordinatorConfig;
use crate::metadata::Metadata;
use crate::repair::RepairQueue;
use crate::replication::KeyLocks;
use crate::ring_state::Membership;
use crate::supervisor::Supervisor;

/// Everything a running coordinator owns.
pub struct Coordinator {
    pub config: CoordinatorConfig,
    pub meta: Metadata,
    pub members: Membership,
    pub supervisor: Supervisor,
    pub locks: KeyLocks,
    pub repairs: RepairQueue,
    /// Fires when the coordinator shuts down.
    pub shutdown: CancellationToken,
    /// Fires once the nodes expected at start-up have registered; client requests wait for it.
    pub ready: CancellationToken,
    /// Background work (late acknowledgements, repairs); waited for at shutdown.
    pub tasks: TaskTracker,
}

impl Coordinator {
    /// Spawn `fut` as background work owned by the coordinator.
    pub fn background<F>(self: &Arc<Self>, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Nodes spawned by this coordinator that are not removed.
    pub fn spawned_nodes(&self) -> Vec<NodeId> {
        self.members
            .records()
            .into_iter()
            .filter(|r| r.spawned && !r.removed)
            .map(|r| r.id)
            .collect()
    }
}

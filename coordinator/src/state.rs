//! The coordinator's shared state: one value, shared by every connection and background task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringkv_common::sync::MutexExt;
use ringkv_common::NodeId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CoordinatorConfig;
use crate::key_locks::KeyLocks;
use crate::metadata::Metadata;
use crate::repair::RepairQueue;
use crate::replication::WriteClock;
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
    /// Opens once the nodes expected at start-up have registered; client requests wait for it.
    pub ready: ReadyGate,
    /// Closed to reads while the metadata may lack acknowledged writes the nodes hold.
    pub reads: RecoveryGate,
    /// Background work (late acknowledgements, repairs); waited for at shutdown.
    pub tasks: TaskTracker,
    /// Where acknowledged writes spent their time, for `status`.
    pub write_clock: WriteClock,
    /// Tombstone collection's counters.
    pub collection: crate::tombstones::Collection,
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

/// A one-way gate: closed at start-up, open for good once [`ReadyGate::open`] is called.
/// Checking an open gate is one atomic load, cheap enough for every request.
#[derive(Default)]
pub struct ReadyGate {
    open: AtomicBool,
    opened: CancellationToken,
}

impl ReadyGate {
    /// Open the gate and release every waiter.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.cancel();
    }

    /// Whether the gate is open.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Wait at most `limit` for the gate to open.
    pub async fn wait(&self, limit: Duration) {
        if !self.is_open() {
            let _ = tokio::time::timeout(limit, self.opened.cancelled()).await;
        }
    }
}

/// Whether reads may be served, after an unclean stop that may have taken acknowledged key
/// changes from the journal (see [`crate::metadata::Metadata::read_gate`]): each such change
/// reached `quorum` nodes, so once fewer than `quorum` nodes owe a reconciliation, one holder
/// of each has been reconciled and the metadata names every key's newest version again.
/// Until then a read could be answered with the version before an acknowledged write.
/// Checking it is one atomic load.
pub struct RecoveryGate {
    quorum: Option<usize>,
    closed: AtomicBool,
    /// Serialises updates, so that an older count never overwrites a newer one.
    updating: std::sync::Mutex<()>,
}

impl RecoveryGate {
    /// A gate that waits for all but `quorum - 1` owing nodes; `None`: always open. Starts
    /// closed until the first [`update`](Self::update).
    pub fn new(quorum: Option<usize>) -> RecoveryGate {
        RecoveryGate {
            quorum,
            closed: AtomicBool::new(quorum.is_some()),
            updating: std::sync::Mutex::new(()),
        }
    }

    /// Count the nodes that owe a reconciliation (`owing`, called under the gate's own lock)
    /// and open or close the gate; returns whether reads wait, and whether they did before.
    pub fn update(&self, owing: impl FnOnce() -> usize) -> (bool, bool) {
        let _one_at_a_time = self.updating.lock_unpoisoned();
        let was_closed = self.is_closed();
        let closed = self.quorum.is_some_and(|quorum| owing() >= quorum);
        self.closed.store(closed, Ordering::Release);
        (closed, was_closed)
    }

    /// Whether reads must wait.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

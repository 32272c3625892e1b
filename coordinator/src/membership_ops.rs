//! Membership operations: registration, heartbeats, state transitions and what they set off,
//! `node add|remove|kill|pause|resume`, and bringing spawned nodes up at start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringkv_common::protocol::{NodeSignal, Reply, Response};
use ringkv_common::{NodeId, NodeState, NodeStats, WireError};
use tracing::{info, warn};

use crate::metadata::{KeyUpdate, NodeRecord};
use crate::repair::JobKind;
use crate::ring_state::Transition;
use crate::state::Coordinator;
use crate::supervisor::Supervisor;

/// How often the failure detector runs.
const DETECTOR_TICK: Duration = Duration::from_millis(100);

/// How often a decommission checks whether the leaving node still holds anything.
const DECOMMISSION_POLL: Duration = Duration::from_millis(200);

/// How often a decommission looks whether the writes in flight when it began have settled.
const WRITE_BARRIER_POLL: Duration = Duration::from_millis(5);

/// Longest address or data directory a node may register with.
const MAX_REGISTRY_FIELD: usize = 4096;

impl Coordinator {
    /// A node (re)registered. Unknown ids are refused; a node without an id gets a new one.
    pub async fn register(
        self: &Arc<Self>,
        node: Option<NodeId>,
        addr: String,
        pid: u32,
        data_dir: String,
    ) -> Reply {
        // A node record is journaled whole: bound what a peer can make it hold.
        if addr.len() > MAX_REGISTRY_FIELD || data_dir.len() > MAX_REGISTRY_FIELD {
            return Err(WireError::TooLarge {
                what: "node address or data directory".into(),
                size: addr.len().max(data_dir.len()) as u64,
                max: MAX_REGISTRY_FIELD as u64,
            });
        }
        let id = match node {
            // A node already in the registry keeps its id whatever it is (an older build
            // took any); a new one must carry an id this coordinator could have handed out.
            Some(id) if !id.is_assignable() && self.members.record(id).is_none() => {
                return Err(WireError::BadRequest(format!(
                    "node id {id} is outside 1..={}: no coordinator hands it out",
                    NodeId::MAX
                )));
            }
            Some(id) => {
                if self.members.state(id) == Some(NodeState::Removed) {
                    return Err(WireError::BadRequest(format!(
                        "node {id} was decommissioned; start it on a fresh data directory to rejoin"
                    )));
                }
                if self.members.record(id).is_none() {
                    // A node this coordinator never knew (its registry was lost): accept it
                    // under the id it carries. What it holds may be writes the metadata lost
                    // too, so collection waits for its reconciliation.
                    let mut record = joined_record(id, &addr, &data_dir, pid);
                    record.owes_reconciliation = true;
                    self.members.add(record);
                }
                id
            }
            None => {
                let id = self.members.next_id().ok_or_else(no_ids_left)?;
                let record = joined_record(id, &addr, &data_dir, pid);
                self.members.add(record.clone());
                // Durable before the node enters the ring and takes writes: under
                // `--meta-fsync never` a write acknowledged by a node the registry then lost
                // would be missed by the reads' wait after a crash.
                self.meta
                    .save_node(record)
                    .await
                    .map_err(|e| WireError::Unavailable(format!("cannot record the node: {e}")))?;
                info!(node = %id, %addr, "new node joined");
                id
            }
        };
        let Some((record, transition)) = self.members.register(id, addr, pid) else {
            return Err(WireError::NotFound(format!("node {id}")));
        };
        self.meta
            .save_node(record)
            .await
            .map_err(|e| WireError::Unavailable(format!("cannot record the node: {e}")))?;
        if let Some(t) = transition {
            self.on_transition(t);
        }
        // A node the registry had lost may hold writes the journal lost too.
        self.refresh_read_gate();
        // Whatever the node holds is reconciled against the metadata: it may have restarted
        // with an older log, or this coordinator may have restarted and missed writes it
        // never recorded.
        let this = self.clone();
        self.background(async move {
            this.reconcile_node(id).await;
            this.sweep_off_workers(JobKind::Migrate).await;
        });
        Ok(Response::Registered { node: id })
    }

    /// A heartbeat arrived.
    pub fn heartbeat(self: &Arc<Self>, node: NodeId, stats: NodeStats) -> Reply {
        match self.members.heartbeat(node, stats) {
            None => Err(WireError::NotFound(format!("node {node} (register first)"))),
            Some(t) => {
                if let Some(t) = t {
                    self.on_transition(t);
                }
                Ok(Response::Done)
            }
        }
    }

    /// React to a state change.
    pub fn on_transition(self: &Arc<Self>, t: Transition) {
        info!(node = %t.node, from = %t.from, to = %t.to, "node state changed");
        let this = self.clone();
        match (t.from, t.to) {
            (_, NodeState::Down) => {
                self.background(async move {
                    this.queue_node_keys(t.node, JobKind::Rereplicate).await;
                });
            }
            (NodeState::Down, NodeState::Up) => {
                self.background(async move {
                    this.reconcile_node(t.node).await;
                    this.sweep_off_workers(JobKind::Migrate).await;
                });
            }
            _ => {}
        }
    }

    /// Spawn one more node and wait until it registers.
    pub async fn add_node(self: &Arc<Self>) -> Reply {
        let (id, dir) = self.new_spawned_node().await?;
        let pid = self
            .supervisor
            .spawn(id, &dir)
            .map_err(|e| WireError::Internal(format!("cannot spawn node {id}: {e}")))?;
        info!(node = %id, pid, "node added");
        let deadline = Instant::now() + self.config.startup_timeout;
        while !self.members.is_up(id) {
            if Instant::now() > deadline {
                return Err(WireError::Indeterminate(format!(
                    "node {id} was spawned (pid {pid}) but has not registered yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Response::NodeAdded { node: id })
    }

    /// Allocate an id and a data directory for a node to spawn, and record it.
    async fn new_spawned_node(self: &Arc<Self>) -> Result<(NodeId, std::path::PathBuf), WireError> {
        // Skip ids whose data directory exists: a registry that lost its tail (a damaged
        // journal) may not know every node that was ever spawned.
        let mut id = self.members.next_id().ok_or_else(no_ids_left)?;
        while self.config.node_dir(id).exists() {
            id = id.next().ok_or_else(no_ids_left)?;
        }
        let dir = self.config.node_dir(id);
        let record = NodeRecord {
            id,
            addr: String::new(),
            data_dir: dir.display().to_string(),
            spawned: true,
            pid: None,
            removed: false,
            leaving: false,
            owes_reconciliation: false,
        };
        self.members.add(record.clone());
        self.meta
            .save_node(record)
            .await
            .map_err(|e| WireError::Unavailable(format!("cannot record the node: {e}")))?;
        Ok((id, dir))
    }

    /// Decommission `id`: copy its keys away, then stop it. Returns once it is removed.
    ///
    /// While reads wait for `id`'s reconciliation after an unclean stop (under `--meta-fsync
    /// never`), it is refused unless `accept_loss`: removing the node lets reads go on
    /// without the writes only it may hold. That is the way out when the nodes the reads
    /// wait for are gone for good.
    pub async fn remove_node(self: &Arc<Self>, id: NodeId, accept_loss: bool) -> Reply {
        let state = self
            .members
            .state(id)
            .ok_or_else(|| WireError::NotFound(format!("node {id}")))?;
        if state == NodeState::Removed {
            // Asked again, perhaps after the removal's record failed to save.
            self.record_removed(id).await?;
            return Ok(Response::Done);
        }
        let mut reads_wait_for_it = self.reads_wait_for(id);
        if reads_wait_for_it && accept_loss && self.readable(id) {
            // It is running after all: learn back what it holds rather than give it up.
            self.reconcile_node(id).await;
            reads_wait_for_it = self.reads_wait_for(id);
        }
        if reads_wait_for_it && !accept_loss {
            // Removing it would let reads go on without the writes only it may hold.
            return Err(WireError::Unavailable(format!(
                "node {id} may hold acknowledged writes the metadata has not learnt back since \
                 an unclean stop, and reads wait for it: start it again so it can be \
                 reconciled, or, if it is gone for good, remove it with --accept-loss (writes \
                 only it held are then lost)"
            )));
        }
        if reads_wait_for_it {
            warn!(
                node = %id,
                "removing a node the reads wait for, as asked (--accept-loss): acknowledged \
                 writes only it held since the unclean stop are lost, and a read of such a key \
                 finds the version before"
            );
        }
        let others_up = self
            .members
            .in_state(NodeState::Up)
            .into_iter()
            .filter(|n| *n != id)
            .count();
        if others_up < self.config.rf && state != NodeState::Leaving {
            return Err(WireError::Unavailable(format!(
                "removing node {id} would leave {others_up} node(s) up, fewer than the {} replicas each key needs",
                self.config.rf
            )));
        }
        if let Some(t) = self.members.set_state(id, NodeState::Leaving) {
            self.on_transition(t);
        }
        if let Some(record) = self.members.record(id) {
            // The node is already leaving in memory: the decommission has partly happened.
            self.meta.save_node(record).await.map_err(|e| {
                WireError::Indeterminate(format!("cannot record the decommission: {e}"))
            })?;
        }
        // A write that chose this node before it left the ring may still be between its
        // stores and its metadata change, which the scans below would not see yet: wait
        // for every version handed out so far to be settled (its write took its version
        // before choosing its targets).
        // A copy under way may likewise have chosen it as a target, and records it only
        // when done; one started from now on cannot.
        let barrier = self.meta.next_unassigned();
        let copies = self.repairs.taken_so_far();
        while self.meta.settled_floor().0.saturating_add(1) < barrier.0
            || !self.repairs.done_before(copies)
        {
            if self.shutdown.is_cancelled() {
                return Err(WireError::Indeterminate(
                    "coordinator is shutting down; the decommission is under way".into(),
                ));
            }
            tokio::time::sleep(WRITE_BARRIER_POLL).await;
        }
        self.queue_node_keys(id, JobKind::Migrate).await;
        loop {
            let this = self.clone();
            let (live, stranded) = tokio::task::spawn_blocking(move || {
                let mut remaining = this.meta.keys_on_node(id);
                remaining.retain(|k| this.meta.get(k).is_some_and(|m| !m.tombstone));
                let stranded = if this.readable(id) {
                    Vec::new()
                } else {
                    this.stranded(id, &remaining)
                };
                (remaining, stranded)
            })
            .await
            .map_err(|e| WireError::Internal(e.to_string()))?;
            if live.is_empty() {
                break;
            }
            if let Some(first) = stranded.first() {
                if !accept_loss {
                    // No copy can be made until a node holding them answers again.
                    return Err(WireError::Unavailable(format!(
                        "node {id} is not answering, and {} of its keys (first {}) have no \
                         other replica that is up: bring back node {id} or another replica \
                         of them and run node remove again, or give them up with \
                         --accept-loss (node {id} stays leaving meanwhile)",
                        stranded.len(),
                        shown_key(first)
                    )));
                }
                // Given up, as asked: unlisted from this node, they are left with the
                // replicas that are down, if any (`check` counts a key with none as lost).
                warn!(
                    node = %id,
                    keys = stranded.len(),
                    first = %shown_key(first),
                    "giving up keys no other replica that is up holds (--accept-loss)"
                );
                let updates = stranded
                    .into_iter()
                    .map(|key| (key, KeyUpdate::RemoveReplica { node: id }))
                    .collect();
                self.meta.update(updates).await.map_err(|e| {
                    WireError::Indeterminate(format!("cannot unlist the keys given up: {e}"))
                })?;
                continue;
            }
            if self.repairs.is_empty() {
                for key in live {
                    self.repairs.push_kind(key, JobKind::Migrate, false);
                }
            }
            if self.shutdown.is_cancelled() {
                return Err(WireError::Indeterminate(
                    "coordinator is shutting down; the decommission is under way".into(),
                ));
            }
            tokio::time::sleep(DECOMMISSION_POLL).await;
        }
        // Nothing depends on it any more: stop it and mark it removed.
        if let Some(record) = self.members.record(id) {
            if let Some(pid) = record.pid {
                if record.spawned {
                    let _ = Supervisor::signal(pid, Signal::SIGCONT);
                    let _ = Supervisor::signal(pid, Signal::SIGTERM);
                }
            }
        }
        self.members.set_state(id, NodeState::Removed);
        self.record_removed(id).await?;
        info!(node = %id, "node decommissioned");
        Ok(Response::Done)
    }

    /// `id` is marked removed: the reads no longer wait for it (a removed node owes nothing),
    /// and its record is saved.
    async fn record_removed(&self, id: NodeId) -> Result<(), WireError> {
        self.refresh_read_gate();
        if let Some(record) = self.members.record(id) {
            self.meta
                .save_node(record)
                .await
                .map_err(|e| WireError::Indeterminate(format!("cannot record removal: {e}")))?;
        }
        Ok(())
    }

    /// Whether reads wait for `id`'s reconciliation after an unclean stop (under
    /// `--meta-fsync never`).
    pub fn reads_wait_for(&self, id: NodeId) -> bool {
        self.reads.is_closed()
            && self
                .members
                .record(id)
                .is_some_and(|r| r.owes_reconciliation)
    }

    /// The keys of `keys` (listed on the leaving node `id`, which is not answering) that no
    /// other replica can be copied from now or soon: each other replica is down, removed or
    /// leaving and silent. A suspect one may answer again in a moment.
    fn stranded(&self, id: NodeId, keys: &[bytes::Bytes]) -> Vec<bytes::Bytes> {
        let may_serve = |node: NodeId| {
            node != id
                && (self.readable(node) || self.members.state(node) == Some(NodeState::Suspect))
        };
        keys.iter()
            .filter(|k| {
                self.meta
                    .get(k)
                    .is_some_and(|m| !m.replicas.iter().any(|n| may_serve(*n)))
            })
            .cloned()
            .collect()
    }

    /// Failure injection on a spawned node.
    pub fn signal_node(self: &Arc<Self>, id: NodeId, signal: NodeSignal) -> Reply {
        let record = self
            .members
            .record(id)
            .ok_or_else(|| WireError::NotFound(format!("node {id}")))?;
        if record.removed {
            return Err(WireError::BadRequest(format!(
                "node {id} was decommissioned"
            )));
        }
        let pid = record
            .pid
            .ok_or_else(|| WireError::Unavailable(format!("node {id} has no known process")))?;
        if !Supervisor::is_node_process(pid) {
            return Err(WireError::Unavailable(format!(
                "node {id} (pid {pid}) is not running"
            )));
        }
        let sig = match signal {
            NodeSignal::Kill => Signal::SIGKILL,
            NodeSignal::Pause => Signal::SIGSTOP,
            NodeSignal::Resume => Signal::SIGCONT,
        };
        Supervisor::signal(pid, sig)
            .map_err(|e| WireError::Internal(format!("signal to pid {pid} failed: {e}")))?;
        info!(node = %id, pid, ?signal, "signal sent");
        Ok(Response::Done)
    }

    /// A spawned child exited: it is down at once.
    pub fn on_child_exit(self: &Arc<Self>, id: NodeId) {
        self.supervisor.reap(id);
        if self.supervisor.is_stopping() {
            return;
        }
        if matches!(
            self.members.state(id),
            Some(NodeState::Up | NodeState::Suspect)
        ) {
            if let Some(t) = self.members.set_state(id, NodeState::Down) {
                self.on_transition(t);
            }
        }
    }

    /// Start every spawned node that is not running (re-adopting those that are), and spawn
    /// new ones until there are at least `config.nodes`.
    pub async fn start_nodes(self: &Arc<Self>) -> anyhow::Result<Vec<NodeId>> {
        let mut expected = Vec::new();
        for record in self.members.records() {
            if record.removed || !record.spawned {
                continue;
            }
            let running = record.pid.is_some_and(Supervisor::is_node_process);
            if running {
                info!(node = %record.id, pid = ?record.pid, "re-adopting running node");
            } else {
                self.supervisor
                    .spawn(record.id, std::path::Path::new(&record.data_dir))?;
            }
            expected.push(record.id);
        }
        while expected.len() < self.config.nodes {
            let (id, dir) = self.new_spawned_node().await?;
            self.supervisor.spawn(id, &dir)?;
            expected.push(id);
        }
        Ok(expected)
    }
}

/// Every id in `1..=NodeId::MAX` is taken (only a registry that peers filled on purpose).
fn no_ids_left() -> WireError {
    WireError::Unavailable(format!(
        "no node ids left: every id up to {} is taken",
        NodeId::MAX
    ))
}

/// The registry record of a node that joined by itself (not spawned by the coordinator).
fn joined_record(id: NodeId, addr: &str, data_dir: &str, pid: u32) -> NodeRecord {
    NodeRecord {
        id,
        addr: addr.to_string(),
        data_dir: data_dir.to_string(),
        spawned: false,
        pid: Some(pid),
        removed: false,
        leaving: false,
        owes_reconciliation: false,
    }
}

/// Run the failure detector until shutdown.
pub async fn run_detector(coord: Arc<Coordinator>) {
    let mut ticker = tokio::time::interval(DETECTOR_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = coord.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for t in coord.members.tick(&coord.config.detector, Instant::now()) {
            if t.to == NodeState::Down {
                warn!(node = %t.node, "node missed its heartbeats; declared down");
            }
            coord.on_transition(t);
        }
    }
}

/// A key as an error message shows it: at most 64 bytes, lossily as text.
fn shown_key(key: &[u8]) -> String {
    const SHOWN: usize = 64;
    let shown = String::from_utf8_lossy(key.get(..SHOWN).unwrap_or(key)).into_owned();
    if key.len() > SHOWN {
        format!("{shown}...")
    } else {
        shown
    }
}

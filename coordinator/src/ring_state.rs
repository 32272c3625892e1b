//! Cluster membership: every node's record, state, stats and connection, plus the ring.
//!
//! The ring holds every node that is not removed; placement filters it down to `up` nodes, so
//! a suspect or down node keeps its ring position and gets its keys back when it returns.
//! All locks here are short and never held across an `.await`.

use ringkv_common::sync::RwLockExt;
use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use ringkv_common::client::{Batching, CallError, Client, PendingCall};
use ringkv_common::protocol::{NodeInfo, Request, Response, Role};
use ringkv_common::ring::Ring;
use ringkv_common::{NodeId, NodeState, NodeStats};

use crate::failure_detector::DetectorConfig;
use crate::metadata::NodeRecord;

/// Extra time nodes get to re-register after a coordinator start before they are judged.
const STARTUP_GRACE: Duration = Duration::from_secs(2);

/// One node as the coordinator tracks it.
pub struct NodeEntry {
    pub record: NodeRecord,
    pub state: NodeState,
    pub stats: NodeStats,
    /// When it was last heard from (registration counts). Set at start-up as a grace period.
    pub last_seen: Instant,
    /// Whether it has registered since this coordinator started.
    pub registered: bool,
    client: Option<Client>,
}

/// A state change, for whoever reacts to them (re-replication, logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub node: NodeId,
    pub from: NodeState,
    pub to: NodeState,
}

struct Inner {
    nodes: BTreeMap<NodeId, NodeEntry>,
    ring: Ring,
}

/// The membership table.
pub struct Membership {
    inner: RwLock<Inner>,
    /// How the connections to nodes carry requests.
    batching: Batching,
    /// The largest frame on a connection to a node.
    max_frame_len: usize,
    /// Presented to the nodes ([`ringkv_common::cluster_token`]).
    cluster_token: String,
}

impl Membership {
    /// Membership from the persisted registry. Nodes start `suspect` until they register,
    /// with the start-up time as their last sighting, so a coordinator restart does not
    /// declare running nodes down before they had a chance to re-register.
    pub fn new(
        records: Vec<NodeRecord>,
        vnodes: u32,
        batching: Batching,
        max_frame_len: usize,
        cluster_token: String,
    ) -> Membership {
        // Nodes retry every half second at most; give them a few tries before the failure
        // detector starts counting.
        let now = Instant::now() + STARTUP_GRACE;
        let mut ring = Ring::new(vnodes);
        let mut nodes = BTreeMap::new();
        for record in records {
            let state = if record.removed {
                NodeState::Removed
            } else if record.leaving {
                ring.add(record.id);
                NodeState::Leaving
            } else {
                ring.add(record.id);
                NodeState::Suspect
            };
            nodes.insert(
                record.id,
                NodeEntry {
                    record,
                    state,
                    stats: NodeStats::default(),
                    last_seen: now,
                    registered: false,
                    client: None,
                },
            );
        }
        Membership {
            inner: RwLock::new(Inner { nodes, ring }),
            batching,
            max_frame_len,
            cluster_token,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read_unpoisoned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write_unpoisoned()
    }

    /// The id the next new node gets: one above the highest in `1..=NodeId::MAX` (ids beyond
    /// it, which registration refuses, are passed over), or `None` when none is left.
    pub fn next_id(&self) -> Option<NodeId> {
        let highest = self
            .read()
            .nodes
            .keys()
            .rev()
            .find(|n| **n <= NodeId::MAX)
            .copied();
        highest.unwrap_or(NodeId(0)).next()
    }

    /// Add a node that is about to be spawned or that joined, in state `suspect` until it
    /// registers.
    pub fn add(&self, record: NodeRecord) {
        let mut inner = self.write();
        inner.ring.add(record.id);
        inner.nodes.insert(
            record.id,
            NodeEntry {
                record,
                state: NodeState::Suspect,
                stats: NodeStats::default(),
                last_seen: Instant::now(),
                registered: false,
                client: None,
            },
        );
    }

    /// A node registered: record its address and pid, mark it up. Returns the updated record
    /// (to persist) and the transition, if any.
    pub fn register(
        &self,
        id: NodeId,
        addr: String,
        pid: u32,
    ) -> Option<(NodeRecord, Option<Transition>)> {
        let mut inner = self.write();
        let entry = inner.nodes.get_mut(&id)?;
        if entry.record.addr != addr {
            entry.client = None;
        }
        entry.record.addr = addr;
        entry.record.pid = Some(pid);
        entry.last_seen = Instant::now();
        entry.registered = true;
        let from = entry.state;
        let transition = match from {
            NodeState::Suspect | NodeState::Down => {
                entry.state = NodeState::Up;
                Some(Transition {
                    node: id,
                    from,
                    to: NodeState::Up,
                })
            }
            _ => None,
        };
        Some((entry.record.clone(), transition))
    }

    /// A heartbeat arrived. Returns `None` for an unknown node, else the transition if any.
    pub fn heartbeat(&self, id: NodeId, stats: NodeStats) -> Option<Option<Transition>> {
        let mut inner = self.write();
        let entry = inner.nodes.get_mut(&id)?;
        entry.stats = stats;
        entry.last_seen = Instant::now();
        if !entry.registered {
            // Heartbeats from a node that has not registered with this coordinator (it
            // restarted) only count once the node registers again.
            return Some(None);
        }
        let from = entry.state;
        if matches!(from, NodeState::Suspect | NodeState::Down) {
            entry.state = NodeState::Up;
            return Some(Some(Transition {
                node: id,
                from,
                to: NodeState::Up,
            }));
        }
        Some(None)
    }

    /// Apply the failure detector at `now`.
    pub fn tick(&self, detector: &DetectorConfig, now: Instant) -> Vec<Transition> {
        let mut inner = self.write();
        let mut out = Vec::new();
        for (id, entry) in inner.nodes.iter_mut() {
            let to = detector.judge(entry.state, entry.last_seen, now);
            if to != entry.state {
                out.push(Transition {
                    node: *id,
                    from: entry.state,
                    to,
                });
                entry.state = to;
                if to == NodeState::Down {
                    entry.client = None;
                }
            }
        }
        out
    }

    /// Force a node's state (child exited, decommission steps). Returns the transition.
    pub fn set_state(&self, id: NodeId, to: NodeState) -> Option<Transition> {
        let mut inner = self.write();
        let entry = inner.nodes.get_mut(&id)?;
        let from = entry.state;
        if from == to {
            return None;
        }
        entry.state = to;
        if matches!(to, NodeState::Down | NodeState::Removed) {
            entry.client = None;
            entry.registered = false;
        }
        entry.record.leaving = to == NodeState::Leaving;
        if to == NodeState::Removed {
            entry.record.removed = true;
            inner.ring.remove(id);
        }
        Some(Transition { node: id, from, to })
    }

    /// Note whether `id` owes a reconciliation; returns the record to persist if that changed.
    pub fn set_owes_reconciliation(&self, id: NodeId, owes: bool) -> Option<NodeRecord> {
        let mut inner = self.write();
        let entry = inner.nodes.get_mut(&id)?;
        if entry.record.owes_reconciliation == owes {
            return None;
        }
        entry.record.owes_reconciliation = owes;
        Some(entry.record.clone())
    }

    /// The state of `id`.
    pub fn state(&self, id: NodeId) -> Option<NodeState> {
        self.read().nodes.get(&id).map(|e| e.state)
    }

    /// The registry record of `id`.
    pub fn record(&self, id: NodeId) -> Option<NodeRecord> {
        self.read().nodes.get(&id).map(|e| e.record.clone())
    }

    /// Every node's registry record.
    pub fn records(&self) -> Vec<NodeRecord> {
        self.read()
            .nodes
            .values()
            .map(|e| e.record.clone())
            .collect()
    }

    /// Ids of nodes in `state`.
    pub fn in_state(&self, state: NodeState) -> Vec<NodeId> {
        self.read()
            .nodes
            .iter()
            .filter(|(_, e)| e.state == state)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `id` has registered with this coordinator since it started.
    pub fn is_registered(&self, id: NodeId) -> bool {
        self.read().nodes.get(&id).is_some_and(|e| e.registered)
    }

    /// The cluster token this coordinator's nodes present, and which it presents to them.
    pub fn cluster_token(&self) -> &str {
        &self.cluster_token
    }

    /// Whether `id` was heard from (a heartbeat or a registration) within `window`: a
    /// leaving node keeps its state whether it runs or not, so this tells which.
    pub fn heard_from_within(&self, id: NodeId, window: Duration) -> bool {
        self.read()
            .nodes
            .get(&id)
            .is_some_and(|e| Instant::now().saturating_duration_since(e.last_seen) < window)
    }

    /// Whether `id` is up.
    pub fn is_up(&self, id: NodeId) -> bool {
        self.state(id) == Some(NodeState::Up)
    }

    /// Number of up nodes.
    pub fn up_count(&self) -> usize {
        self.read()
            .nodes
            .values()
            .filter(|e| e.state == NodeState::Up)
            .count()
    }

    /// Reorder `nodes` so that the up ones come first (in their order), and return how many
    /// are up. One lock for all of them.
    pub fn up_first(&self, nodes: &mut [NodeId]) -> usize {
        let inner = self.read();
        let is_up = |id: &NodeId| {
            inner
                .nodes
                .get(id)
                .is_some_and(|e| e.state == NodeState::Up)
        };
        // Stable: false (up) sorts before true (not up).
        nodes.sort_by_key(|id| !is_up(id));
        nodes.iter().take_while(|id| is_up(id)).count()
    }

    /// The first `n` up nodes clockwise from `key`.
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        let inner = self.read();
        inner.ring.preference_list(key, n, |id| {
            inner
                .nodes
                .get(&id)
                .is_some_and(|e| e.state == NodeState::Up)
        })
    }

    /// Every node as `status` shows it.
    pub fn snapshot(&self) -> Vec<NodeInfo> {
        let now = Instant::now();
        self.read()
            .nodes
            .values()
            .map(|e| NodeInfo {
                id: e.record.id,
                addr: e.record.addr.clone(),
                state: e.state,
                pid: e.record.pid,
                spawned: e.record.spawned,
                stats: e.stats,
                last_heartbeat_ms: e
                    .registered
                    .then(|| now.saturating_duration_since(e.last_seen).as_millis() as u64),
            })
            .collect()
    }

    /// A connection to `id`, made on first use and remade after it drops.
    pub async fn client(&self, id: NodeId) -> Result<Client, CallError> {
        let addr = {
            let inner = self.read();
            let Some(entry) = inner.nodes.get(&id) else {
                return Err(CallError::Connect {
                    addr: format!("node {id}"),
                    reason: "unknown node".into(),
                });
            };
            if let Some(c) = &entry.client {
                if !c.is_closed() {
                    return Ok(c.clone());
                }
            }
            entry.record.addr.clone()
        };
        let client = Client::connect_as(
            &addr,
            Role::Coordinator,
            Some(&self.cluster_token),
            self.max_frame_len,
            self.batching,
        )
        .await?;
        let mut inner = self.write();
        if let Some(entry) = inner.nodes.get_mut(&id) {
            if entry.record.addr == addr {
                entry.client = Some(client.clone());
            }
        }
        Ok(client)
    }

    /// The open connection to `id`, if there is one.
    fn open_client(&self, id: NodeId) -> Option<Client> {
        let inner = self.read();
        let client = inner.nodes.get(&id)?.client.as_ref()?;
        (!client.is_closed()).then(|| client.clone())
    }

    /// Queue `req` on the open connection to node `id` now, to be awaited later (within
    /// `timeout`); `Err(req)` when no connection is open, for the caller to [`call`] instead.
    ///
    /// [`call`]: Membership::call
    pub fn start_call(
        &self,
        id: NodeId,
        req: Request,
        timeout: Duration,
    ) -> Result<Result<PendingCall, CallError>, Request> {
        match self.open_client(id) {
            Some(client) => Ok(client.start_call(req, timeout)),
            None => Err(req),
        }
    }

    /// Send `req` to node `id` and wait at most `timeout`.
    pub async fn call(
        &self,
        id: NodeId,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let client = match self.open_client(id) {
            Some(client) => client,
            // Connecting is rare: boxed, so every call's future stays small.
            None => Box::pin(tokio::time::timeout(timeout, self.client(id)))
                .await
                .map_err(|_| CallError::Connect {
                    addr: format!("node {id}"),
                    reason: "connect timed out".into(),
                })??,
        };
        client.call_timeout(req, timeout).await
    }
}

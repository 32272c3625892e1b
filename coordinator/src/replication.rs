//! The data path: quorum writes, version-checked reads, and copying a key between replicas.
//!
//! Writes to one key are serialised by its lock ([`crate::key_locks`]), held from version
//! assignment until the metadata commit, so versions of a key are committed in order. A
//! write is acknowledged only after `W` replicas stored it and the metadata naming those
//! replicas is durable; replicas that answer later are added to the metadata in the
//! background, and those that never do are left to the repair loop.
//!
//! Reads go to a replica the metadata lists and accept only the version the metadata names:
//! a replica with an older copy is skipped (and queued for repair), so a stale or deleted
//! value is never served. The reads a connection sent together try their replicas in one
//! order of the nodes, drawn afresh for every burst ([`ringkv_common::server::BURST`]), so
//! a burst reaches few nodes and comes back in few node messages.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use ringkv_common::client::{CallError, PendingCall};
use ringkv_common::protocol::{Location, ReplicaInfo, Reply, Request, Response, WriteTimings};
use ringkv_common::{NodeId, Version, WireError};
use smallvec::SmallVec;
use tracing::debug;

use crate::metadata::{KeyMeta, KeyUpdate, Replicas, VersionTicket};
use crate::state::Coordinator;
pub use ringkv_common::protocol::check_sizes;

/// How long a read waits for one replica before trying the next.
const READ_HEDGE_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// The rank of `node` among the replicas a read of `burst` may use: each burst ranks the
/// nodes in its own pseudo-random order, so bursts spread evenly over the nodes.
fn rank_in_burst(burst: u64, node: NodeId) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::with_seed(burst).hash_one(node.0)
}

/// Time acknowledged writes spent in each stage, summed since start (for `status`). Each
/// counter is read on its own, so a reading taken as a write is recorded may count it
/// before its times are added; the difference of two readings apart is exact enough.
#[derive(Default)]
pub struct WriteClock {
    count: AtomicU64,
    lock_wait_us: AtomicU64,
    quorum_wait_us: AtomicU64,
    commit_wait_us: AtomicU64,
}

impl WriteClock {
    fn record(&self, lock_wait: Duration, quorum_wait: Duration, commit_wait: Duration) {
        let add = |total: &AtomicU64, d: Duration| {
            total.fetch_add(
                u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        };
        self.count.fetch_add(1, Ordering::Relaxed);
        add(&self.lock_wait_us, lock_wait);
        add(&self.quorum_wait_us, quorum_wait);
        add(&self.commit_wait_us, commit_wait);
    }

    /// The sums so far.
    pub fn read(&self) -> WriteTimings {
        WriteTimings {
            count: self.count.load(Ordering::Relaxed),
            lock_wait_us: self.lock_wait_us.load(Ordering::Relaxed),
            quorum_wait_us: self.quorum_wait_us.load(Ordering::Relaxed),
            commit_wait_us: self.commit_wait_us.load(Ordering::Relaxed),
        }
    }
}

/// How one replica answered a store.
enum StoreOutcome {
    Stored,
    Failed { may_have_applied: bool },
}

/// What a replica's answer to a store of `version` means for the write.
fn store_outcome(
    node: NodeId,
    answer: Result<Response, CallError>,
    version: Version,
) -> StoreOutcome {
    match answer {
        Ok(Response::Stored { version: held, .. }) if held == version => StoreOutcome::Stored,
        Ok(other) => {
            debug!(%node, ?other, "unexpected answer to store");
            StoreOutcome::Failed {
                may_have_applied: false,
            }
        }
        Err(e) => StoreOutcome::Failed {
            may_have_applied: e.may_have_applied(),
        },
    }
}

/// A call to a node, awaited in place: queued at once on an open connection, or (rarely)
/// a boxed future that connects first.
enum NodeCall {
    Queued(PendingCall),
    Later(Pin<Box<dyn Future<Output = Result<Response, CallError>> + Send>>),
}

impl Future for NodeCall {
    type Output = Result<Response, CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            NodeCall::Queued(call) => Pin::new(call).poll(cx),
            NodeCall::Later(call) => call.as_mut().poll(cx),
        }
    }
}

/// The stores of one write still waiting for an answer, by replica.
type StoreCalls = SmallVec<[(NodeId, NodeCall); 3]>;

/// Wait for the first of `calls` to answer and take it out; `None` once none is left.
async fn next_answer(calls: &mut StoreCalls) -> Option<(NodeId, Result<Response, CallError>)> {
    std::future::poll_fn(|cx| {
        if calls.is_empty() {
            return Poll::Ready(None);
        }
        let done =
            calls
                .iter_mut()
                .enumerate()
                .find_map(|(i, (_, call))| match Pin::new(call).poll(cx) {
                    Poll::Ready(answer) => Some((i, answer)),
                    Poll::Pending => None,
                });
        match done {
            Some((i, answer)) => {
                let (node, _) = calls.swap_remove(i);
                Poll::Ready(Some((node, answer)))
            }
            None => Poll::Pending,
        }
    })
    .await
}

impl Coordinator {
    /// Put (`Some`) or delete (`None`) `key`.
    pub async fn write(self: &Arc<Self>, key: Bytes, value: Option<Bytes>) -> Reply {
        check_sizes(&key, value.as_ref())?;
        let rf = self.config.rf;
        let quorum = self.config.write_quorum;
        let started = Instant::now();
        let _guard = self.locks.lock(&key).await;
        let locked = Instant::now();
        // In flight until this function returns: no version floor covers it before its
        // metadata change is committed (or the write gave up). Taken before the targets are
        // chosen, so that a decommission that waits for every version handed out before its
        // node left the ring also waits for every write that chose that node.
        let ticket = self
            .meta
            .next_version()
            .await
            .map_err(|e| WireError::Unavailable(format!("cannot assign a version: {e}")))?;
        let version = ticket.version();
        let targets = self.members.preference_list(&key, rf);
        if targets.len() < quorum {
            return Err(WireError::Unavailable(format!(
                "only {} node(s) up; a write needs {quorum}",
                targets.len()
            )));
        }
        let tombstone = value.is_none();

        // Each store is queued on its replica's connection right here; the three answers
        // are awaited in place, without a future or a task of their own.
        let mut calls: StoreCalls = targets
            .iter()
            .map(|&node| {
                let req = Request::Store {
                    key: key.clone(),
                    version,
                    value: value.clone(),
                };
                (node, self.node_call(node, req))
            })
            .collect();

        let stores_queued = Instant::now();
        let mut acked = Replicas::new();
        let mut maybe_applied = false;
        let quorum = effective_quorum(quorum);
        while acked.len() < quorum {
            match next_answer(&mut calls).await {
                Some((node, answer)) => match store_outcome(node, answer, version) {
                    StoreOutcome::Stored => acked.push(node),
                    StoreOutcome::Failed { may_have_applied } => maybe_applied |= may_have_applied,
                },
                None => break,
            }
        }

        let answered = Instant::now();
        // Replicas that answered together with the quorum go into the same metadata commit.
        tokio::task::yield_now().await;
        let mut late_failure = false;
        calls.retain(|(node, call)| match call.now_or_never() {
            Some(answer) => {
                match store_outcome(*node, answer, version) {
                    StoreOutcome::Stored => acked.push(*node),
                    StoreOutcome::Failed { .. } => late_failure = true,
                }
                false
            }
            None => true,
        });

        if acked.is_empty() {
            return Err(if maybe_applied {
                WireError::Indeterminate(format!(
                    "no replica confirmed version {version}; it may have been stored"
                ))
            } else {
                WireError::Unavailable("no replica could be reached".into())
            });
        }

        // Whatever reached a replica is recorded, so a later read or repair can never be
        // surprised by a version the metadata does not know.
        fail::fail_point!("coordinator-before-meta-commit", crash_point);
        let superseded: Vec<NodeId> = self
            .meta
            .get(&key)
            .map(|m| m.replicas)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !targets.contains(n))
            .collect();
        let acked_count = acked.len();
        let committing = Instant::now();
        let meta = KeyMeta {
            version,
            replicas: acked,
            tombstone,
        };
        self.meta
            .update_key(key.clone(), KeyUpdate::Set(meta))
            .await
            .map_err(|e| WireError::Indeterminate(format!("metadata commit failed: {e}")))?;
        let committed = Instant::now();
        fail::fail_point!("coordinator-after-meta-commit", crash_point);

        // Late replicas: record them when they answer; the repair loop covers the rest.
        // Usually every replica has answered by now and there is nothing left to do.
        if !calls.is_empty() || !superseded.is_empty() || late_failure {
            self.finish_write(key, ticket, calls, superseded, late_failure);
        }

        if acked_count < quorum {
            return Err(WireError::Indeterminate(format!(
                "version {version} reached {acked_count} of the {quorum} replicas a write needs"
            )));
        }
        self.write_clock.record(
            locked - started,
            answered - stores_queued,
            committed - committing,
        );
        Ok(Response::Written { version })
    }

    /// The background part of a write: forget the copies on former replicas, record replicas
    /// that answer after the metadata commit, and queue the key for repair if any failed.
    /// The write's version stays in flight until this is done: a late replica is a metadata
    /// change of the write too (a decommission waits for it, and no floor covers it before).
    fn finish_write(
        self: &Arc<Self>,
        late_key: Bytes,
        ticket: VersionTicket,
        mut calls: StoreCalls,
        superseded: Vec<NodeId>,
        late_failure: bool,
    ) {
        let this = self.clone();
        let version = ticket.version();
        self.background(async move {
            let _in_flight = ticket;
            // Copies of older versions on nodes that are no longer replicas of the key.
            for node in superseded {
                let _ = this
                    .forget_on(node, &late_key, Version(version.0 - 1))
                    .await;
            }
            let mut missing = late_failure;
            while let Some((node, answer)) = next_answer(&mut calls).await {
                match store_outcome(node, answer, version) {
                    StoreOutcome::Stored => {
                        let update = KeyUpdate::AddReplica { version, node };
                        if this
                            .meta
                            .update_key(late_key.clone(), update)
                            .await
                            .is_err()
                        {
                            missing = true;
                        }
                    }
                    StoreOutcome::Failed { .. } => missing = true,
                }
            }
            if missing {
                this.repairs.push(late_key);
            }
        });
    }

    /// Ask `node` to drop its copy of `key` if the copy is no newer than `version`.
    pub(crate) async fn forget_on(
        &self,
        node: NodeId,
        key: &Bytes,
        version: Version,
    ) -> Result<Response, CallError> {
        let req = Request::Forget {
            key: key.clone(),
            version,
        };
        self.members.call(node, req, self.config.node_timeout).await
    }

    /// Queue `req` on node `node` now if its connection is open (else connect first, boxed:
    /// that is rare), to be awaited later.
    fn node_call(self: &Arc<Self>, node: NodeId, req: Request) -> NodeCall {
        self.node_call_within(node, req, self.config.node_timeout)
    }

    /// As [`node_call`](Self::node_call), waiting at most `timeout` for the answer.
    fn node_call_within(
        self: &Arc<Self>,
        node: NodeId,
        req: Request,
        timeout: Duration,
    ) -> NodeCall {
        match self.members.start_call(node, req, timeout) {
            Ok(Ok(call)) => NodeCall::Queued(call),
            Ok(Err(e)) => NodeCall::Later(Box::pin(std::future::ready(Err(e)))),
            Err(req) => {
                let this = self.clone();
                NodeCall::Later(Box::pin(async move {
                    this.members.call(node, req, timeout).await
                }))
            }
        }
    }

    /// Read `key`: the value at the version the metadata names, from any replica holding it.
    pub async fn read(self: &Arc<Self>, key: Bytes) -> Reply {
        check_sizes(&key, None)?;
        if let Some(refused) = self.read_gate_error() {
            return Err(refused);
        }
        // If no replica holds the metadata's version, a write to the key is in flight (or one
        // reached replicas without being recorded): wait for the key's lock and look again.
        for pass in 0..3 {
            let Some(meta) = self.meta.get(&key) else {
                return Ok(Response::Value {
                    version: Version::ZERO,
                    value: None,
                });
            };
            if meta.tombstone {
                return Ok(Response::Value {
                    version: meta.version,
                    value: None,
                });
            }
            // Up replicas first (one membership lookup for all), in an order that spreads
            // the load: the burst's own order of the nodes, so that a pipelining client's
            // burst reaches few nodes and its answers come back in few node messages; or,
            // outside a connection, a key-dependent rotation.
            let mut candidates = meta.replicas;
            let up = self.members.up_first(&mut candidates);
            if up > 1 {
                if let Some(head) = candidates.get_mut(..up) {
                    match ringkv_common::server::BURST.try_with(std::cell::Cell::get) {
                        Ok(burst) => head.sort_by_key(|node| rank_in_burst(burst, *node)),
                        Err(_) => {
                            let shift = (ringkv_common::ring::key_hash(&key) as usize) % up;
                            head.rotate_left(shift);
                        }
                    }
                }
            }
            let mut stale = false;
            let mut newer = false;
            let last = candidates.len().saturating_sub(1);
            for (i, &node) in candidates.iter().enumerate() {
                let req = Request::Fetch { key: key.clone() };
                // A fetch is a memory lookup: if it takes long, the node is paused or
                // overloaded, so move on to the next replica; only the last gets the full timeout.
                let timeout = if i < last {
                    self.config.node_timeout.min(READ_HEDGE_AFTER)
                } else {
                    self.config.node_timeout
                };
                match self.node_call_within(node, req, timeout).await {
                    Ok(Response::Fetched {
                        version,
                        value: Some(value),
                    }) if version == meta.version || bug_read_any_version() => {
                        if stale {
                            self.repairs.push(key.clone());
                        }
                        return Ok(Response::Value {
                            version,
                            value: Some(value),
                        });
                    }
                    Ok(Response::Fetched { version, .. }) if version < meta.version => {
                        stale = true;
                    }
                    Ok(Response::Fetched { version, .. }) if version > meta.version => {
                        newer = true;
                    }
                    _ => {}
                }
            }
            if stale {
                self.repairs.push(key.clone());
            }
            let changed = self.meta.get(&key).map(|m| m.version) != Some(meta.version);
            if !changed && !newer {
                return Err(WireError::Unavailable(format!(
                    "no reachable replica holds version {} of this key",
                    meta.version
                )));
            }
            // Rare, and boxed so that every read's future stays small.
            Box::pin(self.settle(&key, newer && pass > 0)).await;
        }
        Err(WireError::Unavailable(
            "the key changed while it was being read; try again".into(),
        ))
    }

    /// Before a read looks again: let an in-flight write to `key` finish its metadata commit
    /// (wait for the key's lock), and if `adopt`, record the newer version a replica holds.
    async fn settle(self: &Arc<Self>, key: &Bytes, adopt: bool) {
        let guard = self.locks.lock(key).await;
        if adopt {
            // The lock was free and a replica still holds a version the metadata does not
            // know: it reached that replica (a write whose outcome was unknown). Record it,
            // as reconciliation would, so reads can make progress.
            self.adopt_newer(key).await;
        }
        drop(guard);
    }

    /// Under the key lock: if listed replicas hold a version newer than the metadata's,
    /// record the newest one with the replicas that hold it.
    async fn adopt_newer(self: &Arc<Self>, key: &Bytes) {
        let Some(meta) = self.meta.get(key) else {
            return;
        };
        let asks = meta.replicas.iter().map(|&node| async move {
            let req = Request::Fetch { key: key.clone() };
            match self.members.call(node, req, self.config.node_timeout).await {
                Ok(Response::Fetched { version, value }) => Some((node, version, value.is_none())),
                _ => None,
            }
        });
        // A version above the highest was never handed out: no write to adopt.
        let held: Vec<_> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .filter(|(_, v, _)| *v <= Version::MAX)
            .collect();
        let Some(&(_, newest, tombstone)) = held.iter().max_by_key(|(_, v, _)| *v) else {
            return;
        };
        if newest <= meta.version {
            return;
        }
        // Versions handed out from now on are above it, as after a reconciliation.
        self.meta.observe_version(newest);
        let replicas = held
            .iter()
            .filter(|(_, v, _)| *v == newest)
            .map(|(n, _, _)| *n)
            .collect();
        let update = KeyUpdate::Set(KeyMeta {
            version: newest,
            replicas,
            tombstone,
        });
        if self.meta.update(vec![(key.clone(), update)]).await.is_ok() {
            tracing::info!(key = %String::from_utf8_lossy(key), version = %newest, "adopted an unrecorded version");
            self.repairs.push(key.clone());
        }
    }

    /// Which nodes hold `key` and at which version.
    pub async fn locate(self: &Arc<Self>, key: Bytes) -> Reply {
        check_sizes(&key, None)?;
        let meta = self.meta.get(&key);
        let (version, tombstone, nodes) = match &meta {
            Some(m) => (m.version, m.tombstone, m.replicas.clone()),
            None => (Version::ZERO, false, Replicas::new()),
        };
        let asks = nodes.iter().map(|&node| {
            let this = self.clone();
            let key = key.clone();
            async move {
                let held = match this
                    .members
                    .call(node, Request::Fetch { key }, this.config.node_timeout)
                    .await
                {
                    Ok(Response::Fetched { version, .. }) => Some(version),
                    _ => None,
                };
                let record = this.members.record(node);
                ReplicaInfo {
                    node,
                    addr: record.map(|r| r.addr).unwrap_or_default(),
                    state: this
                        .members
                        .state(node)
                        .unwrap_or(ringkv_common::NodeState::Removed),
                    version: held,
                }
            }
        });
        let replicas = futures::future::join_all(asks).await;
        Ok(Response::Located(Location {
            version,
            tombstone,
            replicas,
            reads_wait: self.reads.is_closed(),
        }))
    }

    /// Copy `key` at `meta`'s version to each of `targets`, reading the value once from a
    /// replica that holds that version. Returns each target's outcome (bytes copied); the
    /// caller records the new replicas in the metadata.
    pub async fn copy_key(
        self: &Arc<Self>,
        key: &Bytes,
        meta: &KeyMeta,
        targets: &[NodeId],
    ) -> Result<Vec<(NodeId, Result<u64, CopyError>)>, CopyError> {
        let value = if meta.tombstone {
            None
        } else {
            let mut found = None;
            for &node in &meta.replicas {
                if targets.contains(&node) || !self.readable(node) {
                    continue;
                }
                let req = Request::Fetch { key: key.clone() };
                if let Ok(Response::Fetched {
                    version,
                    value: Some(v),
                }) = self.members.call(node, req, self.config.node_timeout).await
                {
                    if version == meta.version {
                        found = Some(v);
                        break;
                    }
                }
            }
            Some(found.ok_or(CopyError::NoSource)?)
        };
        let bytes = key.len() as u64 + value.as_ref().map_or(0, |v| v.len() as u64);
        let stores = targets.iter().map(|&target| {
            let req = Request::Store {
                key: key.clone(),
                version: meta.version,
                value: value.clone(),
            };
            async move {
                let outcome = match self
                    .members
                    .call(target, req, self.config.node_timeout)
                    .await
                {
                    Ok(Response::Stored { version, .. }) if version == meta.version => Ok(bytes),
                    Ok(Response::Stored { version, .. }) => Err(CopyError::Target(format!(
                        "target holds version {version}, newer than {}",
                        meta.version
                    ))),
                    Ok(other) => Err(CopyError::Target(format!("unexpected answer {other:?}"))),
                    Err(e) => Err(CopyError::Call(e)),
                };
                (target, outcome)
            }
        });
        let results = futures::future::join_all(stores).await;
        // The copies are on the targets but the metadata does not list them yet.
        fail::fail_point!("migration-after-copy", |arg| {
            let _ = crash_point(arg);
            Err(CopyError::Target("failpoint".into()))
        });
        Ok(results)
    }
}

/// Why a copy did not happen.
#[derive(thiserror::Error, Debug)]
pub enum CopyError {
    #[error("the key no longer exists")]
    Gone,
    #[error("no live replica holds the current version")]
    NoSource,
    #[error("a replica is suspect; retry once its state settles")]
    Deferred,
    #[error("target refused: {0}")]
    Target(String),
    #[error(transparent)]
    Call(#[from] CallError),
}

/// The write quorum actually waited for. The failpoint `bug-ack-after-one-replica` is a
/// deliberately broken path (acknowledge after one replica) that the chaos checker must catch.
fn effective_quorum(quorum: usize) -> usize {
    fail::fail_point!("bug-ack-after-one-replica", |_| 1);
    quorum
}

/// Whether reads accept any version a replica holds. Only the failpoint `bug-read-any-version`
/// (a deliberately broken path for the chaos checker) makes this true: serving a stale replica.
fn bug_read_any_version() -> bool {
    fail::fail_point!("bug-read-any-version", |_| true);
    false
}

/// What an armed crash failpoint does: `abort` kills the process on the spot (no unwinding,
/// no flushing), as SIGKILL would; anything else is ignored.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn crash_point(arg: Option<String>) -> Reply {
    if arg.as_deref() == Some("abort") {
        std::process::abort();
    }
    Err(WireError::Internal("failpoint".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replica a read of `burst` tries first among `replicas`.
    fn first_choice(burst: u64, replicas: &[NodeId]) -> NodeId {
        let mut order = replicas.to_vec();
        order.sort_by_key(|node| rank_in_burst(burst, *node));
        order[0]
    }

    /// Every set of 3 replicas out of nodes 1..=5.
    fn replica_sets() -> Vec<[NodeId; 3]> {
        let mut sets = Vec::new();
        for a in 1..=5 {
            for b in a + 1..=5 {
                for c in b + 1..=5 {
                    sets.push([NodeId(a), NodeId(b), NodeId(c)]);
                }
            }
        }
        sets
    }

    #[test]
    fn a_burst_sends_its_reads_to_as_few_nodes_as_the_replica_sets_allow() {
        let sets = replica_sets();
        for burst in 0..1000u64 {
            let mut counts = std::collections::BTreeMap::new();
            for set in &sets {
                *counts.entry(first_choice(burst, set)).or_insert(0) += 1;
            }
            // The burst's favourite node is in 6 of the 10 sets, its second in 3 of the
            // other 4, its third in the last: reads of keys spread over every set reach
            // three nodes, not five.
            let mut spread: Vec<i32> = counts.values().copied().collect();
            spread.sort_unstable();
            assert_eq!(spread, vec![1, 3, 6], "burst {burst}: {counts:?}");
        }
    }

    #[test]
    fn bursts_spread_evenly_over_the_nodes() {
        let all: Vec<NodeId> = (1..=5).map(NodeId).collect();
        let mut favourite = [0u32; 5];
        let bursts = 10_000u64;
        for burst in 0..bursts {
            // As `serve` numbers them: one connection's passes, then another's.
            let burst = ((burst % 50) << 32) | (burst / 50);
            favourite[(first_choice(burst, &all).0 - 1) as usize] += 1;
        }
        for (i, &n) in favourite.iter().enumerate() {
            let share = f64::from(n) / bursts as f64;
            assert!((0.16..0.24).contains(&share), "node {}: {share}", i + 1);
        }
    }
}

//! Background convergence: every key towards `RF` replicas on its preference list.
//!
//! One mechanism covers re-replication (a node went down), migration (a node joined),
//! decommission (a node is leaving), write repair (a replica missed a write) and reconciling
//! a node that came back: each queues keys, and [`converge`](Coordinator::converge) moves one
//! key to its desired placement by copying first and dropping extra copies only once the
//! desired replicas all hold the current version. A key therefore never has fewer live copies
//! during a move than before it.
//!
//! Keys with one live copy are served before keys with two. Transfers run with bounded
//! concurrency and a bytes-per-second limit, and progress is reported per job kind.

use ringkv_common::sync::MutexExt;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_common::protocol::{JobProgress, Request, Response, ScanEntry};
use ringkv_common::{NodeId, NodeState, Version};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::metadata::{KeyMeta, KeyUpdate};
use crate::replication::CopyError;
use crate::state::Coordinator;
use crate::throttle::Throttle;

/// How often the whole key space is swept for keys off their desired placement; catches
/// anything an event-driven pass missed (a failed copy, a node that was down at the time).
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);

/// Entries per page when scanning a node during reconciliation.
const SCAN_PAGE: u32 = 5_000;

/// Why a key was queued; progress is reported per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    /// Restore `RF` copies after a node went down.
    Rereplicate,
    /// Move keys onto a node that joined or off one that is leaving.
    Migrate,
    /// Fix a key a write or read found short of replicas.
    Repair,
}

impl JobKind {
    fn name(self) -> &'static str {
        match self {
            JobKind::Rereplicate => "re-replication",
            JobKind::Migrate => "migration",
            JobKind::Repair => "repair",
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Counters {
    keys_done: u64,
    keys_total: u64,
    bytes_done: u64,
    started: Option<Instant>,
}

#[derive(Default)]
struct QueueState {
    /// Keys with one live copy (or fewer): most endangered first.
    urgent: VecDeque<(Bytes, JobKind)>,
    normal: VecDeque<(Bytes, JobKind)>,
    queued: HashSet<Bytes>,
    /// Keys taken off the queue and not yet done.
    in_flight: usize,
    /// Keys taken off the queue so far, which numbers each one taken.
    taken: u64,
    /// The numbers of the keys taken and not yet done.
    working: std::collections::BTreeSet<u64>,
    jobs: HashMap<JobKind, Counters>,
}

/// The queue of keys waiting to converge, with per-kind progress.
#[derive(Default)]
pub struct RepairQueue {
    state: Mutex<QueueState>,
    wake: Notify,
}

impl RepairQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock_unpoisoned()
    }

    /// Queue `key` for a repair pass.
    pub fn push(&self, key: Bytes) {
        self.push_kind(key, JobKind::Repair, false);
    }

    /// Queue `key` under `kind`; `urgent` keys jump ahead.
    pub fn push_kind(&self, key: Bytes, kind: JobKind, urgent: bool) {
        let mut st = self.lock();
        if !st.queued.insert(key.clone()) {
            return;
        }
        let c = st.jobs.entry(kind).or_default();
        c.keys_total += 1;
        c.started.get_or_insert_with(Instant::now);
        if urgent {
            st.urgent.push_back((key, kind));
        } else {
            st.normal.push_back((key, kind));
        }
        drop(st);
        self.wake.notify_one();
    }

    /// The next key to work on, its kind and its number (for [`RepairQueue::done`]).
    fn pop(&self) -> Option<(Bytes, JobKind, u64)> {
        let mut st = self.lock();
        let (key, kind) = st.urgent.pop_front().or_else(|| st.normal.pop_front())?;
        st.queued.remove(&key);
        st.in_flight += 1;
        let number = st.taken;
        st.taken += 1;
        st.working.insert(number);
        Some((key, kind, number))
    }

    fn done(&self, kind: JobKind, bytes: u64, number: u64) {
        let mut st = self.lock();
        st.working.remove(&number);
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(c) = st.jobs.get_mut(&kind) {
            c.keys_done += 1;
            c.bytes_done += bytes;
        }
        // All work is done: the jobs are over.
        if st.in_flight == 0 && st.urgent.is_empty() && st.normal.is_empty() {
            st.jobs.clear();
        }
    }

    /// Keys waiting.
    pub fn len(&self) -> usize {
        let st = self.lock();
        st.urgent.len() + st.normal.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many keys have been taken off the queue so far: with [`RepairQueue::done_before`],
    /// a barrier for the copies under way now.
    pub fn taken_so_far(&self) -> u64 {
        self.lock().taken
    }

    /// Whether every key among the first `taken` taken off the queue is done.
    pub fn done_before(&self, taken: u64) -> bool {
        self.lock().working.first().is_none_or(|&n| n >= taken)
    }

    /// Progress of the running jobs, for `status`.
    pub fn progress(&self) -> Vec<JobProgress> {
        let st = self.lock();
        let mut kinds: Vec<_> = st.jobs.iter().collect();
        kinds.sort_by_key(|(k, _)| **k);
        kinds
            .into_iter()
            .map(|(kind, c)| {
                let elapsed = c.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                let rate = if elapsed > 0.0 {
                    c.keys_done as f64 / elapsed
                } else {
                    0.0
                };
                let left = c.keys_total.saturating_sub(c.keys_done) as f64;
                // Bytes are known only as they are copied; estimate the total from the mean.
                let bytes_total = if c.keys_done > 0 {
                    (c.bytes_done as f64 / c.keys_done as f64 * c.keys_total as f64) as u64
                } else {
                    0
                };
                JobProgress {
                    kind: kind.name().to_string(),
                    keys_done: c.keys_done,
                    keys_total: c.keys_total,
                    bytes_done: c.bytes_done,
                    bytes_total: bytes_total.max(c.bytes_done),
                    eta_secs: (rate > 0.0).then(|| left / rate),
                }
            })
            .collect()
    }
}

/// What a node's reconciliation did to the metadata, key by key.
#[derive(Debug, Default)]
struct ReconcileStats {
    /// Versions the metadata lacked, recorded.
    adopted: u64,
    /// Current copies the metadata did not list, listed.
    relisted: u64,
    /// Stale copies (and deleted keys' below the floor), forgotten.
    dropped: u64,
    /// Keys the node did not answer for, or whose metadata update failed.
    skipped: u64,
}

impl Coordinator {
    /// Whether `node` can serve as a copy source: up, or leaving but still running (heard
    /// from within the failure detector's `down_after`; the detector leaves a leaving node's
    /// state alone, so a node that was down when its removal began, or died during it, stays
    /// leaving).
    pub(crate) fn readable(&self, node: NodeId) -> bool {
        match self.members.state(node) {
            Some(NodeState::Up) => true,
            Some(NodeState::Leaving) => self
                .members
                .heard_from_within(node, self.config.detector.down_after),
            _ => false,
        }
    }

    /// Replicas of `meta` that can serve as copy sources ([`Self::readable`]).
    pub fn live_replicas(&self, meta: &KeyMeta) -> usize {
        meta.replicas.iter().filter(|n| self.readable(**n)).count()
    }

    /// Whether `key` is placed as it should be: `RF` (or every up node, if fewer) replicas,
    /// all on its preference list.
    pub fn is_placed(&self, key: &[u8], meta: &KeyMeta) -> bool {
        if meta.tombstone {
            return true;
        }
        let desired = self.members.preference_list(key, self.config.rf);
        meta.replicas.len() == desired.len() && desired.iter().all(|n| meta.replicas.contains(n))
    }

    /// Queue every key that is not where it should be.
    pub fn sweep(&self, kind: JobKind) -> usize {
        let mut misplaced = Vec::new();
        self.meta.for_each(|key, meta| {
            if !self.is_placed(key, meta) {
                misplaced.push((Bytes::copy_from_slice(key), self.live_replicas(meta) <= 1));
            }
        });
        let n = misplaced.len();
        for (key, urgent) in misplaced {
            self.repairs.push_kind(key, kind, urgent);
        }
        n
    }

    /// [`Coordinator::sweep`] on a blocking thread: it walks every key, and the async workers
    /// (one on a small machine) keep serving requests meanwhile.
    pub async fn sweep_off_workers(self: &Arc<Self>, kind: JobKind) -> usize {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sweep(kind))
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "sweep failed");
                0
            })
    }

    /// Queue every key `node` held, most endangered first (after it went down).
    pub async fn queue_node_keys(self: &Arc<Self>, node: NodeId, kind: JobKind) {
        // Listing, scoring and sorting touch every key the node held: off the async workers.
        let this = self.clone();
        let queued = tokio::task::spawn_blocking(move || {
            let mut scored: Vec<(usize, Bytes)> = this
                .meta
                .keys_on_node(node)
                .into_iter()
                .filter_map(|k| {
                    let meta = this.meta.get(&k)?;
                    (!meta.tombstone).then(|| (this.live_replicas(&meta), k))
                })
                .collect();
            scored.sort_by_key(|(live, _)| *live);
            let n = scored.len();
            for (live, key) in scored {
                this.repairs.push_kind(key, kind, live <= 1);
            }
            n
        })
        .await;
        match queued {
            Ok(n) => info!(%node, keys = n, "queued the keys of a node"),
            Err(e) => warn!(%node, error = %e, "listing the node's keys failed"),
        }
    }

    /// Move one key to its desired placement. Returns bytes copied.
    pub async fn converge(self: &Arc<Self>, key: &Bytes) -> Result<u64, CopyError> {
        let _guard = self.locks.lock(key).await;
        let Some(meta) = self.meta.get(key) else {
            return Ok(0);
        };
        if meta.tombstone {
            return Ok(0);
        }
        // A suspect replica may be back in a moment; moving keys now would be churn.
        if meta
            .replicas
            .iter()
            .any(|n| self.members.state(*n) == Some(NodeState::Suspect))
        {
            return Err(CopyError::Deferred);
        }
        let desired = self.members.preference_list(key, self.config.rf);
        let missing: Vec<NodeId> = desired
            .iter()
            .copied()
            .filter(|n| !meta.replicas.contains(n))
            .collect();
        // Copy to every missing replica at once; the value is read once.
        let results = if missing.is_empty() {
            Vec::new()
        } else {
            self.copy_key(key, &meta, &missing).await?
        };
        let mut copied = 0;
        let mut failures = 0;
        let mut updates = Vec::new();
        let mut holders = meta.replicas.clone();
        for (node, result) in results {
            match result {
                Ok(bytes) => {
                    copied += bytes;
                    holders.push(node);
                    updates.push(KeyUpdate::AddReplica {
                        version: meta.version,
                        node,
                    });
                }
                Err(e) => {
                    debug!(%node, error = %e, "copy failed");
                    failures += 1;
                }
            }
        }
        let placed = desired.iter().filter(|n| holders.contains(n)).count();
        // Drop copies off the preference list only once every desired replica holds the key
        // and there are as many of them as the cluster can offer.
        if failures == 0
            && placed == desired.len()
            && placed >= self.config.rf.min(self.members.up_count())
        {
            let extras: Vec<NodeId> = holders
                .iter()
                .copied()
                .filter(|n| !desired.contains(n))
                .collect();
            let forgets = extras.iter().map(|&node| async move {
                if !self.readable(node) {
                    return Some(node); // Down or silent: unlist; reconciliation drops it if it returns.
                }
                match self.forget_on(node, key, meta.version).await {
                    Ok(_) => Some(node),
                    Err(e) => {
                        debug!(%node, error = %e, "forget failed; the copy stays listed");
                        None
                    }
                }
            });
            for node in futures::future::join_all(forgets)
                .await
                .into_iter()
                .flatten()
            {
                updates.push(KeyUpdate::RemoveReplica { node });
            }
        }
        if !updates.is_empty() {
            // One group-committed update for the whole move.
            self.meta
                .update(updates.into_iter().map(|u| (key.clone(), u)).collect())
                .await
                .map_err(|e| CopyError::Target(e.to_string()))?;
        }
        if failures > 0 {
            return Err(CopyError::NoSource);
        }
        Ok(copied)
    }

    /// Bring the metadata in line with what `node` reports holding: adopt versions newer
    /// than the metadata knows (they reached a replica before a crash), re-list current
    /// copies, and drop stale ones so they are never served or copied.
    /// Returns whether the node was reconciled to the end: scanned to the end, and every key
    /// it reported looked at (a node that did not answer for one is not).
    pub async fn reconcile_node(self: &Arc<Self>, node: NodeId) -> bool {
        let complete = self.reconcile_node_to_the_end(node).await;
        self.collection.count_reconciliation(node, complete);
        complete
    }

    /// [`Self::reconcile_node`], uncounted.
    async fn reconcile_node_to_the_end(self: &Arc<Self>, node: NodeId) -> bool {
        let mut after: Option<Bytes> = None;
        let mut stats = ReconcileStats::default();
        let mut seen: HashSet<Bytes> = HashSet::new();
        loop {
            let req = Request::Scan {
                after: after.clone(),
                limit: SCAN_PAGE,
            };
            let (entries, next) = match self.members.call(node, req, Duration::from_secs(30)).await
            {
                Ok(Response::Scanned { entries, next }) => (entries, next),
                Ok(other) => {
                    warn!(%node, ?other, "unexpected answer to scan");
                    return false;
                }
                Err(e) => {
                    warn!(%node, error = %e, "cannot scan node for reconciliation");
                    return false;
                }
            };
            for entry in entries {
                seen.insert(entry.key.clone());
                self.reconcile_entry(node, entry, &mut stats).await;
            }
            match next {
                Some(n) if scan_advances(after.as_ref(), &n) => after = Some(n),
                Some(n) => {
                    // Pages come in key order; one that does not move past the last would
                    // have this loop ask for it again for ever.
                    warn!(%node, next = ?n, after = ?after, "node's scan did not move forward");
                    return false;
                }
                None => break,
            }
        }
        // Keys the metadata says the node holds but it did not report (its log lost them,
        // or a crash came between a forget and its metadata update): unlist them.
        let this = self.clone();
        let missing: Vec<Bytes> = tokio::task::spawn_blocking(move || {
            let mut listed = this.meta.keys_on_node(node);
            listed.retain(|k| !seen.contains(k));
            listed
        })
        .await
        .unwrap_or_default();
        let mut unlisted = 0u64;
        for key in missing {
            if self.unlist_if_missing(node, key).await {
                unlisted += 1;
            }
        }
        if stats.skipped > 0 {
            // A key it could not be asked about may be a write only it and the journal's lost
            // end knew: not reconciled to the end.
            warn!(%node, skipped = stats.skipped, "node reconciled except for keys it did not answer for");
            return false;
        }
        info!(%node, adopted = stats.adopted, relisted = stats.relisted, dropped = stats.dropped, unlisted, "node reconciled");
        self.reconciled(node).await;
        true
    }

    /// Remove `node` from `key`'s replicas if it does not hold the listed version.
    async fn unlist_if_missing(self: &Arc<Self>, node: NodeId, key: Bytes) -> bool {
        let _guard = self.locks.lock(&key).await;
        let Some(meta) = self.meta.get(&key) else {
            return false;
        };
        if !meta.replicas.contains(&node) {
            return false;
        }
        let req = Request::Fetch { key: key.clone() };
        match self.members.call(node, req, self.config.node_timeout).await {
            Ok(Response::Fetched { version, .. }) if version == meta.version => false,
            Ok(Response::Fetched { .. }) => {
                let update = KeyUpdate::RemoveReplica { node };
                if self.meta.update(vec![(key.clone(), update)]).await.is_err() {
                    return false;
                }
                drop(_guard);
                self.repairs.push_kind(key, JobKind::Repair, false);
                true
            }
            _ => false,
        }
    }

    async fn reconcile_entry(
        self: &Arc<Self>,
        node: NodeId,
        mut entry: ScanEntry,
        stats: &mut ReconcileStats,
    ) {
        if entry.version > Version::MAX {
            // No coordinator handed it out, so no acknowledged write has it: nothing the
            // metadata should learn (it would put the key beyond every later write).
            warn!(%node, version = %entry.version, "ignored a key held at a version above the highest");
            return;
        }
        self.meta.observe_version(entry.version);
        let key = entry.key.clone();
        let _guard = self.locks.lock(&key).await;
        let meta = self.meta.get(&key);
        if let Some(m) = &meta {
            if entry.version == m.version && m.replicas.contains(&node) {
                return; // Nothing to change.
            }
        }
        // The scan page may be stale by now (a write, forget or copy since): decide on what
        // the node holds now, asked again under the key lock.
        fail::fail_point!("reconcile-fetch-fails", |_| stats.skipped += 1);
        let req = Request::Fetch { key: key.clone() };
        match self.members.call(node, req, self.config.node_timeout).await {
            Ok(Response::Fetched { version, .. }) if version > Version::MAX => return,
            Ok(Response::Fetched { version, value }) if version != Version::ZERO => {
                entry.version = version;
                entry.tombstone = value.is_none();
            }
            // Gone from the node since the scan: nothing to reconcile.
            Ok(Response::Fetched { .. }) => return,
            _ => {
                stats.skipped += 1;
                return;
            }
        }
        let update = match &meta {
            Some(m) if entry.version == m.version => {
                if m.replicas.contains(&node) {
                    return;
                }
                stats.relisted += 1;
                KeyUpdate::AddReplica {
                    version: m.version,
                    node,
                }
            }
            Some(m) if entry.version < m.version => {
                stats.dropped += 1;
                let _ = self.forget_on(node, &key, entry.version).await;
                if !m.replicas.contains(&node) {
                    return;
                }
                KeyUpdate::RemoveReplica { node }
            }
            None if entry.version <= self.meta.floor() => {
                // A key deleted and collected (or a write never acknowledged) at a settled
                // version: the copy is garbage, not a write to learn back.
                stats.dropped += 1;
                let _ = self.forget_on(node, &key, entry.version).await;
                return;
            }
            _ => {
                // Newer than the metadata (or unknown): it reached a replica, so record it.
                stats.adopted += 1;
                KeyUpdate::Set(KeyMeta {
                    version: entry.version,
                    replicas: smallvec::smallvec![node],
                    tombstone: entry.tombstone,
                })
            }
        };
        if let Err(e) = self.meta.update(vec![(key.clone(), update)]).await {
            warn!(error = %e, "reconcile update failed");
            stats.skipped += 1;
            return;
        }
        drop(_guard);
        self.repairs.push_kind(key, JobKind::Repair, false);
    }
}

/// Work the repair queue until shutdown.
pub async fn run_worker(coord: Arc<Coordinator>) {
    let permits = Arc::new(Semaphore::new(coord.config.transfer_concurrency.max(1)));
    let throttle = Arc::new(Mutex::new(Throttle::new(
        coord.config.transfer_bytes_per_sec,
        Instant::now(),
    )));
    loop {
        let Some((key, kind, number)) = coord.repairs.pop() else {
            tokio::select! {
                _ = coord.shutdown.cancelled() => return,
                _ = coord.repairs.wake.notified() => continue,
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        };
        let permit = tokio::select! {
            _ = coord.shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let this = coord.clone();
        let throttle = throttle.clone();
        coord.tasks.spawn(async move {
            let bytes = match this.converge(&key).await {
                Ok(b) => b,
                Err(e) => {
                    debug!(error = %e, "key not converged yet; the sweep retries it");
                    0
                }
            };
            this.repairs.done(kind, bytes, number);
            let wait = throttle.lock_unpoisoned().take(bytes, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            drop(permit);
        });
    }
}

/// Sweep periodically so nothing stays misplaced for long.
pub async fn run_sweeper(coord: Arc<Coordinator>) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = coord.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if coord.repairs.is_empty() {
            let n = coord.sweep_off_workers(JobKind::Repair).await;
            if n > 0 {
                debug!(keys = n, "sweep queued misplaced keys");
            }
        }
    }
}

/// Whether a node's scan page, which continues after `next`, moved past the page before it
/// (which continued after `after`, `None` for the first): a scan is in key order.
fn scan_advances(after: Option<&Bytes>, next: &Bytes) -> bool {
    after.is_none_or(|after| next > after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_advances_only_past_the_last_key() {
        let key = |k: &'static str| Bytes::from_static(k.as_bytes());
        assert!(scan_advances(None, &key("a")));
        assert!(scan_advances(Some(&key("a")), &key("b")));
        assert!(scan_advances(Some(&key("a")), &key("a\0")));
        assert!(
            !scan_advances(Some(&key("b")), &key("b")),
            "the same page again"
        );
        assert!(!scan_advances(Some(&key("b")), &key("a")), "backwards");
    }
}

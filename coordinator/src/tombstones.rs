//! Collecting deletions: tombstones at or below the version floor leave the metadata and the
//! nodes.
//!
//! A tombstone has to outlive every copy of the key it deleted, or a replica that was down
//! during the delete would bring the old value back when it is reconciled. Rather than track
//! copies, a pass raises the version floor (see [`crate::metadata`]), under which
//! reconciliation forgets a node's copy of a key the metadata does not hold:
//!
//! 1. take a floor settled at least a node timeout ago, below every write in flight then: a
//!    replica that answered a delete after its quorum is on the tombstone's list by now, so
//!    it is told to forget it too;
//! 2. find the tombstones at or below it (a walk of the map, off the async workers);
//! 3. persist the floor (synced), and only then remove those tombstones from the metadata,
//!    each only if it is still the key's entry ([`KeyUpdate::Collect`]: a write since then
//!    has a newer version and wins, without a key lock);
//! 4. ask their replicas to forget them, so the nodes free them too. Best effort: a node
//!    that misses it drops its tombstone when it next replays its log, and the reconciliation
//!    after that forgets any older copy.
//!
//! After a start that did not follow a clean shutdown, the metadata may lack acknowledged
//! writes that only the nodes still hold (the journal's unsynced end under `--meta-fsync
//! never`, or a damaged tail), and a settled floor would cover their versions. So the floor
//! does not rise until every node the registry knows has been reconciled: each lost write is
//! then back in the metadata, learnt from a replica. What is owed is kept in the registry
//! ([`NodeRecord::owes_reconciliation`](crate::metadata::NodeRecord)), so a clean restart
//! before every node came back still waits for the rest.

use ringkv_common::sync::MutexExt;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_common::protocol::{CollectionStatus, NodeReconciliations};
use ringkv_common::{NodeId, Version};
use tracing::{debug, info, warn};

use crate::metadata::{KeyUpdate, MetaError, Replicas};
use crate::state::Coordinator;

/// Tombstones removed per metadata commit (and forgotten per round of node requests).
const CHUNK: usize = 512;

/// How often a node that still owes a reconciliation while up is reconciled again.
const RECONCILE_RETRY: Duration = Duration::from_secs(60);

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Tombstones removed from the metadata.
    pub tombstones: u64,
    /// The floor they were collected under (zero when there were none).
    pub floor: Version,
}

/// The collector's counters, for `status`.
#[derive(Debug, Default)]
pub struct Collection {
    passes: AtomicU64,
    /// Reconciliations by node.
    reconciliations: Mutex<BTreeMap<NodeId, NodeReconciliations>>,
}

impl Collection {
    /// Count one reconciliation of `node`, to the end or not.
    pub fn count_reconciliation(&self, node: NodeId, complete: bool) {
        let mut counts = self.counts();
        let entry = counts.entry(node).or_insert(NodeReconciliations {
            node,
            complete: 0,
            incomplete: 0,
        });
        if complete {
            entry.complete += 1;
        } else {
            entry.incomplete += 1;
        }
    }

    fn reconciliations(&self) -> Vec<NodeReconciliations> {
        self.counts().values().copied().collect()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, NodeReconciliations>> {
        self.reconciliations.lock_unpoisoned()
    }
}

impl Coordinator {
    /// After a start that did not follow a clean shutdown: every node that is not removed owes
    /// a reconciliation, persisted (synced) before the collector runs, so that it is owed
    /// across restarts until paid.
    ///
    /// # Errors
    /// A failed registry write: the start fails rather than let the floor rise too early.
    pub async fn owe_reconciliations(&self) -> Result<(), MetaError> {
        for record in self.members.records() {
            if record.removed {
                continue;
            }
            if let Some(record) = self.members.set_owes_reconciliation(record.id, true) {
                self.meta.save_node(record).await?;
            }
        }
        Ok(())
    }

    /// `node` was reconciled to the end: it owes nothing any more.
    pub async fn reconciled(&self, node: NodeId) {
        let Some(record) = self.members.set_owes_reconciliation(node, false) else {
            return;
        };
        // Should this fail, the registry on disk still says it owes one: the next start
        // waits for it again, which is safe.
        if let Err(e) = self.meta.save_node(record).await {
            warn!(%node, error = %e, "cannot record that the node was reconciled");
        }
        self.refresh_read_gate();
        if self.owing().is_empty() {
            info!("every node reconciled; deleted keys may be collected");
        }
    }

    /// Open or close the reads' [`RecoveryGate`] for the nodes that owe a reconciliation now.
    pub fn refresh_read_gate(&self) {
        let mut owing = Vec::new();
        let (closed, was_closed) = self.reads.update(|| {
            owing = self.owing();
            owing.len()
        });
        if closed {
            info!(
                ?owing,
                "reads wait until fewer of these nodes owe a reconciliation than the write \
                 quorum: the metadata may lack writes they acknowledged before an unclean stop"
            );
        } else if was_closed {
            info!("enough nodes reconciled; reads are served again");
        }
    }

    /// Why a read cannot be served yet, if the reads' [`RecoveryGate`] is closed.
    pub fn read_gate_error(&self) -> Option<ringkv_common::WireError> {
        if !self.reads.is_closed() {
            return None;
        }
        let owing: Vec<String> = self.owing().iter().map(ToString::to_string).collect();
        Some(ringkv_common::WireError::Unavailable(format!(
            "reads wait until the metadata is learnt back from the nodes after an unclean \
             stop; not yet reconciled: node(s) {}",
            owing.join(", ")
        )))
    }

    /// Nodes that owe a reconciliation (and are not removed): the floor waits for them.
    fn owing(&self) -> Vec<NodeId> {
        self.members
            .records()
            .into_iter()
            .filter(|r| r.owes_reconciliation && !r.removed)
            .map(|r| r.id)
            .collect()
    }

    /// For `status`: the floor, the passes so far, and the nodes the floor waits for.
    pub fn collection_status(&self) -> CollectionStatus {
        let mut waiting_for = self.owing();
        waiting_for.sort_unstable();
        CollectionStatus {
            floor: self.meta.floor(),
            passes: self.collection.passes.load(Ordering::Relaxed),
            waiting_for,
            reconciliations: self.collection.reconciliations(),
            reads_wait: self.reads.is_closed(),
        }
    }

    /// One collection pass under `floor`, a [`settled_floor`] reading (see the module docs).
    ///
    /// [`settled_floor`]: crate::metadata::Metadata::settled_floor
    ///
    /// # Errors
    /// A failed metadata commit; the tombstones not yet removed stay for the next pass.
    pub async fn collect_tombstones(
        self: &Arc<Self>,
        floor: Version,
    ) -> Result<Collected, MetaError> {
        let this = self.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut found: Vec<(Bytes, Version, Replicas)> = Vec::new();
            this.meta.for_each(|key, meta| {
                if meta.tombstone && meta.version <= floor {
                    found.push((
                        Bytes::copy_from_slice(key),
                        meta.version,
                        meta.replicas.clone(),
                    ));
                }
            });
            found
        })
        .await
        .map_err(|e| MetaError::Write(format!("walking the tombstones failed: {e}")))?;
        if found.is_empty() {
            return Ok(Collected::default());
        }
        // Durable before anything is removed: a removal that survives a crash always comes
        // after the floor that justifies it in the journal.
        self.meta.raise_floor(floor).await?;
        let mut collected = Collected {
            tombstones: 0,
            floor,
        };
        for chunk in found.chunks(CHUNK) {
            if self.shutdown.is_cancelled() {
                break;
            }
            let updates = chunk
                .iter()
                .map(|(key, version, _)| (key.clone(), KeyUpdate::Collect { version: *version }))
                .collect();
            self.meta.update(updates).await?;
            collected.tombstones += chunk.len() as u64;
            let forgets = chunk.iter().flat_map(|(key, version, replicas)| {
                replicas
                    .iter()
                    .filter(|node| self.members.is_up(**node))
                    .map(move |&node| async move {
                        // A node that misses it drops the tombstone at its next restart.
                        let _ = self.forget_on(node, key, *version).await;
                    })
            });
            futures::future::join_all(forgets).await;
        }
        Ok(collected)
    }
}

/// Collect tombstones every `every` until shutdown (never if `every` is zero), each pass under
/// the newest floor settled at least `grace` earlier (see the module docs).
pub async fn run_collector(coord: Arc<Coordinator>, every: Duration, grace: Duration) {
    if every.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut readings = Readings::default();
    let mut last_retry = Instant::now();
    loop {
        tokio::select! {
            () = coord.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        coord.collection.passes.fetch_add(1, Ordering::Relaxed);
        let owing = coord.owing();
        if !owing.is_empty() {
            readings.clear();
            // A node still owing while running (up, or leaving and heard from) did not
            // answer for every key when it was reconciled: try again now and then (it is
            // otherwise reconciled only when it returns or registers).
            if last_retry.elapsed() >= RECONCILE_RETRY {
                last_retry = Instant::now();
                for node in owing.into_iter().filter(|n| coord.readable(*n)) {
                    let this = coord.clone();
                    coord.background(async move {
                        this.reconcile_node(node).await;
                    });
                }
            }
            continue;
        }
        let now = Instant::now();
        readings.push(now, coord.meta.settled_floor());
        let Some(floor) = readings.take_older_than(now, grace) else {
            continue;
        };
        match coord.collect_tombstones(floor).await {
            Ok(c) if c.tombstones > 0 => {
                info!(tombstones = c.tombstones, floor = %c.floor, "collected deleted keys");
            }
            Ok(_) => debug!("no deleted keys to collect"),
            Err(e) => warn!(error = %e, "collecting deleted keys failed"),
        }
    }
}

/// Settled floors read by the collector, oldest first.
#[derive(Debug, Default)]
struct Readings(VecDeque<(Instant, Version)>);

impl Readings {
    fn push(&mut self, at: Instant, floor: Version) {
        self.0.push_back((at, floor));
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    /// The newest reading taken at least `grace` before `now`, dropping it and the older ones.
    fn take_older_than(&mut self, now: Instant, grace: Duration) -> Option<Version> {
        let mut newest = None;
        while let Some(&(at, floor)) = self.0.front() {
            if now.saturating_duration_since(at) < grace {
                break;
            }
            newest = Some(floor);
            self.0.pop_front();
        }
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_uses_the_newest_reading_at_least_the_grace_old() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let grace = Duration::from_millis(1000);
        let mut readings = Readings::default();
        readings.push(at(0), Version(10));
        assert_eq!(readings.take_older_than(at(0), grace), None);
        readings.push(at(400), Version(20));
        readings.push(at(800), Version(30));
        assert_eq!(readings.take_older_than(at(900), grace), None);
        assert_eq!(readings.take_older_than(at(1500), grace), Some(Version(20)));
        // Taken readings are gone; the next one comes of age later.
        assert_eq!(readings.take_older_than(at(1600), grace), None);
        assert_eq!(readings.take_older_than(at(1800), grace), Some(Version(30)));
        readings.push(at(2000), Version(40));
        readings.clear();
        assert_eq!(readings.take_older_than(at(9000), grace), None);
    }
}

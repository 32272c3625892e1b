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
//! does not rise until every node the registry knows has been reconciled in this run
//! ([`Collection`]): each lost write is then back in the metadata, learnt from a replica.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_common::protocol::{CollectionStatus, Request};
use ringkv_common::{NodeId, Version};
use tracing::{debug, info, warn};

use crate::metadata::{KeyUpdate, MetaError, Replicas};
use crate::state::Coordinator;

/// Tombstones removed per metadata commit (and forgotten per round of node requests).
const CHUNK: usize = 512;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Tombstones removed from the metadata.
    pub tombstones: u64,
    /// The floor they were collected under (zero when there were none).
    pub floor: Version,
}

/// What the collector shares with the rest of the coordinator: the nodes whose
/// reconciliation the version floor waits for (see the module docs; after an unclean start,
/// every node in the registry that is not removed, after a clean one none), and the passes.
#[derive(Debug, Default)]
pub struct Collection {
    waiting: Mutex<BTreeSet<NodeId>>,
    passes: AtomicU64,
}

impl Collection {
    /// Collection that may raise the floor once each of `nodes` is
    /// [`settled`](Collection::settled).
    pub fn waiting_for(nodes: impl IntoIterator<Item = NodeId>) -> Collection {
        Collection {
            waiting: Mutex::new(nodes.into_iter().collect()),
            passes: AtomicU64::new(0),
        }
    }

    /// For `status`: the floor, the passes so far and the nodes the floor waits for.
    pub fn status(&self, floor: Version) -> CollectionStatus {
        CollectionStatus {
            floor,
            passes: self.passes.load(Ordering::Relaxed),
            waiting_for: self
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect(),
        }
    }

    /// `node` was reconciled to the end, or removed: nothing it holds is unknown any more.
    pub fn settled(&self, node: NodeId) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.remove(&node) && waiting.is_empty() {
            info!("every node reconciled since the start; deleted keys may be collected");
        }
    }

    /// Whether the floor may rise: every node it waited for is settled.
    pub fn is_open(&self) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

impl Coordinator {
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
                    .map(move |&node| {
                        let req = Request::Forget {
                            key: key.clone(),
                            version: *version,
                        };
                        async move {
                            // A node that misses it drops the tombstone at its next restart.
                            let _ = self.members.call(node, req, self.config.node_timeout).await;
                        }
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
    loop {
        tokio::select! {
            () = coord.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        coord.collection.passes.fetch_add(1, Ordering::Relaxed);
        if !coord.collection.is_open() {
            readings.clear();
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
    fn the_floor_may_rise_once_every_node_is_settled() {
        assert!(
            Collection::default().is_open(),
            "a clean start waits for nothing"
        );
        let gate = Collection::waiting_for([NodeId(1), NodeId(2)]);
        assert!(!gate.is_open());
        gate.settled(NodeId(1));
        gate.settled(NodeId(1));
        gate.settled(NodeId(7));
        assert!(!gate.is_open(), "node 2 is not reconciled yet");
        assert_eq!(gate.status(Version(5)).waiting_for, [NodeId(2)]);
        gate.settled(NodeId(2));
        assert!(gate.is_open());
    }

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

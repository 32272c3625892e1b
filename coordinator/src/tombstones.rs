//! Collecting deletions: tombstones at or below the version floor leave the metadata and the
//! nodes.
//!
//! A tombstone has to outlive every copy of the key it deleted, or a replica that was down
//! during the delete would bring the old value back when it is reconciled. Rather than track
//! copies, a pass raises the version floor (see [`crate::metadata`]), under which
//! reconciliation forgets a node's copy of a key the metadata does not hold:
//!
//! 1. take the floor settled one pass ago, below every write in flight then: a replica that
//!    answers a delete late (after its quorum) is on the tombstone's list by now, so it is
//!    told to forget it too;
//! 2. find the tombstones at or below it (a walk of the map, off the async workers);
//! 3. persist the floor (synced), and only then remove those tombstones from the metadata,
//!    each only if it is still the key's entry ([`KeyUpdate::Collect`]: a write since then
//!    has a newer version and wins, without a key lock);
//! 4. ask their replicas to forget them, so the nodes free them too. Best effort: a node
//!    that misses it drops its tombstone when it next replays its log, and the reconciliation
//!    after that forgets any older copy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringkv_common::protocol::Request;
use ringkv_common::Version;
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
    /// The floor they were collected under.
    pub floor: Version,
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

/// Collect tombstones every `every` until shutdown (never if `every` is zero).
pub async fn run_collector(coord: Arc<Coordinator>, every: Duration) {
    if every.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The floor each pass collects under is the one settled a pass earlier.
    let mut settled = None;
    loop {
        tokio::select! {
            () = coord.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(floor) = settled.replace(coord.meta.settled_floor()) else {
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

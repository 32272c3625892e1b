//! `status` and `check`: what the cluster looks like, and whether every key is safe.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringkv_common::protocol::{CheckReport, ClusterStatus, Request, Response};
use ringkv_common::{NodeId, NodeState, Version, WireError};

use crate::state::Coordinator;

/// Entries per page when `check` scans a node.
const CHECK_PAGE: u32 = 10_000;

impl Coordinator {
    /// Membership, stats, key counts and jobs.
    pub fn status(&self) -> ClusterStatus {
        let nodes = self.members.snapshot();
        let rf = self.config.rf;
        let mut keys = 0u64;
        let mut under = 0u64;
        let mut misplaced = 0u64;
        let mut tombstones = 0u64;
        self.meta.for_each(|key, meta| {
            if meta.tombstone {
                tombstones += 1;
                return;
            }
            keys += 1;
            let up = meta
                .replicas
                .iter()
                .filter(|n| self.members.is_up(**n))
                .count();
            if up < rf {
                under += 1;
            }
            if !self.is_placed(key, meta) {
                misplaced += 1;
            }
        });
        let up = nodes.iter().filter(|n| n.state == NodeState::Up).count();
        ClusterStatus {
            nodes,
            keys,
            under_replicated: under,
            misplaced,
            tombstones,
            collection: self.collection_status(),
            rf: rf as u32,
            write_quorum: self.config.write_quorum as u32,
            degraded: up < rf,
            jobs: self.repairs.progress(),
            writes: self.write_clock.read(),
        }
    }

    /// [`Coordinator::status`] on a blocking thread: it walks every key, and the async workers
    /// (one on a small machine) keep serving requests meanwhile.
    /// At most one walk runs at a time, however many clients poll.
    pub async fn status_off_workers(self: &Arc<Self>) -> Result<ClusterStatus, WireError> {
        static WALKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let _walk = WALKS
            .acquire()
            .await
            .map_err(|e| WireError::Internal(format!("status failed: {e}")))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.status())
            .await
            .map_err(|e| WireError::Internal(format!("status failed: {e}")))
    }

    /// Verify every live key against what the up nodes actually hold.
    pub async fn check(self: &Arc<Self>) -> Result<CheckReport, WireError> {
        let mut held: HashMap<NodeId, HashMap<Bytes, Version>> = HashMap::new();
        for node in self.members.in_state(NodeState::Up) {
            held.insert(node, self.scan_all(node).await?);
        }
        // First pass against the scans, on a blocking thread (it walks every key). The scans
        // and the metadata are not one snapshot (writes go on meanwhile), so every key that
        // does not look healthy is looked at again, alone, under its lock.
        let this = self.clone();
        let (mut report, suspects) = tokio::task::spawn_blocking(move || {
            let mut report = CheckReport::default();
            let mut suspects: Vec<Bytes> = Vec::new();
            this.meta.for_each(|key, meta| {
                if meta.tombstone {
                    return;
                }
                report.keys += 1;
                let mut good = 0usize;
                let mut stale = false;
                for node in &meta.replicas {
                    let Some(copies) = held.get(node) else {
                        continue; // not up
                    };
                    match copies.get(key) {
                        Some(v) if *v == meta.version => good += 1,
                        _ => stale = true,
                    }
                }
                match classify(good, stale, this.config.rf) {
                    Health::Healthy => report.healthy += 1,
                    _ => suspects.push(Bytes::copy_from_slice(key)),
                }
            });
            (report, suspects)
        })
        .await
        .map_err(|e| WireError::Internal(format!("check failed: {e}")))?;
        let mut examples: Vec<String> = Vec::new();
        for key in suspects {
            let health = self.check_key(&key).await;
            match health {
                Health::Healthy => report.healthy += 1,
                Health::UnderReplicated => report.under_replicated += 1,
                Health::Stale | Health::Lost => {
                    if health == Health::Stale {
                        report.stale += 1;
                    } else {
                        report.lost += 1;
                    }
                    if examples.len() < 10 {
                        let meta = self.meta.get(&key);
                        examples.push(format!(
                            "{} {:?}: {:?}",
                            String::from_utf8_lossy(&key),
                            health,
                            meta.map(|m| (m.version, m.replicas))
                        ));
                    }
                }
                Health::Gone => report.keys -= 1,
            }
        }
        if !examples.is_empty() {
            tracing::warn!(?examples, "check found lost or stale keys");
        }
        report.reads_wait = self.reads.is_closed();
        Ok(report)
    }

    /// Classify one key exactly: under its lock, ask each listed up replica what it holds.
    async fn check_key(self: &Arc<Self>, key: &Bytes) -> Health {
        let _guard = self.locks.lock(key).await;
        let Some(meta) = self.meta.get(key) else {
            return Health::Gone;
        };
        if meta.tombstone {
            return Health::Gone;
        }
        let asks = meta.replicas.iter().map(|&node| async move {
            if !self.members.is_up(node) {
                return None;
            }
            let req = Request::Fetch { key: key.clone() };
            match self.members.call(node, req, self.config.node_timeout).await {
                Ok(Response::Fetched { version, value }) => {
                    Some(version == meta.version && value.is_some())
                }
                // Unreachable: neither good nor stale, so the key counts as under-replicated.
                _ => None,
            }
        });
        let answers = futures::future::join_all(asks).await;
        let good = answers.iter().filter(|a| **a == Some(true)).count();
        let stale = answers.contains(&Some(false));
        classify(good, stale, self.config.rf)
    }

    async fn scan_all(&self, node: NodeId) -> Result<HashMap<Bytes, Version>, WireError> {
        let mut out = HashMap::new();
        let mut after = None;
        loop {
            let req = Request::Scan {
                after,
                limit: CHECK_PAGE,
            };
            match self.members.call(node, req, Duration::from_secs(30)).await {
                Ok(Response::Scanned { entries, next }) => {
                    for e in entries {
                        if !e.tombstone {
                            out.insert(e.key, e.version);
                        }
                    }
                    match next {
                        Some(n) => after = Some(n),
                        None => return Ok(out),
                    }
                }
                Ok(other) => {
                    return Err(WireError::Internal(format!(
                        "node {node} answered scan with {other:?}"
                    )))
                }
                Err(e) => {
                    return Err(WireError::Unavailable(format!(
                        "cannot scan node {node}: {e}"
                    )))
                }
            }
        }
    }
}

/// The health of one key, as `check` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Healthy,
    UnderReplicated,
    /// A listed, live replica holds another version (or none).
    Stale,
    /// No live replica holds the metadata's version.
    Lost,
    /// Deleted while being checked.
    Gone,
}

fn classify(good: usize, stale: bool, rf: usize) -> Health {
    if good == 0 {
        Health::Lost
    } else if stale {
        Health::Stale
    } else if good < rf {
        Health::UnderReplicated
    } else {
        Health::Healthy
    }
}

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
        self.meta.for_each(|key, meta| {
            if meta.tombstone {
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
            rf: rf as u32,
            write_quorum: self.config.write_quorum as u32,
            degraded: up < rf,
            jobs: self.repairs.progress(),
        }
    }

    /// Verify every live key against what the up nodes actually hold.
    pub async fn check(self: &Arc<Self>) -> Result<CheckReport, WireError> {
        let mut held: HashMap<NodeId, HashMap<Bytes, Version>> = HashMap::new();
        for node in self.members.in_state(NodeState::Up) {
            held.insert(node, self.scan_all(node).await?);
        }
        let mut report = CheckReport::default();
        let mut examples: Vec<String> = Vec::new();
        let rf = self.config.rf;
        self.meta.for_each(|key, meta| {
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
            if (good == 0 || stale) && examples.len() < 10 {
                examples.push(format!(
                    "{} v{} listed on {:?}",
                    String::from_utf8_lossy(key),
                    meta.version,
                    meta.replicas
                ));
            }
            if good == 0 {
                report.lost += 1;
            } else if stale {
                report.stale += 1;
            } else if good < rf {
                report.under_replicated += 1;
            } else {
                report.healthy += 1;
            }
        });
        if !examples.is_empty() {
            tracing::warn!(?examples, "check found lost or stale keys");
        }
        Ok(report)
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

//! Consistent hashing with virtual nodes.
//!
//! Each node owns `vnodes` points on a 64-bit circle, placed by hashing `"{node}#{i}"` with
//! xxh3 (stable across processes, platforms and releases). A key hashes onto the circle and
//! its preference list is the first distinct nodes clockwise from it that pass a filter
//! (normally "is up"). The ring is a pure value: no sockets, no clocks.

use xxhash_rust::xxh3::xxh3_64;

use crate::types::NodeId;

/// Default virtual nodes per physical node: enough to keep the largest share within a few
/// percent of the ideal for small clusters, small enough that a lookup stays cache-friendly.
pub const DEFAULT_VNODES: u32 = 256;

/// The hash of a key's position on the ring.
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// A set of nodes placed on the hash circle.
#[derive(Clone, Debug)]
pub struct Ring {
    vnodes: u32,
    /// Sorted by point; ties (astronomically rare) broken by node id.
    points: Vec<(u64, NodeId)>,
}

impl Ring {
    /// An empty ring that will give each node `vnodes` points (at least one).
    pub fn new(vnodes: u32) -> Ring {
        Ring {
            vnodes: vnodes.max(1),
            points: Vec::new(),
        }
    }

    /// Place `node` on the ring; adding a node twice is a no-op.
    pub fn add(&mut self, node: NodeId) {
        if self.contains(node) {
            return;
        }
        for i in 0..self.vnodes {
            let point = xxh3_64(format!("{node}#{i}").as_bytes());
            self.points.push((point, node));
        }
        self.points.sort_unstable();
    }

    /// Take `node` off the ring.
    pub fn remove(&mut self, node: NodeId) {
        self.points.retain(|&(_, n)| n != node);
    }

    /// Whether `node` is on the ring.
    pub fn contains(&self, node: NodeId) -> bool {
        self.points.iter().any(|&(_, n)| n == node)
    }

    /// The distinct nodes on the ring.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self.points.iter().map(|&(_, n)| n).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// The first `n` distinct nodes clockwise from `key` for which `eligible` holds.
    pub fn preference_list(
        &self,
        key: &[u8],
        n: usize,
        eligible: impl Fn(NodeId) -> bool,
    ) -> Vec<NodeId> {
        let mut chosen: Vec<NodeId> = Vec::with_capacity(n);
        if self.points.is_empty() || n == 0 {
            return chosen;
        }
        let hash = key_hash(key);
        let start = self.points.partition_point(|&(p, _)| p < hash);
        let len = self.points.len();
        for step in 0..len {
            let (_, node) = self.points[(start + step) % len];
            if !chosen.contains(&node) && eligible(node) {
                chosen.push(node);
                if chosen.len() == n {
                    break;
                }
            }
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ring_of(n: u64) -> Ring {
        let mut ring = Ring::new(DEFAULT_VNODES);
        for id in 1..=n {
            ring.add(NodeId(id));
        }
        ring
    }

    fn keys(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("key-{i}").into_bytes())
            .collect()
    }

    #[test]
    fn preference_list_is_distinct_and_respects_filter() {
        let ring = ring_of(5);
        for key in keys(1000) {
            let list = ring.preference_list(&key, 3, |_| true);
            assert_eq!(list.len(), 3);
            let mut dedup = list.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), 3);
            let without_2 = ring.preference_list(&key, 3, |n| n != NodeId(2));
            assert!(!without_2.contains(&NodeId(2)));
            assert_eq!(without_2.len(), 3);
        }
        assert_eq!(ring.preference_list(b"k", 9, |_| true).len(), 5);
        assert!(Ring::new(8).preference_list(b"k", 3, |_| true).is_empty());
    }

    #[test]
    fn replicas_are_balanced_across_nodes() {
        let ring = ring_of(5);
        let mut counts: HashMap<NodeId, usize> = HashMap::new();
        let keys = keys(100_000);
        for key in &keys {
            for node in ring.preference_list(key, 3, |_| true) {
                *counts.entry(node).or_default() += 1;
            }
        }
        let ideal = keys.len() as f64 * 3.0 / 5.0;
        for (node, count) in counts {
            let ratio = count as f64 / ideal;
            assert!(
                (0.9..1.1).contains(&ratio),
                "node {node} holds {ratio:.3}x its share"
            );
        }
    }

    #[test]
    fn adding_a_node_moves_about_its_share_and_only_to_it() {
        let before = ring_of(5);
        let after = ring_of(6);
        let keys = keys(50_000);
        let mut moved = 0usize;
        for key in &keys {
            let old = before.preference_list(key, 3, |_| true);
            let new = after.preference_list(key, 3, |_| true);
            for node in &new {
                if !old.contains(node) {
                    // The only replica that may appear is the new node.
                    assert_eq!(*node, NodeId(6));
                    moved += 1;
                }
            }
        }
        let ideal = keys.len() as f64 * 3.0 / 6.0;
        let ratio = moved as f64 / ideal;
        assert!(ratio < 1.15, "moved {ratio:.3}x the ideal share");
        assert!(ratio > 0.85, "moved only {ratio:.3}x the ideal share");
    }

    #[test]
    fn placement_is_stable_across_instances() {
        let a = ring_of(4);
        let mut b = Ring::new(DEFAULT_VNODES);
        for id in [4, 2, 3, 1] {
            b.add(NodeId(id));
        }
        for key in keys(100) {
            assert_eq!(
                a.preference_list(&key, 3, |_| true),
                b.preference_list(&key, 3, |_| true)
            );
        }
    }
}

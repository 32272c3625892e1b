//! Identifier newtypes and the small value types that several crates share.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A storage node's identity, assigned by the coordinator and stable across restarts.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The highest id a node may carry. Ids are handed out one by one from 1, so no real
    /// cluster comes near it; a peer that claims an id above it is refused, so the next id
    /// (the highest known plus one) cannot overflow.
    pub const MAX: NodeId = NodeId(1 << 32);

    /// Whether a coordinator could hand out this id: it is within `1..=NodeId::MAX`.
    pub fn is_assignable(self) -> bool {
        (1..=NodeId::MAX.0).contains(&self.0)
    }

    /// The id after this one, if it is still within `1..=NodeId::MAX`.
    pub fn next(self) -> Option<NodeId> {
        Some(NodeId(self.0.checked_add(1)?)).filter(|next| next.is_assignable())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim_start_matches('n').parse().map(NodeId)
    }
}

/// A write's version, assigned by the coordinator. Larger is newer; 0 means "nothing".
#[derive(
    Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default,
)]
#[serde(transparent)]
pub struct Version(pub u64);

impl Version {
    /// The version of a key that was never written.
    pub const ZERO: Version = Version(0);

    /// The highest version a node stores or the coordinator hands out: at a million writes a
    /// second, 146,000 years of them. A version above it can only come from a faulty or
    /// hostile peer; refusing it keeps the coordinator's version lease (which reserves a
    /// million versions at a time above the highest seen) clear of overflow.
    pub const MAX: Version = Version(1 << 62);
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A node's membership state as the coordinator sees it.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Heartbeating and eligible for new replicas.
    Up,
    /// Missed heartbeats; not given new replicas, but not yet written off.
    Suspect,
    /// Declared failed; its replicas are being re-created elsewhere.
    Down,
    /// Being decommissioned; its keys are copied away before it stops.
    Leaving,
    /// Decommissioned; holds nothing anyone depends on.
    Removed,
}

impl NodeState {
    /// The lower-case name used in `status` and scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
            NodeState::Leaving => "leaving",
            NodeState::Removed => "removed",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "up" => Ok(NodeState::Up),
            "suspect" => Ok(NodeState::Suspect),
            "down" => Ok(NodeState::Down),
            "leaving" => Ok(NodeState::Leaving),
            "removed" => Ok(NodeState::Removed),
            other => Err(format!(
                "unknown node state {other:?} (expected up, suspect, down, leaving or removed)"
            )),
        }
    }
}

/// Counters a node reports with every heartbeat.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct NodeStats {
    /// Live keys (tombstones excluded).
    pub keys: u64,
    /// Bytes of live keys and values.
    pub bytes: u64,
    /// Requests served since start.
    pub ops: u64,
    /// Bytes in the on-disk log, garbage included.
    pub log_bytes: u64,
    /// Messages received since start: a batch of requests is one message, so `ops` over
    /// `messages` is how many requests a message carried on average.
    #[serde(default)]
    pub messages: u64,
    /// Fsyncs of the log since start; under `--fsync always` one covers every write that
    /// arrived while the one before it ran (group commit).
    #[serde(default)]
    pub syncs: u64,
    /// Bytes of its log this node set aside at its last start: damage with records after it,
    /// not replayed, kept in the preserved original (`ringkv.log.corrupt-*`). Its keys are
    /// repaired from other replicas.
    #[serde(default)]
    pub log_set_aside_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_stay_within_their_range() {
        assert_eq!(NodeId(0).next(), Some(NodeId(1)));
        assert_eq!(NodeId(41).next(), Some(NodeId(42)));
        assert_eq!(NodeId(NodeId::MAX.0 - 1).next(), Some(NodeId::MAX));
        assert_eq!(NodeId::MAX.next(), None, "every id is taken");
        assert_eq!(NodeId(u64::MAX).next(), None);
    }
}

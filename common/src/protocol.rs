//! The messages of RingKV's one TCP protocol.
//!
//! Every frame body is an [`Envelope`]: a request id and a message. Requests travel as
//! `Envelope<Request>`, answers as `Envelope<Reply>` carrying the request's id, so one connection
//! carries many requests in flight and answers may come back in any order.
//!
//! The first request on every connection is [`Request::Hello`]; a peer speaking another
//! protocol version is answered with [`WireError::ProtocolMismatch`] and the connection closes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::types::{NodeId, NodeState, NodeStats, Version};

/// Bumped on any incompatible change to the messages below (2: [`Request::Batch`]; 3: the
/// `messages` and `syncs` of [`NodeStats`] and the `writes` of [`ClusterStatus`], which a
/// build before them cannot decode: structs travel as arrays, and a longer one is refused;
/// 4: the `reconciliations` of [`CollectionStatus`]; 5: the `reads_wait` of the collection
/// status; 6: the cluster token of [`Request::Hello`], without which a peer role is refused,
/// and the `log_set_aside_bytes` of [`NodeStats`]).
pub const PROTOCOL_VERSION: u32 = 6;

/// Largest key accepted. Keys are held in memory by the coordinator and every replica,
/// so they are kept small enough to make per-key overhead predictable.
pub const MAX_KEY_LEN: usize = 64 * 1024;

/// Largest value accepted; leaves room under the default frame limit for the envelope.
pub const MAX_VALUE_LEN: usize = 16 * 1024 * 1024;

/// Default largest frame, checked before a byte of the body is buffered.
pub const DEFAULT_MAX_FRAME_LEN: usize = 32 * 1024 * 1024;

/// Most requests one [`Request::Batch`] may carry; a node refuses a longer one.
pub const MAX_BATCH_REQUESTS: usize = 256;

/// What the encoding of one request or answer in a batch adds to its key and value bytes, at
/// most (envelope, id, variant, version, lengths), for keeping batches under the frame limit.
pub const BATCH_ITEM_OVERHEAD: usize = 64;

/// Reject an empty key, a key over [`MAX_KEY_LEN`] or a value over [`MAX_VALUE_LEN`], before
/// anything is written.
pub fn check_sizes(key: &[u8], value: Option<&Bytes>) -> Result<(), WireError> {
    if key.is_empty() {
        return Err(WireError::BadRequest("empty key".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(WireError::TooLarge {
            what: "key".into(),
            size: key.len() as u64,
            max: MAX_KEY_LEN as u64,
        });
    }
    if let Some(v) = value {
        if v.len() > MAX_VALUE_LEN {
            return Err(WireError::TooLarge {
                what: "value".into(),
                size: v.len() as u64,
                max: MAX_VALUE_LEN as u64,
            });
        }
    }
    Ok(())
}

/// A frame body: the request id that ties an answer to its request, and the message.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Envelope<M> {
    pub id: u64,
    pub msg: M,
}

/// An answer: what the request produced, or why it did not.
pub type Reply = Result<Response, WireError>;

/// Who is on the other end of a connection.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Node,
    Coordinator,
}

impl Role {
    /// The role's name, as on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Node => "node",
            Role::Coordinator => "coordinator",
        }
    }
}

/// What `node kill|pause|resume` does to a spawned node's process.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeSignal {
    /// SIGKILL: the process dies at once, with no chance to flush.
    Kill,
    /// SIGSTOP: the process freezes; its sockets stay open but nothing answers.
    Pause,
    /// SIGCONT: a paused process carries on.
    Resume,
}

/// Every request any peer can send.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Request {
    /// First message on every connection: the sender's protocol version and role, and for
    /// the node and coordinator roles the cluster token ([`crate::cluster_token`]). Left out
    /// of the encoding when absent, so that a client's hello is what it always was.
    Hello {
        protocol: u32,
        role: Role,
        /// Must stay the last field: leaving it out shortens the array it is encoded as,
        /// and a missing last field decodes as `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },

    // --- client -> coordinator ---
    /// Store `value` under `key`; answered with [`Response::Written`] once a write quorum has it.
    Put { key: Bytes, value: Bytes },
    /// Read the latest acknowledged value of `key`; answered with [`Response::Value`].
    Get { key: Bytes },
    /// Delete `key` (a versioned tombstone); answered with [`Response::Written`].
    Delete { key: Bytes },
    /// Which nodes hold `key`, and which version each holds.
    Locate { key: Bytes },
    /// Cluster membership, per-node stats, key counts and background jobs.
    Status,
    /// Verify that every key has its full set of live, agreeing replicas.
    Check,
    /// Spawn one more storage node and migrate its share of keys to it.
    NodeAdd,
    /// Decommission a node: copy its keys away, then stop it.
    NodeRemove {
        node: NodeId,
        /// Remove it even though reads wait for its reconciliation after an unclean stop
        /// (under `--meta-fsync never`): the operator accepts that writes only it held may
        /// be lost, and a read may then find the version before one. Must stay the last
        /// field: left out of the encoding when false, so a plain removal is what it always
        /// was, and a missing last field decodes as false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        accept_loss: bool,
    },
    /// Send a signal to a node the coordinator spawned (failure injection).
    NodeSignal { node: NodeId, signal: NodeSignal },

    // --- node -> coordinator ---
    /// A node announces itself; `node` is `None` the first time a hand-started node joins.
    Register {
        node: Option<NodeId>,
        addr: String,
        pid: u32,
        data_dir: String,
    },
    /// Periodic liveness signal with the node's counters.
    Heartbeat { node: NodeId, stats: NodeStats },

    // --- coordinator -> node ---
    /// Apply `value` (`None` = tombstone) at `version` if it is newer than what the node holds.
    Store {
        key: Bytes,
        version: Version,
        value: Option<Bytes>,
    },
    /// Read the node's copy of `key`.
    Fetch { key: Bytes },
    /// Forget `key` if the node's copy is no newer than `version` (the key moved elsewhere).
    Forget { key: Bytes, version: Version },
    /// List up to `limit` entries with keys strictly after `after`, in key order.
    Scan { after: Option<Bytes>, limit: u32 },
    /// Several `Store`, `Forget` or `Fetch` requests in one frame, each with its own id,
    /// answered with one [`Response::Batch`] holding an answer per id. A node applies a
    /// batch's writes under one lock and appends them to its log with one write (and one
    /// fsync wait), so a burst of requests costs about what one does. The pipelining client
    /// forms batches by itself on connections that ask for it ([`crate::client::Client`]).
    Batch(Vec<Envelope<Request>>),
}

impl Request {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Put { .. } => "put",
            Request::Get { .. } => "get",
            Request::Delete { .. } => "del",
            Request::Locate { .. } => "locate",
            Request::Status => "status",
            Request::Check => "check",
            Request::NodeAdd => "node add",
            Request::NodeRemove { .. } => "node remove",
            Request::NodeSignal { .. } => "node signal",
            Request::Register { .. } => "register",
            Request::Heartbeat { .. } => "heartbeat",
            Request::Store { .. } => "store",
            Request::Fetch { .. } => "fetch",
            Request::Forget { .. } => "forget",
            Request::Scan { .. } => "scan",
            Request::Batch(_) => "batch",
        }
    }

    /// Bytes of keys and values this request holds (a batch's requests' and their
    /// framing's), for bounding what the requests in flight on a connection pin.
    pub fn held_len(&self) -> usize {
        match self {
            Request::Put { key, value } => key.len() + value.len(),
            Request::Get { key }
            | Request::Delete { key }
            | Request::Locate { key }
            | Request::Fetch { key }
            | Request::Forget { key, .. } => key.len(),
            Request::Store { .. } => self.payload_len(),
            Request::Scan { after, .. } => after.as_ref().map_or(0, Bytes::len),
            Request::Batch(requests) => requests
                .iter()
                .map(|r| BATCH_ITEM_OVERHEAD + r.msg.held_len())
                .sum(),
            _ => 0,
        }
    }

    /// Which batch this request may travel in, if any: reads and writes go in separate
    /// batches, so a read never waits for a write's fsync.
    pub fn batch_kind(&self) -> Option<BatchKind> {
        match self {
            Request::Fetch { .. } => Some(BatchKind::Read),
            Request::Store { .. } | Request::Forget { .. } => Some(BatchKind::Write),
            _ => None,
        }
    }

    /// Bytes of key and value a batchable request carries, to keep batches well under the frame
    /// limit (0 for the others).
    pub fn payload_len(&self) -> usize {
        match self {
            Request::Store { key, value, .. } => key.len() + value.as_ref().map_or(0, Bytes::len),
            Request::Fetch { key } | Request::Forget { key, .. } => key.len(),
            _ => 0,
        }
    }
}

/// The two kinds of [`Request::Batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// `Fetch` only: answered from memory.
    Read,
    /// `Store` and `Forget`: answered once their log append is done (and synced, under `always`).
    Write,
}

impl Response {
    /// Bytes of key and value this answer carries (0 for those without), to split batch
    /// answers that would not fit in one frame.
    pub fn payload_len(&self) -> usize {
        match self {
            Response::Fetched { value, .. } | Response::Value { value, .. } => {
                value.as_ref().map_or(0, Bytes::len)
            }
            Response::Batch(answers) => answers
                .iter()
                .map(|a| BATCH_ITEM_OVERHEAD + a.msg.as_ref().map_or(0, Response::payload_len))
                .sum(),
            _ => 0,
        }
    }
}

/// Every successful answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Response {
    /// Handshake accepted.
    Hello { protocol: u32, role: Role },
    /// A put or delete reached a write quorum at `version`.
    Written { version: Version },
    /// The value of a key; `value` is `None` when it does not exist or was deleted.
    Value {
        version: Version,
        value: Option<Bytes>,
    },
    /// Answer to [`Request::Locate`].
    Located(Location),
    /// Answer to [`Request::Status`]; boxed, because an answer is moved several times per
    /// request and the status alone is more than three times the size of any other answer.
    Status(Box<ClusterStatus>),
    /// Answer to [`Request::Check`].
    Checked(CheckReport),
    /// A node was added (spawned) with this id.
    NodeAdded { node: NodeId },
    /// The request was carried out and has nothing to report.
    Done,
    /// A node's registration was accepted under this id.
    Registered { node: NodeId },
    /// A node's answer to [`Request::Store`]: whether it applied, and the version it now holds.
    Stored { applied: bool, version: Version },
    /// A node's copy of a key: `Version::ZERO` when it holds nothing, `value: None` for a tombstone.
    Fetched {
        version: Version,
        value: Option<Bytes>,
    },
    /// A page of a node's keys; `next` is where to continue, `None` at the end.
    Scanned {
        entries: Vec<ScanEntry>,
        next: Option<Bytes>,
    },
    /// Answer to [`Request::Batch`]: one answer per request of the batch, under its id.
    Batch(Vec<Envelope<Reply>>),
}

/// One key of a node's [`Response::Scanned`] page.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ScanEntry {
    pub key: Bytes,
    pub version: Version,
    pub tombstone: bool,
    /// Bytes of the value (0 for a tombstone), for transfer accounting.
    pub value_len: u64,
}

/// Where a key lives.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Location {
    /// The version the metadata names (`0` if the key was never written).
    pub version: Version,
    pub tombstone: bool,
    pub replicas: Vec<ReplicaInfo>,
    /// Reads wait after an unclean stop (under `--meta-fsync never`) for nodes not yet
    /// reconciled, so the metadata may lack a newer version than it names. Must stay the
    /// last field: left out of the encoding when false, and decoded as false when missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reads_wait: bool,
}

/// One replica of a key, as `locate` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReplicaInfo {
    pub node: NodeId,
    pub addr: String,
    pub state: NodeState,
    /// The version the node reported holding; `None` when it could not be asked.
    pub version: Option<Version>,
}

/// One node as `status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub addr: String,
    pub state: NodeState,
    /// OS process id, for nodes the coordinator spawned or that reported one.
    pub pid: Option<u32>,
    /// Whether the coordinator spawned this node (and so can signal it).
    pub spawned: bool,
    pub stats: NodeStats,
    /// Milliseconds since the last heartbeat, `None` if none arrived since the coordinator started.
    pub last_heartbeat_ms: Option<u64>,
}

/// Progress of one background job (re-replication, migration, decommission).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JobProgress {
    pub kind: String,
    pub keys_done: u64,
    pub keys_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Estimated seconds to completion, `None` before there is a rate to go by.
    pub eta_secs: Option<f64>,
}

/// Answer to [`Request::Status`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    pub nodes: Vec<NodeInfo>,
    /// Live keys (deleted keys excluded).
    pub keys: u64,
    /// Live keys with fewer than `rf` replicas on `up` nodes.
    pub under_replicated: u64,
    /// Live keys not (yet) on exactly their preference list: migration still to do.
    pub misplaced: u64,
    /// Deleted keys whose tombstones are not collected yet.
    #[serde(default)]
    pub tombstones: u64,
    #[serde(default)]
    pub collection: CollectionStatus,
    /// Replication factor the cluster aims for.
    pub rf: u32,
    /// Write quorum.
    pub write_quorum: u32,
    /// Fewer than `rf` nodes are up: writes may fail or land on fewer replicas.
    pub degraded: bool,
    pub jobs: Vec<JobProgress>,
    /// Where acknowledged writes spent their time.
    #[serde(default)]
    pub writes: WriteTimings,
}

/// Tombstone collection (see the coordinator's `tombstones` module).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct CollectionStatus {
    /// The version floor: a node's copy of a key the metadata does not hold, at this version
    /// or below, is a deleted key's.
    pub floor: Version,
    /// Collection passes since the coordinator started.
    pub passes: u64,
    /// Nodes to reconcile before the floor may rise (after a start that did not follow a
    /// clean shutdown).
    pub waiting_for: Vec<NodeId>,
    /// Reconciliations since the coordinator started, by node: those that looked at every key
    /// the node reported, and those that ended early (a scan failed, or the node did not
    /// answer for some key) and so do not count towards the floor.
    #[serde(default)]
    pub reconciliations: Vec<NodeReconciliations>,
    /// Reads are refused until fewer of `waiting_for` are left than the write quorum: the
    /// metadata may lack writes they acknowledged before an unclean stop under
    /// `--meta-fsync never`.
    #[serde(default)]
    pub reads_wait: bool,
}

/// How often one node was reconciled to the end, and how often not (see [`CollectionStatus`]).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeReconciliations {
    pub node: NodeId,
    pub complete: u64,
    pub incomplete: u64,
}

/// Where the coordinator's acknowledged writes spent their time, summed since it started:
/// each stage in microseconds, so that a stage over `count` is its average per write, and
/// the difference of two readings is what happened between them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteTimings {
    /// Writes acknowledged.
    pub count: u64,
    /// Waiting for the key's lock, held by an earlier write to it until that write's
    /// metadata commit.
    pub lock_wait_us: u64,
    /// From queueing the stores to the write quorum's answers: the nodes' log appends and,
    /// under `--fsync always`, their fsyncs.
    pub quorum_wait_us: u64,
    /// The metadata commit that records the write; under `--meta-fsync always`, its fsync.
    pub commit_wait_us: u64,
}

/// Answer to [`Request::Check`]; each key counts in exactly one of the last four fields.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckReport {
    pub keys: u64,
    /// `rf` live replicas, each holding the metadata's version.
    pub healthy: u64,
    /// At least one live replica with the right version, but fewer than `rf`.
    pub under_replicated: u64,
    /// No live replica holds the metadata's version.
    pub lost: u64,
    /// A listed replica is live but holds another version.
    pub stale: u64,
    /// Reads wait after an unclean stop for nodes not yet reconciled: the counts compare
    /// the replicas with a metadata that may lack newer versions. Must stay the last field
    /// (see [`Location::reads_wait`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reads_wait: bool,
}

impl CheckReport {
    /// True when every key is healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy == self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers are moved through the call table, futures and channels on every request, so a
    /// large variant kept inline makes every GET pay for copying it.
    #[test]
    fn answers_stay_small() {
        assert!(
            std::mem::size_of::<Reply>() <= 64,
            "{}",
            std::mem::size_of::<Reply>()
        );
        assert!(std::mem::size_of::<Envelope<Reply>>() <= 72);
    }

    /// A plain removal is encoded as it was before `accept_loss` existed, so either build
    /// decodes the other's; the flag round-trips when set.
    #[test]
    fn a_plain_removal_is_encoded_without_the_flag() {
        /// The variant as it was (variants are encoded by name).
        #[derive(Serialize)]
        enum Before {
            NodeRemove { node: NodeId },
        }
        let plain = Request::NodeRemove {
            node: NodeId(3),
            accept_loss: false,
        };
        let before = rmp_serde::to_vec(&Before::NodeRemove { node: NodeId(3) }).unwrap();
        assert_eq!(rmp_serde::to_vec(&plain).unwrap(), before);
        assert_eq!(rmp_serde::from_slice::<Request>(&before).unwrap(), plain);
        let forced = Request::NodeRemove {
            node: NodeId(3),
            accept_loss: true,
        };
        let bytes = rmp_serde::to_vec(&forced).unwrap();
        assert_ne!(bytes, before);
        assert_eq!(rmp_serde::from_slice::<Request>(&bytes).unwrap(), forced);
    }
}

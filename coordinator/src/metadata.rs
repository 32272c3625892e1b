//! The metadata database: which version of each key exists and which nodes hold it.
//!
//! Persisted in redb (`meta.redb` in the coordinator's data directory) and mirrored in memory
//! for reads. All writes go through one writer thread that drains its queue into a single
//! transaction (group commit): a burst of N writes costs one fsync, not N. The in-memory mirror
//! is updated only after the transaction is durable, so nothing is ever visible that a crash
//! could take back.
//!
//! Tables:
//! - `keys`: key -> MessagePack [`KeyMeta`].
//! - `node_keys`: `node id (u64 BE) ++ key` -> `()`: the node index, so "what did node N
//!   hold" is a range scan, not a scan of every key.
//! - `nodes`: node id -> MessagePack [`NodeRecord`], the node registry.
//! - `counters`: `version_ceiling`: versions below it may have been handed out. A restarted
//!   coordinator starts at the ceiling, so versions never go backwards or repeat.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ringkv_common::{NodeId, Version};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{error, info};

const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
const NODE_KEYS: TableDefinition<&[u8], ()> = TableDefinition::new("node_keys");
const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("nodes");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const VERSION_CEILING: &str = "version_ceiling";

/// Versions reserved per durable lease. Large enough that a lease write is rare (one per
/// million writes), small enough that a restart skipping the rest of a lease does not matter
/// for a u64.
const VERSION_LEASE: u64 = 1_000_000;

/// redb page cache size.
const REDB_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Shards of the in-memory mirror, to keep lock contention low under many connections.
const SHARDS: usize = 64;

/// What the metadata knows about one key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeyMeta {
    /// The newest version that reached a replica.
    pub version: Version,
    /// Nodes known to hold `version`.
    pub replicas: Vec<NodeId>,
    /// `version` deletes the key.
    pub tombstone: bool,
}

/// A node in the persistent registry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Last address it registered with.
    pub addr: String,
    pub data_dir: String,
    /// Spawned (and so restartable) by the coordinator.
    pub spawned: bool,
    pub pid: Option<u32>,
    /// Decommissioned: never spawned or placed again.
    pub removed: bool,
    /// Being decommissioned; a restarted coordinator resumes the decommission.
    pub leaving: bool,
}

/// A change to one key's metadata, applied by the writer against the current state so that
/// concurrent updates never undo each other.
#[derive(Clone, Debug)]
pub enum KeyUpdate {
    /// Replace the entry, unless the entry already holds a newer version.
    Set(KeyMeta),
    /// Note that `node` now holds `version` (ignored if the key moved on).
    AddReplica { version: Version, node: NodeId },
    /// Note that `node` no longer holds the key.
    RemoveReplica { node: NodeId },
}

/// Errors of the metadata store.
#[derive(thiserror::Error, Debug)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    #[error("metadata record is corrupt: {0}")]
    Decode(String),
    #[error("metadata writer has stopped")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn dberr<E: Into<redb::Error>>(e: E) -> MetaError {
    MetaError::Db(e.into())
}

enum Op {
    Key(Bytes, KeyUpdate),
    Node(NodeRecord),
    Ceiling(u64),
}

struct Job {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<(), String>>,
}

type Shard = RwLock<HashMap<Bytes, KeyMeta>>;

struct VersionLease {
    next: u64,
    ceiling: u64,
}

/// Handle to the metadata store; cheap to share.
pub struct Metadata {
    db: Arc<Database>,
    shards: Arc<Vec<Shard>>,
    writer: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    lease: Mutex<VersionLease>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn shard_of(key: &[u8]) -> usize {
    (ringkv_common::ring::key_hash(key) as usize) % SHARDS
}

fn index_key(node: NodeId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&node.0.to_be_bytes());
    k.extend_from_slice(key);
    k
}

impl Metadata {
    /// Open (or create) the database in `dir` and load it. Blocking.
    pub fn open(dir: &Path) -> Result<(Metadata, Vec<NodeRecord>), MetaError> {
        Metadata::open_with_group(dir, MAX_GROUP)
    }

    /// Like [`Metadata::open`], folding at most `max_group` queued jobs into one transaction
    /// (1 turns group commit off; the benchmark compares the two).
    pub fn open_with_group(
        dir: &Path,
        max_group: usize,
    ) -> Result<(Metadata, Vec<NodeRecord>), MetaError> {
        let max_group = max_group.max(1);
        std::fs::create_dir_all(dir)?;
        // Reads are served from the in-memory mirror, so redb's page cache only needs to hold
        // what commits touch; its 1 GiB default would cost hundreds of bytes per key.
        let db = Database::builder()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(dir.join("meta.redb"))
            .map_err(dberr)?;
        {
            // Make sure every table exists so readers never see "table missing".
            let txn = db.begin_write().map_err(dberr)?;
            txn.open_table(KEYS).map_err(dberr)?;
            txn.open_table(NODE_KEYS).map_err(dberr)?;
            txn.open_table(NODES).map_err(dberr)?;
            txn.open_table(COUNTERS).map_err(dberr)?;
            txn.commit().map_err(dberr)?;
        }
        let shards: Vec<Shard> = (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect();
        let mut nodes = Vec::new();
        let ceiling;
        {
            let txn = db.begin_read().map_err(dberr)?;
            let keys = txn.open_table(KEYS).map_err(dberr)?;
            let mut count = 0u64;
            for row in keys.iter().map_err(dberr)? {
                let (k, v) = row.map_err(dberr)?;
                let meta: KeyMeta = rmp_serde::from_slice(v.value())
                    .map_err(|e| MetaError::Decode(e.to_string()))?;
                let key = Bytes::copy_from_slice(k.value());
                if let Some(shard) = shards.get(shard_of(&key)) {
                    shard
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, meta);
                }
                count += 1;
            }
            let table = txn.open_table(NODES).map_err(dberr)?;
            for row in table.iter().map_err(dberr)? {
                let (_, v) = row.map_err(dberr)?;
                nodes.push(
                    rmp_serde::from_slice(v.value())
                        .map_err(|e| MetaError::Decode(e.to_string()))?,
                );
            }
            let counters = txn.open_table(COUNTERS).map_err(dberr)?;
            ceiling = counters
                .get(VERSION_CEILING)
                .map_err(dberr)?
                .map(|v| v.value())
                .unwrap_or(1);
            info!(
                keys = count,
                nodes = nodes.len(),
                ceiling,
                "metadata loaded"
            );
        }
        let db = Arc::new(db);
        let shards = Arc::new(shards);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = {
            let db = db.clone();
            let shards = shards.clone();
            std::thread::Builder::new()
                .name("meta-writer".into())
                .spawn(move || writer_loop(&db, &shards, rx, max_group))?
        };
        let meta = Metadata {
            db,
            shards,
            writer: Mutex::new(Some(tx)),
            // Start at the old ceiling: nothing at or above it was ever handed out.
            lease: Mutex::new(VersionLease {
                next: ceiling,
                ceiling,
            }),
            thread: Mutex::new(Some(thread)),
        };
        Ok((meta, nodes))
    }

    /// The metadata of `key`, if it was ever written.
    pub fn get(&self, key: &[u8]) -> Option<KeyMeta> {
        let shard = self.shards.get(shard_of(key))?;
        shard
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Call `f` on every key (a consistent view per shard, not across shards).
    pub fn for_each(&self, mut f: impl FnMut(&Bytes, &KeyMeta)) {
        for shard in self.shards.iter() {
            let guard = shard.read().unwrap_or_else(|p| p.into_inner());
            for (k, m) in guard.iter() {
                f(k, m);
            }
        }
    }

    /// Number of keys in the mirror, tombstones included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no key was ever written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys the node index says `node` holds. Blocking: call from a blocking context.
    pub fn keys_on_node(&self, node: NodeId) -> Result<Vec<Bytes>, MetaError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(NODE_KEYS).map_err(dberr)?;
        let start = index_key(node, b"");
        let mut out = Vec::new();
        for row in table.range(start.as_slice()..).map_err(dberr)? {
            let (k, _) = row.map_err(dberr)?;
            let raw = k.value();
            match raw.split_first_chunk::<8>() {
                Some((id, key)) if u64::from_be_bytes(*id) == node.0 => {
                    out.push(Bytes::copy_from_slice(key))
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// A fresh version, newer than every version handed out before, across restarts too.
    pub async fn next_version(&self) -> Result<Version, MetaError> {
        loop {
            let needed = {
                let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
                if lease.next < lease.ceiling {
                    let v = lease.next;
                    lease.next += 1;
                    return Ok(Version(v));
                }
                lease.ceiling + VERSION_LEASE
            };
            // Persist a higher ceiling before handing out anything below it.
            self.submit(vec![Op::Ceiling(needed)]).await?;
            let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
            lease.ceiling = lease.ceiling.max(needed);
        }
    }

    /// Make `updates` durable (one group commit), then visible.
    pub async fn update(&self, updates: Vec<(Bytes, KeyUpdate)>) -> Result<(), MetaError> {
        self.submit(updates.into_iter().map(|(k, u)| Op::Key(k, u)).collect())
            .await
    }

    /// Make one node record durable.
    pub async fn save_node(&self, record: NodeRecord) -> Result<(), MetaError> {
        self.submit(vec![Op::Node(record)]).await
    }

    async fn submit(&self, ops: Vec<Op>) -> Result<(), MetaError> {
        let (done, rx) = oneshot::channel();
        {
            let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let tx = guard.as_ref().ok_or(MetaError::Closed)?;
            tx.send(Job { ops, done }).map_err(|_| MetaError::Closed)?;
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(MetaError::Decode(e)),
            Err(_) => Err(MetaError::Closed),
        }
    }

    /// Stop the writer after it commits what is queued. Blocking; idempotent.
    pub fn close(&self) {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Metadata {
    fn drop(&mut self) {
        self.close();
    }
}

/// Largest number of queued jobs folded into one transaction; bounds commit latency.
const MAX_GROUP: usize = 4096;

fn writer_loop(
    db: &Database,
    shards: &[Shard],
    rx: std::sync::mpsc::Receiver<Job>,
    max_group: usize,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_group {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        match commit_group(db, shards, &jobs) {
            Ok(changes) => {
                for (key, meta) in changes {
                    if let Some(shard) = shards.get(shard_of(&key)) {
                        let mut guard = shard.write().unwrap_or_else(|p| p.into_inner());
                        match meta {
                            Some(m) => guard.insert(key, m),
                            None => guard.remove(&key),
                        };
                    }
                }
                for job in jobs {
                    let _ = job.done.send(Ok(()));
                }
            }
            Err(e) => {
                error!(error = %e, "metadata commit failed");
                for job in jobs {
                    let _ = job.done.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// One transaction for a group of jobs. Returns the new mirror entries to publish.
fn commit_group(
    db: &Database,
    shards: &[Shard],
    jobs: &[Job],
) -> Result<Vec<(Bytes, Option<KeyMeta>)>, MetaError> {
    // Working copy of the entries this group touches, starting from the mirror (which
    // equals the durable state: only this thread writes either).
    let mut touched: HashMap<Bytes, Option<KeyMeta>> = HashMap::new();
    let txn = db.begin_write().map_err(dberr)?;
    {
        let mut keys = txn.open_table(KEYS).map_err(dberr)?;
        let mut index = txn.open_table(NODE_KEYS).map_err(dberr)?;
        let mut nodes = txn.open_table(NODES).map_err(dberr)?;
        let mut counters = txn.open_table(COUNTERS).map_err(dberr)?;
        for job in jobs {
            for op in &job.ops {
                match op {
                    Op::Key(key, update) => {
                        let current = touched.entry(key.clone()).or_insert_with(|| {
                            shards.get(shard_of(key)).and_then(|s| {
                                s.read()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get(key)
                                    .cloned()
                            })
                        });
                        let before = current.clone();
                        apply_update(current, update);
                        if *current == before {
                            continue;
                        }
                        let old_nodes = before.map(|m| m.replicas).unwrap_or_default();
                        let new_nodes = current
                            .as_ref()
                            .map(|m| m.replicas.clone())
                            .unwrap_or_default();
                        for n in old_nodes.iter().filter(|n| !new_nodes.contains(n)) {
                            index.remove(index_key(*n, key).as_slice()).map_err(dberr)?;
                        }
                        for n in new_nodes.iter().filter(|n| !old_nodes.contains(n)) {
                            index
                                .insert(index_key(*n, key).as_slice(), ())
                                .map_err(dberr)?;
                        }
                        match current {
                            Some(meta) => {
                                let bytes = rmp_serde::to_vec(meta)
                                    .map_err(|e| MetaError::Decode(e.to_string()))?;
                                keys.insert(key.as_ref(), bytes.as_slice()).map_err(dberr)?;
                            }
                            None => {
                                keys.remove(key.as_ref()).map_err(dberr)?;
                            }
                        }
                    }
                    Op::Node(record) => {
                        let bytes = rmp_serde::to_vec(record)
                            .map_err(|e| MetaError::Decode(e.to_string()))?;
                        nodes.insert(record.id.0, bytes.as_slice()).map_err(dberr)?;
                    }
                    Op::Ceiling(c) => {
                        let cur = counters
                            .get(VERSION_CEILING)
                            .map_err(dberr)?
                            .map(|v| v.value());
                        if cur.is_none_or(|cur| *c > cur) {
                            counters.insert(VERSION_CEILING, *c).map_err(dberr)?;
                        }
                    }
                }
            }
        }
    }
    txn.commit().map_err(dberr)?;
    Ok(touched.into_iter().collect())
}

/// Apply `update` to `current` under the "versions never go backwards" rule.
fn apply_update(current: &mut Option<KeyMeta>, update: &KeyUpdate) {
    match update {
        KeyUpdate::Set(new) => {
            if current.as_ref().is_none_or(|c| new.version >= c.version) {
                *current = Some(new.clone());
            }
        }
        KeyUpdate::AddReplica { version, node } => {
            if let Some(c) = current.as_mut() {
                if c.version == *version && !c.replicas.contains(node) {
                    c.replicas.push(*node);
                }
            }
        }
        KeyUpdate::RemoveReplica { node } => {
            if let Some(c) = current.as_mut() {
                c.replicas.retain(|n| n != node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: u64, nodes: &[u64]) -> KeyMeta {
        KeyMeta {
            version: Version(v),
            replicas: nodes.iter().map(|&n| NodeId(n)).collect(),
            tombstone: false,
        }
    }

    #[tokio::test]
    async fn updates_persist_and_never_go_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let k = Bytes::from_static(b"k");
        {
            let (m, _) = Metadata::open(dir.path()).unwrap();
            m.update(vec![(k.clone(), KeyUpdate::Set(meta(5, &[1, 2])))])
                .await
                .unwrap();
            m.update(vec![(k.clone(), KeyUpdate::Set(meta(3, &[9])))])
                .await
                .unwrap();
            m.update(vec![(
                k.clone(),
                KeyUpdate::AddReplica {
                    version: Version(4),
                    node: NodeId(7),
                },
            )])
            .await
            .unwrap();
            m.update(vec![(
                k.clone(),
                KeyUpdate::AddReplica {
                    version: Version(5),
                    node: NodeId(3),
                },
            )])
            .await
            .unwrap();
            assert_eq!(m.get(b"k"), Some(meta(5, &[1, 2, 3])));
            m.update(vec![(
                k.clone(),
                KeyUpdate::RemoveReplica { node: NodeId(1) },
            )])
            .await
            .unwrap();
            m.close();
        }
        let (m, _) = Metadata::open(dir.path()).unwrap();
        assert_eq!(m.get(b"k"), Some(meta(5, &[2, 3])));
        assert_eq!(m.keys_on_node(NodeId(2)).unwrap(), vec![k.clone()]);
        assert_eq!(m.keys_on_node(NodeId(3)).unwrap(), vec![k]);
        assert!(m.keys_on_node(NodeId(1)).unwrap().is_empty());
    }

    #[tokio::test]
    async fn versions_increase_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (m, _) = Metadata::open(dir.path()).unwrap();
            for _ in 0..10 {
                seen.push(m.next_version().await.unwrap());
            }
            m.close();
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    #[tokio::test]
    async fn concurrent_updates_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = Metadata::open(dir.path()).unwrap();
        let m = Arc::new(m);
        let mut tasks = Vec::new();
        for i in 0..500u64 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                let key = Bytes::from(format!("key-{i}"));
                m.update(vec![(key, KeyUpdate::Set(meta(i + 1, &[1, 2, 3])))])
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(m.len(), 500);
        assert_eq!(m.keys_on_node(NodeId(2)).unwrap().len(), 500);
    }

    #[tokio::test]
    async fn registry_persists() {
        let dir = tempfile::tempdir().unwrap();
        let rec = NodeRecord {
            id: NodeId(4),
            addr: "127.0.0.1:1".into(),
            data_dir: "/x".into(),
            spawned: true,
            pid: Some(9),
            removed: false,
            leaving: false,
        };
        {
            let (m, nodes) = Metadata::open(dir.path()).unwrap();
            assert!(nodes.is_empty());
            m.save_node(rec.clone()).await.unwrap();
        }
        let (_, nodes) = Metadata::open(dir.path()).unwrap();
        assert_eq!(nodes, vec![rec]);
    }
}

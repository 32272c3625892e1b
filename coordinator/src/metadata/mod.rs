//! The metadata: which version of each key exists and which nodes hold it, the node
//! registry, and the version lease.
//!
//! Everything lives in memory, in a sharded map that serves reads, and is persisted in the
//! [`journal`] (`meta.log` in the coordinator's data directory), an append-only file of
//! changes that is rewritten as a snapshot when it grows. The journal and the map change
//! together under one lock, so the file's order is the map's order.
//!
//! Changes that must be synced (every change under `--meta-fsync always`; node records,
//! lease ceilings, version floors and deletions under either policy) go through a writer thread that drains
//! its queue into a single journal write and fsync (group commit): a burst of N changes
//! costs one `write` and one fsync, and the map is updated only after the sync, so nothing
//! is visible that a crash could take back. The other changes under `never` are committed by
//! the calling task itself: it appends them to the journal's buffer and publishes them at
//! once, and the buffer reaches the file when it fills or within [`FLUSH_EVERY`]. That spares
//! each write a hand-off to another thread and back; what a crash takes from the end of the
//! file is learnt back from the nodes by the reconciliation every unclean start runs, and
//! reads wait for it ([`Metadata::read_gate`]): a run under `never` notes in the journal,
//! synced before it acknowledges anything, that its key changes may be lost from the file.
//!
//! "Which keys did node N hold" is answered by a scan of the in-memory map: it is asked only
//! when a node leaves or returns, and keeping a second index would cost memory on every key.
//! The version lease persists a ceiling: a restarted coordinator starts at it, so versions
//! never go backwards or repeat.
//!
//! Deletions are collected under a version **floor**, also persisted: every version at or
//! below it is settled, so a key the metadata does not hold at such a version is gone, and a
//! node's copy of it is garbage to forget, never a write to learn back. The floor is raised
//! (and synced) only below every write still in flight ([`Metadata::settled_floor`]), so an
//! acknowledged write is always in the journal before a floor that covers its version, and
//! only then are tombstones at or below it removed ([`KeyUpdate::Collect`]).

mod in_flight;
pub mod journal;
mod key_map;

use ringkv_common::sync::{MutexExt, RwLockExt};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use ringkv_common::{NodeId, Version};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use in_flight::InFlight;

pub use journal::MetaFsync;
use journal::{Entry, EntryRef, Journal, JournalError, Snapshot};
use key_map::KeyMap;

/// Versions reserved per durable lease. Large enough that a lease write is rare (one per
/// million writes), small enough that a restart skipping the rest of a lease does not matter
/// for a u64.
const VERSION_LEASE: u64 = 1_000_000;

/// Shards of the in-memory mirror, to keep lock contention low under many connections.
const SHARDS: usize = 64;

/// The nodes of one key, inline up to three (the default replication factor): a key's entry
/// then needs no allocation of its own, and reading it copies no heap memory. More (a move
/// in progress, a larger `--rf`) spill to the heap. Serialised as a plain sequence.
pub type Replicas = smallvec::SmallVec<[NodeId; 3]>;

/// What the metadata knows about one key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeyMeta {
    /// The newest version that reached a replica.
    pub version: Version,
    /// Nodes known to hold `version`.
    pub replicas: Replicas,
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
    /// Owes a reconciliation: set by a start that did not follow a clean shutdown, cleared
    /// once the node has been reconciled to the end. The version floor does not rise while
    /// any node that is not removed owes one (see `tombstones`). Last and defaulted, so that
    /// records written before it read the same.
    #[serde(default)]
    pub owes_reconciliation: bool,
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
    /// Remove the entry if it is still a tombstone at `version`: a deletion at or below the
    /// floor, collected.
    Collect { version: Version },
}

/// Errors of the metadata store.
#[derive(thiserror::Error, Debug)]
pub enum MetaError {
    #[error("metadata journal: {0}")]
    Journal(#[from] JournalError),
    #[error("metadata write failed: {0}")]
    Write(String),
    #[error("metadata writer has stopped")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

enum Op {
    Key(Bytes, KeyUpdate),
    Node(NodeRecord),
    Ceiling(u64),
    Floor(u64),
}

struct Job {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<(), String>>,
}

/// One shard of the key map.
type Shard = RwLock<KeyMap>;

struct VersionLease {
    next: u64,
    ceiling: u64,
    /// Versions handed out to writes that have not finished (see [`VersionTicket`]).
    in_flight: InFlight,
}

/// How the metadata is persisted.
#[derive(Clone, Copy, Debug)]
pub struct MetaOptions {
    pub fsync: MetaFsync,
    /// Most queued jobs folded into one journal write (1 turns group commit off).
    pub max_group: usize,
    /// The journal is not rewritten while smaller than this.
    pub rewrite_min_bytes: u64,
    /// Replicas a write reaches before it is acknowledged (the coordinator's `--write-quorum`):
    /// under `never`, what an unclean stop may take from the journal is on at least this many
    /// nodes (see [`Metadata::read_gate`]).
    pub write_quorum: u8,
}

impl Default for MetaOptions {
    fn default() -> Self {
        MetaOptions {
            fsync: MetaFsync::Always,
            max_group: MAX_GROUP,
            rewrite_min_bytes: journal::REWRITE_MIN_BYTES,
            write_quorum: 2,
        }
    }
}

/// Handle to the metadata store; cheap to share.
pub struct Metadata {
    /// Changes may be missing since the last open: the journal had a torn or damaged tail,
    /// or it was not closed cleanly.
    may_lack_changes: bool,
    /// See [`Metadata::read_gate`].
    read_gate: Option<u8>,
    shards: Arc<Vec<Shard>>,
    writer: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    /// The journal and the registry; the writer thread and inline committers share it.
    state: Arc<Mutex<Writer>>,
    /// Jobs committed by their own callers (under `never`, for changes that need no sync).
    inline: Option<Arc<InlineQueue>>,
    lease: Arc<Mutex<VersionLease>>,
    /// The version floor (see the module docs); raised only by the writer, after its sync.
    floor: Arc<AtomicU64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A version handed out to a write, which counts as in flight until the ticket is dropped:
/// no floor is raised to it before then (see [`Metadata::settled_floor`]). Drop it once the
/// write's metadata change is committed, or once the write gave up.
#[must_use = "the version counts as settled as soon as the ticket is dropped"]
pub struct VersionTicket {
    lease: Arc<Mutex<VersionLease>>,
    version: Version,
}

impl VersionTicket {
    /// The version handed out.
    pub fn version(&self) -> Version {
        self.version
    }
}

impl Drop for VersionTicket {
    fn drop(&mut self) {
        self.lease
            .lock_unpoisoned()
            .in_flight
            .remove(self.version.0);
    }
}

fn shard_of(key: &[u8]) -> usize {
    (ringkv_common::ring::key_hash(key) as usize) % SHARDS
}

impl Metadata {
    /// Open (or create) the metadata in `dir`, syncing every change, and load it. Blocking.
    pub fn open(dir: &Path) -> Result<(Metadata, Vec<NodeRecord>), MetaError> {
        Metadata::open_with(dir, MetaOptions::default())
    }

    /// Open with explicit [`MetaOptions`]. Blocking.
    pub fn open_with(
        dir: &Path,
        options: MetaOptions,
    ) -> Result<(Metadata, Vec<NodeRecord>), MetaError> {
        let MetaOptions {
            fsync,
            max_group,
            rewrite_min_bytes,
            write_quorum,
        } = options;
        let write_quorum = write_quorum.max(1);
        let max_group = max_group.max(1);
        std::fs::create_dir_all(dir)?;
        let shards: Vec<Shard> = (0..SHARDS)
            .map(|_| RwLock::new(KeyMap::default()))
            .collect();
        let mut nodes: BTreeMap<u64, NodeRecord> = BTreeMap::new();
        let mut ceiling = 1u64;
        let mut floor = 0u64;
        let mut unsynced = 0u8;
        let (mut journal, report) =
            Journal::open(dir, fsync, rewrite_min_bytes, |entry| match entry {
                Entry::Key { key, meta } => {
                    if let Some(shard) = shards.get(shard_of(&key)) {
                        let mut guard = shard.write_unpoisoned();
                        guard.set(&key, meta);
                    }
                }
                Entry::Node(record) => {
                    nodes.insert(record.id.0, record);
                }
                Entry::Ceiling(c) => ceiling = ceiling.max(c),
                Entry::Floor(f) => floor = floor.max(f),
                Entry::Unsynced(quorum) => unsynced = quorum,
                Entry::Clean => {}
            })?;
        if report.discarded_bytes > 0 {
            warn!(
                bytes = report.discarded_bytes,
                moved_to = ?report.discarded_to,
                "metadata journal had a torn or damaged tail; kept the valid prefix \
                 (changes after it are recovered from the nodes as they register)"
            );
        }
        let keys: usize = shards.iter().map(|s| s.read_unpoisoned().len()).sum();
        // The live part of the file, estimated from the share of entries still current.
        if report.entries > 0 {
            let live = (keys + nodes.len() + 1) as u64;
            journal.set_base(journal.size().saturating_mul(live) / report.entries.max(live));
        }
        info!(
            keys,
            nodes = nodes.len(),
            ceiling,
            floor,
            ?fsync,
            "metadata loaded"
        );
        // After anything but a graceful close, changes may be missing (a damaged tail, or the
        // unsynced end of the file under `never`, whatever this run's policy is), and a
        // reconciliation an earlier start began may not have finished.
        let may_lack_changes = report.discarded_bytes > 0 || (!report.clean && report.entries > 0);
        // Acknowledged key changes the journal may lack (an unclean stop of a run that did not
        // sync them, or of one that had not yet learnt such changes back) are on at least
        // `read_gate` nodes each, and reads must wait until one of those has been reconciled.
        // Nodes owe a reconciliation from the first unclean start until they are reconciled,
        // persisted in their records, so the gate outlives a clean restart made in between.
        let owing = nodes.values().any(|r| r.owes_reconciliation && !r.removed);
        let read_gate = (unsynced > 0 && (may_lack_changes || owing)).then_some(unsynced);
        // What the next start must assume of this run's key changes.
        let next_unsynced = match fsync {
            MetaFsync::Never => read_gate.map_or(write_quorum, |q| q.min(write_quorum)),
            MetaFsync::Always => read_gate.unwrap_or(0),
        };
        if next_unsynced != unsynced {
            // Synced before any key change of this run is acknowledged.
            journal.append(&EntryRef::Unsynced(next_unsynced))?;
        }
        if report.clean {
            // The clean marker must not stay last: a crash of this run must not pass for a
            // graceful close. A synced no-op entry after it says the journal is open again.
            journal.append(&EntryRef::Ceiling(ceiling))?;
        }
        if report.clean || next_unsynced != unsynced {
            journal.commit(true)?;
        }
        let shards = Arc::new(shards);
        let records: Vec<NodeRecord> = nodes.values().cloned().collect();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let floor = Arc::new(AtomicU64::new(floor));
        let state = Arc::new(Mutex::new(Writer {
            journal,
            shards: shards.clone(),
            nodes,
            ceiling,
            floor: floor.clone(),
            failed: None,
            closed: false,
            rewriting: false,
            rewrites: 0,
            unsynced: next_unsynced,
        }));
        let inline = (fsync == MetaFsync::Never).then(|| Arc::new(InlineQueue::default()));
        let thread = {
            let state = state.clone();
            let inline = inline.clone();
            std::thread::Builder::new()
                .name("meta-writer".into())
                .spawn(move || run_writer(state, inline, &rx, max_group))?
        };
        let meta = Metadata {
            may_lack_changes,
            read_gate,
            shards,
            writer: Mutex::new(Some(tx)),
            state,
            inline,
            // Start at the old ceiling: nothing at or above it was ever handed out.
            lease: Arc::new(Mutex::new(VersionLease {
                next: ceiling,
                ceiling,
                in_flight: InFlight::default(),
            })),
            floor,
            thread: Mutex::new(Some(thread)),
        };
        Ok((meta, records))
    }

    /// Whether the metadata may lack changes the nodes hold, so that every node must be
    /// reconciled before clients are served: the journal had a torn or damaged tail, or it
    /// was not closed cleanly (under `never` a machine crash may have taken its unsynced end,
    /// whatever policy this run uses, and an earlier reconciliation may not have finished).
    pub fn may_lack_changes(&self) -> bool {
        self.may_lack_changes
    }

    /// Reads must wait while at least this many nodes owe a reconciliation, if set: the
    /// journal may lack acknowledged key changes (a run under `--meta-fsync never` stopped
    /// uncleanly), and each of them reached this many replicas. While fewer nodes owe one, at
    /// least one holder of every such change has been reconciled, so the metadata knows the
    /// newest acknowledged version of every key again.
    pub fn read_gate(&self) -> Option<usize> {
        self.read_gate.map(usize::from)
    }

    /// The metadata of `key`, if it was ever written.
    pub fn get(&self, key: &[u8]) -> Option<KeyMeta> {
        let shard = self.shards.get(shard_of(key))?;
        shard.read_unpoisoned().get(key).cloned()
    }

    /// Call `f` on every key (a consistent view per shard, not across shards).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &KeyMeta)) {
        for shard in self.shards.iter() {
            let guard = shard.read_unpoisoned();
            for (k, m) in guard.iter() {
                f(k, m);
            }
        }
    }

    /// Number of keys in the mirror, tombstones included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read_unpoisoned().len()).sum()
    }

    /// Whether no key was ever written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys whose replicas include `node` (tombstones too). A scan of the map: blocking for
    /// a large map, so call it from a blocking context.
    pub fn keys_on_node(&self, node: NodeId) -> Vec<Bytes> {
        let mut out = Vec::new();
        self.for_each(|key, meta| {
            if meta.replicas.contains(&node) {
                out.push(Bytes::copy_from_slice(key));
            }
        });
        out
    }

    /// A fresh version, newer than every version handed out before, across restarts too,
    /// in flight until the ticket is dropped.
    pub async fn next_version(&self) -> Result<VersionTicket, MetaError> {
        loop {
            let needed = {
                let mut lease = self.lease.lock_unpoisoned();
                if lease.next > Version::MAX.0 {
                    // Only a journal entry no coordinator wrote can put it there.
                    return Err(MetaError::Write(format!(
                        "no versions left: the next would be {}, above the highest, {}",
                        lease.next,
                        Version::MAX
                    )));
                }
                if lease.next < lease.ceiling {
                    let v = lease.next;
                    lease.next += 1;
                    lease.in_flight.insert(v);
                    return Ok(VersionTicket {
                        lease: Arc::clone(&self.lease),
                        version: Version(v),
                    });
                }
                lease.next.max(lease.ceiling).saturating_add(VERSION_LEASE)
            };
            // Persist a higher ceiling before handing out anything below it.
            self.submit(vec![Op::Ceiling(needed)]).await?;
            let mut lease = self.lease.lock_unpoisoned();
            lease.ceiling = lease.ceiling.max(needed);
        }
    }

    /// Note that `version` exists on a node: versions handed out from now on are above it.
    /// Versions never repeat as long as the journal is intact; this keeps them moving forward
    /// even when a damaged journal lost a lease, since every version that reached a node is
    /// seen by the reconciliation of that node.
    /// A version above [`Version::MAX`] is ignored (no coordinator hands one out, and nodes
    /// refuse to store one): it would exhaust the versions left.
    pub fn observe_version(&self, version: Version) {
        if version > Version::MAX {
            warn!(%version, "ignored a version above the highest a coordinator hands out");
            return;
        }
        let mut lease = self.lease.lock_unpoisoned();
        if version.0 >= lease.next {
            lease.next = version.0.saturating_add(1);
        }
    }

    /// The version floor: a key the metadata does not hold at a version at or below it is
    /// gone (deleted, or never acknowledged).
    pub fn floor(&self) -> Version {
        Version(self.floor.load(Ordering::Acquire))
    }

    /// The next version to be handed out: every version handed out so far is below it.
    pub fn next_unassigned(&self) -> Version {
        Version(self.lease.lock_unpoisoned().next)
    }

    /// The highest floor that is safe now: below every version still in flight, and below
    /// every version not yet handed out. Every write at or below it has finished its
    /// metadata change (or given up).
    pub fn settled_floor(&self) -> Version {
        let lease = self.lease.lock_unpoisoned();
        let first_open = lease.in_flight.first().unwrap_or(lease.next);
        Version(first_open.saturating_sub(1))
    }

    /// Raise the floor to `floor` (never lowers it), synced whatever the policy: after it
    /// returns, tombstones at or below it may be collected. Pass a [`settled_floor`]
    /// reading.
    ///
    /// [`settled_floor`]: Metadata::settled_floor
    pub async fn raise_floor(&self, floor: Version) -> Result<(), MetaError> {
        if floor <= self.floor() {
            return Ok(());
        }
        self.submit(vec![Op::Floor(floor.0)]).await
    }

    /// Make `updates` durable (one group commit), then visible.
    pub async fn update(&self, updates: Vec<(Bytes, KeyUpdate)>) -> Result<(), MetaError> {
        self.submit(updates.into_iter().map(|(k, u)| Op::Key(k, u)).collect())
            .await
    }

    /// [`update`](Metadata::update) of one key.
    pub async fn update_key(&self, key: Bytes, update: KeyUpdate) -> Result<(), MetaError> {
        self.submit(vec![Op::Key(key, update)]).await
    }

    /// Make one node record durable.
    pub async fn save_node(&self, record: NodeRecord) -> Result<(), MetaError> {
        self.submit(vec![Op::Node(record)]).await
    }

    async fn submit(&self, ops: Vec<Op>) -> Result<(), MetaError> {
        let ops = match (&self.inline, ops.as_slice()) {
            (Some(queue), [op @ Op::Key(key, update)]) if !op_needs_sync(op) => {
                match self.commit_now(queue, key, update) {
                    Some(outcome) => return outcome,
                    None => ops,
                }
            }
            _ => ops,
        };
        let (done, rx) = oneshot::channel();
        let job = Job { ops, done };
        match &self.inline {
            Some(queue) if !job.needs_sync() => {
                queue.jobs.lock_unpoisoned().push(job);
                if commit_inline(&self.state, queue) == Some(true) {
                    self.wake_for_rewrite();
                }
            }
            _ => {
                let guard = self.writer.lock_unpoisoned();
                let tx = guard.as_ref().ok_or(MetaError::Closed)?;
                tx.send(job).map_err(|_| MetaError::Closed)?;
            }
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(MetaError::Write(e)),
            Err(_) => Err(MetaError::Closed),
        }
    }

    /// Commit one key change inline at once, without queueing it: `None` when the journal's
    /// state is held or other inline changes wait before it (they keep their order).
    fn commit_now(
        &self,
        queue: &InlineQueue,
        key: &Bytes,
        update: &KeyUpdate,
    ) -> Option<Result<(), MetaError>> {
        let mut writer = match self.state.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if !queue.jobs.lock_unpoisoned().is_empty() {
            return None;
        }
        let outcome = writer.commit_alone(key, update);
        let rewrite = writer.rewrite_due();
        let drained = release(writer, &self.state, Some(queue));
        if rewrite || drained == Some(true) {
            self.wake_for_rewrite();
        }
        Some(outcome.map_err(MetaError::Write))
    }

    /// Rewriting takes a while: wake the writer thread to do it.
    fn wake_for_rewrite(&self) {
        if let Some(tx) = self.writer.lock_unpoisoned().as_ref() {
            let _ = tx.send(Job {
                ops: Vec::new(),
                done: oneshot::channel().0,
            });
        }
    }

    /// Journal rewrites finished since open.
    pub fn rewrites(&self) -> u64 {
        let writer = self.state.lock_unpoisoned();
        let rewrites = writer.rewrites;
        // After close() no writer thread comes by to take what was queued meanwhile.
        release(writer, &self.state, self.inline.as_deref());
        rewrites
    }

    /// Stop the writer after it commits what is queued. Blocking; idempotent.
    pub fn close(&self) {
        self.writer.lock_unpoisoned().take();
        if let Some(t) = self.thread.lock_unpoisoned().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Metadata {
    fn drop(&mut self) {
        self.close();
    }
}

/// Largest number of queued jobs folded into one journal write; bounds commit latency.
const MAX_GROUP: usize = 4096;

/// Longest an inline-committed change waits in the journal's buffer before it is written.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Buffered journal bytes at which an inline committer writes them out itself.
const INLINE_FLUSH_BYTES: usize = 256 * 1024;

/// Jobs waiting for whoever holds the writer state next.
#[derive(Default)]
struct InlineQueue {
    jobs: Mutex<Vec<Job>>,
}

impl Job {
    /// Whether this job must be synced whatever the policy: node records, lease ceilings,
    /// version floors and deletions, none of which can be learnt back from the nodes (they
    /// drop tombstones when they replay their logs). A change to an entry that is already a
    /// tombstone, its collection included, needs no sync: losing it leaves the synced
    /// tombstone.
    fn needs_sync(&self) -> bool {
        self.ops.iter().any(op_needs_sync)
    }
}

/// Whether `op` must be synced whatever the policy (see [`Job::needs_sync`]).
fn op_needs_sync(op: &Op) -> bool {
    match op {
        Op::Node(_) | Op::Ceiling(_) | Op::Floor(_) => true,
        Op::Key(_, KeyUpdate::Set(meta)) => meta.tombstone,
        Op::Key(..) => false,
    }
}

/// Let go of the writer state, then commit what was queued inline while it was held: those
/// changes found it busy and left their commit to the holder. Every holder lets go through
/// here, except [`commit_inline`], which looks again itself. Returns what that commit
/// returned (`None` if nothing was queued).
fn release(
    writer: std::sync::MutexGuard<'_, Writer>,
    state: &Mutex<Writer>,
    inline: Option<&InlineQueue>,
) -> Option<bool> {
    drop(writer);
    let queue = inline?;
    if queue.jobs.lock_unpoisoned().is_empty() {
        return None;
    }
    commit_inline(state, queue)
}

/// Commit the inline queue if the writer state is free; whoever holds it now commits the
/// queue before letting go (see [`release`]). Returns `Some(true)` when the journal has grown
/// enough to be rewritten.
fn commit_inline(state: &Mutex<Writer>, queue: &InlineQueue) -> Option<bool> {
    let mut wants_rewrite = None;
    loop {
        let mut writer = match state.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Held: the holder drains the queue after it lets go.
            Err(std::sync::TryLockError::WouldBlock) => return wants_rewrite,
        };
        if writer.answer_queued(Some(queue)) {
            wants_rewrite = Some(writer.rewrite_due());
        }
        drop(writer);
        // A job queued after the take, while the state was still held, found it busy: look
        // again now that it is free, so that no job is left waiting for a holder.
        if queue.jobs.lock_unpoisoned().is_empty() {
            return wants_rewrite;
        }
    }
}

/// The writer thread: synced changes in groups, rewrites, the periodic flush of what inline
/// committers buffered, and the clean close.
fn run_writer(
    state: Arc<Mutex<Writer>>,
    inline_queue: Option<Arc<InlineQueue>>,
    rx: &std::sync::mpsc::Receiver<Job>,
    max_group: usize,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let state = &state;
    let inline = inline_queue.as_deref();
    let mut rewriter: Option<std::thread::JoinHandle<()>> = None;
    loop {
        let first = match rx.recv_timeout(FLUSH_EVERY) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut jobs: Vec<Job> = first.into_iter().collect();
        while !jobs.is_empty() && jobs.len() < max_group {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut writer = state.lock_unpoisoned();
        // Jobs queued inline first: they were queued before anything sent after.
        writer.answer_queued(inline);
        if !jobs.is_empty() {
            writer.answer(jobs, true);
        } else {
            writer.flush();
        }
        if let Some(rewrite) = writer.start_rewrite() {
            let state = state.clone();
            let inline = inline_queue.clone();
            let spawned = std::thread::Builder::new()
                .name("meta-rewrite".into())
                .spawn(move || rewrite.run(&state, inline.as_deref()));
            match spawned {
                Ok(handle) => rewriter = Some(handle),
                Err(e) => {
                    // Try again once the journal has doubled again (the next rewrite
                    // truncates the file this one left).
                    warn!(error = %e, "cannot start the metadata journal rewrite");
                    writer.rewriting = false;
                    writer.journal.defer_rewrite();
                }
            }
        }
        release(writer, state, inline);
    }
    // A rewrite under way finishes first (it needs the state to switch files).
    if let Some(handle) = rewriter.take() {
        let _ = handle.join();
    }
    let mut writer = state.lock_unpoisoned();
    writer.answer_queued(inline);
    writer.closed = true;
    if writer.failed.is_none() {
        if let Err(e) = writer.journal.close() {
            error!(error = %e, "metadata journal sync at close failed");
        }
    }
    // Jobs queued inline while the journal was closing are answered with an error, now that
    // it is closed, rather than left waiting.
    release(writer, state, inline);
}

/// The writer thread's state: the journal, and what a rewrite needs besides the key map.
struct Writer {
    journal: Journal,
    shards: Arc<Vec<Shard>>,
    nodes: BTreeMap<u64, NodeRecord>,
    ceiling: u64,
    /// Shared with [`Metadata::floor`]; stored after the sync that made it durable.
    floor: Arc<AtomicU64>,
    /// Set by the first failed journal write. The file may then end in a partial group, so
    /// nothing more is written: everything later fails until a restart replays the journal.
    failed: Option<String>,
    /// The journal was closed with its clean marker: nothing more may be written.
    closed: bool,
    /// A [`BackgroundRewrite`] is under way.
    rewriting: bool,
    /// Rewrites finished since open.
    rewrites: u64,
    /// The [`Entry::Unsynced`] note in force, carried into every rewrite.
    unsynced: u8,
}

impl Writer {
    /// The end of a background rewrite, under the state: switch the journal to the rewritten
    /// file, or keep the old one (and try again once it has doubled again).
    fn switch_to_rewrite(&mut self, snapshot: Result<Snapshot, JournalError>, before: u64) {
        let snapshot = match snapshot {
            Ok(snapshot) => snapshot,
            Err(e) => {
                warn!(error = %e, "metadata journal rewrite failed");
                self.journal.defer_rewrite();
                return;
            }
        };
        if self.failed.is_some() || self.closed {
            snapshot.abandon();
            return;
        }
        match self.journal.finish_rewrite(snapshot) {
            Ok(()) => {
                self.rewrites += 1;
                info!(
                    before,
                    after = self.journal.size(),
                    "metadata journal rewritten"
                );
            }
            Err(e) if self.journal.is_broken() => {
                error!(error = %e, "metadata journal rewrite failed; refusing further changes");
                self.failed = Some(e.to_string());
            }
            // The old file is intact (the rename is the switch-over): carry on with it.
            Err(e) => {
                warn!(error = %e, "metadata journal rewrite failed");
                self.journal.defer_rewrite();
            }
        }
    }

    /// Commit `jobs` as one group and answer each. `write_now` writes the group to the file
    /// (and syncs it as the policy or the content requires); otherwise it stays in the
    /// journal's buffer until that fills or the next flush, unless it must be synced.
    fn answer(&mut self, jobs: Vec<Job>, write_now: bool) {
        let outcome = match self.refusal() {
            Some(e) => Err(e),
            None => self
                .commit_group(&jobs, write_now)
                .map_err(|e| self.fail(e)),
        };
        for job in jobs {
            let _ = job.done.send(outcome.clone());
        }
    }

    /// Commit and answer whatever is in the inline queue (left in the journal's buffer);
    /// whether there was anything.
    fn answer_queued(&mut self, queue: Option<&InlineQueue>) -> bool {
        let jobs = queue.map(|q| std::mem::take(&mut *q.jobs.lock_unpoisoned()));
        match jobs {
            Some(jobs) if !jobs.is_empty() => {
                self.answer(jobs, false);
                true
            }
            _ => false,
        }
    }

    /// Whether a rewrite should start: the journal has doubled, none is under way, and the
    /// journal may still be written.
    fn rewrite_due(&self) -> bool {
        self.failed.is_none() && !self.closed && !self.rewriting && self.journal.wants_rewrite()
    }

    /// Write out what inline commits buffered.
    fn flush(&mut self) {
        if self.failed.is_none() && !self.closed {
            if let Err(e) = self.journal.commit(false) {
                self.fail(e.into());
            }
        }
    }

    /// Note a failed journal write: the file may end in a partial group, so nothing more is
    /// written until a restart replays the journal.
    fn fail(&mut self, e: MetaError) -> String {
        error!(error = %e, "metadata write failed; refusing further changes");
        let e = e.to_string();
        self.failed = Some(e.clone());
        e
    }

    /// Start a rewrite if the journal has grown enough and none is under way: the new
    /// file is created and the registry copied here, under the state lock; the snapshot of
    /// the keys is then written by [`BackgroundRewrite::run`] without it.
    fn start_rewrite(&mut self) -> Option<BackgroundRewrite> {
        if !self.rewrite_due() {
            return None;
        }
        match self.journal.begin_rewrite() {
            Ok(rewrite) => {
                self.rewriting = true;
                Some(BackgroundRewrite {
                    rewrite,
                    shards: self.shards.clone(),
                    nodes: self.nodes.values().cloned().collect(),
                    ceiling: self.ceiling,
                    floor: self.floor.clone(),
                    unsynced: self.unsynced,
                    before: self.journal.size(),
                })
            }
            Err(e) if self.journal.is_broken() => {
                self.fail(e.into());
                None
            }
            Err(e) => {
                warn!(error = %e, "metadata journal rewrite failed to start");
                self.journal.defer_rewrite();
                None
            }
        }
    }

    /// One journal write for a group of jobs, then publish the new entries to the map.
    fn commit_group(&mut self, jobs: &[Job], write_now: bool) -> Result<(), MetaError> {
        // Most groups are one write's own change, committed inline by its caller.
        if let [job] = jobs {
            if let [Op::Key(key, update)] = job.ops.as_slice() {
                return self.commit_one(key, update, write_now, job.needs_sync());
            }
        }
        // Working copy of the entries this group touches, starting from the map (which
        // equals what the journal holds: only this thread writes either).
        let mut touched: HashMap<Bytes, Option<KeyMeta>> = HashMap::new();
        let mut changed: Vec<Bytes> = Vec::new();
        let mut registry_changed = jobs.iter().any(Job::needs_sync);
        let mut new_floor = None;
        for job in jobs {
            for op in &job.ops {
                match op {
                    Op::Key(key, update) => {
                        let current = touched.entry(key.clone()).or_insert_with(|| {
                            self.shards
                                .get(shard_of(key))
                                .and_then(|s| s.read_unpoisoned().get(key.as_ref()).cloned())
                        });
                        if apply_update(current, update) {
                            changed.push(key.clone());
                        }
                    }
                    Op::Node(record) => {
                        self.journal.append(&EntryRef::Node(record))?;
                        registry_changed = true;
                        self.nodes.insert(record.id.0, record.clone());
                    }
                    Op::Ceiling(c) => {
                        if *c > self.ceiling {
                            self.journal.append(&EntryRef::Ceiling(*c))?;
                            registry_changed = true;
                            self.ceiling = *c;
                        }
                    }
                    Op::Floor(f) => {
                        let held = new_floor.unwrap_or(self.floor.load(Ordering::Acquire));
                        if *f > held {
                            self.journal.append(&EntryRef::Floor(*f))?;
                            registry_changed = true;
                            new_floor = Some(*f);
                        }
                    }
                }
            }
        }
        changed.sort_unstable();
        changed.dedup();
        for key in &changed {
            if let Some(meta) = touched.get(key) {
                self.journal.append(&EntryRef::Key {
                    key,
                    meta: meta.as_ref(),
                })?;
            }
        }
        commit_if_due(&mut self.journal, write_now, registry_changed)?;
        if let Some(floor) = new_floor {
            self.floor.store(floor, Ordering::Release);
        }
        for key in changed {
            if let (Some(meta), Some(shard)) =
                (touched.remove(&key), self.shards.get(shard_of(&key)))
            {
                let mut guard = shard.write_unpoisoned();
                guard.set(&key, meta);
            }
        }
        Ok(())
    }

    /// Why nothing may be committed any more, if so: the journal was closed, or a write to
    /// it failed.
    fn refusal(&self) -> Option<String> {
        if self.closed {
            return Some("metadata writer has stopped".to_string());
        }
        self.failed.clone()
    }

    /// Commit one key change that needs no sync, as [`answer`](Writer::answer) would a job
    /// of it alone (left in the journal's buffer), and say how it went.
    fn commit_alone(&mut self, key: &Bytes, update: &KeyUpdate) -> Result<(), String> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        self.commit_one(key, update, false, false)
            .map_err(|e| self.fail(e))
    }

    /// [`commit_group`](Writer::commit_group) for a group of one key change, without its
    /// working copy of the touched entries.
    fn commit_one(
        &mut self,
        key: &Bytes,
        update: &KeyUpdate,
        write_now: bool,
        sync: bool,
    ) -> Result<(), MetaError> {
        let shard = self.shards.get(shard_of(key));
        let mut current = shard.and_then(|s| s.read_unpoisoned().get(key.as_ref()).cloned());
        let changed = apply_update(&mut current, update);
        if changed {
            self.journal.append(&EntryRef::Key {
                key,
                meta: current.as_ref(),
            })?;
        }
        commit_if_due(&mut self.journal, write_now, sync)?;
        if let (true, Some(shard)) = (changed, shard) {
            shard.write_unpoisoned().set(key, current);
        }
        Ok(())
    }
}

/// Write `journal`'s buffer out if `write_now`, if it must be synced (`sync`), or if
/// it has filled. Node records, lease ceilings, version floors and deletions cannot be
/// learnt back from the nodes: they are synced whatever the policy for key changes (see
/// [`Job::needs_sync`]).
fn commit_if_due(journal: &mut Journal, write_now: bool, sync: bool) -> Result<(), MetaError> {
    if write_now || sync || journal.buffered() >= INLINE_FLUSH_BYTES {
        journal.commit(sync)?;
    }
    Ok(())
}

/// A journal rewrite under way on its own thread, so that neither commits nor the writer
/// thread wait for it: the keys are written shard by shard (each under its read lock only),
/// then the state lock is taken for the short end (see [`journal::Journal::finish_rewrite`]).
struct BackgroundRewrite {
    rewrite: journal::Rewrite,
    shards: Arc<Vec<Shard>>,
    nodes: Vec<NodeRecord>,
    ceiling: u64,
    floor: Arc<AtomicU64>,
    unsynced: u8,
    before: u64,
}

impl BackgroundRewrite {
    fn run(self, state: &Mutex<Writer>, inline: Option<&InlineQueue>) {
        let BackgroundRewrite {
            mut rewrite,
            shards,
            nodes,
            ceiling,
            floor,
            unsynced,
            before,
        } = self;
        let mut written = Ok(());
        let mut keys: Vec<u8> = Vec::new();
        let mut copy: Vec<(std::ops::Range<usize>, KeyMeta)> = Vec::new();
        for shard in shards.iter() {
            // Copy the shard under its read lock (the keys into one buffer, and the entries),
            // then encode and write without it: a commit to the shard waits for the copy
            // only, never for the encoding or the disk.
            keys.clear();
            copy.clear();
            for (key, meta) in shard.read_unpoisoned().iter() {
                let start = keys.len();
                keys.extend_from_slice(key);
                copy.push((start..keys.len(), meta.clone()));
            }
            written = copy.iter().try_for_each(|(range, meta)| {
                rewrite.push(&EntryRef::Key {
                    key: keys.get(range.clone()).unwrap_or_default(),
                    meta: Some(meta),
                })
            });
            written = written.and_then(|()| rewrite.write_out());
            if written.is_err() {
                break;
            }
        }
        let snapshot = written
            .and_then(|()| {
                nodes
                    .iter()
                    .try_for_each(|n| rewrite.push(&EntryRef::Node(n)))
            })
            .and_then(|()| rewrite.push(&EntryRef::Ceiling(ceiling)))
            // Read after the walk: at least the floor under which the entries it missed
            // were collected (a collection raises the floor before it removes anything).
            .and_then(|()| rewrite.push(&EntryRef::Floor(floor.load(Ordering::Acquire))))
            .and_then(|()| match unsynced {
                0 => Ok(()),
                quorum => rewrite.push(&EntryRef::Unsynced(quorum)),
            });
        let snapshot = match snapshot {
            Ok(()) => rewrite.sync(),
            Err(e) => {
                rewrite.abandon();
                Err(e)
            }
        };
        // Copy what was appended meanwhile without the state lock, twice (the second pass
        // takes what came during the first), so that the end under the lock is short.
        let snapshot = snapshot.and_then(|mut snapshot| {
            for _ in 0..2 {
                let writer = state.lock_unpoisoned();
                let (dir, upto) = (writer.journal.dir().to_path_buf(), writer.journal.size());
                release(writer, state, inline);
                if let Err(e) = snapshot.catch_up(&dir, upto) {
                    snapshot.abandon();
                    return Err(e);
                }
            }
            Ok(snapshot)
        });
        let mut writer = state.lock_unpoisoned();
        writer.rewriting = false;
        // What inline commits buffered is written now, so that a failure to write it counts
        // as the journal's failure, not the rewrite's.
        writer.flush();
        writer.switch_to_rewrite(snapshot, before);
        release(writer, state, inline);
    }
}

/// Apply `update` to `current` under the "versions never go backwards" rule; `true` if it
/// changed anything.
fn apply_update(current: &mut Option<KeyMeta>, update: &KeyUpdate) -> bool {
    match update {
        KeyUpdate::Set(new) => {
            if current.as_ref().is_none_or(|c| new.version >= c.version)
                && current.as_ref() != Some(new)
            {
                *current = Some(new.clone());
                return true;
            }
        }
        KeyUpdate::AddReplica { version, node } => {
            if let Some(c) = current.as_mut() {
                if c.version == *version && !c.replicas.contains(node) {
                    c.replicas.push(*node);
                    return true;
                }
            }
        }
        KeyUpdate::RemoveReplica { node } => {
            if let Some(c) = current.as_mut() {
                if c.replicas.contains(node) {
                    c.replicas.retain(|n| n != node);
                    return true;
                }
            }
        }
        KeyUpdate::Collect { version } => {
            if current
                .as_ref()
                .is_some_and(|c| c.tombstone && c.version == *version)
            {
                *current = None;
                return true;
            }
        }
    }
    false
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
        assert_eq!(m.keys_on_node(NodeId(2)), vec![k.clone()]);
        assert_eq!(m.keys_on_node(NodeId(3)), vec![k]);
        assert!(m.keys_on_node(NodeId(1)).is_empty());
    }

    /// A version a peer reports above [`Version::MAX`] is ignored; one at the top of the
    /// range leaves no versions, and asking for one is an error, not a lease that overflows.
    #[tokio::test]
    async fn versions_from_peers_cannot_overflow_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = Metadata::open(dir.path()).unwrap();
        let before = m.next_version().await.unwrap().version();
        m.observe_version(Version(u64::MAX));
        m.observe_version(Version(Version::MAX.0 + 1));
        let after = m.next_version().await.unwrap().version();
        assert!(
            after > before && after.0 < before.0 + VERSION_LEASE,
            "{after}"
        );
        m.observe_version(Version::MAX);
        let asked = tokio::time::timeout(std::time::Duration::from_secs(10), m.next_version());
        match asked.await.expect("an answer, not an endless loop") {
            Err(e) => assert!(e.to_string().contains("no versions left"), "{e}"),
            Ok(ticket) => panic!("version {} handed out", ticket.version()),
        }
    }

    #[tokio::test]
    async fn versions_increase_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (m, _) = Metadata::open(dir.path()).unwrap();
            for _ in 0..10 {
                seen.push(m.next_version().await.unwrap().version());
            }
            m.close();
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    /// Under `never`, puts are committed inline and deletions through the writer thread, at
    /// the same time and to the same keys: the journal must replay to exactly the map.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn inline_and_synced_changes_interleave_in_one_order() {
        let dir = tempfile::tempdir().unwrap();
        // A small rewrite threshold: rewrites run in the background while the changes go
        // on, and what they copy must replay to the same state too.
        let options = MetaOptions {
            fsync: MetaFsync::Never,
            rewrite_min_bytes: 8192,
            ..MetaOptions::default()
        };
        let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
        let m = Arc::new(m);
        let mut tasks = Vec::new();
        // Rounds of changes go on until a rewrite has finished during them (it runs on its
        // own thread, which a loaded machine may start late), within a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for t in 0..8u64 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    if i % 300 == 0
                        && i > 0
                        && (m.rewrites() > 0 || std::time::Instant::now() > deadline)
                    {
                        break;
                    }
                    let key = Bytes::from(format!("key-{}", i % 37));
                    let version = 1 + i * 8 + t;
                    let mut new = meta(version, &[t, t + 1]);
                    new.tombstone = i % 5 == 0;
                    let update = if i % 7 == 3 {
                        KeyUpdate::AddReplica {
                            version: Version(version - 1),
                            node: NodeId(9),
                        }
                    } else {
                        KeyUpdate::Set(new)
                    };
                    m.update(vec![(key, update)]).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut before = BTreeMap::new();
        m.for_each(|k, v| {
            before.insert(k.to_vec(), v.clone());
        });
        assert!(m.rewrites() > 0, "no rewrite ran during the changes");
        m.close();
        drop(m);
        let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
        let mut after = BTreeMap::new();
        m.for_each(|k, v| {
            after.insert(k.to_vec(), v.clone());
        });
        assert_eq!(before.len(), 37);
        assert_eq!(before, after);
    }

    /// Updates racing `close()` get an answer (the error, once closed), never a hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn updates_racing_close_are_answered() {
        let options = MetaOptions {
            fsync: MetaFsync::Never,
            ..MetaOptions::default()
        };
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
            let m = Arc::new(m);
            let writers: Vec<_> = (0..4u64)
                .map(|t| {
                    let m = m.clone();
                    tokio::spawn(async move {
                        for i in 1.. {
                            let key = Bytes::from(format!("k{t}-{}", i % 50));
                            let update = m.update(vec![(key, KeyUpdate::Set(meta(i, &[t])))]);
                            let answer =
                                tokio::time::timeout(std::time::Duration::from_secs(5), update)
                                    .await
                                    .expect("an update was left waiting");
                            if answer.is_err() {
                                return;
                            }
                        }
                    })
                })
                .collect();
            tokio::task::yield_now().await;
            let closing = m.clone();
            tokio::task::spawn_blocking(move || closing.close())
                .await
                .unwrap();
            for w in writers {
                w.await.unwrap();
            }
        }
    }

    /// Under `never`, a change committed by its caller at once is refused after `close()`:
    /// the journal already ends in its clean marker, so nothing after it would be replayed.
    #[tokio::test]
    async fn a_change_committed_inline_after_close_is_refused() {
        let options = MetaOptions {
            fsync: MetaFsync::Never,
            ..MetaOptions::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
        let key = Bytes::from_static(b"k");
        m.update_key(key.clone(), KeyUpdate::Set(meta(1, &[1])))
            .await
            .unwrap();
        m.close();
        let late = m
            .update_key(key.clone(), KeyUpdate::Set(meta(2, &[1])))
            .await;
        assert!(late.is_err(), "{late:?}");
        assert_eq!(
            m.get(&key),
            Some(meta(1, &[1])),
            "a refused change is not visible"
        );
        drop(m);
        let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
        assert_eq!(m.get(&key), Some(meta(1, &[1])));
        assert!(!m.may_lack_changes(), "the close was clean");
    }

    /// Under `never`, a deletion is in the file (as a process crash would leave it) once it
    /// is acknowledged, while inline puts to the same keys go on around it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_acknowledged_deletion_is_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let options = MetaOptions {
            fsync: MetaFsync::Never,
            ..MetaOptions::default()
        };
        let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
        let m = Arc::new(m);
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let version = {
            let next = next.clone();
            move || next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        let puts: Vec<_> = (0..3)
            .map(|_| {
                let (m, version) = (m.clone(), version.clone());
                tokio::spawn(async move {
                    for _ in 0..2000 {
                        let v = version();
                        let key = Bytes::from(format!("k{}", v % 20));
                        m.update(vec![(key, KeyUpdate::Set(meta(v, &[1])))])
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for i in 0..40u64 {
            let v = version();
            let key = Bytes::from(format!("k{}", i % 20));
            let mut deletion = meta(v, &[2]);
            deletion.tombstone = true;
            m.update(vec![(key.clone(), KeyUpdate::Set(deletion))])
                .await
                .unwrap();
            let copy = tempfile::tempdir().unwrap();
            std::fs::copy(dir.path().join("meta.log"), copy.path().join("meta.log")).unwrap();
            let (replayed, _) = Metadata::open_with(copy.path(), options).unwrap();
            let held = replayed
                .get(&key)
                .expect("the acknowledged deletion is missing");
            assert!(
                held.version.0 >= v,
                "the file has {held:?}, the deletion was {v}"
            );
        }
        for p in puts {
            p.await.unwrap();
        }
    }

    /// An inline commit is acknowledged before it is written; the writer thread writes it
    /// out within `FLUSH_EVERY`, without a close.
    #[tokio::test]
    async fn inline_commits_reach_the_file_without_a_close() {
        let dir = tempfile::tempdir().unwrap();
        let options = MetaOptions {
            fsync: MetaFsync::Never,
            ..MetaOptions::default()
        };
        let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
        let file = dir.path().join("meta.log");
        let size = || std::fs::metadata(&file).map(|f| f.len()).unwrap_or(0);
        let empty = size();
        m.update(vec![(Bytes::from("k"), KeyUpdate::Set(meta(5, &[1])))])
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while size() == empty {
            assert!(
                std::time::Instant::now() < deadline,
                "the change never reached the file"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // What reached the file replays (a copy, read while the journal is still open).
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(&file, copy.path().join("meta.log")).unwrap();
        let (reopened, _) = Metadata::open_with(copy.path(), options).unwrap();
        assert_eq!(reopened.get(b"k"), Some(meta(5, &[1])));
        assert!(reopened.may_lack_changes(), "no clean marker was written");
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
        assert_eq!(m.keys_on_node(NodeId(2)).len(), 500);
    }

    #[test]
    fn a_node_record_written_before_owes_reconciliation_reads_the_same() {
        #[derive(Serialize)]
        struct Before {
            id: NodeId,
            addr: String,
            data_dir: String,
            spawned: bool,
            pid: Option<u32>,
            removed: bool,
            leaving: bool,
        }
        let old = rmp_serde::to_vec(&Before {
            id: NodeId(4),
            addr: "a".into(),
            data_dir: "d".into(),
            spawned: true,
            pid: Some(9),
            removed: false,
            leaving: true,
        })
        .unwrap();
        let read: NodeRecord = rmp_serde::from_slice(&old).unwrap();
        assert_eq!(read.id, NodeId(4));
        assert!(read.leaving && !read.owes_reconciliation);
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
            owes_reconciliation: false,
        };
        {
            let (m, nodes) = Metadata::open(dir.path()).unwrap();
            assert!(nodes.is_empty());
            m.save_node(rec.clone()).await.unwrap();
        }
        let (_, nodes) = Metadata::open(dir.path()).unwrap();
        assert_eq!(nodes, vec![rec]);
    }

    #[tokio::test]
    async fn the_journal_is_rewritten_as_it_grows_and_reloads_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let options = MetaOptions {
            fsync: MetaFsync::Never,
            rewrite_min_bytes: 4096,
            ..Default::default()
        };
        let path = dir.path().join(journal::JOURNAL_FILE);
        let largest;
        let mut last_round = 0u64;
        {
            let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
            // Raised before the rewrites: only their snapshots carry it on.
            m.raise_floor(Version(77)).await.unwrap();
            // 20 keys overwritten round after round: far more history than live state. The
            // writer writes the buffer out within FLUSH_EVERY and rewrites the journal off
            // the commit path, so keep going (at least 100 rounds, with a deadline) until a
            // rewrite has brought the file back under the bound.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                last_round += 1;
                for k in 0..20u64 {
                    let key = Bytes::from(format!("key-{k}"));
                    let v = last_round * 100 + k;
                    let replicas = [1, 2, last_round % 5 + 3];
                    m.update(vec![(key, KeyUpdate::Set(meta(v, &replicas)))])
                        .await
                        .unwrap();
                }
                let size = std::fs::metadata(&path).unwrap().len();
                if last_round >= 100 && m.rewrites() > 0 && size < 20_000 {
                    largest = size;
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "no rewrite");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            m.save_node(NodeRecord {
                id: NodeId(2),
                addr: "a".into(),
                data_dir: "d".into(),
                spawned: false,
                pid: None,
                removed: false,
                leaving: false,
                owes_reconciliation: false,
            })
            .await
            .unwrap();
            drop(m.next_version().await.unwrap());
            m.close();
        }
        let size = std::fs::metadata(&path).unwrap().len();
        // Without rewrites the file would hold every update (well over 40 KB).
        assert!(
            largest < 20_000,
            "journal is {largest} bytes after a rewrite"
        );
        assert!(size < 20_000, "journal is {size} bytes");
        let (m, nodes) = Metadata::open_with(dir.path(), options).unwrap();
        assert_eq!(m.len(), 20);
        for k in 0..20u64 {
            let key = format!("key-{k}");
            let replicas = [1, 2, last_round % 5 + 3];
            assert_eq!(
                m.get(key.as_bytes()),
                Some(meta(last_round * 100 + k, &replicas))
            );
        }
        assert_eq!(nodes.len(), 1);
        assert_eq!(m.floor(), Version(77), "the floor survived the rewrites");
        // The lease ceiling survived the rewrites: new versions are above every old one.
        assert!(m.next_version().await.unwrap().version() > Version(last_round * 100 + 100));
    }

    #[tokio::test]
    async fn the_settled_floor_stays_below_every_write_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = Metadata::open(dir.path()).unwrap();
        let first = m.next_version().await.unwrap();
        let second = m.next_version().await.unwrap();
        let (v1, v2) = (first.version(), second.version());
        assert!(v2 > v1);
        assert_eq!(m.settled_floor(), Version(v1.0 - 1));
        // The later write finishing first does not settle the earlier one.
        drop(second);
        assert_eq!(m.settled_floor(), Version(v1.0 - 1));
        drop(first);
        assert_eq!(
            m.settled_floor(),
            v2,
            "every version handed out has finished"
        );
        let third = m.next_version().await.unwrap();
        assert_eq!(m.settled_floor(), Version(third.version().0 - 1));
    }

    #[tokio::test]
    async fn the_floor_only_rises_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        for fsync in [MetaFsync::Always, MetaFsync::Never] {
            let options = MetaOptions {
                fsync,
                ..MetaOptions::default()
            };
            let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
            m.raise_floor(Version(40)).await.unwrap();
            m.raise_floor(Version(30)).await.unwrap();
            assert_eq!(m.floor(), Version(40));
            // Synced whatever the policy: a copy of the file, taken without a close, has it.
            let copy = tempfile::tempdir().unwrap();
            std::fs::copy(dir.path().join("meta.log"), copy.path().join("meta.log")).unwrap();
            let (replayed, _) = Metadata::open_with(copy.path(), options).unwrap();
            assert_eq!(replayed.floor(), Version(40), "{fsync:?}");
            m.close();
            let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
            assert_eq!(m.floor(), Version(40), "{fsync:?}");
        }
    }

    #[tokio::test]
    async fn collecting_removes_only_the_tombstone_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let tombstone = |v| KeyMeta {
            tombstone: true,
            ..meta(v, &[1, 2, 3])
        };
        let collect = |v| KeyUpdate::Collect {
            version: Version(v),
        };
        let (gone, stays, live) = (
            Bytes::from_static(b"gone"),
            Bytes::from_static(b"rewritten"),
            Bytes::from_static(b"live"),
        );
        {
            let (m, _) = Metadata::open(dir.path()).unwrap();
            m.update(vec![
                (gone.clone(), KeyUpdate::Set(tombstone(5))),
                (stays.clone(), KeyUpdate::Set(tombstone(6))),
                (live.clone(), KeyUpdate::Set(meta(7, &[1]))),
            ])
            .await
            .unwrap();
            // Written again since the collection found it: a newer version stays.
            m.update_key(stays.clone(), KeyUpdate::Set(tombstone(9)))
                .await
                .unwrap();
            m.update(vec![
                (gone.clone(), collect(5)),
                (stays.clone(), collect(6)),
                (live.clone(), collect(7)),
            ])
            .await
            .unwrap();
            assert_eq!(m.get(b"gone"), None);
            assert_eq!(m.get(b"rewritten"), Some(tombstone(9)));
            assert_eq!(m.get(b"live"), Some(meta(7, &[1])));
            m.close();
        }
        let (m, _) = Metadata::open(dir.path()).unwrap();
        assert_eq!(m.get(b"gone"), None, "the removal is in the journal");
        assert_eq!(m.get(b"rewritten"), Some(tombstone(9)));
        assert_eq!(m.len(), 2);
    }

    #[tokio::test]
    async fn only_a_graceful_close_spares_the_next_start_a_reconciliation() {
        let dir = tempfile::tempdir().unwrap();
        let k = Bytes::from_static(b"k");
        for fsync in [MetaFsync::Always, MetaFsync::Never] {
            let options = MetaOptions {
                fsync,
                ..Default::default()
            };
            let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
            m.update(vec![(k.clone(), KeyUpdate::Set(meta(1, &[1])))])
                .await
                .unwrap();
            m.close();
            drop(m);
            // Closed gracefully: nothing can be missing.
            let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
            assert!(!m.may_lack_changes(), "{fsync:?}");
            // A crash right after a clean start (no change written since) still counts as
            // unclean: the clean marker is no longer last.
            std::mem::forget(m);
            let (m, _) = Metadata::open_with(dir.path(), options).unwrap();
            assert!(m.may_lack_changes(), "{fsync:?}");
            // Whatever this run's policy, an unclean stop means reconciling first.
            let other = MetaOptions {
                fsync: match fsync {
                    MetaFsync::Always => MetaFsync::Never,
                    MetaFsync::Never => MetaFsync::Always,
                },
                ..Default::default()
            };
            std::mem::forget(m);
            let (m, _) = Metadata::open_with(dir.path(), other).unwrap();
            assert!(m.may_lack_changes(), "{fsync:?} then {other:?}");
            assert_eq!(m.get(b"k"), Some(meta(1, &[1])));
            m.close();
        }
    }

    /// Reads wait after an unclean stop only if the stopped run acknowledged key changes it
    /// had not synced (or such changes were still to be learnt back), with that run's write
    /// quorum; a node that still owes a reconciliation keeps the gate across clean restarts,
    /// and a journal rewrite keeps the note.
    #[tokio::test]
    async fn reads_wait_only_after_unsynced_changes_may_have_been_lost() {
        let dir = tempfile::tempdir().unwrap();
        let open = |fsync, write_quorum| {
            let options = MetaOptions {
                fsync,
                write_quorum,
                rewrite_min_bytes: 4096,
                ..MetaOptions::default()
            };
            Metadata::open_with(dir.path(), options).unwrap().0
        };
        let owing = |owes| NodeRecord {
            id: NodeId(1),
            addr: "127.0.0.1:1".into(),
            data_dir: "/x".into(),
            spawned: true,
            pid: None,
            removed: false,
            leaving: false,
            owes_reconciliation: owes,
        };
        // Every acknowledged change of an `always` run was synced.
        let m = open(MetaFsync::Always, 2);
        m.update(vec![(
            Bytes::from_static(b"k"),
            KeyUpdate::Set(meta(1, &[1])),
        )])
        .await
        .unwrap();
        std::mem::forget(m);
        let m = open(MetaFsync::Always, 2);
        assert!(m.may_lack_changes());
        assert_eq!(m.read_gate(), None);
        m.close();
        // A `never` run closed cleanly lost nothing; one that stopped uncleanly may have.
        open(MetaFsync::Never, 2).close();
        let m = open(MetaFsync::Never, 2);
        assert_eq!(m.read_gate(), None, "closed cleanly");
        std::mem::forget(m);
        let m = open(MetaFsync::Always, 1);
        assert_eq!(
            m.read_gate(),
            Some(2),
            "the stopped run's quorum, not this run's"
        );
        // A node still owes a reconciliation: the next start waits for it, clean or not.
        m.save_node(owing(true)).await.unwrap();
        m.close();
        let m = open(MetaFsync::Always, 2);
        assert_eq!(m.read_gate(), Some(2));
        // Rewrites (a small threshold, many changes) carry the note.
        for i in 0..2_000u64 {
            let key = Bytes::from(format!("key-{}", i % 10));
            m.update(vec![(key, KeyUpdate::Set(meta(i + 1, &[1])))])
                .await
                .unwrap();
        }
        assert!(m.rewrites() > 0);
        std::mem::forget(m);
        let m = open(MetaFsync::Always, 2);
        assert_eq!(m.read_gate(), Some(2), "the note survived the rewrite");
        // Reconciled: an `always` run drops the note, and its own unclean stop gates nothing.
        m.save_node(owing(false)).await.unwrap();
        m.close();
        std::mem::forget(open(MetaFsync::Always, 2));
        let m = open(MetaFsync::Never, 3);
        assert_eq!(m.read_gate(), None);
        std::mem::forget(m);
        assert_eq!(open(MetaFsync::Never, 3).read_gate(), Some(3));
    }
}

//! The storage node's request handler: the coordinator's `Store`, `Fetch`, `Forget` and `Scan`,
//! one at a time or several in a `Batch`.
//!
//! A write is applied to the table and written to the log under one short lock of the table,
//! so the log's order of records is the table's order of changes; the answer then waits for
//! an fsync under `--fsync always` (every write's answer, applied or not: one that found its
//! version already there may have found a write whose fsync is still to come), so an
//! acknowledged write is on disk.
//!
//! A log that fails (a write or an fsync) leaves the table holding changes the file may not:
//! the node then refuses every request and stops, with an error, so that the next start
//! replays the file and serves only what it holds.

use ringkv_common::sync::MutexExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use ringkv_common::cluster_token;
use ringkv_common::protocol::{Envelope, Reply, Request, Response, Role, MAX_BATCH_REQUESTS};
use ringkv_common::server::Handler;
use ringkv_common::{NodeStats, Version, WireError};
use tracing::{error, info};

use crate::log::{EncodedRecord, Log, LogError};
use crate::store::{ScanPage, Store};

/// Failpoint `node-scan-sort`, on the blocking thread before a scan's sort: `sleep(ms)`, or
/// `return(PATH)` to wait until the file PATH exists, so that a test decides when it ends.
fn before_scan_sort() {
    fail::fail_point!("node-scan-sort", |path: Option<String>| wait_for_file(
        path.as_deref()
    ));
}

/// Block until the file at `path` exists, or for at most a minute.
#[cfg(feature = "failpoints")]
fn wait_for_file(path: Option<&str>) {
    let Some(path) = path else { return };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::path::Path::new(path).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Most entries one `Scan` page may ask for, so one answer stays well under the frame limit.
const MAX_SCAN_PAGE: usize = 10_000;

/// Shared state of a running node.
pub struct Node {
    store: Mutex<Store>,
    log: Log,
    ops: AtomicU64,
    messages: AtomicU64,
    /// Serialises compactions; appends keep flowing while one runs.
    compacting: tokio::sync::Mutex<()>,
    /// Cancelled when the log fails; the node then stops (see the module's notes).
    log_failed: tokio_util::sync::CancellationToken,
    /// Required of a peer acting as the coordinator, if set.
    cluster_token: Option<String>,
    /// Bytes of the log set aside when it was opened (see [`NodeStats::log_set_aside_bytes`]).
    log_set_aside_bytes: u64,
}

impl Node {
    /// A node serving `store`, persisting to `log`.
    pub fn new(store: Store, log: Log) -> Node {
        Node {
            store: Mutex::new(store),
            log,
            ops: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            compacting: tokio::sync::Mutex::new(()),
            log_failed: tokio_util::sync::CancellationToken::new(),
            cluster_token: None,
            log_set_aside_bytes: 0,
        }
    }

    /// Report `bytes` of the log set aside at open in every heartbeat's stats.
    #[must_use]
    pub fn with_log_set_aside(mut self, bytes: u64) -> Node {
        self.log_set_aside_bytes = bytes;
        self
    }

    /// Require `token` of every peer acting as the coordinator (`None`: require nothing).
    #[must_use]
    pub fn with_cluster_token(mut self, token: Option<String>) -> Node {
        self.cluster_token = token;
        self
    }

    /// Cancelled once the log has failed and the node must stop.
    pub fn log_failed(&self) -> &tokio_util::sync::CancellationToken {
        &self.log_failed
    }

    /// Counters for the heartbeat.
    pub fn stats(&self) -> NodeStats {
        let mut stats = self.lock().stats();
        stats.ops = self.ops.load(Ordering::Relaxed);
        stats.messages = self.messages.load(Ordering::Relaxed);
        stats.log_bytes = self.log.size_bytes();
        stats.syncs = self.log.sync_count();
        stats.log_set_aside_bytes = self.log_set_aside_bytes;
        stats
    }

    /// One scan page. A page that starts a scan sorts every key first; on a large table that
    /// takes long (about 0.1 s for 300,000 keys), so the keys are copied under the table lock
    /// and sorted on a blocking thread, while the node goes on serving.
    async fn scan(&self, after: Option<&[u8]>, limit: usize) -> Result<ScanPage, WireError> {
        let snapshot = {
            let mut store = self.lock();
            match store.scan_or_snapshot(after, limit) {
                Ok(page) => return Ok(page),
                Err(snapshot) => snapshot,
            }
        };
        let sorted = tokio::task::spawn_blocking(move || {
            before_scan_sort();
            snapshot.sorted()
        })
        .await
        .map_err(|e| WireError::Internal(format!("sorting the keys for a scan failed: {e}")))?;
        Ok(self.lock().scan_in_order(sorted, after, limit))
    }

    /// The log, for shutdown.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Rewrite the log if garbage passed the threshold. Called every second, it is also
    /// where a log that failed outside a request (a timed fsync, a compaction) stops the node.
    pub async fn maybe_compact(&self) {
        if let Some(reason) = self.log.poisoned() {
            self.failed("the log failed", &LogError::Poisoned(reason));
            return;
        }
        let live = self.lock().encoded_len();
        if !self.log.should_compact(live) {
            return;
        }
        let _guard = self.compacting.lock().await;
        // Snapshot under the table lock once the log has noted where it ends: every write
        // applied so far is in it, and every append from then on is carried into the new file.
        match self.log.compact(|| self.lock().records()).await {
            Ok(stats) => info!(
                before = stats.before_bytes,
                after = stats.after_bytes,
                "compacted log"
            ),
            Err(e @ LogError::Poisoned(_)) => {
                self.failed("compaction failed", &e);
            }
            Err(e) => error!(error = %e, "compaction failed"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock would be a bug in `Store`; keep serving what is there.
        self.store.lock_unpoisoned()
    }

    async fn store(&self, key: Bytes, version: Version, value: Option<Bytes>) -> Reply {
        check_store(&key, version, value.as_ref())?;
        let record = EncodedRecord::new(&key, version, value.as_deref())
            .map_err(|e| WireError::BadRequest(e.to_string()))?;
        let (applied, held) = {
            let mut store = self.lock();
            let (applied, held) = store.apply(&key, version, value.as_deref());
            if applied {
                self.write(&record)?;
            }
            (applied, held)
        };
        self.synced().await?;
        Ok(Response::Stored {
            applied,
            version: held,
        })
    }

    async fn forget(&self, key: Bytes, version: Version) -> Reply {
        let mut frames = EncodedRecord::empty();
        let answer = {
            let mut store = self.lock();
            let answer = forget_in(&mut store, &mut frames, &key, version)?;
            if !frames.is_empty() {
                self.write(&frames)?;
            }
            answer
        };
        self.synced().await?;
        Ok(answer)
    }

    /// Write encoded records to the log now (called under the table's lock).
    fn write(&self, frames: &EncodedRecord) -> Result<(), WireError> {
        self.log
            .write_encoded(frames)
            .map_err(|e| self.failed("log write failed", &e))
    }

    /// Wait until every write so far is synced, under `--fsync always`.
    async fn synced(&self) -> Result<(), WireError> {
        self.log
            .synced()
            .await
            .map_err(|e| self.failed("log sync failed", &e))
    }

    /// The log failed: stop the node, and tell the caller.
    fn failed(&self, what: &str, e: &LogError) -> WireError {
        if !self.log_failed.is_cancelled() {
            error!(error = %e, "{what}; the node stops so that a restart replays its log");
            self.log_failed.cancel();
        }
        WireError::Internal(format!("{what}: {e}"))
    }

    /// A batch of stores, forgets and fetches, applied in order under one lock of the table;
    /// what they change goes to the log in one append, and the batch is answered (every
    /// request under its own id) once that append is done, synced under `--fsync always`.
    async fn batch(&self, requests: Vec<Envelope<Request>>) -> Reply {
        if requests.len() > MAX_BATCH_REQUESTS {
            // Refused as a whole, but answered per request, so that every caller hears of it.
            let refusal = WireError::BadRequest(format!(
                "a batch of {} requests is over the limit of {MAX_BATCH_REQUESTS}",
                requests.len()
            ));
            let answers = requests.into_iter().map(|r| Envelope {
                id: r.id,
                msg: Err(refusal.clone()),
            });
            return Ok(Response::Batch(answers.collect()));
        }
        self.ops
            .fetch_add(requests.len().saturating_sub(1) as u64, Ordering::Relaxed);
        let mut answers = Vec::with_capacity(requests.len());
        let mut frames = EncodedRecord::empty();
        // The answers to writes: each holds only if the append succeeds (a store that did not
        // apply may have found the version of a store before it in this same batch).
        let mut writes = Vec::new();
        let mut written = Ok(());
        {
            let mut store = self.lock();
            for Envelope { id, msg } in requests {
                let is_write = matches!(msg, Request::Store { .. } | Request::Forget { .. });
                let answer = match msg {
                    Request::Store {
                        key,
                        version,
                        value,
                    } => check_store(&key, version, value.as_ref()).and_then(|()| {
                        let mark = frames.len();
                        frames
                            .push(&key, version, value.as_deref())
                            .map_err(|e| WireError::BadRequest(e.to_string()))?;
                        let (applied, held) = store.apply(&key, version, value.as_deref());
                        if !applied {
                            frames.truncate(mark);
                        }
                        Ok(Response::Stored {
                            applied,
                            version: held,
                        })
                    }),
                    Request::Forget { key, version } => {
                        forget_in(&mut store, &mut frames, &key, version)
                    }
                    Request::Fetch { key } => Ok(fetched(&store, &key)),
                    other => Err(WireError::BadRequest(format!(
                        "a batch carries stores, forgets and fetches, not {}",
                        other.name()
                    ))),
                };
                if is_write {
                    writes.push(answers.len());
                }
                answers.push(Envelope { id, msg: answer });
            }
            if !frames.is_empty() {
                written = self.write(&frames);
            }
        }
        if !writes.is_empty() {
            if let Err(failed) = written.and(self.synced().await) {
                for i in writes {
                    if let Some(answer) = answers.get_mut(i) {
                        answer.msg = Err(failed.clone());
                    }
                }
            }
        }
        Ok(Response::Batch(answers))
    }
}

/// Forget `key` in the table if what it holds is no newer than `version`, and add the
/// forget marker to `frames`: a tombstone at the removed version, which replay lets override
/// the value it shadows and then drops, so the key stays forgotten across restarts.
fn forget_in(store: &mut Store, frames: &mut EncodedRecord, key: &[u8], version: Version) -> Reply {
    if let Some(held) = store.forget(key, version) {
        frames
            .push(key, held, None)
            .map_err(|e| WireError::Internal(e.to_string()))?;
    }
    Ok(Response::Done)
}

/// Refuse a store that no coordinator would send: bad sizes, the reserved version 0, or a
/// version above [`Version::MAX`].
fn check_store(key: &[u8], version: Version, value: Option<&Bytes>) -> Result<(), WireError> {
    ringkv_common::protocol::check_sizes(key, value)?;
    if version == Version::ZERO {
        return Err(WireError::BadRequest("version 0 is reserved".into()));
    }
    if version > Version::MAX {
        return Err(WireError::BadRequest(format!(
            "version {version} is above the highest a coordinator hands out, {}",
            Version::MAX
        )));
    }
    Ok(())
}

/// The answer to a fetch of `key`: the node's copy, or version 0 when it holds none.
fn fetched(store: &Store, key: &[u8]) -> Response {
    let (version, value) = store.fetch(key).unwrap_or((Version::ZERO, None));
    Response::Fetched { version, value }
}

impl Handler for Node {
    fn admit(&self, role: Role, token: Option<&str>) -> Result<(), WireError> {
        match &self.cluster_token {
            Some(expected) if role != Role::Client && !cluster_token::matches(expected, token) => {
                Err(WireError::BadRequest(format!(
                    "a {} peer must present this cluster's token ({}), and this one did not",
                    role.name(),
                    cluster_token::ENV
                )))
            }
            _ => Ok(()),
        }
    }

    async fn handle(self: Arc<Self>, req: Request, role: Role) -> Reply {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
        if self.log_failed.is_cancelled() {
            return Err(WireError::Internal(
                "this node's log failed; the node is stopping so that a restart replays it".into(),
            ));
        }
        if role == Role::Client {
            return Err(WireError::BadRequest(
                "storage nodes serve the coordinator only; send client requests to the coordinator"
                    .into(),
            ));
        }
        match req {
            Request::Store {
                key,
                version,
                value,
            } => self.store(key, version, value).await,
            Request::Fetch { key } => Ok(fetched(&self.lock(), &key)),
            Request::Batch(requests) => self.batch(requests).await,
            Request::Forget { key, version } => self.forget(key, version).await,
            Request::Scan { after, limit } => {
                let limit = (limit as usize).clamp(1, MAX_SCAN_PAGE);
                let (entries, next) = self.scan(after.as_deref(), limit).await?;
                Ok(Response::Scanned { entries, next })
            }
            other => Err(WireError::BadRequest(format!(
                "a storage node does not answer {}",
                other.name()
            ))),
        }
    }
}

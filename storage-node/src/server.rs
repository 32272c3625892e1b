//! The storage node's request handler: the coordinator's `Store`, `Fetch`, `Forget` and `Scan`.
//!
//! A write is applied to the table under a short lock, then appended to the log; the answer
//! waits for the log's acknowledgement, so under `--fsync always` an acknowledged write is on disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use ringkv_common::protocol::{Reply, Request, Response, Role};
use ringkv_common::server::Handler;
use ringkv_common::{NodeStats, Version, WireError};
use tracing::{error, info};

use crate::log::{EncodedRecord, Log, Record};
use crate::store::Store;

/// Most entries one `Scan` page may ask for, so one answer stays well under the frame limit.
const MAX_SCAN_PAGE: usize = 10_000;

/// Shared state of a running node.
pub struct Node {
    store: Mutex<Store>,
    log: Log,
    ops: AtomicU64,
    /// Serialises compactions; appends keep flowing while one runs.
    compacting: tokio::sync::Mutex<()>,
}

impl Node {
    /// A node serving `store`, persisting to `log`.
    pub fn new(store: Store, log: Log) -> Node {
        Node {
            store: Mutex::new(store),
            log,
            ops: AtomicU64::new(0),
            compacting: tokio::sync::Mutex::new(()),
        }
    }

    /// Counters for the heartbeat.
    pub fn stats(&self) -> NodeStats {
        let mut stats = self.lock().stats();
        stats.ops = self.ops.load(Ordering::Relaxed);
        stats.log_bytes = self.log.size_bytes();
        stats
    }

    /// The log, for shutdown.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Rewrite the log if garbage passed the threshold.
    pub async fn maybe_compact(&self) {
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
            Err(e) => error!(error = %e, "compaction failed"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock would be a bug in `Store`; keep serving what is there.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn store(&self, key: Bytes, version: Version, value: Option<Bytes>) -> Reply {
        ringkv_common::protocol::check_sizes(&key, value.as_ref())?;
        if version == Version::ZERO {
            return Err(WireError::BadRequest("version 0 is reserved".into()));
        }
        // Encoded before the key and value move into the table, so neither is cloned.
        let record = EncodedRecord::new(&key, version, value.as_deref())
            .map_err(|e| WireError::BadRequest(e.to_string()))?;
        let (applied, held) = self.lock().apply(key, version, value);
        if applied {
            self.log
                .append_encoded(record)
                .await
                .map_err(|e| WireError::Internal(format!("log append failed: {e}")))?;
        }
        Ok(Response::Stored {
            applied,
            version: held,
        })
    }

    async fn forget(&self, key: Bytes, version: Version) -> Reply {
        let removed = self.lock().forget(&key, version);
        if let Some(held) = removed {
            // A tombstone at the removed version: replay lets it override the value it
            // shadows and then drops it, so the key stays forgotten across restarts.
            self.log
                .append(Record {
                    key,
                    version: held,
                    value: None,
                })
                .await
                .map_err(|e| WireError::Internal(format!("log append failed: {e}")))?;
        }
        Ok(Response::Done)
    }
}

impl Handler for Node {
    async fn handle(self: Arc<Self>, req: Request, role: Role) -> Reply {
        self.ops.fetch_add(1, Ordering::Relaxed);
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
            Request::Fetch { key } => {
                let store = self.lock();
                Ok(match store.get(&key) {
                    Some(e) => Response::Fetched {
                        version: e.version,
                        value: e.value.clone(),
                    },
                    None => Response::Fetched {
                        version: Version::ZERO,
                        value: None,
                    },
                })
            }
            Request::Forget { key, version } => self.forget(key, version).await,
            Request::Scan { after, limit } => {
                let limit = (limit as usize).clamp(1, MAX_SCAN_PAGE);
                let (entries, next) = self.lock().scan(after.as_deref(), limit);
                Ok(Response::Scanned { entries, next })
            }
            other => Err(WireError::BadRequest(format!(
                "a storage node does not answer {}",
                other.name()
            ))),
        }
    }
}

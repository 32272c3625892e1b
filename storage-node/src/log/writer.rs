//! [`Log`], the handle the store appends through, and the sync thread that fsyncs for it.
//!
//! Appends write their encoded frames to the file from the caller's own thread, under a mutex: a
//! `write` into the page cache is short, and handing it to another thread would cost more than the
//! write itself. Callers encode their own records, so CRCs are computed outside the mutex.
//!
//! What may take long, the fsync, runs on a dedicated sync thread and outside the mutex, so appends
//! go on while it runs:
//! - under [`FsyncPolicy::Always`], an append waits (asynchronously) for an fsync that started after
//!   its write. Group commit: the thread takes every sync request queued by then, fsyncs once and
//!   acks them all, so the more appends arrive while one fsync runs, the more the next one covers;
//! - under [`FsyncPolicy::Interval`], the thread fsyncs on a timer whenever something was written;
//! - under every policy, it makes the final sync at close (or once the last handle is dropped).
//!
//! Compaction writes the caller's live set to a new file off the runtime while appends go on into the
//! old one; then it copies what was appended meanwhile to the new file (the last part under the mutex),
//! syncs it, renames it over the log, syncs the directory and switches the handle, all before the
//! mutex is released.
//!
//! Invariants:
//! - Every write to the file is whole frames, made under the mutex.
//! - An append is acked only after its bytes are written, and under `Always` only after they are synced.
//! - A compaction notes the log's length before the caller takes its snapshot; every byte appended
//!   after that point is copied into the new file, so an append missing from the snapshot is kept.
//! - Appends switch to the new file only once its rename is durable, so nothing acked in it can be
//!   lost to a crash that brings back the old log.
//! - After a failed write or fsync the log is poisoned and writes nothing more: the file may hold a
//!   partial record, and after a failed fsync the kernel may have dropped dirty pages, so only a
//!   reopen (replay and repair) can say what is on disk.

use ringkv_common::sync::MutexExt;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use ringkv_common::write_ahead;
use tokio::sync::oneshot;

use super::compaction::{self, CompactStats, CompactThreshold};
use super::record::{EncodedRecord, Record};
use super::recovery::{self, Recovered, RecoveryReport};
use super::{failpoint, LogError, LOG_FILE};

pub use ringkv_common::config::{FsyncPolicy, DEFAULT_FSYNC_INTERVAL};

/// The durable, append-only log of one data directory.
///
/// `Send + Sync`: share it with an `Arc`. Appends from any number of tasks are ordered by the
/// file mutex. Dropping the last handle without [`close`](Log::close) still syncs what was
/// written, from the sync thread, but nobody waits for it.
pub struct Log {
    inner: Arc<Inner>,
    threshold: CompactThreshold,
    /// Requests to the sync thread.
    tx: mpsc::Sender<SyncRequest>,
    /// Taken by the first `close`, which waits for the sync thread to end.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// One compaction at a time.
    compaction: tokio::sync::Mutex<()>,
}

/// What the handle, the sync thread and compactions share.
struct Inner {
    dir: PathBuf,
    policy: FsyncPolicy,
    state: Mutex<State>,
    /// Length of the log file, garbage included. Changed only under `state`'s mutex.
    size: AtomicU64,
    /// Fsyncs done, for tests and stats.
    syncs: AtomicU64,
}

/// The file and what is known about it; guarded by [`Inner::state`].
struct State {
    /// The open log; `None` once closed.
    file: Option<Arc<File>>,
    /// Written but not yet synced.
    dirty: bool,
    /// Why the first failed write or fsync failed; nothing is written after it.
    poisoned: Option<String>,
    /// Under [`FsyncPolicy::Always`], how far the file has been written: zeros after the
    /// log's end ([`ringkv_common::write_ahead`]), which replay takes for the end of the log.
    /// `None` under the other policies, whose files end where the log does.
    preallocated: Option<u64>,
}

type Ack<T> = oneshot::Sender<Result<T, String>>;

/// What the handle asks of the sync thread.
enum SyncRequest {
    /// Fsync everything written so far, then ack.
    Sync(Ack<()>),
    /// Sync, close the file and end the thread.
    Close(Ack<()>),
}

impl Log {
    /// Opens or creates `dir/ringkv.log`, replays and repairs it, and starts the sync thread.
    ///
    /// Blocking. Returns the records in file order: a later record may supersede an earlier one
    /// for the same key, and the caller keeps the highest version per key. Creates `dir` if needed.
    ///
    /// # Errors
    /// I/O failures, and [`LogError::Corrupt`] if `ringkv.log` exists but is not a RingKV log.
    pub fn open(
        dir: &Path,
        policy: FsyncPolicy,
        compact_threshold: CompactThreshold,
    ) -> Result<(Log, Vec<Record>, RecoveryReport), LogError> {
        fs::create_dir_all(dir)?;
        let Recovered {
            records,
            report,
            size,
        } = recovery::recover(dir)?;
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            policy,
            state: Mutex::new(State {
                file: Some(Arc::new(open_for_append(dir)?)),
                dirty: false,
                poisoned: None,
                preallocated: (policy == FsyncPolicy::Always).then_some(size),
            }),
            size: AtomicU64::new(size),
            syncs: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let syncer = Arc::clone(&inner);
        let thread = thread::Builder::new()
            .name("ringkv-log-sync".into())
            .spawn(move || syncer.run_sync_thread(&rx))?;
        let log = Log {
            inner,
            threshold: compact_threshold,
            tx,
            thread: Mutex::new(Some(thread)),
            compaction: tokio::sync::Mutex::new(()),
        };
        Ok((log, records, report))
    }

    /// Appends `rec`; resolves once it is written and, under [`FsyncPolicy::Always`], synced.
    ///
    /// The write happens when the future is first polled; dropping the future later does not undo it.
    ///
    /// # Errors
    /// [`LogError::TooLarge`] (nothing written), [`LogError::Closed`], or [`LogError::Poisoned`].
    pub async fn append(&self, rec: Record) -> Result<(), LogError> {
        let mut frames = Vec::new();
        rec.encode_into(&mut frames)?;
        self.append_frames(&frames).await
    }

    /// Appends a record encoded beforehand; otherwise as [`append`](Log::append).
    ///
    /// # Errors
    /// [`LogError::Closed`] or [`LogError::Poisoned`].
    pub async fn append_encoded(&self, rec: EncodedRecord) -> Result<(), LogError> {
        self.append_frames(&rec.0).await
    }

    /// Appends all of `recs` with one ack. They are written together, but a crash during the write
    /// may keep only a prefix of them.
    ///
    /// # Errors
    /// As [`append`](Log::append); if any record is too large, none is written.
    pub async fn append_batch(&self, recs: Vec<Record>) -> Result<(), LogError> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut frames =
            Vec::with_capacity(recs.iter().map(Record::encoded_len).sum::<u64>() as usize);
        for rec in &recs {
            rec.encode_into(&mut frames)?;
        }
        self.append_frames(&frames).await
    }

    /// Writes encoded records to the file now, without waiting for an fsync (see
    /// [`synced`](Log::synced)). Blocking, but only for the write itself. A caller that keeps
    /// a table beside the log writes while it holds the table's lock, so that the file's
    /// order of records is the order in which the table changed.
    ///
    /// # Errors
    /// As [`append`](Log::append).
    pub fn write_encoded(&self, rec: &EncodedRecord) -> Result<(), LogError> {
        self.inner.write(&rec.0)
    }

    /// Under `Always`, waits for an fsync that covers everything written so far (at once if
    /// nothing is left unsynced); under the other policies, returns at once.
    ///
    /// # Errors
    /// [`LogError::Poisoned`] if an fsync (or an earlier write) failed, [`LogError::Closed`].
    pub async fn synced(&self) -> Result<(), LogError> {
        if self.inner.policy != FsyncPolicy::Always {
            return Ok(());
        }
        let (ack, done) = oneshot::channel();
        self.tx
            .send(SyncRequest::Sync(ack))
            .map_err(|_| LogError::Closed)?;
        done.await
            .map_err(|_| LogError::Closed)?
            .map_err(LogError::Poisoned)
    }

    /// Writes encoded frames, then under `Always` waits for the sync thread's next fsync.
    async fn append_frames(&self, frames: &[u8]) -> Result<(), LogError> {
        self.inner.write(frames)?;
        if self.inner.policy != FsyncPolicy::Always {
            return Ok(());
        }
        let (ack, done) = oneshot::channel();
        self.tx
            .send(SyncRequest::Sync(ack))
            .map_err(|_| LogError::Closed)?;
        // A dropped ack means the thread ended before answering: it was closed, or it panicked.
        done.await
            .map_err(|_| LogError::Closed)?
            .map_err(LogError::Poisoned)
    }

    /// Why the log refuses writes, if a write, fsync or compaction failed.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.lock().poisoned.clone()
    }

    /// Bytes in the log, garbage included (not the zeros the file is written ahead in).
    pub fn size_bytes(&self) -> u64 {
        self.inner.size.load(Ordering::Relaxed)
    }

    /// Fsyncs of the log file so far (group commit makes this far fewer than appends under load).
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Whether the log is due for compaction, given the summed
    /// [`Record::encoded_len`] of the caller's live records.
    pub fn should_compact(&self, live_bytes: u64) -> bool {
        self.threshold.is_due(self.size_bytes(), live_bytes)
    }

    /// Rewrites the log to the live set `snapshot` returns: the caller's records, with whatever
    /// tombstones it wants kept.
    ///
    /// `snapshot` is called once the compaction has noted where the log ends; it must reflect every
    /// append that completed before it is called. Appends made from then on, finished or not, are
    /// carried over into the new file after the snapshot's records. Appends go on while the new file
    /// is written, and wait only while the last of them are copied and the file is switched.
    ///
    /// # Errors
    /// Before the new file is in place (I/O, [`LogError::TooLarge`]) the old log stays and remains
    /// writable; after (the directory sync failed) the log is poisoned.
    pub async fn compact(
        &self,
        snapshot: impl FnOnce() -> Vec<Record>,
    ) -> Result<CompactStats, LogError> {
        let _one_at_a_time = self.compaction.lock().await;
        let start = self.inner.writable_size()?;
        let live = snapshot();
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || inner.compact(start, &live)).await {
            Ok(result) => result,
            Err(e) => Err(LogError::Poisoned(
                self.inner.lock().poison("compaction failed", e),
            )),
        }
    }

    /// Syncs everything written and stops the sync thread. Idempotent; later appends fail with
    /// [`LogError::Closed`].
    ///
    /// # Errors
    /// [`LogError::Poisoned`] if the final sync (or an earlier write) failed.
    pub async fn close(&self) -> Result<(), LogError> {
        let thread = self.thread.lock_unpoisoned().take();
        let Some(thread) = thread else {
            return Ok(());
        };
        let (ack, done) = oneshot::channel();
        let result = match self.tx.send(SyncRequest::Close(ack)) {
            Ok(()) => match done.await {
                Ok(synced) => synced.map_err(LogError::Poisoned),
                Err(_) => Err(LogError::Closed),
            },
            Err(_) => Err(LogError::Closed),
        };
        // The thread has acked (or died); joining is then quick, but still blocking.
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => result,
            _ => Err(LogError::Poisoned("the log sync thread panicked".into())),
        }
    }
}

/// Opens the log for positional writes at its end (not `O_APPEND`: the end of the log may be
/// before the end of the file, see [`State::preallocated`]).
fn open_for_append(dir: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).open(dir.join(LOG_FILE))
}

impl State {
    /// Refuses all further writes and returns the reason.
    fn poison(&mut self, what: &str, err: impl fmt::Display) -> String {
        let reason = format!("{what}: {err}");
        tracing::error!(%reason, "log poisoned; reopen to recover");
        self.poisoned = Some(reason.clone());
        // Nothing will be synced again.
        self.dirty = false;
        reason
    }

    /// The file, if it may be written.
    fn writable(&self) -> Result<&Arc<File>, LogError> {
        match (&self.file, &self.poisoned) {
            (None, _) => Err(LogError::Closed),
            (Some(_), Some(reason)) => Err(LogError::Poisoned(reason.clone())),
            (Some(file), None) => Ok(file),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement that can panic, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock_unpoisoned()
    }

    /// Writes `frames` at the end of the log.
    fn write(&self, frames: &[u8]) -> Result<(), LogError> {
        let mut state = self.lock();
        let file = Arc::clone(state.writable()?);
        // Only writes under the state's lock change the size.
        let at = self.size.load(Ordering::Relaxed);
        let end = at + frames.len() as u64;
        write_ahead::make_room(&file, &mut state.preallocated, end);
        match file.write_all_at(frames, at) {
            Ok(()) => {
                self.size.store(end, Ordering::Relaxed);
                state.dirty = true;
                Ok(())
            }
            Err(e) => Err(LogError::Poisoned(state.poison("log write failed", e))),
        }
    }

    /// The log's length, if it may be written.
    fn writable_size(&self) -> Result<u64, LogError> {
        let state = self.lock();
        state.writable()?;
        Ok(self.size.load(Ordering::Relaxed))
    }

    /// Fsyncs what was written so far, if anything. Blocking.
    fn sync(&self) -> Result<(), String> {
        let file = {
            let mut state = self.lock();
            if let Some(reason) = &state.poisoned {
                return Err(reason.clone());
            }
            match &state.file {
                Some(file) if state.dirty => {
                    let file = Arc::clone(file);
                    // Cleared before the fsync: a write made while it runs sets it again.
                    state.dirty = false;
                    file
                }
                _ => return Ok(()),
            }
        };
        self.sync_file(&file)
    }

    fn sync_file(&self, file: &File) -> Result<(), String> {
        let synced =
            failpoint("log-before-fsync").and_then(|()| file.sync_data().map_err(LogError::from));
        match synced {
            Ok(()) => {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(self.lock().poison("log fsync failed", e)),
        }
    }

    /// Closes the file, syncing it first if anything was written, and cuts off the zeros
    /// written ahead (so a log closed cleanly ends where its last record does). Blocking.
    fn close_file(&self) -> Result<(), String> {
        let (file, dirty, preallocated) = {
            let mut state = self.lock();
            let file = state.file.take();
            if let Some(reason) = &state.poisoned {
                return Err(reason.clone());
            }
            (
                file,
                std::mem::take(&mut state.dirty),
                state.preallocated.take(),
            )
        };
        let Some(file) = file else {
            return Ok(());
        };
        if dirty {
            self.sync_file(&file)?;
        }
        write_ahead::cut_off(&file, preallocated, self.size.load(Ordering::Relaxed));
        Ok(())
    }

    /// The sync thread: group commit for `Always`, the timer for `Interval`, the final sync.
    fn run_sync_thread(&self, rx: &mpsc::Receiver<SyncRequest>) {
        let period = match self.policy {
            FsyncPolicy::Interval(period) => Some(period),
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        let mut due = period.map(|period| Instant::now() + period);
        loop {
            let first = match due {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(request) => request,
                    Err(RecvTimeoutError::Timeout) => {
                        // A failure poisons the log, and the next append reports it.
                        let _ = self.sync();
                        due = period.map(|period| Instant::now() + period);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
            };
            // Group commit: every request queued by now is covered by one fsync, which starts
            // after their writes because each request is sent after its write.
            let mut acks = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            while let Some(request) = next {
                match request {
                    SyncRequest::Sync(ack) => acks.push(ack),
                    SyncRequest::Close(ack) => {
                        close = Some(ack);
                        break;
                    }
                }
                next = rx.try_recv().ok();
            }
            if !acks.is_empty() {
                let result = self.sync();
                for ack in acks {
                    // A caller that stopped waiting is no error of ours.
                    let _ = ack.send(result.clone());
                }
            }
            if let Some(ack) = close {
                let _ = ack.send(self.close_file());
                return;
            }
        }
        // Every handle was dropped without `close`.
        if let Err(reason) = self.close_file() {
            tracing::error!(%reason, "final log sync failed");
        }
    }

    /// Rewrites the log to `live` plus everything appended from byte `start` on. Blocking.
    fn compact(&self, start: u64, live: &[Record]) -> Result<CompactStats, LogError> {
        let after = compaction::write_compacted(&self.dir, live)?;
        let switched = self.switch_to_compacted(start, after);
        if switched.is_err() {
            // Best effort, as in `write_compacted`; after a successful rename there is nothing here.
            let _ = fs::remove_file(self.dir.join(super::COMPACT_FILE));
        }
        let (before, after) = switched?;
        tracing::info!(before, after, records = live.len(), "log compacted");
        Ok(CompactStats {
            before_bytes: before,
            after_bytes: after,
        })
    }

    /// Copies the bytes appended since `start` into the written and synced compact file, then
    /// installs it and switches appends to it. `written` is the compact file's length so far.
    /// Returns the lengths of the old log and of the new one.
    fn switch_to_compacted(&self, start: u64, written: u64) -> Result<(u64, u64), LogError> {
        // Only compaction renames the log, and compactions run one at a time: until the rename
        // below, this is the file appends are going to.
        let mut old = File::open(self.dir.join(LOG_FILE))?;
        old.seek(SeekFrom::Start(start))?;
        let mut new = compaction::open_compacted(&self.dir)?;
        let mut copied = start;
        // Most of what was appended meanwhile is copied while appends go on...
        let end = self.writable_size()?;
        copy_exact(&mut old, &mut new, end - copied)?;
        copied = end;
        // ...and synced before the lock is taken, so that appends wait only for the sync of
        // the little that arrives during the copy...
        new.sync_data()?;
        // ...and the rest under the lock, with the switch.
        let mut state = self.lock();
        state.writable()?;
        let end = self.size.load(Ordering::Relaxed);
        copy_exact(&mut old, &mut new, end - copied)?;
        new.sync_data()?;
        drop(new);
        compaction::install(&self.dir)?;
        // The old log is now unlinked: from here on a failure leaves appends nowhere safe to go.
        let file = match open_for_append(&self.dir) {
            Ok(file) => file,
            Err(e) => {
                return Err(LogError::Poisoned(
                    state.poison("reopening the compacted log", e),
                ))
            }
        };
        if let Err(e) = compaction::finish(&self.dir) {
            return Err(LogError::Poisoned(
                state.poison("syncing the directory after compaction", e),
            ));
        }
        state.file = Some(Arc::new(file));
        // Everything in the new file is synced, the carried-over appends included.
        state.dirty = false;
        let after = written + (end - start);
        self.size.store(after, Ordering::Relaxed);
        state.preallocated = state.preallocated.map(|_| after);
        Ok((end, after))
    }
}

/// Copies exactly `len` bytes from `from`'s position to `to`.
fn copy_exact(from: &mut File, to: &mut File, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut io::Read::take(&mut *from, len), to)?;
    if copied != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the log ended before its recorded length",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::log::test_support::{del, mixed, put};

    fn open(dir: &Path, policy: FsyncPolicy) -> (Log, Vec<Record>, RecoveryReport) {
        Log::open(dir, policy, CompactThreshold::default()).unwrap()
    }

    /// Under `Always` the file is written ahead in zeros, so a sync changes no file metadata;
    /// a crash leaves the zeros, which replay takes for the log's end, and a clean close cuts
    /// them off.
    #[tokio::test]
    async fn under_always_the_file_runs_ahead_in_zeros_that_replay_takes_for_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (log, _, _) = open(&dir, FsyncPolicy::Always);
        let records = mixed(50);
        for rec in &records {
            log.append(rec.clone()).await.unwrap();
        }
        let size = log.size_bytes();
        let file_len = |dir: &Path| fs::metadata(dir.join(LOG_FILE)).unwrap().len();
        assert!(file_len(&dir) > size, "written ahead");
        // What a crash now would leave: the synced records, then zeros.
        let crashed = tmp.path().join("crashed");
        fs::create_dir(&crashed).unwrap();
        fs::copy(dir.join(LOG_FILE), crashed.join(LOG_FILE)).unwrap();
        let (reopened, got, report) = open(&crashed, FsyncPolicy::Always);
        assert_eq!(got, records);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.preallocated_bytes, file_len(&dir) - size);
        assert_eq!(reopened.size_bytes(), size);
        // Appends go on at the log's end, not the file's.
        let extra = put(b"after", 99, b"crash");
        reopened.append(extra.clone()).await.unwrap();
        reopened.close().await.unwrap();
        let (_, got, report) = open(&crashed, FsyncPolicy::Never);
        assert_eq!(got.len(), records.len() + 1);
        assert_eq!(got.last(), Some(&extra));
        assert!(
            report.is_clean() && report.preallocated_bytes == 0,
            "{report:?}"
        );
        // A clean close leaves no zeros.
        log.close().await.unwrap();
        assert_eq!(file_len(&dir), size);
        // Other policies never write ahead.
        let (never, _, _) = open(&tmp.path().join("never"), FsyncPolicy::Never);
        never.append(put(b"k", 1, b"v")).await.unwrap();
        assert_eq!(file_len(&tmp.path().join("never")), never.size_bytes());
        never.close().await.unwrap();
    }

    #[test]
    fn log_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Log>();
    }

    #[tokio::test]
    async fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("not-yet-created");
        let (log, got, report) = open(&dir, FsyncPolicy::Always);
        assert!(got.is_empty());
        assert!(report.is_clean());

        let mut records = mixed(30);
        for rec in &records {
            log.append(rec.clone()).await.unwrap();
        }
        let batch = vec![
            put(b"\x00\x01binary", 99, b"\xff\x00"),
            del(b"gone", 100),
            put(b"", 101, b""),
        ];
        log.append_batch(batch.clone()).await.unwrap();
        log.append_batch(Vec::new()).await.unwrap();
        records.extend(batch);
        let size = log.size_bytes();
        log.close().await.unwrap();

        assert_eq!(fs::metadata(dir.join(LOG_FILE)).unwrap().len(), size);
        let (log, got, report) = open(&dir, FsyncPolicy::Always);
        assert_eq!(got, records);
        assert!(report.is_clean());
        assert_eq!(report.records, records.len() as u64);
        assert_eq!(report.bytes + crate::log::record::HEADER_LEN, size);
        assert_eq!(log.size_bytes(), size);
        log.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_fsyncs() {
        const N: u64 = 1000;
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path(), FsyncPolicy::Always);
        let log = Arc::new(log);
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    log.append(put(format!("k{i}").as_bytes(), i + 1, b"v"))
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let syncs = log.sync_count();
        assert!((1..N).contains(&syncs), "{syncs} fsyncs for {N} appends");
        log.close().await.unwrap();

        let (log, got, report) = open(dir.path(), FsyncPolicy::Always);
        assert!(report.is_clean());
        let versions: HashSet<u64> = got.iter().map(|r| r.version.0).collect();
        assert_eq!(versions, (1..=N).collect());
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn interval_syncs_an_idle_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path(), FsyncPolicy::Interval(Duration::from_millis(20)));
        log.append(put(b"k", 1, b"v")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.sync_count() == 0 {
            assert!(Instant::now() < deadline, "idle log never synced");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn never_syncs_only_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path(), FsyncPolicy::Never);
        for i in 0..10 {
            log.append(put(b"k", i, b"v")).await.unwrap();
        }
        assert_eq!(log.sync_count(), 0);
        log.close().await.unwrap();
        assert_eq!(log.sync_count(), 1);
    }

    #[tokio::test]
    async fn close_is_idempotent_and_final() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path(), FsyncPolicy::Always);
        log.append(put(b"k", 1, b"v")).await.unwrap();
        log.close().await.unwrap();
        log.close().await.unwrap();
        assert!(matches!(
            log.append(put(b"k", 2, b"v")).await,
            Err(LogError::Closed)
        ));
        assert!(matches!(log.compact(Vec::new).await, Err(LogError::Closed)));
    }

    #[tokio::test]
    async fn oversized_record_is_refused_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path(), FsyncPolicy::Always);
        let big = put(
            b"k",
            1,
            &vec![0; ringkv_common::protocol::MAX_VALUE_LEN + 1],
        );
        let ok = put(b"k", 2, b"v");
        assert!(matches!(
            log.append(big.clone()).await,
            Err(LogError::TooLarge { .. })
        ));
        assert!(matches!(
            log.append_batch(vec![ok.clone(), big]).await,
            Err(LogError::TooLarge { .. })
        ));
        log.append(ok.clone()).await.unwrap();
        log.close().await.unwrap();
        let (_log, got, _) = open(dir.path(), FsyncPolicy::Always);
        assert_eq!(got, vec![ok]);
    }
}

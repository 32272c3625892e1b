//! [`Log`], the handle the store appends through, and the writer thread that owns the file.
//!
//! All blocking file I/O happens on one dedicated OS thread, fed by a channel; callers await a
//! oneshot ack, so the async runtime never blocks on the disk. Callers encode their own records
//! (spreading the CRC work over the runtime) and the thread only writes bytes.
//!
//! Group commit: the thread takes the first queued command, drains every append queued behind it,
//! writes them together, syncs once (per the [`FsyncPolicy`]) and then acks them all. The more
//! appends arrive while one fsync runs, the more the next fsync covers.
//!
//! Invariants:
//! - Commands run in the order they were queued, so an append queued after a `compact` lands in
//!   the compacted file, and one queued before it is in the caller's live set.
//! - An append is acked only after its bytes are written, and under `Always` only after they are synced.
//! - After a failed write or fsync the thread is poisoned and writes nothing more: the file may hold a
//!   partial record, and after a failed fsync the kernel may have dropped dirty pages, so only a
//!   reopen (replay and repair) can say what is on disk.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::compaction::{self, CompactStats, CompactThreshold};
use super::record::Record;
use super::recovery::{self, Recovered, RecoveryReport};
use super::{failpoint, LogError, LOG_FILE};

/// Fsync period of a bare `interval` policy: bounds what a power loss can take to a tenth of a
/// second of acknowledged writes while costing at most ten fsyncs a second.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);

/// Largest single `write` of a group commit. Small frames are coalesced up to this, so a burst
/// costs few syscalls without doubling the memory of a burst of large values.
const MAX_WRITE_CHUNK: usize = 4 * 1024 * 1024;

/// When the log fsyncs, which decides what an acknowledged write survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Fsync before acknowledging; concurrent appends share one fsync (group commit).
    /// An acknowledged write survives a power loss.
    Always,
    /// Acknowledge once written; fsync at least this often (also when idle). An acknowledged write
    /// survives a process crash; a power loss can take the last interval's writes.
    Interval(Duration),
    /// Acknowledge once written; fsync only on close and compaction. An acknowledged write survives
    /// a process crash but not a power loss or kernel crash.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Parses `always`, `never`, `interval` (every 100 ms) or `interval:DURATION` (`250ms`, `2s`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            "interval" => Ok(FsyncPolicy::Interval(DEFAULT_FSYNC_INTERVAL)),
            _ => match s.strip_prefix("interval:") {
                Some(period) => match ringkv_common::parse_duration(period)? {
                    d if d.is_zero() => Err(format!(
                        "fsync interval must be positive in {s:?} (use `always` to sync every write)"
                    )),
                    d => Ok(FsyncPolicy::Interval(d)),
                },
                None => Err(format!(
                    "unknown fsync policy {s:?} (expected always, never, interval or interval:DURATION)"
                )),
            },
        }
    }
}

impl fmt::Display for FsyncPolicy {
    /// The form [`FromStr`] accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}ms", d.as_secs_f64() * 1000.0),
        }
    }
}

/// The durable, append-only log of one data directory.
///
/// `Send + Sync`: share it with an `Arc`. Appends from any number of tasks are ordered by the
/// single writer thread. Dropping the last handle without [`close`](Log::close) still syncs what
/// was written, from the writer thread, but nobody waits for it.
pub struct Log {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    threshold: CompactThreshold,
    /// Taken by the first `close`, which waits for the thread to end.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Counters the writer thread updates and the handle reads.
struct Shared {
    /// Length of the log file, garbage included.
    size: AtomicU64,
    /// Fsyncs done, for tests and stats.
    syncs: AtomicU64,
}

type Ack<T> = oneshot::Sender<Result<T, LogError>>;

/// What the handle asks of the writer thread.
enum Command {
    /// Write these encoded frames (one or more records), then ack.
    Append { frames: Vec<u8>, ack: Ack<()> },
    /// Replace the log with exactly these records.
    Compact {
        live: Vec<Record>,
        ack: Ack<CompactStats>,
    },
    /// Sync, close the file and end the thread.
    Close { ack: Ack<()> },
}

impl Log {
    /// Opens or creates `dir/ringkv.log`, replays and repairs it, and starts the writer thread.
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
        let shared = Arc::new(Shared {
            size: AtomicU64::new(size),
            syncs: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            dir: dir.to_path_buf(),
            file: open_for_append(dir)?,
            policy,
            shared: Arc::clone(&shared),
            rx,
            dirty: false,
            last_sync: Instant::now(),
            poisoned: None,
        };
        let thread = thread::Builder::new()
            .name("ringkv-log-writer".into())
            .spawn(move || writer.run())?;
        let log = Log {
            tx,
            shared,
            threshold: compact_threshold,
            thread: Mutex::new(Some(thread)),
        };
        Ok((log, records, report))
    }

    /// Appends `rec`; resolves once it is written and, under [`FsyncPolicy::Always`], synced.
    ///
    /// Dropping the future after it was first polled does not unqueue the record.
    ///
    /// # Errors
    /// [`LogError::TooLarge`] (nothing queued), [`LogError::Closed`], or [`LogError::Poisoned`].
    pub async fn append(&self, rec: Record) -> Result<(), LogError> {
        let mut frames = Vec::new();
        rec.encode_into(&mut frames)?;
        self.request(|ack| Command::Append { frames, ack }).await
    }

    /// Appends all of `recs` with one ack. They are written together, but a crash during the write
    /// may keep only a prefix of them.
    ///
    /// # Errors
    /// As [`append`](Log::append); if any record is too large, none is queued.
    pub async fn append_batch(&self, recs: Vec<Record>) -> Result<(), LogError> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut frames =
            Vec::with_capacity(recs.iter().map(Record::encoded_len).sum::<u64>() as usize);
        for rec in &recs {
            rec.encode_into(&mut frames)?;
        }
        self.request(|ack| Command::Append { frames, ack }).await
    }

    /// Bytes currently in the log file, garbage included.
    pub fn size_bytes(&self) -> u64 {
        self.shared.size.load(Ordering::Relaxed)
    }

    /// Fsyncs of the log file so far (group commit makes this far fewer than appends under load).
    pub fn sync_count(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Whether the log is due for compaction, given the summed
    /// [`Record::encoded_len`] of the caller's live records.
    pub fn should_compact(&self, live_bytes: u64) -> bool {
        self.threshold.is_due(self.size_bytes(), live_bytes)
    }

    /// Rewrites the log to exactly `live`: the caller's live set, with whatever tombstones it wants kept.
    ///
    /// Appends queued before this call must be reflected in `live`; appends queued after it land in
    /// the new file. Appends wait while the rewrite runs.
    ///
    /// # Errors
    /// Before the new file is in place (I/O, [`LogError::TooLarge`]) the old log stays and remains
    /// writable; after (the directory sync failed) the log is poisoned.
    pub async fn compact(&self, live: Vec<Record>) -> Result<CompactStats, LogError> {
        self.request(|ack| Command::Compact { live, ack }).await
    }

    /// Syncs everything written and stops the writer thread. Idempotent; later appends fail with
    /// [`LogError::Closed`].
    ///
    /// # Errors
    /// [`LogError::Poisoned`] if the final sync (or an earlier write) failed.
    pub async fn close(&self) -> Result<(), LogError> {
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(thread) = thread else {
            return Ok(());
        };
        let (ack, done) = oneshot::channel();
        let result = match self.tx.send(Command::Close { ack }) {
            Ok(()) => done.await.unwrap_or(Err(LogError::Closed)),
            Err(_) => Err(LogError::Closed),
        };
        // The thread has acked (or died); joining is then quick, but still blocking.
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => result,
            _ => Err(LogError::Poisoned("the log writer thread panicked".into())),
        }
    }

    async fn request<T>(&self, command: impl FnOnce(Ack<T>) -> Command) -> Result<T, LogError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(command(ack)).map_err(|_| LogError::Closed)?;
        // A dropped ack means the thread ended before answering: it was closed, or it panicked.
        done.await.map_err(|_| LogError::Closed)?
    }
}

fn open_for_append(dir: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).open(dir.join(LOG_FILE))
}

/// The writer thread's state; it alone touches the file after [`Log::open`].
struct Writer {
    dir: PathBuf,
    file: File,
    policy: FsyncPolicy,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    /// Written but not yet synced.
    dirty: bool,
    last_sync: Instant,
    /// Why the first failed write or fsync failed; nothing is written after it.
    poisoned: Option<String>,
}

impl Writer {
    fn run(mut self) {
        // A non-append command found while draining a group: it runs right after the group.
        let mut next = None;
        loop {
            let Some(command) = next.take().or_else(|| self.recv()) else {
                break;
            };
            match command {
                Command::Append { frames, ack } => {
                    let mut batch = vec![frames];
                    let mut acks = vec![ack];
                    // Group commit: everything queued by now shares this write and this fsync.
                    while let Ok(command) = self.rx.try_recv() {
                        match command {
                            Command::Append { frames, ack } => {
                                batch.push(frames);
                                acks.push(ack);
                            }
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    let result = self.write(&batch);
                    for ack in acks {
                        // A caller that stopped waiting is no error of ours.
                        let _ = ack.send(result.clone().map_err(LogError::Poisoned));
                    }
                }
                Command::Compact { live, ack } => {
                    let _ = ack.send(self.compact(live));
                }
                Command::Close { ack } => {
                    let result = self.sync_if_dirty().map_err(LogError::Poisoned);
                    // Close the file before the caller hears back, so it can reopen at once.
                    drop(self);
                    let _ = ack.send(result);
                    return;
                }
            }
        }
        // Every handle was dropped without `close`.
        if let Err(reason) = self.sync_if_dirty() {
            tracing::error!(%reason, "final log sync failed");
        }
    }

    /// The next command; under `Interval`, syncs while waiting whenever a sync comes due.
    /// `None` once every handle is gone.
    fn recv(&mut self) -> Option<Command> {
        loop {
            let period = match self.policy {
                FsyncPolicy::Interval(period) if self.dirty => period,
                _ => return self.rx.recv().ok(),
            };
            let wait = (self.last_sync + period).saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(command) => return Some(command),
                // A failure poisons the writer, and the next command reports it.
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.sync();
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Writes one group of encoded frames and syncs as the policy says.
    fn write(&mut self, batch: &[Vec<u8>]) -> Result<(), String> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        match write_coalesced(&mut self.file, batch) {
            Ok(written) => {
                self.shared.size.fetch_add(written, Ordering::Relaxed);
                self.dirty = true;
            }
            Err(e) => return Err(self.poison("log write failed", e)),
        }
        match self.policy {
            FsyncPolicy::Always => self.sync(),
            FsyncPolicy::Interval(period) if self.last_sync.elapsed() >= period => self.sync(),
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => Ok(()),
        }
    }

    fn sync(&mut self) -> Result<(), String> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        let synced = failpoint("log-before-fsync")
            .and_then(|()| self.file.sync_data().map_err(LogError::from));
        match synced {
            Ok(()) => {
                self.shared.syncs.fetch_add(1, Ordering::Relaxed);
                self.dirty = false;
                self.last_sync = Instant::now();
                Ok(())
            }
            Err(e) => Err(self.poison("log fsync failed", e)),
        }
    }

    fn sync_if_dirty(&mut self) -> Result<(), String> {
        match &self.poisoned {
            Some(reason) => Err(reason.clone()),
            None if self.dirty => self.sync(),
            None => Ok(()),
        }
    }

    fn compact(&mut self, live: Vec<Record>) -> Result<CompactStats, LogError> {
        if let Some(reason) = &self.poisoned {
            return Err(LogError::Poisoned(reason.clone()));
        }
        let before = self.shared.size.load(Ordering::Relaxed);
        let after = compaction::write_compacted(&self.dir, &live)?;
        compaction::install(&self.dir)?;
        // `ringkv.log` is now the new file and `self.file` the unlinked old one. Switch first; if
        // switching or making the rename durable fails, appends could land where a crash loses
        // them, so the log is poisoned.
        match open_for_append(&self.dir) {
            Ok(file) => self.file = file,
            Err(e) => {
                return Err(LogError::Poisoned(
                    self.poison("reopening the compacted log", e),
                ))
            }
        }
        self.shared.size.store(after, Ordering::Relaxed);
        // Unsynced appends went to the old file; the caller's live set holds them, synced.
        self.dirty = false;
        if let Err(e) = compaction::finish(&self.dir) {
            return Err(LogError::Poisoned(
                self.poison("syncing the directory after compaction", e),
            ));
        }
        tracing::info!(before, after, records = live.len(), "log compacted");
        Ok(CompactStats {
            before_bytes: before,
            after_bytes: after,
        })
    }

    /// Refuses all further writes and returns the reason.
    fn poison(&mut self, what: &str, err: impl fmt::Display) -> String {
        let reason = format!("{what}: {err}");
        tracing::error!(%reason, "log poisoned; reopen to recover");
        self.poisoned = Some(reason.clone());
        // Nothing will be synced again; stop the interval timer from retrying.
        self.dirty = false;
        reason
    }
}

/// Writes `batch` in order, coalescing small frames into writes of up to [`MAX_WRITE_CHUNK`];
/// returns the bytes written.
fn write_coalesced(file: &mut File, batch: &[Vec<u8>]) -> io::Result<u64> {
    if let [only] = batch {
        file.write_all(only)?;
        return Ok(only.len() as u64);
    }
    let mut joined = Vec::new();
    let mut written = 0;
    for frames in batch {
        if joined.len() + frames.len() > MAX_WRITE_CHUNK && !joined.is_empty() {
            file.write_all(&joined)?;
            joined.clear();
        }
        if frames.len() > MAX_WRITE_CHUNK {
            file.write_all(frames)?;
        } else {
            joined.extend_from_slice(frames);
        }
        written += frames.len() as u64;
    }
    if !joined.is_empty() {
        file.write_all(&joined)?;
    }
    Ok(written)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::log::test_support::{del, mixed, put};

    fn open(dir: &Path, policy: FsyncPolicy) -> (Log, Vec<Record>, RecoveryReport) {
        Log::open(dir, policy, CompactThreshold::default()).unwrap()
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
        assert!(matches!(
            log.compact(Vec::new()).await,
            Err(LogError::Closed)
        ));
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

    #[test]
    fn coalesced_writes_keep_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::create(&path).unwrap();
        let batch = vec![
            vec![1; 10],
            vec![2; MAX_WRITE_CHUNK + 1],
            vec![3; MAX_WRITE_CHUNK - 5],
            vec![4; 10],
        ];
        let n = write_coalesced(&mut file, &batch).unwrap();
        assert_eq!(fs::read(&path).unwrap(), batch.concat());
        assert_eq!(n, batch.concat().len() as u64);
    }

    #[test]
    fn fsync_policy_parses_and_prints() {
        let cases = [
            ("always", FsyncPolicy::Always),
            ("never", FsyncPolicy::Never),
            (
                "interval",
                FsyncPolicy::Interval(Duration::from_millis(100)),
            ),
            (
                "interval:250ms",
                FsyncPolicy::Interval(Duration::from_millis(250)),
            ),
            ("interval:2s", FsyncPolicy::Interval(Duration::from_secs(2))),
        ];
        for (text, policy) in cases {
            assert_eq!(text.parse::<FsyncPolicy>(), Ok(policy), "{text}");
            assert_eq!(
                policy.to_string().parse::<FsyncPolicy>(),
                Ok(policy),
                "{policy}"
            );
        }
        for bad in [
            "",
            "Always",
            "sometimes",
            "interval:",
            "interval:0ms",
            "interval:soon",
            "interval:5y",
        ] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad:?} parsed");
        }
    }
}

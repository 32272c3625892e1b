//! Rewriting the log to a given set of records, and deciding when that is worth doing.
//!
//! A rewrite is three steps, split so the log can carry appends made during step 1 over to the new
//! file (through [`open_compacted`]) and switch its file handle right after step 3:
//! 1. `write_compacted`: write `ringkv.log.compact` (magic + records) and fsync it;
//! 2. `install`: rename it over `ringkv.log` (atomic: a crash leaves either the old or the new log);
//! 3. `finish`: fsync the directory, making the rename durable.
//!
//! Invariant: `ringkv.log` is complete at every instant. Until step 3 returns, a crash may bring
//! back the old log, which is fine because the new one holds nothing the old one did not.
//!
//! Failpoints (`super::failpoint` lists the actions): `compaction-before-rename`
//! between steps 1 and 2, `compaction-after-rename` between steps 2 and 3.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::record::{Record, HEADER_LEN, MAGIC};
use super::{failpoint, sync_dir, LogError, COMPACT_FILE, LOG_FILE};

/// Write buffer for a rewrite; records are encoded one at a time into it.
const REWRITE_BUFFER: usize = 1 << 20;

/// When a log has enough garbage to be worth rewriting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompactThreshold {
    /// Never compact a log smaller than this: rewriting a small file saves little and costs a pause.
    pub min_bytes: u64,
    /// Compact once at least this fraction of the file is garbage (superseded records).
    pub garbage_ratio: f64,
}

impl Default for CompactThreshold {
    /// 64 MiB and one half: the log stays within about twice the live data, and a rewrite
    /// (which pauses appends while it runs) happens at most once per live-set's worth of writes.
    fn default() -> Self {
        CompactThreshold {
            min_bytes: 64 * 1024 * 1024,
            garbage_ratio: 0.5,
        }
    }
}

impl CompactThreshold {
    /// Whether a log of `size` bytes, of which `live_bytes` are live records, should be compacted.
    pub fn is_due(&self, size: u64, live_bytes: u64) -> bool {
        if size == 0 || size < self.min_bytes {
            return false;
        }
        let garbage = size.saturating_sub(live_bytes + HEADER_LEN);
        garbage as f64 / size as f64 >= self.garbage_ratio
    }
}

/// What a compaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactStats {
    /// Log size before, garbage included.
    pub before_bytes: u64,
    /// Log size after: the header plus the live records.
    pub after_bytes: u64,
}

/// Writes `records` to `dir/ringkv.log.compact` and fsyncs it; returns its size.
///
/// # Errors
/// I/O failures, or [`LogError::TooLarge`] for a record that cannot be encoded; the partial file
/// is removed either way.
pub(crate) fn write_compacted(dir: &Path, records: &[Record]) -> Result<u64, LogError> {
    let tmp = dir.join(COMPACT_FILE);
    let written = (|| {
        let mut out = BufWriter::with_capacity(REWRITE_BUFFER, File::create(&tmp)?);
        out.write_all(MAGIC)?;
        let mut size = HEADER_LEN;
        let mut buf = Vec::new();
        for record in records {
            buf.clear();
            record.encode_into(&mut buf)?;
            out.write_all(&buf)?;
            size += buf.len() as u64;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(size)
    })();
    if written.is_err() {
        // Best effort: a leftover is also deleted at the next open.
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Opens the file [`write_compacted`] wrote, to append to it before [`install`].
pub(crate) fn open_compacted(dir: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).open(dir.join(COMPACT_FILE))
}

/// Renames `ringkv.log.compact` over `ringkv.log`.
///
/// # Errors
/// I/O failures (the old log is then still in place and the compact file is removed).
pub(crate) fn install(dir: &Path) -> Result<(), LogError> {
    let tmp = dir.join(COMPACT_FILE);
    let renamed = failpoint("compaction-before-rename")
        .and_then(|()| fs::rename(&tmp, dir.join(LOG_FILE)).map_err(LogError::from));
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed
}

/// Makes the rename of [`install`] durable.
pub(crate) fn finish(dir: &Path) -> Result<(), LogError> {
    failpoint("compaction-after-rename")?;
    Ok(sync_dir(dir)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::log::test_support::{del, put};
    use crate::log::{FsyncPolicy, Log};

    fn open(dir: &Path) -> (Log, Vec<Record>, crate::log::RecoveryReport) {
        Log::open(dir, FsyncPolicy::Never, CompactThreshold::default()).unwrap()
    }

    /// The highest version per key, as the store keeps it.
    fn live_set(records: &[Record]) -> Vec<Record> {
        let mut live = BTreeMap::new();
        for r in records {
            live.insert(r.key.clone(), r.clone());
        }
        live.into_values().collect()
    }

    #[tokio::test]
    async fn compaction_keeps_exactly_the_live_set() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path());
        let mut all = Vec::new();
        for round in 0..10u64 {
            for k in 0..50u64 {
                let key = format!("key-{k}");
                let rec = if round == 9 && k % 10 == 0 {
                    del(key.as_bytes(), round * 100 + k)
                } else {
                    put(
                        key.as_bytes(),
                        round * 100 + k,
                        format!("value {round}").as_bytes(),
                    )
                };
                log.append(rec.clone()).await.unwrap();
                all.push(rec);
            }
        }
        let live = live_set(&all);
        let live_bytes: u64 = live.iter().map(Record::encoded_len).sum();
        let before = log.size_bytes();

        let stats = log.compact(|| live.clone()).await.unwrap();
        assert_eq!(stats.before_bytes, before);
        assert_eq!(stats.after_bytes, HEADER_LEN + live_bytes);
        assert_eq!(log.size_bytes(), stats.after_bytes);
        assert!(stats.after_bytes < before / 5);
        assert!(!dir.path().join(COMPACT_FILE).exists());

        // Appends after the compaction land in the new file.
        let later = put(b"after", 10_000, b"compaction");
        log.append(later.clone()).await.unwrap();
        log.close().await.unwrap();

        let (log, got, report) = open(dir.path());
        assert!(report.is_clean());
        let mut expected = live;
        expected.push(later);
        assert_eq!(got, expected);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn appends_during_a_compaction_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path());
        let old = put(b"k", 1, b"old");
        log.append(old.clone()).await.unwrap();
        let next = put(b"k", 2, b"new");
        // The compaction notes the log's end and snapshots first; the append is then written to
        // the old file while the rewrite runs, and must be carried over.
        let (stats, appended) =
            tokio::join!(log.compact(|| vec![old.clone()]), log.append(next.clone()));
        stats.unwrap();
        appended.unwrap();
        log.close().await.unwrap();
        let (_log, got, _) = open(dir.path());
        assert_eq!(got, vec![old, next]);
    }

    /// Many appenders racing repeated compactions, under every fsync policy: after a reopen, each
    /// key holds the last version acknowledged for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_survive_repeated_compactions() {
        use std::sync::{Arc, Mutex};
        for policy in [
            FsyncPolicy::Never,
            FsyncPolicy::Always,
            FsyncPolicy::Interval(std::time::Duration::from_millis(5)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (log, _, _) = Log::open(dir.path(), policy, CompactThreshold::default()).unwrap();
            let log = Arc::new(log);
            // What the appenders have applied, as the store would hold it.
            let acked = Arc::new(Mutex::new(BTreeMap::new()));
            let appenders: Vec<_> = (0..4u64)
                .map(|task| {
                    let (log, acked) = (Arc::clone(&log), Arc::clone(&acked));
                    tokio::spawn(async move {
                        for i in 0..300u64 {
                            let rec = put(
                                format!("k{task}-{}", i % 100).as_bytes(),
                                i * 4 + task + 1,
                                format!("v{i}").as_bytes(),
                            );
                            // Applied before it is appended, as the node does.
                            acked.lock().unwrap().insert(rec.key.clone(), rec.clone());
                            log.append(rec).await.unwrap();
                        }
                    })
                })
                .collect();
            // Compact until every appender is done, so appends keep racing the rewrites.
            let mut compactions = 0;
            while compactions < 3 || appenders.iter().any(|task| !task.is_finished()) {
                log.compact(|| acked.lock().unwrap().values().cloned().collect())
                    .await
                    .unwrap();
                compactions += 1;
            }
            for task in appenders {
                task.await.unwrap();
            }
            log.close().await.unwrap();
            let (_log, got, report) =
                Log::open(dir.path(), policy, CompactThreshold::default()).unwrap();
            assert!(report.is_clean(), "{policy}");
            let expected: Vec<Record> = acked.lock().unwrap().values().cloned().collect();
            let got = live_set(&got);
            let lost = expected.iter().filter(|r| !got.contains(r)).count();
            assert_eq!(
                lost,
                0,
                "{policy}: {lost} of {} records lost",
                expected.len()
            );
            assert_eq!(got.len(), expected.len(), "{policy}");
        }
    }

    #[tokio::test]
    async fn a_failed_compaction_leaves_the_log_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = open(dir.path());
        let rec = put(b"k", 1, b"v");
        log.append(rec.clone()).await.unwrap();
        let too_big = put(&vec![0; ringkv_common::protocol::MAX_KEY_LEN + 1], 2, b"");
        assert!(matches!(
            log.compact(|| vec![too_big]).await,
            Err(LogError::TooLarge { .. })
        ));
        assert!(!dir.path().join(COMPACT_FILE).exists());
        // Still writable, and the log still has everything.
        log.append(put(b"k2", 3, b"v")).await.unwrap();
        log.close().await.unwrap();
        let (_log, got, _) = open(dir.path());
        assert_eq!(got, vec![rec, put(b"k2", 3, b"v")]);
    }

    #[test]
    fn threshold() {
        let t = CompactThreshold {
            min_bytes: 1000,
            garbage_ratio: 0.5,
        };
        assert!(!t.is_due(999, 0), "too small");
        assert!(!t.is_due(1000, 600), "mostly live");
        assert!(t.is_due(1000, 400));
        assert!(t.is_due(1000, 0));
        assert!(!t.is_due(0, 0));
        assert!(!CompactThreshold::default().is_due(1 << 20, 0));
    }
}

//! Replaying the log at open, and repairing what a crash or the disk did to it.
//!
//! Owns the decision of what a damaged log means. Replay reads frames in order and stops at the
//! first bad one; nothing after a bad frame is ever replayed. A value may hold any bytes, a whole
//! encoded frame with a valid CRC included (a client chose them), and once a frame is bad nothing
//! says where the next one starts: a frame found by hunting may lie inside a value. (RocksDB's
//! point-in-time WAL recovery, meant for replicated systems, stops the same way.) What follows
//! the bad frame decides what happens to it:
//! - Zeros to the end of the file are space the writer wrote ahead under `--fsync always` (see
//!   [`super::writer`]): the log ends there, and the file is cut back to its last record.
//! - No valid frame anywhere after it: a **torn tail** (a crash mid-append). The file is truncated
//!   to the end of the last good record, synced, and the loss is reported.
//! - Valid frames after it: **damage**. Everything from the bad frame on is reported as one region
//!   and **set aside**: the original file is preserved as `ringkv.log.corrupt-<unix-secs>` and
//!   replaced by a fresh log of the records before the damage, so it is reported once and never
//!   replayed. The records set aside are lost on this node only: the coordinator's
//!   reconciliation of the returning node unlists the keys it no longer holds and repairs them
//!   from other replicas, and the original is there to inspect.
//!
//! The hunt that tells the last two apart reads at most [`HUNT_BUDGET`] bytes of candidate frames in
//! full, and counts as damage past it, so a value full of look-alike headers cannot make it crawl.
//!
//! Invariants: a record is returned only if its frame is intact (CRC and lengths); every byte that is
//! not returned is accounted for in the [`RecoveryReport`] and logged; and when recovery returns,
//! `ringkv.log` holds exactly the magic followed by the returned records, so the next open is clean.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ringkv_common::write_ahead;

use super::record::{read_frame, Frame, FrameHead, Record, HEADER_LEN, MAGIC, MIN_FRAME_LEN};
use super::{compaction, sync_dir, LogError, COMPACT_FILE, CORRUPT_FILE_PREFIX, LOG_FILE};

/// Read buffer for the sequential replay: large enough that small records cost no syscalls each.
const REPLAY_BUFFER: usize = 1 << 20;

/// Bytes examined per read while hunting for the next valid frame after a bad one.
const SCAN_WINDOW: usize = 256 * 1024;

/// What replay found, for the node's logs and its report to the coordinator.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Good records replayed.
    pub records: u64,
    /// Bytes of good records (frames only, not the file header).
    pub bytes: u64,
    /// Bytes of torn tail cut off the end of the file (0 if it ended cleanly).
    pub truncated_tail_bytes: u64,
    /// Bytes of zeros written ahead of the log's end, cut off the file (not a loss).
    pub preallocated_bytes: u64,
    /// Damage with records after it, set aside: from the first bad frame to the end of the
    /// original file, as `(offset, len)` (at most one, since replay stops there).
    pub corrupt_regions: Vec<(u64, u64)>,
}

impl RecoveryReport {
    /// Whether the log was exactly as the last writer left it.
    pub fn is_clean(&self) -> bool {
        self.truncated_tail_bytes == 0 && self.corrupt_regions.is_empty()
    }
}

/// The outcome of [`recover`].
pub(crate) struct Recovered {
    pub records: Vec<Record>,
    pub report: RecoveryReport,
    /// Length of `ringkv.log` after any repair.
    pub size: u64,
}

/// Opens or creates `dir/ringkv.log`, replays it and repairs it (see the module docs).
///
/// # Errors
/// I/O failures, and [`LogError::Corrupt`] if `ringkv.log` does not start with the log's magic:
/// that is someone else's file, and it is left untouched.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, LogError> {
    remove_stale_compaction(dir)?;
    let path = dir.join(LOG_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // An existing log is replayed, never truncated here.
        .truncate(false)
        .open(&path)?;
    let file_len = file.metadata()?.len();

    if file_len < HEADER_LEN {
        // New, or torn while being created: only a prefix of the magic may be there.
        let mut head = Vec::new();
        file.read_to_end(&mut head)?;
        if !MAGIC.starts_with(&head) {
            return Err(not_a_log(&path));
        }
        if file_len > 0 {
            tracing::warn!(path = %path.display(), bytes = file_len, "log header torn; rewriting it");
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(MAGIC)?;
        file.sync_all()?;
        // The file may have just been created: make its directory entry durable too.
        sync_dir(dir)?;
        let report = RecoveryReport {
            truncated_tail_bytes: file_len,
            ..Default::default()
        };
        return Ok(Recovered {
            records: Vec::new(),
            report,
            size: HEADER_LEN,
        });
    }

    let mut magic = [0u8; MAGIC.len()];
    file.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(not_a_log(&path));
    }

    let (records, report, good_end) = replay(file.try_clone()?, file_len)?;

    if !report.corrupt_regions.is_empty() {
        drop(file);
        let aside = preserve(dir, &path)?;
        tracing::error!(
            preserved = %aside.display(),
            recovered = report.records,
            "log had damage with records after it; original preserved, rewriting the records \
             before the damage"
        );
        let size = compaction::write_compacted(dir, &records)?;
        compaction::install(dir)?;
        compaction::finish(dir)?;
        return Ok(Recovered {
            records,
            report,
            size,
        });
    }
    if report.truncated_tail_bytes > 0 || report.preallocated_bytes > 0 {
        file.set_len(good_end)?;
        file.sync_all()?;
    }
    Ok(Recovered {
        records,
        report,
        size: good_end,
    })
}

/// Replays every frame after the header; returns the records, the report, and where the last good
/// record ends.
fn replay(file: File, file_len: u64) -> Result<(Vec<Record>, RecoveryReport, u64), LogError> {
    let mut reader = BufReader::with_capacity(REPLAY_BUFFER, file);
    reader.seek(SeekFrom::Start(HEADER_LEN))?;
    let mut records = Vec::new();
    let mut report = RecoveryReport::default();
    let mut offset = HEADER_LEN;
    let mut good_end = HEADER_LEN;
    while offset < file_len {
        match read_frame(&mut reader, file_len - offset)? {
            Frame::Record(record, len) => {
                records.push(record);
                report.records += 1;
                report.bytes += len;
                offset += len;
                good_end = offset;
            }
            // Zeros to the end: space written ahead, the log's end (checked first, which spares
            // a hunt for a frame through megabytes of zeros).
            Frame::Bad(_) if write_ahead::all_zeros(reader.get_ref(), offset, file_len)? => {
                report.preallocated_bytes = file_len - offset;
                break;
            }
            Frame::Bad(reason) => {
                // Nothing after a bad frame is replayed: a frame found there may be bytes of a
                // value (see the module docs). The hunt only says whether anything valid
                // follows, and so whether the rest is a torn tail or must be kept.
                if find_next_frame(reader.get_ref(), offset + 1, file_len, HUNT_BUDGET)?
                    == Hunt::NotFound
                {
                    report.truncated_tail_bytes = file_len - offset;
                    tracing::warn!(
                        offset,
                        bytes = report.truncated_tail_bytes,
                        reason,
                        "torn log tail cut off at the last good record"
                    );
                } else {
                    report.corrupt_regions.push((offset, file_len - offset));
                    tracing::error!(
                        offset,
                        len = file_len - offset,
                        reason,
                        "damaged log record with records after it; the rest of the log is set \
                         aside (kept in the preserved original), its records lost on this node"
                    );
                }
                break;
            }
        }
    }
    Ok((records, report, good_end))
}

/// Bytes of candidate frames read in full and CRC-checked by one hunt before it gives up (and
/// the rest is kept, as if a frame had been found): a value full of look-alike headers would
/// otherwise have every one of them read to its claimed length, quadratic in the value's size.
/// Ordinary data passes the header checks rarely.
const HUNT_BUDGET: u64 = 256 << 20;

/// What [`find_next_frame`] found.
#[derive(Debug, PartialEq, Eq)]
enum Hunt {
    Found,
    NotFound,
    OutOfBudget,
}

/// Whether a valid frame starts anywhere at or after `from`.
///
/// Cheap header checks (lengths and flags, see [`FrameHead::parse`]) reject almost every offset
/// from an in-memory window; only the survivors are read in full and CRC-checked, up to
/// `budget` bytes of them ([`HUNT_BUDGET`]).
fn find_next_frame(file: &File, from: u64, file_len: u64, mut budget: u64) -> io::Result<Hunt> {
    let mut window = Vec::new();
    let mut base = from;
    while base + MIN_FRAME_LEN as u64 <= file_len {
        // Windows overlap by MIN_FRAME_LEN - 1 bytes so no candidate header straddles two of them.
        let want = (file_len - base).min((SCAN_WINDOW + MIN_FRAME_LEN - 1) as u64) as usize;
        window.resize(want, 0);
        read_exact_at(file, &mut window, base)?;
        for (i, head) in window.windows(MIN_FRAME_LEN).enumerate() {
            let Ok(raw) = <[u8; MIN_FRAME_LEN]>::try_from(head) else {
                continue;
            };
            let Ok(head) = FrameHead::parse(raw) else {
                continue;
            };
            let candidate = base + i as u64;
            if candidate + head.frame_len() > file_len {
                continue;
            }
            let Some(left) = budget.checked_sub(head.frame_len()) else {
                return Ok(Hunt::OutOfBudget);
            };
            budget = left;
            let mut reader = file;
            reader.seek(SeekFrom::Start(candidate))?;
            if let Frame::Record(..) = read_frame(&mut reader, file_len - candidate)? {
                return Ok(Hunt::Found);
            }
        }
        base += (want + 1 - MIN_FRAME_LEN) as u64;
    }
    Ok(Hunt::NotFound)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Deletes a `ringkv.log.compact` left by a crash before its rename. The rename is atomic, so
/// `ringkv.log` is complete and authoritative either way, and the leftover is garbage.
fn remove_stale_compaction(dir: &Path) -> Result<(), LogError> {
    let stale = dir.join(COMPACT_FILE);
    match fs::remove_file(&stale) {
        Ok(()) => {
            tracing::warn!(path = %stale.display(), "removed an unfinished log compaction");
            sync_dir(dir)?;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Keeps the original of a corrupt log as `ringkv.log.corrupt-<unix-secs>` and returns its path.
///
/// A hard link, not a rename: `ringkv.log` must exist at every instant, or a crash before the
/// rewrite is installed would leave a directory that looks new and empty. Falls back to a copy on
/// file systems without hard links.
fn preserve(dir: &Path, path: &Path) -> Result<PathBuf, LogError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut attempt = 0u32;
    loop {
        let name = match attempt {
            0 => format!("{CORRUPT_FILE_PREFIX}{secs}"),
            n => format!("{CORRUPT_FILE_PREFIX}{secs}.{n}"),
        };
        let aside = dir.join(name);
        match fs::hard_link(path, &aside) {
            Ok(()) => {}
            // Corruption found twice within a second (a crash loop): keep every copy.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                attempt += 1;
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "hard link failed; copying the corrupt log instead");
                fs::copy(path, &aside)?;
                File::open(&aside)?.sync_all()?;
            }
        }
        sync_dir(dir)?;
        return Ok(aside);
    }
}

fn not_a_log(path: &Path) -> LogError {
    LogError::Corrupt {
        offset: 0,
        reason: format!(
            "{} does not start with the RingKV log magic; refusing to overwrite a file that is not a log",
            path.display()
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::log::test_support::{mixed, put, runtime};
    use crate::log::{CompactThreshold, FsyncPolicy, Log};

    /// Writes `records` through a real `Log` and returns the file's bytes and each frame's end.
    fn written(records: &[Record]) -> (Vec<u8>, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let (log, _, _) =
            Log::open(dir.path(), FsyncPolicy::Never, CompactThreshold::default()).unwrap();
        let mut ends = Vec::new();
        rt.block_on(async {
            for rec in records {
                log.append(rec.clone()).await.unwrap();
                ends.push(log.size_bytes());
            }
            log.close().await.unwrap();
        });
        (fs::read(dir.path().join(LOG_FILE)).unwrap(), ends)
    }

    fn dir_with(bytes: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOG_FILE), bytes).unwrap();
        dir
    }

    fn corrupt_copies(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with(CORRUPT_FILE_PREFIX)
            })
            .collect()
    }

    fn open(dir: &Path) -> (Log, Vec<Record>, RecoveryReport) {
        Log::open(dir, FsyncPolicy::Never, CompactThreshold::default()).unwrap()
    }

    #[test]
    fn truncation_at_every_byte_offset_recovers_the_whole_record_prefix() {
        let records = mixed(20);
        let (bytes, ends) = written(&records);
        assert_eq!(*ends.last().unwrap(), bytes.len() as u64);
        let rt = runtime();
        let extra = put(b"after-recovery", 1000, b"appended");
        for cut in 0..=bytes.len() {
            let dir = dir_with(&bytes[..cut]);
            let whole = ends.iter().take_while(|&&end| end <= cut as u64).count();
            let good_end = if cut < HEADER_LEN as usize {
                0
            } else {
                ends[..whole].last().copied().unwrap_or(HEADER_LEN)
            };

            let (log, got, report) = open(dir.path());
            assert_eq!(got, records[..whole], "cut at {cut}");
            assert_eq!(report.records, whole as u64);
            assert_eq!(
                report.truncated_tail_bytes,
                cut as u64 - good_end,
                "cut at {cut}"
            );
            assert!(
                report.corrupt_regions.is_empty(),
                "cut at {cut}: {report:?}"
            );
            assert_eq!(log.size_bytes(), good_end.max(HEADER_LEN));
            rt.block_on(async {
                log.append(extra.clone()).await.unwrap();
                log.close().await.unwrap();
            });

            let (log, got, report) = open(dir.path());
            assert!(report.is_clean(), "cut at {cut}: second open {report:?}");
            assert_eq!(got.len(), whole + 1);
            assert_eq!(got[..whole], records[..whole]);
            assert_eq!(got[whole], extra);
            rt.block_on(log.close()).unwrap();
        }
    }

    /// A crash in space the writer wrote ahead (`--fsync always`): the file is cut at every
    /// byte offset and the rest is zeros. Zeros right after a whole record are the log's end,
    /// not a loss; a partial record before them is a torn tail, reported with the zeros.
    #[test]
    fn zeros_after_the_last_record_end_the_log_and_a_torn_record_before_them_is_reported() {
        const AHEAD: usize = 4096;
        let records = mixed(12);
        let (bytes, ends) = written(&records);
        for cut in HEADER_LEN as usize..=bytes.len() {
            let mut file = bytes[..cut].to_vec();
            file.resize(cut + AHEAD, 0);
            let dir = dir_with(&file);
            let mut whole = ends.iter().take_while(|&&end| end <= cut as u64).count();
            // A record whose missing bytes are all zeros is whole again with the zeros.
            if ends
                .get(whole)
                .is_some_and(|&end| bytes[cut..end as usize].iter().all(|&b| b == 0))
            {
                whole += 1;
            }
            let good_end = ends[..whole].last().copied().unwrap_or(HEADER_LEN);
            let (log, got, report) = open(dir.path());
            assert_eq!(got, records[..whole], "cut at {cut}");
            assert!(
                report.corrupt_regions.is_empty(),
                "cut at {cut}: {report:?}"
            );
            let rest = (file.len() as u64) - good_end;
            if good_end >= cut as u64 || bytes[good_end as usize..cut].iter().all(|&b| b == 0) {
                assert_eq!(report.preallocated_bytes, rest, "cut at {cut}");
                assert!(report.is_clean(), "cut at {cut}: {report:?}");
            } else {
                assert_eq!(report.truncated_tail_bytes, rest, "cut at {cut}");
                assert_eq!(report.preallocated_bytes, 0, "cut at {cut}");
            }
            assert_eq!(log.size_bytes(), good_end);
            let len = fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
            assert_eq!(len, good_end, "cut at {cut}: the zeros are cut off");
            runtime().block_on(log.close()).unwrap();
        }
    }

    #[test]
    fn bit_flip_mid_file_sets_the_rest_aside_and_preserves_it() {
        let records = mixed(12);
        let (bytes, ends) = written(&records);
        let rt = runtime();
        for k in [0usize, 1, 5, 10] {
            let start = if k == 0 { HEADER_LEN } else { ends[k - 1] };
            let end = ends[k];
            // The crc, the length, the version and the last byte of the record.
            for at in [start, start + 5, start + 12, end - 1] {
                let mut damaged = bytes.clone();
                damaged[at as usize] ^= 0x10;
                let dir = dir_with(&damaged);

                let (log, got, report) = open(dir.path());
                let expected = records[..k].to_vec();
                let region = (start, damaged.len() as u64 - start);
                assert_eq!(got, expected, "flip in record {k} at byte {at}");
                assert_eq!(report.corrupt_regions, vec![region]);
                assert_eq!(report.truncated_tail_bytes, 0);
                assert_eq!(report.records, expected.len() as u64);
                let copies = corrupt_copies(dir.path());
                assert_eq!(copies.len(), 1);
                assert_eq!(
                    fs::read(&copies[0]).unwrap(),
                    damaged,
                    "original preserved as is"
                );
                rt.block_on(log.close()).unwrap();

                let (log, again, report) = open(dir.path());
                assert!(report.is_clean(), "second open: {report:?}");
                assert_eq!(again, expected);
                rt.block_on(log.close()).unwrap();
                assert_eq!(corrupt_copies(dir.path()).len(), 1);
            }
        }
    }

    /// A record whose value ends in a chain of whole encoded frames (tombstones of other keys,
    /// each ending where the next starts, the last where the value ends): should a damaged
    /// length field make the record seem to end at one of them, or replay resume anywhere in
    /// the value, the chain would replay as records. No flip of any bit of the length does.
    #[test]
    fn no_damaged_length_makes_a_chain_of_frames_in_a_value_replay() {
        let mut value = vec![b'v'; 200];
        for i in 0..64u64 {
            let frame = crate::log::record::EncodedRecord::new(
                format!("forged{i:05}").as_bytes(),
                ringkv_common::Version(u64::MAX - i),
                None,
            )
            .unwrap();
            value.extend_from_slice(&frame.0);
        }
        let records = vec![
            put(b"before", 1, b"a"),
            put(b"carrier", 2, &value),
            put(b"after", 3, b"c"),
        ];
        let (bytes, ends) = written(&records);
        for bit in 0..32 {
            let mut damaged = bytes.clone();
            let at = ends[0] as usize + 4 + 3 - bit / 8;
            damaged[at] ^= 1 << (bit % 8);
            let dir = dir_with(&damaged);
            let (log, got, report) = open(dir.path());
            assert_eq!(got, records[..1], "length bit {bit}");
            assert_eq!(
                report.corrupt_regions,
                vec![(ends[0], damaged.len() as u64 - ends[0])],
                "length bit {bit}"
            );
            runtime().block_on(log.close()).unwrap();
        }
    }

    /// A record whose value holds a whole encoded frame (for another key, at a high version),
    /// between two ordinary records; returns the file, each frame's end, and the offset of the
    /// frame inside the value.
    fn with_a_frame_in_a_value() -> (Vec<Record>, Vec<u8>, Vec<u64>, u64) {
        let inner = crate::log::record::EncodedRecord::new(
            b"forged",
            ringkv_common::Version(1 << 40),
            Some(b"not written by this node"),
        )
        .unwrap();
        let mut value = vec![b'x'; 64];
        value.extend_from_slice(&inner.0);
        value.extend_from_slice(&[b'y'; 64]);
        let records = vec![
            put(b"before", 1, b"a"),
            put(b"carrier", 2, &value),
            put(b"after", 3, b"c"),
        ];
        let (bytes, ends) = written(&records);
        let at = bytes
            .windows(inner.0.len())
            .position(|w| w == inner.0.as_slice())
            .unwrap() as u64;
        assert!(
            ends[0] < at && at < ends[1],
            "the frame sits inside the carrier's value"
        );
        (records, bytes, ends, at)
    }

    /// The frame inside a damaged record's value is never replayed: the damaged record and
    /// everything after it are set aside.
    #[test]
    fn a_frame_inside_a_damaged_records_value_is_not_replayed() {
        let (records, bytes, ends, _) = with_a_frame_in_a_value();
        // The value's first byte (before the inner frame), and the CRC.
        for at in [ends[0] + 21 + 7, ends[0]] {
            let mut damaged = bytes.clone();
            damaged[at as usize] ^= 0x01;
            let dir = dir_with(&damaged);
            let (log, got, report) = open(dir.path());
            assert_eq!(got, records[..1], "flip at {at}");
            assert_eq!(
                report.corrupt_regions,
                vec![(ends[0], damaged.len() as u64 - ends[0])]
            );
            assert_eq!(corrupt_copies(dir.path()).len(), 1, "the original is kept");
            runtime().block_on(log.close()).unwrap();
            let (log, again, report) = open(dir.path());
            assert!(report.is_clean(), "second open: {report:?}");
            assert_eq!(again, records[..1]);
            runtime().block_on(log.close()).unwrap();
        }
    }

    /// The record before the carrier damaged in its header: a hunt from there meets the frame
    /// in the carrier's value, which is not replayed; the rest is set aside.
    #[test]
    fn a_frame_in_a_value_after_a_garbage_header_is_not_replayed() {
        let (_, bytes, _, _) = with_a_frame_in_a_value();
        let mut damaged = bytes.clone();
        // The first record's flags byte: unknown flags make its header garbage.
        damaged[HEADER_LEN as usize + 16] = 0x80;
        let dir = dir_with(&damaged);
        let (log, got, report) = open(dir.path());
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(
            report.corrupt_regions,
            vec![(HEADER_LEN, damaged.len() as u64 - HEADER_LEN)]
        );
        runtime().block_on(log.close()).unwrap();
    }

    /// The same record torn after the frame in its value, at the end of a file not written
    /// ahead: a frame follows the bad one, so this is not taken for a torn tail; everything
    /// after the last good record is set aside, and the original is kept.
    #[test]
    fn a_frame_inside_a_torn_records_value_is_set_aside_not_replayed() {
        let (records, bytes, ends, inner) = with_a_frame_in_a_value();
        // In the padding after the inner frame.
        let cut = ends[1] as usize - 20;
        assert!(cut > inner as usize + 51);
        let dir = dir_with(&bytes[..cut]);
        let (log, got, report) = open(dir.path());
        assert_eq!(got, vec![records[0].clone()]);
        assert_eq!(
            report.corrupt_regions,
            vec![(ends[0], cut as u64 - ends[0])]
        );
        assert_eq!(corrupt_copies(dir.path()).len(), 1, "the original is kept");
        runtime().block_on(log.close()).unwrap();
        let (log, again, report) = open(dir.path());
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(again, vec![records[0].clone()]);
        runtime().block_on(log.close()).unwrap();
    }

    /// Look-alike headers every 21 bytes, each claiming a 4 KiB value that fits in the file:
    /// the hunt reads candidates only up to its budget, then gives up instead of reading every
    /// one of them in full.
    #[test]
    fn the_hunt_through_look_alike_headers_stops_at_its_budget() {
        let mut fake = Vec::new();
        let len = (13 + 4096u32).to_be_bytes();
        for _ in 0..20_000 {
            fake.extend_from_slice(&[0xC0, 0xFF, 0xEE, 0x00]);
            fake.extend_from_slice(&len);
            fake.extend_from_slice(&7u64.to_be_bytes());
            fake.extend_from_slice(&[0, 0, 0, 0, 0]);
        }
        let dir = dir_with(&fake);
        let file = File::open(dir.path().join(LOG_FILE)).unwrap();
        let file_len = fake.len() as u64;
        assert!(matches!(
            find_next_frame(&file, 0, file_len, 1 << 20).unwrap(),
            Hunt::OutOfBudget
        ));
        // With budget enough for every candidate, none of them is a frame.
        assert!(matches!(
            find_next_frame(&file, 0, file_len, u64::MAX).unwrap(),
            Hunt::NotFound
        ));
    }

    #[test]
    fn bit_flip_in_the_last_record_is_a_torn_tail() {
        let records = mixed(8);
        let (bytes, ends) = written(&records);
        let last_start = ends[ends.len() - 2];
        let mut damaged = bytes.clone();
        damaged[last_start as usize + 15] ^= 1;
        let dir = dir_with(&damaged);

        let (log, got, report) = open(dir.path());
        assert_eq!(got, records[..records.len() - 1]);
        assert_eq!(report.truncated_tail_bytes, bytes.len() as u64 - last_start);
        assert!(report.corrupt_regions.is_empty());
        assert!(corrupt_copies(dir.path()).is_empty());
        assert_eq!(
            fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(),
            last_start
        );
        runtime().block_on(log.close()).unwrap();
    }

    #[test]
    fn damage_before_more_damage_and_a_torn_tail_sets_everything_from_it_aside() {
        let records = mixed(10);
        let (bytes, ends) = written(&records);
        let mut damaged = bytes.clone();
        damaged[ends[1] as usize + 9] ^= 4; // record 2
        damaged[ends[5] as usize + 9] ^= 4; // record 6
        damaged.truncate(ends[9] as usize - 3); // record 9 torn
        let dir = dir_with(&damaged);

        let (log, got, report) = open(dir.path());
        let expected = records[..2].to_vec();
        assert_eq!(got, expected);
        assert_eq!(
            report.corrupt_regions,
            vec![(ends[1], damaged.len() as u64 - ends[1])]
        );
        assert_eq!(report.truncated_tail_bytes, 0);
        runtime().block_on(log.close()).unwrap();
        let (_log, again, report) = open(dir.path());
        assert!(report.is_clean());
        assert_eq!(again, expected);
    }

    #[test]
    fn a_file_without_the_magic_is_refused_and_left_alone() {
        for garbage in [
            b"definitely not a log file".to_vec(),
            b"RKVLOG02".to_vec(),
            b"RKX".to_vec(),
        ] {
            let dir = dir_with(&garbage);
            match Log::open(dir.path(), FsyncPolicy::Never, CompactThreshold::default()) {
                Err(LogError::Corrupt { offset: 0, .. }) => {}
                Err(e) => panic!("{garbage:?}: unexpected error {e}"),
                Ok(_) => panic!("{garbage:?} opened as a log"),
            }
            assert_eq!(fs::read(dir.path().join(LOG_FILE)).unwrap(), garbage);
        }
    }

    #[test]
    fn stale_compaction_file_is_removed() {
        let records = mixed(6);
        let (bytes, _) = written(&records);
        let dir = dir_with(&bytes);
        let stale = dir.path().join(COMPACT_FILE);
        fs::write(&stale, b"RKVLOG01 half-written garbage").unwrap();

        let (log, got, report) = open(dir.path());
        assert!(!stale.exists());
        assert!(report.is_clean());
        assert_eq!(got, records);
        runtime().block_on(log.close()).unwrap();
    }

    #[test]
    fn garbage_between_records_sets_the_rest_aside() {
        // Bytes that were never a record at all (e.g. a misdirected write), inserted mid-file:
        // nothing says where they end, so the records after them are not trusted.
        let records = mixed(4);
        let (bytes, ends) = written(&records);
        let mut damaged = bytes[..ends[1] as usize].to_vec();
        damaged.extend_from_slice(&[0xAB; 100]);
        damaged.extend_from_slice(&bytes[ends[1] as usize..]);
        let dir = dir_with(&damaged);
        let (log, got, report) = open(dir.path());
        assert_eq!(got, records[..2]);
        assert_eq!(
            report.corrupt_regions,
            vec![(ends[1], damaged.len() as u64 - ends[1])]
        );
        let copies = corrupt_copies(dir.path());
        assert_eq!(copies.len(), 1);
        assert_eq!(fs::read(&copies[0]).unwrap(), damaged, "kept as it was");
        runtime().block_on(log.close()).unwrap();
    }

    /// A damaged length field in a record that is not the last, in a file still written ahead
    /// in zeros: the records after it are set aside with the original kept, never cut off as a
    /// torn tail.
    #[test]
    fn a_damaged_length_never_cuts_off_the_records_after_it() {
        let records = mixed(10);
        let (bytes, ends) = written(&records);
        let mut file = bytes.clone();
        file.resize(bytes.len() + (4 << 20), 0);
        for k in [2usize, 8] {
            let start = ends[k - 1];
            // Bytes +5, +6 and +7 of the frame: the length's upper-middle, lower-middle and
            // lowest bytes (a change of 1 MiB, 4 KiB or 16 bytes).
            for at in [start + 5, start + 6, start + 7] {
                let mut damaged = file.clone();
                damaged[at as usize] ^= 0x10;
                let dir = dir_with(&damaged);
                let (log, got, report) = open(dir.path());
                assert_eq!(got, records[..k], "record {k}, byte {at}");
                assert_eq!(report.truncated_tail_bytes, 0, "record {k}, byte {at}");
                assert_eq!(
                    report.corrupt_regions,
                    vec![(start, damaged.len() as u64 - start)],
                    "record {k}, byte {at}"
                );
                let copies = corrupt_copies(dir.path());
                assert_eq!(
                    copies.len(),
                    1,
                    "record {k}, byte {at}: the original is kept"
                );
                assert_eq!(fs::read(&copies[0]).unwrap(), damaged);
                runtime().block_on(log.close()).unwrap();
                let (log, again, report) = open(dir.path());
                assert!(report.is_clean(), "second open: {report:?}");
                assert_eq!(again, records[..k]);
                runtime().block_on(log.close()).unwrap();
            }
        }
    }
}

//! The metadata journal: the on-disk form of the metadata, an append-only file of changes.
//!
//! `meta.log` is the 8-byte magic [`MAGIC`] followed by frames, each one change:
//!
//! ```text
//! +-----------+---------+---------------------------------------------+
//! | crc32 u32 | len u32 | payload: len bytes, MessagePack of an Entry |
//! +-----------+---------+---------------------------------------------+
//! ```
//!
//! Integers are big-endian; the CRC covers `len` and the payload. An entry is the new state of
//! one key (or its removal), one node record, a version ceiling, a version floor (see
//! [`Entry::Floor`]) or a note that key changes are acknowledged unsynced (see
//! [`Entry::Unsynced`]); replaying the file in order
//! rebuilds the metadata. Appends are written in groups: the writer encodes every change of a
//! group into one buffer, writes it with one `write` and, under [`MetaFsync::Always`], syncs
//! once before anyone is answered.
//!
//! Replay stops at the first frame that is incomplete or fails its checksum: a crash can only
//! tear the last group written, so that is where the valid prefix ends. The bytes after it are
//! moved aside to `meta.log.discarded-<unix seconds>` (never silently dropped) and the file is
//! cut back to the valid prefix before anything new is appended.
//!
//! When the file grows to twice its size after the last rewrite (and at least
//! `rewrite_min_bytes`), it is rewritten as a snapshot of the live state, while appends go
//! on: [`Journal::begin_rewrite`] notes where the file ends, the snapshot is written to a new
//! file and synced without holding up appends ([`Rewrite`]), and [`Journal::finish_rewrite`]
//! copies what was appended since the start after the snapshot, syncs, renames the new file
//! over the old one and syncs the directory. Entries are whole states, so replaying the
//! changes made during the snapshot after it gives the newest state whatever moment the
//! snapshot saw each entry at.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ringkv_common::durable_file::sync_dir;
use ringkv_common::file_range::pieces;
use ringkv_common::write_ahead;
use serde::{Deserialize, Serialize};

use super::{KeyMeta, NodeRecord};

/// The journal's file name in the coordinator's data directory.
pub const JOURNAL_FILE: &str = "meta.log";

/// First bytes of the file, so that a stray file is never taken for the journal.
const MAGIC: &[u8; 8] = b"RKVMETA1";

/// `crc32 | len`.
const FRAME_HEADER_LEN: usize = 8;

/// Largest payload: an entry holding the largest key, with generous room for the rest.
const MAX_PAYLOAD_LEN: usize = ringkv_common::protocol::MAX_KEY_LEN + 64 * 1024;

/// The journal is not rewritten while smaller than this (by default).
pub const REWRITE_MIN_BYTES: u64 = 32 * 1024 * 1024;

/// When a metadata change is synced to disk before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetaFsync {
    /// Sync every group before acknowledging it: a change survives a power loss.
    Always,
    /// Buffer key changes and write them within 10 ms, sync only on rewrite and close (node
    /// records, lease ceilings and deletions are still synced before they are acknowledged):
    /// a crash of the coordinator or of the machine can take the last key changes from the
    /// journal, and the reconciliation after an unclean stop learns them back from the nodes
    /// (reads wait for it).
    Never,
}

/// One change, as stored.
#[derive(Deserialize, Debug, PartialEq)]
pub enum Entry {
    /// The state of `key` from now on; `None` removes it.
    Key { key: Bytes, meta: Option<KeyMeta> },
    /// The latest record of a node.
    Node(NodeRecord),
    /// Versions below this may have been handed out.
    Ceiling(u64),
    /// Written last at a graceful close: nothing after it was lost.
    Clean,
    /// Every version at or below this is settled: a key the metadata does not hold at such
    /// a version was deleted (or never acknowledged), so a copy of it on a node is garbage.
    /// Last, so that journals written before it existed read the same.
    Floor(u64),
    /// Key changes from here on may be acknowledged before they are synced (`--meta-fsync
    /// never`), by writes that reached this many replicas (the write quorum); 0: every key
    /// change is synced again. After an unclean stop, reads wait until fewer than this many
    /// nodes still owe a reconciliation (see [`super::Metadata::read_gate`]). After
    /// [`Entry::Floor`], so that journals written before it existed read the same.
    Unsynced(u8),
}

/// One change, as written: the same encoding as [`Entry`], from borrowed parts.
#[derive(Serialize)]
pub enum EntryRef<'a> {
    Key {
        #[serde(serialize_with = "as_bin")]
        key: &'a [u8],
        meta: Option<&'a KeyMeta>,
    },
    Node(&'a NodeRecord),
    Ceiling(u64),
    Clean,
    Floor(u64),
    Unsynced(u8),
}

/// A key as MessagePack bin, the encoding `Bytes` has in [`Entry`].
fn as_bin<S: serde::Serializer>(key: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(key)
}

/// Errors of the journal.
#[derive(thiserror::Error, Debug)]
pub enum JournalError {
    #[error("i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a RingKV metadata journal (bad magic)")]
    NotAJournal(PathBuf),
    #[error("cannot encode a metadata entry: {0}")]
    Encode(String),
}

/// What replay found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Entries applied.
    pub entries: u64,
    /// The last entry is the [`Entry::Clean`] marker of a graceful close.
    pub clean: bool,
    /// Bytes after the valid prefix that were moved aside (a torn or damaged tail).
    pub discarded_bytes: u64,
    /// Where they were moved.
    pub discarded_to: Option<PathBuf>,
}

/// The open journal, owned by the metadata writer thread.
pub struct Journal {
    dir: PathBuf,
    file: File,
    len: u64,
    /// Size right after the last rewrite (or an estimate of the live part at open).
    base: u64,
    fsync: MetaFsync,
    rewrite_min_bytes: u64,
    buf: Vec<u8>,
    /// A rewrite failed after its rename (see [`Journal::is_broken`]).
    broken: bool,
    /// Under [`MetaFsync::Always`], how far the file has been written: zeros from `len` on
    /// ([`ringkv_common::write_ahead`]), which replay takes for the end of the journal.
    /// `None` under `never`, whose file ends where the journal does.
    allocated: Option<u64>,
}

impl Journal {
    /// Open (or create) the journal in `dir`, feeding every valid entry to `apply` in order.
    pub fn open(
        dir: &Path,
        fsync: MetaFsync,
        rewrite_min_bytes: u64,
        mut apply: impl FnMut(Entry),
    ) -> Result<(Journal, ReplayReport), JournalError> {
        let path = dir.join(JOURNAL_FILE);
        let io = io_error(&path);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // A rewrite interrupted by a crash leaves its new file, never the journal itself.
        let _ = fs::remove_file(dir.join(format!("{JOURNAL_FILE}.rewrite")));
        let total = file.metadata().map_err(io)?.len();
        let mut report = ReplayReport::default();
        let valid = if total < MAGIC.len() as u64 {
            // New, or a crash before the header was complete: nothing was ever acknowledged.
            file.set_len(0).map_err(io)?;
            file.write_all(MAGIC).map_err(io)?;
            file.sync_all().map_err(io)?;
            sync_dir(dir).map_err(io)?;
            MAGIC.len() as u64
        } else {
            let mut reader = BufReader::with_capacity(1 << 20, &mut file);
            let mut magic = [0u8; 8];
            reader.read_exact(&mut magic).map_err(io)?;
            if &magic != MAGIC {
                return Err(JournalError::NotAJournal(path));
            }
            let mut offset = MAGIC.len() as u64;
            while let Some((entry, frame_len)) = read_frame(&mut reader).map_err(io)? {
                report.clean = entry == Entry::Clean;
                apply(entry);
                report.entries += 1;
                offset += frame_len;
            }
            offset
        };
        if valid < total && write_ahead::all_zeros(&file, valid, total).map_err(io)? {
            // Space written ahead under `always`; under `never` it may also be unsynced
            // changes a machine crash left as zeros, which the reconciliation after an
            // unclean stop learns back (no clean marker is before them).
            file.set_len(valid).map_err(io)?;
            file.sync_all().map_err(io)?;
        } else if valid < total {
            report.discarded_bytes = total - valid;
            report.discarded_to = Some(move_tail_aside(dir, &mut file, valid).map_err(io)?);
        }
        file.seek(SeekFrom::Start(valid)).map_err(io)?;
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                file,
                len: valid,
                base: valid,
                fsync,
                rewrite_min_bytes,
                buf: Vec::with_capacity(64 * 1024),
                broken: false,
                allocated: (fsync == MetaFsync::Always).then_some(valid),
            },
            report,
        ))
    }

    /// Set the size the next rewrite is measured against (the live part of the file).
    pub fn set_base(&mut self, base: u64) {
        self.base = base;
    }

    /// Queue `entry` for the next [`Journal::commit`].
    pub fn append(&mut self, entry: &EntryRef<'_>) -> Result<(), JournalError> {
        encode_frame(&mut self.buf, entry)
    }

    /// Bytes appended but not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Write what was appended since the last commit, and sync it under `Always` (or when
    /// `force_sync`).
    pub fn commit(&mut self, force_sync: bool) -> Result<(), JournalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // Under `never`, what needs no sync stays in the buffer until a synced commit writes
        // it (tests inject it): the file a machine crash leaves when it comes before the flush.
        fail::fail_point!(
            "meta-journal-hold",
            !force_sync && self.fsync == MetaFsync::Never,
            |_| Ok(())
        );
        // The path is built only on an error: this runs for every group.
        let io = |source| JournalError::Io {
            path: self.dir.join(JOURNAL_FILE),
            source,
        };
        // A write that fails part-way through the group's last frame, as on a full disk
        // (tests inject it): the file then ends in a torn frame.
        fail::fail_point!("meta-journal-write", |_| {
            let torn = self
                .buf
                .get(..self.buf.len().saturating_sub(1))
                .unwrap_or_default();
            let _ = self.file.write_all_at(torn, self.len);
            self.broken = true;
            Err(io(io::Error::other(
                "failpoint meta-journal-write injected an error",
            )))
        });
        // After a failed write the file may end in part of a group, and after a failed sync
        // the kernel may have dropped what it held: either way nothing more may be written.
        let end = self.len + self.buf.len() as u64;
        write_ahead::make_room(&self.file, &mut self.allocated, end);
        if let Err(e) = self.file.write_all_at(&self.buf, self.len) {
            self.broken = true;
            return Err(io(e));
        }
        if self.fsync == MetaFsync::Always || force_sync {
            if let Err(e) = self.file.sync_data() {
                self.broken = true;
                return Err(io(e));
            }
        }
        self.len += self.buf.len() as u64;
        self.buf.clear();
        if self.buf.capacity() > 16 << 20 {
            self.buf.shrink_to(64 * 1024);
        }
        Ok(())
    }

    /// Whether the file has grown enough since the last rewrite to be worth rewriting.
    pub fn wants_rewrite(&self) -> bool {
        self.len >= self.rewrite_min_bytes && self.len >= self.base.saturating_mul(2)
    }

    /// Replace the file with `entries` (the live state), in one go: [`Journal::begin_rewrite`],
    /// every entry, [`Journal::finish_rewrite`].
    pub fn rewrite<'a>(
        &mut self,
        entries: impl Iterator<Item = EntryRef<'a>>,
    ) -> Result<(), JournalError> {
        let mut rewrite = self.begin_rewrite()?;
        for entry in entries {
            rewrite.push(&entry)?;
            rewrite.write_out()?;
        }
        let snapshot = rewrite.sync()?;
        self.finish_rewrite(snapshot)
    }

    /// Start a rewrite: write out what is buffered, note where the file ends (everything
    /// appended from here on is copied after the snapshot) and create the new file.
    pub fn begin_rewrite(&mut self) -> Result<Rewrite, JournalError> {
        self.commit(false)?;
        let tmp = self.dir.join(format!("{JOURNAL_FILE}.rewrite"));
        let io = io_error(&tmp);
        // Readable too: once renamed it is the journal, and the next rewrite reads from it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC).map_err(io)?;
        Ok(Rewrite {
            start: self.len,
            len: MAGIC.len() as u64,
            frame: Vec::with_capacity(256),
            out,
            tmp,
        })
    }

    /// End a rewrite: copy what was appended since [`Journal::begin_rewrite`] after the
    /// snapshot, sync it, rename it over the journal and sync the directory. Appends go to
    /// the new file from the rename on. On an error before the rename the old file is intact
    /// and stays the journal.
    pub fn finish_rewrite(&mut self, snapshot: Snapshot) -> Result<(), JournalError> {
        if let Err(e) = self.commit(false) {
            snapshot.abandon();
            return Err(e);
        }
        let Snapshot {
            mut file,
            start,
            copied,
            len,
            tmp,
        } = snapshot;
        let io = io_error(&tmp);
        let before_rename = copy_range(&self.file, &mut file, copied, self.len)
            .and_then(|()| file.sync_all())
            .and_then(|()| file.seek(SeekFrom::End(0)).map(|_| ()))
            .and_then(|()| fs::rename(&tmp, self.dir.join(JOURNAL_FILE)));
        if let Err(e) = before_rename {
            // The old file is still the journal; the new one is of no use.
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        // From here on the journal is the new file: appends must go to it, never to the
        // unlinked old one.
        self.file = file;
        self.len = len + (self.len - start);
        // The new file ends where the journal does.
        self.allocated = self.allocated.map(|_| self.len);
        // The next rewrite is measured against the snapshot, the live part; what was copied
        // after it is history already.
        self.base = len;
        if let Err(e) = sync_dir(&self.dir) {
            // The rename may not survive a power loss; nothing more may be acknowledged.
            self.broken = true;
            return Err(io(e));
        }
        Ok(())
    }

    /// Whether a write or sync failed (the file may end in part of a group), or a rewrite
    /// failed after its rename: the journal must not be written again.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Put off the next rewrite until the file has doubled again (after a failed one).
    pub fn defer_rewrite(&mut self) {
        self.base = self.len;
    }

    /// The directory the journal is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Current size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Append the [`Entry::Clean`] marker and sync everything: the graceful close.
    pub fn close(&mut self) -> Result<(), JournalError> {
        self.append(&EntryRef::Clean)?;
        self.commit(false)?;
        self.file.sync_data().map_err(|source| JournalError::Io {
            path: self.dir.join(JOURNAL_FILE),
            source,
        })?;
        write_ahead::cut_off(&self.file, self.allocated.take(), self.len);
        Ok(())
    }
}

/// A snapshot being written by [`Journal::begin_rewrite`]'s caller, while appends go on.
pub struct Rewrite {
    start: u64,
    len: u64,
    frame: Vec<u8>,
    out: BufWriter<File>,
    tmp: PathBuf,
}

impl Rewrite {
    /// Add one entry of the live state. It is only encoded, in memory, until
    /// [`Rewrite::write_out`]: the caller may hold a lock that commits wait for.
    pub fn push(&mut self, entry: &EntryRef<'_>) -> Result<(), JournalError> {
        let before = self.frame.len();
        encode_frame(&mut self.frame, entry)?;
        self.len += (self.frame.len() - before) as u64;
        Ok(())
    }

    /// Write what was pushed since the last call to the new file.
    pub fn write_out(&mut self) -> Result<(), JournalError> {
        self.out
            .write_all(&self.frame)
            .map_err(|source| JournalError::Io {
                path: self.tmp.clone(),
                source,
            })?;
        self.frame.clear();
        if self.frame.capacity() > 16 << 20 {
            self.frame.shrink_to(1 << 20);
        }
        Ok(())
    }

    /// Write out and sync the snapshot, ready for [`Journal::finish_rewrite`].
    pub fn sync(mut self) -> Result<Snapshot, JournalError> {
        self.write_out()?;
        let Rewrite {
            start,
            len,
            out,
            tmp,
            ..
        } = self;
        let io = io_error(&tmp);
        let synced = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all().map(|()| file));
        let file = match synced {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io(e));
            }
        };
        Ok(Snapshot {
            file,
            start,
            copied: start,
            len,
            tmp,
        })
    }

    /// Give up: remove the new file.
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// A synced snapshot, waiting for [`Journal::finish_rewrite`].
pub struct Snapshot {
    file: File,
    start: u64,
    /// The journal's bytes up to here are already copied after the snapshot.
    copied: u64,
    len: u64,
    tmp: PathBuf,
}

impl Snapshot {
    /// Copy the journal's bytes up to `upto` (its size, read a moment ago: every byte below
    /// it is written and never changes) after the snapshot, and sync them, so that
    /// [`Journal::finish_rewrite`] has only the rest to copy. Needs no access to the
    /// journal, so appends go on meanwhile.
    pub fn catch_up(&mut self, journal: &Path, upto: u64) -> Result<(), JournalError> {
        let io = io_error(&self.tmp);
        let old = File::open(journal.join(JOURNAL_FILE)).map_err(io)?;
        copy_range(&old, &mut self.file, self.copied, upto).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.copied = self.copied.max(upto);
        Ok(())
    }

    /// Give up: remove the new file.
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Append bytes `from..to` of `source` to `dest`.
fn copy_range(source: &File, dest: &mut File, from: u64, to: u64) -> io::Result<()> {
    let mut chunk = vec![0u8; 1 << 20];
    for (at, len) in pieces(from, to, chunk.len()) {
        let part = chunk.get_mut(..len).ok_or(io::ErrorKind::InvalidInput)?;
        source.read_exact_at(part, at)?;
        dest.write_all(part)?;
    }
    Ok(())
}

/// Maps an I/O error on `path` to a [`JournalError`].
fn io_error(path: &Path) -> impl Fn(io::Error) -> JournalError + Copy + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn encode_frame(buf: &mut Vec<u8>, entry: &EntryRef<'_>) -> Result<(), JournalError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    rmp_serde::encode::write(buf, entry).map_err(|e| JournalError::Encode(e.to_string()))?;
    let payload_len = buf.len() - start - FRAME_HEADER_LEN;
    if payload_len > MAX_PAYLOAD_LEN {
        buf.truncate(start);
        return Err(JournalError::Encode(format!(
            "entry of {payload_len} bytes is over the {MAX_PAYLOAD_LEN}-byte limit"
        )));
    }
    let len = (payload_len as u32).to_be_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len);
    hasher.update(buf.get(start + FRAME_HEADER_LEN..).unwrap_or_default());
    let crc = hasher.finalize().to_be_bytes();
    if let Some(header) = buf.get_mut(start..start + FRAME_HEADER_LEN) {
        let (crc_field, len_field) = header.split_at_mut(4);
        crc_field.copy_from_slice(&crc);
        len_field.copy_from_slice(&len);
    }
    Ok(())
}

/// The next entry and the bytes its frame took, or `None` at the end of the valid prefix
/// (clean end of file, a torn frame, a bad checksum or an undecodable payload).
fn read_frame(reader: &mut impl Read) -> io::Result<Option<(Entry, u64)>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    if !read_full(reader, &mut header)? {
        return Ok(None);
    }
    let [c0, c1, c2, c3, l0, l1, l2, l3] = header;
    let crc = u32::from_be_bytes([c0, c1, c2, c3]);
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    if !read_full(reader, &mut payload)? {
        return Ok(None);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[l0, l1, l2, l3]);
    hasher.update(&payload);
    if hasher.finalize() != crc {
        return Ok(None);
    }
    match ringkv_common::codec::from_msgpack::<Entry>(&payload) {
        Ok(entry) => Ok(Some((entry, (FRAME_HEADER_LEN + len) as u64))),
        Err(_) => Ok(None),
    }
}

/// Fill `buf`; `false` if the input ended first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copy the bytes after `valid` to a side file, then cut the journal back to `valid`.
fn move_tail_aside(dir: &Path, file: &mut File, valid: u64) -> io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (aside, mut out) = (0..1000)
        .find_map(|n| {
            let name = match n {
                0 => format!("{JOURNAL_FILE}.discarded-{stamp}"),
                n => format!("{JOURNAL_FILE}.discarded-{stamp}-{n}"),
            };
            let path = dir.join(name);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .ok()
                .map(|f| (path, f))
        })
        .ok_or_else(|| io::Error::other("no free name for the discarded tail"))?;
    file.seek(SeekFrom::Start(valid))?;
    io::copy(file, &mut out)?;
    out.sync_all()?;
    file.set_len(valid)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(aside)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use ringkv_common::{NodeId, Version};

    fn meta(v: u64) -> KeyMeta {
        KeyMeta {
            version: Version(v),
            replicas: smallvec::smallvec![NodeId(1), NodeId(2)],
            tombstone: false,
        }
    }

    fn replay(dir: &Path) -> (Vec<Entry>, ReplayReport) {
        let mut seen = Vec::new();
        let (_, report) =
            Journal::open(dir, MetaFsync::Always, REWRITE_MIN_BYTES, |e| seen.push(e)).unwrap();
        (seen, report)
    }

    fn write_three(dir: &Path) {
        let (mut j, _) = Journal::open(dir, MetaFsync::Always, REWRITE_MIN_BYTES, |_| {}).unwrap();
        let k = Bytes::from_static(b"key");
        for v in 1..=3 {
            let m = meta(v);
            j.append(&EntryRef::Key {
                key: &k,
                meta: Some(&m),
            })
            .unwrap();
            j.commit(false).unwrap();
        }
        // Without the zeros written ahead (tested on their own below): three frames exactly.
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join(JOURNAL_FILE))
            .unwrap();
        file.set_len(j.size()).unwrap();
    }

    /// Under `always` the file runs on in zeros past the journal's end (a sync then changes
    /// no file-system metadata): replay takes them for the end, not for a damaged tail, and
    /// cuts them off; a torn frame before them is a damaged tail, kept aside with them; a
    /// clean close leaves none.
    #[test]
    fn zeros_written_ahead_end_the_journal_and_a_torn_frame_before_them_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let (mut j, _) =
            Journal::open(dir.path(), MetaFsync::Always, REWRITE_MIN_BYTES, |_| {}).unwrap();
        for v in 1..=3 {
            let m = meta(v);
            j.append(&EntryRef::Key {
                key: b"key",
                meta: Some(&m),
            })
            .unwrap();
            j.commit(false).unwrap();
        }
        let size = j.size();
        let crashed = fs::read(&path).unwrap();
        assert!(crashed.len() as u64 > size, "written ahead");
        assert!(crashed[size as usize..].iter().all(|&b| b == 0));
        // A clean close cuts the zeros off.
        j.close().unwrap();
        let closed = fs::metadata(&path).unwrap().len();
        assert!(
            closed > size && closed < size + 64,
            "the close marker only: {closed}"
        );
        // The crash: replayed whole, nothing discarded, the zeros cut off.
        fs::write(&path, &crashed).unwrap();
        let (seen, report) = replay(dir.path());
        assert_eq!(seen.len(), 3);
        assert_eq!(report.discarded_bytes, 0, "{report:?}");
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        // A torn frame, then zeros: a damaged tail.
        let mut torn = crashed[..size as usize].to_vec();
        torn.extend_from_slice(&crashed[MAGIC.len()..MAGIC.len() + 5]);
        torn.resize(torn.len() + 4096, 0);
        fs::write(&path, &torn).unwrap();
        let (seen, report) = replay(dir.path());
        assert_eq!(seen.len(), 3);
        assert_eq!(report.discarded_bytes, 5 + 4096);
    }

    #[test]
    fn a_key_is_written_as_messagepack_bin_as_bytes_is() {
        let m = meta(1);
        let key = Bytes::from_static(b"k1");
        let owned = rmp_serde::to_vec(&(key.clone(), Some(&m))).unwrap();
        let borrowed = rmp_serde::to_vec(&EntryRef::Key {
            key: &key,
            meta: Some(&m),
        })
        .unwrap();
        // The entry is the variant around the same fields: its encoding ends with theirs.
        let fields = owned.get(1..).unwrap();
        assert!(borrowed.ends_with(fields), "{borrowed:x?} vs {owned:x?}");
        assert!(
            borrowed.windows(2).any(|w| w == [0xc4, 2]),
            "bin8 of 2 bytes"
        );
    }

    #[test]
    fn entries_round_trip_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) =
            Journal::open(dir.path(), MetaFsync::Never, REWRITE_MIN_BYTES, |_| {}).unwrap();
        let k = Bytes::from_static(b"k");
        let m = meta(7);
        let node = NodeRecord {
            id: NodeId(3),
            addr: "127.0.0.1:9".into(),
            data_dir: "d".into(),
            spawned: true,
            pid: None,
            removed: false,
            leaving: false,
            owes_reconciliation: false,
        };
        j.append(&EntryRef::Key {
            key: &k,
            meta: Some(&m),
        })
        .unwrap();
        j.append(&EntryRef::Node(&node)).unwrap();
        j.append(&EntryRef::Ceiling(42)).unwrap();
        j.append(&EntryRef::Key {
            key: &k,
            meta: None,
        })
        .unwrap();
        j.commit(false).unwrap();
        drop(j);
        let (seen, report) = replay(dir.path());
        assert_eq!(
            seen,
            vec![
                Entry::Key {
                    key: k.clone(),
                    meta: Some(m)
                },
                Entry::Node(node),
                Entry::Ceiling(42),
                Entry::Key { key: k, meta: None },
            ]
        );
        assert_eq!(report.discarded_bytes, 0);
    }

    #[test]
    fn a_torn_tail_at_every_offset_keeps_the_whole_frames_before_it() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path());
        let path = dir.path().join(JOURNAL_FILE);
        let full = fs::read(&path).unwrap();
        let frame = (full.len() - MAGIC.len()) / 3;
        for cut in MAGIC.len()..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let (seen, report) = replay(dir.path());
            let whole = (cut - MAGIC.len()) / frame;
            assert_eq!(seen.len(), whole, "cut at {cut}");
            assert_eq!(
                report.discarded_bytes as usize,
                cut - MAGIC.len() - whole * frame
            );
            // The file was cut back, so a second open finds nothing to discard.
            assert_eq!(replay(dir.path()).1.discarded_bytes, 0);
        }
    }

    #[test]
    fn a_flipped_bit_ends_the_valid_prefix_and_the_rest_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path());
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let frame = (bytes.len() - MAGIC.len()) / 3;
        let second = MAGIC.len() + frame + FRAME_HEADER_LEN + 2;
        bytes[second] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let (seen, report) = replay(dir.path());
        assert_eq!(seen.len(), 1);
        assert_eq!(report.discarded_bytes as usize, 2 * frame);
        let aside = fs::read(report.discarded_to.unwrap()).unwrap();
        assert_eq!(aside, bytes[MAGIC.len() + frame..]);
    }

    #[test]
    fn only_a_journal_ending_in_the_close_marker_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path());
        assert!(!replay(dir.path()).1.clean, "never closed");
        let (mut j, _) =
            Journal::open(dir.path(), MetaFsync::Never, REWRITE_MIN_BYTES, |_| {}).unwrap();
        j.close().unwrap();
        drop(j);
        assert!(replay(dir.path()).1.clean);
        let (mut j, _) =
            Journal::open(dir.path(), MetaFsync::Never, REWRITE_MIN_BYTES, |_| {}).unwrap();
        j.append(&EntryRef::Ceiling(9)).unwrap();
        j.commit(false).unwrap();
        drop(j);
        assert!(!replay(dir.path()).1.clean, "changes after the marker");
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(JOURNAL_FILE), b"not a journal at all").unwrap();
        let err = Journal::open(dir.path(), MetaFsync::Always, REWRITE_MIN_BYTES, |_| {}).err();
        assert!(matches!(err, Some(JournalError::NotAJournal(_))), "{err:?}");
    }

    #[test]
    fn changes_appended_during_a_rewrite_follow_the_snapshot_twice_over() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) =
            Journal::open(dir.path(), MetaFsync::Never, REWRITE_MIN_BYTES, |_| {}).unwrap();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        let key = |key, v| Entry::Key {
            key,
            meta: Some(meta(v)),
        };
        j.append(&EntryRef::Key {
            key: &a,
            meta: Some(&meta(1)),
        })
        .unwrap();
        j.commit(false).unwrap();
        // Two rewrites in a row (the second reads the file the first made), each with a
        // change appended while its snapshot is written, and a snapshot that saw the older
        // state of `a`.
        for round in 0..2u64 {
            let mut rewrite = j.begin_rewrite().unwrap();
            j.append(&EntryRef::Key {
                key: &a,
                meta: Some(&meta(10 + round)),
            })
            .unwrap();
            j.commit(false).unwrap();
            rewrite
                .push(&EntryRef::Key {
                    key: &a,
                    meta: Some(&meta(1)),
                })
                .unwrap();
            let mut snapshot = rewrite.sync().unwrap();
            if round == 1 {
                // The second one copies what came so far ahead of its end, and a change
                // after that is copied at the end.
                snapshot.catch_up(dir.path(), j.size()).unwrap();
                j.append(&EntryRef::Key {
                    key: &a,
                    meta: Some(&meta(12)),
                })
                .unwrap();
                j.commit(false).unwrap();
            }
            j.finish_rewrite(snapshot).unwrap();
        }
        j.append(&EntryRef::Key {
            key: &b,
            meta: Some(&meta(20)),
        })
        .unwrap();
        j.commit(false).unwrap();
        let size = j.size();
        drop(j);
        assert_eq!(
            std::fs::metadata(dir.path().join(JOURNAL_FILE))
                .unwrap()
                .len(),
            size,
            "the journal's idea of its length is the file's"
        );
        let (seen, report) = replay(dir.path());
        assert_eq!(report.discarded_bytes, 0);
        assert_eq!(
            seen,
            // The second snapshot replaced the first file: its own entry, then what was
            // appended during it (before and after its catch-up), then after it.
            vec![
                key(a.clone(), 1),
                key(a.clone(), 11),
                key(a.clone(), 12),
                key(b.clone(), 20)
            ]
        );
    }

    #[test]
    fn rewrite_keeps_only_what_it_is_given_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path());
        let (mut j, _) =
            Journal::open(dir.path(), MetaFsync::Always, REWRITE_MIN_BYTES, |_| {}).unwrap();
        let k = Bytes::from_static(b"key");
        let m = meta(3);
        let before = j.size();
        j.rewrite(std::iter::once(EntryRef::Key {
            key: &k,
            meta: Some(&m),
        }))
        .unwrap();
        assert!(j.size() < before);
        let m4 = meta(4);
        j.append(&EntryRef::Key {
            key: &k,
            meta: Some(&m4),
        })
        .unwrap();
        j.commit(false).unwrap();
        drop(j);
        let (seen, _) = replay(dir.path());
        assert_eq!(seen.len(), 2);
        assert!(!dir.path().join(format!("{JOURNAL_FILE}.rewrite")).exists());
    }
}

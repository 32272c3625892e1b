//! Files written ahead in zeros, for logs that are synced on every write.
//!
//! An fsync of bytes appended to a file must also make the file's new size durable, which on
//! ext4 (and most journaling file systems) is a commit of the file system's own journal. An
//! fsync of bytes written into space the file already had, written before, changes no
//! metadata and needs no such commit: on the disks measured (`bench/fsync.sh`) it takes 30-50%
//! less time and CPU. So a log that syncs every write keeps its file [`AHEAD`] bytes of zeros
//! past its end and writes its records into them; its replay takes zeros after the last record
//! for the end of the log ([`all_zeros`]).
//!
//! Invariant: a record is written only where the file already ends in zeros or past its end,
//! at the log's end, so the zeros are always the file's tail.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::file_range::pieces;

/// Bytes of zeros written ahead at a time: a few seconds of appends under load, and zeroing
/// them costs the writer well under a millisecond.
pub const AHEAD: u64 = 4 << 20;

/// Zeros to write from; [`AHEAD`] is a multiple of its length.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// If `written` is `Some` (how far `file` has been written), writes zeros so that the file
/// extends past `end`, [`AHEAD`] bytes further; `None` writes nothing.
///
/// Should the zeros not fit (a full disk), the file stops being written ahead (`written`
/// becomes `None`) and the record is appended past its end as in any file: the record itself
/// may still fit, and any zeros written are after the log's end, where replay ignores them.
pub fn make_room(file: &File, written: &mut Option<u64>, end: u64) {
    let Some(from) = *written else {
        return;
    };
    if end <= from {
        return;
    }
    let target = end + AHEAD;
    match write_zeros(file, from, target) {
        Ok(()) => *written = Some(target),
        Err(e) => {
            tracing::warn!(error = %e, "cannot write the file ahead in zeros; appending without");
            *written = None;
        }
    }
}

/// Writes zeros over `file`'s bytes `from..to`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    for (at, len) in pieces(from, to, ZEROS.len()) {
        let zeros = ZEROS.get(..len).ok_or(io::ErrorKind::InvalidInput)?;
        file.write_all_at(zeros, at)?;
    }
    Ok(())
}

/// At a clean close, after everything was synced: cuts the zeros written ahead (up to
/// `written`) off `file`, so that it ends where the log does at `end`. Best effort: should it
/// fail, replay takes the zeros for the end of the log anyway.
pub fn cut_off(file: &File, written: Option<u64>, end: u64) {
    if written.is_some_and(|written| written > end) {
        if let Err(e) = file.set_len(end).and_then(|()| file.sync_all()) {
            tracing::warn!(error = %e, "could not cut the zeros written ahead off the file");
        }
    }
}

/// Whether every byte of `file` from `from` to `to` is zero.
///
/// # Errors
/// The reads'.
pub fn all_zeros(file: &File, from: u64, to: u64) -> io::Result<bool> {
    let mut chunk = vec![0u8; 1 << 20];
    for (at, len) in pieces(from, to, chunk.len()) {
        let part = chunk.get_mut(..len).ok_or(io::ErrorKind::InvalidInput)?;
        file.read_exact_at(part, at)?;
        if part.iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn room_is_made_ahead_only_when_needed_and_only_in_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.write_all_at(b"head", 0).unwrap();
        let mut written = Some(4);
        make_room(&file, &mut written, 10);
        assert_eq!(written, Some(10 + AHEAD));
        assert_eq!(file.metadata().unwrap().len(), 10 + AHEAD);
        assert!(all_zeros(&file, 4, 10 + AHEAD).unwrap());
        // Within what was written: nothing to do.
        make_room(&file, &mut written, 100);
        assert_eq!(written, Some(10 + AHEAD));
        // Not written ahead at all.
        let mut none = None;
        make_room(&file, &mut none, 1 << 30);
        assert_eq!(file.metadata().unwrap().len(), 10 + AHEAD);
        assert!(!all_zeros(&file, 0, 8).unwrap());
        file.write_all_at(&[1], 5 + AHEAD).unwrap();
        assert!(!all_zeros(&file, 4, 10 + AHEAD).unwrap());
        assert!(all_zeros(&file, 4, 5 + AHEAD).unwrap());
    }
}

//! The storage node's durable log: one append-only file of CRC-checked records per data directory.
//!
//! # Layout
//! - [`record`]: the on-disk record format, the single encode/decode chokepoint.
//! - [`recovery`]: replay at open; stops at the first bad record, cuts a torn tail, and sets
//!   aside (in a preserved original) everything from damage that has records after it.
//! - [`compaction`]: rewriting the log to a live set (write, fsync, rename, fsync the directory).
//! - [`writer`]: [`Log`], the handle that writes the file, and its sync thread (group commit, fsync policy).
//!
//! # Files in the data directory
//! - `ringkv.log`: the log. It is the only source of truth; every replacement of it is an atomic rename.
//!   Under `--fsync always` the file runs on past the last record in zeros written ahead, which
//!   replay takes for the end of the log.
//! - `ringkv.log.compact`: a rewrite in progress. One left over at open is a crash before its rename,
//!   so it is deleted.
//! - `ringkv.log.corrupt-<unix-secs>`: the original of a log in which recovery found damage with
//!   records after it, kept for inspection. Nothing reads it again.
//!
//! # Invariants
//! - After [`Log::open`] returns, only [`Log`] writes `ringkv.log`, one whole frame group at a time under its mutex.
//! - A record is acknowledged only after its bytes are written (and, under [`FsyncPolicy::Always`], synced).
//! - After a failed write or fsync the log refuses all further writes ([`LogError::Poisoned`]): what reached
//!   the disk is unknown, and only a reopen (which replays and repairs the file) can tell.

pub mod compaction;
pub mod record;
pub mod recovery;
pub mod writer;

use std::io;

pub use compaction::{CompactStats, CompactThreshold};
pub use record::{EncodedRecord, Record};
pub use recovery::RecoveryReport;
pub use writer::{FsyncPolicy, Log};

/// File name of the log inside the data directory.
pub const LOG_FILE: &str = "ringkv.log";

/// File name of a rewrite in progress; renamed over [`LOG_FILE`] once complete and synced.
pub const COMPACT_FILE: &str = "ringkv.log.compact";

/// Prefix of the preserved copy of a log that had damage with records after it
/// (`<prefix><unix-secs>`).
pub const CORRUPT_FILE_PREFIX: &str = "ringkv.log.corrupt-";

/// What can go wrong with the log.
#[derive(thiserror::Error, Debug)]
pub enum LogError {
    /// The file system failed.
    #[error("log I/O: {0}")]
    Io(#[from] io::Error),
    /// The file cannot be used as a log. Corruption inside a log is repaired at open and reported in
    /// [`RecoveryReport`]; this is for what cannot be repaired without destroying data, such as a file
    /// without the log's magic (someone else's file).
    #[error("log corrupt at byte {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    /// The log was closed, or its sync thread is gone.
    #[error("log is closed")]
    Closed,
    /// A key or value over the protocol's limits; nothing was written.
    #[error("{what} of {len} bytes is over the log's limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// An earlier write or fsync failed, so what is on disk is unknown; the log takes no more writes
    /// until it is reopened (which replays and repairs the file).
    #[error("log refuses writes after an earlier failure: {0}")]
    Poisoned(String),
}

pub(crate) use ringkv_common::durable_file::sync_dir;

/// Evaluates failpoint `name`: a no-op unless the `failpoints` feature is on and the point is configured.
///
/// Actions (e.g. `FAILPOINTS=compaction-after-rename=return(abort)`):
/// - `return(abort)`: abort the process on the spot, like a power cut for anything not yet synced
///   (no destructors, no flush). This is what crash tests use.
/// - `return` or `return(<anything else>)`: fail the operation with an injected I/O error.
/// - `panic`, `sleep(ms)`, `pause`, ...: as documented by the `fail` crate.
pub(crate) fn failpoint(name: &str) -> Result<(), LogError> {
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
    fail::fail_point!(name, |arg: Option<String>| match arg.as_deref() {
        Some("abort") => std::process::abort(),
        _ => Err(LogError::Io(io::Error::other(format!(
            "failpoint {name} injected an error"
        )))),
    });
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by the log's unit tests.

    use bytes::Bytes;
    use ringkv_common::Version;

    use super::Record;

    /// A put with a byte-string key and value.
    pub fn put(key: &[u8], version: u64, value: &[u8]) -> Record {
        Record {
            key: Bytes::copy_from_slice(key),
            version: Version(version),
            value: Some(Bytes::copy_from_slice(value)),
        }
    }

    /// A tombstone.
    pub fn del(key: &[u8], version: u64) -> Record {
        Record {
            key: Bytes::copy_from_slice(key),
            version: Version(version),
            value: None,
        }
    }

    /// `n` records of mixed shapes: binary keys, empty and longer values, tombstones.
    pub fn mixed(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| {
                let key = [b"k".as_slice(), &[0, 0xff, i as u8]].concat();
                match i % 5 {
                    0 => del(&key, i as u64 + 1),
                    1 => put(&key, i as u64 + 1, b""),
                    _ => put(&key, i as u64 + 1, &vec![i as u8; (i * 7) % 40]),
                }
            })
            .collect()
    }

    /// A current-thread runtime for tests that mix blocking opens with async appends.
    pub fn runtime() -> tokio::runtime::Runtime {
        #[allow(clippy::unwrap_used)]
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }
}

//! An exclusive lock on a data directory, so that two processes never write one directory.
//!
//! The lock is an advisory `flock` on `LOCK` inside the directory, held for as long as the
//! [`DirLock`] lives. The kernel drops it when the process ends, however it ends, so a
//! SIGKILL never leaves a stale lock behind. The file holds the owner's pid, for the message
//! a second process gets.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file inside a data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Why a data directory could not be locked.
#[derive(thiserror::Error, Debug)]
pub enum DirLockError {
    #[error("data directory {dir} is in use by another process{}", owner_suffix(.owner))]
    InUse { dir: PathBuf, owner: Option<u32> },
    #[error("cannot lock data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn owner_suffix(owner: &Option<u32>) -> String {
    owner.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// Holds the lock on a data directory until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Lock `dir` (created if missing) for this process, or say who holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, DirLockError> {
    let io = |source| DirLockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let owner = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(DirLockError::InUse {
                dir: dir.to_path_buf(),
                owner,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_dir(dir.path()).unwrap();
        match lock_dir(dir.path()) {
            Err(DirLockError::InUse { owner, .. }) => {
                assert_eq!(owner, Some(std::process::id()))
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(first);
        // A child that another test forks at this moment shares the lock file's open file
        // description (and so the lock) until it execs, which closes it: wait that out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match lock_dir(dir.path()) {
                Ok(_) => break,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("still locked after the holder dropped it: {e}"),
            }
        }
    }
}

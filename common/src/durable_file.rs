//! Small files replaced whole and durably, and the directory sync that makes a create, rename
//! or unlink survive a crash.
//!
//! A file such as a node's id or the cluster token is written under a temporary name, synced,
//! renamed over the old one and its directory synced: a crash leaves either the old content or
//! the new, never part of it.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Fsyncs a directory, making a create, rename or unlink in it durable.
///
/// # Errors
/// Opening or syncing the directory.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces `dir/name` with `contents`, created with permission bits `mode` (before the umask):
/// written to `name.tmp` (a leftover of a crash is removed first, never reused with whatever
/// mode it has), synced, renamed over `name`, and the directory synced.
///
/// # Errors
/// Any step's; `name` is then unchanged, or already replaced if only the directory sync failed.
pub fn replace(dir: &Path, name: &str, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_no_leftover() {
        let dir = tempfile::tempdir().unwrap();
        replace(dir.path(), "f", b"one", 0o600).unwrap();
        std::fs::write(dir.path().join("f.tmp"), "stale").unwrap();
        replace(dir.path(), "f", b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"two");
        let mode = std::fs::metadata(dir.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("f.tmp").exists());
    }
}

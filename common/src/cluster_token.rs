//! The cluster token: a secret the coordinator and its nodes share, so that only they can
//! take the peer roles.
//!
//! A connection's [`Request::Hello`](crate::protocol::Request::Hello) names a role, and the
//! node and coordinator roles can store data, forget it, report it and join the ring. Any TCP
//! peer can claim one, so the coordinator creates a random token in its data directory
//! ([`FILE`]) at its first start, hands it to the nodes it spawns in [`ENV`], and both sides
//! refuse a peer role whose hello does not carry it. Clients need no token.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::durable_file;

/// The token's file in the coordinator's data directory (readable by its owner only).
pub const FILE: &str = "cluster.token";

/// The environment variable a node reads its token from (also its `--cluster-token`).
pub const ENV: &str = "RINGKV_CLUSTER_TOKEN";

/// Random bytes in a token (printed as twice as many hex digits).
const TOKEN_BYTES: usize = 16;

/// The token of the coordinator whose data directory is `dir`.
///
/// # Errors
/// Reading the file (`NotFound` before the coordinator's first start), or a file that holds
/// no token.
pub fn read(dir: &Path) -> io::Result<String> {
    let path = dir.join(FILE);
    let file = std::fs::File::open(&path)?;
    if file.metadata()?.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "the cluster token file is readable by other users; make it 0600"
        );
    }
    let mut text = String::new();
    (&file).read_to_string(&mut text)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds no token", path.display()),
        ));
    }
    Ok(token.to_string())
}

/// The token in `dir`, created on first use.
///
/// # Errors
/// Reading or creating the file, or a file that holds no token.
pub fn load_or_create(dir: &Path) -> io::Result<String> {
    match read(dir) {
        Ok(token) => Ok(token),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let token = fresh()?;
            // A crash leaves either no token or the whole token.
            durable_file::replace(dir, FILE, format!("{token}\n").as_bytes(), 0o600)?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// A new random token, from the kernel's random source.
fn fresh() -> io::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `given` is `expected`, compared in time that does not depend on where they differ.
pub fn matches(expected: &str, given: Option<&str>) -> bool {
    let Some(given) = given else {
        return false;
    };
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_created_once_for_its_owner_only_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert_eq!(first.len(), 2 * TOKEN_BYTES);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), first);
    }

    #[test]
    fn a_leftover_temporary_file_is_replaced_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, "stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        let token = load_or_create(dir.path()).unwrap();
        assert_ne!(token, "stale");
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn an_empty_token_file_is_an_error_not_an_open_door() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "\n").unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }

    #[test]
    fn only_the_same_token_matches() {
        assert!(matches("abc123", Some("abc123")));
        assert!(!matches("abc123", Some("abc124")));
        assert!(!matches("abc123", Some("abc12")));
        assert!(!matches("abc123", Some("")));
        assert!(!matches("abc123", None));
    }
}

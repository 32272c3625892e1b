//! Errors that cross the wire, and the classification clients and checkers rely on.

use serde::{Deserialize, Serialize};

/// An error answer. Every variant says whether the operation may have taken effect:
/// see [`WireError::may_have_applied`].
#[derive(thiserror::Error, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Definitely not applied: not enough live replicas, or the service is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A timeout or lost connection after replicas were asked: the write may have been applied.
    #[error("indeterminate: {0}")]
    Indeterminate(String),
    /// The named thing (a node id, usually) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A key, value or frame over its limit; nothing was written.
    #[error("too large: {what} is {size} bytes, the limit is {max}")]
    TooLarge { what: String, size: u64, max: u64 },
    /// The request is malformed or not allowed from this peer; nothing was done.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The peers speak different protocol versions.
    #[error("protocol mismatch: server speaks version {server}, client speaks {client}")]
    ProtocolMismatch { server: u32, client: u32 },
    /// A bug or an unexpected local failure; treat as possibly applied.
    #[error("internal error: {0}")]
    Internal(String),
}

impl WireError {
    /// Whether the operation may have taken effect despite the error.
    ///
    /// `false` means it definitely did not, so a client may retry without risk of a duplicate;
    /// `true` means a checker must treat the operation's outcome as unknown.
    pub fn may_have_applied(&self) -> bool {
        matches!(self, WireError::Indeterminate(_) | WireError::Internal(_))
    }

    /// Stable lower-case class name for `--json` output and scripts.
    pub fn class(&self) -> &'static str {
        match self {
            WireError::Unavailable(_) => "unavailable",
            WireError::Indeterminate(_) => "indeterminate",
            WireError::NotFound(_) => "not_found",
            WireError::TooLarge { .. } => "too_large",
            WireError::BadRequest(_) => "bad_request",
            WireError::ProtocolMismatch { .. } => "protocol_mismatch",
            WireError::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(!WireError::Unavailable("x".into()).may_have_applied());
        assert!(WireError::Indeterminate("x".into()).may_have_applied());
        assert!(!WireError::TooLarge {
            what: "key".into(),
            size: 1,
            max: 0
        }
        .may_have_applied());
    }
}

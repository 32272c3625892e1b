//! The history of a chaos run: every operation a client invoked, when, and how it ended.
//!
//! Times are microseconds since the run started, all read from one monotonic clock in one
//! process, so `a.end < b.start` really means `a` finished before `b` began. An operation's
//! [`Status`] follows the protocol's error classes: `Ok` (it took effect, and a read returned
//! `value`), `Failed` (definitely did not take effect: `Unavailable` and other refusals) and
//! `Unknown` (may or may not have taken effect: `Indeterminate`, timeouts, a lost connection).
//! Checkers treat an unknown write as possibly taking effect at any time after its start.

use serde::Serialize;

/// What an operation asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Put,
    Get,
    #[serde(rename = "del")]
    Delete,
}

impl OpKind {
    /// The short name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Put => "put",
            OpKind::Get => "get",
            OpKind::Delete => "del",
        }
    }

    /// Whether the operation changes the key.
    pub fn is_write(self) -> bool {
        !matches!(self, OpKind::Get)
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Acknowledged: a write took effect, a read returned `value`.
    Ok,
    /// Definitely not applied.
    Failed,
    /// May or may not have been applied.
    Unknown,
}

impl Status {
    /// The short name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Unknown => "unknown",
        }
    }
}

/// One operation of one client on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    /// The client that issued it; final reads use the id one past the last worker.
    pub client: u32,
    /// Index of the key in the run's key space.
    pub key: u32,
    pub kind: OpKind,
    /// A put's value, or what an `Ok` get returned (`None`: the key did not exist).
    pub value: Option<String>,
    /// Microseconds since the run started, taken just before the request was sent.
    pub start: u64,
    /// Microseconds since the run started, taken when the answer (or the error) arrived.
    pub end: u64,
    pub status: Status,
    /// The error class and message, for `Failed` and `Unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    /// A one-line description for reports: `c2 put "c2-17" [1.204s, 1.209s] ok`.
    pub fn describe(&self) -> String {
        let value = match (&self.kind, &self.value, self.status) {
            (OpKind::Put, Some(v), _) => format!(" {v:?}"),
            (OpKind::Get, Some(v), Status::Ok) => format!(" -> {v:?}"),
            (OpKind::Get, None, Status::Ok) => " -> nil".to_string(),
            _ => String::new(),
        };
        let end = if self.status == Status::Unknown {
            "?".to_string()
        } else {
            secs(self.end)
        };
        format!(
            "c{} {}{value} [{}, {end}] {}",
            self.client,
            self.kind.as_str(),
            secs(self.start),
            self.status.as_str()
        )
    }
}

/// Microseconds as `1.204s`.
pub fn secs(micros: u64) -> String {
    format!("{:.3}s", micros as f64 / 1e6)
}

/// Everything the clients did, plus the final reads taken after healing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct History {
    /// The names of the keys, indexed by [`Op::key`].
    pub keys: Vec<String>,
    /// The workload's operations, in no particular order.
    pub ops: Vec<Op>,
    /// One successful read per readable key, taken after the cluster healed.
    pub final_reads: Vec<Op>,
}

impl History {
    /// The workload operations and final reads grouped by key, each group in start order.
    pub fn by_key(&self) -> Vec<Vec<&Op>> {
        let mut groups: Vec<Vec<&Op>> = vec![Vec::new(); self.keys.len()];
        for op in self.ops.iter().chain(&self.final_reads) {
            if let Some(group) = groups.get_mut(op.key as usize) {
                group.push(op);
            }
        }
        for group in &mut groups {
            group.sort_by_key(|op| (op.start, op.end));
        }
        groups
    }
}

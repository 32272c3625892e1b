//! Turns an [`Outcome`] or an error into what the user sees: human text or one JSON document.
//!
//! Rendering is pure: it returns bytes and strings and never writes, so the shell and the
//! script runner can print, compare or discard them. Human output of `get` is raw bytes (a
//! value need not be text), which is why [`render`] returns `Vec<u8>`.
//!
//! The JSON shapes are a contract for scripts; the unit tests below pin every key.
//! - `put`, `del`: `{"key","version"}`
//! - `get`: `{"key","value","version"}`; `value` is null for a missing key. A value that is
//!   not UTF-8 is shown lossily (U+FFFD for invalid sequences) and gains `"binary":true`.
//! - `locate`: `{"key","version","tombstone","replicas":[{"node","addr","state","version"}]}`
//!   (`tombstone`: the version is a deletion)
//! - `status`: `{"nodes":[NODE],"keys","under_replicated","misplaced","tombstones",
//!   "collection":{"floor","passes","waiting_for":[node id],
//!   "reconciliations":[{"node","complete","incomplete"}],"reads_wait"},"degraded","rf","write_quorum","jobs":[{"kind","keys_done","keys_total","bytes_done","bytes_total","eta_secs"}],
//!   "writes":{"count","lock_wait_us","quorum_wait_us","commit_wait_us"}}`, the last the
//!   time acknowledged writes spent in each stage, summed since the coordinator started; where
//!   NODE is `{"id","addr","state","pid","keys","bytes","ops","messages","syncs",
//!   "log_set_aside_bytes","last_heartbeat_ms"}`: `ops` counts requests and `messages` the
//!   frames that carried them (a batch is one), `syncs` the node's log fsyncs,
//!   `log_set_aside_bytes` what its log set aside at its last start (damage, not replayed)
//! - `nodes`: `{"nodes":[NODE]}`
//! - `node add`: `{"node"}`; `node remove|kill|pause|resume`: `{"node","ok":true}`
//! - `check`: `{"keys","healthy","under_replicated","lost","stale"}`
//! - any error: `{"error":{"class","message","may_have_applied"}}` (`may_have_applied`: the
//!   operation may have taken effect, e.g. a write whose answer timed out; its outcome is unknown)
//!
//! Node ids are numbers, states lower-case strings, and unknown values (a replica's version,
//! a pid, a heartbeat age, an ETA) are null.

use comfy_table::{presets, CellAlignment, Table};
use ringkv_common::client::CallError;
use ringkv_common::protocol::{
    CheckReport, ClusterStatus, JobProgress, Location, NodeInfo, ReplicaInfo, WriteTimings,
};
use ringkv_common::{NodeState, WireError};
use serde_json::{json, Value};

use crate::commands::Outcome;

/// Render `outcome` for stdout: one line of compact JSON, or human text; ends with a newline
/// unless it is a binary value written as-is.
pub fn render(outcome: &Outcome, json: bool) -> Vec<u8> {
    if json {
        return json_line(&to_json(outcome));
    }
    match outcome {
        Outcome::Value {
            value: Some(value), ..
        } => {
            let mut out = value.to_vec();
            // Text gets a newline like any other output; binary data stays byte-exact.
            if std::str::from_utf8(value).is_ok() {
                out.push(b'\n');
            }
            out
        }
        other => human(other).into_bytes(),
    }
}

/// The JSON document for `outcome` (see the module docs for the shapes).
pub fn to_json(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Put { key, version } | Outcome::Deleted { key, version } => {
            json!({ "key": key, "version": version.0 })
        }
        Outcome::Value {
            key,
            version,
            value,
        } => {
            let mut doc = json!({ "key": key, "value": Value::Null, "version": version.0 });
            if let Some(value) = value {
                doc["value"] = Value::String(String::from_utf8_lossy(value).into_owned());
                if std::str::from_utf8(value).is_err() {
                    doc["binary"] = Value::Bool(true);
                }
            }
            doc
        }
        Outcome::Located { key, location } => json!({
            "key": key,
            "version": location.version.0,
            "tombstone": location.tombstone,
            "replicas": location.replicas.iter().map(replica_json).collect::<Vec<_>>(),
            "reads_wait": location.reads_wait,
        }),
        Outcome::Status(status) => status_json(status),
        Outcome::Nodes(status) => {
            json!({ "nodes": status.nodes.iter().map(node_json).collect::<Vec<_>>() })
        }
        Outcome::NodeAdded { node } => json!({ "node": node.0 }),
        Outcome::NodeChanged { node, .. } => json!({ "node": node.0, "ok": true }),
        Outcome::Checked(report) => json!({
            "keys": report.keys,
            "healthy": report.healthy,
            "under_replicated": report.under_replicated,
            "lost": report.lost,
            "stale": report.stale,
            "reads_wait": report.reads_wait,
        }),
    }
}

fn replica_json(replica: &ReplicaInfo) -> Value {
    json!({
        "node": replica.node.0,
        "addr": replica.addr,
        "state": replica.state.as_str(),
        "version": replica.version.map(|v| v.0),
    })
}

fn node_json(node: &NodeInfo) -> Value {
    json!({
        "id": node.id.0,
        "addr": node.addr,
        "state": node.state.as_str(),
        "pid": node.pid,
        "keys": node.stats.keys,
        "bytes": node.stats.bytes,
        "ops": node.stats.ops,
        "messages": node.stats.messages,
        "syncs": node.stats.syncs,
        "log_set_aside_bytes": node.stats.log_set_aside_bytes,
        "last_heartbeat_ms": node.last_heartbeat_ms,
    })
}

fn status_json(status: &ClusterStatus) -> Value {
    json!({
        "nodes": status.nodes.iter().map(node_json).collect::<Vec<_>>(),
        "keys": status.keys,
        "under_replicated": status.under_replicated,
        "misplaced": status.misplaced,
        "tombstones": status.tombstones,
        "collection": json!({
            "floor": status.collection.floor.0,
            "passes": status.collection.passes,
            "waiting_for": status.collection.waiting_for.iter().map(|n| n.0).collect::<Vec<_>>(),
            "reconciliations": status.collection.reconciliations.iter().map(|r| json!({
                "node": r.node.0,
                "complete": r.complete,
                "incomplete": r.incomplete,
            })).collect::<Vec<_>>(),
            "reads_wait": status.collection.reads_wait,
        }),
        "degraded": status.degraded,
        "rf": status.rf,
        "write_quorum": status.write_quorum,
        "jobs": status.jobs.iter().map(|job| json!({
            "kind": job.kind,
            "keys_done": job.keys_done,
            "keys_total": job.keys_total,
            "bytes_done": job.bytes_done,
            "bytes_total": job.bytes_total,
            // serde_json turns a non-finite float into null, which is what "unknown" means here.
            "eta_secs": job.eta_secs,
        })).collect::<Vec<_>>(),
        "writes": json!({
            "count": status.writes.count,
            "lock_wait_us": status.writes.lock_wait_us,
            "quorum_wait_us": status.writes.quorum_wait_us,
            "commit_wait_us": status.writes.commit_wait_us,
        }),
    })
}

fn json_line(doc: &Value) -> Vec<u8> {
    let mut out = doc.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// Human text for everything but a present `get` value.
fn human(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Put { version, .. } | Outcome::Deleted { version, .. } => {
            format!("OK (version {version})\n")
        }
        Outcome::Value { value: None, .. } => "(nil)\n".to_string(),
        Outcome::Value {
            value: Some(value), ..
        } => format!("{}\n", String::from_utf8_lossy(value)),
        Outcome::Located { key, location } => located_text(key, location),
        Outcome::Status(status) => status_text(status),
        Outcome::Nodes(status) => format!(
            "{}\n{}\n",
            node_table(&status.nodes),
            health_summary(status)
        ),
        Outcome::NodeAdded { node } => format!("OK: added node {node}\n"),
        Outcome::NodeChanged { node, action } => format!("OK: node {node} {}\n", action.as_str()),
        Outcome::Checked(report) if report.reads_wait => {
            format!("{}\n{READS_WAIT_NOTE}\n", check_summary(report))
        }
        Outcome::Checked(report) => format!("{}\n", check_summary(report)),
    }
}

fn new_table(header: &[&str], right_aligned: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header(header.iter().copied());
    for &index in right_aligned {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Said under `locate` and `check` while reads wait after an unclean stop.
const READS_WAIT_NOTE: &str = "note: reads wait until the nodes that may hold writes the \
                               metadata lost since an unclean stop are reconciled (see \
                               `status`); until then the metadata may lack a newer version";

fn located_text(key: &str, location: &Location) -> String {
    let note = if location.reads_wait {
        format!("{READS_WAIT_NOTE}\n")
    } else {
        String::new()
    };
    if location.version.0 == 0 {
        if location.reads_wait {
            return format!("key {key:?} is not in the metadata\n{note}");
        }
        return format!("key {key:?} was never written\n");
    }
    let deleted = if location.tombstone { " (deleted)" } else { "" };
    let mut table = new_table(&["node", "address", "state", "version"], &[0, 3]);
    for replica in &location.replicas {
        let version = match replica.version {
            None => "?".to_string(),
            Some(v) if v == location.version => v.to_string(),
            Some(v) => format!("{v} (stale)"),
        };
        table.add_row(vec![
            replica.node.to_string(),
            replica.addr.clone(),
            replica.state.to_string(),
            version,
        ]);
    }
    format!(
        "key {key:?} at version {}{deleted}, {} replicas\n{table}\n{note}",
        location.version,
        location.replicas.len()
    )
}

fn node_table(nodes: &[NodeInfo]) -> Table {
    let mut table = new_table(
        &[
            "node",
            "address",
            "state",
            "pid",
            "keys",
            "bytes",
            "requests",
            "per message",
            "fsyncs",
            "last heartbeat",
        ],
        &[0, 3, 4, 5, 6, 7, 8],
    );
    for node in nodes {
        table.add_row(vec![
            node.id.to_string(),
            node.addr.clone(),
            node.state.to_string(),
            node.pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
            node.stats.keys.to_string(),
            human_bytes(node.stats.bytes),
            node.stats.ops.to_string(),
            per_message(&node.stats),
            node.stats.syncs.to_string(),
            node.last_heartbeat_ms.map_or_else(
                || "never".to_string(),
                |ms| format!("{} ago", human_age(ms)),
            ),
        ]);
    }
    table
}

/// Requests per message a node received, `-` before its first: how well batching works.
fn per_message(stats: &ringkv_common::NodeStats) -> String {
    if stats.messages == 0 {
        return "-".to_string();
    }
    format!("{:.1}", stats.ops as f64 / stats.messages as f64)
}

fn status_text(status: &ClusterStatus) -> String {
    let mut out = format!(
        "{}\n{}\n",
        node_table(&status.nodes),
        health_summary(status)
    );
    for job in &status.jobs {
        out.push_str(&job_line(job));
        out.push('\n');
    }
    if let Some(line) = writes_line(&status.writes) {
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(line) = deletions_line(status) {
        out.push_str(&line);
        out.push('\n');
    }
    for node in status
        .nodes
        .iter()
        .filter(|n| n.stats.log_set_aside_bytes > 0)
    {
        out.push_str(&format!(
            "node {} set aside {} of its log at its last start (damage, not replayed; kept as \
             ringkv.log.corrupt-* in its directory); its keys are repaired from other replicas\n",
            node.id,
            human_bytes(node.stats.log_set_aside_bytes)
        ));
    }
    if status.collection.reads_wait {
        let ids: Vec<String> = status
            .collection
            .waiting_for
            .iter()
            .map(ToString::to_string)
            .collect();
        out.push_str(&format!(
            "reads wait: the metadata may lack writes acknowledged before an unclean stop; \
             reads are refused until enough of nodes {} are reconciled\n",
            ids.join(", ")
        ));
    }
    out
}

/// `deleted keys: 12 tombstones not yet collected (collection waits for nodes 3, 4 to be
/// reconciled)`; nothing when there is nothing to collect and nothing to wait for.
fn deletions_line(status: &ClusterStatus) -> Option<String> {
    let waiting = &status.collection.waiting_for;
    if status.tombstones == 0 && waiting.is_empty() {
        return None;
    }
    let mut line = format!(
        "deleted keys: {} tombstone{} not yet collected",
        status.tombstones,
        if status.tombstones == 1 { "" } else { "s" }
    );
    if !waiting.is_empty() {
        let ids: Vec<String> = waiting.iter().map(|n| n.to_string()).collect();
        let early: Vec<String> = status
            .collection
            .reconciliations
            .iter()
            .filter(|r| r.incomplete > 0 && waiting.contains(&r.node))
            .map(|r| format!("{} on node {}", r.incomplete, r.node))
            .collect();
        line.push_str(&format!(
            " (collection waits for node{} {} to be reconciled{})",
            if waiting.len() == 1 { "" } else { "s" },
            ids.join(", "),
            if early.is_empty() {
                String::new()
            } else {
                format!("; attempts that ended early: {}", early.join(", "))
            }
        ));
    }
    Some(line)
}

/// `writes: 1200 acknowledged; each waited on average 3 µs for its key's lock, 850 µs for
/// the write quorum, 410 µs for the metadata commit`; nothing before the first write.
fn writes_line(w: &WriteTimings) -> Option<String> {
    let avg = |total: u64| total.checked_div(w.count);
    Some(format!(
        "writes: {} acknowledged; each waited on average {} µs for its key's lock, {} µs for \
         the write quorum, {} µs for the metadata commit",
        w.count,
        avg(w.lock_wait_us)?,
        avg(w.quorum_wait_us)?,
        avg(w.commit_wait_us)?
    ))
}

/// `healthy: 5/5 nodes up, 1000 keys, 0 under-replicated, no jobs running`, or
/// `DEGRADED: ...` when the coordinator says so or any key is short of replicas.
pub fn health_summary(status: &ClusterStatus) -> String {
    // Removed nodes are history, not part of the cluster any more.
    let members = status
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Removed)
        .count();
    let up = status
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Up)
        .count();
    let label = if status.degraded || status.under_replicated > 0 {
        "DEGRADED"
    } else {
        "healthy"
    };
    let jobs = match status.jobs.len() {
        0 => "no jobs running".to_string(),
        1 => "1 job running".to_string(),
        n => format!("{n} jobs running"),
    };
    let keys = match status.keys {
        1 => "1 key".to_string(),
        n => format!("{n} keys"),
    };
    format!(
        "{label}: {up}/{members} nodes up, {keys}, {} under-replicated, {jobs}",
        status.under_replicated
    )
}

/// `job migration: 120/1000 keys, 1.2 MiB/10.0 MiB (12%), eta 3s`.
pub fn job_line(job: &JobProgress) -> String {
    let (done, total) = if job.bytes_total > 0 {
        (job.bytes_done, job.bytes_total)
    } else {
        (job.keys_done, job.keys_total)
    };
    let percent = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let eta = match job.eta_secs {
        Some(secs) if secs.is_finite() && secs >= 0.0 => human_secs(secs),
        _ => "unknown".to_string(),
    };
    format!(
        "job {}: {}/{} keys, {}/{} ({percent:.0}%), eta {eta}",
        job.kind,
        job.keys_done,
        job.keys_total,
        human_bytes(job.bytes_done),
        human_bytes(job.bytes_total),
    )
}

/// `healthy: 10/10 keys healthy, 0 under-replicated, 0 lost, 0 stale`, or `UNHEALTHY: ...`.
pub fn check_summary(report: &CheckReport) -> String {
    let label = if report.is_healthy() {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    format!(
        "{label}: {}/{} keys healthy, {} under-replicated, {} lost, {} stale",
        report.healthy, report.keys, report.under_replicated, report.lost, report.stale
    )
}

/// Sizes in binary units: `512 B`, `1.5 KiB`, `10.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut size = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if size < 1024.0 {
            break;
        }
        size /= 1024.0;
        unit = next;
    }
    format!("{size:.1} {unit}")
}

/// An age in milliseconds: `0.3s`, `4m05s`, `2h03m`.
fn human_age(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        human_secs(ms as f64 / 1000.0)
    }
}

/// Whole seconds: `3s`, `4m05s`, `2h03m`.
pub fn human_secs(secs: f64) -> String {
    let secs = secs.round() as u64;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// An error as the user sees it: a stable class and a message that does not repeat it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    /// `connect`, `timeout`, `unavailable`, `indeterminate`, ..., or `usage` and `input` for
    /// problems found before anything was sent.
    pub class: String,
    pub message: String,
    /// Whether the operation may have taken effect (a write that timed out after it was
    /// sent, say): scripts must then treat its outcome as unknown, not as failed.
    pub may_have_applied: bool,
}

impl ErrorReport {
    /// An error of `class` after which nothing was applied.
    pub fn new(class: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorReport {
            class: class.into(),
            message: message.into(),
            may_have_applied: false,
        }
    }

    /// Bad arguments.
    pub fn usage(message: impl Into<String>) -> Self {
        ErrorReport::new("usage", message)
    }

    /// A local input problem, such as stdin that cannot be read.
    pub fn input(message: impl Into<String>) -> Self {
        ErrorReport::new("input", message)
    }

    /// The line for stderr: `error: CLASS: MESSAGE` and a newline.
    pub fn stderr_line(&self) -> String {
        format!("error: {}: {}\n", self.class, self.message)
    }

    /// The `--json` document for stdout:
    /// `{"error":{"class":C,"message":M,"may_have_applied":B}}` and a newline.
    pub fn json(&self) -> Vec<u8> {
        json_line(&json!({ "error": {
            "class": self.class,
            "message": self.message,
            "may_have_applied": self.may_have_applied,
        } }))
    }
}

impl From<&CallError> for ErrorReport {
    fn from(err: &CallError) -> Self {
        let message = match err {
            CallError::Connect { addr, reason } => format!("cannot connect to {addr}: {reason}"),
            CallError::ConnectionLost(addr) => {
                format!("connection to {addr} lost; the operation may have been applied")
            }
            CallError::Timeout { addr, after } => format!(
                "no answer from {addr} within {after:?}; the operation may have been applied"
            ),
            CallError::Remote(wire) => match wire {
                WireError::Unavailable(m)
                | WireError::Indeterminate(m)
                | WireError::NotFound(m)
                | WireError::BadRequest(m)
                | WireError::Internal(m) => m.clone(),
                WireError::TooLarge { what, size, max } => {
                    format!("{what} is {size} bytes, the limit is {max}")
                }
                WireError::ProtocolMismatch { server, client } => format!(
                    "the coordinator speaks protocol version {server}, this client speaks {client}"
                ),
            },
        };
        ErrorReport {
            class: err.class().to_string(),
            message,
            may_have_applied: err.may_have_applied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use ringkv_common::protocol::{
        CheckReport, JobProgress, Location, NodeReconciliations, ReplicaInfo,
    };
    use ringkv_common::{NodeId, NodeStats, Version};

    use super::*;
    use crate::commands::NodeAction;

    /// The sorted keys of a JSON object.
    fn keys(doc: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = doc
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys
    }

    fn parse(outcome: &Outcome) -> Value {
        let bytes = render(outcome, true);
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        serde_json::from_slice(&bytes).expect("valid JSON")
    }

    fn node(id: u64, state: NodeState, heartbeat: Option<u64>) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            addr: format!("127.0.0.1:{}", 7400 + id),
            state,
            pid: heartbeat.map(|_| 1000 + id as u32),
            spawned: true,
            stats: NodeStats {
                keys: 10,
                bytes: 1536,
                ops: 99,
                log_bytes: 4096,
                messages: 33,
                syncs: 7,
                log_set_aside_bytes: 0,
            },
            last_heartbeat_ms: heartbeat,
        }
    }

    fn status(degraded: bool, under_replicated: u64) -> ClusterStatus {
        ClusterStatus {
            nodes: vec![
                node(1, NodeState::Up, Some(300)),
                node(2, NodeState::Down, None),
                node(3, NodeState::Removed, Some(125_000)),
            ],
            keys: 1000,
            under_replicated,
            misplaced: 0,
            tombstones: 0,
            collection: Default::default(),
            rf: 3,
            write_quorum: 2,
            degraded,
            jobs: vec![JobProgress {
                kind: "re-replication".into(),
                keys_done: 120,
                keys_total: 1000,
                bytes_done: 1024 * 1024,
                bytes_total: 10 * 1024 * 1024,
                eta_secs: None,
            }],
            writes: WriteTimings {
                count: 4,
                lock_wait_us: 10,
                quorum_wait_us: 4000,
                commit_wait_us: 2002,
            },
        }
    }

    #[test]
    fn put_and_del_json() {
        for outcome in [
            Outcome::Put {
                key: "k".into(),
                version: Version(7),
            },
            Outcome::Deleted {
                key: "k".into(),
                version: Version(7),
            },
        ] {
            assert_eq!(parse(&outcome), json!({"key": "k", "version": 7}));
            assert_eq!(render(&outcome, false), b"OK (version 7)\n");
        }
    }

    #[test]
    fn get_json_text_missing_and_binary() {
        let text = Outcome::Value {
            key: "k".into(),
            version: Version(3),
            value: Some(Bytes::from_static(b"hello")),
        };
        assert_eq!(
            parse(&text),
            json!({"key": "k", "value": "hello", "version": 3})
        );
        assert_eq!(render(&text, false), b"hello\n");

        let missing = Outcome::Value {
            key: "k".into(),
            version: Version(4),
            value: None,
        };
        let doc = parse(&missing);
        assert_eq!(keys(&doc), ["key", "value", "version"]);
        assert!(doc["value"].is_null());
        assert_eq!(render(&missing, false), b"(nil)\n");
        assert_eq!(missing.exit_code(), crate::commands::exit::OK);

        let raw: &[u8] = b"\x00\xffab";
        let binary = Outcome::Value {
            key: "k".into(),
            version: Version(5),
            value: Some(Bytes::from_static(raw)),
        };
        assert_eq!(
            parse(&binary),
            json!({"key": "k", "value": "\u{0}\u{fffd}ab", "version": 5, "binary": true})
        );
        // Byte for byte, no newline appended.
        assert_eq!(render(&binary, false), raw);
    }

    #[test]
    fn locate_json() {
        let outcome = Outcome::Located {
            key: "k".into(),
            location: Location {
                version: Version(5),
                tombstone: false,
                replicas: vec![
                    ReplicaInfo {
                        node: NodeId(1),
                        addr: "a:1".into(),
                        state: NodeState::Up,
                        version: Some(Version(5)),
                    },
                    ReplicaInfo {
                        node: NodeId(2),
                        addr: "a:2".into(),
                        state: NodeState::Suspect,
                        version: None,
                    },
                ],
                reads_wait: false,
            },
        };
        assert_eq!(
            parse(&outcome),
            json!({
                "key": "k",
                "version": 5,
                "tombstone": false,
                "replicas": [
                    {"node": 1, "addr": "a:1", "state": "up", "version": 5},
                    {"node": 2, "addr": "a:2", "state": "suspect", "version": null},
                ],
                "reads_wait": false,
            })
        );
        let text = String::from_utf8(render(&outcome, false)).unwrap();
        assert!(text.contains("version 5"), "{text}");
        assert!(text.contains("suspect"), "{text}");
        assert!(!text.contains("reads wait"), "{text}");
    }

    #[test]
    fn status_json() {
        let doc = parse(&Outcome::Status(status(false, 0)));
        assert_eq!(
            keys(&doc),
            [
                "collection",
                "degraded",
                "jobs",
                "keys",
                "misplaced",
                "nodes",
                "rf",
                "tombstones",
                "under_replicated",
                "write_quorum",
                "writes"
            ]
        );
        assert_eq!(
            doc["writes"],
            json!({
                "count": 4, "lock_wait_us": 10, "quorum_wait_us": 4000, "commit_wait_us": 2002,
            })
        );
        assert_eq!(
            doc["nodes"][0],
            json!({
                "id": 1, "addr": "127.0.0.1:7401", "state": "up", "pid": 1001,
                "keys": 10, "bytes": 1536, "ops": 99, "messages": 33, "syncs": 7,
                "log_set_aside_bytes": 0, "last_heartbeat_ms": 300,
            })
        );
        assert!(doc["nodes"][1]["pid"].is_null());
        assert!(doc["nodes"][1]["last_heartbeat_ms"].is_null());
        assert_eq!(doc["nodes"][1]["state"], "down");
        assert_eq!(doc["degraded"], false);
        assert_eq!(doc["rf"], 3);
        assert_eq!(doc["write_quorum"], 2);
        assert_eq!(
            doc["jobs"][0],
            json!({
                "kind": "re-replication", "keys_done": 120, "keys_total": 1000,
                "bytes_done": 1048576, "bytes_total": 10485760, "eta_secs": null,
            })
        );
    }

    #[test]
    fn a_node_that_set_part_of_its_log_aside_is_named() {
        let mut s = status(false, 0);
        let text = |s: &ClusterStatus| {
            String::from_utf8(render(&Outcome::Status(s.clone()), false)).unwrap()
        };
        assert!(!text(&s).contains("set aside"));
        s.nodes[0].stats.log_set_aside_bytes = 2048;
        let shown = text(&s);
        assert!(
            shown.contains("node 1 set aside 2.0 KiB of its log at its last start"),
            "{shown}"
        );
        assert_eq!(
            parse(&Outcome::Status(s))["nodes"][0]["log_set_aside_bytes"],
            2048
        );
    }

    #[test]
    fn status_text() {
        let text = String::from_utf8(render(&Outcome::Status(status(false, 0)), false)).unwrap();
        assert!(
            text.contains("healthy: 1/2 nodes up, 1000 keys, 0 under-replicated"),
            "{text}"
        );
        assert!(text.contains("0.3s ago"), "{text}");
        assert!(text.contains("2m05s ago"), "{text}");
        assert!(text.contains("never"), "{text}");
        assert!(text.contains("1.5 KiB"), "{text}");
        // The node's own row, cell by cell under the header's columns.
        let cells = |needle: &str| -> Vec<String> {
            let row = text.lines().find(|l| l.contains(needle));
            let row = row.unwrap_or_else(|| panic!("no row with {needle}: {text}"));
            row.split(['│', '┆'])
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        };
        let header = cells("per message");
        let row = cells("127.0.0.1:7401");
        let cell = |column: &str| {
            let at = header.iter().position(|h| h == column);
            let at = at.unwrap_or_else(|| panic!("no column {column}: {header:?}"));
            row[at].clone()
        };
        assert_eq!(cell("requests"), "99", "{text}");
        assert_eq!(
            cell("per message"),
            "3.0",
            "99 requests in 33 messages: {text}"
        );
        assert_eq!(cell("fsyncs"), "7", "{text}");
        assert!(
            text.contains("job re-replication: 120/1000 keys, 1.0 MiB/10.0 MiB (10%), eta unknown"),
            "{text}"
        );
        assert!(
            text.contains(
                "writes: 4 acknowledged; each waited on average 2 µs for its key's lock, \
                 1000 µs for the write quorum, 500 µs for the metadata commit"
            ),
            "{text}"
        );
        let text = String::from_utf8(render(&Outcome::Status(status(true, 7)), false)).unwrap();
        assert!(text.contains("DEGRADED: 1/2 nodes up, 1000 keys, 7 under-replicated"));
        let one = ClusterStatus {
            keys: 1,
            ..status(false, 0)
        };
        let text = String::from_utf8(render(&Outcome::Status(one), false)).unwrap();
        assert!(text.contains("nodes up, 1 key, 0 under"), "{text}");
        let quiet = ClusterStatus {
            jobs: Vec::new(),
            writes: WriteTimings::default(),
            ..status(false, 0)
        };
        let text = String::from_utf8(render(&Outcome::Status(quiet), false)).unwrap();
        assert!(
            text.contains("0 under-replicated, no jobs running"),
            "{text}"
        );
        assert!(
            !text.contains("writes:"),
            "no line before the first write: {text}"
        );
        assert!(!text.contains("deleted keys"), "{text}");
        let deleting = ClusterStatus {
            tombstones: 12,
            collection: ringkv_common::protocol::CollectionStatus {
                floor: ringkv_common::Version(40),
                passes: 3,
                waiting_for: vec![NodeId(3), NodeId(4)],
                reconciliations: vec![],
                reads_wait: false,
            },
            ..status(false, 0)
        };
        let text = String::from_utf8(render(&Outcome::Status(deleting.clone()), false)).unwrap();
        assert!(
            text.contains(
                "deleted keys: 12 tombstones not yet collected (collection waits for nodes 3, 4 to be reconciled)"
            ),
            "{text}"
        );
        let mut cut_short = deleting;
        cut_short.collection.reconciliations = [(1, 1, 0), (3, 0, 2)]
            .map(|(node, complete, incomplete)| NodeReconciliations {
                node: NodeId(node),
                complete,
                incomplete,
            })
            .to_vec();
        let text = String::from_utf8(render(&Outcome::Status(cut_short.clone()), false)).unwrap();
        assert!(
            text.contains(
                "(collection waits for nodes 3, 4 to be reconciled; attempts that ended early: 2 on node 3)"
            ),
            "{text}"
        );
        assert!(!text.contains("reads wait"), "{text}");
        assert_eq!(
            parse(&Outcome::Status(cut_short.clone()))["collection"],
            json!({
                "floor": 40, "passes": 3, "waiting_for": [3, 4],
                "reconciliations": [
                    {"node": 1, "complete": 1, "incomplete": 0},
                    {"node": 3, "complete": 0, "incomplete": 2},
                ],
                "reads_wait": false,
            })
        );
        let mut waiting = cut_short;
        waiting.collection.reads_wait = true;
        let text = String::from_utf8(render(&Outcome::Status(waiting.clone()), false)).unwrap();
        assert!(
            text.contains("reads are refused until enough of nodes 3, 4 are reconciled"),
            "{text}"
        );
        assert_eq!(
            parse(&Outcome::Status(waiting))["collection"]["reads_wait"],
            true
        );
    }

    #[test]
    fn nodes_json() {
        let nodes = ClusterStatus {
            nodes: vec![node(4, NodeState::Leaving, Some(1))],
            ..status(false, 0)
        };
        let doc = parse(&Outcome::Nodes(nodes.clone()));
        assert_eq!(keys(&doc), ["nodes"]);
        assert_eq!(
            keys(&doc["nodes"][0]),
            [
                "addr",
                "bytes",
                "id",
                "keys",
                "last_heartbeat_ms",
                "log_set_aside_bytes",
                "messages",
                "ops",
                "pid",
                "state",
                "syncs"
            ]
        );
        assert_eq!(doc["nodes"][0]["state"], "leaving");
        let text = String::from_utf8(render(&Outcome::Nodes(nodes), false)).unwrap();
        assert!(text.contains("leaving"), "{text}");
        assert!(text.contains("last heartbeat"), "{text}");
        assert!(
            text.contains("healthy: 0/1 nodes up, 1000 keys, 0 under-replicated, 1 job running"),
            "{text}"
        );
    }

    #[test]
    fn node_command_json() {
        assert_eq!(
            parse(&Outcome::NodeAdded { node: NodeId(6) }),
            json!({"node": 6})
        );
        for action in [
            NodeAction::Removed,
            NodeAction::Killed,
            NodeAction::Paused,
            NodeAction::Resumed,
        ] {
            let outcome = Outcome::NodeChanged {
                node: NodeId(2),
                action,
            };
            assert_eq!(parse(&outcome), json!({"node": 2, "ok": true}));
            let text = String::from_utf8(render(&outcome, false)).unwrap();
            assert_eq!(text, format!("OK: node 2 {}\n", action.as_str()));
        }
    }

    #[test]
    fn check_json_and_text() {
        let report = CheckReport {
            keys: 10,
            healthy: 7,
            under_replicated: 1,
            lost: 1,
            stale: 1,
            reads_wait: false,
        };
        assert_eq!(
            parse(&Outcome::Checked(report)),
            json!({"keys": 10, "healthy": 7, "under_replicated": 1, "lost": 1, "stale": 1,
                   "reads_wait": false})
        );
        assert_eq!(
            render(&Outcome::Checked(report), false),
            b"UNHEALTHY: 7/10 keys healthy, 1 under-replicated, 1 lost, 1 stale\n"
        );
    }

    /// While reads wait after an unclean stop, `locate` and `check` say that the metadata
    /// they show may lack newer versions, and a key the metadata lacks is not called never
    /// written.
    #[test]
    fn locate_and_check_say_when_reads_wait() {
        let missing = Outcome::Located {
            key: "k".into(),
            location: Location {
                version: Version::ZERO,
                tombstone: false,
                replicas: Vec::new(),
                reads_wait: true,
            },
        };
        assert_eq!(parse(&missing)["reads_wait"], true);
        let text = String::from_utf8(render(&missing, false)).unwrap();
        assert!(
            text.starts_with("key \"k\" is not in the metadata\n"),
            "{text}"
        );
        assert!(text.contains("reads wait"), "{text}");
        assert!(!text.contains("never written"), "{text}");
        let report = CheckReport {
            keys: 1,
            healthy: 1,
            reads_wait: true,
            ..CheckReport::default()
        };
        assert_eq!(parse(&Outcome::Checked(report))["reads_wait"], true);
        let text = String::from_utf8(render(&Outcome::Checked(report), false)).unwrap();
        assert!(text.starts_with("healthy: 1/1 keys healthy"), "{text}");
        assert!(text.contains("reads wait"), "{text}");
    }

    #[test]
    fn error_reports() {
        let report = ErrorReport::from(&CallError::Remote(WireError::Unavailable(
            "1 of 3 up".into(),
        )));
        assert_eq!(report.stderr_line(), "error: unavailable: 1 of 3 up\n");
        let doc: Value = serde_json::from_slice(&report.json()).unwrap();
        assert_eq!(
            doc,
            json!({"error": {"class": "unavailable", "message": "1 of 3 up", "may_have_applied": false}})
        );

        let report = ErrorReport::from(&CallError::Timeout {
            addr: "h:1".into(),
            after: Duration::from_secs(2),
        });
        assert_eq!(report.class, "timeout");
        assert!(report.message.contains("may have been applied"));
        let doc: Value = serde_json::from_slice(&report.json()).unwrap();
        assert_eq!(doc["error"]["may_have_applied"], true, "{doc}");

        let report = ErrorReport::from(&CallError::Remote(WireError::Indeterminate("x".into())));
        assert_eq!(report.stderr_line(), "error: indeterminate: x\n");
        assert!(report.may_have_applied);
        let lost = ErrorReport::from(&CallError::ConnectionLost("h:1".into()));
        assert!(lost.may_have_applied);
        let refused = ErrorReport::from(&CallError::Connect {
            addr: "h:1".into(),
            reason: "refused".into(),
        });
        assert!(!refused.may_have_applied, "nothing was sent");
        assert_eq!(ErrorReport::usage("bad").class, "usage");
        assert!(!ErrorReport::usage("bad").may_have_applied);
    }

    #[test]
    fn sizes_and_ages() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(10 * 1024 * 1024), "10.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_age(300), "0.3s");
        assert_eq!(human_age(59_949), "59.9s");
        assert_eq!(human_age(3_600_000 * 2 + 180_000), "2h03m");
        assert_eq!(human_secs(3.4), "3s");
    }
}

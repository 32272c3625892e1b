//! The report of a chaos run: what was done, what was injected, and each check's verdict.
//!
//! [`ChaosReport`] is one serde document (`--json`); [`ChaosReport::render_text`] is the
//! human summary. `valid` is true only when every check passed, and decides the exit code.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ringkv_common::protocol::CheckReport;
use serde::Serialize;

use super::checker::lost::LostReport;
use super::checker::LinearizabilityReport;
use super::history::{Op, OpKind, Status};
use super::nemesis::{FaultKind, FaultRecord};

/// Everything a chaos run found.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// Every check passed.
    pub valid: bool,
    pub seed: u64,
    /// A command that runs the same schedule again.
    pub reproduce: String,
    pub cluster: ClusterInfo,
    /// How long the clients ran, in seconds.
    pub duration_s: f64,
    pub clients: u32,
    pub keys: usize,
    /// Keys in use at once (0: all of them).
    pub hot_keys: usize,
    pub nemesis: Vec<FaultKind>,
    pub ops: OpCounts,
    pub faults: FaultSummary,
    pub checks: Checks,
    /// One line per failed check; empty when `valid`.
    pub violations: Vec<String>,
}

/// Which cluster the run worked on.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterInfo {
    /// `started` (by this run) or `attached`.
    pub mode: String,
    pub coordinator: String,
    /// Storage nodes at the start (started clusters).
    pub nodes: Option<usize>,
    /// Where data, logs, the history and this report are kept, if they are.
    pub data_dir: Option<String>,
}

/// Operations by kind and outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpCounts {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    pub per_second: f64,
    /// `put`, `get` and `del`, each by outcome.
    pub by_kind: BTreeMap<&'static str, OutcomeCounts>,
    /// Errors by operation, outcome and class, most frequent first, each with one message.
    pub errors: Vec<ErrorCount>,
}

/// How often one kind of error happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    pub op: &'static str,
    pub status: Status,
    /// The error class (`unavailable`, `timeout`, `connection_lost`, ...).
    pub class: String,
    pub count: usize,
    /// One of the messages.
    pub example: String,
}

/// Operations of one kind by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
}

impl OpCounts {
    /// Count the workload's `ops` over `seconds`.
    pub fn from_ops(ops: &[Op], seconds: f64) -> OpCounts {
        let mut counts = OpCounts {
            total: ops.len(),
            per_second: if seconds > 0.0 {
                ops.len() as f64 / seconds
            } else {
                0.0
            },
            ..OpCounts::default()
        };
        for kind in [OpKind::Put, OpKind::Get, OpKind::Delete] {
            counts
                .by_kind
                .insert(kind.as_str(), OutcomeCounts::default());
        }
        let mut errors: BTreeMap<(&'static str, Status, String), (usize, String)> = BTreeMap::new();
        for op in ops {
            if let Some(e) = &op.error {
                let class = e.split(':').next().unwrap_or_default().to_string();
                let slot = errors
                    .entry((op.kind.as_str(), op.status, class))
                    .or_insert_with(|| (0, e.clone()));
                slot.0 += 1;
            }
            let slot = counts.by_kind.entry(op.kind.as_str()).or_default();
            match op.status {
                Status::Ok => {
                    counts.ok += 1;
                    slot.ok += 1;
                }
                Status::Failed => {
                    counts.failed += 1;
                    slot.failed += 1;
                }
                Status::Unknown => {
                    counts.unknown += 1;
                    slot.unknown += 1;
                }
            }
        }
        counts.errors = errors
            .into_iter()
            .map(|((op, status, class), (count, example))| ErrorCount {
                op,
                status,
                class,
                count,
                example,
            })
            .collect();
        counts.errors.sort_by_key(|e| std::cmp::Reverse(e.count));
        counts
    }
}

/// The faults injected.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultSummary {
    pub total: usize,
    /// Faults that could not be injected or healed as planned.
    pub not_ok: usize,
    pub by_kind: BTreeMap<&'static str, usize>,
    pub events: Vec<FaultRecord>,
}

impl FaultSummary {
    /// Summarise `events`.
    pub fn from_events(events: Vec<FaultRecord>) -> FaultSummary {
        let mut by_kind = BTreeMap::new();
        for e in &events {
            *by_kind.entry(e.kind.as_str()).or_insert(0) += 1;
        }
        FaultSummary {
            total: events.len(),
            not_ok: events.iter().filter(|e| !e.ok).count(),
            by_kind,
            events,
        }
    }
}

/// Each check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Checks {
    pub lost_writes: LostReport,
    pub linearizability: LinearizabilityReport,
    pub replica_audit: AuditReport,
}

/// The replica audit: `check` after healing.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub valid: bool,
    /// Seconds from the end of the run until `check` first reported every key healthy.
    pub healthy_after_s: Option<f64>,
    /// The last `check` report.
    pub check: Option<CheckReport>,
    /// What went wrong while healing or auditing.
    pub problems: Vec<String>,
}

fn verdict(valid: bool) -> &'static str {
    if valid {
        "PASS"
    } else {
        "FAIL"
    }
}

impl ChaosReport {
    /// Fill in `violations` and `valid` from the checks.
    pub fn finish(&mut self) {
        let mut v = Vec::new();
        let lost = &self.checks.lost_writes;
        if !lost.valid {
            v.push(format!(
                "lost writes: {} lost, {} unexpected, {} unreadable",
                lost.lost, lost.unexpected, lost.unreadable
            ));
        }
        let lin = &self.checks.linearizability;
        if !lin.valid {
            let mut kinds: Vec<&str> = lin.examples.iter().map(|e| e.kind.as_str()).collect();
            kinds.dedup();
            v.push(format!(
                "linearizability: {} key(s) not linearizable ({})",
                lin.violations,
                kinds.join(", ")
            ));
        }
        let audit = &self.checks.replica_audit;
        if !audit.valid {
            let detail = match &audit.check {
                Some(c) => format!(
                    "{}/{} keys healthy, {} under-replicated, {} lost, {} stale",
                    c.healthy, c.keys, c.under_replicated, c.lost, c.stale
                ),
                None => "no check report".into(),
            };
            v.push(format!("replica audit: {detail}"));
        }
        self.valid = v.is_empty();
        self.violations = v;
    }

    /// The human-readable summary.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos {}: seed {}, {:.0}s, {} clients, {} keys ({} at a time), nemesis {}",
            verdict(self.valid),
            self.seed,
            self.duration_s,
            self.clients,
            self.keys,
            self.hot_keys,
            if self.nemesis.is_empty() {
                "none".to_string()
            } else {
                self.nemesis
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        );
        let _ = writeln!(
            s,
            "cluster: {} at {}{}",
            self.cluster.mode,
            self.cluster.coordinator,
            match &self.cluster.data_dir {
                Some(d) => format!(", data in {d}"),
                None => String::new(),
            }
        );
        let o = &self.ops;
        let _ = writeln!(
            s,
            "ops: {} ({:.0}/s): {} ok, {} failed, {} unknown",
            o.total, o.per_second, o.ok, o.failed, o.unknown
        );
        for (kind, c) in &o.by_kind {
            let _ = writeln!(
                s,
                "  {kind:<4} {} ok, {} failed, {} unknown",
                c.ok, c.failed, c.unknown
            );
        }
        for e in o.errors.iter().take(5) {
            let _ = writeln!(
                s,
                "  {} {} {} x{}, e.g. {}",
                e.op,
                e.status.as_str(),
                e.class,
                e.count,
                e.example
            );
        }
        let f = &self.faults;
        let by_kind: Vec<String> = f.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(
            s,
            "faults: {} ({}){}",
            f.total,
            if by_kind.is_empty() {
                "none".to_string()
            } else {
                by_kind.join(", ")
            },
            if f.not_ok > 0 {
                format!(", {} not as planned", f.not_ok)
            } else {
                String::new()
            }
        );
        for e in f.events.iter().filter(|e| !e.ok) {
            let _ = writeln!(s, "  [{:.1}s] {}: {}", e.at_s, e.kind.as_str(), e.detail);
        }

        let l = &self.checks.lost_writes;
        let _ = writeln!(
            s,
            "lost writes: {}: {} keys, {} acknowledged writes; {} ok, {} recovered, {} lost, {} unexpected, {} unreadable",
            verdict(l.valid),
            l.keys,
            l.acknowledged_writes,
            l.ok,
            l.recovered,
            l.lost,
            l.unexpected,
            l.unreadable
        );
        for p in l.lost_examples.iter().chain(&l.unexpected_examples) {
            let _ = writeln!(s, "  key {}: found {}", p.key, p.found);
            for e in &p.expected {
                let _ = writeln!(s, "    expected one of: {e}");
            }
        }
        if !l.unreadable_keys.is_empty() {
            let _ = writeln!(s, "  unreadable: {}", l.unreadable_keys.join(", "));
        }

        let lin = &self.checks.linearizability;
        let _ = writeln!(
            s,
            "linearizability: {}: {} keys, {} ops; {} violations, {} inconclusive",
            verdict(lin.valid),
            lin.keys_checked,
            lin.ops_checked,
            lin.violations,
            lin.inconclusive
        );
        for v in &lin.examples {
            let _ = writeln!(s, "  key {}: {}: {}", v.key, v.kind.as_str(), v.explanation);
            let _ = writeln!(s, "    at: {}", v.op);
            for c in &v.context {
                let _ = writeln!(s, "      {c}");
            }
        }
        if !lin.inconclusive_keys.is_empty() {
            let _ = writeln!(s, "  inconclusive: {}", lin.inconclusive_keys.join(", "));
        }

        let a = &self.checks.replica_audit;
        let _ = write!(s, "replica audit: {}", verdict(a.valid));
        if let Some(c) = &a.check {
            let _ = write!(
                s,
                ": {}/{} keys healthy, {} under-replicated, {} lost, {} stale",
                c.healthy, c.keys, c.under_replicated, c.lost, c.stale
            );
        }
        if let Some(t) = a.healthy_after_s {
            let _ = write!(s, " (healthy {t:.1}s after the run)");
        }
        let _ = writeln!(s);
        for p in &a.problems {
            let _ = writeln!(s, "  {p}");
        }
        if !self.valid {
            let _ = writeln!(s, "reproduce: {}", self.reproduce);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::checker;
    use crate::chaos::history::History;

    fn op(key: u32, kind: OpKind, value: Option<&str>, start: u64, status: Status) -> Op {
        Op {
            client: 0,
            key,
            kind,
            value: value.map(str::to_string),
            start,
            end: start + 1,
            status,
            error: (status != Status::Ok).then(|| "unavailable: 1 node up".to_string()),
        }
    }

    fn report(history: &History, healthy: bool) -> ChaosReport {
        let check = CheckReport {
            keys: 1,
            healthy: u64::from(healthy),
            stale: u64::from(!healthy),
            ..CheckReport::default()
        };
        let mut r = ChaosReport {
            valid: false,
            seed: 7,
            reproduce: "ringkv chaos --seed 7".into(),
            cluster: ClusterInfo {
                mode: "started".into(),
                coordinator: "127.0.0.1:1".into(),
                nodes: Some(5),
                data_dir: None,
            },
            duration_s: 10.0,
            clients: 1,
            keys: history.keys.len(),
            hot_keys: 0,
            nemesis: vec![FaultKind::Kill],
            ops: OpCounts::from_ops(&history.ops, 10.0),
            faults: FaultSummary::from_events(vec![FaultRecord {
                kind: FaultKind::Kill,
                node: Some(2),
                at_s: 1.0,
                healed_at_s: Some(2.0),
                ok: true,
                detail: "node 2 killed, restarted".into(),
            }]),
            checks: Checks {
                lost_writes: checker::lost::check(history),
                linearizability: checker::check_linearizability(history),
                replica_audit: AuditReport {
                    valid: healthy,
                    healthy_after_s: healthy.then_some(0.5),
                    check: Some(check),
                    problems: Vec::new(),
                },
            },
            violations: Vec::new(),
        };
        r.finish();
        r
    }

    #[test]
    fn a_clean_run_is_valid() {
        let history = History {
            keys: vec!["k".into()],
            ops: vec![
                op(0, OpKind::Put, Some("a"), 0, Status::Ok),
                op(0, OpKind::Put, Some("b"), 5, Status::Failed),
                op(0, OpKind::Get, Some("a"), 10, Status::Ok),
            ],
            final_reads: vec![op(0, OpKind::Get, Some("a"), 100, Status::Ok)],
        };
        let r = report(&history, true);
        assert!(r.valid, "{:?}", r.violations);
        assert!(r.violations.is_empty());
        assert_eq!(r.ops.total, 3);
        assert_eq!(r.ops.by_kind["put"].failed, 1);
        assert_eq!(r.ops.errors.len(), 1);
        assert_eq!(r.ops.errors[0].class, "unavailable");
        assert_eq!(r.ops.errors[0].count, 1);
        assert_eq!(r.faults.by_kind["kill"], 1);
        let text = r.render_text();
        assert!(text.starts_with("chaos PASS: seed 7"), "{text}");
        assert!(!text.contains("reproduce:"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["valid"], true);
        assert_eq!(json["nemesis"][0], "kill");
        assert_eq!(json["faults"]["events"][0]["kind"], "kill");
        assert_eq!(json["checks"]["replica_audit"]["check"]["healthy"], 1);
    }

    #[test]
    fn every_failed_check_is_a_violation() {
        let history = History {
            keys: vec!["k".into()],
            ops: vec![
                op(0, OpKind::Put, Some("a"), 0, Status::Ok),
                op(0, OpKind::Put, Some("b"), 5, Status::Ok),
                op(0, OpKind::Get, Some("a"), 10, Status::Ok),
            ],
            final_reads: vec![op(0, OpKind::Get, Some("a"), 100, Status::Ok)],
        };
        let r = report(&history, false);
        assert!(!r.valid);
        assert_eq!(r.violations.len(), 3, "{:?}", r.violations);
        assert!(r.violations[0].starts_with("lost writes: 1 lost"));
        assert!(r.violations[1].contains("stale read"), "{:?}", r.violations);
        assert!(r.violations[2].starts_with("replica audit"));
        let text = r.render_text();
        assert!(text.starts_with("chaos FAIL"), "{text}");
        assert!(text.contains("reproduce: ringkv chaos --seed 7"), "{text}");
        assert!(text.contains("key k: stale read"), "{text}");
    }
}

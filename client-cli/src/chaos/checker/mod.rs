//! The checkers that judge a chaos history, and their combined linearizability report.
//!
//! - [`lost`]: did each key end on a write it may legitimately end on (Jepsen's set checker,
//!   adapted to registers)?
//! - [`linearizable`]: is each key's history of puts, gets and deletes linearizable?
//!
//! Both are pure functions of a [`History`]; the replica audit (`check`) asks the cluster and
//! lives with the run.

pub mod linearizable;
pub mod lost;

use serde::Serialize;

use crate::chaos::history::History;
use linearizable::{KeyVerdict, Violation};

/// Violations shown in full in a report; the rest are counted.
const VIOLATION_EXAMPLES: usize = 5;

/// Inconclusive keys named in a report.
const INCONCLUSIVE_EXAMPLES: usize = 10;

/// The verdict of the linearizability check over every key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinearizabilityReport {
    /// No key has a violation (inconclusive keys do not count against it).
    pub valid: bool,
    /// Keys with at least one operation.
    pub keys_checked: usize,
    /// Operations looked at (workload and final reads).
    pub ops_checked: usize,
    pub violations: usize,
    /// Keys whose search ran out of budget without a verdict.
    pub inconclusive: usize,
    /// Up to five violations, each with the key's operations around it.
    pub examples: Vec<Violation>,
    pub inconclusive_keys: Vec<String>,
}

/// Check every key of `history` for linearizability.
pub fn check_linearizability(history: &History) -> LinearizabilityReport {
    let mut report = LinearizabilityReport {
        valid: true,
        keys_checked: 0,
        ops_checked: 0,
        violations: 0,
        inconclusive: 0,
        examples: Vec::new(),
        inconclusive_keys: Vec::new(),
    };
    for (key, ops) in history.by_key().into_iter().enumerate() {
        if ops.is_empty() {
            continue;
        }
        report.keys_checked += 1;
        report.ops_checked += ops.len();
        let name = history.keys.get(key).map(String::as_str).unwrap_or("?");
        match linearizable::check_key(name, &ops) {
            KeyVerdict::Linearizable => {}
            KeyVerdict::Violation(v) => {
                report.violations += 1;
                if report.examples.len() < VIOLATION_EXAMPLES {
                    report.examples.push(v);
                }
            }
            KeyVerdict::Inconclusive => {
                report.inconclusive += 1;
                if report.inconclusive_keys.len() < INCONCLUSIVE_EXAMPLES {
                    report.inconclusive_keys.push(name.to_string());
                }
            }
        }
    }
    report.valid = report.violations == 0;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::{Op, OpKind, Status};

    fn op(key: u32, kind: OpKind, value: Option<&str>, start: u64, end: u64) -> Op {
        Op {
            client: 0,
            key,
            kind,
            value: value.map(str::to_string),
            start,
            end,
            status: Status::Ok,
            error: None,
        }
    }

    #[test]
    fn keys_are_checked_independently() {
        let history = History {
            keys: vec!["a".into(), "b".into(), "c".into()],
            ops: vec![
                op(0, OpKind::Put, Some("x"), 0, 1),
                op(1, OpKind::Put, Some("y"), 0, 1),
                op(1, OpKind::Put, Some("z"), 2, 3),
                op(1, OpKind::Get, Some("y"), 4, 5),
            ],
            final_reads: vec![
                op(0, OpKind::Get, Some("x"), 10, 11),
                op(1, OpKind::Get, Some("z"), 10, 11),
                op(2, OpKind::Get, None, 10, 11),
            ],
        };
        let report = check_linearizability(&history);
        assert!(!report.valid);
        assert_eq!(report.keys_checked, 3);
        assert_eq!(report.ops_checked, 7);
        assert_eq!(report.violations, 1);
        assert_eq!(report.examples[0].key, "b");
        assert_eq!(
            report.examples[0].kind,
            linearizable::AnomalyKind::StaleRead
        );
    }
}

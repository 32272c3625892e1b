//! Lost writes: does each key's final value show its last acknowledged write?
//!
//! After the cluster heals, every key is read once more. For a register the writes that may
//! legitimately be the final one are the *candidates*: acknowledged or unknown writes that no
//! acknowledged write provably followed (began after they ended). The final read must show a
//! candidate, which gives Jepsen's set-checker categories, per key:
//!
//! - **ok**: the final value is an acknowledged candidate write (or `nil` with nothing
//!   acknowledged);
//! - **recovered**: the final value comes from a write whose outcome was unknown;
//! - **lost**: an acknowledged write should be visible but the key shows something older
//!   (or nothing);
//! - **unexpected**: the key shows a value nobody wrote, or one whose write definitely failed;
//! - **unreadable**: the final read never succeeded.

use std::collections::HashMap;

use serde::Serialize;

use crate::chaos::history::{History, Op, OpKind, Status};

/// Keys listed as examples per category.
const EXAMPLES: usize = 10;

/// Counts and examples of the lost-writes check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LostReport {
    pub valid: bool,
    /// Keys in the key space.
    pub keys: usize,
    /// Acknowledged puts and deletes.
    pub acknowledged_writes: usize,
    /// Writes whose outcome was unknown.
    pub unknown_writes: usize,
    pub ok: usize,
    pub recovered: usize,
    pub lost: usize,
    pub unexpected: usize,
    pub unreadable: usize,
    /// Up to ten lost keys, each with what should have been visible and what was.
    pub lost_examples: Vec<KeyProblem>,
    /// Up to ten keys with unexpected values.
    pub unexpected_examples: Vec<KeyProblem>,
    /// Up to ten keys that could not be read.
    pub unreadable_keys: Vec<String>,
}

/// One key whose final value is wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyProblem {
    pub key: String,
    /// The final read, as `"value"` or `nil`.
    pub found: String,
    /// The acknowledged writes any one of which should have been visible.
    pub expected: Vec<String>,
}

/// What one key's final value says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ok,
    Recovered,
    Lost,
    Unexpected,
}

/// Run the check over `history` (its workload ops and final reads).
pub fn check(history: &History) -> LostReport {
    let mut report = LostReport {
        valid: true,
        keys: history.keys.len(),
        acknowledged_writes: 0,
        unknown_writes: 0,
        ok: 0,
        recovered: 0,
        lost: 0,
        unexpected: 0,
        unreadable: 0,
        lost_examples: Vec::new(),
        unexpected_examples: Vec::new(),
        unreadable_keys: Vec::new(),
    };
    let mut writes: Vec<Vec<&Op>> = vec![Vec::new(); history.keys.len()];
    for op in &history.ops {
        if op.kind.is_write() {
            match op.status {
                Status::Ok => report.acknowledged_writes += 1,
                Status::Unknown => report.unknown_writes += 1,
                Status::Failed => {}
            }
            if let Some(w) = writes.get_mut(op.key as usize) {
                w.push(op);
            }
        }
    }
    let finals: HashMap<u32, &Op> = history
        .final_reads
        .iter()
        .filter(|op| op.kind == OpKind::Get && op.status == Status::Ok)
        .map(|op| (op.key, op))
        .collect();

    for (key, name) in history.keys.iter().enumerate() {
        let key_writes = writes.get(key).map(Vec::as_slice).unwrap_or_default();
        let Some(read) = finals.get(&(key as u32)) else {
            report.unreadable += 1;
            if report.unreadable_keys.len() < EXAMPLES {
                report.unreadable_keys.push(name.clone());
            }
            continue;
        };
        let (fate, expected) = judge(key_writes, read.value.as_deref());
        let problem = || KeyProblem {
            key: name.clone(),
            found: match &read.value {
                Some(v) => format!("{v:?}"),
                None => "nil".into(),
            },
            expected: expected.iter().map(|op| op.describe()).collect(),
        };
        match fate {
            Fate::Ok => report.ok += 1,
            Fate::Recovered => report.recovered += 1,
            Fate::Lost => {
                report.lost += 1;
                if report.lost_examples.len() < EXAMPLES {
                    report.lost_examples.push(problem());
                }
            }
            Fate::Unexpected => {
                report.unexpected += 1;
                if report.unexpected_examples.len() < EXAMPLES {
                    report.unexpected_examples.push(problem());
                }
            }
        }
    }
    report.valid = report.lost == 0 && report.unexpected == 0 && report.unreadable == 0;
    report
}

/// The fate of one key whose writes are `writes` and whose final value is `found`, and the
/// acknowledged candidate writes (what should have been visible).
fn judge<'a>(writes: &[&'a Op], found: Option<&str>) -> (Fate, Vec<&'a Op>) {
    let end = |op: &Op| {
        if op.status == Status::Unknown {
            u64::MAX
        } else {
            op.end
        }
    };
    // A write is a candidate unless an acknowledged write began after it ended.
    let latest_ok_start = writes
        .iter()
        .filter(|w| w.status == Status::Ok)
        .map(|w| w.start)
        .max();
    let is_candidate =
        |w: &Op| w.status != Status::Failed && latest_ok_start.is_none_or(|s| s <= end(w));
    let acked_candidates: Vec<&Op> = writes
        .iter()
        .copied()
        .filter(|w| w.status == Status::Ok && is_candidate(w))
        .collect();

    let fate = match found {
        Some(v) => match writes
            .iter()
            .find(|w| w.kind == OpKind::Put && w.value.as_deref() == Some(v))
        {
            None => Fate::Unexpected,
            Some(w) if w.status == Status::Failed => Fate::Unexpected,
            Some(w) if !is_candidate(w) => Fate::Lost,
            Some(w) if w.status == Status::Unknown => Fate::Recovered,
            Some(_) => Fate::Ok,
        },
        None => {
            let deletes: Vec<&&Op> = writes
                .iter()
                .filter(|w| w.kind == OpKind::Delete && is_candidate(w))
                .collect();
            if deletes.iter().any(|d| d.status == Status::Ok) {
                Fate::Ok
            } else if !deletes.is_empty() {
                Fate::Recovered
            } else if acked_candidates.is_empty() {
                // Nothing acknowledged: the key may never have been written.
                Fate::Ok
            } else {
                Fate::Lost
            }
        }
    };
    (fate, acked_candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: u32, kind: OpKind, value: Option<&str>, start: u64, end: u64, status: Status) -> Op {
        Op {
            client: 0,
            key,
            kind,
            value: value.map(str::to_string),
            start,
            end,
            status,
            error: None,
        }
    }

    fn history(ops: Vec<Op>, finals: Vec<(u32, Option<&str>)>, keys: usize) -> History {
        History {
            keys: (0..keys).map(|k| format!("k{k}")).collect(),
            ops,
            final_reads: finals
                .into_iter()
                .map(|(k, v)| op(k, OpKind::Get, v, 1000, 1001, Status::Ok))
                .collect(),
        }
    }

    #[test]
    fn lost_write_is_flagged() {
        let h = history(
            vec![
                op(0, OpKind::Put, Some("a"), 0, 1, Status::Ok),
                op(0, OpKind::Put, Some("b"), 2, 3, Status::Ok),
                op(1, OpKind::Put, Some("c"), 0, 1, Status::Ok),
            ],
            vec![(0, Some("a")), (1, None)],
            2,
        );
        let r = check(&h);
        assert!(!r.valid);
        assert_eq!(r.lost, 2);
        assert_eq!(r.ok, 0);
        assert_eq!(r.lost_examples[0].key, "k0");
        assert_eq!(r.lost_examples[0].found, "\"a\"");
        assert_eq!(r.lost_examples[0].expected.len(), 1);
        assert!(r.lost_examples[0].expected[0].contains("\"b\""));
    }

    #[test]
    fn acknowledged_and_recovered_values_pass() {
        let h = history(
            vec![
                // k0: two concurrent acknowledged puts; either may win.
                op(0, OpKind::Put, Some("a"), 0, 10, Status::Ok),
                op(0, OpKind::Put, Some("b"), 5, 15, Status::Ok),
                // k1: an unknown put after an acknowledged one shows up.
                op(1, OpKind::Put, Some("c"), 0, 1, Status::Ok),
                op(1, OpKind::Put, Some("d"), 2, 3, Status::Unknown),
                // k2: an unknown put that did not apply.
                op(2, OpKind::Put, Some("e"), 0, 1, Status::Ok),
                op(2, OpKind::Put, Some("f"), 2, 3, Status::Unknown),
                // k3: deleted.
                op(3, OpKind::Put, Some("g"), 0, 1, Status::Ok),
                op(3, OpKind::Delete, None, 2, 3, Status::Ok),
                // k4: a failed put and nothing else.
                op(4, OpKind::Put, Some("h"), 0, 1, Status::Failed),
            ],
            vec![
                (0, Some("a")),
                (1, Some("d")),
                (2, Some("e")),
                (3, None),
                (4, None),
                (5, None),
            ],
            6,
        );
        let r = check(&h);
        assert!(r.valid, "{r:?}");
        assert_eq!((r.ok, r.recovered, r.lost), (5, 1, 0));
        assert_eq!(r.acknowledged_writes, 6);
        assert_eq!(r.unknown_writes, 2);
    }

    #[test]
    fn unexpected_and_unreadable_are_flagged() {
        let h = history(
            vec![
                op(0, OpKind::Put, Some("a"), 0, 1, Status::Failed),
                op(1, OpKind::Put, Some("b"), 0, 1, Status::Ok),
            ],
            vec![(0, Some("a")), (1, Some("zz"))],
            3,
        );
        let r = check(&h);
        assert!(!r.valid);
        assert_eq!(r.unexpected, 2);
        assert_eq!(r.unreadable, 1);
        assert_eq!(r.unreadable_keys, ["k2"]);
    }

    #[test]
    fn resurrected_delete_is_lost() {
        let h = history(
            vec![
                op(0, OpKind::Put, Some("a"), 0, 1, Status::Ok),
                op(0, OpKind::Delete, None, 2, 3, Status::Ok),
            ],
            vec![(0, Some("a"))],
            1,
        );
        let r = check(&h);
        assert_eq!(r.lost, 1);
    }
}

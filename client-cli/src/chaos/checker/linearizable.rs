//! Per-key linearizability of register histories: a Wing–Gong search with memoisation.
//!
//! Each key is an independent register (`nil` or a value), so its history is checked alone
//! (linearizability is compositional). The search is the one Lowe and Porcupine use: walk
//! the time-ordered list of call and return events; at a call, try to linearize that
//! operation now (apply it to the register and lift it out of the list); on reaching a return
//! of an operation not yet linearized, undo the most recent choice. A cache of
//! (set of linearized operations, register value) pairs prunes every configuration already
//! explored. A read that may go next and is legal is linearized at once and never revisited
//! as a choice (reads do not change the register, so an earlier place is never worse), and a
//! branch dies as soon as a pending read needs a value whose (unique) write is already
//! linearized and overwritten, so the search branches only over the order of concurrent
//! writes and abandons a wrong order early.
//!
//! Modelling choices:
//! - `Failed` operations never happened and are dropped; so are reads that did not return.
//! - An `Unknown` write may take effect at any moment after it started, or never: its return
//!   is placed at infinity. Writes are always legal, so "never" is the same as "last".
//! - An `Unknown` write nobody could have observed (a put whose unique value no read
//!   returned; a delete with no `nil` read after it started) is dropped, which is sound:
//!   any linearization with it stays one without it, and vice versa.
//! - Events with equal timestamps are treated as concurrent (calls sort before returns).
//!
//! A history that exceeds [`MAX_STATES`] explored configurations is reported inconclusive
//! rather than searched forever.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::chaos::history::{secs, Op, OpKind, Status};

/// Configurations explored per key before giving up: far above what a valid chaos history
/// needs (usually about one per operation), small enough to bound time and memory (a few
/// seconds and some tens of MB per key at worst).
pub const MAX_STATES: usize = 500_000;

/// Register value of a read whose value no retained put wrote.
const PHANTOM: u32 = u32::MAX;

/// What kind of anomaly a violation looks like, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// A read returned a value no write produced, or one whose write definitely failed.
    PhantomRead,
    /// A read returned a value before the write of that value began.
    FutureRead,
    /// A read returned a value that an acknowledged write had already replaced before the
    /// read began.
    StaleRead,
    /// No order of the operations explains what the reads returned.
    NotLinearizable,
}

impl AnomalyKind {
    /// The short name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::PhantomRead => "phantom read",
            AnomalyKind::FutureRead => "read from the future",
            AnomalyKind::StaleRead => "stale read",
            AnomalyKind::NotLinearizable => "not linearizable",
        }
    }
}

/// One key whose history has no linearization.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub key: String,
    pub kind: AnomalyKind,
    /// What went wrong, in a sentence.
    pub explanation: String,
    /// The operation the search could not place (or the offending read).
    pub op: String,
    /// The key's operations around it, in start order.
    pub context: Vec<String>,
}

/// The verdict for one key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyVerdict {
    Linearizable,
    Violation(Violation),
    /// The search hit [`MAX_STATES`] without deciding.
    Inconclusive,
}

/// How an operation acts on the register, after modelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Set the register (0 = deleted / never written).
    Write(u32),
    /// Observe the register.
    Read(u32),
}

/// One retained operation: its interval and action; `ret` is `u64::MAX` for unknown writes.
#[derive(Debug, Clone, Copy)]
struct RegOp {
    call: u64,
    ret: u64,
    action: Action,
}

/// Where the search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    Linearizable,
    /// No linearization; the index is the operation the deepest attempt could not place.
    Stuck(usize),
    Inconclusive,
}

/// Check one key's operations (`ops` in any order) with the default state budget.
pub fn check_key(key: &str, ops: &[&Op]) -> KeyVerdict {
    check_key_with_budget(key, ops, MAX_STATES)
}

/// Check one key's operations, exploring at most `budget` configurations.
pub fn check_key_with_budget(key: &str, ops: &[&Op], budget: usize) -> KeyVerdict {
    let (kept, reg) = model(ops);
    match search(&reg, budget) {
        Search::Linearizable => KeyVerdict::Linearizable,
        Search::Inconclusive => KeyVerdict::Inconclusive,
        Search::Stuck(i) => {
            let stuck = kept.get(i).copied();
            KeyVerdict::Violation(explain(key, &kept, &reg, stuck))
        }
    }
}

/// Apply the modelling rules: drop what cannot matter, give values small ids.
fn model<'a>(ops: &[&'a Op]) -> (Vec<&'a Op>, Vec<RegOp>) {
    let read_values: HashSet<&str> = ops
        .iter()
        .filter(|op| op.kind == OpKind::Get && op.status == Status::Ok)
        .filter_map(|op| op.value.as_deref())
        .collect();
    // The latest end of a read that returned nil: a delete started after it is invisible
    // (equal times count as concurrent, as in the search).
    let last_nil_read_end = ops
        .iter()
        .filter(|op| op.kind == OpKind::Get && op.status == Status::Ok && op.value.is_none())
        .map(|op| op.end)
        .max();

    let mut kept: Vec<&Op> = Vec::new();
    for op in ops {
        let keep = match (op.kind, op.status) {
            (_, Status::Failed) => false,
            (OpKind::Get, status) => status == Status::Ok,
            (_, Status::Ok) => true,
            (OpKind::Put, Status::Unknown) => {
                op.value.as_deref().is_some_and(|v| read_values.contains(v))
            }
            (OpKind::Delete, Status::Unknown) => last_nil_read_end.is_some_and(|e| e >= op.start),
        };
        if keep {
            kept.push(op);
        }
    }
    kept.sort_by_key(|op| (op.start, op.end));

    let mut ids: HashMap<&str, u32> = HashMap::new();
    for op in &kept {
        if op.kind == OpKind::Put {
            if let Some(v) = op.value.as_deref() {
                let next = ids.len() as u32 + 1;
                ids.entry(v).or_insert(next);
            }
        }
    }
    let reg = kept
        .iter()
        .map(|op| {
            let action = match op.kind {
                OpKind::Put => Action::Write(
                    op.value
                        .as_deref()
                        .and_then(|v| ids.get(v).copied())
                        .unwrap_or(PHANTOM),
                ),
                OpKind::Delete => Action::Write(0),
                OpKind::Get => Action::Read(match op.value.as_deref() {
                    None => 0,
                    Some(v) => ids.get(v).copied().unwrap_or(PHANTOM),
                }),
            };
            let ret = if op.status == Status::Unknown {
                u64::MAX
            } else {
                op.end.max(op.start)
            };
            RegOp {
                call: op.start,
                ret,
                action,
            }
        })
        .collect();
    (kept, reg)
}

/// A set of operation indices.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    fn clear(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }
    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// The Wing–Gong search over `ops`, with memoisation and a budget of `budget` configurations.
///
/// Every index below is built here from `0..n` or `0..2n + 2` and only used on the vectors of
/// those lengths, so the indexing cannot go out of bounds.
fn search(ops: &[RegOp], budget: usize) -> Search {
    let n = ops.len();
    if n == 0 {
        return Search::Linearizable;
    }
    // Events: (time, 0 = call / 1 = return, op). Entry e < 2n; head = 2n, tail = 2n + 1.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, 0, i));
        events.push((op.ret, 1, i));
    }
    events.sort_unstable();
    let head = 2 * n;
    let tail = 2 * n + 1;
    let mut op_of = vec![0usize; 2 * n];
    let mut is_call = vec![false; 2 * n];
    let mut ret_entry = vec![0usize; n];
    for (e, &(_, kind, i)) in events.iter().enumerate() {
        op_of[e] = i;
        is_call[e] = kind == 0;
        if kind == 1 {
            ret_entry[i] = e;
        }
    }
    let mut next: Vec<usize> = (1..=2 * n + 2).collect();
    let mut prev: Vec<usize> = (0..2 * n + 2).map(|e| e.wrapping_sub(1)).collect();
    // Wire the sentinels: head -> 0 -> 1 -> ... -> 2n-1 -> tail.
    next[head] = 0;
    prev[0] = head;
    next[2 * n - 1] = tail;
    prev[tail] = 2 * n - 1;

    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, q) = (prev[e], next[e]);
        next[p] = q;
        prev[q] = p;
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, q) = (prev[e], next[e]);
        next[p] = e;
        prev[q] = e;
    };

    // The writers of each value (one per value in a chaos history), to tell when a read
    // is doomed.
    let mut writers: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let Action::Write(v) = op.action {
            if v != 0 {
                writers.entry(v).or_default().push(i);
            }
        }
    }

    let mut linearized = BitSet::new(n);
    let mut cache: HashSet<(BitSet, u32)> = HashSet::new();
    // (call entry, register before it, whether the choice was forced).
    let mut calls: Vec<(usize, u32, bool)> = Vec::new();
    let mut state: u32 = 0;
    let mut entry = next[head];
    let mut deepest = (0usize, op_of[entry]);
    // A configuration not yet looked at for forced and doomed reads.
    let mut fresh = true;
    loop {
        if next[head] == tail {
            return Search::Linearizable;
        }
        // The operation that made this branch a dead end, if it is one.
        let mut dead: Option<usize> = None;
        if fresh {
            fresh = false;
            entry = next[head];
            // Among the operations that may go next (calls before the first return):
            // a read legal now is linearized now, as reads change nothing and an earlier
            // place is never worse; a read of a value whose write is already in the past
            // and overwritten can never be placed, so this branch is dead.
            let mut e = next[head];
            let mut forced = None;
            while e != tail && is_call[e] {
                let i = op_of[e];
                if let Action::Read(v) = ops[i].action {
                    if v == state {
                        forced = Some(e);
                        break;
                    }
                    let done = v != 0
                        && writers
                            .get(&v)
                            .is_none_or(|ws| ws.iter().all(|&w| linearized.contains(w)));
                    if done {
                        dead = Some(i);
                        break;
                    }
                }
                e = next[e];
            }
            if let Some(e) = forced {
                let i = op_of[e];
                linearized.set(i);
                if cache.insert((linearized.clone(), state)) {
                    if cache.len() > budget {
                        return Search::Inconclusive;
                    }
                    calls.push((e, state, true));
                    unlink(&mut next, &mut prev, e);
                    unlink(&mut next, &mut prev, ret_entry[i]);
                    fresh = true;
                    continue;
                }
                // Explored before, with this read linearized first: nothing new here.
                linearized.clear(i);
                dead = Some(i);
            }
        }
        if dead.is_none() {
            if entry == tail {
                // Unreachable: the list always ends with a return. Treat as a dead end.
                return Search::Stuck(deepest.1);
            }
            let i = op_of[entry];
            if is_call[entry] {
                // Reads legal here were taken above; try writes in time order.
                if let Action::Write(v) = ops[i].action {
                    linearized.set(i);
                    if cache.insert((linearized.clone(), v)) {
                        if cache.len() > budget {
                            return Search::Inconclusive;
                        }
                        calls.push((entry, state, false));
                        state = v;
                        unlink(&mut next, &mut prev, entry);
                        unlink(&mut next, &mut prev, ret_entry[i]);
                        fresh = true;
                        continue;
                    }
                    linearized.clear(i);
                }
                entry = next[entry];
                continue;
            }
            // The return of an operation not yet linearized.
            dead = Some(i);
        }
        // A dead end: undo choices up to the last one with alternatives left.
        if let Some(i) = dead {
            if calls.len() >= deepest.0 {
                deepest = (calls.len(), i);
            }
        }
        loop {
            let Some((call_entry, before, forced)) = calls.pop() else {
                return Search::Stuck(deepest.1);
            };
            let i = op_of[call_entry];
            linearized.clear(i);
            state = before;
            relink(&mut next, &mut prev, ret_entry[i]);
            relink(&mut next, &mut prev, call_entry);
            if !forced {
                entry = next[call_entry];
                break;
            }
        }
    }
}

/// Most operations listed around the culprit in a violation report.
const CONTEXT_OPS: usize = 16;

/// Describe a violation: classify it and pick the operations worth showing.
fn explain(key: &str, kept: &[&Op], reg: &[RegOp], stuck: Option<&Op>) -> Violation {
    let (kind, culprit, explanation) = classify(kept, reg).unwrap_or_else(|| {
        (
            AnomalyKind::NotLinearizable,
            stuck,
            "no order of these operations is consistent with what the reads returned".into(),
        )
    });
    let anchor = culprit.or(stuck);
    let context = match anchor {
        Some(anchor) => {
            // The operations nearest the culprit in start order.
            let pos = kept
                .iter()
                .position(|op| std::ptr::eq(*op, anchor))
                .unwrap_or(0);
            let from = pos.saturating_sub(CONTEXT_OPS * 3 / 4);
            kept.iter()
                .skip(from)
                .take(CONTEXT_OPS)
                .map(|op| op.describe())
                .collect()
        }
        None => Vec::new(),
    };
    Violation {
        key: key.to_string(),
        kind,
        explanation,
        op: anchor.map(|op| op.describe()).unwrap_or_default(),
        context,
    }
}

/// Look for a read that is wrong on its own: a phantom, a read from the future, or a stale
/// read. `None` when the violation needs the whole interleaving to see.
fn classify<'a>(kept: &[&'a Op], reg: &[RegOp]) -> Option<(AnomalyKind, Option<&'a Op>, String)> {
    let writes: Vec<(&Op, &RegOp)> = kept
        .iter()
        .zip(reg)
        .filter(|(op, _)| op.kind.is_write())
        .map(|(op, r)| (*op, r))
        .collect();
    // An acknowledged write that began after `after` and ended before `before`, other than `not`.
    let replaced_between = |not: Option<&Op>, after: u64, before: u64| {
        writes.iter().find(|(w, r)| {
            w.status == Status::Ok
                && !not.is_some_and(|n| std::ptr::eq(n, *w))
                && r.call > after
                && r.ret < before
        })
    };
    for (op, r) in kept.iter().zip(reg) {
        let Action::Read(v) = r.action else { continue };
        if v == PHANTOM {
            return Some((
                AnomalyKind::PhantomRead,
                Some(op),
                format!(
                    "read {:?}, a value no write produced or whose write definitely failed",
                    op.value.as_deref().unwrap_or_default()
                ),
            ));
        }
        if v != 0 {
            let Some((w, wr)) = writes.iter().find(|(_, wr)| wr.action == Action::Write(v)) else {
                continue;
            };
            if r.ret < wr.call {
                return Some((
                    AnomalyKind::FutureRead,
                    Some(op),
                    format!(
                        "the read ended at {} but the write of its value began at {}",
                        secs(r.ret),
                        secs(wr.call)
                    ),
                ));
            }
            if wr.ret != u64::MAX {
                if let Some((w2, _)) = replaced_between(Some(w), wr.ret, r.call) {
                    return Some((
                        AnomalyKind::StaleRead,
                        Some(op),
                        format!(
                            "the read returned the value of `{}`, which `{}` had already replaced before the read began",
                            w.describe(),
                            w2.describe()
                        ),
                    ));
                }
            }
        } else {
            // nil: explained by the initial state or by a delete that could precede the read.
            let Some((put, _)) = writes
                .iter()
                .find(|(w, wr)| w.status == Status::Ok && w.kind == OpKind::Put && wr.ret < r.call)
            else {
                continue;
            };
            let every_delete_replaced = writes
                .iter()
                .filter(|(w, wr)| w.kind == OpKind::Delete && wr.call < r.ret)
                .all(|(d, dr)| {
                    dr.ret != u64::MAX
                        && writes.iter().any(|(w2, w2r)| {
                            w2.status == Status::Ok
                                && w2.kind == OpKind::Put
                                && w2r.call > dr.ret
                                && w2r.ret < r.call
                                && !std::ptr::eq(*w2, *d)
                        })
                });
            if every_delete_replaced {
                return Some((
                    AnomalyKind::StaleRead,
                    Some(op),
                    format!(
                        "the read returned nil although `{}` was acknowledged before it began and no delete could come between",
                        put.describe()
                    ),
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        client: u32,
        kind: OpKind,
        value: Option<&str>,
        start: u64,
        end: u64,
        status: Status,
    ) -> Op {
        Op {
            client,
            key: 0,
            kind,
            value: value.map(str::to_string),
            start,
            end,
            status,
            error: None,
        }
    }
    fn put(c: u32, v: &str, s: u64, e: u64) -> Op {
        op(c, OpKind::Put, Some(v), s, e, Status::Ok)
    }
    fn put_unknown(c: u32, v: &str, s: u64, e: u64) -> Op {
        op(c, OpKind::Put, Some(v), s, e, Status::Unknown)
    }
    fn del(c: u32, s: u64, e: u64) -> Op {
        op(c, OpKind::Delete, None, s, e, Status::Ok)
    }
    fn get(c: u32, v: Option<&str>, s: u64, e: u64) -> Op {
        op(c, OpKind::Get, v, s, e, Status::Ok)
    }
    fn verdict(ops: &[Op]) -> KeyVerdict {
        let refs: Vec<&Op> = ops.iter().collect();
        check_key("k", &refs)
    }
    fn kind_of(ops: &[Op]) -> AnomalyKind {
        match verdict(ops) {
            KeyVerdict::Violation(v) => v.kind,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            get(0, None, 0, 1),
            put(0, "a", 2, 3),
            get(1, Some("a"), 4, 5),
            del(1, 6, 7),
            get(0, None, 8, 9),
            put(1, "b", 10, 11),
            get(0, Some("b"), 12, 13),
        ];
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
    }

    #[test]
    fn concurrent_reads_may_see_either_value() {
        let h = [
            put(0, "a", 0, 1),
            put(1, "b", 10, 30),
            get(2, Some("b"), 12, 14),
            get(3, Some("b"), 15, 16),
            get(2, Some("b"), 31, 32),
        ];
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
        let h = [
            put(0, "a", 0, 1),
            put(1, "b", 10, 30),
            get(2, Some("a"), 12, 14),
            get(3, Some("b"), 15, 16),
        ];
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
    }

    #[test]
    fn stale_read_is_flagged() {
        let h = [
            put(0, "a", 0, 1),
            put(0, "b", 2, 3),
            get(1, Some("a"), 4, 5),
        ];
        assert_eq!(kind_of(&h), AnomalyKind::StaleRead);
        // A read of nil after an acknowledged put, with no delete.
        let h = [put(0, "a", 0, 1), get(1, None, 4, 5)];
        assert_eq!(kind_of(&h), AnomalyKind::StaleRead);
        // A read of nil after a delete that was overwritten.
        let h = [del(0, 0, 1), put(0, "a", 2, 3), get(1, None, 4, 5)];
        assert_eq!(kind_of(&h), AnomalyKind::StaleRead);
    }

    #[test]
    fn new_then_old_interleaving_is_flagged() {
        // "b" is being written; one read sees it, a later read sees "a" again.
        let h = [
            put(0, "a", 0, 1),
            put(1, "b", 10, 100),
            get(2, Some("b"), 20, 30),
            get(3, Some("a"), 40, 50),
        ];
        assert_eq!(kind_of(&h), AnomalyKind::NotLinearizable);
    }

    #[test]
    fn phantom_and_future_reads_are_flagged() {
        let h = [put(0, "a", 0, 1), get(1, Some("zzz"), 2, 3)];
        assert_eq!(kind_of(&h), AnomalyKind::PhantomRead);
        // A read of a value whose write definitely failed.
        let h = [
            op(0, OpKind::Put, Some("a"), 0, 1, Status::Failed),
            get(1, Some("a"), 2, 3),
        ];
        assert_eq!(kind_of(&h), AnomalyKind::PhantomRead);
        let h = [get(1, Some("a"), 0, 1), put(0, "a", 5, 6)];
        assert_eq!(kind_of(&h), AnomalyKind::FutureRead);
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        // Never observed: as if it never happened.
        let h = [
            put(0, "a", 0, 1),
            put_unknown(1, "b", 2, 3),
            get(0, Some("a"), 10, 11),
        ];
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
        // Observed long after the client gave up on it.
        let h = [
            put(0, "a", 0, 1),
            put_unknown(1, "b", 2, 3),
            get(0, Some("a"), 10, 11),
            get(0, Some("b"), 20, 21),
            get(2, Some("b"), 30, 31),
        ];
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
        // An unknown delete explains a later nil.
        let h = [
            put(0, "a", 0, 1),
            op(1, OpKind::Delete, None, 2, 3, Status::Unknown),
            get(0, None, 10, 11),
        ];
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
        // But it cannot take effect before it started.
        let h = [
            put(0, "a", 0, 1),
            get(0, None, 2, 3),
            op(1, OpKind::Delete, None, 5, 6, Status::Unknown),
        ];
        assert!(matches!(verdict(&h), KeyVerdict::Violation(_)));
        // Once observed, an unknown write cannot be un-applied by a later stale read.
        let h = [
            put(0, "a", 0, 1),
            put_unknown(1, "b", 2, 3),
            get(0, Some("b"), 10, 11),
            get(0, Some("a"), 20, 21),
        ];
        assert!(matches!(verdict(&h), KeyVerdict::Violation(_)));
    }

    #[test]
    fn failed_operations_are_ignored() {
        let h = [
            put(0, "a", 0, 1),
            op(1, OpKind::Put, Some("b"), 2, 3, Status::Failed),
            op(1, OpKind::Delete, None, 4, 5, Status::Failed),
            op(1, OpKind::Get, None, 4, 5, Status::Unknown),
            get(0, Some("a"), 10, 11),
        ];
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
    }

    #[test]
    fn longer_concurrent_history_is_checked_quickly() {
        // Four clients, overlapping in a pattern, each reading what the last write wrote.
        let mut h = Vec::new();
        let mut t = 0;
        for round in 0..500u64 {
            let v = format!("v{round}");
            h.push(put((round % 4) as u32, &v, t, t + 5));
            h.push(get(((round + 1) % 4) as u32, Some(&v), t + 6, t + 9));
            h.push(get(((round + 2) % 4) as u32, Some(&v), t + 7, t + 12));
            if round % 7 == 0 {
                h.push(put_unknown(3, &format!("lost{round}"), t + 1, t + 2));
            }
            t += 10;
        }
        assert_eq!(verdict(&h), KeyVerdict::Linearizable);
        // One stale read at the end breaks it.
        h.push(get(1, Some("v3"), t + 100, t + 101));
        assert!(matches!(verdict(&h), KeyVerdict::Violation(_)));
    }

    #[test]
    fn budget_makes_the_search_inconclusive() {
        let mut h = vec![put(0, "a", 0, 1)];
        for i in 0..12u64 {
            h.push(put_unknown(1, &format!("u{i}"), 2 + i, 3 + i));
            h.push(get(2, Some(&format!("u{i}")), 1000 + i * 10, 1001 + i * 10));
        }
        h.push(get(2, Some("zz-never"), 5000, 5001));
        let refs: Vec<&Op> = h.iter().collect();
        assert_eq!(
            check_key_with_budget("k", &refs, 10),
            KeyVerdict::Inconclusive
        );
    }

    /// Linearizability by brute force: every subset of unknown writes, every order.
    fn brute_force(ops: &[Op]) -> bool {
        let kept: Vec<&Op> = ops
            .iter()
            .filter(|o| o.status != Status::Failed)
            .filter(|o| !(o.kind == OpKind::Get && o.status != Status::Ok))
            .collect();
        let unknown: Vec<usize> = (0..kept.len())
            .filter(|&i| kept[i].status == Status::Unknown)
            .collect();
        for mask in 0..(1u32 << unknown.len()) {
            let chosen: Vec<&Op> = kept
                .iter()
                .enumerate()
                .filter(|(i, _)| match unknown.iter().position(|u| u == i) {
                    Some(bit) => mask & (1 << bit) != 0,
                    None => true,
                })
                .map(|(_, o)| *o)
                .collect();
            let mut order: Vec<usize> = (0..chosen.len()).collect();
            if permute(&chosen, &mut order, 0) {
                return true;
            }
        }
        false
    }

    fn permute(ops: &[&Op], order: &mut Vec<usize>, k: usize) -> bool {
        if k == order.len() {
            return legal(ops, order);
        }
        for j in k..order.len() {
            order.swap(k, j);
            if permute(ops, order, k + 1) {
                return true;
            }
            order.swap(k, j);
        }
        false
    }

    fn legal(ops: &[&Op], order: &[usize]) -> bool {
        let ret = |o: &Op| {
            if o.status == Status::Unknown {
                u64::MAX
            } else {
                o.end
            }
        };
        // Real time: nothing placed after an operation that returned before it was called.
        for (a, &x) in order.iter().enumerate() {
            for &y in &order[a + 1..] {
                if ret(ops[y]) < ops[x].start {
                    return false;
                }
            }
        }
        let mut reg: Option<&str> = None;
        for &x in order {
            let o = ops[x];
            match o.kind {
                OpKind::Put => reg = o.value.as_deref(),
                OpKind::Delete => reg = None,
                OpKind::Get => {
                    if reg != o.value.as_deref() {
                        return false;
                    }
                }
            }
        }
        true
    }

    #[test]
    fn agrees_with_brute_force_on_random_histories() {
        use crate::chaos::rng::Rng;
        let mut rng = Rng::new(2024);
        let (mut yes, mut no) = (0, 0);
        for case in 0..3000 {
            let n = 2 + rng.below(6) as usize;
            let mut h = Vec::new();
            let mut puts = 0;
            for _ in 0..n {
                let start = rng.below(20);
                let end = start + 1 + rng.below(8);
                let status = match rng.below(10) {
                    0 => Status::Failed,
                    1 | 2 => Status::Unknown,
                    _ => Status::Ok,
                };
                let (kind, value) = match rng.below(10) {
                    0..=3 => {
                        puts += 1;
                        (OpKind::Put, Some(format!("v{puts}")))
                    }
                    4 => (OpKind::Delete, None),
                    _ => {
                        let v = rng.below(puts + 2);
                        (OpKind::Get, (v > 0).then(|| format!("v{v}")))
                    }
                };
                h.push(op(
                    rng.below(3) as u32,
                    kind,
                    value.as_deref(),
                    start,
                    end,
                    status,
                ));
            }
            let expected = brute_force(&h);
            let got = verdict(&h);
            assert_eq!(
                got == KeyVerdict::Linearizable,
                expected,
                "case {case}: {got:?} for {h:#?}"
            );
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        // Both outcomes were exercised.
        assert!(yes > 300 && no > 300, "{yes} linearizable, {no} not");
    }

    /// The textbook Wing–Gong search with memoisation (no read shortcuts), as a reference.
    fn plain_search(ops: &[RegOp]) -> bool {
        fn go(
            ops: &[RegOp],
            done: &mut Vec<bool>,
            state: u32,
            seen: &mut HashSet<(Vec<bool>, u32)>,
        ) -> bool {
            if done.iter().all(|d| *d) {
                return true;
            }
            // The earliest return among pending operations bounds which may go next.
            let horizon = (0..ops.len())
                .filter(|&i| !done[i])
                .map(|i| ops[i].ret)
                .min()
                .unwrap_or(u64::MAX);
            for i in 0..ops.len() {
                if done[i] || ops[i].call > horizon {
                    continue;
                }
                let after = match ops[i].action {
                    Action::Write(v) => v,
                    Action::Read(v) if v == state => state,
                    Action::Read(_) => continue,
                };
                done[i] = true;
                if seen.insert((done.clone(), after)) && go(ops, done, after, seen) {
                    return true;
                }
                done[i] = false;
            }
            false
        }
        let mut done = vec![false; ops.len()];
        go(ops, &mut done, 0, &mut HashSet::new())
    }

    #[test]
    fn agrees_with_the_plain_search_on_longer_histories() {
        use crate::chaos::rng::Rng;
        let mut rng = Rng::new(31);
        let (mut yes, mut no) = (0, 0);
        for case in 0..400 {
            // A register run by four clients with random latencies, linearizable by
            // construction; then, half the time, one read is made to lie.
            let mut h: Vec<Op> = Vec::new();
            let mut reg: Option<String> = None;
            let mut free_at = [0u64; 4];
            let mut puts = 0;
            for t in 0..40u64 {
                let c = rng.below(4) as usize;
                let start = free_at[c].max(t * 3);
                let point = start + rng.below(6);
                let end = point + rng.below(6);
                free_at[c] = end + 1;
                let status = if rng.below(12) == 0 {
                    Status::Unknown
                } else {
                    Status::Ok
                };
                let (kind, value) = match rng.below(10) {
                    0..=3 => {
                        puts += 1;
                        let v = format!("v{puts}");
                        reg = Some(v.clone());
                        (OpKind::Put, Some(v))
                    }
                    4 => {
                        reg = None;
                        (OpKind::Delete, None)
                    }
                    _ => (OpKind::Get, reg.clone()),
                };
                let status = if kind == OpKind::Get {
                    Status::Ok
                } else {
                    status
                };
                h.push(op(c as u32, kind, value.as_deref(), start, end, status));
            }
            if rng.below(2) == 0 {
                let reads: Vec<usize> =
                    (0..h.len()).filter(|&i| h[i].kind == OpKind::Get).collect();
                if let Some(&i) = rng.pick(&reads) {
                    let v = rng.below(puts + 1);
                    h[i].value = (v > 0).then(|| format!("v{v}"));
                }
            }
            let refs: Vec<&Op> = h.iter().collect();
            let (_, reg_ops) = model(&refs);
            let expected = plain_search(&reg_ops);
            let got = search(&reg_ops, MAX_STATES);
            assert_eq!(
                got == Search::Linearizable,
                expected,
                "case {case}: {got:?} for {h:#?}"
            );
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 100 && no > 50, "{yes} linearizable, {no} not");
    }
}

//! The versions handed out to writes that have not finished, and the oldest of them.
//!
//! Versions are handed out in increasing order, so they are kept in a queue in that order:
//! handing one out appends it, a finished write marks its entry done (found by binary search),
//! and done entries leave from the front. The oldest unfinished version is then always the
//! front. Every write hands one out and settles it, so this costs a write no allocation and
//! no tree rebalancing, as a `BTreeSet` did (`bench/README.md` has the profiles). Done
//! entries behind a slow write wait for it: 16 bytes per write finished meanwhile.

use std::collections::VecDeque;

/// Versions in flight, oldest first.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    /// `(version, done)`, versions strictly increasing; the front is never done.
    queue: VecDeque<(u64, bool)>,
}

impl InFlight {
    /// Note `version` as in flight. Versions arrive in increasing order (one that does not is
    /// put in its place, at the cost of a shift).
    pub(super) fn insert(&mut self, version: u64) {
        match self.queue.back() {
            Some(&(last, _)) if last >= version => {
                if let Err(i) = self.queue.binary_search_by_key(&version, |&(v, _)| v) {
                    self.queue.insert(i, (version, false));
                }
            }
            _ => self.queue.push_back((version, false)),
        }
    }

    /// Note that the write at `version` has finished.
    pub(super) fn remove(&mut self, version: u64) {
        if let Ok(i) = self.queue.binary_search_by_key(&version, |&(v, _)| v) {
            if let Some(entry) = self.queue.get_mut(i) {
                entry.1 = true;
            }
        }
        while self.queue.front().is_some_and(|&(_, done)| done) {
            self.queue.pop_front();
        }
    }

    /// The oldest version still in flight.
    pub(super) fn first(&self) -> Option<u64> {
        self.queue.front().map(|&(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_oldest_unfinished_version_is_first() {
        let mut f = InFlight::default();
        assert_eq!(f.first(), None);
        for v in [3, 5, 9] {
            f.insert(v);
        }
        f.remove(5);
        assert_eq!(
            f.first(),
            Some(3),
            "a later write finishing first settles nothing"
        );
        f.remove(3);
        assert_eq!(f.first(), Some(9), "the finished 5 left with 3");
        f.remove(7); // never handed out: no effect
        assert_eq!(f.first(), Some(9));
        f.remove(9);
        assert_eq!(f.first(), None);
        assert!(f.queue.is_empty());
        // Out of order, it still takes its place.
        f.insert(12);
        f.insert(10);
        assert_eq!(f.first(), Some(10));
        f.remove(10);
        assert_eq!(f.first(), Some(12));
    }

    /// Any order of finishing agrees with a set of the versions in flight.
    #[test]
    fn agrees_with_a_set_under_any_finishing_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next_random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut f = InFlight::default();
        let mut set = BTreeSet::new();
        let mut next = 1u64;
        for _ in 0..20_000 {
            if set.is_empty() || next_random() % 2 == 0 {
                next += 2 + next_random() % 3;
                f.insert(next);
                set.insert(next);
                // Now and then one below it, after it (never handed out before).
                if next_random() % 50 == 0 {
                    f.insert(next - 1);
                    set.insert(next - 1);
                }
            } else {
                let pick = (next_random() % set.len() as u64) as usize;
                let v = *set.iter().nth(pick).unwrap();
                set.remove(&v);
                f.remove(v);
            }
            assert_eq!(f.first(), set.first().copied());
        }
    }
}

//! The calls in flight on one client connection: a slot per call, found by its request id.
//!
//! A call's id names its slot (the low 24 bits) and the slot's generation (the high 40), so a
//! slot can be reused at once and a late answer to an earlier call of the same slot finds a
//! different generation and is dropped (an id repeats only after 2^40 calls of one slot). The slot holds the waiting call's waker and then its
//! outcome, so that a call costs no allocation, no hashing and no channel of its own: one
//! lock to start it, one (per batch of answers) to complete it, one per poll to look. The
//! table belongs to one connection; the caller keeps it behind that connection's mutex.

use std::task::{Context, Waker};
use std::time::Duration;

use super::CallError;
use crate::id_hash::IdMap;
use crate::protocol::Reply;

/// What a waiting call receives: the server's reply, or the sweep's verdict that it is overdue.
pub(super) type Outcome = Result<Reply, CallError>;

/// The ids of the calls each batch frame in flight carries, by the frame's own id.
type BatchMap = IdMap<Vec<u64>>;

enum State {
    Free,
    Waiting {
        waker: Option<Waker>,
        /// The sweep at which the call is overdue (`u64::MAX`: never).
        deadline: u64,
        after: Duration,
    },
    Done(Outcome),
    /// The connection went before an answer came.
    Lost,
}

/// Bits of an id that name the slot; the rest name the generation.
const INDEX_BITS: u32 = 24;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
/// Generations wrap within 40 bits, so that every id fits in 64.
const GENERATION_MASK: u64 = (1 << (64 - INDEX_BITS)) - 1;

struct Slot {
    /// Never 0, so that no id is 0 (the id of connection-level errors).
    generation: u64,
    state: State,
}

/// How a poll of a call found it.
pub(super) enum Polled {
    /// Its outcome; the slot is free again.
    Ready(Outcome),
    /// The connection is gone, or the id is not a call of this table (any more).
    Lost,
    /// Still waiting; the waker is kept.
    Pending,
}

/// Every call of one connection that has not yet been taken by its caller.
pub(super) struct Calls {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// False once the connection is gone: no call can start.
    open: bool,
    /// Whether a call was given up while still waiting since the last sweep, so its batch
    /// entry may be the last thing keeping the batch.
    forgotten: bool,
    /// The calls of every batch frame sent and not yet answered, so that an error answered
    /// to a frame as a whole reaches each of its calls.
    batches: BatchMap,
}

fn id_of(index: u32, generation: u64) -> u64 {
    generation << INDEX_BITS | u64::from(index)
}

fn parts(id: u64) -> (usize, u64) {
    // The mask keeps the index within 24 bits, so it fits any usize of 32 bits or more.
    ((id & INDEX_MASK) as usize, id >> INDEX_BITS)
}

impl Calls {
    pub(super) fn new() -> Calls {
        Calls {
            slots: Vec::new(),
            free: Vec::new(),
            open: true,
            forgotten: false,
            batches: BatchMap::default(),
        }
    }

    /// Register a call overdue at sweep `deadline` (after `after`); its id, or `None` once
    /// the connection is gone (or, beyond any real use, with 2^24 calls waiting at once).
    pub(super) fn insert(&mut self, deadline: u64, after: Duration) -> Option<u64> {
        if !self.open {
            return None;
        }
        let state = State::Waiting {
            waker: None,
            deadline,
            after,
        };
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&i| u64::from(i) <= INDEX_MASK)?;
                self.slots.push(Slot {
                    generation: 1,
                    state: State::Free,
                });
                index
            }
        };
        let slot = self.slots.get_mut(index as usize)?;
        slot.state = state;
        Some(id_of(index, slot.generation))
    }

    /// The slot of call `id`, if `id` names its current generation.
    fn slot_mut(&mut self, id: u64) -> Option<&mut Slot> {
        let (index, generation) = parts(id);
        self.slots
            .get_mut(index)
            .filter(|slot| slot.generation == generation)
    }

    /// Give the slot of call `id` back, for a later call under the next generation; what it
    /// held, if `id` named a call.
    fn release(&mut self, id: u64) -> Option<State> {
        let (index, generation) = parts(id);
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation || matches!(slot.state, State::Free) {
            return None;
        }
        slot.generation = match (slot.generation + 1) & GENERATION_MASK {
            0 => 1,
            next => next,
        };
        self.free.extend(u32::try_from(index).ok());
        Some(std::mem::replace(&mut slot.state, State::Free))
    }

    /// Give call `id` its outcome if it is still waiting, queueing its waker on `wake`; false
    /// if no call waits under `id` (it timed out, was given up, or was never ours).
    pub(super) fn complete(&mut self, id: u64, outcome: Outcome, wake: &mut Vec<Waker>) -> bool {
        let Some(slot) = self.slot_mut(id) else {
            return false;
        };
        let State::Waiting { waker, .. } = &mut slot.state else {
            return false;
        };
        wake.extend(waker.take());
        slot.state = State::Done(outcome);
        true
    }

    /// Look at call `id` for its caller: take its outcome, or keep `cx`'s waker.
    pub(super) fn poll(&mut self, id: u64, cx: &mut Context<'_>) -> Polled {
        let Some(slot) = self.slot_mut(id) else {
            return Polled::Lost;
        };
        match &mut slot.state {
            State::Waiting { waker, .. } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                return Polled::Pending;
            }
            State::Free => return Polled::Lost,
            State::Done(_) | State::Lost => {}
        }
        match self.release(id) {
            Some(State::Done(outcome)) => Polled::Ready(outcome),
            _ => Polled::Lost,
        }
    }

    /// The caller gives up on call `id`: its slot is free at once, and an answer that comes
    /// later is dropped.
    pub(super) fn forget(&mut self, id: u64) {
        if let Some(State::Waiting { .. }) = self.release(id) {
            self.forgotten = true;
        }
    }

    /// Whether call `id` is still waiting for its answer.
    fn is_waiting(&self, id: u64) -> bool {
        let (index, generation) = parts(id);
        self.slots.get(index).is_some_and(|slot| {
            slot.generation == generation && matches!(slot.state, State::Waiting { .. })
        })
    }

    /// Record the calls of a batch frame about to be sent (unless the connection is gone).
    pub(super) fn add_batches(&mut self, frames: impl IntoIterator<Item = (u64, Vec<u64>)>) {
        if self.open {
            self.batches.extend(frames);
        }
    }

    /// The answer to batch frame `id` came (or its first part): forget the frame.
    pub(super) fn batch_answered(&mut self, id: u64) {
        self.batches.remove(&id);
    }

    /// If `id` is a batch frame in flight, give each of its calls still waiting the outcome
    /// `refusal` makes, and say whether it was one.
    pub(super) fn refuse_batch(
        &mut self,
        id: u64,
        refusal: impl Fn() -> Outcome,
        wake: &mut Vec<Waker>,
    ) -> bool {
        let Some(members) = self.batches.remove(&id) else {
            return false;
        };
        for call in members {
            self.complete(call, refusal(), wake);
        }
        true
    }

    /// Batch frames still kept.
    #[cfg(test)]
    pub(super) fn batches_kept(&self) -> usize {
        self.batches.len()
    }

    /// Sweep `now`: every call whose deadline it reaches times out with `timed_out(after)`.
    pub(super) fn sweep(
        &mut self,
        now: u64,
        timed_out: impl Fn(Duration) -> CallError,
        wake: &mut Vec<Waker>,
    ) {
        let mut any = false;
        for slot in &mut self.slots {
            if let State::Waiting {
                waker,
                deadline,
                after,
            } = &mut slot.state
            {
                if *deadline <= now {
                    wake.extend(waker.take());
                    slot.state = State::Done(Err(timed_out(*after)));
                    any = true;
                }
            }
        }
        // A batch whose calls have all given up will not be asked about again.
        if (any || self.forgotten) && !self.batches.is_empty() {
            let mut batches = std::mem::take(&mut self.batches);
            batches.retain(|_, calls| calls.iter().any(|&id| self.is_waiting(id)));
            self.batches = batches;
        }
        self.forgotten = false;
    }

    /// The connection is gone: every waiting call fails, and no call starts from now on.
    pub(super) fn close(&mut self, wake: &mut Vec<Waker>) {
        self.open = false;
        self.batches.clear();
        for slot in &mut self.slots {
            if let State::Waiting { waker, .. } = &mut slot.state {
                wake.extend(waker.take());
                slot.state = State::Lost;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Response;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Waker, Arc<Count>) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (Waker::from(count.clone()), count)
    }

    fn ok(v: u64) -> Outcome {
        Ok(Ok(Response::Fetched {
            version: crate::Version(v),
            value: None,
        }))
    }

    fn version(polled: Polled) -> u64 {
        match polled {
            Polled::Ready(Ok(Ok(Response::Fetched { version, .. }))) => version.0,
            Polled::Ready(other) => panic!("{other:?}"),
            Polled::Lost => panic!("lost"),
            Polled::Pending => panic!("pending"),
        }
    }

    #[test]
    fn an_answer_reaches_its_call_and_wakes_it_once() {
        let mut calls = Calls::new();
        let (w, woken) = waker();
        let mut cx = Context::from_waker(&w);
        let id = calls.insert(u64::MAX, Duration::MAX).unwrap();
        assert_ne!(id, 0);
        assert!(matches!(calls.poll(id, &mut cx), Polled::Pending));
        let mut wake = Vec::new();
        assert!(calls.complete(id, ok(7), &mut wake));
        assert!(!calls.complete(id, ok(8), &mut wake), "answered once");
        wake.drain(..).for_each(Waker::wake);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert_eq!(version(calls.poll(id, &mut cx)), 7);
        assert!(
            matches!(calls.poll(id, &mut cx), Polled::Lost),
            "taken once"
        );
    }

    #[test]
    fn a_reused_slot_drops_the_late_answer_to_its_earlier_call() {
        let mut calls = Calls::new();
        let (w, _) = waker();
        let mut cx = Context::from_waker(&w);
        let first = calls.insert(u64::MAX, Duration::MAX).unwrap();
        calls.forget(first);
        let second = calls.insert(u64::MAX, Duration::MAX).unwrap();
        assert_eq!(parts(first).0, parts(second).0, "the slot is reused");
        assert_ne!(first, second, "under a new id");
        let mut wake = Vec::new();
        assert!(!calls.complete(first, ok(1), &mut wake), "the late answer");
        assert!(matches!(calls.poll(second, &mut cx), Polled::Pending));
        assert!(calls.complete(second, ok(2), &mut wake));
        assert_eq!(version(calls.poll(second, &mut cx)), 2);
    }

    #[test]
    fn generations_wrap_past_zero_and_ids_keep_their_slot() {
        let mut calls = Calls::new();
        let id = calls.insert(u64::MAX, Duration::MAX).unwrap();
        calls.forget(id);
        // The free slot has been reused 2^40 - 2 times more.
        calls.slots[0].generation = GENERATION_MASK;
        let last = calls.insert(u64::MAX, Duration::MAX).unwrap();
        assert_eq!(parts(last), (0, GENERATION_MASK));
        calls.forget(last);
        let wrapped = calls.insert(u64::MAX, Duration::MAX).unwrap();
        assert_eq!(parts(wrapped), (0, 1), "generation 0 is skipped");
        assert_ne!(wrapped, 0);
    }

    #[test]
    fn the_sweep_times_out_only_overdue_calls() {
        let mut calls = Calls::new();
        let (w, woken) = waker();
        let mut cx = Context::from_waker(&w);
        let soon = calls.insert(3, Duration::from_millis(30)).unwrap();
        let later = calls.insert(5, Duration::from_millis(50)).unwrap();
        let never = calls.insert(u64::MAX, Duration::MAX).unwrap();
        for id in [soon, later, never] {
            assert!(matches!(calls.poll(id, &mut cx), Polled::Pending));
        }
        let addr = "node";
        let timed_out = |after| CallError::Timeout {
            addr: addr.into(),
            after,
        };
        let mut wake = Vec::new();
        calls.sweep(2, timed_out, &mut wake);
        assert!(wake.is_empty());
        calls.sweep(4, timed_out, &mut wake);
        assert_eq!(wake.len(), 1);
        wake.drain(..).for_each(Waker::wake);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        match calls.poll(soon, &mut cx) {
            Polled::Ready(Err(CallError::Timeout { after, .. })) => {
                assert_eq!(after, Duration::from_millis(30))
            }
            _ => panic!("the overdue call times out"),
        }
        assert!(matches!(calls.poll(later, &mut cx), Polled::Pending));
        calls.sweep(u64::MAX - 1, timed_out, &mut wake);
        assert!(matches!(calls.poll(never, &mut cx), Polled::Pending));
    }

    #[test]
    fn closing_fails_waiting_calls_and_refuses_new_ones() {
        let mut calls = Calls::new();
        let (w, woken) = waker();
        let mut cx = Context::from_waker(&w);
        let waiting = calls.insert(u64::MAX, Duration::MAX).unwrap();
        let answered = calls.insert(u64::MAX, Duration::MAX).unwrap();
        assert!(matches!(calls.poll(waiting, &mut cx), Polled::Pending));
        let mut wake = Vec::new();
        assert!(calls.complete(answered, ok(3), &mut wake));
        calls.add_batches([(waiting, vec![waiting, answered])]);
        calls.close(&mut wake);
        wake.drain(..).for_each(Waker::wake);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(matches!(calls.poll(waiting, &mut cx), Polled::Lost));
        assert_eq!(version(calls.poll(answered, &mut cx)), 3, "answered before");
        assert_eq!(calls.batches_kept(), 0);
        assert!(calls.insert(u64::MAX, Duration::MAX).is_none());
    }

    #[test]
    fn a_batch_given_up_by_all_its_calls_is_forgotten_at_the_next_sweep() {
        let mut calls = Calls::new();
        let a = calls.insert(u64::MAX, Duration::MAX).unwrap();
        let b = calls.insert(u64::MAX, Duration::MAX).unwrap();
        calls.add_batches([(a, vec![a, b])]);
        let mut wake = Vec::new();
        let timed_out = |after| CallError::Timeout {
            addr: String::new(),
            after,
        };
        calls.forget(a);
        calls.sweep(1, timed_out, &mut wake);
        assert_eq!(calls.batches_kept(), 1, "one call still waits");
        calls.forget(b);
        calls.sweep(2, timed_out, &mut wake);
        assert_eq!(calls.batches_kept(), 0);
    }
}

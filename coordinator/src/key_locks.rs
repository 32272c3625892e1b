//! Per-key write locks: a write holds its key's lock from version assignment until its
//! metadata commit, so versions of a key are committed in order.
//!
//! Only locks that are held take memory: a small map per shard from the key's 64-bit hash to
//! the lock's owner and its queue of waiters, first come first served. Two keys share a lock
//! only if their hashes are equal, which costs concurrency, never correctness. A map of a few
//! hundred held locks stays in the cache, where an array of 65,536 lock stripes (tokio
//! mutexes, 2.5 MiB) cost each write a cache miss to take its stripe and another to release
//! it, and tokio's mutex took a lock of its own on every release: 6% of the coordinator's CPU
//! under pipelined PUTs.

use ringkv_common::sync::MutexExt;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use ringkv_common::id_hash::IdMap;

/// Shards of the held-lock maps, so that several worker threads rarely meet on one.
const SHARDS: usize = 64;

/// One held lock: who holds it, and who waits for it, in order.
struct Held {
    owner: u64,
    next_ticket: u64,
    waiting: VecDeque<(u64, Option<Waker>)>,
}

type HeldMap = IdMap<Held>;

/// The held key locks.
pub struct KeyLocks {
    shards: [Mutex<HeldMap>; SHARDS],
}

impl Default for KeyLocks {
    fn default() -> Self {
        KeyLocks {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl KeyLocks {
    /// Wait for exclusive access to `key`.
    pub fn lock(&self, key: &[u8]) -> Lock<'_> {
        let hash = ringkv_common::ring::key_hash(key);
        Lock {
            locks: self,
            hash,
            ticket: None,
        }
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, HeldMap> {
        // Bits that neither a map's buckets (the low ones) nor its tags (the top 7) use.
        let i = (hash >> 32) as usize % SHARDS;
        // Every change to a map is complete before its lock is let go, so a panic
        // elsewhere cannot leave one half-changed.
        self.shards[i].lock_unpoisoned()
    }

    /// Give the lock on `hash`, owned by `ticket`, to the first waiter, or free it.
    fn release(&self, hash: u64, ticket: u64) {
        let mut map = self.shard(hash);
        let Some(held) = map.get_mut(&hash) else {
            return;
        };
        if held.owner != ticket {
            return;
        }
        match held.waiting.pop_front() {
            Some((next, waker)) => {
                held.owner = next;
                drop(map);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            None => {
                map.remove(&hash);
            }
        }
    }
}

/// A wait for a key's lock; resolves to the guard that holds it.
pub struct Lock<'a> {
    locks: &'a KeyLocks,
    hash: u64,
    /// Our place once we asked: the ticket the owner field names when the lock is ours.
    ticket: Option<u64>,
}

impl<'a> Future for Lock<'a> {
    type Output = KeyGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<KeyGuard<'a>> {
        let this = &mut *self;
        let mut map = this.locks.shard(this.hash);
        let granted = match (this.ticket, map.get_mut(&this.hash)) {
            (Some(ticket), Some(held)) if held.owner == ticket => Some(ticket),
            // Still waiting: keep the latest waker.
            (Some(ticket), Some(held)) => {
                if let Some((_, waker)) = held.waiting.iter_mut().find(|(t, _)| *t == ticket) {
                    match waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *waker = Some(cx.waker().clone()),
                    }
                }
                None
            }
            (None, Some(held)) => {
                let ticket = held.next_ticket;
                held.next_ticket += 1;
                held.waiting.push_back((ticket, Some(cx.waker().clone())));
                this.ticket = Some(ticket);
                None
            }
            // Free: take it. (A lock with waiters is never freed, so a ticket never finds
            // its lock gone; if it did, taking the free lock would still be right.)
            (_, None) => {
                map.insert(
                    this.hash,
                    Held {
                        owner: 0,
                        next_ticket: 1,
                        waiting: VecDeque::new(),
                    },
                );
                Some(0)
            }
        };
        drop(map);
        match granted {
            Some(ticket) => {
                // The guard releases it from now on, not this future's drop.
                this.ticket = None;
                Poll::Ready(KeyGuard {
                    locks: this.locks,
                    hash: this.hash,
                    ticket,
                })
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        // Given up while waiting: leave the queue, or pass on a lock handed over meanwhile.
        let Some(ticket) = self.ticket else {
            return;
        };
        let mut map = self.locks.shard(self.hash);
        let owned = match map.get_mut(&self.hash) {
            Some(held) if held.owner == ticket => true,
            Some(held) => {
                held.waiting.retain(|(t, _)| *t != ticket);
                false
            }
            None => false,
        };
        drop(map);
        if owned {
            self.locks.release(self.hash, ticket);
        }
    }
}

/// A held key lock; dropping it hands the lock to the next waiter.
pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    hash: u64,
    ticket: u64,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.hash, self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::Arc;

    #[test]
    fn a_free_key_is_taken_at_once_and_freed_by_the_guard() {
        let locks = KeyLocks::default();
        let a = locks.lock(b"a").now_or_never().expect("free");
        let b = locks
            .lock(b"b")
            .now_or_never()
            .expect("another key is free");
        assert!(locks.lock(b"a").now_or_never().is_none(), "held");
        drop(a);
        drop(b);
        assert!(locks.lock(b"a").now_or_never().is_some(), "freed");
        let held: usize = locks.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert_eq!(held, 0, "nothing is kept for free locks");
    }

    #[tokio::test]
    async fn waiters_get_the_lock_one_at_a_time_in_order() {
        let locks = Arc::new(KeyLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.lock(b"k").await;
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (locks, order) = (locks.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _guard = locks.lock(b"k").await;
                order.lock().unwrap().push(i);
                // Hold it across a yield: nobody else may get in meanwhile.
                tokio::task::yield_now().await;
                order.lock().unwrap().push(i);
            }));
            // Let each task queue before the next is spawned.
            tokio::task::yield_now().await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_trace() {
        let locks = KeyLocks::default();
        let held = locks.lock(b"k").await;
        // Gives up before the lock is free.
        let mut gone = Box::pin(locks.lock(b"k"));
        assert!((&mut gone).now_or_never().is_none());
        // Gives up after the lock was handed to it, before it looked.
        let mut late = Box::pin(locks.lock(b"k"));
        assert!((&mut late).now_or_never().is_none());
        let mut last = Box::pin(locks.lock(b"k"));
        assert!((&mut last).now_or_never().is_none());
        drop(gone);
        drop(held); // hands the lock to `late`
        drop(late); // passes it on to `last`
        let guard = tokio::time::timeout(std::time::Duration::from_secs(5), last)
            .await
            .expect("the lock reaches the last waiter");
        drop(guard);
        let kept: usize = locks.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert_eq!(kept, 0);
    }
}

//! The in-memory hash table of a storage node: `key -> (version, value | tombstone)`.
//!
//! Invariant: a write is applied only when its version is newer than the one held, so replays,
//! retries, re-replication and migration can arrive in any order and any number of times.
//! Versions are unique per write cluster-wide (the coordinator assigns them), so two writes
//! never share a version.
//!
//! Each entry keeps its key and value together in one allocation, so a lookup touches the
//! table's slot and that one block: comparing the key brings the start of the value into the
//! cache with it. With the key, the value and the value's reference count in three places, a
//! read of a table larger than the cache waited on five memory loads instead of three.

use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashTable;
use ringkv_common::protocol::ScanEntry;
use ringkv_common::{NodeStats, Version};

use crate::log::Record;

/// Values up to this size are copied out of the table for an answer; larger ones are shared
/// (a reference count) rather than copied under the table's lock.
const COPY_VALUES_UP_TO: usize = 16 * 1024;

/// What a node holds for one key, as [`Store::get`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub version: Version,
    /// `None` is a tombstone: the key was deleted at `version`.
    pub value: Option<&'a [u8]>,
}

/// One key's entry in the table.
struct Slot {
    /// The key, then the value (nothing after the key for a tombstone).
    block: Bytes,
    key_len: u32,
    tombstone: bool,
    version: Version,
}

impl Slot {
    /// `None` for a key longer than any the protocol lets through.
    fn new(key: &[u8], version: Version, value: Option<&[u8]>) -> Option<Slot> {
        let key_len = u32::try_from(key.len()).ok()?;
        let mut block = Vec::with_capacity(key.len() + value.map_or(0, <[u8]>::len));
        block.extend_from_slice(key);
        block.extend_from_slice(value.unwrap_or_default());
        Some(Slot {
            block: Bytes::from(block),
            key_len,
            tombstone: value.is_none(),
            version,
        })
    }

    fn key(&self) -> &[u8] {
        self.block.get(..self.key_len as usize).unwrap_or_default()
    }

    fn value(&self) -> Option<&[u8]> {
        if self.tombstone {
            None
        } else {
            self.block.get(self.key_len as usize..)
        }
    }

    /// The value as an answer carries it: copied if small, shared if large.
    fn value_bytes(&self) -> Option<Bytes> {
        let value = self.value()?;
        if value.len() <= COPY_VALUES_UP_TO {
            Some(Bytes::copy_from_slice(value))
        } else {
            self.shared_value()
        }
    }

    /// The value, sharing the block's memory.
    fn shared_value(&self) -> Option<Bytes> {
        (!self.tombstone).then(|| self.block.slice(self.key_len as usize..))
    }

    /// The key, sharing the block's memory.
    fn shared_key(&self) -> Bytes {
        self.block.slice(..self.key_len as usize)
    }

    fn entry(&self) -> EntryRef<'_> {
        EntryRef {
            version: self.version,
            value: self.value(),
        }
    }

    /// Bytes of key and value, as the live-bytes counter counts them (0 for a tombstone).
    fn live_len(&self) -> Option<usize> {
        (!self.tombstone).then_some(self.block.len())
    }
}

/// The hash table plus the counters reported in heartbeats.
#[derive(Default)]
pub struct Store {
    map: HashTable<Slot>,
    /// foldhash, seeded at random per process: a fraction of SipHash's cost per lookup, and
    /// keys chosen by clients still cannot be aimed at one bucket without knowing the seed.
    hasher: foldhash::fast::RandomState,
    live_keys: u64,
    live_bytes: u64,
    /// The keys in order, sorted when a scan starts and used by its later pages.
    scan_order: Option<ScanOrder>,
}

/// Key bytes one scan page carries at most (a page of the largest keys would otherwise be
/// 10,000 x 64 KiB, far over a frame); the page ends early and the scan continues after it.
/// Every frame limit a node accepts holds a page of this many bytes with room to spare.
pub const MAX_SCAN_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// What an entry of a scan page costs on the wire beyond its key, counted against
/// [`MAX_SCAN_PAGE_BYTES`].
const SCAN_ENTRY_OVERHEAD: usize = 32;

/// How long a scan's key order serves later pages before it is sorted again.
const SCAN_ORDER_TTL: Duration = Duration::from_secs(30);

/// Every key, sorted once per scan, so that each page is a binary search and a short walk
/// instead of a pass over the whole table.
struct ScanOrder {
    keys: Vec<Bytes>,
    /// When the keys were taken from the table.
    taken_at: Instant,
}

/// Every key of the table at one moment, for a scan's order once sorted.
pub struct KeySnapshot {
    keys: Vec<Bytes>,
    taken_at: Instant,
}

impl KeySnapshot {
    /// The keys in order, as a scan wants them.
    pub fn sorted(mut self) -> KeySnapshot {
        self.keys.sort_unstable();
        self
    }
}

/// A scan page: its entries, and the key to continue after (`None` at the end).
pub type ScanPage = (Vec<ScanEntry>, Option<Bytes>);

impl Store {
    /// Rebuild the table from replayed log records (file order).
    ///
    /// Tombstones are dropped at the end: replay has already let them override every older
    /// record of their key, and nothing in flight before the restart can still arrive.
    pub fn from_records(records: Vec<Record>) -> Store {
        let mut store = Store::default();
        for rec in records {
            // `>=`: a later record at the same version is a forget marker (see `forget`).
            store.put_if(&rec.key, rec.version, rec.value.as_deref(), |held, new| {
                new >= held
            });
        }
        store.map.retain(|slot| !slot.tombstone);
        store
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn slot(&self, key: &[u8]) -> Option<&Slot> {
        self.map.find(self.hash(key), |slot| slot.key() == key)
    }

    /// Apply a write if `version` is newer than what is held. Returns whether it applied and
    /// the version held afterwards.
    pub fn apply(&mut self, key: &[u8], version: Version, value: Option<&[u8]>) -> (bool, Version) {
        self.put_if(key, version, value, |held, new| new > held)
    }

    /// The entry for `key`, if any.
    pub fn get(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        self.slot(key).map(Slot::entry)
    }

    /// The entry for `key` as an answer carries it: its version and value, if any.
    pub fn fetch(&self, key: &[u8]) -> Option<(Version, Option<Bytes>)> {
        self.slot(key)
            .map(|slot| (slot.version, slot.value_bytes()))
    }

    /// Remove `key` if what is held is no newer than `version`. Returns the removed version.
    pub fn forget(&mut self, key: &[u8], version: Version) -> Option<Version> {
        let hash = self.hash(key);
        let Ok(found) = self.map.find_entry(hash, |slot| slot.key() == key) else {
            return None;
        };
        let held = found.get().version;
        if held > version {
            return None;
        }
        let (old, _) = found.remove();
        self.uncount(&old);
        Some(held)
    }

    /// Up to `limit` entries with keys strictly greater than `after`, in key order, and the
    /// key to continue after (`None` when this page reached the end).
    ///
    /// A scan from the start sorts the keys once; later pages reuse that order (for up to
    /// [`SCAN_ORDER_TTL`]), so a whole scan costs one sort, not a pass over the table per
    /// page. Entries are read from the table when their page is served, so values are
    /// current; a key written after the scan started may be missed, and a key removed since
    /// is skipped (a page may then hold fewer than `limit` entries).
    pub fn scan(&mut self, after: Option<&[u8]>, limit: usize) -> ScanPage {
        match self.scan_or_snapshot(after, limit) {
            Ok(page) => page,
            Err(snapshot) => self.scan_in_order(snapshot.sorted(), after, limit),
        }
    }

    /// The page [`Store::scan`] would give, if the order of the scan it continues can serve
    /// it; otherwise (the page starts a scan, or the order expired or was freed) every key
    /// as it is now, for the caller to sort, without the table, and hand to
    /// [`Store::scan_in_order`]: sorting a large table takes long.
    pub fn scan_or_snapshot(
        &mut self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<ScanPage, KeySnapshot> {
        let reusable = after.is_some()
            && self
                .scan_order
                .as_ref()
                .is_some_and(|o| o.taken_at.elapsed() < SCAN_ORDER_TTL);
        if reusable {
            return Ok(self.page(after, limit));
        }
        Err(KeySnapshot {
            // Copies: a slice of a block would keep its value alive for as long as the
            // order is kept, after the key is overwritten or forgotten.
            keys: self
                .map
                .iter()
                .map(|slot| Bytes::copy_from_slice(slot.key()))
                .collect(),
            taken_at: Instant::now(),
        })
    }

    /// The page, from `sorted` (a [`KeySnapshot`] whose keys the caller sorted) unless the
    /// order already there was taken later: a scan that started after this one and sorted
    /// first holds every key this one's does, and those written since. The order kept
    /// serves this scan's later pages and any other scan's.
    pub fn scan_in_order(
        &mut self,
        sorted: KeySnapshot,
        after: Option<&[u8]>,
        limit: usize,
    ) -> ScanPage {
        let newer = self
            .scan_order
            .as_ref()
            .is_some_and(|o| o.taken_at > sorted.taken_at);
        if !newer {
            self.scan_order = Some(ScanOrder {
                keys: sorted.keys,
                taken_at: sorted.taken_at,
            });
        }
        self.page(after, limit)
    }

    /// One page of the current scan order.
    fn page(&mut self, after: Option<&[u8]>, limit: usize) -> ScanPage {
        let limit = limit.max(1);
        let Some(order) = self.scan_order.as_ref() else {
            return (Vec::new(), None);
        };
        let start = after.map_or(0, |a| order.keys.partition_point(|k| k.as_ref() <= a));
        let page = order.keys.get(start..).unwrap_or_default();
        // Up to `limit` keys, and only as many as fit in the page's bytes (at least one).
        let mut taken = 0;
        let mut bytes = 0;
        for key in page.iter().take(limit) {
            bytes += key.len() + SCAN_ENTRY_OVERHEAD;
            if taken > 0 && bytes > MAX_SCAN_PAGE_BYTES {
                break;
            }
            taken += 1;
        }
        let entries = page
            .iter()
            .take(taken)
            .filter_map(|k| {
                self.get(k).map(|e| ScanEntry {
                    key: k.clone(),
                    version: e.version,
                    tombstone: e.value.is_none(),
                    value_len: e.value.map_or(0, |v| v.len() as u64),
                })
            })
            .collect();
        let next = if taken < page.len() {
            page.get(taken.saturating_sub(1)).cloned()
        } else {
            // The scan is done: free the order.
            self.scan_order = None;
            None
        };
        (entries, next)
    }

    /// Every entry as a log record, for compaction: the records share the table's memory.
    pub fn records(&self) -> Vec<Record> {
        self.map
            .iter()
            .map(|slot| Record {
                key: slot.shared_key(),
                version: slot.version,
                value: slot.shared_value(),
            })
            .collect()
    }

    /// Bytes the live set takes in the log (tombstones included), for the compaction trigger.
    pub fn encoded_len(&self) -> u64 {
        let framing = Record {
            key: Bytes::new(),
            version: Version::ZERO,
            value: None,
        }
        .encoded_len();
        self.live_bytes + self.map.len() as u64 * framing
    }

    /// Live keys and their bytes (tombstones excluded).
    pub fn stats(&self) -> NodeStats {
        NodeStats {
            keys: self.live_keys,
            bytes: self.live_bytes,
            ..NodeStats::default()
        }
    }

    /// Put `key` at `version` unless it holds a version `replaces(held, version)` refuses;
    /// whether it did, and the version held afterwards. A key longer than any the protocol
    /// lets through is refused as `(false, Version::ZERO)`.
    fn put_if(
        &mut self,
        key: &[u8],
        version: Version,
        value: Option<&[u8]>,
        replaces: impl FnOnce(Version, Version) -> bool,
    ) -> (bool, Version) {
        let hasher = &self.hasher;
        let entry = self.map.entry(
            hasher.hash_one(key),
            |s| s.key() == key,
            |s| hasher.hash_one(s.key()),
        );
        if let hashbrown::hash_table::Entry::Occupied(held) = &entry {
            let held = held.get().version;
            if !replaces(held, version) {
                return (false, held);
            }
        }
        let Some(slot) = Slot::new(key, version, value) else {
            return (false, Version::ZERO);
        };
        let added = slot.live_len();
        let old = match entry {
            hashbrown::hash_table::Entry::Occupied(mut held) => {
                Some(std::mem::replace(held.get_mut(), slot))
            }
            hashbrown::hash_table::Entry::Vacant(free) => {
                free.insert(slot);
                None
            }
        };
        if let Some(len) = added {
            self.live_keys += 1;
            self.live_bytes += len as u64;
        }
        if let Some(old) = old {
            self.uncount(&old);
        }
        (true, version)
    }

    fn uncount(&mut self, old: &Slot) {
        if let Some(len) = old.live_len() {
            self.live_keys -= 1;
            self.live_bytes -= len as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn only_newer_versions_apply() {
        let mut s = Store::default();
        assert_eq!(
            s.apply(b"k", Version(5), Some(&b"five"[..])),
            (true, Version(5))
        );
        assert_eq!(
            s.apply(b"k", Version(3), Some(&b"three"[..])),
            (false, Version(5))
        );
        assert_eq!(
            s.apply(b"k", Version(5), Some(&b"again"[..])),
            (false, Version(5))
        );
        assert_eq!(s.get(b"k").and_then(|e| e.value), Some(&b"five"[..]));
        assert_eq!(s.apply(b"k", Version(7), None), (true, Version(7)));
        assert_eq!(s.stats().keys, 0);
        assert_eq!(
            s.apply(b"k", Version(6), Some(&b"six"[..])),
            (false, Version(7))
        );
    }

    #[test]
    fn an_empty_value_is_not_a_tombstone_and_large_values_come_back_whole() {
        let mut s = Store::default();
        s.apply(b"empty", Version(1), Some(b""));
        s.apply(b"gone", Version(2), None);
        let large = vec![7u8; COPY_VALUES_UP_TO + 1];
        s.apply(b"large", Version(3), Some(&large));
        assert_eq!(s.get(b"empty").and_then(|e| e.value), Some(&b""[..]));
        assert_eq!(s.fetch(b"empty"), Some((Version(1), Some(Bytes::new()))));
        assert_eq!(s.fetch(b"gone"), Some((Version(2), None)));
        assert_eq!(
            s.fetch(b"large").and_then(|(_, v)| v).as_deref(),
            Some(&large[..])
        );
        assert_eq!(s.stats().keys, 2);
        assert_eq!(s.stats().bytes, (5 + 5 + large.len()) as u64);
        let mut records = s.records();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&[u8]> = records.iter().map(|r| r.key.as_ref()).collect();
        assert_eq!(keys, [&b"empty"[..], b"gone", b"large"]);
        assert_eq!(records[1].value, None);
        assert_eq!(records[2].value.as_deref(), Some(&large[..]));
    }

    #[test]
    fn stats_track_live_keys_and_bytes() {
        let mut s = Store::default();
        s.apply(b"a", Version(1), Some(&b"xx"[..]));
        s.apply(b"b", Version(2), Some(&b"yyy"[..]));
        s.apply(b"a", Version(3), Some(&b"z"[..]));
        assert_eq!(s.stats().keys, 2);
        assert_eq!(s.stats().bytes, (1 + 1 + 1 + 3) as u64);
        s.forget(b"b", Version(2));
        assert_eq!(s.stats().keys, 1);
        assert_eq!(s.forget(b"a", Version(2)), None, "newer copy is kept");
    }

    #[test]
    fn replay_forget_marker_and_tombstones() {
        let recs = vec![
            Record {
                key: b("a"),
                version: Version(1),
                value: Some(b("1")),
            },
            Record {
                key: b("a"),
                version: Version(1),
                value: None,
            }, // forgotten
            Record {
                key: b("b"),
                version: Version(2),
                value: Some(b("2")),
            },
            Record {
                key: b("b"),
                version: Version(4),
                value: None,
            }, // deleted
            Record {
                key: b("c"),
                version: Version(9),
                value: Some(b("9")),
            },
            Record {
                key: b("c"),
                version: Version(3),
                value: Some(b("old")),
            },
        ];
        let mut s = Store::from_records(recs);
        assert!(s.get(b"a").is_none());
        assert!(s.get(b"b").is_none());
        assert_eq!(s.get(b"c").map(|e| e.version), Some(Version(9)));
        // A forgotten key can be stored again at its old version.
        assert_eq!(
            s.apply(b"a", Version(1), Some(&b"1"[..])),
            (true, Version(1))
        );
    }

    #[test]
    fn scan_pages_in_key_order() {
        let mut s = Store::default();
        for i in 0..25 {
            s.apply(
                format!("k{i:02}").as_bytes(),
                Version(i + 1),
                Some(&b"v"[..]),
            );
        }
        let mut after: Option<Bytes> = None;
        let mut seen = Vec::new();
        loop {
            let (page, next) = s.scan(after.as_deref(), 10);
            seen.extend(page.into_iter().map(|e| e.key));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let expected: Vec<Bytes> = (0..25).map(|i| b(&format!("k{i:02}"))).collect();
        assert_eq!(seen, expected);
    }

    /// Walk a scan to its end from `first`, a first page, through [`Store::scan`].
    fn rest_of_scan(s: &mut Store, first: ScanPage) -> Vec<Bytes> {
        let (page, mut next) = first;
        let mut seen: Vec<Bytes> = page.into_iter().map(|e| e.key).collect();
        while let Some(after) = next {
            let (page, n) = s.scan(Some(&after), 10);
            seen.extend(page.into_iter().map(|e| e.key));
            next = n;
        }
        seen
    }

    #[test]
    fn a_page_of_large_keys_ends_at_its_byte_budget_and_the_scan_goes_on() {
        let mut s = Store::default();
        let key = |i: usize| format!("{i:03}{}", "k".repeat(60 * 1024));
        for i in 0..150 {
            s.apply(key(i).as_bytes(), Version(1), Some(&b"v"[..]));
        }
        let (page, mut next) = s.scan(None, 10_000);
        assert!(page.len() > 1, "{}", page.len());
        assert!(
            page.len() < 150,
            "a page of 150 keys of 60 KiB is over the budget"
        );
        let page_bytes: usize = page.iter().map(|e| e.key.len() + SCAN_ENTRY_OVERHEAD).sum();
        assert!(page_bytes <= MAX_SCAN_PAGE_BYTES, "{page_bytes}");
        let mut seen: Vec<Bytes> = page.into_iter().map(|e| e.key).collect();
        while let Some(after) = next {
            let (page, n) = s.scan(Some(&after), 10_000);
            seen.extend(page.into_iter().map(|e| e.key));
            next = n;
        }
        let expected: Vec<Bytes> = (0..150).map(|i| b(&key(i))).collect();
        assert_eq!(seen, expected, "every key once, in order");
    }

    #[test]
    fn a_scan_started_with_keys_sorted_elsewhere_pages_like_one_sorted_here() {
        let mut s = Store::default();
        for i in (0..25).rev() {
            s.apply(
                format!("k{i:02}").as_bytes(),
                Version(i + 1),
                Some(&b"v"[..]),
            );
        }
        let Err(snapshot) = s.scan_or_snapshot(None, 10) else {
            panic!("a new scan always takes the keys to sort");
        };
        // Written after the keys were taken: this scan may miss it.
        s.apply(b"k05x", Version(99), Some(&b"late"[..]));
        let first = s.scan_in_order(snapshot.sorted(), None, 10);
        assert!(
            s.scan_or_snapshot(first.1.as_deref(), 10).is_ok(),
            "later pages reuse the order"
        );
        let expected: Vec<Bytes> = (0..25).map(|i| b(&format!("k{i:02}"))).collect();
        assert_eq!(rest_of_scan(&mut s, first), expected);
        assert!(
            s.scan_or_snapshot(Some(b"k10"), 10).is_err(),
            "a finished scan frees its order"
        );
    }

    #[test]
    fn an_older_order_sorted_late_does_not_replace_a_newer_one() {
        let mut s = Store::default();
        for i in 0..30 {
            s.apply(
                format!("k{i:02}").as_bytes(),
                Version(i + 1),
                Some(&b"v"[..]),
            );
        }
        // Scan A takes the keys; a key is written; scan C takes the keys, sorts them and
        // serves its first page before A's sort is done.
        let Err(older) = s.scan_or_snapshot(None, 10) else {
            panic!("a new scan takes the keys");
        };
        s.apply(b"k15x", Version(99), Some(&b"new"[..]));
        let Err(newer) = s.scan_or_snapshot(None, 10) else {
            panic!("a new scan takes the keys");
        };
        let c_first = s.scan_in_order(newer.sorted(), None, 10);
        let a_first = s.scan_in_order(older.sorted(), None, 10);
        // C's later pages still see the key written before C started.
        let c = rest_of_scan(&mut s, c_first);
        assert!(c.contains(&b("k15x")), "{c:?}");
        assert_eq!(c.len(), 31);
        // A got every key it should have; the one written after it started is allowed in.
        let a = rest_of_scan(&mut s, a_first);
        assert!(a.len() >= 30, "{a:?}");
    }

    #[test]
    fn scan_pages_see_current_versions_and_skip_removed_keys() {
        let mut s = Store::default();
        for i in 0..30 {
            s.apply(
                format!("k{i:02}").as_bytes(),
                Version(i + 1),
                Some(&b"v"[..]),
            );
        }
        let (first, next) = s.scan(None, 10);
        assert_eq!(first.len(), 10);
        // Between pages: one key changes, one is forgotten, one is added after the cursor.
        s.apply(b"k15", Version(100), Some(&b"new"[..]));
        s.forget(b"k16", Version(17));
        s.apply(b"k99", Version(101), Some(&b"late"[..]));
        let mut after = next;
        let mut rest: Vec<ScanEntry> = Vec::new();
        while let Some(cursor) = after {
            let (page, next) = s.scan(Some(&cursor), 10);
            assert!(page.len() <= 10);
            rest.extend(page);
            after = next;
        }
        let keys: Vec<Bytes> = rest.iter().map(|e| e.key.clone()).collect();
        assert!(!keys.contains(&b("k16")), "a forgotten key is skipped");
        assert_eq!(keys.len(), 19, "k10..k29 without k16: {keys:?}");
        let k15 = rest.iter().find(|e| e.key == b("k15")).unwrap();
        assert_eq!(
            k15.version,
            Version(100),
            "the page reads the current version"
        );
        // A new scan starts from a fresh order and sees the late key.
        let mut all = Vec::new();
        let mut after: Option<Bytes> = None;
        loop {
            let (page, next) = s.scan(after.as_deref(), 7);
            all.extend(page.into_iter().map(|e| e.key));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(all.len(), 30);
        assert_eq!(all.last(), Some(&b("k99")));
    }

    #[test]
    fn a_cursor_past_every_key_ends_the_scan() {
        let mut s = Store::default();
        s.apply(b"a", Version(1), Some(&b"v"[..]));
        let (page, next) = s.scan(Some(b"zzz"), 10);
        assert!(page.is_empty());
        assert!(next.is_none());
        let (page, next) = s.scan(None, 10);
        assert_eq!(page.len(), 1);
        assert!(next.is_none());
    }
}

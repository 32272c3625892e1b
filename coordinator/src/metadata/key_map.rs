//! One shard's map from key to [`KeyMeta`], laid out for lookups that miss the cache.
//!
//! A key of up to [`INLINE_KEY`] bytes is kept in the table's slot beside its metadata, so
//! that looking it up reads the control bytes and one 72-byte slot; a longer key has an
//! allocation of its own, as every key had with a map of boxed keys, where a lookup also
//! waited for the key's memory before it could compare it. For a key of 16 bytes the two
//! layouts take the same memory (a 56-byte slot and a 16-byte allocation before); a key
//! too long to be inline costs 16 bytes more than before. Keys are hashed with foldhash,
//! seeded at random per process: a fraction of SipHash's cost, and keys chosen by clients
//! still cannot be aimed at one bucket without knowing the seed.

use std::hash::BuildHasher;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use super::KeyMeta;

/// Longest key kept in its slot.
pub const INLINE_KEY: usize = 22;

/// A key as the map holds it.
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(key: &[u8]) -> Key {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                if let Some(head) = bytes.get_mut(..key.len()) {
                    head.copy_from_slice(key);
                }
                Key::Inline { len, bytes }
            }
            _ => Key::Heap(Box::from(key)),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Key::Heap(key) => key,
        }
    }
}

struct Slot {
    key: Key,
    meta: KeyMeta,
}

/// Keys and their metadata.
#[derive(Default)]
pub struct KeyMap {
    table: HashTable<Slot>,
    hasher: foldhash::fast::RandomState,
}

impl KeyMap {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The metadata of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&KeyMeta> {
        self.table
            .find(self.hash(key), |slot| slot.key.as_slice() == key)
            .map(|slot| &slot.meta)
    }

    /// Set `key` to `meta` (`None` removes it), copying the key only when it is new.
    pub fn set(&mut self, key: &[u8], meta: Option<KeyMeta>) {
        let hasher = &self.hasher;
        let entry = self.table.entry(
            hasher.hash_one(key),
            |slot| slot.key.as_slice() == key,
            |slot| hasher.hash_one(slot.key.as_slice()),
        );
        match (entry, meta) {
            (Entry::Occupied(mut held), Some(meta)) => held.get_mut().meta = meta,
            (Entry::Occupied(held), None) => {
                held.remove();
            }
            (Entry::Vacant(free), Some(meta)) => {
                free.insert(Slot {
                    key: Key::new(key),
                    meta,
                });
            }
            (Entry::Vacant(_), None) => {}
        }
    }

    /// Every key and its metadata, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &KeyMeta)> {
        self.table
            .iter()
            .map(|slot| (slot.key.as_slice(), &slot.meta))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_common::{NodeId, Version};

    fn meta(v: u64) -> KeyMeta {
        KeyMeta {
            version: Version(v),
            replicas: [NodeId(1), NodeId(2), NodeId(3)].into_iter().collect(),
            tombstone: false,
        }
    }

    #[test]
    fn a_slot_holds_a_short_key_in_72_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 72);
    }

    #[test]
    fn keys_short_long_and_empty_are_kept_apart() {
        let mut map = KeyMap::default();
        let long = vec![b'x'; INLINE_KEY + 1];
        let edge = vec![b'x'; INLINE_KEY];
        let keys: [&[u8]; 5] = [b"", b"a", &edge, &long, b"a\0"];
        for (i, key) in keys.iter().enumerate() {
            map.set(key, Some(meta(i as u64 + 1)));
        }
        assert_eq!(map.len(), keys.len());
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(map.get(key), Some(&meta(i as u64 + 1)), "{key:?}");
        }
        map.set(&long, Some(meta(9)));
        map.set(b"a", None);
        map.set(b"never there", None);
        assert_eq!(map.get(&long), Some(&meta(9)));
        assert_eq!(map.get(b"a"), None);
        assert_eq!(map.get(b"a\0"), Some(&meta(5)));
        assert_eq!(map.len(), keys.len() - 1);
        let mut seen: Vec<Vec<u8>> = map.iter().map(|(k, _)| k.to_vec()).collect();
        seen.sort();
        let mut expected: Vec<Vec<u8>> = [&b""[..], &edge, &long, b"a\0"]
            .iter()
            .map(|k| k.to_vec())
            .collect();
        expected.sort();
        assert_eq!(seen, expected);
    }
}

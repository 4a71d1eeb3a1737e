//! The data: byte-string keys to byte-string values, each with an optional expiry time, under
//! an optional memory budget.
//!
//! Time is whatever millisecond clock the caller passes (`now_ms`); the store has none. A key
//! whose expiry time `t` has passed (`now_ms > t`, as in Redis) is gone: every access drops it
//! (lazy expiry) and [`Store::expire_some`] drops the earliest-expiring ones (active expiry),
//! from an index ordered by expiry time, so the server's timer does bounded, useful work.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec::Vec;

/// Bytes counted per key on top of the key's and value's lengths: the map node share, the key
/// and value headers and the expiry index entry. An estimate, fixed so that the accounting is
/// deterministic and the same on every target.
pub const ENTRY_OVERHEAD: usize = 64;

/// The cost of one entry against the memory budget.
pub(crate) fn entry_cost(key_len: usize, value_len: usize) -> usize {
    key_len
        .saturating_add(value_len)
        .saturating_add(ENTRY_OVERHEAD)
}

/// What a write does to the key's expiry time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ttl {
    /// No expiry (plain `SET`, `MSET`).
    Clear,
    /// Unchanged (`SET ... KEEPTTL`, `INCR`, `APPEND`).
    Keep,
    /// Expires after this time (ms).
    At(u64),
}

pub(crate) struct Entry {
    pub(crate) value: Vec<u8>,
    pub(crate) expires_at: Option<u64>,
}

/// Counters reported by `INFO`.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) commands: u64,
    pub(crate) expired_keys: u64,
}

/// The key space shared by all connections. The server wraps it in its lock and passes it to
/// [`Connection::feed`](crate::Connection::feed).
pub struct Store {
    // Keys are shared with the expiry index (immutable bytes, counted once).
    map: BTreeMap<Arc<[u8]>, Entry>,
    by_expiry: BTreeSet<(u64, Arc<[u8]>)>,
    used: usize,
    limit: Option<usize>,
    pub(crate) stats: Stats,
    last_client_id: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store without a memory budget.
    pub fn new() -> Self {
        Store {
            map: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            used: 0,
            limit: None,
            stats: Stats::default(),
            last_client_id: 0,
        }
    }

    /// An empty store whose keys and values may use at most `max_bytes` (each key counts its
    /// length, its value's length and [`ENTRY_OVERHEAD`]). A write that would go over is refused
    /// with Redis's `-OOM command not allowed when used memory > 'maxmemory'.`; writes that
    /// shrink usage (and deletes) always go through.
    pub fn with_limit(max_bytes: usize) -> Self {
        Store {
            limit: Some(max_bytes),
            ..Self::new()
        }
    }

    /// Number of keys, including expired ones not yet dropped (as Redis's `DBSIZE`).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no keys at all.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes counted against the budget.
    pub fn used_memory(&self) -> usize {
        self.used
    }

    /// The budget given to [`Store::with_limit`].
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// The earliest expiry time of any key: when the next call to [`Store::expire_some`]
    /// could find work (the server's timer may sleep until just after it).
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_expiry.first().map(|(at, _)| *at)
    }

    /// Active expiry: drops up to `max` keys whose expiry time is before `now_ms`, earliest
    /// first, and returns how many it dropped. `max` bounds the work of one call.
    pub fn expire_some(&mut self, now_ms: u64, max: usize) -> usize {
        let mut dropped = 0;
        while dropped < max {
            let key = match self.by_expiry.first() {
                Some((at, key)) if now_ms > *at => key.clone(),
                _ => break,
            };
            self.remove(&key);
            self.stats.expired_keys += 1;
            dropped += 1;
        }
        dropped
    }

    /// Lazy expiry: drops `key` if it has expired. Returns whether the key exists afterwards.
    pub(crate) fn touch(&mut self, key: &[u8], now_ms: u64) -> bool {
        let expired = match self.map.get(key) {
            None => return false,
            Some(entry) => matches!(entry.expires_at, Some(at) if now_ms > at),
        };
        if expired {
            self.remove(key);
            self.stats.expired_keys += 1;
        }
        !expired
    }

    /// The live entry under `key` (after lazy expiry).
    pub(crate) fn get(&mut self, key: &[u8], now_ms: u64) -> Option<&Entry> {
        if self.touch(key, now_ms) {
            self.map.get(key)
        } else {
            None
        }
    }

    /// Budget cost of the entry under `key`, 0 if there is none. Call [`Store::touch`] first.
    pub(crate) fn cost(&self, key: &[u8]) -> usize {
        self.map
            .get(key)
            .map_or(0, |e| entry_cost(key.len(), e.value.len()))
    }

    /// Whether replacing entries costing `old` bytes with entries costing `new` bytes keeps
    /// within the budget (writes that do not grow usage always do).
    pub(crate) fn fits(&self, old: usize, new: usize) -> bool {
        match self.limit {
            Some(limit) if new > old => {
                (self.used - old.min(self.used)).saturating_add(new) <= limit
            }
            _ => true,
        }
    }

    /// Stores `value` under `key`. The budget is the caller's check ([`Store::fits`]).
    pub(crate) fn set(&mut self, key: &[u8], value: Vec<u8>, ttl: Ttl) {
        let new_cost = entry_cost(key.len(), value.len());
        if let Some((shared, entry)) = self.map.get_key_value(key) {
            let shared = shared.clone();
            let old_cost = entry_cost(key.len(), entry.value.len());
            self.used = self.used - old_cost + new_cost;
            let old_expiry = entry.expires_at;
            if let Some(entry) = self.map.get_mut(key) {
                entry.value = value;
            }
            if ttl != Ttl::Keep {
                let at = match ttl {
                    Ttl::At(at) => Some(at),
                    _ => None,
                };
                self.reindex(&shared, old_expiry, at);
            }
        } else {
            let shared: Arc<[u8]> = Arc::from(key);
            let expires_at = match ttl {
                Ttl::At(at) => {
                    self.by_expiry.insert((at, shared.clone()));
                    Some(at)
                }
                _ => None,
            };
            self.map.insert(shared, Entry { value, expires_at });
            self.used += new_cost;
        }
    }

    /// Appends to the value of an existing key and returns the new length (`None`: no key).
    pub(crate) fn append(&mut self, key: &[u8], data: &[u8]) -> Option<usize> {
        let entry = self.map.get_mut(key)?;
        entry.value.extend_from_slice(data);
        self.used += data.len();
        Some(entry.value.len())
    }

    /// Sets or clears the expiry time of an existing key; false if there is no such key.
    pub(crate) fn set_expiry(&mut self, key: &[u8], at: Option<u64>) -> bool {
        let Some((shared, entry)) = self.map.get_key_value(key) else {
            return false;
        };
        let (shared, old) = (shared.clone(), entry.expires_at);
        self.reindex(&shared, old, at);
        true
    }

    fn reindex(&mut self, key: &Arc<[u8]>, old: Option<u64>, new: Option<u64>) {
        if old == new {
            return;
        }
        if let Some(at) = old {
            self.by_expiry.remove(&(at, key.clone()));
        }
        if let Some(at) = new {
            self.by_expiry.insert((at, key.clone()));
        }
        if let Some(entry) = self.map.get_mut(&key[..]) {
            entry.expires_at = new;
        }
    }

    /// Removes `key` (expired or not) and returns its entry.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let (shared, entry) = self.map.remove_entry(key)?;
        if let Some(at) = entry.expires_at {
            self.by_expiry.remove(&(at, shared));
        }
        self.used -= entry_cost(key.len(), entry.value.len());
        Some(entry)
    }

    /// Drops every key.
    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.by_expiry.clear();
        self.used = 0;
    }

    /// Number of keys with an expiry time.
    pub(crate) fn expiring(&self) -> usize {
        self.by_expiry.len()
    }

    /// Live keys (not expired at `now_ms`), in byte order.
    pub(crate) fn keys(&self, now_ms: u64) -> impl Iterator<Item = &[u8]> {
        self.map
            .iter()
            .filter(move |(_, e)| !matches!(e.expires_at, Some(at) if now_ms > at))
            .map(|(k, _)| &k[..])
    }

    /// A new client id (`CLIENT ID`, `HELLO`), unique for this store.
    pub(crate) fn new_client_id(&mut self) -> u64 {
        self.last_client_id += 1;
        self.last_client_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_accounting(store: &Store) {
        let used: usize = store
            .map
            .iter()
            .map(|(k, e)| entry_cost(k.len(), e.value.len()))
            .sum();
        assert_eq!(store.used, used);
        let indexed: Vec<_> = store
            .map
            .iter()
            .filter_map(|(k, e)| e.expires_at.map(|at| (at, k.clone())))
            .collect();
        assert_eq!(store.by_expiry.len(), indexed.len());
        for item in indexed {
            assert!(store.by_expiry.contains(&item));
        }
    }

    #[test]
    fn accounting_and_index_follow_every_write() {
        let mut s = Store::new();
        s.set(b"a", b"1".to_vec(), Ttl::At(10));
        s.set(b"b", b"22".to_vec(), Ttl::Clear);
        check_accounting(&s);
        s.set(b"a", b"333".to_vec(), Ttl::Keep);
        assert_eq!(s.map[&b"a"[..]].expires_at, Some(10));
        s.set(b"a", b"4".to_vec(), Ttl::At(20));
        check_accounting(&s);
        s.set(b"a", b"4".to_vec(), Ttl::Clear);
        check_accounting(&s);
        assert_eq!(s.expiring(), 0);
        assert!(s.set_expiry(b"b", Some(5)));
        assert_eq!(s.append(b"b", b"xyz"), Some(5));
        check_accounting(&s);
        assert!(s.remove(b"b").is_some());
        check_accounting(&s);
        assert_eq!(s.used_memory(), entry_cost(1, 1));
        s.clear();
        assert_eq!(s.used_memory(), 0);
    }

    #[test]
    fn lazy_and_active_expiry() {
        let mut s = Store::new();
        for (i, at) in [30u64, 10, 20, 40].into_iter().enumerate() {
            s.set(&[b'k', b'0' + i as u8], b"v".to_vec(), Ttl::At(at));
        }
        s.set(b"forever", b"v".to_vec(), Ttl::Clear);
        assert_eq!(s.next_expiry(), Some(10));
        // Alive up to and including its expiry time, as in Redis.
        assert!(s.touch(b"k1", 10));
        assert_eq!(s.expire_some(10, 100), 0);
        assert_eq!(s.expire_some(31, 1), 1);
        assert!(!s.map.contains_key(&b"k1"[..]));
        assert_eq!(s.expire_some(31, 100), 2);
        assert_eq!(s.len(), 2);
        assert_eq!(s.keys(41).count(), 1);
        assert!(!s.touch(b"k3", 41));
        assert_eq!(s.len(), 1);
        assert_eq!(s.stats.expired_keys, 4);
        assert_eq!(s.next_expiry(), None);
        check_accounting(&s);
    }

    #[test]
    fn budget_refuses_only_growth() {
        let mut s = Store::with_limit(entry_cost(1, 10));
        assert!(s.fits(0, entry_cost(1, 10)));
        assert!(!s.fits(0, entry_cost(1, 11)));
        s.set(b"a", [0; 10].to_vec(), Ttl::Clear);
        assert!(!s.fits(s.cost(b"a"), entry_cost(1, 11)));
        assert!(s.fits(s.cost(b"a"), entry_cost(1, 3)));
        assert!(s.fits(s.cost(b"a"), s.cost(b"a")));
    }
}

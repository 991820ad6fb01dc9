//! The isolate-local session cache (L1), in front of Workers KV.
//!
//! A KV read is a subrequest: on plain workerd it was the most expensive single step of a
//! session request after the forward itself (docs/BENCHMARKS.md, "Edge on workerd"). An
//! isolate serves many requests of the same few sessions, so it keeps what KV (or the
//! origin) just told it for `EDGE_L1_TTL` seconds: a positive entry (the session's record)
//! or a negative one (the origin refused the token).
//!
//! Consistency: an entry is never served past its own session expiry (the record is still
//! checked with `is_honoured`), and a logout through this isolate removes it at once. A
//! logout handled by *another* isolate is seen here when the entry ages out, at most
//! `EDGE_L1_TTL` later. That is inside the window KV already has: KV caches a read at each
//! Cloudflare location for at least 60 s, which is why the TTL is capped at
//! [`MAX_L1_TTL_SECS`]. `EDGE_L1_TTL=0` turns the cache off.
//!
//! Memory is bounded: at most [`MAX_L1_ENTRIES`] entries (a record is a few hundred
//! bytes). Every entry lives the same TTL, so insertion order is expiry order: a queue of
//! insertions is enough to drop the expired and, when full, the oldest entries, in O(1)
//! amortised per request.

use std::collections::{HashMap, VecDeque};

/// `EDGE_L1_TTL` when unset, seconds.
pub const DEFAULT_L1_TTL_SECS: u64 = 10;
/// The longest `EDGE_L1_TTL` accepted: KV's own minimum cache time at a location.
pub const MAX_L1_TTL_SECS: u64 = 60;
/// The most entries one isolate keeps.
pub const MAX_L1_ENTRIES: usize = 10_000;

/// What an isolate remembers about one session hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<V> {
    /// Valid when it was cached: the session's record.
    Valid(V),
    /// The origin refused the token.
    Refused,
}

struct Slot<V> {
    entry: Entry<V>,
    stored_ms: u64,
}

/// A time-bounded, size-bounded map from session hash to [`Entry`]. Time is passed in
/// (milliseconds), so the cache is pure and tested on the host.
pub struct LocalCache<V> {
    ttl_ms: u64,
    capacity: usize,
    slots: HashMap<String, Slot<V>>,
    /// `(key, stored_ms)` in insertion order; a pair whose time no longer matches the
    /// slot's was superseded by a later insert and is skipped.
    order: VecDeque<(String, u64)>,
}

impl<V: Clone> LocalCache<V> {
    /// A cache whose entries live `ttl_secs` (0: nothing is kept) and that holds at most
    /// `capacity` entries.
    pub fn new(ttl_secs: u64, capacity: usize) -> Self {
        Self {
            ttl_ms: ttl_secs.saturating_mul(1000),
            capacity,
            slots: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether the cache keeps anything at all.
    pub fn enabled(&self) -> bool {
        self.ttl_ms > 0 && self.capacity > 0
    }

    /// The entry for `key` if it was stored less than the TTL before `now_ms`.
    pub fn get(&mut self, key: &str, now_ms: u64) -> Option<Entry<V>> {
        self.expire(now_ms);
        // The slot's own age is checked too: should the clock ever step back, the queue
        // is no longer in time order and `expire` may stop early.
        self.slots
            .get(key)
            .filter(|s| now_ms.saturating_sub(s.stored_ms) < self.ttl_ms)
            .map(|s| s.entry.clone())
    }

    /// Stores `entry` for `key` at `now_ms`, replacing any earlier one.
    pub fn put(&mut self, key: &str, entry: Entry<V>, now_ms: u64) {
        if !self.enabled() {
            return;
        }
        self.expire(now_ms);
        while self.slots.len() >= self.capacity && !self.slots.contains_key(key) {
            if !self.drop_oldest() {
                break;
            }
        }
        self.slots.insert(
            key.to_owned(),
            Slot {
                entry,
                stored_ms: now_ms,
            },
        );
        self.order.push_back((key.to_owned(), now_ms));
        // Superseded pairs accumulate when one key is refreshed often; compact then.
        if self.order.len() > 2 * self.capacity.max(16) {
            let slots = &self.slots;
            self.order
                .retain(|(k, t)| slots.get(k).is_some_and(|s| s.stored_ms == *t));
        }
    }

    /// Forgets `key` (a logout through this isolate).
    pub fn remove(&mut self, key: &str) {
        self.slots.remove(key);
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((_, stored)) = self.order.front() {
            if now_ms.saturating_sub(*stored) < self.ttl_ms {
                break;
            }
            self.drop_oldest();
        }
    }

    /// Drops the oldest live pair's slot; false when the queue is empty.
    fn drop_oldest(&mut self) -> bool {
        let Some((key, stored)) = self.order.pop_front() else {
            return false;
        };
        if self.slots.get(&key).is_some_and(|s| s.stored_ms == stored) {
            self.slots.remove(&key);
        }
        true
    }
}

/// `EDGE_L1_TTL`: seconds, `0` turns the cache off; unset → [`DEFAULT_L1_TTL_SECS`];
/// above [`MAX_L1_TTL_SECS`] or not a number → an error naming the variable.
pub fn parse_ttl(value: Option<&str>) -> Result<u64, String> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_L1_TTL_SECS);
    };
    match v.parse::<u64>() {
        Ok(n) if n <= MAX_L1_TTL_SECS => Ok(n),
        _ => Err(format!(
            "EDGE_L1_TTL {v:?} is not a number of seconds from 0 to {MAX_L1_TTL_SECS}"
        )),
    }
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::{Entry, LocalCache, MAX_L1_ENTRIES};
    use gateway_shared::session::{SessionHash, SessionRecord};
    use std::cell::RefCell;

    thread_local! {
        // One per isolate; the TTL is set from the config on first use.
        static CACHE: RefCell<Option<LocalCache<SessionRecord>>> = const { RefCell::new(None) };
    }

    fn with<T>(ttl_secs: u64, f: impl FnOnce(&mut LocalCache<SessionRecord>) -> T) -> T {
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            let cache = c.get_or_insert_with(|| LocalCache::new(ttl_secs, MAX_L1_ENTRIES));
            f(cache)
        })
    }

    /// What this isolate remembers about `session`.
    pub fn get(ttl_secs: u64, session: &SessionHash) -> Option<Entry<SessionRecord>> {
        with(ttl_secs, |c| {
            c.get(session.as_str(), crate::time::now_millis())
        })
    }

    /// Remembers `entry` for `session`.
    pub fn put(ttl_secs: u64, session: &SessionHash, entry: Entry<SessionRecord>) {
        with(ttl_secs, |c| {
            c.put(session.as_str(), entry, crate::time::now_millis())
        })
    }

    /// Forgets `session` (its logout went through this isolate).
    pub fn forget(session: &SessionHash) {
        CACHE.with(|c| {
            if let Some(cache) = c.borrow_mut().as_mut() {
                cache.remove(session.as_str());
            }
        });
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{forget, get, put};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_lives_exactly_the_ttl() {
        let mut c = LocalCache::new(10, 100);
        c.put("a", Entry::Valid(1), 1_000);
        assert_eq!(c.get("a", 1_000), Some(Entry::Valid(1)));
        assert_eq!(c.get("a", 10_999), Some(Entry::Valid(1)));
        assert_eq!(c.get("a", 11_000), None);
        assert!(c.is_empty());
    }

    #[test]
    fn a_refresh_restarts_the_clock_and_the_stale_queue_pair_is_ignored() {
        let mut c = LocalCache::new(10, 100);
        c.put("a", Entry::Valid(1), 0);
        c.put("a", Entry::Valid(2), 5_000);
        // The first pair expires at 10 s; it must not take the refreshed slot with it.
        assert_eq!(c.get("a", 12_000), Some(Entry::Valid(2)));
        assert_eq!(c.get("a", 15_000), None);
    }

    #[test]
    fn negatives_are_kept_and_a_logout_forgets_at_once() {
        let mut c: LocalCache<u8> = LocalCache::new(10, 100);
        c.put("bad", Entry::Refused, 0);
        assert_eq!(c.get("bad", 1), Some(Entry::Refused));
        c.put("s", Entry::Valid(7), 0);
        c.remove("s");
        assert_eq!(c.get("s", 1), None);
    }

    #[test]
    fn capacity_drops_the_oldest_first() {
        let mut c = LocalCache::new(60, 3);
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            c.put(k, Entry::Valid(i), i as u64);
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("a", 10), None);
        assert_eq!(c.get("d", 10), Some(Entry::Valid(3)));
        // Refreshing a held key at capacity evicts nobody.
        c.put("b", Entry::Valid(9), 11);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("c", 12), Some(Entry::Valid(2)));
    }

    #[test]
    fn one_hot_key_refreshed_forever_keeps_the_queue_bounded() {
        let mut c = LocalCache::new(60, 4);
        for t in 0..10_000u64 {
            c.put("hot", Entry::Valid(t), t);
        }
        assert!(c.order.len() <= 2 * 16 + 1, "{}", c.order.len());
        assert_eq!(c.get("hot", 10_000), Some(Entry::Valid(9_999)));
    }

    #[test]
    fn a_clock_that_steps_back_never_serves_an_entry_past_its_ttl() {
        let mut c = LocalCache::new(10, 100);
        c.put("new", Entry::Valid(1), 50_000);
        c.put("old", Entry::Valid(2), 1_000); // the clock stepped back 49 s
        assert_eq!(c.get("old", 11_000), None);
        assert_eq!(c.get("new", 55_000), Some(Entry::Valid(1)));
        assert_eq!(c.get("new", 60_000), None);
    }

    #[test]
    fn ttl_zero_keeps_nothing() {
        let mut c = LocalCache::new(0, 100);
        assert!(!c.enabled());
        c.put("a", Entry::Valid(1), 0);
        assert_eq!(c.get("a", 0), None);
    }

    #[test]
    fn the_ttl_variable_is_bounded_by_kvs_own_cache_time() {
        assert_eq!(parse_ttl(None), Ok(DEFAULT_L1_TTL_SECS));
        assert_eq!(parse_ttl(Some(" ")), Ok(DEFAULT_L1_TTL_SECS));
        assert_eq!(parse_ttl(Some("0")), Ok(0));
        assert_eq!(parse_ttl(Some("60")), Ok(60));
        assert!(parse_ttl(Some("61")).unwrap_err().contains("EDGE_L1_TTL"));
        assert!(parse_ttl(Some("-1")).is_err());
        assert!(parse_ttl(Some("ten")).is_err());
    }
}

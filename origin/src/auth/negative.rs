//! Invalid tokens are cheap: the replica's negative cache of tokens NoETL called invalid,
//! and the coalescing of concurrent validations of one token into one NoETL call.
//!
//! - [`NegativeCache`]: session hashes NoETL answered "invalid" (or a session already
//!   over) for, kept `SESSION_NEGATIVE_TTL` (10 s) in memory, at most [`NEGATIVE_MAX`]
//!   of them. Only a definite answer is remembered — never an error or a timeout — and
//!   the session service consults it only after the shared cache has no live entry for
//!   the token, so a session created by a login (cached at once) is never hidden by it.
//!   A full cache first drops expired entries (at most every quarter TTL), then simply
//!   stops remembering: distinct random tokens never repeat, so losing them costs
//!   nothing the rate limits do not bound already.
//! - [`Coalescer`]: concurrent validations of one token share one NoETL call (one auth
//!   playbook run in `AUTH_MODE=playbook`). The call runs in its own task, so it finishes
//!   — and leaves the in-flight map — even if every caller waiting for it went away.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use gateway_shared::session::SessionHash;

/// The most tokens a replica remembers as invalid (~80 bytes each).
pub const NEGATIVE_MAX: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Session hashes NoETL said are not a session, each until its TTL ends.
#[derive(Debug)]
pub struct NegativeCache {
    ttl: Duration,
    max: usize,
    state: Mutex<NegState>,
}

#[derive(Debug)]
struct NegState {
    until: HashMap<[u8; 32], Instant>,
    next_sweep: Instant,
}

/// The 32 bytes of a session hash (its hex decoded): a compact key.
pub(super) fn key_of(hash: &SessionHash) -> [u8; 32] {
    let hex = hash.as_str().as_bytes();
    let nibble = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        _ => c.wrapping_sub(b'a').wrapping_add(10) & 0x0f,
    };
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]);
    }
    out
}

impl NegativeCache {
    /// A cache keeping each entry `ttl` (zero: never remembers), at most `max` entries.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            state: Mutex::new(NegState {
                until: HashMap::new(),
                next_sweep: Instant::now(),
            }),
        }
    }

    /// Whether NoETL called `hash` invalid within the TTL.
    pub fn contains(&self, hash: &SessionHash) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let key = key_of(hash);
        lock(&self.state)
            .until
            .get(&key)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// Remembers `hash` as invalid for the TTL (unless the cache is full of live entries).
    pub fn insert(&self, hash: &SessionHash) {
        if self.ttl.is_zero() {
            return;
        }
        let key = key_of(hash);
        let now = Instant::now();
        let mut st = lock(&self.state);
        if st.until.len() >= self.max && !st.until.contains_key(&key) {
            if now < st.next_sweep {
                return;
            }
            st.until.retain(|_, until| now < *until);
            st.next_sweep = now + (self.ttl / 4).max(Duration::from_millis(100));
            if st.until.len() >= self.max {
                return;
            }
        }
        st.until.insert(key, now + self.ttl);
    }

    /// Forgets `hash` (a session was just created or confirmed for it).
    pub fn remove(&self, hash: &SessionHash) {
        if self.ttl.is_zero() {
            return;
        }
        lock(&self.state).until.remove(&key_of(hash));
    }

    /// Entries held, live or not yet swept.
    pub fn len(&self) -> usize {
        lock(&self.state).until.len()
    }

    /// No entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

/// One in-flight computation per key; later callers for the same key wait for its answer.
pub struct Coalescer<K, V: Clone> {
    inflight: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V: Clone> Default for Coalescer<K, V> {
    fn default() -> Self {
        Self {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The answer for `key`: `work`'s, run in a task of its own, or — when a computation
    /// for `key` is already in flight — that one's (`work` is then dropped unrun). The
    /// flag says the answer was shared. `None` if the task panicked.
    pub async fn run<F>(&self, key: K, work: F) -> (Option<V>, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (flight, joined) = {
            let mut map = lock(&self.inflight);
            match map.get(&key) {
                Some(f) => (f.clone(), true),
                None => {
                    let inflight = self.inflight.clone();
                    let done_key = key.clone();
                    // The task removes its key only after this insert: it needs the lock.
                    let task = tokio::spawn(async move {
                        let v = work.await;
                        lock(&inflight).remove(&done_key);
                        v
                    });
                    let flight = async move { task.await.ok() }.boxed().shared();
                    map.insert(key, flight.clone());
                    (flight, false)
                }
            }
        };
        (flight.await, joined)
    }

    /// Computations in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn h(s: &str) -> SessionHash {
        SessionHash::of(s)
    }

    #[test]
    fn entries_live_for_the_ttl_and_a_zero_ttl_remembers_nothing() {
        let c = NegativeCache::new(Duration::from_millis(50), 10);
        c.insert(&h("a"));
        assert!(c.contains(&h("a")) && !c.contains(&h("b")));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.contains(&h("a")), "expired");
        c.insert(&h("a"));
        c.remove(&h("a"));
        assert!(!c.contains(&h("a")), "removed");
        let off = NegativeCache::new(Duration::ZERO, 10);
        off.insert(&h("a"));
        assert!(!off.contains(&h("a")) && off.is_empty());
    }

    #[test]
    fn a_full_cache_sweeps_expired_entries_then_stops_growing() {
        let c = NegativeCache::new(Duration::from_millis(30), 100);
        for i in 0..100 {
            c.insert(&h(&i.to_string()));
        }
        c.insert(&h("over"));
        assert_eq!(c.len(), 100, "full of live entries: not remembered");
        assert!(!c.contains(&h("over")));
        std::thread::sleep(Duration::from_millis(120));
        c.insert(&h("later"));
        assert_eq!(c.len(), 1, "expired entries swept");
        assert!(c.contains(&h("later")));
    }

    #[test]
    fn keys_are_the_hash_bytes() {
        let a = h("token-a");
        let k = key_of(&a);
        assert_eq!(hex_of(&k), a.as_str());
        assert_ne!(key_of(&h("token-b")), k);
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_the_key_is_freed_after() {
        let c: Arc<Coalescer<u8, u32>> = Arc::new(Coalescer::default());
        let runs = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (c, runs) = (c.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                c.run(1, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        let mut joined = 0;
        for t in tasks {
            let (v, j) = t.await.unwrap();
            assert_eq!(v, Some(7));
            joined += u32::from(j);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for 20 callers");
        assert_eq!(joined, 19);
        assert_eq!(c.in_flight(), 0);
        let (v, j) = c.run(1, async { 8 }).await;
        assert_eq!((v, j), (Some(8), false), "a later caller runs anew");
    }

    #[tokio::test]
    async fn a_run_whose_callers_left_still_finishes_and_frees_its_key() {
        let c: Coalescer<u8, u32> = Coalescer::default();
        let call = c.run(1, async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            1
        });
        // Polled once, then dropped: the caller went away.
        let _ = tokio::time::timeout(Duration::from_millis(5), call).await;
        assert_eq!(c.in_flight(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(c.in_flight(), 0, "the run ended in its own task");
    }
}

//! The embedded [`KvStore`]: process memory, used when `NATS_URL` is unset.
//!
//! It exists so that one origin replica runs (and its tests run) without a NATS server,
//! while behaving like the NATS store in everything the gateway relies on — the shared
//! conformance suite (`tests/tests/kv_conformance.rs`) holds both to the same contract.
//!
//! Decisions:
//! - **TTL is exact and checked on read**: an entry carries its deadline and is invisible
//!   from that instant on, whether or not it has been removed yet. The clock is
//!   [`tokio::time::Instant`], so tests that pause tokio's clock also move expiry.
//! - **Memory stays bounded without a task**: each write sweeps its bucket when the bucket's
//!   sweep interval (half its TTL, at most a minute) has passed. Entries left over when writes
//!   stop are bounded by the writes that came before, and nothing needs to outlive the store.
//! - **Watch is one broadcast channel per bucket**, sent to while the bucket's lock is held
//!   so every watcher sees changes in write order. A watcher that falls behind never slows a
//!   writer: it loses the backlog and is handed the key's current state instead. A
//!   bucket-wide watch is the same channel subscribed under the lock that snapshots the
//!   initial values; one that falls behind ends (its owner watches again).

use super::{
    is_valid_key, Bucket, BucketTtls, BucketWatchItem, KvEvent, KvStore, StoreError, Versioned,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// How many changes a bucket's watchers may fall behind before they are resynchronised.
const WATCH_BACKLOG: usize = 1024;

/// The longest a bucket goes between sweeps while it is being written to.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The in-process K/V store; cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct MemoryKv {
    inner: Arc<Inner>,
}

struct Inner {
    buckets: [BucketState; Bucket::ALL.len()],
}

struct BucketState {
    ttl: Duration,
    entries: Mutex<Entries>,
    events: broadcast::Sender<KvEvent>,
}

/// One bucket's entries and the pure TTL rules over them (every method takes `now`).
#[derive(Debug)]
struct Entries {
    map: HashMap<String, Entry>,
    /// The revision the next write gets (1 upwards; 0 is "nothing there").
    next_revision: u64,
    sweep_every: Duration,
    next_sweep: Instant,
}

#[derive(Debug)]
struct Entry {
    value: Bytes,
    /// When it was written, in the bucket's order of writes.
    revision: u64,
    /// `None`: never expires (a zero bucket TTL, or a deadline past the clock's range).
    expires_at: Option<Instant>,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|deadline| now < deadline)
    }
}

/// The TTL an entry actually gets: the requested one capped at the bucket's. A zero bucket
/// TTL means "no expiry", as `max_age = 0` does in NATS.
fn effective_ttl(bucket_ttl: Duration, requested: Duration) -> Duration {
    if bucket_ttl.is_zero() {
        requested
    } else {
        requested.min(bucket_ttl)
    }
}

/// How often a bucket is swept: often enough that expired entries never outnumber live
/// ones by much, rarely enough that a sweep costs little per write.
fn sweep_interval(bucket_ttl: Duration) -> Duration {
    if bucket_ttl.is_zero() {
        MAX_SWEEP_INTERVAL
    } else {
        (bucket_ttl / 2).clamp(Duration::from_millis(10), MAX_SWEEP_INTERVAL)
    }
}

impl Entries {
    fn new(bucket_ttl: Duration, now: Instant) -> Self {
        let sweep_every = sweep_interval(bucket_ttl);
        Self {
            map: HashMap::new(),
            next_revision: 1,
            sweep_every,
            next_sweep: now + sweep_every,
        }
    }

    fn get(&self, key: &str, now: Instant) -> Option<&Bytes> {
        self.map
            .get(key)
            .filter(|e| e.is_live(now))
            .map(|e| &e.value)
    }

    /// The live value under `key` and its revision (0 and `None` when there is none).
    fn versioned(&self, key: &str, now: Instant) -> Versioned {
        match self.map.get(key).filter(|e| e.is_live(now)) {
            Some(e) => Versioned {
                value: Some(e.value.clone()),
                revision: e.revision,
            },
            None => Versioned {
                value: None,
                revision: 0,
            },
        }
    }

    /// Stores `value` for `ttl` (`None`: forever).
    fn insert(&mut self, key: &str, value: Bytes, ttl: Option<Duration>, now: Instant) {
        self.sweep_if_due(now);
        let expires_at = ttl.and_then(|ttl| now.checked_add(ttl));
        let revision = self.next_revision;
        self.next_revision += 1;
        self.map.insert(
            key.to_owned(),
            Entry {
                value,
                revision,
                expires_at,
            },
        );
    }

    /// Every live entry (the initial values of a bucket-wide watch).
    fn snapshot(&self, now: Instant) -> Vec<(String, Bytes)> {
        self.map
            .iter()
            .filter(|(_, e)| e.is_live(now))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    fn remove(&mut self, key: &str, now: Instant) {
        self.sweep_if_due(now);
        self.map.remove(key);
    }

    fn sweep_if_due(&mut self, now: Instant) {
        if now >= self.next_sweep {
            self.map.retain(|_, e| e.is_live(now));
            self.next_sweep = now + self.sweep_every;
        }
    }
}

impl MemoryKv {
    /// An empty store whose buckets expire entries after `ttls`. Needs no runtime: nothing
    /// is spawned.
    pub fn new(ttls: BucketTtls) -> Self {
        let now = Instant::now();
        let bucket = |b: Bucket| {
            let ttl = ttls.of(b);
            BucketState {
                ttl,
                entries: Mutex::new(Entries::new(ttl, now)),
                events: broadcast::channel(WATCH_BACKLOG).0,
            }
        };
        Self {
            inner: Arc::new(Inner {
                buckets: Bucket::ALL.map(bucket),
            }),
        }
    }
}

impl Inner {
    fn bucket(&self, bucket: Bucket) -> &BucketState {
        &self.buckets[bucket.index()]
    }
}

impl BucketState {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding this lock cannot leave the map half-updated (each
        // operation is one HashMap call), so a poisoned lock is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TTL an entry gets: the bucket's for `None`, else the requested one capped at
    /// the bucket's; `None` back means "forever" (a zero bucket TTL).
    fn ttl_for(&self, requested: Option<Duration>) -> Option<Duration> {
        match requested {
            None if self.ttl.is_zero() => None,
            None => Some(self.ttl),
            Some(ttl) => Some(effective_ttl(self.ttl, ttl)),
        }
    }

    /// Stores and reports a value; `ttl` as in [`Self::ttl_for`].
    fn store(&self, key: &str, value: Bytes, ttl: Option<Duration>) {
        self.store_if(key, value, ttl, |_, _| true);
    }

    /// Stores and reports a value (`ttl` as in [`Self::ttl_for`]) if `allowed` says so of
    /// the bucket's entries as they are, all under the bucket's lock: false when it did
    /// not (a create, an update or a lease that lost).
    fn store_if(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        allowed: impl FnOnce(&Entries, Instant) -> bool,
    ) -> bool {
        let ttl = self.ttl_for(ttl);
        let mut entries = self.lock();
        let now = Instant::now();
        if !allowed(&entries, now) {
            return false;
        }
        entries.insert(key, value.clone(), ttl, now);
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(KvEvent::Put {
            key: key.to_owned(),
            value,
        });
        true
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if is_valid_key(key) {
        Ok(())
    } else {
        Err(StoreError::InvalidKey(key.to_owned()))
    }
}

fn event_key(event: &KvEvent) -> &str {
    match event {
        KvEvent::Put { key, .. } | KvEvent::Delete { key } => key,
    }
}

#[async_trait]
impl KvStore for MemoryKv {
    async fn get(&self, bucket: Bucket, key: &str) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let entries = self.inner.bucket(bucket).lock();
        Ok(entries.get(key, Instant::now()).cloned())
    }

    async fn put(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        self.inner.bucket(bucket).store(key, value, None);
        Ok(())
    }

    async fn put_with_ttl(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        self.inner.bucket(bucket).store(key, value, Some(ttl));
        Ok(())
    }

    async fn create(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<bool, StoreError> {
        check_key(key)?;
        Ok(self
            .inner
            .bucket(bucket)
            .store_if(key, value, None, |entries, now| {
                entries.get(key, now).is_none()
            }))
    }

    async fn get_versioned(&self, bucket: Bucket, key: &str) -> Result<Versioned, StoreError> {
        check_key(key)?;
        let entries = self.inner.bucket(bucket).lock();
        Ok(entries.versioned(key, Instant::now()))
    }

    async fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        Ok(self
            .inner
            .bucket(bucket)
            .store_if(key, value, None, |entries, now| {
                entries.versioned(key, now).revision == revision
            }))
    }

    async fn lease(
        &self,
        bucket: Bucket,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        let value = Bytes::copy_from_slice(holder.as_bytes());
        Ok(self
            .inner
            .bucket(bucket)
            .store_if(key, value, Some(ttl), |entries, now| {
                entries
                    .get(key, now)
                    .is_none_or(|current| current.as_ref() == holder.as_bytes())
            }))
    }

    async fn delete(&self, bucket: Bucket, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let b = self.inner.bucket(bucket);
        let mut entries = b.lock();
        entries.remove(key, Instant::now());
        // Reported even when nothing was there, as NATS does (it writes a delete marker).
        let _ = b.events.send(KvEvent::Delete {
            key: key.to_owned(),
        });
        Ok(())
    }

    async fn watch(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> Result<BoxStream<'static, KvEvent>, StoreError> {
        check_key(key)?;
        // Subscribed before returning: every change after this call is delivered.
        let rx = self.inner.bucket(bucket).events.subscribe();
        let watcher = Watcher {
            rx,
            // Weak: a watch must not keep a dropped store (and its sender) alive, so the
            // stream ends when the store goes.
            store: Arc::downgrade(&self.inner),
            bucket,
            key: key.to_owned(),
        };
        Ok(stream::unfold(watcher, |mut w| async move {
            let event = w.next_event().await?;
            Some((event, w))
        })
        .boxed())
    }

    async fn watch_bucket(
        &self,
        bucket: Bucket,
    ) -> Result<BoxStream<'static, BucketWatchItem>, StoreError> {
        let b = self.inner.bucket(bucket);
        // Subscribed under the lock that takes the snapshot: a change is either in the
        // snapshot or on the channel, never in neither.
        let (rx, initial) = {
            let entries = b.lock();
            (b.events.subscribe(), entries.snapshot(Instant::now()))
        };
        let initial = initial
            .into_iter()
            .map(|(key, value)| BucketWatchItem::Change(KvEvent::Put { key, value }))
            .chain(std::iter::once(BucketWatchItem::Current));
        let changes = stream::unfold(rx, move |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((BucketWatchItem::Change(event), rx)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        bucket = bucket.name(),
                        missed,
                        "memory K/V bucket watcher fell behind; ending it so it starts over"
                    );
                    None
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(stream::iter(initial).chain(changes).boxed())
    }

    async fn is_healthy(&self) -> bool {
        true
    }
}

/// One `watch` call's state: the bucket's broadcast filtered down to one key.
struct Watcher {
    rx: broadcast::Receiver<KvEvent>,
    store: Weak<Inner>,
    bucket: Bucket,
    key: String,
}

impl Watcher {
    async fn next_event(&mut self) -> Option<KvEvent> {
        loop {
            match self.rx.recv().await {
                Ok(event) if event_key(&event) == self.key => return Some(event),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return self.resynchronise(missed);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// After falling behind, the missed changes are gone: report the key's current state
    /// instead, so the watcher ends up where the store is. Resubscribing before reading
    /// under the lock means no later change is lost or seen out of order.
    fn resynchronise(&mut self, missed: u64) -> Option<KvEvent> {
        let store = self.store.upgrade()?;
        let bucket = store.bucket(self.bucket);
        let entries = bucket.lock();
        self.rx = bucket.events.subscribe();
        tracing::warn!(
            bucket = self.bucket.name(),
            key = %self.key,
            missed,
            "memory K/V watcher fell behind; reporting the key's current state"
        );
        Some(match entries.get(&self.key, Instant::now()) {
            Some(value) => KvEvent::Put {
                key: self.key.clone(),
                value: value.clone(),
            },
            None => KvEvent::Delete {
                key: self.key.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn an_entry_is_visible_until_the_instant_its_ttl_ends() {
        let t0 = Instant::now();
        let mut e = Entries::new(10 * SEC, t0);
        e.insert("k", Bytes::from_static(b"v"), Some(2 * SEC), t0);
        assert!(e.get("k", t0).is_some());
        assert!(e.get("k", t0 + 2 * SEC - Duration::from_nanos(1)).is_some());
        assert!(e.get("k", t0 + 2 * SEC).is_none());
    }

    #[test]
    fn a_requested_ttl_is_capped_at_the_bucket_ttl() {
        assert_eq!(effective_ttl(5 * SEC, 60 * SEC), 5 * SEC);
        assert_eq!(effective_ttl(5 * SEC, SEC), SEC);
        assert_eq!(effective_ttl(Duration::ZERO, 7 * SEC), 7 * SEC);
    }

    #[test]
    fn a_zero_bucket_ttl_keeps_plain_puts_forever_like_nats_max_age_zero() {
        let kv = MemoryKv::new(BucketTtls {
            sessions: Duration::ZERO,
            ..BucketTtls::default()
        });
        let b = kv.inner.bucket(Bucket::Sessions);
        assert_eq!(b.ttl_for(None), None);
        assert_eq!(b.ttl_for(Some(SEC)), Some(SEC));
    }

    #[test]
    fn the_sweep_interval_is_half_the_ttl_within_bounds() {
        assert_eq!(sweep_interval(10 * SEC), 5 * SEC);
        assert_eq!(sweep_interval(24 * 3600 * SEC), MAX_SWEEP_INTERVAL);
        assert_eq!(
            sweep_interval(Duration::from_millis(2)),
            Duration::from_millis(10)
        );
        assert_eq!(sweep_interval(Duration::ZERO), MAX_SWEEP_INTERVAL);
    }

    #[test]
    fn a_write_after_the_sweep_interval_drops_expired_entries() {
        let t0 = Instant::now();
        let mut e = Entries::new(2 * SEC, t0);
        for i in 0..100 {
            e.insert(&format!("old{i}"), Bytes::new(), Some(2 * SEC), t0);
        }
        // Before the interval: expired or not, nothing is swept yet.
        e.insert("early", Bytes::new(), Some(2 * SEC), t0 + SEC / 2);
        assert_eq!(e.map.len(), 101);
        // Past the old entries' deadline and the sweep interval: only live ones remain.
        e.insert("late", Bytes::new(), Some(2 * SEC), t0 + 2 * SEC);
        let mut left: Vec<_> = e.map.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["early", "late"]);
    }

    #[test]
    fn a_deadline_beyond_the_clock_never_expires() {
        let t0 = Instant::now();
        let mut e = Entries::new(Duration::ZERO, t0);
        e.insert("k", Bytes::new(), Some(Duration::MAX), t0);
        assert!(e.get("k", t0 + 3650 * 24 * 3600 * SEC).is_some());
    }

    #[tokio::test]
    async fn a_lagging_watcher_neither_blocks_writers_nor_misses_the_final_state() {
        let kv = MemoryKv::new(BucketTtls::default());
        let mut watch = kv.watch(Bucket::Requests, "k").await.expect("valid key");
        for i in 0..(WATCH_BACKLOG * 3) {
            kv.put(Bucket::Requests, "k", Bytes::from(i.to_string()))
                .await
                .expect("memory put cannot fail");
        }
        let first = watch.next().await.expect("the store is alive");
        assert_eq!(
            first,
            KvEvent::Put {
                key: "k".into(),
                value: Bytes::from((WATCH_BACKLOG * 3 - 1).to_string()),
            }
        );
        kv.delete(Bucket::Requests, "k").await.expect("valid key");
        assert_eq!(
            watch.next().await,
            Some(KvEvent::Delete { key: "k".into() })
        );
    }

    #[tokio::test]
    async fn a_watch_ends_when_the_store_is_dropped() {
        let kv = MemoryKv::new(BucketTtls::default());
        let mut watch = kv.watch(Bucket::Sessions, "k").await.expect("valid key");
        drop(kv);
        assert_eq!(watch.next().await, None);
    }
}

//! The revocation set: every replica's in-memory copy of K/V `revoked`.
//!
//! A logout (or a session NoETL reports invalid) writes a marker under the session hash in
//! the `revoked` bucket; [`Revocations::spawn_watch`] keeps a bucket-wide watch on it
//! ([`KvStore::watch_bucket`]: the initial values, then changes), so every replica learns of
//! a revocation within one NATS round trip and the [`Caller`](super::Caller) checks it
//! with a map lookup — no K/V read on the hot path.
//!
//! Decisions:
//! - **Current or not.** The set is *current* once the watch has delivered every initial
//!   value, and stops being current the moment the watch ends (the store lost its
//!   connection, or the watcher fell behind). While it is not current, a caller proven only
//!   by an edge assertion is refused with 503 `revocations_unavailable` (retryable) and a
//!   token caller's revocation is read from K/V directly — a failed read is 503 too, never
//!   a pass. The watch is restarted with backoff and starts over from the initial values.
//! - **A marker is kept until the session's own expiry.** Its value is
//!   [`RevocationMarker`] (`{"expires_at_unix":…}`), its K/V TTL the session's remaining
//!   life; the set drops an entry once that instant has passed (the session is expired
//!   then anyway). A marker this version cannot read counts as revoked for `fallback_keep`.
//! - **Open connections are told.** An SSE stream or a WebSocket holds a [`SessionEnd`]
//!   for its session: a cancellation token cancelled the moment the hash enters the set,
//!   whichever replica wrote the marker. No polling.
//! - **A known revocation always holds**: a hash in the set is refused even while the set
//!   is not current.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use gateway_shared::session::SessionHash;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::{Bucket, BucketWatchItem, KvEvent, KvStore};

/// First delay before the watch is restarted after it ended or failed to start.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest delay between two restarts of the watch.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often expired entries are dropped from the set.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The value of a K/V `revoked` marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationMarker {
    /// When the revoked session would have expired (seconds since the epoch): the marker
    /// is kept until then.
    pub expires_at_unix: i64,
}

impl RevocationMarker {
    /// The marker as stored.
    pub fn to_bytes(self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self).expect("a marker is plain data"))
    }

    /// The expiry a stored marker names; one this version cannot read (e.g. the older
    /// `"1"`) is kept until `now + fallback_keep`.
    pub fn expiry_of(value: &[u8], now_unix: i64, fallback_keep: Duration) -> i64 {
        serde_json::from_slice::<RevocationMarker>(value)
            .map(|m| m.expires_at_unix)
            .unwrap_or_else(|_| {
                now_unix.saturating_add(i64::try_from(fallback_keep.as_secs()).unwrap_or(i64::MAX))
            })
    }
}

/// What the set says about one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationStatus {
    /// Revoked: refuse the session.
    Revoked,
    /// Not revoked, and the set is current: nothing more to check.
    Clear,
    /// Not in the set, but the set is not current: the answer must come from K/V (token
    /// callers) or the caller is refused with 503 (assertion-only callers).
    Unknown,
}

/// The in-memory revocation set, shared by everything in one replica.
pub struct Revocations {
    /// Session hash → the session's expiry (seconds since the epoch).
    revoked: RwLock<HashMap<SessionHash, i64>>,
    current: AtomicBool,
    /// Session hash → the open connections of that session.
    listeners: Mutex<HashMap<SessionHash, Listener>>,
    /// How long a marker whose value cannot be read is kept.
    fallback_keep: Duration,
}

/// The open connections of one session: told together when it is revoked.
struct Listener {
    /// Cancelled on revocation.
    token: CancellationToken,
    /// The session's hash, shared by every [`SessionEnd`] of it (one copy per session, not
    /// per connection: an SSE stream's footprint is counted in bytes).
    key: Arc<SessionHash>,
    /// How many connections hold it.
    holders: usize,
    /// Connections' own stop tokens, cancelled too on revocation (see
    /// [`Revocations::session_end_linked`]), by link id: a map, so a stream's close is
    /// not a scan of every stream of its session under the set's lock.
    linked: HashMap<u64, CancellationToken>,
    next_link: u64,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("len", &self.len())
            .field("current", &self.is_current())
            .finish()
    }
}

impl Revocations {
    /// An empty set, not current until a watch (or [`Self::set_current`]) says so.
    /// `fallback_keep` bounds a marker whose value cannot be read.
    pub fn new(fallback_keep: Duration) -> Arc<Self> {
        Arc::new(Self {
            revoked: RwLock::new(HashMap::new()),
            current: AtomicBool::new(false),
            listeners: Mutex::new(HashMap::new()),
            fallback_keep,
        })
    }

    /// What the set says about session `hash` at `now_unix`.
    pub fn status(&self, hash: &SessionHash, now_unix: i64) -> RevocationStatus {
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .is_some_and(|&exp| exp > now_unix);
        if revoked {
            RevocationStatus::Revoked
        } else if self.is_current() {
            RevocationStatus::Clear
        } else {
            RevocationStatus::Unknown
        }
    }

    /// True once the watch has delivered every marker, until it ends.
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }

    /// Marks the set current or not (the watch task; tests).
    pub fn set_current(&self, current: bool) {
        let was = self.current.swap(current, Ordering::AcqRel);
        if was != current {
            tracing::info!(
                current,
                entries = self.len(),
                "revocation set current: {current}"
            );
        }
    }

    /// How many revocations the set holds.
    pub fn len(&self) -> usize {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True if the set holds no revocation.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a revocation of `hash` until `expires_at_unix`, and ends the session's open
    /// connections on this replica.
    pub fn insert(&self, hash: &SessionHash, expires_at_unix: i64) {
        {
            let mut map = self.revoked.write().unwrap_or_else(|p| p.into_inner());
            let exp = map.entry(hash.clone()).or_insert(expires_at_unix);
            *exp = (*exp).max(expires_at_unix);
        }
        self.tell(hash);
    }

    /// Tells the open connections of session `hash` that it is revoked.
    fn tell(&self, hash: &SessionHash) {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = listeners.get(hash) {
            l.token.cancel();
            for linked in l.linked.values() {
                linked.cancel();
            }
        }
    }

    /// Forgets a revocation (its marker was deleted from K/V, e.g. by an operator).
    pub fn remove(&self, hash: &SessionHash) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash);
    }

    /// Drops entries whose session has expired by `now_unix`.
    pub fn sweep(&self, now_unix: i64) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, exp| *exp > now_unix);
    }

    /// Applies one watch item at `now_unix` (a key that is not a session hash is ignored).
    pub fn apply(&self, item: BucketWatchItem, now_unix: i64) {
        match item {
            BucketWatchItem::Change(KvEvent::Put { key, value }) => {
                let Some(hash) = parse_key(&key) else { return };
                let exp = RevocationMarker::expiry_of(&value, now_unix, self.fallback_keep);
                if exp > now_unix {
                    self.insert(&hash, exp);
                }
            }
            BucketWatchItem::Change(KvEvent::Delete { key }) => {
                if let Some(hash) = parse_key(&key) {
                    self.remove(&hash);
                }
            }
            BucketWatchItem::Current => self.set_current(true),
        }
    }

    /// A handle that is told when session `hash` is revoked (already cancelled if it is).
    /// Held by an open connection for as long as it lives.
    pub fn session_end(self: &Arc<Self>, hash: &SessionHash, now_unix: i64) -> SessionEnd {
        self.subscribe(hash, now_unix, None)
    }

    /// Like [`Self::session_end`], and `stop` (the connection's own stop token) is cancelled
    /// too when the session is revoked, so a connection that already waits on `stop` needs
    /// no second wait (an SSE stream: one waker registration less per idle stream).
    pub fn session_end_linked(
        self: &Arc<Self>,
        hash: &SessionHash,
        now_unix: i64,
        stop: CancellationToken,
    ) -> SessionEnd {
        self.subscribe(hash, now_unix, Some(stop))
    }

    fn subscribe(
        self: &Arc<Self>,
        hash: &SessionHash,
        now_unix: i64,
        stop: Option<CancellationToken>,
    ) -> SessionEnd {
        let (token, key, link) = {
            let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            let l = listeners.entry(hash.clone()).or_insert_with(|| Listener {
                token: CancellationToken::new(),
                key: Arc::new(hash.clone()),
                holders: 0,
                linked: HashMap::new(),
                next_link: 0,
            });
            l.holders += 1;
            let link = stop.map(|stop| {
                l.next_link += 1;
                l.linked.insert(l.next_link, stop);
                l.next_link
            });
            (l.token.clone(), l.key.clone(), link)
        };
        let end = SessionEnd {
            token,
            key,
            link,
            set: Arc::downgrade(self),
        };
        if self.status(hash, now_unix) == RevocationStatus::Revoked {
            self.tell(hash);
        }
        end
    }

    /// Keeps the set fed from K/V `revoked` until `stop` is cancelled: watch, apply, and
    /// when the watch ends or cannot start, mark the set not current and try again with
    /// backoff. Also sweeps expired entries.
    pub fn spawn_watch(
        self: &Arc<Self>,
        kv: Arc<dyn KvStore>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let set = self.clone();
        tokio::spawn(async move {
            let mut delay = RETRY_FIRST;
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            loop {
                let watch = tokio::select! {
                    () = stop.cancelled() => return,
                    w = kv.watch_bucket(Bucket::Revoked) => w,
                };
                match watch {
                    Ok(mut items) => loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = sweep.tick() => set.sweep(now_unix()),
                            item = items.next() => match item {
                                Some(item) => {
                                    if item == BucketWatchItem::Current {
                                        delay = RETRY_FIRST;
                                    }
                                    set.apply(item, now_unix());
                                }
                                None => {
                                    tracing::warn!("revocation watch ended; watching again");
                                    break;
                                }
                            },
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "revocation watch did not start"),
                }
                set.set_current(false);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        })
    }
}

fn now_unix() -> i64 {
    super::session::now_unix()
}

fn parse_key(key: &str) -> Option<SessionHash> {
    let hash = SessionHash::parse(key);
    if hash.is_none() {
        tracing::debug!(key, "K/V revoked key is not a session hash; ignored");
    }
    hash
}

impl crate::metrics::RevocationGauges for Revocations {
    fn held(&self) -> u64 {
        self.len() as u64
    }

    fn is_current(&self) -> bool {
        Revocations::is_current(self)
    }
}

/// An open connection's subscription to its session's revocation; see
/// [`Revocations::session_end`].
pub struct SessionEnd {
    token: CancellationToken,
    key: Arc<SessionHash>,
    link: Option<u64>,
    set: Weak<Revocations>,
}

impl std::fmt::Debug for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEnd")
            .field("revoked", &self.token.is_cancelled())
            .finish()
    }
}

impl SessionEnd {
    /// True once the session is revoked.
    pub fn is_revoked(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the session is revoked.
    pub async fn revoked(&self) {
        self.token.cancelled().await
    }
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        let Some(set) = self.set.upgrade() else {
            return;
        };
        let mut listeners = set.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = listeners.get_mut(&*self.key) {
            l.holders -= 1;
            if let Some(link) = self.link {
                l.linked.remove(&link);
            }
            if l.holders == 0 {
                listeners.remove(&*self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryKv;
    use crate::store::BucketTtls;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// The session hash of token `t`.
    fn h(t: &str) -> SessionHash {
        SessionHash::of(t)
    }

    #[test]
    fn the_set_answers_unknown_until_current_and_a_known_revocation_always_holds() {
        let set = Revocations::new(DAY);
        assert_eq!(set.status(&h("a"), 100), RevocationStatus::Unknown);
        set.insert(&h("a"), 200);
        assert_eq!(set.status(&h("a"), 100), RevocationStatus::Revoked);
        set.set_current(true);
        assert_eq!(set.status(&h("b"), 100), RevocationStatus::Clear);
        assert_eq!(set.status(&h("a"), 100), RevocationStatus::Revoked);
        set.set_current(false);
        assert_eq!(set.status(&h("a"), 100), RevocationStatus::Revoked);
        assert_eq!(set.status(&h("b"), 100), RevocationStatus::Unknown);
    }

    #[test]
    fn an_entry_stops_counting_at_the_sessions_expiry_and_is_swept() {
        let set = Revocations::new(DAY);
        set.set_current(true);
        set.insert(&h("a"), 200);
        set.insert(&h("b"), 300);
        assert_eq!(set.status(&h("a"), 199), RevocationStatus::Revoked);
        assert_eq!(set.status(&h("a"), 200), RevocationStatus::Clear);
        set.sweep(250);
        assert_eq!(set.len(), 1);
        assert_eq!(set.status(&h("b"), 250), RevocationStatus::Revoked);
    }

    #[test]
    fn markers_name_their_expiry_and_an_unreadable_one_is_kept_for_the_fallback() {
        let m = RevocationMarker {
            expires_at_unix: 1234,
        };
        assert_eq!(RevocationMarker::expiry_of(&m.to_bytes(), 0, DAY), 1234);
        assert_eq!(RevocationMarker::expiry_of(b"1", 1000, DAY), 1000 + 86_400);
        let set = Revocations::new(DAY);
        set.apply(
            BucketWatchItem::Change(KvEvent::Put {
                key: h("old").as_str().into(),
                value: m.to_bytes(),
            }),
            2000,
        );
        assert!(
            set.is_empty(),
            "a marker past its session's expiry is not kept"
        );
        set.apply(
            BucketWatchItem::Change(KvEvent::Put {
                key: h("legacy").as_str().into(),
                value: Bytes::from_static(b"1"),
            }),
            2000,
        );
        assert_eq!(set.status(&h("legacy"), 2000), RevocationStatus::Revoked);
        set.apply(
            BucketWatchItem::Change(KvEvent::Delete {
                key: h("legacy").as_str().into(),
            }),
            2000,
        );
        assert!(set.is_empty());
        set.apply(
            BucketWatchItem::Change(KvEvent::Put {
                key: "not-a-session-hash".into(),
                value: Bytes::from_static(b"1"),
            }),
            2000,
        );
        assert!(set.is_empty(), "a key that is no session hash is ignored");
        set.apply(BucketWatchItem::Current, 2000);
        assert!(set.is_current());
    }

    #[test]
    fn open_connections_are_told_and_listeners_are_dropped_with_them() {
        let set = Revocations::new(DAY);
        let a1 = set.session_end(&h("a"), 100);
        let a2 = set.session_end(&h("a"), 100);
        let b = set.session_end(&h("b"), 100);
        assert!(!a1.is_revoked());
        set.insert(&h("a"), 200);
        assert!(a1.is_revoked() && a2.is_revoked());
        assert!(!b.is_revoked());
        assert!(
            set.session_end(&h("a"), 100).is_revoked(),
            "a session revoked before the connection opened ends at once"
        );
        drop((a1, a2, b));
        assert!(set.listeners.lock().unwrap().is_empty());

        // A linked stop token is cancelled with its session, and unlinked when dropped.
        let stop = CancellationToken::new();
        let c = set.session_end_linked(&h("c"), 100, stop.clone());
        let kept = CancellationToken::new();
        let c2 = set.session_end_linked(&h("c"), 100, kept.clone());
        drop(c2);
        set.insert(&h("c"), 200);
        assert!(c.is_revoked() && stop.is_cancelled());
        assert!(
            !kept.is_cancelled(),
            "a dropped connection is no longer told"
        );
        drop(c);
        assert!(set.listeners.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_watch_loads_markers_then_follows_changes() {
        let kv: Arc<dyn KvStore> = Arc::new(MemoryKv::new(BucketTtls::default()));
        let exp = now_unix() + 3600;
        let marker = RevocationMarker {
            expires_at_unix: exp,
        };
        kv.put(Bucket::Revoked, h("before").as_str(), marker.to_bytes())
            .await
            .unwrap();
        let set = Revocations::new(DAY);
        let stop = CancellationToken::new();
        let task = set.spawn_watch(kv.clone(), stop.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !set.is_current() {
            assert!(tokio::time::Instant::now() < deadline, "never current");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            set.status(&h("before"), now_unix()),
            RevocationStatus::Revoked
        );
        let end = set.session_end(&h("after"), now_unix());
        kv.put(Bucket::Revoked, h("after").as_str(), marker.to_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), end.revoked())
            .await
            .expect("the open connection is told");
        stop.cancel();
        task.await.unwrap();
    }
}

//! The replica's own session cache: validated sessions served without a K/V round trip.
//!
//! In front of the shared cache (K/V `sessions`), each replica keeps the sessions it has
//! validated for `SESSION_LOCAL_TTL` (default 10 s, never past the shared entry's own
//! freshness nor the session's expiry), at most [`LOCAL_MAX`] of them. It changes no rule:
//!
//! - The revocation set is still consulted first, on every request, so a logout on any
//!   replica (its marker arriving through the `revoked` watch) refuses the token here at
//!   once, cached or not; while that set is not current the local cache is not used at all.
//! - An entry is served only while the shared entry it came from would have been (its
//!   `checked_at` + `SESSION_CACHE_TTL`) and while the session is honoured; a session NoETL
//!   ends by itself is therefore seen no later than it is through the shared cache.
//! - A logout or a cache delete on this replica drops its entry here too.
//!
//! A full cache first drops expired entries (at most once per TTL), then stops taking new
//! ones until they age out: a flood of distinct valid sessions only costs K/V reads again.

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use gateway_shared::session::{SessionHash, SessionRecord};

use super::negative::key_of;

/// The most sessions a replica keeps in its local cache (~300 bytes each).
pub const LOCAL_MAX: usize = 100_000;

/// Validated sessions this replica serves from memory, each until its deadline.
#[derive(Debug)]
pub struct LocalSessions {
    ttl: Duration,
    max: usize,
    state: RwLock<LocalState>,
}

#[derive(Debug)]
struct LocalState {
    entries: HashMap<[u8; 32], (SessionRecord, Instant)>,
    next_sweep: Instant,
}

impl LocalSessions {
    /// A cache serving each session at most `ttl` (`0s`: off), holding at most `max`.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            state: RwLock::new(LocalState {
                entries: HashMap::new(),
                next_sweep: Instant::now(),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, LocalState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, LocalState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The session cached for `hash`, if its deadline has not passed and it is honoured at
    /// `now_unix`. The caller has already checked the revocation set.
    pub fn get(&self, hash: &SessionHash, now_unix: i64) -> Option<SessionRecord> {
        if self.ttl.is_zero() {
            return None;
        }
        let state = self.read();
        let (record, until) = state.entries.get(&key_of(hash))?;
        (Instant::now() < *until && record.is_honoured(now_unix)).then(|| record.clone())
    }

    /// Keeps `record` for `hash` for the local TTL, but no longer than `fresh_for` (what is
    /// left of the shared entry's freshness).
    pub fn insert(&self, hash: &SessionHash, record: &SessionRecord, fresh_for: Duration) {
        let keep = self.ttl.min(fresh_for);
        if keep.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut state = self.write();
        if state.entries.len() >= self.max {
            if now < state.next_sweep {
                return;
            }
            state.entries.retain(|_, (_, until)| now < *until);
            state.next_sweep = now + self.ttl;
            if state.entries.len() >= self.max {
                return;
            }
        }
        state
            .entries
            .insert(key_of(hash), (record.clone(), now + keep));
    }

    /// Forgets `hash` (a logout, or the shared entry deleted on this replica).
    pub fn remove(&self, hash: &SessionHash) {
        if self.ttl.is_zero() {
            return;
        }
        self.write().entries.remove(&key_of(hash));
    }

    /// Sessions held now (expired ones included until a sweep).
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::session::User;

    fn record(expires_at_unix: i64) -> SessionRecord {
        SessionRecord {
            user: User {
                user_id: "u1".into(),
                email: "u1@example.com".into(),
                display_name: "U".into(),
                roles: vec![],
            },
            expires_at: String::new(),
            expires_at_unix,
            is_active: true,
        }
    }

    #[test]
    fn serves_until_the_shorter_of_its_ttl_and_the_shared_freshness() {
        let cache = LocalSessions::new(Duration::from_secs(10), 10);
        let a = SessionHash::of("token-a");
        let b = SessionHash::of("token-b");
        cache.insert(&a, &record(i64::MAX), Duration::from_secs(60));
        cache.insert(&b, &record(i64::MAX), Duration::from_millis(30));
        assert_eq!(cache.get(&a, 0).map(|r| r.user.user_id), Some("u1".into()));
        assert!(cache.get(&b, 0).is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert!(cache.get(&a, 0).is_some());
        assert!(
            cache.get(&b, 0).is_none(),
            "past the shared entry's freshness"
        );
    }

    #[test]
    fn never_serves_an_expired_session_or_a_removed_one() {
        let cache = LocalSessions::new(Duration::from_secs(10), 10);
        let a = SessionHash::of("token-a");
        cache.insert(&a, &record(1_000), Duration::from_secs(60));
        assert!(cache.get(&a, 999).is_some());
        assert!(cache.get(&a, 1_000).is_none(), "expired at its own expiry");
        cache.remove(&a);
        assert!(cache.get(&a, 0).is_none());
    }

    #[test]
    fn off_at_zero_and_bounded_when_full() {
        let off = LocalSessions::new(Duration::ZERO, 10);
        let a = SessionHash::of("token-a");
        off.insert(&a, &record(i64::MAX), Duration::from_secs(60));
        assert!(off.get(&a, 0).is_none());
        assert!(off.is_empty());

        let cache = LocalSessions::new(Duration::from_secs(10), 2);
        for t in ["t1", "t2", "t3", "t4"] {
            cache.insert(
                &SessionHash::of(t),
                &record(i64::MAX),
                Duration::from_secs(60),
            );
        }
        assert_eq!(cache.len(), 2, "a full cache takes no more live entries");
        assert!(cache.get(&SessionHash::of("t3"), 0).is_none());
    }
}

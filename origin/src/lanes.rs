//! Turns per key within this replica: read-modify-writes of one shared record (a user's run
//! slots in `owners`, a user's client index in `clients`, a client's watch list in
//! `interest`) that should not overtake each other.
//!
//! The store's records are shared by every replica. Requests that each read a record and
//! then write it back race: with a compare-and-set ([`crate::store::KvStore::update`]) the
//! losers read again, and with `create` (a run slot) they fail and probe on — either way, N
//! requests of one burst cost O(N) lost attempts each. A [`Lanes`] gives such requests on
//! one replica one turn at a time per key, and each lane carries a small value the holder
//! may update for the next one (the last slot taken). Only replicas then race each other,
//! and the compare-and-set (or `create`) settles that.
//!
//! Bounds: a turn is waited for at most the wait given to [`Lanes::new`]; after it the
//! caller goes on without one (as if there were no lane: a store that hangs must not queue a
//! user's requests behind it beyond its own timeouts). A lane lives while a request holds or
//! waits for it; the map keeps one weak entry per key and sweeps the dead ones once it holds
//! more than the sweep threshold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

/// Lanes kept before the idle ones are swept out (live ones stay: as many as there are keys
/// in use at once on this replica).
const SWEPT_ABOVE: usize = 1024;

/// One lane per key, each holding a `T` (its default when the lane is made).
pub struct Lanes<T> {
    lanes: Mutex<HashMap<String, Weak<tokio::sync::Mutex<T>>>>,
    wait: Duration,
}

impl<T> std::fmt::Debug for Lanes<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl<T: Default + Send + 'static> Lanes<T> {
    /// No lanes yet; a turn is waited for at most `wait`.
    pub fn new(wait: Duration) -> Self {
        Self {
            lanes: Mutex::default(),
            wait,
        }
    }

    /// The turn of `key`'s lane, with its value; `None` when the turn did not come within
    /// the wait (the caller goes on without it).
    pub async fn turn(&self, key: &str) -> Option<OwnedMutexGuard<T>> {
        let lane = self.lane(key);
        tokio::time::timeout(self.wait, lane.lock_owned())
            .await
            .ok()
    }

    fn lane(&self, key: &str) -> Arc<tokio::sync::Mutex<T>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.get(key).and_then(Weak::upgrade) {
            return lane;
        }
        if lanes.len() >= SWEPT_ABOVE {
            lanes.retain(|_, lane| lane.strong_count() > 0);
        }
        let lane = Arc::new(tokio::sync::Mutex::new(T::default()));
        lanes.insert(key.to_owned(), Arc::downgrade(&lane));
        lane
    }

    /// Keys with a live lane (tests: the map does not keep dead ones for long).
    #[cfg(test)]
    fn live(&self) -> usize {
        let lanes = self.lanes.lock().unwrap();
        lanes.values().filter(|l| l.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_turn_at_a_time_per_key_and_the_value_is_passed_on() {
        let lanes: Arc<Lanes<u32>> = Arc::new(Lanes::new(Duration::from_secs(5)));
        let mut first = lanes.turn("alice").await.unwrap();
        *first = 7;
        // Another key has its own lane.
        assert_eq!(*lanes.turn("bob").await.unwrap(), 0);
        // The same key waits until the turn is given back, then sees the value left.
        let waiting = tokio::spawn({
            let lanes = lanes.clone();
            async move { *lanes.turn("alice").await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(first);
        assert_eq!(waiting.await.unwrap(), 7);
        // Nobody holds a lane now: nothing is kept alive, and a new lane starts at default.
        assert_eq!(lanes.live(), 0);
        assert_eq!(*lanes.turn("alice").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_turn_not_given_within_the_wait_is_gone_without() {
        let lanes: Lanes<()> = Lanes::new(Duration::from_millis(50));
        let _held = lanes.turn("alice").await.unwrap();
        assert!(lanes.turn("alice").await.is_none());
    }

    #[tokio::test]
    async fn dead_lanes_are_swept_once_the_map_is_full() {
        let lanes: Lanes<()> = Lanes::new(Duration::from_secs(1));
        for i in 0..SWEPT_ABOVE * 3 {
            drop(lanes.turn(&format!("user-{i}")).await);
        }
        assert!(lanes.lanes.lock().unwrap().len() <= SWEPT_ABOVE + 1);
    }
}

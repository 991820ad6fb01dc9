//! Shared state behind one small trait: a key/value store with TTLs.
//!
//! The origin is stateless (ARCHITECTURE.md): everything that must survive a replica or
//! cross between replicas lives in a [`KvStore`]. Two implementations pass one
//! conformance suite (`tests/tests/kv_conformance.rs`):
//! - [`memory::MemoryKv`] — the embedded default when `NATS_URL` is unset (one replica);
//! - [`nats::NatsKv`] — NATS JetStream K/V, one bucket per [`Bucket`], created at start
//!   with its configured TTL.
//!
//! Either is wrapped in [`instrumented::InstrumentedKv`], which times every operation.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use std::time::Duration;

pub mod instrumented;
pub mod memory;
pub mod nats;

/// Why a store operation failed. Callers map these to 503 (`store_unavailable`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing service could not be reached or answered with an error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A key contains characters the store cannot hold (NATS keys: `[-/_=.a-zA-Z0-9]`).
    #[error("invalid store key {0:?}")]
    InvalidKey(String),
    /// A bucket exists with settings that differ from the configuration.
    #[error("bucket misconfigured: {0}")]
    Config(String),
}

/// The buckets the gateway owns (PROTOCOL.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    /// `hex(sha256(session token))` → [`gateway_shared::session::SessionRecord`].
    Sessions,
    /// request_id → request-store entry (issue: realtime path).
    Requests,
    /// execution_id → interested client ids.
    Interest,
    /// session hash → revocation marker, kept for the session's remaining life.
    Revoked,
    /// client_id → the client's owner, pending requests and presence (realtime path).
    Clients,
    /// execution_id → who started it through the gateway, and each user's runs in order
    /// (`crate::owners`).
    Owners,
    /// Human-in-the-loop questions, their one outcome, delivery markers and leases
    /// (`crate::questions`).
    Questions,
}

impl Bucket {
    /// Every bucket, in creation order.
    pub const ALL: [Bucket; 7] = [
        Bucket::Sessions,
        Bucket::Requests,
        Bucket::Interest,
        Bucket::Revoked,
        Bucket::Clients,
        Bucket::Owners,
        Bucket::Questions,
    ];

    /// The bucket's position in [`Bucket::ALL`] (for per-bucket arrays).
    pub fn index(self) -> usize {
        match self {
            Bucket::Sessions => 0,
            Bucket::Requests => 1,
            Bucket::Interest => 2,
            Bucket::Revoked => 3,
            Bucket::Clients => 4,
            Bucket::Owners => 5,
            Bucket::Questions => 6,
        }
    }

    /// The bucket's name in NATS.
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Sessions => "sessions",
            Bucket::Requests => "requests",
            Bucket::Interest => "interest",
            Bucket::Revoked => "revoked",
            Bucket::Clients => "clients",
            Bucket::Owners => "owners",
            Bucket::Questions => "questions",
        }
    }
}

/// The TTL each bucket is created with (entries older than this disappear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketTtls {
    /// Default 300 s.
    pub sessions: Duration,
    /// Default 3600 s: at least the longest playbook.
    pub requests: Duration,
    /// Default 3600 s.
    pub interest: Duration,
    /// Default 24 h: at least the longest session life.
    pub revoked: Duration,
    /// Default 24 h: a client id lives as long as the longest session.
    pub clients: Duration,
    /// Default 7 days: at least the longest run, so an owner can read a run to its end.
    pub owners: Duration,
    /// Default 2 h: the longest question timeout and an hour to deliver its outcome.
    pub questions: Duration,
}

impl BucketTtls {
    /// The TTL of one bucket.
    pub fn of(&self, bucket: Bucket) -> Duration {
        match bucket {
            Bucket::Sessions => self.sessions,
            Bucket::Requests => self.requests,
            Bucket::Interest => self.interest,
            Bucket::Revoked => self.revoked,
            Bucket::Clients => self.clients,
            Bucket::Owners => self.owners,
            Bucket::Questions => self.questions,
        }
    }
}

impl Default for BucketTtls {
    fn default() -> Self {
        Self {
            sessions: Duration::from_secs(300),
            requests: Duration::from_secs(3600),
            interest: Duration::from_secs(3600),
            revoked: Duration::from_secs(24 * 3600),
            clients: Duration::from_secs(24 * 3600),
            owners: Duration::from_secs(7 * 24 * 3600),
            questions: Duration::from_secs(2 * 3600),
        }
    }
}

/// A change seen by [`KvStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// The key now holds this value.
    Put {
        /// The key that changed.
        key: String,
        /// Its new value.
        value: Bytes,
    },
    /// The key was deleted or purged (expiry is not reported).
    Delete {
        /// The key that was removed.
        key: String,
    },
}

/// What [`KvStore::watch_bucket`] yields: the bucket's entries, then a mark, then changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketWatchItem {
    /// A key's value or removal: first one `Put` per live key (the initial values), then
    /// every change as it happens.
    Change(KvEvent),
    /// Every initial value has been delivered: from here on the watcher is current.
    /// Sent exactly once, before any change made after the watch began.
    Current,
}

/// A value as read for a compare-and-set ([`KvStore::get_versioned`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value, `None` when the key holds nothing.
    pub value: Option<Bytes>,
    /// The key's revision when it was read (0: nothing was ever there, or nothing the store
    /// still remembers): give it back to [`KvStore::update`].
    pub revision: u64,
}

/// A key/value store with per-bucket TTLs, shared by every origin replica.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// The value under `key`, or `None` if absent or expired.
    async fn get(&self, bucket: Bucket, key: &str) -> Result<Option<Bytes>, StoreError>;

    /// Stores `value` under `key` for the bucket's TTL, replacing any previous value.
    async fn put(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<(), StoreError>;

    /// Stores `value` under `key` for `ttl` (capped at the bucket's TTL), replacing any
    /// previous value. A store may round `ttl` up to its granularity (NATS: whole seconds,
    /// at least 1 s).
    async fn put_with_ttl(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Stores `value` only if `key` holds nothing; `Ok(false)` if it already did. The
    /// building block for "exactly once" (e.g. a duplicate callback).
    async fn create(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<bool, StoreError>;

    /// The value under `key` (`None` if absent or expired) with the revision it was read
    /// at: what [`update`](Self::update) takes to replace exactly this state.
    async fn get_versioned(&self, bucket: Bucket, key: &str) -> Result<Versioned, StoreError>;

    /// Stores `value` under `key` for the bucket's TTL only if the key is still as
    /// [`get_versioned`](Self::get_versioned) read it at `revision`; `Ok(false)` when
    /// another write (or delete) came in between. A compare-and-set: a read-modify-write
    /// that two replicas may race on loops over these two.
    async fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<bool, StoreError>;

    /// Removes `key`; removing an absent key is not an error.
    async fn delete(&self, bucket: Bucket, key: &str) -> Result<(), StoreError>;

    /// Takes or renews a lease: stores `holder` under `key` for `ttl` (capped at the
    /// bucket's TTL, rounded as [`put_with_ttl`](Self::put_with_ttl) rounds) if the key is
    /// free or already holds `holder`, atomically; `Ok(false)` when another holder has it.
    /// A holder that stops renewing loses it when `ttl` runs out. Used so that one replica
    /// follows a given execution (the bridge's HTTP fallback).
    async fn lease(
        &self,
        bucket: Bucket,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Changes to `key` from now on (no initial value). Lets a replica wait for a value
    /// another replica writes, e.g. a sync callback answering a waiting request: call
    /// `watch` first and `get` second, so a value written in between is seen by one of them.
    /// A watcher behind the writes may miss intermediate values, never the latest one (NATS
    /// buckets keep one revision per key: a value overwritten before the watch reached it is
    /// gone);
    /// the stream ends only when the store can no longer deliver.
    async fn watch(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> Result<BoxStream<'static, KvEvent>, StoreError>;

    /// Every key of `bucket`: its live values, then [`BucketWatchItem::Current`], then
    /// changes from then on (expiry is not reported, as in [`KvStore::watch`]). The stream
    /// ends when it can no longer be kept exact — the store lost its connection, or the
    /// watcher fell too far behind; the caller then watches again and starts over from the
    /// initial values (e.g. the revocation set, `auth/revocations.rs`).
    async fn watch_bucket(
        &self,
        bucket: Bucket,
    ) -> Result<BoxStream<'static, BucketWatchItem>, StoreError>;

    /// True if the store can serve requests now (for `/ready`).
    async fn is_healthy(&self) -> bool;
}

/// True if `key` is a valid key for every implementation: 1..=256 characters of
/// `[-/_=.a-zA-Z0-9]`, not starting or ending with `.`.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 256
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_for_the_strictest_backend() {
        assert!(is_valid_key("ab12-_/=.x"));
        assert!(!is_valid_key(""));
        assert!(!is_valid_key(".a"));
        assert!(!is_valid_key("a b"));
        assert!(!is_valid_key("a*"));
        assert!(!is_valid_key("a>"));
        assert!(!is_valid_key(&"a".repeat(257)));
    }
}

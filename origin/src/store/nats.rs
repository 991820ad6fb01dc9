//! The shared [`KvStore`]: NATS JetStream K/V, one bucket per [`Bucket`].
//!
//! Every origin replica points at the same buckets, which is what lets the origin stay
//! stateless (ARCHITECTURE.md). This file owns creating those buckets at start with their
//! configured TTLs (PROTOCOL.md §7) and mapping the trait onto async-nats 0.51.
//!
//! Decisions:
//! - **Buckets** are `<prefix><name>` (default `sessions`, `requests`, `interest`,
//!   `revoked`), history 1, `max_age` = the bucket's TTL, and `limit_markers` on, which turns
//!   on the stream's per-message TTL (`allow_msg_ttl`; nats-server ≥ 2.11). An existing
//!   bucket is used as it is: a different `max_age` is reported (`tracing::warn!` and
//!   [`NatsKv::config_mismatches`]), never shortened behind the operator's back. Two things
//!   are changed on an existing bucket, because each only keeps more: per-message TTL is
//!   switched on when it is off (`put_with_ttl` cannot work without it), and a `max_age`
//!   shorter than configured is raised (a `revoked` bucket that forgets before the session
//!   ends would let a logged-out token back in).
//! - **`put_with_ttl`** publishes to the key's subject (`$KV.<bucket>.<key>`) with the
//!   `Nats-TTL` header — the crate only offers a TTL on `create`. The server counts TTLs in
//!   whole seconds, so a TTL is rounded up to the next second (at least 1 s). A TTL at or
//!   above the bucket's is a plain put: the bucket's `max_age` caps it anyway.
//! - **`create`** is a publish expecting "no message on this subject yet"; on "wrong last
//!   sequence" the last entry decides: a value means `Ok(false)`, a delete/purge/expiry
//!   marker is replaced by a publish expecting exactly that marker's sequence. Of racing
//!   creators exactly one publish matches, so exactly one gets `Ok(true)`.
//! - **`watch`** is an ordered push consumer on the key's subject delivering only new
//!   messages. Deletes and purges become [`KvEvent::Delete`]; the server's expiry markers
//!   (`Nats-Marker-Reason: MaxAge`) are dropped, because expiry is not reported.
//! - **`watch_bucket`** is the same consumer over the whole bucket (`$KV.<bucket>.>`) from
//!   each key's last message (`watch_all`'s deliver policy): the consumer's pending count
//!   at creation (then each message's) says when the initial values are all in, which is
//!   when [`BucketWatchItem::Current`] is sent. The stream ends as soon as the client is
//!   not connected (checked every `WATCH_CONNECTION_CHECK`): while disconnected nobody
//!   can tell what it is missing, so its owner must count it as not current and watch again.

use super::{
    is_valid_key, Bucket, BucketTtls, BucketWatchItem, KvEvent, KvStore, StoreError, Versioned,
};
use async_nats::connection::State;
use async_nats::header::{NATS_MARKER_REASON, NATS_MESSAGE_TTL};
use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, HeaderMap, HeaderValue};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use std::fmt::Display;
use std::time::Duration;

/// How long the server keeps the marker it leaves when a key's last value expires. Only
/// the minimum the server accepts: nothing here reads the markers.
const EXPIRY_MARKER_TTL: Duration = Duration::from_secs(1);

/// How long any one store call may take before it fails as unavailable: a store that does
/// not answer in time is, for a request waiting on it, a store that is down. (Overrides the
/// client's request timeout, 10 s by default, for this store's calls only.)
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times `create` re-reads a key that keeps changing under it before giving up.
const CREATE_ATTEMPTS: usize = 16;

/// Consecutive errors after which a watch gives up: the ordered consumer already
/// recreates itself after transient failures, so this many in a row means it cannot.
const WATCH_MAX_CONSECUTIVE_ERRORS: u32 = 16;

/// How often a bucket-wide watch checks that the client is still connected.
const WATCH_CONNECTION_CHECK: Duration = Duration::from_millis(100);

/// The K/V operation header the crate writes on deletes and purges.
const KV_OPERATION: &str = "KV-Operation";

/// The K/V store shared by every origin replica; cheap to clone.
#[derive(Clone)]
pub struct NatsKv {
    client: Client,
    js: jetstream::Context,
    ttls: BucketTtls,
    /// One store per bucket, in [`Bucket::ALL`] order.
    stores: Vec<kv::Store>,
    mismatches: Vec<String>,
}

impl std::fmt::Debug for NatsKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsKv")
            .field(
                "buckets",
                &self.stores.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("ttls", &self.ttls)
            .field("mismatches", &self.mismatches)
            .finish()
    }
}

fn slot(bucket: Bucket) -> usize {
    bucket.index()
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if is_valid_key(key) {
        Ok(())
    } else {
        Err(StoreError::InvalidKey(key.to_owned()))
    }
}

fn unavailable(what: impl Display, err: impl Display) -> StoreError {
    StoreError::Unavailable(format!("NATS K/V {what}: {err}"))
}

/// The whole seconds to send in `Nats-TTL` for a key that should live `requested` in a
/// bucket whose TTL is `bucket_ttl`; `None` when a plain put (the bucket's TTL) is right.
fn per_key_ttl_secs(bucket_ttl: Duration, requested: Duration) -> Option<u64> {
    if !bucket_ttl.is_zero() && requested >= bucket_ttl {
        return None;
    }
    let secs = requested.as_secs() + u64::from(requested.subsec_nanos() > 0);
    Some(secs.max(1))
}

/// The event a message on a watched key stands for; `None` for what is not reported
/// (expiry markers, and anything this version does not recognise).
fn event_from_message(key: &str, headers: Option<&HeaderMap>, payload: &Bytes) -> Option<KvEvent> {
    let put = || KvEvent::Put {
        key: key.to_owned(),
        value: payload.clone(),
    };
    let delete = || KvEvent::Delete {
        key: key.to_owned(),
    };
    let Some(headers) = headers else {
        return Some(put());
    };
    if let Some(op) = headers.get(KV_OPERATION) {
        return match op.as_str() {
            "PUT" => Some(put()),
            "DEL" | "PURGE" => Some(delete()),
            _ => None,
        };
    }
    if let Some(reason) = headers.get(NATS_MARKER_REASON) {
        return match reason.as_str() {
            "Remove" | "Purge" => Some(delete()),
            // "MaxAge": the value expired, which watchers are not told about.
            _ => None,
        };
    }
    Some(put())
}

impl NatsKv {
    /// Opens (creating when absent) the gateway's buckets on the server `client` is
    /// connected to. `prefix` is prepended to every bucket name so that tests, or two
    /// gateways, can share one server; it must keep names within `[a-zA-Z0-9_-]`.
    pub async fn open(
        client: Client,
        ttls: BucketTtls,
        prefix: Option<&str>,
    ) -> Result<Self, StoreError> {
        let prefix = prefix.unwrap_or("");
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(StoreError::Config(format!(
                "bucket prefix {prefix:?} may only hold [a-zA-Z0-9_-]"
            )));
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(OPERATION_TIMEOUT)
            .build(client.clone());
        let mut stores = Vec::with_capacity(Bucket::ALL.len());
        let mut mismatches = Vec::new();
        for bucket in Bucket::ALL {
            let name = format!("{prefix}{}", bucket.name());
            let (store, notes) = open_bucket(&js, &name, ttls.of(bucket)).await?;
            stores.push(store);
            mismatches.extend(notes);
        }
        Ok(Self {
            client,
            js,
            ttls,
            stores,
            mismatches,
        })
    }

    /// The JetStream streams behind the buckets (`KV_<bucket>`), for
    /// [`ensure_replicas`].
    pub fn stream_names(&self) -> Vec<String> {
        self.stores.iter().map(|s| s.stream_name.clone()).collect()
    }

    /// How the existing buckets differ from the configuration (empty when they match), for
    /// start-up logs and diagnostics; each was also logged with `tracing::warn!`.
    pub fn config_mismatches(&self) -> &[String] {
        &self.mismatches
    }

    fn store(&self, bucket: Bucket) -> &kv::Store {
        &self.stores[slot(bucket)]
    }
}

/// Opens one bucket, creating it if it does not exist; returns the mismatches found.
async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    ttl: Duration,
) -> Result<(kv::Store, Vec<String>), StoreError> {
    let info = match stream_info(js, name).await? {
        Some(info) => info,
        None => {
            let config = kv::Config {
                bucket: name.to_owned(),
                description: format!("NoETL edge gateway: {name}"),
                history: 1,
                max_age: ttl,
                limit_markers: Some(EXPIRY_MARKER_TTL),
                ..Default::default()
            };
            match js.create_key_value(config).await {
                Ok(store) => {
                    tracing::info!(bucket = name, ttl = ?ttl, "created NATS K/V bucket");
                    return Ok((store, Vec::new()));
                }
                // Another replica may have created it meanwhile (with other settings):
                // use theirs, as if it had been there all along.
                Err(create_err) => match stream_info(js, name).await? {
                    Some(info) => info,
                    None => return Err(unavailable(format!("bucket {name} create"), create_err)),
                },
            }
        }
    };

    let mut mismatches = Vec::new();
    let mut info = info;
    let shorter = !info.config.max_age.is_zero() && (ttl.is_zero() || info.config.max_age < ttl);
    if shorter {
        // A bucket that forgets sooner than configured would drop revocation markers before
        // their session ends; raising max_age only keeps more, so do it.
        let mut config = info.config.clone();
        config.max_age = ttl;
        match js.update_stream(&config).await {
            Ok(updated) => {
                tracing::warn!(bucket = name, from = ?info.config.max_age, to = ?ttl, "existing NATS K/V bucket had a shorter max_age than configured; raised it");
                info = updated;
            }
            Err(e) => {
                tracing::warn!(bucket = name, error = %e, "existing NATS K/V bucket has a shorter max_age than configured and it could not be raised")
            }
        }
    }
    if info.config.max_age != ttl {
        tracing::warn!(
            bucket = name,
            configured_ttl = ?ttl,
            existing_max_age = ?info.config.max_age,
            "existing NATS K/V bucket has a different TTL than configured; keeping the bucket's"
        );
        mismatches.push(format!(
            "bucket {name}: existing max_age {:?} differs from the configured TTL {ttl:?} (kept)",
            info.config.max_age
        ));
    }
    if !info.config.allow_message_ttl {
        let mut config = info.config.clone();
        config.allow_message_ttl = true;
        match js.update_stream(&config).await {
            Ok(_) => tracing::warn!(
                bucket = name,
                "existing NATS K/V bucket had per-message TTL off; switched it on for put_with_ttl"
            ),
            Err(e) => {
                tracing::warn!(
                    bucket = name,
                    error = %e,
                    "existing NATS K/V bucket has per-message TTL off and it could not be switched on; put_with_ttl will fail"
                );
                mismatches.push(format!(
                    "bucket {name}: per-message TTL is off and could not be switched on: {e}"
                ));
            }
        }
    }
    let store = js
        .get_key_value(name)
        .await
        .map_err(|e| unavailable(format!("bucket {name} open"), e))?;
    Ok((store, mismatches))
}

/// The settings of the stream behind bucket `name`, or `None` if it does not exist.
async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<jetstream::stream::Info>, StoreError> {
    match js.get_stream(format!("KV_{name}")).await {
        Ok(stream) => Ok(Some(stream.cached_info().clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(unavailable(format!("bucket {name} lookup"), e)),
        },
    }
}

#[async_trait]
impl KvStore for NatsKv {
    async fn get(&self, bucket: Bucket, key: &str) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let store = self.store(bucket);
        store
            .get(key)
            .await
            .map_err(|e| unavailable(format!("get {}/{key}", store.name), e))
    }

    async fn get_versioned(&self, bucket: Bucket, key: &str) -> Result<Versioned, StoreError> {
        check_key(key)?;
        let store = self.store(bucket);
        let entry = store
            .entry(key)
            .await
            .map_err(|e| unavailable(format!("get {}/{key}", store.name), e))?;
        Ok(match entry {
            Some(e) if e.operation == Operation::Put => Versioned {
                value: Some(e.value),
                revision: e.revision,
            },
            // A delete, purge or expiry marker: nothing there, but an update must name the
            // marker, so a racing writer over it cannot also succeed.
            Some(e) => Versioned {
                value: None,
                revision: e.revision,
            },
            None => Versioned {
                value: None,
                revision: 0,
            },
        })
    }

    async fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        let store = self.store(bucket);
        match store.update(key, value, revision).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(unavailable(format!("update {}/{key}", store.name), e)),
        }
    }

    async fn put(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        let store = self.store(bucket);
        store
            .put(key, value)
            .await
            .map(drop)
            .map_err(|e| unavailable(format!("put {}/{key}", store.name), e))
    }

    async fn put_with_ttl(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        let Some(secs) = per_key_ttl_secs(self.ttls.of(bucket), ttl) else {
            return self.put(bucket, key, value).await;
        };
        let store = self.store(bucket);
        let what = || format!("put {}/{key} with TTL {secs}s", store.name);
        let subject = format!(
            "{}{key}",
            store.put_prefix.as_deref().unwrap_or(&store.prefix)
        );
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_TTL, HeaderValue::from(secs));
        self.js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(|e| unavailable(what(), e))?
            .await
            .map(drop)
            .map_err(|e| unavailable(what(), e))
    }

    async fn create(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<bool, StoreError> {
        // A compare-and-set over "nothing there": first over nothing ever written (0, one
        // round trip for a fresh key), then over the delete, purge or expiry marker the key
        // holds, so a racing creator cannot also succeed.
        let mut expected = 0;
        for _ in 0..CREATE_ATTEMPTS {
            if self.update(bucket, key, value.clone(), expected).await? {
                return Ok(true);
            }
            let read = self.get_versioned(bucket, key).await?;
            if read.value.is_some() {
                return Ok(false);
            }
            expected = read.revision;
        }
        Err(unavailable(
            format!("create {}/{key}", self.store(bucket).name),
            format!("the key changed under {CREATE_ATTEMPTS} attempts in a row"),
        ))
    }

    async fn lease(
        &self,
        bucket: Bucket,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        use async_nats::jetstream::context::PublishErrorKind;
        check_key(key)?;
        let store = self.store(bucket);
        let what = || format!("lease {}/{key}", store.name);
        let subject = format!(
            "{}{key}",
            store.put_prefix.as_deref().unwrap_or(&store.prefix)
        );
        let secs = per_key_ttl_secs(self.ttls.of(bucket), ttl);
        for _ in 0..CREATE_ATTEMPTS {
            // Renew over exactly the revision read (ours), or take a free key over its
            // delete/expiry marker or nothing (0): a racing taker makes one of us fail.
            let expected = match store.entry(key).await.map_err(|e| unavailable(what(), e))? {
                Some(entry)
                    if entry.operation == Operation::Put
                        && entry.value.as_ref() != holder.as_bytes() =>
                {
                    return Ok(false)
                }
                Some(entry) => entry.revision,
                None => 0,
            };
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                HeaderValue::from(expected),
            );
            if let Some(secs) = secs {
                headers.insert(NATS_MESSAGE_TTL, HeaderValue::from(secs));
            }
            let ack = self
                .js
                .publish_with_headers(
                    subject.clone(),
                    headers,
                    Bytes::copy_from_slice(holder.as_bytes()),
                )
                .await
                .map_err(|e| unavailable(what(), e))?
                .await;
            match ack {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(unavailable(what(), e)),
            }
        }
        Err(unavailable(
            what(),
            format!("the key changed under {CREATE_ATTEMPTS} attempts in a row"),
        ))
    }

    async fn delete(&self, bucket: Bucket, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let store = self.store(bucket);
        store
            .delete(key)
            .await
            .map_err(|e| unavailable(format!("delete {}/{key}", store.name), e))
    }

    async fn watch(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> Result<BoxStream<'static, KvEvent>, StoreError> {
        check_key(key)?;
        let store = self.store(bucket);
        let what = || format!("watch {}/{key}", store.name);
        let consumer = store
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("noetl gateway key watch".to_owned()),
                filter_subject: format!("{}{key}", store.prefix),
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(what(), e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable(what(), e))?;
        let state = (messages, key.to_owned(), store.name.clone(), 0u32);
        Ok(stream::unfold(
            state,
            |(mut messages, key, bucket, mut errors)| async move {
                loop {
                    match messages.next().await? {
                        Ok(msg) => {
                            errors = 0;
                            let m = &msg.message;
                            if let Some(event) =
                                event_from_message(&key, m.headers.as_ref(), &m.payload)
                            {
                                return Some((event, (messages, key, bucket, errors)));
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            tracing::warn!(bucket = %bucket, key = %key, error = %e, errors, "NATS K/V watch error");
                            if errors >= WATCH_MAX_CONSECUTIVE_ERRORS {
                                return None;
                            }
                        }
                    }
                }
            },
        )
        .boxed())
    }

    async fn watch_bucket(
        &self,
        bucket: Bucket,
    ) -> Result<BoxStream<'static, BucketWatchItem>, StoreError> {
        let store = self.store(bucket);
        let what = || format!("watch {}", store.name);
        if self.client.connection_state() != State::Connected {
            return Err(unavailable(what(), "not connected"));
        }
        let consumer = store
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("noetl gateway bucket watch".to_owned()),
                filter_subject: format!("{}>", store.prefix),
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(what(), e))?;
        let current_at_once = consumer.cached_info().num_pending == 0;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable(what(), e))?;
        let state = BucketWatchState {
            messages,
            client: self.client.clone(),
            prefix: store.prefix.clone(),
            bucket: store.name.clone(),
            check: tokio::time::interval(WATCH_CONNECTION_CHECK),
            errors: 0,
        };
        let head = stream::iter(current_at_once.then_some(BucketWatchItem::Current));
        let rest = stream::unfold(
            (state, current_at_once),
            |(mut state, mut current)| async move {
                let items = state.next_items(&mut current).await?;
                Some((stream::iter(items), (state, current)))
            },
        )
        .flatten();
        Ok(head.chain(rest).boxed())
    }

    async fn is_healthy(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

/// A bucket-wide watch between two items.
struct BucketWatchState {
    messages: push::Ordered,
    client: Client,
    /// `$KV.<bucket>.`: stripped from a subject to get the key.
    prefix: String,
    bucket: String,
    check: tokio::time::Interval,
    errors: u32,
}

impl BucketWatchState {
    /// The items the next message stands for (a change, and `Current` once the initial
    /// values are in); `None` when the watch must end.
    async fn next_items(&mut self, current: &mut bool) -> Option<Vec<BucketWatchItem>> {
        loop {
            let msg = tokio::select! {
                msg = self.messages.next() => msg?,
                _ = self.check.tick() => {
                    if self.client.connection_state() != State::Connected {
                        tracing::warn!(bucket = %self.bucket, "NATS K/V bucket watch: connection lost");
                        return None;
                    }
                    continue;
                }
            };
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    self.errors += 1;
                    tracing::warn!(bucket = %self.bucket, error = %e, errors = self.errors, "NATS K/V bucket watch error");
                    if self.errors >= WATCH_MAX_CONSECUTIVE_ERRORS {
                        return None;
                    }
                    continue;
                }
            };
            self.errors = 0;
            let m = &msg.message;
            let mut items = Vec::with_capacity(2);
            if let Some(key) = m.subject.as_str().strip_prefix(self.prefix.as_str()) {
                match event_from_message(key, m.headers.as_ref(), &m.payload) {
                    // Before `Current`, only live values: a key's last message being a
                    // delete marker means the key is absent.
                    Some(KvEvent::Delete { .. }) if !*current => {}
                    Some(event) => items.push(BucketWatchItem::Change(event)),
                    None => {}
                }
            }
            if !*current && msg.info().map(|i| i.pending == 0).unwrap_or(false) {
                *current = true;
                items.push(BucketWatchItem::Current);
            }
            if !items.is_empty() {
                return Some(items);
            }
        }
    }
}

/// Sets the JetStream replica count of `streams` (the buckets' and the frames stream) to
/// `replicas` where it differs (`NATS_REPLICAS`): the origin creates what is missing with
/// the server's default of one replica, and a three-node cluster should hold three copies,
/// so a node's loss loses no session, frame or claim. NATS scales a stream's replicas up
/// or down in place. Best effort: a stream that cannot change (a single server cannot hold
/// more than one copy, an account without the right) is logged at `warn` and used as it
/// is; returns those messages.
pub async fn ensure_replicas(client: &Client, streams: &[String], replicas: usize) -> Vec<String> {
    let js = jetstream::ContextBuilder::new()
        .timeout(OPERATION_TIMEOUT)
        .build(client.clone());
    let mut problems = Vec::new();
    for name in streams {
        let info = match js.get_stream(name).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(e) => {
                problems.push(format!("stream {name}: cannot read its configuration: {e}"));
                continue;
            }
        };
        if info.config.num_replicas == replicas {
            continue;
        }
        let from = info.config.num_replicas;
        let mut config = info.config;
        config.num_replicas = replicas;
        match js.update_stream(config).await {
            Ok(_) => {
                tracing::info!(stream = %name, from, to = replicas, "NATS stream replicas set")
            }
            Err(e) => problems.push(format!(
                "stream {name}: cannot change replicas from {from} to {replicas}: {e}"
            )),
        }
    }
    for p in &problems {
        tracing::warn!(problem = %p, "NATS_REPLICAS not applied; the stream is used as it is");
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_per_key_ttl_is_rounded_up_to_whole_seconds() {
        assert_eq!(per_key_ttl_secs(60 * SEC, SEC), Some(1));
        assert_eq!(
            per_key_ttl_secs(60 * SEC, Duration::from_millis(1500)),
            Some(2)
        );
        assert_eq!(
            per_key_ttl_secs(60 * SEC, Duration::from_millis(1)),
            Some(1)
        );
        assert_eq!(per_key_ttl_secs(60 * SEC, Duration::ZERO), Some(1));
    }

    #[test]
    fn a_ttl_at_or_above_the_bucket_ttl_is_a_plain_put() {
        assert_eq!(per_key_ttl_secs(60 * SEC, 60 * SEC), None);
        assert_eq!(per_key_ttl_secs(60 * SEC, 3600 * SEC), None);
        assert_eq!(per_key_ttl_secs(Duration::ZERO, 3600 * SEC), Some(3600));
    }

    #[test]
    fn messages_map_to_events_and_expiry_markers_are_dropped() {
        let v = Bytes::from_static(b"v");
        let put = Some(KvEvent::Put {
            key: "k".into(),
            value: v.clone(),
        });
        let del = Some(KvEvent::Delete { key: "k".into() });
        let with = |name: &str, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(name, value);
            h
        };
        assert_eq!(event_from_message("k", None, &v), put);
        assert_eq!(
            event_from_message("k", Some(&with("Nats-TTL", "5")), &v),
            put
        );
        assert_eq!(
            event_from_message("k", Some(&with(KV_OPERATION, "DEL")), &v),
            del
        );
        assert_eq!(
            event_from_message("k", Some(&with(KV_OPERATION, "PURGE")), &v),
            del
        );
        assert_eq!(
            event_from_message("k", Some(&with("Nats-Marker-Reason", "Remove")), &v),
            del
        );
        assert_eq!(
            event_from_message("k", Some(&with("Nats-Marker-Reason", "MaxAge")), &v),
            None
        );
    }
}

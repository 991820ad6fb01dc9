//! A [`KvStore`] decorator that times every operation into
//! `gateway_kv_operation_duration_seconds{bucket,op,outcome}`, so the embedded store and
//! NATS K/V are measured alike. `server.rs` wraps whichever store it built.
//!
//! Outcomes: `ok`, `not_found` (a get of an absent key), `conflict` (a create of an
//! existing key, a lease held by another), `error`. A watch is timed until it is set up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use super::{Bucket, BucketWatchItem, KvEvent, KvStore, StoreError, Versioned};
use crate::metrics;

/// Wraps a store; every call is passed through and timed.
pub struct InstrumentedKv {
    inner: Arc<dyn KvStore>,
}

impl InstrumentedKv {
    /// `inner`, timed.
    pub fn new(inner: Arc<dyn KvStore>) -> Self {
        Self { inner }
    }
}

fn outcome<T>(r: &Result<T, StoreError>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "error"
    }
}

fn record(bucket: Bucket, op: &'static str, outcome: &'static str, started: Instant) {
    metrics::global().observe_kv(bucket.name(), op, outcome, started.elapsed());
}

#[async_trait]
impl KvStore for InstrumentedKv {
    async fn get(&self, bucket: Bucket, key: &str) -> Result<Option<Bytes>, StoreError> {
        let t = Instant::now();
        let r = self.inner.get(bucket, key).await;
        let o = match &r {
            Ok(Some(_)) => "ok",
            Ok(None) => "not_found",
            Err(_) => "error",
        };
        record(bucket, "get", o, t);
        r
    }

    async fn get_versioned(&self, bucket: Bucket, key: &str) -> Result<Versioned, StoreError> {
        let t = Instant::now();
        let r = self.inner.get_versioned(bucket, key).await;
        let o = match &r {
            Ok(v) if v.value.is_some() => "ok",
            Ok(_) => "not_found",
            Err(_) => "error",
        };
        record(bucket, "get", o, t);
        r
    }

    async fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<bool, StoreError> {
        let t = Instant::now();
        let r = self.inner.update(bucket, key, value, revision).await;
        let o = match &r {
            Ok(true) => "ok",
            Ok(false) => "conflict",
            Err(_) => "error",
        };
        record(bucket, "update", o, t);
        r
    }

    async fn put(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.put(bucket, key, value).await;
        record(bucket, "put", outcome(&r), t);
        r
    }

    async fn put_with_ttl(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.put_with_ttl(bucket, key, value, ttl).await;
        record(bucket, "put", outcome(&r), t);
        r
    }

    async fn create(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<bool, StoreError> {
        let t = Instant::now();
        let r = self.inner.create(bucket, key, value).await;
        let o = match &r {
            Ok(true) => "ok",
            Ok(false) => "conflict",
            Err(_) => "error",
        };
        record(bucket, "create", o, t);
        r
    }

    async fn delete(&self, bucket: Bucket, key: &str) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.delete(bucket, key).await;
        record(bucket, "delete", outcome(&r), t);
        r
    }

    async fn lease(
        &self,
        bucket: Bucket,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let t = Instant::now();
        let r = self.inner.lease(bucket, key, holder, ttl).await;
        let o = match &r {
            Ok(true) => "ok",
            Ok(false) => "conflict",
            Err(_) => "error",
        };
        record(bucket, "lease", o, t);
        r
    }

    async fn watch(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> Result<BoxStream<'static, KvEvent>, StoreError> {
        let t = Instant::now();
        let r = self.inner.watch(bucket, key).await;
        record(bucket, "watch", outcome(&r), t);
        r
    }

    async fn watch_bucket(
        &self,
        bucket: Bucket,
    ) -> Result<BoxStream<'static, BucketWatchItem>, StoreError> {
        let t = Instant::now();
        let r = self.inner.watch_bucket(bucket).await;
        record(bucket, "watch", outcome(&r), t);
        r
    }

    async fn is_healthy(&self) -> bool {
        self.inner.is_healthy().await
    }
}

//! A [`Bus`] decorator that times every operation into
//! `gateway_bus_operation_duration_seconds{op,outcome}` (`publish`; `subscribe` for a live
//! start, `replay` for a resume from retained frames — timed until the subscription is
//! set up), so the in-memory bus and NATS are measured alike. `server.rs` wraps whichever
//! bus it built.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use gateway_shared::ids::{ClientId, ExecutionId};

use super::{Bus, BusError, StartAt, Subscription};
use crate::metrics;

/// Wraps a bus; every call is passed through and timed.
pub struct InstrumentedBus {
    inner: Arc<dyn Bus>,
}

impl InstrumentedBus {
    /// `inner`, timed.
    pub fn new(inner: Arc<dyn Bus>) -> Self {
        Self { inner }
    }
}

fn outcome<T>(r: &Result<T, BusError>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "error"
    }
}

#[async_trait]
impl Bus for InstrumentedBus {
    async fn publish(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
    ) -> Result<u64, BusError> {
        let t = Instant::now();
        let r = self.inner.publish(client_id, event, data).await;
        metrics::global().observe_bus("publish", outcome(&r), t.elapsed());
        r
    }

    async fn publish_external(
        &self,
        subject: &str,
        data: Bytes,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let t = Instant::now();
        let r = self.inner.publish_external(subject, data, msg_id).await;
        metrics::global().observe_bus("publish", outcome(&r), t.elapsed());
        r
    }

    fn has_external_subjects(&self) -> bool {
        self.inner.has_external_subjects()
    }

    fn unwatched(&self, client_id: &ClientId) -> Option<std::ops::RangeInclusive<u64>> {
        self.inner.unwatched(client_id)
    }

    async fn publish_once(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
        key: &str,
    ) -> Result<u64, BusError> {
        let t = Instant::now();
        let r = self.inner.publish_once(client_id, event, data, key).await;
        metrics::global().observe_bus("publish", outcome(&r), t.elapsed());
        r
    }

    async fn publish_run(
        &self,
        execution_id: &ExecutionId,
        event: &str,
        data: Bytes,
        key: &str,
    ) -> Result<u64, BusError> {
        let t = Instant::now();
        let r = self.inner.publish_run(execution_id, event, data, key).await;
        metrics::global().observe_bus("publish", outcome(&r), t.elapsed());
        r
    }

    async fn watch(
        &self,
        client_id: &ClientId,
        execution_id: &ExecutionId,
    ) -> Result<(), BusError> {
        let t = Instant::now();
        let r = self.inner.watch(client_id, execution_id).await;
        metrics::global().observe_bus("watch", outcome(&r), t.elapsed());
        r
    }

    async fn subscribe_with(
        &self,
        client_id: &ClientId,
        start: StartAt,
        watching: &[ExecutionId],
    ) -> Result<Subscription, BusError> {
        let t = Instant::now();
        let r = self.inner.subscribe_with(client_id, start, watching).await;
        let op = match start {
            StartAt::Live | StartAt::Unseen => "subscribe",
            StartAt::Retained | StartAt::After(_) | StartAt::Since(_) => "replay",
        };
        metrics::global().observe_bus(op, outcome(&r), t.elapsed());
        r
    }

    async fn is_healthy(&self) -> bool {
        self.inner.is_healthy().await
    }

    fn max_data_len(&self, event: &str) -> Option<usize> {
        self.inner.max_data_len(event)
    }
}

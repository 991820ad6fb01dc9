//! The NATS source the bridge reads NoETL events from: the shared durable pull consumer
//! (once across replicas, nothing lost while every origin is down), a loop that hands
//! every message to the worker [`Pool`] — on one replica at a time, the holder of the
//! reader lease, so an execution's events are handled in stream order however many
//! replicas run; the others stand by and take over when its lease runs out. It re-opens
//! after failures with a doubling [`Backoff`] and stops reading first at shutdown, so what
//! the workers give back goes to the next reader. (Without a stream the bridge follows executions over HTTP instead:
//! `poll`.)

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

use super::handler::Handler;
use super::policy;
use super::pool::{Job, Pool};
use super::{BridgeConfig, CancellationToken};
use crate::store::{Bucket, KvStore};

/// Longest pause between attempts to re-open a failed consumer or subscription.
const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(10);
/// The first pause after a failure.
const FIRST_REOPEN_BACKOFF: Duration = Duration::from_millis(250);

/// The durable consumer's settings. Applied when the consumer is created; an existing
/// consumer is reused as it is (delete it to change them).
pub(super) fn consumer_config(config: &BridgeConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(config.consumer.clone()),
        description: Some(
            "NoETL edge gateway bridge: execution events -> playbook/state frames".into(),
        ),
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        filter_subject: config.subject.clone(),
        max_ack_pending: config.max_ack_pending,
        ..Default::default()
    }
}

/// True when the lookup failed because there is no stream (or no JetStream at all), which
/// means the next configured stream, or the HTTP fallback, rather than a start-up error.
pub(super) fn stream_is_absent(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::{GetStreamErrorKind, RequestError, RequestErrorKind};
    use jetstream::ErrorCode;
    match e.kind() {
        GetStreamErrorKind::JetStream(err) => matches!(
            err.error_code(),
            ErrorCode::STREAM_NOT_FOUND
                | ErrorCode::JETSTREAM_NOT_ENABLED
                | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        ),
        GetStreamErrorKind::Request => std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<RequestError>())
            .is_some_and(|r| r.kind() == RequestErrorKind::NoResponders),
        _ => false,
    }
}

/// Why one term as the reader ended.
enum TermEnd {
    /// Shutdown: stop for good.
    Shutdown,
    /// Another replica holds the reader lease now: give back what is queued, stand by.
    LostLease,
}

/// Reads the durable consumer until shutdown, while this replica holds the reader lease
/// (one reader at a time keeps every execution's events in stream order across
/// replicas); standing by otherwise, ready to take over when the reader's lease runs out.
pub(super) async fn run_durable(
    handler: Handler,
    kv: Arc<dyn KvStore>,
    stream: jetstream::stream::Stream,
    first: consumer::PullConsumer,
    config: BridgeConfig,
    shutdown: CancellationToken,
) {
    let handler = Arc::new(handler);
    let lease = ReaderLease {
        kv,
        holder: uuid::Uuid::new_v4().simple().to_string(),
        ttl: config.lease_ttl,
    };
    let mut consumer = Some(first);
    loop {
        if !lease.acquire(&shutdown).await {
            return;
        }
        tracing::info!(stream = %stream.cached_info().config.name, "bridge: this replica reads NoETL's events now (it holds the reader lease)");
        let reader = &crate::metrics::global().bridge_reader;
        reader.set(1);
        let clean = lease.took_over_cleanly().await;
        let Some(catch_up) = await_previous_deliveries(&stream, &config, clean, &shutdown).await
        else {
            reader.set(0);
            lease.release().await;
            return;
        };
        let pool = Pool::start(handler.clone(), config.concurrency);
        let end = read_term(
            pool,
            &stream,
            &mut consumer,
            &config,
            &lease,
            &shutdown,
            catch_up,
        )
        .await;
        reader.set(0);
        match end {
            TermEnd::Shutdown => {
                lease.release().await;
                return;
            }
            TermEnd::LostLease => {
                tracing::warn!("bridge: another replica holds the reader lease now; standing by");
            }
        }
    }
}

/// Before a term's first pull: if an earlier reader (a replica that died, or this process
/// before a crash) left deliveries un-acked — it did not hand over `clean`ly — wait the
/// consumer's ack wait so they are due again. JetStream serves due redeliveries before
/// new messages, so this reader gets a run's earlier events before its later ones; pulling at once would hand it the later ones
/// first (a `step.exit` after the terminal frame). Costs one ack wait (`BRIDGE_ACK_WAIT`)
/// only when something was pending. The redeliveries themselves come in the order they
/// fell due (a NAK's delay, an ack wait), not in stream order, so the term then takes that
/// many messages first and dispatches them sorted by stream sequence ([`read_term`]'s
/// `catch_up`). Returns how many were pending; `None` on shutdown.
async fn await_previous_deliveries(
    stream: &jetstream::stream::Stream,
    config: &BridgeConfig,
    clean: bool,
    shutdown: &CancellationToken,
) -> Option<usize> {
    if clean {
        // The previous reader NAKed what it held; at most a message it had pulled ahead
        // comes back after the ack wait, out of order (late rather than stalled).
        return Some(0);
    }
    let info = match stream.consumer_info(&config.consumer).await {
        Ok(info) if info.num_ack_pending > 0 => info,
        _ => return Some(0),
    };
    let wait = info.config.ack_wait;
    tracing::info!(
        pending = info.num_ack_pending,
        ?wait,
        "bridge: the previous reader left events un-acked; waiting for their redelivery so they come first"
    );
    tokio::select! {
        () = shutdown.cancelled() => None,
        () = tokio::time::sleep(wait) => Some(info.num_ack_pending),
    }
}

/// How long a clean handover's marker is believed: a standby takes over within a third of
/// the lease TTL; a marker older than this belongs to no handover in progress.
const HANDOVER_MARKER_TTL: Duration = Duration::from_secs(30);

/// How long a term waits for the previous reader's redeliveries to arrive (they are due
/// already) before it dispatches the ones it has.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// One term as the reader: pulls and dispatches until shutdown or the lease is lost, then
/// stops the pool (queued events given back).
async fn read_term(
    mut pool: Pool,
    stream: &jetstream::stream::Stream,
    consumer: &mut Option<consumer::PullConsumer>,
    config: &BridgeConfig,
    lease: &ReaderLease,
    shutdown: &CancellationToken,
    mut catch_up: usize,
) -> TermEnd {
    let term = shutdown.child_token();
    let mut backoff = Backoff::default();
    let mut renew = tokio::time::interval(lease.ttl / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renew.tick().await;
    let mut lost = false;
    // The message in hand when the term ended while its worker's queue was full.
    let leftover = 'reopen: loop {
        let c = match consumer.take() {
            Some(c) => c,
            None => match stream
                .get_or_create_consumer(&config.consumer, consumer_config(config))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = %config.consumer, error = %e, "bridge: cannot open the durable consumer; retrying");
                    if !backoff.sleep(&term).await {
                        break None;
                    }
                    continue;
                }
            },
        };
        let mut messages = match c
            .stream()
            .max_messages_per_batch(config.batch)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(consumer = %config.consumer, error = %e, "bridge: cannot pull from the durable consumer; retrying");
                if !backoff.sleep(&term).await {
                    break None;
                }
                continue;
            }
        };
        *consumer = Some(c);
        if catch_up > 0 {
            // The previous reader's redeliveries, in stream order (see
            // `await_previous_deliveries`).
            let mut first = Vec::with_capacity(catch_up.min(4096));
            let deadline = tokio::time::sleep(CATCH_UP_WAIT);
            tokio::pin!(deadline);
            while first.len() < catch_up {
                tokio::select! {
                    _ = term.cancelled() => break,
                    () = &mut deadline => break,
                    next = messages.next() => match next {
                        Some(Ok(msg)) => first.push(msg),
                        _ => break,
                    },
                }
            }
            catch_up = 0;
            first.sort_by_key(|m| m.info().map_or(u64::MAX, |i| i.stream_sequence));
            let mut queue = first.into_iter();
            for msg in queue.by_ref() {
                let Some(job) = Job::durable(msg, &pool.handler, &pool.in_flight) else {
                    continue;
                };
                if let Err(job) = pool.dispatch(job, &term).await {
                    // The term ended with these in hand: they are not acked, so they come
                    // back to whoever reads next.
                    break 'reopen Some(job);
                }
            }
        }
        loop {
            let next = tokio::select! {
                biased;
                _ = term.cancelled() => break 'reopen None,
                _ = renew.tick() => {
                    if !lease.renew().await {
                        lost = true;
                        term.cancel();
                    }
                    continue;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    backoff.reset();
                    let Some(job) = Job::durable(msg, &pool.handler, &pool.in_flight) else {
                        continue;
                    };
                    if let Err(job) = pool.dispatch(job, &term).await {
                        break 'reopen Some(job);
                    }
                }
                Some(Err(e)) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                    tracing::warn!(error = %e, "bridge: missed a heartbeat from NATS; still pulling");
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "bridge: pulling failed; re-opening the consumer");
                    break;
                }
                None => {
                    tracing::warn!("bridge: the pull stream ended; re-opening the consumer");
                    break;
                }
            }
        }
        *consumer = None;
        if !backoff.sleep(&term).await {
            break None;
        }
    };
    // The pull subscription is dropped by now: what the workers give back goes elsewhere.
    pool.stop(leftover).await;
    if lost && !shutdown.is_cancelled() {
        TermEnd::LostLease
    } else {
        TermEnd::Shutdown
    }
}

/// The K/V lease (`policy::READER_LEASE_KEY`) that makes one replica at a time the
/// reader of the durable consumer.
struct ReaderLease {
    kv: Arc<dyn KvStore>,
    holder: String,
    ttl: Duration,
}

impl ReaderLease {
    /// Waits until this replica holds the lease (trying every third of its TTL, jittered
    /// so standbys do not knock in step); false on shutdown.
    async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        let mut announced = false;
        loop {
            match self.try_take().await {
                Ok(true) => return true,
                Ok(false) if !announced => {
                    announced = true;
                    tracing::info!(
                        "bridge: another replica reads NoETL's events; standing by to take over"
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "bridge: cannot take the reader lease; retrying");
                }
            }
            let jitter = rand::random::<f64>() * 0.5 + 0.75;
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep((self.ttl / 3).mul_f64(jitter)) => {}
            }
        }
    }

    /// Renews the lease; false when another replica holds it now. A store error keeps the
    /// term (no other replica can take the lease while the store is down either).
    async fn renew(&self) -> bool {
        match self.try_take().await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "bridge: reader lease renewal failed; still reading");
                true
            }
        }
    }

    /// Takes or renews the lease: true while this replica holds it.
    async fn try_take(&self) -> Result<bool, crate::store::StoreError> {
        self.kv
            .lease(
                Bucket::Interest,
                policy::READER_LEASE_KEY,
                &self.holder,
                self.ttl,
            )
            .await
    }

    /// True when the reader before this one gave the lease up cleanly
    /// ([`ReaderLease::release`]); the marker is consumed.
    async fn took_over_cleanly(&self) -> bool {
        let key = policy::READER_HANDOVER_KEY;
        match self.kv.get(Bucket::Interest, key).await {
            Ok(Some(_)) => {
                let _ = self.kv.delete(Bucket::Interest, key).await;
                true
            }
            _ => false,
        }
    }

    /// Gives the lease up at shutdown so a standby takes over at once, saying so first
    /// (the handover marker) so it does not wait for deliveries that are not coming.
    async fn release(&self) {
        let _ = self
            .kv
            .put_with_ttl(
                Bucket::Interest,
                policy::READER_HANDOVER_KEY,
                bytes::Bytes::from(self.holder.clone()),
                HANDOVER_MARKER_TTL,
            )
            .await;
        if let Ok(Some(v)) = self
            .kv
            .get(Bucket::Interest, policy::READER_LEASE_KEY)
            .await
        {
            if v.as_ref() == self.holder.as_bytes() {
                let _ = self
                    .kv
                    .delete(Bucket::Interest, policy::READER_LEASE_KEY)
                    .await;
            }
        }
    }
}

/// The `Nats-Msg-Id` header (the Rust server sets it to the event id).
pub(super) fn msg_id(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty())
}

/// Doubling pause between re-open attempts, cut short by shutdown.
#[derive(Default)]
pub(super) struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// The pause before the next attempt: 250 ms, doubling up to [`MAX_REOPEN_BACKOFF`].
    pub(super) fn next_delay(&mut self) -> Duration {
        let d = self.next.unwrap_or(FIRST_REOPEN_BACKOFF);
        self.next = Some((d * 2).min(MAX_REOPEN_BACKOFF));
        d
    }

    /// Sleeps; false if shutdown came first.
    pub(super) async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// A success: the next failure starts from the shortest pause again.
    pub(super) fn reset(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reopen_pause_doubles_up_to_its_cap_and_starts_over_after_a_success() {
        let mut b = Backoff::default();
        let ms: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        b.reset();
        assert_eq!(b.next_delay(), FIRST_REOPEN_BACKOFF);
    }

    #[test]
    fn the_event_key_is_the_nats_msg_id_header_when_it_has_one() {
        assert_eq!(msg_id(None), None);
        let mut h = async_nats::HeaderMap::new();
        assert_eq!(msg_id(Some(&h)), None);
        h.insert("Nats-Msg-Id", "");
        assert_eq!(msg_id(Some(&h)), None, "an empty id is no id");
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "ev-42");
        assert_eq!(msg_id(Some(&h)).as_deref(), Some("ev-42"));
    }

    #[test]
    fn the_durable_consumer_starts_at_new_messages_with_explicit_acks() {
        let c = consumer_config(&BridgeConfig::default());
        assert_eq!(c.durable_name.as_deref(), Some("gateway-bridge"));
        assert_eq!(c.deliver_policy, consumer::DeliverPolicy::New);
        assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(c.filter_subject, "noetl.events.>");
        assert_eq!(c.max_ack_pending, 10_000);
    }
}

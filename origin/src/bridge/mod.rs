//! The NATS bridge: NoETL execution events → `playbook/state` frames for the clients that
//! asked for them (PROTOCOL.md §6).
//!
//! Flow of one event: NATS message → [`policy::parse_event`] (shape, ids, normalised name,
//! allow-list; by the reading task, which then queues it for its execution's worker;
//! everything not forwarded is acked by a worker without further I/O) → interest lookup
//! by execution id ([`interest`]) → the run's status from NoETL when the event's meaning depends on it →
//! [`policy::resolve`] → one encoded frame per resolved state, published to each
//! interested client on the [`Bus`] → ack. This file only does that I/O; every decision is
//! in [`policy`].
//!
//! ## Decisions
//! - **One durable pull consumer shared by every replica** (`gateway-bridge` on stream
//!   `noetl_events`, explicit acks). JetStream hands each message to one puller, so an
//!   event is handled once across N replicas, and the consumer's ack floor lives in NATS,
//!   so events published while every origin is down are delivered when one comes back.
//!   A push consumer or a per-replica consumer would give neither. The consumer starts at
//!   *new* messages when it is first created (deliver policy `New`): a first deployment
//!   must not replay 24 h of history that no client can be interested in; from then on it
//!   is durable and nothing is skipped. Deleting the consumer resets that point.
//! - **Core fallback.** Without the stream (NoETL not publishing to JetStream), a core
//!   subscription with queue group `gateway-bridge` still delivers each event to one
//!   replica, but events published while no origin runs are lost. The mode is chosen at
//!   start; if the stream appears later the bridge logs a warning once, and a restart
//!   switches it to the durable consumer.
//! - **Confirm before the terminal frame.** A failed step ends a real run FAILED with no
//!   `playbook.failed` event, and a real server can emit `playbook.completed` for a run that
//!   failed. So on `step.failed` and `playbook.completed` the bridge asks NoETL
//!   (`GET /api/executions/{id}/status`) and the terminal frame carries the true status.
//!   Exactly one terminal frame per execution: the event that produces it first claims
//!   `terminal.<execution_id>` in the interest bucket with an atomic create-if-absent,
//!   storing its own event id. A redelivery of that same event (say, after a bus failure)
//!   still owns the claim and publishes again (at-least-once, like every frame); any other
//!   event for that execution is dropped, so nothing follows the terminal frame.
//! - **NAK with delay, not a blocking wait.** executePlaybook records interest only after
//!   NoETL's `/api/execute` answers, so an execution's first events can arrive before
//!   anyone is interested. The event is NAKed with `retry_delay` (500 ms) and comes back
//!   until it is older than `max_interest_wait` (10 s, measured from when NATS stored it),
//!   then it is acked and dropped. Waiting in-process would stall every execution sharing
//!   its worker; a NAK leaves the consumer free and survives a replica crash. The same path
//!   retries a status NoETL cannot give yet (up to `max_confirm_wait`, then the event's own
//!   claim is used) and bus or store failures (never dropped: the stream still holds the
//!   event). Cost: events of executions nobody watches are retried for `max_interest_wait`,
//!   so they occupy `max_ack_pending` slots for that long — size it above
//!   (forwardable events per second without interest) × `max_interest_wait`.
//!   Core mode has no redelivery: the retry is a timer in this process, bounded by
//!   `core_max_held`, and lost if the replica stops.
//! - **Order per execution, concurrency across executions.** One reading task pulls
//!   (in batches of `batch`) and hands each message to one of `concurrency` worker tasks
//!   (default 32) chosen by a hash of its execution id ([`policy::worker_for`]), through a
//!   bounded queue (16 per worker). All events of one execution therefore go to one worker
//!   and are handled one at a time in delivery order, while different executions are
//!   handled in parallel: a replica is no longer bounded by one event's round trips
//!   (interest lookup, terminal marker, publish, ack ≈ 1 ms → ~1k events/s). Messages that
//!   are only acked (malformed, or not forwarded) go to any worker with room. When an
//!   event waits for a redelivery, later events of the same execution wait behind it
//!   ([`policy::OrderGuard`], one per worker — enough, since an execution never leaves its
//!   worker, and redeliveries come back in stream order to the same worker), so a late
//!   interest record does not reorder frames. When the queue of the worker a message
//!   belongs to is full the reader waits for it (back-pressure: bounded memory, JetStream
//!   keeps the rest). Hashing to a fixed pool rather than a free pool with per-execution
//!   locks keeps one FIFO per execution without a lock table; the cost is head-of-line
//!   blocking: executions that share a slow worker (a NoETL status call timing out) wait
//!   for it, and once its queue is full everyone does. Across replicas two events of one
//!   execution can be forwarded concurrently; frames carry `at`.
//! - **Shutdown.** The reader stops first (drops its pull subscription, or unsubscribes
//!   from the queue group), then each worker finishes the event in hand (acked or NAKed as
//!   usual) and gives back what is still queued: NAKed, never acked, so another replica
//!   gets it at once — delayed past any retry when an earlier event of its execution is
//!   waiting for a redelivery, so it comes back behind that one. Messages the NATS client
//!   had already pulled but the reader not yet taken return after `ack_wait`. Core mode
//!   has nothing to give back to: queued events and pending retries are lost (logged).
//! - **Encoded once.** A frame's JSON is built once per event and shared (`Bytes`) by every
//!   interested client's publish. The message is acked only after every publish succeeded.
//!
//! Malformed messages are logged at warn with their subject and size — never the payload,
//! which may carry step results — and acked: redelivering them cannot help.

pub mod interest;
pub mod policy;

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, AckKind};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use gateway_shared::frames::{event, notification, PlaybookState};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::bus::{Bus, BusError};
use crate::noetl::{NoetlClient, NoetlError};
use crate::store::{Bucket, KvStore};
use policy::{
    ForwardList, OrderGuard, Parsed, Resolution, RetryLimits, RetryReason, RetryVerdict, RunStatus,
    StatusCheck,
};

/// Re-exported so callers of [`spawn`] (the server, the tests) need no tokio-util of their own.
pub use tokio_util::sync::CancellationToken;

/// How often core mode checks whether the stream has appeared (to tell the operator).
const STREAM_CHECK_EVERY: Duration = Duration::from_secs(60);
/// Longest pause between attempts to re-open a failed consumer or subscription.
const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(10);
/// Most events queued for one worker. When the worker an event belongs to has this many
/// waiting, the reader stops pulling until it takes one: memory stays bounded and
/// JetStream keeps the rest (a slow execution's neighbours wait only once it is full).
const WORKER_QUEUE: usize = 16;
/// Upper bound of [`BridgeConfig::concurrency`].
pub const MAX_CONCURRENCY: usize = 1024;

/// The bridge's settings. `Default` is PROTOCOL §6 and a single-digit-second budget for
/// late interest; the server fills it from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The JetStream stream NoETL publishes into (`noetl_events`). Absent → core mode.
    pub stream: String,
    /// The subjects to read (`noetl.events.>`); must end in `.>`. Its prefix is what both
    /// subject shapes are parsed under.
    pub subject: String,
    /// The durable consumer's name, also the core queue group (`gateway-bridge`). Every
    /// replica must use the same one, or each replica gets every event.
    pub consumer: String,
    /// Event types forwarded, normalised names (default [`policy::DEFAULT_FORWARD`]).
    pub forward: Vec<String>,
    /// An event whose execution still has no interest after this long (since NATS
    /// stored it) is dropped (default 10 s).
    pub max_interest_wait: Duration,
    /// How long a status NoETL cannot confirm is retried before the event's own claim is
    /// used (default 30 s).
    pub max_confirm_wait: Duration,
    /// Delay before an event is retried (NAK delay; ×4 for store, bus and NoETL
    /// failures). Default 500 ms, about NoETL's burst interval.
    pub retry_delay: Duration,
    /// JetStream ack wait: an un-acked message is redelivered after this (a replica that
    /// died mid-event). Must exceed one event's handling, including NoETL's timeout.
    /// Default 30 s.
    pub ack_wait: Duration,
    /// JetStream max un-acked messages across all replicas (default 10 000; see the
    /// module docs for sizing). Only applied when the consumer is created.
    pub max_ack_pending: i64,
    /// Messages pulled per request (default 32). The client asks for the next batch when
    /// half of one is left, so the reader keeps up to ~1.5 batches in hand besides the
    /// workers' queues. Small keeps a slow replica from sitting on messages another
    /// replica could handle.
    pub batch: usize,
    /// Worker tasks handling events concurrently (default 32, at most
    /// [`MAX_CONCURRENCY`]). Every event of one execution goes to the same worker (a hash
    /// of its id) and is handled in delivery order; different executions are handled in
    /// parallel. At most `concurrency × WORKER_QUEUE` (16) events wait in memory.
    pub concurrency: usize,
    /// Core mode: most events held in memory for a retry (default 10 000); beyond it an
    /// event that needs a retry is dropped with a warning.
    pub core_max_held: usize,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            stream: "noetl_events".into(),
            subject: "noetl.events.>".into(),
            consumer: "gateway-bridge".into(),
            forward: policy::DEFAULT_FORWARD
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            max_interest_wait: Duration::from_secs(10),
            max_confirm_wait: Duration::from_secs(30),
            retry_delay: Duration::from_millis(500),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            batch: 32,
            concurrency: 32,
            core_max_held: 10_000,
        }
    }
}

impl BridgeConfig {
    /// Checks the settings a typo would break silently.
    pub fn validate(&self) -> Result<(), BridgeError> {
        let bad = |m: String| Err(BridgeError::Config(m));
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&self.stream) {
            return bad(format!("stream name {:?} is not a valid name", self.stream));
        }
        if !name_ok(&self.consumer) {
            return bad(format!(
                "consumer name {:?} is not a valid name",
                self.consumer
            ));
        }
        if self.prefix().len() < 2 || self.subject.contains(['*', ' ']) {
            return bad(format!(
                "subject {:?} must be a literal prefix followed by `.>`",
                self.subject
            ));
        }
        if self.forward.is_empty() {
            return bad("the forward allow-list is empty: nothing would be forwarded".into());
        }
        if self.retry_delay.is_zero() || self.retry_delay > Duration::from_secs(60) {
            return bad("retry_delay must be within (0, 60 s]".into());
        }
        if self.ack_wait < Duration::from_secs(1) {
            return bad("ack_wait must be at least 1 s".into());
        }
        if self.batch == 0 || self.max_ack_pending < self.batch as i64 {
            return bad("batch must be ≥ 1 and max_ack_pending ≥ batch".into());
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return bad(format!(
                "concurrency must be within 1..={MAX_CONCURRENCY} (got {})",
                self.concurrency
            ));
        }
        Ok(())
    }

    /// `noetl.events.` for `noetl.events.>` (empty if the subject is not of that form).
    fn prefix(&self) -> &str {
        self.subject
            .strip_suffix('>')
            .filter(|p| p.ends_with('.'))
            .unwrap_or("")
    }
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The settings are unusable.
    #[error("bridge configuration: {0}")]
    Config(String),
    /// NATS refused or failed the stream lookup, the consumer or the subscription.
    #[error("bridge cannot read NoETL events from NATS: {0}")]
    Nats(String),
}

/// How the bridge reads events, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeMode {
    /// The shared durable pull consumer on the stream: once across replicas, nothing lost.
    Durable,
    /// A core queue subscription: once across replicas, lost while no origin runs.
    Core,
}

/// A running bridge.
#[derive(Debug)]
pub struct Bridge {
    /// How it reads.
    pub mode: BridgeMode,
    /// Ends after the shutdown token is cancelled: reading stops, every worker finishes
    /// the event in hand, queued events are NAKed (redelivered at once, elsewhere).
    pub task: JoinHandle<()>,
}

/// Starts the bridge: picks the mode (durable if `config.stream` exists, else core),
/// creates or reuses the durable consumer, logs which, and spawns the reading task.
///
/// Errors only for bad settings or a NATS that fails the lookup itself; an absent stream
/// is the core fallback, not an error. Once running, the task survives NATS outages
/// (async-nats reconnects; the consumer is re-opened) until `shutdown` is cancelled.
pub async fn spawn(
    nats: async_nats::Client,
    kv: Arc<dyn KvStore>,
    bus: Arc<dyn Bus>,
    noetl: NoetlClient,
    config: BridgeConfig,
    shutdown: CancellationToken,
) -> Result<Bridge, BridgeError> {
    config.validate()?;
    let handler = Handler {
        kv,
        bus,
        noetl,
        prefix: config.prefix().to_owned(),
        forward: ForwardList::new(&config.forward),
        limits: RetryLimits {
            max_interest_wait: config.max_interest_wait,
            max_confirm_wait: config.max_confirm_wait,
            durable: true,
        },
        retry_delay: config.retry_delay,
    };
    let js = jetstream::new(nats.clone());
    match js.get_stream(&config.stream).await {
        Ok(stream) => {
            let consumer = stream
                .get_or_create_consumer(&config.consumer, consumer_config(&config))
                .await
                .map_err(|e| {
                    BridgeError::Nats(format!(
                        "durable consumer {} on stream {}: {e}",
                        config.consumer, config.stream
                    ))
                })?;
            tracing::info!(
                mode = "durable",
                stream = %config.stream,
                consumer = %config.consumer,
                subject = %config.subject,
                "bridge: reading NoETL events through the shared durable consumer \
                 (each event once across replicas; events published while every origin \
                 is down are delivered on restart)"
            );
            let task = tokio::spawn(run_durable(handler, stream, consumer, config, shutdown));
            Ok(Bridge {
                mode: BridgeMode::Durable,
                task,
            })
        }
        Err(e) if stream_is_absent(&e) => {
            let sub = nats
                .queue_subscribe(config.subject.clone(), config.consumer.clone())
                .await
                .map_err(|e| BridgeError::Nats(format!("subscribe {}: {e}", config.subject)))?;
            tracing::warn!(
                mode = "core",
                stream = %config.stream,
                subject = %config.subject,
                queue_group = %config.consumer,
                "bridge: JetStream stream not found, using a core subscription: events \
                 published while no origin runs are LOST. Enable NoETL's event stream \
                 (it creates `{}`) and restart the origin to read durably",
                config.stream
            );
            let handler = Handler {
                limits: RetryLimits {
                    durable: false,
                    ..handler.limits
                },
                ..handler
            };
            let task = tokio::spawn(run_core(handler, nats, sub, config, shutdown));
            Ok(Bridge {
                mode: BridgeMode::Core,
                task,
            })
        }
        Err(e) => Err(BridgeError::Nats(format!(
            "looking up stream {}: {e}",
            config.stream
        ))),
    }
}

/// The durable consumer's settings. Applied when the consumer is created; an existing
/// consumer is reused as it is (delete it to change them).
fn consumer_config(config: &BridgeConfig) -> consumer::pull::Config {
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
/// means core mode rather than a start-up error.
fn stream_is_absent(e: &jetstream::context::GetStreamError) -> bool {
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

/// Reads the durable consumer until shutdown, re-opening it after failures, and hands
/// each message to its worker.
async fn run_durable(
    handler: Handler,
    stream: jetstream::stream::Stream,
    first: consumer::PullConsumer,
    config: BridgeConfig,
    shutdown: CancellationToken,
) {
    let mut pool = Pool::start(Arc::new(handler), config.concurrency, None);
    let mut backoff = Backoff::default();
    let mut consumer = Some(first);
    // The message in hand when shutdown came while its worker's queue was full.
    let leftover = 'reopen: loop {
        let c = match consumer.take() {
            Some(c) => c,
            None => match stream
                .get_or_create_consumer(&config.consumer, consumer_config(&config))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = %config.consumer, error = %e, "bridge: cannot open the durable consumer; retrying");
                    if !backoff.sleep(&shutdown).await {
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
                if !backoff.sleep(&shutdown).await {
                    break None;
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'reopen None,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    backoff.reset();
                    let Some(job) = Job::durable(msg, &pool.handler) else {
                        continue;
                    };
                    if let Err(job) = pool.dispatch(job, &shutdown).await {
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
        if !backoff.sleep(&shutdown).await {
            break None;
        }
    };
    // The pull subscription is dropped by now: what the workers give back goes elsewhere.
    pool.stop(leftover).await;
}

/// Reads the core queue subscription until shutdown and hands each message to its
/// worker; retries are timers in this process (see [`CoreRetry`]).
async fn run_core(
    handler: Handler,
    nats: async_nats::Client,
    mut sub: async_nats::Subscriber,
    config: BridgeConfig,
    shutdown: CancellationToken,
) {
    let retries = CoreRetries {
        held: Arc::new(AtomicUsize::new(0)),
        max_held: config.core_max_held,
    };
    let mut pool = Pool::start(Arc::new(handler), config.concurrency, Some(retries));
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let mut backoff = Backoff::default();
    let mut next_seq: u64 = 0;
    let mut stream_check = tokio::time::interval_at(
        tokio::time::Instant::now() + STREAM_CHECK_EVERY,
        STREAM_CHECK_EVERY,
    );
    let mut stream_reported = false;
    let leftover = loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break None,
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => {
                    tracing::warn!(subject = %config.subject, "bridge: core subscription ended; re-subscribing");
                    if !backoff.sleep(&shutdown).await {
                        break None;
                    }
                    match nats.queue_subscribe(config.subject.clone(), config.consumer.clone()).await {
                        Ok(s) => {
                            sub = s;
                            backoff.reset();
                        }
                        Err(e) => tracing::warn!(error = %e, "bridge: re-subscribing failed"),
                    }
                    continue;
                }
            },
            _ = stream_check.tick(), if !stream_reported => {
                if jetstream::new(nats.clone()).get_stream(&config.stream).await.is_ok() {
                    stream_reported = true;
                    tracing::warn!(
                        stream = %config.stream,
                        "bridge: the stream now exists but this origin reads a core subscription; \
                         restart it to read durably (until then events published while no origin runs are lost)"
                    );
                }
                continue;
            }
        };
        next_seq += 1;
        let key =
            msg_id(msg.headers.as_ref()).unwrap_or_else(|| format!("core-{instance}-{next_seq}"));
        let job = Job::core(msg, next_seq, key, &pool.handler);
        if let Err(job) = pool.dispatch(job, &shutdown).await {
            break Some(job);
        }
    };
    // Unsubscribe first, so the queue group sends new events to the other replicas.
    drop(sub);
    pool.stop(leftover).await;
}

// ---------------------------------------------------------------------------------------
// Workers

/// One message on its way through a worker, whichever mode delivered it; parsed once, by
/// the reader, which needs the execution id to pick the worker.
struct Job {
    msg: Incoming,
    parsed: Result<Parsed, policy::Malformed>,
    /// Increasing per execution in delivery order (stream sequence, or a local counter).
    seq: u64,
    /// The event's identity when the payload has no `event_id`.
    key: String,
    /// What its age is measured from.
    since: Since,
}

enum Incoming {
    /// Boxed: with its JetStream context it is twice a core message.
    Durable(Box<jetstream::Message>),
    Core(async_nats::Message),
}

enum Since {
    /// When NATS stored it (durable).
    Stored(SystemTime),
    /// When this replica first received it (core).
    Received(Instant),
}

impl Job {
    /// A JetStream message as a job; `None` (logged) if it has no ack metadata.
    fn durable(msg: jetstream::Message, handler: &Handler) -> Option<Self> {
        let (seq, published) = match msg.info() {
            Ok(info) => (info.stream_sequence, SystemTime::from(info.published)),
            Err(e) => {
                // No ack subject to answer on: nothing to do but report it.
                tracing::warn!(subject = %msg.subject, error = %e, "bridge: JetStream message without ack metadata skipped");
                return None;
            }
        };
        let key = msg_id(msg.headers.as_ref()).unwrap_or_else(|| format!("seq-{seq}"));
        let parsed = handler.parse(msg.subject.as_str(), &msg.payload);
        Some(Self {
            msg: Incoming::Durable(Box::new(msg)),
            parsed,
            seq,
            key,
            since: Since::Stored(published),
        })
    }

    /// A core message as a job.
    fn core(msg: async_nats::Message, seq: u64, key: String, handler: &Handler) -> Self {
        let parsed = handler.parse(msg.subject.as_str(), &msg.payload);
        Self {
            msg: Incoming::Core(msg),
            parsed,
            seq,
            key,
            since: Since::Received(Instant::now()),
        }
    }

    fn subject(&self) -> &str {
        match &self.msg {
            Incoming::Durable(m) => m.subject.as_str(),
            Incoming::Core(m) => m.subject.as_str(),
        }
    }

    fn payload(&self) -> &[u8] {
        match &self.msg {
            Incoming::Durable(m) => &m.payload,
            Incoming::Core(m) => &m.payload,
        }
    }

    fn delivery(&self) -> Delivery<'_> {
        Delivery {
            subject: self.subject(),
            payload_len: self.payload().len(),
            parsed: &self.parsed,
            seq: self.seq,
            age: match self.since {
                Since::Stored(at) => SystemTime::now().duration_since(at).unwrap_or_default(),
                Since::Received(at) => at.elapsed(),
            },
            fallback_key: &self.key,
        }
    }

    /// The worker every event of this execution goes to; `None` for a message that is
    /// only acked (malformed or not forwarded), which any worker can take.
    fn route(&self, workers: usize) -> Option<usize> {
        match &self.parsed {
            Ok(Parsed::Forward(ev)) => Some(policy::worker_for(&ev.execution_id, workers)),
            _ => None,
        }
    }
}

/// Core mode's retries: timers in this process, bounded across all workers.
#[derive(Clone)]
struct CoreRetries {
    /// Events currently waiting on a timer.
    held: Arc<AtomicUsize>,
    /// Beyond this many, an event that needs a retry is dropped.
    max_held: usize,
}

/// What a core worker needs to retry: the shared bound and its own queue to come back to.
struct CoreRetry {
    retries: CoreRetries,
    requeue: mpsc::Sender<Job>,
}

impl CoreRetry {
    /// Puts `job` back on this worker's queue after `delay`, unless too many are held.
    fn hold(&self, job: Job, delay: Duration) {
        let held = &self.retries.held;
        if held.fetch_add(1, AtomicOrdering::SeqCst) >= self.retries.max_held {
            held.fetch_sub(1, AtomicOrdering::SeqCst);
            tracing::warn!(subject = %job.subject(), held = self.retries.max_held, "bridge: core retry queue full; event dropped");
            return;
        }
        let (queue, held) = (self.requeue.clone(), held.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // Fails only once the worker stopped (shutdown): the event is dropped with it.
            let _ = queue.send(job).await;
            held.fetch_sub(1, AtomicOrdering::SeqCst);
        });
    }
}

/// One worker: its queue and its task (which returns how many queued events it gave back
/// at shutdown).
struct Worker {
    queue: mpsc::Sender<Job>,
    task: JoinHandle<usize>,
}

/// The fixed set of workers the reader hands messages to.
struct Pool {
    handler: Arc<Handler>,
    workers: Vec<Worker>,
    /// Where the next message without an execution goes first.
    next_any: usize,
    /// Cancelled by [`Pool::stop`], after the reader stopped reading.
    stop: CancellationToken,
    core: Option<CoreRetries>,
}

impl Pool {
    fn start(handler: Arc<Handler>, concurrency: usize, core: Option<CoreRetries>) -> Self {
        let mut pool = Self {
            handler,
            workers: Vec::with_capacity(concurrency),
            next_any: 0,
            stop: CancellationToken::new(),
            core,
        };
        for _ in 0..concurrency {
            let w = pool.spawn_worker();
            pool.workers.push(w);
        }
        pool
    }

    fn spawn_worker(&self) -> Worker {
        let (queue, rx) = mpsc::channel(WORKER_QUEUE);
        let retry = self.core.clone().map(|retries| CoreRetry {
            retries,
            requeue: queue.clone(),
        });
        let task = tokio::spawn(run_worker(
            self.handler.clone(),
            rx,
            retry,
            self.stop.clone(),
        ));
        Worker { queue, task }
    }

    /// Queues `job` on its worker, waiting while that queue is full (back-pressure on the
    /// reader). Gives the job back if shutdown comes first.
    async fn dispatch(&mut self, job: Job, shutdown: &CancellationToken) -> Result<(), Job> {
        let n = self.workers.len();
        let i = match job.route(n) {
            Some(i) => i,
            None => {
                // Only acked: the first worker with room, or wait for the next in turn.
                let start = self.next_any;
                self.next_any = (start + 1) % n;
                match (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&k| self.workers[k].queue.capacity() > 0)
                {
                    Some(k) => k,
                    None => start,
                }
            }
        };
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(job),
                permit = self.workers[i].queue.reserve() => if let Ok(permit) = permit {
                    permit.send(job);
                    return Ok(());
                },
            }
            // Its receiver is gone: the worker panicked. Its executions need a worker.
            tracing::error!(
                worker = i,
                "bridge: a worker stopped unexpectedly; starting a new one"
            );
            self.workers[i] = self.spawn_worker();
        }
    }

    /// Stops every worker (each finishes the event in hand and gives back what is still
    /// queued), gives back `leftover`, and waits for them. Call after reading stopped.
    async fn stop(self, leftover: Option<Job>) {
        self.stop.cancel();
        let mut given_back = 0;
        for (i, w) in self.workers.into_iter().enumerate() {
            drop(w.queue);
            match w.task.await {
                Ok(n) => given_back += n,
                Err(e) => tracing::error!(worker = i, error = %e, "bridge: a worker failed"),
            }
        }
        if let Some(job) = leftover {
            self.handler.give_back(job, None).await;
            given_back += 1;
        }
        let waiting_retries = self.core.map_or(0, |c| c.held.load(AtomicOrdering::SeqCst));
        // Given back = NAKed for redelivery (durable) or dropped (core).
        tracing::info!(
            queued_unhandled = given_back,
            dropped_retries = waiting_retries,
            "bridge stopped"
        );
    }
}

/// One worker: handles its queue in order until the pool stops, then gives back what is
/// still queued. Its [`OrderGuard`] sees every event of its executions (they all hash
/// here), so it is as good as a guard shared by the whole replica.
async fn run_worker(
    handler: Arc<Handler>,
    mut rx: mpsc::Receiver<Job>,
    retry: Option<CoreRetry>,
    stop: CancellationToken,
) -> usize {
    let mut guard = OrderGuard::new();
    loop {
        let job = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        handler.process(job, &mut guard, retry.as_ref()).await;
    }
    rx.close();
    let mut given_back = 0;
    while let Ok(job) = rx.try_recv() {
        handler.give_back(job, Some(&mut guard)).await;
        given_back += 1;
    }
    given_back
}

/// The `Nats-Msg-Id` header (the Rust server sets it to the event id).
fn msg_id(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty())
}

/// Doubling pause between re-open attempts, cut short by shutdown.
#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// Sleeps; false if shutdown came first.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next.unwrap_or(Duration::from_millis(250));
        self.next = Some((d * 2).min(MAX_REOPEN_BACKOFF));
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// One message as the handler sees it, whichever mode delivered it.
struct Delivery<'a> {
    subject: &'a str,
    payload_len: usize,
    /// What the reader made of the payload.
    parsed: &'a Result<Parsed, policy::Malformed>,
    /// Increasing per execution in delivery order (stream sequence, or a local counter).
    seq: u64,
    /// Since NATS stored it (durable) or this replica received it (core).
    age: Duration,
    /// The event's identity when the payload has no `event_id`.
    fallback_key: &'a str,
}

/// What to do with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Ack: forwarded, ignored, malformed or dropped.
    Done,
    /// Try again after [`policy::retry_delay`].
    Retry(RetryReason),
}

/// Everything one event needs; shared by the reader (parsing) and the workers.
struct Handler {
    kv: Arc<dyn KvStore>,
    bus: Arc<dyn Bus>,
    noetl: NoetlClient,
    prefix: String,
    forward: ForwardList,
    limits: RetryLimits,
    retry_delay: Duration,
}

impl Handler {
    fn parse(&self, subject: &str, payload: &[u8]) -> Result<Parsed, policy::Malformed> {
        policy::parse_event(subject, payload, &self.prefix, &self.forward)
    }

    /// Handles one job, then acks or NAKs it (durable) or holds it for a retry (core).
    async fn process(&self, job: Job, guard: &mut OrderGuard, retry: Option<&CoreRetry>) {
        let outcome = self.handle(&job.delivery(), guard).await;
        if let Incoming::Durable(msg) = &job.msg {
            let acked = match outcome {
                Outcome::Done => msg.ack().await,
                Outcome::Retry(reason) => {
                    let delay = policy::retry_delay(reason, self.retry_delay);
                    msg.ack_with(AckKind::Nak(Some(delay))).await
                }
            };
            if let Err(e) = acked {
                tracing::warn!(subject = %msg.subject, error = %e, "bridge: ack failed; the event comes back after ack_wait");
            }
            return;
        }
        if let (Outcome::Retry(reason), Some(retry)) = (outcome, retry) {
            retry.hold(job, policy::retry_delay(reason, self.retry_delay));
        }
    }

    /// Shutdown: an event this replica will not handle. JetStream: NAKed so another
    /// replica gets it now — or, when an earlier event of its execution is waiting for a
    /// redelivery (per `guard`; with no guard, always), after a delay longer than any
    /// retry's, so it comes back behind that one. Never acked. Core: dropped.
    async fn give_back(&self, job: Job, guard: Option<&mut OrderGuard>) {
        let Incoming::Durable(msg) = &job.msg else {
            return;
        };
        let behind =
            policy::retry_delay(RetryReason::BusUnavailable, self.retry_delay) + self.retry_delay;
        let delay = match (&job.parsed, guard) {
            (Ok(Parsed::Forward(ev)), Some(guard)) => {
                let now = Instant::now();
                guard.must_wait(&ev.execution_id, job.seq, now).then(|| {
                    guard.park(&ev.execution_id, job.seq, now + behind);
                    behind
                })
            }
            (Ok(Parsed::Forward(_)), None) => Some(behind),
            _ => None,
        };
        if let Err(e) = msg.ack_with(AckKind::Nak(delay)).await {
            tracing::warn!(subject = %msg.subject, error = %e, "bridge: NAK at shutdown failed; the event comes back after ack_wait");
        }
    }

    /// Keep order, deliver; parks or releases the event in `guard`.
    async fn handle(&self, d: &Delivery<'_>, guard: &mut OrderGuard) -> Outcome {
        let ev = match d.parsed {
            Ok(Parsed::Forward(ev)) => ev,
            Ok(Parsed::Ignored { .. }) => return Outcome::Done,
            Err(e) => {
                tracing::warn!(subject = %d.subject, bytes = d.payload_len, error = %e, "bridge: malformed NoETL event skipped");
                return Outcome::Done;
            }
        };
        let outcome = if guard.must_wait(&ev.execution_id, d.seq, Instant::now()) {
            Outcome::Retry(RetryReason::WaitingBehind)
        } else {
            self.deliver(ev, d).await
        };
        match outcome {
            Outcome::Retry(reason) => {
                // Overdue after two retry periods: by then its redelivery went elsewhere.
                let overdue =
                    policy::retry_delay(reason, self.retry_delay) * 2 + Duration::from_millis(500);
                guard.park(&ev.execution_id, d.seq, Instant::now() + overdue);
            }
            Outcome::Done => guard.release(&ev.execution_id, d.seq),
        }
        outcome
    }

    /// Interest → terminal guard → status → frames → publish.
    async fn deliver(&self, ev: &policy::ExecutionEvent, d: &Delivery<'_>) -> Outcome {
        let id = ev.execution_id.as_str();
        let clients = match interest::interested_clients(&*self.kv, id).await {
            Ok(c) if c.is_empty() => {
                return self.retry_or_drop(RetryReason::NoInterest, d, ev);
            }
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: interest lookup failed");
                return self.retry_or_drop(RetryReason::StoreUnavailable, d, ev);
            }
        };
        let event_key = ev.event_id.as_deref().unwrap_or(d.fallback_key);
        match self
            .kv
            .get(Bucket::Interest, &policy::terminal_key(id))
            .await
        {
            // After the terminal frame only events that would make another terminal (or
            // repeat step.failed: NoETL sends call.error and command.failed for one step)
            // are skipped. A plain lifecycle event handled late by another replica — a
            // step.exit racing the playbook.completed — is still forwarded: order across
            // replicas is not guaranteed, and a lost frame is worse than a late one.
            Ok(Some(owner))
                if owner != event_key.as_bytes()
                    && policy::is_terminal_or_failure(&ev.event_type) =>
            {
                tracing::debug!(execution_id = %id, event_type = %ev.event_type, "bridge: event after the terminal frame skipped");
                return Outcome::Done;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: terminal marker lookup failed");
                return self.retry_or_drop(RetryReason::StoreUnavailable, d, ev);
            }
        }

        let check = if policy::needs_status(&ev.event_type) {
            self.status(id).await
        } else {
            StatusCheck::NotNeeded
        };
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let frames = match policy::resolve(ev, check, &now) {
            Resolution::Frames(f) => *f,
            Resolution::WaitForStatus => {
                let reason = if check == StatusCheck::Unavailable {
                    RetryReason::NoetlUnavailable
                } else {
                    RetryReason::StatusNotFinal
                };
                match policy::retry_verdict(reason, d.age, &self.limits) {
                    RetryVerdict::Retry => return Outcome::Retry(reason),
                    RetryVerdict::Drop => return Outcome::Done,
                    RetryVerdict::UseEventClaim => {
                        tracing::warn!(execution_id = %id, event_type = %ev.event_type, ?reason, "bridge: run status not confirmed in time; forwarding what the event claims");
                        match policy::resolve(ev, StatusCheck::GaveUp, &now) {
                            Resolution::Frames(f) => *f,
                            Resolution::WaitForStatus => return Outcome::Done,
                        }
                    }
                }
            }
        };

        if let Some(progress) = &frames.progress {
            if !self.publish(&clients, progress).await {
                return self.retry_or_drop(RetryReason::BusUnavailable, d, ev);
            }
        }
        if let Some(terminal) = &frames.terminal {
            match self.claim_terminal(id, event_key).await {
                Ok(true) => {
                    if !self.publish(&clients, terminal).await {
                        return self.retry_or_drop(RetryReason::BusUnavailable, d, ev);
                    }
                }
                Ok(false) => {
                    tracing::debug!(execution_id = %id, event_type = %terminal.event_type, "bridge: terminal frame already sent for this execution");
                }
                Err(e) => {
                    tracing::warn!(execution_id = %id, error = %e, "bridge: terminal marker create failed");
                    return self.retry_or_drop(RetryReason::StoreUnavailable, d, ev);
                }
            }
        }
        Outcome::Done
    }

    /// Retry per [`policy::retry_verdict`], or log why the event is dropped.
    fn retry_or_drop(
        &self,
        reason: RetryReason,
        d: &Delivery<'_>,
        ev: &policy::ExecutionEvent,
    ) -> Outcome {
        match policy::retry_verdict(reason, d.age, &self.limits) {
            RetryVerdict::Retry => Outcome::Retry(reason),
            _ if reason == RetryReason::NoInterest => {
                tracing::debug!(execution_id = %ev.execution_id, event_type = %ev.event_type, age_ms = d.age.as_millis() as u64, "bridge: no client interested in time; event dropped");
                Outcome::Done
            }
            _ => {
                tracing::warn!(execution_id = %ev.execution_id, event_type = %ev.event_type, ?reason, "bridge: retries exhausted (core mode); event dropped");
                Outcome::Done
            }
        }
    }

    /// The run's status from NoETL, classified for [`policy::resolve`].
    async fn status(&self, id: &str) -> StatusCheck {
        match self.noetl.execution_status(id).await {
            Ok(reply) => StatusCheck::Known(RunStatus::from_reply(&reply)),
            Err(
                e @ (NoetlError::Status {
                    status: 400..=499, ..
                }
                | NoetlError::BadResponse(_)),
            ) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: NoETL cannot give this run's status; using the event's claim");
                StatusCheck::GaveUp
            }
            Err(e) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: NoETL status unavailable; will retry");
                StatusCheck::Unavailable
            }
        }
    }

    /// True if this event owns the execution's terminal frame: it created the marker now,
    /// or created it on an earlier delivery (a redelivery after a failed publish).
    async fn claim_terminal(
        &self,
        id: &str,
        event_key: &str,
    ) -> Result<bool, crate::store::StoreError> {
        let key = policy::terminal_key(id);
        let mine = Bytes::copy_from_slice(event_key.as_bytes());
        if self.kv.create(Bucket::Interest, &key, mine).await? {
            return Ok(true);
        }
        Ok(self
            .kv
            .get(Bucket::Interest, &key)
            .await?
            .is_some_and(|owner| owner == event_key.as_bytes()))
    }

    /// Encodes `frame` once and publishes it to every client; false if any publish failed
    /// for a reason a retry can fix. A client id the bus refuses is skipped (retrying
    /// could never deliver to it).
    async fn publish(&self, clients: &[String], frame: &PlaybookState) -> bool {
        let data = Bytes::from(notification(event::STATE, frame));
        let results = futures::future::join_all(
            clients
                .iter()
                .map(|c| self.bus.publish(c, event::STATE, data.clone())),
        )
        .await;
        let mut ok = true;
        for (client_id, result) in clients.iter().zip(results) {
            match result {
                Ok(_) => {}
                Err(BusError::InvalidClientId) => {
                    tracing::warn!(%client_id, "bridge: interest names an unusable client id; skipped");
                }
                Err(e) => {
                    tracing::warn!(%client_id, execution_id = %frame.execution_id, error = %e, "bridge: publishing a frame failed; will retry");
                    ok = false;
                }
            }
        }
        if ok {
            tracing::debug!(execution_id = %frame.execution_id, event_type = %frame.event_type, clients = clients.len(), "bridge: frame published");
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_valid_and_follows_the_protocol() {
        let c = BridgeConfig::default();
        c.validate().expect("defaults are valid");
        assert_eq!(c.stream, "noetl_events");
        assert_eq!(c.subject, "noetl.events.>");
        assert_eq!(c.consumer, "gateway-bridge");
        assert_eq!(c.prefix(), "noetl.events.");
        assert_eq!(c.forward.len(), 8);
        assert_eq!(c.max_interest_wait, Duration::from_secs(10));
        assert_eq!(c.concurrency, 32);
    }

    #[test]
    fn typos_in_the_config_are_refused() {
        let bad = [
            BridgeConfig {
                subject: "noetl.events".into(),
                ..Default::default()
            },
            BridgeConfig {
                subject: ">".into(),
                ..Default::default()
            },
            BridgeConfig {
                subject: "noetl.*.>".into(),
                ..Default::default()
            },
            BridgeConfig {
                consumer: "gateway.bridge".into(),
                ..Default::default()
            },
            BridgeConfig {
                stream: String::new(),
                ..Default::default()
            },
            BridgeConfig {
                forward: vec![],
                ..Default::default()
            },
            BridgeConfig {
                retry_delay: Duration::ZERO,
                ..Default::default()
            },
            BridgeConfig {
                batch: 0,
                ..Default::default()
            },
            BridgeConfig {
                concurrency: 0,
                ..Default::default()
            },
            BridgeConfig {
                concurrency: MAX_CONCURRENCY + 1,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(matches!(c.validate(), Err(BridgeError::Config(_))), "{c:?}");
        }
    }
}

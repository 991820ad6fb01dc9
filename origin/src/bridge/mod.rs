//! The NATS bridge: NoETL execution events → `playbook/state` frames for the clients that
//! asked for them (PROTOCOL.md §6).
//!
//! Flow of one event: NATS message → [`policy::parse_event`] (shape, ids, normalised name,
//! allow-list; by the reading task, which then queues it for its execution's worker;
//! everything not forwarded is acked by a worker without further I/O) → interest lookup
//! by execution id ([`crate::interest`]) → the run's status from NoETL when the event's
//! meaning depends on it → [`policy::resolve`] → the claims (terminal frame, failed step)
//! → one encoded frame per resolved state, published once to the run on the [`Bus`]
//! (`Bus::publish_run`: every watcher's stream gets it, however many there are) → ack. The shell only does that I/O; every decision is in [`policy`].
//!
//! ## Layout
//! - this file — the entry: [`spawn`] picks the source and starts it;
//! - [`config`] — [`BridgeConfig`], its defaults and checks;
//! - `source` — the NATS source (the shared durable pull consumer);
//! - `pool` — the worker pool and the jobs it carries;
//! - `poll` — the HTTP fallback: following executions through NoETL's execution record;
//! - `handler` — one event: interest, claims, status, frames, publish, ack;
//! - [`policy`] — every decision, as pure functions.
//!
//! ## Which NoETL, which source
//! The shapes are told apart per message by subject and payload ([`policy::parse_event`]):
//! the Rust control plane (stream `noetl_events`, `noetl.events.<event_type>`, the event
//! row), the older Python server (`noetl.events.<tenant>.<org>.<execution_id>.<shard>`, a
//! small dict) and NoETL 4.x's event mirror (stream `NOETL_EVENTS`, the same per-execution
//! subjects with sanitised tokens, the canonical envelope). The configured streams are
//! tried in order (`noetl_events,NOETL_EVENTS` by default) and the first that exists is
//! read through the durable consumer. docs/COMPATIBILITY.md has the table.
//!
//! ## Decisions
//! - **One durable pull consumer shared by every replica** (`gateway-bridge` on the
//!   stream, explicit acks), read by one of them at a time (below). The consumer's ack
//!   floor lives in NATS, so an event is handled once across N replicas and events
//!   published while every origin is down are delivered when one comes back. A push
//!   consumer or a per-replica consumer would give neither. The consumer starts at
//!   *new* messages when it is first created (deliver policy `New`): a first deployment
//!   must not replay 24 h of history that no client can be interested in; from then on it
//!   is durable and nothing is skipped. Deleting the consumer resets that point.
//! - **HTTP fallback, not a lossy subscription.** Without a stream (NoETL built or
//!   configured without its event stream, or the older Python server publishing on core
//!   NATS, or no NATS at all) the bridge follows every execution someone is interested in
//!   by reading NoETL's execution record (`poll`): one replica per execution (a K/V
//!   lease), from a cursor kept in K/V, at an adaptive rate bounded per execution, until
//!   the run's terminal status. Events seen on core NATS are only wake-ups for that
//!   reading, never frames of their own: frames come from one place, in the record's
//!   order, and nothing is lost when a replica stops (its lease runs out and another
//!   replica continues from the cursor). The mode is chosen at start; a stream that
//!   appears later is read after a restart.
//! - **Confirm before the terminal frame.** A failed step ends a real run FAILED with no
//!   `playbook.failed` event, and a real server can emit `playbook.completed` for a run that
//!   failed. So on `step.failed` and `playbook.completed` the bridge asks NoETL
//!   (`GET /api/executions/{id}/status`) and the terminal frame carries the true status.
//!   Exactly one terminal frame per execution: the event that produces it first claims
//!   `terminal.<execution_id>` in the interest bucket with an atomic create-if-absent,
//!   storing its own event id. A redelivery of that same event (say, after a bus failure)
//!   still owns the claim and publishes again (at-least-once, like every frame); any other
//!   terminal or failure event for that execution is dropped, so nothing follows the
//!   terminal frame. **The claims are taken before anything is published**
//!   ([`policy::publish_plan`]): NoETL reports a failed step twice (call.error and
//!   command.failed), and on two replicas both could pass the check for a claim before
//!   either took it — had each published its step.failed first, the client would get two.
//!   The claim's winner publishes step.failed then the terminal; the loser publishes
//!   nothing. A step's failure is claimed too (`failed.<execution_id>.<step hash>`), so
//!   one reported while the run still looked RUNNING is not repeated by the other report
//!   (if that one's publish failed and the terminal went out meanwhile, its redelivery
//!   still sends its step.failed: late rather than lost).
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
//!   for it, and once its queue is full everyone does.
//! - **One reader at a time, across replicas.** Were every replica pulling, two events of
//!   one execution could be handled at once on two replicas (a `step.exit` overtaking
//!   `playbook.started`, a 4.x `step.exit` passing the `call.error` before it), and no
//!   replica can know that an earlier event of the run is in flight elsewhere: the Rust
//!   shape's subject does not even name the execution. So the replica holding the K/V
//!   reader lease (`bridge.reader`, `lease_ttl`, renewed every third of it) is the only one
//!   pulling; the others stand by and take the lease when it runs out (a reader that died)
//!   or is released (a reader that stopped), and the new reader gets the old one's un-acked
//!   events first (redelivered in stream order after `ack_wait`, 5 s). The cost is that one
//!   replica's workers carry every event (figure 4 in docs/BENCHMARKS.md is that replica);
//!   a lost renewal (a partitioned reader) ends its term: it stops pulling and NAKs what it
//!   queued before another replica reads.
//! - **Shutdown.** The reader stops first (drops its pull subscription and releases the
//!   reader lease), then each worker finishes the event in hand (acked or NAKed as
//!   usual) and gives back what is still queued: NAKed, never acked, so another replica
//!   gets it at once — delayed past any retry when an earlier event of its execution is
//!   waiting for a redelivery, so it comes back behind that one. Messages the NATS client
//!   had already pulled but the reader not yet taken return after `ack_wait`. The HTTP
//!   fallback stops following and lets its leases run out (or releases them).
//! - **Published once.** A frame is built once per event and published once, to the run;
//!   the message is acked only after the publish succeeded. (Before issue 16 it was one
//!   publish per interested client, at most 512 of them.)
//!
//! Malformed messages are logged at warn with their subject and size — never the payload,
//! which may carry step results — and acked: redelivering them cannot help.

pub mod config;
mod handler;
pub mod policy;
mod poll;
mod pool;
mod source;

use std::sync::Arc;

use async_nats::jetstream;
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::noetl::NoetlClient;
use crate::scrub::Scrubber;
use crate::store::KvStore;
use handler::Handler;

pub use config::{BridgeConfig, MAX_CONCURRENCY};
/// Re-exported so callers of [`spawn`] (the server, the tests) need no tokio-util of their own.
pub use tokio_util::sync::CancellationToken;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeMode {
    /// The shared durable pull consumer on this stream: once across replicas, nothing lost.
    Durable {
        /// The stream read (the first configured one that exists).
        stream: String,
    },
    /// No stream: executions are followed through NoETL's execution record (`poll`), with
    /// NoETL's core NATS events (when there is NATS) as wake-ups.
    Poll,
}

/// A running bridge.
#[derive(Debug)]
pub struct Bridge {
    /// How it reads.
    pub mode: BridgeMode,
    /// Ends after the shutdown token is cancelled: reading stops, every worker finishes
    /// the event in hand, queued events are NAKed (redelivered at once, elsewhere); the
    /// HTTP fallback stops following.
    pub task: JoinHandle<()>,
}

/// Starts the bridge: picks the source (the first of `config.streams` that exists, read
/// through the shared durable consumer; else the HTTP fallback), logs which, and spawns it.
/// Without NATS (`nats` is `None`) it is the HTTP fallback, on this replica's store.
/// `scrubber` cleans NoETL's error before a result synthesised for a run that ended
/// without its callback carries it ([`crate::settle`]).
///
/// Errors only for bad settings or a NATS that fails the lookup itself; an absent stream
/// is the fallback, not an error. Once running, the task survives NATS outages
/// (async-nats reconnects; the consumer is re-opened) until `shutdown` is cancelled.
pub async fn spawn(
    nats: Option<async_nats::Client>,
    kv: Arc<dyn KvStore>,
    bus: Arc<dyn Bus>,
    noetl: NoetlClient,
    scrubber: Scrubber,
    config: BridgeConfig,
    shutdown: CancellationToken,
) -> Result<Bridge, BridgeError> {
    config.validate()?;
    let handler = Handler::new(kv.clone(), bus, noetl.clone(), scrubber, &config);
    if let Some(nats) = &nats {
        let js = jetstream::new(nats.clone());
        for name in config.streams.clone() {
            let stream = match js.get_stream(&name).await {
                Ok(stream) => stream,
                Err(e) if source::stream_is_absent(&e) => continue,
                Err(e) => return Err(BridgeError::Nats(format!("looking up stream {name}: {e}"))),
            };
            let consumer = stream
                .get_or_create_consumer(&config.consumer, source::consumer_config(&config))
                .await
                .map_err(|e| {
                    BridgeError::Nats(format!(
                        "durable consumer {} on stream {name}: {e}",
                        config.consumer
                    ))
                })?;
            tracing::info!(
                mode = "durable",
                stream = %name,
                consumer = %config.consumer,
                subject = %config.subject,
                "bridge: reading NoETL events through the shared durable consumer \
                 (each event once across replicas; events published while every origin \
                 is down are delivered on restart)"
            );
            let task = tokio::spawn(source::run_durable(
                handler, kv, stream, consumer, config, shutdown,
            ));
            return Ok(Bridge {
                mode: BridgeMode::Durable { stream: name },
                task,
            });
        }
    }
    tracing::warn!(
        mode = "poll",
        streams = ?config.streams,
        nats = nats.is_some(),
        interval = ?config.poll_interval,
        max_interval = ?config.poll_max_interval,
        "bridge: no NoETL event stream found; following executions through NoETL's \
         execution record (HTTP). NoETL events on core NATS, if any, only wake the reading \
         up. Enable NoETL's event stream and restart the origin to read it durably"
    );
    let task = tokio::spawn(poll::run(
        Arc::new(handler),
        kv,
        noetl,
        nats,
        config,
        shutdown,
    ));
    Ok(Bridge {
        mode: BridgeMode::Poll,
        task,
    })
}

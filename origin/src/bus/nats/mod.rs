//! The shared [`Bus`]: a JetStream stream keeps every frame; one ordered consumer per
//! replica routes them to the replica's subscriptions.
//!
//! Every origin replica points at the same stream, so a client that reconnects to any
//! replica gets what it missed (ARCHITECTURE.md: the origin is stateless). The design is
//! chosen for 100k mostly idle SSE connections per NATS cluster: an idle connection costs
//! the server nothing (no subscription, no consumer) and its replica an entry in a map.
//!
//! Decisions:
//! - **The stream** `GATEWAY_FRAMES` (name overridable) holds `gateway.clients.<client_id>`,
//!   file storage, discard old, `max_age` = [`Retention::max_age`] and
//!   `max_messages_per_subject` = [`Retention::max_frames_per_client`] (0: no limit). An
//!   existing stream is used as it is: differences are reported (`tracing::warn!` and
//!   [`NatsBus::config_mismatches`]), never changed behind the operator's back. Replicas
//!   are the server's default (1); create the stream beforehand for R3.
//! - **Frame id = stream sequence.** It is what the publish ack returns, strictly increases
//!   per client (not contiguously: the sequence is shared by all clients), and lets any
//!   replica find "frames after `Last-Event-ID`" in the stream.
//! - **publish** = one JetStream publish to `gateway.clients.<id>` with header `Gw-Event`,
//!   returning once acknowledged (the frame is retained from then on). Nothing else: the
//!   stream is the only copy, so there is no second, lossy path to reconcile.
//! - **Live delivery: one ordered push consumer per replica** over `gateway.clients.>`,
//!   started at the stream's next sequence, feeding an in-process router (client id →
//!   the subscriptions open here). An ordered consumer delivers every message of the
//!   stream in order and recreates itself after the last sequence it delivered when it
//!   notices a gap (missed heartbeat, reconnect, slow-consumer drop), so nothing stored is
//!   skipped. Each frame costs one publish ack plus one delivery per replica, and no
//!   JetStream API request — the earlier design (core `gateway.live.<id>` subscription per
//!   client, every live frame checked with `STREAM.MSG.GET` + `STREAM.INFO`) cost four
//!   round trips per frame and topped out at ~6k deliveries/s. Every replica receives
//!   every frame: fine while frames/s × replicas stays far below what one NATS connection
//!   carries (hundreds of thousands of small messages per second).
//! - **subscribe** = (1) register with the router (the router must be running: a replica
//!   whose consumer is down refuses subscriptions as unavailable); (2) read the stream from
//!   the start point with "first message on this subject from sequence s" (the stream
//!   leader's `STREAM.MSG.GET`) until there is none; (3) take routed frames, skipping any
//!   not above the last id yielded. A frame the router handles after (1) is routed to the
//!   subscription; one it handled before was stored before (1), so the reads in (2) find
//!   it — no gap, and the id check removes the overlap.
//!   Reads instead of a consumer per client: a reconnect storm (a replica restarting) then
//!   costs cheap leader reads rather than thousands of consumer creations through the
//!   cluster's meta leader, and the common resume ("nothing missed") is one read plus one
//!   `STREAM.INFO`. A replay costs about one read per frame (bounded by retention).
//! - **Nothing owed is skipped.** A frame can leave the stream before the router saw it
//!   only by retention (a subject at `max_messages_per_subject`, or age). While the stream
//!   holds exactly `gateway.clients.>` its sequence has no holes other than deleted
//!   frames, so the router notices a hole in what it is delivered and has every
//!   subscription re-read the stream with the drop check: whenever the next frame read is
//!   not `last + 1`, the subscription checks that retention cannot have dropped a frame in
//!   between (only a full subject drops a live client's frames, oldest first, so it is
//!   enough that the subject is not full, or that it still holds a frame at or below
//!   `last`); otherwise the stream ends with an error ("fell behind retention"), the SSE
//!   layer evicts, the client resumes and is told `reset`. Catch-up reads check once per
//!   `READ_AHEAD` (32) frames. On an existing stream with wider subjects the router
//!   cannot see holes, so every routed frame is looked up in the stream first (the old,
//!   slower path).
//! - **Backlog.** A subscription holds at most [`LIVE_BACKLOG`] routed frames not yet
//!   taken; beyond that its stream ends with [`BusError::Lagged`] (the SSE layer evicts;
//!   the client resumes with `Last-Event-ID` and loses nothing). While a subscription is
//!   reading the stream, an overflow costs nothing: the reads cover what was routed.
//! - **Reconnects.** The ordered consumer resumes after the last sequence it delivered, so
//!   a short outage loses nothing. A watcher polls the connection's connect counter every
//!   250 ms; an outage longer than half of `max_age` ends every subscription with an
//!   error: frames owed to them may have expired meanwhile, and a resume applies the full
//!   reset rule. If the consumer itself fails, every subscription ends the same way and
//!   the router starts a new consumer (backing off up to 5 s).
//! - **`reset` for `After(n)`** (a spurious reset is safe, a silent gap is not), decided
//!   from the first frame after `n` and then the stream's state, in that order (so a frame
//!   dropped before the read shows in the state), is true when: `n` is above the stream's
//!   last sequence (an id from another or a recreated stream); or `n + 1` is below the
//!   stream's first sequence (everything between went, and some may have been this
//!   client's — frames leave a limits stream oldest first); or the subject is full, its
//!   first frame after `n` is not `n + 1`, and it holds no frame at or below `n`. The
//!   second rule fires spuriously for a client idle longer than `max_age`: the stream
//!   cannot tell whether any frame that aged out was its own. These facts become a
//!   "highest id that may have been dropped" watermark, and `bus::reset`'s rule — the
//!   one the memory bus uses too — decides. A reset stream starts with the oldest
//!   retained frame. `Retained` owes every frame retained when it subscribes.
//! - **A subscription ends** (one `Err`, then the end) when a read fails, the router's
//!   consumer fails or a long outage, the subscriber fell behind (backlog or retention) —
//!   never by skipping frames.
//!
//! Layout: this file is [`NatsBus`] (open, publish, subscribe); `stream` the frames
//! stream's settings (what is created, how an existing one differs); `router` live
//! delivery (the ordered consumer fanning frames out to this replica's subscriptions,
//! and the reconnect watcher); `replay` a subscription's reads of the stream (its start
//! point and reset, catch-up, the drop checks).

mod replay;
mod router;
mod stream;

use super::{Bus, BusError, Retention, StartAt, Subscription};
use async_nats::connection::State;
use async_nats::jetstream::{self, stream as js};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use gateway_shared::ids::ClientId;
use std::fmt::Display;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::{CancellationToken, DropGuard};

use replay::{start_point, Feed};
pub use router::LIVE_BACKLOG;
use router::{watch_connects, Registration, Router, RouterTask};
use stream::{config_mismatches, stream_config, stream_info};

/// The stream's name unless [`NatsBus::open`] is given another (PROTOCOL.md §7).
pub const DEFAULT_STREAM_NAME: &str = "GATEWAY_FRAMES";

/// The subjects the stream holds: one per client.
pub const FRAMES_SUBJECTS: &str = "gateway.clients.>";

/// Header carrying the SSE event name, on stored and live messages.
pub const EVENT_HEADER: &str = "Gw-Event";

pub(super) const FRAMES_PREFIX: &str = "gateway.clients.";

/// How long any one NATS call may take before it fails as unavailable, so a dead server
/// gives an error rather than a hang. (Overrides the client's request timeout, 10 s by
/// default, for this bus's calls only.)
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// The frames bus shared by every origin replica; cheap to clone.
#[derive(Clone)]
pub struct NatsBus {
    client: Client,
    js: jetstream::Context,
    stream: js::Stream<()>,
    name: String,
    mismatches: Vec<String>,
    shared: Arc<Shared>,
}

/// What every clone of one bus shares: the router, and the guard that stops its task
/// when the last clone is dropped.
struct Shared {
    router: Arc<Router>,
    /// The stream holds exactly `gateway.clients.>` (see [`RouterTask::exact_subjects`]).
    exact_subjects: bool,
    _stop: DropGuard,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("stream", &self.name)
            .field("mismatches", &self.mismatches)
            .finish()
    }
}

pub(super) fn unavailable(what: impl Display, err: impl Display) -> BusError {
    BusError::Unavailable(format!("NATS bus {what}: {err}"))
}

pub(super) fn frames_subject(client_id: &ClientId) -> String {
    format!("{FRAMES_PREFIX}{client_id}")
}

impl NatsBus {
    /// Publishes one frame with `headers` (plus the event's) and waits for the stream's
    /// ack; a duplicate's ack carries the first copy's sequence.
    async fn publish_headers(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
        mut headers: HeaderMap,
    ) -> Result<u64, BusError> {
        super::check_event(event)?;
        let subject = frames_subject(client_id);
        let what = || format!("publish to {subject}");
        headers.insert(EVENT_HEADER, event);
        let id = self
            .js
            .publish_with_headers(subject.clone(), headers, data)
            .await
            .map_err(|e| unavailable(what(), e))?
            .await
            .map_err(|e| unavailable(what(), e))?
            .sequence;
        Ok(id)
    }

    /// Opens (creating when absent) the frames stream on the server `client` is connected
    /// to. `stream_name` overrides [`DEFAULT_STREAM_NAME`] (tests; the subjects stay
    /// `gateway.clients.>`, so two streams cannot share one server). Spawns one small task
    /// that watches the connection for reconnects; it ends with the bus.
    pub async fn open(
        client: Client,
        retention: Retention,
        stream_name: Option<&str>,
    ) -> Result<Self, BusError> {
        let name = stream_name.unwrap_or(DEFAULT_STREAM_NAME);
        let js = jetstream::ContextBuilder::new()
            .timeout(OPERATION_TIMEOUT)
            .build(client.clone());
        let wanted = stream_config(name, &retention);
        let existing = match stream_info(&js, name).await? {
            Some(info) => Some(info),
            None => match js.create_stream(wanted.clone()).await {
                Ok(_) => {
                    tracing::info!(stream = name, retention = ?retention, "created NATS frames stream");
                    None
                }
                // Another replica may have created it meanwhile (with other settings):
                // use theirs, as if it had been there all along.
                Err(create_err) => match stream_info(&js, name).await? {
                    Some(info) => Some(info),
                    None => return Err(unavailable(format!("stream {name} create"), create_err)),
                },
            },
        };
        let (mismatches, max_age) = match &existing {
            Some(info) => (
                config_mismatches(&wanted, &info.config),
                info.config.max_age,
            ),
            None => (Vec::new(), wanted.max_age),
        };
        for mismatch in &mismatches {
            tracing::warn!(
                stream = name,
                %mismatch,
                "existing NATS frames stream differs from the configuration; using it as it is"
            );
        }
        let stream = js
            .get_stream_no_info(name)
            .await
            .map_err(|e| unavailable(format!("stream {name} open"), e))?;
        let exact_subjects = existing
            .as_ref()
            .is_none_or(|info| info.config.subjects == [FRAMES_SUBJECTS]);
        let router = Arc::new(Router::default());
        let stop = CancellationToken::new();
        let mut up = router.up.subscribe();
        tokio::spawn(
            RouterTask {
                js: js.clone(),
                stream: stream.clone(),
                name: name.to_owned(),
                router: router.clone(),
                connects: watch_connects(&client),
                max_age,
                exact_subjects,
                stop: stop.clone(),
            }
            .run(),
        );
        // The first subscription must not wait for (or fail on) the consumer's creation.
        tokio::time::timeout(OPERATION_TIMEOUT, up.wait_for(|up| *up))
            .await
            .map_err(|_| unavailable(format!("stream {name}"), "router consumer not created"))?
            .map_err(|e| unavailable(format!("stream {name}"), e))?;
        Ok(Self {
            client,
            js,
            stream,
            name: name.to_owned(),
            mismatches,
            shared: Arc::new(Shared {
                router,
                exact_subjects,
                _stop: stop.drop_guard(),
            }),
        })
    }

    /// Sets how many routed frames a subscription may hold before it ends as lagged
    /// (default [`LIVE_BACKLOG`]; the origin passes `SSE_QUEUE`). Applies to every clone.
    pub fn with_backlog(self, backlog: usize) -> Self {
        self.shared
            .router
            .backlog
            .store(backlog.max(1), Ordering::Relaxed);
        self
    }

    /// Subscriptions open on this bus (all clones), for metrics and leak checks.
    pub fn live_subscribers(&self) -> usize {
        self.shared.router.lock().subs.values().map(Vec::len).sum()
    }

    /// How the existing stream differs from the configuration (empty when it matches), for
    /// start-up logs and diagnostics; each was also logged with `tracing::warn!`.
    pub fn config_mismatches(&self) -> &[String] {
        &self.mismatches
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
    ) -> Result<u64, BusError> {
        self.publish_headers(client_id, event, data, HeaderMap::new())
            .await
    }

    async fn publish_external(
        &self,
        subject: &str,
        data: Bytes,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let what = || format!("publish to {subject}");
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        self.js
            .publish_with_headers(subject.to_owned(), headers, data)
            .await
            .map_err(|e| unavailable(what(), e))?
            .await
            .map_err(|e| unavailable(what(), e))?;
        Ok(())
    }

    fn has_external_subjects(&self) -> bool {
        true
    }

    async fn publish_once(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
        key: &str,
    ) -> Result<u64, BusError> {
        let mut headers = HeaderMap::new();
        // A key JetStream could not carry as a header value is no key: publish as usual.
        if !key.is_empty() && key.len() <= 256 && key.bytes().all(|b| b.is_ascii_graphic()) {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, key);
        }
        self.publish_headers(client_id, event, data, headers).await
    }

    /// `max_payload` as the server announced it, less the `publish` header block
    /// (`NATS/1.0\r\n`, `Gw-Event: <event>\r\n`, `\r\n`): the client and the server
    /// count headers and payload together. `None` before the server's INFO is known.
    fn max_data_len(&self, event: &str) -> Option<usize> {
        let headers = "NATS/1.0\r\n".len() + EVENT_HEADER.len() + ": \r\n".len() + event.len() + 2;
        let max = self.client.server_info().max_payload;
        (max > 0).then(|| max.saturating_sub(headers))
    }

    async fn subscribe(
        &self,
        client_id: &ClientId,
        start: StartAt,
    ) -> Result<Subscription, BusError> {
        let subject = frames_subject(client_id);
        let router = self.shared.router.clone();
        let mut up = router.up.subscribe();
        tokio::time::timeout(OPERATION_TIMEOUT, up.wait_for(|up| *up))
            .await
            .map_err(|_| unavailable(format!("subscribe {client_id}"), "router not running"))?
            .map_err(|e| unavailable(format!("subscribe {client_id}"), e))?;
        // Registered before the stream is read: a frame the router handles from now on is
        // routed here, one it handled before was stored before the reads (module docs).
        let reg = Registration::new(router, client_id);
        let (reset, last, first) = start_point(&self.stream, &subject, start).await?;
        let feed = Feed::new(
            reg,
            self.stream.clone(),
            subject,
            last,
            first,
            !self.shared.exact_subjects,
        );
        let frames = futures::stream::unfold(feed, |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        })
        .boxed();
        Ok(Subscription { reset, frames })
    }

    async fn is_healthy(&self) -> bool {
        self.client.connection_state() == State::Connected && *self.shared.router.up.borrow()
    }
}

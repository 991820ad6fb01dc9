//! The shared [`Bus`]: a JetStream stream keeps every frame; one ordered consumer per
//! replica routes them to the replica's subscriptions.
//!
//! Every origin replica points at the same stream, so a client that reconnects to any
//! replica gets what it missed (ARCHITECTURE.md: the origin is stateless). The design is
//! chosen for 100k mostly idle SSE connections per NATS cluster: an idle connection costs
//! the server nothing (no subscription, no consumer) and its replica an entry in a map.
//!
//! Decisions:
//! - **The stream** `GATEWAY_FRAMES` (name overridable) holds `gateway.clients.<client_id>`
//!   and `gateway.executions.<execution_id>` (a run's frames, published once for every
//!   watcher), file storage, discard old, `max_age` = [`Retention::max_age`] and
//!   `max_messages_per_subject` = [`Retention::max_frames_per_client`] (0: no limit; a run's
//!   subject is held to it too). An existing stream is used as it is: differences are
//!   reported (`tracing::warn!` and [`NatsBus::config_mismatches`]), never changed behind the
//!   operator's back — except that a stream without the runs' subjects (made before run
//!   broadcast) or without direct gets (made before `reader`) gets them added in place.
//!   Replicas are the server's default (1); `NATS_REPLICAS` changes them.
//! - **Frame id = stream sequence.** It is what the publish ack returns, strictly increases
//!   per client (not contiguously: the sequence is shared by all clients), and lets any
//!   replica find "frames after `Last-Event-ID`" in the stream.
//! - **publish** = one JetStream publish to `gateway.clients.<id>` with header `Gw-Event`,
//!   returning once acknowledged (the frame is retained from then on). Nothing else: the
//!   stream is the only copy, so there is no second, lossy path to reconcile.
//! - **Live delivery: one ordered push consumer per replica** over both subject trees,
//!   started at the stream's next sequence, feeding an in-process router (client id →
//!   the subscriptions open here; execution id → the subscriptions watching it). An ordered consumer delivers every message of the
//!   stream in order and recreates itself after the last sequence it delivered when it
//!   notices a gap (missed heartbeat, reconnect, slow-consumer drop), so nothing stored is
//!   skipped. Each frame costs one publish ack plus one delivery per replica, and no
//!   JetStream API request — the earlier design (core `gateway.live.<id>` subscription per
//!   client, every live frame checked with `STREAM.MSG.GET` + `STREAM.INFO`) cost four
//!   round trips per frame and topped out at ~6k deliveries/s. Every replica receives
//!   every frame: fine while frames/s stays far below what one NATS connection carries
//!   (hundreds of thousands of small messages per second); past that, shard the stream by
//!   subject (docs/OPERATIONS.md, "Broadcast ceiling").
//! - **Runs** ([`Bus::publish_run`]): one publish to `gateway.executions.<id>` per frame,
//!   keyed like `publish_once`, whatever the number of watchers — no per-watcher publish, no
//!   cap. A subscription is opened with its client's watch list ([`Bus::subscribe_with`]);
//!   [`Bus::watch`] publishes a `gw/watch` control frame (payload: the execution id) on the
//!   client's own subject, and the router of whichever replica holds the client's streams
//!   adds the run to them when it routes that frame — in stream order, so every run frame
//!   stored after it reaches them. Control frames are never yielded.
//! - **subscribe** = (1) register with the router, for the client and each watched run
//!   (the router must be running: a replica whose consumer is down refuses subscriptions as
//!   unavailable); (2) read the stream from the start point with "first message on this
//!   subject from sequence s" (`reader`) until there is none;
//!   (3) take routed frames, skipping any not above the last id yielded. A frame the router
//!   handles after (1) is routed to the subscription; one it handled before was stored
//!   before (1), so the reads in (2) find it — no gap, and the id check removes the overlap.
//!   With runs, (2) reads every subject (the client's and each run's) and merges them by
//!   id, each up to one **mark**: the stream's last sequence taken after (1). Everything
//!   above the mark is routed; without it, a subject read empty early could gain a frame
//!   below one read later from another subject, and the id check would then skip it.
//!   A `gw/watch` frame met in the reads adds its run (registering it if the router had
//!   not: it handled the frame before (1)) and moves the mark to the stream's end.
//!   Reads instead of a consumer per client: a reconnect storm (a replica restarting) then
//!   costs cheap reads rather than thousands of consumer creations through the cluster's
//!   meta leader. A replay costs about one read per frame (bounded by retention). A
//!   read is a direct get while the stream has one replica, the leader's `STREAM.MSG.GET`
//!   when it is replicated (`reader`: read-after-write). A new client subscribed before
//!   its id is stored anywhere ([`StartAt::Unseen`]) reads nothing: no frame can precede
//!   the registration; its subscription reports the router's position
//!   ([`Subscription::position`](super::Subscription::position)), which its record keeps
//!   as the point a resume with nothing read starts after ([`StartAt::Since`]).
//! - **A resume with nothing new reads nothing** (the common case: a replica restarts, its
//!   clients come back having read everything). The router keeps a fixed-size index of
//!   what it has been delivered (`router::Seen`): from the consumer's start — raised past
//!   any hole — up to its position, the two highest sequences of frames on the subjects (a
//!   client's or a run's) that hash to each of 65,536 slots (1 MiB). A resume after `n`
//!   ([`StartAt::After`], with the runs the client watches; [`StartAt::Since`], without
//!   runs: it owes a run's older frames), while connected, asks it once registered: when
//!   `n` lies between the start and the position and none of its subjects' slots holds a
//!   frame above `n`, every frame above `n` the stream may hold for it has yet to reach
//!   the router, so it will be routed — no read, no `STREAM.INFO`, and no reset (nothing
//!   above `n` was delivered, so nothing above it can have been dropped unseen: a hole
//!   raises the start past it, and one that shows later flags the subscription to re-read,
//!   as for any other). A subject sharing a slot with a busier one only costs the resume
//!   its reads (~15 % of the resumes with nothing new in `bench-peers --figures 5
//!   --storm-read-all`: 21k subjects over the slots).
//! - **A resume with one new frame reads that frame by its sequence.** Each slot keeps its
//!   two highest sequences; when no subject's slot holds two above `n` (same conditions),
//!   each one named is read with a direct get of its sequence (`reader`'s `at`), which
//!   NATS answers from its index. The first frame of a subject from `n + 1` — the read
//!   below — NATS finds by scanning every message after `n` in its block, so it cost in
//!   proportion to all clients' traffic while this one was away (~65 µs of nats-server per
//!   resume in the storm of `bench-peers --figures 5`, with 1,000 results between). A
//!   named frame on another subject (a shared slot) means none of this one's; a named
//!   frame that is gone sends the resume to the reads below, whose drop checks decide
//!   about a reset. Nothing else of the subjects above `n` can have been delivered, so
//!   every later frame is routed.
//!   Otherwise the reads below decide (`gateway_bus_resumes_total{reads}`: `none`,
//!   `indexed`, `stream`).
//! - **A client known to follow no run has no watch list to read** ([`Bus::unwatched`]).
//!   The same index keeps a bit per slot for the `gw/watch` frames it was delivered; a
//!   client whose slot has none, made at a position between the start and the position
//!   (its record's) and resuming at or below the position, has had every frame of it
//!   delivered and none was a watch — `interest::follow` publishes the frame before it
//!   writes the list — so the SSE open does not read the list. A watch above the position
//!   is still to come, and is routed to or read by the subscription as any other.
//! - **Nothing owed is skipped.** A frame can leave the stream before the router saw it
//!   only by retention (a subject at `max_messages_per_subject`, or age). While the stream
//!   holds exactly the two subject trees its sequence has no holes other than deleted
//!   frames, so the router notices a hole in what it is delivered and has every
//!   subscription re-read the stream with the drop check: whenever the next frame read is
//!   not `last + 1`, the subscription checks that retention cannot have dropped a frame in
//!   between (only a full subject drops a live client's frames, oldest first, so it is
//!   enough that the subject is not full, or that it still holds a frame at or below
//!   `last`); otherwise the stream ends with an error ("fell behind retention"), the SSE
//!   layer evicts, the client resumes and is told `reset`. Catch-up reads check once per
//!   `READ_AHEAD` (32) frames, per subject. On an existing stream with wider subjects the router
//!   cannot see holes, so every routed frame is preceded by a read of every subject up to
//!   it (the old, slower path).
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
//!   first frame after `n` is not `n + 1`, and it holds no frame at or below `n` — the last
//!   rule checked for each watched run's subject too. The
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

mod reader;
mod replay;
mod router;
mod stream;

use super::{Bus, BusError, Retention, StartAt, Subscription, WATCH_EVENT};
use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use gateway_shared::ids::{ClientId, ExecutionId};
use std::fmt::Display;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::{CancellationToken, DropGuard};

use reader::Reader;
use replay::{nothing_to_read, sole_frames, start_point, Feed};
pub use router::LIVE_BACKLOG;
use router::{watch_connects, Registration, Router, RouterTask};
use stream::{config_mismatches, covers, exact, stream_config, stream_info};

/// The stream's name unless [`NatsBus::open`] is given another (PROTOCOL.md §7).
pub const DEFAULT_STREAM_NAME: &str = "GATEWAY_FRAMES";

/// The clients' subjects: one per client.
pub const FRAMES_SUBJECTS: &str = "gateway.clients.>";

/// The runs' subjects: one per execution, its frames published once for every watcher.
pub const RUNS_SUBJECTS: &str = "gateway.executions.>";

/// Header carrying the SSE event name, on stored and live messages.
pub const EVENT_HEADER: &str = "Gw-Event";

pub(super) const FRAMES_PREFIX: &str = "gateway.clients.";

pub(super) const RUNS_PREFIX: &str = "gateway.executions.";

/// How long any one NATS call may take before it fails as unavailable, so a dead server
/// gives an error rather than a hang. (Overrides the client's request timeout, 10 s by
/// default, for this bus's calls only.)
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// The frames bus shared by every origin replica; cheap to clone.
#[derive(Clone)]
pub struct NatsBus {
    client: Client,
    js: jetstream::Context,
    /// One reader for every subscription ([`replay::Feed`] holds a clone of the `Arc`).
    reader: Arc<Reader>,
    name: String,
    mismatches: Vec<String>,
    shared: Arc<Shared>,
}

/// What every clone of one bus shares: the router, and the guard that stops its task
/// when the last clone is dropped.
struct Shared {
    router: Arc<Router>,
    /// The stream holds exactly the clients' and runs' subjects (see
    /// [`RouterTask::exact_subjects`]).
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

/// A run's subject; `execution_id` is a valid id (a subject token).
pub(super) fn runs_subject(execution_id: &str) -> String {
    format!("{RUNS_PREFIX}{execution_id}")
}

/// `Nats-Msg-Id: key` when `key` can be a header value (else no key: published as usual).
fn keyed(key: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if !key.is_empty() && key.len() <= 256 && key.bytes().all(|b| b.is_ascii_graphic()) {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, key);
    }
    headers
}

impl NatsBus {
    /// Publishes one frame with `headers` (plus the event's) and waits for the stream's
    /// ack; a duplicate's ack carries the first copy's sequence.
    async fn publish_headers(
        &self,
        subject: String,
        event: &str,
        data: Bytes,
        mut headers: HeaderMap,
    ) -> Result<u64, BusError> {
        super::check_event(event)?;
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
    /// `gateway.clients.>` and `gateway.executions.>`, so two streams cannot share one
    /// server). Spawns one small task
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
        // A stream made by an earlier version is brought up to date in place (nothing else
        // changes; frames stay): the runs' subjects (before run broadcast), direct gets
        // (before the seventh session's reads, `reader`).
        let existing = match existing {
            Some(mut info)
                if !covers(&info.config.subjects, RUNS_SUBJECTS) || !info.config.allow_direct =>
            {
                let mut config = info.config.clone();
                if !covers(&config.subjects, RUNS_SUBJECTS) {
                    config.subjects.push(RUNS_SUBJECTS.to_owned());
                }
                config.allow_direct = true;
                match js.update_stream(&config).await {
                    Ok(updated) => {
                        tracing::info!(stream = name, subjects = ?updated.config.subjects, allow_direct = updated.config.allow_direct, "brought the NATS frames stream up to date");
                        info = updated;
                    }
                    Err(e) => {
                        tracing::warn!(stream = name, error = %e, "could not update the NATS frames stream: without {RUNS_SUBJECTS} run frames are not published; without direct gets reads go through the stream leader");
                    }
                }
                Some(info)
            }
            other => other,
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
        // How subscriptions read depends on the stream's replicas (`reader`): the config is
        // the existing stream's as brought up to date above, or the one just created.
        let config = existing.as_ref().map_or(&wanted, |info| &info.config);
        let reader = Arc::new(Reader::new(client.clone(), stream.clone(), config));
        let exact_subjects = existing
            .as_ref()
            .is_none_or(|info| exact(&info.config.subjects));
        let router = Arc::new(Router::default());
        let stop = CancellationToken::new();
        let mut up = router.up.subscribe();
        tokio::spawn(
            RouterTask {
                js: js.clone(),
                stream,
                reader: reader.clone(),
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
            reader,
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

    /// Fetches the stream's info again, so reads follow its replicas as they are now
    /// (after `NATS_REPLICAS` was applied to it: a replicated stream is read through its
    /// leader, see `reader`).
    pub async fn recheck_stream(&self) -> Result<(), BusError> {
        let info = self
            .reader
            .stream
            .get_info()
            .await
            .map_err(|e| unavailable(format!("stream {} info", self.name), e))?;
        self.reader.note(&info);
        Ok(())
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
        self.publish_headers(frames_subject(client_id), event, data, HeaderMap::new())
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

    /// From the router's index (`router::Seen`): every frame above its horizon delivered,
    /// up to its position, and no `gw/watch` frame on the client's subject among them.
    fn unwatched(&self, client_id: &ClientId) -> Option<std::ops::RangeInclusive<u64>> {
        self.shared
            .router
            .unwatched(client_id.as_str())
            .map(|(horizon, position)| horizon..=position)
    }

    async fn publish_once(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
        key: &str,
    ) -> Result<u64, BusError> {
        self.publish_headers(frames_subject(client_id), event, data, keyed(key))
            .await
    }

    async fn publish_run(
        &self,
        execution_id: &ExecutionId,
        event: &str,
        data: Bytes,
        key: &str,
    ) -> Result<u64, BusError> {
        let subject = runs_subject(execution_id.as_str());
        self.publish_headers(subject, event, data, keyed(key)).await
    }

    /// A `gw/watch` control frame on the client's subject: the router holding the client's
    /// subscriptions adds the run to them in stream order (`router`).
    async fn watch(
        &self,
        client_id: &ClientId,
        execution_id: &ExecutionId,
    ) -> Result<(), BusError> {
        let data = Bytes::copy_from_slice(execution_id.as_str().as_bytes());
        self.publish_headers(
            frames_subject(client_id),
            WATCH_EVENT,
            data,
            HeaderMap::new(),
        )
        .await?;
        Ok(())
    }

    /// `max_payload` as the server announced it, less the `publish` header block
    /// (`NATS/1.0\r\n`, `Gw-Event: <event>\r\n`, `\r\n`): the client and the server
    /// count headers and payload together. `None` before the server's INFO is known.
    fn max_data_len(&self, event: &str) -> Option<usize> {
        let headers = "NATS/1.0\r\n".len() + EVENT_HEADER.len() + ": \r\n".len() + event.len() + 2;
        let max = self.client.server_info().max_payload;
        (max > 0).then(|| max.saturating_sub(headers))
    }

    async fn subscribe_with(
        &self,
        client_id: &ClientId,
        start: StartAt,
        watching: &[ExecutionId],
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
        let watching = super::newest_watches(watching);
        let reg = Registration::new(router.clone(), client_id, watching);
        // A new id's: no frame of it can be at or below what the router has been delivered.
        let position = match start {
            StartAt::Unseen => router.seen_position(),
            _ => None,
        };
        let runs: Vec<String> = watching.iter().map(|e| runs_subject(e.as_str())).collect();
        // A resume whose client has nothing new since its id or the frame it names — the
        // router, registered with, was delivered every frame above it and none of the
        // client's — reads nothing: every later frame is routed (the router's `Seen`). One
        // with at most one new frame per subject reads those frames by their sequences.
        // Only while connected: without a server, a subscription fails as unavailable.
        // `Since` owes a watched run's frames from before the client existed: not with runs.
        let connected = self.client.connection_state() == State::Connected;
        let seen = match start {
            StartAt::After(n) if connected => Some(n),
            StartAt::Since(n) if connected && watching.is_empty() => Some(n),
            _ => None,
        }
        .and_then(|n| {
            Some((
                n,
                router.sole_frames_above(client_id.as_str(), watching, n)?,
            ))
        });
        let indexed = match &seen {
            Some((n, frames)) if frames.iter().any(Option::is_some) => {
                sole_frames(&self.reader, &subject, &runs, frames, *n).await?
            }
            _ => None,
        };
        let (reset, last, sources, mark) = match (seen, indexed) {
            (_, Some(start)) => {
                crate::metrics::global().bus_resume("indexed");
                start
            }
            (Some((n, frames)), None) if frames.iter().all(Option::is_none) => {
                crate::metrics::global().bus_resume("none");
                nothing_to_read(&subject, &runs, n)
            }
            _ => {
                if matches!(start, StartAt::After(_) | StartAt::Since(_)) {
                    crate::metrics::global().bus_resume("stream");
                }
                start_point(&self.reader, &subject, &runs, start).await?
            }
        };
        let feed = Feed::new(
            reg,
            self.reader.clone(),
            last,
            sources,
            mark,
            !self.shared.exact_subjects,
        );
        let frames = futures::stream::unfold(feed, |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        })
        .boxed();
        Ok(Subscription {
            reset,
            frames,
            position,
        })
    }

    async fn is_healthy(&self) -> bool {
        self.client.connection_state() == State::Connected && *self.shared.router.up.borrow()
    }
}

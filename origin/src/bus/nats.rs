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
//!   "highest id that may have been dropped" watermark, and [`super::reset`]'s rule — the
//!   one the memory bus uses too — decides. A reset stream starts with the oldest
//!   retained frame. `Retained` owes every frame retained when it subscribes.
//! - **A subscription ends** (one `Err`, then the end) when a read fails, the router's
//!   consumer fails or a long outage, the subscriber fell behind (backlog or retention) —
//!   never by skipping frames.

use super::inbox::{Inbox, Slot, Taken};
use super::reset::must_reset;
use super::{Bus, BusError, BusFrame, Retention, StartAt, Subscription};
use async_nats::connection::State;
use async_nats::jetstream::consumer::push::OrderedErrorKind;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{
    self as js, DiscardPolicy, RawMessageErrorKind, RetentionPolicy, StorageType,
};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The stream's name unless [`NatsBus::open`] is given another (PROTOCOL.md §7).
pub const DEFAULT_STREAM_NAME: &str = "GATEWAY_FRAMES";

/// The subjects the stream holds: one per client.
pub const FRAMES_SUBJECTS: &str = "gateway.clients.>";

/// Header carrying the SSE event name, on stored and live messages.
pub const EVENT_HEADER: &str = "Gw-Event";

const FRAMES_PREFIX: &str = "gateway.clients.";

/// How long any one NATS call may take before it fails as unavailable, so a dead server
/// gives an error rather than a hang. (Overrides the client's request timeout, 10 s by
/// default, for this bus's calls only.)
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the bus looks at the connection's connect counter and state to notice a
/// reconnect. Local reads: the cost is negligible, the delay bounds how late catch-up starts.
const RECONNECT_POLL: Duration = Duration::from_millis(250);

/// How many frames a catch-up reads before checking, once for all of them, that none was
/// dropped in between — so a long replay costs about one read per frame, not two.
const READ_AHEAD: usize = 32;

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

fn unavailable(what: impl Display, err: impl Display) -> BusError {
    BusError::Unavailable(format!("NATS bus {what}: {err}"))
}

fn frames_subject(client_id: &str) -> String {
    format!("{FRAMES_PREFIX}{client_id}")
}

/// A NATS limit as the server stores it: zero or negative is "unlimited" (-1).
fn limit(value: i64) -> i64 {
    if value <= 0 {
        -1
    } else {
        value
    }
}

/// The stream this bus creates when there is none.
fn stream_config(name: &str, retention: &Retention) -> js::Config {
    js::Config {
        name: name.to_owned(),
        description: Some("NoETL edge gateway: recent frames per client, for SSE replay".into()),
        subjects: vec![FRAMES_SUBJECTS.to_owned()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age: retention.max_age,
        max_messages_per_subject: limit(
            i64::try_from(retention.max_frames_per_client).unwrap_or(i64::MAX),
        ),
        ..Default::default()
    }
}

/// How an existing stream differs from what this bus would create, in words.
fn config_mismatches(wanted: &js::Config, existing: &js::Config) -> Vec<String> {
    let name = &existing.name;
    let mut out = Vec::new();
    if existing.max_age != wanted.max_age {
        out.push(format!(
            "stream {name}: existing max_age {:?} differs from the configured {:?} (kept)",
            existing.max_age, wanted.max_age
        ));
    }
    if limit(existing.max_messages_per_subject) != limit(wanted.max_messages_per_subject) {
        out.push(format!(
            "stream {name}: existing max_messages_per_subject {} differs from the configured {} (kept)",
            limit(existing.max_messages_per_subject),
            limit(wanted.max_messages_per_subject)
        ));
    }
    let covers = existing
        .subjects
        .iter()
        .any(|s| s == FRAMES_SUBJECTS || s == "gateway.>" || s == ">");
    if !covers {
        out.push(format!(
            "stream {name}: subjects {:?} do not cover {FRAMES_SUBJECTS}: publishing will fail",
            existing.subjects
        ));
    }
    if existing.retention != RetentionPolicy::Limits {
        out.push(format!(
            "stream {name}: retention {:?} removes frames before they expire: replay may miss them",
            existing.retention
        ));
    }
    if existing.discard != DiscardPolicy::Old {
        out.push(format!(
            "stream {name}: discard {:?} refuses new frames when full instead of dropping the oldest",
            existing.discard
        ));
    }
    if existing.storage != wanted.storage {
        out.push(format!(
            "stream {name}: storage {:?}: frames do not survive a server restart",
            existing.storage
        ));
    }
    out
}

/// The stream's settings and state, or `None` if it does not exist.
async fn stream_info(js: &jetstream::Context, name: &str) -> Result<Option<js::Info>, BusError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(unavailable(format!("stream {name} lookup"), e)),
        },
    }
}

/// What the reconnect watcher reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Connects {
    /// The connection's connect count (initial connect included).
    count: u64,
    /// How long the connection was seen down before the latest reconnect (zero when the
    /// outage fell between two polls).
    outage: Duration,
}

/// A receiver of the connection's reconnects, kept current by a task that ends once every
/// receiver (the bus and its subscriptions) is gone.
fn watch_connects(client: &Client) -> watch::Receiver<Connects> {
    let client = client.clone();
    let stats = client.statistics();
    let initial = Connects {
        count: stats.connects.load(Ordering::Relaxed),
        outage: Duration::ZERO,
    };
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RECONNECT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down_since = None;
        loop {
            tokio::select! {
                () = tx.closed() => break,
                _ = tick.tick() => {
                    let count = stats.connects.load(Ordering::Relaxed);
                    if count != tx.borrow().count {
                        let outage = down_since
                            .take()
                            .map_or(Duration::ZERO, |since: tokio::time::Instant| since.elapsed());
                        tx.send_replace(Connects { count, outage });
                    } else if client.connection_state() != State::Connected {
                        down_since.get_or_insert_with(tokio::time::Instant::now);
                    }
                }
            }
        }
    });
    rx
}

/// What the reset rule needs to know about the stream and the client's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamFacts {
    first_seq: u64,
    last_seq: u64,
    /// The stream's per-subject limit as stored (-1: none).
    max_per_subject: i64,
    /// Frames the client's subject holds now.
    subject_frames: u64,
}

/// The highest id of the client's that may have left the stream as a whole: everything
/// below the stream's first sequence went, and some of it may have been this client's
/// (frames leave a limits stream oldest first).
fn stream_dropped_up_to(facts: &StreamFacts) -> u64 {
    facts.first_seq.saturating_sub(1)
}

/// The per-subject limit may have dropped a frame of the client above `n`, given that the
/// first retained one above `n` is `first_after`. Only a full subject drops, and only its
/// oldest frames: a retained frame at or below `n` (checked separately) rules it out.
fn count_limit_may_have_dropped(n: u64, facts: &StreamFacts, first_after: u64) -> bool {
    facts.max_per_subject > 0
        && facts.subject_frames >= facts.max_per_subject.unsigned_abs()
        && first_after > n.saturating_add(1)
}

/// The stream's facts for `subject`: one `STREAM.INFO` with a subject filter, which also
/// counts the subject's frames.
async fn facts<I>(stream: &js::Stream<I>, subject: &str) -> Result<StreamFacts, BusError> {
    let what = || format!("stream info for {subject}");
    let mut info = stream
        .info_with_subjects(subject)
        .await
        .map_err(|e| unavailable(what(), e))?;
    // The filter is one literal subject: the first page holds it or nothing (polling a
    // second time would request another page).
    let subject_frames = match info.next().await {
        Some(Ok((s, count))) if s == subject => count as u64,
        Some(Err(e)) => return Err(unavailable(what(), e)),
        _ => 0,
    };
    Ok(StreamFacts {
        first_seq: info.info.state.first_sequence,
        last_seq: info.info.state.last_sequence,
        max_per_subject: limit(info.info.config.max_messages_per_subject),
        subject_frames,
    })
}

/// The first frame of `subject` with id ≥ `from`, or `None` when there is none.
/// Messages not written by this bus (no `Gw-Event`) are skipped.
async fn frame_from<I>(
    stream: &js::Stream<I>,
    subject: &str,
    mut from: u64,
) -> Result<Option<BusFrame>, BusError> {
    loop {
        match stream
            .get_first_raw_message_by_subject(subject, from.max(1))
            .await
        {
            Ok(m) => match m.headers.get(EVENT_HEADER) {
                Some(event) => {
                    return Ok(Some(BusFrame {
                        id: m.sequence,
                        event: event.as_str().to_owned(),
                        data: m.payload,
                    }))
                }
                None => {
                    tracing::warn!(
                        subject,
                        seq = m.sequence,
                        "message without {EVENT_HEADER} on a frames subject; skipped"
                    );
                    from = m.sequence.saturating_add(1);
                }
            },
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(unavailable(format!("read {subject} from {from}"), e)),
        }
    }
}

/// True if a frame at or below `n` is still retained on `subject`: retention drops a
/// client's frames oldest first, so then none above `n` has been dropped.
async fn retains_one_at_or_below<I>(
    stream: &js::Stream<I>,
    subject: &str,
    n: u64,
) -> Result<bool, BusError> {
    Ok(matches!(frame_from(stream, subject, 1).await?, Some(oldest) if oldest.id <= n))
}

/// True if no frame of `subject` in (`last`, `found`) can have been dropped while owed to
/// a subscriber; called after `found` (the first retained frame above `last`) was read.
/// Only the per-subject limit is considered: for age to drop a frame a live subscriber is
/// owed, the subscriber would have to be `max_age` behind (see the module docs).
async fn nothing_dropped_between<I>(
    stream: &js::Stream<I>,
    subject: &str,
    last: u64,
    found: u64,
) -> Result<bool, BusError> {
    if found <= last.saturating_add(1) {
        return Ok(true);
    }
    let facts = facts(stream, subject).await?;
    if !count_limit_may_have_dropped(last, &facts, found) {
        return Ok(true);
    }
    retains_one_at_or_below(stream, subject, last).await
}

/// Where a subscription starts: `(reset, the id every later frame is above, the first
/// frame to deliver if already read)`.
async fn start_point<I>(
    stream: &js::Stream<I>,
    subject: &str,
    start: StartAt,
) -> Result<(bool, u64, Option<BusFrame>), BusError> {
    if let StartAt::After(n) = start {
        // Read first, then the facts: a frame dropped before the read shows in them.
        let first = frame_from(stream, subject, n.saturating_add(1)).await?;
        let facts = facts(stream, subject).await?;
        let mut dropped_up_to = stream_dropped_up_to(&facts);
        if let Some(f) = &first {
            // The extra read only when the stream's own facts do not decide already.
            if !must_reset(n, facts.last_seq, dropped_up_to)
                && count_limit_may_have_dropped(n, &facts, f.id)
                && !retains_one_at_or_below(stream, subject, n).await?
            {
                // The subject's oldest frames went, up to the first one still held.
                dropped_up_to = dropped_up_to.max(f.id.saturating_sub(1));
            }
        }
        let lost = must_reset(n, facts.last_seq, dropped_up_to);
        if !lost {
            return Ok((false, n, first));
        }
        let oldest = frame_from(stream, subject, 1).await?;
        let above = oldest
            .as_ref()
            .map_or(facts.last_seq, |o| o.id.saturating_sub(1));
        return Ok((true, above, oldest));
    }
    // Everything retained now is owed; what was dropped before now is not.
    let oldest = frame_from(stream, subject, 1).await?;
    let above = oldest.as_ref().map_or(0, |o| o.id.saturating_sub(1));
    Ok((false, above, oldest))
}

impl NatsBus {
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

/// How many routed frames a subscription may hold by default before it counts as fallen
/// behind (its stream then ends with an error, and the SSE layer evicts the connection):
/// the per-connection queue of PROTOCOL §3. Allocated as frames arrive, not up front.
pub const LIVE_BACKLOG: usize = 256;

/// The subscriptions of this process by client id, fed by one ordered consumer.
struct Router {
    table: Mutex<Table>,
    /// True while the consumer runs: a subscription may only register then.
    up: watch::Sender<bool>,
    /// Routed frames a subscription may hold ([`LIVE_BACKLOG`] unless set).
    backlog: std::sync::atomic::AtomicUsize,
}

impl Default for Router {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            up: watch::Sender::new(false),
            backlog: LIVE_BACKLOG.into(),
        }
    }
}

#[derive(Default)]
struct Table {
    subs: HashMap<String, Vec<Arc<Inbox>>>,
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn route(&self, client_id: &str, frame: BusFrame) {
        let backlog = self.backlog.load(Ordering::Relaxed);
        let table = self.lock();
        if let Some(inboxes) = table.subs.get(client_id) {
            for inbox in inboxes {
                inbox.push(frame.clone(), backlog);
            }
        }
    }

    fn flag_all(&self, f: impl Fn(&mut Slot)) {
        let table = self.lock();
        for inbox in table.subs.values().flatten() {
            inbox.flag(&f);
        }
    }

    /// Ends every current subscription (the consumer stopped or lost continuity); later
    /// ones register with the next consumer.
    fn break_all(&self, why: &str) {
        self.flag_all(|s| s.broken = Some(why.to_owned()));
        self.lock().subs.clear();
    }
}

/// A subscription's place in the [`Router`]; dropping it unregisters.
struct Registration {
    router: Arc<Router>,
    client_id: String,
    inbox: Arc<Inbox>,
}

impl Registration {
    fn new(router: Arc<Router>, client_id: &str) -> Self {
        let inbox = Arc::new(Inbox::default());
        router
            .lock()
            .subs
            .entry(client_id.to_owned())
            .or_default()
            .push(inbox.clone());
        Self {
            router,
            client_id: client_id.to_owned(),
            inbox,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut table = self.router.lock();
        if let Some(list) = table.subs.get_mut(&self.client_id) {
            list.retain(|i| !Arc::ptr_eq(i, &self.inbox));
            if list.is_empty() {
                table.subs.remove(&self.client_id);
            }
        }
    }
}

/// What the router task needs.
struct RouterTask {
    js: jetstream::Context,
    stream: js::Stream<()>,
    name: String,
    router: Arc<Router>,
    connects: watch::Receiver<Connects>,
    max_age: Duration,
    /// The stream holds only `gateway.clients.>`: its sequence has no holes but deletions,
    /// so a hole in what the consumer delivers means frames left before delivery.
    exact_subjects: bool,
    stop: CancellationToken,
}

/// How the consumer's run ended.
enum RunEnd {
    Stopped,
    Failed(String),
}

impl RouterTask {
    async fn run(mut self) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.run_once().await {
                RunEnd::Stopped => break,
                RunEnd::Failed(why) => {
                    self.router.up.send_replace(false);
                    tracing::warn!(stream = %self.name, error = %why, "NATS bus router consumer failed; open subscriptions end and it restarts");
                    self.router.break_all(&why);
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.router.up.send_replace(false);
        self.router.break_all("the NATS bus was dropped");
    }

    /// Creates the consumer at the stream's next sequence, then routes until it fails.
    async fn run_once(&mut self) -> RunEnd {
        let start = match self.js.get_stream(&self.name).await {
            Ok(s) => s.cached_info().state.last_sequence.saturating_add(1),
            Err(e) => return RunEnd::Failed(format!("stream {} info: {e}", self.name)),
        };
        let config = jetstream::consumer::push::OrderedConfig {
            deliver_subject: self.js.client().new_inbox(),
            filter_subject: FRAMES_SUBJECTS.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            description: Some("NoETL edge gateway: frames for this replica's SSE streams".into()),
            ..Default::default()
        };
        let messages = match self.stream.create_consumer(config).await {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => return RunEnd::Failed(format!("router consumer messages: {e}")),
            },
            Err(e) => return RunEnd::Failed(format!("router consumer create: {e}")),
        };
        futures::pin_mut!(messages);
        // Subscriptions from here on see every frame stored from `start` on.
        self.connects.borrow_and_update();
        self.router.up.send_replace(true);
        let mut position = start - 1;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return RunEnd::Stopped,
                changed = self.connects.changed() => {
                    if changed.is_err() {
                        return RunEnd::Stopped;
                    }
                    let outage = self.connects.borrow_and_update().outage;
                    if !self.max_age.is_zero() && outage + RECONNECT_POLL >= self.max_age / 2 {
                        // Frames owed to subscribers may have expired meanwhile; a resume
                        // decides with the full reset rule.
                        let why = format!("NATS connection was down for {outage:?}; frames may have expired meanwhile");
                        tracing::warn!(stream = %self.name, %why, "ending every subscription");
                        self.router.break_all(&why);
                    }
                }
                msg = messages.next() => match msg {
                    None => return RunEnd::Failed("router consumer ended".to_owned()),
                    Some(Err(e)) => {
                        if matches!(e.kind(), OrderedErrorKind::Recreate) {
                            return RunEnd::Failed(format!("router consumer: {e}"));
                        }
                        // Heartbeats, flow control and the like: the consumer recovers by
                        // recreating itself after the last sequence it delivered.
                        tracing::debug!(error = %e, "NATS bus router consumer recovering");
                    }
                    Some(Ok(m)) => {
                        let Ok(seq) = m.info().map(|i| i.stream_sequence) else {
                            continue;
                        };
                        if seq <= position {
                            continue; // a recreated consumer re-delivering
                        }
                        if self.exact_subjects && seq != position + 1 {
                            // Frames left the stream before they were delivered (a full
                            // subject, or expiry): every subscription re-reads with the
                            // drop check before trusting later frames.
                            self.router.flag_all(|s| s.recheck = true);
                        }
                        position = seq;
                        let Some(client_id) = m.subject.as_str().strip_prefix(FRAMES_PREFIX) else {
                            continue;
                        };
                        let Some(event) = m.headers.as_ref().and_then(|h| h.get(EVENT_HEADER)) else {
                            tracing::warn!(subject = %m.subject, seq, "message without {EVENT_HEADER} on a frames subject; skipped");
                            continue;
                        };
                        let frame = BusFrame {
                            id: seq,
                            event: event.as_str().to_owned(),
                            data: m.payload.clone(),
                        };
                        self.router.route(client_id, frame);
                    }
                }
            }
        }
    }
}

/// One subscription's state: its place in the router, the stream to read, and how far
/// the client has got.
struct Feed {
    reg: Registration,
    stream: js::Stream<()>,
    subject: String,
    /// Every frame above this is owed to the client: the highest id yielded, or the start
    /// point before anything was.
    last: u64,
    /// Frames read and checked, waiting to be yielded (ascending, all above `last`).
    ready: VecDeque<BusFrame>,
    /// Read the stream forward before taking routed frames.
    catching_up: bool,
    /// Look every routed frame up in the stream before yielding it (an existing stream
    /// with wider subjects, where the router cannot see holes).
    verify_each: bool,
    done: bool,
}

fn fell_behind(last: u64) -> BusError {
    BusError::Unavailable(format!(
        "NATS bus subscriber fell behind retention: frames after {last} may have been dropped"
    ))
}

impl Feed {
    fn fail(&mut self, err: BusError) -> Option<Result<BusFrame, BusError>> {
        tracing::warn!(subject = %self.subject, last = self.last, error = %err, "NATS bus subscription ends");
        self.done = true;
        Some(Err(err))
    }

    /// Reads up to [`READ_AHEAD`] frames after `last` into `ready`, checking once for the
    /// whole batch that none was dropped; ends the catch-up when the stream has no more.
    async fn read_ahead(&mut self) -> Result<(), BusError> {
        let mut batch = Vec::new();
        let mut from = self.last.saturating_add(1);
        while batch.len() < READ_AHEAD {
            match frame_from(&self.stream, &self.subject, from).await? {
                Some(frame) => {
                    from = frame.id.saturating_add(1);
                    batch.push(frame);
                }
                None => {
                    self.catching_up = false;
                    break;
                }
            }
        }
        if let Some(first) = batch.first() {
            if !nothing_dropped_between(&self.stream, &self.subject, self.last, first.id).await? {
                return Err(fell_behind(self.last));
            }
        }
        self.ready.extend(batch);
        Ok(())
    }

    /// Routed frame `id` (above `last`) arrived in verify mode: queue the stream's first
    /// frame after `last` — `id` itself unless one before it was missed, then catch up.
    async fn verify(&mut self, id: u64) -> Result<(), BusError> {
        match frame_from(&self.stream, &self.subject, self.last.saturating_add(1)).await? {
            Some(found) if found.id <= id => {
                if !nothing_dropped_between(&self.stream, &self.subject, self.last, found.id)
                    .await?
                {
                    return Err(fell_behind(self.last));
                }
                if found.id < id {
                    self.catching_up = true;
                }
                self.ready.push_back(found);
                Ok(())
            }
            // `id` itself is no longer retained.
            _ => Err(fell_behind(self.last)),
        }
    }

    async fn next(&mut self) -> Option<Result<BusFrame, BusError>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(frame) = self.ready.pop_front() {
                self.last = frame.id;
                return Some(Ok(frame));
            }
            if self.catching_up {
                // Before the reads: what they return covers every frame routed until now.
                self.reg.inbox.absorb_overflow();
                // Boxed: the reads' futures are large, and an idle subscription (waiting on
                // its inbox below) should not carry their size.
                if let Err(e) = Box::pin(self.read_ahead()).await {
                    return self.fail(e);
                }
                continue;
            }
            match self.reg.inbox.take() {
                Taken::Frame(f) if f.id <= self.last => {}
                Taken::Frame(f) if self.verify_each => {
                    if let Err(e) = Box::pin(self.verify(f.id)).await {
                        return self.fail(e);
                    }
                }
                Taken::Frame(f) => self.ready.push_back(f),
                Taken::Recheck => self.catching_up = true,
                Taken::Overflowed => return self.fail(BusError::Lagged),
                Taken::Broken(why) => return self.fail(BusError::Unavailable(why)),
                Taken::Empty => self.reg.inbox.notify.notified().await,
            }
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, client_id: &str, event: &str, data: Bytes) -> Result<u64, BusError> {
        super::check_client_id(client_id)?;
        super::check_event(event)?;
        let subject = frames_subject(client_id);
        let what = || format!("publish to {subject}");
        let mut headers = HeaderMap::new();
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

    async fn subscribe(&self, client_id: &str, start: StartAt) -> Result<Subscription, BusError> {
        super::check_client_id(client_id)?;
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
        let feed = Feed {
            reg,
            stream: self.stream.clone(),
            subject,
            last,
            // Nothing after the start point when it was read: later frames come routed.
            catching_up: first.is_some(),
            ready: first.into_iter().collect(),
            verify_each: !self.shared.exact_subjects,
            done: false,
        };
        let frames = stream::unfold(feed, |mut feed| async move {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(first_seq: u64, last_seq: u64, max: i64, frames: u64) -> StreamFacts {
        StreamFacts {
            first_seq,
            last_seq,
            max_per_subject: max,
            subject_frames: frames,
        }
    }

    /// The stream's own facts through the shared rule.
    fn outside_the_stream(n: u64, f: &StreamFacts) -> bool {
        must_reset(n, f.last_seq, stream_dropped_up_to(f))
    }

    #[test]
    fn an_id_above_the_last_sequence_or_below_the_first_is_outside_the_stream() {
        let f = facts(10, 20, 5, 1);
        assert!(outside_the_stream(21, &f), "never issued here");
        assert!(!outside_the_stream(20, &f));
        assert!(!outside_the_stream(9, &f), "9 + 1 is the first retained");
        assert!(outside_the_stream(8, &f), "9 left the stream");
        // A fresh stream: nothing issued, nothing lost.
        assert!(!outside_the_stream(0, &facts(0, 0, 5, 0)));
        assert!(outside_the_stream(1, &facts(0, 0, 5, 0)));
        // Everything expired: first = last + 1.
        assert!(!outside_the_stream(20, &facts(21, 20, 5, 0)));
        assert!(outside_the_stream(19, &facts(21, 20, 5, 0)));
        assert!(!outside_the_stream(u64::MAX, &facts(0, u64::MAX, 5, 0)));
    }

    #[test]
    fn the_count_limit_matters_only_when_full_and_with_a_hole_after_n() {
        assert!(count_limit_may_have_dropped(3, &facts(1, 50, 5, 5), 7));
        assert!(
            !count_limit_may_have_dropped(3, &facts(1, 50, 5, 5), 4),
            "no hole"
        );
        assert!(
            !count_limit_may_have_dropped(3, &facts(1, 50, 5, 4), 7),
            "not full"
        );
        assert!(
            !count_limit_may_have_dropped(3, &facts(1, 50, -1, 900), 7),
            "no limit"
        );
    }

    #[test]
    fn the_created_stream_follows_the_retention_and_zero_means_unlimited() {
        let r = Retention {
            max_age: Duration::from_secs(600),
            max_frames_per_client: 1000,
        };
        let c = stream_config("S", &r);
        assert_eq!(c.subjects, [FRAMES_SUBJECTS]);
        assert_eq!(c.max_age, r.max_age);
        assert_eq!(c.max_messages_per_subject, 1000);
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.discard, DiscardPolicy::Old);
        let unlimited = stream_config(
            "S",
            &Retention {
                max_frames_per_client: 0,
                ..r
            },
        );
        assert_eq!(unlimited.max_messages_per_subject, -1);
        assert!(config_mismatches(&c, &c).is_empty());
        assert!(config_mismatches(
            &unlimited,
            &js::Config {
                max_messages_per_subject: 0,
                ..unlimited.clone()
            }
        )
        .is_empty());
    }

    #[test]
    fn every_difference_that_changes_delivery_is_reported() {
        let wanted = stream_config("S", &Retention::default());
        let existing = js::Config {
            max_age: Duration::from_secs(60),
            max_messages_per_subject: 10,
            subjects: vec!["other.>".into()],
            retention: RetentionPolicy::WorkQueue,
            discard: DiscardPolicy::New,
            storage: StorageType::Memory,
            ..wanted.clone()
        };
        let m = config_mismatches(&wanted, &existing);
        assert_eq!(m.len(), 6, "{m:?}");
        assert!(m[0].contains("60s") && m[0].contains("600s"), "{m:?}");
        let wide = js::Config {
            subjects: vec![">".into()],
            ..wanted.clone()
        };
        assert!(config_mismatches(&wanted, &wide).is_empty());
    }
}

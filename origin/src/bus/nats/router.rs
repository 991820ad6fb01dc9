//! Live delivery: one ordered push consumer per replica over every client's and every
//! run's subject feeds the [`Router`], which hands each frame to the subscriptions open
//! here for its client, or watching its run (see the module docs of [`super`]); and the
//! watcher that notices reconnects.
//!
//! A `gw/watch` control frame on a client's subject makes the router add the run it names
//! to every subscription of that client open here, in stream order: the run's frames
//! stored after it are routed to them. Control frames are not handed to subscriptions.

use super::super::inbox::{Inbox, Slot};
use super::super::BusFrame;
use super::super::{MAX_WATCHED_PER_SUBSCRIPTION, WATCH_EVENT};
use super::reader::Reader;
use super::{EVENT_HEADER, FRAMES_PREFIX, FRAMES_SUBJECTS, RUNS_PREFIX, RUNS_SUBJECTS};
use async_nats::connection::State;
use async_nats::jetstream::consumer::push::OrderedErrorKind;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::{self, stream as js};
use async_nats::Client;
use futures::StreamExt;
use gateway_shared::ids::{ClientId, ExecutionId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the bus looks at the connection's connect counter and state to notice a
/// reconnect. Local reads: the cost is negligible, the delay bounds how late catch-up starts.
const RECONNECT_POLL: Duration = Duration::from_millis(250);

/// What the reconnect watcher reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Connects {
    /// The connection's connect count (initial connect included).
    count: u64,
    /// How long the connection was seen down before the latest reconnect (zero when the
    /// outage fell between two polls).
    outage: Duration,
}

/// A receiver of the connection's reconnects, kept current by a task that ends once every
/// receiver (the bus and its subscriptions) is gone.
pub(super) fn watch_connects(client: &Client) -> watch::Receiver<Connects> {
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

/// How many routed frames a subscription may hold by default before it counts as fallen
/// behind (its stream then ends with an error, and the SSE layer evicts the connection):
/// the per-connection queue of PROTOCOL §3. Allocated as frames arrive, not up front.
pub const LIVE_BACKLOG: usize = 256;

/// The subscriptions of this process by client id, fed by one ordered consumer.
pub(super) struct Router {
    table: Mutex<Table>,
    /// True while the consumer runs: a subscription may only register then.
    pub(super) up: watch::Sender<bool>,
    /// Routed frames a subscription may hold ([`LIVE_BACKLOG`] unless set).
    pub(super) backlog: AtomicUsize,
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

/// Slots of the [`Seen`] index (a power of two): two `u64`s each per replica (1 MiB), and
/// a bit each for watches (8 KiB).
const SEEN_SLOTS: usize = 1 << 16;

/// What the router has been delivered of the clients' and the runs' subjects, so that a
/// resume with nothing new here needs no read of the stream (`subscribe_with`).
///
/// Every frame of the stream above `horizon` has been delivered to the router, up to
/// `position` — except frames that left the stream before they were delivered, which show
/// as a hole in the sequence and raise the horizon past them. For each slot (a hash of a
/// subject: a client's or a run's) it keeps the two highest sequences of frames on a
/// subject hashing to it, control frames included: a resume with no frame above its start
/// reads nothing, one with a single frame there reads that frame by its sequence
/// ([`Seen::sole_above`]) instead of asking NATS for the first frame of its subject from
/// the start — which NATS answers by scanning the messages after the start in their block,
/// every client's, so its cost grew with the traffic while the client was away. Two
/// subjects sharing a slot only cost the one with the lower frames a read it could have
/// skipped; the table has a fixed size whatever the number of clients and runs. A second
/// table keeps one bit per slot: a `gw/watch` frame of a client hashing to it was
/// delivered ([`Seen::unwatched`]); a client sharing a slot with one that watches a run
/// only costs it a watch-list read.
#[derive(Default)]
pub(super) struct Seen {
    /// `None` until the consumer runs, and on a stream with wider subjects (the router cannot
    /// see holes there): the index then answers nothing.
    horizon: Option<u64>,
    /// The highest sequence delivered to the router.
    position: u64,
    /// Per slot, the highest sequence delivered on its subjects, and the one below it.
    slots: Vec<u64>,
    seconds: Vec<u64>,
    /// One bit per slot: a `gw/watch` frame on a client subject hashing to it was
    /// delivered ([`Seen::unwatched`]).
    watches: Vec<u64>,
}

/// Whose subject a frame is on, for the [`Seen`] index.
#[derive(Debug, Clone, Copy)]
enum Subject<'a> {
    /// `gateway.clients.<id>`.
    Client(&'a str),
    /// `gateway.executions.<id>`.
    Run(&'a str),
}

fn seen_slot(subject: Subject<'_>) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match subject {
        Subject::Client(id) => (0u8, id).hash(&mut h),
        Subject::Run(id) => (1u8, id).hash(&mut h),
    }
    (h.finish() as usize) & (SEEN_SLOTS - 1)
}

impl Seen {
    /// The consumer (re)starts at `start`: frames below it were not delivered to this one.
    fn start(&mut self, start: u64) {
        if self.slots.is_empty() {
            self.slots = vec![0; SEEN_SLOTS];
            self.seconds = vec![0; SEEN_SLOTS];
            self.watches = vec![0; SEEN_SLOTS / 64];
        }
        self.horizon = Some(start.saturating_sub(1));
        self.position = start.saturating_sub(1);
    }

    /// Frames below `seq` that were never delivered left the stream first: what they held
    /// is unknown.
    fn hole_before(&mut self, seq: u64) {
        if let Some(h) = self.horizon.as_mut() {
            *h = (*h).max(seq.saturating_sub(1));
        }
    }

    /// A frame delivered to the router, on `subject`.
    fn saw(&mut self, seq: u64, subject: Subject<'_>) {
        self.position = self.position.max(seq);
        if !self.slots.is_empty() {
            let i = seen_slot(subject);
            let (first, second) = (&mut self.slots[i], &mut self.seconds[i]);
            // A frame delivered again (a consumer restarted below its position) is not a
            // second one.
            if seq > *first {
                *second = *first;
                *first = seq;
            } else if seq > *second && seq != *first {
                *second = seq;
            }
        }
    }

    /// A `gw/watch` frame delivered to the router, on `client`'s subject.
    fn saw_watch(&mut self, seq: u64, client: &str) {
        self.saw(seq, Subject::Client(client));
        if !self.watches.is_empty() {
            let slot = seen_slot(Subject::Client(client));
            self.watches[slot / 64] |= 1 << (slot % 64);
        }
    }

    /// `Some((horizon, position))` when no `gw/watch` frame of `client` (or of a client
    /// sharing its slot) was ever delivered to the router: a client none of whose frames
    /// can be at or below the horizon — one made at a stream position in
    /// `horizon..=position` — then has had every frame of it delivered here, and so
    /// follows no run unless a `gw/watch` frame above the position is still to come.
    fn unwatched(&self, client: &str) -> Option<(u64, u64)> {
        let h = self.horizon?;
        let slot = seen_slot(Subject::Client(client));
        (self.watches[slot / 64] & (1 << (slot % 64)) == 0).then_some((h, self.position))
    }

    /// Per subject, in order, the one frame above `after` on it the router was delivered
    /// (`None`: no frame), when the index can tell — `after` is at or above the horizon and
    /// at or below the position (an id the stream issued) — and no subject's slot holds two
    /// frames above `after`; otherwise `None`. Every frame of the subjects above `after`
    /// the stream may hold is then the one named, or one the router has not been delivered
    /// yet — routed to a subscription registered before this call. All `None`: nothing
    /// needs reading. A named frame may be another subject's sharing the slot: the reader
    /// checks.
    fn sole_above<'a>(
        &self,
        subjects: impl Iterator<Item = Subject<'a>>,
        after: u64,
    ) -> Option<Vec<Option<u64>>> {
        match self.horizon {
            Some(h) if h <= after && after <= self.position => subjects
                .map(|s| {
                    let i = seen_slot(s);
                    (self.seconds[i] <= after).then(|| Some(self.slots[i]).filter(|&v| v > after))
                })
                .collect(),
            _ => None,
        }
    }

    /// [`Seen::sole_above`] names no frame: nothing above `after` to read.
    #[cfg(test)]
    fn nothing_above<'a>(&self, subjects: impl Iterator<Item = Subject<'a>>, after: u64) -> bool {
        self.sole_above(subjects, after)
            .is_some_and(|frames| frames.iter().all(Option::is_none))
    }
}

#[derive(Default)]
pub(super) struct Table {
    /// Client id → the inboxes of its subscriptions open here.
    pub(super) subs: HashMap<String, Vec<Arc<Inbox>>>,
    /// Execution id → the inboxes of the subscriptions watching it, by inbox address: a
    /// run may have tens of thousands of watchers, and each one that closes leaves at once
    /// instead of by a scan of them all under this table's lock.
    pub(super) runs: HashMap<String, HashMap<usize, Arc<Inbox>>>,
    /// Inbox address → the runs it watches (oldest first), so it can leave them.
    watching: HashMap<usize, Vec<String>>,
    /// What the router has been delivered of the clients' and the runs' subjects.
    seen: Seen,
}

fn key(inbox: &Arc<Inbox>) -> usize {
    Arc::as_ptr(inbox) as usize
}

/// Queues `frame` in every one of `inboxes` (under the table's lock, which the caller holds).
fn push_all<'t>(inboxes: impl Iterator<Item = &'t Arc<Inbox>>, frame: &BusFrame, backlog: usize) {
    for inbox in inboxes {
        inbox.push(frame.clone(), backlog);
    }
}

impl Table {
    /// Adds `inbox` to the run's watchers (once), dropping its oldest watch beyond
    /// [`MAX_WATCHED_PER_SUBSCRIPTION`]; false if it watched the run already.
    fn watch(&mut self, inbox: &Arc<Inbox>, execution_id: &str) -> bool {
        let list = self.watching.entry(key(inbox)).or_default();
        if list.iter().any(|e| e == execution_id) {
            return false;
        }
        list.push(execution_id.to_owned());
        let dropped = (list.len() > MAX_WATCHED_PER_SUBSCRIPTION).then(|| list.remove(0));
        self.runs
            .entry(execution_id.to_owned())
            .or_default()
            .insert(key(inbox), inbox.clone());
        if let Some(old) = dropped {
            self.leave(inbox, &old);
        }
        true
    }

    fn leave(&mut self, inbox: &Arc<Inbox>, execution_id: &str) {
        if let Some(watchers) = self.runs.get_mut(execution_id) {
            watchers.remove(&key(inbox));
            if watchers.is_empty() {
                self.runs.remove(execution_id);
            }
        }
    }

    /// Removes `inbox` from its client and every run it watches.
    fn remove(&mut self, client_id: &str, inbox: &Arc<Inbox>) {
        if let Some(list) = self.subs.get_mut(client_id) {
            list.retain(|i| !Arc::ptr_eq(i, inbox));
            if list.is_empty() {
                self.subs.remove(client_id);
            }
        }
        for run in self.watching.remove(&key(inbox)).unwrap_or_default() {
            self.leave(inbox, &run);
        }
    }
}

impl Router {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a client's frame to every subscription of the client open here.
    fn route(&self, client_id: &str, frame: BusFrame) {
        let backlog = self.backlog.load(Ordering::Relaxed);
        let mut table = self.lock();
        table.seen.saw(frame.id, Subject::Client(client_id));
        push_all(
            table.subs.get(client_id).into_iter().flatten(),
            &frame,
            backlog,
        );
    }

    /// Hands a run's frame to every subscription watching the run.
    fn route_run(&self, execution_id: &str, frame: BusFrame) {
        let backlog = self.backlog.load(Ordering::Relaxed);
        let mut table = self.lock();
        table.seen.saw(frame.id, Subject::Run(execution_id));
        let watchers = table
            .runs
            .get(execution_id)
            .into_iter()
            .flat_map(HashMap::values);
        push_all(watchers, &frame, backlog);
    }

    /// A `gw/watch` control frame: every subscription of the client open here watches the
    /// run from now on.
    fn watch_for_client(&self, seq: u64, client_id: &str, execution_id: &str) {
        let mut table = self.lock();
        table.seen.saw_watch(seq, client_id);
        let inboxes = table.subs.get(client_id).cloned().unwrap_or_default();
        for inbox in &inboxes {
            table.watch(inbox, execution_id);
        }
    }

    fn flag_all(&self, f: impl Fn(&mut Slot)) {
        let table = self.lock();
        for inbox in table.subs.values().flatten() {
            inbox.flag(&f);
        }
    }

    /// True when a subscription of `client_id` watching `runs`, registered before this call,
    /// is routed every frame of the client and of those runs above `after` the stream may
    /// hold, so it needs no read ([`Seen`]).
    #[cfg(test)]
    fn nothing_seen_above(&self, client_id: &str, runs: &[ExecutionId], after: u64) -> bool {
        self.sole_frames_above(client_id, runs, after)
            .is_some_and(|frames| frames.iter().all(Option::is_none))
    }

    /// [`Seen::sole_above`] for the subjects of `client_id` and of `runs`, the client's first:
    /// the one lookup a resume makes of the index.
    pub(super) fn sole_frames_above(
        &self,
        client_id: &str,
        runs: &[ExecutionId],
        after: u64,
    ) -> Option<Vec<Option<u64>>> {
        let subjects = std::iter::once(Subject::Client(client_id))
            .chain(runs.iter().map(|r| Subject::Run(r.as_str())));
        self.lock().seen.sole_above(subjects, after)
    }

    /// `Some((horizon, position))` when this router was delivered every frame above the
    /// horizon, up to the position, and no `gw/watch` frame of `client_id` among them
    /// ([`Seen`]); `None` when it cannot tell.
    pub(super) fn unwatched(&self, client_id: &str) -> Option<(u64, u64)> {
        self.lock().seen.unwatched(client_id)
    }

    /// The highest stream sequence delivered to the router, if it has seen every frame above
    /// its start ([`Seen`]).
    pub(super) fn seen_position(&self) -> Option<u64> {
        let table = self.lock();
        table.seen.horizon.map(|_| table.seen.position)
    }

    /// Ends every current subscription (the consumer stopped or lost continuity); later
    /// ones register with the next consumer.
    fn break_all(&self, why: &str) {
        self.flag_all(|s| s.broken = Some(why.to_owned()));
        let mut table = self.lock();
        table.subs.clear();
        table.runs.clear();
        table.watching.clear();
    }
}

/// A subscription's place in the [`Router`]; dropping it unregisters.
pub(super) struct Registration {
    router: Arc<Router>,
    client_id: ClientId,
    pub(super) inbox: Arc<Inbox>,
}

impl Registration {
    /// Registers a subscription of `client_id` watching `watching` (already cut to the
    /// newest [`MAX_WATCHED_PER_SUBSCRIPTION`] by the caller, `bus::newest_watches`).
    pub(super) fn new(router: Arc<Router>, client_id: &ClientId, watching: &[ExecutionId]) -> Self {
        let inbox = Arc::new(Inbox::default());
        {
            let mut table = router.lock();
            table
                .subs
                .entry(client_id.as_str().to_owned())
                .or_default()
                .push(inbox.clone());
            for run in watching {
                table.watch(&inbox, run.as_str());
            }
        }
        Self {
            router,
            client_id: client_id.clone(),
            inbox,
        }
    }

    /// Watches one more run (a `gw/watch` frame found while reading the client's subject);
    /// false if it was watched already.
    pub(super) fn watch(&self, execution_id: &str) -> bool {
        self.router.lock().watch(&self.inbox, execution_id)
    }

    /// The runs this subscription watches now, oldest first.
    pub(super) fn watching(&self) -> Vec<String> {
        self.router
            .lock()
            .watching
            .get(&key(&self.inbox))
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.router
            .lock()
            .remove(self.client_id.as_str(), &self.inbox);
    }
}

/// What the router task needs.
pub(super) struct RouterTask {
    pub(super) js: jetstream::Context,
    pub(super) stream: js::Stream<()>,
    /// Told what the stream is whenever the consumer starts (its replicas decide how
    /// subscriptions read).
    pub(super) reader: Arc<Reader>,
    /// The stream's name, for logs.
    pub(super) name: String,
    pub(super) router: Arc<Router>,
    pub(super) connects: watch::Receiver<Connects>,
    /// The stream's `max_age`: an outage longer than half of it ends every subscription.
    pub(super) max_age: Duration,
    /// The stream holds only `gateway.clients.>`: its sequence has no holes but deletions,
    /// so a hole in what the consumer delivers means frames left before delivery.
    pub(super) exact_subjects: bool,
    pub(super) stop: CancellationToken,
}

/// How the consumer's run ended.
enum RunEnd {
    Stopped,
    Failed(String),
}

impl RouterTask {
    pub(super) async fn run(mut self) {
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
            Ok(s) => {
                self.reader.note(s.cached_info());
                s.cached_info().state.last_sequence.saturating_add(1)
            }
            Err(e) => return RunEnd::Failed(format!("stream {} info: {e}", self.name)),
        };
        let config = jetstream::consumer::push::OrderedConfig {
            deliver_subject: self.js.client().new_inbox(),
            filter_subjects: vec![FRAMES_SUBJECTS.to_owned(), RUNS_SUBJECTS.to_owned()],
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
        if self.exact_subjects {
            self.router.lock().seen.start(start);
        }
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
                            // drop check before trusting later frames. The index forgets
                            // the hole first, so a later resume reads instead of trusting it.
                            self.router.lock().seen.hole_before(seq);
                            self.router.flag_all(|s| s.recheck = true);
                        }
                        position = seq;
                        let Some(event) = m.headers.as_ref().and_then(|h| h.get(EVENT_HEADER)) else {
                            tracing::warn!(subject = %m.subject, seq, "message without {EVENT_HEADER} on a frames subject; skipped");
                            continue;
                        };
                        let subject = m.subject.as_str();
                        if let Some(client_id) = subject.strip_prefix(FRAMES_PREFIX) {
                            if event.as_str() == WATCH_EVENT {
                                match std::str::from_utf8(&m.payload) {
                                    Ok(run) if ExecutionId::is_valid(run) => self.router.watch_for_client(seq, client_id, run),
                                    _ => tracing::warn!(subject, seq, "{WATCH_EVENT} frame without a valid execution id; skipped"),
                                }
                                continue;
                            }
                            let frame = BusFrame { id: seq, event: event.as_str().to_owned(), data: m.payload.clone() };
                            self.router.route(client_id, frame);
                        } else if let Some(run) = subject.strip_prefix(RUNS_PREFIX) {
                            let frame = BusFrame { id: seq, event: event.as_str().to_owned(), data: m.payload.clone() };
                            self.router.route_run(run, frame);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::inbox::Taken;
    use super::*;
    use bytes::Bytes;

    fn cid(s: &str) -> ClientId {
        ClientId::parse(s).expect("a valid client id")
    }

    fn frame(id: u64) -> BusFrame {
        BusFrame {
            id,
            event: "e".into(),
            data: Bytes::new(),
        }
    }

    #[test]
    fn a_frame_reaches_every_subscription_of_its_client_and_no_other() {
        let router = Arc::new(Router::default());
        let a1 = Registration::new(router.clone(), &cid("a"), &[]);
        let a2 = Registration::new(router.clone(), &cid("a"), &[]);
        let b = Registration::new(router.clone(), &cid("b"), &[]);
        router.route("a", frame(7));
        for reg in [&a1, &a2] {
            assert!(matches!(reg.inbox.take(), Taken::Frame(f) if f.id == 7));
        }
        assert!(matches!(b.inbox.take(), Taken::Empty));
        router.route("nobody", frame(8));
        assert!(matches!(a1.inbox.take(), Taken::Empty));
    }

    #[test]
    fn a_run_frame_reaches_its_watchers_and_a_dropped_one_leaves_no_trace() {
        let router = Arc::new(Router::default());
        let run = ExecutionId::parse("77").expect("valid");
        let a = Registration::new(router.clone(), &cid("a"), std::slice::from_ref(&run));
        let b = Registration::new(router.clone(), &cid("b"), &[]);
        let c = Registration::new(router.clone(), &cid("c"), &[]);
        // b's watch arrives as a control frame; c watches nothing.
        router.watch_for_client(4, "b", "77");
        router.route_run("77", frame(5));
        for reg in [&a, &b] {
            assert!(matches!(reg.inbox.take(), Taken::Frame(f) if f.id == 5));
        }
        assert!(matches!(c.inbox.take(), Taken::Empty));
        assert_eq!(b.watching(), ["77"]);
        drop((a, b, c));
        let table = router.lock();
        assert!(table.runs.is_empty() && table.watching.is_empty() && table.subs.is_empty());
    }

    #[test]
    fn watchers_of_a_run_leave_one_by_one_and_the_rest_still_get_its_frames() {
        let router = Arc::new(Router::default());
        let run = ExecutionId::parse("9").expect("valid");
        let mut regs: Vec<Option<Registration>> = (0..1000)
            .map(|i| {
                let c = cid(&format!("c{i}"));
                Some(Registration::new(
                    router.clone(),
                    &c,
                    std::slice::from_ref(&run),
                ))
            })
            .collect();
        for reg in regs.iter_mut().step_by(2) {
            reg.take();
        }
        assert_eq!(router.lock().runs["9"].len(), 500);
        router.route_run("9", frame(3));
        for reg in regs.iter().flatten() {
            assert!(matches!(reg.inbox.take(), Taken::Frame(f) if f.id == 3));
        }
        drop(regs);
        assert!(router.lock().runs.is_empty());
    }

    #[test]
    fn a_subscription_watches_at_most_its_newest_runs() {
        let router = Arc::new(Router::default());
        let a = Registration::new(router.clone(), &cid("a"), &[]);
        for e in 0..=MAX_WATCHED_PER_SUBSCRIPTION {
            assert!(a.watch(&e.to_string()));
        }
        assert!(!a.watch("1"), "already watched");
        let watching = a.watching();
        assert_eq!(watching.len(), MAX_WATCHED_PER_SUBSCRIPTION);
        assert_eq!(watching[0], "1", "the oldest, 0, was dropped");
        assert!(!router.lock().runs.contains_key("0"));
    }

    /// Two client ids and a run whose subjects are in three different slots of [`Seen`].
    fn three_slots() -> (&'static str, &'static str, &'static str) {
        let (a, b, run) = ("seen-a", "seen-b", "77");
        let slots = [
            seen_slot(Subject::Client(a)),
            seen_slot(Subject::Client(b)),
            seen_slot(Subject::Run(run)),
        ];
        assert!(
            slots[0] != slots[1] && slots[1] != slots[2] && slots[0] != slots[2],
            "pick other ids"
        );
        (a, b, run)
    }

    fn client(seen: &Seen, id: &str, after: u64) -> bool {
        seen.nothing_above(std::iter::once(Subject::Client(id)), after)
    }

    #[test]
    fn the_seen_index_answers_only_between_its_horizon_and_its_position() {
        let (a, _, _) = three_slots();
        let mut seen = Seen::default();
        assert!(!client(&seen, a, 0), "no consumer yet: no answer");
        seen.start(10);
        assert!(client(&seen, a, 9), "everything above 9 is still to come");
        assert!(
            !client(&seen, a, 8),
            "frame 9 went by before the consumer started"
        );
        assert!(
            !client(&seen, a, 10),
            "an id above the position may be a frame not delivered yet"
        );
        seen.saw(10, Subject::Run("1"));
        seen.saw(11, Subject::Client("someone-else"));
        assert!(client(&seen, a, 9) && client(&seen, a, 11));
    }

    #[test]
    fn the_seen_index_names_a_subjects_one_frame_above_an_id_and_no_more() {
        let (a, b, run) = three_slots();
        let subjects = || [Subject::Client(a), Subject::Run(run)].into_iter();
        let mut seen = Seen::default();
        assert_eq!(seen.sole_above(subjects(), 0), None, "no consumer yet");
        seen.start(1);
        seen.saw(3, Subject::Client(a));
        seen.saw(4, Subject::Client(b));
        seen.saw(5, Subject::Client(a));
        seen.saw(6, Subject::Run(run));
        assert_eq!(seen.sole_above(subjects(), 6), Some(vec![None, None]));
        assert_eq!(seen.sole_above(subjects(), 5), Some(vec![None, Some(6)]));
        assert_eq!(seen.sole_above(subjects(), 3), Some(vec![Some(5), Some(6)]));
        assert_eq!(
            seen.sole_above(subjects(), 2),
            None,
            "3 and 5 are both above 2"
        );
        assert_eq!(seen.sole_above(subjects(), 7), None, "above the position");
        // Delivered again (a consumer restarted below its position): still one frame.
        seen.start(5);
        seen.saw(5, Subject::Client(a));
        seen.saw(6, Subject::Run(run));
        assert_eq!(seen.sole_above(subjects(), 4), Some(vec![Some(5), Some(6)]));
        assert_eq!(
            seen.sole_above(subjects(), 3),
            None,
            "below the new horizon"
        );
        seen.saw(7, Subject::Client(a));
        assert_eq!(seen.sole_above(subjects(), 6), Some(vec![Some(7), None]));
        assert_eq!(seen.sole_above(subjects(), 4), None, "5 and 7");
    }

    #[test]
    fn the_seen_index_reads_for_a_subject_with_a_frame_above_the_id_and_after_a_hole() {
        let (a, b, run) = three_slots();
        let mut seen = Seen::default();
        seen.start(1);
        seen.saw(5, Subject::Client(a));
        seen.saw(6, Subject::Client(b));
        seen.saw(7, Subject::Run(run));
        assert!(!client(&seen, a, 4), "frame 5 is a's");
        assert!(client(&seen, a, 5), "a resume from a's last frame");
        assert!(!client(&seen, b, 5) && client(&seen, b, 6));
        // A client watching the run: its frames count too.
        let with_run = |c, after| {
            seen.nothing_above([Subject::Client(c), Subject::Run(run)].into_iter(), after)
        };
        assert!(!with_run(a, 6), "frame 7 is the run's");
        assert!(with_run(a, 7) && with_run(b, 7));
        // Frames 8..=9 left the stream before they were delivered: whose they were is
        // unknown, so every resume from below them reads.
        seen.hole_before(10);
        seen.saw(10, Subject::Run("1"));
        assert!(!client(&seen, a, 7) && !client(&seen, b, 7));
        assert!(client(&seen, a, 9) && client(&seen, b, 10));
        // A restart of the consumer forgets what went by meanwhile, not what it saw.
        seen.start(20);
        assert!(!client(&seen, a, 10));
        assert!(client(&seen, a, 19));
    }

    #[test]
    fn routed_frames_and_watch_frames_feed_the_seen_index() {
        let (a, b, run) = three_slots();
        let router = Arc::new(Router::default());
        router.lock().seen.start(1);
        let run_id = ExecutionId::parse(run).expect("valid");
        router.route(a, frame(3));
        router.watch_for_client(4, b, run);
        router.route_run(run, frame(5));
        assert_eq!(router.seen_position(), Some(5));
        assert!(!router.nothing_seen_above(a, &[], 2) && router.nothing_seen_above(a, &[], 3));
        assert!(!router.nothing_seen_above(b, &[], 3) && router.nothing_seen_above(b, &[], 4));
        let runs = std::slice::from_ref(&run_id);
        assert!(!router.nothing_seen_above(b, runs, 4) && router.nothing_seen_above(b, runs, 5));
    }

    #[test]
    fn a_client_is_known_to_follow_no_run_only_until_a_watch_frame_of_its_slot() {
        let (a, b, run) = three_slots();
        let router = Arc::new(Router::default());
        assert_eq!(router.unwatched(a), None, "no consumer yet: no answer");
        router.lock().seen.start(5);
        assert_eq!(router.unwatched(a), Some((4, 4)));
        router.route(a, frame(5));
        router.route_run(run, frame(6));
        assert_eq!(router.unwatched(a), Some((4, 6)), "frames are not watches");
        router.watch_for_client(7, b, run);
        assert_eq!(router.unwatched(b), None, "b watches a run");
        assert_eq!(router.unwatched(a), Some((4, 7)), "a does not");
        // A hole raises the horizon: clients made below it are no longer known.
        router.lock().seen.hole_before(10);
        router.route(a, frame(10));
        assert_eq!(router.unwatched(a), Some((9, 10)));
        // A restart of the consumer keeps what it saw of watches.
        router.lock().seen.start(20);
        assert_eq!(router.unwatched(a), Some((19, 19)));
        assert_eq!(router.unwatched(b), None);
    }

    #[test]
    fn a_dropped_registration_leaves_nothing_in_the_table() {
        let router = Arc::new(Router::default());
        let a1 = Registration::new(router.clone(), &cid("a"), &[]);
        let a2 = Registration::new(router.clone(), &cid("a"), &[]);
        drop(a1);
        assert_eq!(router.lock().subs["a"].len(), 1);
        drop(a2);
        assert!(router.lock().subs.is_empty());
    }

    #[test]
    fn more_routed_frames_than_the_backlog_end_the_subscription_as_overflowed() {
        let router = Arc::new(Router::default());
        router.backlog.store(2, Ordering::Relaxed);
        let a = Registration::new(router.clone(), &cid("a"), &[]);
        for id in 1..=3 {
            router.route("a", frame(id));
        }
        assert!(matches!(a.inbox.take(), Taken::Overflowed));
    }

    #[test]
    fn breaking_all_ends_every_subscription_and_empties_the_table() {
        let router = Arc::new(Router::default());
        let a = Registration::new(router.clone(), &cid("a"), &[]);
        let b = Registration::new(router.clone(), &cid("b"), &[]);
        router.break_all("consumer failed");
        for reg in [&a, &b] {
            assert!(matches!(reg.inbox.take(), Taken::Broken(why) if why == "consumer failed"));
        }
        assert!(router.lock().subs.is_empty());
        drop(a);
        assert!(
            router.lock().subs.is_empty(),
            "a late drop finds nothing to remove"
        );
    }
}

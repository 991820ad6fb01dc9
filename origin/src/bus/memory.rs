//! The embedded [`Bus`]: process memory, used when `NATS_URL` is unset (one replica).
//!
//! It lets one origin replica deliver and replay frames without a NATS server, while
//! behaving like [`super::nats::NatsBus`] in everything the SSE layer relies on — the shared
//! conformance suite (`tests/tests/bus_conformance.rs`) holds both to the same contract.
//!
//! Decisions:
//! - **One lock for publish and subscribe.** `publish` assigns the id, appends the frame to
//!   the client's log and hands it to the client's live channel while holding the lock;
//!   `subscribe` snapshots the replay and joins the live channel under the same lock. So
//!   every frame is either in a subscription's replay or on its channel — never both,
//!   never neither — with no de-duplication needed. Nothing is awaited under the lock.
//! - **Ids come from one bus-wide counter** (1, 2, 3, …), like the sequence of the NATS
//!   stream: per client they increase but are not contiguous, exactly as with NATS, so
//!   nothing above the trait can come to rely on contiguity.
//! - **Retention** is a ring per client (oldest first), trimmed by age and count whenever
//!   the client is published to or subscribed to, and by a sweep of every client once per
//!   half `max_age` (at most a minute), run by whichever call comes first once it is due —
//!   no task, so memory stays bounded by the traffic that came before. A zero `max_age` or
//!   `max_frames_per_client` means "no limit", as it does for the NATS stream.
//! - **`reset` is exact while a client's log lives**: the log remembers the highest id
//!   retention dropped, and `After(n)` resets iff that is above `n`. A log with no frames
//!   and no subscriber is removed (memory stays bounded by live clients); its highest
//!   dropped id is folded into one bus-wide watermark that every later `After(n)` below it
//!   must treat as "may have lost frames" — conservative (a spurious reset is safe, a
//!   silent gap is not). An `n` above every id issued (an id from another bus or an
//!   earlier process) resets too. The rule itself is `bus::reset`'s, shared with the NATS
//!   bus; this bus only supplies its facts.
//! - **Live delivery is an inbox per subscription** (`super::inbox`), bounded by the
//!   backlog ([`LIVE_BACKLOG`] unless set; the origin passes `SSE_QUEUE`) and allocated
//!   only as frames arrive — an idle subscription costs a few dozen bytes, not a
//!   preallocated ring. A subscriber that falls that far behind does not slow the
//!   publisher or the other subscribers: its stream ends with
//!   `Err(BusError::Lagged)` instead of silently skipping, so the
//!   SSE layer evicts the connection and the client resumes with `Last-Event-ID`.
//! - **Runs are logs too** (broadcast, `super` module docs): a run's frames go to one log
//!   per execution, retained and trimmed like a client's, whose live inboxes are those of
//!   the subscriptions watching it. `subscribe_with` joins the client's log and each
//!   watched run's log and merges their replays by id under the one lock; `watch` adds the
//!   client's open inboxes to the run's log under it. So the embedded bus needs no control
//!   frames: the lock orders a watch against every publish.
//! - **Time** is [`tokio::time::Instant`], so tests that pause tokio's clock move expiry.

use super::inbox::{Inbox, Taken};
use super::reset::must_reset;
use super::{
    Bus, BusError, BusFrame, Retention, StartAt, Subscription, MAX_WATCHED_PER_SUBSCRIPTION,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use gateway_shared::ids::{ClientId, ExecutionId};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How many live frames a subscriber may fall behind by default before its stream ends
/// with [`BusError::Lagged`]: the per-connection queue of PROTOCOL §3.
pub const LIVE_BACKLOG: usize = 256;

/// The longest the bus goes between sweeps of every client while it is being used.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The shortest sweep interval, so a tiny `max_age` does not turn every call into a sweep.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);

/// The in-process bus; cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    retention: Retention,
    state: Mutex<State>,
}

/// What the bus holds, and the pure rules over it (every method takes `now`).
#[derive(Debug)]
struct State {
    /// The last id issued (0: none yet).
    last_id: u64,
    clients: HashMap<ClientId, ClientLog>,
    /// Runs' logs: their frames, and the inboxes of the subscriptions watching them.
    runs: HashMap<ExecutionId, ClientLog>,
    /// The runs each open subscription (by its inbox's address) watches, so dropping it
    /// leaves their logs.
    watching: HashMap<usize, Vec<ExecutionId>>,
    /// The highest id dropped from a client log that has since been removed: any client
    /// may have lost a frame at or below it.
    forgotten_dropped: u64,
    sweep_every: Duration,
    next_sweep: Instant,
    /// Live frames a subscriber may fall behind by.
    backlog: usize,
}

/// One client's (or run's) retained frames and live subscribers.
#[derive(Debug)]
struct ClientLog {
    /// Oldest first; ids increase.
    frames: VecDeque<Retained>,
    /// The highest id retention dropped from this log (0: none).
    highest_dropped: u64,
    /// The last id issued when this log was created: frames of an earlier, removed log of
    /// the same client all have ids at or below it.
    opened_after: u64,
    /// The inboxes of the client's open subscriptions.
    live: Vec<Arc<Inbox>>,
}

#[derive(Debug)]
struct Retained {
    frame: BusFrame,
    at: Instant,
}

/// Whose log a frame goes to.
#[derive(Debug, Clone, Copy)]
enum Topic<'a> {
    Client(&'a ClientId),
    Run(&'a ExecutionId),
}

/// A snapshot of what the bus holds, for metrics and leak checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBusStats {
    /// Clients the bus keeps state for (retained frames or a live subscriber).
    pub clients: usize,
    /// Frames retained for replay, over all clients and runs.
    pub frames: usize,
    /// Runs the bus keeps state for (retained frames or a watcher).
    pub runs: usize,
    /// Open subscriptions, over all clients.
    pub live_subscribers: usize,
}

fn is_expired(retention: &Retention, at: Instant, now: Instant) -> bool {
    !retention.max_age.is_zero() && now.saturating_duration_since(at) >= retention.max_age
}

/// How often every client is swept: often enough that expired frames never outlive their
/// age by much, rarely enough that a sweep costs little per call.
fn sweep_interval(max_age: Duration) -> Duration {
    if max_age.is_zero() {
        MAX_SWEEP_INTERVAL
    } else {
        (max_age / 2).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL)
    }
}

/// [`must_reset`] with this bus's facts: `log` is the client's current log;
/// `forgotten_dropped` covers its removed predecessors, whose frames all have ids at or
/// below the log's `opened_after`.
fn needs_reset(n: u64, last_id: u64, forgotten_dropped: u64, log: &ClientLog) -> bool {
    let dropped_up_to = log
        .highest_dropped
        .max(log.opened_after.min(forgotten_dropped));
    must_reset(n, last_id, dropped_up_to)
}

impl ClientLog {
    fn new(opened_after: u64) -> Self {
        Self {
            frames: VecDeque::new(),
            highest_dropped: 0,
            opened_after,
            live: Vec::new(),
        }
    }

    /// Drops frames past their age, then the oldest beyond the count limit.
    fn trim(&mut self, retention: &Retention, now: Instant) {
        let max = retention.max_frames_per_client;
        while let Some(oldest) = self.frames.front() {
            let over_count = max != 0 && self.frames.len() > max;
            if !over_count && !is_expired(retention, oldest.at, now) {
                break;
            }
            // Ids increase along the ring, so the last one dropped is the highest.
            self.highest_dropped = oldest.frame.id;
            self.frames.pop_front();
        }
    }

    fn live_subscribers(&self) -> usize {
        self.live.len()
    }
}

impl State {
    fn new(retention: &Retention, now: Instant) -> Self {
        let sweep_every = sweep_interval(retention.max_age);
        Self {
            last_id: 0,
            clients: HashMap::new(),
            runs: HashMap::new(),
            watching: HashMap::new(),
            forgotten_dropped: 0,
            sweep_every,
            next_sweep: now + sweep_every,
            backlog: LIVE_BACKLOG,
        }
    }

    /// The client's log, created (empty) if it has none.
    fn log(&mut self, client_id: &ClientId) -> &mut ClientLog {
        let last_id = self.last_id;
        if !self.clients.contains_key(client_id) {
            self.clients
                .insert(client_id.clone(), ClientLog::new(last_id));
        }
        self.clients
            .get_mut(client_id)
            .expect("the log was inserted just above if it was missing")
    }

    /// Retains a frame for a client (or a run) and hands it to the live subscribers of
    /// that log; returns its id.
    fn publish(
        &mut self,
        retention: &Retention,
        topic: Topic<'_>,
        event: &str,
        data: Bytes,
        now: Instant,
    ) -> u64 {
        self.sweep_if_due(retention, now);
        self.last_id += 1;
        let (id, backlog) = (self.last_id, self.backlog);
        let log = match topic {
            Topic::Client(client_id) => self.log(client_id),
            Topic::Run(execution_id) => self
                .runs
                .entry(execution_id.clone())
                .or_insert_with(|| ClientLog::new(id - 1)),
        };
        append(log, retention, id, event, data, backlog, now);
        id
    }

    /// Adds every open subscription of the client to the run's watchers (each at most
    /// [`MAX_WATCHED_PER_SUBSCRIPTION`] runs, its oldest watch dropped beyond).
    fn watch(&mut self, client_id: &ClientId, execution_id: &ExecutionId) {
        let Some(client) = self.clients.get(client_id) else {
            return;
        };
        let inboxes = client.live.clone();
        for inbox in inboxes {
            self.add_watch(&inbox, execution_id);
        }
    }

    fn add_watch(&mut self, inbox: &Arc<Inbox>, execution_id: &ExecutionId) {
        let key = Arc::as_ptr(inbox) as usize;
        let list = self.watching.entry(key).or_default();
        if list.contains(execution_id) {
            return;
        }
        list.push(execution_id.clone());
        let dropped = (list.len() > MAX_WATCHED_PER_SUBSCRIPTION).then(|| list.remove(0));
        let last_id = self.last_id;
        self.runs
            .entry(execution_id.clone())
            .or_insert_with(|| ClientLog::new(last_id))
            .live
            .push(inbox.clone());
        if let Some(old) = dropped {
            self.leave_run(inbox, &old);
        }
    }

    fn leave_run(&mut self, inbox: &Arc<Inbox>, execution_id: &ExecutionId) {
        if let Some(log) = self.runs.get_mut(execution_id) {
            log.live.retain(|i| !Arc::ptr_eq(i, inbox));
        }
    }

    /// Removes a dropped subscription's inbox from its client's log and its runs' logs.
    fn unsubscribe(&mut self, client_id: &ClientId, inbox: &Arc<Inbox>) {
        if let Some(log) = self.clients.get_mut(client_id) {
            log.live.retain(|i| !Arc::ptr_eq(i, inbox));
        }
        for run in self
            .watching
            .remove(&(Arc::as_ptr(inbox) as usize))
            .unwrap_or_default()
        {
            self.leave_run(inbox, &run);
        }
    }

    /// Decides `reset`, snapshots the frames to replay (the client's and its runs', merged
    /// by id) and joins the live inboxes — in one step, so no frame falls between the
    /// snapshot and the inbox.
    fn subscribe(
        &mut self,
        retention: &Retention,
        client_id: &ClientId,
        start: StartAt,
        watching: &[ExecutionId],
        now: Instant,
    ) -> (bool, Vec<BusFrame>, Arc<Inbox>) {
        self.sweep_if_due(retention, now);
        let (last_id, forgotten) = (self.last_id, self.forgotten_dropped);
        let inbox = Arc::new(Inbox::default());
        let log = self.log(client_id);
        log.trim(retention, now);
        log.live.push(inbox.clone());
        let watching = super::newest_watches(watching);
        for run in watching {
            self.add_watch(&inbox, run);
            if let Some(log) = self.runs.get_mut(run) {
                log.trim(retention, now);
            }
        }
        let runs: Vec<&ClientLog> = watching.iter().filter_map(|r| self.runs.get(r)).collect();
        let client = &self.clients[client_id];
        let logs = || std::iter::once(client).chain(runs.iter().copied());
        let reset = match start {
            StartAt::Retained | StartAt::Live | StartAt::Unseen | StartAt::Since(_) => false,
            StartAt::After(n) => logs().any(|log| needs_reset(n, last_id, forgotten, log)),
        };
        let after = match start {
            StartAt::After(n) if !reset => n,
            StartAt::Live => last_id,
            _ => 0,
        };
        let mut replay: Vec<BusFrame> = logs()
            .flat_map(|log| log.frames.iter())
            .filter(|r| r.frame.id > after)
            .map(|r| r.frame.clone())
            .collect();
        replay.sort_unstable_by_key(|f| f.id);
        replay.dedup_by_key(|f| f.id);
        (reset, replay, inbox)
    }

    fn sweep_if_due(&mut self, retention: &Retention, now: Instant) {
        if now >= self.next_sweep {
            self.sweep(retention, now);
        }
    }

    /// Trims every client and forgets those with neither frames nor subscribers.
    fn sweep(&mut self, retention: &Retention, now: Instant) {
        self.next_sweep = now + self.sweep_every;
        let mut forgotten = self.forgotten_dropped;
        self.clients.retain(|_, log| {
            log.trim(retention, now);
            let keep = !log.frames.is_empty() || !log.live.is_empty();
            if !keep {
                forgotten = forgotten.max(log.highest_dropped);
            }
            keep
        });
        self.runs.retain(|_, log| {
            log.trim(retention, now);
            let keep = !log.frames.is_empty() || !log.live.is_empty();
            if !keep {
                forgotten = forgotten.max(log.highest_dropped);
            }
            keep
        });
        self.forgotten_dropped = forgotten;
    }

    fn stats(&self) -> MemoryBusStats {
        MemoryBusStats {
            clients: self.clients.len(),
            frames: self
                .clients
                .values()
                .chain(self.runs.values())
                .map(|l| l.frames.len())
                .sum(),
            runs: self.runs.len(),
            live_subscribers: self.clients.values().map(ClientLog::live_subscribers).sum(),
        }
    }
}

/// Appends a frame to a log and hands it to the log's live inboxes.
fn append(
    log: &mut ClientLog,
    retention: &Retention,
    id: u64,
    event: &str,
    data: Bytes,
    backlog: usize,
    now: Instant,
) {
    let frame = BusFrame {
        id,
        event: event.to_owned(),
        data,
    };
    for inbox in &log.live {
        inbox.push(frame.clone(), backlog);
    }
    log.frames.push_back(Retained { frame, at: now });
    log.trim(retention, now);
}

impl MemoryBus {
    /// An empty bus keeping frames for `retention`. Needs no runtime: nothing is spawned.
    pub fn new(retention: Retention) -> Self {
        Self::with_backlog(retention, LIVE_BACKLOG)
    }

    /// Like [`MemoryBus::new`], with a live buffer of `backlog` frames per subscribed
    /// client instead of [`LIVE_BACKLOG`] (the origin passes `SSE_QUEUE`). The buffer is
    /// allocated whole when a client's first subscription opens (~100 bytes a slot).
    pub fn with_backlog(retention: Retention, backlog: usize) -> Self {
        let mut state = State::new(&retention, Instant::now());
        state.backlog = backlog.max(1);
        Self {
            inner: Arc::new(Inner {
                retention,
                state: Mutex::new(state),
            }),
        }
    }

    /// What the bus holds right now, after dropping what retention no longer needs — so a
    /// count that does not fall back after clients leave is a leak.
    pub fn stats(&self) -> MemoryBusStats {
        let mut state = self.inner.lock();
        state.sweep(&self.inner.retention, Instant::now());
        state.stats()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation under this lock leaves the state consistent between its steps
        // (an id issued but not yet retained is just an unused id), so a poisoned lock is
        // still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("retention", &self.inner.retention)
            .field("stats", &self.inner.lock().stats())
            .finish()
    }
}

/// A subscription's inbox, removed from its client's log when the subscription is dropped.
struct Registration {
    bus: Weak<Inner>,
    client_id: ClientId,
    inbox: Arc<Inbox>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            inner.lock().unsubscribe(&self.client_id, &self.inbox);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for inbox in state.clients.values().flat_map(|l| &l.live) {
            // A watcher's inbox is also its client's, so flagging clients reaches all.
            inbox.flag(|s| s.broken = Some("the memory bus was dropped".to_owned()));
        }
    }
}

/// The live part of a subscription: frames from its inbox until the subscriber lags or
/// the bus is dropped (one `Err`, then the end).
fn live_frames(
    reg: Registration,
) -> impl Stream<Item = Result<BusFrame, BusError>> + Send + 'static {
    stream::unfold(Some(reg), |reg| async move {
        let reg = reg?;
        loop {
            match reg.inbox.take() {
                Taken::Frame(f) => return Some((Ok(f), Some(reg))),
                Taken::Overflowed => {
                    tracing::warn!(client = %reg.client_id, "memory bus subscriber fell behind; ending its stream");
                    return Some((Err(BusError::Lagged), None));
                }
                Taken::Broken(why) => return Some((Err(BusError::Unavailable(why)), None)),
                // Only the NATS router asks for re-reads.
                Taken::Recheck => {}
                Taken::Empty => reg.inbox.notify.notified().await,
            }
        }
    })
}

#[async_trait]
impl Bus for MemoryBus {
    /// Nothing redelivers to the embedded bus (no stream, one process), so a frame is never
    /// published twice for one cause: the key is not needed.
    async fn publish_external(
        &self,
        subject: &str,
        _data: Bytes,
        _msg_id: &str,
    ) -> Result<(), BusError> {
        Err(BusError::Unavailable(format!(
            "the embedded bus has no subject {subject}: NATS subjects need NATS_URL"
        )))
    }

    fn has_external_subjects(&self) -> bool {
        false
    }

    /// Never: the watch list tells (this bus keeps no index of what it delivered).
    fn unwatched(&self, _client_id: &ClientId) -> Option<std::ops::RangeInclusive<u64>> {
        None
    }

    async fn publish_once(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
        _key: &str,
    ) -> Result<u64, BusError> {
        self.publish(client_id, event, data).await
    }

    async fn publish(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
    ) -> Result<u64, BusError> {
        super::check_event(event)?;
        let now = Instant::now();
        let id = self.inner.lock().publish(
            &self.inner.retention,
            Topic::Client(client_id),
            event,
            data,
            now,
        );
        Ok(id)
    }

    async fn publish_run(
        &self,
        execution_id: &ExecutionId,
        event: &str,
        data: Bytes,
        _key: &str,
    ) -> Result<u64, BusError> {
        super::check_event(event)?;
        let now = Instant::now();
        let id = self.inner.lock().publish(
            &self.inner.retention,
            Topic::Run(execution_id),
            event,
            data,
            now,
        );
        Ok(id)
    }

    async fn watch(
        &self,
        client_id: &ClientId,
        execution_id: &ExecutionId,
    ) -> Result<(), BusError> {
        self.inner.lock().watch(client_id, execution_id);
        Ok(())
    }

    async fn subscribe_with(
        &self,
        client_id: &ClientId,
        start: StartAt,
        watching: &[ExecutionId],
    ) -> Result<Subscription, BusError> {
        let now = Instant::now();
        let (reset, replay, inbox) =
            self.inner
                .lock()
                .subscribe(&self.inner.retention, client_id, start, watching, now);
        let reg = Registration {
            bus: Arc::downgrade(&self.inner),
            client_id: client_id.clone(),
            inbox,
        };
        crate::metrics::global()
            .sse_replayed
            .inc_by(replay.len() as u64);
        let frames = stream::iter(replay.into_iter().map(Ok))
            .chain(live_frames(reg))
            .boxed();
        Ok(Subscription {
            reset,
            frames,
            position: None,
        })
    }

    async fn is_healthy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn cid(s: &str) -> ClientId {
        ClientId::parse(s).expect("a valid client id")
    }

    fn retention(max_age: Duration, max_frames: usize) -> Retention {
        Retention {
            max_age,
            max_frames_per_client: max_frames,
        }
    }

    fn ids(log: &ClientLog) -> Vec<u64> {
        log.frames.iter().map(|r| r.frame.id).collect()
    }

    #[test]
    fn ids_come_from_one_counter_so_they_increase_per_client_but_not_contiguously() {
        let r = retention(60 * SEC, 10);
        let t0 = Instant::now();
        let mut s = State::new(&r, t0);
        assert_eq!(
            s.publish(&r, Topic::Client(&cid("a")), "e", Bytes::new(), t0),
            1
        );
        assert_eq!(
            s.publish(&r, Topic::Client(&cid("b")), "e", Bytes::new(), t0),
            2
        );
        assert_eq!(
            s.publish(&r, Topic::Client(&cid("a")), "e", Bytes::new(), t0),
            3
        );
        assert_eq!(ids(&s.clients[&cid("a")]), [1, 3]);
        assert_eq!(ids(&s.clients[&cid("b")]), [2]);
    }

    #[test]
    fn the_count_limit_drops_the_oldest_and_remembers_the_highest_dropped_id() {
        let r = retention(60 * SEC, 3);
        let t0 = Instant::now();
        let mut s = State::new(&r, t0);
        for _ in 0..5 {
            s.publish(&r, Topic::Client(&cid("a")), "e", Bytes::new(), t0);
        }
        assert_eq!(ids(&s.clients[&cid("a")]), [3, 4, 5]);
        assert_eq!(s.clients[&cid("a")].highest_dropped, 2);
    }

    #[test]
    fn frames_expire_at_max_age_and_zero_limits_mean_no_limit() {
        let r = retention(2 * SEC, 0);
        let t0 = Instant::now();
        let mut log = ClientLog::new(0);
        for id in 1..=2000 {
            let frame = BusFrame {
                id,
                event: "e".into(),
                data: Bytes::new(),
            };
            let at = if id <= 1000 { t0 } else { t0 + SEC };
            log.frames.push_back(Retained { frame, at });
        }
        log.trim(&r, t0 + SEC);
        assert_eq!(log.frames.len(), 2000, "no count limit, nothing old enough");
        log.trim(&r, t0 + 2 * SEC - Duration::from_nanos(1));
        assert_eq!(log.frames.len(), 2000);
        log.trim(&r, t0 + 2 * SEC);
        assert_eq!(log.frames.len(), 1000);
        assert_eq!(log.highest_dropped, 1000);
        log.trim(&retention(Duration::ZERO, 0), t0 + 3650 * 24 * 3600 * SEC);
        assert_eq!(
            log.frames.len(),
            1000,
            "a zero max_age keeps frames forever"
        );
    }

    #[test]
    fn reset_is_needed_exactly_when_a_later_frame_was_dropped_or_the_id_was_never_issued() {
        let mut log = ClientLog::new(0);
        log.highest_dropped = 7;
        // Dropped frames above n: reset; at or below n: nothing after n was lost.
        assert!(needs_reset(6, 20, 0, &log));
        assert!(!needs_reset(7, 20, 0, &log));
        assert!(!needs_reset(20, 20, 0, &log));
        // An id the bus never issued.
        assert!(needs_reset(21, 20, 0, &log));
        // A removed earlier log may have lost frames up to the watermark, but only frames
        // issued before this log was opened.
        let mut reopened = ClientLog::new(10);
        assert!(needs_reset(8, 20, 9, &reopened));
        assert!(!needs_reset(9, 20, 9, &reopened));
        assert!(needs_reset(9, 20, 15, &reopened));
        assert!(!needs_reset(10, 20, 15, &reopened), "opened after 10");
        reopened.highest_dropped = 12;
        assert!(needs_reset(11, 20, 15, &reopened));
    }

    #[test]
    fn a_forgotten_client_still_resets_a_resume_from_before_its_dropped_frames() {
        let r = retention(2 * SEC, 10);
        let t0 = Instant::now();
        let mut s = State::new(&r, t0);
        s.publish(&r, Topic::Client(&cid("a")), "e", Bytes::new(), t0); // 1
        s.publish(&r, Topic::Client(&cid("a")), "e", Bytes::new(), t0); // 2
        s.publish(
            &r,
            Topic::Client(&cid("b")),
            "e",
            Bytes::new(),
            t0 + 3 * SEC,
        ); // 3, sweeps: "a" is forgotten
        assert!(!s.clients.contains_key(&cid("a")));
        assert_eq!(s.forgotten_dropped, 2);
        let (reset, replay, _rx) = s.subscribe(&r, &cid("a"), StartAt::After(1), &[], t0 + 3 * SEC);
        assert!(reset, "frame 2 of a was dropped");
        assert!(replay.is_empty());
        let (reset, _, _rx) = s.subscribe(&r, &cid("a"), StartAt::After(2), &[], t0 + 3 * SEC);
        assert!(!reset);
    }

    #[test]
    fn a_sweep_forgets_idle_clients_but_keeps_subscribed_ones() {
        let r = retention(2 * SEC, 10);
        let t0 = Instant::now();
        let mut s = State::new(&r, t0);
        s.publish(&r, Topic::Client(&cid("idle")), "e", Bytes::new(), t0);
        let (_, _, _inbox) = s.subscribe(&r, &cid("watched"), StartAt::Retained, &[], t0);
        s.publish(&r, Topic::Client(&cid("watched")), "e", Bytes::new(), t0);
        s.sweep(&r, t0 + 5 * SEC);
        assert_eq!(s.clients.keys().collect::<Vec<_>>(), [&cid("watched")]);
        assert_eq!(s.stats().frames, 0);
        // What dropping the subscription does (its registration leaves the log).
        s.clients.get_mut(&cid("watched")).unwrap().live.clear();
        s.sweep(&r, t0 + 5 * SEC);
        assert!(s.clients.is_empty());
    }

    #[test]
    fn the_sweep_interval_is_half_the_max_age_within_bounds() {
        assert_eq!(sweep_interval(10 * SEC), 5 * SEC);
        assert_eq!(sweep_interval(3600 * SEC), MAX_SWEEP_INTERVAL);
        assert_eq!(sweep_interval(Duration::from_millis(2)), MIN_SWEEP_INTERVAL);
        assert_eq!(sweep_interval(Duration::ZERO), MAX_SWEEP_INTERVAL);
    }

    #[tokio::test]
    async fn a_dropped_subscription_leaves_nothing_behind() {
        let bus = MemoryBus::new(retention(60 * SEC, 10));
        let sub = bus
            .subscribe(&ClientId::parse("c").expect("valid"), StartAt::Retained)
            .await
            .expect("valid");
        assert_eq!(
            bus.stats(),
            MemoryBusStats {
                clients: 1,
                frames: 0,
                runs: 0,
                live_subscribers: 1
            }
        );
        drop(sub);
        assert_eq!(
            bus.stats(),
            MemoryBusStats {
                clients: 0,
                frames: 0,
                runs: 0,
                live_subscribers: 0
            }
        );
    }

    #[tokio::test]
    async fn a_dropped_watcher_leaves_every_run_it_watched() {
        let bus = MemoryBus::new(retention(60 * SEC, 10));
        let (one, two) = (
            ExecutionId::parse("9").expect("valid"),
            ExecutionId::parse("10").expect("valid"),
        );
        let sub = bus
            .subscribe_with(&cid("c"), StartAt::Retained, std::slice::from_ref(&one))
            .await
            .expect("valid");
        bus.watch(&cid("c"), &two).await.expect("watched");
        bus.publish_run(&two, "e", Bytes::new(), "k")
            .await
            .expect("published");
        {
            let s = bus.inner.lock();
            assert_eq!(s.runs[&one].live.len(), 1);
            assert_eq!(s.runs[&two].live.len(), 1);
            assert_eq!(s.watching.values().map(Vec::len).sum::<usize>(), 2);
        }
        drop(sub);
        let s = bus.inner.lock();
        assert!(s.runs.values().all(|l| l.live.is_empty()));
        assert!(s.watching.is_empty());
    }

    #[tokio::test]
    async fn a_subscription_reports_the_bus_being_dropped() {
        let bus = MemoryBus::new(Retention::default());
        let mut sub = bus
            .subscribe(&ClientId::parse("c").expect("valid"), StartAt::Retained)
            .await
            .expect("valid");
        drop(bus);
        assert!(matches!(
            sub.frames.next().await,
            Some(Err(BusError::Unavailable(_)))
        ));
        assert!(sub.frames.next().await.is_none());
    }
}

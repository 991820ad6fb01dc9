//! The bridge's HTTP fallback: when NoETL publishes no event stream, every execution some
//! client is interested in is followed by reading NoETL's execution record
//! (`GET /api/executions/{id}`: its `status` and `events`), and each new event goes through
//! the same [`Handler`] as an event from NATS — same frames, same claims, same guarantees.
//!
//! - **Which executions.** Every replica watches the `interest` bucket (the keys that are
//!   execution ids): an execution with interest is a candidate until its terminal frame
//!   was claimed (`terminal.<id>`), its record is gone, or it has been followed for
//!   `poll_max_follow`.
//! - **One replica per execution.** A candidate is followed by the replica holding its
//!   lease (`lease.<id>`, [`KvStore::lease`], `lease_ttl`), renewed every third of its
//!   TTL. The others see the renewals on their watch and leave it alone; when they stop
//!   (the holder died) the lease runs out and the next replica to try takes it.
//! - **From a cursor.** The last event handled is kept in K/V (`poll.<id>`, the event id),
//!   written after each event, so a replica taking over continues where the last one
//!   stopped: an event is delivered again only if its replica died between publishing it
//!   and writing the cursor (at-least-once, as a JetStream redelivery would be).
//! - **In order, nothing skipped.** A round handles the record's new events in order and
//!   stops at the first one the handler wants to retry (no interest yet, a status not
//!   final, a store or bus failure); the next round starts from it again.
//! - **Bounded rate.** At most one read per `poll_interval` per execution (4/s by
//!   default); a round without news backs off ×1.5 up to `poll_max_interval`; news brings
//!   it back to the shortest interval. A NoETL event seen on core NATS for the execution
//!   (the older Python server publishes there) wakes its follower at once, still no sooner
//!   than `poll_interval` after the last read. At most `poll_max_followed` executions per
//!   replica.
//! - **Until the terminal status.** When the record's status is final and every event has
//!   been handled, the run's terminal frame is sent if no event produced it (NoETL may end
//!   a run without a terminal event), the lease is released, and following stops.
//!
//! Without NATS at all the same runs on the replica's in-memory store (one replica).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use gateway_shared::ids::ExecutionId;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use super::handler::{Handler, Outcome};
use super::policy::{self, Dialect, ExecutionEvent, ForwardList, Parsed};
use super::source::Backoff;
use super::{BridgeConfig, CancellationToken};
use crate::noetl::{NoetlClient, NoetlError};
use crate::runs::RunStatus;
use crate::store::{Bucket, BucketWatchItem, KvEvent, KvStore};

/// Executions remembered as finished, so a late interest write does not follow them again.
const DONE_REMEMBERED: usize = 100_000;
/// Wake-ups queued from core NATS before the oldest are dropped (a wake-up only shortens a
/// wait: dropping one delays, never loses).
const WAKE_QUEUE: usize = 1024;
/// Reads answered 404 in a row (after `max_interest_wait`) before a run is given up.
const MISSING_READS: u32 = 20;

/// What the followers share.
struct Shared {
    handler: Arc<Handler>,
    kv: Arc<dyn KvStore>,
    noetl: NoetlClient,
    config: BridgeConfig,
    forward: ForwardList,
    /// This replica's name in the leases.
    holder: String,
}

/// How following one execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The run ended and every frame went out.
    Finished,
    /// Another replica holds the lease now.
    LostLease,
    /// The record is gone, or the run outlived `poll_max_follow`.
    GaveUp,
    /// Shutdown.
    Stopped,
}

/// One candidate execution, as this replica knows it.
#[derive(Debug, Default)]
struct Candidate {
    /// When another replica's lease on it was last seen written (on the watch).
    leased_elsewhere_at: Option<Instant>,
}

/// Runs the fallback until `shutdown`: watches interest, takes leases, follows.
pub(super) async fn run(
    handler: Arc<Handler>,
    kv: Arc<dyn KvStore>,
    noetl: NoetlClient,
    nats: Option<async_nats::Client>,
    config: BridgeConfig,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        forward: ForwardList::new(&config.forward),
        handler,
        kv,
        noetl,
        holder: uuid::Uuid::new_v4().simple().to_string(),
        config,
    });
    let (wake_tx, mut wake_rx) = mpsc::channel::<ExecutionId>(WAKE_QUEUE);
    if let Some(nats) = nats {
        tokio::spawn(wake_ups(
            nats,
            shared.config.subject.clone(),
            shared.config.prefix().to_owned(),
            wake_tx,
            shutdown.clone(),
        ));
    }
    let mut candidates: HashMap<ExecutionId, Candidate> = HashMap::new();
    let mut following: HashMap<ExecutionId, Arc<Notify>> = HashMap::new();
    let mut done = Done::default();
    let mut tasks: JoinSet<(ExecutionId, Ended)> = JoinSet::new();
    let mut watch: Option<BoxStream<'static, BucketWatchItem>> = None;
    let mut current = false;
    let mut backoff = Backoff::default();
    let mut tick = tokio::time::interval(shared.config.lease_ttl / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(stream) = watch.as_mut() else {
            match shared.kv.watch_bucket(Bucket::Interest).await {
                Ok(s) => {
                    watch = Some(s);
                    current = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bridge (HTTP fallback): cannot watch the interest records; retrying");
                    if !backoff.sleep(&shutdown).await {
                        break;
                    }
                }
            }
            continue;
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            item = stream.next() => match item {
                Some(BucketWatchItem::Current) => {
                    backoff.reset();
                    current = true;
                    take_leases(&shared, &mut candidates, &mut following, &done, &mut tasks, &shutdown).await;
                }
                Some(BucketWatchItem::Change(change)) => {
                    let fresh = seen(&shared, change, &mut candidates, &mut done);
                    if let (true, Some(id)) = (current, fresh) {
                        try_take(&shared, &id, &mut candidates, &mut following, &done, &mut tasks, &shutdown).await;
                    }
                }
                None => {
                    tracing::warn!("bridge (HTTP fallback): the interest watch ended; watching again");
                    watch = None;
                    if !backoff.sleep(&shutdown).await {
                        break;
                    }
                }
            },
            Some(id) = wake_rx.recv() => {
                if let Some(wake) = following.get(&id) {
                    wake.notify_one();
                }
            }
            Some(joined) = tasks.join_next() => match joined {
                Ok((id, ended)) => {
                    following.remove(&id);
                    if matches!(ended, Ended::Finished | Ended::GaveUp) {
                        candidates.remove(&id);
                        done.insert(id);
                    } else if let Some(c) = candidates.get_mut(&id) {
                        c.leased_elsewhere_at = Some(Instant::now());
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "bridge (HTTP fallback): a follower failed");
                    following.retain(|_, wake| Arc::strong_count(wake) > 1);
                }
            },
            _ = tick.tick(), if current => {
                take_leases(&shared, &mut candidates, &mut following, &done, &mut tasks, &shutdown).await;
            }
        }
    }
    // Followers see the same token: each releases its lease so another replica takes over
    // at once.
    let followed = tasks.len();
    while tasks.join_next().await.is_some() {}
    tracing::info!(followed, "bridge (HTTP fallback) stopped; leases released");
}

/// Records what one change of the interest bucket says; returns the execution that just
/// became a candidate.
fn seen(
    shared: &Shared,
    change: KvEvent,
    candidates: &mut HashMap<ExecutionId, Candidate>,
    done: &mut Done,
) -> Option<ExecutionId> {
    match change {
        KvEvent::Put { key, value } => match policy::interest_key_kind(&key) {
            policy::InterestKey::Execution(id) => {
                if done.contains(&id) || candidates.contains_key(&id) {
                    return None;
                }
                candidates.insert(id.clone(), Candidate::default());
                Some(id)
            }
            policy::InterestKey::Lease(id) => {
                if value.as_ref() != shared.holder.as_bytes() {
                    if let Some(c) = candidates.get_mut(&id) {
                        c.leased_elsewhere_at = Some(Instant::now());
                    }
                }
                None
            }
            policy::InterestKey::Terminal(id) => {
                candidates.remove(&id);
                done.insert(id);
                None
            }
            policy::InterestKey::Other => None,
        },
        KvEvent::Delete { key } => {
            match policy::interest_key_kind(&key) {
                policy::InterestKey::Execution(id) => {
                    candidates.remove(&id);
                }
                policy::InterestKey::Lease(id) => {
                    if let Some(c) = candidates.get_mut(&id) {
                        c.leased_elsewhere_at = None;
                    }
                }
                _ => {}
            }
            None
        }
    }
}

/// Tries every candidate this replica does not follow and whose lease nobody renewed
/// lately.
async fn take_leases(
    shared: &Arc<Shared>,
    candidates: &mut HashMap<ExecutionId, Candidate>,
    following: &mut HashMap<ExecutionId, Arc<Notify>>,
    done: &Done,
    tasks: &mut JoinSet<(ExecutionId, Ended)>,
    shutdown: &CancellationToken,
) {
    let ids: Vec<ExecutionId> = candidates.keys().cloned().collect();
    for id in ids {
        if following.len() >= shared.config.poll_max_followed {
            break;
        }
        try_take(shared, &id, candidates, following, done, tasks, shutdown).await;
    }
}

/// Takes `id`'s lease if it is free and starts following it.
async fn try_take(
    shared: &Arc<Shared>,
    id: &ExecutionId,
    candidates: &mut HashMap<ExecutionId, Candidate>,
    following: &mut HashMap<ExecutionId, Arc<Notify>>,
    done: &Done,
    tasks: &mut JoinSet<(ExecutionId, Ended)>,
    shutdown: &CancellationToken,
) {
    let Some(c) = candidates.get(id) else {
        return;
    };
    if following.contains_key(id)
        || done.contains(id)
        || following.len() >= shared.config.poll_max_followed
        || c.leased_elsewhere_at
            .is_some_and(|t| t.elapsed() < shared.config.lease_ttl)
    {
        return;
    }
    match shared
        .kv
        .lease(
            Bucket::Interest,
            &policy::lease_key(id),
            &shared.holder,
            shared.config.lease_ttl,
        )
        .await
    {
        Ok(true) => {
            let wake = Arc::new(Notify::new());
            following.insert(id.clone(), wake.clone());
            tracing::debug!(execution_id = %id, "bridge (HTTP fallback): following");
            tasks.spawn(follow(shared.clone(), id.clone(), wake, shutdown.clone()));
        }
        Ok(false) => {
            if let Some(c) = candidates.get_mut(id) {
                c.leased_elsewhere_at = Some(Instant::now());
            }
        }
        Err(e) => {
            tracing::warn!(execution_id = %id, error = %e, "bridge (HTTP fallback): cannot take the lease; will retry");
        }
    }
}

/// Follows one execution until it ends, the lease is lost, or shutdown.
async fn follow(
    shared: Arc<Shared>,
    id: ExecutionId,
    wake: Arc<Notify>,
    stop: CancellationToken,
) -> (ExecutionId, Ended) {
    let ended = Follower::new(&shared, &id).run(&wake, &stop).await;
    if ended != Ended::LostLease {
        release(&shared, &id).await;
    }
    tracing::debug!(execution_id = %id, ?ended, "bridge (HTTP fallback): stopped following");
    (id, ended)
}

/// Deletes this replica's lease on `id` (if it still holds it), so another replica can take
/// over at once.
async fn release(shared: &Shared, id: &ExecutionId) {
    let key = policy::lease_key(id);
    match shared.kv.get(Bucket::Interest, &key).await {
        Ok(Some(v)) if v.as_ref() == shared.holder.as_bytes() => {
            if let Err(e) = shared.kv.delete(Bucket::Interest, &key).await {
                tracing::debug!(execution_id = %id, error = %e, "bridge (HTTP fallback): lease not released; it runs out");
            }
        }
        _ => {}
    }
}

/// The state of following one execution.
struct Follower<'a> {
    shared: &'a Shared,
    id: &'a ExecutionId,
    /// The last event handled (its key), from K/V.
    cursor: Option<String>,
    /// Sticky once Python: the record's spellings say which server wrote it.
    dialect: Dialect,
    interval: Duration,
    last_read: Option<Instant>,
    last_renewed: Instant,
    started: Instant,
    missing: u32,
    /// When each not yet handled event was first tried (its age for the retry limits).
    first_tried: HashMap<String, Instant>,
}

impl<'a> Follower<'a> {
    fn new(shared: &'a Shared, id: &'a ExecutionId) -> Self {
        Self {
            shared,
            id,
            cursor: None,
            dialect: Dialect::Rust,
            interval: shared.config.poll_interval,
            last_read: None,
            last_renewed: Instant::now(),
            started: Instant::now(),
            missing: 0,
            first_tried: HashMap::new(),
        }
    }

    async fn run(mut self, wake: &Notify, stop: &CancellationToken) -> Ended {
        let kv = &*self.shared.kv;
        match kv
            .get(Bucket::Interest, &policy::terminal_key(self.id))
            .await
        {
            Ok(Some(_)) => return Ended::Finished,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(execution_id = %self.id, error = %e, "bridge (HTTP fallback): terminal marker lookup failed");
            }
        }
        loop {
            match kv.get(Bucket::Interest, &policy::cursor_key(self.id)).await {
                Ok(c) => {
                    self.cursor = c.map(|b| String::from_utf8_lossy(&b).into_owned());
                    break;
                }
                Err(e) => {
                    tracing::warn!(execution_id = %self.id, error = %e, "bridge (HTTP fallback): cursor read failed; retrying");
                    if self.pause(None, stop).await {
                        return Ended::Stopped;
                    }
                }
            }
        }
        loop {
            if let Some(last) = self.last_read {
                let due = last + self.interval;
                if self.pause(Some((due, wake)), stop).await {
                    return Ended::Stopped;
                }
            }
            if let Some(ended) = self.renew().await {
                return ended;
            }
            if self.started.elapsed() >= self.shared.config.poll_max_follow {
                tracing::warn!(execution_id = %self.id, "bridge (HTTP fallback): run still not ended after the longest follow; stopped following");
                return Ended::GaveUp;
            }
            self.last_read = Some(Instant::now());
            let record = match self.shared.noetl.execution_record(self.id.as_str()).await {
                Ok(r) => {
                    self.missing = 0;
                    r
                }
                Err(NoetlError::Status { status: 404, .. }) => {
                    self.missing += 1;
                    if self.missing >= MISSING_READS
                        && self.started.elapsed() >= self.shared.config.max_interest_wait
                    {
                        tracing::warn!(execution_id = %self.id, "bridge (HTTP fallback): NoETL does not know this execution; stopped following");
                        return Ended::GaveUp;
                    }
                    self.back_off(2);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(execution_id = %self.id, error = %e, "bridge (HTTP fallback): reading the execution record failed; backing off");
                    self.back_off(2);
                    continue;
                }
            };
            match self.round(&record).await {
                Round::News => self.interval = self.shared.config.poll_interval,
                Round::Quiet => self.back_off(1),
                Round::Finished => return Ended::Finished,
            }
        }
    }

    /// Waits until `due` (or a wake-up, but never sooner than `poll_interval` after the
    /// last read); `None`: one `poll_interval`. True on shutdown.
    async fn pause(&self, until: Option<(Instant, &Notify)>, stop: &CancellationToken) -> bool {
        let min = self.shared.config.poll_interval;
        let Some((due, wake)) = until else {
            return tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(min) => false,
            };
        };
        let earliest = self.last_read.map_or_else(Instant::now, |t| t + min);
        tokio::select! {
            _ = stop.cancelled() => return true,
            _ = tokio::time::sleep_until(due.into()) => return false,
            _ = wake.notified() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep_until(earliest.into()) => false,
        }
    }

    /// Renews the lease every third of its TTL; `Some` when it belongs to another replica.
    async fn renew(&mut self) -> Option<Ended> {
        let ttl = self.shared.config.lease_ttl;
        if self.last_renewed.elapsed() < ttl / 3 {
            return None;
        }
        match self
            .shared
            .kv
            .lease(
                Bucket::Interest,
                &policy::lease_key(self.id),
                &self.shared.holder,
                ttl,
            )
            .await
        {
            Ok(true) => {
                self.last_renewed = Instant::now();
                None
            }
            Ok(false) => {
                tracing::info!(execution_id = %self.id, "bridge (HTTP fallback): another replica follows this run now");
                Some(Ended::LostLease)
            }
            Err(e) => {
                tracing::warn!(execution_id = %self.id, error = %e, "bridge (HTTP fallback): lease renewal failed; still following");
                None
            }
        }
    }

    fn back_off(&mut self, factor: u32) {
        let max = self.shared.config.poll_max_interval;
        let next = if factor == 1 {
            self.interval.mul_f64(1.5)
        } else {
            self.interval * factor
        };
        self.interval = next.min(max);
    }

    /// Handles the record's new events in order, then the end of the run.
    async fn round(&mut self, record: &Value) -> Round {
        let empty = Vec::new();
        let events = record
            .get("events")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        if self.dialect == Dialect::Rust {
            self.dialect = Dialect::of_record_types(
                events
                    .iter()
                    .filter_map(|e| e.get("event_type").and_then(Value::as_str)),
            );
        }
        // NoETL 4.x lists a record's events newest first: handle them oldest first.
        let events = policy::oldest_first(events);
        let keys: Vec<String> = events
            .iter()
            .enumerate()
            .map(|(i, e)| policy::record_event_key(e, i))
            .collect();
        let mut news = false;
        for i in policy::unseen_events(&keys, self.cursor.as_deref()) {
            let (ev, key) = (events[i], &keys[i]);
            match policy::parse_record_event(ev, self.id, self.dialect, &self.shared.forward) {
                Ok(Parsed::Forward(e)) => {
                    if let Outcome::Retry(reason) = self.deliver(&e, key).await {
                        tracing::debug!(execution_id = %self.id, event_type = %e.event_type, ?reason, "bridge (HTTP fallback): event retried next round");
                        return if news { Round::News } else { Round::Quiet };
                    }
                }
                Ok(Parsed::Ignored { .. }) => {}
                Err(e) => {
                    tracing::warn!(execution_id = %self.id, error = %e, "bridge (HTTP fallback): malformed event in the execution record skipped");
                }
            }
            news = true;
            self.advance(key).await;
        }
        let status = RunStatus::from_reply(record);
        let Some((terminal_type, terminal_status)) = status.terminal() else {
            return if news { Round::News } else { Round::Quiet };
        };
        // Every event is handled and the run is over: make sure its terminal frame went out
        // (NoETL may end a run without a terminal event of its own).
        match self
            .shared
            .kv
            .get(Bucket::Interest, &policy::terminal_key(self.id))
            .await
        {
            Ok(Some(_)) => return Round::Finished,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(execution_id = %self.id, error = %e, "bridge (HTTP fallback): terminal marker lookup failed");
                return Round::Quiet;
            }
        }
        let ev = ExecutionEvent {
            execution_id: self.id.clone(),
            event_type: terminal_type.to_owned(),
            step_name: None,
            status: Some(terminal_status.to_owned()),
            at: None,
            event_id: Some(format!("poll-terminal-{}", self.id)),
            dialect: self.dialect,
        };
        let key = ev.event_id.clone().unwrap_or_default();
        match self.deliver(&ev, &key).await {
            Outcome::Done => Round::Finished,
            Outcome::Retry(_) => Round::Quiet,
        }
    }

    async fn deliver(&mut self, ev: &ExecutionEvent, key: &str) -> Outcome {
        let first = *self
            .first_tried
            .entry(key.to_owned())
            .or_insert_with(Instant::now);
        let outcome = self
            .shared
            .handler
            .deliver_polled(ev, key, first.elapsed())
            .await;
        if outcome == Outcome::Done {
            self.first_tried.remove(key);
        }
        outcome
    }

    /// Moves the cursor past `key` and keeps it in K/V (a failed write only means the next
    /// holder repeats a little).
    async fn advance(&mut self, key: &str) {
        self.cursor = Some(key.to_owned());
        if let Err(e) = self
            .shared
            .kv
            .put(
                Bucket::Interest,
                &policy::cursor_key(self.id),
                Bytes::copy_from_slice(key.as_bytes()),
            )
            .await
        {
            tracing::warn!(execution_id = %self.id, error = %e, "bridge (HTTP fallback): cursor write failed");
        }
    }
}

/// What one read of the record brought.
enum Round {
    /// New events were handled.
    News,
    /// Nothing new (or an event waits for a retry).
    Quiet,
    /// The run ended and its terminal frame went out.
    Finished,
}

/// Executions finished on this replica, bounded: the oldest are forgotten first.
#[derive(Default)]
struct Done {
    set: HashSet<ExecutionId>,
    order: VecDeque<ExecutionId>,
}

impl Done {
    fn insert(&mut self, id: ExecutionId) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > DONE_REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, id: &ExecutionId) -> bool {
        self.set.contains(id)
    }
}

/// NoETL's events on core NATS (the older Python server publishes there): each names an
/// execution whose follower is woken. A plain subscription on every replica (no queue
/// group): only the replica following the execution acts on it.
async fn wake_ups(
    nats: async_nats::Client,
    subject: String,
    prefix: String,
    wake: mpsc::Sender<ExecutionId>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let mut sub = match nats.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%subject, error = %e, "bridge (HTTP fallback): cannot subscribe for wake-ups; retrying");
                if !backoff.sleep(&shutdown).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else { break };
            if let Some(id) = policy::execution_of(msg.subject.as_str(), &msg.payload, &prefix) {
                // Full: the follower is busy or will read soon anyway.
                let _ = wake.try_send(id);
            }
        }
        if !backoff.sleep(&shutdown).await {
            return;
        }
    }
}

//! Per-user realtime quotas: how many streams one user holds open on this replica, how
//! often they may open one, and how often a reconnect may replay what it missed.
//!
//! One user must not take the realtime path's resources from everyone else (issue 12):
//! - **Concurrent connections** ([`UserSlots`]): SSE streams and graphql-ws sockets count
//!   together, up to `USER_MAX_STREAMS` per user (default 16). A slot is an RAII guard
//!   ([`StreamSlot`]) held for the connection's life, so nothing can leak a count. An SSE
//!   reconnect of a client that already has a stream here takes over that stream (the
//!   older one is told to stop, see `hub.rs`) and may go one over the cap for the moment
//!   both exist — a reconnect storm of one tab is never refused by its own ghost.
//! - **Opens** (`STREAM_OPEN_RATE_LIMIT`, default `120/1m`, a burst of 120): a GCRA limiter
//!   ([`KeyedLimiter`]) keyed by user id, counting every SSE stream and every accepted
//!   socket; open/close loops and reconnect storms get 429 with `Retry-After`.
//! - **Replays** (`REPLAY_RATE_LIMIT`, default `60/1m`): a resume (`Last-Event-ID`, or a
//!   named `client_id`) may replay up to `FRAME_RETENTION_PER_CLIENT` frames; over the
//!   limit the stream starts at live frames with `stream/reset` first (the protocol's
//!   answer to "your replay is not exact": re-read state), rather than a refusal.
//!
//! - **Opens in flight** ([`OpenTurns`]): the replica answers [`STREAM_OPENS_AT_ONCE`] SSE
//!   opens at a time, for everyone; the rest wait their turn in arrival order, at most
//!   [`STREAM_OPEN_WAIT`]. This is not about fairness but memory: an open in flight holds
//!   10–20 KiB for a moment, and what a burst of them frees stays resident around the
//!   streams opened beside it.
//!
//! All of these are per replica, like the origin's other limits (`ratelimit.rs`): behind the
//! load balancer a user's effective cap is the cap × replicas, and the edge's per-session
//! limiter bounds the rate across them. Keeping the counts in K/V would cost a write per
//! open and close and leave counts behind when a replica dies; a per-replica cap needs
//! neither.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::AppError;
use crate::ratelimit::{KeyedLimiter, RateSpec, RetryAfter, RATE_LIMITED_CODE};

/// The `Retry-After` sent with a refusal for too many open streams: a hint (no one knows
/// when the user's other streams close), long enough that a page's retry loop is not a
/// storm.
pub const STREAMS_RETRY_AFTER_SECS: u64 = 5;

/// Open realtime connections per user on this replica.
#[derive(Debug)]
pub struct UserSlots {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One held connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<UserSlots>,
    user_id: String,
}

impl UserSlots {
    /// At most `max` connections per user (0: no cap).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for `user_id`, or `None` when the user holds the cap already.
    /// `replacing`: the new connection supersedes one of the user's open ones (an SSE
    /// reconnect of a client connected here), so it may go one over for the moment.
    pub fn try_take(self: &Arc<Self>, user_id: &str, replacing: bool) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.get(user_id).copied().unwrap_or(0);
        let cap = if replacing {
            self.max.saturating_add(1)
        } else {
            self.max
        };
        if self.max != 0 && n >= cap {
            return None;
        }
        open.insert(user_id.to_owned(), n + 1);
        Some(StreamSlot {
            slots: self.clone(),
            user_id: user_id.to_owned(),
        })
    }

    /// Connections `user_id` holds here.
    pub fn held(&self, user_id: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user_id)
            .copied()
            .unwrap_or(0)
    }

    /// Users holding at least one connection here.
    pub fn users(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// Why a stream or socket was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user opens streams faster than `STREAM_OPEN_RATE_LIMIT`.
    Rate(RetryAfter),
    /// The user holds `USER_MAX_STREAMS` connections on this replica.
    TooMany,
}

impl Refused {
    /// The HTTP answer: 429 JSON with `Retry-After`.
    pub fn into_error(self) -> AppError {
        match self {
            Refused::Rate(wait) => wait.into_error("stream opens"),
            Refused::TooMany => AppError::TooManyRequests {
                code: "too_many_streams",
                message: format!(
                    "too many open streams and sockets for this user; close one or retry after {STREAMS_RETRY_AFTER_SECS} s"
                ),
                retry_after: STREAMS_RETRY_AFTER_SECS,
            },
        }
    }

    /// The graphql-ws close reason (with code 4429).
    pub fn close_reason(self) -> String {
        match self {
            Refused::Rate(wait) => format!(
                "Too many connections: {RATE_LIMITED_CODE}, retry after {} s",
                wait.secs()
            ),
            Refused::TooMany => "Too many connections: too_many_streams".to_owned(),
        }
    }
}

/// The per-user realtime quotas of this replica (one per process, shared by SSE and
/// graphql-ws).
#[derive(Debug, Clone)]
pub struct RealtimeQuotas {
    slots: Arc<UserSlots>,
    opens: KeyedLimiter<String>,
    replays: KeyedLimiter<String>,
    /// Client records one user may hold (`USER_MAX_CLIENTS`, see `clients.rs`).
    pub max_clients: usize,
}

/// The settings behind [`RealtimeQuotas`].
#[derive(Debug, Clone, Copy)]
pub struct QuotaSettings {
    /// `USER_MAX_STREAMS` (0: no cap).
    pub max_streams: usize,
    /// `STREAM_OPEN_RATE_LIMIT` (`None`: off).
    pub open_rate: Option<RateSpec>,
    /// `REPLAY_RATE_LIMIT` (`None`: off).
    pub replay_rate: Option<RateSpec>,
    /// `USER_MAX_CLIENTS` (0: no cap).
    pub max_clients: usize,
}

impl RealtimeQuotas {
    /// Quotas with `settings`.
    pub fn new(settings: QuotaSettings) -> Self {
        Self {
            slots: UserSlots::new(settings.max_streams),
            opens: KeyedLimiter::new(settings.open_rate),
            replays: KeyedLimiter::new(settings.replay_rate),
            max_clients: settings.max_clients,
        }
    }

    /// Admits one new stream or socket of `user_id`: counts the open against the rate, then
    /// takes a slot. `replacing` as in [`UserSlots::try_take`]. A refused open still counts
    /// against the rate (a client hammering at the cap slows down).
    /// Refusals count in `gateway_rate_limited_total{limit="stream_open"|"streams"}`.
    pub fn admit(&self, user_id: &str, replacing: bool) -> Result<StreamSlot, Refused> {
        self.opens.check(&user_id.to_owned()).map_err(|wait| {
            crate::metrics::global().rate_limited("stream_open");
            Refused::Rate(wait)
        })?;
        self.slots.try_take(user_id, replacing).ok_or_else(|| {
            crate::metrics::global().rate_limited("streams");
            Refused::TooMany
        })
    }

    /// True if `user_id` may replay now (counts one replay); false: start at live frames
    /// with `stream/reset`.
    /// A refusal counts in `gateway_rate_limited_total{limit="replay"}`.
    pub fn may_replay(&self, user_id: &str) -> bool {
        let ok = self.replays.check(&user_id.to_owned()).is_ok();
        if !ok {
            crate::metrics::global().rate_limited("replay");
        }
        ok
    }

    /// Connections `user_id` holds on this replica.
    pub fn held(&self, user_id: &str) -> usize {
        self.slots.held(user_id)
    }
}

/// SSE opens one replica answers at once (the session check, the client record, the
/// subscription: `events`). A burst of 1,024 opens at once left 4.8 KiB per idle stream,
/// 64 at a time 2.9 (docs/BENCHMARKS.md, "Density: what an idle stream holds"); 64 opens
/// in flight at a few milliseconds each is more than 2 cores open per second.
pub const STREAM_OPENS_AT_ONCE: usize = 64;

/// How long an open waits for its turn before it is refused as `overloaded` (503, which
/// `/events` answers as a `stream/unavailable` stream, so EventSource retries).
pub const STREAM_OPEN_WAIT: Duration = Duration::from_secs(10);

/// Turns for SSE opens ([`STREAM_OPENS_AT_ONCE`] at a time, in arrival order).
#[derive(Debug)]
pub struct OpenTurns {
    turns: tokio::sync::Semaphore,
    wait: Duration,
    /// Opens waiting for a turn now.
    waiting: std::sync::atomic::AtomicUsize,
}

/// Counts an open among the waiting ones until it has its turn or gives up.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl OpenTurns {
    /// `at_once` opens at a time, each waiting at most `wait` for its turn.
    pub fn new(at_once: usize, wait: Duration) -> Self {
        Self {
            turns: tokio::sync::Semaphore::new(at_once),
            wait,
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Runs `open` in its turn: the turn is held until `open` has its answer (a streaming
    /// response's head is written after, without it). Past the wait → `overloaded`.
    pub async fn run<T>(
        &self,
        open: impl std::future::Future<Output = Result<T, AppError>>,
    ) -> Result<T, AppError> {
        let waiting = Waiting::new(&self.waiting);
        let Ok(Ok(_turn)) = tokio::time::timeout(self.wait, self.turns.acquire()).await else {
            crate::metrics::global().refused("public", "overloaded");
            return Err(AppError::Overloaded);
        };
        drop(waiting);
        open.await
    }

    /// True while other opens wait for a turn: the replica is in a burst of opens (a
    /// reconnect storm), and an open in its turn should leave what can wait — a resume's
    /// presence write — for later.
    pub fn crowded(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::parse_rate;

    #[test]
    fn slots_are_per_user_freed_on_drop_and_a_replacement_may_go_one_over() {
        let slots = UserSlots::new(2);
        let a1 = slots.try_take("a", false).unwrap();
        let _a2 = slots.try_take("a", false).unwrap();
        assert!(slots.try_take("a", false).is_none(), "a is at the cap");
        let b = slots.try_take("b", false).expect("b is not a");
        let over = slots.try_take("a", true).expect("a reconnect takes over");
        assert!(slots.try_take("a", true).is_none(), "only one over");
        assert_eq!(slots.held("a"), 3);
        drop(over);
        drop(a1);
        assert_eq!(slots.held("a"), 1);
        slots.try_take("a", false).expect("a slot was freed");
        drop(b);
        assert_eq!(slots.held("b"), 0);
        assert_eq!(slots.users(), 1, "a user with no slot is forgotten");
        let none = UserSlots::new(0);
        let held: Vec<_> = (0..100).map(|_| none.try_take("a", false)).collect();
        assert!(held.iter().all(Option::is_some), "0: no cap");
    }

    #[test]
    fn opens_are_rate_limited_per_user_and_refusals_say_why() {
        let q = RealtimeQuotas::new(QuotaSettings {
            max_streams: 1,
            open_rate: parse_rate("3/1m").unwrap(),
            replay_rate: parse_rate("1/1m").unwrap(),
            max_clients: 4,
        });
        let first = q.admit("a", false).unwrap();
        assert_eq!(q.admit("a", false).unwrap_err(), Refused::TooMany);
        drop(first);
        let _second = q.admit("a", false).unwrap();
        assert!(matches!(q.admit("a", false), Err(Refused::Rate(_))));
        assert!(q.admit("b", false).is_ok(), "another user is unaffected");
        assert!(q.may_replay("a"));
        assert!(!q.may_replay("a"));
        assert!(q.may_replay("b"));
        let e = Refused::TooMany.into_error();
        assert_eq!(e.status().as_u16(), 429);
        assert_eq!(e.code(), "too_many_streams");
        assert!(Refused::TooMany.close_reason().len() <= 123);
    }

    /// Runs `n` opens through `turns`, each holding its turn until `gate` gives it a
    /// permit; returns their results and the most that were inside at once.
    async fn gated_opens(
        turns: Arc<OpenTurns>,
        n: usize,
        gate: Arc<tokio::sync::Semaphore>,
        inside: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Vec<Result<(), AppError>> {
        use std::sync::atomic::Ordering::SeqCst;
        let opens = (0..n).map(|_| {
            let (turns, gate, inside, most) =
                (turns.clone(), gate.clone(), inside.clone(), most.clone());
            tokio::spawn(async move {
                turns
                    .run(async {
                        most.fetch_max(inside.fetch_add(1, SeqCst) + 1, SeqCst);
                        gate.acquire().await.expect("open").forget();
                        inside.fetch_sub(1, SeqCst);
                        Ok(())
                    })
                    .await
            })
        });
        let handles: Vec<_> = opens.collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("no panic"));
        }
        out
    }

    #[tokio::test]
    async fn opens_run_a_bounded_number_at_a_time_and_the_rest_wait_their_turn() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let turns = Arc::new(OpenTurns::new(STREAM_OPENS_AT_ONCE, STREAM_OPEN_WAIT));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let n = STREAM_OPENS_AT_ONCE + 6;
        assert!(!turns.crowded(), "nobody waits yet");
        let all = tokio::spawn(gated_opens(
            turns.clone(),
            n,
            gate.clone(),
            inside.clone(),
            most.clone(),
        ));
        while inside.load(SeqCst) < STREAM_OPENS_AT_ONCE {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(inside.load(SeqCst), STREAM_OPENS_AT_ONCE);
        assert!(turns.crowded(), "six opens wait for a turn");
        // Let every one through: the waiting ones run too, none refused.
        gate.add_permits(n);
        let results = all.await.unwrap();
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(most.load(SeqCst), STREAM_OPENS_AT_ONCE);
        assert!(!turns.crowded(), "every open had its turn");
    }

    #[tokio::test]
    async fn an_open_that_waits_past_its_turn_is_refused_as_overloaded() {
        use std::sync::atomic::AtomicUsize;
        let turns = Arc::new(OpenTurns::new(2, Duration::from_millis(200)));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let all = tokio::spawn(gated_opens(turns.clone(), 3, gate.clone(), inside, most));
        // The two inside never finish before the third's wait is over.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!turns.crowded(), "an open that gave up waits no more");
        gate.add_permits(2);
        let results = all.await.unwrap();
        let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(refused.len(), 1, "{results:?}");
        assert!(matches!(refused[0], AppError::Overloaded));
        assert_eq!(refused[0].status().as_u16(), 503);
    }
}

//! `Subscription.executionEvents`: an execution's lifecycle as a GraphQL stream, and what a
//! WebSocket connection shares between its operations.
//!
//! A subscription follows an execution the way an SSE client does: it has a client id on
//! the [`Bus`](crate::bus::Bus), subscribes watching the execution (so the run's retained
//! frames are replayed and its later ones routed to it), follows it (`interest::follow`:
//! the bridge publishes once someone does), and reads the client's frames from the start
//! of what the bus retains. Each frame of the execution becomes one `PlaybookState`; the
//! stream ends after the terminal one.
//!
//! Decisions:
//! - **One client id per socket**, created at the socket's first subscription
//!   ([`SocketScope`]) within the user's `USER_MAX_CLIENTS`: an id per subscription would
//!   spend the user's client ids on one socket. Subscriptions on one socket read the same
//!   client's frames and each keeps those of its own execution.
//! - **Late subscribers.** The run's frames still retained are replayed, but frames the
//!   bridge dropped after its wait for interest (nobody followed the run in time) never
//!   existed, so a subscriber to a finished run could wait forever. After recording interest the resolver
//!   asks NoETL for the run's status; if it is already final and the bridge's own terminal
//!   frame does not come within [`TERMINAL_GRACE`] of the last state, the stream ends with a
//!   terminal state built from that status. Events the bridge is still retrying for lack of
//!   interest usually arrive within that time, so a client that subscribes just after a
//!   quick run still sees its steps.
//! - **Replays are rate-limited** like SSE resumes (`REPLAY_RATE_LIMIT`, `quotas.rs`): the
//!   first subscription of a socket reads a new client (nothing to replay); a later one
//!   re-reads the client's retained frames, and over the user's rate it follows live frames
//!   only (the run's earlier states are then not sent; its end still is, from the bus or
//!   from NoETL's status).
//! - **Operations per socket are capped** ([`OperationLimit`]): once upgraded, a socket's
//!   messages bypass the edge's per-request rate limit, so one socket runs at most
//!   [`MAX_OPERATIONS_PER_SOCKET`] operations of any kind at once; beyond that an operation
//!   fails at once with `TOO_MANY_OPERATIONS`.
//! - **Everything ends with the socket**: closing it drops every operation's stream, which
//!   drops its bus subscription and its permit. The interest record and the client's
//!   retained frames expire with their buckets' TTLs, like an SSE client's.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextSubscribe};
use async_graphql::{Context, Pos, Response, SimpleObject, ID};
use chrono::{SecondsFormat, Utc};
use futures::stream::{BoxStream, Stream};
use futures::StreamExt;
use gateway_shared::frames::{event, PlaybookState};
use gateway_shared::ids::{ClientId, ExecutionId};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

use super::schema::{ctx_parts, execution_id_arg, from_app, gql_error, require_execution_access};
use crate::bus::{BusError, BusFrame, StartAt};
use crate::clients;
use crate::interest::{self, Interested};
use crate::quotas::RealtimeQuotas;
use crate::runs::RunStatus;
use crate::store::KvStore;

/// Most operations (subscriptions, queries, mutations) one socket runs at once.
pub const MAX_OPERATIONS_PER_SOCKET: usize = 16;

/// How long a subscriber to an execution NoETL already reports final waits, after its last
/// state, for the bridge's terminal frame before it ends with one built from the status.
pub const TERMINAL_GRACE: Duration = Duration::from_secs(3);

/// What one WebSocket connection shares between its operations; put in the connection's
/// data when `connection_init` is accepted. HTTP requests never carry one.
#[derive(Debug)]
pub struct SocketScope {
    permits: Arc<Semaphore>,
    client_id: OnceCell<ClientId>,
}

impl Default for SocketScope {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_OPERATIONS_PER_SOCKET)),
            client_id: OnceCell::new(),
        }
    }
}

impl SocketScope {
    /// The socket's client id, created (owned by `user_id`, the socket's one user, within
    /// the user's `max_clients`) on first use — and whether it existed before this call
    /// (its retained frames are then a replay). Concurrent first subscriptions create it once.
    async fn client_id(
        &self,
        kv: &dyn KvStore,
        user_id: &str,
        max_clients: usize,
    ) -> Result<(ClientId, bool), clients::CreateError> {
        let existed = self.client_id.get().is_some();
        let id = self
            .client_id
            .get_or_try_init(|| clients::create_bounded(kv, user_id, max_clients))
            .await
            .cloned()?;
        Ok((id, existed))
    }
}

/// Whether the caller's clients follow `execution` as its owner's (never pushed out of the
/// interest record by other users') or as another user's.
pub(super) async fn interest_role(
    svc: &super::schema::Services,
    caller: &crate::auth::Caller,
    execution: &ExecutionId,
) -> async_graphql::Result<Interested> {
    let owner = svc
        .owners
        .owner(execution)
        .await
        .map_err(|e| from_app(e.into()))?;
    Ok(match owner {
        Some(o) if o.user_id == caller.user().user_id => Interested::Owner,
        _ => Interested::Other,
    })
}

/// The per-socket operation cap, as a schema extension.
///
/// Every operation received over a WebSocket runs through the `subscribe` hook (queries and
/// mutations too: the transport executes everything as a stream), so this one hook bounds
/// them all; an operation holds its permit until its stream is dropped (completed, stopped
/// by the client, or the socket closed). HTTP requests have no [`SocketScope`] and pass.
pub struct OperationLimit;

impl ExtensionFactory for OperationLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(OperationLimit)
    }
}

impl Extension for OperationLimit {
    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        let Some(scope) = ctx.data_opt::<Arc<SocketScope>>() else {
            return next.run(ctx, stream);
        };
        match scope.permits.clone().try_acquire_owned() {
            Ok(permit) => next
                .run(ctx, stream)
                .map(move |response| {
                    let _held_until_the_stream_drops = &permit;
                    response
                })
                .boxed(),
            Err(_) => {
                let error = gql_error(
                    "TOO_MANY_OPERATIONS",
                    format!(
                        "at most {MAX_OPERATIONS_PER_SOCKET} operations may run at once on one connection"
                    ),
                )
                .into_server_error(Pos::default());
                futures::stream::once(async move { Response::from_errors(vec![error]) }).boxed()
            }
        }
    }
}

/// One lifecycle state of an execution: a `playbook/state` frame's params.
#[derive(Debug, Clone, PartialEq, Eq, SimpleObject)]
#[graphql(name = "PlaybookState")]
pub struct ExecutionState {
    /// The execution id, as its exact decimal string (NoETL ids exceed 2^53).
    pub execution_id: String,
    /// Normalised event name, e.g. `step.exit`, `playbook.completed`.
    pub event_type: String,
    /// The step the event is about, if any.
    pub step_name: Option<String>,
    /// NoETL's status for the event, if it has one.
    pub status: Option<String>,
    /// When NoETL recorded the event (RFC 3339).
    pub at: String,
    /// True for the one final state of an execution; the subscription ends after it.
    pub terminal: bool,
}

impl From<PlaybookState> for ExecutionState {
    fn from(s: PlaybookState) -> Self {
        Self {
            execution_id: s.execution_id,
            event_type: s.event_type,
            step_name: s.step_name,
            status: s.status,
            at: s.at,
            terminal: s.terminal,
        }
    }
}

/// Subscriptions (served over WebSocket at `/graphql/ws`).
pub struct Subscription;

#[async_graphql::Subscription]
impl Subscription {
    /// The execution's lifecycle states (`step.enter`, `step.exit`, …), from the first one
    /// the gateway still holds, ending after the terminal state (`playbook.completed`,
    /// `playbook.failed`, `playbook.cancelled`). Requires the caller to have started the run
    /// (or hold a read-all role; else `NOT_FOUND`) and `view` on its playbook.
    async fn execution_events(
        &self,
        ctx: &Context<'_>,
        execution_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<ExecutionState>>> {
        let (svc, caller) = ctx_parts(ctx)?;
        let scope = ctx
            .data_opt::<Arc<SocketScope>>()
            .ok_or_else(|| gql_error("BAD_REQUEST", "subscriptions are served at /graphql/ws"))?;
        // A socket outlives the request that opened it: a logout stops new subscriptions.
        if !caller.still_valid(&svc.sessions).await.map_err(from_app)? {
            return Err(gql_error(
                "UNAUTHENTICATED",
                "session is invalid, expired or logged out",
            ));
        }
        require_execution_access(svc, caller, &execution_id, "view").await?;

        let kv = svc.kv.as_ref();
        let user = &caller.record.user.user_id;
        let (client_id, existed) = scope
            .client_id(kv, user, svc.config.user_max_clients)
            .await
            .map_err(|e| from_app(e.into()))?;
        // A later subscription on the socket replays the client's retained frames (up to
        // FRAME_RETENTION_PER_CLIENT): over the user's replay rate it follows live frames.
        let replay_limited = existed
            && ctx
                .data_opt::<RealtimeQuotas>()
                .is_some_and(|q| !q.may_replay(user));
        let start = if replay_limited {
            tracing::info!(client = %client_id, user = %user, "replay rate exceeded: following live frames");
            StartAt::Live
        } else {
            StartAt::Retained
        };
        let execution = execution_id_arg(&execution_id)?;
        // Watching the run from the start: its retained frames are replayed too.
        let sub = svc
            .bus
            .subscribe_with(&client_id, start, std::slice::from_ref(&execution))
            .await
            .map_err(|e| {
                gql_error(
                    "UNAVAILABLE",
                    format!("cannot open the execution's event stream: {e}"),
                )
            })?;
        let who = interest_role(svc, caller, &execution).await?;
        interest::follow(kv, svc.bus.as_ref(), &execution, &client_id, who)
            .await
            .map_err(|e| from_app(e.into()))?;
        // Asked only after the interest is recorded: a run that ends later reaches this
        // client through the bridge.
        let already_final = match svc.noetl.execution_status(&execution_id).await {
            Ok(reply) => final_state(&execution, &reply, now_rfc3339()),
            Err(e) => {
                tracing::warn!(execution = %execution_id.as_str(), error = %e, "execution status unknown; following the bus only");
                None
            }
        };
        tracing::info!(
            execution = %execution_id.as_str(), client = %client_id, user = %user,
            already_final = already_final.is_some(), "execution subscription opened"
        );
        Ok(execution_states(Feed {
            frames: sub.frames,
            execution_id: execution,
            fallback: already_final.map(|s| (s, Instant::now() + TERMINAL_GRACE)),
            done: false,
        }))
    }
}

/// The state a bus frame carries for `execution_id`, if any: other events, other
/// executions' frames (the socket's client serves all its subscriptions) and frames that do
/// not parse are skipped.
fn state_of(frame: &BusFrame, execution_id: &ExecutionId) -> Option<PlaybookState> {
    #[derive(Deserialize)]
    struct StateFrame {
        params: PlaybookState,
    }
    if frame.event != event::STATE {
        return None;
    }
    let parsed: StateFrame = serde_json::from_slice(&frame.data).ok()?;
    (parsed.params.execution_id == execution_id.as_str()).then_some(parsed.params)
}

/// The terminal state for a run NoETL's status `reply` reports final, stamped `at`.
fn final_state(execution_id: &ExecutionId, reply: &Value, at: String) -> Option<PlaybookState> {
    let (event_type, status) = RunStatus::from_reply(reply).terminal()?;
    Some(PlaybookState {
        execution_id: execution_id.to_string(),
        event_type: event_type.to_owned(),
        step_name: None,
        status: Some(status.to_owned()),
        at,
        terminal: true,
    })
}

/// Now, in the bridge's `at` format.
fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A subscription's source: the client's frames, filtered to one execution.
struct Feed {
    frames: BoxStream<'static, Result<BusFrame, BusError>>,
    execution_id: ExecutionId,
    /// When NoETL already reported the run final: the state to end with if no terminal
    /// frame comes by the instant (pushed back by every state that does come).
    fallback: Option<(PlaybookState, Instant)>,
    done: bool,
}

impl Feed {
    /// Ends the feed with the fallback state, if there is one.
    fn finish_with_fallback(mut self) -> Option<(async_graphql::Result<ExecutionState>, Self)> {
        let (state, _) = self.fallback.take()?;
        self.done = true;
        Some((Ok(state.into()), self))
    }
}

/// The states of `feed`'s execution, ending after the terminal one. A bus failure ends the
/// stream with one `UNAVAILABLE` error; subscribing again on the same socket replays what
/// the bus retained.
fn execution_states(
    feed: Feed,
) -> impl Stream<Item = async_graphql::Result<ExecutionState>> + Send + 'static {
    futures::stream::unfold(feed, |mut feed| async move {
        if feed.done {
            return None;
        }
        loop {
            let item = match &feed.fallback {
                Some((_, deadline)) => {
                    match tokio::time::timeout_at(*deadline, feed.frames.next()).await {
                        Ok(item) => item,
                        Err(_) => return feed.finish_with_fallback(),
                    }
                }
                None => feed.frames.next().await,
            };
            match item {
                Some(Ok(frame)) => {
                    let Some(state) = state_of(&frame, &feed.execution_id) else {
                        continue;
                    };
                    feed.done = state.terminal;
                    if let Some((_, deadline)) = &mut feed.fallback {
                        *deadline = Instant::now() + TERMINAL_GRACE;
                    }
                    return Some((Ok(state.into()), feed));
                }
                Some(Err(e)) => {
                    tracing::warn!(execution = %feed.execution_id, error = %e, "bus subscription failed; ending the execution subscription");
                    feed.done = true;
                    let error = gql_error(
                        "UNAVAILABLE",
                        "the execution's event stream failed; subscribe again to resume",
                    );
                    return Some((Err(error), feed));
                }
                None => return feed.finish_with_fallback(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use gateway_shared::frames::notification;
    use serde_json::json;

    const ID: &str = "612345678901234567";

    fn eid() -> ExecutionId {
        ExecutionId::parse(ID).expect("a valid execution id")
    }

    fn state(execution_id: &str, event_type: &str, terminal: bool) -> PlaybookState {
        PlaybookState {
            execution_id: execution_id.into(),
            event_type: event_type.into(),
            step_name: Some("step_1".into()),
            status: None,
            at: "2025-01-01T00:00:00.000000Z".into(),
            terminal,
        }
    }

    fn frame(id: u64, ev: &str, params: &PlaybookState) -> BusFrame {
        BusFrame {
            id,
            event: ev.into(),
            data: Bytes::from(notification(ev, params)),
        }
    }

    fn feed(frames: Vec<Result<BusFrame, BusError>>, fallback: Option<PlaybookState>) -> Feed {
        Feed {
            frames: futures::stream::iter(frames)
                .chain(futures::stream::pending())
                .boxed(),
            execution_id: eid(),
            fallback: fallback.map(|s| (s, Instant::now() + TERMINAL_GRACE)),
            done: false,
        }
    }

    #[test]
    fn the_schema_offers_execution_events_as_the_protocol_names_it() {
        let sdl = async_graphql::Schema::build(
            super::super::schema::Query,
            super::super::schema::Mutation,
            Subscription,
        )
        .finish()
        .sdl();
        assert!(
            sdl.contains("executionEvents(executionId: ID!): PlaybookState!"),
            "{sdl}"
        );
        for field in [
            "executionId: String!",
            "eventType: String!",
            "stepName: String",
            "status: String",
            "at: String!",
            "terminal: Boolean!",
        ] {
            assert!(sdl.contains(field), "{field} missing from {sdl}");
        }
    }

    #[test]
    fn only_state_frames_of_the_execution_become_states() {
        let mine = state(ID, "step.exit", false);
        assert_eq!(
            state_of(&frame(1, event::STATE, &mine), &eid()),
            Some(mine.clone())
        );
        let other = state("7", "step.exit", false);
        assert_eq!(state_of(&frame(2, event::STATE, &other), &eid()), None);
        assert_eq!(state_of(&frame(3, event::RESULT, &mine), &eid()), None);
        let junk = BusFrame {
            id: 4,
            event: event::STATE.into(),
            data: Bytes::from_static(b"{not json"),
        };
        assert_eq!(state_of(&junk, &eid()), None);
    }

    #[test]
    fn a_final_status_becomes_the_matching_terminal_state() {
        let s = final_state(&eid(), &json!({"status": "COMPLETED"}), "t".into()).unwrap();
        assert_eq!(
            (s.event_type.as_str(), s.status.as_deref(), s.terminal),
            ("playbook.completed", Some("COMPLETED"), true)
        );
        let s = final_state(&eid(), &json!({"status": "failed"}), "t".into()).unwrap();
        assert_eq!(s.event_type, "playbook.failed");
        assert_eq!(
            final_state(&eid(), &json!({"status": "RUNNING"}), "t".into()),
            None
        );
        assert_eq!(final_state(&eid(), &json!({}), "t".into()), None);
    }

    #[tokio::test]
    async fn the_stream_ends_after_the_terminal_state_and_skips_the_rest() {
        let frames = vec![
            Ok(frame(1, event::STATE, &state("7", "step.exit", false))),
            Ok(frame(2, event::STATE, &state(ID, "step.exit", false))),
            Ok(frame(
                3,
                event::STATE,
                &state(ID, "playbook.completed", true),
            )),
            Ok(frame(4, event::STATE, &state(ID, "step.exit", false))),
        ];
        let got: Vec<_> = execution_states(feed(frames, None)).collect().await;
        let kinds: Vec<(String, bool)> = got
            .into_iter()
            .map(|s| s.unwrap())
            .map(|s| (s.event_type, s.terminal))
            .collect();
        assert_eq!(
            kinds,
            [
                ("step.exit".to_owned(), false),
                ("playbook.completed".to_owned(), true)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_already_over_ends_with_its_status_when_no_terminal_frame_comes() {
        let frames = vec![Ok(frame(1, event::STATE, &state(ID, "step.exit", false)))];
        let fallback = final_state(&eid(), &json!({"status": "CANCELLED"}), "t".into());
        let got: Vec<_> = execution_states(feed(frames, fallback)).collect().await;
        let kinds: Vec<String> = got.into_iter().map(|s| s.unwrap().event_type).collect();
        assert_eq!(kinds, ["step.exit", "playbook.cancelled"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bridges_own_terminal_frame_wins_over_the_fallback() {
        let frames = vec![Ok(frame(
            1,
            event::STATE,
            &state(ID, "playbook.failed", true),
        ))];
        let fallback = final_state(&eid(), &json!({"status": "COMPLETED"}), "t".into());
        let got: Vec<_> = execution_states(feed(frames, fallback)).collect().await;
        let kinds: Vec<String> = got.into_iter().map(|s| s.unwrap().event_type).collect();
        assert_eq!(kinds, ["playbook.failed"]);
    }

    #[tokio::test]
    async fn a_bus_failure_ends_the_stream_with_one_error() {
        let frames = vec![Err(BusError::Unavailable("gone".into()))];
        let got: Vec<_> = execution_states(feed(frames, None)).collect().await;
        assert_eq!(got.len(), 1);
        let err = got.into_iter().next().unwrap().unwrap_err();
        assert!(err.message.contains("subscribe again"), "{}", err.message);
    }
}

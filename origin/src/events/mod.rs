//! `GET /events` — the SSE stream of a client (PROTOCOL.md §3) — and
//! `POST /api/events/ticket` for clients that cannot send headers or cookies.
//!
//! A connection: authenticate (session token or a single-use ticket) → decide which client
//! it is for (`Plan`) → bind or resume the client id (`clients::claim`: only its owner may
//! resume it) → subscribe to the client's frames on the [`Bus`], replaying after
//! `Last-Event-ID` → write `retry:` and the init frame, then frames as they come, a `ping`
//! frame and `:` keep-alive comments.
//!
//! **A browser's own EventSource is enough.** It reconnects by itself to the *same URL*
//! with `Last-Event-ID`, so everything a resume needs is in those two: every frame's `id:`
//! is `<client_id>.<n>` ([`EventId`]; the init frame's says where the stream starts), and a
//! request without `client_id` resumes the client its `Last-Event-ID` names — when the
//! store says the caller owns it; a name that is another user's, unknown, or not a client
//! id at all gets a new client and `stream/reset`, never someone else's frames. A page may
//! also name a client id of its own choosing: one nobody holds is bound to the caller on
//! first use. And a passing failure (503 and friends) is answered as a 200 stream that
//! says `stream/unavailable` and ends, because EventSource gives up on an error status
//! but retries after a stream that ends.
//!
//! Each connection has a bounded queue between the bus and the socket. A reader too slow to
//! keep up overflows it; the stream then ends with `stream/evicted` and the client
//! reconnects with `Last-Event-ID` — the frames it missed are still on the bus, so nothing
//! is lost and one slow reader never holds memory for everyone else.
//!
//! A stream belongs to its session: when the session is revoked (a logout on any replica,
//! told by the revocation set — no polling) or reaches its expiry, the stream writes a
//! last `session/ended` frame (`params:{reason: "logged_out" | "expired"}`) and ends.
//!
//! Frame data is the bus's `Bytes`, written as is: a frame is JSON-encoded once, by its
//! producer, whatever the number of connections; only the `id:`/`event:` prefix is per
//! connection.
//!
//! Per-user quotas (`quotas.rs`, issue 12), checked once the caller is known (a ticket is
//! redeemed by then) and before a client record or subscription is made: a stream counts against the user's stream-open rate and takes one
//! of the user's connection slots for its life (429 `rate_limited` / `too_many_streams`
//! with `Retry-After` otherwise, as JSON before the stream opens); a new client id counts
//! against `USER_MAX_CLIENTS` (`clients.rs`); a resume of a named client over the user's
//! replay rate starts at live frames with `stream/reset` first instead of replaying.
//!
//! Presence is written when a stream opens and refreshed by its pings; the first ping of
//! a stream comes after a random 50–100 % of the ping interval (and its first `:`
//! keepalive after 50–100 % of that one), so the streams of a reconnect storm do not
//! ping, write presence or wake in lockstep, and a ping writes only when the last write
//! is [`clients::PRESENCE_REFRESH`] old. A resume opened while other opens wait for a
//! turn (`quotas::OpenTurns::crowded`: a reconnect storm) writes no presence itself and
//! leaves it to its first ping, so the storm's streams open first and their markers are
//! written spread out after it (`gateway_sse_presence_deferred_total`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, Request, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use gateway_shared::frames::{
    answers_as_unavailable_stream, event, init_message, notification, sse_frame,
    unavailable_stream, EventId, LastEventId, RETRY_MS,
};
use gateway_shared::ids::ClientId;
use gateway_shared::session::{SessionHash, User};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::auth::revocations::SessionEnd;
use crate::auth::session::{now_unix, until_unix, SessionService};
use crate::auth::Caller;
use crate::bus::{Bus, BusFrame, StartAt};
use crate::clients;
use crate::error::{json_response, AppError};
use crate::hub::Hub;
use crate::interest;
use crate::quotas::{OpenTurns, RealtimeQuotas, StreamSlot};
use crate::store::{Bucket, KvStore};

pub mod alias;

use alias::Dialect;

/// Lifetime of an SSE ticket.
const TICKET_TTL: Duration = Duration::from_secs(30);

/// What `/events` and tickets need, and nothing else.
#[derive(Clone, FromRef)]
pub struct EventsState {
    /// Who is calling.
    pub sessions: Arc<SessionService>,
    /// Tickets, client records, presence.
    pub kv: Arc<dyn KvStore>,
    /// Frames per client, with replay.
    pub bus: Arc<dyn Bus>,
    /// This replica's open streams (a newer connection of a client supersedes the older).
    pub hub: Arc<Hub>,
    /// Cancelled on SIGTERM: streams end so clients reconnect elsewhere.
    pub shutdown: CancellationToken,
    /// `ping` frame and `:` keep-alive intervals.
    pub timers: SseTimers,
    /// Per-user stream slots, open and replay rates, client-id cap.
    pub quotas: RealtimeQuotas,
    /// Opens answered at once by this replica, the rest in turn.
    pub opens: Arc<OpenTurns>,
    /// Open questions, listed in the init frame.
    pub questions: Arc<crate::questions::Questions>,
}

/// How often a stream sends a `ping` frame and a `:` keep-alive comment, and over how
/// long streams end when the listeners close.
#[derive(Debug, Clone, Copy)]
pub struct SseTimers {
    /// `SSE_PING_INTERVAL`.
    pub ping_every: Duration,
    /// `SSE_KEEPALIVE_INTERVAL`.
    pub keepalive_every: Duration,
    /// [`drain_spread`] of `SHUTDOWN_GRACE`: at shutdown each stream ends at a random
    /// instant within it.
    pub drain_spread: Duration,
}

/// Over how long open streams are ended once the listeners close: the first three
/// quarters of the shutdown grace, so the last frames are written before the process
/// exits at the end of it.
pub fn drain_spread(grace: Duration) -> Duration {
    grace * 3 / 4
}

/// When one stream ends within the drain: a uniformly random instant of the spread, so
/// a replica's clients come back to the others as a trickle, not a burst.
pub(crate) fn drain_after(spread: Duration) -> Duration {
    use rand::Rng;
    spread.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
}

/// The last frame of a stream ended by a drain: no event (nothing for a page to handle),
/// only a `retry:` of a random 0.25–1.5 × [`RETRY_MS`], so clients whose streams end at
/// the same instant still reconnect apart. EventSource reconnects by itself, to whichever
/// replica the balancer picks, with its `Last-Event-ID`.
fn drain_frame() -> Bytes {
    use rand::Rng;
    let retry = rand::thread_rng().gen_range(RETRY_MS / 4..=RETRY_MS * 3 / 2);
    Bytes::from(format!(": the server is restarting\nretry: {retry}\n\n"))
}

/// The SSE routes (public listener).
pub fn router() -> Router<EventsState> {
    Router::new()
        .route("/events", get(events))
        .route("/api/v1/events/{client_id}", get(events_alias))
        .route("/api/events/ticket", post(ticket))
}

/// The query parameters `/events` understands, decoded strictly.
#[derive(Debug, Default, PartialEq, Eq)]
struct EventsQuery {
    client_id: Option<String>,
    last_event_id: Option<String>,
    ticket: Option<String>,
}

/// Parses the raw query: percent-decoding must yield UTF-8, or the request is refused.
fn parse_query(raw: Option<&str>) -> Result<EventsQuery, AppError> {
    let mut q = EventsQuery::default();
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
            .decode_utf8()
            .map_err(|_| AppError::bad_request("invalid_query", "query parameters must be UTF-8"))?
            .into_owned();
        match k {
            "client_id" => q.client_id = Some(v),
            "last_event_id" => q.last_event_id = Some(v),
            "ticket" => q.ticket = Some(v),
            _ => {}
        }
    }
    Ok(q)
}

/// What a ticket stands for: the user, and the session it was issued to (its hash, so the
/// stream it opens ends with that session).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TicketValue {
    user: User,
    session: String,
    expires_at_unix: i64,
}

/// Who an `/events` request is: the user and the session the stream is bound to.
struct StreamOwner {
    user: User,
    session: SessionHash,
    expires_at_unix: i64,
}

fn ticket_key(ticket: &str) -> String {
    format!("ticket.{}", SessionHash::of(ticket).as_str())
}

/// `POST /api/events/ticket` → 200.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct TicketResponse {
    /// The single-use ticket for `GET /events?ticket=`.
    pub ticket: String,
    /// Seconds it stays redeemable (30).
    pub expires_in: u64,
}

/// `POST /api/events/ticket`: a 30-second, single-use ticket for `/events?ticket=`.
#[utoipa::path(
    post, path = "/api/events/ticket", tag = "events",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "A ticket for one `GET /events?ticket=` within `expires_in` seconds", body = TicketResponse),
        (status = 401, description = "`missing_token`, `invalid_session`", body = gateway_shared::error::ErrorBody),
        (status = 503, description = "`store_unavailable`, `revocations_unavailable`", body = gateway_shared::error::ErrorBody),
    )
)]
async fn ticket(State(state): State<EventsState>, caller: Caller) -> Result<Response, AppError> {
    let ticket = format!(
        "{}{}",
        crate::requests::new_request_id(),
        crate::requests::new_request_id()
    );
    let value = serde_json::to_vec(&TicketValue {
        expires_at_unix: caller.record.expires_at_unix,
        user: caller.record.user,
        session: caller.session.as_str().to_owned(),
    })
    .expect("a ticket is plain data");
    state
        .kv
        .put_with_ttl(
            Bucket::Clients,
            &ticket_key(&ticket),
            Bytes::from(value),
            TICKET_TTL,
        )
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ticket": ticket, "expires_in": TICKET_TTL.as_secs()}),
    ))
}

/// Redeems a ticket once: the first redemption wins on every replica. The session it was
/// issued to must not have been revoked meanwhile.
async fn redeem_ticket(state: &EventsState, ticket: &str) -> Result<StreamOwner, AppError> {
    let refused = || {
        AppError::unauthorized(
            "invalid_ticket",
            "the ticket is unknown, expired or already used",
        )
    };
    if ticket.is_empty() || ticket.len() > 128 {
        return Err(refused());
    }
    let key = ticket_key(ticket);
    let user_bytes = state
        .kv
        .get(Bucket::Clients, &key)
        .await?
        .ok_or_else(refused)?;
    let first = state
        .kv
        .create(
            Bucket::Clients,
            &format!("used.{key}"),
            Bytes::from_static(b"1"),
        )
        .await?;
    if !first {
        return Err(refused());
    }
    let _ = state.kv.delete(Bucket::Clients, &key).await;
    let value: TicketValue = serde_json::from_slice(&user_bytes).map_err(|_| refused())?;
    let session = SessionHash::parse(&value.session).ok_or_else(refused)?;
    state.sessions.check_not_revoked(&session)?;
    Ok(StreamOwner {
        user: value.user,
        session,
        expires_at_unix: value.expires_at_unix,
    })
}

async fn authenticate(
    state: &EventsState,
    parts: &Parts,
    q: &EventsQuery,
) -> Result<StreamOwner, AppError> {
    match &q.ticket {
        Some(t) => redeem_ticket(state, t).await,
        None => {
            let caller = Caller::resolve(&state.sessions, parts, None).await?;
            Ok(StreamOwner {
                expires_at_unix: caller.record.expires_at_unix,
                user: caller.record.user,
                session: caller.session,
            })
        }
    }
}

/// `Last-Event-ID` from the header or `?last_event_id=` ([`EventId::parse`]); junk is no
/// position at all.
fn last_event_id(parts: &Parts, q: &EventsQuery) -> Option<LastEventId> {
    parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| q.last_event_id.clone())
        .and_then(|v| EventId::parse(&v))
}

/// Which client a stream is for and where it starts (PROTOCOL §3) — decided from the
/// query and `Last-Event-ID` alone, once the one fact that needs the store is known.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// A named client — `?client_id=`, or the client a `Last-Event-ID` names when it is
    /// the caller's — resumed (or, for a `client_id` nobody holds, bound to the caller).
    Named {
        /// The client.
        id: ClientId,
        /// Where its stream starts.
        start: StartAt,
    },
    /// A new client with a server-assigned id. `reset`: the request carried a position
    /// that cannot be resumed (a `Last-Event-ID` naming no client of the caller's, or a
    /// bare number without `client_id`), so the stream says `stream/reset` first.
    Fresh {
        /// Send `stream/reset` after the init frame.
        reset: bool,
    },
}

/// Where a named client's stream starts, given the position the request carried: a
/// position of this client (`<id>.<n>`, `0`: none of its frames seen yet), or a bare
/// number (the old id form, read as this client's); a position of another client is no
/// position (everything retained, as for no `Last-Event-ID`).
fn start_for(id: &ClientId, last: Option<&LastEventId>) -> StartAt {
    match last {
        Some(LastEventId::Client(e)) if e.client == *id && e.seq > 0 => StartAt::After(e.seq),
        Some(LastEventId::Bare(n)) => StartAt::After(*n),
        _ => StartAt::Retained,
    }
}

/// The [`Plan`] for a request. `owns_named_by_last` answers whether the client that
/// `last` names belongs to the caller (asked only when there is no `client_id`).
fn plan(named: Option<ClientId>, last: Option<LastEventId>, owns_named_by_last: bool) -> Plan {
    match (named, last) {
        (Some(id), last) => Plan::Named {
            start: start_for(&id, last.as_ref()),
            id,
        },
        (None, Some(LastEventId::Client(e))) if owns_named_by_last => Plan::Named {
            start: start_for(&e.client, Some(&LastEventId::Client(e.clone()))),
            id: e.client,
        },
        (None, Some(_)) => Plan::Fresh { reset: true },
        (None, None) => Plan::Fresh { reset: false },
    }
}

/// The init frame's `id:`: the position the stream starts after when it is one frame id
/// (an exact resume, and a resume held to live frames by the replay rate: nothing before
/// it is owed again), else `<id>.0` (everything retained). A reconnect before any other
/// frame then asks for exactly what this connection would have delivered.
fn init_event_id(client: &ClientId, requested: StartAt, reset: bool) -> String {
    let seq = match requested {
        StartAt::After(n) if !reset => n,
        _ => 0,
    };
    EventId::format(client, seq)
}

/// `GET /events`. A passing failure (502, 503, 504: the store or the bus away, the
/// revocation set not current) is answered as a stream that says so and ends
/// ([`unavailable_stream`]), so a browser's EventSource retries by itself rather than
/// giving up; every other refusal is the JSON error with its status.
#[utoipa::path(
    get, path = "/events", tag = "events",
    params(
        ("client_id" = Option<String>, Query, description = "Resume (or name) a client: `[A-Za-z0-9_-]`, 1-64 characters; assigned by the server when absent"),
        ("session_token" = Option<String>, Query, description = "**compat**: the session token, for EventSource (which cannot set headers); redacted from logs"),
        ("ticket" = Option<String>, Query, description = "A single-use ticket from `POST /api/events/ticket`"),
        ("last_event_id" = Option<String>, Query, description = "Same as the `Last-Event-ID` header"),
        ("Last-Event-ID" = Option<String>, Header, description = "The last frame id seen (`<client_id>.<n>`): the stream resumes after it, losslessly"),
    ),
    security(("bearer" = []), ("session_cookie" = []), ()),
    responses(
        (status = 200, description = "A `text/event-stream` of JSON-RPC frames (PROTOCOL §3); a passing failure (502, 503, 504) is also a 200 stream with one `stream/unavailable` frame and `retry:`", content_type = "text/event-stream", body = String),
        (status = 400, description = "A malformed query (`invalid_query`, `invalid_client_id`)", body = gateway_shared::error::ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_session`, an unknown or used ticket", body = gateway_shared::error::ErrorBody),
        (status = 403, description = "`client_not_yours`: another user's `client_id`", body = gateway_shared::error::ErrorBody),
        (status = 429, description = "`rate_limited` / `too_many_streams`, `too_many_clients`: too many streams or clients for this user (with `Retry-After`)", body = gateway_shared::error::ErrorBody),
    )
)]
async fn events(State(state): State<EventsState>, req: Request) -> Result<Response, AppError> {
    stream_or_unavailable(state, req, None).await
}

/// `GET /api/v1/events/{client_id}`: `/events?client_id={client_id}` with the source
/// design's frame names ([`alias`]).
#[utoipa::path(
    get, path = "/api/v1/events/{client_id}", tag = "events",
    params(
        ("client_id" = String, Path, description = "The client (`[A-Za-z0-9_-]`, 1-64): resumed if the caller's, bound to the caller if nobody's"),
        ("session_token" = Option<String>, Query, description = "**compat**: the session token, for EventSource"),
        ("ticket" = Option<String>, Query, description = "A single-use ticket from `POST /api/events/ticket`"),
        ("Last-Event-ID" = Option<String>, Header, description = "The last frame id seen: the stream resumes after it"),
    ),
    security(("bearer" = []), ("session_cookie" = []), ()),
    responses(
        (status = 200, description = "The client's `/events` stream under the source design's names: `connection.established`, a service event's own name (`run.start`, `run.progress`, `run.complete`, `run.error`, `node.complete`, `node.error`, …), `question`, `question.answered`, `question.expired`, `heartbeat`", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_query`, `invalid_client_id`", body = gateway_shared::error::ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_session`", body = gateway_shared::error::ErrorBody),
        (status = 403, description = "`client_not_yours`: another user's client", body = gateway_shared::error::ErrorBody),
        (status = 429, description = "`rate_limited`, `too_many_streams`, `too_many_clients`", body = gateway_shared::error::ErrorBody),
    )
)]
pub(crate) async fn events_alias(
    State(state): State<EventsState>,
    axum::extract::Path(client_id): axum::extract::Path<String>,
    req: Request,
) -> Result<Response, AppError> {
    stream_or_unavailable(state, req, Some(client_id)).await
}

/// Opens the stream (for `path_client`'s alias when given); a passing failure is a 200
/// stream that says `stream/unavailable`.
async fn stream_or_unavailable(
    state: EventsState,
    req: Request,
    path_client: Option<String>,
) -> Result<Response, AppError> {
    // In turn: the open's transient memory is bounded (`quotas::OpenTurns`); the turn
    // ends with the answer, before the stream's head is written.
    let opens = state.opens.clone();
    match opens.run(open_stream(state, req, path_client)).await {
        Err(e) if answers_as_unavailable_stream(e.status().as_u16()) => {
            tracing::warn!(code = e.code(), error = %e, "event stream not opened; the client is told to retry");
            Ok(event_stream_response(Body::from(unavailable_stream(
                e.code(),
                "the event stream cannot be opened right now; reconnect",
            ))))
        }
        other => other,
    }
}

/// `200 text/event-stream`, not cached or buffered on the way, around `body`.
fn event_stream_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

async fn open_stream(
    state: EventsState,
    req: Request,
    path_client: Option<String>,
) -> Result<Response, AppError> {
    let (parts, _) = req.into_parts();
    let mut q = parse_query(parts.uri.query())?;
    let dialect = if path_client.is_some() {
        Dialect::SourceDesign
    } else {
        Dialect::Native
    };
    if let Some(id) = path_client {
        q.client_id = Some(id);
    }
    let owner = authenticate(&state, &parts, &q).await?;
    let user = &owner.user;
    let kv = state.kv.as_ref();
    let named = match &q.client_id {
        Some(raw) => Some(ClientId::parse(raw).map_err(|_| {
            AppError::bad_request("invalid_client_id", "client_id is not a valid client id")
        })?),
        None => None,
    };
    let last = last_event_id(&parts, &q);
    // A browser's own reconnect repeats the URL: without `client_id`, the client is the
    // one its `Last-Event-ID` names — if the caller owns it. A name alone proves nothing.
    let owns_named_by_last = match (&named, &last) {
        (None, Some(LastEventId::Client(e))) => clients::get(kv, &e.client)
            .await?
            .is_some_and(|r| r.user_id == user.user_id),
        _ => false,
    };
    let plan = plan(named, last, owns_named_by_last);
    // A reconnect of a client streaming here replaces that stream: it may go one over.
    let replacing = matches!(&plan, Plan::Named { id, .. } if state.hub.is_connected(id));
    let slot = state
        .quotas
        .admit(&user.user_id, replacing)
        .map_err(|refused| {
            tracing::info!(user = %user.user_id, ?refused, "event stream refused: user quota");
            refused.into_error()
        })?;

    // The runs the client follows (issue 16, broadcast) are merged into its stream: read
    // beside the claim (one round trip, not two), used only once the claim proved the
    // client the caller's. A new client follows none yet. When the bus knows the client
    // follows none if its record says it was made after the bus's index starts
    // (`Bus::unwatched`: no `gw/watch` frame of it seen) the list is not read beside the
    // claim, and only read after it when the record says otherwise.
    let (client_id, record, requested, resumed, fresh_reset, watched, subscribed) = match plan {
        Plan::Named { id, start } => {
            let unwatched = state.bus.unwatched(&id);
            let claim = clients::claim(kv, &user.user_id, state.quotas.max_clients, &id);
            let (claimed, watched) = if unwatched.is_some() {
                (claim.await, None)
            } else {
                let (claimed, watched) = tokio::join!(claim, interest::watched_by(kv, &id));
                (claimed, Some(watched))
            };
            let claimed = claimed.inspect_err(|e| {
                if matches!(e, clients::ClaimError::NotYours) {
                    tracing::warn!(user = %user.user_id, "refused to resume another user's client id");
                }
            })?;
            // Nothing read yet: everything retained, which for a server-made id is everything
            // after the position its record keeps (a replica that has seen nothing new for
            // the client then reads nothing).
            let start = match (start, claimed.record.since) {
                (StartAt::Retained, Some(since)) => StartAt::Since(since),
                (start, _) => start,
            };
            let watched = match watched {
                _ if !claimed.existed => Vec::new(),
                Some(watched) => watched?,
                None if follows_no_run(unwatched, claimed.record.since, start) => Vec::new(),
                None => interest::watched_by(kv, &id).await?,
            };
            (
                id,
                claimed.record,
                start,
                claimed.existed,
                false,
                watched,
                None,
            )
        }
        Plan::Fresh { reset } => {
            // Subscribed before the id is stored anywhere (record, user index): nothing can
            // have been published for it, so the bus reads nothing back (`StartAt::Unseen`).
            // The record and the presence marker are then written together.
            let id = clients::new_id();
            let sub = subscribe(&state, &id, StartAt::Unseen, &[]).await?;
            let (created, present) = tokio::join!(
                clients::create_bounded_as(
                    kv,
                    &user.user_id,
                    state.quotas.max_clients,
                    &id,
                    sub.position
                ),
                clients::mark_present(kv, &id)
            );
            created?;
            note_presence(present);
            let record = clients::ClientRecord::new(&user.user_id);
            (
                id,
                record,
                StartAt::Retained,
                false,
                reset,
                Vec::new(),
                Some(sub),
            )
        }
    };
    // A resumed client may have up to FRAME_RETENTION_PER_CLIENT frames to replay; a new
    // one has none, so only resumes count.
    let replay_limited = resumed && !state.quotas.may_replay(&user.user_id);
    let start = if replay_limited {
        tracing::info!(client = %client_id, user = %user.user_id, "replay rate exceeded: starting at live frames");
        StartAt::Live
    } else {
        requested
    };
    // The subscription and the presence marker are independent round trips: made
    // together. A marker written for a subscription that then failed is left to expire
    // (`PRESENCE_TTL`): it only turns a callback's 202 `queued` into 200 meanwhile, and
    // another stream of the client may be open elsewhere, so taking it back could be wrong.
    // In a burst of opens (others wait for a turn: a reconnect storm) a resume leaves the
    // marker to its stream's first ping, which comes after a random 50–100 % of the ping
    // interval: the streams open first, and their markers — a hint, still live for a
    // client back within `PRESENCE_TTL` — are written spread out after the burst.
    let (sub, presence_due) = match subscribed {
        Some(sub) => (sub, false),
        None if state.opens.crowded() => {
            crate::metrics::global().sse_presence_deferred.inc();
            (subscribe(&state, &client_id, start, &watched).await?, true)
        }
        None => {
            let (sub, present) = tokio::join!(
                subscribe(&state, &client_id, start, &watched),
                clients::mark_present(kv, &client_id)
            );
            note_presence(present);
            (sub?, false)
        }
    };
    tracing::info!(client = %client_id, user = %user.user_id, ?start, reset = sub.reset, resumed, "event stream opened");

    let init_id = init_event_id(&client_id, requested, sub.reset);
    let questions = state.questions.pending_for(&user.user_id, &client_id);
    let mut first = match dialect {
        Dialect::Native => sse_frame(
            Some(&init_id),
            event::MESSAGE,
            &init_message(
                client_id.as_str(),
                env!("CARGO_PKG_VERSION"),
                &record.pending,
                &questions,
            ),
            Some(RETRY_MS),
        ),
        Dialect::SourceDesign => sse_frame(
            Some(&init_id),
            "connection.established",
            &alias::established(
                client_id.as_str(),
                &json!(record.pending),
                &json!(questions),
            ),
            Some(RETRY_MS),
        ),
    };
    let reset_reason = if replay_limited {
        Some("too many replays for this user; frames before now were not replayed")
    } else if sub.reset {
        Some("last_event_id is older than the retained frames")
    } else if fresh_reset {
        Some("last_event_id names no client of this session; this is a new client")
    } else {
        None
    };
    if let Some(reason) = reset_reason {
        crate::metrics::global().sse_resets.inc();
        first.extend(sse_frame(
            None,
            event::RESET,
            &notification(event::RESET, &json!({ "reason": reason })),
            None,
        ));
    }
    let session = SessionLife {
        hash: owner.session.clone(),
        expires_at_unix: owner.expires_at_unix,
    };
    let mut body = SseBody::new(
        state,
        client_id,
        Bytes::from(first),
        sub.frames,
        session,
        slot,
        presence_due,
    );
    body.dialect = dialect;
    Ok(event_stream_response(Body::new(body)))
}

/// The client's frames from `start`, or 503 `bus_unavailable`.
async fn subscribe(
    state: &EventsState,
    client_id: &ClientId,
    start: StartAt,
    watched: &[gateway_shared::ids::ExecutionId],
) -> Result<crate::bus::Subscription, AppError> {
    state
        .bus
        .subscribe_with(client_id, start, watched)
        .await
        .map_err(|e| AppError::Unavailable {
            code: "bus_unavailable",
            message: format!("cannot open the event stream: {e}"),
        })
}

/// True when a client made at stream position `made_at` (its record's) and resuming
/// from `start` follows no run by what the bus knows (`unwatched`, [`crate::bus::Bus::unwatched`]):
/// made within the bus's range, resuming at or below its end.
fn follows_no_run(
    unwatched: Option<std::ops::RangeInclusive<u64>>,
    made_at: Option<u64>,
    start: StartAt,
) -> bool {
    let (Some(range), Some(made_at)) = (unwatched, made_at) else {
        return false;
    };
    let from = match start {
        StartAt::After(n) | StartAt::Since(n) => n,
        StartAt::Retained | StartAt::Live | StartAt::Unseen => return false,
    };
    range.contains(&made_at) && from <= *range.end()
}

/// A failed presence write is logged, not fatal: it only turns a callback's 200
/// `delivered` into 202 `queued` until a later ping of the stream writes it.
fn note_presence(written: Result<(), crate::store::StoreError>) {
    if let Err(e) = written {
        tracing::warn!(error = %e, "presence not recorded");
    }
}

/// The response body: frames from the bus written as they come, `ping` frames and `:`
/// keep-alives when it is quiet, `stream/evicted` when the bus says this connection fell
/// behind.
///
/// No task and no queue of its own: the body is polled by the connection when the socket
/// can take more, and the bus subscription holds what is routed meanwhile (bounded by
/// `SSE_QUEUE`; beyond that the subscription ends as lagged and the stream is evicted). An
/// idle stream is this struct, the subscription and one timer.
struct SseBody {
    /// Only what the stream needs of the app state (not a clone of all of it: an idle
    /// stream's size is the point).
    kv: Arc<dyn KvStore>,
    hub: Arc<Hub>,
    ping_every: Duration,
    keepalive_every: Duration,
    client_id: ClientId,
    generation: u64,
    frames: futures::stream::BoxStream<'static, Result<BusFrame, crate::bus::BusError>>,
    /// Chunks of the frame being written (at most the `data:` and the blank line).
    queued: [Option<Bytes>; 2],
    /// Cancelled when a newer connection of the client supersedes this one, when the
    /// session is revoked (linked in `session`), or (a child of the shutdown token) when
    /// the server shuts down.
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: CancellationToken,
    timer: Pin<Box<tokio::time::Sleep>>,
    next_ping: Instant,
    next_keepalive: Instant,
    /// The session's expiry: the stream ends with `session/ended` then.
    expires_at: Instant,
    /// The subscription to the session's revocation, which also cancels `stop`.
    session: SessionEnd,
    /// When this stream's next ping writes the client's presence marker: its first ping
    /// when the open left the write to it, [`clients::PRESENCE_REFRESH`] after the last
    /// write otherwise.
    presence_next: Instant,
    /// Over how long a drain spreads stream ends ([`SseTimers::drain_spread`]).
    drain_spread: Duration,
    /// Set when the listeners closed: the instant this stream ends with [`drain_frame`].
    /// Frames are still delivered until then.
    drain_at: Option<Instant>,
    /// The user's connection slot, freed when the stream is dropped.
    _slot: StreamSlot,
    done: bool,
    reason: &'static str,
    /// The frame names this stream speaks (`/events` or its source-design alias).
    dialect: Dialect,
}

/// A stream's first ping, or first `:` keepalive: after a random 50–100 % of the
/// interval, so streams opened together (a reconnect storm) spread their pings, presence
/// writes and keepalives instead of waking together one interval later.
fn first_ping_after(every: Duration) -> Duration {
    use rand::Rng;
    every.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// The `ping` frame, the same bytes for every connection.
fn ping_frame() -> Bytes {
    static PING: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PING.get_or_init(|| {
        Bytes::from(sse_frame(
            None,
            event::PING,
            &notification(event::PING, &json!({})),
            None,
        ))
    })
    .clone()
}

/// The stream's session: its revocation is told through the stream's own stop token
/// ([`crate::auth::revocations::Revocations::session_end_linked`]), its expiry is a deadline.
struct SessionLife {
    hash: gateway_shared::session::SessionHash,
    expires_at_unix: i64,
}

/// The last frame of a stream whose session ended: `reason` is `logged_out` or `expired`.
fn session_ended_frame(reason: &str) -> Bytes {
    let data = notification(event::SESSION_ENDED, &json!({ "reason": reason }));
    Bytes::from(sse_frame(None, event::SESSION_ENDED, &data, None))
}

fn evicted_frame() -> Bytes {
    let data = notification(
        event::EVICTED,
        &json!({"reason": "the connection fell behind; reconnect with Last-Event-ID"}),
    );
    Bytes::from(sse_frame(None, event::EVICTED, &data, None))
}

impl SseBody {
    fn new(
        state: EventsState,
        client_id: ClientId,
        first: Bytes,
        frames: futures::stream::BoxStream<'static, Result<BusFrame, crate::bus::BusError>>,
        session: SessionLife,
        slot: StreamSlot,
        presence_due: bool,
    ) -> Self {
        let reg = state.hub.register_under(&client_id, Some(&state.shutdown));
        crate::metrics::global().sse_opened.inc();
        let session_end = state.sessions.revocations().session_end_linked(
            &session.hash,
            now_unix(),
            reg.superseded.clone(),
        );
        let now = Instant::now();
        let expires_at = now + until_unix(session.expires_at_unix);
        let SseTimers {
            ping_every,
            keepalive_every,
            drain_spread,
        } = state.timers;
        let next_ping = now + first_ping_after(ping_every);
        let next_keepalive = now + first_ping_after(keepalive_every);
        Self {
            kv: state.kv.clone(),
            hub: state.hub.clone(),
            ping_every,
            keepalive_every,
            generation: reg.generation,
            stop: Box::pin(reg.superseded.cancelled_owned()),
            shutdown: state.shutdown.clone(),
            timer: Box::pin(tokio::time::sleep_until(
                next_ping.min(next_keepalive).min(expires_at),
            )),
            expires_at,
            session: session_end,
            presence_next: if presence_due {
                now
            } else {
                now + clients::PRESENCE_REFRESH
            },
            drain_spread,
            drain_at: None,
            _slot: slot,
            client_id,
            frames,
            queued: [Some(first), None],
            next_ping,
            next_keepalive,
            done: false,
            reason: "client gone",
            dialect: Dialect::Native,
        }
    }

    fn end(&mut self, reason: &'static str) {
        self.done = true;
        self.reason = reason;
    }
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        for slot in &mut this.queued {
            if let Some(chunk) = slot.take() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
            }
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.drain_at.is_some() {
            // `stop` completed when the drain began; a revocation since then is seen here.
            if this.session.is_revoked() {
                this.end("session revoked");
                return Poll::Ready(Some(Ok(http_body::Frame::data(session_ended_frame(
                    "logged_out",
                )))));
            }
        } else if this.stop.as_mut().poll(cx).is_ready() {
            if this.shutdown.is_cancelled() && !this.session.is_revoked() {
                // The listeners closed: keep delivering until this stream's own instant.
                let at = Instant::now() + drain_after(this.drain_spread);
                this.drain_at = Some(at);
                let next = this.next_ping.min(this.next_keepalive).min(this.expires_at);
                this.timer.as_mut().reset(next.min(at));
            } else if this.session.is_revoked() {
                this.end("session revoked");
                return Poll::Ready(Some(Ok(http_body::Frame::data(session_ended_frame(
                    "logged_out",
                )))));
            } else {
                this.end("superseded");
                crate::metrics::global().sse_evicted.inc();
                return Poll::Ready(None);
            }
        }
        match this.frames.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(f))) if this.dialect == Dialect::SourceDesign => {
                let (name, data) = alias::rename(&f.event, &f.data);
                let id = format!("{}.{}", this.client_id, f.id);
                let frame = sse_frame(Some(&id), &name, &data, None);
                return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(frame)))));
            }
            Poll::Ready(Some(Ok(f))) => {
                // The id is `EventId::format(client, id)`, written in place.
                let prefix = format!(
                    "id: {}.{}\nevent: {}\ndata: ",
                    this.client_id, f.id, f.event
                );
                this.queued = [Some(f.data), Some(Bytes::from_static(b"\n\n"))];
                return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(prefix)))));
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(client = %this.client_id, error = %e, "bus subscription ended; evicting so the client resumes");
                this.end("evicted");
                crate::metrics::global().sse_evicted.inc();
                return Poll::Ready(Some(Ok(http_body::Frame::data(evicted_frame()))));
            }
            Poll::Ready(None) => {
                this.end("bus closed");
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if this.drain_at.is_some_and(|at| now >= at) {
                this.end("shutdown");
                return Poll::Ready(Some(Ok(http_body::Frame::data(drain_frame()))));
            }
            if now >= this.expires_at {
                this.end("session expired");
                return Poll::Ready(Some(Ok(http_body::Frame::data(session_ended_frame(
                    "expired",
                )))));
            }
            let chunk = if now >= this.next_ping {
                this.next_ping = now + this.ping_every;
                this.next_keepalive = now + this.keepalive_every;
                if now >= this.presence_next {
                    this.presence_next = now + clients::PRESENCE_REFRESH;
                    let kv = this.kv.clone();
                    let client_id = this.client_id.clone();
                    tokio::spawn(async move {
                        let _ = clients::mark_present(kv.as_ref(), &client_id).await;
                    });
                }
                match this.dialect {
                    Dialect::Native => ping_frame(),
                    Dialect::SourceDesign => {
                        let ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis());
                        Bytes::from(sse_frame(None, "heartbeat", &alias::heartbeat(ms), None))
                    }
                }
            } else {
                this.next_keepalive = now + this.keepalive_every;
                Bytes::from_static(b":\n\n")
            };
            let next = this.next_ping.min(this.next_keepalive).min(this.expires_at);
            this.timer
                .as_mut()
                .reset(this.drain_at.map_or(next, |at| next.min(at)));
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queued.iter().all(Option::is_none)
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let client_id = self.client_id.clone();
        tracing::info!(client = %client_id, reason = self.reason, "event stream closed");
        if self.hub.unregister(&client_id, self.generation) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let kv = self.kv.clone();
                rt.spawn(async move {
                    let _ = clients::mark_absent(kv.as_ref(), &client_id).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_streams_end_within_the_spread_with_a_jittered_retry_and_no_event() {
        let grace = Duration::from_secs(20);
        assert_eq!(drain_spread(grace), Duration::from_secs(15));
        let afters: Vec<Duration> = (0..500).map(|_| drain_after(drain_spread(grace))).collect();
        assert!(afters.iter().all(|d| *d <= Duration::from_secs(15)));
        let early = afters
            .iter()
            .filter(|d| **d < Duration::from_millis(7500))
            .count();
        assert!(
            (150..=350).contains(&early),
            "not uniform: {early} of 500 in the first half"
        );
        let retries: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| {
                let frame = drain_frame();
                let text = std::str::from_utf8(&frame).unwrap();
                assert!(
                    text.ends_with("\n\n") && !text.contains("event:") && !text.contains("data:"),
                    "{text}"
                );
                let retry = text
                    .lines()
                    .find_map(|l| l.strip_prefix("retry: "))
                    .unwrap();
                retry.parse().unwrap()
            })
            .collect();
        assert!(retries.len() > 100, "not jittered: {retries:?}");
        assert!(retries
            .iter()
            .all(|r| (RETRY_MS / 4..=RETRY_MS * 3 / 2).contains(r)));
    }

    #[test]
    fn a_watch_list_is_skipped_only_for_a_client_made_and_resuming_within_what_the_bus_saw() {
        let known = || Some(10..=20);
        // Made at 12, resuming after its own position or a frame the bus has seen.
        assert!(follows_no_run(known(), Some(12), StartAt::Since(12)));
        assert!(follows_no_run(known(), Some(12), StartAt::After(20)));
        assert!(follows_no_run(known(), Some(10), StartAt::After(15)));
        // Made before the bus's horizon: its watches may predate what the bus saw.
        assert!(!follows_no_run(known(), Some(9), StartAt::Since(9)));
        // Resuming after a frame the bus has not seen yet: a watch below it may be in flight.
        assert!(!follows_no_run(known(), Some(12), StartAt::After(21)));
        // Made above the position: not within what the bus saw.
        assert!(!follows_no_run(known(), Some(21), StartAt::Since(21)));
        // No position in the record (a page-chosen id, an older record), or the bus cannot tell.
        assert!(!follows_no_run(known(), None, StartAt::After(15)));
        assert!(!follows_no_run(None, Some(12), StartAt::Since(12)));
        // Starts that are not resumes.
        for start in [StartAt::Retained, StartAt::Live, StartAt::Unseen] {
            assert!(!follows_no_run(known(), Some(12), start));
        }
    }

    #[test]
    fn first_pings_are_spread_over_the_second_half_of_the_interval() {
        let every = Duration::from_secs(30);
        let firsts: Vec<Duration> = (0..200).map(|_| first_ping_after(every)).collect();
        assert!(firsts.iter().all(|d| *d >= every / 2 && *d <= every));
        let distinct: std::collections::HashSet<_> = firsts.iter().collect();
        assert!(distinct.len() > 100, "jittered, not in lockstep");
    }

    #[test]
    fn query_parsing_is_strict_about_utf8_and_tolerant_of_the_rest() {
        let q = parse_query(Some("client_id=abc&last_event_id=7&x=1&ticket=t%2Bx")).unwrap();
        assert_eq!(q.client_id.as_deref(), Some("abc"));
        assert_eq!(q.last_event_id.as_deref(), Some("7"));
        assert_eq!(q.ticket.as_deref(), Some("t+x"));
        assert!(parse_query(Some("client_id=%FF%FE")).is_err());
        assert_eq!(parse_query(None).unwrap(), EventsQuery::default());
        assert!(parse_query(Some("&&=&a")).is_ok());
    }

    fn cid(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    fn at(client: &str, seq: u64) -> Option<LastEventId> {
        Some(LastEventId::Client(EventId {
            client: cid(client),
            seq,
        }))
    }

    #[test]
    fn a_last_event_id_without_client_id_resumes_its_client_only_for_its_owner() {
        let resumed = Plan::Named {
            id: cid("c1"),
            start: StartAt::After(7),
        };
        assert_eq!(plan(None, at("c1", 7), true), resumed);
        assert_eq!(
            plan(None, at("c1", 7), false),
            Plan::Fresh { reset: true },
            "not the caller's (another user's, or unknown): a new client, told so"
        );
        assert_eq!(
            plan(None, at("c1", 0), true),
            Plan::Named {
                id: cid("c1"),
                start: StartAt::Retained
            },
            "no frame seen yet: everything retained"
        );
        assert_eq!(
            plan(None, Some(LastEventId::Bare(7)), true),
            Plan::Fresh { reset: true },
            "a bare number names no client"
        );
        assert_eq!(plan(None, None, false), Plan::Fresh { reset: false });
    }

    #[test]
    fn a_named_client_starts_after_its_own_position_only() {
        let named = |last| plan(Some(cid("c1")), last, false);
        assert_eq!(
            named(at("c1", 9)),
            Plan::Named {
                id: cid("c1"),
                start: StartAt::After(9)
            }
        );
        assert_eq!(
            named(Some(LastEventId::Bare(9))),
            Plan::Named {
                id: cid("c1"),
                start: StartAt::After(9)
            },
            "the old bare form, with client_id, as before"
        );
        for other in [at("c2", 9), at("c1", 0), None] {
            assert_eq!(
                named(other.clone()),
                Plan::Named {
                    id: cid("c1"),
                    start: StartAt::Retained
                },
                "{other:?}"
            );
        }
    }

    #[test]
    fn the_init_frame_id_is_where_a_reconnect_must_start_again() {
        let c = cid("c1");
        assert_eq!(init_event_id(&c, StartAt::After(5), false), "c1.5");
        assert_eq!(init_event_id(&c, StartAt::After(5), true), "c1.0");
        assert_eq!(init_event_id(&c, StartAt::Retained, false), "c1.0");
        // What the init frame says is read back as the same start.
        for (requested, reset) in [(StartAt::After(5), false), (StartAt::Retained, false)] {
            let back = EventId::parse(&init_event_id(&c, requested, reset));
            assert_eq!(start_for(&c, back.as_ref()), requested);
        }
    }
}

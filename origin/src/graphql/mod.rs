//! GraphQL (PROTOCOL.md §2): `POST /graphql` (session required), GraphiQL at
//! `GET /graphql`, and subscriptions over WebSocket at `GET /graphql/ws`.
//!
//! The HTTP shell is ours rather than the integration crate's extractor, so the protocol's
//! rules hold before GraphQL runs: no session → 401 JSON, body over 2 MiB → 413, wrong
//! content type → 415, malformed JSON → 400, a batch (JSON array) → 400 unless
//! `GRAPHQL_BATCH=true`. Inside, the schema has depth and complexity limits, [`cost`]
//! bounds root fields, aliases, `executePlaybook` and NoETL fan-out per operation and rates
//! mutations per user (a rate refusal is answered 429 with `Retry-After`), and
//! introspection can be switched off (`GRAPHQL_INTROSPECTION=false`).
//!
//! The old gateway's `proxyRequest` mutation is deliberately absent: it let any caller make
//! the gateway fetch arbitrary URLs.
//!
//! ## `/graphql/ws`
//! Both subprotocols — `graphql-transport-ws` (graphql-ws ≥ 5, preferred when both are
//! offered) and the legacy `graphql-ws` (subscriptions-transport-ws) — are spoken by
//! async-graphql's `http::WebSocket`. This shell drives it itself instead of using
//! async-graphql-axum's `GraphQLWebSocket`, because the close codes and timers are ours:
//! - Auth happens at `connection_init`: the payload's `session_token` or
//!   `authorization: "Bearer …"` (also under `headers`), else the upgrade request's
//!   `Authorization` header or `?session_token=` — never the cookie, which a browser would
//!   attach to a cross-site upgrade (CORS does not cover WebSockets). A payload that names a token decides; a malformed one is
//!   refused, never replaced by a cookie. A refused session closes the socket with
//!   `4403 Forbidden` (legacy: a `connection_error` message, then 4403); a session service
//!   that cannot answer closes it with 1011, which clients retry.
//! - No `connection_init` within [`INIT_TIMEOUT`] → 4408; a `subscribe` before the ack →
//!   4401; a message that is not protocol JSON → 4400.
//! - An accepted `connection_init` takes one of the user's realtime slots for the socket's
//!   life (`quotas.rs`: `USER_MAX_STREAMS`, shared with SSE streams, and
//!   `STREAM_OPEN_RATE_LIMIT`); over either the socket closes with `4429` (graphql-ws's
//!   "too many" code, which its client does not retry on its own).
//! - The socket closes with 4403 when its session is revoked (a logout on any replica, told
//!   by the revocation set within its propagation time, no polling) or expires, and with
//!   1001 on shutdown, spread over the drain like SSE streams;
//!   WebSocket pings every `SSE_KEEPALIVE_INTERVAL` keep proxies from idling it out, and a
//!   peer that stops reading is dropped after [`WRITE_TIMEOUT`].
//! - Messages are at most [`MAX_BODY`], like HTTP bodies; the schema's depth and
//!   complexity limits and [`cost`]'s per-operation caps and per-user rates apply to each
//!   `subscribe` message, and a socket runs at most
//!   [`subscription::MAX_OPERATIONS_PER_SOCKET`] operations at once.
//! - The upgrade itself answers JSON errors like every route: 400 if the request is not a
//!   WebSocket upgrade or offers neither subprotocol.

pub mod cost;
pub mod schema;
pub mod subscription;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_graphql::http::{WebSocketProtocols, WsMessage};
use async_graphql::Data;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::FromRequestParts;
use axum::http::HeaderValue;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tracing::Instrument;

use axum::extract::{FromRef, Request, State};
use axum::http::StatusCode;
use axum::response::{Html, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

pub use schema::{build_schema, BatchMode, GatewaySchema};

use crate::auth::caller::{socket_init_token, socket_upgrade_token};
use crate::auth::revocations::SessionEnd;
use crate::auth::session::{now_unix, until_unix, SessionService};
use crate::auth::Caller;
use crate::error::{json_response, AppError};
use crate::extract::{is_json_content_type, parse_json, read_body_limited};
use subscription::SocketScope;

/// Largest GraphQL request body, and largest WebSocket message.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// How long a new socket may take to send `connection_init` (graphql-transport-ws: 4408).
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one write to a socket may take before the peer is considered gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// Completes at this socket's own instant of the drain: a random point within `spread`
/// after `shutdown`, so a replica's sockets do not all reconnect elsewhere at once.
async fn drained(shutdown: &CancellationToken, spread: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(crate::events::drain_after(spread)).await;
}

/// What the GraphQL routes need, and nothing else.
#[derive(Clone, FromRef)]
pub struct GraphqlState {
    /// The schema (its resolvers hold their own services).
    pub schema: GatewaySchema,
    /// Who is calling (HTTP) and `connection_init` (WebSocket).
    pub sessions: Arc<SessionService>,
    /// Cancelled when the listeners close (after SIGTERM's drain delay): each socket
    /// closes with 1001 at a random instant within `drain_spread`, like SSE streams.
    pub shutdown: CancellationToken,
    /// Over how long sockets close at shutdown (`events::drain_spread` of the grace).
    pub drain_spread: Duration,
    /// WebSocket ping interval (`SSE_KEEPALIVE_INTERVAL`).
    pub keepalive: KeepAlive,
    /// Per-user realtime slots and open rate, shared with `/events`.
    pub quotas: crate::quotas::RealtimeQuotas,
}

/// How often an idle WebSocket is pinged.
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive(pub Duration);

/// The GraphQL routes (public listener).
pub fn router() -> Router<GraphqlState> {
    Router::new()
        .route("/graphql", get(graphiql).post(graphql))
        .route("/graphql/ws", get(graphql_ws))
}

async fn graphiql() -> Html<String> {
    Html(
        async_graphql::http::GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .finish(),
    )
}

async fn graphql(
    State(state): State<GraphqlState>,
    caller: Caller,
    req: Request,
) -> Result<Response, AppError> {
    let (parts, body) = req.into_parts();
    if !is_json_content_type(&parts.headers) {
        return Err(AppError::UnsupportedMediaType);
    }
    let bytes = read_body_limited(body, MAX_BODY).await?;
    if is_batch(&bytes) {
        return graphql_batch(&state, caller, &bytes).await;
    }
    let request: async_graphql::Request = parse_json(&bytes)?;
    let response = state.schema.execute(request.data(caller)).await;
    Ok(graphql_response(&response))
}

/// A response as HTTP: 429 with `Retry-After` when a rate limit refused the request
/// (the body stays a GraphQL response), else 200.
fn graphql_response(response: &async_graphql::Response) -> Response {
    match cost::retry_after_of(response) {
        Some(wait) => {
            let mut r = json_response(StatusCode::TOO_MANY_REQUESTS, response);
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(wait.secs()),
            );
            r
        }
        None => json_response(StatusCode::OK, response),
    }
}

/// Whether a body is a batch: a JSON array.
fn is_batch(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// A batch (`GRAPHQL_BATCH=true`; else 400 `batch_not_enabled`): the cost limits hold for
/// the batch as a whole, checked for every request before any runs; then the requests
/// run, each through the same per-operation checks and rates as a single request.
async fn graphql_batch(
    state: &GraphqlState,
    caller: Caller,
    bytes: &[u8],
) -> Result<Response, AppError> {
    let enabled = state.schema.data::<BatchMode>().is_some_and(|b| b.0);
    if !enabled {
        return Err(AppError::bad_request(
            "batch_not_enabled",
            "batched GraphQL requests (a JSON array) are not accepted; send one operation per request",
        ));
    }
    let mut requests: Vec<async_graphql::Request> = parse_json(bytes)?;
    if requests.is_empty() {
        return Err(AppError::bad_request(
            "empty_batch",
            "a batch needs at least one request",
        ));
    }
    if let Some(policy) = state.schema.data::<Arc<cost::CostPolicy>>() {
        let mut total = cost::Cost::default();
        for request in &mut requests {
            let operation = request.operation_name.clone();
            // Unparsable, uncountable or unselected: the request's own run reports it.
            if let Ok(doc) = request.parsed_query() {
                if let Ok(c) = cost::operation_cost(doc, operation.as_deref()) {
                    total.add(&c);
                }
            }
        }
        if let Err(e) = cost::check_cost(&total, &policy.limits) {
            let refused: Vec<async_graphql::Response> = requests
                .iter()
                .map(|_| async_graphql::Response::from_errors(vec![e.clone()]))
                .collect();
            return Ok(json_response(StatusCode::OK, &refused));
        }
    }
    let batch = async_graphql::BatchRequest::Batch(requests).data(caller);
    let response = state.schema.execute_batch(batch).await;
    Ok(json_response(StatusCode::OK, &response))
}

/// `GET /graphql/ws`: checks the upgrade and the subprotocol (JSON errors, before any
/// socket exists), then hands the socket to [`serve_socket`]. Auth waits for
/// `connection_init`, whose payload may carry the token.
async fn graphql_ws(State(state): State<GraphqlState>, req: Request) -> Result<Response, AppError> {
    let (mut parts, _) = req.into_parts();
    let mut upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &state)
        .await
        .map_err(|_| {
            AppError::bad_request(
                "websocket_required",
                "/graphql/ws is a WebSocket endpoint (graphql-transport-ws or graphql-ws)",
            )
        })?;
    let protocol = select_protocol(
        upgrade
            .requested_protocols()
            .filter_map(|p| p.to_str().ok()),
    )
    .ok_or_else(|| {
        AppError::bad_request(
            "unsupported_subprotocol",
            "Sec-WebSocket-Protocol must offer graphql-transport-ws or graphql-ws",
        )
    })?;
    upgrade.set_selected_protocol(HeaderValue::from_static(protocol.sec_websocket_protocol()));
    // Not the cookie: browsers send cookies on cross-site WebSocket upgrades and CORS
    // does not apply to WebSockets, so a cookie would let any site open a socket as the
    // user (cross-site WebSocket hijacking). Header and query tokens are set by the app.
    let upgrade_token = socket_upgrade_token(&parts);
    // The socket outlives the request; its log lines keep the request's span (path, id).
    let span = tracing::Span::current();
    Ok(upgrade
        .max_message_size(MAX_BODY)
        .max_frame_size(MAX_BODY)
        .on_upgrade(move |socket| {
            serve_socket(state, socket, protocol, upgrade_token).instrument(span)
        }))
}

/// The subprotocol to speak: `graphql-transport-ws` if offered, else the legacy
/// `graphql-ws`, else none (the upgrade is refused).
fn select_protocol<'a>(requested: impl IntoIterator<Item = &'a str>) -> Option<WebSocketProtocols> {
    let offered: Vec<WebSocketProtocols> = requested
        .into_iter()
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    [
        WebSocketProtocols::GraphQLWS,
        WebSocketProtocols::SubscriptionsTransportWS,
    ]
    .into_iter()
    .find(|p| offered.contains(p))
}

/// A close frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Close {
    code: u16,
    reason: String,
}

impl Close {
    fn new(code: u16, reason: &str) -> Self {
        Self {
            code,
            reason: truncate_reason(reason),
        }
    }
}

/// Close reasons are at most 123 bytes (RFC 6455 §5.5); cut on a character boundary.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// How `connection_init` ended, shared between the init callback and the socket loop.
#[derive(Debug, Clone, PartialEq, Eq)]
enum InitOutcome {
    /// Acknowledged; the socket lives until the session's expiry at the latest.
    Accepted {
        /// The session's expiry (seconds since the epoch).
        expires_at_unix: i64,
    },
    /// Refused: the socket closes with this.
    Refused(Close),
}

impl InitOutcome {
    /// The refusal for a failed session check: 4403 when the session is the problem,
    /// 1011 (retried by clients) when the session service could not answer.
    fn refused(e: &AppError) -> Self {
        match e.status().as_u16() {
            401 | 403 => Self::Refused(Close::new(4403, "Forbidden")),
            _ => Self::Refused(Close::new(1011, "session service unavailable, retry")),
        }
    }
}

/// The close frame for a close async-graphql asked for, in the graphql-transport-ws codes:
/// a refused init keeps its refusal (the library says 1002), an operation before the ack is
/// 4401 (the library says 1011), an unparsable message 4400 (the library says 1002).
fn close_for(code: u16, reason: &str, init: Option<&InitOutcome>) -> Close {
    match (init, code) {
        (Some(InitOutcome::Refused(close)), _) => close.clone(),
        (None, 1011) => Close::new(4401, "Unauthorized"),
        (_, 1002) => Close::new(4400, reason),
        _ => Close::new(code, reason),
    }
}

/// Sends one message, bounded by [`WRITE_TIMEOUT`]; false if the peer is gone or stuck.
async fn send(sink: &mut SplitSink<WebSocket, Message>, message: Message) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await,
        Ok(Ok(()))
    )
}

/// Sleeps until the session behind an accepted socket expires; forever before that.
async fn session_expiry(init: Option<&InitOutcome>) {
    match init {
        Some(InitOutcome::Accepted { expires_at_unix }) => {
            tokio::time::sleep(until_unix(*expires_at_unix)).await
        }
        _ => std::future::pending().await,
    }
}

/// Completes when the session behind an accepted socket is revoked; never before that.
async fn session_revoked(end: Option<&SessionEnd>) {
    match end {
        Some(end) => end.revoked().await,
        None => std::future::pending().await,
    }
}

/// One socket: async-graphql speaks the protocol; this loop authenticates at
/// `connection_init`, enforces the timers and maps close codes (see the module docs).
/// Dropping the protocol stream at the end drops every operation with it.
async fn serve_socket(
    state: GraphqlState,
    socket: WebSocket,
    protocol: WebSocketProtocols,
    upgrade_token: Option<String>,
) {
    let (mut sink, incoming) = socket.split();
    let input = incoming
        .take_while(|m| std::future::ready(m.is_ok()))
        .filter_map(|m| {
            std::future::ready(match m {
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => Some(m.into_data()),
                _ => None,
            })
        });
    let outcome: Arc<OnceLock<InitOutcome>> = Arc::default();
    let session_end: Arc<OnceLock<SessionEnd>> = Arc::default();
    // The user's slot, held until this function returns.
    let slot: Arc<OnceLock<crate::quotas::StreamSlot>> = Arc::default();
    let on_init = {
        let (state, outcome, session_end) = (state.clone(), outcome.clone(), session_end.clone());
        let slot = slot.clone();
        move |payload: Value| async move {
            let token = socket_init_token(&payload, upgrade_token);
            match Caller::from_token(&state.sessions, token).await {
                Ok(caller) => {
                    match state.quotas.admit(&caller.user().user_id, false) {
                        Ok(held) => {
                            let _ = slot.set(held);
                        }
                        Err(refused) => {
                            tracing::info!(user = %caller.user().user_id, ?refused, "graphql-ws connection refused: user quota");
                            let close = Close::new(4429, &refused.close_reason());
                            let _ = outcome.set(InitOutcome::Refused(close));
                            return Err(async_graphql::Error::new(refused.close_reason()));
                        }
                    }
                    tracing::info!(user = %caller.user().user_id, "graphql-ws connection accepted");
                    let end = state
                        .sessions
                        .revocations()
                        .session_end(&caller.session, now_unix());
                    let _ = session_end.set(end);
                    let _ = outcome.set(InitOutcome::Accepted {
                        expires_at_unix: caller.record.expires_at_unix,
                    });
                    let mut data = Data::default();
                    data.insert(caller);
                    data.insert(Arc::new(SocketScope::default()));
                    data.insert(state.quotas.clone());
                    Ok(data)
                }
                Err(e) => {
                    tracing::info!(reason = e.code(), "graphql-ws connection refused");
                    let _ = outcome.set(InitOutcome::refused(&e));
                    Err(async_graphql::Error::new(e.body().error.message))
                }
            }
        }
    };
    let protocol_stream =
        async_graphql::http::WebSocket::new(state.schema.clone(), input, protocol)
            .on_connection_init(on_init);
    let mut protocol_stream = std::pin::pin!(protocol_stream);
    let init_deadline = tokio::time::sleep(INIT_TIMEOUT);
    let mut init_deadline = std::pin::pin!(init_deadline);
    let every = state.keepalive.0.max(Duration::from_secs(1));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);

    // Pinned once: its random instant is drawn once per socket.
    let drain = drained(&state.shutdown, state.drain_spread);
    let mut drain = std::pin::pin!(drain);
    let close = loop {
        let init = outcome.get();
        tokio::select! {
            () = &mut drain => break Some(Close::new(1001, "server shutting down")),
            () = &mut init_deadline, if init.is_none() => {
                break Some(Close::new(4408, "Connection initialisation timeout"));
            }
            () = session_expiry(init) => break Some(Close::new(4403, "Forbidden: session expired")),
            () = session_revoked(session_end.get()) => break Some(Close::new(4403, "Forbidden: session ended")),
            _ = keepalive.tick() => {
                if !send(&mut sink, Message::Ping(Default::default())).await {
                    break None;
                }
            }
            message = protocol_stream.next() => match message {
                Some(WsMessage::Text(text)) => {
                    if !send(&mut sink, Message::Text(text.into())).await {
                        break None;
                    }
                }
                Some(WsMessage::Close(code, reason)) => break Some(close_for(code, &reason, outcome.get())),
                // The client left, or (legacy protocol) was sent `connection_error`.
                None => match outcome.get() {
                    Some(InitOutcome::Refused(close)) => break Some(close.clone()),
                    _ => break Some(Close::new(1000, "")),
                },
            },
        }
    };
    if let Some(close) = &close {
        let frame = CloseFrame {
            code: close.code,
            reason: close.reason.as_str().into(),
        };
        let _ = send(&mut sink, Message::Close(Some(frame))).await;
    }
    tracing::info!(
        close = close.as_ref().map(|c| c.code),
        "graphql-ws connection closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_modern_subprotocol_is_preferred_and_one_is_required() {
        let p = |offered: &[&str]| select_protocol(offered.iter().copied());
        assert_eq!(
            p(&["graphql-ws", "graphql-transport-ws"]),
            Some(WebSocketProtocols::GraphQLWS)
        );
        assert_eq!(
            p(&["graphql-ws"]),
            Some(WebSocketProtocols::SubscriptionsTransportWS)
        );
        assert_eq!(p(&["soap", "wamp"]), None);
        assert_eq!(p(&[]), None);
    }

    #[test]
    fn close_codes_follow_graphql_transport_ws() {
        let refused = InitOutcome::Refused(Close::new(4403, "Forbidden"));
        assert_eq!(close_for(1002, "x", Some(&refused)).code, 4403);
        assert_eq!(
            close_for(1011, "The handshake is not completed.", None).code,
            4401
        );
        assert_eq!(close_for(1002, "expected value", None).code, 4400);
        assert_eq!(close_for(4429, "Too many", None).code, 4429);
        let accepted = InitOutcome::Accepted { expires_at_unix: 0 };
        assert_eq!(close_for(4429, "Too many", Some(&accepted)).code, 4429);
    }

    #[test]
    fn refusals_say_whether_to_retry() {
        let denied = AppError::unauthorized("invalid_session", "no");
        assert_eq!(
            InitOutcome::refused(&denied),
            InitOutcome::Refused(Close::new(4403, "Forbidden"))
        );
        let down = AppError::Unavailable {
            code: "x",
            message: "y".into(),
        };
        assert!(matches!(
            InitOutcome::refused(&down),
            InitOutcome::Refused(Close { code: 1011, .. })
        ));
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        assert_eq!(truncate_reason(&"é".repeat(100)).len(), 122);
        assert_eq!(truncate_reason("short"), "short");
    }
}

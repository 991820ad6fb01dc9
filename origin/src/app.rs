//! The request path, composed in one place: the two routers (public, internal) and the
//! middleware stack, each handler module's router over its own substate of [`AppState`].
//!
//! Order of the public stack, outermost first: request id (accept a sane client id or
//! mint one, echo it back) → trace span (method, path without query: the query may carry
//! a session token) → client address (`ratelimit::ClientIp`, through trusted proxies) → edge assertion (verify `x-gateway-assertion`, or refuse direct
//! traffic when `REQUIRE_EDGE_ASSERTION`) → routes. Unknown routes are 404 and wrong methods 405, both JSON.

use axum::extract::{FromRef, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use gateway_shared::headers::accept_client_request_id;
use tower_http::trace::TraceLayer;

use crate::auth::edge::{verify_assertion, EdgeTrust};
use crate::error::AppError;
use crate::ratelimit::resolve_client_ip;
use crate::state::AppState;
use crate::{auth, callbacks, events, graphql, health, metrics, proxy};

/// The public listener's routes: auth, GraphQL, SSE, `/noetl/*`, health. Layers, outermost
/// last: request id → trace span → client address → edge assertion → routes.
pub fn public_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route(
            "/ready",
            get(health::ready).with_state(state.readiness.clone()),
        )
        .merge(auth::routes::router().with_state(FromRef::from_ref(&state)))
        .merge(graphql::router().with_state(FromRef::from_ref(&state)))
        .merge(events::router().with_state(FromRef::from_ref(&state)))
        .merge(proxy::router().with_state(FromRef::from_ref(&state)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            EdgeTrust::from_ref(&state),
            verify_assertion,
        ))
        .layer(middleware::from_fn_with_state(
            state.trusted_proxies.clone(),
            resolve_client_ip,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(make_span))
        .layer(middleware::from_fn(request_id))
}

/// The internal listener's routes (in-cluster only): playbook callbacks, metrics, health.
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route(
            "/ready",
            get(health::ready).with_state(state.readiness.clone()),
        )
        .route(
            "/metrics",
            get(metrics::metrics).with_state(state.metrics.clone()),
        )
        .merge(callbacks::router().with_state(state.callbacks.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(TraceLayer::new_for_http().make_span_with(make_span))
        .layer(middleware::from_fn(request_id))
}

async fn not_found() -> AppError {
    AppError::NotFound("no such route".into())
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// A span per request with the method and the path only: query strings can carry
/// `session_token` (EventSource compat) and must never reach a log line.
fn make_span(req: &Request) -> tracing::Span {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id)
}

/// Keeps a well-formed client `x-request-id` (for end-to-end correlation; the shared rule
/// the edge applies too) or mints a UUID, and echoes it on the response.
async fn request_id(mut req: Request, next: Next) -> Response {
    let supplied = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| accept_client_request_id(v))
        .map(str::to_owned);
    let id = supplied.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value =
        HeaderValue::from_str(&id).expect("request ids are checked or minted as visible ASCII");
    req.headers_mut().insert("x-request-id", value.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert("x-request-id", value);
    resp
}

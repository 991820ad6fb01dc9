//! The request path, composed in one place: the two routers (public, internal), the
//! middleware stack and the shared application state.
//!
//! Order of the public stack, outermost first: request id (accept a sane client id or
//! mint one, echo it back) → trace span (method, path without query: the query may carry
//! a session token) → edge assertion (verify `x-gateway-assertion`, or refuse direct
//! traffic when `REQUIRE_EDGE_ASSERTION`) → routes. Unknown routes are 404 and wrong methods 405, both JSON.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::auth::session::SessionService;
use crate::bus::Bus;
use crate::config::Config;
use crate::error::AppError;
use crate::events::hub::Hub;
use crate::graphql::GatewaySchema;
use crate::health;
use crate::noetl::NoetlClient;
use crate::proxy::Proxy;
use crate::requests::CallbackTokens;
use crate::store::KvStore;

/// Everything a handler may need; cheap to clone (all shared behind `Arc`s).
#[derive(Clone)]
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Shared state (NATS K/V or the embedded store).
    pub kv: Arc<dyn KvStore>,
    /// The NoETL client.
    pub noetl: NoetlClient,
    /// Login, validation, access checks, logout.
    pub sessions: Arc<SessionService>,
    /// The `/noetl/*` proxy.
    pub proxy: Arc<Proxy>,
    /// The NATS connection, when configured (for readiness).
    pub nats: Option<async_nats::Client>,
    /// Client delivery (frames, replay).
    pub bus: Arc<dyn Bus>,
    /// This replica's open SSE streams.
    pub hub: Arc<Hub>,
    /// Per-request callback tokens.
    pub callback_tokens: CallbackTokens,
    /// The GraphQL schema.
    pub graphql: GatewaySchema,
    /// Cancelled on SIGTERM: SSE streams end so clients reconnect elsewhere.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The edge's key and whether its assertion is required.
    pub edge_trust: crate::edge::EdgeTrust,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The public listener's routes: auth, GraphQL, SSE, `/noetl/*`, health.
pub fn public_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .merge(crate::auth::routes::router())
        .merge(crate::graphql::router())
        .merge(crate::events::router())
        .merge(crate::proxy::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::edge::verify_assertion,
        ))
        .with_state(state)
        .layer(TraceLayer::new_for_http().make_span_with(make_span))
        .layer(middleware::from_fn(request_id))
}

/// The internal listener's routes (in-cluster only): playbook callbacks, health.
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(crate::metrics::metrics))
        .merge(crate::callbacks::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
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

/// Longest client-supplied request id kept; longer or odd ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Keeps a well-formed client `x-request-id` (for end-to-end correlation) or mints a
/// UUID, and echoes it on the response.
async fn request_id(mut req: Request, next: Next) -> Response {
    let supplied = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned);
    let id = supplied.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value =
        HeaderValue::from_str(&id).expect("request ids are checked or minted as visible ASCII");
    req.headers_mut().insert("x-request-id", value.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert("x-request-id", value);
    resp
}

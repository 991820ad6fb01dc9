//! The request path, composed in one place: the two routers (public, internal) and the
//! middleware stack, each handler module's router over its own substate of [`AppState`].
//!
//! Around the routes, one layer (`front`; a layer costs every request a boxed service
//! clone and a boxed future, so the steps share one), in order: the request id (accept a
//! sane client id or mint one, echo it back) → observation (`observe`: trace context, HTTP
//! metrics, access log) → the trace span (method, path without query: the query may carry
//! a session token) → on the public listener, the client address (`ratelimit::ClientIp`,
//! through trusted proxies) and the edge assertion (verify `x-gateway-assertion`, or refuse
//! direct traffic when `REQUIRE_EDGE_ASSERTION`) → routes; on the way out, `connection:
//! close` while draining (see `server`'s shutdown order). Unknown routes are 404 and wrong
//! methods 405, both JSON.
//!
//! Request limits, per route group (`REQUEST_TIMEOUT`, `MAX_INFLIGHT_REQUESTS`):
//! - **Load shedding**: at most `max_inflight` requests per listener are being answered at
//!   once (until their response head); one more is answered 503 `overloaded` with
//!   `Retry-After` at once, never queued. `/health` and `/ready` are outside it, so probes
//!   answer under any load.
//! - **Request timeout**: a request whose response head is not ready within
//!   `request_timeout` is answered 504 `request_timeout` (the handler is dropped). Only
//!   the head is timed: an SSE stream, an upgraded `/graphql/ws` socket or a proxied body
//!   runs past it. `/noetl/*` has its own (`PROXY_TIMEOUT`, `PROXY_IDLE_TIMEOUT`).
//! - **A declared body over the route's limit** (`Content-Length`) is answered 413 before
//!   the caller is looked up or a byte of the body is read: GraphQL `graphql::MAX_BODY`,
//!   auth `AUTH_BODY_LIMIT`, callbacks `CALLBACK_BODY_LIMIT`, `/noetl/*` `PROXY_MAX_BODY`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{FromRef, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{BoxError, Router};
use gateway_shared::headers::accept_client_request_id;
use tokio::sync::Semaphore;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;
use tracing::Instrument;

use crate::auth::edge::EdgeTrust;
use crate::error::AppError;
use crate::observe::{observe, Listener};
use crate::ratelimit::{note_client_ip, TrustedProxies};
use crate::state::AppState;
use crate::{auth, callbacks, events, graphql, health, metrics, proxy, questions, service_events};

/// The public listener's routes: auth, GraphQL, SSE, `/noetl/*`, health, behind
/// `front` (request id → observation → trace span → client address → edge assertion;
/// draining).
pub fn public_router(state: AppState) -> Router {
    let listener = Listener("public");
    let inflight = Arc::new(Semaphore::new(state.limits.max_inflight));
    let timeout = Some(state.limits.request_timeout);
    let auth = auth::routes::router()
        .with_state(FromRef::from_ref(&state))
        .route_layer(middleware::from_fn_with_state(
            DeclaredLimit(state.auth.body_limit.0),
            refuse_declared_over,
        ));
    let graphql = graphql::router()
        .with_state(FromRef::from_ref(&state))
        .route_layer(middleware::from_fn_with_state(
            DeclaredLimit(graphql::MAX_BODY),
            refuse_declared_over,
        ));
    let finite = Router::new()
        .merge(auth)
        .merge(graphql)
        .merge(events::router().with_state(FromRef::from_ref(&state)))
        .merge(
            questions::public_router()
                .with_state(state.questions.clone())
                .route_layer(middleware::from_fn_with_state(
                    DeclaredLimit(questions::ANSWER_BODY_LIMIT),
                    refuse_declared_over,
                )),
        );
    let proxy = proxy::router()
        .with_state(FromRef::from_ref(&state))
        .route_layer(middleware::from_fn_with_state(
            DeclaredLimit(usize::try_from(state.proxy.proxy.max_body()).unwrap_or(usize::MAX)),
            refuse_declared_over,
        ));
    Router::new()
        .route("/health", get(health::health))
        .route(
            "/ready",
            get(health::ready).with_state(state.readiness.clone()),
        )
        .merge(limited(finite, inflight.clone(), timeout, listener))
        .merge(limited(proxy, inflight, None, listener))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Front {
                listener,
                draining: state.readiness.draining.clone(),
                admission: Some(Admission {
                    trusted: state.trusted_proxies.clone(),
                    edge: EdgeTrust::from_ref(&state),
                }),
            },
            front,
        ))
}

/// The internal listener's routes (in-cluster only): playbook callbacks, metrics, health.
pub fn internal_router(state: AppState) -> Router {
    let listener = Listener("internal");
    let inflight = Arc::new(Semaphore::new(state.limits.max_inflight));
    let finite = Router::new()
        .route(
            "/metrics",
            get(metrics::metrics).with_state(state.metrics.clone()),
        )
        .merge(
            callbacks::router()
                .with_state(state.callbacks.clone())
                .route_layer(middleware::from_fn_with_state(
                    DeclaredLimit(state.callbacks.body_limit.0),
                    refuse_declared_over,
                )),
        )
        .merge(
            service_events::router()
                .with_state(state.service_events.clone())
                .merge(questions::internal_router().with_state(state.questions.clone()))
                .route_layer(middleware::from_fn_with_state(
                    DeclaredLimit(state.service_events.body_limit.0),
                    refuse_declared_over,
                )),
        );
    Router::new()
        .route("/health", get(health::health))
        .route(
            "/ready",
            get(health::ready).with_state(state.readiness.clone()),
        )
        .merge(limited(
            finite,
            inflight,
            Some(state.limits.request_timeout),
            listener,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Front {
                listener,
                draining: state.readiness.draining.clone(),
                admission: None,
            },
            front,
        ))
}

/// Everything around the routes, as one layer for both listeners: a layer costs every
/// request a clone of the boxed inner service, a boxed future and moves of the request,
/// so the steps share one. In order:
/// 1. **the request id**: a well-formed client `x-request-id` is kept (for end-to-end
///    correlation; the shared rule the edge applies too), else a UUID is minted; it is set
///    on the request for everything inside and echoed on the response;
/// 2. **observation** (`observe`: trace context, HTTP metrics, access line) around
/// 3. **the request's span** (method, path without query, request id: [`make_span`])
///    around, on the public listener, **the client address** (`ratelimit::ClientIp`,
///    through trusted proxies) and **the edge assertion** (`auth::edge::admit`: verified
///    into the caller, or refused 401), then the routes;
/// 4. **while the replica drains** (after SIGTERM, before its listeners close), every
///    response says `connection: close`: a kept-alive client (the load balancer's pool, a
///    CLI) opens its next connection to a replica that stays, instead of finding this one
///    gone. An upgrade's `101` keeps its `connection: upgrade`.
async fn front(State(front): State<Front>, mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    req.headers_mut().insert("x-request-id", id.clone());
    let Front {
        listener,
        draining,
        admission,
    } = front;
    let request_id = id.to_str().unwrap_or_default();
    let mut res = observe(listener, request_id, req, |mut req| async move {
        // Made once polled, inside observation's exported span: its parent.
        let span = make_span(&req, request_id);
        async move {
            if let Some(admission) = admission {
                note_client_ip(&admission.trusted, &mut req);
                if let Err(refused) = auth::edge::admit(&admission.edge, &mut req) {
                    return refused.into_response();
                }
            }
            next.run(req).await
        }
        .instrument(span)
        .await
    })
    .await;
    res.headers_mut().insert("x-request-id", id);
    if draining.load(Ordering::Relaxed)
        && res.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS
    {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// What [`front`] needs: the listener (its metrics label), the replica's draining flag
/// (`health::Readiness::draining`, not the whole `Readiness`: the layer clones this per
/// request), and on the public listener what admits a request.
#[derive(Clone)]
struct Front {
    listener: Listener,
    draining: Arc<AtomicBool>,
    admission: Option<Admission>,
}

/// The client's well-formed `x-request-id`, else a minted UUID (v4, from the thread's
/// generator: no system call per request).
fn request_id(req: &Request) -> HeaderValue {
    if let Some(v) = req.headers().get("x-request-id") {
        if v.to_str().is_ok_and(accept_client_request_id) {
            return v.clone();
        }
    }
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .expect("a UUID is a valid header value")
}

/// What admits a request on the public listener: whose address it is, and the edge's key.
#[derive(Clone)]
struct Admission {
    trusted: TrustedProxies,
    edge: EdgeTrust,
}

/// `routes` with load shedding over `inflight` (shared by a listener's route groups) and,
/// when given, the request timeout; their errors answered as JSON by [`limit_error`] (a
/// shed request counted in `gateway_connections_refused_total{reason="overloaded"}`).
fn limited(
    routes: Router,
    inflight: Arc<Semaphore>,
    timeout: Option<Duration>,
    listener: Listener,
) -> Router {
    let on_error = move |err: BoxError| async move {
        let e = limit_error(&err, timeout);
        if matches!(e, AppError::Overloaded) {
            crate::metrics::global().refused(listener.0, "overloaded");
        }
        e
    };
    let shed = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(on_error))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(inflight));
    match timeout {
        Some(t) => routes.layer(shed.layer(TimeoutLayer::new(t))),
        None => routes.layer(shed),
    }
}

/// The JSON answer to a request the limit layers refused.
fn limit_error(err: &BoxError, timeout: Option<Duration>) -> AppError {
    if err.is::<tower::load_shed::error::Overloaded>() {
        AppError::Overloaded
    } else if err.is::<tower::timeout::error::Elapsed>() {
        AppError::RequestTimeout(timeout.unwrap_or_default())
    } else {
        AppError::Internal(format!("request limit layer failed: {err}"))
    }
}

/// The largest body a route group declares acceptable (state of [`refuse_declared_over`]).
#[derive(Debug, Clone, Copy)]
struct DeclaredLimit(usize);

/// Answers 413 to a request whose declared `Content-Length` is over the group's limit,
/// before the handler (and so the caller lookup and the body read) runs.
async fn refuse_declared_over(
    State(DeclaredLimit(limit)): State<DeclaredLimit>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let mut resp = AppError::PayloadTooLarge {
            limit: limit as u64,
        }
        .into_response();
        // The body was not read: the connection cannot carry another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
}

async fn not_found() -> AppError {
    AppError::NotFound("no such route".into())
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// A span per request with the method and the path only: query strings can carry
/// `session_token` (EventSource compat) and must never reach a log line. It covers the
/// handler, not the response body: wrapping the body (as tower-http's `TraceLayer` did)
/// boxed ~120 bytes more for every open SSE stream and did work on every proxied chunk,
/// for debug events nobody enabled; the access line (`observe`) has the status and the
/// duration.
fn make_span(req: &Request, request_id: &str) -> tracing::Span {
    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// `/slow` waits until `release` is notified (or 10 s); `/fast` answers at once.
    fn routes(release: Arc<tokio::sync::Notify>) -> Router {
        Router::new()
            .route(
                "/slow",
                get(move || {
                    let release = release.clone();
                    async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), release.notified()).await;
                        "slow"
                    }
                }),
            )
            .route("/fast", get(|| async { "fast" }))
    }

    async fn call(app: &Router, path: &str) -> (StatusCode, Option<String>, serde_json::Value) {
        let resp = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, retry, json)
    }

    #[tokio::test]
    async fn a_request_over_the_inflight_limit_is_shed_at_once_with_retry_after() {
        let release = Arc::new(tokio::sync::Notify::new());
        let app = limited(
            routes(release.clone()),
            Arc::new(Semaphore::new(1)),
            None,
            Listener("public"),
        );
        let busy = tokio::spawn({
            let app = app.clone();
            async move { call(&app, "/slow").await }
        });
        // Wait until the slow request holds the one permit.
        let shed = loop {
            let got = call(&app, "/fast").await;
            if got.0 == StatusCode::SERVICE_UNAVAILABLE {
                break got;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(shed.1.as_deref(), Some("1"));
        assert_eq!(shed.2["error"]["code"], "overloaded");
        release.notify_one();
        assert_eq!(busy.await.unwrap().0, StatusCode::OK);
        // The permit is back: served again.
        assert_eq!(call(&app, "/fast").await.0, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_not_answered_in_time_is_504_json() {
        let app = limited(
            routes(Arc::new(tokio::sync::Notify::new())),
            Arc::new(Semaphore::new(8)),
            Some(Duration::from_secs(2)),
            Listener("public"),
        );
        let (status, _, body) = call(&app, "/slow").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["error"]["code"], "request_timeout");
        assert_eq!(call(&app, "/fast").await.0, StatusCode::OK);
    }

    #[test]
    fn a_well_formed_client_request_id_is_kept_and_anything_else_is_replaced_by_a_uuid() {
        let with = |id: Option<&str>| {
            let mut req = Request::new(Body::empty());
            if let Some(id) = id {
                req.headers_mut()
                    .insert("x-request-id", HeaderValue::from_str(id).unwrap());
            }
            request_id(&req).to_str().unwrap().to_owned()
        };
        assert_eq!(with(Some("client-abc.1:2")), "client-abc.1:2");
        let minted: Vec<String> = [None, Some("has space"), Some(&"x".repeat(300))]
            .into_iter()
            .map(with)
            .collect();
        for id in &minted {
            let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 4, "{id}");
            assert_eq!(id, &uuid.hyphenated().to_string(), "lower-case, hyphenated");
        }
        assert_ne!(minted[0], minted[1], "each minted id is new");
    }
}

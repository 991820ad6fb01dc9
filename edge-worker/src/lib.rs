//! The edge worker: the Cloudflare Workers front door of the gateway (Rust → wasm32).
//!
//! This file is the fetch entry and nothing else: it composes the steps, in order, each
//! in its own module. Decisions come from `gateway_shared` (CORS, routes, sessions,
//! assertions); the modules here are platform glue around them plus small pure helpers
//! that are unit-tested on the host (`cargo test -p edge-worker`). Everything that
//! touches the Workers runtime is `#[cfg(target_arch = "wasm32")]`.
//!
//! A request flows through:
//! 0. [`boundary`] — the request's method, URL and headers are read from the runtime in
//!    one crossing; every step below reads them from that copy.
//! 1. [`ids`] — keep a well-formed client `x-request-id`, else mint one; continue the
//!    client's valid W3C `traceparent` with the edge's span, else start a trace (one
//!    random read for all of it).
//! 2. [`config`] — the isolate's configuration (read once, validated).
//! 3. [`cors`] — a preflight is answered here (204) and goes no further.
//! 4. route — `RouteTable::classify`: `/health` is answered by the edge ([`reply`]);
//!    denied routes (`/api/internal/*`, `/metrics`) are 404 at the edge.
//! 5. [`limits`] — a declared body (`Content-Length`) over the route's limit → 413 JSON
//!    before anything is forwarded.
//! 6. [`ratelimit`] — per client IP, and per session on session routes; 429 + `Retry-After`.
//! 7. [`session`] — session routes only: the isolate's own short-lived cache ([`l1`]),
//!    then Workers KV `SESSIONS`, else the origin's `/api/auth/validate`; invalid → 401
//!    at the edge. The result is a [`caller::Caller`]. Two session-route requests pass
//!    without a token as anonymous callers (still rate-limited per IP), because only the
//!    origin can authenticate them: `GET /events?ticket=` (and its alias
//!    `GET /api/v1/events/{client_id}?ticket=`) and a `/graphql/ws` upgrade (the token
//!    comes later, in `connection_init`).
//! 8. [`forward`] — to `ORIGIN_URL`, streaming both ways, identity headers stripped, the
//!    caller asserted in a signed `x-gateway-assertion` ([`sign`]: the runtime's WebCrypto
//!    Ed25519). A logout's body is read whole (bounded) and forwarded as bytes; on its
//!    204 every token it carried is forgotten at the edge (this isolate and KV). An origin
//!    401 that refuses the asserted session itself makes the edge forget that session.
//! 9. `reply::finish` — CORS headers, `Vary: Origin` and `x-request-id` on every response;
//!    then [`log`] writes the request's one JSON line (route entry, status, duration,
//!    outcome, trace id).
//!    Before it, a `GET /events` (or its alias `GET /api/v1/events/{client_id}`: one
//!    predicate, `gateway_shared::routes::is_event_stream`) whose answer is a passing
//!    failure (502, 503, 504 — the edge's own, or the origin's) becomes
//!    `reply::unavailable_stream`: a 200 event stream that says retry and ends, since a
//!    browser's EventSource gives up for good on an error status but reconnects by itself
//!    after a stream ends.
//!
//! Every refusal is an [`error::EdgeError`] and leaves as the protocol's JSON error body;
//! the whole request runs inside [`error::CatchPanic`], so even a panic leaves as 500
//! JSON, never as a runtime error page. Time comes from the runtime's clock in [`time`],
//! passed into every pure decision.

pub mod boundary;
pub mod caller;
pub mod config;
pub mod cors;
pub mod error;
pub mod forward;
pub mod ids;
pub mod l1;
pub mod limits;
pub mod log;
pub mod ratelimit;
pub mod reply;
pub mod session;
pub mod sign;
pub mod time;

#[cfg(target_arch = "wasm32")]
mod entry {
    use crate::boundary::{Head, RequestUrl};
    use crate::caller::Caller;
    use crate::config::{self, EdgeConfig};
    use crate::error::{CatchPanic, EdgeError};
    use crate::forward::{self, Forward};
    use crate::log::{self, Outcome as LogOutcome, RequestLog};
    use crate::ratelimit::{self, Limiter};
    use crate::{cors, ids, reply, session, time};
    use gateway_shared::cors::CorsPolicy;
    use gateway_shared::routes::RouteKind;
    use gateway_shared::session::SessionHash;
    use gateway_shared::trace::Origin;
    use worker::worker_sys::web_sys::{Request, Response};
    use worker::{event, Context, Env};

    // The runtime's Request and Response, not workers-rs' wrappers: the request's head is
    // read in one crossing and the response leaves as the one `reply::finish` builds
    // (`boundary` module docs).
    #[event(fetch)]
    async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
        // The request's arrival: its duration in the log, and the `now` of every decision
        // on its way (session expiry, the assertion's `iat`) — one clock read.
        let started = time::now_millis();
        let head = Head::of_request(&req);
        let ids = ids::request_ids(
            head.get("x-request-id"),
            head.get(gateway_shared::trace::HEADER),
        );
        let rid = ids.rid.as_str();
        let origin = head.get("origin");
        let method = head.first();
        let url = RequestUrl::split(head.url());
        let path = url.as_ref().map(|u| u.path()).unwrap_or("/");
        let mut route = (None, None);
        let (resp, cors_headers, outcome): (Response, Vec<(&'static str, String)>, _) =
            match config::load(&env) {
                Err(e) => {
                    let outcome = LogOutcome::Edge(e.code(), e.status());
                    (
                        e.into_response(rid).into(),
                        CorsPolicy::default().response_headers(origin),
                        outcome,
                    )
                }
                Ok(cfg) => {
                    let (kind, entry) = cfg.routes.lookup(path);
                    route = (Some(kind), entry.map(str::to_owned));
                    match cors::preflight(
                        &cfg.cors,
                        method,
                        origin,
                        head.get("access-control-request-method"),
                    ) {
                        Some(preflight) => (
                            reply::empty(preflight.status).into(),
                            preflight.headers,
                            LogOutcome::Preflight,
                        ),
                        None => {
                            let event_stream = reply::is_event_stream_request(method, path);
                            let request = Meta {
                                rid,
                                ids: &ids,
                                now_unix: i64::try_from(started / 1000).unwrap_or(i64::MAX),
                            };
                            let handled = match &url {
                                Ok(url) => {
                                    CatchPanic::new(handle(req, &head, url, &env, &cfg, request))
                                        .await
                                }
                                Err(e) => Err(EdgeError::Internal(format!("request URL: {e}"))),
                            };
                            let (resp, outcome) = answer(handled, event_stream, rid);
                            (resp, cfg.cors.response_headers(origin), outcome)
                        }
                    }
                }
            };
        let status = resp.status();
        let (resp, status) = match reply::finish(resp, &cors_headers, rid) {
            Ok(resp) => (resp, status),
            // The runtime refused the rebuilt response (it never has): still a JSON answer
            // with the request id, and still a log line.
            Err(e) => {
                let e = EdgeError::Internal(format!("building the response: {e}"));
                let status = e.status();
                (e.into_response(rid).into(), status)
            }
        };
        log::emit(&RequestLog {
            rid,
            trace_id: &ids.trace.trace_id_hex(),
            method,
            route: route.1.as_deref(),
            kind: route.0,
            status,
            ms: time::now_millis().saturating_sub(started),
            outcome: &outcome,
        });
        Ok(resp)
    }

    /// What `handle` needs to know about the request beyond the request itself.
    #[derive(Clone, Copy)]
    struct Meta<'a> {
        rid: &'a str,
        ids: &'a ids::RequestIds,
        now_unix: i64,
    }

    /// The response for a handled request and how it ended: the outcome, except that on
    /// `/events` a passing failure says retry as an event stream (`reply` module docs).
    fn answer(
        handled: Result<Response, EdgeError>,
        event_stream: bool,
        rid: &str,
    ) -> (Response, LogOutcome) {
        match handled {
            Err(e)
                if event_stream
                    && gateway_shared::frames::answers_as_unavailable_stream(e.status()) =>
            {
                worker::console_warn!("request {rid}: /events answered as a retry: {e}");
                let outcome = LogOutcome::Edge(e.code(), e.status());
                (
                    reply::unavailable_stream(e.code(), &e.message()).into(),
                    outcome,
                )
            }
            Err(e) => {
                let outcome = LogOutcome::Edge(e.code(), e.status());
                (e.into_response(rid).into(), outcome)
            }
            Ok(resp) => {
                let status = resp.status();
                let outcome = LogOutcome::of_origin(status);
                if !event_stream {
                    return (resp, outcome);
                }
                match reply::origin_status_as_unavailable(status) {
                    Some((code, message)) => {
                        worker::console_warn!(
                            "request {rid}: /events answered as a retry: {message}"
                        );
                        (reply::unavailable_stream(code, &message).into(), outcome)
                    }
                    None => (resp, outcome),
                }
            }
        }
    }

    /// The steps after CORS: route → rate limit → session → forward.
    async fn handle(
        req: Request,
        head: &Head,
        url: &RequestUrl<'_>,
        env: &Env,
        cfg: &EdgeConfig,
        request: Meta<'_>,
    ) -> Result<Response, EdgeError> {
        let rid = request.rid;
        let route = cfg.routes.classify(url.path());
        match route {
            RouteKind::Edge => return Ok(reply::health().into()),
            RouteKind::Deny => return Err(EdgeError::NotFound),
            RouteKind::Public | RouteKind::Session | RouteKind::Service => {}
        }
        let method =
            forward::forwardable_method(head.first()).ok_or(EdgeError::MethodNotAllowed)?;
        let body_limit = cfg.body_limits.for_path(url.path());
        crate::limits::check_declared(head.get("content-length"), body_limit)
            .map_err(|limit| EdgeError::PayloadTooLarge { limit })?;
        let period = cfg.rate_limit_period_secs;
        let client_ip = head.get("cf-connecting-ip");
        let per_ip = || ratelimit::check(env, Limiter::Ip, ratelimit::ip_key(client_ip), period);

        let (caller, cache_write) = match route {
            // `/events?ticket=` (or its alias `/api/v1/events/{client_id}?ticket=`)
            // without a token: the origin redeems the single-use ticket (issued to a
            // session) and is the only one that can; the edge forwards it as an anonymous
            // caller, still rate-limited per IP.
            RouteKind::Session
                if gateway_shared::routes::is_event_stream_path(url.path())
                    && session::token(head, url).is_none()
                    && url
                        .query()
                        .is_some_and(gateway_shared::session::query_has_ticket) =>
            {
                per_ip().await?;
                (Caller::Anonymous, None)
            }
            // A `/graphql/ws` upgrade without a token: a browser cannot put headers on a
            // WebSocket upgrade, so graphql-ws clients send the token in `connection_init`
            // (`connectionParams`), which only the origin reads. Forwarded as anonymous
            // (no identity is asserted), rate-limited per IP; the origin refuses the
            // socket at `connection_init` without a valid session.
            RouteKind::Session
                if url.path() == GRAPHQL_WS_PATH
                    && forward::is_websocket_upgrade(head.get("upgrade"))
                    && session::token(head, url).is_none() =>
            {
                per_ip().await?;
                (Caller::Anonymous, None)
            }
            RouteKind::Session => {
                let Some(token) = session::token(head, url) else {
                    per_ip().await?;
                    return Err(EdgeError::MissingToken);
                };
                let hash = SessionHash::of(&token);
                let key = ratelimit::session_key(&hash);
                // Both limiters are counted together: one wait instead of two.
                ratelimit::check_both(
                    env,
                    (Limiter::Ip, ratelimit::ip_key(client_ip)),
                    (Limiter::Session, key),
                    period,
                )
                .await?;
                session::resolve(env, cfg, &token, hash, rid, request.now_unix).await?
            }
            _ => {
                per_ip().await?;
                (Caller::Anonymous, None)
            }
        };

        let (logout, body) = if url.path() == session::LOGOUT_PATH {
            let (tokens, body) = session::logout_tokens_of(&req, head, url, body_limit).await?;
            (Some(tokens), body)
        } else {
            (
                None,
                forward::body_for(&req, head, method, body_limit).await?,
            )
        };
        let forwarded = forward::forward(
            cfg,
            Forward {
                head,
                url,
                method,
                body,
                caller: &caller,
                rid,
                client_ip,
                trace: &request.ids.trace,
                trace_continued: request.ids.trace_origin == Origin::Continued,
                now_unix: request.now_unix,
            },
        );
        // A fresh session is written to KV while the request travels to the origin.
        let resp = match cache_write {
            Some(write) => futures_util::future::join(forwarded, write.apply()).await.0,
            None => forwarded.await,
        }?;
        let status = resp.status();
        if let Some(tokens) = logout.filter(|_| status == 204) {
            session::forget_logout(env, cfg, &tokens).await;
        }
        // The origin refused the session the edge asserted (revoked at the origin, ended
        // by NoETL): forget it here, so its next request is refused at the edge.
        if let Caller::User { session: sid, .. } = &caller {
            // Only a 401 can say so: no header read on the common path.
            if status == 401 {
                let challenge = resp.headers().get("www-authenticate").ok().flatten();
                if session::origin_refused_session(401, challenge.as_deref()) {
                    session::forget(env, cfg, sid, true).await;
                }
            }
        }
        Ok(resp)
    }

    /// The GraphQL WebSocket endpoint.
    const GRAPHQL_WS_PATH: &str = "/graphql/ws";
}

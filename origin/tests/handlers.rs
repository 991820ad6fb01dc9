//! In-process handler tests: the real routers and middleware stack over the embedded
//! (memory) store and bus, driven with `tower::ServiceExt::oneshot` — no listener, no
//! nats-server, no origin process. Each test runs in milliseconds, so the edge cases of
//! every public route (400/401/403/404/405/413/415, ownership, assertion/session mismatch,
//! proxy refusals, callback authorization) are covered here, and the process suites in
//! `tests/` keep what needs real processes: NATS, wrangler, restarts and browsers.
//!
//! NoETL is an in-process axum stub on a loopback port (health answers, every session it is
//! asked about is invalid) or, where a test needs it unreachable, a closed port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use gateway_shared::assertion::{self, AssertionClaims};
use gateway_shared::frames::event;
use gateway_shared::ids::{ClientId, ExecutionId};
use gateway_shared::session::{SessionHash, SessionRecord, User};
use http_body_util::BodyExt;
use origin::bus::StartAt;
use origin::config::Config;
use origin::owners::{OwnerRecord, Owners};
use origin::requests::{CallbackTokens, RequestEntry};
use origin::state::AppState;
use origin::store::memory::MemoryKv;
use origin::store::{Bucket, BucketTtls, BucketWatchItem, KvEvent, KvStore, StoreError};
use origin::{app, clients, requests, server};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The edge's signing seed in these tests (base64url of 32 bytes, not all zero).
const EDGE_SEED: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA";
/// The internal listener's service token.
const SERVICE_TOKEN: &str = "service-token-for-handler-tests";
/// A shared callback secret, so request tokens are predictable from the test.
const CALLBACK_SECRET: &str = "callback-secret-for-handler-tests";

/// One origin, in process.
struct Origin {
    state: AppState,
    public: Router,
    internal: Router,
}

impl Origin {
    /// An origin over the embedded store and bus with `extra` settings on top of the test
    /// defaults; NoETL is `noetl` (a base URL).
    async fn with(noetl: &str, extra: &[&str]) -> Self {
        Self::build(noetl, extra, None).await
    }

    /// An origin over `kv` (instead of the embedded store) and the NoETL stub.
    async fn with_store(extra: &[&str], kv: Arc<dyn KvStore>) -> Self {
        let noetl = fake_noetl().await;
        Self::build(&noetl, extra, Some(kv)).await
    }

    async fn build(noetl: &str, extra: &[&str], kv: Option<Arc<dyn KvStore>>) -> Self {
        let mut args = vec![
            "origin",
            "--noetl-base-url",
            noetl,
            "--noetl-retries",
            "0",
            "--noetl-timeout",
            "2s",
            "--callback-secret",
            CALLBACK_SECRET,
            "--auth-audience",
            "handler-tests",
            "--auth-issuer",
            "https://issuer.invalid/",
            "--auth-jwks-url",
            "http://127.0.0.1:9/.well-known/jwks.json",
        ];
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).expect("test settings parse");
        config.validate().expect("test settings are valid");
        server::check_policies(&config).expect("test policies are valid");
        let state = match kv {
            None => server::build_state(config, CancellationToken::new()).await,
            Some(kv) => server::build_state_with_store(config, kv, CancellationToken::new()).await,
        }
        .expect("state over the embedded (or a given) store and bus");
        Self {
            public: app::public_router(state.clone()),
            internal: app::internal_router(state.clone()),
            state,
        }
    }

    /// An origin whose NoETL is the in-process stub.
    async fn new(extra: &[&str]) -> Self {
        let noetl = fake_noetl().await;
        Self::with(&noetl, extra).await
    }

    fn kv(&self) -> &dyn KvStore {
        self.state.readiness.kv.as_ref()
    }

    /// Stores a live session for `token` as if NoETL had validated it (role `user`).
    async fn seed_session(&self, token: &str, user_id: &str) -> SessionRecord {
        self.seed_session_with_role(token, user_id, "user").await
    }

    /// [`Origin::seed_session`] with the one role `role`.
    async fn seed_session_with_role(
        &self,
        token: &str,
        user_id: &str,
        role: &str,
    ) -> SessionRecord {
        let record = SessionRecord {
            user: User {
                user_id: user_id.into(),
                email: format!("{user_id}@example.test"),
                display_name: user_id.into(),
                roles: vec![role.into()],
            },
            expires_at: "2099-01-01T00:00:00Z".into(),
            expires_at_unix: 4_070_908_800,
            is_active: true,
        };
        self.kv()
            .put(
                Bucket::Sessions,
                SessionHash::of(token).as_str(),
                Bytes::from(serde_json::to_vec(&record).unwrap()),
            )
            .await
            .unwrap();
        record
    }

    async fn public(&self, req: Request<Body>) -> (StatusCode, Value) {
        read(self.public.clone().oneshot(with_peer(req)).await.unwrap()).await
    }

    async fn internal(&self, req: Request<Body>) -> (StatusCode, Value) {
        read(self.internal.clone().oneshot(with_peer(req)).await.unwrap()).await
    }
}

/// A NoETL stub: `/api/health` answers, every session it is asked about is invalid (NoETL
/// answers validate with 200 `{status:"ok", valid:false}`).
async fn fake_noetl() -> String {
    use axum::routing::{get, post};
    let app = Router::new()
        .route(
            "/api/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/api/auth/session/validate",
            post(|| async { axum::Json(json!({"status": "ok", "valid": false})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A base URL where nothing listens (connection refused at once).
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// The peer address the real listener would attach.
fn with_peer(mut req: Request<Body>) -> Request<Body> {
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

/// Status and JSON body (`Null` for an empty or non-JSON body).
async fn read(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn post_json(uri: &str, body: Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

fn bearer(req: Request<Body>, token: &str) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    parts.headers.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    Request::from_parts(parts, body)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

// ---- routing -------------------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_both_json() {
    let o = Origin::new(&[]).await;
    let (status, body) = o.public(get("/no/such/route")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
    let (status, body) = o.public(get("/api/auth/validate")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&body), "method_not_allowed");
    let (status, _) = o.internal(get("/api/internal/callback")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // The public listener does not serve the internal routes.
    let (status, _) = o
        .public(post_json("/api/internal/callback/async", json!({})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn ready_reports_noetl_without_failing_on_it_and_names_the_embedded_store() {
    let o = Origin::new(&[]).await;
    let (status, body) = o.public(get("/ready")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["nats"], "embedded");
    assert_eq!(body["checks"]["noetl"], "ok");
    assert_eq!(body["checks"]["revocations"], "current");

    // NoETL unreachable: still ready (cached sessions, streams and callbacks work), NoETL's
    // state reported as a code, not as its error text.
    let down = Origin::with(&closed_port().await, &[]).await;
    let (status, body) = down.internal(get("/ready")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["noetl"], "noetl_unavailable", "{body}");
}

// ---- auth REST -----------------------------------------------------------------------

#[tokio::test]
async fn validate_answers_401_without_a_token_and_for_a_session_noetl_refuses() {
    let o = Origin::new(&[]).await;
    let (status, body) = o.public(post_json("/api/auth/validate", json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "missing_token");
    assert_eq!(body["valid"], false);

    // Only the refusal of a session itself carries the challenge the edge forgets on.
    let challenge = |r: &axum::response::Response| {
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let missing = o
        .public
        .clone()
        .oneshot(with_peer(post_json("/api/auth/validate", json!({}))))
        .await
        .unwrap();
    assert_eq!(challenge(&missing), None);
    let refused = o
        .public
        .clone()
        .oneshot(with_peer(post_json(
            "/api/auth/validate",
            json!({"session_token": "not-a-session"}),
        )))
        .await
        .unwrap();
    assert_eq!(
        challenge(&refused).as_deref(),
        Some(gateway_shared::session::SESSION_REFUSED_CHALLENGE)
    );
    let (status, body) = read(refused).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "invalid_session");
}

#[tokio::test]
async fn validate_serves_a_cached_session_from_body_header_or_cookie() {
    let o = Origin::new(&[]).await;
    o.seed_session("tok-alice", "alice").await;
    let (status, body) = o
        .public(post_json(
            "/api/auth/validate",
            json!({"session_token": "tok-alice"}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["user_id"], "alice");

    let (status, body) = o
        .public(bearer(
            Request::post("/api/auth/validate")
                .body(Body::empty())
                .unwrap(),
            "tok-alice",
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let req = Request::post("/api/auth/validate")
        .header(header::COOKIE, "theme=dark; session_token=tok-alice")
        .body(Body::empty())
        .unwrap();
    let (status, body) = o.public(req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["user_id"], "alice");
}

#[tokio::test]
async fn auth_bodies_are_checked_for_type_size_and_syntax() {
    let o = Origin::new(&["--auth-body-limit", "1024"]).await;
    let req = Request::post("/api/auth/validate")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("session_token=x"))
        .unwrap();
    let (status, body) = o.public(req).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&body), "unsupported_media_type");

    let big = json!({"session_token": "x".repeat(1100)});
    let (status, body) = o.public(post_json("/api/auth/validate", big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&body), "payload_too_large");

    let req = Request::post("/api/auth/check-access")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"playbook_path\": "))
        .unwrap();
    let (status, body) = o.public(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_json");

    let (status, body) = o
        .public(post_json("/api/auth/login", json!({"auth0_token": ""})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "missing_token");
}

#[tokio::test]
async fn check_access_checks_its_fields_before_the_caller() {
    let o = Origin::new(&[]).await;
    o.seed_session("tok-alice", "alice").await;
    for body in [
        json!({"session_token": "tok-alice"}),
        json!({"session_token": "tok-alice", "playbook_path": ""}),
        json!({"session_token": "tok-alice", "playbook_path": "a/b", "permission_type": "delete"}),
    ] {
        let (status, reply) = o.public(post_json("/api/auth/check-access", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
        assert_eq!(error_code(&reply), "invalid_field");
    }
    let (status, reply) = o
        .public(post_json(
            "/api/auth/check-access",
            json!({"playbook_path": "a/b"}),
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reply}");
}

#[tokio::test]
async fn logout_without_a_token_is_401_and_with_one_ends_the_session() {
    let o = Origin::new(&[]).await;
    let (status, body) = o.public(post_json("/api/auth/logout", json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "missing_token");

    o.seed_session("tok-alice", "alice").await;
    let (status, _) = o
        .public(post_json(
            "/api/auth/logout",
            json!({"session_token": "tok-alice"}),
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The cached record is gone and revoked: the stub (which knows no session) is asked
    // nothing that could bring it back.
    let (status, body) = o
        .public(post_json(
            "/api/auth/validate",
            json!({"session_token": "tok-alice"}),
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

// ---- the edge assertion --------------------------------------------------------------

fn edge_settings() -> Vec<String> {
    let key = assertion::signing_key_from_b64(EDGE_SEED).unwrap();
    vec![
        "--edge-assertion-public-key".into(),
        assertion::public_key_b64(&key),
    ]
}

/// An assertion that `user_id` calls with the session of `session_token`, signed with the
/// key whose seed is `seed_b64`.
fn assertion_signed_by(seed_b64: &str, user_id: &str, session_token: &str) -> String {
    let key = assertion::signing_key_from_b64(seed_b64).unwrap();
    let claims = AssertionClaims {
        sub: user_id.into(),
        email: format!("{user_id}@example.test"),
        roles: vec!["user".into()],
        sid: SessionHash::of(session_token).as_str().into(),
        rid: "rid-1".into(),
        session_exp: 4_070_908_800,
        iss: String::new(),
        aud: String::new(),
    };
    assertion::sign(&claims, &key, chrono::Utc::now().timestamp()).unwrap()
}

/// An assertion as the edge (holding `EDGE_SEED`) would sign it.
fn signed_assertion(user_id: &str, session_token: &str) -> String {
    assertion_signed_by(EDGE_SEED, user_id, session_token)
}

async fn edge_origin(extra: &[&str]) -> Origin {
    let settings = edge_settings();
    let mut args: Vec<&str> = settings.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    Origin::new(&args).await
}

#[tokio::test]
async fn an_assertion_identifies_the_caller_without_a_token() {
    let o = edge_origin(&[]).await;
    let req = Request::post("/api/events/ticket")
        .header(assertion::HEADER, signed_assertion("bob", "tok-bob"))
        .body(Body::empty())
        .unwrap();
    let (status, body) = o.public(req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["ticket"].as_str().is_some_and(|t| t.len() >= 32));
}

#[tokio::test]
async fn an_assertion_cannot_lend_its_identity_to_another_session_token() {
    let o = edge_origin(&[]).await;
    o.seed_session("tok-mallory", "mallory").await;
    // The assertion is bob's (sid of tok-bob) but the request carries mallory's token.
    let req = bearer(
        Request::post("/api/events/ticket")
            .header(assertion::HEADER, signed_assertion("bob", "tok-bob"))
            .body(Body::empty())
            .unwrap(),
        "tok-mallory",
    );
    let (status, body) = o.public(req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "assertion_session_mismatch");
}

#[tokio::test]
async fn a_forged_or_missing_assertion_is_refused_where_the_edge_is_required() {
    let o = edge_origin(&["--require-edge-assertion", "true"]).await;
    o.seed_session("tok-alice", "alice").await;
    // A valid session token alone is not enough when traffic must come through the edge.
    let (status, body) = o
        .public(bearer(
            Request::post("/api/events/ticket")
                .body(Body::empty())
                .unwrap(),
            "tok-alice",
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "edge_assertion_required");

    // Signed by another key.
    let forged = assertion_signed_by(
        "IB8eHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE",
        "alice",
        "tok-alice",
    );
    let req = Request::post("/api/events/ticket")
        .header(assertion::HEADER, forged)
        .body(Body::empty())
        .unwrap();
    let (status, body) = o.public(req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "assertion_bad_signature");

    // Health and readiness stay reachable for the kubelet.
    let (status, _) = o.public(get("/health")).await;
    assert_eq!(status, StatusCode::OK);
}

// ---- /events and tickets -------------------------------------------------------------

#[tokio::test]
async fn events_refuses_without_a_caller_and_on_a_bad_query() {
    let o = Origin::new(&[]).await;
    let (status, body) = o.public(get("/events")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    o.seed_session("tok-alice", "alice").await;
    let (status, body) = o
        .public(bearer(get("/events?client_id=%FF%FE"), "tok-alice"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_query");

    let (status, body) = o
        .public(bearer(get("/events?client_id=a%20b"), "tok-alice"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_client_id");

    let (status, body) = o
        .public(bearer(get("/events?ticket=not-a-ticket"), "tok-alice"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "invalid_ticket");
}

#[tokio::test]
async fn a_client_id_is_resumed_only_by_its_owner() {
    let o = Origin::new(&[]).await;
    o.seed_session("tok-alice", "alice").await;
    o.seed_session("tok-mallory", "mallory").await;
    let alices = clients::create(o.kv(), "alice").await.unwrap();

    let uri = format!("/events?client_id={alices}");
    let (status, body) = o.public(bearer(get(&uri), "tok-mallory")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "client_not_yours");

    // An id nobody holds is bound to the first user who names it; after that it is
    // theirs alone.
    let proposed = "page-chosen-0b9f6a1e3c2d";
    let resp = o
        .public
        .clone()
        .oneshot(with_peer(bearer(
            get(&format!("/events?client_id={proposed}")),
            "tok-alice",
        )))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bound = clients::get(o.kv(), &proposed.parse().unwrap())
        .await
        .unwrap()
        .expect("bound on first use");
    assert_eq!(bound.user_id, "alice");
    let (status, body) = o
        .public(bearer(
            get(&format!("/events?client_id={proposed}")),
            "tok-mallory",
        ))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "client_not_yours");

    // The owner resumes it: the stream opens (the body is the SSE stream, not read here).
    let resp = o
        .public
        .clone()
        .oneshot(with_peer(bearer(get(&uri), "tok-alice")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[header::CONTENT_TYPE],
        "text/event-stream",
        "an SSE stream"
    );
}

#[tokio::test]
async fn a_ticket_is_redeemed_once() {
    let o = Origin::new(&[]).await;
    o.seed_session("tok-alice", "alice").await;
    let (status, body) = o
        .public(bearer(
            Request::post("/api/events/ticket")
                .body(Body::empty())
                .unwrap(),
            "tok-alice",
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ticket = body["ticket"].as_str().unwrap().to_owned();
    let uri = format!("/events?ticket={ticket}");
    let first = o
        .public
        .clone()
        .oneshot(with_peer(get(&uri)))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    drop(first);
    let (status, body) = o.public(get(&uri)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "invalid_ticket");
}

// ---- revocations ---------------------------------------------------------------------

/// The memory store with switchable failures: reads of chosen buckets, and (fixed at
/// creation) the bucket-wide watch — so the revocation set never becomes current.
struct FlakyKv {
    inner: MemoryKv,
    failing_reads: Mutex<Vec<Bucket>>,
    watch_fails: bool,
}

impl FlakyKv {
    fn new(watch_fails: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryKv::new(BucketTtls::default()),
            failing_reads: Mutex::new(Vec::new()),
            watch_fails,
        })
    }

    fn fail_reads(&self, buckets: &[Bucket]) {
        *self.failing_reads.lock().unwrap() = buckets.to_vec();
    }

    fn down(what: &str) -> StoreError {
        StoreError::Unavailable(format!("flaky store: {what}"))
    }
}

#[async_trait::async_trait]
impl KvStore for FlakyKv {
    async fn get(&self, bucket: Bucket, key: &str) -> Result<Option<Bytes>, StoreError> {
        if self.failing_reads.lock().unwrap().contains(&bucket) {
            return Err(Self::down("get"));
        }
        self.inner.get(bucket, key).await
    }
    async fn get_versioned(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> Result<origin::store::Versioned, StoreError> {
        if self.failing_reads.lock().unwrap().contains(&bucket) {
            return Err(Self::down("get"));
        }
        self.inner.get_versioned(bucket, key).await
    }
    async fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<bool, StoreError> {
        self.inner.update(bucket, key, value, revision).await
    }
    async fn put(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.inner.put(bucket, key, value).await
    }
    async fn put_with_ttl(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        self.inner.put_with_ttl(bucket, key, value, ttl).await
    }
    async fn create(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<bool, StoreError> {
        self.inner.create(bucket, key, value).await
    }
    async fn delete(&self, bucket: Bucket, key: &str) -> Result<(), StoreError> {
        self.inner.delete(bucket, key).await
    }
    async fn lease(
        &self,
        bucket: Bucket,
        key: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.inner.lease(bucket, key, holder, ttl).await
    }
    async fn watch(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> Result<futures::stream::BoxStream<'static, KvEvent>, StoreError> {
        self.inner.watch(bucket, key).await
    }
    async fn watch_bucket(
        &self,
        bucket: Bucket,
    ) -> Result<futures::stream::BoxStream<'static, BucketWatchItem>, StoreError> {
        if self.watch_fails {
            return Err(Self::down("watch"));
        }
        self.inner.watch_bucket(bucket).await
    }
    async fn is_healthy(&self) -> bool {
        true
    }
}

/// A response's `(status, error code, Retry-After, WWW-Authenticate)`.
async fn refusal(
    o: &Origin,
    req: Request<Body>,
) -> (StatusCode, String, Option<String>, Option<String>) {
    let resp = o.public.clone().oneshot(with_peer(req)).await.unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (retry_after, challenge) = (header("retry-after"), header("www-authenticate"));
    let (status, body) = read(resp).await;
    (status, error_code(&body).to_owned(), retry_after, challenge)
}

fn validate_with(token: &str) -> Request<Body> {
    post_json("/api/auth/validate", json!({ "session_token": token }))
}

fn ticket_as_asserted(user_id: &str, token: &str) -> Request<Body> {
    Request::post("/api/events/ticket")
        .header(assertion::HEADER, signed_assertion(user_id, token))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn a_revoked_read_failure_answers_503_never_200() {
    let kv = FlakyKv::new(true);
    kv.fail_reads(&[Bucket::Revoked]);
    let settings = edge_settings();
    let args: Vec<&str> = settings.iter().map(String::as_str).collect();
    let o = Origin::with_store(&args, kv.clone()).await;
    assert!(!o.state.auth.sessions.revocations().is_current());
    o.seed_session("tok-alice", "alice").await;

    // A token caller: the set cannot answer, the direct read fails → 503, retryable.
    let (status, code, retry_after, challenge) = refusal(&o, validate_with("tok-alice")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, "revocations_unavailable");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(challenge, None, "not a refusal of the session itself");
    // An assertion-only caller: refused fail-closed while the set is not current.
    let (status, code, retry_after, _) =
        refusal(&o, ticket_as_asserted("alice", "tok-alice")).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "revocations_unavailable")
    );
    assert_eq!(retry_after.as_deref(), Some("1"));

    // The revoked read works again: a token caller is answered from it, an assertion-only
    // caller still is not (the set is still not current).
    kv.fail_reads(&[]);
    let (status, body) = o.public(validate_with("tok-alice")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, code, _, _) = refusal(&o, ticket_as_asserted("alice", "tok-alice")).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "revocations_unavailable")
    );
}

#[tokio::test]
async fn a_session_cache_failure_still_falls_back_to_noetl_while_revocations_are_current() {
    let kv = FlakyKv::new(false);
    let o = Origin::with_store(&[], kv.clone()).await;
    assert!(o.state.auth.sessions.revocations().is_current());
    o.seed_session("tok-alice", "alice").await;
    kv.fail_reads(&[Bucket::Sessions, Bucket::Revoked]);
    // The cache is unreadable, revocations come from memory: NoETL decides (the stub knows
    // no session), not a 503.
    let (status, code, _, challenge) = refusal(&o, validate_with("tok-alice")).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_session")
    );
    assert!(challenge.is_some());
}

#[tokio::test]
async fn a_logout_refuses_the_session_as_a_token_and_behind_an_assertion() {
    let o = edge_origin(&["--revoked-max-age", "36500days"]).await;
    let record = o.seed_session("tok-carol", "carol").await;
    let (status, body) = o.public(ticket_as_asserted("carol", "tok-carol")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, _) = o
        .public(post_json(
            "/api/auth/logout",
            json!({"session_token": "tok-carol"}),
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for req in [
        ticket_as_asserted("carol", "tok-carol"),
        validate_with("tok-carol"),
    ] {
        let (status, code, _, challenge) = refusal(&o, req).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::UNAUTHORIZED, "invalid_session")
        );
        assert_eq!(
            challenge.as_deref(),
            Some(gateway_shared::session::SESSION_REFUSED_CHALLENGE)
        );
    }
    // The marker is kept until the session's own expiry, whatever SESSION_MAX_LIFE says.
    let marker = o
        .kv()
        .get(Bucket::Revoked, SessionHash::of("tok-carol").as_str())
        .await
        .unwrap()
        .expect("a revocation marker");
    let marker: Value = serde_json::from_slice(&marker).unwrap();
    assert_eq!(marker["expires_at_unix"], record.expires_at_unix);
}

#[tokio::test]
async fn a_logout_of_a_token_nobody_knows_keeps_its_marker_for_one_cache_ttl_only() {
    // Logging out random tokens must not grow every replica's revocation set for
    // REVOKED_MAX_AGE: unknown to the cache and to NoETL, the marker lives as long as any
    // cache could still hold a copy (SESSION_CACHE_TTL).
    let o = Origin::new(&["--session-cache-ttl", "120s"]).await;
    let (status, _) = o
        .public(post_json(
            "/api/auth/logout",
            json!({"session_token": "tok-nobody-ever-had"}),
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let marker = o
        .kv()
        .get(
            Bucket::Revoked,
            SessionHash::of("tok-nobody-ever-had").as_str(),
        )
        .await
        .unwrap()
        .expect("a short revocation marker");
    let marker: Value = serde_json::from_slice(&marker).unwrap();
    let left = marker["expires_at_unix"].as_i64().unwrap() - chrono::Utc::now().timestamp();
    assert!((110..=125).contains(&left), "kept {left} s, not 120");
}

#[tokio::test]
async fn an_assertion_whose_sid_is_no_session_hash_is_an_assertion_error() {
    let o = edge_origin(&[]).await;
    let key = assertion::signing_key_from_b64(EDGE_SEED).unwrap();
    let claims = AssertionClaims {
        sub: "erin".into(),
        email: "erin@example.test".into(),
        roles: vec!["user".into()],
        sid: "not-a-hash".into(),
        rid: "rid-1".into(),
        session_exp: 4_070_908_800,
        iss: String::new(),
        aud: String::new(),
    };
    let signed = assertion::sign(&claims, &key, chrono::Utc::now().timestamp()).unwrap();
    let req = Request::post("/api/events/ticket")
        .header(assertion::HEADER, signed)
        .body(Body::empty())
        .unwrap();
    let (status, code, _, challenge) = refusal(&o, req).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "assertion_invalid_sid")
    );
    assert_eq!(
        challenge, None,
        "not a refusal of a session: the edge must not forget one"
    );
}

/// The next chunk of a streaming body as text, `None` at its end; it must come within 1 s.
async fn next_chunk(body: &mut Body) -> Option<String> {
    let frame = tokio::time::timeout(std::time::Duration::from_secs(1), body.frame())
        .await
        .expect("the stream moves within 1 s");
    match frame {
        Some(Ok(f)) => Some(String::from_utf8_lossy(&f.into_data().ok()?).into_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn an_open_event_stream_ends_with_session_ended_when_its_session_logs_out() {
    let o = Origin::new(&[]).await;
    o.seed_session("tok-frank", "frank").await;
    let resp = o
        .public
        .clone()
        .oneshot(with_peer(bearer(get("/events"), "tok-frank")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = next_chunk(&mut body).await.expect("the init frame");
    assert!(first.contains("clientId"), "{first}");

    let (status, _) = o
        .public(post_json(
            "/api/auth/logout",
            json!({"session_token": "tok-frank"}),
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let mut seen = String::new();
    while let Some(chunk) = next_chunk(&mut body).await {
        seen.push_str(&chunk);
    }
    assert!(
        seen.contains("event: session/ended\n")
            && seen.contains(r#""method":"session/ended","params":{"reason":"logged_out"}"#),
        "the last frame says why: {seen:?}"
    );
    assert!(
        seen.trim_end().ends_with('}'),
        "session/ended is the last frame: {seen:?}"
    );
}

#[tokio::test]
async fn a_seen_session_that_noetl_ended_is_revoked() {
    let o = edge_origin(&["--session-cache-ttl", "1s"]).await;
    let expires_at_unix = chrono::Utc::now().timestamp() + 3600;
    // Cached, and confirmed by NoETL an hour ago: stale, so NoETL is asked again (the stub
    // says the session is over).
    let entry = json!({
        "user": {"user_id": "dave", "email": "dave@example.test", "display_name": "dave", "roles": ["user"]},
        "expires_at": "2099-01-01T00:00:00Z",
        "expires_at_unix": expires_at_unix,
        "is_active": true,
        "checked_at": chrono::Utc::now().timestamp() - 3600,
    });
    let hash = SessionHash::of("tok-dave");
    o.kv()
        .put(
            Bucket::Sessions,
            hash.as_str(),
            Bytes::from(entry.to_string()),
        )
        .await
        .unwrap();
    let (status, code, _, _) = refusal(&o, validate_with("tok-dave")).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_session")
    );
    let marker = o
        .kv()
        .get(Bucket::Revoked, hash.as_str())
        .await
        .unwrap()
        .expect("NoETL's end of a seen session is a revocation");
    let marker: Value = serde_json::from_slice(&marker).unwrap();
    assert_eq!(marker["expires_at_unix"], expires_at_unix);
    // …which binds the edge's callers of it too.
    let (status, code, _, _) = refusal(&o, ticket_as_asserted("dave", "tok-dave")).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_session")
    );
    // A token the gateway never saw leaves no marker behind.
    let (status, _) = o.public(validate_with("tok-never-seen")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(o
        .kv()
        .get(Bucket::Revoked, SessionHash::of("tok-never-seen").as_str())
        .await
        .unwrap()
        .is_none());
}

// ---- /noetl/* ------------------------------------------------------------------------

#[tokio::test]
async fn the_proxy_refuses_before_it_forwards() {
    let o = Origin::new(&[
        "--proxy-max-body",
        "64",
        "--proxy-allow",
        "GET /api/executions,GET /api/catalog,POST /api/catalog",
    ])
    .await;
    o.seed_session("tok-alice", "alice").await;

    let (status, _) = o.public(bearer(get("/noetl/"), "tok-alice")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = o
        .public(bearer(get("/noetl/catalog/%2e%2e/admin"), "tok-alice"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "invalid_proxy_path");

    let (status, body) = o.public(get("/noetl/catalog/list")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let (status, body) = o
        .public(bearer(get("/noetl/admin/secrets"), "tok-alice"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "proxy_route_forbidden");

    let req = Request::post("/noetl/catalog/list")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "1000")
        .body(Body::from(vec![b' '; 1000]))
        .unwrap();
    let (status, body) = o.public(bearer(req, "tok-alice")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(error_code(&body), "payload_too_large");

    // A listed path with a method the list does not name.
    let req = Request::delete("/noetl/executions/42")
        .body(Body::empty())
        .unwrap();
    let (status, body) = o.public(bearer(req, "tok-alice")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
}

#[tokio::test]
async fn the_proxy_answers_a_json_502_when_noetl_is_unreachable() {
    let o = Origin::with(&closed_port().await, &[]).await;
    o.seed_session("tok-alice", "alice").await;
    let (status, body) = o
        .public(bearer(get("/noetl/catalog/list"), "tok-alice"))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
}

// ---- execution ownership (the proxy side) --------------------------------------------

/// A NoETL stub that answers every execution read with 200 and the id it was asked about,
/// so a 404 from the origin can only be the owner check's.
async fn executions_noetl() -> String {
    use axum::extract::Path;
    use axum::routing::get;
    let one = |Path(id): Path<String>| async move { axum::Json(json!({"execution_id": id})) };
    let app = Router::new()
        .route(
            "/api/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/api/executions",
            get(|| async { axum::Json(json!({"items": []})) }),
        )
        .route("/api/executions/{id}", get(one))
        .route("/api/executions/{id}/status", get(one));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// [`Origin::seed_session`] with the `admin` role.
async fn seed_admin(o: &Origin, token: &str, user_id: &str) {
    o.seed_session_with_role(token, user_id, "admin").await;
}

/// Records `user_id` as the owner of execution `id`, as executePlaybook does.
async fn own(o: &Origin, id: &str, user_id: &str) {
    let owners = Owners::new(o.state.readiness.kv.clone(), vec!["admin".into()]);
    owners
        .record(&OwnerRecord {
            execution_id: id.into(),
            user_id: user_id.into(),
            playbook_path: "demo/echo".into(),
            started_at: 1_700_000_000,
            request_id: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn one_execution_is_proxied_to_its_owner_and_read_all_roles_only() {
    let o = Origin::with(&executions_noetl().await, &[]).await;
    o.seed_session("tok-alice", "alice").await;
    o.seed_session("tok-bob", "bob").await;
    seed_admin(&o, "tok-admin", "root").await;
    own(&o, "42", "alice").await;

    for path in ["/noetl/executions/42", "/noetl/executions/42/status"] {
        let (status, body) = o.public(bearer(get(path), "tok-alice")).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["execution_id"], "42", "{path}: {body}");
        let (status, body) = o.public(bearer(get(path), "tok-admin")).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // Another user: 404, the same answer as for a run that does not exist, however the
    // id or the collection is spelled.
    for path in [
        "/noetl/executions/42",
        "/noetl/executions/42/status",
        "/noetl/executions/%34%32",
        "/noetl/executions/43",
    ] {
        let (status, body) = o.public(bearer(get(path), "tok-bob")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(error_code(&body), "not_found", "{path}");
    }
    // A run the gateway did not start is read-all only.
    let (status, _) = o
        .public(bearer(get("/noetl/executions/43"), "tok-alice"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = o
        .public(bearer(get("/noetl/executions/43"), "tok-admin"))
        .await;
    assert_eq!(status, StatusCode::OK);
    // The default allow-list does not list executions, for anyone.
    for token in ["tok-bob", "tok-admin"] {
        let (status, body) = o.public(bearer(get("/noetl/executions"), token)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(error_code(&body), "proxy_route_forbidden");
    }
}

#[tokio::test]
async fn an_allow_listed_execution_listing_is_served_to_read_all_roles_only() {
    let o = Origin::with(
        &executions_noetl().await,
        &["--proxy-allow", "GET /api/executions,GET /api/catalog"],
    )
    .await;
    o.seed_session("tok-bob", "bob").await;
    seed_admin(&o, "tok-admin", "root").await;
    for path in [
        "/noetl/executions",
        "/noetl/executions/",
        "/noetl/executions?status=RUNNING",
    ] {
        let (status, body) = o.public(bearer(get(path), "tok-bob")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(error_code(&body), "not_found");
        let (status, body) = o.public(bearer(get(path), "tok-admin")).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // With no read-all role configured, nobody lists.
    let o = Origin::with(
        &executions_noetl().await,
        &[
            "--proxy-allow",
            "GET /api/executions",
            "--read-all-roles",
            "",
        ],
    )
    .await;
    seed_admin(&o, "tok-admin", "root").await;
    let (status, _) = o
        .public(bearer(get("/noetl/executions"), "tok-admin"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// ---- callbacks (internal listener) ---------------------------------------------------

async fn pending_request(o: &Origin, user: &str) -> (RequestEntry, ClientId) {
    let client_id = clients::create(o.kv(), user).await.unwrap();
    let entry = RequestEntry {
        request_id: requests::new_request_id(),
        client_id: Some(client_id.clone()),
        user_id: user.into(),
        execution_id: Some(ExecutionId::parse("42").expect("valid")),
        playbook_path: "demo/echo".into(),
        created_at: 0,
    };
    requests::put(o.kv(), &entry).await.unwrap();
    (entry, client_id)
}

fn callback(request_id: &str, token: Option<&str>) -> Request<Body> {
    let req = post_json(
        "/api/internal/callback/async",
        json!({"request_id": request_id, "status": "COMPLETED", "data": {"n": 1}}),
    );
    match token {
        Some(t) => bearer(req, t),
        None => req,
    }
}

#[tokio::test]
async fn a_callback_without_any_configured_token_is_503_not_open() {
    // No GATEWAY_INTERNAL_TOKEN and no request token presented: refuse, naming why.
    let o = Origin::new(&[]).await;
    let (entry, _) = pending_request(&o, "alice").await;
    let (status, body) = o.internal(callback(entry.request_id.as_str(), None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "callbacks_not_configured");
}

#[tokio::test]
async fn callbacks_check_token_type_size_and_request() {
    let o = Origin::new(&[
        "--internal-token",
        SERVICE_TOKEN,
        "--callback-body-limit",
        "512",
    ])
    .await;
    let (entry, _) = pending_request(&o, "alice").await;

    let (status, body) = o
        .internal(callback(
            entry.request_id.as_str(),
            Some("wrong-token-wrong-token"),
        ))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "invalid_callback_token");

    let req = Request::post("/api/internal/callback/async")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _) = o.internal(bearer(req, SERVICE_TOKEN)).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let big = post_json(
        "/api/internal/callback/async",
        json!({"request_id": entry.request_id, "status": "COMPLETED", "data": "x".repeat(600)}),
    );
    let (status, _) = o.internal(bearer(big, SERVICE_TOKEN)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, body) = o
        .internal(callback("not a request id", Some(SERVICE_TOKEN)))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, body) = o
        .internal(callback(
            requests::new_request_id().as_str(),
            Some(SERVICE_TOKEN),
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn a_callback_with_its_request_token_is_published_once() {
    let o = Origin::new(&[]).await;
    let (entry, client_id) = pending_request(&o, "alice").await;
    let token = CallbackTokens::new(Some(CALLBACK_SECRET)).token_for(entry.request_id.as_str());

    // Another request's token does not open this one.
    let (other, _) = pending_request(&o, "alice").await;
    let other_token =
        CallbackTokens::new(Some(CALLBACK_SECRET)).token_for(other.request_id.as_str());
    let (status, _) = o
        .internal(callback(entry.request_id.as_str(), Some(&other_token)))
        .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no service token configured"
    );

    let (status, body) = o
        .internal(callback(entry.request_id.as_str(), Some(&token)))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "queued", "the client is not connected");
    let (status, body) = o
        .internal(callback(entry.request_id.as_str(), Some(&token)))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "duplicate");

    // Exactly one result frame reached the client's stream.
    let sub = o
        .state
        .events
        .bus
        .subscribe(&client_id, StartAt::Retained)
        .await
        .unwrap();
    let frames: Vec<_> = sub
        .frames
        .take_until(tokio::time::sleep(std::time::Duration::from_millis(200)))
        .collect()
        .await;
    assert_eq!(frames.len(), 1, "one frame, not a duplicate");
    let frame = frames.into_iter().next().unwrap().unwrap();
    assert_eq!(frame.event, event::RESULT);
    let data: Value = serde_json::from_slice(&frame.data).unwrap();
    assert_eq!(
        data["params"]["requestId"],
        entry.request_id.as_str(),
        "{data}"
    );
}

/// A resume writes the client's presence marker as it opens — unless other opens wait
/// for a turn (a reconnect storm): then the marker waits for the stream's first ping.
#[tokio::test]
async fn a_resume_in_a_burst_of_opens_leaves_its_presence_to_the_first_ping() {
    use origin::quotas::STREAM_OPENS_AT_ONCE;
    let o = Origin::new(&["--sse-ping-interval", "400ms"]).await;
    o.seed_session("tok-alice", "alice").await;
    let id = clients::create(o.kv(), "alice").await.unwrap();
    let uri = format!("/events?client_id={id}");

    // Nobody waits: the marker is written before the stream's head.
    let quiet = o
        .public
        .clone()
        .oneshot(with_peer(bearer(get(&uri), "tok-alice")))
        .await
        .unwrap();
    assert_eq!(quiet.status(), StatusCode::OK);
    assert!(clients::is_present(o.kv(), &id).await.unwrap());
    drop(quiet);
    clients::mark_absent(o.kv(), &id).await.unwrap();

    // Every turn taken, then this resume waiting, then one more open behind it.
    let opens = o.state.events.opens.clone();
    let (release, released) = tokio::sync::watch::channel(0usize);
    let hold = |n: usize| {
        let (opens, mut released) = (opens.clone(), released.clone());
        tokio::spawn(async move {
            opens
                .run(async move {
                    let _ = released.wait_for(|r| *r >= n).await;
                    Ok(())
                })
                .await
        })
    };
    let holders: Vec<_> = (1..=STREAM_OPENS_AT_ONCE).map(&hold).collect();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!opens.crowded(), "every turn taken, nobody waiting yet");
    let resume = tokio::spawn(
        o.public
            .clone()
            .oneshot(with_peer(bearer(get(&uri), "tok-alice"))),
    );
    let waiting = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !opens.crowded() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waiting.is_ok(), "the resume waits for a turn");
    let behind = hold(usize::MAX);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // One turn comes free: the resume has it (turns go in arrival order) while the last
    // open waits; that one takes the turn the resume gives back with its answer.
    release.send(1).unwrap();
    let resp = resume.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        !clients::is_present(o.kv(), &id).await.unwrap(),
        "no presence write while opens queue"
    );

    // The stream's first ping (200–400 ms) writes it.
    let mut body = resp.into_body().into_data_stream();
    let pinged = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut seen = String::new();
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.contains("event: ping") {
                return;
            }
        }
        panic!("the stream ended before its first ping: {seen}");
    })
    .await;
    assert!(pinged.is_ok(), "a ping within 5 s");
    let present = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !clients::is_present(o.kv(), &id).await.unwrap() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(present.is_ok(), "the first ping wrote the presence marker");

    release.send(usize::MAX).unwrap();
    for h in holders {
        h.await.unwrap().unwrap();
    }
    behind.await.unwrap().unwrap();
    assert!(!opens.crowded());
}

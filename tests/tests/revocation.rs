//! Revocation across replicas, at the origin (issue 11; the through-the-edge cases are
//! `edge.rs`): two origins on one nats-server, each holding the revocation set in memory
//! from its watch on K/V `revoked`. A logout on one replica is refused on the other within
//! 1 s — as a token and behind an edge assertion; a session NoETL (the stand-in) ends is
//! revoked the same way once the gateway asks about it; an open SSE stream ends with
//! `session/ended` and a graphql-ws socket closes 4403 within 1 s of a logout elsewhere;
//! an SSE stream ends at its session's expiry; and a replica that cannot read revocations
//! answers 503, never 200.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures::StreamExt;
use gateway_shared::assertion::{self, AssertionClaims, SecretKey};
use gateway_shared::session::SessionHash;
use gateway_tests::harness::flows::{
    http, login, logout, nats_stack_with, open_events, post_graphql, ws_connect, ws_init,
};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::Origin;
use gateway_tests::harness::sse::SseClient;
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{self, wait_for};
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// The promise: a revocation reaches every replica's callers and connections within this.
const WITHIN: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(15);

/// The edge's signing key in these tests.
fn edge_key() -> SecretKey {
    assertion::signing_key_from_b64(&B64.encode([9u8; 32])).expect("a valid seed")
}

/// Two origins on one nats-server and a stand-in, trusting [`edge_key`]; `env` on top.
struct Stack {
    nats: NatsServer,
    standin: StandIn,
    a: Origin,
    b: Origin,
}

async fn stack(standin_opts: StandInOptions, env: &[(&str, &str)]) -> Stack {
    let key = assertion::public_key_b64(&edge_key());
    let env: Vec<(&str, &str)> = [("EDGE_ASSERTION_PUBLIC_KEY", key.as_str())]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let (nats, standin, origins) = nats_stack_with(2, standin_opts, &env).await;
    let [a, b]: [Origin; 2] = origins
        .try_into()
        .unwrap_or_else(|_| unreachable!("two origins"));
    Stack {
        nats,
        standin,
        a,
        b,
    }
}

/// An assertion for the session of `token`, as the edge would sign it.
fn assertion_for(token: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = AssertionClaims {
        sub: "asserted-user".into(),
        email: "asserted@example.com".into(),
        roles: vec!["user".into()],
        sid: SessionHash::of(token).as_str().into(),
        rid: "rid-revocation".into(),
        session_exp: now + 3600,
        iss: String::new(),
        aud: String::new(),
    };
    assertion::sign(&claims, &edge_key(), now).expect("signs")
}

/// `POST /api/auth/validate` with the token: `(status, body)`.
async fn validate(origin: &Origin, token: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{}/api/auth/validate", origin.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `{ me }` over GraphQL with only the edge's assertion for the token's session: the
/// status, the headers and the body.
async fn me_asserted_reply(origin: &Origin, token: &str) -> (u16, HeaderMap, Value) {
    let assertion = assertion_for(token);
    post_graphql(
        &origin.url,
        None,
        &[(assertion::HEADER, &assertion)],
        "{ me { userId } }",
        Value::Null,
    )
    .await
}

/// [`me_asserted_reply`]'s status and body.
async fn me_asserted(origin: &Origin, token: &str) -> (u16, Value) {
    let (status, _, body) = me_asserted_reply(origin, token).await;
    (status, body)
}

/// Polls until `refused` holds (every 10 ms, so the figure is close); how long that took.
async fn time_until<F, Fut>(what: &str, refused: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    harness::time_until(what, WAIT, Duration::from_millis(10), refused).await
}

fn is_refused_session(status: u16, body: &Value) -> bool {
    status == 401 && body["error"]["code"] == "invalid_session"
}

#[tokio::test]
async fn a_logout_on_one_replica_is_refused_on_the_other_within_a_second() {
    let s = stack(StandInOptions::default(), &[]).await;
    let token = login(&s.a.url, &s.standin, "two-doors@example.com").await;
    // Both doors serve the session first: B as a token (cached now, in K/V and in B's own
    // memory) and as an assertion.
    let (status, body) = validate(&s.b, &token).await;
    assert_eq!(status, 200, "{body}");
    // B serves it from memory from now on: no K/V `sessions` read for ten more requests.
    let reads =
        r#"gateway_kv_operation_duration_seconds_count{bucket="sessions",op="get",outcome="ok"}"#;
    let before = s.b.metric(reads).await.unwrap_or(0);
    for _ in 0..10 {
        assert_eq!(validate(&s.b, &token).await.0, 200);
    }
    assert_eq!(
        s.b.metric(reads).await.unwrap_or(0),
        before,
        "a cached session's request reads no K/V"
    );
    let (status, body) = me_asserted(&s.b, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["me"]["userId"], "asserted-user", "{body}");

    logout(&s.a.url, &token).await;
    let took = time_until("the assertion on B", || async {
        let (status, body) = me_asserted(&s.b, &token).await;
        is_refused_session(status, &body)
    })
    .await;
    assert!(took < WITHIN, "assertion refused on B after {took:?}");
    let (status, body) = validate(&s.b, &token).await;
    assert!(is_refused_session(status, &body), "{status} {body}");
    let (_, headers, _) = me_asserted_reply(&s.b, &token).await;
    assert_eq!(
        headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some(gateway_shared::session::SESSION_REFUSED_CHALLENGE),
        "the refusal tells the edge to forget the session"
    );

    // A second session, checked as a token on B first.
    let other = login(&s.b.url, &s.standin, "two-doors-2@example.com").await;
    assert_eq!(validate(&s.b, &other).await.0, 200);
    logout(&s.a.url, &other).await;
    let took = time_until("the token on B", || async {
        let (status, body) = validate(&s.b, &other).await;
        is_refused_session(status, &body)
    })
    .await;
    assert!(took < WITHIN, "token refused on B after {took:?}");
    // B's metrics show what it holds.
    assert_eq!(s.b.metric("gateway_revocations").await, Some(2));
    assert_eq!(s.b.metric("gateway_revocations_current").await, Some(1));
}

#[tokio::test]
async fn a_session_the_standin_ends_is_refused_and_revoked() {
    let s = stack(StandInOptions::default(), &[("SESSION_CACHE_TTL", "1s")]).await;
    let token = login(&s.a.url, &s.standin, "ended-by-noetl@example.com").await;
    assert_eq!(validate(&s.a, &token).await.0, 200);
    // NoETL ends the session itself (its own logout route, not the gateway's).
    s.standin.end_session(&token).await;
    // Once the cache entry is stale, the gateway asks NoETL and refuses…
    wait_for("the token is refused once NoETL is asked", WAIT, || async {
        let (status, body) = validate(&s.a, &token).await;
        is_refused_session(status, &body)
    })
    .await;
    // …and revokes it, so the other replica refuses the edge's callers of it too.
    let (status, body) = me_asserted(&s.b, &token).await;
    let took = if is_refused_session(status, &body) {
        Duration::ZERO
    } else {
        time_until("the assertion on B", || async {
            let (status, body) = me_asserted(&s.b, &token).await;
            is_refused_session(status, &body)
        })
        .await
    };
    assert!(took < WITHIN, "{took:?}");
    let client = async_nats::connect(&s.nats.url).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value("revoked")
        .await
        .unwrap();
    let marker = kv
        .get(SessionHash::of(&token).as_str())
        .await
        .unwrap()
        .expect("the revocation marker is written");
    let marker: Value = serde_json::from_slice(&marker).unwrap();
    assert!(
        marker["expires_at_unix"].as_i64().unwrap() > chrono::Utc::now().timestamp(),
        "kept until the session's expiry: {marker}"
    );
}

/// Opens `/events` on `origin` with the token; skips the init frame.
async fn open_stream(origin: &Origin, token: &str) -> SseClient {
    let (sse, init) = open_events(&format!("{}/events", origin.url), token, None, WAIT).await;
    assert_eq!(init.event, "message");
    sse
}

/// Frames until `session/ended`; panics if the stream goes on without one past `within`.
async fn until_session_ended(sse: &mut SseClient, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = sse
            .next(left)
            .await
            .unwrap_or_else(|| panic!("no session/ended within {within:?}"));
        if frame.event == "session/ended" {
            assert_eq!(frame.data["method"], "session/ended", "{:?}", frame.data);
            return frame.data["params"].clone();
        }
    }
}

#[tokio::test]
async fn an_open_sse_stream_ends_within_a_second_of_a_logout_on_the_other_replica() {
    let s = stack(StandInOptions::default(), &[]).await;
    let token = login(&s.a.url, &s.standin, "streaming@example.com").await;
    let mut sse = open_stream(&s.b, &token).await;
    let start = Instant::now();
    logout(&s.a.url, &token).await;
    let params = until_session_ended(&mut sse, WITHIN + Duration::from_millis(500)).await;
    let took = start.elapsed();
    assert_eq!(params["reason"], "logged_out");
    assert!(took < WITHIN, "session/ended after {took:?}");
    assert!(
        sse.next(Duration::from_secs(2)).await.is_none(),
        "the stream closes after session/ended"
    );
    // A new stream for the revoked session is refused outright.
    let r = SseClient::connect(&format!("{}/events", s.b.url), Some(&token), None)
        .await
        .unwrap();
    assert!(
        matches!(r, Err((401, _))),
        "a revoked session opens no stream"
    );
}

#[tokio::test]
async fn an_sse_stream_ends_at_its_sessions_expiry() {
    let s = stack(
        StandInOptions {
            session_ttl_secs: Some(3),
            ..Default::default()
        },
        &[],
    )
    .await;
    let token = login(&s.a.url, &s.standin, "short-lived@example.com").await;
    let (status, body) = validate(&s.a, &token).await;
    assert_eq!(status, 200, "{body}");
    let expires_at = body["expires_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("validate names the expiry")
        .timestamp();
    let mut sse = open_stream(&s.b, &token).await;
    let params = until_session_ended(&mut sse, Duration::from_secs(8)).await;
    assert_eq!(params["reason"], "expired");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (expires_at..=expires_at + 1).contains(&now),
        "ended at {now}, the session expires at {expires_at}"
    );
    assert!(sse.next(Duration::from_secs(2)).await.is_none());
}

#[tokio::test]
async fn a_graphql_ws_socket_closes_4403_within_a_second_of_a_logout_on_the_other_replica() {
    let s = stack(StandInOptions::default(), &[]).await;
    let token = login(&s.a.url, &s.standin, "socket@example.com").await;
    let mut ws = ws_connect(&s.b.url, None).await;
    ws_init(&mut ws, &token).await;
    let ack = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        matches!(&ack, Some(Ok(Message::Text(t))) if t.contains("connection_ack")),
        "{ack:?}"
    );
    let start = Instant::now();
    logout(&s.a.url, &token).await;
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    let took = start.elapsed();
    assert_eq!(code, Some(4403));
    assert!(took < WITHIN, "closed after {took:?}");
}

#[tokio::test]
async fn without_nats_revocations_cannot_be_told_and_callers_get_503_never_200() {
    let mut s = stack(StandInOptions::default(), &[]).await;
    let token = login(&s.a.url, &s.standin, "outage-revocation@example.com").await;
    assert_eq!(validate(&s.b, &token).await.0, 200);
    assert_eq!(me_asserted(&s.b, &token).await.0, 200);
    s.nats.stop();
    wait_for("B refuses the assertion-only caller", WAIT, || async {
        me_asserted(&s.b, &token).await.0 == 503
    })
    .await;
    assert_eq!(s.b.metric("gateway_revocations_current").await, Some(0));
    for _ in 0..5 {
        let (status, body) = me_asserted(&s.b, &token).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "revocations_unavailable", "{body}");
        let (status, body) = validate(&s.b, &token).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "revocations_unavailable", "{body}");
    }
    s.nats.start_again().await.unwrap();
    wait_for("B serves the session again", WAIT, || async {
        me_asserted(&s.b, &token).await.0 == 200 && validate(&s.b, &token).await.0 == 200
    })
    .await;
    assert_eq!(s.b.metric("gateway_revocations_current").await, Some(1));
}

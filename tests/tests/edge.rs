//! The edge worker end to end: `wrangler dev` running the release wasm (`make edge`) in
//! front of a real origin and the NoETL stand-in (issue 4, "Must show").
//!
//! Every test builds its own world — stand-in, origin (trusting the test edge's key),
//! edge — on its own ports, so they run in parallel.

use std::time::{Duration, Instant};

use gateway_shared::assertion::{self, AssertionClaims};
use gateway_shared::session::SessionHash;
use gateway_tests::harness::edge::{
    bundle_dir, test_public_key, Edge, EdgeOptions, ALLOWED_ORIGIN,
};
use gateway_tests::harness::flows::{execute_playbook, graphql, http, login};
use gateway_tests::harness::listener_owned_by;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::sse::SseClient;
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

const ME: &str = "{ me { userId email roles } }";

struct World {
    standin: StandIn,
    origin: Origin,
    edge: Edge,
}

async fn world() -> World {
    // `free_port` releases a port before the child binds it, so under parallel tests a
    // child can lose its port (or be handed the same port twice) and a health check can
    // pass against another test's server. A world whose processes do not own their
    // listeners, or that failed to start, is built again on fresh ports.
    let mut problems = Vec::new();
    for _ in 0..3 {
        let mut standin = match StandIn::start(StandInOptions::default()).await {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("stand-in: {e}"));
                continue;
            }
        };
        let opts = OriginOptions::default().env("EDGE_ASSERTION_PUBLIC_KEY", &test_public_key());
        let mut origin = match Origin::start(&standin, opts).await {
            Ok(o) => o,
            Err(e) => {
                problems.push(format!("origin: {e}"));
                continue;
            }
        };
        let origin_port = origin.url.rsplit(':').next().and_then(|p| p.parse().ok());
        let owned = listener_owned_by(standin.port, &[standin.guard().pid()])
            && origin_port.is_some_and(|p| listener_owned_by(p, &[origin.guard().pid()]));
        if !owned {
            problems.push("a port was taken by another test's process".into());
            continue;
        }
        let edge = Edge::start(&origin.url, EdgeOptions::default())
            .await
            .unwrap();
        if !problems.is_empty() {
            eprintln!("world started after retries: {problems:?}");
        }
        return World {
            standin,
            origin,
            edge,
        };
    }
    panic!("no world started in three attempts: {problems:#?}")
}

/// A counter from the origin's internal `/metrics` (Prometheus text).
async fn metric(origin: &Origin, name: &str) -> u64 {
    let text = http()
        .get(format!("{}/metrics", origin.internal_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .find_map(|rest| rest.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("the origin exports {name}:\n{text}"))
}

/// Validate requests that reached the origin.
async fn validate_count(origin: &Origin) -> u64 {
    metric(origin, "gateway_auth_validate_requests_total").await
}

/// `POST {base}/graphql` → (status, headers, JSON body).
async fn post_graphql(
    base: &str,
    token: Option<&str>,
    query: &str,
    extra: &[(&str, &str)],
) -> (u16, HeaderMap, Value) {
    let mut req = http()
        .post(format!("{base}/graphql"))
        .json(&json!({"query": query}));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
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
            .get(format!("{}/ready", w.edge.url))
            .header("origin", origin)
            .header("x-request-id", "cors-check-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
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

    let (status, _, v) = post_graphql(&w.edge.url, Some(&token), ME, &[]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["me"]["email"], "cached@example.com", "{v}");
    assert_eq!(
        validate_count(&w.origin).await,
        before + 1,
        "the first request with a new token asks the origin once"
    );

    for i in 0..10 {
        let (status, _, v) = post_graphql(&w.edge.url, Some(&token), ME, &[]).await;
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
    let (status, h, v) = post_graphql(&w.edge.url, Some("not-a-real-session"), ME, &[]).await;
    assert_error(status, &v, 401, "invalid_session");
    assert!(header(&h, "content-type").is_some_and(|c| c.contains("application/json")));
    let after_first = validate_count(&w.origin).await;
    assert!(after_first <= before + 1, "{before} → {after_first}");
    for _ in 0..3 {
        let (status, _, v) = post_graphql(&w.edge.url, Some("not-a-real-session"), ME, &[]).await;
        assert_error(status, &v, 401, "invalid_session");
    }
    assert_eq!(
        validate_count(&w.origin).await,
        after_first,
        "a refused token is remembered at the edge (negative cache)"
    );
    let (status, _, v) = post_graphql(&w.edge.url, None, ME, &[]).await;
    assert_error(status, &v, 401, "missing_token");

    // Logout through the edge ends the session and clears the edge's KV entry.
    let token = login(&w.edge.url, &w.standin, "leaving@example.com").await;
    let (status, _, v) = post_graphql(&w.edge.url, Some(&token), ME, &[]).await;
    assert_eq!(status, 200, "{v}");
    let r = http()
        .post(format!("{}/api/auth/logout", w.edge.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, _, v) = post_graphql(&w.edge.url, Some(&token), ME, &[]).await;
    assert_error(status, &v, 401, "invalid_session");
}

#[tokio::test]
async fn sse_through_the_edge_streams_the_init_frame_and_a_result_within_a_second_of_its_callback()
{
    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "stream@example.com").await;
    let mut sse = SseClient::connect(&format!("{}/events", w.edge.url), Some(&token), None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("/events through the edge refused: {s} {b}"));
    let init = sse
        .next(Duration::from_secs(10))
        .await
        .expect("the init frame arrives while the stream is open");
    assert_eq!(init.event, "message");
    assert_eq!(init.retry, Some(2000));
    let client_id = init.data["result"]["clientId"]
        .as_str()
        .expect("init names the client")
        .to_owned();

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
    let (status, _, v) = post_graphql(&w.edge.url, Some("some-new-token"), ME, &[]).await;
    assert_error(status, &v, 502, "origin_unreachable");
    let r = http()
        .get(format!("{}/ready", w.edge.url))
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
    assert_eq!(
        h["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );

    // GraphQL sees the real caller too, whatever the client claims.
    let (status, _, v) = post_graphql(
        &w.edge.url,
        Some(&token),
        ME,
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
        let (status, _, v) = post_graphql(
            &w.origin.url,
            Some(&token),
            ME,
            &[("x-gateway-assertion", a)],
        )
        .await;
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
        let (status, _, v) = post_graphql(&w.edge.url, Some(t), ME, &[]).await;
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
    let burst = headers
        .iter()
        .map(|h| post_graphql(&w.edge.url, Some(&token), ME, h));
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
    let (status, _, v) = post_graphql(
        &w.edge.url,
        Some(&token),
        ME,
        &[("cf-connecting-ip", "10.2.0.1")],
    )
    .await;
    assert_error(status, &v, 429, "rate_limited");
    let (status, _, v) = post_graphql(
        &w.edge.url,
        Some(&other),
        ME,
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
    let burst = (0..61).map(|_| post_graphql(&w.edge.url, None, ME, &one_ip));
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
    let (status, _, v) =
        post_graphql(&w.edge.url, None, ME, &[("cf-connecting-ip", "10.4.0.2")]).await;
    assert_error(status, &v, 401, "missing_token");
    assert_eq!(
        rate_window(),
        window,
        "the test ran past its rate-limit window (too slow a machine): the counts above are not exact"
    );
}

#[tokio::test]
async fn a_graphql_websocket_is_proxied_through_the_edge_after_the_session_check() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let w = world().await;
    let token = login(&w.edge.url, &w.standin, "socket@example.com").await;
    let url = format!("{}/graphql/ws", w.edge.url.replacen("http://", "ws://", 1));
    let request = |bearer: Option<&str>| {
        let mut req = url.as_str().into_client_request().unwrap();
        let h = req.headers_mut();
        h.insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        if let Some(t) = bearer {
            h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    };
    // No token: refused at the edge before any upgrade.
    match tokio_tungstenite::connect_async(request(None)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!(
            "an unauthenticated upgrade went through: {:?}",
            other.map(|_| ())
        ),
    }
    let (mut ws, resp) = tokio_tungstenite::connect_async(request(Some(&token)))
        .await
        .unwrap_or_else(|e| panic!("upgrade through the edge refused: {e}"));
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "graphql-transport-ws"
    );
    ws.send(Message::text(
        json!({"type": "connection_init", "payload": {}}).to_string(),
    ))
    .await
    .unwrap();
    let ack = next_ws_json(&mut ws).await;
    assert_eq!(ack, json!({"type": "connection_ack"}));
    ws.send(Message::text(json!({"type": "ping"}).to_string()))
        .await
        .unwrap();
    assert_eq!(next_ws_json(&mut ws).await["type"], "pong");
    let _ = ws.close(None).await;
}

async fn next_ws_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("the socket ended: {other:?}"),
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

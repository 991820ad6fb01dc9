//! One front door for many services, end to end (issue 15): the generic proxy
//! `/api/v1/{service}/*` against real demo services over HTTP, service events and
//! human-in-the-loop questions across two origin replicas on a real nats-server.

use std::time::{Duration, Instant};

use futures::StreamExt;
use gateway_tests::harness::demo::{DemoOptions, DemoService};
use gateway_tests::harness::flows::{http, login, nats_stack_with, open_events};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{free_port, raw_http, wait_for};
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// The demo service's allow-list as `make dev` registers it.
const DEMO_ALLOW: &str = "GET /echo,POST /echo,GET /slow,GET /stream,POST /ask,GET /answers";

fn demo_env(demo: &DemoService) -> Vec<(String, String)> {
    vec![
        ("SERVICE_DEMO_URL".into(), demo.base_url().to_owned()),
        ("SERVICE_DEMO_ALLOW".into(), DEMO_ALLOW.into()),
    ]
}

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A log line without its terminal colour codes.
fn without_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `GET url` as `token`'s user: the status and the JSON body.
async fn get_as(url: &str, token: &str) -> (StatusCode, Value) {
    json_of(http().get(url).bearer_auth(token).send().await.unwrap()).await
}

async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn two_services_are_routed_by_name_with_the_gateways_identity_and_their_allow_lists() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let other = DemoService::start(DemoOptions {
        name: "other".into(),
        ..DemoOptions::default()
    })
    .await
    .unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let mut env = demo_env(&demo);
    // The second service by the JSON form of SERVICES, without an allow-list.
    env.push((
        "SERVICES".into(),
        json!([{"name": "other", "url": other.base_url()}]).to_string(),
    ));
    let origin = Origin::start(&standin, OriginOptions::default().envs(&as_refs(&env)))
        .await
        .unwrap();
    let token = login(&origin.url, &standin, "svc@example.com").await;

    let resp = http()
        .get(format!(
            "{}/api/v1/demo/echo/x?a=1&session_token={token}",
            origin.url
        ))
        .bearer_auth(&token)
        .header("x-noetl-user-id", "0")
        .header("x-noetl-user-roles", "admin")
        .header("x-noetl-user-email", "admin@example.com")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-gateway-assertion", "forged")
        .header("cookie", format!("session_token={token}"))
        .header("x-request-id", "svc-trace-1")
        .send()
        .await
        .unwrap();
    // The answer keeps the service's length (passed through, not re-chunked).
    assert!(resp.headers().get("transfer-encoding").is_none());
    let declared = resp.content_length();
    let (status, echo) = json_of(resp).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(declared, Some(echo.to_string().len() as u64), "{echo}");
    assert_eq!(echo["service"], "demo");
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/echo/x");
    assert_eq!(
        echo["query"], "a=1",
        "the session token never travels upstream"
    );
    let h = &echo["headers"];
    assert_eq!(h["x-noetl-user-email"], "svc@example.com");
    assert_eq!(h["x-noetl-user-roles"], "user");
    assert_ne!(h["x-noetl-user-id"], "0");
    assert_eq!(h["x-request-id"], "svc-trace-1");
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "the client's claim is replaced"
    );
    for gone in ["authorization", "cookie", "x-gateway-assertion"] {
        assert!(h.get(gone).is_none(), "{gone} reached the service: {h}");
    }
    // A GET goes without a body: no chunked framing, no length.
    assert!(h.get("transfer-encoding").is_none(), "{h}");
    assert!(h.get("content-length").is_none(), "{h}");
    // A sized body goes with its length, not chunked.
    let (status, echo) = json_of(
        http()
            .post(format!("{}/api/v1/demo/echo", origin.url))
            .bearer_auth(&token)
            .body("0123456789")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(echo["body_bytes"], 10);
    assert_eq!(echo["headers"]["content-length"], "10", "{echo}");
    assert!(echo["headers"].get("transfer-encoding").is_none(), "{echo}");

    // One log line per proxied request: the service, where it went (no query), the status
    // and the time.
    let line = origin
        .log_text()
        .lines()
        .find(|l| l.contains("proxied") && l.contains("/echo/x"))
        .map(without_ansi)
        .unwrap_or_else(|| panic!("no proxied line in {}", origin.log_text()));
    for part in [
        "service=\"demo\"",
        &format!(
            "target_url={}/echo/x",
            demo.base_url().trim_end_matches('/')
        ),
        "status=200",
        "duration_ms=",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    assert!(!line.contains("a=1"), "no query in the log line: {line}");

    // The other service, by its own name; no allow-list: every method.
    let (status, echo) = json_of(
        http()
            .delete(format!("{}/api/v1/other/echo", origin.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(
        (echo["service"].as_str(), echo["method"].as_str()),
        (Some("other"), Some("DELETE"))
    );

    // Refusals, each the protocol's JSON error.
    for (method, path, want, code) in [
        ("DELETE", "/api/v1/demo/echo", 405, "method_not_allowed"),
        ("GET", "/api/v1/demo/emit", 403, "proxy_route_forbidden"),
        ("GET", "/api/v1/nosuch/echo", 404, "service_not_found"),
        ("GET", "/api/v1/demo", 404, "not_found"),
        (
            "GET",
            "/api/v1/demo/..%2f_demo/deliveries",
            400,
            "invalid_proxy_path",
        ),
        ("GET", "/api/v1/demo/a//b", 400, "invalid_proxy_path"),
    ] {
        let resp = http()
            .request(method.parse().unwrap(), format!("{}{path}", origin.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(resp).await;
        assert_eq!(status.as_u16(), want, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
    }
    // Written raw: an HTTP client would resolve the dots before sending.
    for path in [
        "/api/v1/demo/echo/%2e%2e/_demo/deliveries",
        "/api/v1/demo/echo/../x",
    ] {
        let (status, body) = raw_http(
            &origin.url,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"),
        )
        .await
        .unwrap();
        assert_eq!(status, 400, "{path}: {body}");
    }
    let (status, body) = json_of(
        http()
            .get(format!("{}/api/v1/demo/echo", origin.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // NoETL is one entry of the same mechanism: `/api/v1/noetl/catalog` is NoETL's
    // `/api/catalog` (the stand-in has no catalog: its own 404 comes back) under PROXY_ALLOW.
    let (status, body) = get_as(&format!("{}/api/v1/noetl/catalog", origin.url), &token).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (404, Some("no route for /api/catalog")),
        "{body}"
    );
    let (status, body) = get_as(
        &format!("{}/api/v1/noetl/auth/sessions", origin.url),
        &token,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "PROXY_ALLOW holds for it too: {body}"
    );
}

#[tokio::test]
async fn a_dead_service_is_502_a_slow_one_504_and_a_streamed_answer_arrives_event_by_event() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut env = demo_env(&demo);
    env.push(("SERVICE_DEMO_TIMEOUT".into(), "1s".into()));
    env.push(("SERVICE_DEAD_URL".into(), dead));
    let origin = Origin::start(&standin, OriginOptions::default().envs(&as_refs(&env)))
        .await
        .unwrap();
    let token = login(&origin.url, &standin, "slow@example.com").await;

    let get = |path: &str| {
        http()
            .get(format!("{}{path}", origin.url))
            .bearer_auth(&token)
            .send()
    };
    let (status, body) = json_of(get("/api/v1/dead/x").await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (502, Some("service_unavailable")),
        "{body}"
    );
    let started = Instant::now();
    let (status, body) = json_of(get("/api/v1/demo/slow?ms=4000").await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (504, Some("service_timeout")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the service's own 1 s timeout, not a longer one"
    );
    let (status, body) = json_of(get("/api/v1/demo/slow?ms=100").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // An upstream SSE stream: the first event is through before the upstream has finished.
    let started = Instant::now();
    let resp = get("/api/v1/demo/stream?count=4&interval_ms=600")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let mut first_at = None;
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if first_at.is_none() && seen.contains("\n\n") {
            first_at = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    let first_at = first_at.expect("an event arrived");
    assert_eq!(seen.matches("event: tick").count(), 4, "{seen}");
    assert!(
        first_at + Duration::from_millis(1200) < total,
        "the first event ({first_at:?}) must not wait for the end ({total:?})"
    );
}

/// The demo service registered on origins sharing one nats-server.
struct World {
    demo: DemoService,
    nats: NatsServer,
    standin: StandIn,
    origins: Vec<Origin>,
}

/// The demo service registered on `replicas` origins sharing one nats-server, aimed at
/// origin `asker`'s internal listener (the one it asks questions and emits events through).
async fn world(replicas: usize, asker: usize) -> World {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let env = demo_env(&demo);
    let (nats, standin, origins) =
        nats_stack_with(replicas, StandInOptions::default(), &as_refs(&env)).await;
    demo.set_gateway(&origins[asker].internal_url, INTERNAL_TOKEN)
        .await;
    World {
        demo,
        nats,
        standin,
        origins,
    }
}

/// Frames of `sse` until one named `event` arrives (pings skipped).
async fn frame_named(sse: &mut SseClient, event: &str) -> SseFrame {
    let frames = sse
        .collect_until(WAIT, |f| f.iter().any(|f| f.event == event))
        .await;
    frames
        .into_iter()
        .find(|f| f.event == event)
        .unwrap_or_else(|| panic!("no {event} frame within {WAIT:?}"))
}

async fn post_json(url: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
    let mut req = http().post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    json_of(req.send().await.unwrap()).await
}

#[tokio::test]
async fn a_service_event_reaches_its_client_on_another_replica_and_is_replayed_after_a_reconnect() {
    let w = world(2, 0).await;
    let (demo, standin) = (&w.demo, &w.standin);
    let (a, b) = (&w.origins[0], &w.origins[1]);
    let token = login(&a.url, standin, "events@example.com").await;
    let other = login(&a.url, standin, "someone-else@example.com").await;

    let (mut sse, init) = open_events(&format!("{}/events", b.url), &token, None, WAIT).await;
    let client = init.data["result"]["clientId"].as_str().unwrap().to_owned();
    // The service publishes through replica A; the stream is on B.
    let (status, body) = post_json(
        &format!("{}/emit", demo.base_url()),
        None,
        json!({"client_id": client, "event": "run.progress", "data": {"pct": 40}}),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["delivered_to"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    let f = frame_named(&mut sse, "service/event").await;
    assert_eq!(
        f.data["params"],
        json!({"service": "demo", "event": "run.progress", "data": {"pct": 40}})
    );
    let seen = sse.last_event_id.clone().unwrap();
    sse.close();

    // Offline: another event; the reconnect (to A this time) replays it, once.
    post_json(
        &format!("{}/emit", demo.base_url()),
        None,
        json!({"client_id": client, "event": "run.complete", "data": {"ok": true}}),
    )
    .await;
    let mut again = SseClient::resume(
        &format!("{}/events?client_id={client}", a.url),
        Some(&token),
        Some(&seen),
    )
    .await
    .unwrap()
    .unwrap();
    let f = frame_named(&mut again, "service/event").await;
    assert_eq!(f.data["params"]["event"], "run.complete");
    again.close();

    // The source design's alias names the frame by its own event.
    let mut alias = SseClient::resume(
        &format!("{}/api/v1/events/{client}", b.url),
        Some(&token),
        Some(&seen),
    )
    .await
    .unwrap()
    .unwrap();
    let init = alias.next(WAIT).await.unwrap();
    assert_eq!(init.event, "connection.established");
    assert_eq!(init.data["client_id"], client.as_str());
    let f = frame_named(&mut alias, "run.complete").await;
    assert_eq!(f.data, json!({"ok": true}));
    alias.close();

    // Another user's client is not the service's to name for someone else's events, and the
    // alias refuses another user's client id.
    let refused = SseClient::connect(
        &format!("{}/api/v1/events/{client}", a.url),
        Some(&other),
        None,
    )
    .await
    .unwrap();
    assert_eq!(refused.err().map(|(s, _)| s), Some(403));
    let (status, body) = post_json(
        &format!("{}/api/internal/events", a.internal_url),
        Some("wrong-token-wrong-token"),
        json!({"service": "demo", "event": "x", "client_id": client}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = post_json(
        &format!("{}/api/internal/events", a.internal_url),
        Some(INTERNAL_TOKEN),
        json!({"service": "demo", "event": "x", "client_id": "no-such-client"}),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("client_not_found")),
        "{body}"
    );
}

/// Asks `client` a question through the public proxy at `base` (an origin or the edge) as
/// `token`'s user.
async fn ask(base: &str, token: &str, client: &str, extra: Value) -> (StatusCode, Value) {
    let mut body =
        json!({"client_id": client, "prompt": "Deploy to production?", "options": ["yes", "no"]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    post_json(&format!("{base}/api/v1/demo/ask"), Some(token), body).await
}

async fn respond(
    base: &str,
    token: &str,
    client: &str,
    qid: &str,
    answer: &str,
) -> (StatusCode, Value) {
    post_json(
        &format!("{base}/api/v1/events/{client}/response"),
        Some(token),
        json!({"question_id": qid, "answer": answer}),
    )
    .await
}

#[tokio::test]
async fn a_question_asked_on_one_replica_is_answered_once_from_another_and_the_asker_gets_one_answer(
) {
    let w = world(2, 0).await;
    let (demo, standin) = (&w.demo, &w.standin);
    let (a, b) = (&w.origins[0], &w.origins[1]);
    let owner = login(&a.url, standin, "approver@example.com").await;
    let intruder = login(&a.url, standin, "intruder@example.com").await;

    // The client is connected to B; the question is asked on A.
    let (mut sse, init) = open_events(&format!("{}/events", b.url), &owner, None, WAIT).await;
    let client = init.data["result"]["clientId"].as_str().unwrap().to_owned();
    let (status, asked) = ask(&a.url, &owner, &client, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let qid = asked["question_id"].as_str().unwrap().to_owned();
    let q = frame_named(&mut sse, "question").await;
    assert_eq!(q.data["params"]["question_id"], qid.as_str());
    assert_eq!(q.data["params"]["prompt"], "Deploy to production?");
    assert_eq!(q.data["params"]["options"], json!(["yes", "no"]));
    assert_eq!(
        demo.answer(&qid).await,
        None,
        "unanswered: 404 at the service"
    );

    // Nobody asks someone else's client through a service (the demo names the caller as the
    // user), and a service cannot have answers sent anywhere but under a registered base.
    let (s, body) = ask(&a.url, &intruder, &client, json!({})).await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (404, Some("client_not_found")),
        "{body}"
    );
    for reply_to in [
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.1:1/answers",
    ] {
        let (s, body) = post_json(
            &format!("{}/api/internal/questions", a.internal_url),
            Some(INTERNAL_TOKEN),
            json!({"service": "demo", "client_id": client, "prompt": "?", "reply_to": {"url": reply_to}}),
        )
        .await;
        assert_eq!(
            (s.as_u16(), body["error"]["code"].as_str()),
            (400, Some("reply_to_not_allowed")),
            "{reply_to}: {body}"
        );
    }

    // Nobody else answers it: another user (even naming the right client), an answer
    // that is not an option, a question id that is not one.
    let (s, body) = respond(&a.url, &intruder, &client, &qid, "yes").await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (404, Some("question_not_found")),
        "{body}"
    );
    let (s, body) = respond(&a.url, &owner, &client, &qid, "maybe").await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_answer")),
        "{body}"
    );
    let (s, _) = respond(
        &a.url,
        &owner,
        &client,
        "q-00000000000000000000000000000000",
        "yes",
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The owner answers on A (the stream is on B); then on B again: 409.
    let (s, body) = respond(&a.url, &owner, &client, &qid, "yes").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = respond(&b.url, &owner, &client, &qid, "no").await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (409, Some("question_closed")),
        "{body}"
    );
    let answered = frame_named(&mut sse, "question/answered").await;
    assert_eq!(
        answered.data["params"],
        json!({"question_id": qid, "answer": "yes"})
    );

    wait_for("the asker has the answer", WAIT, || async {
        demo.answer(&qid).await.is_some()
    })
    .await;
    let got = demo.answer(&qid).await.unwrap();
    assert_eq!(got["answer"], "yes");
    assert_eq!(got["status"], "answered");
    assert_eq!(got["user"]["email"], "approver@example.com");
    // Exactly one delivery, carrying the question id as its idempotency key — also after
    // both replicas' sweeps have had time to look for undelivered outcomes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let deliveries = demo.deliveries_of(&qid).await;
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].idempotency_key.as_deref(), Some(qid.as_str()));

    // GraphQL sees nothing pending now.
    let v = gateway_tests::harness::flows::graphql(
        &a.url,
        &owner,
        "query($c: String!) { pendingQuestions(clientId: $c) { questionId } }",
        json!({"c": client}),
    )
    .await;
    assert_eq!(v["data"]["pendingQuestions"], json!([]), "{v}");
}

#[tokio::test]
async fn an_unanswered_question_expires_with_a_frame_and_a_notice_to_the_asker() {
    let w = world(2, 1).await;
    let (demo, standin) = (&w.demo, &w.standin);
    let (a, b) = (&w.origins[0], &w.origins[1]);
    let owner = login(&a.url, standin, "late@example.com").await;
    let (mut sse, init) = open_events(&format!("{}/events", a.url), &owner, None, WAIT).await;
    let client = init.data["result"]["clientId"].as_str().unwrap().to_owned();

    let (status, asked) = ask(&b.url, &owner, &client, json!({"timeout_seconds": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let qid = asked["question_id"].as_str().unwrap().to_owned();
    frame_named(&mut sse, "question").await;
    let expired = frame_named(&mut sse, "question/expired").await;
    assert_eq!(expired.data["params"]["question_id"], qid.as_str());
    wait_for("the asker is told", WAIT, || async {
        demo.answer(&qid).await.is_some()
    })
    .await;
    assert_eq!(demo.answer(&qid).await.unwrap()["status"], "expired");
    let (s, body) = respond(&a.url, &owner, &client, &qid, "yes").await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (409, Some("question_closed")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        demo.deliveries_of(&qid).await.len(),
        1,
        "one notice, not one per replica"
    );
}

#[tokio::test]
async fn a_client_offline_when_asked_gets_the_question_on_reconnect_and_a_refused_delivery_is_retried(
) {
    let w = world(2, 0).await;
    let (demo, standin) = (&w.demo, &w.standin);
    let (a, b) = (&w.origins[0], &w.origins[1]);
    let owner = login(&a.url, standin, "offline@example.com").await;
    let (sse, init) = open_events(&format!("{}/events", a.url), &owner, None, WAIT).await;
    let client = init.data["result"]["clientId"].as_str().unwrap().to_owned();
    sse.close();

    let (status, asked) = ask(&a.url, &owner, &client, json!({"options": []})).await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let qid = asked["question_id"].as_str().unwrap().to_owned();

    // Back, on the other replica: the init frame lists it, and the frame is replayed.
    let (mut sse, init) = open_events(
        &format!("{}/events?client_id={client}", b.url),
        &owner,
        None,
        WAIT,
    )
    .await;
    let pending = &init.data["result"]["pendingQuestions"];
    assert_eq!(pending[0]["question_id"], qid.as_str(), "{init:?}");
    assert_eq!(pending[0]["options"], json!([]));
    let q = frame_named(&mut sse, "question").await;
    assert_eq!(q.data["params"]["question_id"], qid.as_str());

    // A free-text answer; the asker refuses the first two deliveries: retried until taken.
    demo.refuse_answers(2, 503).await;
    let (s, body) = respond(&b.url, &owner, &client, &qid, "ship it on Monday").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    wait_for(
        "the retried delivery is taken",
        Duration::from_secs(20),
        || async { demo.answer(&qid).await.is_some() },
    )
    .await;
    assert_eq!(
        demo.answer(&qid).await.unwrap()["answer"],
        "ship it on Monday"
    );
    assert_eq!(demo.refused_answers().await, 2);
    assert_eq!(demo.deliveries_of(&qid).await.len(), 1);
}

#[tokio::test]
async fn through_the_edge_services_are_routed_by_name_and_a_question_is_answered() {
    use gateway_tests::harness::edge::EdgeWorld;
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let other = DemoService::start(DemoOptions {
        name: "other".into(),
        ..DemoOptions::default()
    })
    .await
    .unwrap();
    let mut env = demo_env(&demo);
    env.push(("SERVICE_OTHER_URL".into(), other.base_url().to_owned()));
    let world = EdgeWorld::start(OriginOptions::default().envs(&as_refs(&env))).await;
    demo.set_gateway(&world.origin.internal_url, INTERNAL_TOKEN)
        .await;
    let edge = &world.edge.url;
    let token = login(edge, &world.standin, "edge-svc@example.com").await;

    for (name, path) in [
        ("demo", "/api/v1/demo/echo/a?b=1"),
        ("other", "/api/v1/other/echo"),
    ] {
        let resp = http()
            .get(format!("{edge}{path}"))
            .bearer_auth(&token)
            .header("x-noetl-user-email", "forged@example.com")
            .header("x-gateway-assertion", "forged")
            .send()
            .await
            .unwrap();
        let (status, echo) = json_of(resp).await;
        assert_eq!(status, StatusCode::OK, "{path}: {echo}");
        assert_eq!(echo["service"], name);
        assert_eq!(
            echo["headers"]["x-noetl-user-email"],
            "edge-svc@example.com"
        );
        assert!(
            echo["headers"].get("x-gateway-assertion").is_none(),
            "{echo}"
        );
        assert!(echo["headers"].get("authorization").is_none(), "{echo}");
    }
    let (status, body) = get_as(&format!("{edge}/api/v1/nosuch/x"), &token).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("service_not_found")),
        "{body}"
    );
    let (status, _) = json_of(
        http()
            .get(format!("{edge}/api/v1/demo/echo"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the edge wants a session");

    // The alias stream through the edge; a question asked and answered through it.
    let client = format!("edge-{}", free_port());
    let mut sse = SseClient::connect(
        &format!("{edge}/api/v1/events/{client}"),
        Some(&token),
        None,
    )
    .await
    .unwrap()
    .unwrap_or_else(|(s, b)| panic!("alias refused: {s} {b}"));
    let init = sse.next(WAIT).await.unwrap();
    assert_eq!(init.event, "connection.established", "{init:?}");
    let (status, asked) = ask(edge, &token, &client, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let qid = asked["question_id"].as_str().unwrap().to_owned();
    let q = frame_named(&mut sse, "question").await;
    assert_eq!(
        q.data["question_id"],
        qid.as_str(),
        "the alias carries the params as data"
    );
    let (s, body) = respond(edge, &token, &client, &qid, "no").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    wait_for("the asker has the answer", WAIT, || async {
        demo.answer(&qid).await.is_some()
    })
    .await;
    assert_eq!(demo.answer(&qid).await.unwrap()["answer"], "no");
}

#[tokio::test]
async fn an_answer_can_go_to_the_askers_nats_subject_once_retained_and_never_to_the_gateways_own() {
    use async_nats::jetstream::{self, stream};
    let w = world(1, 0).await;
    let (standin, nats) = (&w.standin, &w.nats);
    let origin = &w.origins[0];
    let owner = login(&origin.url, standin, "subject@example.com").await;
    let (mut sse, init) = open_events(&format!("{}/events", origin.url), &owner, None, WAIT).await;
    let client = init.data["result"]["clientId"].as_str().unwrap().to_owned();

    // The asker's own stream captures its answers subject.
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let answers = js
        .create_stream(stream::Config {
            name: "DEMO_ANSWERS".into(),
            subjects: vec!["demo.answers.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let internal = format!("{}/api/internal/questions", origin.internal_url);
    for subject in [
        "gateway.clients.victim",
        "noetl.events.x",
        "$KV.questions.x",
        "demo.*",
    ] {
        let (s, body) = post_json(
            &internal,
            Some(INTERNAL_TOKEN),
            json!({"service": "demo", "client_id": client, "prompt": "?", "reply_to": {"subject": subject}}),
        )
        .await;
        assert_eq!(
            (s.as_u16(), body["error"]["code"].as_str()),
            (400, Some("reply_to_not_allowed")),
            "{subject}: {body}"
        );
    }
    let (s, asked) = post_json(
        &internal,
        Some(INTERNAL_TOKEN),
        json!({"service": "demo", "client_id": client, "prompt": "Ship?", "options": ["yes", "no"],
               "reply_to": {"subject": "demo.answers.q"}, "context": {"ticket": 42}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{asked}");
    let qid = asked["question_id"].as_str().unwrap().to_owned();
    frame_named(&mut sse, "question").await;
    let (s, body) = respond(&origin.url, &owner, &client, &qid, "yes").await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let mut info = answers.clone();
    wait_for("the answer is retained on the asker's stream", WAIT, || {
        let mut s = info.clone();
        async move { s.info().await.map(|i| i.state.messages).unwrap_or(0) >= 1 }
    })
    .await;
    let msg = answers
        .get_last_raw_message_by_subject("demo.answers.q")
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(body["question_id"], qid.as_str());
    assert_eq!(body["answer"], "yes");
    assert_eq!(body["context"], json!({"ticket": 42}));
    assert_eq!(
        msg.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(qid.as_str()),
        "the question id is the message's idempotency key"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        info.info().await.unwrap().state.messages,
        1,
        "published once"
    );
}

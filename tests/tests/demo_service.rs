//! Integration tests of the demo backend stand-in itself: the real `demo-service` binary
//! over loopback HTTP, and a tiny axum server playing the gateway's internal listener where
//! questions and events are relayed. Every test builds its own world on free ports.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use gateway_tests::harness::demo::{DemoOptions, DemoService};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-internal-service-token";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .expect("a default reqwest client builds")
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("the demo service answers");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("a valid status");
    let text = resp.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, body)
}

/// Asserts the gateway's error shape and returns the code.
fn error_code(body: &Value) -> &str {
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not a {{error:{{code,message}}}} body: {body}"));
    assert!(body["error"]["message"].is_string(), "{body}");
    code
}

/// One request the fake gateway received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// A stand-in for the origin's internal listener: records every POST and answers
/// questions 201 (404 `client_not_found` for the client `someone-elses`) and events 202.
struct FakeGateway {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeGateway {
    async fn start() -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        async fn record(
            State(rec): State<Arc<Mutex<Vec<Received>>>>,
            uri: Uri,
            headers: HeaderMap,
            Json(body): Json<Value>,
        ) -> (StatusCode, Json<Value>) {
            rec.lock().unwrap().push(Received {
                path: uri.path().to_owned(),
                authorization: headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: body.clone(),
            });
            match uri.path() {
                _ if body["client_id"] == "someone-elses" => (
                    StatusCode::NOT_FOUND,
                    Json(
                        json!({"error": {"code": "client_not_found", "message": "no such client of this user"}}),
                    ),
                ),
                "/api/internal/questions" => (
                    StatusCode::CREATED,
                    Json(json!({"question_id": "q-0123456789abcdef0123456789abcdef",
                                "expires_at": "2026-12-03T22:00:00Z"})),
                ),
                _ => (StatusCode::ACCEPTED, Json(json!({"delivered_to": 1}))),
            }
        }
        let app = Router::new()
            .route("/api/internal/questions", post(record))
            .route("/api/internal/events", post(record))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback has a free port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, received }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn demo_with(gateway: &FakeGateway) -> DemoService {
    DemoService::start(DemoOptions {
        name: "demo".into(),
        gateway_internal_url: Some(gateway.url.clone()),
        internal_token: Some(TOKEN.into()),
    })
    .await
    .expect("demo-service starts")
}

#[tokio::test]
async fn echo_reports_method_path_query_headers_and_body_size() {
    let demo = DemoService::start(DemoOptions {
        name: "svc_a".into(),
        ..DemoOptions::default()
    })
    .await
    .unwrap();
    let (status, v) = send(
        http()
            .put(format!("{}/echo/a/b%20c?x=1&y=two&x=3", demo.base_url()))
            .header("x-noetl-user-id", "u-42")
            .header("X-Custom", "Mixed Case")
            .header("x-multi", "one")
            .header("x-multi", "two")
            .body("hello"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["service"], "svc_a");
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/echo/a/b%20c");
    assert_eq!(v["query"], "x=1&y=two&x=3");
    assert_eq!(v["headers"]["x-noetl-user-id"], "u-42");
    assert_eq!(v["headers"]["x-custom"], "Mixed Case");
    assert_eq!(v["headers"]["x-multi"], "one, two");
    assert!(
        v["header_names"]
            .as_array()
            .unwrap()
            .contains(&json!("x-custom")),
        "{v}"
    );
    assert_eq!(v["body_bytes"], 5);

    let (status, v) = send(http().get(format!("{}/echo", demo.base_url()))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/echo");
    assert_eq!(v["query"], Value::Null);
    assert_eq!(v["body_bytes"], 0);
}

#[tokio::test]
async fn slow_answers_only_after_waiting_and_refuses_a_wait_past_its_ceiling() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let started = Instant::now();
    let (status, v) = send(http().get(format!("{}/slow?ms=400", demo.base_url()))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({"slept_ms": 400}));
    assert!(started.elapsed() >= Duration::from_millis(400));

    for bad in ["ms=600001", "ms=-1", "ms=soon"] {
        let (status, v) = send(http().get(format!("{}/slow?{bad}", demo.base_url()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(error_code(&v), "invalid_query");
    }
}

#[tokio::test]
async fn stream_writes_each_tick_when_due_and_the_first_before_the_stream_ends() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let started = Instant::now();
    let resp = http()
        .get(format!(
            "{}/stream?count=3&interval_ms=500",
            demo.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");

    // Each complete event (blank-line terminated) with the moment its last byte arrived.
    let mut events: Vec<(Duration, String)> = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            events.push((started.elapsed(), buf[..end].to_owned()));
            buf.drain(..end + 2);
        }
    }
    let ended = started.elapsed();

    let texts: Vec<&str> = events.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        [1, 2, 3]
            .map(|i| format!("event: tick\nid: {i}\ndata: {{\"i\":{i}}}"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "the events as written"
    );
    // Two 500 ms pauses: the first tick arrived at least ~1 s before the stream ended,
    // and no two ticks arrived together (not buffered into one write).
    assert!(
        events[0].0 + Duration::from_millis(800) <= ended,
        "first tick at {:?}, end at {ended:?}",
        events[0].0
    );
    for pair in events.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= Duration::from_millis(300),
            "ticks arrived together: {events:?}"
        );
    }

    let (status, v) = send(http().get(format!("{}/stream?count=10001", demo.base_url()))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&v), "invalid_query");
}

#[tokio::test]
async fn ask_relays_the_question_to_the_gateway_as_the_calling_user_and_answers_its_question_id() {
    let gateway = FakeGateway::start().await;
    let demo = demo_with(&gateway).await;
    let (status, v) = send(
        http()
            .post(format!("{}/ask", demo.base_url()))
            .header("x-noetl-user-id", "u-42")
            .json(
                &json!({"client_id": "c-1", "prompt": "Approve?", "options": ["yes", "no"],
                          "timeout_seconds": 60, "user_id": "u-forged"}),
            ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["question_id"], "q-0123456789abcdef0123456789abcdef");

    let got = gateway.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].path, "/api/internal/questions");
    assert_eq!(
        got[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        got[0].body,
        json!({
            "service": "demo",
            "client_id": "c-1",
            "user_id": "u-42",
            "prompt": "Approve?",
            "options": ["yes", "no"],
            "timeout_seconds": 60,
            "reply_to": {"url": format!("{}/answers", demo.base_url())},
        }),
        "the user is the header's, never the body's"
    );
}

#[tokio::test]
async fn ask_relays_the_gateways_error_and_refuses_a_caller_without_identity() {
    let gateway = FakeGateway::start().await;
    let demo = demo_with(&gateway).await;
    let (status, v) = send(
        http()
            .post(format!("{}/ask", demo.base_url()))
            .header("x-noetl-user-id", "u-42")
            .json(&json!({"client_id": "someone-elses", "prompt": "Approve?"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(error_code(&v), "client_not_found");

    let (status, v) = send(
        http()
            .post(format!("{}/ask", demo.base_url()))
            .json(&json!({"client_id": "c-1", "prompt": "Approve?"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(error_code(&v), "missing_identity");

    let (status, v) = send(
        http()
            .post(format!("{}/ask", demo.base_url()))
            .header("x-noetl-user-id", "u-42")
            .json(&json!({"client_id": "c-1"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_code(&v), "invalid_json");
    assert_eq!(
        gateway.received().len(),
        1,
        "only the well-formed, identified ask reached the gateway"
    );
}

#[tokio::test]
async fn without_a_gateway_ask_is_503_an_unreachable_one_502_and_one_set_later_is_used() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let ask = || {
        http()
            .post(format!("{}/ask", demo.base_url()))
            .header("x-noetl-user-id", "u-42")
            .json(&json!({"client_id": "c-1", "prompt": "Approve?"}))
    };
    let (status, v) = send(ask()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(error_code(&v), "gateway_not_configured");

    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    demo.set_gateway(&format!("http://127.0.0.1:{closed}"), TOKEN)
        .await;
    let (status, v) = send(ask()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{v}");
    assert_eq!(error_code(&v), "gateway_unavailable");

    let gateway = FakeGateway::start().await;
    demo.set_gateway(&gateway.url, TOKEN).await;
    let (status, v) = send(ask()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(gateway.received().len(), 1);

    let (status, v) = send(
        http()
            .post(format!("{}/_demo/gateway", demo.base_url()))
            .json(&json!({"url": "file:///etc/passwd"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_code(&v), "invalid_url");
}

#[tokio::test]
async fn an_answer_is_404_until_delivered_then_the_first_delivery_with_every_duplicate_recorded() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let q = "q-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    assert_eq!(demo.answer(q).await, None);
    let (status, v) = send(http().get(format!("{}/answers/{q}", demo.base_url()))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "answer_not_found");

    let delivery = json!({"question_id": q, "status": "answered", "answer": "yes",
                          "user": {"user_id": "u-42", "email": "ada@example.com"},
                          "client_id": "c-1", "answered_at": "2026-12-03T21:00:00Z"});
    for _ in 0..2 {
        let (status, v) = send(
            http()
                .post(format!("{}/answers", demo.base_url()))
                .header("idempotency-key", q)
                .json(&delivery),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let answer = demo.answer(q).await.expect("answered");
    assert_eq!(answer["status"], "answered");
    assert_eq!(answer["answer"], "yes");
    assert_eq!(
        answer["user"],
        json!({"user_id": "u-42", "email": "ada@example.com"})
    );

    let expired = "q-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let (status, _) = send(
        http()
            .post(format!("{}/answers", demo.base_url()))
            .header("idempotency-key", expired)
            .json(&json!({"question_id": expired, "status": "expired",
                          "expired_at": "2026-12-03T21:05:00Z"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer = demo.answer(expired).await.expect("expired");
    assert_eq!(answer["status"], "expired");
    assert_eq!(answer["answer"], Value::Null);
    assert_eq!(answer["user"], Value::Null);

    let all = demo.deliveries().await;
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(demo.deliveries_of(q).await.len(), 2);
    assert!(all
        .iter()
        .all(|d| d.idempotency_key.as_deref() == Some(d.question_id.as_str())));
    assert_eq!(all[0].body, delivery);

    let (status, v) = send(
        http()
            .post(format!("{}/answers", demo.base_url()))
            .json(&json!({"status": "answered"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&v), "invalid_delivery");
    assert_eq!(
        demo.deliveries().await.len(),
        3,
        "a bad delivery is not recorded"
    );
}

#[tokio::test]
async fn emit_relays_the_event_to_the_gateway_under_the_services_name() {
    let gateway = FakeGateway::start().await;
    let demo = demo_with(&gateway).await;
    let (status, v) = send(
        http()
            .post(format!("{}/emit", demo.base_url()))
            .json(&json!({"client_id": "c-1", "event": "run.progress", "data": {"pct": 40}})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v, json!({"delivered_to": 1}));
    let got = gateway.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/api/internal/events");
    assert_eq!(
        got[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        got[0].body,
        json!({"service": "demo", "client_id": "c-1", "event": "run.progress", "data": {"pct": 40}})
    );

    let (status, v) = send(
        http()
            .post(format!("{}/emit", demo.base_url()))
            .json(&json!({"client_id": "someone-elses", "user_id": "u-1", "event": "x"})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the gateway's status, relayed: {v}"
    );
    assert_eq!(error_code(&v), "client_not_found");
    assert_eq!(gateway.received()[1].body["data"], Value::Null);
}

#[tokio::test]
async fn hostile_input_gets_json_errors_and_the_service_keeps_serving() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let base = demo.base_url();
    let big = vec![b'x'; (1 << 20) + 1];

    let (status, v) = send(http().post(format!("{base}/echo")).body(big.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(error_code(&v), "payload_too_large");
    let (status, v) = send(
        http()
            .post(format!("{base}/answers"))
            .header("content-type", "application/json")
            .body(big),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(error_code(&v), "payload_too_large");

    let (status, v) = send(http().post(format!("{base}/answers")).body("{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&v), "invalid_json");

    let (status, v) = send(http().get(format!("{base}/nowhere"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "route_not_found");

    let (status, v) = send(http().delete(format!("{base}/ask"))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&v), "method_not_allowed");

    let (status, v) = send(http().get(format!("{base}/health"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["service"], "demo");
}

#[tokio::test]
async fn refused_deliveries_fail_with_the_asked_status_and_are_not_recorded() {
    let demo = DemoService::start(DemoOptions::default()).await.unwrap();
    let q = "q-cccccccccccccccccccccccccccccccc";
    let delivery = json!({"question_id": q, "status": "answered", "answer": "no",
                          "user": {"user_id": "u-42", "email": "ada@example.com"}});
    demo.refuse_answers(2, 503).await;
    let post = || {
        http()
            .post(format!("{}/answers", demo.base_url()))
            .header("idempotency-key", q)
            .json(&delivery)
    };
    for _ in 0..2 {
        let (status, v) = send(post()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(error_code(&v), "delivery_refused");
    }
    assert_eq!(
        demo.answer(q).await,
        None,
        "a refused delivery is not an answer"
    );
    let (status, _) = send(post()).await;
    assert_eq!(status, StatusCode::OK, "refusals ran out");
    assert_eq!(demo.answer(q).await.unwrap()["answer"], "no");
    assert_eq!(demo.deliveries_of(q).await.len(), 1);
    assert_eq!(demo.refused_answers().await, 2);

    let (status, v) = send(
        http()
            .post(format!("{}/_demo/refuse-answers", demo.base_url()))
            .json(&json!({"count": 1, "status": 200})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_code(&v), "invalid_status");
}

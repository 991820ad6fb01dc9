//! W3C trace context end to end: a client's `traceparent` survives client → edge (the
//! release wasm under `wrangler dev`) → origin → NoETL stand-in, on a `/noetl` proxy call
//! and on a playbook start through GraphQL; the origin's own span is the parent NoETL
//! sees, and NoETL gets the request's `x-request-id`. Straight at the origin without a
//! `traceparent`, the origin starts a trace: the stand-in sees a valid fresh one, and the
//! origin's JSON access-log line carries the same trace id.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, the origin exports its request span over
//! OTLP/HTTP in the same trace, with the ids NoETL was sent.
//!
//! The stand-in records the headers of every `/api/*` call (`/_standin/traces`).

use std::time::Duration;

use gateway_tests::harness::edge::EdgeWorld;
use gateway_tests::harness::flows::{http, login};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::wait_for;
use gateway_tests::standin::control::TracedCall;
use serde_json::{json, Value};

/// The client's trace: W3C's example ids.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent() -> String {
    format!("00-{TRACE_ID}-{CLIENT_SPAN}-01")
}

/// `(trace id, parent span id, flags)` of a `traceparent` that must be valid version 00.
fn parts(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00", "{tp}");
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && s.bytes().any(|b| b != b'0')
    };
    assert!(hex(p[1], 32), "trace id of {tp}");
    assert!(hex(p[2], 16), "parent id of {tp}");
    assert_eq!(p[3].len(), 2, "{tp}");
    (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
}

/// The stand-in's calls to `call` (e.g. `GET /api/catalog/playbooks`).
async fn calls_to(standin: &StandIn, call: &str) -> Vec<TracedCall> {
    standin
        .traces()
        .await
        .into_iter()
        .filter(|c| c.call == call)
        .collect()
}

/// The origin's JSON access-log line for `request_id` at `path` (waits for it: the line
/// is written a moment after the answer). The path matters: the edge's own session check
/// at the origin shares the client request's id.
async fn access_line(origin: &Origin, request_id: &str, path: &str) -> Value {
    let find = || {
        origin.log_text().lines().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["target"] == "access" && v["request_id"] == request_id && v["path"] == path)
                .then_some(v)
        })
    };
    wait_for("the access-log line", Duration::from_secs(5), || async {
        find().is_some()
    })
    .await;
    find().unwrap()
}

#[tokio::test]
async fn the_client_trace_id_reaches_noetl_through_edge_and_origin() {
    let w = EdgeWorld::start(OriginOptions::default().env("LOG_FORMAT", "json")).await;
    let token = login(&w.edge.url, &w.standin, "trace@example.com").await;
    w.standin.reset_calls().await;

    // A /noetl proxy call.
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", w.edge.url))
        .bearer_auth(&token)
        .header("traceparent", client_traceparent())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r
        .headers()
        .get("x-request-id")
        .expect("the answer names its request id")
        .to_str()
        .unwrap()
        .to_owned();
    let seen = calls_to(&w.standin, "GET /api/catalog/playbooks").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (trace, parent, flags) = parts(seen[0].traceparent.as_deref().expect("traceparent"));
    assert_eq!(trace, TRACE_ID, "the client's trace continues to NoETL");
    assert_ne!(parent, CLIENT_SPAN, "NoETL's parent is the origin's span");
    assert_eq!(flags, "01", "sampled stays sampled");
    assert_eq!(seen[0].request_id.as_deref(), Some(request_id.as_str()));
    // The origin's access line: same trace, its span is NoETL's parent, and it continued
    // a span from upstream (the edge's own span, whose parent is the client's).
    let line = access_line(&w.origin, &request_id, "/noetl/catalog/playbooks").await;
    assert_eq!(line["trace_id"], TRACE_ID, "{line}");
    assert_eq!(line["span_id"], parent.as_str(), "{line}");
    let upstream = line["parent_span_id"].as_str().unwrap_or_default();
    assert_eq!(upstream.len(), 16, "{line}");
    assert_ne!(upstream, parent, "{line}");
    assert_eq!(line["route"], "/noetl/{*rest}", "{line}");
    assert_eq!(line["path"], "/noetl/catalog/playbooks", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["severity"], "INFO", "{line}");

    // A playbook start through GraphQL: the access check and the execute both carry it.
    w.standin.reset_calls().await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("traceparent", client_traceparent().parse().unwrap());
    let v = http()
        .post(format!("{}/graphql", w.edge.url))
        .bearer_auth(&token)
        .headers(headers)
        .json(&json!({
            "query": gateway_tests::harness::flows::EXECUTE_PLAYBOOK,
            "variables": {"path": "demo/echo", "workload": {}, "clientId": null},
        }))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert!(
        v["data"]["executePlaybook"]["executionId"].is_string(),
        "{v}"
    );
    let seen = calls_to(&w.standin, "POST /api/execute").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (trace, parent, _) = parts(seen[0].traceparent.as_deref().expect("traceparent"));
    assert_eq!(trace, TRACE_ID);
    assert_ne!(parent, CLIENT_SPAN);
    let gql_request_id = seen[0].request_id.clone().expect("x-request-id");
    let line = access_line(&w.origin, &gql_request_id, "/graphql").await;
    assert_eq!(line["route"], "/graphql", "{line}");
    assert_eq!(line["span_id"], parent.as_str(), "{line}");
    for c in w.standin.traces().await {
        let (trace, ..) = parts(c.traceparent.as_deref().expect("every call is traced"));
        assert_eq!(trace, TRACE_ID, "{c:?}");
        assert_eq!(
            c.request_id.as_deref(),
            Some(gql_request_id.as_str()),
            "{c:?}"
        );
    }
}

#[tokio::test]
async fn without_a_traceparent_the_origin_starts_a_trace_and_logs_it() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::default().env("LOG_FORMAT", "json"))
        .await
        .unwrap();
    let token = login(&origin.url, &standin, "fresh@example.com").await;
    standin.reset_calls().await;
    let r = http()
        .get(format!(
            "{}/noetl/catalog/playbooks?session_token=hidden",
            origin.url
        ))
        .bearer_auth(&token)
        .header("traceparent", "00-not-a-valid-traceparent-01")
        .header("x-request-id", "client-chosen-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = calls_to(&standin, "GET /api/catalog/playbooks").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (trace, parent, _) = parts(seen[0].traceparent.as_deref().expect("traceparent"));
    assert_eq!(seen[0].request_id.as_deref(), Some("client-chosen-id-1"));
    let line = access_line(&origin, "client-chosen-id-1", "/noetl/catalog/playbooks").await;
    assert_eq!(line["trace_id"], trace.as_str(), "{line}");
    assert_eq!(line["span_id"], parent.as_str(), "{line}");
    assert!(
        line.get("parent_span_id").is_none(),
        "a fresh trace: {line}"
    );
    assert_eq!(line["path"], "/noetl/catalog/playbooks", "no query: {line}");
    assert_eq!(line["method"], "GET");
    assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    assert!(
        !origin.log_text().contains("hidden"),
        "queries never reach the log"
    );

    // Every line written while answering carries the request's trace; the others none.
    let log = origin.log_text();
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(lines.iter().all(|v| v["severity"].is_string()));
    let traced: Vec<&Value> = lines
        .iter()
        .filter(|v| v["request_id"] == "client-chosen-id-1")
        .collect();
    assert!(!traced.is_empty());
    assert!(traced.iter().all(|v| v["trace_id"] == trace.as_str()));

    // Two requests, two traces.
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = calls_to(&standin, "GET /api/catalog/playbooks").await;
    assert_eq!(seen.len(), 2);
    let (second, ..) = parts(seen[1].traceparent.as_deref().unwrap());
    assert_ne!(second, trace);
}

/// The edge mints a `traceparent` for a client that sends none (issue 14, the edge's
/// part): the origin continues the edge's trace, so its access line names a parent span.
#[tokio::test]
async fn without_a_client_traceparent_the_origin_continues_the_edges_trace() {
    let w = EdgeWorld::start(OriginOptions::default().env("LOG_FORMAT", "json")).await;
    let token = login(&w.edge.url, &w.standin, "minted@example.com").await;
    w.standin.reset_calls().await;
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", w.edge.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let seen = calls_to(&w.standin, "GET /api/catalog/playbooks").await;
    let (trace, parent, _) = parts(seen[0].traceparent.as_deref().expect("traceparent"));
    let line = access_line(&w.origin, &request_id, "/noetl/catalog/playbooks").await;
    assert_eq!(line["trace_id"], trace.as_str(), "{line}");
    assert_eq!(line["span_id"], parent.as_str(), "{line}");
    let edge_span = line["parent_span_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the origin got no traceparent from the edge: {line}"));
    assert_eq!(edge_span.len(), 16);
    assert_ne!(edge_span, parent);
}

/// A one-route OTLP/HTTP collector on a free loopback port: the bodies POSTed to
/// `/v1/traces`, with their content types.
async fn collector() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>,
) {
    use axum::routing::post;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let sink = sink.clone();
            async move {
                let ct = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                sink.lock().unwrap().push((ct, body.to_vec()));
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

#[tokio::test]
async fn with_an_otlp_endpoint_the_request_span_is_exported_in_the_client_trace() {
    let (endpoint, got) = collector().await;
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().envs(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "gateway-under-test"),
        ]),
    )
    .await
    .unwrap();
    let token = login(&origin.url, &standin, "otlp@example.com").await;
    standin.reset_calls().await;
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", origin.url))
        .bearer_auth(&token)
        .header("traceparent", client_traceparent())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = calls_to(&standin, "GET /api/catalog/playbooks").await;
    let (trace, origin_span, _) = parts(seen[0].traceparent.as_deref().expect("traceparent"));
    assert_eq!(trace, TRACE_ID);
    // The exported protobuf holds the ids as raw bytes: the trace, the origin's span (the
    // parent NoETL was sent), and the client's span as its parent.
    let ids = [TRACE_ID, origin_span.as_str(), CLIENT_SPAN].map(|h| hex::decode(h).unwrap());
    let has = |body: &[u8], id: &[u8]| body.windows(id.len()).any(|w| w == id);
    wait_for(
        "the request span at the collector",
        Duration::from_secs(10),
        || {
            let got = got.clone();
            let ids = ids.clone();
            async move {
                got.lock()
                    .unwrap()
                    .iter()
                    .any(|(_, body)| ids.iter().all(|id| has(body, id)))
            }
        },
    )
    .await;
    let bodies = got.lock().unwrap().clone();
    assert!(bodies
        .iter()
        .all(|(ct, _)| ct.starts_with("application/x-protobuf")));
    assert!(bodies.iter().any(|(_, b)| has(b, b"gateway-under-test")));
    assert!(origin.log_text().contains("exporting traces over OTLP"));
}

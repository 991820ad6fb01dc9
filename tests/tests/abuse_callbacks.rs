//! A callback cannot loop or reorder a client's frames (issue 12, "Must show"): against a
//! nats-server whose `max_payload` is 64 KiB, a result whose frame would not fit is
//! answered 413 (never the 503 NoETL retries forever) and nothing reaches the client, while
//! a retry that fits is delivered; progress after the result is refused 409 and not
//! delivered; a bad token or an oversized declared body is refused before the body is
//! sent; and the bus's idea of the largest frame is exact (one byte more fails on NATS).
//!
//! "Nothing published" is shown by order, not by waiting: after each refusal a frame that
//! is accepted follows on the same client's stream, and it must be the next one there.

use std::time::Duration;

use gateway_tests::harness::flows::{self, http, open_events_client, pending_request};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);
const MAX_PAYLOAD: usize = 64 * 1024;

struct World {
    _nats: NatsServer,
    standin: StandIn,
    origin: Origin,
}

async fn world() -> World {
    let nats = NatsServer::start_with_max_payload(MAX_PAYLOAD)
        .await
        .expect("nats-server starts");
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..StandInOptions::default()
    })
    .await
    .expect("the stand-in starts");
    let origin = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .expect("the origin starts");
    World {
        _nats: nats,
        standin,
        origin,
    }
}

/// POSTs `body` to the internal route `path` with the service token: status and JSON.
async fn post(w: &World, path: &str, body: String) -> (u16, Value) {
    let r = http()
        .post(format!("{}{path}", w.origin.internal_url))
        .bearer_auth(INTERNAL_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the internal listener answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The next result or progress frame on `sse` (state frames and pings skipped).
async fn next_delivery(sse: &mut SseClient) -> SseFrame {
    let frames = sse
        .collect_until(WAIT, |fs| {
            fs.iter()
                .any(|f| f.event == "playbook/result" || f.event == "playbook/progress")
        })
        .await;
    frames
        .into_iter()
        .find(|f| f.event == "playbook/result" || f.event == "playbook/progress")
        .unwrap_or_else(|| panic!("no result or progress frame within {WAIT:?}"))
}

#[tokio::test]
async fn a_result_too_large_for_one_nats_message_is_413_and_never_delivered() {
    let w = world().await;
    assert!(
        w.origin.log_text().contains("CALLBACK_BODY_LIMIT lowered"),
        "the lowered limit is logged at start"
    );
    let token = flows::login(&w.origin.url, &w.standin, "big@example.com").await;
    let (mut sse, client_id) =
        open_events_client(&format!("{}/events", w.origin.url), &token, None, WAIT).await;
    let request_id = pending_request(&w.origin.url, &token, &client_id, 60).await;
    let result = |data: Value| {
        json!({"request_id": request_id, "status": "COMPLETED", "data": data}).to_string()
    };

    // Over the lowered body limit (the configured 1 MiB would have taken it).
    let (s, v) = post(
        &w,
        "/api/internal/callback/async",
        result(json!({"blob": "x".repeat(MAX_PAYLOAD + 1)})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    // Within the body limit, but its frame grows past max_payload (`1e9` is re-encoded
    // as `1000000000.0`): refused the same way, not 503.
    let numbers = format!("[{}]", vec!["1e9"; 9_000].join(","));
    let body = format!(r#"{{"request_id":"{request_id}","status":"COMPLETED","data":{numbers}}}"#);
    assert!(body.len() < MAX_PAYLOAD - 2048, "{}", body.len());
    let (s, v) = post(&w, "/api/internal/callback/async", body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );

    // The retry that fits is delivered (the refusals left no `delivered` marker), and it
    // is the first result the client sees.
    let (s, v) = post(
        &w,
        "/api/internal/callback/async",
        result(json!({"small": true})),
    )
    .await;
    assert!(s == 200 || s == 202, "{s} {v}");
    let frame = next_delivery(&mut sse).await;
    assert_eq!(frame.event, "playbook/result");
    assert_eq!(
        frame.data["params"]["data"],
        json!({"small": true}),
        "{:?}",
        frame.data
    );
}

#[tokio::test]
async fn progress_after_the_result_is_refused_and_not_delivered() {
    let w = world().await;
    let token = flows::login(&w.origin.url, &w.standin, "late@example.com").await;
    let (mut sse, client_id) =
        open_events_client(&format!("{}/events", w.origin.url), &token, None, WAIT).await;
    let first = pending_request(&w.origin.url, &token, &client_id, 60).await;
    let second = pending_request(&w.origin.url, &token, &client_id, 60).await;

    let progress =
        |id: &str, step: &str| json!({"request_id": id, "step": step, "progress": 0.5}).to_string();
    let (s, v) = post(&w, "/api/internal/progress", progress(&first, "before")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &w,
        "/api/internal/callback/async",
        json!({"request_id": first, "status": "COMPLETED"}).to_string(),
    )
    .await;
    assert!(s == 200 || s == 202, "{s} {v}");
    let (s, v) = post(&w, "/api/internal/progress", progress(&first, "after")).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("request_finished")),
        "{v}"
    );
    // The other request's progress is still welcome, and comes next on the stream.
    let (s, v) = post(&w, "/api/internal/progress", progress(&second, "other")).await;
    assert_eq!(s, 200, "{v}");

    let order: Vec<(String, Value)> = {
        let mut out = Vec::new();
        for _ in 0..3 {
            let f = next_delivery(&mut sse).await;
            out.push((f.event.clone(), f.data["params"]["step"].clone()));
        }
        out
    };
    assert_eq!(
        order,
        [
            ("playbook/progress".to_owned(), json!("before")),
            ("playbook/result".to_owned(), Value::Null),
            ("playbook/progress".to_owned(), json!("other")),
        ]
    );
}

/// Sends a request head declaring a `length`-byte body and no body; the status line the
/// origin answers with, which must come before any body byte was sent.
async fn status_without_sending_the_body(
    base: &str,
    path: &str,
    token: &str,
    length: u64,
) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the internal listener accepts");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered without the body")
        .expect("a readable answer");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_bad_token_or_an_oversized_declared_body_is_refused_before_the_body() {
    let w = world().await;
    let path = "/api/internal/callback/async";
    // A wrong token is refused from the head alone: the body it announces never comes.
    let bad = status_without_sending_the_body(
        &w.origin.internal_url,
        path,
        "not-a-callback-token",
        4 * 1024,
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 403"), "{bad}");
    // A declared size over the limit is refused before anything else (app.rs's declared
    // limit runs ahead of the handler), whoever sends it.
    let huge = status_without_sending_the_body(
        &w.origin.internal_url,
        path,
        "not-a-callback-token",
        512 * 1024 * 1024,
    )
    .await;
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    let big = status_without_sending_the_body(
        &w.origin.internal_url,
        path,
        INTERNAL_TOKEN,
        2 * 1024 * 1024,
    )
    .await;
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    // A request-token-shaped token waits for the body (its request id is in it): shown by
    // a small body with a wrong token of the right shape being refused after reading.
    let r = http()
        .post(format!("{}{path}", w.origin.internal_url))
        .bearer_auth("0".repeat(64))
        .json(&json!({"request_id": "00000000000000000000000000000000", "status": "COMPLETED"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

#[tokio::test]
async fn the_bus_says_exactly_how_much_one_frame_can_carry() {
    use origin::bus::{nats::NatsBus, Bus, Retention};
    let nats = NatsServer::start_with_max_payload(MAX_PAYLOAD)
        .await
        .expect("nats-server starts");
    let client = async_nats::connect(&nats.url).await.expect("connects");
    let bus = NatsBus::open(client, Retention::default(), None)
        .await
        .expect("the bus opens");
    let event = "playbook/result";
    let max = bus.max_data_len(event).expect("NATS limits a frame");
    assert!(max < MAX_PAYLOAD && max > MAX_PAYLOAD - 64, "{max}");
    let client_id = gateway_shared::ids::ClientId::parse("c0ffee00c0ffee00c0ffee00c0ffee00")
        .expect("a valid client id");
    bus.publish(&client_id, event, vec![b'x'; max].into())
        .await
        .expect("a frame of exactly the limit is published");
    assert!(
        bus.publish(&client_id, event, vec![b'x'; max + 1].into())
            .await
            .is_err(),
        "one byte more is not"
    );
}

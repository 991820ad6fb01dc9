//! `Subscription.executionEvents` over `/graphql/ws`, end to end against real processes
//! (nats-server, the origin, the NoETL stand-in): both subprotocols, every way a
//! connection is refused, access checks, and the per-socket operation cap.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use gateway_tests::harness::flows::{self, http};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::Origin;
use gateway_tests::harness::sse::SseClient;
use gateway_tests::harness::standin::StandIn;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(15);

const EXECUTION_EVENTS: &str = "subscription($id: ID!) {
  executionEvents(executionId: $id) { executionId eventType stepName status at terminal } }";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct World {
    _nats: NatsServer,
    standin: StandIn,
    origin: Origin,
}

async fn world() -> World {
    let (nats, standin, mut origins) = flows::nats_stack(1).await;
    World {
        _nats: nats,
        standin,
        origin: origins.pop().expect("one origin"),
    }
}

async fn login(w: &World, email: &str) -> String {
    flows::login(&w.origin.url, &w.standin, email).await
}

/// Runs a playbook through `POST /graphql` and returns its execution id.
async fn execute(w: &World, token: &str, path: &str, workload: Value) -> String {
    execute_for(w, token, path, workload, None).await
}

/// [`execute`], with the run's frames sent to an SSE client.
async fn execute_for(
    w: &World,
    token: &str,
    path: &str,
    workload: Value,
    client_id: Option<&str>,
) -> String {
    flows::run_playbook(&w.origin.url, token, path, workload, client_id).await
}

fn ws_url(w: &World) -> String {
    format!(
        "{}/graphql/ws",
        w.origin.url.replacen("http://", "ws://", 1)
    )
}

/// Opens a socket offering `subprotocol`, with an optional `Authorization: Bearer` header.
async fn connect(w: &World, subprotocol: &str, bearer: Option<&str>) -> Ws {
    let mut req = ws_url(w).into_client_request().unwrap();
    let h = req.headers_mut();
    h.insert("sec-websocket-protocol", subprotocol.parse().unwrap());
    if let Some(token) = bearer {
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("upgrade refused: {e}"));
    assert_eq!(resp.headers()["sec-websocket-protocol"], subprotocol);
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// What the server sent next.
#[derive(Debug)]
enum Incoming {
    Json(Value),
    /// A close frame's code (`None`: the connection ended without one).
    Closed(Option<u16>),
}

async fn next(ws: &mut Ws) -> Incoming {
    loop {
        let item = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the server sends something within the wait");
        match item {
            Some(Ok(Message::Text(t))) => return Incoming::Json(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return Incoming::Closed(frame.map(|f| f.code.into()))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Incoming::Closed(None),
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    match next(ws).await {
        Incoming::Json(v) => v,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match next(ws).await {
            Incoming::Closed(code) => return code,
            Incoming::Json(_) => continue,
        }
    }
}

/// `connection_init` with `payload`, then the ack.
async fn init(ws: &mut Ws, payload: Value) {
    send(ws, json!({"type": "connection_init", "payload": payload})).await;
    assert_eq!(next_json(ws).await, json!({"type": "connection_ack"}));
}

/// The payloads of operation `id` (`next` or legacy `data`) until its `complete`.
async fn until_complete(ws: &mut Ws, id: &str) -> Vec<Value> {
    let mut payloads = Vec::new();
    loop {
        let m = next_json(ws).await;
        if m["id"] != id {
            continue;
        }
        match m["type"].as_str() {
            Some("next" | "data") => payloads.push(m["payload"].clone()),
            Some("complete") => return payloads,
            _ => panic!("unexpected message for {id}: {m}"),
        }
    }
}

/// The states in `payloads`, asserting none carries an error.
fn states(payloads: &[Value]) -> Vec<Value> {
    payloads
        .iter()
        .map(|p| {
            assert!(p.get("errors").is_none(), "no errors expected: {p}");
            p["data"]["executionEvents"].clone()
        })
        .collect()
}

/// Asserts `states` is the whole story of one demo/steps run of `execution_id`.
fn assert_three_steps_then_completed(states: &[Value], execution_id: &str) {
    let exits: Vec<&str> = states
        .iter()
        .filter(|s| s["eventType"] == "step.exit")
        .filter_map(|s| s["stepName"].as_str())
        .collect();
    assert_eq!(exits, ["step_1", "step_2", "step_3"], "{states:?}");
    let terminals: Vec<&Value> = states.iter().filter(|s| s["terminal"] == true).collect();
    assert_eq!(terminals.len(), 1, "{states:?}");
    let last = states.last().unwrap();
    assert_eq!(last["terminal"], true, "the terminal state is the last");
    assert_eq!(last["eventType"], "playbook.completed");
    assert!(
        states.iter().all(|s| s["executionId"] == execution_id),
        "every executionId is the exact string {execution_id}: {states:?}"
    );
}

#[tokio::test]
async fn a_subscription_streams_three_step_exits_then_one_terminal_completion() {
    let w = world().await;
    let token = login(&w, "ws@example.com").await;
    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    init(&mut ws, json!({"session_token": token})).await;

    let execution_id = execute(&w, &token, "demo/steps", json!({})).await;
    assert!(
        execution_id.parse::<u64>().unwrap() > (1u64 << 53),
        "ids above 2^53 travel as exact strings"
    );
    let subscribe = |id: &str| {
        json!({"id": id, "type": "subscribe",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": execution_id}}})
    };
    send(&mut ws, subscribe("1")).await;
    let live = states(&until_complete(&mut ws, "1").await);
    assert_three_steps_then_completed(&live, &execution_id);

    // The socket stays usable, and its client's retained frames replay the finished run.
    send(&mut ws, subscribe("2")).await;
    let replayed = states(&until_complete(&mut ws, "2").await);
    assert_eq!(replayed, live);

    drop(ws);
    assert!(
        !w.origin.log_text().contains(&token),
        "a session token reached the origin log"
    );
}

#[tokio::test]
async fn the_legacy_protocol_authenticates_with_the_upgrade_header_token() {
    let w = world().await;
    let token = login(&w, "legacy@example.com").await;
    let mut ws = connect(&w, "graphql-ws", Some(&token)).await;
    init(&mut ws, Value::Null).await;
    let execution_id = execute(&w, &token, "demo/steps", json!({})).await;
    send(
        &mut ws,
        json!({"id": "a", "type": "start",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": execution_id}}}),
    )
    .await;
    let got = states(&until_complete(&mut ws, "a").await);
    assert_three_steps_then_completed(&got, &execution_id);
}

#[tokio::test]
async fn missing_invalid_or_early_credentials_are_refused() {
    let w = world().await;
    let token = login(&w, "refused@example.com").await;
    let bogus = "not-a-session-token-at-all-0123456789abcdefg";

    // No token anywhere.
    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    send(&mut ws, json!({"type": "connection_init"})).await;
    assert_eq!(close_code(&mut ws).await, Some(4403));

    // An unknown token in the payload.
    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"session_token": bogus}}),
    )
    .await;
    assert_eq!(close_code(&mut ws).await, Some(4403));

    // An unknown bearer token on the upgrade request.
    let mut ws = connect(&w, "graphql-transport-ws", Some(bogus)).await;
    send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
    assert_eq!(close_code(&mut ws).await, Some(4403));

    // A payload that names a bad token is refused even with a good header token.
    let mut ws = connect(&w, "graphql-transport-ws", Some(&token)).await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {bogus}")}}),
    )
    .await;
    assert_eq!(close_code(&mut ws).await, Some(4403));

    // Legacy protocol: connection_error, then the close.
    let mut ws = connect(&w, "graphql-ws", None).await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"session_token": bogus}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_error");
    assert_eq!(close_code(&mut ws).await, Some(4403));

    // Subscribing before connection_init.
    let mut ws = connect(&w, "graphql-transport-ws", Some(&token)).await;
    send(
        &mut ws,
        json!({"id": "1", "type": "subscribe", "payload": {"query": "{ health }"}}),
    )
    .await;
    assert_eq!(close_code(&mut ws).await, Some(4401));

    // No subprotocol: the upgrade is refused with the usual JSON error.
    let req = ws_url(&w).into_client_request().unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .expect("a JSON error body");
            assert_eq!(body["error"]["code"], "unsupported_subprotocol");
        }
        other => panic!("expected a 400, got {other:?}"),
    }

    // A plain GET is not an upgrade.
    let r = http()
        .get(ws_url(&w).replacen("ws://", "http://", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let log = w.origin.log_text();
    assert!(
        !log.contains(&token) && !log.contains(bogus),
        "a token reached the origin log"
    );
}

#[tokio::test]
async fn a_socket_without_connection_init_is_closed_after_the_init_timeout() {
    let w = world().await;
    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut ws).await, Some(4408));
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn another_users_execution_is_not_found() {
    let w = world().await;
    let admin = login(&w, "admin@example.com").await;
    let execution_id = execute(&w, &admin, "admin/purge", json!({})).await;

    let user = login(&w, "user@example.com").await;
    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    init(&mut ws, json!({"authorization": format!("Bearer {user}")})).await;
    send(
        &mut ws,
        json!({"id": "1", "type": "subscribe",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": execution_id}}}),
    )
    .await;
    let payloads = until_complete(&mut ws, "1").await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    assert_eq!(
        payloads[0]["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "another user's run is answered as one that does not exist: {payloads:?}"
    );
    assert!(payloads[0]["data"].is_null(), "{payloads:?}");

    // The admin, who started it, may follow it on a socket of their own.
    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    init(&mut ws, json!({"session_token": admin})).await;
    send(
        &mut ws,
        json!({"id": "1", "type": "subscribe",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": execution_id}}}),
    )
    .await;
    let got = states(&until_complete(&mut ws, "1").await);
    assert_eq!(got.last().unwrap()["terminal"], true, "{got:?}");
}

#[tokio::test]
async fn a_socket_runs_at_most_sixteen_operations_at_once() {
    let w = world().await;
    let token = login(&w, "busy@example.com").await;
    let execution_id = execute(&w, &token, "demo/slow", json!({"seconds": 60})).await;
    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    init(&mut ws, json!({"session_token": token})).await;
    let subscribe = |id: String| {
        json!({"id": id, "type": "subscribe",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": execution_id}}})
    };
    for i in 0..16 {
        send(&mut ws, subscribe(format!("s{i}"))).await;
    }
    send(&mut ws, subscribe("s16".into())).await;

    // The 17th fails at once; the 16 keep streaming the run's first states.
    let (mut refused, mut live) = (None, false);
    while refused.is_none() || !live {
        let m = next_json(&mut ws).await;
        match (m["id"].as_str(), m["type"].as_str()) {
            (Some("s16"), Some("next")) => refused = Some(m["payload"].clone()),
            (Some(_), Some("next")) if m["payload"]["errors"].is_null() => live = true,
            (Some("s16"), Some("complete")) => {}
            _ => panic!("unexpected {m}"),
        }
    }
    let refused = refused.unwrap();
    assert_eq!(
        refused["errors"][0]["extensions"]["code"], "TOO_MANY_OPERATIONS",
        "{refused}"
    );

    // Completing one frees its slot for a new operation.
    send(&mut ws, json!({"id": "s0", "type": "complete"})).await;
    send(&mut ws, subscribe("s17".into())).await;
    loop {
        let m = next_json(&mut ws).await;
        if m["id"] == "s17" {
            assert_eq!(m["type"], "next", "{m}");
            assert!(m["payload"]["errors"].is_null(), "{m}");
            assert_eq!(
                m["payload"]["data"]["executionEvents"]["executionId"],
                execution_id.as_str()
            );
            break;
        }
    }
}

#[tokio::test]
async fn a_subscriber_to_a_finished_run_still_gets_its_final_state() {
    let w = world().await;
    let token = login(&w, "late@example.com").await;
    // The run's frames go to an SSE client; the subscription comes after the end.
    let mut sse = SseClient::connect(&format!("{}/events", w.origin.url), Some(&token), None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("/events refused: {s} {b}"));
    let init_frame = sse.next(WAIT).await.expect("init frame");
    let client_id = init_frame.data["result"]["clientId"]
        .as_str()
        .unwrap()
        .to_owned();
    let execution_id = execute_for(&w, &token, "demo/steps", json!({}), Some(&client_id)).await;
    let seen: Vec<String> = sse
        .collect_until(WAIT, |fs| {
            fs.iter()
                .any(|f| f.event == "playbook/state" && f.data["params"]["terminal"] == true)
        })
        .await
        .iter()
        .filter(|f| f.event == "playbook/state")
        .map(|f| {
            f.data["params"]["event_type"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect();

    let mut ws = connect(&w, "graphql-transport-ws", None).await;
    init(&mut ws, json!({"session_token": token})).await;
    send(
        &mut ws,
        json!({"id": "1", "type": "subscribe",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": execution_id}}}),
    )
    .await;
    let got = states(&until_complete(&mut ws, "1").await);
    // The run's frames are still retained on its subject: the late subscription replays
    // them all (issue 16), the states the SSE client saw, ending with the terminal one.
    let types: Vec<&str> = got
        .iter()
        .map(|s| s["eventType"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(types, seen, "{got:?}");
    let last = got.last().expect("at least the terminal state");
    assert_eq!(last["eventType"], "playbook.completed");
    assert_eq!(last["status"], "COMPLETED");
    assert_eq!(last["terminal"], true);
    assert_eq!(last["executionId"], execution_id.as_str());
}

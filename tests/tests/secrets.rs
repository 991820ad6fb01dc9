//! Nothing secret leaves (issue 11): what the gateway injects into workloads
//! (`callback_token`, `gateway_url`, `request_id`) and every session and ID token of a
//! scenario never appear in a proxied, GraphQL (HTTP and graphql-ws) or SSE body — in both
//! auth modes.
//!
//! The secrets are harvested from the stand-in itself (it keeps every workload verbatim,
//! as NoETL does), so the test knows the exact values the gateway injected, including those
//! of the auth playbooks no client ever sees, and the tokens the test itself used.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use gateway_tests::harness::flows::{
    execute_playbook, get_json, graphql, http, login_reply, nats_stack_with, open_events_client,
    ws_connect, ws_init, ws_send,
};
use gateway_tests::harness::origin::Origin;
use gateway_tests::harness::sse::SseFrame;
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

/// Every body a client received, with where it came from.
#[derive(Default)]
struct Seen(Vec<(String, String)>);

impl Seen {
    fn add(&mut self, what: impl Into<String>, body: impl Into<String>) {
        self.0.push((what.into(), body.into()));
    }
}

async fn get(url: &str, token: &str) -> (u16, String) {
    let r = http()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("the gateway answers");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// A logged-in user: the ID token it logged in with and the session token it got.
struct User {
    id_token: String,
    session: String,
}

async fn user(origin: &Origin, standin: &StandIn, email: &str) -> User {
    let id_token = standin.dev_token(email).await;
    let reply = login_reply(&origin.url, standin, email).await;
    User {
        id_token,
        session: reply["session_token"]
            .as_str()
            .expect("a session token")
            .to_owned(),
    }
}

/// Every string a workload key the gateway fills (or an auth playbook's token key) holds,
/// in every execution the stand-in knows.
async fn injected_values(standin: &StandIn) -> (BTreeSet<String>, Vec<String>) {
    let list = get_json(&format!("{}/api/executions", standin.url)).await;
    let mut values = BTreeSet::new();
    let mut ids = Vec::new();
    for run in list.as_array().expect("a list of executions") {
        ids.push(run["execution_id"].to_string());
        for key in [
            "callback_token",
            "gateway_url",
            "request_id",
            "session_token",
            "auth0_token",
        ] {
            if let Some(v) = run["workload"][key].as_str() {
                values.insert(v.to_owned());
            }
        }
    }
    (values, ids)
}

/// The one place a client legitimately sees its own request id: the executePlaybook answer
/// and the result / progress frames of its own request. Removed before the search.
fn without_own_request_ids(mut v: Value) -> Value {
    if let Some(ex) = v["data"]["executePlaybook"].as_object_mut() {
        ex.remove("requestId");
    }
    if let Some(p) = v["params"].as_object_mut() {
        p.remove("requestId");
    }
    v
}

/// Runs demo/steps and reads its `executionEvents` over `/graphql/ws` until `complete`;
/// the execution id and every message the socket received.
async fn ws_run(base: &str, token: &str) -> (String, Vec<String>) {
    let mut ws = ws_connect(base, None).await;
    let mut bodies = Vec::new();
    ws_init(&mut ws, token).await;
    let v = execute_playbook(base, token, "demo/steps", json!({"over": "ws"}), None).await;
    let id = v["data"]["executePlaybook"]["executionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();
    bodies.push(without_own_request_ids(v).to_string());
    ws_send(&mut ws, json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription($id: ID!) { executionEvents(executionId: $id) { executionId eventType stepName status at terminal } }",
        "variables": {"id": id}}}))
        .await;
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the socket answers within the wait");
        let Some(Ok(Message::Text(t))) = m else {
            match m {
                Some(Ok(_)) => continue,
                other => panic!("the socket ended early: {other:?}"),
            }
        };
        let done = serde_json::from_str::<Value>(&t)
            .is_ok_and(|v| v["id"] == "1" && v["type"] == "complete");
        bodies.push(t.to_string());
        if done {
            break;
        }
    }
    assert!(
        bodies.iter().any(|b| b.contains("\"terminal\":true")),
        "the run's terminal state came over the socket: {bodies:?}"
    );
    (id, bodies)
}

fn is_done(frames: &[SseFrame], runs: usize) -> bool {
    let count = |event: &str, terminal: bool| {
        frames
            .iter()
            .filter(|f| f.event == event && (!terminal || f.data["params"]["terminal"] == true))
            .count()
    };
    count("playbook/result", false) >= runs && count("playbook/state", true) >= runs
}

async fn scenario(auth_mode: &str) {
    let (_nats, standin, mut origins) = nats_stack_with(
        1,
        StandInOptions {
            step_delay_ms: Some(50),
            tail_interval_ms: Some(100),
            ..Default::default()
        },
        &[
            ("AUTH_MODE", auth_mode),
            ("PROXY_ALLOW", "GET /api/executions,GET /api/catalog"),
        ],
    )
    .await;
    let origin = origins.pop().expect("one origin");
    let base = origin.url.clone();

    let alice = user(&origin, &standin, "alice@example.com").await;
    let admin = user(&origin, &standin, "admin@example.com").await;
    let mut seen = Seen::default();

    // Async runs with a client: state frames and a result callback on the SSE stream.
    let (mut sse, client_id) =
        open_events_client(&format!("{base}/events"), &alice.session, None, WAIT).await;
    let mut own = Vec::new();
    for (path, workload) in [
        ("demo/echo", json!({"greeting": "hello"})),
        ("demo/steps", json!({"n": 1})),
        ("demo/progress", json!({})),
        ("demo/fail", json!({})),
    ] {
        let v = execute_playbook(&base, &alice.session, path, workload, Some(&client_id)).await;
        let id = v["data"]["executePlaybook"]["executionId"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .to_owned();
        seen.add(
            format!("executePlaybook {path}"),
            without_own_request_ids(v).to_string(),
        );
        own.push(id);
    }
    // A run nobody listens to (no client id): its callback finds no stream.
    let v = execute_playbook(
        &base,
        &alice.session,
        "demo/echo",
        json!({"quiet": true}),
        None,
    )
    .await;
    let quiet = v["data"]["executePlaybook"]["executionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();
    seen.add(
        "executePlaybook (no client)",
        without_own_request_ids(v).to_string(),
    );
    own.push(quiet);

    let frames = sse.collect_until(WAIT, |fs| is_done(fs, 4)).await;
    assert!(
        is_done(&frames, 4),
        "every run ends on the stream: {frames:?}"
    );
    let echo = frames
        .iter()
        .find(|f| f.event == "playbook/result" && f.data["params"]["data"]["greeting"] == "hello")
        .expect("the echo's result arrives, with the caller's own fields");
    assert_eq!(echo.data["params"]["data"], json!({"greeting": "hello"}));
    for f in &frames {
        seen.add(
            format!("SSE {}", f.event),
            without_own_request_ids(f.data.clone()).to_string(),
        );
    }
    sse.close();

    // The same kind of run over graphql-ws `executionEvents`, token at connection_init.
    let (ws_run, ws_bodies) = ws_run(&base, &alice.session).await;
    own.push(ws_run);
    for b in ws_bodies {
        seen.add("graphql-ws", b);
    }

    // Every execution the stand-in ran (the auth playbooks' too), read back every way.
    let (secrets, all) = injected_values(&standin).await;
    let (status, body) = get(&format!("{base}/noetl/executions"), &admin.session).await;
    seen.add(format!("GET /noetl/executions → {status}"), body);
    for id in &all {
        for (who, token) in [("admin", &admin.session), ("alice", &alice.session)] {
            for tail in ["", "/status"] {
                let url = format!("{base}/noetl/executions/{id}{tail}");
                let (status, body) = get(&url, token).await;
                seen.add(format!("{who} GET {url} → {status}"), body);
            }
            let v = graphql(
                &base,
                token,
                "query($id: ID!) { execution(id: $id) { executionId status currentStep progress } }",
                json!({"id": id}),
            )
            .await;
            seen.add(format!("{who} execution({id})"), v.to_string());
        }
    }
    let mut needles: BTreeSet<String> = secrets;
    for u in [&alice, &admin] {
        needles.insert(u.session.clone());
        needles.insert(u.id_token.clone());
    }
    let injected = needles.iter().filter(|n| n.starts_with("http")).count();
    assert_eq!(
        injected, 1,
        "the gateway's callback URL is among the values: {needles:?}"
    );
    assert!(
        needles.len() >= 5 + 2 * own.len(),
        "the harvest found the injected values of every run: {needles:?}"
    );
    let mut leaks = Vec::new();
    for (what, body) in &seen.0 {
        for n in &needles {
            if body.contains(n.as_str()) {
                leaks.push(format!("{what}: contains {n}\n  {body}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{auth_mode}: {} secret(s) left the gateway:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    // The owner's own reads succeed and still carry the caller's own workload fields, in
    // a body whose Content-Length is its own (not NoETL's, which counted the secrets).
    let r = http()
        .get(format!("{base}/noetl/executions/{}", own[0]))
        .bearer_auth(&alice.session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let length = r.headers().get("content-length").cloned();
    let body = r.text().await.unwrap();
    assert_eq!(
        length.and_then(|v| v.to_str().ok().map(str::to_owned)),
        Some(body.len().to_string()),
        "{body}"
    );
    let record: Value = serde_json::from_str(&body).expect("the record is JSON");
    assert_eq!(record["workload"], json!({"greeting": "hello"}), "{record}");
    assert!(
        record["events"].as_array().is_some_and(|e| !e.is_empty()),
        "{record}"
    );
}

#[tokio::test]
async fn nothing_injected_or_secret_leaves_in_rest_auth_mode() {
    scenario("rest").await;
}

#[tokio::test]
async fn nothing_injected_or_secret_leaves_in_playbook_auth_mode() {
    scenario("playbook").await;
}

//! A run that ends without its result callback still resolves the page's `executePlaybook`:
//! one synthesised `playbook/result` (FAILED with NoETL's error, or CANCELLED) on the
//! requesting client's stream, and a real callback after it is a duplicate. Real processes:
//! nats-server, two origin replicas, the NoETL stand-in (`demo/fail_silent` fails and never
//! calls back, as a real playbook whose HTTP step cannot connect).

use std::time::Duration;

use gateway_tests::harness::flows::{
    client_id_of, execute_playbook, graphql, http, login, nats_stack, open_events,
};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, INTERNAL_TOKEN};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::StandIn;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

struct World {
    _nats: NatsServer,
    standin: StandIn,
    a: Origin,
    b: Origin,
}

async fn world() -> World {
    let (nats, standin, mut origins) = nats_stack(2).await;
    let b = origins.pop().expect("two origins");
    let a = origins.pop().expect("two origins");
    World {
        _nats: nats,
        standin,
        a,
        b,
    }
}

/// A run as executePlaybook answered it.
struct Run {
    execution_id: String,
    request_id: String,
}

async fn run(origin: &Origin, token: &str, path: &str, workload: Value, client: &str) -> Run {
    let v = execute_playbook(&origin.url, token, path, workload, Some(client)).await;
    let ex = &v["data"]["executePlaybook"];
    let text = |k: &str| {
        ex[k]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no {k} in {v}"))
            .to_owned()
    };
    Run {
        execution_id: text("executionId"),
        request_id: text("requestId"),
    }
}

/// Opens `/events` on `origin` (resuming `client` when given): the stream and its init frame.
async fn open(origin: &Origin, token: &str, client: Option<&str>) -> (SseClient, SseFrame) {
    let query = client
        .map(|c| format!("?client_id={c}"))
        .unwrap_or_default();
    open_events(&format!("{}/events{query}", origin.url), token, None, WAIT).await
}

/// The `playbook/result` frames of `request_id` among `frames`.
fn results_of<'a>(frames: &'a [SseFrame], request_id: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| f.event == "playbook/result" && f.data["params"]["requestId"] == request_id)
        .map(|f| &f.data["params"])
        .collect()
}

/// The index of `execution_id`'s terminal `playbook/state` frame, if it came.
fn terminal_of(frames: &[SseFrame], execution_id: &str) -> Option<usize> {
    frames.iter().position(|f| {
        f.event == "playbook/state"
            && f.data["params"]["terminal"] == true
            && f.data["params"]["execution_id"] == execution_id
    })
}

/// NoETL's result callback, by hand, on `origin`'s internal listener (service token).
async fn callback(origin: &Origin, body: Value) -> (u16, Value) {
    let r = http()
        .post(format!(
            "{}/api/internal/callback/async",
            origin.internal_url
        ))
        .bearer_auth(INTERNAL_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("the internal listener answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Runs `demo/echo` for `client` and collects until its result: every frame the client
/// got before it is then on `frames` too (one client's frames arrive in publish order),
/// so a second result published before it would be seen.
async fn barrier(
    origin: &Origin,
    token: &str,
    client: &str,
    sse: &mut SseClient,
    frames: &mut Vec<SseFrame>,
) {
    let echo = run(origin, token, "demo/echo", json!({"barrier": true}), client).await;
    let more = sse
        .collect_until(WAIT, |fs| !results_of(fs, &echo.request_id).is_empty())
        .await;
    assert!(
        !results_of(&more, &echo.request_id).is_empty(),
        "the barrier run's result never came: {more:?}"
    );
    frames.extend(more);
}

#[tokio::test]
async fn a_run_that_fails_without_calling_back_gets_one_failed_result_and_a_late_callback_is_a_duplicate(
) {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "silent@example.com").await;
    let (mut sse, init) = open(&w.a, &token, None).await;
    let client = client_id_of(&init);
    // Started on B, listened to on A: the synthesised result crosses replicas as a callback's does.
    let failed = run(&w.b, &token, "demo/fail_silent", json!({}), &client).await;
    let mut frames = sse
        .collect_until(WAIT, |fs| !results_of(fs, &failed.request_id).is_empty())
        .await;
    let results = results_of(&frames, &failed.request_id);
    assert_eq!(results.len(), 1, "{frames:?}");
    let p = results[0];
    assert_eq!(p["status"], "FAILED", "{p}");
    assert_eq!(p["executionId"], failed.execution_id.as_str());
    assert_eq!(p["error"]["code"], "EXECUTION_FAILED", "{p}");
    assert_eq!(
        p["error"]["message"], "HTTP 500 from https://example.invalid",
        "NoETL's error for the run: {p}"
    );
    assert_eq!(p["error"]["data"], json!({"step": "fail_step"}));
    assert!(p.get("data").is_none(), "{p}");
    let terminal = terminal_of(&frames, &failed.execution_id).expect("a terminal frame");
    assert_eq!(
        frames[terminal].data["params"]["event_type"],
        "playbook.failed"
    );
    let result_at = frames
        .iter()
        .position(|f| f.event == "playbook/result")
        .unwrap();
    assert!(terminal < result_at, "the terminal state comes first");
    // The stand-in never called back: the result is the gateway's.
    let callbacks = w.standin.callbacks().await;
    assert!(
        !callbacks
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["body"]["request_id"] == failed.request_id.as_str()),
        "{callbacks}"
    );

    // The playbook's callback after all, on either replica: a duplicate, and no frame.
    for origin in [&w.a, &w.b] {
        let (status, body) = callback(
            origin,
            json!({
                "request_id": failed.request_id, "execution_id": failed.execution_id,
                "status": "FAILED", "error": {"message": "late"},
            }),
        )
        .await;
        assert_eq!(
            (status, &body["status"]),
            (200, &json!("duplicate")),
            "{body}"
        );
    }
    barrier(&w.a, &token, &client, &mut sse, &mut frames).await;
    assert_eq!(
        results_of(&frames, &failed.request_id).len(),
        1,
        "{frames:?}"
    );
    // The request is no longer pending: a resumed stream does not list it.
    sse.close();
    let (_sse, init) = open(&w.b, &token, Some(&client)).await;
    let pending = &init.data["result"]["pendingRequests"];
    assert!(
        !pending
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["requestId"] == failed.request_id.as_str()),
        "{pending}"
    );
}

#[tokio::test]
async fn a_cancelled_run_gets_one_cancelled_result() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "cancel@example.com").await;
    let (mut sse, init) = open(&w.a, &token, None).await;
    let client = client_id_of(&init);
    let slow = run(&w.a, &token, "demo/slow", json!({"seconds": 60}), &client).await;
    // Cancel once the run is under way (its start has reached the client).
    let started = sse
        .collect_until(WAIT, |fs| {
            fs.iter().any(|f| {
                f.event == "playbook/state"
                    && f.data["params"]["execution_id"] == slow.execution_id.as_str()
            })
        })
        .await;
    assert!(!started.is_empty(), "no state frame for the run");
    let v = graphql(
        &w.b.url,
        &token,
        "mutation($id: ID!) { cancelExecution(id: $id) }",
        json!({"id": slow.execution_id}),
    )
    .await;
    assert_eq!(v["data"]["cancelExecution"], true, "{v}");
    let mut frames = sse
        .collect_until(WAIT, |fs| !results_of(fs, &slow.request_id).is_empty())
        .await;
    let results = results_of(&frames, &slow.request_id);
    assert_eq!(results.len(), 1, "{frames:?}");
    let p = results[0];
    assert_eq!(p["status"], "CANCELLED", "{p}");
    assert_eq!(p["executionId"], slow.execution_id.as_str());
    assert_eq!(p["error"]["code"], "EXECUTION_CANCELLED", "{p}");
    assert_eq!(p["error"]["message"], "the run was cancelled", "{p}");
    let terminal = terminal_of(&frames, &slow.execution_id).expect("a terminal frame");
    assert_eq!(
        frames[terminal].data["params"]["event_type"],
        "playbook.cancelled"
    );
    barrier(&w.a, &token, &client, &mut sse, &mut frames).await;
    assert_eq!(results_of(&frames, &slow.request_id).len(), 1, "{frames:?}");
}

#[tokio::test]
async fn a_callback_that_came_first_is_the_only_result() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "first@example.com").await;
    let (mut sse, init) = open(&w.a, &token, None).await;
    let client = client_id_of(&init);
    let slow = run(&w.a, &token, "demo/slow", json!({"seconds": 60}), &client).await;
    // The playbook answers (say, a step before its long one calls back), then it is cancelled.
    let (status, body) = callback(
        &w.b,
        json!({
            "request_id": slow.request_id, "execution_id": slow.execution_id,
            "status": "FAILED", "error": {"code": "MINE", "message": "the playbook's own"},
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v = graphql(
        &w.a.url,
        &token,
        "mutation($id: ID!) { cancelExecution(id: $id) }",
        json!({"id": slow.execution_id}),
    )
    .await;
    assert_eq!(v["data"]["cancelExecution"], true, "{v}");
    let mut frames = sse
        .collect_until(WAIT, |fs| terminal_of(fs, &slow.execution_id).is_some())
        .await;
    let terminal = terminal_of(&frames, &slow.execution_id).expect("a terminal frame");
    assert_eq!(
        frames[terminal].data["params"]["event_type"],
        "playbook.cancelled"
    );
    barrier(&w.a, &token, &client, &mut sse, &mut frames).await;
    let results = results_of(&frames, &slow.request_id);
    assert_eq!(results.len(), 1, "{frames:?}");
    assert_eq!(
        results[0]["error"]["code"], "MINE",
        "the callback's: {frames:?}"
    );
}

#[tokio::test]
async fn on_two_replicas_every_silent_failure_gets_exactly_one_result() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "many@example.com").await;
    let (mut sse, init) = open(&w.a, &token, None).await;
    let client = client_id_of(&init);
    let mut runs = Vec::new();
    for i in 0..4 {
        let origin = if i % 2 == 0 { &w.a } else { &w.b };
        runs.push(run(origin, &token, "demo/fail_silent", json!({"i": i}), &client).await);
    }
    let mut frames = sse
        .collect_until(WAIT, |fs| {
            runs.iter()
                .all(|r| !results_of(fs, &r.request_id).is_empty())
        })
        .await;
    barrier(&w.b, &token, &client, &mut sse, &mut frames).await;
    for r in &runs {
        let results = results_of(&frames, &r.request_id);
        assert_eq!(results.len(), 1, "{}: {frames:?}", r.request_id);
        assert_eq!(results[0]["status"], "FAILED");
        assert_eq!(results[0]["executionId"], r.execution_id.as_str());
        let terminals = frames
            .iter()
            .filter(|f| {
                f.event == "playbook/state"
                    && f.data["params"]["terminal"] == true
                    && f.data["params"]["execution_id"] == r.execution_id.as_str()
            })
            .count();
        assert_eq!(terminals, 1, "{frames:?}");
    }
}

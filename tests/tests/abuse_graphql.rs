//! One GraphQL request cannot start dozens of runs or fan out to NoETL (issue 12, "Must
//! show"): 40 aliased `executePlaybook` fields are refused and the stand-in counts no
//! execution — written plainly, through fragments and inline fragments, and on graphql-ws;
//! `execution` aliases over the NoETL cap are refused before any NoETL call; a batch (JSON
//! array) is refused unless enabled, and when enabled is limited as a whole; one
//! `executePlaybook` still runs; and a user over `EXECUTE_RATE_LIMIT` or
//! `GRAPHQL_MUTATION_RATE_LIMIT` gets 429 with `Retry-After` (graphql-ws: `RATE_LIMITED`)
//! while another user is unaffected.

use std::time::Duration;

use gateway_tests::harness::flows::{
    self, http, post_graphql, run_playbook, ws_connect, ws_init, ws_next_json, ws_send,
};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// The stand-in's route that starts a run.
const EXECUTE: &str = "POST /api/execute";
/// The stand-in's routes `execution(id)` calls.
const EXECUTION_PATH: &str = "GET /api/executions/{id}";
const EXECUTION_STATUS: &str = "GET /api/executions/{id}/status";

struct World {
    standin: StandIn,
    origin: Origin,
}

async fn world(env: &[(&str, &str)]) -> World {
    let standin = StandIn::start(StandInOptions::default())
        .await
        .expect("the stand-in starts");
    let opts = OriginOptions::default().envs(env);
    let origin = Origin::start(&standin, opts)
        .await
        .expect("the origin starts");
    World { standin, origin }
}

async fn login(w: &World, email: &str) -> String {
    flows::login(&w.origin.url, &w.standin, email).await
}

/// `n` aliased `executePlaybook` fields of `demo/echo`.
fn aliased_executes(n: usize) -> String {
    (0..n)
        .map(|i| format!("r{i}: executePlaybook(path: \"demo/echo\") {{ executionId }} "))
        .collect()
}

fn gql_code(v: &Value) -> &str {
    v["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("<no error code>")
}

/// Posts `query` as `token`; asserts the refusal is `QUERY_TOO_COSTLY` with no data.
async fn assert_too_costly(w: &World, token: &str, query: &str) {
    let (status, _, v) = post_graphql(&w.origin.url, Some(token), &[], query, Value::Null).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(gql_code(&v), "QUERY_TOO_COSTLY", "{query}: {v}");
    assert!(v["data"].is_null(), "nothing ran: {v}");
}

#[tokio::test]
async fn forty_aliased_execute_playbooks_start_nothing_however_they_are_written() {
    let w = world(&[]).await;
    let token = login(&w, "alias@example.com").await;
    w.standin.reset_calls().await;

    let forty = aliased_executes(40);
    assert_too_costly(&w, &token, &format!("mutation {{ {forty} }}")).await;
    // Through a named fragment, and through inline fragments.
    assert_too_costly(
        &w,
        &token,
        &format!("mutation {{ ...Runs }} fragment Runs on Mutation {{ {forty} }}"),
    )
    .await;
    assert_too_costly(
        &w,
        &token,
        "mutation { ... on Mutation { a: executePlaybook(path: \"demo/echo\") { id } }
                    ... on Mutation { b: executePlaybook(path: \"demo/echo\") { id } } }",
    )
    .await;
    // A fragment spread twice counts twice; one that spreads itself does not hang.
    assert_too_costly(
        &w,
        &token,
        "mutation { ...One ...One } fragment One on Mutation { executePlaybook(path: \"demo/echo\") { id } }",
    )
    .await;
    let (_, _, v) = post_graphql(
        &w.origin.url,
        Some(&token),
        &[],
        "query { ...Loop } fragment Loop on Query { health ...Loop }",
        Value::Null,
    )
    .await;
    assert!(!v["errors"].is_null(), "a fragment cycle is an error: {v}");
    assert_eq!(w.standin.call_count(EXECUTE).await, 0, "no run started");

    // The cap is one per request: one still runs.
    run_playbook(&w.origin.url, &token, "demo/echo", json!({}), None).await;
    assert_eq!(w.standin.call_count(EXECUTE).await, 1);
}

#[tokio::test]
async fn execution_aliases_over_the_noetl_cap_are_refused_before_any_noetl_call() {
    let w = world(&[]).await;
    let token = login(&w, "fanout@example.com").await;
    let id = run_playbook(&w.origin.url, &token, "demo/echo", json!({}), None).await;
    w.standin.reset_calls().await;

    let fields: String = (0..6)
        .map(|i| format!("e{i}: execution(id: \"{id}\") {{ status }} "))
        .collect();
    assert_too_costly(&w, &token, &format!("{{ {fields} }}")).await;
    // Root fields beyond the cap, even cheap ones.
    let many: String = (0..11).map(|i| format!("h{i}: health ")).collect();
    assert_too_costly(&w, &token, &format!("{{ {many} }}")).await;
    let calls = w.standin.calls().await;
    assert_eq!(
        calls.get(EXECUTION_PATH).copied().unwrap_or(0)
            + calls.get(EXECUTION_STATUS).copied().unwrap_or(0),
        0,
        "no NoETL call: {calls:?}"
    );

    // Within the cap it works (and does call NoETL).
    let fields: String = (0..5)
        .map(|i| format!("e{i}: execution(id: \"{id}\") {{ status }} "))
        .collect();
    let (_, _, v) = post_graphql(
        &w.origin.url,
        Some(&token),
        &[],
        &format!("{{ {fields} }}"),
        Value::Null,
    )
    .await;
    assert!(v["errors"].is_null(), "{v}");
    assert!(v["data"]["e4"]["status"].is_string(), "{v}");
    assert!(w.standin.call_count(EXECUTION_STATUS).await >= 1);
}

#[tokio::test]
async fn the_same_rules_hold_for_each_graphql_ws_message() {
    let w = world(&[]).await;
    let token = login(&w, "wscost@example.com").await;
    w.standin.reset_calls().await;
    let mut ws = ws_connect(&w.origin.url, None).await;
    ws_init(&mut ws, &token).await;
    assert_eq!(ws_next_json(&mut ws, WAIT).await["type"], "connection_ack");

    let query = format!("mutation {{ {} }}", aliased_executes(40));
    ws_send(
        &mut ws,
        json!({"id": "1", "type": "subscribe", "payload": {"query": query}}),
    )
    .await;
    let m = ws_next_json(&mut ws, WAIT).await;
    assert_eq!(m["id"], "1", "{m}");
    let errors = if m["type"] == "error" {
        m["payload"].clone()
    } else {
        m["payload"]["errors"].clone()
    };
    assert_eq!(errors[0]["extensions"]["code"], "QUERY_TOO_COSTLY", "{m}");
    assert_eq!(w.standin.call_count(EXECUTE).await, 0, "no run started");

    // One run per message is fine.
    ws_send(
        &mut ws,
        json!({"id": "2", "type": "subscribe", "payload": {"query": "mutation { executePlaybook(path: \"demo/echo\") { executionId } }"}}),
    )
    .await;
    // Skips what is left of operation 1 (its `complete`).
    let m = loop {
        let m = ws_next_json(&mut ws, WAIT).await;
        if m["id"] == "2" {
            break m;
        }
    };
    assert!(
        m["payload"]["data"]["executePlaybook"]["executionId"].is_string(),
        "{m}"
    );
    assert_eq!(w.standin.call_count(EXECUTE).await, 1);
}

/// Posts a raw JSON body to `/graphql` as `token`.
async fn post_raw(w: &World, token: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .post(format!("{}/graphql", w.origin.url))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("the origin answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn batches_are_refused_unless_enabled_and_then_limited_as_a_whole() {
    let off = world(&[]).await;
    let token = login(&off, "batch@example.com").await;
    off.standin.reset_calls().await;
    let two_runs = json!([
        {"query": "mutation { executePlaybook(path: \"demo/echo\") { id } }"},
        {"query": "mutation { executePlaybook(path: \"demo/echo\") { id } }"},
    ]);
    let (status, v) = post_raw(&off, &token, &two_runs).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "batch_not_enabled", "{v}");
    assert_eq!(off.standin.call_count(EXECUTE).await, 0);

    let on = world(&[("GRAPHQL_BATCH", "true")]).await;
    let token = login(&on, "batch@example.com").await;
    on.standin.reset_calls().await;
    let (status, v) = post_raw(&on, &token, &two_runs).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v[0]["errors"][0]["extensions"]["code"], "QUERY_TOO_COSTLY",
        "{v}"
    );
    assert_eq!(
        v[1]["errors"][0]["extensions"]["code"], "QUERY_TOO_COSTLY",
        "{v}"
    );
    assert_eq!(
        on.standin.call_count(EXECUTE).await,
        0,
        "the batch counts as one request"
    );
    let (status, v) = post_raw(
        &on,
        &token,
        &json!([{"query": "{ health }"}, {"query": "{ me { email } }"}]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v[0]["data"]["health"], "ok", "{v}");
    assert_eq!(v[1]["data"]["me"]["email"], "batch@example.com", "{v}");
}

#[tokio::test]
async fn a_user_over_the_execute_rate_gets_429_and_others_do_not() {
    let w = world(&[("EXECUTE_RATE_LIMIT", "2/1m")]).await;
    let a = login(&w, "eager@example.com").await;
    let b = login(&w, "calm@example.com").await;
    w.standin.reset_calls().await;
    for _ in 0..2 {
        run_playbook(&w.origin.url, &a, "demo/echo", json!({}), None).await;
    }
    let (status, headers, v) = post_graphql(
        &w.origin.url,
        Some(&a),
        &[],
        flows::EXECUTE_PLAYBOOK,
        json!({"path": "demo/echo"}),
    )
    .await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(gql_code(&v), "RATE_LIMITED", "{v}");
    let retry: u64 = headers
        .get("retry-after")
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {headers:?}"));
    assert!((1..=30).contains(&retry), "one run every 30 s: {retry}");
    assert_eq!(
        w.standin.call_count(EXECUTE).await,
        2,
        "the refused run never started"
    );

    run_playbook(&w.origin.url, &b, "demo/echo", json!({}), None).await;
    assert_eq!(w.standin.call_count(EXECUTE).await, 3);
    // Queries are not limited by it.
    let (status, _, v) = post_graphql(
        &w.origin.url,
        Some(&a),
        &[],
        "{ me { email } }",
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

/// Sends `query` as operation `id` on `ws`; its first message that is not `complete`.
async fn ws_operation(ws: &mut flows::Ws, id: &str, query: &str) -> Value {
    ws_send(
        ws,
        json!({"id": id, "type": "subscribe", "payload": {"query": query}}),
    )
    .await;
    loop {
        let m = ws_next_json(ws, WAIT).await;
        if m["id"] == id && m["type"] != "complete" {
            return m;
        }
    }
}

#[tokio::test]
async fn the_mutation_rate_counts_every_mutation_over_http_and_graphql_ws() {
    let w = world(&[("GRAPHQL_MUTATION_RATE_LIMIT", "2/1m")]).await;
    let a = login(&w, "busy-mutator@example.com").await;
    let b = login(&w, "quiet-mutator@example.com").await;
    // Any mutation counts, whether or not its resolver then succeeds.
    let cancel = "mutation { cancelExecution(id: \"900000000000000001\") }";
    let (status, _, v) = post_graphql(&w.origin.url, Some(&a), &[], cancel, Value::Null).await;
    assert_eq!((status, gql_code(&v)), (200, "NOT_FOUND"), "{v}");

    // The second on a socket (the same user, the same limiter) …
    let mut ws = ws_connect(&w.origin.url, None).await;
    ws_init(&mut ws, &a).await;
    assert_eq!(ws_next_json(&mut ws, WAIT).await["type"], "connection_ack");
    let m = ws_operation(&mut ws, "1", cancel).await;
    assert_eq!(
        m["payload"]["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{m}"
    );
    // … and the third is refused there, and over HTTP with 429.
    let m = ws_operation(&mut ws, "2", cancel).await;
    assert_eq!(
        m["payload"]["errors"][0]["extensions"]["code"], "RATE_LIMITED",
        "{m}"
    );
    let (status, headers, v) =
        post_graphql(&w.origin.url, Some(&a), &[], cancel, Value::Null).await;
    assert_eq!((status, gql_code(&v)), (429, "RATE_LIMITED"), "{v}");
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    // Another user is unaffected.
    let (status, _, v) = post_graphql(&w.origin.url, Some(&b), &[], cancel, Value::Null).await;
    assert_eq!((status, gql_code(&v)), (200, "NOT_FOUND"), "{v}");
}

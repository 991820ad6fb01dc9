//! Every run is its owner's (issue 11, "Must show"): user B gets 404 for user A's execution
//! at every door — the proxy, GraphQL `execution`, `cancelExecution`, `subscribeToExecution`
//! and `executionEvents` over graphql-ws — directly at the origin and through the edge
//! (`wrangler dev`, `make edge`); the execution listing is refused to B; `myExecutions`
//! shows each user only their own runs, newest first, in pages; an admin reads both.
//!
//! Users come from the stand-in's directory: `admin@…` holds the `admin` role (the default
//! `READ_ALL_ROLES`), any other address the `user` role.

use std::time::Duration;

use gateway_tests::harness::edge::EdgeWorld;
use gateway_tests::harness::flows::{
    self, get_json, graphql, http, login, open_events_client, run_playbook, ws_connect, ws_init,
    ws_next_json, ws_send, Ws,
};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::sse::SseClient;
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// An execution id NoETL never issued.
const NO_SUCH_RUN: &str = "900000000000000001";

const EXECUTION: &str = "query($id: ID!) { execution(id: $id) { executionId status } }";
const CANCEL: &str = "mutation($id: ID!) { cancelExecution(id: $id) }";
const SUBSCRIBE_TO: &str =
    "mutation($id: ID!, $client: String!) { subscribeToExecution(executionId: $id, clientId: $client) }";
const EXECUTION_EVENTS: &str = "subscription($id: ID!) {
  executionEvents(executionId: $id) { executionId eventType status terminal } }";
const MY_EXECUTIONS: &str = "query($first: Int, $after: String) {
  myExecutions(first: $first, after: $after) {
    items { executionId playbookPath startedAt status cursor } endCursor hasNextPage } }";

/// The two doors a client can knock on: the origin directly, and the edge.
fn doors(w: &EdgeWorld) -> [(&'static str, &str); 2] {
    [("origin", &w.origin.url), ("edge", &w.edge.url)]
}

/// Stand-in, origin trusting the test edge's key, and the edge ([`EdgeWorld`]).
async fn world() -> EdgeWorld {
    EdgeWorld::start(OriginOptions::default()).await
}

/// `GET {base}{path}` as `token`: status and JSON body.
async fn get(base: &str, token: &str, path: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The execution ids of a `myExecutions` reply's page, in order; panics (naming `door`)
/// if the reply has no page.
fn listed_ids<'a>(v: &'a Value, door: &str) -> Vec<&'a str> {
    v["data"]["myExecutions"]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{door}: {v}"))
        .iter()
        .map(|i| i["executionId"].as_str().unwrap())
        .collect()
}

fn gql_code(v: &Value) -> &str {
    v["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("<no error code>")
}

/// The client id `/events` assigns to `token` at `base`.
async fn client_id(base: &str, token: &str) -> (SseClient, String) {
    open_events_client(&format!("{base}/events"), token, None, WAIT).await
}

/// A graphql-transport-ws socket at `base` for `token` (on the upgrade and in
/// `connection_init`), acknowledged.
async fn socket(base: &str, token: &str) -> Ws {
    let mut ws = ws_connect(base, Some(token)).await;
    ws_init(&mut ws, token).await;
    assert_eq!(ws_next_json(&mut ws, WAIT).await["type"], "connection_ack");
    ws
}

/// Subscribes to `executionEvents` of `id` as operation `op`; its payloads until `complete`.
async fn execution_events(ws: &mut Ws, op: &str, id: &str) -> Vec<Value> {
    ws_send(
        ws,
        json!({"id": op, "type": "subscribe",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": id}}}),
    )
    .await;
    let mut payloads = Vec::new();
    loop {
        let m = ws_next_json(ws, WAIT).await;
        if m["id"] != op {
            continue;
        }
        match m["type"].as_str() {
            Some("next") => payloads.push(m["payload"].clone()),
            Some("complete") => return payloads,
            _ => panic!("unexpected message for {op}: {m}"),
        }
    }
}

/// Every way B can ask about execution `id` at `base`, each answered "not found".
async fn assert_not_found_everywhere(base: &str, b: &str, b_client: &str, ws: &mut Ws, id: &str) {
    for path in [
        format!("/noetl/executions/{id}"),
        format!("/noetl/executions/{id}/status"),
    ] {
        let (status, body) = get(base, b, &path).await;
        assert_eq!(status, 404, "{base}{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{base}{path}: {body}");
    }
    let v = graphql(base, b, EXECUTION, json!({"id": id})).await;
    assert_eq!(gql_code(&v), "NOT_FOUND", "execution at {base}: {v}");
    assert!(v["data"]["execution"].is_null(), "{v}");
    let v = graphql(base, b, CANCEL, json!({"id": id})).await;
    assert_eq!(gql_code(&v), "NOT_FOUND", "cancelExecution at {base}: {v}");
    let v = graphql(base, b, SUBSCRIBE_TO, json!({"id": id, "client": b_client})).await;
    assert_eq!(
        gql_code(&v),
        "NOT_FOUND",
        "subscribeToExecution at {base}: {v}"
    );
    let payloads = execution_events(ws, &format!("b-{id}"), id).await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    assert_eq!(
        gql_code(&payloads[0]),
        "NOT_FOUND",
        "executionEvents at {base}: {payloads:?}"
    );
}

#[tokio::test]
async fn another_users_run_is_not_found_at_every_door_directly_and_through_the_edge() {
    let w = world().await;
    for (door, base) in doors(&w) {
        let a = login(base, &w.standin, "alice@example.com").await;
        let b = login(base, &w.standin, "bob@example.com").await;
        let admin = login(base, &w.standin, "admin@example.com").await;
        let id = run_playbook(base, &a, "demo/slow", json!({"seconds": 60}), None).await;

        // The owner reads it at every door (so the refusals below are about B).
        for path in [
            format!("/noetl/executions/{id}"),
            format!("/noetl/executions/{id}/status"),
        ] {
            let (status, body) = get(base, &a, &path).await;
            assert_eq!(status, 200, "{door}: {path}: {body}");
        }
        let v = graphql(base, &a, EXECUTION, json!({"id": id})).await;
        assert_eq!(v["data"]["execution"]["executionId"], id.as_str(), "{v}");

        // B: the same 404 for A's run as for one that does not exist, and NoETL is never
        // asked about either.
        let (_b_events, b_client) = client_id(base, &b).await;
        let mut b_ws = socket(base, &b).await;
        w.standin.reset_calls().await;
        assert_not_found_everywhere(base, &b, &b_client, &mut b_ws, &id).await;
        assert_not_found_everywhere(base, &b, &b_client, &mut b_ws, NO_SUCH_RUN).await;
        let asked: Vec<String> = w
            .standin
            .calls()
            .await
            .into_keys()
            .filter(|k| k.contains("/api/executions"))
            .collect();
        assert!(asked.is_empty(), "{door}: NoETL was asked {asked:?}");

        // An admin (read-all role) reads it.
        let (status, body) = get(base, &admin, &format!("/noetl/executions/{id}")).await;
        assert_eq!(status, 200, "{door}: {body}");
        let v = graphql(base, &admin, EXECUTION, json!({"id": id})).await;
        assert_eq!(v["data"]["execution"]["executionId"], id.as_str(), "{v}");

        // The owner cancels it and follows it to its (cancelled) end over graphql-ws.
        let v = graphql(base, &a, CANCEL, json!({"id": id})).await;
        assert_eq!(v["data"]["cancelExecution"], true, "{door}: {v}");
        let mut a_ws = socket(base, &a).await;
        let payloads = execution_events(&mut a_ws, "a", &id).await;
        let last = &payloads.last().expect("at least the terminal state")["data"];
        assert_eq!(last["executionEvents"]["terminal"], true, "{payloads:?}");
        assert_eq!(last["executionEvents"]["eventType"], "playbook.cancelled");
    }
}

#[tokio::test]
async fn the_listing_is_read_all_only_and_my_executions_lists_each_users_own_runs() {
    let w = world().await;
    let [(_, origin), (_, edge)] = doors(&w);
    let a = login(origin, &w.standin, "alice@example.com").await;
    let b = login(edge, &w.standin, "bob@example.com").await;
    let admin = login(origin, &w.standin, "admin@example.com").await;

    // Runs started through both doors, interleaved between the two users.
    let a1 = run_playbook(origin, &a, "demo/echo", json!({}), None).await;
    let b1 = run_playbook(edge, &b, "demo/echo", json!({}), None).await;
    let a2 = run_playbook(edge, &a, "demo/steps", json!({}), None).await;
    let b2 = run_playbook(origin, &b, "demo/echo", json!({}), None).await;
    let a3 = run_playbook(origin, &a, "demo/echo", json!({}), None).await;

    for (door, base) in doors(&w) {
        // The harness allow-lists `GET /api/executions` as an operator might: the listing
        // is still the read-all roles' alone.
        for path in ["/noetl/executions", "/noetl/executions?limit=5"] {
            let (status, body) = get(base, &b, path).await;
            assert_eq!(status, 404, "{door}: {path}: {body}");
            assert_eq!(body["error"]["code"], "not_found");
            let (status, body) = get(base, &admin, path).await;
            assert_eq!(status, 200, "{door}: {path}: {body}");
        }

        // A's runs, newest first, two to a page.
        let v = graphql(base, &a, MY_EXECUTIONS, json!({"first": 2})).await;
        let page = &v["data"]["myExecutions"];
        let ids = listed_ids(&v, door);
        assert_eq!(ids, [a3.as_str(), a2.as_str()], "{door}: {v}");
        assert_eq!(page["hasNextPage"], true, "{v}");
        assert_eq!(page["items"][1]["playbookPath"], "demo/steps", "{v}");
        for item in page["items"].as_array().unwrap() {
            assert!(
                chrono::DateTime::parse_from_rfc3339(item["startedAt"].as_str().unwrap()).is_ok(),
                "{item}"
            );
            assert_ne!(item["status"], "UNKNOWN", "NoETL answered: {item}");
        }
        let v = graphql(
            base,
            &a,
            MY_EXECUTIONS,
            json!({"first": 2, "after": page["endCursor"]}),
        )
        .await;
        let page = &v["data"]["myExecutions"];
        assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(page["items"][0]["executionId"], a1.as_str(), "{v}");
        assert_eq!(page["hasNextPage"], false, "{v}");

        // B sees B's runs only; the default page holds them all.
        let v = graphql(base, &b, MY_EXECUTIONS, json!({})).await;
        let ids = listed_ids(&v, door);
        assert_eq!(ids, [b2.as_str(), b1.as_str()], "{door}: {v}");

        // An admin reads both users' runs.
        for id in [&a1, &a2, &b1, &b2] {
            let v = graphql(base, &admin, EXECUTION, json!({"id": id})).await;
            assert_eq!(v["data"]["execution"]["executionId"], id.as_str(), "{v}");
            let (status, body) = get(base, &admin, &format!("/noetl/executions/{id}")).await;
            assert_eq!(status, 200, "{door}: {body}");
        }

        // Page sizes are bounded and cursors checked.
        for vars in [
            json!({"first": 0}),
            json!({"first": 101}),
            json!({"after": "not-a-cursor"}),
        ] {
            let v = graphql(base, &a, MY_EXECUTIONS, vars.clone()).await;
            assert_eq!(gql_code(&v), "BAD_USER_INPUT", "{vars}: {v}");
        }
    }
}

#[tokio::test]
async fn a_status_noetl_cannot_give_is_unknown_and_the_page_still_answers() {
    let mut standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::default())
        .await
        .unwrap();
    let a = login(&origin.url, &standin, "alice@example.com").await;
    let first = run_playbook(&origin.url, &a, "demo/echo", json!({}), None).await;
    let second = run_playbook(&origin.url, &a, "demo/echo", json!({}), None).await;
    standin.guard().stop(Duration::from_secs(2));
    // The session is served from the cache; every status read fails.
    let v = graphql(&origin.url, &a, MY_EXECUTIONS, json!({})).await;
    assert!(v["errors"].is_null(), "{v}");
    let items = v["data"]["myExecutions"]["items"].as_array().unwrap();
    let got: Vec<(&str, &str)> = items
        .iter()
        .map(|i| {
            (
                i["executionId"].as_str().unwrap(),
                i["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [(second.as_str(), "UNKNOWN"), (first.as_str(), "UNKNOWN")],
        "{v}"
    );
}

/// `myExecutions` of `token` at `base` (one page of up to 100) lists exactly `started`, each
/// once; the reply, for more checks.
async fn lists_each_once(base: &str, token: &str, started: &[String]) -> Value {
    let v = graphql(base, token, MY_EXECUTIONS, json!({"first": 100})).await;
    let mut listed = listed_ids(&v, base);
    listed.sort();
    let mut expected: Vec<&str> = started.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(listed, expected, "every run listed once: {v}");
    v
}

#[tokio::test]
async fn runs_started_at_once_on_two_replicas_are_all_their_owners() {
    let (_nats, standin, origins) = flows::nats_stack(2).await;
    let a = login(&origins[0].url, &standin, "alice@example.com").await;
    let b = login(&origins[1].url, &standin, "bob@example.com").await;
    let started = futures::future::join_all((0..8).map(|i| {
        let base = origins[i % 2].url.clone();
        let a = a.clone();
        async move { run_playbook(&base, &a, "demo/echo", json!({}), None).await }
    }))
    .await;

    for origin in &origins {
        lists_each_once(&origin.url, &a, &started).await;
    }
    for id in &started {
        let v = graphql(&origins[1].url, &b, EXECUTION, json!({"id": id})).await;
        assert_eq!(gql_code(&v), "NOT_FOUND", "{v}");
        let v = graphql(&origins[0].url, &a, EXECUTION, json!({"id": id})).await;
        assert_eq!(v["data"]["execution"]["executionId"], id.as_str(), "{v}");
    }
}

/// Owner records on NATS that found their slot taken (`owners.rs` probes upwards).
const SLOT_CONFLICTS: &str =
    "gateway_kv_operation_duration_seconds_count{bucket=\"owners\",op=\"create\",outcome=\"conflict\"}";

#[tokio::test]
async fn runs_one_user_starts_at_once_on_one_replica_take_their_slots_in_turn() {
    // A partner system starting many runs with one account: every run must be listed, in
    // contiguous slots, and the replica's writers must not race each other for the same
    // slot (each lost race is a failed K/V create; they grew with the concurrency).
    let (_nats, standin, origins) = flows::nats_stack_with(
        1,
        StandInOptions::default(),
        &[
            ("EXECUTE_RATE_LIMIT", "off"),
            ("GRAPHQL_MUTATION_RATE_LIMIT", "off"),
        ],
    )
    .await;
    let origin = &origins[0];
    let a = login(&origin.url, &standin, "alice@example.com").await;
    const RUNS: usize = 48;
    let started = futures::future::join_all((0..RUNS).map(|_| {
        let (base, a) = (origin.url.clone(), a.clone());
        async move { run_playbook(&base, &a, "demo/echo", json!({}), None).await }
    }))
    .await;

    let v = lists_each_once(&origin.url, &a, &started).await;
    let mut cursors: Vec<u64> = v["data"]["myExecutions"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["cursor"].as_str().unwrap().parse().unwrap())
        .collect();
    cursors.sort_unstable();
    assert_eq!(cursors, (1..=RUNS as u64).collect::<Vec<_>>(), "{v}");
    assert_eq!(
        origin.metric(SLOT_CONFLICTS).await.unwrap_or(0),
        0,
        "one replica's writers took their slots in turn"
    );
}

#[tokio::test]
async fn auth_playbook_runs_the_gateway_did_not_start_are_read_all_only() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("AUTH_MODE", "playbook"),
    )
    .await
    .unwrap();
    let a = login(&origin.url, &standin, "alice@example.com").await;
    let admin = login(&origin.url, &standin, "admin@example.com").await;
    // The login playbooks' runs, whose workloads carry ID tokens, as NoETL lists them.
    let runs = get_json(&format!("{}/api/executions", standin.url)).await;
    let auth_runs: Vec<String> = runs
        .as_array()
        .expect("a list of executions")
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("api_integration/auth0/"))
        })
        .map(|r| match &r["execution_id"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    assert!(auth_runs.len() >= 2, "two logins ran playbooks: {runs:?}");
    for id in &auth_runs {
        let (status, body) = get(&origin.url, &a, &format!("/noetl/executions/{id}")).await;
        assert_eq!(status, 404, "{id}: {body}");
        let v = graphql(&origin.url, &a, EXECUTION, json!({"id": id})).await;
        assert_eq!(gql_code(&v), "NOT_FOUND", "{v}");
        let (status, body) = get(&origin.url, &admin, &format!("/noetl/executions/{id}")).await;
        assert_eq!(status, 200, "{id}: {body}");
    }
}

//! Playbook access checks end to end: the gateway asks NoETL the right permission for
//! each operation (`view` for a read, `execute` for a run or a cancel), and reuses a
//! decision only for the same (user, playbook, permission) within `ACCESS_CACHE_TTL`.
//!
//! The stand-in's `viewer@…` users may view `demo/` playbooks but not execute them, so a
//! gateway that asked the wrong permission gets the opposite answer and fails here.

use std::time::Duration;

use gateway_tests::harness::flows::{execute_playbook, graphql, http, login};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::{json, Value};

const CHECK_ACCESS: &str = "POST /api/auth/check-playbook-access";

/// Starts an execution at NoETL directly (not through the gateway); its id.
async fn execution_at_noetl(standin: &StandIn, path: &str) -> String {
    let v: Value = http()
        .post(format!("{}/api/execute", standin.url))
        .json(&json!({"path": path, "workload": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["execution_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned()
}

/// `POST /api/auth/check-access` on the gateway; `(status, body)`.
async fn check_access(origin: &Origin, token: &str, path: &str, permission: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{}/api/auth/check-access", origin.url))
        .bearer_auth(token)
        .json(&json!({"playbook_path": path, "permission_type": permission}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_read_asks_view_and_a_run_or_cancel_asks_execute() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    // The viewer reads every run (a read-all role), so only the playbook permission decides
    // here: a run is otherwise its owner's, and a viewer can start none (tests/ownership.rs).
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("READ_ALL_ROLES", "admin,viewer"),
    )
    .await
    .unwrap();
    let viewer = login(&origin.url, &standin, "viewer@example.com").await;
    let id = execution_at_noetl(&standin, "demo/slow").await;

    // Reading an execution needs `view`: the viewer may.
    let v = graphql(
        &origin.url,
        &viewer,
        "query($id: ID!) { execution(id: $id) { executionId status } }",
        json!({"id": id}),
    )
    .await;
    assert!(v["errors"].is_null(), "a viewer may read: {v}");
    assert_eq!(v["data"]["execution"]["executionId"], id.as_str(), "{v}");

    // Running or cancelling needs `execute`: the viewer may not.
    let v = execute_playbook(&origin.url, &viewer, "demo/echo", json!({}), None).await;
    assert_eq!(v["errors"][0]["extensions"]["code"], "FORBIDDEN", "{v}");
    let v = graphql(
        &origin.url,
        &viewer,
        "mutation($id: ID!) { cancelExecution(id: $id) }",
        json!({"id": id}),
    )
    .await;
    assert_eq!(v["errors"][0]["extensions"]["code"], "FORBIDDEN", "{v}");

    // The REST check passes the asked permission through.
    let (s, v) = check_access(&origin, &viewer, "demo/echo", "view").await;
    assert_eq!((s, &v["allowed"]), (200, &json!(true)), "{v}");
    let (s, v) = check_access(&origin, &viewer, "demo/echo", "execute").await;
    assert_eq!((s, &v["allowed"]), (200, &json!(false)), "{v}");

    // A plain user may do both, so the refusals above are about the permission.
    let user = login(&origin.url, &standin, "user@example.com").await;
    let v = execute_playbook(&origin.url, &user, "demo/echo", json!({}), None).await;
    assert!(v["errors"].is_null(), "{v}");
}

#[tokio::test]
async fn access_decisions_are_reused_per_permission_until_the_ttl_passes() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("ACCESS_CACHE_TTL", "2s"),
    )
    .await
    .unwrap();
    let viewer = login(&origin.url, &standin, "viewer@example.com").await;
    standin.reset_calls().await;

    // Within the TTL, the same (user, playbook, permission) is asked once.
    for _ in 0..3 {
        let (s, v) = check_access(&origin, &viewer, "demo/echo", "view").await;
        assert_eq!((s, &v["allowed"]), (200, &json!(true)), "{v}");
    }
    assert_eq!(standin.call_count(CHECK_ACCESS).await, 1);

    // The permission is part of the key: `execute` is asked, and its answer differs.
    for _ in 0..2 {
        let (s, v) = check_access(&origin, &viewer, "demo/echo", "execute").await;
        assert_eq!((s, &v["allowed"]), (200, &json!(false)), "{v}");
    }
    assert_eq!(standin.call_count(CHECK_ACCESS).await, 2);
    // So is the playbook.
    check_access(&origin, &viewer, "demo/steps", "view").await;
    assert_eq!(standin.call_count(CHECK_ACCESS).await, 3);

    // Past the TTL the decision is asked again.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (s, v) = check_access(&origin, &viewer, "demo/echo", "view").await;
    assert_eq!((s, &v["allowed"]), (200, &json!(true)), "{v}");
    assert_eq!(standin.call_count(CHECK_ACCESS).await, 4);
}

//! The client-side steps every end-to-end suite repeats: log in, ask GraphQL, run a
//! playbook. One copy here, so a protocol change is made in one place.

use std::time::Duration;

use serde_json::{json, Value};

use super::standin::StandIn;

/// A client with a 20 s timeout: a test waits, it never hangs.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("a default reqwest client builds")
}

/// `POST {base}/api/auth/login` with a dev ID token for `email`; the whole reply.
/// Panics (the test fails) unless the login succeeds.
pub async fn login_reply(base: &str, standin: &StandIn, email: &str) -> Value {
    let id_token = standin.dev_token(email).await;
    let resp = http()
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"auth0_token": id_token}))
        .send()
        .await
        .expect("the gateway answers a login");
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "login failed: {body}");
    body
}

/// [`login_reply`]'s session token.
pub async fn login(base: &str, standin: &StandIn, email: &str) -> String {
    login_reply(base, standin, email).await["session_token"]
        .as_str()
        .expect("a successful login returns a session token")
        .to_owned()
}

/// `POST {base}/graphql` with a bearer token; the JSON reply.
pub async fn graphql(base: &str, token: &str, query: &str, variables: Value) -> Value {
    http()
        .post(format!("{base}/graphql"))
        .bearer_auth(token)
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
        .expect("the gateway answers GraphQL")
        .json()
        .await
        .unwrap_or(Value::Null)
}

/// The executePlaybook mutation, with every field of its result.
pub const EXECUTE_PLAYBOOK: &str = "mutation($path: String!, $workload: JSON, $clientId: String) {
  executePlaybook(path: $path, workload: $workload, clientId: $clientId) { id executionId requestId name status } }";

/// Runs `path` with `workload` for `client_id`; the GraphQL reply.
pub async fn execute_playbook(
    base: &str,
    token: &str,
    path: &str,
    workload: Value,
    client_id: Option<&str>,
) -> Value {
    graphql(
        base,
        token,
        EXECUTE_PLAYBOOK,
        json!({"path": path, "workload": workload, "clientId": client_id}),
    )
    .await
}

/// A realtime stack: a nats-server, the stand-in publishing on it, and `replicas` origins
/// sharing it (the shape most realtime suites need).
pub async fn nats_stack(
    replicas: usize,
) -> (super::nats::NatsServer, StandIn, Vec<super::origin::Origin>) {
    use super::origin::{Origin, OriginOptions};
    use super::standin::StandInOptions;
    let nats = super::nats::NatsServer::start()
        .await
        .expect("nats-server starts");
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..Default::default()
    })
    .await
    .expect("the stand-in starts");
    let mut origins = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        origins.push(
            Origin::start(&standin, OriginOptions::with_nats(&nats.url))
                .await
                .expect("an origin starts"),
        );
    }
    (nats, standin, origins)
}

//! The client-side steps every end-to-end suite repeats: log in and out, ask GraphQL, run a
//! playbook, open an `/events` stream or a graphql-ws socket, read a JSON document. One copy
//! here, so a protocol change is made in one place.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::sse::{SseClient, SseFrame};
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

/// `POST {base}/api/auth/logout` with `token` as the bearer; panics unless it answers 204.
pub async fn logout(base: &str, token: &str) {
    let r = http()
        .post(format!("{base}/api/auth/logout"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the gateway answers a logout");
    assert_eq!(r.status(), 204, "logout at {base}");
}

/// `GET {url}` with no credentials; the JSON body. Panics if the server does not answer or
/// the body is not JSON (what a test reads this way must be there).
pub async fn get_json(url: &str) -> Value {
    http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url} is not JSON: {e}"))
}

/// `POST {base}/graphql` with `query` (and `variables` unless null), `token` as the bearer
/// if any and `headers` on top: the status, the headers and the JSON body (null if none).
pub async fn post_graphql(
    base: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    query: &str,
    variables: Value,
) -> (u16, HeaderMap, Value) {
    let mut body = json!({"query": query});
    if !variables.is_null() {
        body["variables"] = variables;
    }
    let mut req = http().post(format!("{base}/graphql")).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("the gateway answers GraphQL");
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

/// `POST {base}/graphql` with a bearer token; the JSON reply.
pub async fn graphql(base: &str, token: &str, query: &str, variables: Value) -> Value {
    post_graphql(base, Some(token), &[], query, variables)
        .await
        .2
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

/// [`execute_playbook`]'s execution id; panics (showing the reply) if the run did not start.
pub async fn run_playbook(
    base: &str,
    token: &str,
    path: &str,
    workload: Value,
    client_id: Option<&str>,
) -> String {
    let v = execute_playbook(base, token, path, workload, client_id).await;
    v["data"]["executePlaybook"]["executionId"]
        .as_str()
        .unwrap_or_else(|| panic!("executePlaybook {path} failed: {v}"))
        .to_owned()
}

/// Starts `demo/slow` for `seconds` (its own result callback comes that much later) for
/// `client_id`: the request id, which progress callbacks name. Panics (showing the reply)
/// if the run did not start.
pub async fn pending_request(base: &str, token: &str, client_id: &str, seconds: u64) -> String {
    let v = execute_playbook(
        base,
        token,
        "demo/slow",
        json!({"seconds": seconds}),
        Some(client_id),
    )
    .await;
    v["data"]["executePlaybook"]["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("executePlaybook demo/slow failed: {v}"))
        .to_owned()
}

/// Opens the SSE stream at `url` (an `/events` URL, query included) as `token`, resuming
/// after `last`, and reads its first frame within `wait`: the client and that init frame.
/// Panics if the stream is refused or says nothing.
pub async fn open_events(
    url: &str,
    token: &str,
    last: Option<u64>,
    wait: Duration,
) -> (SseClient, SseFrame) {
    let mut sse = SseClient::connect(url, Some(token), last)
        .await
        .unwrap_or_else(|e| panic!("{url} unreachable: {e}"))
        .unwrap_or_else(|(s, b)| panic!("{url} refused: {s} {b}"));
    let init = sse
        .next(wait)
        .await
        .unwrap_or_else(|| panic!("no init frame from {url} within {wait:?}"));
    (sse, init)
}

/// [`open_events`], with the client id its init frame names.
pub async fn open_events_client(
    url: &str,
    token: &str,
    last: Option<u64>,
    wait: Duration,
) -> (SseClient, String) {
    let (sse, init) = open_events(url, token, last, wait).await;
    (sse, client_id_of(&init))
}

/// True once `frames` hold the terminal `playbook/state` of `execution`.
pub fn run_ended(frames: &[SseFrame], execution: &str) -> bool {
    frames.iter().any(|f| {
        f.event == "playbook/state"
            && f.data["params"]["execution_id"] == execution
            && f.data["params"]["terminal"] == true
    })
}

/// The client id an `/events` init frame names; panics if it names none.
pub fn client_id_of(init: &SseFrame) -> String {
    init.data["result"]["clientId"]
        .as_str()
        .unwrap_or_else(|| panic!("no clientId in {:?}", init.data))
        .to_owned()
}

/// A graphql-ws connection as the tests hold it.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The upgrade request for `{base}/graphql/ws` (http → ws) offering `graphql-transport-ws`,
/// with `Authorization: Bearer {bearer}` if any; add headers before connecting.
pub fn ws_request(
    base: &str,
    bearer: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let url = format!("{}/graphql/ws", base.replacen("http://", "ws://", 1));
    let mut req = url
        .into_client_request()
        .expect("a ws:// URL makes a request");
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws"
            .parse()
            .expect("a valid header value"),
    );
    if let Some(t) = bearer {
        h.insert(
            "authorization",
            format!("Bearer {t}")
                .parse()
                .expect("a token is a valid header value"),
        );
    }
    req
}

/// Opens [`ws_request`]`(base, bearer)`; panics if the upgrade is refused.
pub async fn ws_connect(base: &str, bearer: Option<&str>) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(ws_request(base, bearer))
        .await
        .unwrap_or_else(|e| panic!("upgrade at {base} refused: {e}"));
    ws
}

/// Sends `v` as a text message.
pub async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string()))
        .await
        .expect("the socket takes a message");
}

/// Sends `connection_init` with `token` as `session_token` (as a browser does).
pub async fn ws_init(ws: &mut Ws, token: &str) {
    ws_send(
        ws,
        json!({"type": "connection_init", "payload": {"session_token": token}}),
    )
    .await;
}

/// The next text message as JSON (other frames skipped); panics if the socket ends or
/// says nothing within `wait`.
pub async fn ws_next_json(ws: &mut Ws, wait: Duration) -> Value {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("the socket ended: {other:?}"),
        }
    }
}

/// A realtime stack: a nats-server, the stand-in publishing on it, and `replicas` origins
/// sharing it (the shape most realtime suites need).
pub async fn nats_stack(
    replicas: usize,
) -> (super::nats::NatsServer, StandIn, Vec<super::origin::Origin>) {
    nats_stack_with(replicas, super::standin::StandInOptions::default(), &[]).await
}

/// [`nats_stack`] with the stand-in's options (`nats_url` is set here) and `env` on every
/// origin (after `OriginOptions::with_nats`).
pub async fn nats_stack_with(
    replicas: usize,
    standin_opts: super::standin::StandInOptions,
    env: &[(&str, &str)],
) -> (super::nats::NatsServer, StandIn, Vec<super::origin::Origin>) {
    use super::origin::{Origin, OriginOptions};
    use super::standin::StandInOptions;
    let nats = super::nats::NatsServer::start()
        .await
        .expect("nats-server starts");
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..standin_opts
    })
    .await
    .expect("the stand-in starts");
    let mut origins = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let opts = env
            .iter()
            .fold(OriginOptions::with_nats(&nats.url), |o, (k, v)| o.env(k, v));
        origins.push(
            Origin::start(&standin, opts)
                .await
                .expect("an origin starts"),
        );
    }
    (nats, standin, origins)
}

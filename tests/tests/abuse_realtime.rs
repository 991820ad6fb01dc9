//! One user cannot take the realtime path from others (issue 12, "Must show"): streams and
//! sockets per user are capped (429 / close 4429) while another user is unaffected; stream
//! opens are rate-limited per user; a user's client ids are bounded (the oldest idle one
//! is retired, never freed for another user); replays over the limit start live with
//! `stream/reset` (and a socket's later subscription follows live frames); and the owner
//! of a run keeps every `playbook/state` frame while another user (a viewer allowed to read every run)
//! subscribes 300 of their own clients to it — each of which gets them too.
//!
//! Each test starts its own stand-in and origin with the quota it exercises set low and the
//! others off, so one limit is observed at a time.

use std::time::Duration;

use futures::StreamExt;
use gateway_tests::harness::flows::{
    client_id_of, execute_playbook, graphql, http, login, nats_stack_with, open_events, run_ended,
    run_playbook, ws_connect, ws_init, ws_next_json, ws_send, Ws,
};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::wait_for;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(15);

const SUBSCRIBE_TO: &str =
    "mutation($id: ID!, $client: String!) { subscribeToExecution(executionId: $id, clientId: $client) }";
const CANCEL: &str = "mutation($id: ID!) { cancelExecution(id: $id) }";

/// A stand-in and one origin (embedded store and bus) with `env`.
async fn world(env: &[(&str, &str)]) -> (StandIn, Origin) {
    let standin = StandIn::start(StandInOptions::default())
        .await
        .expect("the stand-in starts");
    let opts = OriginOptions::default().envs(env);
    let origin = Origin::start(&standin, opts)
        .await
        .expect("an origin starts");
    (standin, origin)
}

/// `GET {url}` as an SSE client would, without reading the body: status, `Retry-After` and
/// the JSON body of a refusal (null for a stream, which is dropped at once).
async fn events_status(url: &str, token: &str) -> (u16, Option<u64>, Value) {
    let resp = http()
        .get(url)
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if status == 200 {
        return (status, retry_after, Value::Null);
    }
    (
        status,
        retry_after,
        resp.json().await.unwrap_or(Value::Null),
    )
}

/// Opens a stream that must be accepted: the client and its id.
async fn open(origin: &Origin, token: &str, query: &str, last: Option<u64>) -> (SseClient, String) {
    let (sse, init) =
        open_events(&format!("{}/events{query}", origin.url), token, last, WAIT).await;
    (sse, client_id_of(&init))
}

/// What the server answers a socket's `connection_init`: `Ok(())` for the ack, else the
/// close code.
async fn socket_init(origin: &Origin, token: &str) -> (Ws, Result<(), Option<u16>>) {
    let mut ws = ws_connect(&origin.url, None).await;
    ws_init(&mut ws, token).await;
    let outcome = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the server answers connection_init within the wait")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "connection_ack" {
                    break Ok(());
                }
            }
            Some(Ok(Message::Close(frame))) => break Err(frame.map(|f| f.code.into())),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break Err(None),
        }
    };
    (ws, outcome)
}

#[tokio::test]
async fn one_user_over_the_stream_cap_gets_429_and_4429_while_another_user_is_unaffected() {
    let (standin, origin) =
        world(&[("USER_MAX_STREAMS", "3"), ("STREAM_OPEN_RATE_LIMIT", "off")]).await;
    let a = login(&origin.url, &standin, "greedy@example.com").await;
    let b = login(&origin.url, &standin, "neighbour@example.com").await;
    let events = format!("{}/events", origin.url);

    // Streams and sockets count together: two streams and a socket fill A's three slots.
    let (s1, c1) = open(&origin, &a, "", None).await;
    let (_s2, _) = open(&origin, &a, "", None).await;
    let (mut socket, acked) = socket_init(&origin, &a).await;
    assert_eq!(acked, Ok(()), "the third connection is within the cap");

    let (status, retry_after, body) = events_status(&events, &a).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    assert!(
        retry_after.is_some_and(|s| s >= 1),
        "Retry-After: {retry_after:?}"
    );
    let (_, refused) = socket_init(&origin, &a).await;
    assert_eq!(refused, Err(Some(4429)), "a fourth connection as a socket");

    // B has slots of their own.
    let (_b1, _) = open(&origin, &b, "", None).await;
    let (_b_socket, b_acked) = socket_init(&origin, &b).await;
    assert_eq!(b_acked, Ok(()));

    // A reconnect of a client streaming here replaces its stream, even at the cap.
    let (_again, _) = open(&origin, &a, &format!("?client_id={c1}"), None).await;
    drop(s1);

    // Closing a connection frees its slot.
    socket.close(None).await.ok();
    wait_for("a slot of A is free again", WAIT, || async {
        events_status(&events, &a).await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn stream_opens_are_rate_limited_per_user() {
    let (standin, origin) = world(&[
        ("USER_MAX_STREAMS", "0"),
        ("STREAM_OPEN_RATE_LIMIT", "5/1m"),
    ])
    .await;
    let a = login(&origin.url, &standin, "flapper@example.com").await;
    let b = login(&origin.url, &standin, "steady@example.com").await;
    let events = format!("{}/events", origin.url);
    // An open/close loop: five opens pass (the burst), the sixth is refused.
    for i in 0..5 {
        let (status, _, body) = events_status(&events, &a).await;
        assert_eq!(status, 200, "open {i}: {body}");
    }
    let (status, retry_after, body) = events_status(&events, &a).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // One open every 12 s: the wait is that, give or take the time the loop took.
    assert!(
        retry_after.is_some_and(|s| (1..=12).contains(&s)),
        "Retry-After: {retry_after:?}"
    );
    // Sockets count as opens too.
    let (_, refused) = socket_init(&origin, &a).await;
    assert_eq!(refused, Err(Some(4429)));
    // Another user is unaffected.
    let (status, _, body) = events_status(&events, &b).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_users_client_ids_are_bounded_and_the_oldest_idle_one_is_retired() {
    let (standin, origin) = world(&[
        ("USER_MAX_CLIENTS", "3"),
        ("USER_MAX_STREAMS", "0"),
        ("STREAM_OPEN_RATE_LIMIT", "off"),
    ])
    .await;
    let a = login(&origin.url, &standin, "tabs@example.com").await;
    let b = login(&origin.url, &standin, "other-tabs@example.com").await;

    let (first, c1) = open(&origin, &a, "", None).await;
    let (_s2, c2) = open(&origin, &a, "", None).await;
    let (_s3, c3) = open(&origin, &a, "", None).await;
    first.close();
    wait_for("the first client's stream closed", WAIT, || async {
        origin.sse_connections().await == Some(2)
    })
    .await;
    // A fourth client replaces the oldest one without a stream (c1), not a connected one.
    let (_s4, c4) = open(&origin, &a, "", None).await;
    let resume = |id: &str| format!("{}/events?client_id={id}", origin.url);
    // c1 is retired, not freed: still a's (another user is refused it), and counted again
    // only when a's other clients leave room — here all three are connected.
    let (status, _, body) = events_status(&resume(&c1), &b).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "client_not_yours", "{body}");
    let (status, _, body) = events_status(&resume(&c1), &a).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_clients", "{body}");
    for id in [&c2, &c3, &c4] {
        // Each resume replaces the client's stream, then goes away itself.
        let (status, _, body) = events_status(&resume(id), &a).await;
        assert_eq!(status, 200, "{id}: {body}");
    }
    wait_for("every stream closed", WAIT, || async {
        origin.sse_connections().await == Some(0)
    })
    .await;
    // Every client connected: a fifth is refused rather than cutting a live tab.
    let mut held = Vec::new();
    for id in [&c2, &c3, &c4] {
        held.push(open(&origin, &a, &format!("?client_id={id}"), None).await.0);
    }
    wait_for("three streams open", WAIT, || async {
        origin.sse_connections().await == Some(3)
    })
    .await;
    let (status, retry_after, body) = events_status(&format!("{}/events", origin.url), &a).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_clients", "{body}");
    assert!(retry_after.is_some());
    // Another user's ids are their own.
    let (status, _, body) = events_status(&format!("{}/events", origin.url), &b).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn client_ids_made_at_once_stay_within_the_users_cap() {
    // A loop opening new streams in parallel on one replica (NATS store: every step of a
    // create is a round trip another open can overtake) must not bind more client ids
    // than the cap: every one of them is connected, so the ones over it are refused.
    parallel_opens_within_the_cap(1).await;
}

#[tokio::test]
async fn client_ids_made_at_once_on_two_replicas_stay_within_the_users_cap() {
    // The same loop behind a balancer: the replicas' creates race for the user's index,
    // which only a compare-and-set keeps exact.
    parallel_opens_within_the_cap(2).await;
}

/// Twelve `/events` opens by one user at once, spread over `replicas`, with
/// `USER_MAX_CLIENTS=3`: three streams, nine `too_many_clients`.
async fn parallel_opens_within_the_cap(replicas: usize) {
    let (_nats, standin, origins) = nats_stack_with(
        replicas,
        StandInOptions::default(),
        &[
            ("USER_MAX_CLIENTS", "3"),
            ("USER_MAX_STREAMS", "0"),
            ("STREAM_OPEN_RATE_LIMIT", "off"),
        ],
    )
    .await;
    let a = login(&origins[0].url, &standin, "parallel-tabs@example.com").await;
    let opens = futures::future::join_all((0..12).map(|i| {
        http()
            .get(format!("{}/events", origins[i % replicas].url))
            .bearer_auth(&a)
            .header("accept", "text/event-stream")
            .send()
    }))
    .await;
    // Held open until the end: every client made is connected.
    let held: Vec<reqwest::Response> = opens.into_iter().map(|r| r.unwrap()).collect();
    let statuses: Vec<u16> = held.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        3,
        "three clients made, the rest refused: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    let mut open = 0;
    for origin in &origins {
        open += origin.sse_connections().await.unwrap();
    }
    assert_eq!(open, 3, "{statuses:?}");
}

#[tokio::test]
async fn resumes_over_the_replay_limit_start_live_with_a_reset() {
    let (standin, origin) = world(&[
        ("REPLAY_RATE_LIMIT", "2/1m"),
        ("STREAM_OPEN_RATE_LIMIT", "off"),
    ])
    .await;
    let a = login(&origin.url, &standin, "replayer@example.com").await;
    let (mut sse, client) = open(&origin, &a, "", None).await;
    let v = execute_playbook(&origin.url, &a, "demo/echo", json!({"n": 1}), Some(&client)).await;
    assert!(v["errors"].is_null(), "{v}");
    let is_result = |f: &SseFrame| f.event == "playbook/result";
    let got = sse.collect_until(WAIT, |fs| fs.iter().any(is_result)).await;
    assert!(
        got.iter().any(is_result),
        "the result arrives live: {got:?}"
    );
    sse.close();

    let query = format!("?client_id={client}");
    // Two resumes replay the result (the limit's burst) …
    for i in 0..2 {
        let (mut sse, _) = open(&origin, &a, &query, Some(0)).await;
        let got = sse.collect_until(WAIT, |fs| fs.iter().any(is_result)).await;
        assert!(got.iter().any(is_result), "resume {i} replays: {got:?}");
        assert!(got.iter().all(|f| f.event != "stream/reset"), "{got:?}");
        sse.close();
    }
    // … the third starts live, saying so first.
    let (mut sse, _) = open(&origin, &a, &query, Some(0)).await;
    let first = sse.next(WAIT).await.expect("a frame after the init frame");
    assert_eq!(first.event, "stream/reset", "{first:?}");
    assert!(
        first.data["params"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("replays")),
        "{first:?}"
    );
    // Live frames still come.
    let v = execute_playbook(&origin.url, &a, "demo/echo", json!({"n": 2}), Some(&client)).await;
    let request = v["data"]["executePlaybook"]["requestId"].clone();
    let got = sse.collect_until(WAIT, |fs| fs.iter().any(is_result)).await;
    let results: Vec<&SseFrame> = got.iter().filter(|f| is_result(f)).collect();
    assert_eq!(
        results.len(),
        1,
        "only the live result, nothing replayed: {got:?}"
    );
    assert_eq!(results[0].data["params"]["requestId"], request);
}

const EXECUTION_EVENTS: &str = "subscription($id: ID!) {
  executionEvents(executionId: $id) { executionId eventType terminal } }";

/// Runs `executionEvents` for `execution` as operation `id` on `ws`; the states it sent
/// before `complete`.
async fn execution_events(ws: &mut Ws, id: &str, execution: &str) -> Vec<Value> {
    ws_send(
        ws,
        json!({"id": id, "type": "subscribe",
               "payload": {"query": EXECUTION_EVENTS, "variables": {"id": execution}}}),
    )
    .await;
    let mut states = Vec::new();
    loop {
        let m = ws_next_json(ws, WAIT).await;
        if m["id"] != id {
            continue;
        }
        match m["type"].as_str() {
            Some("next") => {
                assert!(m["payload"]["errors"].is_null(), "{m}");
                states.push(m["payload"]["data"]["executionEvents"].clone());
            }
            Some("complete") => return states,
            _ => panic!("unexpected {m}"),
        }
    }
}

#[tokio::test]
async fn a_later_subscription_on_a_socket_over_the_replay_limit_follows_live_frames() {
    let (_nats, standin, mut origins) = nats_stack_with(
        1,
        StandInOptions::default(),
        &[("REPLAY_RATE_LIMIT", "1/1m")],
    )
    .await;
    let origin = origins.pop().expect("one origin");
    let token = login(&origin.url, &standin, "resubscriber@example.com").await;
    let execution = run_playbook(
        &origin.url,
        &token,
        "demo/slow",
        json!({"seconds": 2}),
        None,
    )
    .await;
    let (mut ws, acked) = socket_init(&origin, &token).await;
    assert_eq!(acked, Ok(()));
    // The socket's first subscription reads a new client: nothing to replay, not counted.
    let first = execution_events(&mut ws, "s1", &execution).await;
    assert!(first.len() >= 2, "the run's states: {first:?}");
    // The second re-reads the client's retained frames (the user's one replay) …
    let second = execution_events(&mut ws, "s2", &execution).await;
    assert_eq!(second, first, "a replay of the same states");
    // … the third follows live frames only: the finished run's end, from NoETL's status.
    let third = execution_events(&mut ws, "s3", &execution).await;
    assert_eq!(third.len(), 1, "{third:?}");
    assert_eq!(third[0]["terminal"], true, "{third:?}");
}

/// The `playbook/state` event types of `execution` in `frames`, in order.
fn states_of(frames: &[SseFrame], execution: &str) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.event == "playbook/state" && f.data["params"]["execution_id"] == execution)
        .map(|f| {
            f.data["params"]["event_type"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn the_owner_keeps_every_state_frame_while_a_viewer_subscribes_300_clients() {
    const OTHERS: usize = 300;
    let (_nats, standin, mut origins) = nats_stack_with(
        1,
        StandInOptions::default(),
        &[
            // The viewer may read every run (and `view` demo playbooks at the stand-in).
            ("READ_ALL_ROLES", "admin,viewer"),
            ("USER_MAX_CLIENTS", "0"),
            ("USER_MAX_STREAMS", "0"),
            ("STREAM_OPEN_RATE_LIMIT", "off"),
            // 300 subscribeToExecution in a row: over the per-user mutation rate.
            ("GRAPHQL_MUTATION_RATE_LIMIT", "off"),
        ],
    )
    .await;
    let origin = origins.pop().expect("one origin");
    let owner = login(&origin.url, &standin, "owner@example.com").await;
    let viewer = login(&origin.url, &standin, "viewer@example.com").await;

    // The viewer's 300 clients, made before the run (each stream opened and closed).
    let others: Vec<String> = futures::stream::iter(0..OTHERS)
        .map(|_| {
            let (origin, viewer) = (&origin, &viewer);
            async move {
                let (sse, id) = open(origin, viewer, "", None).await;
                sse.close();
                id
            }
        })
        .buffered(16)
        .collect()
        .await;

    // The attacked run, and a control run nobody else follows: same playbook, same end.
    let (mut watched, watched_client) = open(&origin, &owner, "", None).await;
    let (mut control, control_client) = open(&origin, &owner, "", None).await;
    let slow = json!({"seconds": 120});
    let run = |client: String| {
        let (origin, owner, slow) = (&origin, &owner, slow.clone());
        async move {
            let v = execute_playbook(&origin.url, owner, "demo/slow", slow, Some(&client)).await;
            v["data"]["executePlaybook"]["executionId"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}"))
                .to_owned()
        }
    };
    let execution = run(watched_client).await;
    let control_execution = run(control_client).await;
    let first = watched
        .collect_until(WAIT, |fs| !states_of(fs, &execution).is_empty())
        .await;
    assert!(
        !states_of(&first, &execution).is_empty(),
        "the run started: {first:?}"
    );

    // One at a time: every add lands (concurrent read-modify-writes of one record could
    // lose some, and the record must really overflow).
    for (i, client) in others.iter().enumerate() {
        let v = graphql(
            &origin.url,
            &viewer,
            SUBSCRIBE_TO,
            json!({"id": execution, "client": client}),
        )
        .await;
        assert_eq!(v["data"]["subscribeToExecution"], true, "client {i}: {v}");
    }

    // Both runs end the same way; every state frame of each reaches the owner.
    for id in [&execution, &control_execution] {
        let v = graphql(&origin.url, &owner, CANCEL, json!({"id": id})).await;
        assert_eq!(v["data"]["cancelExecution"], true, "{v}");
    }
    let rest = watched
        .collect_until(WAIT, |fs| run_ended(fs, &execution))
        .await;
    let controlled = control
        .collect_until(WAIT * 2, |fs| run_ended(fs, &control_execution))
        .await;
    let mut got = first;
    got.extend(rest);
    let owner_states = states_of(&got, &execution);
    let all_states = states_of(&controlled, &control_execution);
    assert!(
        all_states.last().is_some_and(|t| t == "playbook.cancelled"),
        "the control run ended: {all_states:?}"
    );
    assert_eq!(
        owner_states, all_states,
        "the owner got every state frame of the watched run"
    );

    // The viewer's subscriptions were real, and none was pushed out: a run's frames reach
    // every watcher through the run's subject (issue 16), not through the interest
    // record's capped list — the oldest of the 300 gets them like the newest.
    for client in [others.last().expect("300 clients"), &others[0]] {
        let (mut sse, _) = open(&origin, &viewer, &format!("?client_id={client}"), None).await;
        let replayed = sse
            .collect_until(WAIT, |fs| run_ended(fs, &execution))
            .await;
        assert_eq!(
            states_of(&replayed, &execution),
            all_states,
            "client {client} of the viewer replays every state frame of the run"
        );
    }
}

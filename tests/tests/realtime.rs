//! The realtime path end to end: SSE, GraphQL executePlaybook, callbacks and the NATS
//! bridge, against real processes (nats-server, origin replicas, the NoETL stand-in).

use std::collections::HashSet;
use std::time::Duration;

use gateway_tests::harness::flows::{
    client_id_of, execute_playbook, get_json, graphql, http, login, open_events,
};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::wait_for;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

struct World {
    _nats: NatsServer,
    standin: StandIn,
    a: Origin,
    b: Origin,
}

async fn world() -> World {
    let (nats, standin, mut origins) = gateway_tests::harness::flows::nats_stack(2).await;
    let b = origins.pop().expect("two origins");
    let a = origins.pop().expect("two origins");
    World {
        _nats: nats,
        standin,
        a,
        b,
    }
}

async fn open(origin: &Origin, token: &str, query: &str, last: Option<u64>) -> (SseClient, String) {
    let (sse, init) =
        open_events(&format!("{}/events{query}", origin.url), token, last, WAIT).await;
    assert_eq!(init.event, "message");
    assert_eq!(init.retry, Some(2000));
    assert_eq!(init.data["jsonrpc"], "2.0");
    (sse, client_id_of(&init))
}

fn is_terminal(f: &SseFrame) -> bool {
    f.event == "playbook/state" && f.data["params"]["terminal"] == true
}

fn has_result(frames: &[SseFrame]) -> bool {
    frames.iter().any(|f| f.event == "playbook/result")
}

#[tokio::test]
async fn the_spa_flow_streams_steps_then_the_result() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "spa@example.com").await;
    let (mut sse, client_id) = open(&w.a, &token, "", None).await;
    let v = execute_playbook(
        &w.a.url,
        &token,
        "demo/steps",
        json!({"hello": "world"}),
        Some(&client_id),
    )
    .await;
    let ex = &v["data"]["executePlaybook"];
    let execution_id = ex["executionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();
    assert_eq!(ex["id"], execution_id.as_str());
    assert!(
        execution_id.parse::<u64>().unwrap() > (1u64 << 53),
        "ids above 2^53 arrive as exact strings"
    );

    let frames = sse
        .collect_until(WAIT, |fs| has_result(fs) && fs.iter().any(is_terminal))
        .await;
    let states: Vec<&Value> = frames
        .iter()
        .filter(|f| f.event == "playbook/state")
        .map(|f| &f.data["params"])
        .collect();
    let exits: Vec<&str> = states
        .iter()
        .filter(|p| p["event_type"] == "step.exit")
        .filter_map(|p| p["step_name"].as_str())
        .collect();
    assert_eq!(exits, ["step_1", "step_2", "step_3"], "{states:?}");
    let terminals: Vec<&&Value> = states.iter().filter(|p| p["terminal"] == true).collect();
    assert_eq!(terminals.len(), 1, "{states:?}");
    assert_eq!(terminals[0]["event_type"], "playbook.completed");
    assert!(states
        .iter()
        .all(|p| p["execution_id"] == execution_id.as_str()));
    let result = frames
        .iter()
        .find(|f| f.event == "playbook/result")
        .unwrap();
    assert_eq!(result.data["method"], "playbook/result");
    let p = &result.data["params"];
    assert_eq!(p["status"], "COMPLETED");
    assert_eq!(p["executionId"], execution_id.as_str());
    assert_eq!(p["requestId"], ex["requestId"]);
    assert_eq!(p["data"]["workload"], json!({"hello": "world"}));
    let ids: Vec<u64> = frames.iter().filter_map(|f| f.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
}

#[tokio::test]
async fn a_failed_playbook_delivers_failed_state_and_its_error() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "fail@example.com").await;
    let (mut sse, client_id) = open(&w.a, &token, "", None).await;
    execute_playbook(&w.a.url, &token, "demo/fail", json!({}), Some(&client_id)).await;
    let frames = sse
        .collect_until(WAIT, |fs| has_result(fs) && fs.iter().any(is_terminal))
        .await;
    let result = frames
        .iter()
        .find(|f| f.event == "playbook/result")
        .expect("a result");
    assert_eq!(result.data["params"]["status"], "FAILED");
    assert!(result.data["params"]["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let terminal = frames
        .iter()
        .find(|f| is_terminal(f))
        .expect("a terminal state");
    assert_eq!(terminal.data["params"]["event_type"], "playbook.failed");
}

#[tokio::test]
async fn two_replicas_deliver_every_frame_once_and_replay_after_a_replica_dies() {
    let mut w = world().await;
    let token = login(&w.a.url, &w.standin, "replicas@example.com").await;
    let (mut sse, client_id) = open(&w.a, &token, "", None).await;
    // Executed on B; the result callback goes to B's internal listener (the stand-in calls
    // the gateway_url B injected); the client listens on A.
    execute_playbook(
        &w.b.url,
        &token,
        "demo/steps",
        json!({"n": 1}),
        Some(&client_id),
    )
    .await;
    let first = sse
        .collect_until(WAIT, |fs| {
            fs.iter().filter(|f| f.event == "playbook/state").count() >= 2
        })
        .await;
    let seen_ids: Vec<u64> = first.iter().filter_map(|f| f.id).collect();
    assert!(!seen_ids.is_empty());
    let last = sse.last_id;

    // Replica A dies mid-run; the client reconnects to B with Last-Event-ID.
    w.a.guard().signal("KILL");
    drop(sse);
    let guard = w.a.guard();
    wait_for("replica A is gone", WAIT, || {
        let gone = !guard.is_running();
        async move { gone }
    })
    .await;
    let mut sse = SseClient::connect(
        &format!("{}/events?client_id={client_id}", w.b.url),
        Some(&token),
        last,
    )
    .await
    .unwrap()
    .unwrap_or_else(|(s, b)| panic!("{s} {b}"));
    let init = sse.next(WAIT).await.unwrap();
    assert_eq!(init.data["result"]["clientId"], client_id.as_str());
    let rest = sse
        .collect_until(WAIT, |fs| {
            (has_result(fs) || has_result(&first)) && fs.iter().any(is_terminal)
        })
        .await;
    let mut all: Vec<u64> = seen_ids.clone();
    all.extend(rest.iter().filter_map(|f| f.id));
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a frame arrived twice: {all:?}");
    assert!(rest.iter().all(|f| f.event != "stream/reset"));
    let exits = first
        .iter()
        .chain(rest.iter())
        .filter(|f| f.data["params"]["event_type"] == "step.exit")
        .count();
    assert_eq!(
        exits,
        3,
        "every step arrives exactly once across the reconnect: {:?}",
        first
            .iter()
            .chain(rest.iter())
            .map(|f| (
                f.event_id.clone(),
                f.event.clone(),
                f.data["params"].to_string()
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        first
            .iter()
            .chain(rest.iter())
            .filter(|f| f.event == "playbook/result")
            .count(),
        1,
        "the result arrives exactly once, before or after the reconnect"
    );
}

#[tokio::test]
async fn a_result_produced_while_the_client_is_away_is_delivered_on_reconnect() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "away@example.com").await;
    let (sse, client_id) = open(&w.a, &token, "", None).await;
    sse.close();
    // The origin has seen the stream close: the client is away.
    wait_for("replica A notices the closed stream", WAIT, || async {
        w.a.sse_connections().await == Some(0)
    })
    .await;
    let v = execute_playbook(
        &w.a.url,
        &token,
        "demo/echo",
        json!({"away": true}),
        Some(&client_id),
    )
    .await;
    let request_id = v["data"]["executePlaybook"]["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();
    // The gateway answered the result callback 202 `queued`: stored for an absent client,
    // not delivered live.
    wait_for(
        "the result callback is answered 202 (queued)",
        WAIT,
        || async {
            let log = w.standin.callbacks().await;
            let attempts: Vec<&Value> = log
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["kind"] == "async" && a["body"]["request_id"] == request_id.as_str())
                .collect();
            assert!(
                attempts.iter().all(|a| a["status"] != 200),
                "the result was delivered live to a client that had left: {attempts:?}"
            );
            attempts.iter().any(|a| a["status"] == 202)
        },
    )
    .await;
    // A fresh connection for the same client (no Last-Event-ID): everything retained.
    let (mut sse, again) = open(&w.b, &token, &format!("?client_id={client_id}"), None).await;
    assert_eq!(again, client_id);
    let frames = sse.collect_until(WAIT, has_result).await;
    let result = frames
        .iter()
        .find(|f| f.event == "playbook/result")
        .expect("the queued result");
    assert_eq!(result.data["params"]["data"], json!({"away": true}));
}

/// The callback token the gateway injected into an execution's workload (NoETL keeps the
/// workload verbatim, as the real server does).
async fn callback_token_of(standin: &StandIn, execution_id: &str) -> String {
    let record = get_json(&format!("{}/api/executions/{execution_id}", standin.url)).await;
    record["workload"]["callback_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no callback_token in {record}"))
        .to_owned()
}

#[tokio::test]
async fn hostile_callbacks_are_refused_and_duplicates_deliver_once() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "cb@example.com").await;
    let (mut sse, client_id) = open(&w.a, &token, "", None).await;
    // demo/slow gives time to call back by hand before the stand-in does.
    let v = execute_playbook(
        &w.a.url,
        &token,
        "demo/slow",
        json!({"seconds": 30}),
        Some(&client_id),
    )
    .await;
    let ex = &v["data"]["executePlaybook"];
    let request_id = ex["requestId"].as_str().unwrap().to_owned();
    let execution_id = ex["executionId"].as_str().unwrap().to_owned();
    let callback_token = callback_token_of(&w.standin, &execution_id).await;
    let other = execute_playbook(&w.a.url, &token, "demo/slow", json!({"seconds": 30}), None).await;
    let other_exec = other["data"]["executePlaybook"]["executionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_token = callback_token_of(&w.standin, &other_exec).await;

    let url = format!("{}/api/internal/callback/async", w.a.internal_url);
    let body = json!({"request_id": request_id, "execution_id": execution_id, "status": "success", "data": {"by": "hand"}});
    let send = |auth: Option<String>, body: Value| {
        let url = url.clone();
        async move {
            let mut r = http().post(url).json(&body);
            if let Some(a) = auth {
                r = r.bearer_auth(a);
            }
            let r = r.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(send(None, body.clone()).await.0, 403);
    assert_eq!(send(Some("wrong-token".into()), body.clone()).await.0, 403);
    assert_eq!(
        send(Some(other_token), body.clone()).await.0,
        403,
        "a token for another request"
    );
    let unknown = json!({"request_id": "00000000000000000000000000000000", "status": "success"});
    assert_eq!(send(Some(INTERNAL_TOKEN.into()), unknown).await.0, 404);
    let (s, v) = send(Some(callback_token.clone()), body.clone()).await;
    assert!(s == 200 || s == 202, "{s} {v}");
    assert_eq!(v["status"], "delivered");
    let (s, v) = send(Some(INTERNAL_TOKEN.into()), body.clone()).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("duplicate")));

    let frames = sse.collect_until(Duration::from_secs(3), |_| false).await;
    let results: Vec<&SseFrame> = frames
        .iter()
        .filter(|f| f.event == "playbook/result")
        .collect();
    assert_eq!(results.len(), 1, "exactly one result frame: {frames:?}");
    assert_eq!(results[0].data["params"]["data"], json!({"by": "hand"}));
    // The public listener has no callback route at all.
    let r = http()
        .post(format!("{}/api/internal/callback/async", w.a.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn another_users_client_id_is_refused_everywhere() {
    let w = world().await;
    let alice = login(&w.a.url, &w.standin, "alice@example.com").await;
    let mallory = login(&w.a.url, &w.standin, "mallory@example.com").await;
    let (_sse, alice_client) = open(&w.a, &alice, "", None).await;
    match SseClient::connect(
        &format!("{}/events?client_id={alice_client}", w.a.url),
        Some(&mallory),
        None,
    )
    .await
    .unwrap()
    {
        Err((status, body)) => {
            assert_eq!(status, 403);
            assert!(body["error"]["code"].is_string(), "{body}");
        }
        Ok(_) => panic!("mallory resumed alice's stream"),
    }
    let v = execute_playbook(
        &w.a.url,
        &mallory,
        "demo/echo",
        json!({}),
        Some(&alice_client),
    )
    .await;
    assert_eq!(v["errors"][0]["extensions"]["code"], "FORBIDDEN", "{v}");
    assert!(v["data"].is_null() || v["data"]["executePlaybook"].is_null());
    let v = execute_playbook(&w.a.url, &mallory, "admin/purge", json!({}), None).await;
    assert_eq!(v["errors"][0]["extensions"]["code"], "FORBIDDEN", "{v}");
}

#[tokio::test]
async fn hostile_inputs_on_events_and_graphql_get_clean_errors() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "hostile@example.com").await;
    let long = "a".repeat(10_000);
    match SseClient::connect(
        &format!("{}/events?client_id={long}", w.a.url),
        Some(&token),
        None,
    )
    .await
    .unwrap()
    {
        Err((status, _)) => assert!(status == 400 || status == 414 || status == 431, "{status}"),
        Ok(_) => panic!("a 10k-character client id was accepted"),
    }
    let (status, body) = gateway_tests::harness::raw_http(
        &w.a.url,
        &format!("GET /events?client_id=%FF%FE HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    match SseClient::connect(&format!("{}/events", w.a.url), None, None)
        .await
        .unwrap()
    {
        Err((401, body)) => assert!(body["error"]["code"].is_string()),
        other => panic!("expected 401, got {:?}", other.map(|c| c.status)),
    }
    // Introspection types nest without end: 20 levels of ofType is over the depth limit (16).
    let mut deep = String::from("name");
    for _ in 0..20 {
        deep = format!("ofType {{ {deep} }}");
    }
    let v = graphql(
        &w.a.url,
        &token,
        &format!("{{ __schema {{ types {{ fields {{ type {{ {deep} }} }} }} }} }}"),
        json!({}),
    )
    .await;
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.to_lowercase().contains("nested")),
        "a query over the depth limit must fail: {v}"
    );
    assert!(v["data"].is_null(), "{v}");
    let r = http()
        .post(format!("{}/graphql", w.a.url))
        .json(&json!({"query": "{ health }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v = graphql(
        &w.a.url,
        &token,
        "{ health version me { email roles } }",
        json!({}),
    )
    .await;
    assert_eq!(v["data"]["health"], "ok", "{v}");
    assert_eq!(v["data"]["me"]["email"], "hostile@example.com");
}

#[tokio::test]
async fn a_slow_reader_is_evicted_and_resumes_without_loss() {
    use futures::StreamExt;
    use gateway_tests::harness::sse::parse_frame;

    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::with_nats(&nats.url)
            .env("SSE_QUEUE", "8")
            .env("FRAME_RETENTION_PER_CLIENT", "5000")
            // Exact replay across many resumes is the point here, not the per-user quotas.
            .env("STREAM_OPEN_RATE_LIMIT", "off")
            .env("REPLAY_RATE_LIMIT", "off"),
    )
    .await
    .unwrap();
    let token = login(&origin.url, &standin, "slow-reader@example.com").await;
    let (sse, client_id) = open(&origin, &token, "", None).await;
    sse.close();
    let v = execute_playbook(
        &origin.url,
        &token,
        "demo/slow",
        json!({"seconds": 60}),
        Some(&client_id),
    )
    .await;
    let request_id = v["data"]["executePlaybook"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();

    // A reader that does not read: the response is held, its body never polled.
    let resp = reqwest::Client::new()
        .get(format!("{}/events?client_id={client_id}", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // ~19 MB of frames: more than the socket buffers and the 8-frame queue can hold.
    const N: usize = 300;
    let filler = "x".repeat(64 * 1024);
    // One at a time, so the publish order is s0, s1, …: the order the client must see.
    let client = http();
    let statuses: Vec<u16> = futures::stream::iter(0..N)
        .map(|i| {
            let req = client
                .post(format!("{}/api/internal/progress", origin.internal_url))
                .bearer_auth(INTERNAL_TOKEN)
                .json(&json!({"request_id": request_id, "step": format!("s{i}"), "message": filler, "progress": 0.5}));
            async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffered(1)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Now read what the slow connection got: a prefix of the frames, then stream/evicted.
    let mut text = String::new();
    let mut body = resp.bytes_stream();
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(10), body.next()).await
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let frames: Vec<SseFrame> = text.split("\n\n").filter_map(parse_frame).collect();
    assert_eq!(
        frames.last().map(|f| f.event.as_str()),
        Some("stream/evicted"),
        "the slow reader must be evicted"
    );
    let mut steps: Vec<String> = frames
        .iter()
        .filter(|f| f.event == "playbook/progress")
        .map(|f| f.data["params"]["step"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        steps.len() < N,
        "eviction happened before everything was written"
    );
    let last_id = frames.iter().filter_map(|f| f.id).max();

    // Resume with Last-Event-ID, as EventSource does, reconnecting after each eviction
    // (the queue is tiny, so replaying 64 KiB frames may evict again): the rest arrives,
    // nothing twice, nothing missing.
    let mut last_id = last_id;
    let mut rest: Vec<SseFrame> = Vec::new();
    for _ in 0..100 {
        if steps.len()
            + rest
                .iter()
                .filter(|f| f.event == "playbook/progress")
                .count()
            >= N
        {
            break;
        }
        let mut sse = SseClient::connect(
            &format!("{}/events?client_id={client_id}", origin.url),
            Some(&token),
            last_id,
        )
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("{s} {b}"));
        let got = sse
            .collect_until(WAIT, |fs| {
                fs.last().is_some_and(|f| f.event == "stream/evicted")
                    || steps.len()
                        + rest
                            .iter()
                            .chain(fs.iter())
                            .filter(|f| f.event == "playbook/progress")
                            .count()
                        >= N
            })
            .await;
        assert!(
            got.iter().all(|f| f.event != "stream/reset"),
            "no reset: nothing was lost"
        );
        last_id = got.iter().filter_map(|f| f.id).max().or(last_id);
        rest.extend(got.into_iter().filter(|f| f.event != "message"));
    }
    steps.extend(
        rest.iter()
            .filter(|f| f.event == "playbook/progress")
            .map(|f| f.data["params"]["step"].as_str().unwrap().to_owned()),
    );
    let ids: Vec<u64> = frames
        .iter()
        .chain(rest.iter())
        .filter(|f| f.event == "playbook/progress")
        .filter_map(|f| f.id)
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "frame ids increase across the reconnect"
    );
    let expected: Vec<String> = (0..N).map(|i| format!("s{i}")).collect();
    assert_eq!(
        steps, expected,
        "every progress frame exactly once, in publish order"
    );
}

#[tokio::test]
async fn events_published_while_every_origin_is_down_are_forwarded_after_restart() {
    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut a = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .unwrap();
    let token = login(&a.url, &standin, "durable@example.com").await;
    let (mut sse, client_id) = open(&a, &token, "", None).await;
    let v = execute_playbook(
        &a.url,
        &token,
        "demo/slow",
        json!({"seconds": 2}),
        Some(&client_id),
    )
    .await;
    let execution_id = v["data"]["executePlaybook"]["executionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = sse
        .collect_until(WAIT, |fs| {
            fs.iter()
                .any(|f| f.data["params"]["event_type"] == "playbook.started")
        })
        .await;
    assert!(
        !started.is_empty(),
        "playbook.started arrives while the origin is up"
    );
    let last = sse.last_id;
    drop(sse);

    // Every origin goes down; the run finishes and NoETL publishes its events meanwhile.
    a.guard().signal("KILL");
    wait_for("the run is over and its events published", WAIT, || async {
        let status: Value = http()
            .get(format!(
                "{}/api/executions/{execution_id}/status",
                standin.url
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let e = standin.stats().await["events"].clone();
        let settled = ["published", "dropped", "skipped"]
            .iter()
            .map(|k| e[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        status["status"] != "RUNNING" && settled >= e["queued"].as_u64().unwrap_or(u64::MAX)
    })
    .await;
    let status: Value = http()
        .get(format!(
            "{}/api/executions/{execution_id}/status",
            standin.url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["status"], "COMPLETED",
        "the run finished while no origin was up"
    );

    let b = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .unwrap();
    let mut sse = SseClient::connect(
        &format!("{}/events?client_id={client_id}", b.url),
        Some(&token),
        last,
    )
    .await
    .unwrap()
    .unwrap_or_else(|(s, b)| panic!("{s} {b}"));
    let frames = sse
        .collect_until(WAIT, |fs| fs.iter().any(is_terminal))
        .await;
    let terminal = frames
        .iter()
        .find(|f| is_terminal(f))
        .expect("the terminal frame published while down");
    assert_eq!(terminal.data["params"]["event_type"], "playbook.completed");
    assert_eq!(
        terminal.data["params"]["execution_id"],
        execution_id.as_str()
    );
    assert!(
        frames
            .iter()
            .all(|f| f.data["params"]["event_type"] != "playbook.started"),
        "nothing twice"
    );
}

#[tokio::test]
async fn a_ticket_opens_one_stream_once_and_query_tokens_never_reach_the_log() {
    let w = world().await;
    let token = login(&w.a.url, &w.standin, "ticket@example.com").await;
    let r = http()
        .post(format!("{}/api/events/ticket", w.a.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expires_in"], 30);
    let ticket = v["ticket"].as_str().unwrap().to_owned();

    // Redeemed on the other replica: tickets live in the shared store.
    let url = format!("{}/events?ticket={ticket}", w.b.url);
    let mut sse = SseClient::connect(&url, None, None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("{s} {b}"));
    let init = sse.next(WAIT).await.unwrap();
    assert!(init.data["result"]["clientId"].is_string());
    match SseClient::connect(&url, None, None).await.unwrap() {
        Err((401, body)) => assert_eq!(body["error"]["code"], "invalid_ticket"),
        other => panic!("a ticket worked twice: {:?}", other.map(|c| c.status)),
    }
    let r = http()
        .post(format!("{}/api/events/ticket", w.a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "tickets need a session");

    // The compat query token works, and never appears in a log line.
    let (_sse, _) = open(&w.a, &token, "", None).await;
    let mut q = SseClient::connect(
        &format!("{}/events?session_token={token}", w.a.url),
        None,
        None,
    )
    .await
    .unwrap()
    .unwrap_or_else(|(s, b)| panic!("{s} {b}"));
    assert!(q.next(WAIT).await.is_some());
    for origin in [&w.a, &w.b] {
        let log = origin.log_text();
        assert!(!log.contains(&token), "a session token reached the log");
        assert!(!log.contains(&ticket), "a ticket reached the log");
    }
}

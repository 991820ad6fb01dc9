//! Integration tests of the NoETL stand-in itself: the real `noetl-standin` binary, a real
//! nats-server where events matter, and a tiny axum receiver playing the gateway's
//! internal listener where callbacks matter. Every test builds its own world on free ports.
//!
//! Ids are compared as the text of the JSON number, never through f64: the point of the
//! stand-in's ids is that they exceed 2^53.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;
use futures::StreamExt;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::standin::{EventShape, StandIn, StandInOptions};
use jwt_compact::alg::Rsa;
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{AlgorithmExt, UntrustedToken};
use rsa::pkcs8::DecodePublicKey;
use rsa::RsaPublicKey;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const TWO_POW_53: u64 = 1 << 53;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("a default reqwest client builds")
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("the stand-in answers");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("a valid status");
    let text = resp.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, body)
}

async fn post(url: &str, body: Value) -> (StatusCode, Value) {
    send(http().post(url).json(&body)).await
}

async fn get(url: &str) -> (StatusCode, Value) {
    send(http().get(url)).await
}

/// Runs `path` and returns the execution id exactly as `/api/execute` wrote it.
async fn execute(si: &StandIn, path: &str, workload: Value) -> String {
    let (s, v) = post(
        &format!("{}/api/execute", si.url),
        json!({ "path": path, "workload": workload }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "started", "{v}");
    v["execution_id"]
        .as_str()
        .unwrap_or_else(|| panic!("execution_id must be a string here: {v}"))
        .to_owned()
}

/// Polls `/status` until it reports `want`.
async fn wait_status(si: &StandIn, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = get(&format!("{}/api/executions/{id}/status", si.url)).await;
        if v["status"] == want {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never reached {want}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of a top-level JSON number field, read from the raw payload.
fn raw_number<'a>(raw: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\":");
    let start = raw.find(&needle)? + needle.len();
    let rest = &raw[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// One NATS message as received.
struct Event {
    subject: String,
    msg_id: Option<String>,
    raw: String,
    json: Value,
    at: Instant,
}

impl Event {
    fn event_type(&self) -> &str {
        self.json["event_type"].as_str().unwrap_or_default()
    }
}

/// A core subscription on `noetl.events.>`, registered before anything runs.
async fn subscribe(nats: &NatsServer) -> async_nats::Subscriber {
    subscribe_to(nats, "noetl.events.>").await
}

/// A core subscription on `subject`, registered before anything runs.
async fn subscribe_to(nats: &NatsServer, subject: &str) -> async_nats::Subscriber {
    let client = async_nats::connect(&nats.url).await.expect("nats connects");
    let sub = client
        .subscribe(subject.to_owned())
        .await
        .expect("subscribes");
    client.flush().await.expect("subscription registered");
    sub
}

/// The top-level keys of a JSON object's text, in the order they are written.
fn top_level_keys(raw: &str) -> Vec<String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let (mut keys, mut current, mut expect_key) = (Vec::new(), None::<String>, false);
    for c in raw.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
                if let Some(k) = current.take() {
                    keys.push(k);
                }
                continue;
            }
            if let Some(k) = current.as_mut() {
                k.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                if depth == 1 && expect_key {
                    current = Some(String::new());
                }
                expect_key = false;
            }
            '{' | '[' => {
                depth += 1;
                expect_key = depth == 1;
            }
            '}' | ']' => depth -= 1,
            ',' => expect_key = depth == 1,
            _ => {}
        }
    }
    keys
}

/// A time as Python's `str(datetime)` writes a UTC one: `2026-05-18 20:00:00[.ffffff]+00:00`.
fn is_python_utc_time(t: &str) -> bool {
    let b = t.as_bytes();
    (t.len() == 25 || t.len() == 32)
        && b.get(10) == Some(&b' ')
        && t.ends_with("+00:00")
        && (t.len() == 25 || b.get(19) == Some(&b'.'))
}

/// Collects events until `done` holds for the last one, or fails after 10 s.
async fn collect(sub: &mut async_nats::Subscriber, done: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| {
                let seen: Vec<&str> = events.iter().map(Event::event_type).collect();
                panic!("timed out; events so far: {seen:?}")
            })
            .expect("subscription open");
        let raw = String::from_utf8(msg.payload.to_vec()).expect("UTF-8 payload");
        let event = Event {
            subject: msg.subject.to_string(),
            msg_id: msg
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.to_string()),
            json: serde_json::from_str(&raw).expect("JSON payload"),
            raw,
            at: Instant::now(),
        };
        let stop = done(&event);
        events.push(event);
        if stop {
            return events;
        }
    }
}

/// Nothing more arrives within one tail interval and a bit.
async fn assert_quiet(sub: &mut async_nats::Subscriber) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(900), sub.next()).await {
        panic!(
            "unexpected extra event: {}",
            String::from_utf8_lossy(&m.payload)
        );
    }
}

fn step_sequence(step: &str) -> [(&'static str, String); 6] {
    [
        ("command.issued", step.to_owned()),
        ("command.claimed", step.to_owned()),
        ("command.started", step.to_owned()),
        ("call.done", step.to_owned()),
        ("command.completed", step.to_owned()),
        ("step.enter", step.to_owned()),
    ]
}

#[tokio::test]
async fn demo_steps_publishes_the_exact_sequence_in_bursts_with_msg_ids_and_numeric_ids() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let si = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut sub = subscribe(&nats).await;

    let id = execute(&si, "demo/steps", json!({ "n": 1 })).await;
    assert!(id.parse::<u64>().expect("decimal id") > TWO_POW_53, "{id}");
    let events = collect(&mut sub, |e| e.event_type() == "playbook.completed").await;

    let mut expected = vec![("playbook_started", "demo/steps".to_owned())];
    for step in ["step_1", "step_2", "step_3"] {
        expected.extend(step_sequence(step));
    }
    expected.push(("playbook.completed", "demo/steps".to_owned()));
    let got: Vec<(&str, String)> = events
        .iter()
        .map(|e| {
            (
                e.event_type(),
                e.json["node_name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, expected);

    for e in &events {
        assert_eq!(e.subject, format!("noetl.events.{}", e.event_type()));
        assert_eq!(
            raw_number(&e.raw, "execution_id"),
            Some(id.as_str()),
            "{}",
            e.raw
        );
        let event_id = raw_number(&e.raw, "event_id").expect("numeric event_id");
        assert_eq!(
            e.msg_id.as_deref(),
            Some(event_id),
            "Nats-Msg-Id is the event id"
        );
        assert!(event_id.parse::<u64>().expect("decimal") > TWO_POW_53);
        let keys = e.json.as_object().map_or(0, |o| o.len());
        assert!(keys >= 40, "a whole event row, got {keys} keys");
    }
    // Published by a tailer: ~20 events over ~600 ms arrive in a few bursts, not one by one.
    let bursts = 1 + events
        .windows(2)
        .filter(|w| w[1].at.duration_since(w[0].at) > Duration::from_millis(100))
        .count();
    assert!(bursts <= 4, "{bursts} bursts for {} events", events.len());

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
    let mut stream = js
        .get_stream("noetl_events")
        .await
        .expect("stream ensured at start");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.subjects, ["noetl.events.>"]);
    assert_eq!(info.config.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(info.state.messages, events.len() as u64);
}

#[tokio::test]
async fn demo_fail_ends_failed_without_a_playbook_failed_event() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let si = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        step_delay_ms: Some(50),
        tail_interval_ms: Some(200),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut sub = subscribe(&nats).await;

    let id = execute(&si, "demo/fail", json!({})).await;
    let events = collect(&mut sub, |e| e.event_type() == "command.failed").await;
    let types: Vec<&str> = events.iter().map(Event::event_type).collect();
    assert_eq!(
        types,
        [
            "playbook_started",
            "command.issued",
            "command.claimed",
            "command.started",
            "call.error",
            "command.failed"
        ]
    );
    assert_eq!(
        events[4].json["error"]["message"],
        "HTTP 500 from https://example.invalid"
    );
    assert_quiet(&mut sub).await;

    let status = wait_status(&si, &id, "FAILED").await;
    assert_eq!(status["current_step"], "fail_step");
    assert_eq!(status["progress"]["failed_steps"], 1);
    assert_eq!(
        raw_number(&status.to_string(), "execution_id"),
        Some(id.as_str())
    );
}

#[tokio::test]
async fn python_shape_uses_per_execution_subjects_and_python_names() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let si = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        python_events: true,
        step_delay_ms: Some(50),
        tail_interval_ms: Some(200),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut sub = subscribe(&nats).await;

    let id = execute(&si, "demo/steps", json!({})).await;
    let events = collect(&mut sub, |e| e.event_type() == "playbook_completed").await;
    let types: Vec<&str> = events.iter().map(Event::event_type).collect();
    let mut expected = vec!["playbook_started"];
    for _ in 0..3 {
        expected.extend(["step_started", "step_completed"]);
    }
    expected.push("playbook_completed");
    assert_eq!(types, expected);
    for e in &events {
        assert_eq!(e.subject, format!("noetl.events.default.default.{id}.0"));
        assert_eq!(raw_number(&e.raw, "execution_id"), Some(id.as_str()));
        assert!(
            e.json["timestamp"].is_string() && e.json["payload"].is_object(),
            "{}",
            e.raw
        );
    }
}

#[tokio::test]
async fn cancel_stops_a_slow_run_and_emits_playbook_cancelled() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let si = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        tail_interval_ms: Some(100),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut sub = subscribe(&nats).await;

    let id = execute(&si, "demo/slow", json!({ "seconds": 30 })).await;
    collect(&mut sub, |e| e.event_type() == "command.started").await;
    let (s, v) = post(&format!("{}/api/executions/{id}/cancel", si.url), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "CANCELLED");
    assert_eq!(
        raw_number(&v.to_string(), "execution_id"),
        Some(id.as_str())
    );

    let events = collect(&mut sub, |e| e.event_type() == "playbook_cancelled").await;
    assert_eq!(events.len(), 1, "nothing between the cancel and its event");
    assert_quiet(&mut sub).await;
    wait_status(&si, &id, "CANCELLED").await;
    let (s, v) = post(&format!("{}/api/executions/{id}/cancel", si.url), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

fn v4_step(step: &str, ok: bool) -> Vec<(&'static str, String)> {
    let tail: [&'static str; 3] = if ok {
        ["call.done", "step.exit", "command.completed"]
    } else {
        ["call.error", "step.exit", "command.failed"]
    };
    [
        "command.issued",
        "command.claimed",
        "command.started",
        "step.enter",
    ]
    .into_iter()
    .chain(tail)
    .map(|t| (t, step.to_owned()))
    .collect()
}

fn types_and_nodes(events: &[Event]) -> Vec<(&str, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.event_type(),
                e.json["node_name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn v4_shape_publishes_sorted_envelopes_into_noetl_events_on_sanitised_sharded_subjects() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let si = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        event_shape: Some(EventShape::V4),
        tenant: Some("acme/EU west".into()),
        organization: Some("org.1 two".into()),
        shard_count: Some(4),
        step_delay_ms: Some(50),
        tail_interval_ms: Some(200),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut sub = subscribe(&nats).await;

    let id = execute(&si, "demo/steps", json!({ "n": 1, "city": "Zürich" })).await;
    let shard = id.parse::<u64>().expect("decimal id") % 4;
    let events = collect(&mut sub, |e| e.event_type() == "playbook.completed").await;
    let mut expected = vec![
        ("playbook.initialized", "demo/steps".to_owned()),
        ("workflow.initialized", "workflow".to_owned()),
    ];
    for step in ["step_1", "step_2", "step_3"] {
        expected.extend(v4_step(step, true));
    }
    expected.push(("workflow.completed", "workflow".to_owned()));
    expected.push(("playbook.completed", "demo/steps".to_owned()));
    assert_eq!(types_and_nodes(&events), expected);

    for e in &events {
        assert_eq!(
            e.subject,
            format!("noetl.events.acme-EU-west.org-1-two.{id}.{shard}")
        );
        assert_eq!(e.msg_id, None, "4.x publishes without Nats-Msg-Id");
        assert_eq!(
            raw_number(&e.raw, "execution_id"),
            Some(id.as_str()),
            "{}",
            e.raw
        );
        let event_id = raw_number(&e.raw, "event_id").expect("numeric event_id");
        assert!(event_id.parse::<u64>().expect("decimal") > TWO_POW_53);
        let keys = top_level_keys(&e.raw);
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "sorted keys: {}", e.raw);
        assert!(keys.len() >= 17, "an envelope: {keys:?}");
        assert!(
            !e.raw.contains(": ") && !e.raw.contains(", "),
            "compact: {}",
            e.raw
        );
        assert!(e.raw.is_ascii(), "ensure_ascii: {}", e.raw);
        assert_eq!(
            (&e.json["tenant_id"], &e.json["organization_id"]),
            (&json!("acme/EU west"), &json!("org.1 two"))
        );
        let created = e.json["created_at"].as_str().unwrap_or_default();
        assert!(is_python_utc_time(created), "{created}");
        assert_eq!(e.json["event_time"], e.json["created_at"]);
    }
    let start = &events[0].json;
    assert_eq!(start["status"], "initialized");
    assert_eq!(
        start["context"]["result"]["workload"],
        json!({ "n": 1, "city": "Zürich" })
    );
    assert!(
        events[0].raw.contains(r#""city":"Z\u00fcrich""#),
        "{}",
        events[0].raw
    );
    let done = events
        .iter()
        .find(|e| e.event_type() == "call.done")
        .expect("a call.done");
    assert_eq!(
        done.json["result"],
        json!({ "status": "COMPLETED", "context": { "status": "ok" } })
    );
    assert!(
        raw_number(&done.raw, "command_id").is_some(),
        "{}",
        done.raw
    );
    assert_eq!(events[events.len() - 2].json["status"], "completed");

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
    let mut stream = js
        .get_stream("NOETL_EVENTS")
        .await
        .expect("stream ensured at start");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.subjects, ["noetl.events.>"]);
    assert_eq!(info.config.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(info.state.messages, events.len() as u64);

    // A failed step: the native step.exit (COMPLETED, as 4.x derives it from the name),
    // then both spellings of the terminal.
    let fail = execute(&si, "demo/fail", json!({})).await;
    let events = collect(&mut sub, |e| e.event_type() == "playbook.failed").await;
    let mut expected = vec![
        ("playbook.initialized", "demo/fail".to_owned()),
        ("workflow.initialized", "workflow".to_owned()),
    ];
    expected.extend(v4_step("fail_step", false));
    expected.push(("workflow.failed", "workflow".to_owned()));
    expected.push(("playbook.failed", "demo/fail".to_owned()));
    assert_eq!(types_and_nodes(&events), expected);
    let by_type = |t: &str| {
        events
            .iter()
            .find(|e| e.event_type() == t)
            .unwrap_or_else(|| panic!("no {t}"))
    };
    assert_eq!(by_type("step.exit").json["status"], "COMPLETED");
    assert_eq!(
        by_type("call.error").json["result"]["context"]["error"]["message"],
        "HTTP 500 from https://example.invalid"
    );
    assert_eq!(by_type("playbook.failed").json["status"], "failed");
    assert_eq!(
        by_type("workflow.failed").json["context"]["final_step"],
        "fail_step"
    );
    let fail_shard = fail.parse::<u64>().expect("decimal id") % 4;
    assert!(events
        .iter()
        .all(|e| e.subject.ends_with(&format!(".{fail}.{fail_shard}"))));
    assert_quiet(&mut sub).await;
    wait_status(&si, &fail, "FAILED").await;
}

#[tokio::test]
async fn v4_shape_uses_the_configured_stream_and_prefix_and_cancels_with_execution_cancelled() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let si = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        event_shape: Some(EventShape::V4),
        v4_stream: Some("ACME_EVENTS".into()),
        v4_subject_prefix: Some("acme.events.>".into()),
        tail_interval_ms: Some(100),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut sub = subscribe_to(&nats, "acme.events.>").await;

    let id = execute(&si, "demo/slow", json!({ "seconds": 30 })).await;
    collect(&mut sub, |e| e.event_type() == "step.enter").await;
    let (s, v) = post(&format!("{}/api/executions/{id}/cancel", si.url), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let events = collect(&mut sub, |e| e.event_type() == "execution.cancelled").await;
    assert_eq!(events.len(), 1, "nothing between the cancel and its event");
    let cancel = &events[0];
    assert_eq!(
        cancel.subject,
        format!("acme.events.default.default.{id}.0")
    );
    assert_eq!(
        (
            cancel.json["node_name"].as_str(),
            cancel.json["status"].as_str()
        ),
        (Some("cancel"), Some("CANCELLED"))
    );
    assert_eq!(cancel.json["meta"]["cancelled_by"], "api");
    assert_quiet(&mut sub).await;
    wait_status(&si, &id, "CANCELLED").await;

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
    let mut stream = js
        .get_stream("ACME_EVENTS")
        .await
        .expect("the configured stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.subjects, ["acme.events.>"]);
    assert!(
        js.get_stream("noetl_events").await.is_err(),
        "the 4.x shape does not make the Rust server's stream"
    );
}

#[tokio::test]
async fn none_shape_publishes_nothing_and_the_record_is_the_only_signal() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let si = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        event_shape: Some(EventShape::None),
        step_delay_ms: Some(30),
        tail_interval_ms: Some(100),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    // Everything on the server, not only the event subjects.
    let mut sub = subscribe_to(&nats, ">").await;

    let id = execute(&si, "demo/steps", json!({})).await;
    let status = wait_status(&si, &id, "COMPLETED").await;
    assert_eq!(status["progress"]["completed_steps"], 3);
    let lying = execute(&si, "demo/lying", json!({})).await;
    wait_status(&si, &lying, "FAILED").await;
    assert_quiet(&mut sub).await;

    let stats = si.stats().await;
    assert_eq!(stats["events"]["published"], 0, "{stats}");
    assert_eq!(stats["events"]["queued"], 0, "{stats}");
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
    assert_eq!(
        js.stream_names().count().await,
        0,
        "no stream was made either"
    );

    let raw = http()
        .get(format!("{}/api/executions/{id}", si.url))
        .send()
        .await
        .expect("the stand-in answers")
        .text()
        .await
        .expect("a body");
    let record: Value = serde_json::from_str(&raw).expect("JSON");
    let types: Vec<&str> = record["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["event_type"].as_str())
        .collect();
    let mut expected = vec!["playbook.initialized", "workflow.initialized"];
    for step in ["step_1", "step_2", "step_3"] {
        expected.extend(v4_step(step, true).into_iter().map(|(t, _)| t));
    }
    expected.extend(["workflow.completed", "playbook.completed"]);
    assert_eq!(types, expected);
    assert_eq!(
        stats["events"]["skipped"].as_u64(),
        // demo/lying wrote two start events, one step's seven and two terminals.
        Some(types.len() as u64 + 2 + 7 + 2),
        "every row of both runs counted as not published: {stats}"
    );
    let ids: Vec<u64> = raw
        .match_indices(r#""event_id":"#)
        .filter_map(|(i, m)| {
            let rest = &raw[i + m.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect();
    assert_eq!(
        ids.len(),
        types.len(),
        "every event_id is a bare number: {raw}"
    );
    assert!(ids.iter().all(|i| *i > TWO_POW_53), "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in table order");

    let (_, lie) = get(&format!("{}/api/executions/{lying}", si.url)).await;
    assert_eq!(lie["status"], "FAILED");
    let last: Vec<&str> = lie["events"]
        .as_array()
        .expect("events")
        .iter()
        .rev()
        .take(2)
        .filter_map(|e| e["event_type"].as_str())
        .collect();
    assert_eq!(last, ["playbook.completed", "workflow.completed"]);
}

/// What the fake gateway received.
#[derive(Debug)]
struct Received {
    path: String,
    auth: Option<String>,
    body: Value,
}

/// A fake gateway internal listener: records every request; answers 503 to the first
/// `fail_first` calls, then 200.
struct Gateway {
    url: String,
    rx: mpsc::UnboundedReceiver<Received>,
}

impl Gateway {
    async fn start(fail_first: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new((tx, AtomicUsize::new(0), fail_first));
        let app = Router::new().fallback(record).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, rx }
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a callback within 10 s")
            .expect("receiver open")
    }
}

type GatewayState = Arc<(mpsc::UnboundedSender<Received>, AtomicUsize, usize)>;

async fn record(
    State(st): State<GatewayState>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let n = st.1.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = serde_json::from_str(&body).unwrap_or(Value::Null);
    let _ = st.0.send(Received {
        path: uri.path().to_owned(),
        auth,
        body,
    });
    if n < st.2 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

#[tokio::test]
async fn a_result_callback_reaches_the_gateway_with_the_bearer_token_and_the_echoed_workload() {
    let si = StandIn::start(StandInOptions::default())
        .await
        .expect("stand-in starts");
    let mut gw = Gateway::start(1).await;
    let id = execute(
        &si,
        "demo/echo",
        json!({
            "greeting": "hi", "n": 7,
            "request_id": "req-1", "gateway_url": gw.url, "callback_token": "cb-secret",
        }),
    )
    .await;

    let (first, second) = (gw.next().await, gw.next().await);
    for r in [&first, &second] {
        assert_eq!(r.path, "/api/internal/callback/async");
        assert_eq!(r.auth.as_deref(), Some("Bearer cb-secret"));
    }
    assert_eq!(first.body, second.body, "a retry resends the same body");
    assert_eq!(
        second.body,
        json!({
            "request_id": "req-1", "execution_id": id, "step": "echo", "status": "COMPLETED",
            "data": { "greeting": "hi", "n": 7 },
        })
    );

    // The fake gateway sees attempt 2 before the stand-in logs its answer: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = si.callbacks().await;
    while log.as_array().map_or(0, Vec::len) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = si.callbacks().await;
    }
    let attempts: Vec<(u64, Option<u64>)> = log
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| (e["attempt"].as_u64().unwrap_or(0), e["status"].as_u64()))
        .collect();
    assert_eq!(attempts, [(1, Some(503)), (2, Some(200))]);
    assert!(
        !log.to_string().contains("Bearer"),
        "the token is never logged"
    );
    wait_status(&si, &id, "COMPLETED").await;
}

#[tokio::test]
async fn failing_lying_and_progress_runs_call_back_as_documented() {
    let si = StandIn::start(StandInOptions {
        step_delay_ms: Some(20),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut gw = Gateway::start(0).await;
    let gw_url = gw.url.clone();
    let wl = |rid: &str| json!({ "request_id": rid, "gateway_url": gw_url, "callback_token": "t" });

    let fail = execute(&si, "demo/fail", wl("r-fail")).await;
    let r = gw.next().await;
    assert_eq!(
        r.body,
        json!({
            "request_id": "r-fail", "execution_id": fail, "step": "fail_step", "status": "FAILED",
            "error": {
                "code": "STEP_FAILED",
                "message": "fail_step: HTTP 500 from https://example.invalid",
                "data": { "step": "fail_step" },
            },
        })
    );

    let lying = execute(&si, "demo/lying", wl("r-lie")).await;
    let r = gw.next().await;
    assert_eq!(r.body["status"], "FAILED");
    wait_status(&si, &lying, "FAILED").await;
    let (_, record) = get(&format!("{}/api/executions/{lying}", si.url)).await;
    let last = record["events"].as_array().and_then(|e| e.last()).cloned();
    assert_eq!(
        last.map(|e| e["event_type"].clone()),
        Some(json!("playbook.completed"))
    );

    let progress = execute(&si, "demo/progress", wl("r-prog")).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = gw.next().await;
        assert_eq!(r.path, "/api/internal/progress");
        assert_eq!(r.auth.as_deref(), Some("Bearer t"));
        assert_eq!(r.body["execution_id"], progress.as_str());
        seen.push(r.body["progress"].as_f64().unwrap_or(-1.0));
    }
    assert_eq!(seen, [0.25, 0.5, 0.75, 1.0]);
    let r = gw.next().await;
    assert_eq!(
        (r.path.as_str(), r.body["status"].as_str()),
        ("/api/internal/callback/async", Some("COMPLETED"))
    );
}

#[tokio::test]
async fn auth_playbooks_answer_through_the_sync_callback() {
    let si = StandIn::start(StandInOptions {
        step_delay_ms: Some(20),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let mut gw = Gateway::start(0).await;
    let id_token = si.dev_token("carol@example.com").await;

    execute(
        &si,
        "api_integration/auth0/auth0_login",
        json!({ "auth0_token": id_token, "request_id": "a1", "gateway_url": gw.url, "callback_token": "k" }),
    )
    .await;
    let r = gw.next().await;
    assert_eq!(
        (r.path.as_str(), r.auth.as_deref()),
        ("/api/internal/callback", Some("Bearer k"))
    );
    assert_eq!(r.body["status"], "success", "{}", r.body);
    assert!(r.body["execution_id"].is_string());
    assert_eq!(r.body["data"]["status"], "authenticated");
    assert_eq!(r.body["data"]["user"]["email"], "carol@example.com");
    let session = r.body["data"]["session_token"]
        .as_str()
        .expect("a token")
        .to_owned();

    execute(
        &si,
        "api_integration/auth0/auth0_validate_session",
        json!({ "session_token": session, "request_id": "a2", "gateway_url": gw.url }),
    )
    .await;
    let r = gw.next().await;
    assert_eq!(r.auth, None, "no callback_token, no Authorization header");
    assert_eq!(
        (r.body["status"].as_str(), r.body["data"]["valid"].as_bool()),
        (Some("success"), Some(true))
    );

    execute(
        &si,
        "api_integration/auth0/check_playbook_access",
        json!({ "session_token": session, "playbook_path": "admin/purge", "permission_type": "execute",
                "request_id": "a3", "gateway_url": gw.url }),
    )
    .await;
    let r = gw.next().await;
    assert_eq!(r.body["data"]["allowed"], false, "{}", r.body);

    execute(
        &si,
        "api_integration/auth0/auth0_login",
        json!({ "auth0_token": "garbage", "request_id": "a4", "gateway_url": gw.url }),
    )
    .await;
    let r = gw.next().await;
    assert_eq!(r.body["status"], "error");
    assert_eq!(r.body["data"]["error"], "invalid_token");
}

#[tokio::test]
async fn a_dev_token_verifies_against_the_jwks_and_the_pem() {
    let si = StandIn::start(StandInOptions::default())
        .await
        .expect("stand-in starts");
    let token = si
        .dev_token_with(&[("email", "dora@example.com"), ("name", "Dora E")])
        .await;
    let (_, jwks) = get(&si.jwks_url()).await;
    let jwk_json = &jwks["keys"][0];
    assert_eq!(
        (
            jwk_json["kid"].as_str(),
            jwk_json["alg"].as_str(),
            jwk_json["use"].as_str()
        ),
        (Some("standin-dev-1"), Some("RS256"), Some("sig"))
    );
    let jwk: JsonWebKey<'static> = serde_json::from_value(jwk_json.clone()).expect("a JWK");
    let key = RsaPublicKey::try_from(&jwk).expect("an RSA public key");

    let untrusted = UntrustedToken::new(&token).expect("well-formed");
    assert_eq!(untrusted.header().key_id.as_deref(), Some("standin-dev-1"));
    let verified = Rsa::rs256()
        .validator::<Value>(&key)
        .validate(&untrusted)
        .expect("signature verifies against the JWKS");
    let claims = verified.claims();
    assert_eq!(claims.custom["iss"], si.issuer());
    assert_eq!(claims.custom["aud"], si.audience());
    assert_eq!(claims.custom["email"], "dora@example.com");
    assert_eq!(claims.custom["name"], "Dora E");
    let (exp, nbf) = (
        claims.expiration.expect("exp"),
        claims.not_before.expect("nbf"),
    );
    assert_eq!((exp - nbf).num_seconds(), 3600);

    let pem = http()
        .get(format!("{}/dev/public-key.pem", si.url))
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    assert_eq!(
        RsaPublicKey::from_public_key_pem(&pem).expect("SPKI PEM"),
        key
    );
}

#[tokio::test]
async fn login_validate_check_access_logout_round_trip() {
    let si = StandIn::start(StandInOptions::default())
        .await
        .expect("stand-in starts");
    let login = |email: &'static str| {
        let si = &si;
        async move {
            let token = si.dev_token(email).await;
            let (s, v) = post(
                &format!("{}/api/auth/login", si.url),
                json!({ "auth0_token": token, "auth0_domain": "ignored.example", "client_ip": "10.0.0.1" }),
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v
        }
    };
    let user = login("bob@example.com").await;
    assert_eq!(user["status"], "success");
    let data = &user["data"];
    assert_eq!(data["status"], "authenticated");
    assert_eq!(data["user"]["roles"], json!(["user"]));
    assert_eq!(data["user"]["display_name"], "bob");
    assert!(
        data["user"]["user_id"].is_u64(),
        "user_id is a number: {data}"
    );
    assert!(data["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let token = data["session_token"].as_str().expect("token").to_owned();
    assert_eq!(token.len(), 43);

    let validate = |t: String| {
        post_owned(
            format!("{}/api/auth/session/validate", si.url),
            json!({ "session_token": t }),
        )
    };
    let (_, v) = validate(token.clone()).await;
    assert_eq!(
        (v["status"].as_str(), v["valid"].as_bool()),
        (Some("ok"), Some(true))
    );
    assert_eq!(v["user"], data["user"]);

    let check = |t: &str, path: &str| {
        post_owned(
            format!("{}/api/auth/check-playbook-access", si.url),
            json!({ "session_token": t, "playbook_path": path, "action": "execute" }),
        )
    };
    assert_eq!(check(&token, "demo/echo").await.1["data"]["allowed"], true);
    let (_, refused) = check(&token, "admin/purge").await;
    assert_eq!(
        (
            refused["status"].as_str(),
            refused["data"]["allowed"].as_bool()
        ),
        (Some("ok"), Some(false))
    );

    let admin = login("admin@example.com").await;
    let admin_token = admin["data"]["session_token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(admin["data"]["user"]["roles"], json!(["admin"]));
    assert_eq!(
        check(&admin_token, "admin/purge").await.1["data"]["allowed"],
        true
    );

    let (s, v) = post(
        &format!("{}/api/auth/logout", si.url),
        json!({ "session_token": token }),
    )
    .await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "status": "ok" })));
    assert_eq!(
        validate(token.clone()).await.1,
        json!({ "status": "ok", "valid": false })
    );
    assert_eq!(
        check(&token, "demo/echo").await.1,
        json!({ "status": "ok", "data": { "allowed": false, "message": "invalid session" } })
    );

    let (s, v) = post(
        &format!("{}/api/auth/login", si.url),
        json!({ "auth0_token": "not.a.jwt" }),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (v["status"].as_str(), v["data"]["error"].as_str()),
        (Some("error"), Some("invalid_token"))
    );
    assert!(v["data"]["message"].is_string());
}

async fn post_owned(url: String, body: Value) -> (StatusCode, Value) {
    post(&url, body).await
}

#[tokio::test]
async fn a_session_ttl_override_expires_sessions() {
    let si = StandIn::start(StandInOptions {
        session_ttl_secs: Some(1),
        ..Default::default()
    })
    .await
    .expect("stand-in starts");
    let token = si.dev_token("brief@example.com").await;
    let (_, v) = post(
        &format!("{}/api/auth/login", si.url),
        json!({ "auth0_token": token }),
    )
    .await;
    let session = v["data"]["session_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let validate = || {
        post_owned(
            format!("{}/api/auth/session/validate", si.url),
            json!({ "session_token": session }),
        )
    };
    assert_eq!(validate().await.1["valid"], true);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(validate().await.1["valid"], false);
}

#[tokio::test]
async fn faults_add_delay_and_status_to_api_routes_until_cleared() {
    let si = StandIn::start(StandInOptions::default())
        .await
        .expect("stand-in starts");
    let health = format!("{}/api/health", si.url);
    si.reset_calls().await;

    si.set_faults(Some(400), None).await;
    let t = Instant::now();
    assert_eq!(get(&health).await.0, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );

    si.set_faults(None, Some(503)).await;
    let (s, v) = get(&health).await;
    assert_eq!(
        (s, v["status"].as_u64()),
        (StatusCode::SERVICE_UNAVAILABLE, Some(503))
    );
    assert!(v["error"].is_string());
    // The IdP and the control routes are not NoETL: faults do not touch them.
    assert!(!si.dev_token("x@example.com").await.is_empty());

    si.set_faults(None, None).await;
    let t = Instant::now();
    assert_eq!(get(&health).await.0, StatusCode::OK);
    assert!(t.elapsed() < Duration::from_millis(300));
    assert_eq!(
        si.call_count("GET /api/health").await,
        3,
        "faulted calls are counted too"
    );
}

#[tokio::test]
async fn unknown_playbooks_ids_and_hostile_bodies_get_json_errors() {
    let si = StandIn::start(StandInOptions::default())
        .await
        .expect("stand-in starts");
    let (s, v) = post(
        &format!("{}/api/execute", si.url),
        json!({ "path": "x/none" }),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            StatusCode::NOT_FOUND,
            json!({ "error": "Playbook not found: x/none", "status": 404 })
        )
    );

    for body in ["{bad", "[]", "", "{\"path\": 7}", "\"\u{0}\""] {
        let (s, v) = send(http().post(format!("{}/api/execute", si.url)).body(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body:?} → {v}");
        assert_eq!(v["status"], 400);
    }
    let (s, _) = send(
        http()
            .post(format!("{}/api/auth/login", si.url))
            .body("{\"auth0_token\": null}"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        get(&format!("{}/api/executions/not-a-number", si.url))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let (s, v) = get(&format!(
        "{}/api/executions/900000000000000001/status",
        si.url
    ))
    .await;
    assert_eq!(
        (s, v["status"].as_u64()),
        (StatusCode::NOT_FOUND, Some(404))
    );
    assert_eq!(
        get(&format!("{}/api/nothing-here", si.url)).await.0,
        StatusCode::NOT_FOUND
    );
    let (s, _) = send(http().delete(format!("{}/api/execute", si.url))).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        get(&format!("{}/api/health", si.url)).await.0,
        StatusCode::OK,
        "still alive"
    );
}

#[tokio::test]
async fn a_repeated_request_id_is_a_duplicate_of_the_same_execution() {
    let si = StandIn::start(StandInOptions::default())
        .await
        .expect("stand-in starts");
    let url = format!("{}/api/execute", si.url);
    let first = execute(&si, "demo/echo", json!({ "request_id": "same" })).await;
    let (_, v) = post(
        &url,
        json!({ "path": "demo/echo", "payload": { "request_id": "same" }, "args": [1] }),
    )
    .await;
    assert_eq!(v["status"], "duplicate");
    assert_eq!(v["execution_id"], first.as_str());

    let (_, list) = get(&format!("{}/api/executions", si.url)).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(
        raw_number(&list.to_string(), "execution_id"),
        Some(first.as_str())
    );
    let (_, catalog) = get(&format!("{}/api/catalog/playbooks", si.url)).await;
    assert!(catalog.to_string().contains("\"demo/echo\""));
}

#[tokio::test]
async fn debug_routes_echo_the_request_and_stream_chunks_apart() {
    let si = StandIn::start(StandInOptions::default())
        .await
        .expect("stand-in starts");
    let body = vec![b'z'; 3 * 1024 * 1024];
    let (s, v) = send(
        http()
            .put(format!("{}/api/debug/echo/a/b?x=1&y=2", si.url))
            .header("X-Trace", "one")
            .header("x-trace", "two")
            .body(body),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/api/debug/echo/a/b");
    assert_eq!(v["query"], "x=1&y=2");
    assert_eq!(v["headers"]["x-trace"], "one, two");
    assert_eq!(v["body_len"], 3 * 1024 * 1024);
    assert_eq!(v["body_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(si.call_count("PUT /api/debug/echo/{*rest}").await, 1);

    let resp = http()
        .get(format!(
            "{}/api/debug/stream?chunks=3&interval_ms=250",
            si.url
        ))
        .send()
        .await
        .expect("answers");
    let mut chunks = resp.bytes_stream();
    let start = Instant::now();
    let mut lines = Vec::new();
    while let Some(c) = chunks.next().await {
        let c = c.expect("chunk");
        lines.push((start.elapsed(), String::from_utf8_lossy(&c).into_owned()));
    }
    let text: String = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        lines
            .first()
            .is_some_and(|(t, _)| *t < Duration::from_millis(200)),
        "first chunk at once"
    );
    assert!(
        lines
            .last()
            .is_some_and(|(t, _)| *t >= Duration::from_millis(450)),
        "later chunks later"
    );
}

//! The origin while NATS is away: start-up retries then gives up, `/ready` says 503,
//! session validation answers 503 `revocations_unavailable` (the session cache could fall
//! back to NoETL, but whether the session was logged out cannot be told without the
//! `revoked` bucket, and a doubt is never a 200), a result callback is answered 503 — and
//! once NATS is back, validation answers again and NoETL's retry of that callback delivers
//! the result exactly once. (The cache's own fallback to NoETL while revocations are known
//! is `origin/tests/handlers.rs`.)

use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::harness::flows::{execute_playbook, get_json, http, login};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::sse::SseClient;
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{free_port, scratch_dir, wait_for, workspace_bin, ChildGuard};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// `/ready`'s status code.
async fn ready_status(origin: &Origin) -> u16 {
    http()
        .get(format!("{}/ready", origin.url))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn during_a_nats_outage_ready_is_503_and_validation_refuses_retryably() {
    let mut nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .unwrap();
    let token = login(&origin.url, &standin, "outage@example.com").await;
    assert_eq!(ready_status(&origin).await, 200);

    nats.stop();
    wait_for("/ready answers 503 without NATS", WAIT, || async {
        ready_status(&origin).await == 503
    })
    .await;
    let r = http()
        .get(format!("{}/ready", origin.url))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_ne!(body["checks"]["nats"], "ok", "{body}");
    assert_eq!(body["checks"]["noetl"], "ok", "{body}");

    // Revocations cannot be told without NATS: validation refuses, retryably — never 200.
    let validate = || async {
        http()
            .post(format!("{}/api/auth/validate", origin.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
    };
    wait_for(
        "validation answers 503 once the revocation watch is down",
        WAIT,
        || async { validate().await.status() == 503 },
    )
    .await;
    let r = validate().await;
    assert_eq!(r.status(), 503);
    let ready = get_json(&format!("{}/ready", origin.url)).await;
    assert_eq!(ready["checks"]["revocations"], "catching up", "{ready}");
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "revocations_unavailable", "{body}");

    // NATS back: ready again.
    nats.start_again().await.unwrap();
    wait_for("/ready answers 200 once NATS is back", WAIT, || async {
        ready_status(&origin).await == 200
    })
    .await;
    wait_for("validation answers 200 once NATS is back", WAIT, || async {
        validate().await.status() == 200
    })
    .await;
}

/// The environment of an origin that points at `nats_url`, on fresh ports.
fn origin_command(standin: &StandIn, nats_url: &str) -> (Command, u16) {
    let public = free_port();
    let mut cmd = Command::new(workspace_bin("origin"));
    cmd.env_clear()
        .env("PUBLIC_ADDR", format!("127.0.0.1:{public}"))
        .env("INTERNAL_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("NOETL_BASE_URL", &standin.url)
        .env("AUTH_JWKS_URL", standin.jwks_url())
        .env("AUTH_ISSUER", standin.issuer())
        .env("AUTH_AUDIENCE", standin.audience())
        .env("RUST_LOG", "info")
        .env("NATS_URL", nats_url);
    (cmd, public)
}

#[tokio::test]
async fn start_up_waits_for_a_late_nats_and_exits_when_it_never_comes() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = scratch_dir("gw-outage-");

    // NATS comes late: the origin retries, then starts.
    let mut nats = NatsServer::start().await.unwrap();
    nats.stop();
    let (cmd, public) = origin_command(&standin, &nats.url);
    let late = ChildGuard::spawn("origin", cmd, dir.path().join("late.log")).unwrap();
    wait_for("the origin retries the NATS connection", WAIT, || async {
        late.log_text().contains("NATS not reachable yet, retrying")
    })
    .await;
    nats.start_again().await.unwrap();
    gateway_tests::harness::wait_until_ok(&format!("http://127.0.0.1:{public}/health"), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", late.log_text()));
    drop(late);

    // NATS never comes: the origin gives up and exits non-zero, saying why.
    nats.stop();
    let (cmd, _) = origin_command(&standin, &nats.url);
    let mut never = ChildGuard::spawn("origin", cmd, dir.path().join("never.log")).unwrap();
    let started = Instant::now();
    wait_for(
        "the origin gives up on NATS",
        Duration::from_secs(60),
        || {
            let running = never.is_running();
            async move { !running }
        },
    )
    .await;
    let status = never.stop(Duration::from_secs(1)).expect("it exited");
    assert!(!status.success(), "{status:?}");
    let log = never.log_text();
    assert!(
        log.contains("cannot connect to NATS after 10 attempts"),
        "{log}"
    );
    eprintln!("gave up after {:?}", started.elapsed());
}

/// `POST /api/internal/callback/async` for `request_id` with the service token.
async fn result_callback(origin: &Origin, body: &Value) -> (u16, Value) {
    let r = http()
        .post(format!(
            "{}/api/internal/callback/async",
            origin.internal_url
        ))
        .bearer_auth(INTERNAL_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_result_callback_answered_503_in_an_outage_is_delivered_once_when_retried() {
    let mut nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .unwrap();
    let token = login(&origin.url, &standin, "retry@example.com").await;
    let events = format!("{}/events", origin.url);
    let mut sse = SseClient::connect(&events, Some(&token), None)
        .await
        .unwrap()
        .unwrap_or_else(|(s, b)| panic!("{s} {b}"));
    let init = sse.next(WAIT).await.expect("init frame");
    let client_id = init.data["result"]["clientId"].as_str().unwrap().to_owned();
    sse.close();
    // demo/slow never calls back in time: the callbacks below are NoETL's, by hand.
    let v = execute_playbook(
        &origin.url,
        &token,
        "demo/slow",
        json!({"seconds": 60}),
        Some(&client_id),
    )
    .await;
    let ex = &v["data"]["executePlaybook"];
    let body = json!({
        "request_id": ex["requestId"], "execution_id": ex["executionId"],
        "status": "success", "data": {"during": "outage"},
    });

    nats.stop();
    let (s, v) = result_callback(&origin, &body).await;
    assert_eq!(s, 503, "a callback the gateway could not store is 503: {v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    // Progress too: nothing is answered 2xx that was not stored.
    let r = http()
        .post(format!("{}/api/internal/progress", origin.internal_url))
        .bearer_auth(INTERNAL_TOKEN)
        .json(&json!({"request_id": ex["requestId"], "step": "s", "progress": 0.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "progress during the outage");

    nats.start_again().await.unwrap();
    wait_for("the origin is ready again", WAIT, || async {
        ready_status(&origin).await == 200
    })
    .await;
    // NoETL retries after the 503: this one must deliver, not be taken for a duplicate.
    let (s, v) = result_callback(&origin, &body).await;
    assert!(
        (s == 200 || s == 202) && v["status"] != "duplicate",
        "the retry after the outage was not delivered: {s} {v}"
    );
    let (s, v) = result_callback(&origin, &body).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("duplicate")), "{v}");

    let mut sse = SseClient::connect(
        &format!("{events}?client_id={client_id}"),
        Some(&token),
        None,
    )
    .await
    .unwrap()
    .unwrap_or_else(|(s, b)| panic!("{s} {b}"));
    let frames = sse.collect_until(Duration::from_secs(3), |_| false).await;
    let results: Vec<_> = frames
        .iter()
        .filter(|f| f.event == "playbook/result")
        .collect();
    assert_eq!(results.len(), 1, "exactly one result: {frames:?}");
    assert_eq!(
        results[0].data["params"]["data"],
        json!({"during": "outage"})
    );
}

//! The origin process as an operator meets it: configuration errors, readiness, JSON
//! logs without secrets, and graceful shutdown on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{wait_for, workspace_bin};
use serde_json::Value;

const SECRET: &str = "internal-token-that-must-not-be-logged";

#[test]
fn an_invalid_configuration_exits_2_with_a_message_naming_the_setting() {
    let out = Command::new(workspace_bin("origin"))
        .env_clear()
        .env("AUTH_AUDIENCE", "aud")
        .output()
        .expect("the origin binary runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AUTH0_DOMAIN") && stderr.contains("AUTH_JWKS_URL"),
        "{stderr}"
    );

    let out = Command::new(workspace_bin("origin"))
        .env_clear()
        .env("AUTH_AUDIENCE", "aud")
        .env("AUTH0_DOMAIN", "https://tenant.auth0.com/")
        .output()
        .expect("the origin binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bare host name"));
}

#[tokio::test]
async fn ready_reports_nats_and_noetl_and_logs_are_json_without_secrets() {
    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::with_nats(&nats.url)
            .env("LOG_FORMAT", "json")
            .env("GATEWAY_INTERNAL_TOKEN", SECRET),
    )
    .await
    .unwrap();
    let r = reqwest::get(format!("{}/ready", origin.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["nats"], "ok", "{body}");
    assert_eq!(body["checks"]["noetl"], "ok", "{body}");
    assert_eq!(origin.metric("gateway_noetl_up").await, Some(1));
    let r = reqwest::get(format!("{}/health", origin.internal_url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let log = origin.log_text();
    assert!(!log.contains(SECRET), "a secret reached the log");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
    assert!(
        log.contains("<redacted>"),
        "the start-up config line should show the redaction"
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_promptly() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let mut origin = Origin::start(&standin, OriginOptions::default())
        .await
        .unwrap();
    let token =
        gateway_tests::harness::flows::login(&origin.url, &standin, "drain@example.com").await;
    // A request in flight when SIGTERM arrives still completes.
    let slow_url = format!("{}/noetl/debug/slow?ms=1000", origin.url);
    let in_flight = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(slow_url)
            .bearer_auth(token)
            .send()
            .await?;
        Ok::<_, reqwest::Error>((r.status().as_u16(), r.text().await?))
    });
    // SIGTERM once the request has reached NoETL (it is in flight, not still connecting).
    wait_for(
        "the slow request reaches NoETL",
        Duration::from_secs(10),
        || async { standin.call_count("GET /api/debug/slow").await >= 1 },
    )
    .await;
    let started = Instant::now();
    let status = origin
        .guard()
        .stop(Duration::from_secs(5))
        .expect("the origin exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "exited before the in-flight request finished"
    );
    let (status, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was answered, not cut off");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn nats_replicas_the_server_cannot_hold_are_logged_and_the_replica_still_serves() {
    // One nats-server cannot keep three copies: the origin says so and serves with one
    // (on a three-node cluster the same setting scales every stream in place).
    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::with_nats(&nats.url).env("NATS_REPLICAS", "3"),
    )
    .await
    .unwrap();
    let log = origin.log_text();
    for stream in ["KV_sessions", "KV_revoked", "GATEWAY_FRAMES"] {
        assert!(
            log.lines()
                .any(|l| l.contains("NATS_REPLICAS not applied") && l.contains(stream)),
            "no warning for {stream}:\n{log}"
        );
    }
    let r = reqwest::get(format!("{}/ready", origin.internal_url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // And the value 1, which the server holds, is applied silently.
    drop(origin);
    let again = Origin::start(
        &standin,
        OriginOptions::with_nats(&nats.url).env("NATS_REPLICAS", "1"),
    )
    .await
    .unwrap();
    assert!(!again.log_text().contains("NATS_REPLICAS not applied"));
}

//! `/noetl/*` end to end: identity, path policy, allow-list, streaming, limits, failures.

use std::time::{Duration, Instant};

use futures::StreamExt;
use gateway_tests::harness::flows::{http, login};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::raw_http;
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

async fn session(origin: &Origin, standin: &StandIn, email: &str) -> String {
    login(&origin.url, standin, email).await
}

async fn world(env: &[(&str, &str)]) -> (StandIn, Origin, String) {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let opts = OriginOptions::default().envs(env);
    let origin = Origin::start(&standin, opts).await.unwrap();
    let token = session(&origin, &standin, "proxy@example.com").await;
    (standin, origin, token)
}

#[tokio::test]
async fn proxied_requests_carry_the_gateways_identity_and_never_the_clients() {
    let (_standin, origin, token) = world(&[]).await;
    let resp = http()
        .get(format!(
            "{}/noetl/debug/echo/x?a=1&session_token={token}",
            origin.url
        ))
        .bearer_auth(&token)
        .header("x-user-id", "0")
        .header("x-noetl-user-roles", "admin")
        .header("x-noetl-user-email", "admin@example.com")
        .header("x-gateway-assertion", "forged")
        .header("cookie", format!("session_token={token}"))
        .header("x-forwarded-for", "10.0.0.1")
        .header("true-client-ip", "10.0.0.2")
        .header("x-http-method-override", "DELETE")
        .header("x-original-url", "/api/auth/login")
        .header("x-rewrite-url", "/api/auth/login")
        .header("x-request-id", "trace-me-123")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "trace-me-123");
    let echo: Value = resp.json().await.unwrap();
    let h = &echo["headers"];
    assert_eq!(echo["path"], "/api/debug/echo/x");
    assert_eq!(
        echo["query"], "a=1",
        "the session token must not travel upstream: {echo}"
    );
    assert_eq!(h["x-noetl-user-email"], "proxy@example.com");
    assert_eq!(h["x-noetl-user-roles"], "user");
    assert!(h["x-noetl-user-id"].as_str().is_some_and(|id| id != "0"));
    assert_eq!(h["x-request-id"], "trace-me-123");
    assert_eq!(h["accept"], "application/json");
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "the origin states the client address itself (here the TCP peer), never the client's claim: {h}"
    );
    for absent in [
        "authorization",
        "cookie",
        "x-user-id",
        "x-gateway-assertion",
        "true-client-ip",
        "x-http-method-override",
        "x-original-url",
        "x-rewrite-url",
    ] {
        assert!(h.get(absent).is_none(), "{absent} reached NoETL: {h}");
        assert!(
            !echo["header_names"]
                .as_array()
                .expect("the echo lists header names")
                .contains(&json!(absent)),
            "{absent} reached NoETL: {echo}"
        );
    }
    assert!(
        !origin.log_text().contains(&token),
        "the session token reached the log"
    );
}

#[tokio::test]
async fn traversal_and_authority_tricks_are_refused_before_noetl() {
    let (standin, origin, token) = world(&[]).await;
    standin.reset_calls().await;
    for path in [
        "/noetl/..%2fauth/login",
        "/noetl/%2e%2e/auth/login",
        "/noetl/debug/%2E%2E/%2E%2E/etc",
        "/noetl//@evil.example/x",
        "/noetl/@evil.example",
        "/noetl/debug/../auth/login",
        "/noetl/debug%2fecho",
        "/noetl/debug/%252e%252e/x",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        let (status, body) = raw_http(&origin.url, &req).await.unwrap();
        assert!((400..500).contains(&status), "{path} → {status} {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(
            v["error"]["code"].is_string(),
            "{path}: not a JSON error: {body}"
        );
    }
    assert!(standin
        .calls()
        .await
        .keys()
        .all(|k| !k.contains("debug") && !k.contains("auth/login")));
}

#[tokio::test]
async fn the_allow_list_decides_methods_and_paths() {
    let (_standin, origin, token) = world(&[]).await;
    let r = http()
        .delete(format!("{}/noetl/executions/1", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let r = http()
        .post(format!("{}/noetl/auth/session/validate", origin.url))
        .bearer_auth(&token)
        .json(&json!({"session_token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "proxy_route_forbidden"
    );
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", origin.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", origin.url))
        .bearer_auth("forged-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let (_standin, origin, token) = world(&[]).await;
    // Response: the first chunk arrives long before the last is produced.
    let started = Instant::now();
    let resp = http()
        .get(format!(
            "{}/noetl/debug/stream?chunks=5&interval_ms=300",
            origin.url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(!first.is_empty());
    let mut total = first.len();
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
    }
    let last_at = started.elapsed();
    assert!(total > 0);
    assert!(
        last_at >= Duration::from_millis(1200),
        "stream ended too soon: {last_at:?}"
    );
    assert!(
        first_at + Duration::from_millis(800) < last_at,
        "buffered: first {first_at:?}, last {last_at:?}"
    );

    // Request: a 3 MiB body sent in chunks without Content-Length arrives intact.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..48u8).map(|i| Ok(vec![i; 64 * 1024])).collect();
    let mut hasher = Sha256::new();
    for c in chunks.iter().flatten() {
        hasher.update(c);
    }
    let resp = http()
        .post(format!("{}/noetl/debug/echo", origin.url))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["body_len"], 48 * 64 * 1024);
    assert_eq!(echo["body_sha256"], hex::encode(hasher.finalize()));
}

#[tokio::test]
async fn oversize_proxied_bodies_are_413() {
    let (standin, origin, token) = world(&[("PROXY_MAX_BODY", "1024")]).await;
    standin.reset_calls().await;
    let r = http()
        .post(format!("{}/noetl/debug/echo", origin.url))
        .bearer_auth(&token)
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(standin.call_count("POST /api/debug/echo").await, 0);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![b'y'; 512])).collect();
    let r = http()
        .post(format!("{}/noetl/debug/echo", origin.url))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );
}

#[tokio::test]
async fn a_slow_upstream_is_504_and_a_dead_one_502() {
    let (mut standin, origin, token) = world(&[("PROXY_TIMEOUT", "1s")]).await;
    let started = Instant::now();
    let r = http()
        .get(format!("{}/noetl/debug/slow?ms=4000", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    standin.guard().stop(Duration::from_secs(2));
    let started = Instant::now();
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "noetl_unavailable"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

//! The auth REST API end to end: a real origin binary against the NoETL stand-in, with a
//! real nats-server or the embedded store.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use gateway_tests::harness::flows::{http, login_reply};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};

const VALIDATE: &str = "POST /api/auth/session/validate";
const NOETL_LOGIN: &str = "POST /api/auth/login";

async fn post(url: &str, body: Value) -> (StatusCode, Value) {
    let resp = http()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("origin answers");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn login(origin: &Origin, standin: &StandIn, email: &str) -> Value {
    login_reply(&origin.url, standin, email).await
}

fn assert_error_body(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "unexpected body {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Login → validate → check-access → logout → validate fails.
async fn full_session_lifecycle(nats: Option<&NatsServer>) {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let opts = match nats {
        Some(n) => OriginOptions::with_nats(&n.url),
        None => OriginOptions::default(),
    };
    let origin = Origin::start(&standin, opts).await.unwrap();

    let body = login(&origin, &standin, "ada@example.com").await;
    assert_eq!(body["status"], "authenticated");
    assert_eq!(body["user"]["email"], "ada@example.com");
    assert_eq!(body["user"]["roles"], json!(["user"]));
    assert!(
        body["user"]["user_id"].is_string(),
        "user ids are strings: {body}"
    );
    assert!(body["expires_at"].as_str().is_some());
    let token = body["session_token"].as_str().unwrap().to_owned();

    let (s, v) = post(
        &format!("{}/api/auth/validate", origin.url),
        json!({"session_token": token}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["valid"], true);
    assert_eq!(v["user"]["email"], "ada@example.com");

    let access = |path: &str| json!({"session_token": token, "playbook_path": path, "permission_type": "execute"});
    let (s, v) = post(
        &format!("{}/api/auth/check-access", origin.url),
        access("demo/echo"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["playbook_path"], "demo/echo");
    let (s, v) = post(
        &format!("{}/api/auth/check-access", origin.url),
        access("admin/purge"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["allowed"], false);

    let resp = http()
        .post(format!("{}/api/auth/logout", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let (s, v) = post(
        &format!("{}/api/auth/validate", origin.url),
        json!({"session_token": token}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["valid"], false);
    assert_eq!(v["user"], Value::Null);
    assert_error_body(&v, "invalid_session");
    let (s, v) = post(
        &format!("{}/api/auth/check-access", origin.url),
        access("demo/echo"),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");

    assert!(
        !origin.log_text().contains(&token),
        "the raw session token reached the log"
    );
}

#[tokio::test]
async fn session_lifecycle_works_with_nats_kv() {
    let nats = NatsServer::start().await.unwrap();
    full_session_lifecycle(Some(&nats)).await;
}

#[tokio::test]
async fn session_lifecycle_works_with_the_embedded_store() {
    full_session_lifecycle(None).await;
}

#[tokio::test]
async fn a_cached_session_is_served_without_calling_noetl() {
    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .unwrap();
    let token = login(&origin, &standin, "cache@example.com").await["session_token"]
        .as_str()
        .unwrap()
        .to_owned();
    standin.reset_calls().await;
    for _ in 0..10 {
        let resp = http()
            .post(format!("{}/api/auth/validate", origin.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(
        standin.call_count(VALIDATE).await,
        0,
        "validation reached NoETL: {:?}",
        standin.calls().await
    );

    // A token the cache has never seen goes to NoETL once; a repeat within
    // SESSION_NEGATIVE_TTL is refused from the negative cache (issue 12: invalid tokens
    // are cheap). A session a login creates is cached at once and read first, so a
    // negative entry never hides it (tests/tests/abuse_auth.rs).
    for _ in 1..=2 {
        let (s, _) = post(
            &format!("{}/api/auth/validate", origin.url),
            json!({"session_token": "never-issued-token"}),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(standin.call_count(VALIDATE).await, 1);
    }
    // With the negative cache off, every repeat goes to NoETL.
    let uncached = Origin::start(
        &standin,
        OriginOptions::with_nats(&nats.url).env("SESSION_NEGATIVE_TTL", "0s"),
    )
    .await
    .unwrap();
    standin.reset_calls().await;
    for n in 1..=2 {
        let (s, _) = post(
            &format!("{}/api/auth/validate", uncached.url),
            json!({"session_token": "never-issued-token"}),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(standin.call_count(VALIDATE).await, n);
    }
}

#[tokio::test]
async fn an_expired_session_is_refused_even_while_cached() {
    let standin = StandIn::start(StandInOptions {
        session_ttl_secs: Some(2),
        ..Default::default()
    })
    .await
    .unwrap();
    let origin = Origin::start(&standin, OriginOptions::default())
        .await
        .unwrap();
    let token = login(&origin, &standin, "brief@example.com").await["session_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("{}/api/auth/validate", origin.url);
    let validate = || post(&url, json!({"session_token": token}));
    assert_eq!(validate().await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (s, v) = validate().await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
}

#[tokio::test]
async fn a_logout_on_one_replica_is_honoured_by_another() {
    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let a = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .unwrap();
    let b = Origin::start(&standin, OriginOptions::with_nats(&nats.url))
        .await
        .unwrap();
    let token = login(&a, &standin, "two@example.com").await["session_token"]
        .as_str()
        .unwrap()
        .to_owned();
    standin.reset_calls().await;
    let (s, _) = post(
        &format!("{}/api/auth/validate", b.url),
        json!({"session_token": token}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        standin.call_count(VALIDATE).await,
        0,
        "replica B should hit the shared cache"
    );
    let resp = http()
        .post(format!("{}/api/auth/logout", a.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (s, _) = post(
        &format!("{}/api/auth/validate", b.url),
        json!({"session_token": token}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

fn forge(header: Value, payload: Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload.to_string()),
        B64.encode(signature)
    )
}

fn decode_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn hostile_id_tokens_are_refused_with_401_and_never_reach_noetl() {
    use jwt_compact::alg::{Hs256, Hs256Key};
    use jwt_compact::{AlgorithmExt, Claims, Header};

    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::default())
        .await
        .unwrap();
    let good = standin.dev_token("mallory@example.com").await;
    let claims = decode_part(&good, 1);

    let mut hostile: Vec<(&str, String)> = vec![
        (
            "alg none",
            forge(
                json!({"alg": "none", "kid": "standin-dev-1"}),
                claims.clone(),
                b"",
            ),
        ),
        (
            "wrong iss",
            standin
                .dev_token_with(&[("email", "m@example.com"), ("iss", "https://evil.example/")])
                .await,
        ),
        (
            "wrong aud",
            standin
                .dev_token_with(&[("email", "m@example.com"), ("aud", "someone-else")])
                .await,
        ),
        (
            "expired",
            standin
                .dev_token_with(&[("email", "m@example.com"), ("ttl", "-600")])
                .await,
        ),
        (
            "not yet valid",
            standin
                .dev_token_with(&[("email", "m@example.com"), ("nbf_in", "3600")])
                .await,
        ),
        (
            "email not verified",
            standin
                .dev_token_with(&[("email", "m@example.com"), ("email_verified", "false")])
                .await,
        ),
        (
            "issued an hour ago, unexpired",
            standin
                .dev_token_with(&[
                    ("email", "m@example.com"),
                    ("iat_ago", "3600"),
                    ("ttl", "7200"),
                ])
                .await,
        ),
        (
            "unknown kid",
            standin
                .dev_token_with(&[("email", "m@example.com"), ("kid", "rotated-away")])
                .await,
        ),
    ];
    // HS256 keyed with the RSA public key: the classic algorithm-confusion forgery.
    let pem = http()
        .get(format!("{}/dev/public-key.pem", standin.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hs = Hs256
        .token(
            &Header::empty().with_key_id("standin-dev-1"),
            &Claims::new(claims.clone()),
            &Hs256Key::new(pem.as_bytes()),
        )
        .unwrap();
    hostile.push(("HS256 with the public key", hs));
    // A valid signature over different claims.
    let mut tampered_claims = claims.clone();
    tampered_claims["email"] = json!("admin@example.com");
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(tampered_claims.to_string()),
        parts[2]
    );
    hostile.push(("tampered payload", tampered));
    hostile.push(("garbage", "not-a-jwt".into()));

    standin.reset_calls().await;
    for (what, token) in &hostile {
        let (s, body) = post(
            &format!("{}/api/auth/login", origin.url),
            json!({"auth0_token": token}),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(body["error"]["code"].as_str().is_some(), "{what}: {body}");
        // The rules added for leaked and unverified identities refuse for their own reason
        // (a well-formed, correctly signed token otherwise).
        let expected = match *what {
            "email not verified" => Some("id_token_email_not_verified"),
            "issued an hour ago, unexpired" => Some("id_token_too_old"),
            _ => None,
        };
        if let Some(code) = expected {
            assert_eq!(body["error"]["code"], code, "{what}: {body}");
        }
    }
    assert_eq!(
        standin.call_count(NOETL_LOGIN).await,
        0,
        "a hostile token reached NoETL"
    );

    // The untampered token still works: the refusals changed nothing.
    let (s, _) = post(
        &format!("{}/api/auth/login", origin.url),
        json!({"id_token": good}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn malformed_wrong_type_and_oversize_bodies_get_clean_json_errors() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("AUTH_BODY_LIMIT", "4096"),
    )
    .await
    .unwrap();
    let url = format!("{}/api/auth/login", origin.url);
    let send = |body: Vec<u8>, ctype: &'static str| {
        let url = url.clone();
        async move {
            let r = http()
                .post(url)
                .header("content-type", ctype)
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, b) = send(b"{\"auth0_token\": ".to_vec(), "application/json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error_body(&b, "invalid_json");
    let (s, b) = send(b"{\"auth0_token\": 42}".to_vec(), "application/json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error_body(&b, "invalid_json");
    let (s, b) = send(
        b"auth0_token=x".to_vec(),
        "application/x-www-form-urlencoded",
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error_body(&b, "unsupported_media_type");
    let big = format!("{{\"auth0_token\": \"{}\"}}", "a".repeat(5000));
    let (s, b) = send(big.into_bytes(), "application/json").await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_body(&b, "payload_too_large");
    let (s, b) = send(b"{}".to_vec(), "application/json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error_body(&b, "missing_token");

    let r = http()
        .get(format!("{}/api/auth/login", origin.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_error_body(&r.json().await.unwrap(), "method_not_allowed");
    let r = http()
        .get(format!("{}/nope", origin.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_error_body(&r.json().await.unwrap(), "not_found");
    let (s, b) = post(
        &format!("{}/api/auth/check-access", origin.url),
        json!({"session_token": "x", "playbook_path": "demo/echo", "permission_type": "delete"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error_body(&b, "invalid_field");
}

#[tokio::test]
async fn noetl_down_or_slow_gives_502_or_504_without_hanging_and_the_replica_stays_ready() {
    let mut standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("NOETL_TIMEOUT", "1s"),
    )
    .await
    .unwrap();
    let id_token = standin.dev_token("slow@example.com").await;
    let token = login(&origin, &standin, "slow@example.com").await["session_token"]
        .as_str()
        .unwrap()
        .to_owned();

    standin.set_faults(Some(3000), None).await;
    let started = Instant::now();
    let (s, b) = post(
        &format!("{}/api/auth/validate", origin.url),
        json!({"session_token": "uncached-token"}),
    )
    .await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{b}");
    assert_error_body(&b, "noetl_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );

    standin.set_faults(None, Some(503)).await;
    let (s, b) = post(
        &format!("{}/api/auth/validate", origin.url),
        json!({"session_token": "uncached-token"}),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    standin.set_faults(None, None).await;

    standin.guard().stop(Duration::from_secs(2));
    let started = Instant::now();
    let (s, b) = post(
        &format!("{}/api/auth/login", origin.url),
        json!({"auth0_token": id_token}),
    )
    .await;
    // JWKS is cached from the first login, so the failure is NoETL's.
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
    assert_error_body(&b, "noetl_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // A cached session still validates while NoETL is down.
    let (s, _) = post(
        &format!("{}/api/auth/validate", origin.url),
        json!({"session_token": token}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // NoETL down is reported, not a reason to leave the Service: this replica still serves
    // cached sessions (above), streams and callbacks. The body names NoETL's state with a
    // code, never NoETL's own error text (nor its address).
    let r = http()
        .get(format!("{}/ready", origin.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["checks"]["noetl"], "noetl_unavailable", "{body}");
    let standin_addr = standin.url.trim_start_matches("http://");
    assert!(
        !text.contains(standin_addr)
            && !text.contains("refused")
            && !text.contains("error sending"),
        "no upstream error text in a probe body: {text}"
    );
    assert_eq!(origin.metric("gateway_noetl_up").await, Some(0));
}

#[tokio::test]
async fn auth_playbooks_work_when_their_callback_lands_on_another_replica() {
    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let playbook = |o: OriginOptions| o.env("AUTH_MODE", "playbook");
    let b = Origin::start(&standin, playbook(OriginOptions::with_nats(&nats.url)))
        .await
        .unwrap();
    // A tells the playbooks to call back B's internal listener, as a load balancer might.
    let a = Origin::start(
        &standin,
        playbook(OriginOptions::with_nats(&nats.url)).env("GATEWAY_CALLBACK_URL", &b.internal_url),
    )
    .await
    .unwrap();
    standin.reset_calls().await;
    let body = login(&a, &standin, "playbook@example.com").await;
    let token = body["session_token"].as_str().unwrap().to_owned();
    assert_eq!(body["user"]["email"], "playbook@example.com");
    let calls = standin.calls().await;
    assert_eq!(
        calls.get(NOETL_LOGIN).copied().unwrap_or(0),
        0,
        "playbook mode must not use the REST login: {calls:?}"
    );
    assert!(
        calls.get("POST /api/execute").copied().unwrap_or(0) >= 1,
        "{calls:?}"
    );

    // Validation of a session no gateway has cached yet (created at NoETL directly) goes
    // through the validate playbook, answered on the other replica too.
    let direct: Value = http()
        .post(format!("{}/api/auth/login", standin.url))
        .json(&json!({"auth0_token": standin.dev_token("direct@example.com").await, "auth0_domain": "dev", "client_ip": "127.0.0.1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uncached = direct["data"]["session_token"].as_str().unwrap().to_owned();
    let executes_before = standin.call_count("POST /api/execute").await;
    let (s, v) = post(
        &format!("{}/api/auth/validate", a.url),
        json!({"session_token": uncached}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["user"]["email"], "direct@example.com");
    assert_eq!(
        standin.call_count("POST /api/execute").await,
        executes_before + 1
    );
    let (s, v) = post(
        &format!("{}/api/auth/check-access", a.url),
        json!({"session_token": token, "playbook_path": "admin/purge", "permission_type": "execute"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["allowed"], false);
    let (s, v) = post(
        &format!("{}/api/auth/check-access", a.url),
        json!({"session_token": token, "playbook_path": "demo/echo", "permission_type": "execute"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["allowed"], true);
    let (s, v) = post(
        &format!("{}/api/auth/validate", b.url),
        json!({"session_token": "never-issued"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
}

#[tokio::test]
async fn an_auth_playbook_that_never_calls_back_times_out_with_504() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dead = format!("http://127.0.0.1:{}", gateway_tests::harness::free_port());
    let origin = Origin::start(
        &standin,
        OriginOptions::default()
            .env("AUTH_MODE", "playbook")
            .env("AUTH_PLAYBOOK_TIMEOUT", "2s")
            .env("GATEWAY_CALLBACK_URL", &dead),
    )
    .await
    .unwrap();
    let id_token = standin.dev_token("lost@example.com").await;
    let started = Instant::now();
    let (s, b) = post(
        &format!("{}/api/auth/login", origin.url),
        json!({"auth0_token": id_token}),
    )
    .await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{b}");
    assert_error_body(&b, "noetl_timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "took {took:?}"
    );
    assert!(
        standin.call_count("POST /api/executions/{id}/cancel").await >= 1,
        "the timed-out playbook is cancelled: {:?}",
        standin.calls().await
    );
}

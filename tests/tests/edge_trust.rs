//! The origin's side of the edge contract: `x-gateway-assertion` verification and
//! `REQUIRE_EDGE_ASSERTION`, against the origin binary directly (no wrangler needed).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use gateway_shared::assertion::{self, AssertionClaims};
use gateway_shared::session::SessionHash;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::{json, Value};

fn seed(byte: u8) -> String {
    B64.encode([byte; 32])
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(sub: &str, sid: &str) -> AssertionClaims {
    AssertionClaims {
        sub: sub.into(),
        email: format!("{sub}@example.com"),
        roles: vec!["user".into()],
        sid: sid.into(),
        rid: "rid-1".into(),
        session_exp: now() + 3600,
        iss: String::new(),
        aud: String::new(),
    }
}

async fn me(origin: &Origin, assertion: Option<&str>, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/graphql", origin.url))
        .timeout(Duration::from_secs(10))
        .json(&json!({"query": "{ me { userId email roles } }"}));
    if let Some(a) = assertion {
        req = req.header(assertion::HEADER, a);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn validate_count(origin: &Origin) -> u64 {
    origin
        .metric("gateway_auth_validate_requests_total")
        .await
        .expect("the validate counter is exported")
}

#[tokio::test]
async fn a_valid_assertion_is_trusted_and_forged_or_expired_ones_are_refused() {
    let key = assertion::signing_key_from_b64(&seed(7)).unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env(
            "EDGE_ASSERTION_PUBLIC_KEY",
            &assertion::public_key_b64(&key),
        ),
    )
    .await
    .unwrap();
    // A real session: the origin re-checks an asserted session that brings its token
    // (from its cache here, as the login just filled it), at most once per SESSION_CACHE_TTL.
    let session_token =
        gateway_tests::harness::flows::login(&origin.url, &standin, "42@example.com").await;
    let sid = SessionHash::of(&session_token);
    let good = assertion::sign(&claims("42", sid.as_str()), &key, now()).unwrap();
    let (s, v) = me(&origin, Some(&good), Some(&session_token)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["me"]["userId"], "42", "{v}");
    assert_eq!(v["data"]["me"]["email"], "42@example.com");
    assert_eq!(
        validate_count(&origin).await,
        0,
        "the assertion replaces session validation"
    );

    let forged = assertion::sign(
        &claims("1", sid.as_str()),
        &assertion::signing_key_from_b64(&seed(9)).unwrap(),
        now(),
    )
    .unwrap();
    let expired = assertion::sign(&claims("42", sid.as_str()), &key, now() - 600).unwrap();
    for (what, a) in [
        ("forged", forged.as_str()),
        ("expired", expired.as_str()),
        ("garbage", "x.y.z"),
    ] {
        let (s, v) = me(&origin, Some(a), Some(&session_token)).await;
        assert_eq!(s, 401, "{what}: {v}");
        assert!(
            v["error"]["code"]
                .as_str()
                .is_some_and(|c| c.starts_with("assertion_")),
            "{what}: {v}"
        );
    }
    // An assertion lends its identity to no other session token.
    let (s, v) = me(&origin, Some(&good), Some("some-other-token")).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["code"], "assertion_session_mismatch");
}

#[tokio::test]
async fn without_the_edge_key_a_client_sent_assertion_is_ignored() {
    let key = assertion::signing_key_from_b64(&seed(7)).unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::default())
        .await
        .unwrap();
    let a = assertion::sign(&claims("42", "x"), &key, now()).unwrap();
    let (s, v) = me(&origin, Some(&a), None).await;
    assert_eq!(
        s, 401,
        "an unverifiable assertion must not be identity: {v}"
    );
    assert_eq!(v["error"]["code"], "missing_token");
}

#[tokio::test]
async fn require_edge_assertion_refuses_direct_traffic_but_not_probes() {
    let key = assertion::signing_key_from_b64(&seed(7)).unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default()
            .env(
                "EDGE_ASSERTION_PUBLIC_KEY",
                &assertion::public_key_b64(&key),
            )
            .env("REQUIRE_EDGE_ASSERTION", "true"),
    )
    .await
    .unwrap();
    let id_token = standin.dev_token("direct@example.com").await;
    let r = reqwest::Client::new()
        .post(format!("{}/api/auth/login", origin.url))
        .json(&json!({"auth0_token": id_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "edge_assertion_required"
    );
    assert_eq!(
        reqwest::get(format!("{}/health", origin.url))
            .await
            .unwrap()
            .status(),
        200
    );
    // Through the edge (an anonymous assertion proves the route), login works.
    let anon = assertion::sign(&claims("", ""), &key, now()).unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/api/auth/login", origin.url))
        .header(assertion::HEADER, anon)
        .json(&json!({"auth0_token": id_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

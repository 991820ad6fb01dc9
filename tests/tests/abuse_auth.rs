//! Abuse of the auth routes, end to end (issue 12): per-address rate limits at the origin
//! (direct and through a trusted proxy), random bearer tokens kept from costing NoETL
//! calls (the negative cache, the rate limit, the auth playbook bound) in both auth
//! modes, and concurrent validations of one token coalesced into one NoETL call.
//!
//! Every client is on loopback; a test that needs two client addresses binds its sockets
//! to 127.0.0.2 and 127.0.0.3 (Linux routes all of 127.0.0.0/8 to `lo`).

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use rand::RngCore;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

const NOETL_VALIDATE: &str = "POST /api/auth/session/validate";
const NOETL_LOGIN: &str = "POST /api/auth/login";
const NOETL_EXECUTE: &str = "POST /api/execute";

/// A client whose connections leave from `source` (a loopback address).
fn client_from(source: &str) -> reqwest::Client {
    let ip: IpAddr = source.parse().expect("a literal address");
    reqwest::Client::builder()
        .local_address(ip)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a reqwest client builds")
}

/// A token no one issued: 64 random hex characters.
fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let resp = req.send().await.expect("the origin answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    Reply {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

async fn validate(c: &reqwest::Client, origin: &Origin, token: &str) -> Reply {
    send(
        c.post(format!("{}/api/auth/validate", origin.url))
            .bearer_auth(token),
    )
    .await
}

async fn login(c: &reqwest::Client, origin: &Origin, id_token: &str) -> Reply {
    send(
        c.post(format!("{}/api/auth/login", origin.url))
            .json(&json!({"auth0_token": id_token})),
    )
    .await
}

/// A 429 as the protocol says: `rate_limited` JSON and a whole-second `Retry-After`.
fn assert_rate_limited(r: &Reply) {
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "rate_limited", "{}", r.body);
    let secs: u64 = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a 429 without a Retry-After: {:?}", r.headers));
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
}

#[tokio::test]
async fn a_login_flood_from_one_address_is_refused_429_before_noetl_and_another_address_is_not() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("LOGIN_RATE_LIMIT", "5/1m"),
    )
    .await
    .unwrap();
    let (flooder, other) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let id_token = standin.dev_token("flood@example.com").await;
    standin.reset_calls().await;

    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(login(&flooder, &origin, &id_token).await);
    }
    let ok = answers.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 5, "the burst of the limit passes, nothing more");
    for r in &answers[5..] {
        assert_rate_limited(r);
    }
    assert_eq!(
        standin.call_count(NOETL_LOGIN).await,
        5,
        "a refused login never reaches NoETL"
    );
    // Refused before the body is read: a body that would be a 400 is a 429.
    let r = send(
        flooder
            .post(format!("{}/api/auth/login", origin.url))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_rate_limited(&r);

    // Another address is unaffected.
    let r = login(&other, &origin, &id_token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        origin
            .metric("gateway_rate_limited_total{limit=\"login\"}")
            .await
            .is_some_and(|n| n >= 8),
        "refusals are counted"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_limited_and_an_untrusted_peer_cannot_pick_one(
) {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default()
            .env("AUTH_RATE_LIMIT", "3/1m")
            .env("TRUSTED_PROXIES", "127.0.0.1"),
    )
    .await
    .unwrap();
    let proxy = client_from("127.0.0.1");
    let via = |client: &'static str| {
        let proxy = proxy.clone();
        let url = format!("{}/api/auth/validate", origin.url);
        async move {
            send(
                proxy
                    .post(url)
                    .header("x-forwarded-for", client)
                    .bearer_auth(random_token()),
            )
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(via("198.51.100.7").await.status, 401);
    }
    assert_rate_limited(&via("198.51.100.7").await);
    // The proxy's other clients have their own buckets; so does the proxy itself.
    assert_eq!(via("198.51.100.8").await.status, 401);
    let r = validate(&proxy, &origin, &random_token()).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // One IPv6 client's /64 is one bucket.
    for host in ["2001:db8:7:7::1", "2001:db8:7:7::2", "2001:db8:7:7:ffff::3"] {
        assert_eq!(via(host).await.status, 401, "{host}");
    }
    assert_rate_limited(&via("2001:db8:7:7::4").await);
    assert_eq!(via("2001:db8:7:8::1").await.status, 401, "the next /64");

    // Not a trusted proxy: its x-forwarded-for is its own claim, ignored — every request
    // counts for the peer, whatever address it names.
    let untrusted = client_from("127.0.0.2");
    let claims = ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"];
    let mut answers = Vec::new();
    for claim in claims {
        answers.push(
            send(
                untrusted
                    .post(format!("{}/api/auth/validate", origin.url))
                    .header("x-forwarded-for", claim)
                    .bearer_auth(random_token()),
            )
            .await,
        );
    }
    assert!(answers[..3].iter().all(|r| r.status == 401));
    assert_rate_limited(&answers[3]);
}

/// 500 random bearer tokens against an origin in `mode` whose per-address limit is 50 a
/// minute: NoETL is asked about at most the limit's burst (50) plus what it refilled while
/// the flood lasted (one per 1.2 s) — the limit is the bound: distinct random tokens never
/// repeat, so no cache can help. From another address, one random
/// token asked 20 times costs one NoETL question (the negative cache). `asked` counts
/// NoETL's validate calls (REST) or playbook runs (playbook mode).
async fn random_tokens_are_bounded(mode: &str, asked: &str) {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default()
            .env("AUTH_MODE", mode)
            .env("AUTH_RATE_LIMIT", "50/1m"),
    )
    .await
    .unwrap();
    let attacker = client_from("127.0.0.2");
    standin.reset_calls().await;

    let floods = (0..500).map(|_| {
        let (c, origin) = (&attacker, &origin);
        async move { validate(c, origin, &random_token()).await }
    });
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    // 25 at a time: concurrent, without 500 sockets at once.
    let mut floods = futures::stream::iter(floods).buffer_unordered(25);
    while let Some(r) = floods.next().await {
        answers.push(r);
    }
    let bound = 50 + (started.elapsed().as_secs_f64() / 1.2).ceil() as usize;
    let refused = answers.iter().filter(|r| r.status == 429).count();
    let invalid = answers.iter().filter(|r| r.status == 401).count();
    assert_eq!(invalid + refused, 500, "{mode}: 401 or 429, nothing else");
    assert!(
        (50..=bound).contains(&invalid),
        "{mode}: {invalid} answered; the limit lets 50..={bound} through"
    );
    for r in answers.iter().filter(|r| r.status == 429) {
        assert_rate_limited(r);
    }
    let calls = standin.call_count(asked).await as usize;
    assert!(
        calls <= bound,
        "{mode}: {calls} NoETL calls for 500 random tokens, over the limit's {bound}"
    );

    let repeat = random_token();
    let other = client_from("127.0.0.3");
    let before = standin.call_count(asked).await;
    for _ in 0..20 {
        let r = validate(&other, &origin, &repeat).await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_session");
    }
    assert_eq!(
        standin.call_count(asked).await - before,
        1,
        "{mode}: a repeated invalid token is answered from the negative cache"
    );
    assert!(origin
        .metric("gateway_session_negative_hits_total")
        .await
        .is_some_and(|n| n >= 19));
}

#[tokio::test]
async fn random_bearer_tokens_cost_noetl_calls_within_the_limit_in_rest_mode() {
    random_tokens_are_bounded("rest", NOETL_VALIDATE).await;
}

#[tokio::test]
async fn random_bearer_tokens_cost_playbook_runs_within_the_limit_in_playbook_mode() {
    random_tokens_are_bounded("playbook", NOETL_EXECUTE).await;
}

#[tokio::test]
async fn with_no_rate_limit_auth_playbook_runs_are_bounded_by_the_concurrency_and_the_rest_told_auth_busy(
) {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default()
            .env("AUTH_MODE", "playbook")
            .env("AUTH_PLAYBOOK_CONCURRENCY", "4")
            .env("NOETL_TIMEOUT", "20s"),
    )
    .await
    .unwrap();
    // Each run holds its slot at least 4 s (NoETL answers execute after 4 s), while a
    // run waits at most 1 s for a slot: 500 requests sent within those 4 s start 4 runs.
    standin.set_faults(Some(4_000), None).await;
    standin.reset_calls().await;
    let c = client_from("127.0.0.2");
    let floods = (0..500).map(|_| {
        let (c, origin) = (&c, &origin);
        async move { validate(c, origin, &random_token()).await }
    });
    let started = std::time::Instant::now();
    let answers = futures::future::join_all(floods).await;
    standin.set_faults(None, None).await;
    let busy: Vec<&Reply> = answers.iter().filter(|r| r.status == 503).collect();
    let invalid = answers.iter().filter(|r| r.status == 401).count();
    assert_eq!(
        (invalid, busy.len()),
        (4, 496),
        "4 runs answer, the rest are refused ({:?})",
        started.elapsed()
    );
    for r in busy {
        assert_eq!(r.body["error"]["code"], "auth_busy", "{}", r.body);
        assert_eq!(
            r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
    }
    assert_eq!(standin.call_count(NOETL_EXECUTE).await, 4, "4 runs started");
    assert_eq!(origin.metric("gateway_auth_busy_total").await, Some(496));
}

/// `n` concurrent validations of one unknown token while NoETL takes 1 s to answer: one
/// NoETL question (`asked`), every caller gets its answer.
async fn one_question_for_concurrent_validations(mode: &str, asked: &str) {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(&standin, OriginOptions::default().env("AUTH_MODE", mode))
        .await
        .unwrap();
    let c = client_from("127.0.0.2");
    let token = random_token();
    standin.set_faults(Some(1_000), None).await;
    standin.reset_calls().await;
    let n = 24;
    let answers = futures::future::join_all((0..n).map(|_| validate(&c, &origin, &token))).await;
    standin.set_faults(None, None).await;
    assert!(
        answers.iter().all(|r| r.status == 401),
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(
        standin.call_count(asked).await,
        1,
        "{mode}: {n} concurrent validations, one NoETL question"
    );
    assert!(origin
        .metric("gateway_session_validations_coalesced_total")
        .await
        .is_some_and(|j| j >= 1));

    // A real session too: a freshly created one, validated by many at once.
    let id_token = standin.dev_token("many@example.com").await;
    let session = login(&c, &origin, &id_token).await.body["session_token"]
        .as_str()
        .expect("a session token")
        .to_owned();
    let answers = futures::future::join_all((0..n).map(|_| validate(&c, &origin, &session))).await;
    assert!(
        answers.iter().all(|r| r.status == 200),
        "a new session is valid at once"
    );
}

#[tokio::test]
async fn concurrent_validations_of_one_token_are_one_playbook_run() {
    one_question_for_concurrent_validations("playbook", NOETL_EXECUTE).await;
}

#[tokio::test]
async fn concurrent_validations_of_one_token_are_one_rest_call() {
    one_question_for_concurrent_validations("rest", NOETL_VALIDATE).await;
}

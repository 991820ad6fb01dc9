//! A browser's own EventSource, lossless (issue 13 item 5), at the origin over real HTTP
//! and a real nats-server.
//!
//! EventSource reconnects by itself to the *same URL* and sends the last frame's `id:` as
//! `Last-Event-ID` — nothing else. These tests reconnect exactly that way
//! (`SseClient::resume` with the URL unchanged and the id as the stream wrote it) and hold
//! the gateway to it: a stream opened without `client_id` comes back as the same client and
//! gets what was produced while it was away, once; a client id chosen by the page is bound
//! to its first user and refused to everyone else; a `Last-Event-ID` naming someone else's
//! client (or nothing) never yields their frames; page-chosen ids count against
//! `USER_MAX_CLIENTS`; and a passing failure is a stream that says retry, not an error
//! status (on which EventSource would give up). The same through the edge in Chromium is
//! `tests/tests/browser.rs`.

use std::time::Duration;

use gateway_tests::harness::flows::{
    client_id_of, execute_playbook, http, login, nats_stack, nats_stack_with,
};
use gateway_tests::harness::origin::{Origin, INTERNAL_TOKEN};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::StandInOptions;
use gateway_tests::harness::wait_for;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// Opens `url` as EventSource does: `Last-Event-ID` exactly as the stream last wrote it.
async fn native(url: &str, token: &str, last_event_id: Option<&str>) -> (SseClient, SseFrame) {
    let mut sse = SseClient::resume(url, Some(token), last_event_id)
        .await
        .unwrap_or_else(|e| panic!("{url} unreachable: {e}"))
        .unwrap_or_else(|(s, b)| panic!("{url} refused: {s} {b}"));
    let init = sse
        .next(WAIT)
        .await
        .unwrap_or_else(|| panic!("no init frame from {url}"));
    assert_eq!(
        init.event, "message",
        "the init frame comes first: {init:?}"
    );
    (sse, init)
}

/// `GET {url}` with `Last-Event-ID`: the status and the JSON error body (null for 200).
async fn refused(url: &str, token: &str, last_event_id: Option<&str>) -> (u16, Value) {
    match SseClient::resume(url, Some(token), last_event_id)
        .await
        .unwrap_or_else(|e| panic!("{url} unreachable: {e}"))
    {
        Ok(_) => (200, Value::Null),
        Err(refusal) => refusal,
    }
}

/// Starts `demo/slow` for a minute (the stand-in will not call back during the test) for
/// `client`: its request and execution ids.
async fn slow_run(origin: &Origin, token: &str, client: &str) -> (String, String) {
    let v = execute_playbook(
        &origin.url,
        token,
        "demo/slow",
        json!({"seconds": 60}),
        Some(client),
    )
    .await;
    let ex = &v["data"]["executePlaybook"];
    let id = |k: &str| {
        ex[k]
            .as_str()
            .unwrap_or_else(|| panic!("no {k}: {v}"))
            .to_owned()
    };
    (id("requestId"), id("executionId"))
}

/// NoETL's result callback for a run, by hand (service token): the status and the answer
/// (`delivered` when the client has a stream somewhere, `queued` when it has none).
async fn call_back(origin: &Origin, request_id: &str, execution_id: &str, data: Value) -> u16 {
    let r = http()
        .post(format!(
            "{}/api/internal/callback/async",
            origin.internal_url
        ))
        .bearer_auth(INTERNAL_TOKEN)
        .json(&json!({
            "request_id": request_id, "execution_id": execution_id,
            "status": "success", "data": data,
        }))
        .send()
        .await
        .expect("the internal listener answers");
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert!(
        (status == 200 || status == 202) && body["status"] != "duplicate",
        "the callback was not taken: {status} {body}"
    );
    status
}

fn result_for<'a>(frames: &'a [SseFrame], request_id: &str) -> Vec<&'a SseFrame> {
    frames
        .iter()
        .filter(|f| f.event == "playbook/result" && f.data["params"]["requestId"] == request_id)
        .collect()
}

/// Reads until the result of `request_id` arrived; every frame read.
async fn until_result(sse: &mut SseClient, request_id: &str) -> Vec<SseFrame> {
    let frames = sse
        .collect_until(WAIT, |fs| !result_for(fs, request_id).is_empty())
        .await;
    assert!(
        !result_for(&frames, request_id).is_empty(),
        "no result for {request_id}: {frames:?}"
    );
    frames
}

/// Runs `demo/echo` for `client` and reads until its result: everything the stream had to
/// replay comes before it (replayed frames precede live ones), so what was read is all
/// the stream would ever have replayed.
async fn through_a_marker(
    origin: &Origin,
    token: &str,
    sse: &mut SseClient,
    client: &str,
) -> Vec<SseFrame> {
    let v = execute_playbook(
        &origin.url,
        token,
        "demo/echo",
        json!({"marker": true}),
        Some(client),
    )
    .await;
    let request_id = v["data"]["executePlaybook"]["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("the marker run did not start: {v}"))
        .to_owned();
    until_result(sse, &request_id).await
}

/// Waits until `origin` holds no stream, so what is produced next is produced while the
/// client is away.
async fn away(origin: &Origin) {
    wait_for("the client's stream is closed", WAIT, || async {
        origin.sse_connections().await == Some(0)
    })
    .await;
}

#[tokio::test]
async fn a_reconnect_with_only_last_event_id_resumes_the_client_and_replays_what_it_missed_once() {
    let (_nats, standin, origins) = nats_stack(1).await;
    let origin = &origins[0];
    let token = login(&origin.url, &standin, "native@example.com").await;
    // `new EventSource(url)`: no client_id, the server assigns one.
    let url = format!("{}/events", origin.url);
    let (mut sse, init) = native(&url, &token, None).await;
    let client = client_id_of(&init);
    assert_eq!(
        init.event_id.as_deref(),
        Some(format!("{client}.0").as_str()),
        "the init frame names the client and that nothing was seen yet"
    );
    assert_eq!(init.retry, Some(2000));
    // Something live first, so the browser holds a real frame id.
    let seen = through_a_marker(origin, &token, &mut sse, &client).await;
    let last = sse.last_event_id.clone().expect("frames carry ids");
    assert!(
        last.starts_with(&format!("{client}.")) && !last.ends_with(".0"),
        "{last}"
    );
    let seen_up_to = sse.last_id.unwrap();
    sse.close();
    away(origin).await;

    // While it is away: a result (NoETL's callback) for it.
    let (request_id, execution_id) = slow_run(origin, &token, &client).await;
    let answered = call_back(origin, &request_id, &execution_id, json!({"while": "away"})).await;
    eprintln!("the result was {answered} while the client was away");

    // The browser's own retry: the same URL, Last-Event-ID as last seen.
    let (mut sse, init) = native(&url, &token, Some(&last)).await;
    assert_eq!(
        client_id_of(&init),
        client,
        "the same client, not a new one"
    );
    assert_eq!(
        init.event_id.as_deref(),
        Some(last.as_str()),
        "it starts where it was"
    );
    let frames = through_a_marker(origin, &token, &mut sse, &client).await;
    assert!(
        frames.iter().all(|f| f.event != "stream/reset"),
        "an exact resume: {frames:?}"
    );
    let missed = result_for(&frames, &request_id);
    assert_eq!(missed.len(), 1, "the missed result, once: {frames:?}");
    assert_eq!(missed[0].data["params"]["data"], json!({"while": "away"}));
    assert!(
        frames.iter().filter_map(|f| f.id).all(|id| id > seen_up_to),
        "nothing seen before is replayed: {frames:?}"
    );
    for f in &seen {
        if f.event == "playbook/result" {
            assert!(
                result_for(&frames, f.data["params"]["requestId"].as_str().unwrap()).is_empty(),
                "a result delivered before is not delivered again: {frames:?}"
            );
        }
    }

    // And again: what was delivered on the resumed stream is not replayed either.
    let last = sse.last_event_id.clone().unwrap();
    sse.close();
    away(origin).await;
    let (mut sse, init) = native(&url, &token, Some(&last)).await;
    assert_eq!(client_id_of(&init), client);
    let frames = through_a_marker(origin, &token, &mut sse, &client).await;
    assert!(
        result_for(&frames, &request_id).is_empty(),
        "the missed result came exactly once: {frames:?}"
    );
    assert_eq!(
        frames
            .iter()
            .filter(|f| f.event == "playbook/result")
            .count(),
        1,
        "only the new marker's result: {frames:?}"
    );
}

#[tokio::test]
async fn a_page_chosen_client_id_is_bound_to_its_first_user_and_resumed_natively() {
    let (_nats, standin, origins) = nats_stack(1).await;
    let origin = &origins[0];
    let alice = login(&origin.url, &standin, "chooser@example.com").await;
    let mallory = login(&origin.url, &standin, "squatter@example.com").await;
    let chosen = uuid::Uuid::new_v4().to_string();
    // `/events?client_id=…` with an id the page made up: bound to alice on first use.
    let url = format!("{}/events?client_id={chosen}", origin.url);
    let (mut sse, init) = native(&url, &alice, None).await;
    assert_eq!(client_id_of(&init), chosen);
    assert_eq!(
        init.event_id.as_deref(),
        Some(format!("{chosen}.0").as_str())
    );
    // It is alice's for every purpose: a run names it and delivers to it.
    through_a_marker(origin, &alice, &mut sse, &chosen).await;
    let last = sse.last_event_id.clone().unwrap();
    // Anyone else is refused it, by name or by Last-Event-ID beside it.
    let (status, body) = refused(&url, &mallory, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("client_not_yours")),
        "{body}"
    );
    let (status, body) = refused(&url, &mallory, Some(&last)).await;
    assert_eq!(status, 403, "{body}");
    let v = execute_playbook(&origin.url, &mallory, "demo/echo", json!({}), Some(&chosen)).await;
    assert_eq!(v["errors"][0]["extensions"]["code"], "FORBIDDEN", "{v}");
    sse.close();
    away(origin).await;

    // Missed while away, resumed by the browser's own retry of the same URL.
    let (request_id, execution_id) = slow_run(origin, &alice, &chosen).await;
    call_back(origin, &request_id, &execution_id, json!({"chosen": true})).await;
    let (mut sse, init) = native(&url, &alice, Some(&last)).await;
    assert_eq!(client_id_of(&init), chosen);
    let frames = through_a_marker(origin, &alice, &mut sse, &chosen).await;
    assert_eq!(
        result_for(&frames, &request_id).len(),
        1,
        "once: {frames:?}"
    );
    assert!(frames.iter().all(|f| f.event != "stream/reset"));
    // An id that is not well-formed is refused as before.
    let (status, body) = refused(
        &format!("{}/events?client_id=not.an.id", origin.url),
        &alice,
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_client_id"))
    );
}

#[tokio::test]
async fn a_forged_last_event_id_never_yields_another_users_frames() {
    let (_nats, standin, origins) = nats_stack(1).await;
    let origin = &origins[0];
    let alice = login(&origin.url, &standin, "victim@example.com").await;
    let mallory = login(&origin.url, &standin, "forger@example.com").await;
    let url = format!("{}/events", origin.url);
    let (mut sse, init) = native(&url, &alice, None).await;
    let alices = client_id_of(&init);
    // Alice's stream holds a result, retained on the bus.
    let secret = through_a_marker(origin, &alice, &mut sse, &alices).await;
    let alices_last = sse.last_event_id.clone().unwrap();
    let alices_request = secret
        .iter()
        .rev()
        .find(|f| f.event == "playbook/result")
        .and_then(|f| f.data["params"]["requestId"].as_str())
        .expect("the marker's result")
        .to_owned();
    sse.close();

    let forgeries = [
        format!("{alices}.0"),
        format!("{alices}.1"),
        alices_last.clone(),
        format!("{alices}.{}", u64::MAX),
        format!("{}.3", uuid::Uuid::new_v4()),
        "17".to_owned(),
    ];
    for forged in &forgeries {
        let (mut sse, init) = native(&url, &mallory, Some(forged)).await;
        let given = client_id_of(&init);
        assert_ne!(given, alices, "{forged}: never alice's client");
        let first = sse.next(WAIT).await.expect("a frame after init");
        assert_eq!(
            first.event, "stream/reset",
            "{forged}: a position that cannot be resumed is said so: {first:?}"
        );
        let frames = through_a_marker(origin, &mallory, &mut sse, &given).await;
        assert!(
            result_for(&frames, &alices_request).is_empty()
                && frames
                    .iter()
                    .all(|f| !f.event_id.as_deref().unwrap_or("").starts_with(&alices)),
            "{forged}: alice's frames reached mallory: {frames:?}"
        );
        sse.close();
    }
    // Junk is no position at all: a new client, nothing to reset.
    let (mut sse, init) = native(&url, &mallory, Some("../../etc")).await;
    assert_ne!(client_id_of(&init), alices);
    let frames = through_a_marker(origin, &mallory, &mut sse, &client_id_of(&init)).await;
    assert!(frames.iter().all(|f| f.event != "stream/reset"));
    // Naming it outright is refused, Last-Event-ID or not.
    let named = format!("{url}?client_id={alices}");
    let (status, body) = refused(&named, &mallory, Some(&alices_last)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("client_not_yours"))
    );
    // Alice still resumes her own.
    let (mut sse, init) = native(&url, &alice, Some(&alices_last)).await;
    assert_eq!(client_id_of(&init), alices);
    let frames = through_a_marker(origin, &alice, &mut sse, &alices).await;
    assert!(frames.iter().all(|f| f.event != "stream/reset"));
}

#[tokio::test]
async fn page_chosen_client_ids_count_against_the_users_client_cap() {
    let (_nats, standin, origins) = nats_stack_with(
        1,
        StandInOptions::default(),
        &[
            ("USER_MAX_CLIENTS", "2"),
            ("USER_MAX_STREAMS", "0"),
            ("STREAM_OPEN_RATE_LIMIT", "off"),
        ],
    )
    .await;
    let origin = &origins[0];
    let alice = login(&origin.url, &standin, "tabs-chosen@example.com").await;
    let bob = login(&origin.url, &standin, "bob-chosen@example.com").await;
    let at = |id: &str| format!("{}/events?client_id={id}", origin.url);
    let (one, two, three) = ("tab-one-4b1c2e3f", "tab-two-4b1c2e3f", "tab-three-4b1c2e3f");
    let (_s1, _) = native(&at(one), &alice, None).await;
    let (s2, _) = native(&at(two), &alice, None).await;
    // Both connected: a third id is refused, and stays free.
    let (status, body) = refused(&at(three), &alice, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_clients")),
        "{body}"
    );
    let (_b3, init) = native(&at(three), &bob, None).await;
    assert_eq!(client_id_of(&init), three, "the refused id was not bound");
    // Server-assigned and page-chosen ids share the cap.
    let (status, body) = refused(&format!("{}/events", origin.url), &alice, None).await;
    assert_eq!(status, 429, "{body}");
    // A tab closes: the next new id retires it — still alice's, refused to bob.
    s2.close();
    away_from(origin, 2).await;
    let (_s4, _) = native(&at("tab-four-4b1c2e3f"), &alice, None).await;
    let (status, body) = refused(&at(two), &bob, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("client_not_yours")),
        "a retired id is not free: {body}"
    );
}

/// Waits until `origin` holds `n` streams.
async fn away_from(origin: &Origin, n: u64) {
    wait_for("a stream closed", WAIT, || async {
        origin.sse_connections().await == Some(n)
    })
    .await;
}

#[tokio::test]
async fn of_two_users_racing_for_one_new_client_id_exactly_one_gets_it() {
    let (_nats, standin, origins) = nats_stack(1).await;
    let origin = &origins[0];
    let alice = login(&origin.url, &standin, "racer-a@example.com").await;
    let bob = login(&origin.url, &standin, "racer-b@example.com").await;
    for round in 0..8 {
        let url = format!(
            "{}/events?client_id=race-{round}-{}",
            origin.url,
            uuid::Uuid::new_v4()
        );
        let (a, b) = tokio::join!(refused(&url, &alice, None), refused(&url, &bob, None));
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 403], "round {round}: {a:?} {b:?}");
    }
}

#[tokio::test]
async fn a_passing_failure_is_a_stream_that_says_retry_not_an_error_status() {
    let (mut nats, standin, origins) = nats_stack(1).await;
    let origin = &origins[0];
    let token = login(&origin.url, &standin, "patient@example.com").await;
    let url = format!("{}/events", origin.url);
    nats.stop();
    // Without NATS whether the session was logged out cannot be told (503 inside): the
    // answer is a 200 stream with `retry:` and one `stream/unavailable` frame, then its end.
    let deadline = std::time::Instant::now() + WAIT;
    let body = loop {
        let r = http()
            .get(&url)
            .bearer_auth(&token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("the origin answers");
        assert_eq!(
            r.status(),
            200,
            "never an error status EventSource gives up on"
        );
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        // Until the origin has noticed NATS is gone, this may be a real (endless) stream.
        if let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(2), r.text()).await {
            if text.contains("stream/unavailable") {
                break text;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/events never said stream/unavailable within {WAIT:?}"
        );
    };
    assert!(body.starts_with("retry: 2000\n"), "{body:?}");
    let frames: Vec<SseFrame> = body
        .split("\n\n")
        .filter_map(gateway_tests::harness::sse::parse_frame)
        .collect();
    assert_eq!(frames.len(), 1, "one frame, then the end: {body:?}");
    assert_eq!(frames[0].event, "stream/unavailable");
    assert!(
        frames[0].event_id.is_none(),
        "the browser keeps its Last-Event-ID"
    );
    assert!(frames[0].data["params"]["code"].is_string(), "{body}");

    nats.start_again().await.expect("nats-server starts again");
    wait_for("the stream opens again", WAIT, || async {
        match SseClient::resume(&url, Some(&token), None).await {
            Ok(Ok(mut sse)) => sse.next(WAIT).await.is_some_and(|f| f.event == "message"),
            _ => false,
        }
    })
    .await;
}

/// A resume on `origin` by what it read (`gateway_bus_resumes_total{reads}`), 0 before any.
async fn resumes(origin: &Origin, reads: &str) -> u64 {
    origin.bus_resumes(reads).await.unwrap_or(0)
}

#[tokio::test]
async fn a_client_that_read_only_its_init_frame_resumes_elsewhere_without_a_read_unless_something_came(
) {
    let (_nats, standin, origins) = nats_stack(2).await;
    let (a, b) = (&origins[0], &origins[1]);
    let token = login(&a.url, &standin, "since@example.com").await;
    // Two clients open on A and read nothing but their init frames.
    let (quiet, quiet_id) = {
        let (sse, init) = native(&format!("{}/events", a.url), &token, None).await;
        (sse, client_id_of(&init))
    };
    let (busy, busy_id) = {
        let (sse, init) = native(&format!("{}/events", a.url), &token, None).await;
        (sse, client_id_of(&init))
    };
    quiet.close();
    busy.close();
    away(a).await;
    // While they are away, a result for one of them.
    let (request_id, execution_id) = slow_run(a, &token, &busy_id).await;
    call_back(a, &request_id, &execution_id, json!({"while": "away"})).await;
    // B's router has been delivered everything up to here once a later frame reached a
    // stream on B.
    let (mut third, init) = native(&format!("{}/events", b.url), &token, None).await;
    let third_id = client_id_of(&init);
    through_a_marker(b, &token, &mut third, &third_id).await;
    let (none_before, stream_before) = (resumes(b, "none").await, resumes(b, "stream").await);

    // EventSource's own retry, on B: `Last-Event-ID` is the init frame's `<id>.0`.
    let url = format!("{}/events", b.url);
    let (mut sse, init) = native(&url, &token, Some(&format!("{quiet_id}.0"))).await;
    assert_eq!(client_id_of(&init), quiet_id, "the same client");
    assert_eq!(
        resumes(b, "none").await,
        none_before + 1,
        "nothing came for it: B resumed it without reading the stream"
    );
    assert_eq!(resumes(b, "stream").await, stream_before);
    let frames = through_a_marker(b, &token, &mut sse, &quiet_id).await;
    assert!(
        frames.iter().all(|f| f.event != "stream/reset"),
        "no reset, and what comes next is delivered: {frames:?}"
    );
    sse.close();

    let (mut sse, init) = native(&url, &token, Some(&format!("{busy_id}.0"))).await;
    assert_eq!(client_id_of(&init), busy_id);
    assert_eq!(
        resumes(b, "stream").await,
        stream_before + 1,
        "a frame came for it: B read the stream"
    );
    let frames = until_result(&mut sse, &request_id).await;
    let missed = result_for(&frames, &request_id);
    assert_eq!(missed.len(), 1, "the missed result, once: {frames:?}");
    assert_eq!(missed[0].data["params"]["data"], json!({"while": "away"}));
    assert!(
        frames.iter().all(|f| f.event != "stream/reset"),
        "{frames:?}"
    );
}

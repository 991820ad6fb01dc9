//! `/events` behaviour that only shows end to end: `stream/reset` when a resume point is
//! older than what is retained, a newer connection superseding an older one, the hyper
//! SSE path (`SSE_LEAN_HTTP=false`) next to the lean one, and SIGTERM with streams open.

use std::time::{Duration, Instant};

use futures::StreamExt;
use gateway_tests::harness::flows::{http, login, nats_stack, open_events_client, pending_request};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

/// Opens `/events{query}`; the client and its client id (from the init frame).
async fn open(origin: &Origin, token: &str, query: &str, last: Option<u64>) -> (SseClient, String) {
    open_events_client(&format!("{}/events{query}", origin.url), token, last, WAIT).await
}

/// Posts one `playbook/progress` callback for `request_id` with step `step`.
async fn progress(origin: &Origin, request_id: &str, step: &str) {
    let r = http()
        .post(format!("{}/api/internal/progress", origin.internal_url))
        .bearer_auth(INTERNAL_TOKEN)
        .json(&json!({"request_id": request_id, "step": step, "progress": 0.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "progress callback refused");
}

fn steps(frames: &[SseFrame]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.event == "playbook/progress")
        .map(|f| f.data["params"]["step"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test]
async fn a_resume_point_older_than_retention_gets_stream_reset_then_what_is_retained() {
    // No events from the stand-in: the progress frames below are all the client gets.
    let nats = NatsServer::start().await.unwrap();
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = &Origin::start(
        &standin,
        OriginOptions::with_nats(&nats.url).env("FRAME_RETENTION_PER_CLIENT", "3"),
    )
    .await
    .unwrap();
    let token = login(&origin.url, &standin, "reset@example.com").await;
    let (mut sse, client_id) = open(origin, &token, "", None).await;
    let request_id = pending_request(&origin.url, &token, &client_id, 60).await;
    progress(origin, &request_id, "p0").await;
    let first = sse.collect_until(WAIT, |fs| !steps(fs).is_empty()).await;
    assert_eq!(steps(&first), ["p0"]);
    let resume_from = sse.last_id.expect("progress frames carry ids");
    sse.close();

    // Five more while away: retention keeps the last three, so p1 is gone.
    for i in 1..=5 {
        progress(origin, &request_id, &format!("p{i}")).await;
    }
    let (mut sse, again) = open(
        origin,
        &token,
        &format!("?client_id={client_id}"),
        Some(resume_from),
    )
    .await;
    assert_eq!(again, client_id);
    let frames = sse
        .collect_until(WAIT, |fs| steps(fs).last().is_some_and(|s| s == "p5"))
        .await;
    assert_eq!(
        frames.first().map(|f| f.event.as_str()),
        Some("stream/reset"),
        "the gap is announced before any frame: {frames:?}"
    );
    assert_eq!(frames[0].data["method"], "stream/reset");
    assert_eq!(steps(&frames), ["p3", "p4", "p5"], "then what is retained");

    // A resume point that is still retained gets no reset.
    let at_p4 = frames
        .iter()
        .find(|f| f.data["params"]["step"] == "p4")
        .and_then(|f| f.id);
    let (mut sse, _) = open(origin, &token, &format!("?client_id={client_id}"), at_p4).await;
    let frames = sse.collect_until(WAIT, |fs| !steps(fs).is_empty()).await;
    assert!(
        frames.iter().all(|f| f.event != "stream/reset"),
        "{frames:?}"
    );
    assert_eq!(steps(&frames), ["p5"]);
}

#[tokio::test]
async fn a_second_connection_for_a_client_supersedes_the_first() {
    let (_nats, standin, origins) = nats_stack(1).await;
    let origin = &origins[0];
    let token = login(&origin.url, &standin, "supersede@example.com").await;
    let (mut older, client_id) = open(origin, &token, "", None).await;
    let request_id = pending_request(&origin.url, &token, &client_id, 60).await;
    let (mut newer, again) = open(origin, &token, &format!("?client_id={client_id}"), None).await;
    assert_eq!(again, client_id);

    // The older stream ends (not a timeout: well within it).
    let started = Instant::now();
    let rest = older.collect_until(WAIT, |_| false).await;
    assert!(
        started.elapsed() < WAIT - Duration::from_secs(5),
        "the older stream was not ended: {rest:?}"
    );
    assert!(steps(&rest).is_empty(), "{rest:?}");
    assert_eq!(origin.sse_connections().await, Some(1));

    // Frames go to the newer one.
    progress(origin, &request_id, "after").await;
    let frames = newer.collect_until(WAIT, |fs| !steps(fs).is_empty()).await;
    assert_eq!(steps(&frames), ["after"]);
}

/// Opens a stream on `origin` and shows a progress frame arrives on it; the response.
async fn stream_works(origin: &Origin, standin: &StandIn) -> SseClient {
    let token = login(&origin.url, standin, "path@example.com").await;
    let (mut sse, client_id) = open(origin, &token, "", None).await;
    assert_eq!(
        sse.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let request_id = pending_request(&origin.url, &token, &client_id, 60).await;
    progress(origin, &request_id, "s").await;
    let frames = sse.collect_until(WAIT, |fs| !steps(fs).is_empty()).await;
    assert_eq!(steps(&frames), ["s"]);
    sse
}

#[tokio::test]
async fn the_hyper_sse_path_serves_the_same_stream_as_the_lean_one() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let lean = Origin::start(&standin, OriginOptions::default())
        .await
        .unwrap();
    let hyper = Origin::start(
        &standin,
        OriginOptions::default().env("SSE_LEAN_HTTP", "false"),
    )
    .await
    .unwrap();
    // The lean path writes its own response head (no `date`); hyper adds one.
    let sse = stream_works(&lean, &standin).await;
    assert!(sse.headers.get("date").is_none(), "{:?}", sse.headers);
    let sse = stream_works(&hyper, &standin).await;
    assert!(
        sse.headers.get("date").is_some(),
        "SSE_LEAN_HTTP=false still served by the lean path: {:?}",
        sse.headers
    );
}

#[tokio::test]
async fn sigterm_ends_open_streams_cleanly_and_exits_within_the_grace() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let mut origin = Origin::start(&standin, OriginOptions::default())
        .await
        .unwrap();
    let token = login(&origin.url, &standin, "sigterm@example.com").await;
    // Two streams read raw, to tell a clean end of the body from a cut connection.
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let r = http()
            .get(format!("{}/events", origin.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let init = body.next().await.expect("an init frame").unwrap();
        assert!(String::from_utf8_lossy(&init).contains("clientId"));
        bodies.push(body);
    }
    let started = Instant::now();
    origin.guard().signal("TERM");
    for mut body in bodies {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), body.next()).await {
                Ok(Some(Ok(_))) => {}
                Ok(None) => break,
                Ok(Some(Err(e))) => panic!("the stream was cut, not ended: {e}"),
                Err(_) => panic!("the stream still open 5 s after SIGTERM"),
            }
        }
    }
    // SHUTDOWN_GRACE is 2 s in the harness: streams do not hold the process past it.
    let status = origin
        .guard()
        .stop(Duration::from_secs(5))
        .expect("the origin exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?} with streams open",
        started.elapsed()
    );
}

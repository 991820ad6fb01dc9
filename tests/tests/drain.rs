//! A rolling restart as Kubernetes does it, end to end: SIGTERM to one of two replicas
//! with 200 event streams open on it while frames keep coming. What must show (the
//! shutdown order in `origin/src/server.rs`):
//! - `/ready` answers 503 `draining` first, while new connections are still answered
//!   (with `connection: close`) for the whole drain delay;
//! - then the listeners close and the streams end spread over the grace period, each with
//!   a `retry:` hint of its own, not in one instant;
//! - every client resumes on the other replica with its `Last-Event-ID` and receives every
//!   frame exactly once, in order; the drained replica exits 0 within its grace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use gateway_tests::harness::flows::{http, login, nats_stack_with, open_events, pending_request};
use gateway_tests::harness::origin::INTERNAL_TOKEN;
use gateway_tests::harness::sse::SseClient;
use gateway_tests::harness::standin::StandInOptions;
use gateway_tests::harness::wait_for;
use serde_json::{json, Value};
use tokio::sync::Mutex;

const USERS: usize = 50;
const CLIENTS_PER_USER: usize = 4;
const STREAMS: usize = USERS * CLIENTS_PER_USER;
const DRAIN_DELAY: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(6);
/// Progress frames per client: a round at most this often, from before SIGTERM until the
/// drained replica has exited.
const ROUND_EVERY: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(30);

/// What one client saw: its progress steps in arrival order, when its stream on the
/// drained replica ended, and the `retry:` it was told.
#[derive(Default, Debug)]
struct Seen {
    steps: Vec<usize>,
    ended_at: Option<Instant>,
    retry: Option<u64>,
    resumed: bool,
}

fn progress_step(f: &gateway_tests::harness::sse::SseFrame) -> Option<usize> {
    (f.event == "playbook/progress")
        .then(|| f.data["params"]["step"].as_str()?.parse().ok())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_200_streams_drains_spread_out_and_every_client_resumes_on_the_other_replica()
{
    let delay = format!("{}s", DRAIN_DELAY.as_secs());
    let grace = format!("{}s", GRACE.as_secs());
    let (_nats, standin, mut origins) = nats_stack_with(
        2,
        StandInOptions::default(),
        &[
            ("DRAIN_DELAY", &delay),
            ("SHUTDOWN_GRACE", &grace),
            ("LOG_FORMAT", "json"),
        ],
    )
    .await;
    let b = origins.pop().expect("two origins");
    let mut a = origins.pop().expect("two origins");

    // 50 users with 4 tabs each, every stream on A; one long run per client, executed on B.
    let tokens = join_all((0..USERS).map(|u| {
        let (url, standin) = (a.url.clone(), &standin);
        async move { login(&url, standin, &format!("drain{u}@example.com")).await }
    }))
    .await;
    let mut streams = Vec::with_capacity(STREAMS);
    for token in &tokens {
        for _ in 0..CLIENTS_PER_USER {
            let (sse, init) = open_events(&format!("{}/events", a.url), token, None, WAIT).await;
            let client_id = gateway_tests::harness::flows::client_id_of(&init);
            streams.push((token.clone(), client_id, sse));
        }
    }
    let requests: Vec<String> = join_all(
        streams
            .iter()
            .map(|(token, client_id, _)| pending_request(&b.url, token, client_id, 120)),
    )
    .await;

    // Frames keep coming, a round (one progress step per client, through B's internal
    // listener) at least every ROUND_EVERY, before, during and after the drain, until
    // `stop`; `rounds` counts the rounds sent in full, `finished` says the last is sent.
    let rounds = Arc::new(AtomicUsize::new(0));
    let (stop, finished) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let publisher = {
        let (internal_b, rounds, stop, finished) = (
            b.internal_url.clone(),
            rounds.clone(),
            stop.clone(),
            finished.clone(),
        );
        let client = http();
        tokio::spawn(async move {
            for round in 0.. {
                let started = Instant::now();
                join_all(requests.iter().map(|request_id| {
                    let url = format!("{internal_b}/api/internal/progress");
                    let client = client.clone();
                    async move {
                        let r = client
                            .post(url)
                            .bearer_auth(INTERNAL_TOKEN)
                            .json(&json!({"request_id": request_id, "step": round.to_string(), "progress": 0.5}))
                            .send()
                            .await
                            .expect("B's internal listener answers");
                        assert_eq!(r.status(), 200, "progress callback refused");
                    }
                }))
                .await;
                rounds.store(round + 1, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    finished.store(true, Ordering::SeqCst);
                    break;
                }
                tokio::time::sleep(ROUND_EVERY.saturating_sub(started.elapsed())).await;
            }
        })
    };

    // Each client reads until its stream on A ends, then resumes on B as EventSource
    // would (same client id, Last-Event-ID), and reads until it has the last round.
    let seen: Vec<Arc<Mutex<Seen>>> = (0..STREAMS).map(|_| Arc::default()).collect();
    let resume_client = reqwest::Client::new();
    let mut readers = Vec::with_capacity(STREAMS);
    for ((token, client_id, mut sse), seen) in streams.into_iter().zip(seen.iter().cloned()) {
        let (b_url, rounds, finished) = (b.url.clone(), rounds.clone(), finished.clone());
        let resume_client = resume_client.clone();
        readers.push(tokio::spawn(async move {
            while let Some(f) = sse.next(WAIT).await {
                let mut s = seen.lock().await;
                if let Some(step) = progress_step(&f) {
                    s.steps.push(step);
                }
                if f.retry.is_some() && f.event == "message" {
                    s.retry = f.retry;
                }
            }
            seen.lock().await.ended_at = Some(Instant::now());
            let last = sse.last_event_id.clone();
            let mut resumed = SseClient::resume_with(
                &resume_client,
                &format!("{b_url}/events?client_id={client_id}"),
                Some(&token),
                last.as_deref(),
            )
            .await
            .expect("B reachable")
            .unwrap_or_else(|(s, b)| panic!("B refused the resume: {s} {b}"));
            seen.lock().await.resumed = true;
            // Until the publisher has finished and its last round is here (or nothing
            // came for WAIT: the final check reports what is missing).
            let mut quiet_since = Instant::now();
            loop {
                let have_last = seen.lock().await.steps.last().map(|s| s + 1)
                    == Some(rounds.load(Ordering::SeqCst));
                if finished.load(Ordering::SeqCst) && have_last || quiet_since.elapsed() > WAIT {
                    break;
                }
                if let Some(f) = resumed.next(Duration::from_millis(500)).await {
                    assert_ne!(
                        f.event, "stream/reset",
                        "{client_id}: the resume lost frames"
                    );
                    if let Some(step) = progress_step(&f) {
                        seen.lock().await.steps.push(step);
                        quiet_since = Instant::now();
                    }
                }
            }
        }));
    }
    wait_for("two rounds reach every client on A", WAIT, || {
        let seen = seen.clone();
        async move {
            for s in &seen {
                if s.lock().await.steps.len() < 2 {
                    return false;
                }
            }
            true
        }
    })
    .await;

    // SIGTERM: readiness fails at once, nothing else does.
    let sigterm = Instant::now();
    let sigterm_wall = chrono::Utc::now();
    a.guard().signal("TERM");
    let ready_url = format!("{}/ready", a.internal_url);
    let mut ready_failed_at = None;
    while sigterm.elapsed() < DRAIN_DELAY {
        let r = http()
            .get(&ready_url)
            .send()
            .await
            .expect("A answers /ready");
        if r.status() == 503 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["status"], "draining", "{body}");
            ready_failed_at = Some(sigterm.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_failed_at = ready_failed_at.expect("/ready did not fail during the drain delay");
    assert!(
        ready_failed_at < Duration::from_secs(1),
        "/ready took {ready_failed_at:?} to fail"
    );
    // New connections are still answered during the delay, telling the client to go.
    let fresh = reqwest::Client::builder().build().unwrap();
    let r = fresh
        .get(format!("{}/health", a.url))
        .send()
        .await
        .expect("a new connection during the drain delay is answered");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    assert!(
        sigterm.elapsed() < DRAIN_DELAY,
        "the checks above took the whole delay; the test proves nothing"
    );
    for s in &seen {
        assert!(
            s.lock().await.ended_at.is_none(),
            "a stream ended during the drain delay"
        );
    }

    // After the delay A stops accepting; its streams end over the grace period.
    let status = a
        .guard()
        .exited_within(DRAIN_DELAY + GRACE + Duration::from_secs(3))
        .await
        .expect("A exits by itself");
    let exited = sigterm.elapsed();
    assert!(status.success(), "A's exit status {status:?}");
    assert!(
        exited < DRAIN_DELAY + GRACE + Duration::from_secs(1),
        "A took {exited:?} to exit"
    );
    assert!(
        http()
            .get(format!("{}/health", a.url))
            .send()
            .await
            .is_err(),
        "A still accepts connections after exiting"
    );

    stop.store(true, Ordering::SeqCst);
    publisher.await.expect("the publisher ran every round");
    let rounds = rounds.load(Ordering::SeqCst);
    for r in readers {
        r.await.expect("a reader panicked");
    }

    // When A ended each stream, by its own log (the test's clients, busy reconnecting
    // 200 streams on 2 cores, would blur the instants): "event stream closed" with
    // reason "shutdown", one per stream — none cut by the exit.
    let ends: Vec<Duration> = a
        .guard()
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "event stream closed" && l["reason"] == "shutdown")
        .map(|l| {
            let at = l["timestamp"].as_str().unwrap_or_default();
            let at = chrono::DateTime::parse_from_rfc3339(at)
                .unwrap_or_else(|e| panic!("no timestamp ({e}): {l}"));
            (at.with_timezone(&chrono::Utc) - sigterm_wall)
                .to_std()
                .unwrap_or_else(|_| panic!("a stream ended before SIGTERM: {l}"))
        })
        .collect();
    assert_eq!(ends.len(), STREAMS, "streams A ended by draining");
    let mut ends = ends;
    let mut retries = std::collections::BTreeSet::new();
    let mut lost = BTreeMap::new();
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().await;
        assert!(s.resumed, "client {i} did not resume");
        assert!(
            s.ended_at.is_some(),
            "client {i}: its stream on A never ended"
        );
        retries.insert(
            s.retry
                .unwrap_or_else(|| panic!("client {i}: its last frame had no retry: hint")),
        );
        if s.steps != (0..rounds).collect::<Vec<_>>() {
            lost.insert(i, s.steps.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} clients did not get every step exactly once, in order: {:?}",
        lost.len(),
        lost.iter().take(3).collect::<Vec<_>>()
    );
    ends.sort();
    let (first, last) = (ends[0], ends[STREAMS - 1]);
    assert!(
        first >= DRAIN_DELAY - Duration::from_millis(100),
        "a stream ended {first:?} after SIGTERM, before the drain delay was over"
    );
    // Spread: uniform over ¾ × 6 s = 4.5 s; one instant would be a few ms.
    assert!(
        last - first >= Duration::from_secs(3),
        "streams ended within {:?} of each other: not spread",
        last - first
    );
    assert!(
        last <= DRAIN_DELAY + GRACE * 3 / 4 + Duration::from_millis(500),
        "the last stream ended {last:?} after SIGTERM, past the spread"
    );
    let mut per_half_second = BTreeMap::<u128, usize>::new();
    for e in &ends {
        *per_half_second.entry(e.as_millis() / 500).or_default() += 1;
    }
    eprintln!(
        "{STREAMS} streams ended {first:?}..{last:?} after SIGTERM, per half second: {per_half_second:?}; {rounds} rounds; {} distinct retry hints",
        retries.len()
    );
    let busiest = per_half_second.values().copied().max().unwrap_or(0);
    assert!(
        busiest <= STREAMS / 4,
        "{busiest} of {STREAMS} streams ended in one half second: {per_half_second:?}"
    );
    assert!(
        retries.len() >= 50,
        "retry hints are not jittered: {retries:?}"
    );
    assert!(
        retries.iter().all(|&r| (500..=3000).contains(&r)),
        "{retries:?}"
    );
}

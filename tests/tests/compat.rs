//! Works with the NoETL that exists: the SPA flow through two origin replicas, for each of
//! NoETL's NATS event shapes — the Rust control plane (`noetl_events`, the row), the older
//! Python server (per-execution subjects, a small dict), NoETL 4.x's event mirror
//! (`NOETL_EVENTS`, a tenant with `/` and spaces, 4 shards, the canonical envelope) — and
//! for a NoETL that publishes nothing (the bridge's HTTP fallback). Real nats-server, real
//! origin processes, real SSE; one stand-in per shape.
//!
//! Every shape must give the SPA the same thing: `playbook.started` once, each step's end
//! (`step.exit`, or `step.failed` for a failed step — never both), exactly one terminal
//! frame carrying NoETL's true status (the lying run's `playbook.completed` included),
//! execution ids above 2^53 exact, frame ids increasing — also when the replica handling a
//! run is killed mid-run. `step.enter` is compared per shape only: the Rust control plane
//! emits it after a step's command completed, the Python servers before.

use std::time::Duration;

use gateway_tests::harness::flows::{
    client_id_of, get_json, graphql, login, nats_stack_with, open_events, run_playbook,
};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::Origin;
use gateway_tests::harness::sse::SseFrame;
use gateway_tests::harness::standin::{EventShape, StandIn, StandInOptions};
use gateway_tests::harness::wait_for;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Settings that make a dead replica's share come back sooner than the defaults (6 s lease,
/// 5 s ack wait), to keep the suite short: the reader's and the fallback's leases and the
/// durable consumer's ack wait.
const FAST_TAKEOVER: &[(&str, &str)] = &[
    ("BRIDGE_ACK_WAIT", "3s"),
    ("BRIDGE_LEASE_TTL", "3s"),
    ("BRIDGE_POLL_MAX_INTERVAL", "1s"),
];

struct World {
    _nats: NatsServer,
    standin: StandIn,
    a: Origin,
    b: Origin,
}

async fn world(shape: EventShape) -> World {
    let mut opts = StandInOptions {
        event_shape: Some(shape),
        step_delay_ms: Some(300),
        ..Default::default()
    };
    if shape == EventShape::V4 {
        opts.tenant = Some("acme/EU west".into());
        opts.organization = Some("Ops & Data".into());
        opts.shard_count = Some(4);
    }
    let (nats, standin, mut origins) = nats_stack_with(2, opts, FAST_TAKEOVER).await;
    let b = origins.pop().expect("two origins");
    let a = origins.pop().expect("two origins");
    World {
        _nats: nats,
        standin,
        a,
        b,
    }
}

fn is_terminal(f: &SseFrame) -> bool {
    f.event == "playbook/state" && f.data["params"]["terminal"] == true
}

/// The state frames of `execution_id`.
fn states<'a>(frames: &'a [SseFrame], execution_id: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| f.event == "playbook/state")
        .map(|f| &f.data["params"])
        .filter(|p| p["execution_id"] == execution_id)
        .collect()
}

/// What every shape must agree on: the frames other than `step.enter`, as
/// `event_type step status-if-terminal`.
fn spa_view(states: &[&Value]) -> Vec<String> {
    states
        .iter()
        .filter(|p| p["event_type"] != "step.enter")
        .map(|p| {
            let mut s = p["event_type"].as_str().unwrap_or("?").to_owned();
            if let Some(step) = p["step_name"].as_str() {
                s.push(' ');
                s.push_str(step);
            }
            if p["terminal"] == true {
                s.push(' ');
                s.push_str(p["status"].as_str().unwrap_or("?"));
            }
            s
        })
        .collect()
}

/// Checks what holds for every run: one terminal frame, last; exact ids; increasing
/// frame ids.
fn assert_well_formed(frames: &[SseFrame], execution_id: &str) {
    let st = states(frames, execution_id);
    let terminals = st.iter().filter(|p| p["terminal"] == true).count();
    assert_eq!(terminals, 1, "exactly one terminal frame: {st:#?}");
    assert_eq!(
        st.last().map(|p| p["terminal"] == true),
        Some(true),
        "{st:#?}"
    );
    assert!(execution_id.parse::<u64>().unwrap() > 1 << 53);
    let ids: Vec<u64> = frames.iter().filter_map(|f| f.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
}

/// What happens once a run's first state frame arrived.
enum During {
    Nothing,
    /// `cancelExecution` through replica A.
    Cancel,
    /// Replica B (which started the run and may hold its events or its lease) is killed.
    KillB,
}

/// Runs `path` on replica B for a client listening on replica A and returns every frame
/// until its terminal state (and a moment after, to show nothing follows it).
async fn run(
    w: &mut World,
    token: &str,
    path: &str,
    workload: Value,
    during: During,
) -> (String, Vec<SseFrame>) {
    let (mut sse, init) = open_events(&format!("{}/events", w.a.url), token, None, WAIT).await;
    let client_id = client_id_of(&init);
    let id = run_playbook(&w.b.url, token, path, workload, Some(&client_id)).await;
    let mut frames = sse
        .collect_until(WAIT, |fs| !states(fs, &id).is_empty())
        .await;
    match during {
        During::Nothing => {}
        During::Cancel => {
            let v = graphql(
                &w.a.url,
                token,
                "mutation($id: ID!) { cancelExecution(id: $id) }",
                json!({ "id": id }),
            )
            .await;
            assert_eq!(v["data"]["cancelExecution"], true, "{v}");
        }
        During::KillB => {
            w.b.guard().signal("KILL");
            let guard = w.b.guard();
            wait_for("replica B is gone", WAIT, || {
                let gone = !guard.is_running();
                async move { gone }
            })
            .await;
        }
    }
    frames.extend(
        sse.collect_until(WAIT, |fs| fs.iter().any(is_terminal))
            .await,
    );
    assert!(
        frames.iter().any(is_terminal),
        "{path}: no terminal frame within {WAIT:?}: {:#?}",
        states(&frames, &id)
    );
    // Nothing may follow the terminal frame.
    let late = sse
        .collect_until(Duration::from_millis(1500), |_| false)
        .await;
    assert!(
        states(&late, &id).is_empty(),
        "{path}: frames after the terminal: {:#?}",
        states(&late, &id)
    );
    frames.extend(late);
    (id, frames)
}

/// The SPA flow on `shape`: steps, a failed step, the lying run, a cancel, and a run whose
/// replica is killed mid-run. Returns each run's SPA view and step.enter count.
async fn spa_flow(shape: EventShape) -> Vec<(Vec<String>, usize)> {
    let mut w = world(shape).await;
    let token = login(&w.a.url, &w.standin, "compat@example.com").await;
    let runs = [
        ("demo/steps", json!({}), During::Nothing),
        ("demo/fail", json!({}), During::Nothing),
        ("demo/lying", json!({}), During::Nothing),
        ("demo/slow", json!({"seconds": 30}), During::Cancel),
        ("demo/progress", json!({}), During::KillB),
    ];
    let mut views = Vec::new();
    for (path, workload, during) in runs {
        let (id, frames) = run(&mut w, &token, path, workload, during).await;
        assert_well_formed(&frames, &id);
        let st = states(&frames, &id);
        let enters = st
            .iter()
            .filter(|p| p["event_type"] == "step.enter")
            .count();
        views.push((spa_view(&st), enters));
    }
    views
}

/// What every shape must show, run by run.
fn expected_views() -> Vec<Vec<String>> {
    let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    vec![
        v(&[
            "playbook.started",
            "step.exit step_1",
            "step.exit step_2",
            "step.exit step_3",
            "playbook.completed COMPLETED",
        ]),
        v(&[
            "playbook.started",
            "step.failed fail_step",
            "playbook.failed FAILED",
        ]),
        v(&[
            "playbook.started",
            "step.exit lie",
            "playbook.failed FAILED",
        ]),
        v(&["playbook.started", "playbook.cancelled CANCELLED"]),
        v(&[
            "playbook.started",
            "step.exit stage_1",
            "step.exit stage_2",
            "step.exit stage_3",
            "step.exit stage_4",
            "playbook.completed COMPLETED",
        ]),
    ]
}

async fn check(shape: EventShape, enters: [usize; 5]) {
    let got = spa_flow(shape).await;
    let want = expected_views();
    for (i, ((view, n_enter), want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(view, want, "{shape:?}, run {i}");
        assert_eq!(*n_enter, enters[i], "{shape:?}, run {i}: step.enter frames");
    }
    assert_eq!(got.len(), want.len());
}

#[tokio::test]
async fn the_rust_control_plane_shape_gives_the_spa_flow() {
    check(EventShape::Rust, [3, 0, 1, 0, 4]).await;
}

#[tokio::test]
async fn the_older_python_shape_gives_the_same_spa_flow() {
    check(EventShape::Python, [3, 1, 1, 1, 4]).await;
}

#[tokio::test]
async fn the_noetl_4x_event_mirror_gives_the_same_spa_flow() {
    check(EventShape::V4, [3, 1, 1, 1, 4]).await;
}

#[tokio::test]
async fn a_noetl_without_events_gives_the_same_spa_flow_over_http() {
    check(EventShape::None, [3, 1, 1, 1, 4]).await;
}

/// Reads of NoETL's execution record (all runs) and status calls, as the stand-in counted.
async fn record_reads(standin: &StandIn) -> (u64, u64) {
    let calls = get_json(&format!("{}/_standin/calls", standin.url)).await;
    let n = |k: &str| calls[k].as_u64().unwrap_or(0);
    (
        n("GET /api/executions/{id}"),
        n("GET /api/executions/{id}/status"),
    )
}

#[tokio::test]
async fn the_fallback_reads_a_run_within_its_rate_bound_and_stops_at_the_terminal_status() {
    const INTERVAL: Duration = Duration::from_millis(200);
    let (_nats, standin, origins) = nats_stack_with(
        1,
        StandInOptions {
            event_shape: Some(EventShape::None),
            ..Default::default()
        },
        &[
            ("BRIDGE_POLL_INTERVAL", "200ms"),
            ("BRIDGE_POLL_MAX_INTERVAL", "600ms"),
            ("BRIDGE_LEASE_TTL", "3s"),
        ],
    )
    .await;
    let a = &origins[0];
    let token = login(&a.url, &standin, "fallback@example.com").await;
    let (mut sse, init) = open_events(&format!("{}/events", a.url), &token, None, WAIT).await;
    let client_id = client_id_of(&init);
    let before = record_reads(&standin).await;
    let started = std::time::Instant::now();
    let id = run_playbook(
        &a.url,
        &token,
        "demo/slow",
        json!({"seconds": 3}),
        Some(&client_id),
    )
    .await;
    let frames = sse
        .collect_until(WAIT, |fs| fs.iter().any(is_terminal))
        .await;
    let followed = started.elapsed();
    assert_well_formed(&frames, &id);
    let during = record_reads(&standin).await;
    let reads = during.0 - before.0;
    let bound = (followed.as_secs_f64() / INTERVAL.as_secs_f64()).ceil() as u64 + 1;
    eprintln!(
        "followed {id} for {followed:?}: {reads} record reads ({:.2}/s; bound {bound} = one per {INTERVAL:?}), {} status reads",
        reads as f64 / followed.as_secs_f64(),
        during.1 - before.1
    );
    assert!(reads >= 3, "the run was read while it ran: {reads}");
    assert!(
        reads <= bound,
        "{reads} reads in {followed:?} exceed one per {INTERVAL:?} ({bound})"
    );
    // Ended: nobody reads the record any more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = record_reads(&standin).await;
    assert_eq!(after.0, during.0, "reading stopped at the terminal status");
}

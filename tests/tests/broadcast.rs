//! Broadcast without a cap (issue 16): a run's `playbook/state` frames are published once,
//! to the run (`gateway.executions.<id>`), and reach every client that follows it, on every
//! replica — far more than the 256 + 256 clients an interest record keeps.
//!
//! Real parts: nats-server (JetStream), two origin replicas, the NoETL stand-in publishing
//! its execution events, SSE over loopback. The watchers' streams are spread over both
//! replicas and each watch is made on the *other* replica, so every watch travels as a
//! `gw/watch` control frame; the run's subject is then counted in the stream: one message
//! per state, however many watch it.

use std::time::Duration;

use futures::StreamExt;
use gateway_tests::harness::flows::{
    client_id_of, execute_playbook, graphql, login, nats_stack_with, open_events, run_ended,
};
use gateway_tests::harness::metrics;
use gateway_tests::harness::origin::Origin;
use gateway_tests::harness::sse::{SseClient, SseFrame};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// More than the 512 clients an interest record ever listed (256 owner's + 256 others').
const WATCHERS: usize = 600;

const SUBSCRIBE_TO: &str =
    "mutation($id: ID!, $client: String!) { subscribeToExecution(executionId: $id, clientId: $client) }";
const CANCEL: &str = "mutation($id: ID!) { cancelExecution(id: $id) }";

async fn open(origin: &Origin, token: &str, query: &str) -> (SseClient, String) {
    let (sse, init) =
        open_events(&format!("{}/events{query}", origin.url), token, None, WAIT).await;
    (sse, client_id_of(&init))
}

/// The owner logged in on `origin`, their stream there, and a two-minute run of theirs
/// started through it: `(token, stream, execution id)`.
async fn slow_run(origin: &Origin, standin: &StandIn) -> (String, SseClient, String) {
    let owner = login(&origin.url, standin, "owner@example.com").await;
    let (owner_sse, owner_client) = open(origin, &owner, "").await;
    let v = execute_playbook(
        &origin.url,
        &owner,
        "demo/slow",
        json!({"seconds": 120}),
        Some(&owner_client),
    )
    .await;
    let execution = v["data"]["executePlaybook"]["executionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();
    (owner, owner_sse, execution)
}

/// The run's state frames `sse` reads until the run ends: `(SSE position, event_type)`.
async fn states_until_end(sse: &mut SseClient, execution: &str) -> Vec<(u64, String)> {
    states(
        &sse.collect_until(WAIT, |fs| run_ended(fs, execution)).await,
        execution,
    )
}

/// The run's state frames in `frames`: `(SSE position, event_type)`.
fn states(frames: &[SseFrame], execution: &str) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter(|f| f.event == "playbook/state" && f.data["params"]["execution_id"] == execution)
        .map(|f| {
            (
                f.id.expect("a state frame has an id"),
                f.data["params"]["event_type"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_on_two_replicas_gets_each_state_once_in_order_from_one_publish_per_state() {
    let (nats, standin, origins) = nats_stack_with(
        2,
        StandInOptions::default(),
        &[
            ("USER_MAX_CLIENTS", "0"),
            ("USER_MAX_STREAMS", "0"),
            ("STREAM_OPEN_RATE_LIMIT", "off"),
            ("GRAPHQL_MUTATION_RATE_LIMIT", "off"),
        ],
    )
    .await;
    let (owner, mut owner_sse, execution) = slow_run(&origins[0], &standin).await;

    // The watchers: streams alternating between the replicas, each subscribed through the
    // other one.
    let mut watchers: Vec<(usize, SseClient, String)> = futures::stream::iter(0..WATCHERS)
        .map(|i| {
            let (origins, owner) = (&origins, &owner);
            async move {
                let (sse, id) = open(&origins[i % 2], owner, "").await;
                (i % 2, sse, id)
            }
        })
        .buffered(16)
        .collect()
        .await;
    let subscribed: Vec<bool> = futures::stream::iter(watchers.iter())
        .map(|(replica, _, client)| {
            let (origins, owner, execution) = (&origins, &owner, &execution);
            async move {
                let v = graphql(
                    &origins[1 - replica].url,
                    owner,
                    SUBSCRIBE_TO,
                    json!({"id": execution, "client": client}),
                )
                .await;
                v["data"]["subscribeToExecution"] == true
            }
        })
        .buffered(16)
        .collect()
        .await;
    assert!(subscribed.iter().all(|ok| *ok), "every watch is accepted");

    let v = graphql(&origins[0].url, &owner, CANCEL, json!({"id": execution})).await;
    assert_eq!(v["data"]["cancelExecution"], true, "{v}");
    let owner_states = states_until_end(&mut owner_sse, &execution).await;
    assert!(
        owner_states
            .last()
            .is_some_and(|(_, t)| t == "playbook.cancelled"),
        "the run ended for its owner: {owner_states:?}"
    );

    // Every watcher: a suffix of the owner's states (it began watching mid-run), ending with
    // the terminal one, in the owner's order and with the same stream positions, none twice.
    for (i, (_, sse, client)) in watchers.iter_mut().enumerate() {
        let got = states_until_end(sse, &execution).await;
        assert!(
            !got.is_empty() && owner_states.ends_with(&got),
            "watcher {i} ({client}) got {got:?}, the owner {owner_states:?}"
        );
    }

    // One message per state on the run's subject, whatever the number of watchers.
    let js = async_nats::jetstream::new(
        async_nats::connect(&nats.url)
            .await
            .expect("connects to NATS"),
    );
    let stream = js
        .get_stream("GATEWAY_FRAMES")
        .await
        .expect("the frames stream");
    let subject = format!("gateway.executions.{execution}");
    let mut info = stream
        .info_with_subjects(&subject)
        .await
        .expect("stream info");
    let stored = match info.next().await {
        Some(Ok((s, n))) if s == subject => n,
        other => panic!("no count for {subject}: {other:?}"),
    };
    assert_eq!(
        stored,
        owner_states.len(),
        "one stored message per state for {WATCHERS} watchers"
    );

    // A watcher resuming by name on the other replica (no Last-Event-ID: everything
    // retained) replays the whole run from the run's subject, merged into its stream.
    for (replica, sse, client) in watchers.drain(..4) {
        sse.close();
        let (mut again, id) = open(
            &origins[1 - replica],
            &owner,
            &format!("?client_id={client}"),
        )
        .await;
        assert_eq!(id, client);
        let replayed = states_until_end(&mut again, &execution).await;
        assert_eq!(replayed, owner_states, "{client} replays the whole run");
    }
}

/// Replica `origin`'s reads of K/V `interest` (the watch lists among them), from its
/// `/metrics`.
async fn interest_reads(origin: &Origin) -> u64 {
    let text = origin.metrics_text().await.expect("/metrics answers");
    metrics::sum(
        &metrics::parse(&text),
        "gateway_kv_operation_duration_seconds_count",
        &[("bucket", "interest"), ("op", "get")],
    ) as u64
}

/// A client that never followed a run resumes on the other replica without its watch list
/// read (that replica's router saw every frame since the client was made, no `gw/watch`
/// among them), then follows a run through the first replica and gets its states live; a
/// later resume reads the list again and replays them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_follows_no_run_skips_the_watch_list_and_still_gets_a_run_followed_later() {
    let (_nats, standin, origins) = nats_stack_with(2, StandInOptions::default(), &[]).await;
    let (owner, mut owner_sse, execution) = slow_run(&origins[0], &standin).await;

    // A new client on replica 0, resumed on replica 1 after its init frame.
    let (sse, init) = open_events(&format!("{}/events", origins[0].url), &owner, None, WAIT).await;
    let client = client_id_of(&init);
    let init_id = init.id.expect("the init frame has an id");
    drop(sse);
    let resume_url = format!("{}/events?client_id={client}", origins[1].url);
    let resume = || open_events(&resume_url, &owner, Some(init_id), WAIT);
    let reads = interest_reads(&origins[1]).await;
    let (mut resumed, again) = resume().await;
    assert_eq!(client_id_of(&again), client, "the same client");
    assert_eq!(
        interest_reads(&origins[1]).await,
        reads,
        "no watch list read for a client that follows no run"
    );

    // It follows the run through replica 0: the watch reaches the stream on replica 1.
    let v = graphql(
        &origins[0].url,
        &owner,
        SUBSCRIBE_TO,
        json!({"id": execution, "client": client}),
    )
    .await;
    assert_eq!(v["data"]["subscribeToExecution"], true, "{v}");
    let v = graphql(&origins[0].url, &owner, CANCEL, json!({"id": execution})).await;
    assert_eq!(v["data"]["cancelExecution"], true, "{v}");
    let owner_states = states_until_end(&mut owner_sse, &execution).await;
    let live = states_until_end(&mut resumed, &execution).await;
    assert!(
        !live.is_empty() && owner_states.ends_with(&live),
        "the resumed stream follows the run: {live:?}, the owner's {owner_states:?}"
    );
    drop(resumed);

    // Resumed again from its init frame: the list is read now, and the run's states since
    // then are replayed.
    let reads = interest_reads(&origins[1]).await;
    let (mut replayed, _) = resume().await;
    assert!(
        interest_reads(&origins[1]).await > reads,
        "a client that follows a run has its watch list read"
    );
    let replay = states_until_end(&mut replayed, &execution).await;
    assert!(
        replay.ends_with(&live),
        "the replay ends with what the live stream got: {replay:?} vs {live:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_started_at_once_for_one_client_on_two_replicas_all_stay_in_its_watch_list() {
    // A page starting several runs at once for its client, its requests spread over two
    // replicas: each adds its run to the client's watch list (what a reconnect follows).
    // Written back without a compare-and-set, the replicas' adds dropped each other's.
    let (nats, standin, origins) = nats_stack_with(
        2,
        StandInOptions::default(),
        &[
            ("EXECUTE_RATE_LIMIT", "off"),
            ("GRAPHQL_MUTATION_RATE_LIMIT", "off"),
        ],
    )
    .await;
    let token = login(&origins[0].url, &standin, "many-runs@example.com").await;
    let (_sse, client) = open(&origins[0], &token, "").await;
    const RUNS: usize = 16;
    let started = futures::future::join_all((0..RUNS).map(|i| {
        let (base, token, client) = (origins[i % 2].url.clone(), token.clone(), client.clone());
        async move {
            let v = execute_playbook(
                &base,
                &token,
                "demo/slow",
                json!({"seconds": 60}),
                Some(&client),
            )
            .await;
            v["data"]["executePlaybook"]["executionId"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}"))
                .to_owned()
        }
    }))
    .await;

    let kv = origin::store::nats::NatsKv::open(
        async_nats::connect(&nats.url).await.unwrap(),
        origin::store::BucketTtls::default(),
        None,
    )
    .await
    .unwrap();
    let client = gateway_shared::ids::ClientId::parse(&client).unwrap();
    let mut watched: Vec<String> = origin::interest::watched_by(&kv, &client)
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    watched.sort();
    let mut expected = started.clone();
    expected.sort();
    assert_eq!(
        watched, expected,
        "every run the client started is in its watch list"
    );
}

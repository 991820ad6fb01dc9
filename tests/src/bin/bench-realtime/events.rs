//! Figure 4 — NATS event → frame: NoETL-shaped step ends published for executions whose
//! interest was recorded — the Rust control plane's `command.completed` rows into
//! `noetl_events`, or (`--event-shape v4`) NoETL 4.x's `step.exit` envelopes into
//! `NOETL_EVENTS` on sanitised, sharded per-execution subjects — read by the origin's bridge
//! and delivered as `step.exit`; the JetStream publish-ack time is the peer.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::future::BoxFuture;
use futures::StreamExt;
use gateway_shared::ids as gw_ids;
use gateway_tests::bench::{now_ns, Deadline};
use gateway_tests::standin::events::v4::V4Mirror;
use gateway_tests::standin::events::{encode_row, EventKind, EventRow, NewEvent, RowPlace, Shape};
use gateway_tests::standin::ids::{ExecutionId, IdGen};
use origin::bus::nats::NatsBus;
use origin::bus::Retention;
use origin::interest::{follow, Interested};
use origin::store::nats::NatsKv;

use crate::common::World;
use crate::live::LiveClients;
use crate::open_loop::{measured_row, open_loop, print_latency, warmup, Sent};
use crate::{Args, BenchShape};

/// The tenant of the 4.x shape (sanitised into the subject as `acme-EU-west`).
pub(crate) const V4_TENANT: &str = "acme/EU west";
/// The 4.x shape's shard count.
pub(crate) const V4_SHARDS: u32 = 4;

/// Figure 4: interest recorded for one execution per target stream, then NoETL rows
/// published open-loop at each `--event-rates` rate; latency = frame arrival − publish.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn figure_events(
    args: &Args,
    world: &World,
    origin_pid: u32,
    kv: &NatsKv,
    live: &mut LiveClients,
    phase: &mut u32,
    deadline: Deadline,
) {
    let targets: Vec<String> = live.ids.iter().take(args.targets.max(1)).cloned().collect();
    let ids = Arc::new(IdGen::new());
    let executions: Vec<ExecutionId> = targets.iter().map(|_| ids.execution()).collect();
    let recorded = Instant::now();
    // The gateway's own follow (watch list, the bus's watch, the interest record), through
    // a bus on the same stream as the origin's.
    let bus = NatsBus::open(world.client.clone(), Retention::default(), None)
        .await
        .expect("the frames stream opens");
    let bus = &bus;
    let interest: Vec<bool> =
        futures::stream::iter(executions.iter().zip(&targets).map(|(e, c)| async move {
            let execution = gw_ids::ExecutionId::parse(&e.0.to_string()).expect("a numeric id");
            let client = gw_ids::ClientId::parse(c).expect("a live client's id");
            follow(kv, bus, &execution, &client, Interested::Owner)
                .await
                .is_ok()
        }))
        .buffer_unordered(128)
        .collect()
        .await;
    let note = format!(
        "interest recorded for {} executions (one client each) in {:.1} s, {} failed",
        executions.len(),
        recorded.elapsed().as_secs_f64(),
        interest.iter().filter(|ok| !**ok).count()
    );
    let executions = Arc::new(executions);
    let js = jetstream::new(world.client.clone());
    let mut rows = Vec::new();
    for &rate in &args.event_rates {
        if deadline.passed() {
            break;
        }
        let n = ((rate as f64) * args.event_secs).round().max(1.0) as usize;
        let send = |p| {
            events_to(
                js.clone(),
                ids.clone(),
                executions.clone(),
                args.event_shape,
                p,
            )
        };
        *phase += 1;
        open_loop(rate, warmup(rate), deadline, send(*phase)).await;
        *phase += 1;
        let p = *phase;
        rows.push(
            measured_row(
                live,
                format!("event → step.exit @{rate}/s"),
                rate,
                n,
                deadline,
                (origin_pid, world.nats_pid),
                p,
                |s| s == 200,
                send(p),
            )
            .await,
        );
    }
    print_latency(
        &format!(
            "figure 4 — NATS event → frame: open-loop JetStream publishes of {} for {} s per rate, {} executions with one interested client each; bridge = the origin's durable consumer",
            match args.event_shape {
                BenchShape::Rust => "the Rust control plane's rows (command.completed → step.exit) into noetl_events",
                BenchShape::V4 => "NoETL 4.x envelopes (step.exit, tenant acme/EU west, 4 shards) into NOETL_EVENTS",
            },
            args.event_secs,
            executions.len()
        ),
        "ack p99",
        &rows,
    );
    println!("  {note}");
    println!("  (latency = frame read by the client − publish call; ack p99 = the publisher's own JetStream ack time, the first hop's floor)");
    println!();
}

/// A step's end for `executions[i % len]`: a `command.completed` row published into
/// `noetl_events` like the Rust server does (with `Nats-Msg-Id`), or a 4.x `step.exit`
/// envelope into `NOETL_EVENTS` like 4.x's mirror does; the step name carries the phase and
/// send time. Reports the JetStream ack time.
fn events_to(
    js: jetstream::Context,
    ids: Arc<IdGen>,
    executions: Arc<Vec<ExecutionId>>,
    shape: BenchShape,
    p: u32,
) -> impl Fn(usize, u64) -> BoxFuture<'static, Sent> {
    let mirror = Arc::new(V4Mirror::new(
        gateway_tests::standin::events::v4::SUBJECT_PREFIX,
        V4_TENANT,
        gateway_tests::standin::events::v4::DEFAULT_TOKEN,
        V4_SHARDS,
    ));
    move |i, t| {
        let place = RowPlace {
            event_id: ids.event(),
            parent_event_id: None,
            execution_id: executions[i % executions.len()],
            catalog_id: 1,
            playbook_path: "bench/realtime",
            at: chrono::Utc::now(),
        };
        let kind = match shape {
            BenchShape::Rust => EventKind::CommandCompleted,
            BenchShape::V4 => EventKind::StepExit,
        };
        let row = EventRow::build(
            &place,
            NewEvent::new(kind, format!("p{p}-t{t}")).with_command(i as u64 + 1),
        );
        let out = match shape {
            BenchShape::Rust => encode_row(&row, Shape::Rust),
            BenchShape::V4 => Some(mirror.encode(&row)),
        };
        let js = js.clone();
        Box::pin(async move {
            let Some(out) = out else { return (0, None) };
            let mut msg = PublishMessage::build().payload(out.payload);
            if out.send_msg_id {
                msg = msg.message_id(&out.msg_id);
            }
            let start = now_ns();
            match js.send_publish(out.subject, msg).await {
                Ok(ack) => match ack.await {
                    Ok(_) => (200, Some(now_ns() - start)),
                    Err(_) => (0, None),
                },
                Err(_) => (0, None),
            }
        })
    }
}

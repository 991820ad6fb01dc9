//! Figure 4 — NATS event → frame: NoETL-shaped `command.completed` rows published into
//! `noetl_events` for executions whose interest was recorded, read by the origin's bridge and
//! delivered as `step.exit`; the JetStream publish-ack time is the peer.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::future::BoxFuture;
use futures::StreamExt;
use gateway_shared::ids as gw_ids;
use gateway_tests::bench::{now_ns, Deadline};
use gateway_tests::standin::events::{encode_row, EventKind, EventRow, NewEvent, RowPlace, Shape};
use gateway_tests::standin::ids::{ExecutionId, IdGen};
use origin::interest::{add_interest, Interested};
use origin::store::nats::NatsKv;

use crate::common::World;
use crate::live::LiveClients;
use crate::open_loop::{measured_row, open_loop, print_latency, warmup, Sent};
use crate::Args;

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
    let interest: Vec<bool> =
        futures::stream::iter(executions.iter().zip(&targets).map(|(e, c)| async move {
            let execution = gw_ids::ExecutionId::parse(&e.0.to_string()).expect("a numeric id");
            let client = gw_ids::ClientId::parse(c).expect("a live client's id");
            add_interest(kv, &execution, &client, Interested::Owner)
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
        let send = |p| events_to(js.clone(), ids.clone(), executions.clone(), p);
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
            "figure 4 — NATS event → frame: open-loop JetStream publishes of NoETL rows (command.completed → step.exit) into noetl_events for {} s per rate, {} executions with one interested client each; bridge = the origin's durable consumer",
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

/// NoETL `command.completed` rows for `executions[i % len]`, published into
/// `noetl_events` like the Rust server does (with `Nats-Msg-Id`); the step name carries the
/// phase and send time. Reports the JetStream ack time.
fn events_to(
    js: jetstream::Context,
    ids: Arc<IdGen>,
    executions: Arc<Vec<ExecutionId>>,
    p: u32,
) -> impl Fn(usize, u64) -> BoxFuture<'static, Sent> {
    move |i, t| {
        let place = RowPlace {
            event_id: ids.event(),
            parent_event_id: None,
            execution_id: executions[i % executions.len()],
            catalog_id: 1,
            playbook_path: "bench/realtime",
            at: chrono::Utc::now(),
        };
        let row = EventRow::build(
            &place,
            NewEvent::new(EventKind::CommandCompleted, format!("p{p}-t{t}"))
                .with_command(i as u64 + 1),
        );
        let out = encode_row(&row, Shape::Rust);
        let js = js.clone();
        Box::pin(async move {
            let Some(out) = out else { return (0, None) };
            let msg = PublishMessage::build()
                .payload(out.payload)
                .message_id(&out.msg_id);
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

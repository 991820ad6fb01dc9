//! Figure 3 — callback → frame: open-loop `POST /api/internal/callback/async` for request
//! entries written beforehand into the shared request store; peer: `NatsBus` publishes
//! straight from this process at the same rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use gateway_shared::ids::{ClientId, RequestId};
use gateway_tests::bench::{ms, now_ns, percentile, Deadline};
use gateway_tests::harness::origin::{Origin, INTERNAL_TOKEN};
use origin::bus::nats::NatsBus;
use origin::bus::Bus;
use origin::requests::{self, RequestEntry};
use origin::store::nats::NatsKv;
use serde_json::json;

use crate::common::World;
use crate::live::{bench_frame, LiveClients};
use crate::open_loop::{measured_row, open_loop, print_latency, warmup, Sent, MAX_IN_FLIGHT};
use crate::Args;

/// Callback → frame goal: p99 under 5 ms.
const GOAL_CALLBACK_P99_MS: f64 = 5.0;

/// Figure 3: open-loop callbacks at each `--cb-rates` rate, then the bus alone at the same
/// rate as the peer; latency = frame arrival − send.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn figure_callbacks(
    args: &Args,
    world: &World,
    origin: &Origin,
    origin_pid: u32,
    kv: &NatsKv,
    bus: &Arc<NatsBus>,
    user_id: &str,
    live: &mut LiveClients,
    phase: &mut u32,
    deadline: Deadline,
) {
    let targets: Arc<Vec<String>> =
        Arc::new(live.ids.iter().take(args.targets.max(1)).cloned().collect());
    let http = match reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            println!("figure 3 skipped: HTTP client: {e}");
            return;
        }
    };
    let url = Arc::new(format!(
        "{}/api/internal/callback/async",
        origin.internal_url
    ));
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &rate in &args.cb_rates {
        if deadline.passed() {
            notes.push(format!("rate {rate}/s skipped: deadline"));
            break;
        }
        let n = ((rate as f64) * args.cb_secs).round().max(1.0) as usize;
        let warm = warmup(rate);
        // The request entries, as executePlaybook would have written them.
        let written = Instant::now();
        let request_ids: Vec<String> = (0..n + warm)
            .map(|_| requests::new_request_id().into_string())
            .collect();
        let created_at = chrono::Utc::now().timestamp();
        let puts: Vec<bool> =
            futures::stream::iter(request_ids.iter().enumerate().map(|(i, id)| {
                let entry = RequestEntry {
                    request_id: RequestId::parse(id).expect("a minted request id"),
                    client_id: Some(
                        ClientId::parse(&targets[i % targets.len()]).expect("a live client's id"),
                    ),
                    user_id: user_id.to_owned(),
                    execution_id: None,
                    playbook_path: "bench/realtime".into(),
                    created_at,
                };
                async move { requests::put(kv, &entry).await.is_ok() }
            }))
            .buffer_unordered(256)
            .collect()
            .await;
        let failed_puts = puts.iter().filter(|ok| !**ok).count();
        notes.push(format!(
            "{} request entries for {rate}/s ({warm} of them warm-up) written in {:.1} s ({failed_puts} failed)",
            n + warm,
            written.elapsed().as_secs_f64()
        ));
        let request_ids = Arc::new(request_ids);

        // Callbacks: warm-up, then the measured run.
        *phase += 1;
        let cb =
            |offset, p| callbacks_to(http.clone(), url.clone(), request_ids.clone(), offset, p);
        open_loop(rate, warm, deadline, cb(0, *phase)).await;
        *phase += 1;
        let p = *phase;
        rows.push(
            measured_row(
                live,
                format!("callback → frame @{rate}/s"),
                rate,
                n,
                deadline,
                (origin_pid, world.nats_pid),
                p,
                |s| (200..300).contains(&s),
                cb(warm, p),
            )
            .await,
        );

        // Peer: the bus alone, same rate, same clients.
        if deadline.passed() {
            break;
        }
        *phase += 1;
        open_loop(
            rate,
            warm,
            deadline,
            bus_to(bus.clone(), targets.clone(), *phase),
        )
        .await;
        *phase += 1;
        let p = *phase;
        rows.push(
            measured_row(
                live,
                format!("bus publish → frame @{rate}/s"),
                rate,
                n,
                deadline,
                (origin_pid, world.nats_pid),
                p,
                |s| s == 200,
                bus_to(bus.clone(), targets.clone(), p),
            )
            .await,
        );
    }
    print_latency(
        &format!(
            "figure 3 — callback → frame: open-loop POST /api/internal/callback/async (service token, ≤ {MAX_IN_FLIGHT} in flight) for {} s per rate to {} connected clients; peer: NatsBus::publish from this process at the same rate",
            args.cb_secs,
            targets.len()
        ),
        "send p99",
        &rows,
    );
    for n in notes {
        println!("  {n}");
    }
    let goal: Vec<String> = rows
        .iter()
        .filter(|r| r.name.starts_with("callback"))
        .map(|r| {
            let p99 = ms(percentile(&r.lat, 0.99));
            let achieved = r.run.sent as f64 / r.run.send_window.as_secs_f64().max(1e-3);
            let complete = r.delivered == r.run.sent;
            format!(
                "offered {}/s (achieved {achieved:.0}/s{}): p99 {p99:.2} ms {}",
                r.offered,
                if complete { "" } else { ", NOT all delivered" },
                if p99 < GOAL_CALLBACK_P99_MS && complete {
                    "met"
                } else {
                    "NOT met"
                }
            )
        })
        .collect();
    println!(
        "goal: callback → frame p99 < {GOAL_CALLBACK_P99_MS} ms — {}",
        goal.join("; ")
    );
    println!("  (latency = frame read by the client − request handed to the HTTP client; lag p99 = how late the loader sent against its schedule; CPU in % of one core over the run)");
    println!();
}

/// Callbacks for `request_ids[offset + i]`, stamped with phase `p` and the send time.
fn callbacks_to(
    http: reqwest::Client,
    url: Arc<String>,
    request_ids: Arc<Vec<String>>,
    offset: usize,
    p: u32,
) -> impl Fn(usize, u64) -> BoxFuture<'static, Sent> {
    move |i, t| {
        let req = http
            .post(url.as_str())
            .bearer_auth(INTERNAL_TOKEN)
            .json(&json!({
                "request_id": request_ids[offset + i],
                "status": "success",
                "data": {"t": t, "p": p},
            }));
        Box::pin(async move {
            let start = now_ns();
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let _ = resp.bytes().await;
                    (status, Some(now_ns() - start))
                }
                Err(_) => (0, None),
            }
        })
    }
}

/// Bus frames straight from this process to `targets[i % len]`, stamped like callbacks.
fn bus_to(
    bus: Arc<NatsBus>,
    targets: Arc<Vec<String>>,
    p: u32,
) -> impl Fn(usize, u64) -> BoxFuture<'static, Sent> {
    move |i, t| {
        let (bus, client) = (bus.clone(), targets[i % targets.len()].clone());
        let client = ClientId::parse(&client).expect("a live client's id");
        Box::pin(async move {
            let start = now_ns();
            let ok = bus
                .publish(&client, "bench/bus", bench_frame("bench/bus", p, t))
                .await
                .is_ok();
            (u16::from(ok) * 200, Some(now_ns() - start))
        })
    }
}

//! Figure 2 — fan-out: one frame published to each open stream through `NatsBus`, timed
//! until every client has it; peers are a smaller subset and publishes nobody listens to.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use gateway_shared::ids::ClientId;
use gateway_tests::bench::{ms, now_ns, percentile, Deadline};
use origin::bus::nats::NatsBus;
use origin::bus::Bus;

use crate::common::{World, DRAIN};
use crate::live::{bench_frame, LiveClients, Window};
use crate::Args;

/// One round of one variant.
struct FanoutRun {
    wall_ns: u64,
    publish_ns: u64,
    delivered: usize,
    published: usize,
    errors: usize,
    p50_ns: u64,
    p99_ns: u64,
    cpu: [f64; 3],
}

/// Figure 2: one frame to each of the open streams (and to a peer subset, and to nobody),
/// `--rounds` times interleaved; the median round is printed.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn figure_fanout(
    args: &Args,
    world: &World,
    origin_pid: u32,
    bus: &Arc<NatsBus>,
    live: &mut LiveClients,
    phase: &mut u32,
    deadline: Deadline,
) {
    let all = live.ids.clone();
    let subset: Vec<String> = all.iter().take(args.peer_clients).cloned().collect();
    let variants: [(&str, bool); 3] = [
        ("fan-out, all connected", true),
        ("fan-out, peer subset", true),
        ("publish only, no subscriber", false),
    ];
    let mut runs: Vec<Vec<FanoutRun>> = variants.iter().map(|_| Vec::new()).collect();
    let mut last_ids: HashMap<u32, u64> = HashMap::new();
    'rounds: for _ in 0..args.rounds {
        if deadline.passed() {
            break;
        }
        for (v, &(_, delivered_to_clients)) in variants.iter().enumerate() {
            if deadline.passed() {
                break 'rounds;
            }
            *phase += 1;
            let ids: Vec<String> = match v {
                0 => all.clone(),
                1 => subset.clone(),
                _ => (0..all.len())
                    .map(|_| uuid::Uuid::new_v4().to_string())
                    .collect(),
            };
            let ids: Vec<ClientId> = ids
                .iter()
                .map(|id| ClientId::parse(id).expect("a UUID is a valid client id"))
                .collect();
            live.drain();
            let window = Window::open_quiet(origin_pid, world.nats_pid, deadline).await;
            let t0 = now_ns();
            let data = bench_frame("bench/fanout", *phase, t0);
            let results: Vec<bool> = futures::stream::iter(ids.iter().map(|id| {
                let (bus, data) = (bus.clone(), data.clone());
                async move { bus.publish(id, "bench/fanout", data).await.is_ok() }
            }))
            .buffer_unordered(256)
            .collect()
            .await;
            let publish_ns = now_ns() - t0;
            let published = results.iter().filter(|ok| **ok).count();
            let mut samples = if delivered_to_clients {
                live.collect(
                    *phase,
                    published,
                    Deadline::after(deadline.within(DRAIN * 2)),
                )
                .await
            } else {
                Vec::new()
            };
            let cpu = window.close();
            for s in &samples {
                let last = last_ids.entry(s.client).or_insert(0);
                *last = (*last).max(s.id);
            }
            let mut lat: Vec<u64> = samples
                .iter()
                .map(|s| s.at.saturating_sub(s.sent))
                .collect();
            lat.sort_unstable();
            samples.sort_by_key(|s| s.at);
            let wall_ns = if delivered_to_clients {
                samples.last().map_or(publish_ns, |s| s.at - t0)
            } else {
                publish_ns
            };
            runs[v].push(FanoutRun {
                wall_ns,
                publish_ns,
                delivered: samples.len(),
                published,
                errors: results.len() - published,
                p50_ns: percentile(&lat, 0.5),
                p99_ns: percentile(&lat, 0.99),
                cpu,
            });
        }
    }
    println!(
        "figure 2 — fan-out: one frame to each client via NatsBus::publish (256 in flight) from this process, {} rounds interleaved; wall = first publish → last frame read",
        runs[0].len()
    );
    println!(
        "{:<30} {:>7} {:>9} {:>6} {:>9} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "variant",
        "clients",
        "delivered",
        "errors",
        "wall ms",
        "deliv/s",
        "publish/s",
        "pub ms",
        "p50 ms",
        "p99 ms",
        "orig%",
        "nats%",
        "bench%"
    );
    let sizes = [all.len(), subset.len(), all.len()];
    for (v, (name, to_clients)) in variants.iter().enumerate() {
        let r = &mut runs[v];
        if r.is_empty() {
            continue;
        }
        // The median round by wall time.
        r.sort_by_key(|x| x.wall_ns);
        let m = &r[r.len() / 2];
        let rate = |n: usize, ns: u64| n as f64 / (ns.max(1) as f64 / 1e9);
        println!(
            "{:<30} {:>7} {:>9} {:>6} {:>9.0} {:>10} {:>10.0} {:>10.0} {:>9} {:>9} {:>7.0} {:>7.0} {:>7.0}",
            name,
            sizes[v],
            if *to_clients { m.delivered.to_string() } else { "-".into() },
            m.errors,
            ms(m.wall_ns),
            if *to_clients { format!("{:.0}", rate(m.delivered, m.wall_ns)) } else { "-".into() },
            rate(m.published, m.publish_ns),
            ms(m.publish_ns),
            if *to_clients { format!("{:.1}", ms(m.p50_ns)) } else { "-".into() },
            if *to_clients { format!("{:.1}", ms(m.p99_ns)) } else { "-".into() },
            m.cpu[0],
            m.cpu[1],
            m.cpu[2],
        );
        let all_rates: Vec<String> = r
            .iter()
            .map(|x| {
                if *to_clients {
                    format!("{:.0}", rate(x.delivered, x.wall_ns))
                } else {
                    format!("{:.0}", rate(x.published, x.publish_ns))
                }
            })
            .collect();
        println!("    rounds (/s): {}", all_rates.join(", "));
    }
    println!("  (median round shown; p50/p99 = per-client time from the round's first publish to that client's frame; CPU in % of one core over the round)");
    println!();
}

// ---------------------------------------------------------------------------------------
// Open-loop driver shared by figures 3 and 4.

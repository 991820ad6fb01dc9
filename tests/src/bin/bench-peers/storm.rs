//! Figure 5 — the reconnect storm: two origin replicas on one nats-server; N streams on
//! replica A; a request executePlaybook recorded for `--storm-missed` of their clients; A is
//! killed (SIGKILL); while the clients are away their callbacks go to replica B; then all N
//! reconnect to B at once (`--storm-concurrency`) with `?client_id=` and the last frame id
//! each read (`last_event_id=`, the `Last-Event-ID` header's query twin). Reported: connects/s
//! of the storm, and per client whether it read what it missed (by payload), once. With
//! `--storm-read-all` every client reads a result on A first, so every one resumes after
//! a frame id (most with nothing new: the common case after a replica dies).

use std::sync::Arc;
use std::time::Duration;

use crate::gateway::{Gateway, World};
use crate::load;
use crate::rounds::{quiesce, Cpu, DeliveryRow, PerItem};
use crate::streams::{self, OpenSpec};
use crate::{Args, Octets};

/// What the storm measured.
pub(crate) struct StormResult {
    pub(crate) clients: usize,
    pub(crate) reconnected: usize,
    pub(crate) failed: usize,
    pub(crate) first_error: Option<String>,
    pub(crate) secs: f64,
    pub(crate) rate: f64,
    /// Clients with a callback sent while they were away.
    pub(crate) missed_sent: usize,
    /// The deliveries of those callbacks after the reconnect.
    pub(crate) delivery: DeliveryRow,
    /// Clients that had a frame id to resume from.
    pub(crate) with_last_id: usize,
    /// The missed results' read time after the storm began, p50 and p99 (ms).
    pub(crate) after_p50: f64,
    pub(crate) after_p99: f64,
    /// Results read on replica A before the kill (of the missed clients).
    pub(crate) read_before: usize,
    /// Listen-queue overflows (system-wide) during the storm.
    pub(crate) overflows: u64,
    /// Replica B's resumes by what they read (`gateway_bus_resumes_total{reads}`): none,
    /// the frames the router's index named, and the stream; `None` when B did not say.
    pub(crate) resumes: Option<(u64, u64, u64)>,
    /// Replica B's resumes whose presence marker waited for their stream's first ping
    /// (`gateway_sse_presence_deferred_total`); `None` when B did not say.
    pub(crate) presence_deferred: Option<u64>,
    /// CPU per reconnect while they opened: replica B with the nats-server, and the load
    /// generator; `origin_us`: replica B alone.
    pub(crate) cpu: PerItem,
    pub(crate) origin_us: f64,
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
pub(crate) fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `origin`'s resumes by what they read: (none, indexed, stream).
async fn resumes_on(gw: &Gateway) -> Option<(u64, u64, u64)> {
    let none = gw.origin.bus_resumes("none").await;
    let indexed = gw.origin.bus_resumes("indexed").await;
    let stream = gw.origin.bus_resumes("stream").await;
    (none.is_some() || indexed.is_some() || stream.is_some())
        .then(|| (none.unwrap_or(0), indexed.unwrap_or(0), stream.unwrap_or(0)))
}

/// Figure 5.
pub(crate) async fn figure_storm(
    args: &Args,
    world: &World,
    http: &reqwest::Client,
    phase: &mut u32,
    octets: &mut Octets,
) -> anyhow::Result<StormResult> {
    let mut a = Gateway::start(world, &[], None).await?;
    let b = Gateway::start(world, &[], Some(&a.token)).await?;
    let n = args.n;
    let set = streams::open(OpenSpec {
        targets: (0..n)
            .map(|_| (a.target("/events"), String::new()))
            .collect(),
        init: true,
        concurrency: args.connect_concurrency,
        first_octet: octets.take(n),
        timeout: Duration::from_secs(60),
    })
    .await;
    anyhow::ensure!(
        set.failed == 0,
        "{} streams failed to open on replica A: {}",
        set.failed,
        set.first_error.clone().unwrap_or_default()
    );
    let ids = set.ids.clone();
    let m = args.storm_missed.min(n);
    // Two runs per such client: the first's result read before the kill (so the client has
    // a frame id to resume from), the second's sent while it is away. With
    // `--storm-read-all` every client reads a first result.
    let first_for = if args.storm_read_all { n } else { m };
    let (before, err) = b
        .execute_all(http, &ids[..first_for], args.setup_concurrency)
        .await;
    let (requests, err2) = b.execute_all(http, &ids[..m], args.setup_concurrency).await;
    if let Some(e) = err.or(err2) {
        println!("  storm: executePlaybook: first error: {e}");
    }
    quiesce(&[a.pid, b.pid, world.nats_pid]).await;
    *phase += 1;
    let run = load::unpaced(
        0..first_for,
        args.inflight,
        b.callbacks(http, Arc::new(before), *phase),
    )
    .await;
    let mut set = set;
    let read_before = set
        .take(*phase, run.sent - run.failed, Duration::from_secs(15))
        .await
        .len();
    quiesce(&[a.pid, b.pid, world.nats_pid]).await;
    let overflows = load::listen_overflows();
    a.origin.kill();
    let last = set.finish(Duration::from_secs(10)).await;
    let with_last_id = last.iter().filter(|l| l.is_some()).count();
    // While they are away: their results go to the replica that is left.
    *phase += 1;
    let p = *phase;
    let run = load::unpaced(
        0..m,
        args.inflight,
        b.callbacks(http, Arc::new(requests), p),
    )
    .await;
    let missed_sent = run.sent - run.failed;
    let targets = ids
        .iter()
        .zip(&last)
        .map(|(id, last)| {
            let mut path = format!("/events?client_id={}", encode(id));
            if let Some(l) = last {
                path.push_str(&format!("&last_event_id={}", encode(l)));
            }
            (b.target(&path), String::new())
        })
        .collect();
    let storm_start = gateway_tests::bench::now_ns();
    let cpu = Cpu::start(&[b.pid, world.nats_pid]);
    let origin_cpu = Cpu::start(&[b.pid]);
    let mut back = streams::open(OpenSpec {
        targets,
        init: true,
        concurrency: args.storm_concurrency,
        first_octet: octets.take(n),
        timeout: Duration::from_secs(60),
    })
    .await;
    let (cpu, origin_us) = (
        cpu.per(back.open_count()),
        origin_cpu.per(back.open_count()).server_us,
    );
    let secs = back.open_time.as_secs_f64();
    let got = back.take(p, missed_sent, Duration::from_secs(20)).await;
    let delivery = DeliveryRow::from_private(run, missed_sent, &got);
    let mut after: Vec<u64> = got
        .iter()
        .map(|d| d.at.saturating_sub(storm_start))
        .collect();
    let (after_p50, after_p99, _) = load::latency_ms(&mut after);
    let result = StormResult {
        clients: n,
        reconnected: back.open_count(),
        failed: back.failed,
        first_error: back.first_error.clone(),
        secs,
        rate: back.connect_rate(),
        missed_sent,
        delivery,
        with_last_id,
        read_before,
        after_p50,
        after_p99,
        overflows: load::listen_overflows().saturating_sub(overflows),
        resumes: resumes_on(&b).await,
        presence_deferred: b.origin.metric("gateway_sse_presence_deferred_total").await,
        cpu,
        origin_us,
    };
    back.close();
    Ok(result)
}

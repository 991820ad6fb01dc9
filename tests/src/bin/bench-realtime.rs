//! `bench-realtime` — the realtime path under load: idle SSE density, fan-out, callback →
//! frame latency and NATS event → frame latency, against real processes on loopback.
//!
//! Starts a nats-server (JetStream), the NoETL stand-in (which creates the `noetl_events`
//! stream) and origin processes on NATS, logs in once, and measures four figures, each
//! printed as a table as soon as it is done:
//!
//! 1. **Idle density** — `/events` streams that read their init frame and then idle, held by
//!    child processes of this binary (`--hold`), since one process may hold only ~20k
//!    sockets here. Server RSS before/after → KiB per connection, at each `--idle-steps`
//!    size, for the origin on NATS and on its embedded memory bus, next to two floors in
//!    the same run: a trivial axum SSE server (`--peer-sse`) and raw tokio sockets
//!    (`--peer-raw`). `--replicas R --per-replica M` adds the many-replica attempt (1b).
//! 2. **Fan-out** — with `--clients` streams open in this process, one frame published to
//!    each through `NatsBus` (as a callback or the bridge would), timed until every client
//!    has it. Peers: the same at `--peer-clients`, and the same publishes to ids nobody
//!    listens to (the publisher's own ceiling).
//! 3. **Callback → frame** — open-loop `POST /api/internal/callback/async` at each
//!    `--cb-rates` rate, each for a request entry written beforehand into the shared
//!    request store; latency = frame arrival − send. Peer at the same rate: `NatsBus`
//!    publishes straight from here (the bus alone, without the handler's K/V round trips).
//! 4. **NATS event → frame** — NoETL-shaped `command.completed` rows published into
//!    `noetl_events` for executions whose interest was recorded, read by the origin's bridge
//!    and delivered as `step.exit`; latency = frame arrival − publish. The JetStream publish
//!    ack time of the same messages is the peer.
//!
//! Figures 3 and 4 run before figure 2 on the same streams: a 10k fan-out burst leaves
//! nats-server busy for a while. Before each measured phase the benchmark waits (≤ 10 s)
//! until the origin and nats-server are nearly idle, and each open-loop phase starts with
//! an unmeasured warm-up (a fifth of a second's worth of sends).
//!
//! A frame's send time travels inside it (callback `data.t`, the event's step name, the
//! bus frame's `params.t`), so every latency is measured on one clock in this process.
//! Everything is bounded: an overall `--deadline-secs`, per-step timeouts, and every child
//! is killed when its handle drops (the harness guards, `kill_on_drop` for our own).
//!
//! Usage: `bench-realtime [--figures 1,2,3,4] [--idle-steps 10000,19000] [--clients 10000]
//! [--cb-rates 1000,10000] [--event-rates 200,500,1000] [--origin-env NAME=value]`; the
//! many-replica attempt alone: `bench-realtime --figures 0 --replicas 6 --per-replica 17000`.
//! `--help` lists every flag.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use clap::Parser;
use futures::future::BoxFuture;
use futures::StreamExt;
use gateway_tests::bench::holder::{self, HoldOptions, Holder, TOKEN_ENV};
use gateway_tests::bench::peer::{self, PeerKind, PeerServer};
use gateway_tests::bench::procfs::{self, CpuSnapshot, Memory};
use gateway_tests::bench::sse_conn::{source_address, SseConn, SseFrame, SseTarget};
use gateway_tests::bench::{ms, now_ns, percentile, Deadline};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::standin::events::{encode_row, EventKind, EventRow, NewEvent, RowPlace, Shape};
use gateway_tests::standin::ids::{ExecutionId, IdGen};
use origin::bridge::interest::add_interest;
use origin::bus::nats::NatsBus;
use origin::bus::{Bus, Retention};
use origin::requests::{self, RequestEntry};
use origin::store::nats::NatsKv;
use origin::store::BucketTtls;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

/// Per-connection memory goal (issue: ≤ 4 KiB per idle SSE connection).
const GOAL_KIB_PER_CONN: f64 = 4.0;
/// Callback → frame goal: p99 under 5 ms.
const GOAL_CALLBACK_P99_MS: f64 = 5.0;
/// Source addresses for figure 1's holders start here (127.0.0.2 …); figure 1b's at
/// 127.0.0.100 ….
const HOLDER_FIRST_OCTET: u8 = 2;
/// Source addresses of figure 1b's holders start here.
const REPLICA_FIRST_OCTET: u8 = 100;
/// Source addresses of the streams this process opens itself (figures 2–4): 127.0.0.200 ….
const LOCAL_FIRST_OCTET: u8 = 200;
/// Connections per source address (one address has ~28k ephemeral ports).
const PER_ADDRESS: usize = 10_000;
/// Time one stream may take to open and send its init frame.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Memory is read this long after the last connection opened, so lazy allocations land.
const SETTLE: Duration = Duration::from_secs(2);
/// How long after the last send the stragglers of a measured phase are awaited.
const DRAIN: Duration = Duration::from_secs(15);
/// Longest wait for the processes to go quiet before a measured phase.
const QUIESCE_MAX: Duration = Duration::from_secs(10);
/// In-flight cap of the open-loop senders (the loader's sockets and memory stay bounded).
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Parser, Debug)]
#[command(
    name = "bench-realtime",
    about = "Realtime benchmark: SSE density, fan-out, callback and NATS event latency"
)]
struct Args {
    /// Which figures to run (1 density, 2 fan-out, 3 callbacks, 4 NATS events; 0 alone:
    /// none, e.g. for `--replicas` only).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    figures: Vec<u8>,
    /// Figure 1: connection counts to measure, cumulative on one process.
    #[arg(long, value_delimiter = ',', default_value = "10000,19000")]
    idle_steps: Vec<usize>,
    /// Figure 1: most streams one holder child opens.
    #[arg(long, default_value_t = 10_000)]
    per_holder: usize,
    /// Streams each holder opens at once.
    #[arg(long, default_value_t = 64)]
    holder_concurrency: usize,
    /// Figure 1b: origin replicas on one NATS for the many-replica attempt (0: skip).
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// Figure 1b: streams per replica.
    #[arg(long, default_value_t = 17_000)]
    per_replica: usize,
    /// Figure 1b: time budget for opening them; what was reached by then is reported.
    #[arg(long, default_value_t = 200)]
    replica_secs: u64,
    /// Figures 2–4: streams open in this process.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Figure 2: the smaller fan-out peer.
    #[arg(long, default_value_t = 1_000)]
    peer_clients: usize,
    /// Figure 2: interleaved rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Figure 3: offered callback rates (per second), each run for `--cb-secs`.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    cb_rates: Vec<u64>,
    /// Figure 3: seconds per rate.
    #[arg(long, default_value_t = 3.0)]
    cb_secs: f64,
    /// Figures 3–4: how many of the open streams the callbacks and events go to.
    #[arg(long, default_value_t = 1_000)]
    targets: usize,
    /// Figure 4: offered event rates (per second), each run for `--event-secs`.
    #[arg(long, value_delimiter = ',', default_value = "200,500,1000")]
    event_rates: Vec<u64>,
    /// Figure 4: seconds per rate.
    #[arg(long, default_value_t = 3.0)]
    event_secs: f64,
    /// Extra environment for every origin, `NAME=value` (repeatable), e.g.
    /// `SSE_PING_INTERVAL=600s` to see what the presence refreshes cost.
    #[arg(long = "origin-env", value_parser = parse_env_pair)]
    origin_env: Vec<(String, String)>,
    /// Everything ends by then (children killed, partial tables printed).
    #[arg(long, default_value_t = 295)]
    deadline_secs: u64,

    /// (internal) Holder mode: open and hold this many idle streams.
    #[arg(long, hide = true)]
    hold: Option<usize>,
    /// (internal) Holder: the server's address.
    #[arg(long, hide = true)]
    target: Option<SocketAddr>,
    /// (internal) Holder: the stream path.
    #[arg(long, hide = true, default_value = "/events")]
    path: String,
    /// (internal) Holder: the first source address.
    #[arg(long, hide = true, default_value = "127.0.0.2")]
    source_ip: Ipv4Addr,
    /// (internal) Holder: connections per source address.
    #[arg(long, hide = true, default_value_t = PER_ADDRESS)]
    per_address: usize,
    /// (internal) Holder: streams opened at once.
    #[arg(long, hide = true, default_value_t = 64)]
    concurrency: usize,
    /// (internal) Holder: per-stream open timeout.
    #[arg(long, hide = true, default_value_t = 60_000)]
    open_timeout_ms: u64,
    /// (internal) Holder: exit after this long whatever happens.
    #[arg(long, hide = true, default_value_t = 300)]
    hold_secs: u64,
    /// (internal) Peer mode: serve the trivial axum SSE server on this address.
    #[arg(long, hide = true)]
    peer_sse: Option<SocketAddr>,
    /// (internal) Peer mode: serve the raw-socket SSE floor on this address.
    #[arg(long, hide = true)]
    peer_raw: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(count) = args.hold {
        let target = args.target.context("--hold needs --target")?;
        let opts = HoldOptions {
            count,
            target: SseTarget {
                addr: target,
                path: args.path.clone(),
                token: std::env::var(TOKEN_ENV).ok(),
            },
            source_first: args.source_ip,
            per_address: args.per_address,
            concurrency: args.concurrency,
            open_timeout: Duration::from_millis(args.open_timeout_ms),
            hold_limit: Duration::from_secs(args.hold_secs),
        };
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(holder::run(opts));
    }
    if let Some(addr) = args.peer_sse.or(args.peer_raw) {
        // The origin's shape: #[tokio::main], one worker per core. The peer ends when the
        // benchmark does (its stdin closes), even if the benchmark was killed.
        let raw = args.peer_raw.is_some();
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                tokio::select! {
                    r = async { if raw { peer::serve_raw(addr).await } else { peer::serve(addr).await } } => r,
                    () = peer::parent_gone() => Ok(()),
                }
            });
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let limit = Duration::from_secs(args.deadline_secs);
            let started = Instant::now();
            // The figures watch the deadline themselves; this is the backstop.
            match tokio::time::timeout(limit + Duration::from_secs(10), bench(&args)).await {
                Ok(r) => r?,
                Err(_) => eprintln!("bench-realtime: overall deadline passed; stopping"),
            }
            println!("wall time {:.1} s", started.elapsed().as_secs_f64());
            anyhow::Ok(())
        })
}

/// The shared world: NATS, the stand-in, one session.
struct World {
    nats: NatsServer,
    nats_pid: u32,
    standin: StandIn,
    client: async_nats::Client,
    exe: PathBuf,
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=value"))
}

/// Origin options: quiet logs, then the `--origin-env` extras.
fn origin_options(nats_url: Option<&str>, args: &Args) -> OriginOptions {
    let base = match nats_url {
        Some(url) => OriginOptions::with_nats(url),
        None => OriginOptions::default(),
    };
    args.origin_env
        .iter()
        .fold(base.env("RUST_LOG", "warn"), |o, (k, v)| o.env(k, v))
}

/// Logs in once through `origin`; returns the session token and the user id.
async fn login(origin: &Origin, standin: &StandIn) -> anyhow::Result<(String, String)> {
    let id_token = standin.dev_token("bench-realtime@example.com").await;
    let v: Value = reqwest::Client::new()
        .post(format!("{}/api/auth/login", origin.url))
        .json(&json!({"auth0_token": id_token}))
        .timeout(Duration::from_secs(20))
        .send()
        .await?
        .json()
        .await?;
    let token = v["session_token"]
        .as_str()
        .with_context(|| format!("login failed: {}", v["error"]))?;
    let user = v["user"]["user_id"].as_str().unwrap_or("bench").to_owned();
    Ok((token.to_owned(), user))
}

fn origin_addr(origin: &Origin) -> anyhow::Result<SocketAddr> {
    origin
        .url
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("origin URL {} is not host:port", origin.url))
}

async fn bench(args: &Args) -> anyhow::Result<()> {
    let deadline = Deadline::after(Duration::from_secs(args.deadline_secs));
    let exe = std::env::current_exe().context("own path")?;
    let mut nats = NatsServer::start().await?;
    let nats_pid = nats.guard().pid();
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..Default::default()
    })
    .await?;
    let client = async_nats::connect(&nats.url).await?;
    // The stand-in creates noetl_events as it starts; origins started before it exists
    // would run their bridge in core mode.
    let js = jetstream::new(client.clone());
    let ready = Deadline::after(Duration::from_secs(10));
    while js.get_stream("noetl_events").await.is_err() {
        anyhow::ensure!(!ready.passed(), "the stand-in never created noetl_events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let world = World {
        nats,
        nats_pid,
        standin,
        client,
        exe,
    };
    println!(
        "bench-realtime: {} cores, load average {}, RLIMIT_NOFILE {}, loopback; nats-server {}; origins RUST_LOG=warn{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        nofile_limit(),
        world.nats.url,
        args.origin_env
            .iter()
            .map(|(k, v)| format!(" {k}={v}"))
            .collect::<String>(),
    );
    if args.figures.contains(&1) {
        if let Err(e) = figure_density(args, &world, deadline).await {
            println!("figure 1 failed: {e:#}");
        }
    }
    if args.replicas > 0 {
        if let Err(e) = figure_replicas(args, &world, deadline).await {
            println!("figure 1b failed: {e:#}");
        }
    }
    if args.figures.iter().any(|f| (2..=4).contains(f)) && deadline.passed() {
        println!("figures 2–4 skipped: deadline");
    } else if args.figures.iter().any(|f| (2..=4).contains(f)) {
        if let Err(e) = figures_live(args, &world, deadline).await {
            println!("figures 2–4 failed: {e:#}");
        }
    }
    Ok(())
}

fn nofile_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------------------
// Figure 1: idle density.

/// One measured size of one server.
struct DensityRow {
    server: &'static str,
    clients: usize,
    established: u64,
    failed: u64,
    dropped: u64,
    connect: Duration,
    before: Memory,
    after: Memory,
    nats_delta_kib: Option<i64>,
    tcp_pages_delta: Option<i64>,
    server_cpu: Duration,
    loader_cpu: Duration,
    error: Option<String>,
}

impl DensityRow {
    fn per_conn(&self, f: impl Fn(&Memory) -> u64) -> f64 {
        (f(&self.after) as f64 - f(&self.before) as f64) / (self.established.max(1) as f64)
    }
}

/// Opens streams in holder children up to each step, reading memory after each.
#[allow(clippy::too_many_arguments)]
async fn ramp(
    server: &'static str,
    pid: u32,
    target: &SseTarget,
    steps: &[usize],
    args: &Args,
    world: &World,
    next_octet: &mut u8,
    deadline: Deadline,
) -> anyhow::Result<Vec<DensityRow>> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = procfs::memory(pid).context("server memory")?;
    let nats_before = procfs::memory(world.nats_pid);
    let tcp_before = procfs::tcp_mem_pages();
    let cpu = CpuSnapshot::take(&[pid]);
    let mut holders: Vec<Holder> = Vec::new();
    let mut rows = Vec::new();
    let mut opened = 0usize;
    for &step in steps {
        if deadline.passed() {
            println!("  {server}: step {step} skipped (deadline)");
            break;
        }
        let started = Instant::now();
        let mut new = Vec::new();
        while opened < step {
            let count = (step - opened).min(args.per_holder);
            let opts = HoldOptions {
                count,
                target: target.clone(),
                source_first: Ipv4Addr::new(127, 0, 0, *next_octet),
                per_address: PER_ADDRESS,
                concurrency: args.holder_concurrency,
                open_timeout: OPEN_TIMEOUT,
                hold_limit: deadline.left() + Duration::from_secs(5),
            };
            *next_octet = next_octet.saturating_add(count.div_ceil(PER_ADDRESS) as u8);
            new.push(Holder::spawn(&world.exe, &opts)?);
            opened += count;
        }
        for h in &new {
            h.wait_ready(deadline).await;
        }
        holders.extend(new);
        let connect = started.elapsed();
        tokio::time::sleep(deadline.within(SETTLE)).await;
        let reports: Vec<_> = holders.iter().map(Holder::report).collect();
        let after = procfs::memory(pid).context("server memory")?;
        rows.push(DensityRow {
            server,
            clients: step,
            established: reports.iter().map(|r| r.ok).sum(),
            failed: reports.iter().map(|r| r.failed).sum(),
            dropped: reports.iter().map(|r| r.dropped).sum(),
            connect,
            before,
            after,
            nats_delta_kib: nats_before
                .zip(procfs::memory(world.nats_pid))
                .map(|(b, a)| a.rss_kib as i64 - b.rss_kib as i64),
            tcp_pages_delta: tcp_before
                .zip(procfs::tcp_mem_pages())
                .map(|(b, a)| a as i64 - b as i64),
            server_cpu: cpu.since(pid),
            loader_cpu: holders.iter().map(|h| procfs::cpu_time(h.pid())).sum(),
            error: reports.iter().find_map(|r| r.error.clone()),
        });
    }
    for h in holders {
        h.stop().await;
    }
    Ok(rows)
}

async fn figure_density(args: &Args, world: &World, deadline: Deadline) -> anyhow::Result<()> {
    let mut next_octet = HOLDER_FIRST_OCTET;
    let mut rows = Vec::new();
    let origins: [(&'static str, OriginOptions); 2] = [
        (
            "origin (NATS bus)",
            origin_options(Some(&world.nats.url), args),
        ),
        ("origin (memory bus)", origin_options(None, args)),
    ];
    for (name, opts) in origins {
        if deadline.passed() {
            break;
        }
        let mut origin = Origin::start(&world.standin, opts).await?;
        let (token, _) = login(&origin, &world.standin).await?;
        let target = SseTarget {
            addr: origin_addr(&origin)?,
            path: "/events".into(),
            token: Some(token),
        };
        let pid = origin.guard().pid();
        // Start-up warnings (e.g. the memory store's "run ONE replica") are not the ramp's.
        let start_lines = origin.log_text().lines().count();
        let measured = ramp(
            name,
            pid,
            &target,
            &args.idle_steps,
            args,
            world,
            &mut next_octet,
            deadline,
        )
        .await?;
        rows.extend(measured);
        let log = origin.log_text();
        let warnings: Vec<&str> = log
            .lines()
            .skip(start_lines)
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        if let Some(first) = warnings.first() {
            println!(
                "  {name} logged {} warnings/errors during the ramp; first: {}",
                warnings.len(),
                first.chars().take(200).collect::<String>()
            );
        }
    }
    let peers = [
        ("axum SSE peer (floor)", PeerKind::Axum),
        ("raw tokio socket peer", PeerKind::Raw),
    ];
    for (name, kind) in peers {
        if deadline.passed() {
            break;
        }
        let peer = PeerServer::start(&world.exe, kind, deadline).await?;
        let target = SseTarget {
            addr: peer.addr,
            path: "/events".into(),
            token: None,
        };
        let measured = ramp(
            name,
            peer.pid,
            &target,
            &args.idle_steps,
            args,
            world,
            &mut next_octet,
            deadline,
        )
        .await?;
        rows.extend(measured);
        peer.stop().await;
    }
    print_density(
        "figure 1 — idle /events streams per server process (each read its init frame, then idles; one session token; holders in child processes)",
        &rows,
    );
    let per = |server: &str, clients: usize| {
        rows.iter()
            .find(|r| r.server == server && r.clients == clients)
            .map(|r| r.per_conn(|m| m.rss_kib))
    };
    let origin_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.server.starts_with("origin"))
        .collect();
    for r in &origin_rows {
        let kib = r.per_conn(|m| m.rss_kib);
        // The origin serves /events with its own lean HTTP/1.1 writer (SSE_LEAN_HTTP), so
        // the hyper/axum floor is not part of it: it is compared with the raw socket.
        let split = match per("raw tokio socket peer", r.clients) {
            Some(raw) => format!(
                " = raw socket+task {raw:.1} + origin's own {:.1} (the axum floor alone: {})",
                kib - raw,
                per("axum SSE peer (floor)", r.clients)
                    .map_or("-".to_owned(), |a| format!("{a:.1}"))
            ),
            None => String::new(),
        };
        println!(
            "goal: ≤ {GOAL_KIB_PER_CONN} KiB per idle connection — {} at {} clients: {kib:.1} KiB{split}: {}",
            r.server,
            r.clients,
            if kib <= GOAL_KIB_PER_CONN {
                "met".to_owned()
            } else {
                format!("NOT met (+{:.1} KiB)", kib - GOAL_KIB_PER_CONN)
            }
        );
    }
    println!(
        "  what an idle origin stream holds: the lean connection task (socket, response body), the SSE body (subscription, one timer, stop signal), a hub entry and a bus inbox (frames allocated only as they arrive) — no hyper buffers, no channel blocks"
    );
    println!();
    Ok(())
}

fn print_density(title: &str, rows: &[DensityRow]) {
    println!("{title}");
    println!(
        "{:<24} {:>7} {:>7} {:>5} {:>5} {:>8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "server",
        "clients",
        "open",
        "fail",
        "drop",
        "conn s",
        "conn/s",
        "RSS0 MiB",
        "RSS1 MiB",
        "KiB/conn",
        "anon/conn",
        "nats/conn",
        "srv CPU s",
        "load CPU s"
    );
    for r in rows {
        println!(
            "{:<24} {:>7} {:>7} {:>5} {:>5} {:>8.1} {:>7.0} {:>8.1} {:>8.1} {:>9.2} {:>9.2} {:>9} {:>9.1} {:>9.1}",
            r.server,
            r.clients,
            r.established,
            r.failed,
            r.dropped,
            r.connect.as_secs_f64(),
            r.established as f64 / r.connect.as_secs_f64().max(1e-3),
            r.before.rss_kib as f64 / 1024.0,
            r.after.rss_kib as f64 / 1024.0,
            r.per_conn(|m| m.rss_kib),
            r.per_conn(|m| m.anon_kib),
            r.nats_delta_kib
                .filter(|_| r.server.starts_with("origin"))
                .map_or("-".into(), |d| format!("{:.2}", d as f64 / r.established.max(1) as f64)),
            r.server_cpu.as_secs_f64(),
            r.loader_cpu.as_secs_f64(),
        );
        if let Some(e) = &r.error {
            println!("  first error: {e}");
        }
    }
    if let Some(r) = rows.iter().find(|r| r.tcp_pages_delta.is_some()) {
        let pages = r.tcp_pages_delta.unwrap_or(0);
        println!(
            "  (kernel TCP buffers, system-wide, not in any RSS: {:+} pages = {:.2} KiB per connection pair at {} clients)",
            pages,
            pages as f64 * 4.0 / r.established.max(1) as f64,
            r.clients
        );
    }
}

// ---------------------------------------------------------------------------------------
// Figure 1b: many replicas on one NATS.

async fn figure_replicas(args: &Args, world: &World, deadline: Deadline) -> anyhow::Result<()> {
    let replicas = args.replicas;
    let mut origins = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        origins.push(
            Origin::start(&world.standin, origin_options(Some(&world.nats.url), args)).await?,
        );
    }
    let (token, _) = login(&origins[0], &world.standin).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids: Vec<u32> = origins.iter_mut().map(|o| o.guard().pid()).collect();
    let before: Vec<Memory> = pids
        .iter()
        .map(|&p| procfs::memory(p).unwrap_or_default())
        .collect();
    let nats_before = procfs::memory(world.nats_pid).unwrap_or_default();
    let mut all = pids.clone();
    all.push(world.nats_pid);
    let cpu = CpuSnapshot::take(&all);
    let budget = Deadline::after(deadline.within(Duration::from_secs(args.replica_secs)));
    let started = Instant::now();
    let mut holders = Vec::new();
    let mut octet = REPLICA_FIRST_OCTET;
    for o in &origins {
        let target = SseTarget {
            addr: origin_addr(o)?,
            path: "/events".into(),
            token: Some(token.clone()),
        };
        let mut left = args.per_replica;
        while left > 0 {
            let count = left.min(args.per_holder);
            holders.push(Holder::spawn(
                &world.exe,
                &HoldOptions {
                    count,
                    target: target.clone(),
                    source_first: Ipv4Addr::new(127, 0, 0, octet),
                    per_address: PER_ADDRESS,
                    concurrency: (args.holder_concurrency / 2).max(8),
                    open_timeout: OPEN_TIMEOUT,
                    hold_limit: deadline.left() + Duration::from_secs(5),
                },
            )?);
            octet = octet.saturating_add(count.div_ceil(PER_ADDRESS) as u8);
            left -= count;
        }
    }
    let want = replicas * args.per_replica;
    let mut last_print = Instant::now();
    let (ok, failed, dropped) = loop {
        let reports: Vec<_> = holders.iter().map(Holder::report).collect();
        let ok: u64 = reports.iter().map(|r| r.ok).sum();
        let failed: u64 = reports.iter().map(|r| r.failed).sum();
        let dropped: u64 = reports.iter().map(|r| r.dropped).sum();
        let done = reports.iter().all(|r| r.ready_after.is_some() || r.exited);
        if done || budget.passed() {
            break (ok, failed, dropped);
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "  replicas: {ok} open, {failed} failed after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = started.elapsed();
    tokio::time::sleep(deadline.within(SETTLE)).await;
    let after: Vec<Memory> = pids
        .iter()
        .map(|&p| procfs::memory(p).unwrap_or_default())
        .collect();
    let nats_after = procfs::memory(world.nats_pid).unwrap_or_default();
    let origin_cpu: Duration = pids.iter().map(|&p| cpu.since(p)).sum();
    let loader_cpu: Duration = holders.iter().map(|h| procfs::cpu_time(h.pid())).sum();
    let first_error = holders.iter().find_map(|h| h.report().error);
    let delta_kib: i64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.rss_kib as i64 - b.rss_kib as i64)
        .sum();
    let per_origin: Vec<String> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| format!("{:.0}", (a.rss_kib as f64 - b.rss_kib as f64) / 1024.0))
        .collect();
    println!(
        "figure 1b — {replicas} origin replicas on one NATS, {} streams each asked ({want} total), holders of ≤ {} in child processes",
        args.per_replica, args.per_holder
    );
    println!(
        "{:>9} {:>9} {:>7} {:>6} {:>8} {:>8} {:>10} {:>9} {:>10} {:>11} {:>11} {:>11}",
        "asked",
        "open",
        "failed",
        "drop",
        "secs",
        "conn/s",
        "ΔRSS MiB",
        "KiB/conn",
        "nats ΔMiB",
        "origin CPU",
        "nats CPU",
        "loader CPU"
    );
    println!(
        "{:>9} {:>9} {:>7} {:>6} {:>8.1} {:>8.0} {:>10.0} {:>9.2} {:>10.0} {:>10.1}s {:>10.1}s {:>10.1}s",
        want,
        ok,
        failed,
        dropped,
        elapsed.as_secs_f64(),
        ok as f64 / elapsed.as_secs_f64().max(1e-3),
        delta_kib as f64 / 1024.0,
        delta_kib as f64 / ok.max(1) as f64,
        (nats_after.rss_kib as f64 - nats_before.rss_kib as f64) / 1024.0,
        origin_cpu.as_secs_f64(),
        cpu.since(world.nats_pid).as_secs_f64(),
        loader_cpu.as_secs_f64(),
    );
    println!("  ΔRSS per origin (MiB): {}", per_origin.join(", "));
    if let Some(e) = first_error {
        println!("  first error: {e}");
    }
    if (ok as usize) < want {
        println!(
            "  reached {ok} of {want} within the {:.0} s budget",
            elapsed.as_secs_f64()
        );
    }
    for h in holders {
        h.stop().await;
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Figures 2–4: streams open in this process.

/// One frame that carried a send time, as its reader saw it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    phase: u32,
    /// Send time (ns, [`now_ns`]).
    sent: u64,
    /// Arrival time (ns, [`now_ns`]).
    at: u64,
    /// Which stream (index into [`LiveClients::ids`]).
    client: u32,
    /// The frame's SSE `id:` (0 if it had none).
    id: u64,
}

/// The phase and send time a measured frame carries, wherever its producer put them.
fn stamp(f: &SseFrame) -> Option<(u32, u64)> {
    let params = &f.data["params"];
    let (p, t) = match f.event.as_str() {
        "playbook/result" => (params["data"]["p"].as_u64()?, params["data"]["t"].as_u64()?),
        "playbook/state" => {
            let name = params["step_name"].as_str()?;
            let (p, t) = name.strip_prefix('p')?.split_once("-t")?;
            (p.parse().ok()?, t.parse().ok()?)
        }
        e if e.starts_with("bench/") => (params["p"].as_u64()?, params["t"].as_u64()?),
        _ => return None,
    };
    Some((u32::try_from(p).ok()?, t))
}

/// Streams open in this process, each with a reader task reporting measured frames.
struct LiveClients {
    /// The client ids of the streams that opened.
    ids: Vec<String>,
    rx: mpsc::UnboundedReceiver<Sample>,
    ended: Arc<AtomicU64>,
    /// Samples of a phase other than the one being collected (late stragglers).
    strays: u64,
}

impl LiveClients {
    /// Opens `n` streams (bounded concurrency, spread over source addresses).
    async fn open(
        target: &SseTarget,
        n: usize,
        deadline: Deadline,
    ) -> anyhow::Result<(Self, Duration, u64, Option<String>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let ended = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Semaphore::new(128));
        let started = Instant::now();
        let mut openers = Vec::with_capacity(n);
        for i in 0..n {
            if deadline.passed() {
                break;
            }
            let permit = gate.clone().acquire_owned().await?;
            let source = source_address(LOCAL_FIRST_OCTET, PER_ADDRESS, i);
            let (target, tx, ended) = (target.clone(), tx.clone(), ended.clone());
            openers.push(tokio::spawn(async move {
                let mut conn = SseConn::open(&target, Some(source), OPEN_TIMEOUT).await?;
                let id = conn.read_init(OPEN_TIMEOUT).await?;
                drop(permit);
                tokio::spawn(read_frames(conn, i as u32, tx, ended));
                anyhow::Ok(id)
            }));
        }
        let mut ids = Vec::with_capacity(n);
        let (mut failed, mut first_error) = (0u64, None);
        for o in openers {
            match o.await {
                Ok(Ok(id)) => ids.push(id),
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let took = started.elapsed();
        Ok((
            Self {
                ids,
                rx,
                ended,
                strays: 0,
            },
            took,
            failed,
            first_error,
        ))
    }

    /// Samples of `phase` until `expected` arrived or `hard` passed; samples of other
    /// phases (warm-ups, stragglers) are counted as strays and dropped.
    async fn collect(&mut self, phase: u32, expected: usize, hard: Deadline) -> Vec<Sample> {
        let mut out = Vec::with_capacity(expected);
        while out.len() < expected {
            match tokio::time::timeout(hard.left(), self.rx.recv()).await {
                Ok(Some(s)) if s.phase == phase => out.push(s),
                Ok(Some(_)) => self.strays += 1,
                Ok(None) | Err(_) => break,
            }
        }
        out
    }

    /// Drops whatever is queued (between phases).
    fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {
            self.strays += 1;
        }
    }
}

async fn read_frames(
    mut conn: SseConn,
    client: u32,
    tx: mpsc::UnboundedSender<Sample>,
    ended: Arc<AtomicU64>,
) {
    loop {
        match conn.next_frame().await {
            Ok(Some(frame)) => {
                if let Some((phase, sent)) = stamp(&frame) {
                    let at = now_ns();
                    let id = frame.id.unwrap_or(0);
                    if tx
                        .send(Sample {
                            phase,
                            sent,
                            at,
                            client,
                            id,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Ok(None) | Err(_) => {
                ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// CPU of the processes that share the cores, over one measured window.
struct Window {
    cpu: CpuSnapshot,
    pids: [u32; 3],
    started: Instant,
}

impl Window {
    /// Waits (at most [`QUIESCE_MAX`]) until the origin and nats-server are nearly idle,
    /// so a phase does not pay for the backlog of the one before it, then starts counting.
    async fn open_quiet(origin: u32, nats: u32, deadline: Deadline) -> Self {
        let until = Deadline::after(deadline.within(QUIESCE_MAX));
        while !until.passed() {
            let before = CpuSnapshot::take(&[origin, nats]);
            tokio::time::sleep(Duration::from_millis(250)).await;
            let busy = before.since(origin) + before.since(nats);
            if busy <= Duration::from_millis(25) {
                break;
            }
        }
        Self::open(origin, nats)
    }

    fn open(origin: u32, nats: u32) -> Self {
        let pids = [origin, nats, procfs::self_pid()];
        Self {
            cpu: CpuSnapshot::take(&pids),
            pids,
            started: Instant::now(),
        }
    }

    /// (origin, nats, bench) CPU as % of one core over the window.
    fn close(&self) -> [f64; 3] {
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        self.pids
            .map(|p| self.cpu.since(p).as_secs_f64() / wall * 100.0)
    }
}

fn bench_frame(method: &str, phase: u32, t: u64) -> Bytes {
    Bytes::from(
        json!({"jsonrpc": "2.0", "method": method, "params": {"p": phase, "t": t}}).to_string(),
    )
}

async fn figures_live(args: &Args, world: &World, deadline: Deadline) -> anyhow::Result<()> {
    let mut origin =
        Origin::start(&world.standin, origin_options(Some(&world.nats.url), args)).await?;
    let origin_pid = origin.guard().pid();
    let (token, user_id) = login(&origin, &world.standin).await?;
    let target = SseTarget {
        addr: origin_addr(&origin)?,
        path: "/events".into(),
        token: Some(token),
    };
    let (mut live, took, failed, first_error) =
        LiveClients::open(&target, args.clients, deadline).await?;
    println!(
        "figures 2–4: {} /events streams open in this process in {:.1} s ({:.0}/s), {failed} failed{}",
        live.ids.len(),
        took.as_secs_f64(),
        live.ids.len() as f64 / took.as_secs_f64().max(1e-3),
        first_error.map(|e| format!(" (first: {e})")).unwrap_or_default()
    );
    anyhow::ensure!(!live.ids.is_empty(), "no stream opened");
    let bus = NatsBus::open(world.client.clone(), Retention::default(), None)
        .await
        .map_err(|e| anyhow::anyhow!("NATS bus: {e}"))?;
    let bus = Arc::new(bus);
    let mut phase = 0u32;
    println!();

    // Fan-out runs last: a 10k burst leaves nats-server busy (and the next callbacks slower)
    // for a while, which would otherwise colour figures 3 and 4.
    let kv = NatsKv::open(world.client.clone(), BucketTtls::default(), None)
        .await
        .map_err(|e| anyhow::anyhow!("NATS K/V: {e}"))?;
    if args.figures.contains(&3) && !deadline.passed() {
        figure_callbacks(
            args, world, &origin, origin_pid, &kv, &bus, &user_id, &mut live, &mut phase, deadline,
        )
        .await;
    }
    if args.figures.contains(&4) && !deadline.passed() {
        figure_events(
            args, world, origin_pid, &kv, &mut live, &mut phase, deadline,
        )
        .await;
    }
    if args.figures.contains(&2) && !deadline.passed() {
        figure_fanout(
            args, world, origin_pid, &bus, &mut live, &mut phase, deadline,
        )
        .await;
    }
    let ended = live.ended.load(Ordering::Relaxed);
    let warnings = origin
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    println!(
        "streams that ended during figures 2–4: {ended}; origin warnings/errors logged: {warnings}; frames not measured (warm-ups, or after a phase closed): {}",
        live.strays
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Figure 2: fan-out.

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

#[allow(clippy::too_many_arguments)]
async fn figure_fanout(
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

/// What one open-loop run did.
struct OpenLoop {
    sent: usize,
    /// From the first to the last send.
    send_window: Duration,
    /// How late sends were against their schedule (ns), ascending.
    lag: Vec<u64>,
    /// Outcome per send: an HTTP status, 0 for a transport error, 1 for a bus/ack success.
    outcomes: Vec<u16>,
    /// Extra per-send timings the sender reported (e.g. publish-ack time), ascending.
    extra: Vec<u64>,
}

/// Sends `n` items at `rate` per second on schedule (not waiting for answers), with at most
/// [`MAX_IN_FLIGHT`] unanswered; `send(i, t)` gets the item index and its send time.
async fn open_loop<F>(rate: u64, n: usize, deadline: Deadline, send: F) -> OpenLoop
where
    F: Fn(usize, u64) -> BoxFuture<'static, Sent>,
{
    let gate = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let started = tokio::time::Instant::now();
    let per = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut lag = Vec::with_capacity(n);
    let mut last_send = Duration::ZERO;
    let mut sent = 0;
    while sent < n && !deadline.passed() {
        let due = started + per * sent as u32;
        tokio::time::sleep_until(due).await;
        // Everything due by now goes out in this wake-up (the timer's resolution is 1 ms).
        let now = tokio::time::Instant::now();
        while sent < n && started + per * sent as u32 <= now {
            let Ok(permit) = gate.clone().acquire_owned().await else {
                break;
            };
            let t = now_ns();
            let scheduled = started + per * sent as u32;
            lag.push(
                u64::try_from(
                    tokio::time::Instant::now()
                        .saturating_duration_since(scheduled)
                        .as_nanos(),
                )
                .unwrap_or(u64::MAX),
            );
            let fut = send(sent, t);
            tasks.spawn(async move {
                let r = fut.await;
                drop(permit);
                r
            });
            sent += 1;
            last_send = started.elapsed();
        }
    }
    let mut outcomes = Vec::with_capacity(sent);
    let mut extra = Vec::new();
    let finish = Deadline::after(deadline.within(DRAIN + Duration::from_secs(15)));
    while let Ok(Some(r)) = tokio::time::timeout(finish.left(), tasks.join_next()).await {
        if let Ok((status, x)) = r {
            outcomes.push(status);
            extra.extend(x);
        }
    }
    tasks.abort_all();
    lag.sort_unstable();
    extra.sort_unstable();
    OpenLoop {
        sent,
        send_window: last_send,
        lag,
        outcomes,
        extra,
    }
}

/// What one send reports: an HTTP status (0: transport error; 200 for a bus or publish
/// success) and optionally a timing of its own (ns).
type Sent = (u16, Option<u64>);

/// Warm-up sends before each measured run (connections, pools and caches settle), never
/// measured: a fifth of a second's worth, at least 20.
fn warmup(rate: u64) -> usize {
    (rate / 5).clamp(20, 2000) as usize
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

/// One row of a latency table.
struct LatencyRow {
    name: String,
    offered: u64,
    run: OpenLoop,
    ok: usize,
    delivered: usize,
    lat: Vec<u64>,
    cpu: [f64; 3],
}

fn print_latency(title: &str, extra_name: &str, rows: &[LatencyRow]) {
    println!("{title}");
    println!(
        "{:<30} {:>8} {:>9} {:>7} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>6} {:>6}",
        "variant", "offered", "achieved", "sent", "ok", "bad", "delivered", "p50 ms", "p90 ms", "p99 ms",
        "max ms", "lag p99", extra_name, "orig%", "nats%", "bench%"
    );
    for r in rows {
        let achieved = r.run.sent as f64 / r.run.send_window.as_secs_f64().max(1e-3);
        println!(
            "{:<30} {:>8} {:>9.0} {:>7} {:>7} {:>7} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>9.1} {:>9} {:>6.0} {:>6.0} {:>6.0}",
            r.name,
            r.offered,
            achieved,
            r.run.sent,
            r.ok,
            r.run.sent - r.ok,
            r.delivered,
            ms(percentile(&r.lat, 0.5)),
            ms(percentile(&r.lat, 0.9)),
            ms(percentile(&r.lat, 0.99)),
            ms(r.lat.last().copied().unwrap_or(0)),
            ms(percentile(&r.run.lag, 0.99)),
            if r.run.extra.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", ms(percentile(&r.run.extra, 0.99)))
            },
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
        );
    }
}

// ---------------------------------------------------------------------------------------
// Figure 3: callback → frame.

#[allow(clippy::too_many_arguments)]
async fn figure_callbacks(
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
        let request_ids: Vec<String> = (0..n + warm).map(|_| requests::new_request_id()).collect();
        let created_at = chrono::Utc::now().timestamp();
        let puts: Vec<bool> =
            futures::stream::iter(request_ids.iter().enumerate().map(|(i, id)| {
                let entry = RequestEntry {
                    request_id: id.clone(),
                    client_id: Some(targets[i % targets.len()].clone()),
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
        live.drain();
        let window = Window::open_quiet(origin_pid, world.nats_pid, deadline).await;
        let run = open_loop(rate, n, deadline, cb(warm, p)).await;
        let ok = run
            .outcomes
            .iter()
            .filter(|s| (200..300).contains(*s))
            .count();
        let samples = live
            .collect(p, ok, Deadline::after(deadline.within(DRAIN)))
            .await;
        let cpu = window.close();
        rows.push(latency_row(
            format!("callback → frame @{rate}/s"),
            rate,
            run,
            ok,
            samples,
            cpu,
        ));

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
        live.drain();
        let window = Window::open_quiet(origin_pid, world.nats_pid, deadline).await;
        let run = open_loop(rate, n, deadline, bus_to(bus.clone(), targets.clone(), p)).await;
        let ok = run.outcomes.iter().filter(|s| **s == 200).count();
        let samples = live
            .collect(p, ok, Deadline::after(deadline.within(DRAIN)))
            .await;
        let cpu = window.close();
        rows.push(latency_row(
            format!("bus publish → frame @{rate}/s"),
            rate,
            run,
            ok,
            samples,
            cpu,
        ));
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

fn latency_row(
    name: String,
    offered: u64,
    run: OpenLoop,
    ok: usize,
    samples: Vec<Sample>,
    cpu: [f64; 3],
) -> LatencyRow {
    let mut lat: Vec<u64> = samples
        .iter()
        .map(|s| s.at.saturating_sub(s.sent))
        .collect();
    lat.sort_unstable();
    LatencyRow {
        name,
        offered,
        ok,
        delivered: samples.len(),
        lat,
        run,
        cpu,
    }
}

// ---------------------------------------------------------------------------------------
// Figure 4: NATS event → frame.

#[allow(clippy::too_many_arguments)]
async fn figure_events(
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
    let interest: Vec<bool> = futures::stream::iter(
        executions
            .iter()
            .zip(&targets)
            .map(|(e, c)| async move { add_interest(kv, &e.0.to_string(), c).await.is_ok() }),
    )
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
        live.drain();
        let window = Window::open_quiet(origin_pid, world.nats_pid, deadline).await;
        let run = open_loop(rate, n, deadline, send(p)).await;
        let ok = run.outcomes.iter().filter(|s| **s == 200).count();
        let samples = live
            .collect(p, ok, Deadline::after(deadline.within(DRAIN)))
            .await;
        let cpu = window.close();
        rows.push(latency_row(
            format!("event → step.exit @{rate}/s"),
            rate,
            run,
            ok,
            samples,
            cpu,
        ));
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

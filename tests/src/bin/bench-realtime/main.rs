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
//!
//! A figure that cannot be measured, or whose measurement is invalid (figure 1: a held
//! stream dropped), is printed as failed, and the process then exits with status 1.
//!
//! One module per figure: [`density`] (1), [`replicas`] (1b), [`fanout`] (2), [`callbacks`]
//! (3), [`events`] (4); [`live`] holds the streams figures 2–4 share, [`open_loop`] the
//! driver and latency table of figures 3 and 4, [`common`] the world and origin set-up.

mod callbacks;
mod common;
mod density;
mod events;
mod fanout;
mod live;
mod open_loop;
mod replicas;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use clap::Parser;
use gateway_tests::bench::holder::{self, HoldOptions, TOKEN_ENV};
use gateway_tests::bench::peer;
use gateway_tests::bench::sse_conn::SseTarget;
use gateway_tests::bench::Deadline;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::standin::{StandIn, StandInOptions};

use crate::common::{nofile_limit, World, PER_ADDRESS};

#[derive(Parser, Debug)]
#[command(
    name = "bench-realtime",
    about = "Realtime benchmark: SSE density, fan-out, callback and NATS event latency"
)]
/// The command line (`--help`); the hidden flags are for the child processes.
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
    /// Figure 4: which NoETL the events look like: `rust` (the Rust control plane's rows on
    /// `noetl.events.<event_type>` in `noetl_events`) or `v4` (NoETL 4.x's envelopes on
    /// `noetl.events.<tenant>.<org>.<execution_id>.<shard>` in `NOETL_EVENTS`, tenant
    /// `acme/EU west`, 4 shards). The stand-in creates that stream, so the origin reads it.
    #[arg(long, value_enum, default_value = "rust")]
    event_shape: BenchShape,
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
    let failed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let limit = Duration::from_secs(args.deadline_secs);
            let started = Instant::now();
            // The figures watch the deadline themselves; this is the backstop.
            let failed =
                match tokio::time::timeout(limit + Duration::from_secs(10), bench(&args)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        eprintln!("bench-realtime: overall deadline passed; stopping");
                        0
                    }
                };
            println!("wall time {:.1} s", started.elapsed().as_secs_f64());
            anyhow::Ok(failed)
        })?;
    if failed > 0 {
        eprintln!("bench-realtime: {failed} figure(s) failed");
        std::process::exit(1);
    }
    Ok(())
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=value"))
}

/// Figure 4's event shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BenchShape {
    /// The Rust control plane.
    Rust,
    /// NoETL 4.x's event mirror.
    V4,
}

impl BenchShape {
    fn standin(self) -> gateway_tests::harness::standin::EventShape {
        use gateway_tests::harness::standin::EventShape;
        match self {
            Self::Rust => EventShape::Rust,
            Self::V4 => EventShape::V4,
        }
    }

    fn stream(self) -> &'static str {
        match self {
            Self::Rust => "noetl_events",
            Self::V4 => "NOETL_EVENTS",
        }
    }
}

/// Starts the world and runs the figures asked for; returns how many failed.
async fn bench(args: &Args) -> anyhow::Result<usize> {
    let deadline = Deadline::after(Duration::from_secs(args.deadline_secs));
    let exe = std::env::current_exe().context("own path")?;
    let mut nats = NatsServer::start().await?;
    let nats_pid = nats.guard().pid();
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        event_shape: Some(args.event_shape.standin()),
        tenant: Some(events::V4_TENANT.into()),
        shard_count: Some(events::V4_SHARDS),
        ..Default::default()
    })
    .await?;
    let client = async_nats::connect(&nats.url).await?;
    // The stand-in creates its stream as it starts; origins started before it exists would
    // follow runs over HTTP instead.
    let js = jetstream::new(client.clone());
    let ready = Deadline::after(Duration::from_secs(10));
    let stream = args.event_shape.stream();
    while js.get_stream(stream).await.is_err() {
        anyhow::ensure!(!ready.passed(), "the stand-in never created {stream}");
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
    let mut failed = 0;
    if args.figures.contains(&1) {
        if let Err(e) = density::figure_density(args, &world, deadline).await {
            println!("figure 1 failed: {e:#}");
            failed += 1;
        }
    }
    if args.replicas > 0 {
        if let Err(e) = replicas::figure_replicas(args, &world, deadline).await {
            println!("figure 1b failed: {e:#}");
            failed += 1;
        }
    }
    if args.figures.iter().any(|f| (2..=4).contains(f)) && deadline.passed() {
        println!("figures 2–4 skipped: deadline");
    } else if args.figures.iter().any(|f| (2..=4).contains(f)) {
        if let Err(e) = live::figures_live(args, &world, deadline).await {
            println!("figures 2–4 failed: {e:#}");
            failed += 1;
        }
    }
    Ok(failed)
}

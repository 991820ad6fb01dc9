//! `bench-peers` — the realtime path side by side with nginx + nchan (issue 16): the same
//! shapes from the same load generator (this process's reqwest/hyper client for the sends,
//! its raw-socket SSE reader for the streams) against the gateway (release origin on NATS)
//! and Debian's nginx with Debian's nchan module, in one command, interleaved in rounds.
//!
//! 1. **Connect rate and idle density** — N streams (gateway: `GET /events` on one token;
//!    nchan: N EventSource subscribers), connects/s, server memory before and 3 s after the
//!    last connect, per stream (nginx: master and workers summed).
//! 2. **Private delivery** — one message per stream, paced at `--paced-rate`/s (p50/p99 send →
//!    read) and unpaced (deliveries/s): gateway: a callback for the request executePlaybook
//!    recorded for the stream's client; nchan: an HTTP publish to the stream's channel. Each
//!    row also prints send → answer (p50/p99): a frame read no later than its send's answer
//!    spent its time on the server's answer path, not on the way to the stream.
//! 3. **Broadcast** — `--bc-events` at `--bc-rate`/s to N watchers of one run (gateway:
//!    executePlaybook + subscribeToExecution, NoETL step ends on NATS) / N subscribers of one
//!    channel (nchan): deliveries/s, p50/p99, lost (counted per client by payload).
//! 4. **Density, outside vs inside** — why an outside tool sees more per gateway stream than
//!    `bench-realtime`: variants on fresh origins, memory at several instants ([`density`]).
//! 5. **Reconnect storm** — N clients of a killed replica come back to the other with
//!    `client_id` and `Last-Event-ID`: connects/s against nchan's, and whether each client
//!    got what it missed ([`storm`]).
//! 6. **Soak** (not in the default list: `--figures 6`, ~`--soak-secs` + setup) — N streams
//!    for 10 minutes with steady progress reports and broadcasts, 1 % of the clients
//!    reconnecting per second and a NATS restart at half time: every message accepted
//!    arrives once at its client (checked by sequence), and the origin's RSS stays flat
//!    ([`soak`]). The gateway only: the restart is of the gateway's own NATS.
//!
//! Frames are recognised by their payload only (a marker carrying phase, index and send
//! time; [`streams`]), never by their ids, so the bench reads any frame-id form. The ratios
//! (gateway ÷ nchan, per round) are printed against the goals. `RLIMIT_NOFILE` is
//! raised to the hard limit (≤ 20000) before any child starts, so the children inherit it.
//!
//! Usage: `bench-peers [--figures 1,2,3,4,5] [--rounds 2] [--n 10000] [--paced-rate 1000]
//! [--bc-events 100 --bc-rate 10] [--origin-env NAME=value]`; `--help` lists every flag.
//!
//! Modules: [`rounds`] (figures 1–3), [`density`] (4), [`storm`] (5), [`soak`] (6), [`gateway`] (the
//! origin side), [`nchan`] (the peer), [`streams`] (the SSE side of the load generator),
//! [`load`] (its sending side, pacing, process memory).

mod density;
mod gateway;
mod load;
mod nchan;
mod rounds;
mod soak;
mod storm;
mod streams;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use clap::Parser;
use gateway_tests::bench::Deadline;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::standin::{StandIn, StandInOptions};

use crate::gateway::World;
use crate::rounds::{DeliveryRow, Kind, RoundResult};
use crate::streams::PER_ADDRESS;

#[derive(Parser, Debug)]
#[command(
    name = "bench-peers",
    about = "The realtime path against nginx + nchan: private delivery, broadcast, density, connects, reconnect storm"
)]
/// The command line (`--help`).
pub(crate) struct Args {
    /// Figures: 1 connect/density, 2 private delivery, 3 broadcast (these three run in
    /// rounds), 4 the density variants, 5 the reconnect storm, 6 the soak (not by default).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    figures: Vec<u8>,
    /// Interleaved rounds of figures 1–3 (each server once per round, order alternating).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Streams (clients) per server, the same for both.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Figure 2: the paced rate (per second).
    #[arg(long, default_value_t = 1_000)]
    paced_rate: u64,
    /// Figure 2: seconds at the paced rate (the rest of the N messages go unpaced).
    #[arg(long, default_value_t = 2.0)]
    paced_secs: f64,
    /// Sends in flight at most (paced), and the unpaced senders.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Figure 3: events per broadcast.
    #[arg(long, default_value_t = 100)]
    bc_events: usize,
    /// Figure 3: events per second.
    #[arg(long, default_value_t = 10)]
    bc_rate: u64,
    /// executePlaybook / subscribeToExecution calls at once while setting up (unmeasured).
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// nginx's `worker_processes` (default: the number of cores, as the origin's runtime).
    #[arg(long)]
    nchan_workers: Option<usize>,
    /// Figure 4: streams per variant (default: `--n`).
    #[arg(long)]
    density_n: Option<usize>,
    /// Figure 4: the late reading of the first variant, seconds after the last connect.
    #[arg(long, default_value_t = 30.0)]
    density_late: f64,
    /// Figure 5: clients sent a callback while away.
    #[arg(long, default_value_t = 1_000)]
    storm_missed: usize,
    /// Figure 5: reconnects at once.
    #[arg(long, default_value_t = 512)]
    storm_concurrency: usize,
    /// Figure 5: every client (not only the `--storm-missed` ones) reads a result on
    /// replica A before the kill, so every one comes back with a frame id — a replica's
    /// clients as they usually are, having read what they were sent.
    #[arg(long)]
    storm_read_all: bool,
    /// Figure 6: seconds of the soak.
    #[arg(long, default_value_t = 600.0)]
    soak_secs: f64,
    /// Figure 6: streams (default: `--n`).
    #[arg(long)]
    soak_n: Option<usize>,
    /// Figure 6: progress reports per second.
    #[arg(long, default_value_t = 100)]
    soak_callback_rate: u64,
    /// Figure 6: clients with a request that progress reports go to.
    #[arg(long, default_value_t = 1_000)]
    soak_callback_clients: usize,
    /// Figure 6: seconds between broadcasts (step ends of the run every client follows).
    #[arg(long, default_value_t = 1.0)]
    soak_broadcast_every: f64,
    /// Figure 6: percent of the clients reconnecting per second.
    #[arg(long, default_value_t = 1.0)]
    soak_reconnect_pct: f64,
    /// Extra environment for every origin, `NAME=value` (repeatable).
    #[arg(long = "origin-env", value_parser = parse_env_pair)]
    origin_env: Vec<(String, String)>,
    /// Everything ends by then (figure 6 adds its `--soak-secs` and 5 minutes of setup).
    #[arg(long, default_value_t = 600)]
    deadline_secs: u64,

    #[arg(skip)]
    private: bool,
    #[arg(skip)]
    broadcast: bool,
    #[arg(skip)]
    workers: usize,
}

impl Args {
    pub(crate) fn nchan_workers(&self) -> usize {
        self.workers
    }
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=value"))
}

/// Hands out loopback source addresses, a fresh range for every set of streams (so no
/// set's connections meet an earlier set's TIME_WAIT tuples).
pub(crate) struct Octets(u8);

impl Octets {
    /// The first octet for `count` connections ([`PER_ADDRESS`] per address).
    pub(crate) fn take(&mut self, count: usize) -> u8 {
        let need = count.div_ceil(PER_ADDRESS).max(1);
        if usize::from(self.0) + need > 250 {
            self.0 = 10;
        }
        let first = self.0;
        self.0 += need as u8;
        first
    }
}

/// The soft open-files limit asked for (the hard limit here is 20000).
const NOFILE: u64 = 20_000;

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.private = args.figures.contains(&2);
    args.broadcast = args.figures.contains(&3);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    args.workers = args.nchan_workers.unwrap_or(cores);
    let nofile = load::raise_nofile(NOFILE);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let started = Instant::now();
            let soak = if args.figures.contains(&6) {
                args.soak_secs as u64 + 300
            } else {
                0
            };
            let limit = Duration::from_secs(args.deadline_secs + soak);
            match tokio::time::timeout(limit, bench(&args, nofile, cores)).await {
                Ok(r) => r?,
                Err(_) => println!("bench-peers: deadline passed; stopping"),
            }
            println!("wall time {:.1} s", started.elapsed().as_secs_f64());
            anyhow::Ok(())
        })
}

async fn bench(args: &Args, nofile: u64, cores: usize) -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let nats_pid = nats.guard().pid();
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..Default::default()
    })
    .await?;
    let js = jetstream::new(async_nats::connect(&nats.url).await?);
    // The stand-in creates the event stream as it starts; an origin started before it
    // exists would follow runs over HTTP instead.
    let ready = Deadline::after(Duration::from_secs(10));
    while js.get_stream("noetl_events").await.is_err() {
        anyhow::ensure!(!ready.passed(), "the stand-in never created noetl_events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut world = World {
        nats,
        nats_pid,
        standin,
        js,
        extra_env: args.origin_env.clone(),
    };
    println!(
        "bench-peers: {cores} cores, load average {}, RLIMIT_NOFILE {nofile} (children inherit it), loopback; {} + {} ({} workers); gateway: release origin on NATS, RUST_LOG=warn, per-user quotas off{}; N = {} streams per server, {} at once",
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        nchan::nginx_version(),
        nchan::nchan_module().display(),
        args.nchan_workers(),
        args.origin_env
            .iter()
            .map(|(k, v)| format!(" {k}={v}"))
            .collect::<String>(),
        args.n,
        args.connect_concurrency,
    );
    println!();
    let http = load::http_client(args.inflight.max(args.setup_concurrency) * 2)?;
    let mut phase = 0u32;
    let mut octets = Octets(10);
    let mut results: Vec<RoundResult> = Vec::new();
    if args.figures.iter().any(|f| (1..=3).contains(f)) {
        for round in 1..=args.rounds {
            let order = if round % 2 == 1 {
                [Kind::Gateway, Kind::Nchan]
            } else {
                [Kind::Nchan, Kind::Gateway]
            };
            for kind in order {
                let r = match kind {
                    Kind::Gateway => {
                        rounds::gateway_round(args, &world, round, &http, &mut phase, &mut octets)
                            .await
                    }
                    Kind::Nchan => {
                        rounds::nchan_round(args, round, &http, &mut phase, &mut octets, nofile)
                            .await
                    }
                };
                match r {
                    Ok(r) => {
                        print_result(&r);
                        results.push(r);
                    }
                    Err(e) => println!("round {round}, {}: failed: {e:#}", kind.name()),
                }
            }
        }
        print_summary(args, &results);
    }
    if args.figures.contains(&4) {
        let n = args.density_n.unwrap_or(args.n);
        let rows = density::figure_density(args, &world, &mut octets).await;
        density::print_density(&rows, n, args.density_late);
    }
    if args.figures.contains(&5) {
        match storm::figure_storm(args, &world, &http, &mut phase, &mut octets).await {
            Ok(s) => print_storm(args, &s, &results),
            Err(e) => println!("figure 5 failed: {e:#}"),
        }
    }
    if args.figures.contains(&6) {
        match soak::figure_soak(args, &mut world, &http, &mut octets).await {
            Ok(s) => soak::print_soak(args, &s),
            Err(e) => println!("figure 6 failed: {e:#}"),
        }
    }
    Ok(())
}

fn print_result(r: &RoundResult) {
    let c = &r.connect;
    println!(
        "round {} {}: {} of {} streams open ({} failed, {} listen-queue overflows) in {:.2} s = {:.0} conn/s; RSS {:.1} → {:.1} MiB (+3 s): {:.2} KiB/stream (+0 s: {:.2}; PSS {:.2}; anon {:.2}); CPU per connect: server {:.0} µs, load generator {:.0} µs",
        r.round,
        r.kind.name(),
        c.open,
        c.asked,
        c.failed,
        c.overflows,
        c.secs,
        c.rate,
        c.before.rss as f64 / 1024.0,
        c.at3.rss as f64 / 1024.0,
        c.per(&c.at3, |m| m.rss),
        c.per(&c.at0, |m| m.rss),
        c.per(&c.at3, |m| m.pss),
        c.per(&c.at3, |m| m.anon),
        c.cpu.server_us,
        c.cpu.loader_us,
    );
    let row = |name: &str, d: &DeliveryRow| {
        println!(
            "  {name:<10} sent {:>6} (failed {}) delivered {:>7}/{:<7} lost {:>6} dup {} misrouted {}: {:>8.0} deliveries/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms{}",
            d.run.sent,
            d.run.failed,
            d.unique,
            d.expected,
            d.lost(),
            d.dup,
            d.misrouted,
            d.rate,
            d.p50,
            d.p99,
            d.max,
            if d.run.lag_p99 > 0 {
                format!(", send lag p99 {:.2} ms", d.run.lag_p99 as f64 / 1e6)
            } else {
                String::new()
            },
        );
        let (a50, a99) = d.answered_ms();
        println!(
            "  {:<10} CPU: server {:.0} %, load generator {:.0} % of one core; sends answered p50 {a50:.2} ms, p99 {a99:.2} ms",
            "", d.server_cpu, d.loader_cpu
        );
    };
    if let Some(d) = &r.paced {
        row("paced", d);
    }
    if let Some(d) = &r.unpaced {
        row("unpaced", d);
    }
    if let Some(d) = &r.broadcast {
        row("broadcast", d);
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
    if let Some(e) = &c.error {
        println!("  first open error: {e}");
    }
}

/// `gateway ÷ nchan` of one figure in one round, and whether the goal holds.
fn ratio_line(
    what: &str,
    goal: &str,
    pairs: &[(usize, f64, f64)],
    met: impl Fn(f64, f64) -> bool,
    unit: &str,
) {
    let per: Vec<String> = pairs
        .iter()
        .map(|(round, g, n)| {
            format!(
                "round {round}: {g:.2} vs {n:.2} {unit} = {:.2}× ({})",
                g / n.max(1e-9),
                if met(*g, *n) { "met" } else { "NOT met" }
            )
        })
        .collect();
    println!("goal: {what} {goal} — {}", per.join("; "));
}

fn pairs(
    results: &[RoundResult],
    f: impl Fn(&RoundResult) -> Option<f64>,
) -> Vec<(usize, f64, f64)> {
    let mut out = Vec::new();
    for g in results.iter().filter(|r| r.kind == Kind::Gateway) {
        if let Some(n) = results
            .iter()
            .find(|r| r.kind == Kind::Nchan && r.round == g.round)
        {
            if let (Some(a), Some(b)) = (f(g), f(n)) {
                out.push((g.round, a, b));
            }
        }
    }
    out
}

fn print_summary(args: &Args, results: &[RoundResult]) {
    println!();
    println!(
        "summary — gateway ÷ nginx+nchan per round (same N = {}, same client, same shapes; ratios within a round are the figure)",
        args.n
    );
    ratio_line(
        "SSE connects/s",
        "(reference for the storm's ≥ 0.5×)",
        &pairs(results, |r| Some(r.connect.rate)),
        |g, n| g >= 0.5 * n,
        "conn/s",
    );
    let cpu = pairs(results, |r| Some(r.connect.cpu.server_us));
    if !cpu.is_empty() {
        println!(
            "     server CPU per connect (the gateway: origin + nats-server; not a goal, steadier than the rate) — {}",
            cpu.iter()
                .map(|(round, g, n)| format!("round {round}: {g:.0} vs {n:.0} µs = {:.2}×", g / n.max(1e-9)))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    ratio_line(
        "idle KiB/stream at +3 s (VmRSS)",
        "gateway ≤ 4 KiB",
        &pairs(results, |r| Some(r.connect.per(&r.connect.at3, |m| m.rss))),
        |g, _| g <= 4.0,
        "KiB",
    );
    ratio_line(
        &format!("private delivery p99 @{}/s", args.paced_rate),
        "≤ 2× nchan's",
        &pairs(results, |r| r.paced.as_ref().map(|d| d.p99)),
        |g, n| g <= 2.0 * n,
        "ms",
    );
    ratio_line(
        "private delivery unpaced",
        "≥ 0.7× nchan's deliveries/s",
        &pairs(results, |r| r.unpaced.as_ref().map(|d| d.rate)),
        |g, n| g >= 0.7 * n,
        "/s",
    );
    ratio_line(
        &format!(
            "broadcast to {} watchers ({} events at {}/s)",
            args.n, args.bc_events, args.bc_rate
        ),
        "deliveries/s ≥ 1.0× nchan's",
        &pairs(results, |r| r.broadcast.as_ref().map(|d| d.rate)),
        |g, n| g >= n,
        "/s",
    );
    // A p99 over the few deliveries made says nothing when most were lost: the goal holds
    // only with every delivery made (the gateway's p99 is then marked with a minus).
    ratio_line(
        "broadcast p99 (gateway's negative when it lost deliveries)",
        "≤ nchan's, 0 lost",
        &pairs(results, |r| {
            r.broadcast
                .as_ref()
                .map(|d| if d.lost() > 0 { -d.p99 } else { d.p99 })
        }),
        |g, n| g >= 0.0 && g <= n,
        "ms",
    );
    let lost: Vec<String> = results
        .iter()
        .filter(|r| r.kind == Kind::Gateway)
        .filter_map(|r| {
            r.broadcast
                .as_ref()
                .map(|d| format!("round {}: {} of {}", r.round, d.lost(), d.expected))
        })
        .collect();
    println!("goal: broadcast 0 lost — gateway lost {}", lost.join("; "));
    println!();
}

fn print_storm(args: &Args, s: &storm::StormResult, results: &[RoundResult]) {
    let d = &s.delivery;
    println!(
        "figure 5 — reconnect storm: {} clients of replica A (SIGKILL) back on replica B with client_id and Last-Event-ID ({} had a frame id: {} read a result on A first), {} at once; {} listen-queue overflows",
        s.clients, s.with_last_id, s.read_before, args.storm_concurrency, s.overflows
    );
    println!(
        "  reconnected {} (failed {}) in {:.2} s = {:.0} conn/s; {} callbacks sent while away: {} read after the reconnect, {} missing, {} read twice; read p50 {:.0} ms, p99 {:.0} ms after the storm began",
        s.reconnected,
        s.failed,
        s.secs,
        s.rate,
        s.missed_sent,
        d.unique,
        d.lost(),
        d.dup,
        s.after_p50,
        s.after_p99
    );
    if let Some(e) = &s.first_error {
        println!("  first error: {e}");
    }
    if let Some((none, indexed, stream)) = s.resumes {
        println!(
            "  replica B's resumes: {none} read nothing from the stream, {indexed} read only the frames its index named, {stream} read it (gateway_bus_resumes_total)"
        );
    }
    if let Some(deferred) = s.presence_deferred {
        println!(
            "  replica B's resumes whose presence waited for the stream's first ping (opens queueing): {deferred} (gateway_sse_presence_deferred_total)"
        );
    }
    let nchan_cpu: Vec<String> = results
        .iter()
        .filter(|r| r.kind == Kind::Nchan)
        .map(|r| {
            format!(
                "{:.0} + {:.0}",
                r.connect.cpu.server_us, r.connect.cpu.loader_us
            )
        })
        .collect();
    println!(
        "  CPU per reconnect: replica B + nats-server {:.0} µs (replica B {:.0}), load generator {:.0} µs; nchan's connects (figure 1, server + load generator): {} µs",
        s.cpu.server_us,
        s.origin_us,
        s.cpu.loader_us,
        if nchan_cpu.is_empty() { "—".to_owned() } else { nchan_cpu.join(", ") }
    );
    let mut nchan: Vec<f64> = results
        .iter()
        .filter(|r| r.kind == Kind::Nchan)
        .map(|r| r.connect.rate)
        .collect();
    nchan.sort_by(f64::total_cmp);
    match nchan.get(nchan.len() / 2) {
        Some(n) => println!(
            "goal: storm ≥ 0.5× nchan's connect rate, each client gets what it missed — {:.0} vs {:.0} conn/s = {:.2}×; {}: {}",
            s.rate,
            n,
            s.rate / n.max(1e-9),
            if d.lost() == 0 && d.dup == 0 { "all missed frames read once" } else { "NOT all missed frames read once" },
            if s.rate >= 0.5 * n && d.lost() == 0 && d.dup == 0 && s.failed == 0 { "met" } else { "NOT met" }
        ),
        None => println!("  (no nchan connect rate in this run to compare with: run figure 1 too)"),
    }
    println!();
}

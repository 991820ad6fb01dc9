//! Figures 1–3, interleaved: in every round each server (a fresh origin, a fresh nginx +
//! nchan; which goes first alternates) gets the same shapes from the same load generator —
//!
//! 1. **connect and density** — N streams opened at `--connect-concurrency`, connects/s,
//!    server memory before and at +0 s and +3 s after the last one opened;
//! 2. **private delivery** — one message per stream: a warm-up, then `--paced-rate`/s for
//!    `--paced-secs` (send → read p50/p99), then the rest unpaced from `--inflight` senders
//!    (deliveries/s); gateway: a callback for the request executePlaybook recorded for that
//!    stream's client; nchan: an HTTP publish to that stream's channel;
//! 3. **broadcast** — `--bc-events` events at `--bc-rate`/s to every stream; gateway: the
//!    streams' clients watch one run (executePlaybook on the first, subscribeToExecution for
//!    the rest), the events are NoETL step ends on NATS; nchan: N subscribers of one channel,
//!    HTTP publishes. Deliveries are counted per client by payload: lost = expected − unique.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::bench::procfs;
use gateway_tests::standin::ids::IdGen;

use crate::gateway::{publishes, step_events, Gateway, World};
use crate::load::{self, latency_ms, memory, Mem, Run};
use crate::nchan::Nchan;
use crate::streams::{self, Delivery, OpenSpec, StreamSet};
use crate::{Args, Octets};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Gateway,
    Nchan,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Nchan => "nginx+nchan",
        }
    }
}

/// Figure 1 of one server in one round.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectRow {
    pub(crate) asked: usize,
    pub(crate) open: usize,
    pub(crate) failed: usize,
    pub(crate) secs: f64,
    pub(crate) rate: f64,
    pub(crate) before: Mem,
    pub(crate) at0: Mem,
    pub(crate) at3: Mem,
    /// Listen-queue overflows (system-wide) while they opened.
    pub(crate) overflows: u64,
    pub(crate) error: Option<String>,
    /// CPU per stream opened (µs) while they opened: the server's processes (the gateway's
    /// with its nats-server), and this process (the load generator).
    pub(crate) cpu: PerItem,
}

impl ConnectRow {
    /// KiB per open stream between `before` and `m`, by `f`.
    pub(crate) fn per(&self, m: &Mem, f: impl Fn(&Mem) -> u64) -> f64 {
        (f(m) as f64 - f(&self.before) as f64) / self.open.max(1) as f64
    }
}

/// A private-delivery or broadcast measurement.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeliveryRow {
    /// Sends made / not accepted.
    pub(crate) run: Run,
    /// Deliveries expected (accepted sends × readers each should reach).
    pub(crate) expected: usize,
    /// Distinct deliveries read (per client, per payload).
    pub(crate) unique: usize,
    /// Frames read again (same client, same payload).
    pub(crate) dup: usize,
    /// Frames read by a stream they were not for.
    pub(crate) misrouted: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// Distinct deliveries per second, first send → last read.
    pub(crate) rate: f64,
    /// CPU over the window, % of one core: the server's processes, and this process (the
    /// load generator: senders and every stream's reader).
    pub(crate) server_cpu: f64,
    pub(crate) loader_cpu: f64,
}

impl DeliveryRow {
    pub(crate) fn lost(&self) -> usize {
        self.expected.saturating_sub(self.unique)
    }

    /// A private delivery's row: each frame is for the stream its index names.
    pub(crate) fn from_private(run: Run, expected: usize, got: &[Delivery]) -> Self {
        Self::from(run, expected, got, true)
    }

    fn from(run: Run, expected: usize, got: &[Delivery], private: bool) -> Self {
        let mut seen = HashSet::with_capacity(got.len());
        let mut lat = Vec::with_capacity(got.len());
        let (mut dup, mut misrouted, mut last) = (0, 0, run.start);
        for d in got {
            if private && d.k != d.client {
                misrouted += 1;
                continue;
            }
            if seen.insert((d.client, d.k)) {
                lat.push(d.latency());
                last = last.max(d.at);
            } else {
                dup += 1;
            }
        }
        let (p50, p99, max) = latency_ms(&mut lat);
        let window = (last.saturating_sub(run.start)) as f64 / 1e9;
        Self {
            unique: seen.len(),
            rate: seen.len() as f64 / window.max(1e-3),
            run,
            expected,
            dup,
            misrouted,
            p50,
            p99,
            max,
            server_cpu: 0.0,
            loader_cpu: 0.0,
        }
    }

    /// Send → answer p50 and p99 (ms) of the accepted sends.
    pub(crate) fn answered_ms(&self) -> (f64, f64) {
        let (p50, p99, _) = latency_ms(&mut self.run.answers.clone());
        (p50, p99)
    }

    /// Adds the CPU used since `cpu` (taken `since` ago) by `server` and this process.
    fn with_cpu(mut self, cpu: &Cpu) -> Self {
        let secs = cpu.at.elapsed().as_secs_f64().max(1e-3);
        let used = |pids: &[u32], before: Duration| {
            let now: Duration = pids.iter().map(|&p| procfs::cpu_time(p)).sum();
            now.saturating_sub(before).as_secs_f64() / secs * 100.0
        };
        self.server_cpu = used(&cpu.server, cpu.server_before);
        self.loader_cpu = used(&[procfs::self_pid()], cpu.loader_before);
        self
    }
}

/// CPU times at the start of a measured window.
pub(crate) struct Cpu {
    at: Instant,
    server: Vec<u32>,
    server_before: Duration,
    loader_before: Duration,
}

/// CPU time per item of a measured window, in µs: a figure that, unlike a rate, does not
/// move with what else the two cores were given meanwhile (the host's steal included).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PerItem {
    pub(crate) server_us: f64,
    pub(crate) loader_us: f64,
}

impl Cpu {
    /// The CPU used since the start by the server and this process, per one of `items`.
    pub(crate) fn per(&self, items: usize) -> PerItem {
        let n = items.max(1) as f64;
        let since = |pids: &[u32], before: Duration| {
            let now: Duration = pids.iter().map(|&p| procfs::cpu_time(p)).sum();
            now.saturating_sub(before).as_secs_f64() * 1e6 / n
        };
        PerItem {
            server_us: since(&self.server, self.server_before),
            loader_us: since(&[procfs::self_pid()], self.loader_before),
        }
    }

    /// Reads the CPU time of `server` (all its processes) and of this process now.
    pub(crate) fn start(server: &[u32]) -> Self {
        Self {
            at: Instant::now(),
            server: server.to_vec(),
            server_before: server.iter().map(|&p| procfs::cpu_time(p)).sum(),
            loader_before: procfs::cpu_time(procfs::self_pid()),
        }
    }
}

/// One server's figures in one round.
#[derive(Debug, Clone)]
pub(crate) struct RoundResult {
    pub(crate) kind: Kind,
    pub(crate) round: usize,
    pub(crate) connect: ConnectRow,
    pub(crate) paced: Option<DeliveryRow>,
    pub(crate) unpaced: Option<DeliveryRow>,
    pub(crate) broadcast: Option<DeliveryRow>,
    pub(crate) notes: Vec<String>,
}

/// Waits (≤ 10 s) until `pids` use under a tenth of a core over half a second: what an
/// earlier step left running (the stand-in's events for new runs) must not land in a
/// measured window.
pub(crate) async fn quiesce(pids: &[u32]) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let before: Duration = pids.iter().map(|&p| procfs::cpu_time(p)).sum();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let used: Duration = pids.iter().map(|&p| procfs::cpu_time(p)).sum();
        if used.saturating_sub(before) < Duration::from_millis(50) {
            return;
        }
    }
}

/// Opens `targets` and reads memory around it (figure 1), and the CPU of `cpu_pids` (the
/// server's processes) while they open.
async fn connect(
    args: &Args,
    pids: &[u32],
    cpu_pids: &[u32],
    targets: Vec<(gateway_tests::bench::sse_conn::SseTarget, String)>,
    init: bool,
    octets: &mut Octets,
) -> (StreamSet, ConnectRow) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = memory(pids);
    let asked = targets.len();
    let overflows = load::listen_overflows();
    let cpu = Cpu::start(cpu_pids);
    let set = streams::open(OpenSpec {
        targets,
        init,
        concurrency: args.connect_concurrency,
        first_octet: octets.take(asked),
        timeout: Duration::from_secs(60),
    })
    .await;
    let cpu = cpu.per(set.open_count());
    let at0 = memory(pids);
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(set.opened_at.elapsed())).await;
    let at3 = memory(pids);
    let row = ConnectRow {
        asked,
        open: set.open_count(),
        failed: set.failed,
        secs: set.open_time.as_secs_f64(),
        rate: set.connect_rate(),
        before,
        at0,
        at3,
        overflows: load::listen_overflows().saturating_sub(overflows),
        error: set.first_error.clone(),
        cpu,
    };
    (set, row)
}

/// The private-delivery index ranges: warm-up, paced, unpaced.
fn private_ranges(args: &Args, n: usize) -> [std::ops::Range<usize>; 3] {
    let warm = (args.paced_rate as usize / 5).min(n / 10);
    let paced = ((args.paced_rate as f64 * args.paced_secs) as usize).min(n - warm);
    [0..warm, warm..warm + paced, warm + paced..n]
}

/// Figure 2 for either server: `send` goes to stream `i` for index `i`.
async fn private(
    args: &Args,
    pids: &[u32],
    set: &mut StreamSet,
    send: impl Fn(u32) -> load::Sender,
    phase: &mut u32,
) -> (DeliveryRow, DeliveryRow) {
    let [warm, paced, rest] = private_ranges(args, set.ids.len());
    *phase += 1;
    let w = load::paced(args.paced_rate, warm.clone(), args.inflight, send(*phase)).await;
    set.take(*phase, w.sent - w.failed, Duration::from_secs(5))
        .await;
    *phase += 1;
    let p = *phase;
    let cpu = Cpu::start(pids);
    let run = load::paced(args.paced_rate, paced, args.inflight, send(p)).await;
    let expect = run.sent - run.failed;
    let got = set.take(p, expect, Duration::from_secs(15)).await;
    let paced_row = DeliveryRow::from(run, expect, &got, true).with_cpu(&cpu);
    *phase += 1;
    let p = *phase;
    let cpu = Cpu::start(pids);
    let run = load::unpaced(rest, args.inflight, send(p)).await;
    let expect = run.sent - run.failed;
    let got = set.take(p, expect, Duration::from_secs(15)).await;
    (
        paced_row,
        DeliveryRow::from(run, expect, &got, true).with_cpu(&cpu),
    )
}

/// Figure 3 for either server: every open stream should read every event once.
async fn broadcast(
    args: &Args,
    pids: &[u32],
    set: &mut StreamSet,
    send: load::Sender,
    phase: u32,
) -> DeliveryRow {
    let cpu = Cpu::start(pids);
    let run = load::paced(args.bc_rate, 0..args.bc_events, args.inflight, send).await;
    // Every event sent is expected at every stream, answered or not: a publish whose answer
    // timed out (nchan answers a publish after its fan-out) may still have been delivered.
    let expect = run.sent * set.open_count();
    let got = set.take(phase, expect, Duration::from_secs(15)).await;
    DeliveryRow::from(run, expect, &got, false).with_cpu(&cpu)
}

/// One round of the gateway: a fresh origin.
pub(crate) async fn gateway_round(
    args: &Args,
    world: &World,
    round: usize,
    http: &reqwest::Client,
    phase: &mut u32,
    octets: &mut Octets,
) -> anyhow::Result<RoundResult> {
    let gw = Gateway::start(world, &[], None).await?;
    let pids = [gw.pid];
    let targets = (0..args.n)
        .map(|_| (gw.target("/events"), String::new()))
        .collect();
    let (mut set, connect) = connect(
        args,
        &pids,
        &[gw.pid, world.nats_pid],
        targets,
        true,
        octets,
    )
    .await;
    let mut notes = Vec::new();
    let mut result = RoundResult {
        kind: Kind::Gateway,
        round,
        connect,
        paced: None,
        unpaced: None,
        broadcast: None,
        notes: Vec::new(),
    };
    if set.failed > 0 {
        notes.push(format!(
            "{} streams failed to open; first error: {}",
            set.failed,
            set.first_error.clone().unwrap_or_default()
        ));
    }
    if args.private {
        let started = Instant::now();
        let (requests, err) = gw.execute_all(http, &set.ids, args.setup_concurrency).await;
        let failed = requests.iter().filter(|r| r.is_none()).count();
        notes.push(format!(
            "executePlaybook for {} clients in {:.1} s ({failed} failed{})",
            requests.len(),
            started.elapsed().as_secs_f64(),
            err.map(|e| format!("; first: {e}")).unwrap_or_default()
        ));
        quiesce(&[gw.pid, world.nats_pid]).await;
        let requests = Arc::new(requests);
        let (paced, unpaced) = private(
            args,
            &[gw.pid, world.nats_pid],
            &mut set,
            |p| gw.callbacks(http, requests.clone(), p),
            phase,
        )
        .await;
        result.paced = Some(paced);
        result.unpaced = Some(unpaced);
    }
    if args.broadcast {
        let started = Instant::now();
        let owner = set.ids[0].clone();
        match gw.execute(http, &owner).await {
            Ok((execution, _)) => {
                let others: Vec<String> = set.ids[1..]
                    .iter()
                    .filter(|c| !c.is_empty())
                    .cloned()
                    .collect();
                let (ok, err) = gw
                    .subscribe_all(http, &execution, &others, args.setup_concurrency)
                    .await;
                notes.push(format!(
                    "broadcast run {execution}: executePlaybook on client 0, subscribeToExecution for {} clients in {:.1} s ({} failed{})",
                    others.len(),
                    started.elapsed().as_secs_f64(),
                    others.len() - ok,
                    err.map(|e| format!("; first: {e}")).unwrap_or_default()
                ));
                quiesce(&[gw.pid, world.nats_pid]).await;
                *phase += 1;
                match execution.parse::<u64>() {
                    Ok(e) => {
                        let send = step_events(world.js.clone(), e, *phase, Arc::new(IdGen::new()));
                        result.broadcast = Some(
                            broadcast(args, &[gw.pid, world.nats_pid], &mut set, send, *phase)
                                .await,
                        );
                    }
                    Err(_) => notes.push(format!("execution id {execution} is not a number")),
                }
            }
            Err(e) => notes.push(format!("broadcast: executePlaybook failed: {e:#}")),
        }
    }
    let ended = set.ended.load(std::sync::atomic::Ordering::Relaxed);
    if ended > 0 {
        notes.push(format!("{ended} streams ended during the round"));
    }
    set.close();
    result.notes = notes;
    Ok(result)
}

/// One round of nginx + nchan: a fresh nginx.
pub(crate) async fn nchan_round(
    args: &Args,
    round: usize,
    http: &reqwest::Client,
    phase: &mut u32,
    octets: &mut Octets,
    nofile: u64,
) -> anyhow::Result<RoundResult> {
    let nchan = Nchan::start(args.nchan_workers(), nofile).await?;
    let pids = nchan.pids();
    let sub = |channel: &str| gateway_tests::bench::sse_conn::SseTarget {
        addr: nchan.addr,
        path: format!("/sub/{channel}"),
        token: None,
    };
    let channels: Vec<String> = (0..args.n).map(|i| format!("r{round}c{i}")).collect();
    let targets = channels.iter().map(|c| (sub(c), c.clone())).collect();
    let (mut set, connect) = connect(args, &pids, &pids, targets, false, octets).await;
    let mut notes = Vec::new();
    let mut result = RoundResult {
        kind: Kind::Nchan,
        round,
        connect,
        paced: None,
        unpaced: None,
        broadcast: None,
        notes: Vec::new(),
    };
    if set.failed > 0 {
        notes.push(format!(
            "{} streams failed to open; first error: {}",
            set.failed,
            set.first_error.clone().unwrap_or_default()
        ));
    }
    if args.private {
        let channels = Arc::new(set.ids.clone());
        let (paced, unpaced) = private(
            args,
            &pids,
            &mut set,
            |p| publishes(http, &nchan.url, channels.clone(), p),
            phase,
        )
        .await;
        result.paced = Some(paced);
        result.unpaced = Some(unpaced);
    }
    if args.broadcast {
        // nchan's peer of "every client watches the run": N subscribers of one channel.
        set.close();
        let channel = format!("r{round}bc");
        let started = Instant::now();
        set = streams::open(OpenSpec {
            targets: (0..args.n)
                .map(|_| (sub(&channel), channel.clone()))
                .collect(),
            init: false,
            concurrency: args.connect_concurrency,
            first_octet: octets.take(args.n),
            timeout: Duration::from_secs(60),
        })
        .await;
        notes.push(format!(
            "broadcast: {} subscribers of channel {channel} opened in {:.1} s ({} failed)",
            set.open_count(),
            started.elapsed().as_secs_f64(),
            set.failed
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        *phase += 1;
        let send = publishes(http, &nchan.url, Arc::new(vec![channel]), *phase);
        result.broadcast = Some(broadcast(args, &pids, &mut set, send, *phase).await);
    }
    let ended = set.ended.load(std::sync::atomic::Ordering::Relaxed);
    if ended > 0 {
        notes.push(format!("{ended} streams ended during the round"));
    }
    set.close();
    nchan.stop();
    result.notes = notes;
    Ok(result)
}

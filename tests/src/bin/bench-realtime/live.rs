//! Figures 2–4's shared part: the streams this process holds open on one origin, each with a
//! reader that reports the frames carrying a send time, and the CPU window around a measured
//! phase. [`figures_live`] opens them and runs the three figures over them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_tests::bench::procfs::{self, CpuSnapshot};
use gateway_tests::bench::sse_conn::{source_address, SseConn, SseFrame, SseTarget};
use gateway_tests::bench::{now_ns, Deadline};
use gateway_tests::harness::origin::Origin;
use origin::bus::nats::NatsBus;
use origin::bus::Retention;
use origin::store::nats::NatsKv;
use origin::store::BucketTtls;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use crate::callbacks::figure_callbacks;
use crate::common::{login, origin_addr, origin_options, World, OPEN_TIMEOUT, PER_ADDRESS};
use crate::events::figure_events;
use crate::fanout::figure_fanout;
use crate::Args;

/// Source addresses of the streams this process opens itself (figures 2–4): 127.0.0.200 ….
const LOCAL_FIRST_OCTET: u8 = 200;
/// Longest wait for the processes to go quiet before a measured phase.
const QUIESCE_MAX: Duration = Duration::from_secs(10);

/// One frame that carried a send time, as its reader saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    phase: u32,
    /// Send time (ns, [`now_ns`]).
    pub(crate) sent: u64,
    /// Arrival time (ns, [`now_ns`]).
    pub(crate) at: u64,
    /// Which stream (index into [`LiveClients::ids`]).
    pub(crate) client: u32,
    /// The frame's SSE `id:` (0 if it had none).
    pub(crate) id: u64,
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
pub(crate) struct LiveClients {
    /// The client ids of the streams that opened.
    pub(crate) ids: Vec<String>,
    rx: mpsc::UnboundedReceiver<Sample>,
    pub(crate) ended: Arc<AtomicU64>,
    /// Samples of a phase other than the one being collected (late stragglers).
    pub(crate) strays: u64,
}

impl LiveClients {
    /// Opens `n` streams (bounded concurrency, spread over source addresses).
    pub(crate) async fn open(
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
    pub(crate) async fn collect(
        &mut self,
        phase: u32,
        expected: usize,
        hard: Deadline,
    ) -> Vec<Sample> {
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
    pub(crate) fn drain(&mut self) {
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
pub(crate) struct Window {
    cpu: CpuSnapshot,
    pids: [u32; 3],
    started: Instant,
}

impl Window {
    /// Waits (at most [`QUIESCE_MAX`]) until the origin and nats-server are nearly idle,
    /// so a phase does not pay for the backlog of the one before it, then starts counting.
    pub(crate) async fn open_quiet(origin: u32, nats: u32, deadline: Deadline) -> Self {
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
    pub(crate) fn close(&self) -> [f64; 3] {
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        self.pids
            .map(|p| self.cpu.since(p).as_secs_f64() / wall * 100.0)
    }
}

/// A JSON-RPC frame for the bus, stamped with the phase and the send time.
pub(crate) fn bench_frame(method: &str, phase: u32, t: u64) -> Bytes {
    Bytes::from(
        json!({"jsonrpc": "2.0", "method": method, "params": {"p": phase, "t": t}}).to_string(),
    )
}

/// Figures 2–4 on one origin: opens `--clients` streams in this process, then runs
/// figures 3, 4 and 2 (in that order, see the binary's docs) over them.
pub(crate) async fn figures_live(
    args: &Args,
    world: &World,
    deadline: Deadline,
) -> anyhow::Result<()> {
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
    let log = origin.log_text();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let warnings = warned.len();
    for line in warned.iter().take(5) {
        println!("  origin: {line}");
    }
    println!(
        "streams that ended during figures 2–4: {ended}; origin warnings/errors logged: {warnings}; frames not measured (warm-ups, or after a phase closed): {}",
        live.strays
    );
    Ok(())
}

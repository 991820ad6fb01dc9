//! `make bench` — the abuse-resistance figure of issue 12 (docs/BENCHMARKS.md): a normal
//! request's latency at the origin, quiet and then under attack, side by side in one run.
//!
//! The origin (this profile's build, default connection limits, `RUST_LOG=warn`, embedded
//! store) runs against the NoETL stand-in. The normal request is an authenticated GraphQL
//! `{ me { userId email roles } }` with a cached session: the commonest request a signed-in
//! client makes, and one that crosses every layer the attack aims at (the accept loop and
//! connection cap, hyper, the body read and its deadline, load shedding, the session
//! cache, GraphQL) without waiting on NoETL, so the figure is the origin's own. It is sent
//! closed-loop by `--clients` keep-alive connections bound to 127.0.0.3.
//!
//! The attack, from 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback, so the flood
//! is one client address and the normal traffic another, as a per-IP limiter sees them):
//! - `--half-open` connections (default 10 000) that each send part of a request head and
//!   then nothing — half `GET /events` (the lean path's probe), half `POST /graphql`
//!   (hyper) — re-opened as soon as the origin closes them at its header timeout;
//! - a login flood: `--flooders` keep-alive connections posting `/api/auth/login` with the
//!   attacker's own valid ID token, `--flood-rate` logins per second in all (default 2000:
//!   6000× the per-address `LOGIN_RATE_LIMIT` of 20/min), or with `--flood-rate 0` each
//!   connection as fast as the answers come — on this two-core machine that saturates the
//!   cores the origin and the normal client share with the attacker, so it measures CPU
//!   sharing more than the origin.
//!
//! `--rounds` rounds (default 2), each with four phases of `--seconds` (default 10, the
//! origin's header timeout, so each attack phase holds one wave of the origin closing the
//! half-open connections and the attacker re-opening them): quiet; the login flood alone;
//! the half-open connections alone (opened first, then held); the half-open connections
//! and the login flood. The attacker then closes everything before the next round, so
//! the phases are interleaved against the machine's noise. Printed: p50/p99/max of the
//! normal request in each phase and their ratio (goal: p99 under attack ≤ 1.2× quiet), the
//! half-open connections held during the window, the flood's answers by status, and the
//! origin's open file descriptors.
//!
//! Usage: `bench-abuse [--half-open N (10000)] [--rounds R (2)] [--seconds S (10)]
//! [--clients C (2)] [--flooders F (4)] [--flood-rate R (2000; 0 = unpaced)]`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::bench::{arg, percentile, us};
use gateway_tests::harness::complete_response;
use gateway_tests::harness::flows::login;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The normal client's source address.
const NORMAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// The attacker's source address.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Connects to `to` from `from` (any free port).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // Closed with a reset, not FIN: the attacker's sockets leave no TIME_WAIT behind to
    // crowd the next round's ports (and a client closing first would).
    socket.set_zero_linger()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one response with a `content-length` body from a kept-alive connection; its
/// status. `buf` keeps bytes past it (none, as nothing is pipelined).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((status, _)) = complete_response(buf) {
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the origin closed the connection mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A POST with a JSON body, as bytes.
fn post(path: &str, token: Option<&str>, body: &str) -> Vec<u8> {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nhost: bench\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One closed-loop normal client for `window`: the latency of every request, in µs.
async fn normal_client(
    to: SocketAddr,
    request: Arc<Vec<u8>>,
    window: Duration,
) -> anyhow::Result<Vec<u64>> {
    let mut stream = connect_from(NORMAL, to).await?;
    let mut buf = Vec::with_capacity(8192);
    let mut out = Vec::new();
    let end = Instant::now() + window;
    while Instant::now() < end {
        let t = Instant::now();
        stream.write_all(&request).await?;
        let status = read_response(&mut stream, &mut buf).await?;
        anyhow::ensure!(status == 200, "the normal request answered {status}");
        out.push(t.elapsed().as_micros() as u64);
    }
    Ok(out)
}

/// `clients` normal clients at once for `window`; all latencies, sorted.
async fn measure(
    to: SocketAddr,
    request: &Arc<Vec<u8>>,
    clients: usize,
    window: Duration,
) -> anyhow::Result<Vec<u64>> {
    // The normal clients run on a runtime (and OS thread) of their own: on the attacker's
    // runtime their latency would include waiting behind 10k holder tasks in this very
    // process, which is the bench's cost, not the origin's.
    let request = request.clone();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let runs =
                (0..clients).map(|_| tokio::spawn(normal_client(to, request.clone(), window)));
            let mut all = Vec::new();
            for r in futures::future::join_all(runs).await {
                all.extend(r??);
            }
            all.sort_unstable();
            Ok(all)
        })
    })
    .await?
}

/// What the half-open holders have done so far.
#[derive(Default)]
struct Holders {
    /// Connections currently open (head sent, not yet closed by the origin).
    open: AtomicU64,
    /// Connections the origin closed (each then re-opened).
    closed_by_origin: AtomicU64,
    /// Connects that failed (retried after a pause).
    failed: AtomicU64,
    stop: AtomicBool,
}

/// One half-open slot: connect, send part of a head, wait for the origin to close it,
/// again — until stopped.
async fn hold(to: SocketAddr, lean: bool, stats: Arc<Holders>) {
    let partial: &[u8] = if lean {
        b"GET /events HTTP/1.1\r\nHost: bench\r\n"
    } else {
        b"POST /graphql HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    };
    let mut sink = [0u8; 512];
    while !stats.stop.load(Ordering::Relaxed) {
        let mut stream = match connect_from(ATTACKER, to).await {
            Ok(s) => s,
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if stream.write_all(partial).await.is_err() {
            continue;
        }
        stats.open.fetch_add(1, Ordering::Relaxed);
        // Whatever the origin sends (a 503 over its cap) is read; the slot ends at close.
        loop {
            tokio::select! {
                r = stream.read(&mut sink) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stats.stop.load(Ordering::Relaxed) { break; }
                }
            }
        }
        stats.open.fetch_sub(1, Ordering::Relaxed);
        stats.closed_by_origin.fetch_add(1, Ordering::Relaxed);
    }
}

/// One login flooder: posts the login as fast as answers come until `stop`; answers by
/// status.
async fn flood(
    to: SocketAddr,
    request: Arc<Vec<u8>>,
    per_sec: u64,
    stop: Arc<AtomicBool>,
) -> BTreeMap<u16, u64> {
    let mut statuses = BTreeMap::new();
    let mut buf = Vec::with_capacity(8192);
    // Paced: one login per tick (a late tick is skipped, not made up in a burst).
    let mut pace = (per_sec > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_nanos(1_000_000_000 / per_sec));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    });
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = connect_from(ATTACKER, to).await else {
            *statuses.entry(0).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            if let Some(t) = pace.as_mut() {
                t.tick().await;
            }
            if stream.write_all(&request).await.is_err() {
                break;
            }
            match read_response(&mut stream, &mut buf).await {
                Ok(status) => *statuses.entry(status).or_default() += 1,
                Err(_) => break,
            }
        }
    }
    statuses
}

/// A running login flood: `flooders` connections, each paced at `per_sec` (0: unpaced).
struct Flood {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<BTreeMap<u16, u64>>>,
}

impl Flood {
    fn start(to: SocketAddr, request: &Arc<Vec<u8>>, flooders: usize, per_sec: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..flooders)
            .map(|_| tokio::spawn(flood(to, request.clone(), per_sec, stop.clone())))
            .collect();
        Self { stop, tasks }
    }

    /// Stops every connection and adds their answers, by status, to `statuses`.
    async fn stop_into(self, statuses: &mut BTreeMap<u16, u64>) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            for (status, n) in task.await? {
                *statuses.entry(status).or_default() += n;
            }
        }
        Ok(())
    }
}

/// The open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn row(name: &str, sorted: &[u64], quiet_p99: u64) -> String {
    let p = |q| percentile(sorted, q);
    format!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.2}× |",
        sorted.len(),
        p(0.5),
        p(0.99),
        sorted.last().copied().unwrap_or(0),
        p(0.99) as f64 / quiet_p99.max(1) as f64
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let half_open = arg("--half-open", 10_000);
    let window = Duration::from_secs(arg("--seconds", 10) as u64);
    let rounds = arg("--rounds", 2);
    let clients = arg("--clients", 2);
    let flooders = arg("--flooders", 4);
    let flood_rate = arg("--flood-rate", 2000) as u64;
    let per_flooder = flood_rate.div_ceil(flooders.max(1) as u64);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "bench-abuse: {} cores, load average {}, {profile} build, loopback; origin with default connection and auth limits, RUST_LOG=warn",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );

    let standin = StandIn::start(StandInOptions::default()).await?;
    // The harness turns the auth limits off for suites that log in many times from one
    // address; the bench runs the origin's defaults (README), as a deployment would.
    let mut origin = Origin::start(
        &standin,
        OriginOptions::default()
            .env("RUST_LOG", "warn")
            .env("LOGIN_RATE_LIMIT", "20/1m")
            .env("AUTH_RATE_LIMIT", "120/1m"),
    )
    .await?;
    let to: SocketAddr = origin.url.trim_start_matches("http://").parse()?;
    let pid = origin.guard().pid();

    let token = login(&origin.url, &standin, "normal@example.com").await;
    let me = Arc::new(post(
        "/graphql",
        Some(&token),
        r#"{"query":"{ me { userId email roles } }"}"#,
    ));
    let attacker_id_token = standin.dev_token("attacker@example.com").await;
    let login_flood = Arc::new(post(
        "/api/auth/login",
        None,
        &format!(r#"{{"auth0_token":"{attacker_id_token}"}}"#),
    ));

    // Warm-up (connections, caches), not counted.
    measure(to, &me, clients, Duration::from_secs(2)).await?;
    let fds_quiet = open_fds(pid);
    let (mut quiet, mut held_only, mut attacked) = (Vec::new(), Vec::new(), Vec::new());
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut ramps, mut held_lo, mut held_hi, mut fds_attack) = (Vec::new(), u64::MAX, 0, 0);
    let (mut closed_held_only, mut closed_in_flood, mut failed) = (0, 0, 0);
    let mut flood_only = Vec::new();
    let mut flood_only_statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for _ in 0..rounds {
        quiet.extend(measure(to, &me, clients, window).await?);

        // The login flood alone: what its own work costs the normal request.
        let floods = Flood::start(to, &login_flood, flooders, per_flooder);
        flood_only.extend(measure(to, &me, clients, window).await?);
        floods.stop_into(&mut flood_only_statuses).await?;

        // The attack: half-open connections first, held, then the flood with them.
        let holders = Arc::new(Holders::default());
        let mut slots = Vec::with_capacity(half_open);
        let ramp = Instant::now();
        for i in 0..half_open {
            slots.push(tokio::spawn(hold(to, i % 2 == 0, holders.clone())));
            if i % 500 == 499 {
                // Let the accept queue drain rather than overflow it.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        while (holders.open.load(Ordering::Relaxed) as usize) < half_open * 95 / 100 {
            anyhow::ensure!(
                ramp.elapsed() < Duration::from_secs(60),
                "only {} of {half_open} half-open connections open after 60 s",
                holders.open.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ramps.push(ramp.elapsed());
        // Half-open alone first: what the connections cost, apart from the flood's work.
        let closed_before = holders.closed_by_origin.load(Ordering::Relaxed);
        held_only.extend(measure(to, &me, clients, window).await?);
        closed_held_only += holders.closed_by_origin.load(Ordering::Relaxed) - closed_before;
        let floods = Flood::start(to, &login_flood, flooders, per_flooder);
        let sampler = {
            let holders = holders.clone();
            tokio::spawn(async move {
                let (mut lo, mut hi, mut fds) = (u64::MAX, 0, 0);
                let end = Instant::now() + window;
                while Instant::now() < end {
                    let open = holders.open.load(Ordering::Relaxed);
                    (lo, hi) = (lo.min(open), hi.max(open));
                    fds = fds.max(open_fds(pid));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                (lo, hi, fds)
            })
        };
        let closed_before = holders.closed_by_origin.load(Ordering::Relaxed);
        attacked.extend(measure(to, &me, clients, window).await?);
        closed_in_flood += holders.closed_by_origin.load(Ordering::Relaxed) - closed_before;
        floods.stop_into(&mut statuses).await?;
        holders.stop.store(true, Ordering::Relaxed);
        let (lo, hi, fds) = sampler.await?;
        (held_lo, held_hi, fds_attack) = (held_lo.min(lo), held_hi.max(hi), fds_attack.max(fds));
        failed += holders.failed.load(Ordering::Relaxed);
        // The attacker leaves: every slot closes its socket before the next quiet phase.
        for s in slots {
            let _ = s.await;
        }
    }
    quiet.sort_unstable();
    flood_only.sort_unstable();
    held_only.sort_unstable();
    attacked.sort_unstable();
    let quiet_p99 = percentile(&quiet, 0.99);
    println!();
    println!(
        "Normal request: POST /graphql {{ me }} with a cached session, {clients} keep-alive clients from {NORMAL}, {rounds} rounds × {window:?} per phase (µs)"
    );
    println!("| phase | requests | p50 | p99 | max | p99 / quiet p99 |");
    println!("|---|---|---|---|---|---|");
    println!("{}", row("quiet", &quiet, quiet_p99));
    println!("{}", row("login flood", &flood_only, quiet_p99));
    println!(
        "{}",
        row(&format!("{half_open} half-open"), &held_only, quiet_p99)
    );
    println!(
        "{}",
        row(
            &format!("{half_open} half-open + login flood"),
            &attacked,
            quiet_p99
        )
    );
    println!();
    let flood_total: u64 = statuses.values().sum();
    let flood_time = window.as_secs_f64() * rounds as f64;
    println!(
        "Attack from {ATTACKER}: {half_open} half-open connections opened in {:?} s per round; held during the flood windows {held_lo}..{held_hi}; closed by the origin (header timeout) and re-opened: {closed_held_only} in the half-open windows, {closed_in_flood} in the flood windows; failed connects {failed}",
        ramps.iter().map(|r| format!("{:.1}", r.as_secs_f64())).collect::<Vec<_>>(),
    );
    println!(
        "Login flood ({flooders} connections, {}): alone {} answers in {flood_time:.0} s by status {flood_only_statuses:?}; with the half-open connections {flood_total} answers in {flood_time:.0} s ({:.0}/s) by status {statuses:?} (0 = connect failed)",
        if flood_rate == 0 {
            "unpaced".to_owned()
        } else {
            format!("paced at {flood_rate}/s")
        },
        flood_only_statuses.values().sum::<u64>(),
        flood_total as f64 / flood_time
    );
    println!("Origin open file descriptors: quiet {fds_quiet}, under attack (max) {fds_attack}");
    let ratio = percentile(&attacked, 0.99) as f64 / quiet_p99.max(1) as f64;
    println!(
        "p99 under attack / quiet: {ratio:.2}× (goal ≤ 1.2×); quiet p50 {:.0} µs",
        us(Duration::from_micros(percentile(&quiet, 0.5)))
    );
    Ok(())
}

//! Figure 1 — idle density: `/events` streams that read their init frame and then idle, held
//! by child processes (`--hold`), against the origin (NATS bus, memory bus) and two floors
//! (a trivial axum SSE server, raw tokio sockets); server RSS before/after → KiB per stream.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context;
use gateway_tests::bench::holder::{HoldOptions, Holder};
use gateway_tests::bench::peer::{PeerKind, PeerServer};
use gateway_tests::bench::procfs::{self, CpuSnapshot, Memory};
use gateway_tests::bench::sse_conn::SseTarget;
use gateway_tests::bench::Deadline;
use gateway_tests::harness::origin::{Origin, OriginOptions};

use crate::common::{login, origin_addr, origin_options, World, OPEN_TIMEOUT, PER_ADDRESS, SETTLE};
use crate::Args;

/// Per-connection memory goal (issue: ≤ 4 KiB per idle SSE connection).
const GOAL_KIB_PER_CONN: f64 = 4.0;
/// Source addresses for figure 1's holders start here (127.0.0.2 …); figure 1b's at
/// 127.0.0.100 ….
const HOLDER_FIRST_OCTET: u8 = 2;

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

/// Figure 1: idle streams held by child processes against each server, memory per stream.
///
/// A stream that dropped during the ramp fails the figure: the per-connection numbers
/// would then be measured on fewer streams than the table claims were held.
pub(crate) async fn figure_density(
    args: &Args,
    world: &World,
    deadline: Deadline,
) -> anyhow::Result<()> {
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
    let dropped: Vec<String> = rows
        .iter()
        .filter(|r| r.dropped > 0)
        .map(|r| format!("{} at {} clients: {}", r.server, r.clients, r.dropped))
        .collect();
    anyhow::ensure!(
        dropped.is_empty(),
        "idle streams dropped while held, so the memory per stream is not measured on what the table says ({})",
        dropped.join("; ")
    );
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

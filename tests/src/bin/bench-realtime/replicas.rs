//! Figure 1b — the many-replica attempt: several origins on one NATS, each holding idle
//! streams opened by child processes, with the memory and CPU they and nats-server use.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use gateway_tests::bench::holder::{HoldOptions, Holder};
use gateway_tests::bench::procfs::{self, CpuSnapshot, Memory};
use gateway_tests::bench::sse_conn::SseTarget;
use gateway_tests::bench::Deadline;
use gateway_tests::harness::origin::Origin;

use crate::common::{login, origin_addr, origin_options, World, OPEN_TIMEOUT, PER_ADDRESS, SETTLE};
use crate::Args;

/// Source addresses of figure 1b's holders start here.
const REPLICA_FIRST_OCTET: u8 = 100;

/// Figure 1b: `--replicas` origins on one NATS, `--per-replica` idle streams each, opened
/// within `--replica-secs`; what was reached by then is reported.
pub(crate) async fn figure_replicas(
    args: &Args,
    world: &World,
    deadline: Deadline,
) -> anyhow::Result<()> {
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

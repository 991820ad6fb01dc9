//! The open-loop driver shared by figures 3 and 4 (sends on schedule, never waiting for
//! answers) and the latency table both print.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use gateway_tests::bench::{ms, now_ns, percentile, Deadline};
use tokio::sync::Semaphore;

use crate::common::DRAIN;
use crate::live::{LiveClients, Sample, Window};

/// In-flight cap of the open-loop senders (the loader's sockets and memory stay bounded).
pub(crate) const MAX_IN_FLIGHT: usize = 1024;

/// What one open-loop run did.
pub(crate) struct OpenLoop {
    pub(crate) sent: usize,
    /// From the first to the last send.
    pub(crate) send_window: Duration,
    /// How late sends were against their schedule (ns), ascending.
    lag: Vec<u64>,
    /// Outcome per send: an HTTP status, 0 for a transport error, 1 for a bus/ack success.
    pub(crate) outcomes: Vec<u16>,
    /// Extra per-send timings the sender reported (e.g. publish-ack time), ascending.
    extra: Vec<u64>,
}

/// Sends `n` items at `rate` per second on schedule (not waiting for answers), with at most
/// [`MAX_IN_FLIGHT`] unanswered; `send(i, t)` gets the item index and its send time.
pub(crate) async fn open_loop<F>(rate: u64, n: usize, deadline: Deadline, send: F) -> OpenLoop
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
pub(crate) type Sent = (u16, Option<u64>);

/// Warm-up sends before each measured run (connections, pools and caches settle), never
/// measured: a fifth of a second's worth, at least 20.
pub(crate) fn warmup(rate: u64) -> usize {
    (rate / 5).clamp(20, 2000) as usize
}

/// One row of a latency table.
pub(crate) struct LatencyRow {
    pub(crate) name: String,
    pub(crate) offered: u64,
    pub(crate) run: OpenLoop,
    ok: usize,
    pub(crate) delivered: usize,
    pub(crate) lat: Vec<u64>,
    cpu: [f64; 3],
}

/// Prints a latency table: a title line, a header, one row per variant.
pub(crate) fn print_latency(title: &str, extra_name: &str, rows: &[LatencyRow]) {
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

/// One measured phase of figures 3 and 4: drops what earlier phases left queued, opens the
/// CPU window (`pids`: origin, nats-server), drives `send` open-loop at `rate`, waits for the
/// frames of the sends `answered` accepts, and makes the table row `name`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn measured_row<F>(
    live: &mut LiveClients,
    name: String,
    rate: u64,
    n: usize,
    deadline: Deadline,
    pids: (u32, u32),
    phase: u32,
    answered: fn(u16) -> bool,
    send: F,
) -> LatencyRow
where
    F: Fn(usize, u64) -> BoxFuture<'static, Sent>,
{
    live.drain();
    let window = Window::open_quiet(pids.0, pids.1, deadline).await;
    let run = open_loop(rate, n, deadline, send).await;
    let ok = run.outcomes.iter().filter(|s| answered(**s)).count();
    let samples = live
        .collect(phase, ok, Deadline::after(deadline.within(DRAIN)))
        .await;
    let cpu = window.close();
    latency_row(name, rate, run, ok, samples, cpu)
}

/// A table row from an open-loop run and the samples its frames produced.
pub(crate) fn latency_row(
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

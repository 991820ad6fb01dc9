//! The one load generator both servers get: a reqwest (hyper/tokio) HTTP client for the
//! sends — the gateway's callbacks and GraphQL, nchan's publishes — with the same pacing,
//! in-flight bounds and timing for both; and what is read about the server processes.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use gateway_tests::bench::{now_ns, percentile};
use tokio::sync::Semaphore;

/// One send: `(index, send time ns)` → whether the server accepted it (2xx).
pub(crate) type Sender = Arc<dyn Fn(usize, u64) -> BoxFuture<'static, bool> + Send + Sync>;

/// The HTTP client every send goes through (no proxy, keep-alive pool, 10 s timeout).
pub(crate) fn http_client(pool: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// What a driver sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct Run {
    /// Sends made.
    pub(crate) sent: usize,
    /// Sends the server did not accept.
    pub(crate) failed: usize,
    /// First send (ns).
    pub(crate) start: u64,
    /// Last send's answer (ns).
    pub(crate) end: u64,
    /// How late the sends went against their schedule, p99 (ns; paced only).
    pub(crate) lag_p99: u64,
    /// Send → answer of each accepted send (ns), unsorted: set beside the send → frame
    /// latency, it says whether a frame waits on the server's answer path (a gateway
    /// callback's store round trips) or on the way to the stream after it.
    pub(crate) answers: Vec<u64>,
}

/// One send, timed: the answer's latency (ns) if the server accepted it.
async fn timed(send: &Sender, i: usize) -> Option<u64> {
    let t = now_ns();
    send(i, t).await.then(|| now_ns().saturating_sub(t))
}

/// Open loop: `send(i, t)` for every `i` of `range` at `rate` per second, each on its own
/// task, at most `inflight` unanswered (beyond that the schedule slips, and the lag shows it).
pub(crate) async fn paced(rate: u64, range: Range<usize>, inflight: usize, send: Sender) -> Run {
    let gate = Arc::new(Semaphore::new(inflight.max(1)));
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let origin = tokio::time::Instant::now();
    let start = now_ns();
    let mut lags = Vec::with_capacity(range.len());
    let mut tasks = Vec::with_capacity(range.len());
    for (n, i) in range.enumerate() {
        let due = origin + period * n as u32;
        tokio::time::sleep_until(due).await;
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        lags.push(u64::try_from(due.elapsed().as_nanos()).unwrap_or(u64::MAX));
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            let answered = timed(&send, i).await;
            drop(permit);
            answered
        }));
    }
    let mut run = Run {
        sent: tasks.len(),
        start,
        ..Run::default()
    };
    for t in tasks {
        match t.await.ok().flatten() {
            Some(ns) => run.answers.push(ns),
            None => run.failed += 1,
        }
    }
    run.end = now_ns();
    lags.sort_unstable();
    run.lag_p99 = percentile(&lags, 0.99);
    run
}

/// Closed loop: `inflight` senders take the next index of `range` as soon as their last send
/// was answered — as fast as the server takes them.
pub(crate) async fn unpaced(range: Range<usize>, inflight: usize, send: Sender) -> Run {
    let next = Arc::new(AtomicUsize::new(range.start));
    let end = range.end;
    let start = now_ns();
    let workers: Vec<_> = (0..inflight.max(1))
        .map(|_| {
            let (next, send) = (next.clone(), send.clone());
            tokio::spawn(async move {
                let (mut failed, mut answers) = (0usize, Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    match timed(&send, i).await {
                        Some(ns) => answers.push(ns),
                        None => failed += 1,
                    }
                }
                (failed, answers)
            })
        })
        .collect();
    let mut run = Run {
        start,
        ..Run::default()
    };
    for w in workers {
        let (failed, answers) = w.await.unwrap_or_default();
        run.sent += failed + answers.len();
        run.failed += failed;
        run.answers.extend(answers);
    }
    run.end = now_ns();
    run
}

/// Memory of a server (summed over its processes), KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Mem {
    /// `VmRSS` (`/proc/<pid>/status`), summed — what an outside tool reads.
    pub(crate) rss: u64,
    /// `Pss` (`/proc/<pid>/smaps_rollup`), summed: shared pages counted once over the
    /// processes (nginx's workers share nchan's memory zone).
    pub(crate) pss: u64,
    /// `Anonymous` (`smaps_rollup`), summed: heap and stacks.
    pub(crate) anon: u64,
}

fn field_kib(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The memory of `pids`, summed.
pub(crate) fn memory(pids: &[u32]) -> Mem {
    pids.iter().fold(Mem::default(), |m, pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        Mem {
            rss: m.rss + field_kib(&status, "VmRSS:"),
            pss: m.pss + field_kib(&rollup, "Pss:"),
            anon: m.anon + field_kib(&rollup, "Anonymous:"),
        }
    })
}

/// Raises this process's soft `RLIMIT_NOFILE` to `min(hard, want)` (children inherit it);
/// returns the soft limit now in force.
pub(crate) fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer, which
    // lives for the whole call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let target = want.min(lim.rlim_max);
        if lim.rlim_cur < target {
            lim.rlim_cur = target;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// Latency percentiles (ms) of the deliveries' send → read times.
pub(crate) fn latency_ms(lat: &mut [u64]) -> (f64, f64, f64) {
    lat.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    (
        ms(percentile(lat, 0.5)),
        ms(percentile(lat, 0.99)),
        ms(percentile(lat, 1.0)),
    )
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`, system-wide): a client whose SYN is
/// dropped retries after a second, which shows as a slow connect.
pub(crate) fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

//! Load-generator child processes that hold idle `/events` streams.
//!
//! One process may hold at most ~20k sockets here (the hard `RLIMIT_NOFILE`), so a test of
//! 19k connections per origin — or 100k over several origins — needs the client side spread
//! over processes too. `bench-realtime --hold N …` is such a child ([`run`]): it opens N
//! streams with bounded concurrency, reads each one's init frame (so the stream is really
//! established), then idles, and reports on stdout, one line a second:
//!
//! ```text
//! progress <ok> <failed> <dropped>
//! ready <ok> <failed> <elapsed_ms>
//! error <first error message>
//! ```
//!
//! It exits when its stdin closes (the parent ended or dropped it) or its hold limit
//! passes, so a child never outlives the benchmark. [`Holder`] is the parent's handle:
//! it spawns the child (killed on drop), parses the lines and waits for `ready`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

use super::sse_conn::{source_address, SseConn, SseTarget};
use super::Deadline;

/// The environment variable a child reads the session token from (not argv, which any
/// local user can see in `ps`).
pub const TOKEN_ENV: &str = "BENCH_REALTIME_SESSION_TOKEN";

/// What a holder child is asked to do.
#[derive(Debug, Clone)]
pub struct HoldOptions {
    /// Streams to open.
    pub count: usize,
    /// Where to open them.
    pub target: SseTarget,
    /// The first source address; the next is used after `per_address` connections.
    pub source_first: Ipv4Addr,
    /// Connections per source address (well under the 28k ephemeral ports of one address).
    pub per_address: usize,
    /// Connections being opened at once.
    pub concurrency: usize,
    /// Time allowed for one stream to open and deliver its init frame.
    pub open_timeout: Duration,
    /// The child exits after this long whatever happens.
    pub hold_limit: Duration,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn line(&self) -> String {
        format!(
            "progress {} {} {}",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed)
        )
    }
}

/// The child's side: open, report, idle until stdin closes or the hold limit passes.
pub async fn run(opts: HoldOptions) -> anyhow::Result<()> {
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let hold_until = Deadline::after(opts.hold_limit);
    let gate = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let octets = opts.source_first.octets();

    let reporter = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                println!("{}", counters.line());
            }
        })
    };

    let mut openers = Vec::with_capacity(opts.count);
    for i in 0..opts.count {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let source = source_address(octets[3], opts.per_address, i);
        let (target, counters, open_timeout) =
            (opts.target.clone(), counters.clone(), opts.open_timeout);
        openers.push(tokio::spawn(async move {
            let opened = async {
                let mut conn = SseConn::open(&target, Some(source), open_timeout).await?;
                conn.read_init(open_timeout).await?;
                anyhow::Ok(conn)
            }
            .await;
            drop(permit);
            match opened {
                Ok(conn) => {
                    counters.ok.fetch_add(1, Ordering::Relaxed);
                    // A task of its own, so the idle connection keeps only a small future.
                    let counters = counters.clone();
                    tokio::spawn(async move {
                        conn.idle().await;
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    let mut first = counters
                        .first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    first.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }));
        if hold_until.passed() {
            break;
        }
    }
    for o in openers {
        let _ = o.await;
    }
    println!(
        "ready {} {} {}",
        counters.ok.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
        started.elapsed().as_millis()
    );
    if let Some(e) = counters
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_deref()
    {
        println!("error {}", e.replace('\n', " "));
    }

    // Hold until the parent closes our stdin (or dies), bounded by the hold limit.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(hold_until.left(), async {
        while let Ok(n) = stdin.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    reporter.abort();
    Ok(())
}

/// What the parent knows about a holder from its reports.
#[derive(Debug, Clone, Default)]
pub struct HolderReport {
    /// Streams open and initialised.
    pub ok: u64,
    /// Streams that failed to open.
    pub failed: u64,
    /// Streams that ended while idling (the server closed them).
    pub dropped: u64,
    /// Set when the child finished opening: how long it took.
    pub ready_after: Option<Duration>,
    /// The child's first error, if any.
    pub error: Option<String>,
    /// True once the child's stdout closed (it exited).
    pub exited: bool,
}

/// The parent's handle on a holder child; the child is killed when this drops.
pub struct Holder {
    child: Child,
    pid: u32,
    report: Arc<Mutex<HolderReport>>,
}

fn parse_line(line: &str, r: &mut HolderReport) {
    let mut words = line.split_whitespace();
    let num = |w: Option<&str>| w.and_then(|v| v.parse::<u64>().ok());
    match words.next() {
        Some("progress") => {
            if let (Some(ok), Some(failed), Some(dropped)) =
                (num(words.next()), num(words.next()), num(words.next()))
            {
                (r.ok, r.failed, r.dropped) = (ok, failed, dropped);
            }
        }
        Some("ready") => {
            if let (Some(ok), Some(failed), Some(ms)) =
                (num(words.next()), num(words.next()), num(words.next()))
            {
                (r.ok, r.failed) = (ok, failed);
                r.ready_after = Some(Duration::from_millis(ms));
            }
        }
        Some("error") => {
            r.error = Some(
                line.trim_start_matches("error ")
                    .chars()
                    .take(300)
                    .collect(),
            );
        }
        _ => {}
    }
}

impl Holder {
    /// Spawns `exe --hold …` with the token in its environment.
    pub fn spawn(exe: &Path, opts: &HoldOptions) -> anyhow::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.arg("--hold")
            .arg(opts.count.to_string())
            .arg("--target")
            .arg(opts.target.addr.to_string())
            .arg("--path")
            .arg(&opts.target.path)
            .arg("--source-ip")
            .arg(opts.source_first.to_string())
            .arg("--per-address")
            .arg(opts.per_address.to_string())
            .arg("--concurrency")
            .arg(opts.concurrency.to_string())
            .arg("--open-timeout-ms")
            .arg(opts.open_timeout.as_millis().to_string())
            .arg("--hold-secs")
            .arg(opts.hold_limit.as_secs().max(1).to_string())
            .env_remove(TOKEN_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(t) = &opts.target.token {
            cmd.env(TOKEN_ENV, t);
        }
        let mut child = cmd.spawn().context("spawn a holder child")?;
        let pid = child.id().context("a just-spawned child has a pid")?;
        let stdout = child.stdout.take().context("holder stdout is piped")?;
        let report = Arc::new(Mutex::new(HolderReport::default()));
        let shared = report.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                parse_line(&line, &mut shared.lock().unwrap_or_else(|p| p.into_inner()));
            }
            shared.lock().unwrap_or_else(|p| p.into_inner()).exited = true;
        });
        Ok(Self { child, pid, report })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The latest report.
    pub fn report(&self) -> HolderReport {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the child has finished opening (or exited), at most until `deadline`.
    pub async fn wait_ready(&self, deadline: Deadline) -> HolderReport {
        loop {
            let r = self.report();
            if r.ready_after.is_some() || r.exited || deadline.passed() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the child and waits (bounded) for it to be reaped.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_update_the_report() {
        let mut r = HolderReport::default();
        parse_line("progress 10 1 0", &mut r);
        assert_eq!((r.ok, r.failed, r.dropped), (10, 1, 0));
        parse_line("ready 12 1 3456", &mut r);
        assert_eq!(r.ready_after, Some(Duration::from_millis(3456)));
        parse_line("error connect refused", &mut r);
        assert_eq!(r.error.as_deref(), Some("connect refused"));
        parse_line("progress x", &mut r);
        assert_eq!(r.ok, 12, "a malformed line changes nothing");
    }
}

//! Figure 4 — why an outside client sees more memory per idle gateway stream than
//! `bench-realtime` reports: the same N idle streams on one token against a fresh release
//! origin (NATS store) in several variants, each read at several instants after the last
//! stream opened —
//!
//! - **as bench-realtime opens them**: 64 at once;
//! - **as an outside load tool opens them**: `--connect-concurrency` at once (a burst);
//! - the burst with glibc's arenas capped (`MALLOC_ARENA_MAX=2`), and also trimming eagerly
//!   (`MALLOC_TRIM_THRESHOLD_`): does allocator retention explain the gap?
//! - **resumed clients**: the clients created (and their streams closed) first, then the N
//!   streams opened again with `?client_id=` — what a stream costs without a new client
//!   record.
//!
//! Every variant reads `VmRSS` and `Anonymous` before and at +0 s, +3 s and +10 s (the first
//! also at `--density-late` seconds), per stream, and once more 3 s after every stream was
//! closed (what the streams leave behind).

use std::time::{Duration, Instant};

use crate::gateway::{Gateway, World};
use crate::load::{memory, Mem};
use crate::streams::{self, OpenSpec};
use crate::{Args, Octets};

/// One variant's readings.
pub(crate) struct DensityRow {
    pub(crate) name: String,
    pub(crate) open: usize,
    pub(crate) failed: usize,
    pub(crate) rate: f64,
    pub(crate) before: Mem,
    /// `(seconds after the last stream opened, memory)`.
    pub(crate) readings: Vec<(f64, Mem)>,
    /// 3 s after every stream was closed again: what the streams leave behind (retained by
    /// the allocator, or state kept per client).
    pub(crate) closed: Mem,
}

impl DensityRow {
    /// KiB per stream at the reading `at` seconds, by `f`.
    pub(crate) fn per(&self, at: f64, f: impl Fn(&Mem) -> u64) -> Option<f64> {
        self.readings
            .iter()
            .find(|(s, _)| (*s - at).abs() < 0.01)
            .map(|(_, m)| (f(m) as f64 - f(&self.before) as f64) / self.open.max(1) as f64)
    }
}

struct Variant {
    name: String,
    env: Vec<(&'static str, &'static str)>,
    concurrency: usize,
    resume: bool,
    late: bool,
}

/// Figure 4: every variant on a fresh origin, one after the other.
pub(crate) async fn figure_density(
    args: &Args,
    world: &World,
    octets: &mut Octets,
) -> Vec<DensityRow> {
    let burst = args.connect_concurrency;
    let variants = [
        Variant {
            name: "64 at once (bench-realtime's way)".into(),
            env: vec![],
            concurrency: 64,
            resume: false,
            late: true,
        },
        Variant {
            name: format!("{burst} at once (an outside tool's burst)"),
            env: vec![],
            concurrency: burst,
            resume: false,
            late: false,
        },
        Variant {
            name: "1024 at once (a bigger burst)".into(),
            env: vec![],
            concurrency: 1024,
            resume: false,
            late: false,
        },
        Variant {
            name: format!("{burst} at once, MALLOC_ARENA_MAX=2"),
            env: vec![("MALLOC_ARENA_MAX", "2")],
            concurrency: burst,
            resume: false,
            late: false,
        },
        Variant {
            name: format!("{burst} at once, MALLOC_ARENA_MAX=2 + MALLOC_TRIM_THRESHOLD_=64K"),
            env: vec![
                ("MALLOC_ARENA_MAX", "2"),
                ("MALLOC_TRIM_THRESHOLD_", "65536"),
            ],
            concurrency: burst,
            resume: false,
            late: false,
        },
        Variant {
            name: format!("{burst} at once, resumed clients (?client_id=)"),
            env: vec![],
            concurrency: burst,
            resume: true,
            late: false,
        },
    ];
    let mut rows = Vec::new();
    for v in variants {
        match variant(args, world, &v, octets).await {
            Ok(row) => rows.push(row),
            Err(e) => println!("  density variant {:?} failed: {e:#}", v.name),
        }
    }
    rows
}

async fn variant(
    args: &Args,
    world: &World,
    v: &Variant,
    octets: &mut Octets,
) -> anyhow::Result<DensityRow> {
    let gw = Gateway::start(world, &v.env, None).await?;
    let pids = [gw.pid];
    let n = args.density_n.unwrap_or(args.n);
    let mut paths = vec!["/events".to_owned(); n];
    if v.resume {
        // Create the clients first, then close their streams: the measured opens only
        // resume them.
        let first = streams::open(OpenSpec {
            targets: (0..n)
                .map(|_| (gw.target("/events"), String::new()))
                .collect(),
            init: true,
            concurrency: v.concurrency,
            first_octet: octets.take(n),
            timeout: Duration::from_secs(60),
        })
        .await;
        paths = first
            .ids
            .iter()
            .map(|id| format!("/events?client_id={id}"))
            .collect();
        first.close();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = memory(&pids);
    let set = streams::open(OpenSpec {
        targets: paths
            .iter()
            .map(|p| (gw.target(p), String::new()))
            .collect(),
        init: true,
        concurrency: v.concurrency,
        first_octet: octets.take(n),
        timeout: Duration::from_secs(60),
    })
    .await;
    let opened: Instant = set.opened_at;
    let mut at = vec![0.0, 3.0, 10.0];
    if v.late && args.density_late > 10.0 {
        at.push(args.density_late);
    }
    let mut readings = Vec::new();
    for s in at {
        tokio::time::sleep(Duration::from_secs_f64(s).saturating_sub(opened.elapsed())).await;
        readings.push((s, memory(&pids)));
    }
    if let Some(e) = &set.first_error {
        println!("  {}: first open error: {e}", v.name);
    }
    let (open, failed, rate) = (set.open_count(), set.failed, set.connect_rate());
    set.close();
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(DensityRow {
        name: v.name.clone(),
        open,
        failed,
        rate,
        before,
        readings,
        closed: memory(&pids),
    })
}

/// Prints figure 4.
pub(crate) fn print_density(rows: &[DensityRow], n: usize, late: f64) {
    println!(
        "figure 4 — idle density as an outside client measures it: {n} idle /events streams on one token, held by this process, fresh release origin (NATS store) per variant; server VmRSS before and after the last stream opened (KiB per stream; anon = smaps Anonymous; closed = still held 3 s after all were closed)"
    );
    println!(
        "{:<58} {:>6} {:>5} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}",
        "variant",
        "open",
        "fail",
        "conn/s",
        "RSS0 MiB",
        "+0 s",
        "+3 s",
        "+10 s",
        format!("+{late:.0} s"),
        "anon +3 s",
        "closed"
    );
    for r in rows {
        let kib = |s: f64| {
            r.per(s, |m| m.rss)
                .map_or("-".to_owned(), |v| format!("{v:.2}"))
        };
        println!(
            "{:<58} {:>6} {:>5} {:>7.0} {:>8.1} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7.2}",
            r.name,
            r.open,
            r.failed,
            r.rate,
            r.before.rss as f64 / 1024.0,
            kib(0.0),
            kib(3.0),
            kib(10.0),
            kib(late),
            r.per(3.0, |m| m.anon)
                .map_or("-".to_owned(), |v| format!("{v:.2}")),
            (r.closed.rss as f64 - r.before.rss as f64) / r.open.max(1) as f64,
        );
    }
    println!();
}

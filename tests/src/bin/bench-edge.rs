//! `bench-edge` — the edge worker on plain `workerd serve`, next to a JavaScript
//! pass-through Worker on the same workerd and the origin alone, in one run.
//!
//! Starts the NoETL stand-in and the origin (embedded memory store, the edge's public key as
//! `EDGE_ASSERTION_PUBLIC_KEY`), logs in once, and runs four `workerd serve` processes from
//! one generated capnp file (tests/fixtures/workerd/bench-edge.capnp.tmpl):
//! - `edge`: our worker as `make edge` built it (edge-worker/build: the JS shim and
//!   index_bg.wasm), with its vars, the test signing key, the `SESSIONS` KV binding and both
//!   rate-limit bindings (an in-isolate stand-in, limits set out of reach), and its
//!   isolate-local session cache at the default `EDGE_L1_TTL`;
//! - `edgeKv`: the same worker with that cache off (`EDGE_L1_TTL=0`): a KV read on every
//!   request, what the edge costs on an isolate's first request for a session;
//! - `kv`: the Workers KV stand-in the `SESSIONS` binding talks to (an in-memory map in its
//!   own process, so its CPU time is counted apart);
//! - `passthrough`: the peer the goal names, a JS Worker that fetches the same path from the
//!   origin and returns the response;
//! - `equivalent`: a second peer, the edge's session path written in plain JS with the same
//!   bindings and the same isolate-local cache (edge-equivalent.js), so the figures separate
//!   what the work costs on workerd from what Rust/wasm adds.
//!
//! Every variant sends the same request — `POST /graphql` `{ me { … } }` with
//! `Authorization: Bearer <session>`, a session route — closed-loop on N keep-alive
//! connections:
//! - **edge** and **JS equivalent**: an isolate-local cache hit (KV is read once per
//!   `EDGE_L1_TTL` per session; the record was put by the edge's first, unmeasured
//!   request), two rate-limit calls, an Ed25519 `x-gateway-assertion`, the forward; the
//!   origin trusts the assertion instead of validating the session;
//! - **edge, L1 off**: the same with a KV hit on every request;
//! - **JS pass-through**: the origin validates the bearer token itself (its session cache:
//!   also a hit);
//! - **origin direct**: no worker, the floor.
//!
//! Rounds interleave the variants (the order rotates each round) so a burst of load from
//! another process hits all of them alike; req/s and CPU per request are medians over rounds,
//! latency percentiles come from every request of every round. CPU per request is the
//! process's utime + stime (`/proc/<pid>/stat`) over the window divided by the answered
//! requests: for a workerd process it includes workerd's own HTTP handling (in and out), for
//! both workers alike. The load generator shares the 2 cores (one thread): its CPU is shown.
//!
//! Usage: `bench-edge [--rounds 5] [--secs 5] [--concurrency 16,64] [--warmup-secs 2]
//! [--edge-build DIR]` (another worker-build output, to compare two builds of the edge).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gateway_shared::routes::DEFAULT_ROUTES;
use gateway_tests::bench::http_load::{self, Target, Window};
use gateway_tests::bench::percentile;
use gateway_tests::bench::procfs::{self, CpuSnapshot};
use gateway_tests::bench::workerd::{self, Workerd};
use gateway_tests::harness::edge::{test_public_key, ALLOWED_ORIGIN, TEST_ASSERTION_SEED};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{flows, free_port, scratch_dir, workspace_root};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "The edge worker on plain workerd vs a JS pass-through Worker and the origin")]
struct Args {
    /// Rounds; each measures every variant at every concurrency once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per measured window.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Keep-alive connections (closed-loop), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    concurrency: Vec<usize>,
    /// Unmeasured seconds per variant before the first round (JIT, pools, caches).
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// The worker-build output to run (index.js, index_bg.wasm); default edge-worker/build.
    /// Another directory compares two builds of the edge with the same benchmark.
    #[arg(long)]
    edge_build: Option<PathBuf>,
}

/// The session route every variant is sent: GraphQL `me`, answered from the caller alone.
const PATH: &str = "/graphql";
const QUERY: &str = r#"{"query":"{ me { userId email displayName roles } }"}"#;
const EMAIL: &str = "bench-edge@example.com";
/// The rate-limit stand-in's limit: out of reach, so every request is counted and none refused.
const RATE_LIMIT: &str = "1000000000";
/// `EDGE_L1_TTL` of the `edge` and `equivalent` processes, set explicitly: the edge's
/// default (edge-worker/src/l1.rs `DEFAULT_L1_TTL_SECS`).
const L1_TTL: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Origin,
    Js,
    Equivalent,
    Edge,
    EdgeKv,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Origin,
        Kind::Js,
        Kind::Equivalent,
        Kind::Edge,
        Kind::EdgeKv,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Origin => "origin direct (floor)",
            Kind::Js => "JS pass-through, workerd",
            Kind::Equivalent => "edge path in JS, workerd",
            Kind::Edge => "edge (Rust/wasm), workerd",
            Kind::EdgeKv => "edge, L1 off (KV each req)",
        }
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    /// Reads the session from KV (and so is measured with the KV stand-in's CPU).
    fn uses_kv(self) -> bool {
        matches!(self, Kind::Equivalent | Kind::Edge | Kind::EdgeKv)
    }

    /// Keeps the session in the isolate for `EDGE_L1_TTL`: KV is read once per TTL.
    fn uses_l1(self) -> bool {
        matches!(self, Kind::Equivalent | Kind::Edge)
    }
}

/// One measured window's figures.
#[derive(Debug, Clone, Default)]
struct Sample {
    rate: f64,
    errors: u64,
    first_error: Option<String>,
    /// CPU µs per answered request: the variant's workerd, the origin, the KV stand-in,
    /// this process (the load generator).
    worker_us: Option<f64>,
    origin_us: f64,
    kv_us: Option<f64>,
    load_us: f64,
}

/// The workerd processes and the scratch directory their configuration lives in.
struct Stack {
    edge: Workerd,
    edge_kv: Workerd,
    equiv: Workerd,
    js: Workerd,
    kv: Workerd,
    dir: tempfile::TempDir,
}

fn compat_date() -> String {
    // The same date the tests' wrangler configuration runs the worker with.
    let toml = std::fs::read_to_string(workspace_root().join("tests/fixtures/wrangler.test.toml"))
        .unwrap_or_default();
    toml.lines()
        .find_map(|l| {
            let v = l.strip_prefix("compatibility_date")?.trim_start();
            Some(v.strip_prefix('=')?.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "2026-11-01".to_owned())
}

impl Stack {
    async fn start(origin_url: &str, build: &Path) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(origin_url, build).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("workerd did not start")))
    }

    async fn start_once(origin_url: &str, build: &Path) -> anyhow::Result<Self> {
        let root = workspace_root();
        let fixtures = root.join("tests/fixtures/workerd");
        let dir = scratch_dir("gw-bench-edge-");
        for (from, name) in [
            (build.join("index.js"), "index.js"),
            (build.join("index_bg.wasm"), "index_bg.wasm"),
            (fixtures.join("passthrough.js"), "passthrough.js"),
            (fixtures.join("edge-equivalent.js"), "edge-equivalent.js"),
            (fixtures.join("kv-store.js"), "kv-store.js"),
            (
                fixtures.join("ratelimit-binding.js"),
                "ratelimit-binding.js",
            ),
        ] {
            std::fs::copy(&from, dir.path().join(name)).with_context(|| {
                format!(
                    "copying {} (build the edge worker first: `make edge`)",
                    from.display()
                )
            })?;
        }
        let (kv_port, edge_port, js_port) = (free_port(), free_port(), free_port());
        let (equiv_port, edge_kv_port) = (free_port(), free_port());
        let template = std::fs::read_to_string(fixtures.join("bench-edge.capnp.tmpl"))?;
        let config = workerd::render(
            &template,
            &[
                ("KV_PORT", kv_port.to_string()),
                ("EDGE_PORT", edge_port.to_string()),
                ("JS_PORT", js_port.to_string()),
                ("EQUIV_PORT", equiv_port.to_string()),
                ("EDGE_KV_PORT", edge_kv_port.to_string()),
                ("EDGE_L1_TTL", L1_TTL.to_string()),
                ("ORIGIN_URL", origin_url.to_owned()),
                ("COMPAT_DATE", compat_date()),
                ("EDGE_ASSERTION_KEY", TEST_ASSERTION_SEED.to_owned()),
                ("EDGE_ASSERTION_PUBLIC_KEY", test_public_key()),
                ("CORS_ALLOWED_ORIGINS", ALLOWED_ORIGIN.to_owned()),
                ("ROUTES", DEFAULT_ROUTES.to_owned()),
                ("RATE_LIMIT", RATE_LIMIT.to_owned()),
            ],
        )?;
        let path = dir.path().join("bench-edge.capnp");
        std::fs::write(&path, config)?;
        let log = |n: &str| dir.path().join(format!("workerd-{n}.log"));
        let kv = Workerd::start(&path, "kv", kv_port, "/_bench/stats", log("kv")).await?;
        let edge = Workerd::start(&path, "edge", edge_port, "/health", log("edge")).await?;
        let edge_kv =
            Workerd::start(&path, "edgeKv", edge_kv_port, "/health", log("edge-kv")).await?;
        // The pass-through has no /health of its own: this is the origin's, through it.
        let js = Workerd::start(&path, "passthrough", js_port, "/health", log("js")).await?;
        let equiv = Workerd::start(
            &path,
            "equivalent",
            equiv_port,
            "/health",
            log("equivalent"),
        )
        .await?;
        Ok(Self {
            edge,
            edge_kv,
            equiv,
            js,
            kv,
            dir,
        })
    }

    fn config_dir(&self) -> &Path {
        self.dir.path()
    }
}

async fn kv_stats(kv: &Workerd) -> anyhow::Result<Value> {
    Ok(reqwest::get(format!("{}/_bench/stats", kv.url))
        .await?
        .json()
        .await?)
}

fn stat(v: &Value, name: &str) -> i64 {
    v[name].as_i64().unwrap_or(0)
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `gzip -9` size of a file (what `make edge` prints); `None` without gzip.
fn gzip_size(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("gzip")
        .args(["-9", "-c"])
        .arg(path)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout.len() as u64)
}

fn kib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0
}

fn print_bundle(build: &Path) {
    println!("edge bundle ({}):", build.display());
    for name in ["index_bg.wasm", "index.js"] {
        let p: PathBuf = build.join(name);
        let raw = file_size(&p);
        let gz = gzip_size(&p);
        println!(
            "  {:<14} {:>9} bytes raw ({:>7.1} KiB), {:>9} bytes gzip -9 ({:>7.1} KiB)",
            name,
            raw,
            kib(raw),
            gz.map_or("?".into(), |g| g.to_string()),
            gz.map_or(0.0, kib),
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Bench {
    origin_url: String,
    origin_pid: u32,
    token: String,
}

impl Bench {
    fn target(&self, base: &str) -> anyhow::Result<Arc<Target>> {
        Ok(Arc::new(
            Target::new(base, hyper::Method::POST, PATH)?
                .header("authorization", &format!("Bearer {}", self.token))
                .header("content-type", "application/json")
                .body(QUERY),
        ))
    }

    fn base<'a>(&'a self, stack: &'a Stack, kind: Kind) -> &'a str {
        match kind {
            Kind::Origin => &self.origin_url,
            Kind::Js => &stack.js.url,
            Kind::Equivalent => &stack.equiv.url,
            Kind::Edge => &stack.edge.url,
            Kind::EdgeKv => &stack.edge_kv.url,
        }
    }

    /// One closed-loop window of `secs` on `conns` connections, with CPU deltas.
    async fn window(
        &self,
        stack: &Stack,
        kind: Kind,
        conns: usize,
        secs: f64,
    ) -> anyhow::Result<(Sample, Window)> {
        let target = self.target(self.base(stack, kind))?;
        let open = http_load::connect(target, conns).await?;
        let me = procfs::self_pid();
        let pids = [
            stack.edge.pid(),
            stack.edge_kv.pid(),
            stack.equiv.pid(),
            stack.js.pid(),
            stack.kv.pid(),
            self.origin_pid,
            me,
        ];
        let before = CpuSnapshot::take(&pids);
        let w = open.run(Duration::from_secs_f64(secs)).await;
        let per = |pid: u32| before.since(pid).as_secs_f64() * 1e6 / (w.ok.max(1) as f64);
        let sample = Sample {
            rate: w.rate(),
            errors: w.errors,
            first_error: w.first_error.clone(),
            worker_us: match kind {
                Kind::Origin => None,
                Kind::Js => Some(per(stack.js.pid())),
                Kind::Equivalent => Some(per(stack.equiv.pid())),
                Kind::Edge => Some(per(stack.edge.pid())),
                Kind::EdgeKv => Some(per(stack.edge_kv.pid())),
            },
            origin_us: per(self.origin_pid),
            kv_us: kind.uses_kv().then(|| per(stack.kv.pid())),
            load_us: per(me),
        };
        Ok((sample, w))
    }
}

/// The checks before measuring: every variant answers the query for the logged-in user; the
/// edge's first request is a KV miss that puts the record, its second is served from the
/// isolate without reading KV; with the cache off, every request is a KV hit; identity at
/// the origin came from the edge's assertion.
async fn preflight(bench: &Bench, stack: &Stack) -> anyhow::Result<()> {
    let query: Value = serde_json::from_str(QUERY)?;
    let q = query["query"].as_str().unwrap_or_default();
    let me = |v: &Value| v["data"]["me"].clone();
    let direct = flows::graphql(&bench.origin_url, &bench.token, q, Value::Null).await;
    anyhow::ensure!(me(&direct)["email"] == EMAIL, "origin direct: {direct}");
    let s0 = kv_stats(&stack.kv).await?;
    let first = flows::graphql(&stack.edge.url, &bench.token, q, Value::Null).await;
    anyhow::ensure!(
        me(&first)["email"] == EMAIL,
        "through the edge: {first}\n{}",
        stack.edge.log_text()
    );
    let s1 = kv_stats(&stack.kv).await?;
    anyhow::ensure!(
        stat(&s1, "puts") == stat(&s0, "puts") + 1,
        "the edge's first request did not put the session record: {s0} → {s1}"
    );
    let second = flows::graphql(&stack.edge.url, &bench.token, q, Value::Null).await;
    let s2 = kv_stats(&stack.kv).await?;
    anyhow::ensure!(
        me(&second)["email"] == EMAIL && stat(&s2, "gets") == stat(&s1, "gets"),
        "the edge's second request read KV (expected the isolate's cache): {second}, {s1} → {s2}"
    );
    for i in 0..2 {
        let before = kv_stats(&stack.kv).await?;
        let v = flows::graphql(&stack.edge_kv.url, &bench.token, q, Value::Null).await;
        let after = kv_stats(&stack.kv).await?;
        anyhow::ensure!(
            me(&v)["email"] == EMAIL
                && stat(&after, "hits") == stat(&before, "hits") + 1
                && stat(&after, "puts") == stat(&before, "puts"),
            "edge with L1 off, request {i}: not a KV hit: {v}, {before} → {after}\n{}",
            stack.edge_kv.log_text()
        );
    }
    let s2 = kv_stats(&stack.kv).await?;
    // The origin builds the caller from the assertion's claims, which carry no display
    // name; from its own session cache it has the stand-in's.
    anyhow::ensure!(
        me(&second)["displayName"] == "",
        "through the edge the origin did not take the caller from the assertion: {second}"
    );
    let js = flows::graphql(&stack.js.url, &bench.token, q, Value::Null).await;
    anyhow::ensure!(
        me(&js)["email"] == EMAIL && me(&js)["displayName"] == me(&direct)["displayName"],
        "through the JS pass-through: {js}"
    );
    let equiv = flows::graphql(&stack.equiv.url, &bench.token, q, Value::Null).await;
    let s3 = kv_stats(&stack.kv).await?;
    anyhow::ensure!(
        me(&equiv)["email"] == EMAIL
            && me(&equiv)["displayName"] == ""
            && stat(&s3, "hits") == stat(&s2, "hits") + 1,
        "through the JS equivalent (expected a KV hit and the assertion's identity): {equiv}, \
         {s2} → {s3}\n{}",
        stack.equiv.log_text()
    );
    println!(
        "checks: all five answer `me` = {EMAIL}; edge: 1st request KV miss + put, 2nd from the \
         isolate (no KV read); edge with L1 off: a KV hit each time; edge and JS equivalent: \
         origin identity from the assertion (displayName {:?} vs {:?} direct/pass-through)",
        me(&second)["displayName"].as_str().unwrap_or_default(),
        me(&direct)["displayName"].as_str().unwrap_or_default(),
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rounds > 0 && args.secs > 0.0 && !args.concurrency.is_empty(),
        "--rounds, --secs and --concurrency must be positive"
    );
    let started = std::time::Instant::now();
    let load_start = loadavg();

    let standin = StandIn::start(StandInOptions::default()).await?;
    let mut origin = Origin::start(
        &standin,
        OriginOptions::default()
            .env("RUST_LOG", "warn")
            .env("EDGE_ASSERTION_PUBLIC_KEY", &test_public_key()),
    )
    .await?;
    let token = flows::login(&origin.url, &standin, EMAIL).await;
    let bench = Bench {
        origin_url: origin.url.clone(),
        origin_pid: origin.guard().pid(),
        token,
    };
    let build = args
        .edge_build
        .clone()
        .unwrap_or_else(|| workspace_root().join("edge-worker/build"));
    let stack = Stack::start(&bench.origin_url, &build).await?;
    preflight(&bench, &stack).await?;

    let max_conns = *args.concurrency.iter().max().unwrap_or(&16);
    for kind in Kind::ALL {
        bench
            .window(&stack, kind, max_conns, args.warmup_secs)
            .await
            .with_context(|| format!("warm-up of {}", kind.name()))?;
    }

    // samples[c][kind] = one Sample per round.
    let mut samples: Vec<Vec<Vec<Sample>>> =
        vec![vec![Vec::new(); Kind::ALL.len()]; args.concurrency.len()];
    let mut latencies: Vec<Vec<Vec<u32>>> =
        vec![vec![Vec::new(); Kind::ALL.len()]; args.concurrency.len()];
    // Per variant that reads KV: [requests, gets, hits, puts] over its measured windows.
    let mut kv_tally = [[0i64; 4]; Kind::ALL.len()];
    for round in 0..args.rounds {
        for (ci, &conns) in args.concurrency.iter().enumerate() {
            for k in 0..Kind::ALL.len() {
                let ki = (k + round) % Kind::ALL.len();
                let kind = Kind::ALL[ki];
                let kv_before = kv_stats(&stack.kv).await?;
                let (sample, w) = bench.window(&stack, kind, conns, args.secs).await?;
                if kind.uses_kv() {
                    let kv_after = kv_stats(&stack.kv).await?;
                    let d = |n: &str| stat(&kv_after, n) - stat(&kv_before, n);
                    let t = &mut kv_tally[ki];
                    t[0] += (w.ok + w.errors) as i64;
                    t[1] += d("gets");
                    t[2] += d("hits");
                    t[3] += d("puts");
                }
                if let Some(e) = &sample.first_error {
                    eprintln!(
                        "round {} {} c={conns}: {} errors, first: {e}",
                        round + 1,
                        kind.name(),
                        sample.errors
                    );
                }
                latencies[ci][ki].extend(w.latencies_us);
                samples[ci][ki].push(sample);
            }
        }
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }

    println!();
    print_bundle(&build);
    println!(
        "workerd: {} (node_modules/.bin/workerd), compatibility date {}; config and logs: {} (kept with GATEWAY_KEEP_TEST_DIRS=1)",
        workerd::version().unwrap_or_else(|| "?".into()),
        compat_date(),
        stack.config_dir().display()
    );
    println!();
    println!(
        "Session request with a cached session (POST {PATH} `me`, Bearer token), {} rounds × {:.0} s per variant and concurrency, closed-loop keep-alive, loopback, 2 cores shared by all processes",
        args.rounds, args.secs
    );
    println!(
        "{:<27} {:>4} {:>8} {:>6} {:>7} {:>7} {:>10} {:>10} {:>8} {:>9} {:>7}",
        "variant",
        "conc",
        "req/s",
        "×JS",
        "p50 ms",
        "p99 ms",
        "workerd µs",
        "origin µs",
        "KV µs",
        "loader µs",
        "errors"
    );
    let mut goal_rate = Vec::new();
    let mut goal_cpu = Vec::new();
    let mut same_work = Vec::new();
    let mut l1_saves = Vec::new();
    for (ci, &conns) in args.concurrency.iter().enumerate() {
        let rate = |ki: usize| median(samples[ci][ki].iter().map(|s| s.rate).collect());
        let cpu = |ki: usize| median(samples[ci][ki].iter().filter_map(|s| s.worker_us).collect());
        let js_rate = rate(Kind::Js.index());
        for (ki, kind) in Kind::ALL.iter().enumerate() {
            let s = &samples[ci][ki];
            let lat = &mut latencies[ci][ki];
            lat.sort_unstable();
            let sorted: Vec<u64> = lat.iter().map(|&v| u64::from(v)).collect();
            let med = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let v: Vec<f64> = s.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| median(v))
            };
            let cell = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.0}"));
            let r = rate(ki);
            println!(
                "{:<27} {:>4} {:>8.0} {:>5.2}x {:>7.2} {:>7.2} {:>10} {:>10} {:>8} {:>9} {:>7}",
                kind.name(),
                conns,
                r,
                r / js_rate.max(1e-9),
                percentile(&sorted, 0.5) as f64 / 1e3,
                percentile(&sorted, 0.99) as f64 / 1e3,
                cell(med(&|s: &Sample| s.worker_us)),
                cell(med(&|s: &Sample| Some(s.origin_us))),
                cell(med(&|s: &Sample| s.kv_us)),
                cell(med(&|s: &Sample| Some(s.load_us))),
                s.iter().map(|s| s.errors).sum::<u64>(),
            );
        }
        for (ki, kind) in Kind::ALL.iter().enumerate() {
            let rounds: Vec<String> = samples[ci][ki]
                .iter()
                .map(|s| format!("{:.0}", s.rate))
                .collect();
            println!(
                "    {} c={conns} rounds (req/s): {}",
                kind.name(),
                rounds.join(", ")
            );
        }
        let edge_rate = rate(Kind::Edge.index());
        let edge_cpu = cpu(Kind::Edge.index());
        let edge_kv_cpu = cpu(Kind::EdgeKv.index());
        l1_saves.push(format!(
            "c={conns} {:.0} µs with vs {:.0} µs without ({:+.0} µs), {:.0} vs {:.0} req/s",
            edge_cpu,
            edge_kv_cpu,
            edge_cpu - edge_kv_cpu,
            edge_rate,
            rate(Kind::EdgeKv.index()),
        ));
        let js_cpu = cpu(Kind::Js.index());
        let equiv_cpu = cpu(Kind::Equivalent.index());
        let same = edge_cpu / equiv_cpu.max(1e-9);
        same_work.push(format!(
            "c={conns} {same:.2}× (edge {:.0} µs vs JS {:.0} µs, {:+.0} µs; {:.0} vs {:.0} req/s; the edge is {:.2}× the pass-through's {:.0} µs) {}",
            edge_cpu,
            equiv_cpu,
            edge_cpu - equiv_cpu,
            edge_rate,
            rate(Kind::Equivalent.index()),
            edge_cpu / js_cpu.max(1e-9),
            js_cpu,
            if same <= 1.0 { "met" } else { "NOT met" }
        ));
        goal_rate.push(format!(
            "c={conns} {:.2}× ({:.0} vs {:.0} req/s) {}",
            edge_rate / js_rate.max(1e-9),
            edge_rate,
            js_rate,
            if edge_rate >= js_rate {
                "met"
            } else {
                "NOT met"
            }
        ));
        goal_cpu.push(format!(
            "c={conns} {:.0} µs (JS pass-through {:.0} µs, edge − JS {:+.0} µs, ratio {:.2}×) {}",
            edge_cpu,
            js_cpu,
            edge_cpu - js_cpu,
            edge_cpu / js_cpu.max(1e-9),
            if edge_cpu <= 150.0 { "met" } else { "NOT met" }
        ));
    }
    println!(
        "goal: edge ≥ 1.0× the JS pass-through's req/s — {}",
        goal_rate.join("; ")
    );
    println!(
        "goal: edge ≤ 150 µs CPU per request (its workerd process, incl. workerd's HTTP in and out) — {}",
        goal_cpu.join("; ")
    );
    println!(
        "goal (issue 16): edge ÷ edge-path-in-JS workerd CPU per request ≤ 1.0× (the same steps in JS: same workerd, bindings and L1) — {}",
        same_work.join("; ")
    );
    println!(
        "the edge's isolate-local session cache (EDGE_L1_TTL={L1_TTL} vs 0), workerd CPU per request — {}",
        l1_saves.join("; ")
    );
    for kind in Kind::ALL.into_iter().filter(|k| k.uses_kv()) {
        let [requests, gets, hits, puts] = kv_tally[kind.index()];
        let verdict = match (hits == gets && puts == 0, kind.uses_l1(), gets == requests) {
            (false, _, _) => " (NOT all hits)".to_owned(),
            (true, false, true) => " (every request a KV hit)".to_owned(),
            (true, false, false) => " (NOT one read per request)".to_owned(),
            (true, true, _) => format!(
                " (the rest from the isolate; every read a hit, {:.4} reads per request)",
                gets as f64 / requests.max(1) as f64
            ),
        };
        println!(
            "KV during the measured windows of {}: {requests} requests, {gets} KV gets, {hits} hits, {puts} puts{verdict}",
            kind.name(),
        );
    }
    for w in [
        &stack.edge,
        &stack.edge_kv,
        &stack.equiv,
        &stack.js,
        &stack.kv,
    ] {
        let log = w.log_text();
        // workerd's own one-off start-up notice is not the worker's.
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("per-isolate bootstrap compile cache"))
            .collect();
        if !lines.is_empty() {
            println!(
                "workerd {} logged {} line(s), first: {}",
                w.name,
                lines.len(),
                lines[0]
            );
        }
    }
    println!(
        "load average {load_start} at start, {} at end; wall time {:.1} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    drop(stack);
    drop(origin);
    drop(standin);
    Ok(())
}

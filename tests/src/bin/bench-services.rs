//! `bench-services` — issue 15's figures, in one run: the generic service proxy
//! (`/api/v1/{service}/{*path}`) against nginx proxying the same upstream, and a
//! human-in-the-loop question's round trip.
//!
//! **Proxy.** One upstream, the demo backend stand-in (`demo-service`, release build), and
//! its `GET /echo` (a small JSON answer: what the service received). In front of it, side by
//! side and from the same build:
//! - **upstream direct** — `GET <demo>/echo`, no proxy: the floor;
//! - **nginx** — Debian's nginx (`$NGINX_BIN`, else what `scripts/setup.sh` unpacked under
//!   `$GATEWAY_TOOLS/nginx`), `location /echo { proxy_pass http://demo; }` with an upstream
//!   block holding `keepalive 100` idle connections, HTTP/1.1 to the upstream, no cap on
//!   requests per keep-alive connection (nginx closes one after 1000 by default), access log
//!   off, `worker_processes` = `--nginx-workers` (default: one per core, as the origin's
//!   tokio runtime has one worker thread per core);
//! - **stack floor** — `floor-proxy` (tests/src/bin/floor-proxy.rs): hyper's server and
//!   the origin's own upstream pool on the origin's runtime and allocator, forwarding
//!   everything with none of the gateway's steps. What any proxy on this stack pays
//!   before doing anything of its own: with nginx's row it says how close to nginx the
//!   gateway could get by trimming its own steps alone;
//! - **gateway, memory store** and **gateway, NATS K/V** — an origin with
//!   `SERVICE_DEMO_URL` = the demo and `SERVICE_DEMO_ALLOW="GET /echo,POST /ask"`, sent
//!   `GET /api/v1/demo/echo` with `Authorization: Bearer <session>`: the session check (a
//!   cache hit: the login wrote it; in memory, or on a real nats-server as in production,
//!   where since issue 16 the replica's own session cache answers too), the allow-list,
//!   the identity headers, the per-service pool. Access log off (`RUST_LOG=warn`, like nginx's `access_log off`; what the log costs
//!   is bench-observability's figure), metrics on (the default);
//! - **origin, session check alone** — `POST /api/auth/validate` on the memory-store origin,
//!   a reference row, not a proxy: the same listener, middleware and session check with no
//!   forward, so the table splits the gateway's cost into "answering a request at all" and
//!   "forwarding it".
//!
//! Every variant gets the same request (the bearer header included: nginx passes it on, the
//! gateway strips it) closed-loop on `--conns` keep-alive connections ([`http_load`], one
//! thread: the load generator takes at most one of the cores it shares with the servers).
//! After an unmeasured `--warmup-secs` window per variant and connection count, `--rounds`
//! rounds of `--secs` windows interleave the variants (the order rotates each round) so a
//! burst of load from elsewhere hits all of them alike. Printed: req/s (the median over
//! rounds), p50/p99 over every request of every round, CPU per request of the proxy
//! (nginx: master and workers) and of the upstream, the gateway/nginx ratio of each round
//! (neighbouring windows) and the goal's verdict: ≥ 0.9× nginx's req/s, p99 ≤ nginx's.
//!
//! **Question → answer.** With the demo aimed at the origin's internal listener, a user
//! with an open `/events` stream runs `--questions` sequential rounds: `POST
//! /api/v1/demo/ask` (through the proxy; the demo asks the gateway, `POST
//! /api/internal/questions`) → the `question` frame on the stream; `POST
//! /api/v1/events/{client_id}/response` `{"question_id","answer":"yes"}` → the gateway's
//! delivery to the demo (`GET <demo>/answers/{id}` polled back to back on a keep-alive
//! connection, ~0.1 ms a poll). Per store: p50/p99 of ask → frame, ask → the 201, answer →
//! its 200, answer → delivered, and the whole round trip.
//!
//! Usage: `bench-services [--rounds 3] [--secs 8] [--warmup-secs 4] [--conns 32,128]
//! [--nginx-workers N] [--questions 200]`.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gateway_tests::bench::http_load::{self, Target};
use gateway_tests::bench::nginx::{nginx_bin, Nginx, NginxConfig};
use gateway_tests::bench::percentile;
use gateway_tests::bench::procfs::{self, CpuSnapshot};
use gateway_tests::harness::demo::{DemoOptions, DemoService};
use gateway_tests::harness::flows;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{scratch_dir, spawn_on_free_port, workspace_bin, ChildGuard};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "The generic service proxy against nginx, and a question's round trip")]
struct Args {
    /// Rounds; each measures every variant at every connection count once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measured window.
    #[arg(long, default_value_t = 8.0)]
    secs: f64,
    /// Unmeasured seconds per variant and connection count before the first round.
    #[arg(long, default_value_t = 4.0)]
    warmup_secs: f64,
    /// Keep-alive connections (closed-loop), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    conns: Vec<usize>,
    /// nginx's `worker_processes` (default: the number of cores).
    #[arg(long)]
    nginx_workers: Option<usize>,
    /// Question rounds per store (0: skip the round-trip figure).
    #[arg(long, default_value_t = 200)]
    questions: usize,
}

const EMAIL: &str = "bench-services@example.com";
/// The goal: the gateway's req/s at least this share of nginx's.
const GOAL_RATE: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Nginx,
    Floor,
    Memory,
    Nats,
    Validate,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Direct,
        Kind::Nginx,
        Kind::Floor,
        Kind::Memory,
        Kind::Nats,
        Kind::Validate,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "upstream direct (floor)",
            Kind::Nginx => "nginx",
            Kind::Floor => "stack floor (hyper + pool)",
            Kind::Memory => "gateway, memory store",
            Kind::Nats => "gateway, NATS K/V",
            Kind::Validate => "origin, session check alone",
        }
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// nginx in front of the demo: an upstream block with `keepalive 100`, HTTP/1.1 to it.
async fn start_nginx(upstream: &str, workers: usize) -> anyhow::Result<Nginx> {
    let upstream = upstream.trim_start_matches("http://");
    let http = |port: u16| {
        format!(
            "    upstream demo {{
        server {upstream};
        keepalive 100;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location /echo {{
            proxy_pass http://demo;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}"
        )
    };
    Nginx::start(NginxConfig {
        name: "nginx",
        main: String::new(),
        workers,
        connections: 4096,
        http: &http,
        probe: "/echo",
    })
    .await
}

/// `floor-proxy` in front of the demo, on a port of its own (see the module docs).
struct Floor {
    guard: ChildGuard,
    url: String,
    _dir: tempfile::TempDir,
}

async fn start_floor(upstream: &str) -> anyhow::Result<Floor> {
    let dir = scratch_dir("gw-floor-");
    let served = spawn_on_free_port(
        "floor-proxy",
        dir.path().join("floor.log"),
        "/echo",
        |port| {
            let mut cmd = Command::new(workspace_bin("floor-proxy"));
            cmd.env_clear()
                .args(["--port", &port.to_string(), "--upstream", upstream]);
            cmd
        },
    )
    .await?;
    Ok(Floor {
        guard: served.guard,
        url: served.url,
        _dir: dir,
    })
}

/// Everything one window is measured against.
struct Stack {
    demo: DemoService,
    nginx: Nginx,
    floor: Floor,
    memory: Origin,
    nats_origin: Origin,
    nats: NatsServer,
    memory_token: String,
    nats_token: String,
}

impl Stack {
    fn base(&self, kind: Kind) -> (&str, &str) {
        match kind {
            Kind::Direct => (&self.demo.url, "/echo"),
            Kind::Nginx => (&self.nginx.url, "/echo"),
            Kind::Floor => (&self.floor.url, "/echo"),
            Kind::Memory => (&self.memory.url, "/api/v1/demo/echo"),
            Kind::Nats => (&self.nats_origin.url, "/api/v1/demo/echo"),
            Kind::Validate => (&self.memory.url, "/api/auth/validate"),
        }
    }

    fn token(&self, kind: Kind) -> &str {
        match kind {
            Kind::Nats => &self.nats_token,
            _ => &self.memory_token,
        }
    }

    fn target(&self, kind: Kind) -> anyhow::Result<Arc<Target>> {
        let (base, path) = self.base(kind);
        let target = if kind == Kind::Validate {
            Target::new(base, hyper::Method::POST, path)?.header("content-length", "0")
        } else {
            Target::new(base, hyper::Method::GET, path)?
        };
        Ok(Arc::new(target.header(
            "authorization",
            &format!("Bearer {}", self.token(kind)),
        )))
    }

    /// The proxy's processes (none for the floor), and the store's (nats-server).
    fn proxy_pids(&mut self, kind: Kind) -> Vec<u32> {
        match kind {
            Kind::Direct => Vec::new(),
            Kind::Nginx => self.nginx.pids(),
            Kind::Floor => vec![self.floor.guard.pid()],
            Kind::Memory | Kind::Validate => vec![self.memory.guard().pid()],
            Kind::Nats => vec![self.nats_origin.guard().pid(), self.nats.guard().pid()],
        }
    }
}

/// One measured window.
#[derive(Debug, Clone, Default)]
struct Sample {
    rate: f64,
    latencies_us: Vec<u32>,
    /// CPU µs per answered request: the proxy (nginx's master and workers; the origin and,
    /// on NATS, nats-server), the upstream, this process.
    proxy_us: f64,
    upstream_us: f64,
    load_us: f64,
}

async fn window(stack: &mut Stack, kind: Kind, conns: usize, secs: f64) -> anyhow::Result<Sample> {
    let target = stack.target(kind)?;
    let open = http_load::connect(target, conns).await?;
    let proxy = stack.proxy_pids(kind);
    let upstream = stack.demo.guard().pid();
    let me = procfs::self_pid();
    let mut all = proxy.clone();
    all.extend([upstream, me]);
    let before = CpuSnapshot::take(&all);
    let w = open.run(Duration::from_secs_f64(secs)).await;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / (w.ok.max(1) as f64);
    if let Some(e) = &w.first_error {
        anyhow::bail!("{} ({conns} connections): {e}", kind.name());
    }
    Ok(Sample {
        rate: w.rate(),
        proxy_us: per(proxy.iter().map(|&p| before.since(p)).sum()),
        upstream_us: per(before.since(upstream)),
        load_us: per(before.since(me)),
        latencies_us: w.latencies_us,
    })
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

/// Every variant answers 200 with the demo's echo; through the gateway the identity
/// headers are set and the bearer token is not passed on. Per variant, for the report: the
/// answer's size and how each hop was framed (the request the upstream received, the answer
/// the client received: `content-length` or `chunked`).
async fn preflight(stack: &Stack) -> anyhow::Result<Vec<(usize, String)>> {
    let http = flows::http();
    let mut seen = Vec::new();
    for kind in [
        Kind::Direct,
        Kind::Nginx,
        Kind::Floor,
        Kind::Memory,
        Kind::Nats,
    ] {
        let (base, path) = stack.base(kind);
        let resp = http
            .get(format!("{base}{path}"))
            .bearer_auth(stack.token(kind))
            .send()
            .await?;
        let status = resp.status();
        let framing = |h: &reqwest::header::HeaderMap| match h.get("transfer-encoding") {
            Some(te) => te.to_str().unwrap_or("?").to_owned(),
            None if h.contains_key("content-length") => "content-length".to_owned(),
            None => "none".to_owned(),
        };
        let answer = framing(resp.headers());
        let body = resp.bytes().await?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let request = match &v["headers"] {
            h if h.get("transfer-encoding").is_some() => {
                h["transfer-encoding"].as_str().unwrap_or("?").to_owned()
            }
            h if h.get("content-length").is_some() => "content-length".to_owned(),
            _ => "no body".to_owned(),
        };
        anyhow::ensure!(
            status == 200 && v["path"] == "/echo",
            "{}: {status} {}",
            kind.name(),
            String::from_utf8_lossy(&body)
        );
        if matches!(kind, Kind::Memory | Kind::Nats) {
            anyhow::ensure!(
                v["headers"]["x-noetl-user-email"] == EMAIL
                    && v["headers"].get("authorization").is_none(),
                "{}: identity headers not set or the bearer passed on: {v}",
                kind.name()
            );
        }
        seen.push((
            body.len(),
            format!("{}: request {request}, answer {answer}", kind.name()),
        ));
    }
    Ok(seen)
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

async fn proxy_figure(stack: &mut Stack, args: &Args, workers: usize) -> anyhow::Result<()> {
    let seen = preflight(stack).await?;
    let sizes: Vec<String> = seen.iter().map(|(n, _)| n.to_string()).collect();
    println!(
        "checks: all five answer 200 with the echo ({} bytes); through the gateway the identity headers are set and the bearer is not passed on",
        sizes.join(" / ")
    );
    let framing: Vec<&str> = seen.iter().map(|(_, f)| f.as_str()).collect();
    println!(
        "framing (upstream's request; client's answer): {}",
        framing.join("; ")
    );
    println!(
        "proxy: {} cores, release build, loopback, load average {}; nginx {} worker(s); {} rounds × {} s per variant and connection count (after {} s warm-up), interleaved",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        workers,
        args.rounds,
        args.secs,
        args.warmup_secs
    );
    for &conns in &args.conns {
        for kind in Kind::ALL {
            window(stack, kind, conns, args.warmup_secs).await?;
        }
        let mut samples: Vec<Vec<Sample>> = Kind::ALL.iter().map(|_| Vec::new()).collect();
        for round in 0..args.rounds {
            let mut order = Kind::ALL;
            order.rotate_left(round % Kind::ALL.len());
            for kind in order {
                let s = window(stack, kind, conns, args.secs).await?;
                samples[kind.index()].push(s);
            }
        }
        println!();
        println!(
            "{conns} connections, GET /echo (load average now {})",
            loadavg()
        );
        println!(
            "{:<26} {:>9} {:>8} {:>8} {:>9} {:>11} {:>10} {:>10}",
            "variant",
            "req/s",
            "p50 ms",
            "p99 ms",
            "vs nginx",
            "proxy CPU",
            "upstr. CPU",
            "load CPU"
        );
        let rate = |k: Kind| median(samples[k.index()].iter().map(|s| s.rate).collect());
        let lat: Vec<Vec<u32>> = samples
            .iter()
            .map(|v| {
                let mut all: Vec<u32> = v.iter().flat_map(|s| s.latencies_us.clone()).collect();
                all.sort_unstable();
                all
            })
            .collect();
        let nginx_rate = rate(Kind::Nginx);
        for kind in Kind::ALL {
            let v = &samples[kind.index()];
            let cpu = |f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
            let l = &lat[kind.index()];
            println!(
                "{:<26} {:>9.0} {:>8.2} {:>8.2} {:>8.2}× {:>8.0} µs {:>7.0} µs {:>7.0} µs",
                kind.name(),
                rate(kind),
                ms(percentile(l, 0.50)),
                ms(percentile(l, 0.99)),
                rate(kind) / nginx_rate.max(1e-9),
                if kind == Kind::Direct {
                    0.0
                } else {
                    cpu(|s| s.proxy_us)
                },
                cpu(|s| s.upstream_us),
                cpu(|s| s.load_us),
            );
        }
        let nginx_p99 = ms(percentile(&lat[Kind::Nginx.index()], 0.99));
        for kind in [Kind::Memory, Kind::Nats] {
            let per_round: Vec<String> = samples[kind.index()]
                .iter()
                .zip(&samples[Kind::Nginx.index()])
                .map(|(g, n)| format!("{:.2}", g.rate / n.rate.max(1e-9)))
                .collect();
            let ratio = rate(kind) / nginx_rate.max(1e-9);
            let p99 = ms(percentile(&lat[kind.index()], 0.99));
            let met = ratio >= GOAL_RATE && p99 <= nginx_p99;
            println!(
                "goal ({}, {conns} conns): req/s ≥ {GOAL_RATE}× nginx — {ratio:.2}× (per round {}); p99 ≤ nginx's — {p99:.2} vs {nginx_p99:.2} ms: {}",
                kind.name(),
                per_round.join(", "),
                if met { "met" } else { "NOT met" }
            );
        }
    }
    Ok(())
}

/// One user's client and its stream on one origin, for the question rounds.
async fn question_rounds(
    origin: &Origin,
    demo: &DemoService,
    token: &str,
    n: usize,
) -> anyhow::Result<[Vec<Duration>; 5]> {
    demo.set_gateway(&origin.internal_url, INTERNAL_TOKEN).await;
    let (mut sse, client_id) = flows::open_events_client(
        &format!("{}/events", origin.url),
        token,
        None,
        Duration::from_secs(10),
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()?;
    let poll = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()?;
    let mut out: [Vec<Duration>; 5] = Default::default();
    for round in 0..n {
        let prompt = format!("bench question {round}");
        let t0 = Instant::now();
        let ask = async {
            let resp = http
                .post(format!("{}/api/v1/demo/ask", origin.url))
                .bearer_auth(token)
                .json(&json!({"client_id": client_id, "prompt": prompt, "options": ["yes", "no"]}))
                .send()
                .await?;
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            let at = t0.elapsed();
            anyhow::ensure!(status == 201, "ask: {status} {v}");
            let id = v["question_id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("ask answered without question_id: {v}"))?
                .to_owned();
            anyhow::Ok((id, at))
        };
        let frame = async {
            loop {
                let f = sse
                    .next(Duration::from_secs(10))
                    .await
                    .ok_or_else(|| anyhow::anyhow!("no question frame within 10 s"))?;
                if f.event == "question" && f.data["params"]["prompt"] == prompt.as_str() {
                    let id = f.data["params"]["question_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    return anyhow::Ok((id, t0.elapsed()));
                }
            }
        };
        let (asked, framed) = tokio::join!(ask, frame);
        let ((id, ask_at), (frame_id, frame_at)) = (asked?, framed?);
        anyhow::ensure!(id == frame_id, "the frame names {frame_id}, the ask {id}");
        let t1 = Instant::now();
        let resp = http
            .post(format!("{}/api/v1/events/{client_id}/response", origin.url))
            .bearer_auth(token)
            .json(&json!({"question_id": id, "answer": "yes"}))
            .send()
            .await?;
        let answered_at = t1.elapsed();
        let status = resp.status();
        anyhow::ensure!(
            status == 200,
            "answer: {status} {}",
            resp.text().await.unwrap_or_default()
        );
        let answer_url = format!("{}/answers/{id}", demo.url);
        let (delivered_at, whole) = loop {
            let r = poll.get(&answer_url).send().await?;
            if r.status() == 200 {
                let at = (t1.elapsed(), t0.elapsed());
                let v: Value = r.json().await?;
                anyhow::ensure!(
                    v["answer"] == "yes" && v["user"]["email"] == EMAIL,
                    "delivered: {v}"
                );
                break at;
            }
            anyhow::ensure!(
                t1.elapsed() < Duration::from_secs(10),
                "{id} not delivered within 10 s (last {})",
                r.status()
            );
        };
        out[0].push(frame_at);
        out[1].push(ask_at);
        out[2].push(answered_at);
        out[3].push(delivered_at);
        out[4].push(whole);
    }
    sse.close();
    Ok(out)
}

async fn question_figure(stack: &Stack, n: usize) -> anyhow::Result<()> {
    println!();
    println!(
        "question → answer: {n} sequential rounds per store, one user, one open /events stream (load average {})",
        loadavg()
    );
    println!(
        "{:<38} {:>12} {:>12} {:>12} {:>12}",
        "step", "memory p50", "memory p99", "NATS p50", "NATS p99"
    );
    let mem = question_rounds(&stack.memory, &stack.demo, &stack.memory_token, n).await?;
    let nats = question_rounds(&stack.nats_origin, &stack.demo, &stack.nats_token, n).await?;
    let names = [
        "ask sent → question frame on stream",
        "ask sent → 201 {question_id}",
        "answer sent → 200",
        "answer sent → delivered to the demo",
        "ask sent → answer delivered (whole)",
    ];
    for (i, name) in names.iter().enumerate() {
        let mut m = mem[i].clone();
        let mut s = nats[i].clone();
        m.sort_unstable();
        s.sort_unstable();
        let f = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        println!(
            "{:<38} {:>12} {:>12} {:>12} {:>12}",
            name,
            f(percentile(&m, 0.5)),
            f(percentile(&m, 0.99)),
            f(percentile(&s, 0.5)),
            f(percentile(&s, 0.99)),
        );
    }
    println!("(no think time: the answer is sent as soon as both the frame and the 201 are in)");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !cfg!(debug_assertions),
        "bench-services measures release builds: `cargo build --release` and run target/release/bench-services"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.nginx_workers.unwrap_or(cores);
    let demo = DemoService::start(DemoOptions::default()).await?;
    let nats = NatsServer::start().await?;
    let standin = StandIn::start(StandInOptions::default()).await?;
    let services = |o: OriginOptions| {
        o.envs(&[
            ("SERVICE_DEMO_URL", demo.url.as_str()),
            ("SERVICE_DEMO_ALLOW", "GET /echo,POST /ask"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "warn"),
        ])
    };
    let memory = Origin::start(&standin, services(OriginOptions::default())).await?;
    let nats_origin = Origin::start(&standin, services(OriginOptions::with_nats(&nats.url)))
        .await
        .context("the NATS origin")?;
    let memory_token = flows::login(&memory.url, &standin, EMAIL).await;
    let nats_token = flows::login(&nats_origin.url, &standin, EMAIL).await;
    let nginx = start_nginx(&demo.url, workers).await?;
    let floor = start_floor(&demo.url).await?;
    let mut stack = Stack {
        demo,
        nginx,
        floor,
        memory,
        nats_origin,
        nats,
        memory_token,
        nats_token,
    };
    println!(
        "bench-services: GET /api/v1/demo/echo (session check, allow-list, identity headers) against nginx ({}) and the upstream alone",
        nginx_bin().display()
    );
    proxy_figure(&mut stack, &args, workers).await?;
    if args.questions > 0 {
        question_figure(&stack, args.questions).await?;
    }
    Ok(())
}

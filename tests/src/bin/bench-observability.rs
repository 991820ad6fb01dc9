//! `make bench` — what metrics, traces and logs cost on a cached-session request
//! (issue 14's figure): off, the default and everything on, in one run.
//!
//! A real nats-server (sessions in JetStream K/V, as in production), the NoETL stand-in and
//! three origins from the same build, differing only in observability:
//! - **off**: `METRICS_ENABLED=false`, `RUST_LOG=warn` (no access log), no OTLP;
//! - **default**: metrics recorded and `RUST_LOG=info` with `LOG_FORMAT=json` (the access
//!   log), no OTLP — what an install gets unless it sets an OTLP endpoint;
//! - **on**: metrics recorded, `RUST_LOG=info` with `LOG_FORMAT=json` (one access-log line
//!   per request, written to a file), and OTLP export of every request's span
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT` at a sink in this process that answers 200: the
//!   export's cost is in the origin, the collector's is not counted).
//!
//! Shapes, each with a session the origin has cached: `POST /api/auth/validate` (the
//! session check alone) and `GET /noetl/catalog/playbooks` (the proxy to the stand-in). Load: a
//! closed loop on `--conns` keep-alive connections (`http_load`, the same generator as
//! bench-edge), windows of `--secs`, the variants interleaved over `--rounds` so a burst of
//! load from elsewhere hits both alike. Printed per shape and variant: req/s, p50/p99, the
//! origin's CPU per request; then each variant against off.
//! Usage: `bench-observability [--rounds N (5)] [--secs S (3)] [--conns C (16)]`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::bench::http_load::{self, Target};
use gateway_tests::bench::procfs::CpuSnapshot;
use gateway_tests::bench::{arg, percentile};
use gateway_tests::harness::flows;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Off,
    /// The default: metrics and the JSON access log, no export.
    Default,
    On,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Off, Variant::Default, Variant::On];

    fn name(self) -> &'static str {
        match self {
            Variant::Off => "off",
            Variant::Default => "metrics + access log (the default)",
            Variant::On => "metrics + access log + OTLP, a span per request",
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    secs: f64,
    latencies_us: Vec<u32>,
    origin_cpu: Duration,
}

impl Tally {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }
    fn cpu_us(&self) -> f64 {
        self.origin_cpu.as_secs_f64() * 1e6 / self.ok.max(1) as f64
    }
    fn pct(&mut self, p: f64) -> f64 {
        self.latencies_us.sort_unstable();
        f64::from(percentile(&self.latencies_us, p)) / 1000.0
    }
}

/// An OTLP/HTTP sink: answers every POST 200 with an empty protobuf body, counting them.
async fn otlp_sink() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let posts = Arc::new(AtomicU64::new(0));
    let counted = posts.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::Relaxed);
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, posts))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 5);
    let secs = arg("--secs", 3) as f64;
    let conns = arg("--conns", 16);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let nats = NatsServer::start().await?;
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..StandInOptions::default()
    })
    .await?;
    let (sink, exports) = otlp_sink().await?;
    let common =
        |o: OriginOptions| o.envs(&[("LOG_FORMAT", "json"), ("PROXY_ALLOW", "GET /api/catalog")]);
    let mut off = Origin::start(
        &standin,
        common(OriginOptions::with_nats(&nats.url))
            .envs(&[("METRICS_ENABLED", "false"), ("RUST_LOG", "warn")]),
    )
    .await?;
    let mut default = Origin::start(
        &standin,
        common(OriginOptions::with_nats(&nats.url))
            .envs(&[("METRICS_ENABLED", "true"), ("RUST_LOG", "info")]),
    )
    .await?;
    let sink_url = format!("http://{sink}");
    let mut on = Origin::start(
        &standin,
        common(OriginOptions::with_nats(&nats.url)).envs(&[
            ("METRICS_ENABLED", "true"),
            ("RUST_LOG", "info"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &sink_url),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ]),
    )
    .await?;
    let token = flows::login(&off.url, &standin, "observability@example.com").await;
    let pids = [off.guard().pid(), default.guard().pid(), on.guard().pid()];

    let shapes: [(&str, hyper::Method, &str); 2] = [
        (
            "validate (cached session)",
            hyper::Method::POST,
            "/api/auth/validate",
        ),
        (
            "/noetl proxy (cached session)",
            hyper::Method::GET,
            "/noetl/catalog/playbooks",
        ),
    ];
    println!(
        "bench-observability: {} cores, {profile} build, loopback, NATS K/V sessions; {conns} connections, {rounds} rounds × {secs} s per variant and shape, interleaved",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut tallies: Vec<[Tally; 3]> = shapes.iter().map(|_| Default::default()).collect();
    for round in 0..rounds {
        for (s, (_, method, path)) in shapes.iter().enumerate() {
            // Alternate which variant goes first, so neither always runs warmer.
            let mut order = Variant::ALL;
            order.rotate_left(round % Variant::ALL.len());
            for v in order {
                let origin = match v {
                    Variant::Off => &off,
                    Variant::Default => &default,
                    Variant::On => &on,
                };
                let target = Arc::new(
                    Target::new(&origin.url, method.clone(), path)?
                        .header("authorization", &format!("Bearer {token}"))
                        .header("content-length", "0"),
                );
                let open = http_load::connect(target, conns).await?;
                let pid = pids[v as usize];
                let before = CpuSnapshot::take(&[pid]);
                let w = open.run(Duration::from_secs_f64(secs)).await;
                let t = &mut tallies[s][v as usize];
                t.origin_cpu += before.since(pid);
                t.ok += w.ok;
                t.errors += w.errors;
                t.secs += w.elapsed.as_secs_f64();
                t.latencies_us.extend_from_slice(&w.latencies_us);
                if let Some(e) = w.first_error {
                    anyhow::bail!("{} {path}: {e}", v.name());
                }
            }
        }
    }
    anyhow::ensure!(
        exports.load(Ordering::Relaxed) > 0,
        "the 'on' origin exported no spans to the OTLP sink: the comparison would not include tracing\n{}",
        on.guard().log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    let access_lines = on.guard().log_text().lines().count();
    println!();
    println!("| shape | observability | req/s | p50 ms | p99 ms | origin CPU µs/req | errors |");
    println!("|---|---|---|---|---|---|---|");
    for ((name, _, _), pair) in shapes.iter().zip(tallies.iter_mut()) {
        for v in Variant::ALL {
            let t = &mut pair[v as usize];
            println!(
                "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {} |",
                v.name(),
                t.rate(),
                t.pct(0.50),
                t.pct(0.99),
                t.cpu_us(),
                t.errors
            );
        }
    }
    println!();
    for ((name, _, _), pair) in shapes.iter().zip(tallies.iter_mut()) {
        let p99_off = pair[0].pct(0.99);
        for v in [Variant::Default, Variant::On] {
            let i = v as usize;
            let p99 = pair[i].pct(0.99);
            println!(
                "{name}, {} / off: req/s {:.2}×, p99 {:.2}×, CPU per request {:.2}× (+{:.0} µs)",
                v.name(),
                pair[i].rate() / pair[0].rate().max(1e-9),
                p99 / p99_off.max(1e-9),
                pair[i].cpu_us() / pair[0].cpu_us().max(1e-9),
                pair[i].cpu_us() - pair[0].cpu_us()
            );
        }
    }
    println!(
        "({} OTLP export posts received; the 'on' origin's log has {access_lines} lines)",
        exports.load(Ordering::Relaxed)
    );
    Ok(())
}

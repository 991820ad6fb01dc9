//! `make bench` — session validation latency at the origin, over loopback.
//!
//! Starts a real nats-server, the NoETL stand-in and two origins (embedded store and NATS
//! K/V), then measures `POST /api/auth/validate`:
//! - cache hit, memory and NATS K/V (the goal: p99 < 1 ms);
//! - cache miss, memory and NATS K/V (the origin asks NoETL, then caches);
//! - negative-cache hit, memory and NATS K/V: a token NoETL already called invalid, answered
//!   401 from the replica's memory after the shared cache said "not here" (issue 12), and,
//!   in process, the negative cache's own lookup among 100,000 entries (ns);
//! - peers in the same run, so the figures read as ratios on a noisy shared machine:
//!   `GET /health` on the same origin (the HTTP floor) and the stand-in's own
//!   `/api/auth/session/validate` (what every request would cost without the cache).
//!
//! Variants are measured in interleaved rounds, so a burst of load from another process
//! hits all of them alike. One keep-alive connection per variant, requests in sequence:
//! latency, not throughput. Usage: `bench-sessions [--rounds N (50)] [--per-round M (100)]`.

use std::time::{Duration, Instant};

use gateway_tests::bench::{arg, percentile, us};

use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use serde_json::{json, Value};

struct Variant {
    name: &'static str,
    samples: Vec<Duration>,
}

async fn timed(req: reqwest::RequestBuilder, expect: u16) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let _ = resp.bytes().await?;
    let took = started.elapsed();
    anyhow::ensure!(status == expect, "expected HTTP {expect}, got {status}");
    Ok(took)
}

/// Creates a session directly at the stand-in (so no origin has cached it).
async fn fresh_session(
    http: &reqwest::Client,
    standin: &StandIn,
    i: usize,
) -> anyhow::Result<String> {
    let id_token = standin.dev_token(&format!("bench{i}@example.com")).await;
    let v: Value = http
        .post(format!("{}/api/auth/login", standin.url))
        .json(&json!({"auth0_token": id_token, "auth0_domain": "dev", "client_ip": "127.0.0.1"}))
        .send()
        .await?
        .json()
        .await?;
    v["data"]["session_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("stand-in login failed: {v}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 50);
    let per_round = arg("--per-round", 100);
    let nats = NatsServer::start().await?;
    let standin = StandIn::start(StandInOptions::default()).await?;
    // A negative entry outlives the run, so every negative sample is a hit.
    let quiet = |o: OriginOptions| o.env("RUST_LOG", "warn").env("SESSION_NEGATIVE_TTL", "1h");
    let mem = Origin::start(&standin, quiet(OriginOptions::default())).await?;
    let kv = Origin::start(&standin, quiet(OriginOptions::with_nats(&nats.url))).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;

    let hit_token = fresh_session(&http, &standin, 0).await?;
    for o in [&mem, &kv] {
        timed(
            http.post(format!("{}/api/auth/validate", o.url))
                .bearer_auth(&hit_token),
            200,
        )
        .await?;
    }
    // One token per origin that NoETL has called invalid: in the negative cache from now on.
    let unknown = format!("unknown-{}", uuid::Uuid::new_v4());
    for o in [&mem, &kv] {
        timed(
            http.post(format!("{}/api/auth/validate", o.url))
                .bearer_auth(&unknown),
            401,
        )
        .await?;
    }
    // Enough uncached sessions for every miss sample of both origins.
    let misses_needed = rounds * per_round;
    let mut miss_tokens = Vec::with_capacity(misses_needed * 2);
    for i in 0..misses_needed * 2 {
        miss_tokens.push(fresh_session(&http, &standin, i + 1).await?);
    }

    let mut variants: Vec<Variant> = [
        "origin /health (HTTP floor)",
        "hit, memory store",
        "hit, NATS K/V",
        "miss, memory store",
        "miss, NATS K/V",
        "NoETL validate direct (no cache)",
        "negative hit, memory store",
        "negative hit, NATS K/V",
    ]
    .into_iter()
    .map(|name| Variant {
        name,
        samples: Vec::with_capacity(rounds * per_round),
    })
    .collect();

    let mut next_miss = miss_tokens.into_iter();
    let started = Instant::now();
    for _ in 0..rounds {
        for (i, v) in variants.iter_mut().enumerate() {
            for _ in 0..per_round {
                let req = match i {
                    0 => http.get(format!("{}/health", mem.url)),
                    1 => http
                        .post(format!("{}/api/auth/validate", mem.url))
                        .bearer_auth(&hit_token),
                    2 => http
                        .post(format!("{}/api/auth/validate", kv.url))
                        .bearer_auth(&hit_token),
                    3 | 4 => {
                        let origin = if i == 3 { &mem } else { &kv };
                        let token = next_miss.next().expect("enough miss tokens were created");
                        http.post(format!("{}/api/auth/validate", origin.url))
                            .bearer_auth(token)
                    }
                    5 => http
                        .post(format!("{}/api/auth/session/validate", standin.url))
                        .json(&json!({"session_token": hit_token})),
                    _ => {
                        let origin = if i == 6 { &mem } else { &kv };
                        http.post(format!("{}/api/auth/validate", origin.url))
                            .bearer_auth(&unknown)
                    }
                };
                let expect = if i >= 6 { 401 } else { 200 };
                v.samples.push(timed(req, expect).await?);
            }
        }
    }
    let wall = started.elapsed();

    let floor = {
        let mut s = variants[0].samples.clone();
        s.sort();
        percentile(&s, 0.5)
    };
    println!("session validation at the origin, {rounds} rounds × {per_round} requests per variant, sequential keep-alive, loopback");
    println!(
        "{:<36} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "variant", "n", "p50 µs", "p90 µs", "p99 µs", "max µs", "p50/floor"
    );
    for v in &mut variants {
        v.samples.sort();
        let s = &v.samples;
        let p50 = percentile(s, 0.5);
        println!(
            "{:<36} {:>8} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.2}x",
            v.name,
            s.len(),
            us(p50),
            us(percentile(s, 0.9)),
            us(percentile(s, 0.99)),
            us(*s.last().expect("every variant has samples")),
            us(p50) / us(floor),
        );
    }
    let hit_p99 = [1, 2].map(|i| percentile(&variants[i].samples, 0.99));
    println!(
        "goal: cache-hit p99 < 1000 µs — memory {:.0} µs, NATS K/V {:.0} µs: {}",
        us(hit_p99[0]),
        us(hit_p99[1]),
        if hit_p99.iter().all(|d| *d < Duration::from_millis(1)) {
            "met"
        } else {
            "NOT met"
        }
    );
    println!("wall time {:.1} s", wall.as_secs_f64());
    negative_lookup();
    Ok(())
}

/// In process: what the negative cache itself adds to a validation — one lookup among
/// 100,000 entries, hit and miss — next to the SHA-256 of the token every validation
/// already pays. Timed in batches of 100 (a single lookup is below the clock's grain).
fn negative_lookup() {
    use gateway_shared::session::SessionHash;
    use origin::auth::negative::{NegativeCache, NEGATIVE_MAX};
    const BATCH: u32 = 100;
    let cache = NegativeCache::new(Duration::from_secs(3600), NEGATIVE_MAX);
    let hashes: Vec<SessionHash> = (0..NEGATIVE_MAX)
        .map(|i| SessionHash::of(&format!("bench-negative-{i}")))
        .collect();
    for h in &hashes {
        cache.insert(h);
    }
    let absent: Vec<SessionHash> = (0..1000)
        .map(|i| SessionHash::of(&format!("absent-{i}")))
        .collect();
    let token = "a-session-token-of-typical-length-0123456789abcdef";
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("negative lookup, hit", Vec::new()),
        ("negative lookup, miss", Vec::new()),
        ("SessionHash::of(token) (sha256)", Vec::new()),
    ];
    for round in 0..2000usize {
        let h = &hashes[(round * 7919) % hashes.len()];
        let a = &absent[round % absent.len()];
        let t = Instant::now();
        for _ in 0..BATCH {
            assert!(cache.contains(std::hint::black_box(h)));
        }
        rows[0]
            .1
            .push(t.elapsed().as_nanos() as f64 / f64::from(BATCH));
        let t = Instant::now();
        for _ in 0..BATCH {
            assert!(!cache.contains(std::hint::black_box(a)));
        }
        rows[1]
            .1
            .push(t.elapsed().as_nanos() as f64 / f64::from(BATCH));
        let t = Instant::now();
        for _ in 0..BATCH {
            std::hint::black_box(SessionHash::of(std::hint::black_box(token)));
        }
        rows[2]
            .1
            .push(t.elapsed().as_nanos() as f64 / f64::from(BATCH));
    }
    println!(
        "negative cache in process ({} entries), 2000 batches of {BATCH}, ns per call",
        cache.len()
    );
    println!("{:<36} {:>9} {:>9}", "operation", "p50 ns", "p99 ns");
    for (name, mut ns) in rows {
        ns.sort_by(f64::total_cmp);
        println!(
            "{:<36} {:>9.0} {:>9.0}",
            name,
            percentile(&ns, 0.5),
            percentile(&ns, 0.99)
        );
    }
}

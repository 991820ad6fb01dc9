//! What every figure shares: the running world (NATS, the stand-in), starting and logging in
//! to an origin, and the limits and timings the figures have in common.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::StandIn;
use serde_json::{json, Value};

use crate::Args;

/// Connections per source address (one address has ~28k ephemeral ports).
pub(crate) const PER_ADDRESS: usize = 10_000;
/// Time one stream may take to open and send its init frame.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Memory is read this long after the last connection opened, so lazy allocations land.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);
/// How long after the last send the stragglers of a measured phase are awaited.
pub(crate) const DRAIN: Duration = Duration::from_secs(15);

/// The shared world: NATS, the stand-in, one session.
pub(crate) struct World {
    pub(crate) nats: NatsServer,
    pub(crate) nats_pid: u32,
    pub(crate) standin: StandIn,
    pub(crate) client: async_nats::Client,
    pub(crate) exe: PathBuf,
}

/// Origin options: quiet logs, then the `--origin-env` extras.
pub(crate) fn origin_options(nats_url: Option<&str>, args: &Args) -> OriginOptions {
    let base = match nats_url {
        Some(url) => OriginOptions::with_nats(url),
        None => OriginOptions::default(),
    };
    // One session holds every stream: the per-user quotas would measure themselves.
    let base = base
        .env("RUST_LOG", "warn")
        .env("USER_MAX_STREAMS", "0")
        .env("USER_MAX_CLIENTS", "0")
        .env("STREAM_OPEN_RATE_LIMIT", "off")
        .env("REPLAY_RATE_LIMIT", "off");
    args.origin_env.iter().fold(base, |o, (k, v)| o.env(k, v))
}

/// Logs in once through `origin`; returns the session token and the user id.
pub(crate) async fn login(origin: &Origin, standin: &StandIn) -> anyhow::Result<(String, String)> {
    let id_token = standin.dev_token("bench-realtime@example.com").await;
    let v: Value = reqwest::Client::new()
        .post(format!("{}/api/auth/login", origin.url))
        .json(&json!({"auth0_token": id_token}))
        .timeout(Duration::from_secs(20))
        .send()
        .await?
        .json()
        .await?;
    let token = v["session_token"]
        .as_str()
        .with_context(|| format!("login failed: {}", v["error"]))?;
    let user = v["user"]["user_id"].as_str().unwrap_or("bench").to_owned();
    Ok((token.to_owned(), user))
}

/// The origin's public listener as a socket address (its URL is `http://host:port`).
pub(crate) fn origin_addr(origin: &Origin) -> anyhow::Result<SocketAddr> {
    origin
        .url
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("origin URL {} is not host:port", origin.url))
}

/// This process's open-file limit, `soft/hard`, for the header line.
pub(crate) fn nofile_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_else(|| "?".into())
}

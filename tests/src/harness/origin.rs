//! The origin binary, started against a stand-in (and optionally a nats-server), and
//! killed and started again on the same ports (a crash the clients must ride out).

use super::standin::StandIn;
use super::{free_port, scratch_dir, wait_until_ok, workspace_bin, ChildGuard};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The callback HMAC key every test origin shares (so replicas accept each other's tokens).
pub const CALLBACK_SECRET: &str = "test-callback-secret-shared-by-replicas";
/// The service token test origins accept on callbacks.
pub const INTERNAL_TOKEN: &str = "test-internal-service-token";

/// How to start an origin.
#[derive(Debug, Clone, Default)]
pub struct OriginOptions {
    /// `NATS_URL`; `None` runs the embedded in-memory store.
    pub nats_url: Option<String>,
    /// Extra environment (`NAME`, `value`), applied last so it can override defaults.
    pub env: Vec<(String, String)>,
}

impl OriginOptions {
    /// Options with a NATS URL.
    pub fn with_nats(url: &str) -> Self {
        Self {
            nats_url: Some(url.to_owned()),
            env: Vec::new(),
        }
    }

    /// Adds one environment variable.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds environment variables, in order (a later one wins).
    pub fn envs(self, vars: &[(&str, &str)]) -> Self {
        vars.iter().fold(self, |o, (k, v)| o.env(k, v))
    }
}

/// A running origin; killed (SIGTERM first) on drop.
pub struct Origin {
    /// Public listener base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// Internal listener base URL.
    pub internal_url: String,
    guard: ChildGuard,
    /// The whole environment of the process, so a restart is the same origin.
    env: Vec<(String, String)>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The origin command with exactly `env` (nothing inherited).
fn command(env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(workspace_bin("origin"));
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl Origin {
    /// Starts the origin binary with a clean environment pointing at `standin` and waits
    /// for `/health`.
    pub async fn start(standin: &StandIn, opts: OriginOptions) -> anyhow::Result<Self> {
        let dir = scratch_dir("gw-origin-");
        let log = dir.path().join("origin.log");
        let mut attempt = 0;
        let (internal, guard, url, env) = loop {
            attempt += 1;
            let (public, internal) = (free_port(), free_port());
            let mut env: Vec<(String, String)> = [
                ("PUBLIC_ADDR", format!("127.0.0.1:{public}")),
                ("INTERNAL_ADDR", format!("127.0.0.1:{internal}")),
                ("NOETL_BASE_URL", standin.url.clone()),
                ("AUTH_JWKS_URL", standin.jwks_url()),
                ("AUTH_ISSUER", standin.issuer()),
                ("AUTH_AUDIENCE", standin.audience().to_owned()),
                ("NOETL_TIMEOUT", "3s".into()),
                ("SHUTDOWN_GRACE", "2s".into()),
                // A test's teardown is a SIGTERM: no load balancer to wait for. The drain
                // test sets its own.
                ("DRAIN_DELAY", "0s".into()),
                ("RUST_LOG", "info,origin=debug".into()),
                ("GATEWAY_CALLBACK_SECRET", CALLBACK_SECRET.into()),
                ("GATEWAY_INTERNAL_TOKEN", INTERNAL_TOKEN.into()),
                // Every test client is 127.0.0.1: suites that log in or validate many
                // times would share one bucket. The abuse tests turn them on.
                ("AUTH_RATE_LIMIT", "off".into()),
                ("LOGIN_RATE_LIMIT", "off".into()),
                (
                    "PROXY_ALLOW",
                    "GET /api/executions,GET /api/catalog,GET /api/debug,POST /api/debug".into(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            if let Some(url) = &opts.nats_url {
                env.push(("NATS_URL".into(), url.clone()));
            }
            env.extend(opts.env.iter().cloned());
            let mut guard = ChildGuard::spawn("origin", command(&env), log.clone())?;
            let url = format!("http://127.0.0.1:{public}");
            let up = wait_until_ok(&format!("{url}/health"), Duration::from_secs(20)).await;
            // Another test's process may have taken a port first; only listeners we own count.
            let pid = [guard.pid()];
            if up.is_ok()
                && super::listener_owned_by(public, &pid)
                && super::listener_owned_by(internal, &pid)
            {
                break (internal, guard, url, env);
            }
            guard.stop(Duration::from_secs(2));
            if attempt >= 3 {
                anyhow::bail!(
                    "origin did not start on its own ports: {up:?}\n{}",
                    guard.log_text()
                );
            }
        };
        Ok(Self {
            url,
            internal_url: format!("http://127.0.0.1:{internal}"),
            guard,
            env,
            log,
            _dir: dir,
        })
    }

    /// Kills the process with SIGKILL — a crash: no drain, no goodbye to SSE clients — and
    /// reaps it, so its ports are free for [`Origin::start_again`].
    pub fn kill(&mut self) {
        // Only a live child: `ChildGuard::signal` on a reaped one would signal pid 0, the
        // test's own process group.
        if self.guard.is_running() {
            self.guard.signal("KILL");
        }
        self.guard.stop(Duration::from_secs(3));
    }

    /// Starts the binary again (after [`Origin::kill`] or a stop) on the same ports with the
    /// same environment, appending to the same log, and waits for `/health`. Whoever points
    /// at this origin (an edge's `ORIGIN_URL`, the stand-in's callbacks) finds it again.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.guard.is_running() {
            self.kill();
        }
        let mut guard = ChildGuard::spawn("origin", command(&self.env), self.log.clone())?;
        let up = wait_until_ok(&format!("{}/health", self.url), Duration::from_secs(20)).await;
        let port = |u: &str| u.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        let pid = [guard.pid()];
        let owned = [&self.url, &self.internal_url]
            .iter()
            .all(|u| port(u).is_some_and(|p| super::listener_owned_by(p, &pid)));
        if up.is_err() || !owned {
            guard.stop(Duration::from_secs(2));
            anyhow::bail!(
                "origin did not start again on {} (another process may hold the port): {up:?}\n{}",
                self.url,
                guard.log_text()
            );
        }
        self.guard = guard;
        Ok(())
    }

    /// [`Origin::kill`], then [`Origin::start_again`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start_again().await
    }

    /// The process guard (to stop, kill or read the log).
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// Resumes on this replica's NATS bus that read `reads` (`none` or `stream`,
    /// `gateway_bus_resumes_total{reads}`); `None` if the origin does not answer or has
    /// counted none of that kind yet.
    pub async fn bus_resumes(&self, reads: &str) -> Option<u64> {
        self.metric(&format!("gateway_bus_resumes_total{{reads=\"{reads}\"}}"))
            .await
    }

    /// SSE streams open on this replica (`gateway_sse_streams_open` on the internal
    /// `/metrics`); `None` if the origin does not answer.
    pub async fn sse_connections(&self) -> Option<u64> {
        self.metric("gateway_sse_streams_open").await
    }

    /// The value of the metric `name` on the internal `/metrics`: with labels
    /// (`name{a="b"}`, written as the exposition writes them) that one series; without,
    /// the sum of every series of that exact name (a labelled counter's total). `None` if
    /// the origin does not answer, or exports no such series, or its value is not an
    /// integer.
    pub async fn metric(&self, name: &str) -> Option<u64> {
        let text = self.metrics_text().await?;
        let samples = super::metrics::parse(&text);
        if name.contains('{') {
            return samples
                .iter()
                .find(|s| s.series() == name)
                .and_then(|s| s.as_u64());
        }
        let of_name: Vec<_> = samples.iter().filter(|s| s.name == name).collect();
        if of_name.is_empty() {
            return None;
        }
        of_name.iter().map(|s| s.as_u64()).sum()
    }

    /// The internal `/metrics` text; `None` if the origin does not answer 200.
    pub async fn metrics_text(&self) -> Option<String> {
        let resp = reqwest::get(format!("{}/metrics", self.internal_url))
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.text().await.ok()
    }

    /// The origin's log so far (assert that secrets never appear in it).
    pub fn log_text(&self) -> String {
        self.guard.log_text()
    }
}

//! The origin binary, started against a stand-in (and optionally a nats-server).

use super::standin::StandIn;
use super::{free_port, scratch_dir, wait_until_ok, workspace_bin, ChildGuard};
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
}

/// A running origin; killed (SIGTERM first) on drop.
pub struct Origin {
    /// Public listener base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// Internal listener base URL.
    pub internal_url: String,
    guard: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Origin {
    /// Starts the origin binary with a clean environment pointing at `standin` and waits
    /// for `/health`.
    pub async fn start(standin: &StandIn, opts: OriginOptions) -> anyhow::Result<Self> {
        let dir = scratch_dir("gw-origin-");
        let mut attempt = 0;
        let (internal, guard, url) = loop {
            attempt += 1;
            let (public, internal) = (free_port(), free_port());
            let mut cmd = Command::new(workspace_bin("origin"));
            cmd.env_clear()
                .env("PUBLIC_ADDR", format!("127.0.0.1:{public}"))
                .env("INTERNAL_ADDR", format!("127.0.0.1:{internal}"))
                .env("NOETL_BASE_URL", &standin.url)
                .env("AUTH_JWKS_URL", standin.jwks_url())
                .env("AUTH_ISSUER", standin.issuer())
                .env("AUTH_AUDIENCE", standin.audience())
                .env("NOETL_TIMEOUT", "3s")
                .env("SHUTDOWN_GRACE", "2s")
                .env("RUST_LOG", "info,origin=debug")
                .env("GATEWAY_CALLBACK_SECRET", CALLBACK_SECRET)
                .env("GATEWAY_INTERNAL_TOKEN", INTERNAL_TOKEN)
                .env(
                    "PROXY_ALLOW",
                    "GET /api/executions,GET /api/catalog,GET /api/debug,POST /api/debug",
                );
            if let Some(url) = &opts.nats_url {
                cmd.env("NATS_URL", url);
            }
            for (k, v) in &opts.env {
                cmd.env(k, v);
            }
            let mut guard = ChildGuard::spawn("origin", cmd, dir.path().join("origin.log"))?;
            let url = format!("http://127.0.0.1:{public}");
            let up = wait_until_ok(&format!("{url}/health"), Duration::from_secs(20)).await;
            // Another test's process may have taken a port first; only listeners we own count.
            let pid = [guard.pid()];
            if up.is_ok()
                && super::listener_owned_by(public, &pid)
                && super::listener_owned_by(internal, &pid)
            {
                break (internal, guard, url);
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
            _dir: dir,
        })
    }

    /// The process guard (to stop, kill or read the log).
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// The origin's log so far (assert that secrets never appear in it).
    pub fn log_text(&self) -> String {
        self.guard.log_text()
    }
}

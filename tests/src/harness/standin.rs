//! The NoETL stand-in binary (`noetl-standin`), started on a free port for one test.
//!
//! The child gets a clean environment (only `PATH`, `HOME` and `RUST_LOG`, taken from the
//! test's `STANDIN_LOG`, default `info`), so a developer's `NATS_URL` or `STANDIN_*` never
//! leaks into a test. The helpers wrap the
//! stand-in's dev IdP and `/_standin/*` control routes; they panic with a clear message on
//! failure, because in a test a broken stand-in is a broken test.

use super::{scratch_dir, ChildGuard};
pub use crate::standin::events::EventShape;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

/// The audience the stand-in's dev IdP uses unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "noetl-gateway-dev";

/// How to start a stand-in; `Default` is a plain one without NATS.
#[derive(Debug, Clone, Default)]
pub struct StandInOptions {
    /// `--nats-url`: publish execution events there (none → no events).
    pub nats_url: Option<String>,
    /// `--session-ttl` in seconds (short values test session expiry).
    pub session_ttl_secs: Option<u64>,
    /// `--python-events`: the older Python server's event shape (the same as
    /// `event_shape: Some(EventShape::Python)`).
    pub python_events: bool,
    /// `--event-shape`: which NoETL the events look like (default: the Rust server's).
    pub event_shape: Option<EventShape>,
    /// `--tenant` (`v4`; default `default`), written verbatim into each envelope.
    pub tenant: Option<String>,
    /// `--organization` (`v4`; default `default`).
    pub organization: Option<String>,
    /// `--shard-count` (`v4`; default 1).
    pub shard_count: Option<u32>,
    /// `--v4-stream` (`v4`; default `NOETL_EVENTS`).
    pub v4_stream: Option<String>,
    /// `--v4-subject-prefix` (`v4`; default `noetl.events`).
    pub v4_subject_prefix: Option<String>,
    /// `--step-delay-ms` (default 200).
    pub step_delay_ms: Option<u64>,
    /// `--tail-interval-ms` (default 500): how often buffered events are flushed.
    pub tail_interval_ms: Option<u64>,
    /// `--audience` (default [`DEFAULT_AUDIENCE`]).
    pub audience: Option<String>,
}

impl StandInOptions {
    fn args(&self, port: u16) -> Vec<String> {
        let mut args = vec!["--addr".to_owned(), format!("127.0.0.1:{port}")];
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                args.push(format!("--{name}"));
                args.push(v);
            }
        };
        flag("nats-url", self.nats_url.clone());
        flag("session-ttl", self.session_ttl_secs.map(|v| v.to_string()));
        flag("step-delay-ms", self.step_delay_ms.map(|v| v.to_string()));
        flag(
            "tail-interval-ms",
            self.tail_interval_ms.map(|v| v.to_string()),
        );
        flag("audience", self.audience.clone());
        flag(
            "event-shape",
            self.event_shape.map(|s| s.as_str().to_owned()),
        );
        flag("tenant", self.tenant.clone());
        flag("organization", self.organization.clone());
        flag("shard-count", self.shard_count.map(|v| v.to_string()));
        flag("v4-stream", self.v4_stream.clone());
        flag("v4-subject-prefix", self.v4_subject_prefix.clone());
        if self.python_events {
            args.push("--python-events".to_owned());
        }
        args
    }
}

/// A running stand-in; killed (SIGTERM first) on drop.
pub struct StandIn {
    /// Base URL, e.g. `http://127.0.0.1:41234` (NoETL's `NOETL_BASE_URL`).
    pub url: String,
    /// The port it listens on.
    pub port: u16,
    guard: ChildGuard,
    audience: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl StandIn {
    /// Spawns the binary on a free port (log in a scratch directory) and waits for
    /// `/api/health`; the error carries the log if it never comes up.
    pub async fn start(opts: StandInOptions) -> anyhow::Result<Self> {
        let dir = scratch_dir("gw-standin-");
        let super::Served { port, url, guard } = super::spawn_on_free_port(
            "noetl-standin",
            dir.path().join("standin.log"),
            "/api/health",
            |port| {
                let mut cmd = super::clean_command("noetl-standin", "STANDIN_LOG");
                cmd.args(opts.args(port));
                cmd
            },
        )
        .await?;
        Ok(Self {
            url,
            port,
            guard,
            audience: opts.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            _dir: dir,
        })
    }

    /// A valid RS256 ID token for `email` from the dev IdP.
    pub async fn dev_token(&self, email: &str) -> String {
        self.dev_token_with(&[("email", email)]).await
    }

    /// An ID token with any `/dev/token` query (`sub`, `email`, `name`, and the hostile
    /// overrides `iss`, `aud`, `ttl`, `nbf_in`, `kid`, `email_verified`, `iat_ago`).
    pub async fn dev_token_with(&self, query: &[(&str, &str)]) -> String {
        let v = self.get_json("/dev/token", query).await;
        v["id_token"]
            .as_str()
            .unwrap_or_else(|| panic!("/dev/token gave no id_token: {v}"))
            .to_owned()
    }

    /// The dev IdP's issuer (`<url>/dev/`), what the gateway's `AUTH_ISSUER` must be.
    pub fn issuer(&self) -> String {
        format!("{}/dev/", self.url)
    }

    /// The dev IdP's JWKS URL (the gateway's `AUTH_JWKS_URL`).
    pub fn jwks_url(&self) -> String {
        format!("{}/dev/.well-known/jwks.json", self.url)
    }

    /// The audience of the dev IdP's tokens (the gateway's `AUTH_AUDIENCE`).
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Calls per `"<METHOD> <route template>"` to `/api/*` since start or the last reset.
    pub async fn calls(&self) -> HashMap<String, u64> {
        let v = self.get_json("/_standin/calls", &[]).await;
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("/_standin/calls is not a map of counts ({e}): {v}"))
    }

    /// Calls to one route, e.g. `"POST /api/auth/session/validate"` (0 if never called).
    pub async fn call_count(&self, key: &str) -> u64 {
        self.calls().await.get(key).copied().unwrap_or(0)
    }

    /// The trace headers of the last `/api/*` calls, oldest first (since start or the last
    /// reset).
    pub async fn traces(&self) -> Vec<crate::standin::control::TracedCall> {
        let v = self.get_json("/_standin/traces", &[]).await;
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("/_standin/traces is not a list of calls ({e}): {v}"))
    }

    /// Zeroes the call counters and clears the trace log.
    pub async fn reset_calls(&self) {
        self.post_json("/_standin/reset-calls", &json!({})).await;
    }

    /// Makes every `/api/*` call wait `delay_ms` and/or answer `fail_status`;
    /// `(None, None)` clears the faults.
    pub async fn set_faults(&self, delay_ms: Option<u64>, fail_status: Option<u16>) {
        let mut body = json!({});
        if let Some(d) = delay_ms {
            body["delay_ms"] = d.into();
        }
        if let Some(s) = fail_status {
            body["fail_status"] = s.into();
        }
        self.post_json("/_standin/faults", &body).await;
    }

    /// Every callback attempt the stand-in made (`[{kind, url, attempt, status, error,
    /// body, at}]`).
    pub async fn callbacks(&self) -> Value {
        self.get_json("/_standin/callbacks", &[]).await
    }

    /// Event publishing counters (`{events:{queued, published, dropped, skipped}}`).
    pub async fn stats(&self) -> Value {
        self.get_json("/_standin/stats", &[]).await
    }

    /// Ends the session of `token` at NoETL itself (its own `POST /api/auth/logout`, not
    /// the gateway's), as an admin or NoETL's own expiry would; panics unless it succeeds.
    pub async fn end_session(&self, token: &str) {
        let r = self
            .http
            .post(format!("{}/api/auth/logout", self.url))
            .json(&json!({"session_token": token}))
            .send()
            .await
            .expect("the stand-in answers a logout");
        assert!(
            r.status().is_success(),
            "the stand-in's logout: {}",
            r.status()
        );
    }

    /// The process guard (to stop, signal or read the log).
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// The stand-in's log so far.
    pub fn log_text(&self) -> String {
        self.guard.log_text()
    }

    async fn get_json(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query)
            .unwrap_or_else(|e| panic!("bad URL for {path}: {e}"));
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
        expect_ok_json(path, resp).await
    }

    async fn post_json(&self, path: &str, body: &Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}"));
        expect_ok_json(path, resp).await
    }
}

async fn expect_ok_json(path: &str, resp: reqwest::Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "{path} answered {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {text}"))
}

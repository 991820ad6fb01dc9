//! The demo backend stand-in binary (`demo-service`), started on a free port for one test.
//!
//! The child gets a clean environment (only `PATH`, `HOME` and `RUST_LOG`, taken from the
//! test's `DEMO_LOG`, default `info`), so a developer's `GATEWAY_INTERNAL_URL` never leaks
//! into a test. A test usually starts it first (the origin needs its URL as
//! `SERVICE_DEMO_URL`), then the origin, then aims it at the origin's internal listener
//! with [`DemoService::set_gateway`]. The helpers panic with a clear message on failure: in
//! a test a broken stand-in is a broken test.

use super::{scratch_dir, ChildGuard};
pub use crate::demo::answers::Delivery;
use serde_json::{json, Value};
use std::time::Duration;

/// How to start a demo service; `Default` is the service `demo` with no gateway yet.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// `--name`: the service's name in the gateway's registry.
    pub name: String,
    /// `--gateway-internal-url`: the origin's internal listener (none: set it later with
    /// [`DemoService::set_gateway`]).
    pub gateway_internal_url: Option<String>,
    /// `--internal-token`: the origin's `GATEWAY_INTERNAL_TOKEN`.
    pub internal_token: Option<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            name: "demo".to_owned(),
            gateway_internal_url: None,
            internal_token: None,
        }
    }
}

impl DemoOptions {
    fn args(&self, port: u16) -> Vec<String> {
        let mut args = vec![
            "--addr".to_owned(),
            format!("127.0.0.1:{port}"),
            "--name".to_owned(),
            self.name.clone(),
        ];
        if let Some(url) = &self.gateway_internal_url {
            args.extend(["--gateway-internal-url".to_owned(), url.clone()]);
        }
        args
    }
}

/// A running demo service; killed (SIGTERM first) on drop.
pub struct DemoService {
    /// Base URL, e.g. `http://127.0.0.1:41234` (the origin's `SERVICE_<NAME>_URL`).
    pub url: String,
    /// The port it listens on.
    pub port: u16,
    /// Its service name.
    pub name: String,
    guard: ChildGuard,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl DemoService {
    /// Spawns the binary on a free port (log in a scratch directory) and waits for
    /// `/health` from a listener it owns; the error carries the log if it never comes up.
    pub async fn start(opts: DemoOptions) -> anyhow::Result<Self> {
        let dir = scratch_dir("gw-demo-");
        let super::Served { port, url, guard } = super::spawn_on_free_port(
            "demo-service",
            dir.path().join("demo.log"),
            "/health",
            |port| {
                let mut cmd = super::clean_command("demo-service", "DEMO_LOG");
                cmd.args(opts.args(port));
                // The token goes by environment, never on a command line `ps` shows.
                if let Some(token) = &opts.internal_token {
                    cmd.env("GATEWAY_INTERNAL_TOKEN", token);
                }
                cmd
            },
        )
        .await?;
        Ok(Self {
            url,
            port,
            name: opts.name,
            guard,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .build()?,
            _dir: dir,
        })
    }

    /// The base URL the gateway proxies `/api/v1/<name>/*` to.
    pub fn base_url(&self) -> &str {
        &self.url
    }

    /// Aims `/ask` and `/emit` at the gateway's internal listener `url` with `token`.
    pub async fn set_gateway(&self, url: &str, token: &str) {
        let resp = self
            .http
            .post(format!("{}/_demo/gateway", self.url))
            .json(&json!({"url": url, "token": token}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /_demo/gateway failed: {e}"));
        expect_ok_json("/_demo/gateway", resp).await;
    }

    /// Every delivery the gateway made to `POST /answers`, oldest first, duplicates
    /// included.
    pub async fn deliveries(&self) -> Vec<Delivery> {
        let v = self.get_json("/_demo/deliveries").await;
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("/_demo/deliveries is not a list of deliveries ({e}): {v}"))
    }

    /// Makes the next `count` deliveries to `POST /answers` fail with `status` (not
    /// recorded), so the gateway has to retry; returns how many were refused so far.
    pub async fn refuse_answers(&self, count: u32, status: u16) -> u64 {
        let resp = self
            .http
            .post(format!("{}/_demo/refuse-answers", self.url))
            .json(&json!({"count": count, "status": status}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /_demo/refuse-answers failed: {e}"));
        let v = expect_ok_json("/_demo/refuse-answers", resp).await;
        v["refused"].as_u64().unwrap_or(0)
    }

    /// How many deliveries were refused since start (see [`DemoService::refuse_answers`]).
    pub async fn refused_answers(&self) -> u64 {
        self.get_json("/_demo/refuse-answers").await["refused"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The deliveries of one question.
    pub async fn deliveries_of(&self, question_id: &str) -> Vec<Delivery> {
        let mut all = self.deliveries().await;
        all.retain(|d| d.question_id == question_id);
        all
    }

    /// `GET /answers/{question_id}`: `Some({"status","answer","user",…})` once the gateway
    /// delivered an answer or an expiry, `None` while it answers 404.
    pub async fn answer(&self, question_id: &str) -> Option<Value> {
        let mut url = reqwest::Url::parse(&self.url).expect("the base URL is a URL");
        url.path_segments_mut()
            .expect("an http URL has path segments")
            .extend(["answers", question_id]);
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /answers/{question_id} failed: {e}"));
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        Some(expect_ok_json("/answers/{question_id}", resp).await)
    }

    /// The process guard (to stop, signal or read the log).
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// The service's log so far.
    pub fn log_text(&self) -> String {
        self.guard.log_text()
    }

    async fn get_json(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
        expect_ok_json(path, resp).await
    }
}

async fn expect_ok_json(path: &str, resp: reqwest::Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "{path} answered {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {text}"))
}

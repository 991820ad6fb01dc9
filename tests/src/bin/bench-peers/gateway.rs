//! The gateway side: an origin on the shared NATS (release build, RUST_LOG=warn, the
//! per-user quotas off so one session can hold every stream), its session, and the three
//! ways the bench makes it deliver — a callback for a request executePlaybook recorded,
//! subscribeToExecution, and a NoETL event on NATS.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use gateway_tests::bench::sse_conn::SseTarget;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::standin::StandIn;
use gateway_tests::standin::events::{encode_row, EventKind, EventRow, NewEvent, RowPlace, Shape};
use gateway_tests::standin::ids::{ExecutionId, IdGen};
use serde_json::{json, Value};

use crate::load::Sender;

/// The playbook every bench request runs: the stand-in's `demo/slow`, long enough that its
/// own result never comes during the bench (the bench's callback is the result).
const PLAYBOOK: &str = "demo/slow";

/// NATS, the NoETL stand-in and a JetStream context: what every origin shares.
pub(crate) struct World {
    pub(crate) nats: NatsServer,
    pub(crate) nats_pid: u32,
    pub(crate) standin: StandIn,
    pub(crate) js: jetstream::Context,
    /// `--origin-env` extras.
    pub(crate) extra_env: Vec<(String, String)>,
}

/// One origin and the session the bench uses on it.
pub(crate) struct Gateway {
    pub(crate) origin: Origin,
    pub(crate) pid: u32,
    pub(crate) token: String,
    pub(crate) addr: std::net::SocketAddr,
    /// How long the runs [`Gateway::execute`] starts last (600 s: longer than any figure
    /// but the soak, which sets it past its own length). A run that ends delivers its own
    /// result, after which a progress report for it is refused (409).
    pub(crate) run_secs: u64,
}

/// Origin options: on NATS, quiet, the per-user quotas and rates off (they would measure
/// themselves), then `extra` (e.g. `MALLOC_ARENA_MAX=2`), then `--origin-env`.
pub(crate) fn origin_options(world: &World, extra: &[(&str, &str)]) -> OriginOptions {
    let base = OriginOptions::with_nats(&world.nats.url).envs(&[
        ("RUST_LOG", "warn"),
        ("USER_MAX_STREAMS", "0"),
        ("USER_MAX_CLIENTS", "0"),
        ("STREAM_OPEN_RATE_LIMIT", "off"),
        ("REPLAY_RATE_LIMIT", "off"),
        ("EXECUTE_RATE_LIMIT", "off"),
        ("GRAPHQL_MUTATION_RATE_LIMIT", "off"),
        ("LOGIN_RATE_LIMIT", "off"),
        ("AUTH_RATE_LIMIT", "off"),
    ]);
    let base = base.envs(extra);
    world.extra_env.iter().fold(base, |o, (k, v)| o.env(k, v))
}

impl Gateway {
    /// Starts an origin with `extra` environment and logs in (or reuses `token`).
    pub(crate) async fn start(
        world: &World,
        extra: &[(&str, &str)],
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut origin = Origin::start(&world.standin, origin_options(world, extra)).await?;
        let pid = origin.guard().pid();
        let token = match token {
            Some(t) => t.to_owned(),
            None => login(&origin, &world.standin).await?,
        };
        let addr = origin
            .url
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("origin URL {} is not host:port", origin.url))?;
        Ok(Self {
            origin,
            pid,
            token,
            addr,
            run_secs: 600,
        })
    }

    /// `GET <path>` on this origin with the session.
    pub(crate) fn target(&self, path: &str) -> SseTarget {
        SseTarget {
            addr: self.addr,
            path: path.to_owned(),
            token: Some(self.token.clone()),
        }
    }

    /// One GraphQL operation; the reply's `data`, or an error naming its `errors`.
    pub(crate) async fn graphql(
        &self,
        http: &reqwest::Client,
        query: &str,
        variables: Value,
    ) -> anyhow::Result<Value> {
        let v: Value = http
            .post(format!("{}/graphql", self.origin.url))
            .bearer_auth(&self.token)
            .json(&json!({"query": query, "variables": variables}))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(v["errors"].is_null(), "GraphQL errors: {}", v["errors"]);
        Ok(v["data"].clone())
    }

    /// executePlaybook (`demo/slow`, [`Gateway::run_secs`]) for `client`: `(execution id,
    /// request id)`.
    pub(crate) async fn execute(
        &self,
        http: &reqwest::Client,
        client: &str,
    ) -> anyhow::Result<(String, String)> {
        let d = self
            .graphql(
                http,
                "mutation($p: String!, $w: JSON, $c: String) { executePlaybook(path: $p, workload: $w, clientId: $c) { executionId requestId } }",
                json!({"p": PLAYBOOK, "w": {"seconds": self.run_secs}, "c": client}),
            )
            .await?;
        let r = &d["executePlaybook"];
        Ok((
            r["executionId"]
                .as_str()
                .context("no executionId")?
                .to_owned(),
            r["requestId"].as_str().context("no requestId")?.to_owned(),
        ))
    }

    /// executePlaybook for every client in `clients` (`concurrency` at once): the request id
    /// per client (`None` where it failed) and the first error.
    pub(crate) async fn execute_all(
        &self,
        http: &reqwest::Client,
        clients: &[String],
        concurrency: usize,
    ) -> (Vec<Option<String>>, Option<String>) {
        let replies: Vec<anyhow::Result<(String, String)>> =
            futures::stream::iter(clients.iter().map(|c| self.execute(http, c)))
                .buffered(concurrency.max(1))
                .collect()
                .await;
        let first = replies
            .iter()
            .find_map(|r| r.as_ref().err().map(|e| format!("{e:#}")));
        (
            replies
                .into_iter()
                .map(|r| r.ok().map(|(_, q)| q))
                .collect(),
            first,
        )
    }

    /// subscribeToExecution(`execution`, each of `clients`), `concurrency` at once: how many
    /// succeeded and the first error.
    pub(crate) async fn subscribe_all(
        &self,
        http: &reqwest::Client,
        execution: &str,
        clients: &[String],
        concurrency: usize,
    ) -> (usize, Option<String>) {
        let replies: Vec<anyhow::Result<Value>> =
            futures::stream::iter(clients.iter().map(|c| {
                self.graphql(
                    http,
                    "mutation($e: ID!, $c: String!) { subscribeToExecution(executionId: $e, clientId: $c) }",
                    json!({"e": execution, "c": c}),
                )
            }))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let first = replies
            .iter()
            .find_map(|r| r.as_ref().err().map(|e| format!("{e:#}")));
        (replies.iter().filter(|r| r.is_ok()).count(), first)
    }

    /// Callbacks on the internal listener (`POST /api/internal/callback/async`, service
    /// token) for `requests[i]`, the marker in the result's data.
    pub(crate) fn callbacks(
        &self,
        http: &reqwest::Client,
        requests: Arc<Vec<Option<String>>>,
        phase: u32,
    ) -> Sender {
        let url = Arc::new(format!(
            "{}/api/internal/callback/async",
            self.origin.internal_url
        ));
        let http = http.clone();
        Arc::new(move |i, t| {
            let Some(request) = requests.get(i).cloned().flatten() else {
                return Box::pin(async { false });
            };
            let req = http
                .post(url.as_str())
                .bearer_auth(INTERNAL_TOKEN)
                .json(&json!({
                    "request_id": request,
                    "status": "success",
                    "data": {"m": crate::streams::marker(phase, i as u32, t)},
                }));
            Box::pin(async move {
                match req.send().await {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let _ = r.bytes().await;
                        ok
                    }
                    Err(_) => false,
                }
            })
        })
    }
}

/// Logs in once through `origin`; the session token.
pub(crate) async fn login(origin: &Origin, standin: &StandIn) -> anyhow::Result<String> {
    let id_token = standin.dev_token("bench-peers@example.com").await;
    let v: Value = reqwest::Client::new()
        .post(format!("{}/api/auth/login", origin.url))
        .json(&json!({"auth0_token": id_token}))
        .timeout(Duration::from_secs(20))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["session_token"]
        .as_str()
        .with_context(|| format!("login failed: {}", v["error"]))?
        .to_owned())
}

/// Step ends for `execution`, published as NoETL's Rust control plane does (a
/// `command.completed` row on `noetl.events.*` in `noetl_events`, with `Nats-Msg-Id`); the
/// step name is the marker of event `i`. Accepted = JetStream acked it.
pub(crate) fn step_events(
    js: jetstream::Context,
    execution: u64,
    phase: u32,
    ids: Arc<IdGen>,
) -> Sender {
    Arc::new(move |i, t| {
        let place = RowPlace {
            event_id: ids.event(),
            parent_event_id: None,
            execution_id: ExecutionId(execution),
            catalog_id: 1,
            playbook_path: PLAYBOOK,
            at: chrono::Utc::now(),
        };
        let row = EventRow::build(
            &place,
            NewEvent::new(
                EventKind::CommandCompleted,
                crate::streams::marker(phase, i as u32, t),
            )
            .with_command(i as u64 + 1),
        );
        let out = encode_row(&row, Shape::Rust);
        let js = js.clone();
        Box::pin(async move {
            let Some(out) = out else { return false };
            let mut msg = PublishMessage::build().payload(out.payload);
            if out.send_msg_id {
                msg = msg.message_id(&out.msg_id);
            }
            match js.send_publish(out.subject, msg).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        })
    })
}

/// nchan publishes (`POST /pub/<channel>`, the marker in a JSON body) to `channels[i]`, or
/// to `channels[0]` for every `i` when there is one channel (broadcast).
pub(crate) fn publishes(
    http: &reqwest::Client,
    base: &str,
    channels: Arc<Vec<String>>,
    phase: u32,
) -> Sender {
    let (http, base) = (http.clone(), Arc::new(base.to_owned()));
    Arc::new(move |i, t| {
        let channel = if channels.len() == 1 {
            &channels[0]
        } else {
            &channels[i]
        };
        let req = http
            .post(format!("{base}/pub/{channel}"))
            .header("content-type", "application/json")
            .body(json!({"m": crate::streams::marker(phase, i as u32, t)}).to_string());
        Box::pin(async move {
            match req.send().await {
                Ok(r) => {
                    let ok = r.status().is_success();
                    let _ = r.bytes().await;
                    ok
                }
                Err(_) => false,
            }
        })
    })
}

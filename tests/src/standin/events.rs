//! Execution events: the row the real server stores, its two wire shapes, and the
//! publisher that flushes them to NATS in bursts.
//!
//! Rows are written into the execution's history immediately (that is the "event table")
//! and queued here; every `--tail-interval-ms` the publisher drains the queue and publishes
//! the whole batch at once, so consumers see bursts exactly as with the real server, which
//! tails its event table. Publishing failures are logged and counted, never retried.
//!
//! - Rust shape (default): `noetl.events.<event_type>`, JetStream publish into stream
//!   `noetl_events` with `Nats-Msg-Id: <event_id>`, payload the whole [`EventRow`]. If the
//!   stream cannot be ensured, core NATS publishes on the same subjects.
//! - Python shape (`--python-events`): `noetl.events.default.default.<execution_id>.0`, core
//!   publish, payload [`python_payload`]; types renamed by [`python_event_type`], with no
//!   counterpart for `command.issued`, `command.claimed`, `call.done`, `call.error` and
//!   `step.enter` (those rows are simply not published).

use super::config::Config;
use super::ids::{EventId, ExecutionId};
use async_nats::jetstream::{self, message::PublishMessage};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The JetStream stream the real Rust server publishes into.
pub const STREAM_NAME: &str = "noetl_events";
/// Its subjects.
pub const STREAM_SUBJECTS: &str = "noetl.events.>";
/// Its retention.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Tenant, org and shard of the Python-shape subject.
const PYTHON_TENANT: &str = "default";
const PYTHON_ORG: &str = "default";
const PYTHON_SHARD: &str = "0";
/// The worker name claimed commands report.
pub const WORKER_ID: &str = "standin-worker-1";

/// Every event type the stand-in writes, in the order one step produces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The run began (`node_name` = playbook path).
    PlaybookStarted,
    /// A step's command was queued.
    CommandIssued,
    /// A worker took it.
    CommandClaimed,
    /// The worker began executing it.
    CommandStarted,
    /// The step's tool call succeeded.
    CallDone,
    /// The step's tool call failed.
    CallError,
    /// The command finished.
    CommandCompleted,
    /// The command failed.
    CommandFailed,
    /// The engine entered the step (emitted after its command completed, as observed).
    StepEnter,
    /// The run ended (also emitted by a run that actually failed: a real-world trap).
    PlaybookCompleted,
    /// The run was cancelled.
    PlaybookCancelled,
}

impl EventKind {
    /// The Rust server's `event_type` (note the mix of `_` and `.`: it is what was observed).
    pub fn event_type(self) -> &'static str {
        match self {
            Self::PlaybookStarted => "playbook_started",
            Self::CommandIssued => "command.issued",
            Self::CommandClaimed => "command.claimed",
            Self::CommandStarted => "command.started",
            Self::CallDone => "call.done",
            Self::CallError => "call.error",
            Self::CommandCompleted => "command.completed",
            Self::CommandFailed => "command.failed",
            Self::StepEnter => "step.enter",
            Self::PlaybookCompleted => "playbook.completed",
            Self::PlaybookCancelled => "playbook_cancelled",
        }
    }

    /// The row's `status`.
    pub fn status(self) -> &'static str {
        match self {
            Self::PlaybookStarted => "STARTED",
            Self::CommandIssued => "PENDING",
            Self::CommandClaimed | Self::CommandStarted | Self::StepEnter => "RUNNING",
            Self::CallDone | Self::CommandCompleted | Self::PlaybookCompleted => "COMPLETED",
            Self::CallError | Self::CommandFailed => "FAILED",
            Self::PlaybookCancelled => "CANCELLED",
        }
    }

    /// The row's `node_type`.
    pub fn node_type(self) -> &'static str {
        match self {
            Self::PlaybookStarted | Self::PlaybookCompleted | Self::PlaybookCancelled => "playbook",
            Self::StepEnter => "step",
            _ => "http",
        }
    }
}

/// The Python server's name for an event, or `None` where it had no counterpart.
pub fn python_event_type(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::PlaybookStarted => Some("playbook_started"),
        EventKind::CommandStarted => Some("step_started"),
        EventKind::CommandCompleted => Some("step_completed"),
        EventKind::CommandFailed => Some("step_failed"),
        EventKind::PlaybookCompleted => Some("playbook_completed"),
        EventKind::PlaybookCancelled => Some("playbook_cancelled"),
        _ => None,
    }
}

/// An event as the runner describes it; the store adds ids, times and lineage.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// What happened.
    pub kind: EventKind,
    /// Playbook path for playbook events, step name otherwise.
    pub node_name: String,
    /// Overrides the kind's default status (a lying `playbook.completed` keeps COMPLETED).
    pub status: Option<&'static str>,
    /// The `result` column.
    pub result: Value,
    /// The `error` column.
    pub error: Value,
    /// The command this event belongs to (command/call events).
    pub command_id: Option<u64>,
    /// Duration of the call, for completion events.
    pub duration: Option<Duration>,
}

impl NewEvent {
    /// An event of `kind` on `node_name` with empty result and error.
    pub fn new(kind: EventKind, node_name: impl Into<String>) -> Self {
        Self {
            kind,
            node_name: node_name.into(),
            status: None,
            result: Value::Null,
            error: Value::Null,
            command_id: None,
            duration: None,
        }
    }

    /// Sets `result`.
    pub fn with_result(mut self, result: Value) -> Self {
        self.result = result;
        self
    }

    /// Sets `error`.
    pub fn with_error(mut self, error: Value) -> Self {
        self.error = error;
        self
    }

    /// Ties the event to a command.
    pub fn with_command(mut self, command_id: u64) -> Self {
        self.command_id = Some(command_id);
        self
    }

    /// Records how long the call took.
    pub fn with_duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }
}

/// Where a row sits: filled in by the store.
#[derive(Debug, Clone)]
pub struct RowPlace<'a> {
    /// The row's own id.
    pub event_id: EventId,
    /// The previous row of the same execution.
    pub parent_event_id: Option<EventId>,
    /// The execution.
    pub execution_id: ExecutionId,
    /// The playbook's catalog entry.
    pub catalog_id: u64,
    /// The playbook's path.
    pub playbook_path: &'a str,
    /// When the row was written.
    pub at: DateTime<Utc>,
}

/// One row of the event table, serialised whole as the Rust-shape payload (42 keys, most
/// of them null or constant, like the real table). Ids are JSON numbers above 2^53.
/// The fields are the table's columns; they stay crate-private because only the JSON
/// form is a contract.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    #[serde(skip)]
    pub(crate) kind: EventKind,
    pub(crate) event_id: EventId,
    pub(crate) event_type: &'static str,
    pub(crate) execution_id: ExecutionId,
    pub(crate) catalog_id: u64,
    pub(crate) parent_event_id: Option<EventId>,
    pub(crate) parent_execution_id: Option<ExecutionId>,
    pub(crate) node_id: String,
    pub(crate) node_name: String,
    pub(crate) node_type: &'static str,
    pub(crate) status: &'static str,
    pub(crate) result: Value,
    pub(crate) meta: Value,
    pub(crate) error: Value,
    pub(crate) stack_trace: Option<String>,
    pub(crate) event_time: String,
    pub(crate) created_at: String,
    pub(crate) timestamp: String,
    pub(crate) duration: Option<f64>,
    pub(crate) context: Value,
    pub(crate) loop_id: Option<String>,
    pub(crate) loop_name: Option<String>,
    pub(crate) iterator: Option<String>,
    pub(crate) current_index: Option<i64>,
    pub(crate) current_item: Value,
    pub(crate) worker_id: Option<&'static str>,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) command_id: Option<u64>,
    pub(crate) step_name: Option<String>,
    pub(crate) tool_kind: Option<&'static str>,
    pub(crate) playbook_path: String,
    pub(crate) server_id: &'static str,
    pub(crate) pool: &'static str,
    pub(crate) priority: i32,
    pub(crate) distributed_state: Option<Value>,
    pub(crate) trace_component: Value,
    pub(crate) labels: Value,
    pub(crate) tenant_id: &'static str,
    pub(crate) org_id: &'static str,
    pub(crate) correlation_id: Option<String>,
    pub(crate) retry_of: Option<u64>,
    pub(crate) version: u32,
}

impl EventRow {
    /// Builds the row for `ev` at `place`.
    pub fn build(place: &RowPlace<'_>, ev: NewEvent) -> Self {
        let at = place.at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let is_command = ev.command_id.is_some();
        let worker = matches!(
            ev.kind,
            EventKind::CommandClaimed
                | EventKind::CommandStarted
                | EventKind::CallDone
                | EventKind::CallError
                | EventKind::CommandCompleted
                | EventKind::CommandFailed
        );
        Self {
            kind: ev.kind,
            event_id: place.event_id,
            event_type: ev.kind.event_type(),
            execution_id: place.execution_id,
            catalog_id: place.catalog_id,
            parent_event_id: place.parent_event_id,
            parent_execution_id: None,
            node_id: format!("{}:{}", place.execution_id, ev.node_name),
            step_name: (ev.kind.node_type() != "playbook").then(|| ev.node_name.clone()),
            node_name: ev.node_name,
            node_type: ev.kind.node_type(),
            status: ev.status.unwrap_or(ev.kind.status()),
            result: ev.result,
            meta: json!({ "source": "noetl-standin" }),
            error: ev.error,
            stack_trace: None,
            event_time: at.clone(),
            created_at: at.clone(),
            timestamp: at,
            duration: ev.duration.map(|d| d.as_secs_f64()),
            context: json!({}),
            loop_id: None,
            loop_name: None,
            iterator: None,
            current_index: None,
            current_item: Value::Null,
            worker_id: worker.then_some(WORKER_ID),
            attempt: 1,
            max_attempts: 1,
            command_id: ev.command_id,
            tool_kind: is_command.then_some("http"),
            playbook_path: place.playbook_path.to_owned(),
            server_id: "noetl-standin",
            pool: "default",
            priority: 0,
            distributed_state: None,
            trace_component: json!({}),
            labels: json!({}),
            tenant_id: PYTHON_TENANT,
            org_id: PYTHON_ORG,
            correlation_id: None,
            retry_of: None,
            version: 1,
        }
    }

    /// The short form used in execution records (`GET /api/executions/{id}`).
    pub fn summary(&self) -> Value {
        json!({
            "event_id": self.event_id,
            "event_type": self.event_type,
            "node_name": self.node_name,
            "status": self.status,
            "created_at": self.created_at,
            "result": self.result,
            "error": self.error,
        })
    }

    /// The Rust-shape subject.
    pub fn rust_subject(&self) -> String {
        format!("noetl.events.{}", self.event_type)
    }

    /// The Python-shape subject.
    pub fn python_subject(&self) -> String {
        format!(
            "noetl.events.{PYTHON_TENANT}.{PYTHON_ORG}.{}.{PYTHON_SHARD}",
            self.execution_id
        )
    }
}

/// The Python-shape payload, or `None` for event types the Python server did not have.
pub fn python_payload(row: &EventRow) -> Option<Value> {
    let event_type = python_event_type(row.kind)?;
    Some(json!({
        "event_id": row.event_id,
        "event_type": event_type,
        "execution_id": row.execution_id,
        "node_name": row.node_name,
        "status": row.status,
        "timestamp": row.timestamp,
        "payload": {
            "node_type": row.node_type,
            "playbook_path": row.playbook_path,
            "result": row.result,
            "error": row.error,
        },
    }))
}

/// Which wire shape to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `noetl.events.<event_type>`, whole row, JetStream.
    Rust,
    /// `noetl.events.<tenant>.<org>.<execution_id>.<shard>`, small dict, core NATS.
    Python,
}

/// Counters visible at `GET /_standin/stats`.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Rows queued for publishing.
    pub queued: AtomicU64,
    /// Messages the server accepted (acknowledged, for JetStream).
    pub published: AtomicU64,
    /// Messages lost (no connection, publish error, no ack).
    pub dropped: AtomicU64,
    /// Rows with no counterpart in the chosen shape.
    pub skipped: AtomicU64,
}

impl EventStats {
    /// The counters as JSON.
    pub fn snapshot(&self) -> Value {
        json!({
            "queued": self.queued.load(Ordering::Relaxed),
            "published": self.published.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "skipped": self.skipped.load(Ordering::Relaxed),
        })
    }
}

/// The write end of the event queue; a no-op when no NATS URL is configured.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: Option<mpsc::UnboundedSender<EventRow>>,
    stats: Arc<EventStats>,
}

impl EventSink {
    /// A sink that publishes nothing (no `--nats-url`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            stats: Arc::default(),
        }
    }

    /// Queues a row for the next burst. Never blocks: it is called under the store's lock,
    /// which is what keeps the published order equal to the table's order.
    pub fn enqueue(&self, row: &EventRow) {
        if let Some(tx) = &self.tx {
            if tx.send(row.clone()).is_ok() {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The publishing counters.
    pub fn stats(&self) -> &EventStats {
        &self.stats
    }
}

/// How bursts leave the process.
enum Transport {
    /// JetStream publishes with `Nats-Msg-Id`, acknowledged.
    JetStream(jetstream::Context),
    /// Core publishes (Python shape, or no stream available).
    Core(async_nats::Client),
    /// NATS unreachable at start: every row is dropped and counted.
    Down,
}

/// The background task that flushes the queue every tail interval.
pub struct Publisher {
    sink: EventSink,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Connects (if `--nats-url` is set), ensures the stream and starts flushing.
    /// An unreachable NATS is a warning, not an error: HTTP keeps being served.
    pub async fn start(config: &Config) -> Self {
        let Some(url) = config.nats_url.as_deref() else {
            tracing::info!("no NATS_URL: execution events are not published");
            return Self {
                sink: EventSink::disabled(),
                stop: None,
                task: None,
            };
        };
        let shape = if config.python_events {
            Shape::Python
        } else {
            Shape::Rust
        };
        let transport = connect(url, shape).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = EventSink {
            tx: Some(tx),
            stats: Arc::default(),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let flusher = Flusher {
            rx,
            transport,
            shape,
            stats: sink.stats.clone(),
        };
        let task = tokio::spawn(flusher.run(config.tail_interval(), stop_rx));
        Self {
            sink,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// The queue's write end.
    pub fn sink(&self) -> EventSink {
        self.sink.clone()
    }

    /// Publishes what is still queued (bounded wait), then stops.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                tracing::warn!("event publisher did not finish its last burst in 3 s");
            }
        }
    }
}

async fn connect(url: &str, shape: Shape) -> Transport {
    let client = match async_nats::ConnectOptions::new()
        .name("noetl-standin")
        .connection_timeout(Duration::from_secs(3))
        .connect(url)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%url, error = %e, "NATS unreachable: events will be dropped (counted at /_standin/stats)");
            return Transport::Down;
        }
    };
    let js = jetstream::new(client.clone());
    let stream = jetstream::stream::Config {
        name: STREAM_NAME.into(),
        subjects: vec![STREAM_SUBJECTS.into()],
        max_age: STREAM_MAX_AGE,
        ..Default::default()
    };
    match js.get_or_create_stream(stream).await {
        Ok(_) => tracing::info!(%url, stream = STREAM_NAME, "JetStream stream ready"),
        Err(e) => {
            tracing::warn!(%url, error = %e, "cannot ensure stream {STREAM_NAME}: publishing with core NATS");
            return Transport::Core(client);
        }
    }
    match shape {
        Shape::Rust => Transport::JetStream(js),
        Shape::Python => Transport::Core(client),
    }
}

/// Owns the read end of the queue and the connection.
struct Flusher {
    rx: mpsc::UnboundedReceiver<EventRow>,
    transport: Transport,
    shape: Shape,
    stats: Arc<EventStats>,
}

impl Flusher {
    async fn run(mut self, every: Duration, mut stop: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush().await,
                _ = &mut stop => {
                    self.flush().await;
                    return;
                }
            }
        }
    }

    /// Takes everything queued so far and publishes it as one burst.
    async fn flush(&mut self) {
        let mut batch = Vec::new();
        while let Ok(row) = self.rx.try_recv() {
            batch.push(row);
        }
        if batch.is_empty() {
            return;
        }
        let messages = self.encode(batch);
        tracing::debug!(count = messages.len(), "publishing event burst");
        match &self.transport {
            Transport::JetStream(js) => publish_jetstream(js, messages, &self.stats).await,
            Transport::Core(client) => publish_core(client, messages, &self.stats).await,
            Transport::Down => {
                let n = messages.len() as u64;
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(dropped = n, "NATS down: event burst dropped");
            }
        }
    }

    fn encode(&self, batch: Vec<EventRow>) -> Vec<Outgoing> {
        batch
            .into_iter()
            .filter_map(|row| {
                let out = encode_row(&row, self.shape);
                if out.is_none() {
                    self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                }
                out
            })
            .collect()
    }
}

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// NATS subject.
    pub subject: String,
    /// `Nats-Msg-Id` (the event id).
    pub msg_id: String,
    /// JSON payload.
    pub payload: bytes::Bytes,
}

/// The message for `row` in `shape`, or `None` if the shape has no such event.
pub fn encode_row(row: &EventRow, shape: Shape) -> Option<Outgoing> {
    let (subject, payload) = match shape {
        Shape::Rust => (row.rust_subject(), serde_json::to_vec(row).ok()?),
        Shape::Python => (
            row.python_subject(),
            serde_json::to_vec(&python_payload(row)?).ok()?,
        ),
    };
    Some(Outgoing {
        subject,
        msg_id: row.event_id.to_string(),
        payload: payload.into(),
    })
}

async fn publish_jetstream(js: &jetstream::Context, messages: Vec<Outgoing>, stats: &EventStats) {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let publish = PublishMessage::build()
            .payload(m.payload)
            .message_id(&m.msg_id);
        match js.send_publish(m.subject, publish).await {
            Ok(ack) => acks.push(ack),
            Err(e) => drop_one(stats, &e),
        }
    }
    for ack in acks {
        match ack.await {
            Ok(_) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => drop_one(stats, &e),
        }
    }
}

async fn publish_core(client: &async_nats::Client, messages: Vec<Outgoing>, stats: &EventStats) {
    let n = messages.len() as u64;
    for m in messages {
        if let Err(e) = client.publish(m.subject, m.payload).await {
            drop_one(stats, &e);
            continue;
        }
        stats.published.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, count = n, "NATS flush failed");
    }
}

fn drop_one(stats: &EventStats, e: &dyn std::fmt::Display) {
    stats.dropped.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %e, "event dropped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: EventKind, node: &str) -> EventRow {
        let place = RowPlace {
            event_id: EventId(600_000_000_000_000_001),
            parent_event_id: None,
            execution_id: ExecutionId(600_000_000_000_000_000),
            catalog_id: 7,
            playbook_path: "demo/steps",
            at: Utc::now(),
        };
        EventRow::build(&place, NewEvent::new(kind, node))
    }

    #[test]
    fn rust_rows_carry_about_forty_keys_and_exact_numeric_ids() {
        let r = row(EventKind::CommandIssued, "step_1");
        let text = serde_json::to_string(&r).expect("serialises");
        assert!(
            text.contains(r#""execution_id":600000000000000000"#),
            "{text}"
        );
        assert!(text.contains(r#""event_id":600000000000000001"#));
        let keys = serde_json::to_value(&r)
            .expect("value")
            .as_object()
            .map(|o| o.len());
        assert!(keys.is_some_and(|k| k >= 40), "{keys:?}");
        let out = encode_row(&r, Shape::Rust).expect("rust shape has every event");
        assert_eq!(out.subject, "noetl.events.command.issued");
        assert_eq!(out.msg_id, "600000000000000001");
    }

    #[test]
    fn python_shape_renames_and_skips() {
        let started = row(EventKind::CommandStarted, "step_1");
        let out = encode_row(&started, Shape::Python).expect("has a python name");
        assert_eq!(
            out.subject,
            "noetl.events.default.default.600000000000000000.0"
        );
        let v: Value = serde_json::from_slice(&out.payload).expect("json");
        assert_eq!(v["event_type"], "step_started");
        assert_eq!(v["node_name"], "step_1");
        assert!(encode_row(&row(EventKind::CommandIssued, "s"), Shape::Python).is_none());
        assert!(encode_row(&row(EventKind::StepEnter, "s"), Shape::Python).is_none());
    }

    #[test]
    fn playbook_rows_have_no_step_name() {
        assert_eq!(row(EventKind::PlaybookStarted, "demo/x").step_name, None);
        assert_eq!(
            row(EventKind::StepEnter, "s").step_name.as_deref(),
            Some("s")
        );
    }
}

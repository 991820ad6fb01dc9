//! The event-table row and its Rust/Python wire encodings (Rust server: the whole row on
//! `noetl.events.<event_type>`; Python server: a small dict on a per-execution subject).
//! The 4.x envelope is built from the same row in [`super::v4`].

use super::{python_event_type, v4, EventKind, NewEvent, Vocabulary};
use crate::standin::ids::{EventId, ExecutionId};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};

/// Tenant, org and shard of the Python-shape subject.
const PYTHON_TENANT: &str = "default";
const PYTHON_ORG: &str = "default";
const PYTHON_SHARD: &str = "0";
/// The worker name claimed commands report.
pub const WORKER_ID: &str = "standin-worker-1";

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
    /// When the row was written (the 4.x envelope writes it Python's way).
    #[serde(skip)]
    pub(crate) at: DateTime<Utc>,
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
            at: place.at,
            event_id: place.event_id,
            event_type: ev.kind.event_type(),
            execution_id: place.execution_id,
            catalog_id: place.catalog_id,
            parent_event_id: place.parent_event_id,
            parent_execution_id: None,
            node_id: format!("{}:{}", place.execution_id, ev.node_name),
            step_name: (!ev.kind.is_run_level()).then(|| ev.node_name.clone()),
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
            context: if ev.context.is_null() {
                json!({})
            } else {
                ev.context
            },
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

    /// The short form used in execution records (`GET /api/executions/{id}`), as the real
    /// server builds it: `error` is its text column, so an error object arrives as a JSON
    /// document in a string (the Rust server) or as its message (4.x); 4.x's `result`
    /// column holds its reference-only result (`{status, context}`).
    pub fn summary(&self, vocabulary: Vocabulary) -> Value {
        let (result, error) = match vocabulary {
            Vocabulary::Rust => (self.result.clone(), self.error.clone()),
            Vocabulary::V4 => v4::table_columns(self),
        };
        let error = match error {
            Value::Null => Value::Null,
            Value::String(s) => Value::String(s),
            other => Value::String(other.to_string()),
        };
        json!({
            "event_id": self.event_id,
            "event_type": self.event_type,
            "node_name": self.node_name,
            "status": self.status,
            "created_at": self.created_at,
            "result": result,
            "error": error,
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

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// NATS subject.
    pub subject: String,
    /// The event id, sent as `Nats-Msg-Id` when [`Self::send_msg_id`] says so.
    pub msg_id: String,
    /// Whether the publish carries `Nats-Msg-Id` (the Rust server's does, 4.x's does not).
    pub send_msg_id: bool,
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
        send_msg_id: true,
        payload: payload.into(),
    })
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
    fn the_start_row_carries_the_workload_in_its_context_like_the_real_server() {
        let mut r = row(EventKind::PlaybookStarted, "demo/echo");
        assert_eq!(r.context, json!({}), "other rows have an empty context");
        let place = RowPlace {
            event_id: EventId(600_000_000_000_000_002),
            parent_event_id: None,
            execution_id: ExecutionId(600_000_000_000_000_000),
            catalog_id: 7,
            playbook_path: "demo/echo",
            at: Utc::now(),
        };
        let wl = json!({"workload": {"callback_token": "t", "greeting": "hi"}});
        r = EventRow::build(
            &place,
            NewEvent::new(EventKind::PlaybookStarted, "demo/echo").with_context(wl.clone()),
        );
        let out = encode_row(&r, Shape::Rust).expect("rust shape");
        let v: Value = serde_json::from_slice(&out.payload).expect("json");
        assert_eq!(
            v["context"], wl,
            "NoETL publishes the whole row, workload included"
        );
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

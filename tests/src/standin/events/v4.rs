//! NoETL 4.x's event mirror: the canonical envelope, its subject and its JSON text.
//!
//! What this follows, read in the public `noetl/noetl` repository (Python server 4.x,
//! mid-2026):
//! - `noetl/core/messaging/nats_client.py`, `NATSEventPublisher`: stream name from
//!   `NOETL_EVENT_NATS_STREAM` (default `NOETL_EVENTS`), prefix from
//!   `NOETL_EVENT_NATS_SUBJECT_PREFIX` (default `noetl.events`, trailing `.`/`>` stripped);
//!   on connect the stream is created if missing with subjects `<prefix>.>`, 24 h max age,
//!   file storage (an existing stream is used as it is). `subject_for_event` builds
//!   `<prefix>.<tenant_id>.<organization_id>.<execution_id>.<shard>`, each token with runs
//!   of `[^a-zA-Z0-9_-]` replaced by `-` and `-` trimmed (empty or missing → `default`, the
//!   execution's → `none`); `shard = int(execution_id) % shard_count` (0 when not a number).
//!   `shard_count` is a constructor argument defaulting to 1; `NOETL_EVENT_NATS_SHARD_COUNT`
//!   is only read when the caller passes 0/None. `publish_event` is a plain JetStream
//!   publish (no `Nats-Msg-Id`) of `json.dumps(event, default=str, sort_keys=True,
//!   separators=(",",":"))` — see [`super::to_python_json`].
//! - `noetl/core/outbox.py`: events are written to `noetl.outbox` in the same transaction
//!   as the event row, after `json.loads(json.dumps(event, default=str, sort_keys=True))`
//!   (so datetimes become `str(datetime)`: `2026-05-18 20:00:00+00:00`, with `.ffffff` when
//!   there are microseconds), then drained in `outbox_id` order and published as JSON
//!   (an earlier version sent Arrow bytes; fixed 2026-05-27). Mirroring is off unless
//!   `NOETL_EVENT_MIRROR_ENABLED` is true: a default 4.x publishes nothing on NATS.
//! - `noetl/server/api/core/events.py`, `_event_envelope`: what workers report
//!   (`command.claimed|started|completed|failed`, `step.enter`, `step.exit`, `call.done`,
//!   `call.error`) is mirrored as `{event_id, execution_id (int), catalog_id, event_type,
//!   node_id, node_name, status, result, meta, command_id (int), stage_id, frame_id,
//!   parent_event_id, parent_execution_id, event_time, ingest_time, created_at}` — no
//!   `error`, no `context`; `status` comes from the event name (`utils._status_from_event_name`:
//!   `error`/`failed` → FAILED, `done`/`exit`/`completed` → COMPLETED, else RUNNING; so a
//!   `step.exit` after a failed call is COMPLETED), `result` from
//!   `commands._build_reference_only_result` (`{status, context}`), `meta` adds `actionable`,
//!   `informative`, `worker_id`, `command_id`, `persisted_event_id` (a string).
//!   `command.issued` adds `node_type` (the tool kind) and `context` (the command context).
//! - `noetl/core/dsl/engine/executor/lifecycle.py`, `_persist_event`: the engine's own events
//!   (`playbook.initialized` on the playbook path, then `workflow.initialized` on node
//!   `workflow`; `workflow.completed|failed` then `playbook.completed|failed`) are mirrored as
//!   `{event_id, execution_id, catalog_id, parent_event_id, parent_execution_id, event_type,
//!   node_id, node_name, status, duration (ms since the init event), context, result, meta,
//!   error, worker_id, event_time, ingest_time, created_at}`, `context` being the
//!   `LifecycleEventPayload` `{status, final_step, result, error}` and `status` its lowercase
//!   `initialized|completed|failed`.
//! - The order per step (`tests/core/workflow/test_inline_runner_parity.py` lists the
//!   dispatched sequence; `noetl/core/workflow/playbook/inline_runner.py` mirrors it):
//!   `command.started`, `step.enter`, `call.done`, `step.exit`, `command.completed`
//!   (failure: `call.error`, `step.exit`, `command.failed`, then the `workflow.failed` →
//!   `playbook.failed` cascade `_persist_cascade_events` names), with `command.issued`
//!   (server) and `command.claimed` (worker claim) before.
//!   `POST /api/executions/{id}/cancel` (`noetl/server/api/execution/endpoint.py`) writes
//!   `execution.cancelled` on node `cancel` with `meta {reason, cancelled_by:"api", cascade,
//!   parent_cancel_id, actionable}` (that route did not enqueue it in the outbox in the
//!   version read; the stand-in mirrors it like the other events).
//! - Ids: `event_id`, `execution_id`, `command_id` are snowflake ints in the envelope (JSON
//!   numbers above 2^53); `/api/execute` answers the execution id as a string.
//! - `tenant_id`/`organization_id`: the execution path's envelopes above carry neither (so
//!   their subjects read `default.default`); the event store's `EventRecord.envelope`
//!   (`noetl/core/event_store/ports.py`) and the event table carry both, default
//!   `default`. The stand-in puts the configured `--tenant`/`--organization` in every
//!   envelope, verbatim, and derives the subject from them as `subject_for_event` does.
//!
//! Not reproduced: `command.heartbeat` (time-driven), `command.cancelled`, loop and batch
//! events; the exact command context of `command.issued` (the stand-in writes a small one).
//! Nor 4.x's HTTP answers, which differ from PROTOCOL.md §6 (the stand-in keeps §6):
//! `GET /api/executions/{id}` gives `execution_id` as the path's string, events newest
//! first (`event_id` still a number) with `pagination`; `GET /api/executions/{id}/status`
//! (`noetl/server/api/core/execution.py`) gives `{execution_id, current_step,
//! completed_steps, failed, completed, completion_inferred, variables, start_time,
//! end_time, duration_seconds, duration_human}` — booleans, no `status` string.

use super::row::{EventRow, Outgoing, WORKER_ID};
use super::{pyjson, EventKind};
use chrono::{DateTime, Timelike, Utc};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// The 4.x mirror's default stream name.
pub const STREAM_NAME: &str = "NOETL_EVENTS";
/// The 4.x mirror's default subject prefix.
pub const SUBJECT_PREFIX: &str = "noetl.events";
/// The retention 4.x creates its stream with.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(86_400);
/// `tenant_id`/`organization_id` when none is configured (the event table's default).
pub const DEFAULT_TOKEN: &str = "default";
/// A `result.context` larger than this (compact JSON bytes) is dropped, as the 4.x server's
/// `_bounded_context` does.
const CONTEXT_MAX_BYTES: usize = 10 * 1024;

/// The prefix as 4.x uses it: trailing `.` and `>` stripped (`noetl.events.>` →
/// `noetl.events`).
pub fn subject_prefix(configured: &str) -> String {
    configured.trim_end_matches(['.', '>']).to_owned()
}

/// One subject token as 4.x sanitises it: Python's falsy values (missing, `null`, `""`,
/// `0`, `false`) become `default`; runs of characters outside `[a-zA-Z0-9_-]` become `-`;
/// `-` is trimmed from both ends; an empty result is `default`.
pub fn subject_token(value: Option<&Value>, default: &str) -> String {
    let text = match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => default.to_owned(),
        Some(Value::String(s)) if s.is_empty() => default.to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => default.to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(true)) => "True".to_owned(),
        Some(other) => other.to_string(),
    };
    let mut out = String::with_capacity(text.len());
    let mut in_run = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('-');
            in_run = true;
        }
    }
    let trimmed = out.trim_matches('-');
    if trimmed.is_empty() {
        default.to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// The shard of an execution: `int(execution_id) % shard_count` (Python's non-negative
/// modulo), 0 when the id is not an integer.
pub fn shard(execution_id: Option<&Value>, shard_count: u32) -> u64 {
    let n = u64::from(shard_count.max(1));
    let id: Option<i128> = match execution_id {
        Some(Value::Number(v)) => v
            .as_u64()
            .map(i128::from)
            .or_else(|| v.as_i64().map(i128::from)),
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(Value::Bool(b)) => Some(i128::from(*b)),
        _ => None,
    };
    id.map_or(0, |i| i.rem_euclid(i128::from(n)) as u64)
}

/// A UTC time as Python's `str(datetime)` writes it (what `default=str` makes of the
/// envelope's datetimes): `2026-05-18 20:00:00+00:00`, `.ffffff` only when non-zero.
pub fn python_time(at: DateTime<Utc>) -> String {
    let micros = at.nanosecond() / 1_000 % 1_000_000;
    let base = at.format("%Y-%m-%d %H:%M:%S");
    if micros == 0 {
        format!("{base}+00:00")
    } else {
        format!("{base}.{micros:06}+00:00")
    }
}

/// The engine's `LifecycleEventPayload` for a run-level event, which 4.x stores as the
/// event's `context`; `None` for other kinds. `first_step` is the playbook's entry step,
/// `last_step` the step the run ended on.
pub fn lifecycle_context(
    kind: EventKind,
    playbook_path: &str,
    workload: &Value,
    first_step: Option<&str>,
    last_step: Option<&str>,
    error: &Value,
) -> Option<Value> {
    let payload = |status: &str, final_step: Option<&str>, result: Value, error: &Value| json!({ "status": status, "final_step": final_step, "result": result, "error": error });
    Some(match kind {
        EventKind::PlaybookInitialized => payload(
            "initialized",
            None,
            json!({ "workload": workload, "playbook_path": playbook_path }),
            &Value::Null,
        ),
        EventKind::WorkflowInitialized => payload(
            "initialized",
            None,
            json!({ "first_step": first_step, "playbook_path": playbook_path, "workload": workload }),
            &Value::Null,
        ),
        EventKind::WorkflowCompleted | EventKind::PlaybookCompleted => {
            payload("completed", last_step, Value::Null, &Value::Null)
        }
        EventKind::WorkflowFailed | EventKind::PlaybookFailed => {
            payload("failed", last_step, Value::Null, error)
        }
        _ => return None,
    })
}

/// How the 4.x server built an event's envelope: which code path wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// The engine's `_persist_event` (run lifecycle).
    Lifecycle,
    /// `command.issued`, written when the engine issues a command.
    Issued,
    /// A worker's report through `POST /api/events` (`_event_envelope`).
    Worker,
    /// The cancel route.
    Cancel,
}

fn family(kind: EventKind) -> Family {
    match kind {
        EventKind::PlaybookStarted
        | EventKind::PlaybookInitialized
        | EventKind::WorkflowInitialized
        | EventKind::WorkflowCompleted
        | EventKind::WorkflowFailed
        | EventKind::PlaybookCompleted
        | EventKind::PlaybookFailed => Family::Lifecycle,
        EventKind::CommandIssued => Family::Issued,
        EventKind::PlaybookCancelled | EventKind::ExecutionCancelled => Family::Cancel,
        _ => Family::Worker,
    }
}

/// What a worker sends as the event's payload (the inline runner's parity list).
fn worker_payload(row: &EventRow) -> Value {
    let command = row.command_id;
    match row.kind {
        EventKind::CommandClaimed => json!({ "command_id": command, "worker_id": WORKER_ID }),
        EventKind::StepEnter => json!({ "status": "started" }),
        EventKind::CallDone => json!({ "response": row.result, "command_id": command }),
        EventKind::CallError => json!({ "error": row.error, "command_id": command }),
        EventKind::StepExit if row.error.is_null() => json!({ "status": "COMPLETED" }),
        EventKind::StepExit => json!({ "status": "FAILED" }),
        EventKind::CommandCompleted => json!({ "command_id": command, "status": "COMPLETED" }),
        EventKind::CommandFailed => json!({ "command_id": command, "error": row.error }),
        _ => json!({ "command_id": command }),
    }
}

/// 4.x's `_normalize_result_status`.
fn normalize_status(raw: &str) -> String {
    match raw.trim().to_ascii_uppercase().as_str() {
        "OK" | "SUCCESS" => "COMPLETED".to_owned(),
        "ERROR" | "FAILED" => "FAILED".to_owned(),
        "" => "UNKNOWN".to_owned(),
        other => other.to_owned(),
    }
}

/// Python truthiness of a JSON value (`or` chains in the 4.x code).
fn truthy(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| match v {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Bool(true) => true,
    })
}

fn bounded(context: Option<&Value>) -> Option<Value> {
    let c = context.filter(|c| c.is_object())?;
    (serde_json::to_vec(c).map_or(usize::MAX, |b| b.len()) <= CONTEXT_MAX_BYTES).then(|| c.clone())
}

/// 4.x's `_build_reference_only_result`: `{status, reference?, context?}`.
fn reference_only_result(payload: &Value, status: &str) -> Value {
    let mut out = Map::new();
    out.insert("status".into(), normalize_status(status).into());
    let inner = truthy(payload.get("result")).or_else(|| truthy(payload.get("response")));
    let (reference, context) = match inner {
        Some(Value::Object(r)) => {
            if let Some(s) = r.get("status").and_then(Value::as_str) {
                if !s.trim().is_empty() {
                    out.insert("status".into(), normalize_status(s).into());
                }
            }
            let context = truthy(r.get("context")).or(inner);
            (r.get("reference"), bounded(context))
        }
        _ => {
            let context = truthy(payload.get("context"))
                .or_else(|| truthy(payload.get("response")))
                .or(Some(payload));
            (payload.get("reference"), bounded(context))
        }
    };
    if let Some(r) = reference.filter(|r| r.is_object()) {
        out.insert("reference".into(), r.clone());
    }
    if let Some(c) = context {
        out.insert("context".into(), c);
    }
    Value::Object(out)
}

/// 4.x's `_extract_event_error`: the `error` text column of a worker's event.
fn error_text(payload: &Value) -> Value {
    let text = |e: &Value| match e {
        Value::String(s) => {
            let t: String = s.trim().chars().take(2000).collect();
            (!t.is_empty()).then_some(t)
        }
        Value::Object(o) => Some(match o.get("message").and_then(Value::as_str) {
            Some(m) if !m.is_empty() => m.trim().chars().take(2000).collect(),
            _ => e.to_string().chars().take(2000).collect(),
        }),
        _ => None,
    };
    payload
        .get("error")
        .and_then(text)
        .or_else(|| {
            payload
                .get("result")
                .and_then(|r| r.get("error"))
                .and_then(text)
        })
        .map_or(Value::Null, Value::String)
}

/// The `result` and `error` columns 4.x's event table holds for `row` (what
/// `GET /api/executions/{id}` lists).
pub fn table_columns(row: &EventRow) -> (Value, Value) {
    match family(row.kind) {
        Family::Lifecycle => (lifecycle_result(&row.context), row.context["error"].clone()),
        Family::Worker => {
            let payload = worker_payload(row);
            (
                reference_only_result(&payload, row.status),
                error_text(&payload),
            )
        }
        Family::Issued | Family::Cancel => (Value::Null, Value::Null),
    }
}

/// The engine's `result` column: the payload's `result` only when it is an object with a
/// `status`.
fn lifecycle_result(context: &Value) -> Value {
    match &context["result"] {
        r @ Value::Object(o) if o.contains_key("status") => r.clone(),
        _ => Value::Null,
    }
}

/// Where and how a 4.x server mirrors events: prefix, tenant, organization, shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V4Mirror {
    prefix: String,
    tenant: String,
    organization: String,
    shard_count: u32,
}

impl V4Mirror {
    /// A mirror on `prefix` (trailing `.`/`>` stripped) for `tenant` and `organization`
    /// (written verbatim into every envelope), with `shard_count` shards (at least 1).
    pub fn new(prefix: &str, tenant: &str, organization: &str, shard_count: u32) -> Self {
        Self {
            prefix: subject_prefix(prefix),
            tenant: tenant.to_owned(),
            organization: organization.to_owned(),
            shard_count: shard_count.max(1),
        }
    }

    /// The stream's subject filter, `<prefix>.>`.
    pub fn stream_subjects(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// `subject_for_event`: the subject an envelope is published on.
    pub fn subject_for(&self, envelope: &Value) -> String {
        let execution = truthy(envelope.get("execution_id"));
        format!(
            "{}.{}.{}.{}.{}",
            self.prefix,
            subject_token(envelope.get("tenant_id"), DEFAULT_TOKEN),
            subject_token(envelope.get("organization_id"), DEFAULT_TOKEN),
            subject_token(execution, "none"),
            shard(execution, self.shard_count),
        )
    }

    /// The canonical envelope for `row`, keyed as the 4.x code path that writes such an
    /// event keys it (see the module doc), plus `tenant_id` and `organization_id`.
    pub fn envelope(&self, row: &EventRow) -> Value {
        let at = python_time(row.at);
        let mut v = json!({
            "event_id": row.event_id,
            "execution_id": row.execution_id,
            "catalog_id": row.catalog_id,
            "event_type": row.event_type,
            "node_id": row.node_name,
            "node_name": row.node_name,
            "status": row.status,
            "event_time": at,
            "ingest_time": at,
            "created_at": at,
            "tenant_id": self.tenant,
            "organization_id": self.organization,
        });
        let extra = match family(row.kind) {
            Family::Lifecycle => json!({
                "parent_event_id": row.parent_event_id,
                "parent_execution_id": null,
                "duration": row.duration.map_or(0, |s| (s * 1000.0) as u64),
                "context": row.context,
                "result": lifecycle_result(&row.context),
                "meta": {},
                "error": row.context["error"],
                "worker_id": null,
            }),
            Family::Issued => json!({
                "command_id": row.command_id,
                "stage_id": null,
                "frame_id": null,
                "parent_event_id": row.parent_event_id,
                "parent_execution_id": null,
                "result": { "status": "PENDING" },
                "node_type": "http",
                "context": { "step": row.node_name, "tool": { "kind": "http" } },
                "meta": {
                    "command_id": row.command_id,
                    "step": row.node_name,
                    "tool_kind": "http",
                    "max_attempts": 3,
                    "attempt": 1,
                    "execution_id": row.execution_id.to_string(),
                    "catalog_id": row.catalog_id.to_string(),
                    "actionable": true,
                },
            }),
            Family::Worker => {
                let payload = worker_payload(row);
                let mut meta = json!({
                    "actionable": matches!(row.kind, EventKind::CallDone | EventKind::CallError),
                    "informative": true,
                    "worker_id": WORKER_ID,
                    "command_id": row.command_id,
                });
                if row.kind != EventKind::CommandClaimed {
                    meta["persisted_event_id"] = row.event_id.to_string().into();
                }
                json!({
                    "command_id": row.command_id,
                    "stage_id": null,
                    "frame_id": null,
                    "parent_event_id": null,
                    "parent_execution_id": null,
                    "result": reference_only_result(&payload, row.status),
                    "meta": meta,
                })
            }
            Family::Cancel => json!({
                "command_id": null,
                "stage_id": null,
                "frame_id": null,
                "parent_event_id": row.parent_event_id,
                "parent_execution_id": null,
                "result": { "status": "CANCELLED" },
                "meta": {
                    "reason": null,
                    "cancelled_by": "api",
                    "cascade": true,
                    "parent_cancel_id": null,
                    "actionable": true,
                },
            }),
        };
        if let (Some(base), Value::Object(extra)) = (v.as_object_mut(), extra) {
            base.extend(extra);
        }
        v
    }

    /// The message 4.x publishes for `row`: its subject, the envelope as Python's JSON
    /// text, no `Nats-Msg-Id`.
    pub fn encode(&self, row: &EventRow) -> Outgoing {
        let envelope = self.envelope(row);
        Outgoing {
            subject: self.subject_for(&envelope),
            msg_id: row.event_id.to_string(),
            send_msg_id: false,
            payload: pyjson::to_python_json(&envelope).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standin::events::{NewEvent, RowPlace};
    use crate::standin::ids::{EventId, ExecutionId};
    use chrono::TimeZone;

    const EXEC: u64 = 600_000_000_000_000_003;

    fn row(kind: EventKind, node: &str, ev: impl FnOnce(NewEvent) -> NewEvent) -> EventRow {
        let place = RowPlace {
            event_id: EventId(600_000_000_000_000_011),
            parent_event_id: Some(EventId(600_000_000_000_000_010)),
            execution_id: ExecutionId(EXEC),
            catalog_id: 480_000_000_000_000_001,
            playbook_path: "demo/steps",
            at: Utc
                .with_ymd_and_hms(2026, 5, 18, 20, 0, 0)
                .single()
                .expect("a valid time"),
        };
        EventRow::build(&place, ev(NewEvent::new(kind, node)))
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn tokens_are_sanitised_like_subject_token() {
        let t = |s: &str| subject_token(Some(&json!(s)), "default");
        assert_eq!(t("acme/EU west"), "acme-EU-west");
        assert_eq!(t("tenant/a"), "tenant-a");
        assert_eq!(t("  spaced  out  "), "spaced-out");
        assert_eq!(t("-a--b_c-"), "a--b_c");
        assert_eq!(t("org.1 two"), "org-1-two");
        assert_eq!(t("été"), "t");
        assert_eq!(t("///"), "default");
        assert_eq!(t(""), "default");
        assert_eq!(subject_token(None, "default"), "default");
        assert_eq!(subject_token(Some(&Value::Null), "none"), "none");
        assert_eq!(subject_token(Some(&json!(0)), "none"), "none");
        assert_eq!(subject_token(Some(&json!(EXEC)), "none"), EXEC.to_string());
    }

    #[test]
    fn the_shard_is_the_execution_id_modulo_the_shard_count() {
        assert_eq!(shard(Some(&json!(EXEC)), 1), 0);
        assert_eq!(shard(Some(&json!(EXEC)), 4), EXEC % 4);
        assert_eq!(shard(Some(&json!(7)), 4), 3);
        assert_eq!(
            shard(Some(&json!(" 9 ")), 4),
            1,
            "int() accepts padded text"
        );
        assert_eq!(
            shard(Some(&json!(-7)), 4),
            1,
            "Python's modulo is non-negative"
        );
        assert_eq!(shard(Some(&json!("abc")), 4), 0);
        assert_eq!(shard(None, 4), 0);
        assert_eq!(shard(Some(&json!(5)), 0), 0, "at least one shard");
    }

    #[test]
    fn the_prefix_loses_trailing_dots_and_wildcards() {
        assert_eq!(subject_prefix("noetl.events.>"), "noetl.events");
        assert_eq!(subject_prefix("noetl.events."), "noetl.events");
        assert_eq!(subject_prefix("noetl.events"), "noetl.events");
        let m = V4Mirror::new("acme.ev.>", "t", "o", 2);
        assert_eq!(m.stream_subjects(), "acme.ev.>");
    }

    #[test]
    fn times_are_python_str_of_a_utc_datetime() {
        let t = Utc
            .with_ymd_and_hms(2026, 5, 18, 20, 0, 0)
            .single()
            .expect("valid");
        assert_eq!(python_time(t), "2026-05-18 20:00:00+00:00");
        let t = t + chrono::Duration::microseconds(1_250);
        assert_eq!(python_time(t), "2026-05-18 20:00:00.001250+00:00");
    }

    #[test]
    fn a_worker_event_is_subject_sharded_sorted_compact_and_exact() {
        let m = V4Mirror::new("noetl.events", "acme/EU west", "org.1 two", 4);
        let r = row(EventKind::CommandStarted, "step_1", |e| {
            e.with_command(600_000_000_000_000_005)
        });
        let out = m.encode(&r);
        assert_eq!(
            out.subject,
            format!("noetl.events.acme-EU-west.org-1-two.{EXEC}.{}", EXEC % 4)
        );
        assert!(!out.send_msg_id, "4.x publishes without Nats-Msg-Id");
        let text = String::from_utf8(out.payload.to_vec()).expect("ASCII");
        assert!(
            text.starts_with(r#"{"catalog_id":480000000000000001,"command_id":600000000000000005,"created_at":"2026-05-18 20:00:00+00:00","event_id":600000000000000011,"#),
            "{text}"
        );
        assert!(
            text.contains(&format!(r#""execution_id":{EXEC},"#)),
            "{text}"
        );
        assert!(!text.contains(": ") && !text.contains(", "), "{text}");
        let v: Value = serde_json::from_slice(&out.payload).expect("JSON");
        assert_eq!(
            keys(&v),
            [
                "catalog_id",
                "command_id",
                "created_at",
                "event_id",
                "event_time",
                "event_type",
                "execution_id",
                "frame_id",
                "ingest_time",
                "meta",
                "node_id",
                "node_name",
                "organization_id",
                "parent_event_id",
                "parent_execution_id",
                "result",
                "stage_id",
                "status",
                "tenant_id"
            ]
        );
        assert_eq!(v["tenant_id"], "acme/EU west", "verbatim in the payload");
        assert_eq!(v["status"], "RUNNING");
        assert_eq!(
            v["result"],
            json!({"status": "RUNNING", "context": {"command_id": 600_000_000_000_000_005_u64}})
        );
        assert_eq!(v["meta"]["persisted_event_id"], "600000000000000011");
    }

    #[test]
    fn lifecycle_events_carry_the_engine_payload_and_lowercase_status() {
        let m = V4Mirror::new(SUBJECT_PREFIX, DEFAULT_TOKEN, DEFAULT_TOKEN, 1);
        let wl = json!({"greeting": "hi"});
        let ctx = lifecycle_context(
            EventKind::PlaybookInitialized,
            "demo/steps",
            &wl,
            Some("step_1"),
            None,
            &Value::Null,
        );
        let r = row(EventKind::PlaybookInitialized, "demo/steps", |mut e| {
            e.status = Some("initialized");
            e.with_context(ctx.expect("a lifecycle kind"))
        });
        let out = m.encode(&r);
        assert_eq!(
            out.subject,
            format!("noetl.events.default.default.{EXEC}.0")
        );
        let v: Value = serde_json::from_slice(&out.payload).expect("JSON");
        assert_eq!(
            keys(&v),
            [
                "catalog_id",
                "context",
                "created_at",
                "duration",
                "error",
                "event_id",
                "event_time",
                "event_type",
                "execution_id",
                "ingest_time",
                "meta",
                "node_id",
                "node_name",
                "organization_id",
                "parent_event_id",
                "parent_execution_id",
                "result",
                "status",
                "tenant_id",
                "worker_id"
            ]
        );
        assert_eq!(v["status"], "initialized");
        assert_eq!(
            v["context"],
            json!({"status": "initialized", "final_step": null,
                   "result": {"workload": wl, "playbook_path": "demo/steps"}, "error": null})
        );
        assert_eq!(
            v["result"],
            Value::Null,
            "no status in the payload's result"
        );
        assert_eq!(v["duration"], 0);
    }

    #[test]
    fn a_failed_call_reports_its_message_and_step_exit_stays_completed() {
        let error = json!({"message": "HTTP 500 from https://example.invalid", "status_code": 500});
        let call = row(EventKind::CallError, "fail_step", |e| {
            e.with_command(1).with_error(error.clone())
        });
        let (result, text) = table_columns(&call);
        assert_eq!(text, "HTTP 500 from https://example.invalid");
        assert_eq!(result["status"], "FAILED");
        assert_eq!(result["context"]["error"], error);
        let exit = row(EventKind::StepExit, "fail_step", |e| {
            e.with_error(error.clone())
        });
        let (result, text) = table_columns(&exit);
        assert_eq!(
            result,
            json!({"status": "COMPLETED", "context": {"status": "FAILED"}})
        );
        assert_eq!(text, Value::Null);
        assert_eq!(exit.status, "COMPLETED");
    }

    #[test]
    fn a_step_result_becomes_the_reference_only_result() {
        let done = row(EventKind::CallDone, "step_1", |e| {
            e.with_command(1).with_result(json!({"status": "ok"}))
        });
        assert_eq!(
            table_columns(&done).0,
            json!({"status": "COMPLETED", "context": {"status": "ok"}})
        );
        let big = json!({"blob": "x".repeat(CONTEXT_MAX_BYTES)});
        let done = row(EventKind::CallDone, "step_1", |e| e.with_result(big));
        assert_eq!(table_columns(&done).0, json!({"status": "COMPLETED"}));
    }

    #[test]
    fn issued_and_cancelled_events_have_their_own_keys() {
        let m = V4Mirror::new(SUBJECT_PREFIX, DEFAULT_TOKEN, DEFAULT_TOKEN, 1);
        let issued = m.envelope(&row(EventKind::CommandIssued, "step_1", |e| {
            e.with_command(9)
        }));
        assert_eq!(issued["node_type"], "http");
        assert_eq!(issued["status"], "PENDING");
        assert_eq!(issued["meta"]["execution_id"], EXEC.to_string());
        assert_eq!(issued["parent_event_id"], 600_000_000_000_000_010_u64);
        let cancel = m.envelope(&row(EventKind::ExecutionCancelled, "cancel", |e| e));
        assert_eq!(cancel["status"], "CANCELLED");
        assert_eq!(cancel["node_name"], "cancel");
        assert_eq!(cancel["meta"]["cancelled_by"], "api");
    }
}

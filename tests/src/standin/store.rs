//! Executions: status, progress and event history — the stand-in's database.
//!
//! Every state change of a run goes through this one lock: admitting it, writing an event
//! (which also queues it for NATS, so the published order is the table's order), finishing
//! and cancelling. A run that is no longer RUNNING cannot write events, so a cancel and a
//! finishing run can never both win, and a cancelled run goes quiet even before its task
//! is aborted.

use super::events::{EventKind, EventRow, EventSink, NewEvent, RowPlace, Vocabulary};
use super::ids::{EventId, ExecutionId, IdGen};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::task::AbortHandle;

/// Finished runs kept before the oldest is forgotten (a dev server must not grow forever).
const MAX_RUNS: usize = 10_000;

/// An execution's status as `GET /api/executions/{id}/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecStatus {
    /// Still playing.
    Running,
    /// Finished well.
    Completed,
    /// A step failed (or the run lied about completing).
    Failed,
    /// Stopped by `POST /api/executions/{id}/cancel`.
    Cancelled,
}

impl ExecStatus {
    /// The wire name (`RUNNING`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

/// Step counters, derived from the command events like the real server derives them from
/// its event table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Steps the playbook has.
    pub total_steps: u32,
    /// Steps whose command completed.
    pub completed_steps: u32,
    /// Steps whose command is executing.
    pub running_steps: u32,
    /// Steps whose command failed.
    pub failed_steps: u32,
}

/// What `POST /api/execute` asks the store to record.
#[derive(Debug, Clone)]
pub struct NewExecution {
    /// The playbook path.
    pub path: String,
    /// Its catalog id.
    pub catalog_id: u64,
    /// The workload as given (the real server stores it verbatim).
    pub workload: Value,
    /// `resource_kind` as given.
    pub resource_kind: Option<String>,
    /// `workload.request_id`, the idempotency key.
    pub request_id: Option<String>,
    /// Number of steps the run will play.
    pub total_steps: u32,
}

/// The store's answer to an execute request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new run; play it.
    Started(ExecutionId),
    /// The request_id was seen before; this is the earlier run.
    Duplicate(ExecutionId),
}

/// Why a cancel did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefusal {
    /// No such execution.
    NotFound,
    /// Already finished with this status.
    Finished(ExecStatus),
}

struct Execution {
    id: ExecutionId,
    spec: NewExecution,
    status: ExecStatus,
    started_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    current_step: Option<String>,
    progress: Progress,
    events: Vec<EventRow>,
    abort: Option<AbortHandle>,
}

impl Execution {
    fn record(&self, with_events: bool, vocabulary: Vocabulary) -> Value {
        // The real server's `ExecutionDetail`, field by field; its workload is the start
        // event's `context.workload`, verbatim (what the gateway injected included).
        let mut v = json!({
            "execution_id": self.id,
            "catalog_id": self.spec.catalog_id,
            "path": self.spec.path,
            "status": self.status,
            "started_at": rfc3339(self.started_at),
            "completed_at": self.completed_at.map(rfc3339),
            "parent_execution_id": null,
            "workload": self.spec.workload,
        });
        if with_events {
            v["events"] = self.events.iter().map(|r| r.summary(vocabulary)).collect();
        }
        v
    }

    fn status_reply(&self) -> Value {
        json!({
            "execution_id": self.id,
            "path": self.spec.path,
            "status": self.status,
            "current_step": self.current_step,
            "progress": self.progress,
        })
    }

    /// Updates the counters from one event.
    fn apply(&mut self, kind: EventKind, node_name: &str) {
        let p = &mut self.progress;
        match kind {
            EventKind::CommandStarted => {
                p.running_steps += 1;
                self.current_step = Some(node_name.to_owned());
            }
            EventKind::CommandCompleted => {
                p.running_steps = p.running_steps.saturating_sub(1);
                p.completed_steps += 1;
            }
            EventKind::CommandFailed => {
                p.running_steps = p.running_steps.saturating_sub(1);
                p.failed_steps += 1;
            }
            _ => {}
        }
    }
}

#[derive(Default)]
struct Table {
    runs: BTreeMap<ExecutionId, Execution>,
    by_request: HashMap<String, ExecutionId>,
}

impl Table {
    /// Forgets the oldest finished run once the table is full.
    fn evict(&mut self) {
        if self.runs.len() <= MAX_RUNS {
            return;
        }
        let oldest = self
            .runs
            .values()
            .find(|e| e.status != ExecStatus::Running)
            .map(|e| (e.id, e.spec.request_id.clone()));
        if let Some((id, request_id)) = oldest {
            self.runs.remove(&id);
            if let Some(r) = request_id {
                self.by_request.remove(&r);
            }
        }
    }
}

/// The execution table.
pub struct ExecutionStore {
    ids: Arc<IdGen>,
    sink: EventSink,
    vocabulary: Vocabulary,
    table: Mutex<Table>,
}

impl ExecutionStore {
    /// An empty table written in `vocabulary`, with ids from `ids`, queueing events into
    /// `sink`.
    pub fn new(ids: Arc<IdGen>, sink: EventSink, vocabulary: Vocabulary) -> Self {
        Self {
            ids,
            sink,
            vocabulary,
            table: Mutex::default(),
        }
    }

    /// The vocabulary the table is written in.
    pub fn vocabulary(&self) -> Vocabulary {
        self.vocabulary
    }

    /// Records a new run, or finds the earlier run with the same request_id.
    pub fn admit(&self, spec: NewExecution) -> Admission {
        let mut t = self.lock();
        if let Some(id) = spec.request_id.as_ref().and_then(|r| t.by_request.get(r)) {
            return Admission::Duplicate(*id);
        }
        let id = self.ids.execution();
        if let Some(r) = &spec.request_id {
            t.by_request.insert(r.clone(), id);
        }
        let progress = Progress {
            total_steps: spec.total_steps,
            ..Progress::default()
        };
        t.runs.insert(
            id,
            Execution {
                id,
                spec,
                status: ExecStatus::Running,
                started_at: Utc::now(),
                completed_at: None,
                current_step: None,
                progress,
                events: Vec::new(),
                abort: None,
            },
        );
        t.evict();
        Admission::Started(id)
    }

    /// Remembers the run's task so a cancel can stop it mid-sleep (ignored if the run has
    /// already ended: a fast run may finish before its handle is registered).
    pub fn set_abort(&self, id: ExecutionId, handle: AbortHandle) {
        if let Some(e) = self.lock().runs.get_mut(&id) {
            if e.status == ExecStatus::Running {
                e.abort = Some(handle);
            }
        }
    }

    /// Writes an event while the run is RUNNING; `None` tells the runner to stop.
    pub fn emit(&self, id: ExecutionId, ev: NewEvent) -> Option<EventId> {
        let mut t = self.lock();
        let e = t.runs.get_mut(&id)?;
        if e.status != ExecStatus::Running {
            return None;
        }
        Some(self.write(e, ev))
    }

    /// Ends a RUNNING run with `status`, writing `last` (in order) as its final events,
    /// atomically with the status change. False if the run had already ended (e.g.
    /// cancelled meanwhile).
    pub fn finish(&self, id: ExecutionId, status: ExecStatus, last: Vec<NewEvent>) -> bool {
        let mut t = self.lock();
        let Some(e) = t.runs.get_mut(&id) else {
            return false;
        };
        if e.status != ExecStatus::Running {
            return false;
        }
        for ev in last {
            self.write(e, ev);
        }
        e.status = status;
        e.completed_at = Some(Utc::now());
        e.abort = None;
        true
    }

    /// Cancels a RUNNING run: status CANCELLED, the vocabulary's cancel event
    /// (`playbook_cancelled` or 4.x's `execution.cancelled`), its task aborted.
    pub fn cancel(&self, id: ExecutionId) -> Result<(), CancelRefusal> {
        let mut t = self.lock();
        let e = t.runs.get_mut(&id).ok_or(CancelRefusal::NotFound)?;
        if e.status != ExecStatus::Running {
            return Err(CancelRefusal::Finished(e.status));
        }
        let (kind, node) = self.vocabulary.cancelled(&e.spec.path);
        self.write(e, NewEvent::new(kind, node));
        e.status = ExecStatus::Cancelled;
        e.completed_at = Some(Utc::now());
        e.progress.running_steps = 0;
        if let Some(h) = e.abort.take() {
            h.abort();
        }
        Ok(())
    }

    /// The status of a run, if known.
    pub fn status_of(&self, id: ExecutionId) -> Option<ExecStatus> {
        self.lock().runs.get(&id).map(|e| e.status)
    }

    /// `GET /api/executions/{id}`: the record with its events.
    pub fn record(&self, id: ExecutionId) -> Option<Value> {
        let vocabulary = self.vocabulary;
        self.lock()
            .runs
            .get(&id)
            .map(|e| e.record(true, vocabulary))
    }

    /// `GET /api/executions/{id}/status`.
    pub fn status_reply(&self, id: ExecutionId) -> Option<Value> {
        self.lock().runs.get(&id).map(Execution::status_reply)
    }

    /// `GET /api/executions`: every record without events, newest first.
    pub fn list(&self) -> Vec<Value> {
        self.lock()
            .runs
            .values()
            .rev()
            .map(|e| e.record(false, self.vocabulary))
            .collect()
    }

    fn write(&self, e: &mut Execution, mut ev: NewEvent) -> EventId {
        let at = Utc::now();
        if ev.status.is_none() {
            ev.status = self.vocabulary.status_of(ev.kind);
        }
        // 4.x's engine records a terminal lifecycle event's time since the run began.
        let terminal_lifecycle = matches!(
            ev.kind,
            EventKind::WorkflowCompleted | EventKind::WorkflowFailed | EventKind::PlaybookFailed
        ) || (self.vocabulary == Vocabulary::V4
            && ev.kind == EventKind::PlaybookCompleted);
        if terminal_lifecycle && ev.duration.is_none() {
            ev.duration = (at - e.started_at).to_std().ok();
        }
        let place = RowPlace {
            event_id: self.ids.event(),
            parent_event_id: e.events.last().map(|r| r.event_id),
            execution_id: e.id,
            catalog_id: e.spec.catalog_id,
            playbook_path: &e.spec.path,
            at,
        };
        let row = EventRow::build(&place, ev);
        e.apply(row.kind, &row.node_name);
        self.sink.enqueue(&row);
        let id = row.event_id;
        e.events.push(row);
        id
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Poison only means a panic elsewhere; every update above leaves the table whole.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> ExecutionStore {
        ExecutionStore::new(
            Arc::new(IdGen::new()),
            EventSink::disabled(),
            Vocabulary::Rust,
        )
    }

    fn spec(request_id: Option<&str>) -> NewExecution {
        NewExecution {
            path: "demo/steps".into(),
            catalog_id: 1,
            workload: json!({}),
            resource_kind: None,
            request_id: request_id.map(str::to_owned),
            total_steps: 3,
        }
    }

    fn started(a: Admission) -> ExecutionId {
        match a {
            Admission::Started(id) => id,
            Admission::Duplicate(id) => panic!("unexpected duplicate {id}"),
        }
    }

    #[test]
    fn a_repeated_request_id_is_the_same_execution() {
        let s = store();
        let id = started(s.admit(spec(Some("r1"))));
        assert_eq!(s.admit(spec(Some("r1"))), Admission::Duplicate(id));
        assert_ne!(started(s.admit(spec(None))), id);
    }

    #[test]
    fn a_cancelled_run_cannot_write_or_finish() {
        let s = store();
        let id = started(s.admit(spec(None)));
        assert!(s
            .emit(id, NewEvent::new(EventKind::CommandStarted, "step_1"))
            .is_some());
        assert_eq!(s.cancel(id), Ok(()));
        assert!(s
            .emit(id, NewEvent::new(EventKind::CallDone, "step_1"))
            .is_none());
        assert!(!s.finish(id, ExecStatus::Completed, Vec::new()));
        assert_eq!(s.status_of(id), Some(ExecStatus::Cancelled));
        assert_eq!(
            s.cancel(id),
            Err(CancelRefusal::Finished(ExecStatus::Cancelled))
        );
        let rec = s.record(id).expect("known");
        let types: Vec<&str> = rec["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter_map(|e| e["event_type"].as_str())
            .collect();
        assert_eq!(types, ["command.started", "playbook_cancelled"]);
    }

    #[test]
    fn a_record_has_the_real_servers_fields_and_keeps_the_workload_verbatim() {
        let s = store();
        let workload = json!({"request_id": "r1", "callback_token": "t", "x": 1});
        let id = started(s.admit(NewExecution {
            workload: workload.clone(),
            ..spec(Some("r1"))
        }));
        s.emit(
            id,
            NewEvent::new(EventKind::CallError, "step_1").with_error(json!({"message": "boom"})),
        );
        let rec = s.record(id).expect("known");
        let mut keys: Vec<&str> = rec
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "catalog_id",
                "completed_at",
                "events",
                "execution_id",
                "parent_execution_id",
                "path",
                "started_at",
                "status",
                "workload"
            ]
        );
        assert_eq!(rec["workload"], workload);
        // The real server's `error` is a text column: an error object arrives as JSON text.
        let error = rec["events"][0]["error"].as_str().expect("error text");
        assert_eq!(
            serde_json::from_str::<Value>(error).expect("JSON in the text"),
            json!({"message": "boom"})
        );
    }

    #[test]
    fn a_4x_table_cancels_with_execution_cancelled_and_lists_exact_ids_in_its_vocabulary() {
        let s = ExecutionStore::new(
            Arc::new(IdGen::starting_at(600_000_000_000_000_000)),
            EventSink::silent(),
            Vocabulary::V4,
        );
        let id = started(s.admit(spec(None)));
        s.emit(
            id,
            NewEvent::new(EventKind::PlaybookInitialized, "demo/steps"),
        );
        s.emit(
            id,
            NewEvent::new(EventKind::CallError, "step_1")
                .with_command(7)
                .with_error(json!({"message": "boom", "status_code": 500})),
        );
        assert_eq!(s.cancel(id), Ok(()));
        let rec = s.record(id).expect("known");
        let events = rec["events"].as_array().expect("events");
        let rows: Vec<(&str, &str, &str)> = events
            .iter()
            .map(|e| {
                (
                    e["event_type"].as_str().unwrap_or_default(),
                    e["node_name"].as_str().unwrap_or_default(),
                    e["status"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("playbook.initialized", "demo/steps", "initialized"),
                ("call.error", "step_1", "FAILED"),
                ("execution.cancelled", "cancel", "CANCELLED"),
            ]
        );
        assert_eq!(events[1]["error"], "boom", "4.x keeps the error's message");
        let text = rec.to_string();
        assert!(
            text.contains(r#""event_id":600000000000000001,"#),
            "event ids stay exact JSON numbers: {text}"
        );
        assert_eq!(s.status_of(id), Some(ExecStatus::Cancelled));
        assert_eq!(
            s.sink.stats().snapshot()["skipped"],
            3,
            "without the mirror every row is counted, none published"
        );
    }

    #[test]
    fn progress_follows_command_events() {
        let s = store();
        let id = started(s.admit(spec(None)));
        s.emit(id, NewEvent::new(EventKind::CommandStarted, "step_1"));
        s.emit(id, NewEvent::new(EventKind::CommandCompleted, "step_1"));
        s.emit(id, NewEvent::new(EventKind::CommandStarted, "step_2"));
        let st = s.status_reply(id).expect("known");
        assert_eq!(st["status"], "RUNNING");
        assert_eq!(st["current_step"], "step_2");
        assert_eq!(
            st["progress"],
            json!({"total_steps":3,"completed_steps":1,"running_steps":1,"failed_steps":0})
        );
    }
}

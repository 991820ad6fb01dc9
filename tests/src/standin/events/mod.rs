//! Execution events: the row the real server stores, its wire shapes, and the publisher
//! that flushes them to NATS in bursts.
//!
//! Rows are written into the execution's history immediately (that is the "event table")
//! and queued here; every `--tail-interval-ms` the publisher drains the queue and publishes
//! the whole batch at once, so consumers see bursts exactly as with the real server, which
//! tails its event table (4.x: drains its outbox). Publishing failures are logged and
//! counted, never retried.
//!
//! One shape per run ([`EventShape`], `--event-shape`):
//! - `rust` (default): `noetl.events.<event_type>`, JetStream publish into stream
//!   `noetl_events` with `Nats-Msg-Id: <event_id>`, payload the whole [`EventRow`]. If the
//!   stream cannot be ensured, core NATS publishes on the same subjects.
//! - `python` (`--python-events`): `noetl.events.default.default.<execution_id>.0`, core
//!   publish, payload [`python_payload`]; types renamed by [`python_event_type`], with no
//!   counterpart for `command.issued`, `command.claimed`, `call.done`, `call.error` and
//!   `step.enter` (those rows are simply not published).
//! - `v4` (NoETL 4.x's event mirror): JetStream publish into stream `NOETL_EVENTS` on
//!   `<prefix>.<tenant>.<organization>.<execution_id>.<shard>`, payload the canonical
//!   envelope as Python's `json.dumps(sort_keys=True, separators=(",",":"))` writes it, no
//!   `Nats-Msg-Id` ([`v4`], which also records what was read in the real sources).
//! - `none` (a NoETL without the event mirror, 4.x's default): nothing on NATS; the
//!   execution record and `/status` are the only signal.
//!
//! The shape also picks the event *vocabulary* the table is written in ([`Vocabulary`]):
//! the Rust server's (`rust`, `python`) or 4.x's (`v4`, `none`), with the order each server
//! emits its events in.
//!
//! Layout: this file holds the vocabulary (event kinds, which events each moment of a run
//! writes); `row` the stored row and its Rust/Python encodings; `v4` the 4.x envelope and
//! subjects; `pyjson` Python's JSON text; `publisher` the queue and the flushing task.

mod publisher;
mod pyjson;
mod row;
pub mod v4;

pub use publisher::{EventSink, EventStats, Publisher};
pub use pyjson::to_python_json;
pub use row::{encode_row, python_payload, EventRow, Outgoing, RowPlace, Shape};

use serde_json::Value;
use std::time::Duration;

/// The JetStream stream the real Rust server publishes into.
pub const STREAM_NAME: &str = "noetl_events";
/// Its subjects.
pub const STREAM_SUBJECTS: &str = "noetl.events.>";
/// Its retention.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Which NoETL the stand-in's events look like (`--event-shape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventShape {
    /// The Rust control plane: `noetl.events.<event_type>`, stream `noetl_events`, the row.
    Rust,
    /// The older Python server: a small dict on a per-execution subject, core NATS.
    Python,
    /// NoETL 4.x's event mirror: stream `NOETL_EVENTS`, sharded per-tenant subjects, the
    /// canonical envelope.
    V4,
    /// No events on NATS at all (only the execution record and `/status`).
    None,
}

impl EventShape {
    /// The vocabulary the event table is written in.
    pub fn vocabulary(self) -> Vocabulary {
        match self {
            Self::Rust | Self::Python => Vocabulary::Rust,
            Self::V4 | Self::None => Vocabulary::V4,
        }
    }

    /// The flag value (`rust`, `python`, `v4`, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rust => "rust",
            Self::Python => "python",
            Self::V4 => "v4",
            Self::None => "none",
        }
    }
}

/// The event names and order a server writes into its event table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vocabulary {
    /// The Rust server (also what the Python shape renames): `playbook_started`, per step
    /// `command.issued`, `command.claimed`, `command.started`, `call.done`,
    /// `command.completed`, `step.enter`; `playbook.completed`; a failed step ends the run
    /// with no terminal event; a cancel writes `playbook_cancelled`.
    Rust,
    /// NoETL 4.x: `playbook.initialized`, `workflow.initialized`, per step
    /// `command.issued`, `command.claimed`, `command.started`, `step.enter`, `call.done`,
    /// `step.exit`, `command.completed` (a failure: `call.error`, `step.exit`,
    /// `command.failed`); then `workflow.completed|failed` and `playbook.completed|failed`;
    /// a cancel writes `execution.cancelled`.
    V4,
}

/// What a step's event carries, filled in by the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// Nothing beyond its name.
    Nothing,
    /// The run's workload (start events).
    Workload,
    /// The step's result.
    StepResult,
    /// The step's error.
    StepError,
}

/// One event a moment of a run writes: its kind, where (`Step` or the run), what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cue {
    /// The event.
    pub kind: EventKind,
    /// On the current step (`true`) or on the run (`false`: the playbook path, or the
    /// 4.x engine's `workflow` node).
    pub on_step: bool,
    /// What it carries.
    pub carries: Carries,
}

const fn cue(kind: EventKind, on_step: bool, carries: Carries) -> Cue {
    Cue {
        kind,
        on_step,
        carries,
    }
}

use Carries::{Nothing, StepError, StepResult, Workload};
use EventKind as K;

const RUST_START: &[Cue] = &[cue(K::PlaybookStarted, false, Workload)];
const RUST_STEP_BEGIN: &[Cue] = &[
    cue(K::CommandIssued, true, Nothing),
    cue(K::CommandClaimed, true, Nothing),
    cue(K::CommandStarted, true, Nothing),
];
const RUST_STEP_DONE: &[Cue] = &[
    cue(K::CallDone, true, StepResult),
    cue(K::CommandCompleted, true, StepResult),
    cue(K::StepEnter, true, Nothing),
];
const RUST_STEP_FAILED: &[Cue] = &[
    cue(K::CallError, true, StepError),
    cue(K::CommandFailed, true, StepError),
];
const RUST_RUN_COMPLETED: &[Cue] = &[cue(K::PlaybookCompleted, false, Nothing)];
const RUST_RUN_FAILED: &[Cue] = &[];

const V4_START: &[Cue] = &[
    cue(K::PlaybookInitialized, false, Workload),
    cue(K::WorkflowInitialized, false, Workload),
];
const V4_STEP_BEGIN: &[Cue] = &[
    cue(K::CommandIssued, true, Nothing),
    cue(K::CommandClaimed, true, Nothing),
    cue(K::CommandStarted, true, Nothing),
    cue(K::StepEnter, true, Nothing),
];
const V4_STEP_DONE: &[Cue] = &[
    cue(K::CallDone, true, StepResult),
    cue(K::StepExit, true, StepResult),
    cue(K::CommandCompleted, true, StepResult),
];
const V4_STEP_FAILED: &[Cue] = &[
    cue(K::CallError, true, StepError),
    cue(K::StepExit, true, StepError),
    cue(K::CommandFailed, true, StepError),
];
const V4_RUN_COMPLETED: &[Cue] = &[
    cue(K::WorkflowCompleted, false, Nothing),
    cue(K::PlaybookCompleted, false, Nothing),
];
const V4_RUN_FAILED: &[Cue] = &[
    cue(K::WorkflowFailed, false, StepError),
    cue(K::PlaybookFailed, false, StepError),
];

impl Vocabulary {
    /// The events that open a run.
    pub fn start(self) -> &'static [Cue] {
        match self {
            Self::Rust => RUST_START,
            Self::V4 => V4_START,
        }
    }

    /// The events of a step before its call runs.
    pub fn step_begin(self) -> &'static [Cue] {
        match self {
            Self::Rust => RUST_STEP_BEGIN,
            Self::V4 => V4_STEP_BEGIN,
        }
    }

    /// The events of a step whose call succeeded.
    pub fn step_done(self) -> &'static [Cue] {
        match self {
            Self::Rust => RUST_STEP_DONE,
            Self::V4 => V4_STEP_DONE,
        }
    }

    /// The events of a step whose call failed.
    pub fn step_failed(self) -> &'static [Cue] {
        match self {
            Self::Rust => RUST_STEP_FAILED,
            Self::V4 => V4_STEP_FAILED,
        }
    }

    /// The terminal events of a run that played every step (also the lying run's).
    pub fn run_completed(self) -> &'static [Cue] {
        match self {
            Self::Rust => RUST_RUN_COMPLETED,
            Self::V4 => V4_RUN_COMPLETED,
        }
    }

    /// The terminal events of a run whose step failed: none on the Rust server (its trap),
    /// both spellings on 4.x.
    pub fn run_failed(self) -> &'static [Cue] {
        match self {
            Self::Rust => RUST_RUN_FAILED,
            Self::V4 => V4_RUN_FAILED,
        }
    }

    /// The event a cancel writes and its `node_name` (4.x's cancel route writes `cancel`).
    pub fn cancelled(self, playbook_path: &str) -> (EventKind, String) {
        match self {
            Self::Rust => (K::PlaybookCancelled, playbook_path.to_owned()),
            Self::V4 => (K::ExecutionCancelled, "cancel".to_owned()),
        }
    }

    /// The `node_name` of run-level events that are not the playbook's own: 4.x's engine
    /// writes `workflow.*` on the node `workflow`.
    pub fn run_node(self, kind: EventKind, playbook_path: &str) -> String {
        match kind {
            K::WorkflowInitialized | K::WorkflowCompleted | K::WorkflowFailed => {
                "workflow".to_owned()
            }
            _ => playbook_path.to_owned(),
        }
    }

    /// The `status` column where this vocabulary differs from [`EventKind::status`]: 4.x's
    /// engine stores its lifecycle payload's lowercase status (`initialized`, `completed`,
    /// `failed`).
    pub fn status_of(self, kind: EventKind) -> Option<&'static str> {
        match (self, kind) {
            (Self::V4, K::PlaybookInitialized | K::WorkflowInitialized) => Some("initialized"),
            (Self::V4, K::PlaybookCompleted | K::WorkflowCompleted) => Some("completed"),
            (Self::V4, K::PlaybookFailed | K::WorkflowFailed) => Some("failed"),
            _ => None,
        }
    }
}

/// Every event type the stand-in writes (both vocabularies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The run began (Rust server; `node_name` = playbook path).
    PlaybookStarted,
    /// The run began (4.x; `node_name` = playbook path).
    PlaybookInitialized,
    /// The 4.x engine began the workflow (`node_name` = `workflow`).
    WorkflowInitialized,
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
    /// The engine entered the step (Rust server: after its command completed, as
    /// observed; 4.x: after `command.started`).
    StepEnter,
    /// The step ended (4.x, emitted natively, also after a failed call).
    StepExit,
    /// The 4.x engine's workflow ended well.
    WorkflowCompleted,
    /// The 4.x engine's workflow failed.
    WorkflowFailed,
    /// The run ended (also emitted by a run that actually failed: a real-world trap).
    PlaybookCompleted,
    /// The run failed (4.x).
    PlaybookFailed,
    /// The run was cancelled (Rust server).
    PlaybookCancelled,
    /// The run was cancelled (4.x's cancel route).
    ExecutionCancelled,
}

impl EventKind {
    /// The `event_type` as its server writes it (the Rust server's mix of `_` and `.` is
    /// what was observed).
    pub fn event_type(self) -> &'static str {
        match self {
            Self::PlaybookStarted => "playbook_started",
            Self::PlaybookInitialized => "playbook.initialized",
            Self::WorkflowInitialized => "workflow.initialized",
            Self::CommandIssued => "command.issued",
            Self::CommandClaimed => "command.claimed",
            Self::CommandStarted => "command.started",
            Self::CallDone => "call.done",
            Self::CallError => "call.error",
            Self::CommandCompleted => "command.completed",
            Self::CommandFailed => "command.failed",
            Self::StepEnter => "step.enter",
            Self::StepExit => "step.exit",
            Self::WorkflowCompleted => "workflow.completed",
            Self::WorkflowFailed => "workflow.failed",
            Self::PlaybookCompleted => "playbook.completed",
            Self::PlaybookFailed => "playbook.failed",
            Self::PlaybookCancelled => "playbook_cancelled",
            Self::ExecutionCancelled => "execution.cancelled",
        }
    }

    /// The row's `status` (4.x's lifecycle events override it: [`Vocabulary::status_of`]).
    /// A 4.x `step.exit` is COMPLETED even after a failed call: its server derives the
    /// status from the event name.
    pub fn status(self) -> &'static str {
        match self {
            Self::PlaybookStarted => "STARTED",
            Self::PlaybookInitialized | Self::WorkflowInitialized => "INITIALIZED",
            Self::CommandIssued => "PENDING",
            Self::CommandClaimed | Self::CommandStarted | Self::StepEnter => "RUNNING",
            Self::CallDone
            | Self::CommandCompleted
            | Self::StepExit
            | Self::WorkflowCompleted
            | Self::PlaybookCompleted => "COMPLETED",
            Self::CallError | Self::CommandFailed | Self::WorkflowFailed | Self::PlaybookFailed => {
                "FAILED"
            }
            Self::PlaybookCancelled | Self::ExecutionCancelled => "CANCELLED",
        }
    }

    /// The row's `node_type`.
    pub fn node_type(self) -> &'static str {
        match self {
            Self::PlaybookStarted
            | Self::PlaybookInitialized
            | Self::PlaybookCompleted
            | Self::PlaybookFailed
            | Self::PlaybookCancelled
            | Self::ExecutionCancelled => "playbook",
            Self::WorkflowInitialized | Self::WorkflowCompleted | Self::WorkflowFailed => {
                "workflow"
            }
            Self::StepEnter | Self::StepExit => "step",
            _ => "http",
        }
    }

    /// Whether the event is about the run rather than a step (no `step_name`).
    pub fn is_run_level(self) -> bool {
        matches!(self.node_type(), "playbook" | "workflow")
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
    /// The `context` column (the start event's holds `{workload}`, as the real server's).
    pub context: Value,
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
            context: Value::Null,
            command_id: None,
            duration: None,
        }
    }

    /// Sets `context`.
    pub fn with_context(mut self, context: Value) -> Self {
        self.context = context;
        self
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

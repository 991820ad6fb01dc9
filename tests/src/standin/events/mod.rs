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
//!
//! Layout: this file holds the vocabulary (event kinds, what a runner emits); `row` the
//! stored row and its wire encodings; `publisher` the queue and the flushing task.

mod publisher;
mod row;

pub use publisher::{EventSink, EventStats, Publisher};
pub use row::{encode_row, python_payload, EventRow, Outgoing, RowPlace, Shape};

use serde_json::Value;
use std::time::Duration;

/// The JetStream stream the real Rust server publishes into.
pub const STREAM_NAME: &str = "noetl_events";
/// Its subjects.
pub const STREAM_SUBJECTS: &str = "noetl.events.>";
/// Its retention.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

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

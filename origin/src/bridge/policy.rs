//! The bridge's decisions, as pure functions over plain values (no I/O, no clock reads).
//!
//! The shell in [`super`] reads a NATS message, asks this module what it means and what to
//! do, performs the I/O, and asks again. Everything that can be wrong about a NoETL event
//! is decided here and unit-tested with plain values:
//!
//! - [`parse_event`] — every NoETL shape, told apart by subject and payload, never by a
//!   flag: `noetl.events.<event_type>` (the Rust control plane: the event row),
//!   `noetl.events.{tenant}.{org}.{execution_id}.{shard}` (the Python servers: the older
//!   small dict, and 4.x's canonical envelope with sorted keys). The payload is
//!   authoritative; the subject only fills what the payload lacks. Execution ids are kept as
//!   exact decimal text: serde_json holds integers as `u64`, so an id above 2^53 never
//!   passes through `f64`; a number that is not an integer is refused.
//!   [`parse_record_event`] reads the same fields from an event of NoETL's execution record
//!   (the HTTP fallback, `poll`).
//! - [`normalize_event_type`] — one vocabulary for every server (`_` → `.`; command/call and
//!   Python step names mapped to `step.enter` / `step.exit` / `step.failed`; `workflow.*`,
//!   `execution.*` and `*.initialized` mapped to `playbook.*`). The one spelling whose meaning
//!   depends on the server is `command.completed`: the Rust control plane has no native
//!   `step.exit`, so there it is the step's end; the Python servers emit `step.exit`
//!   themselves, so there it is not forwarded (it would double every step). The
//!   [`Dialect`] says which.
//! - [`ForwardList`] — the configured allow-list; everything else is acked and ignored
//!   before any store or NoETL call, so chatty internal events cost one JSON parse.
//! - [`resolve`] — the frames an event becomes. `step.failed` and `playbook.completed` are
//!   not trusted on their own: a failed step ends a real run FAILED with no
//!   `playbook.failed`, and a real server may emit `playbook.completed` for a run that
//!   failed. So those two wait for the run's status from NoETL and the terminal frame says
//!   what NoETL says, not what the event claims.
//! - [`retry_verdict`] / [`retry_delay`] — how long each kind of "not yet" is retried.
//! - [`publish_plan`] — which frames an event publishes once its claims on the terminal
//!   frame ([`terminal_key`]) and the step's failure ([`failure_key`]) are known.
//! - [`OrderGuard`] — keeps an execution's frames in order within one replica when an
//!   earlier event of it is waiting for a redelivery.
//! - [`worker_for`] — which of the replica's workers handles an execution's events (all of
//!   them, so they stay in delivery order while executions run in parallel).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use gateway_shared::frames::PlaybookState;
use serde::Deserialize;
use serde_json::Value;

use crate::noetl::NoetlError;
use crate::runs::RunStatus;
use gateway_shared::ids::ExecutionId;

/// The default forward allow-list (PROTOCOL §6), in normalised names.
pub const DEFAULT_FORWARD: [&str; 8] = [
    "playbook.started",
    "step.enter",
    "step.exit",
    "step.failed",
    "playbook.completed",
    "playbook.failed",
    "playbook.cancelled",
    "calendar.event.touched",
];

/// Longest event type accepted (real ones are under 30 characters).
const MAX_EVENT_TYPE_LEN: usize = 128;

/// Why a message is not a usable execution event. Logged with the subject (never the
/// payload) and acked: a redelivery could not make it any better.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The payload is not a JSON object of the expected field types.
    #[error("payload is not a JSON event object: {0}")]
    NotJson(String),
    /// Neither the payload nor a Rust-shape subject names the event type.
    #[error("no event_type in the payload or the subject")]
    NoEventType,
    /// The event type is empty, too long, or not printable ASCII.
    #[error("unusable event_type")]
    BadEventType,
    /// Neither the payload nor a Python-shape subject names the execution.
    #[error("no execution_id")]
    NoExecutionId,
    /// The execution id is not an unsigned integer or a short key-safe string.
    #[error("unusable execution_id")]
    BadExecutionId,
    /// The subject is not under the configured prefix.
    #[error("subject is not under the bridge's subject prefix")]
    ForeignSubject,
}

/// What a subject says, before the payload is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectShape<'a> {
    /// `noetl.events.<event_type>` (the event type may itself contain dots).
    Rust {
        /// The subject's tail: the (raw) event type.
        event_type: &'a str,
    },
    /// `noetl.events.{tenant}.{org}.{execution_id}.{shard}` (the older Python server).
    Python {
        /// Tenant token.
        tenant: &'a str,
        /// Organisation token.
        org: &'a str,
        /// The execution id token.
        execution_id: &'a str,
        /// Shard token.
        shard: &'a str,
    },
}

/// Classifies `subject` under `prefix` (e.g. `noetl.events.`).
///
/// Four tokens after the prefix whose third is all digits is the Python shape; anything
/// else is a Rust-shape event type. The ambiguity (a Rust event type of four tokens with a
/// numeric third token) does not occur in either server's vocabulary, and the payload's
/// own `execution_id` / `event_type` win over the subject anyway.
pub fn classify_subject<'a>(subject: &'a str, prefix: &str) -> Result<SubjectShape<'a>, Malformed> {
    let tail = subject
        .strip_prefix(prefix)
        .filter(|t| !t.is_empty())
        .ok_or(Malformed::ForeignSubject)?;
    let tokens: Vec<&str> = tail.split('.').collect();
    if let [tenant, org, execution_id, shard] = tokens[..] {
        if !execution_id.is_empty() && execution_id.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(SubjectShape::Python {
                tenant,
                org,
                execution_id,
                shard,
            });
        }
    }
    Ok(SubjectShape::Rust { event_type: tail })
}

/// Which family of NoETL servers an event comes from: decides what `command.completed`
/// means ([`normalize_event_type`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// The Rust control plane (subject `noetl.events.<event_type>`): no native `step.exit`,
    /// so `command.completed` is the step's end.
    #[default]
    Rust,
    /// The Python servers (per-execution subjects; the older shape and 4.x): `step.exit`
    /// (or `step_completed`) is native, so `command.completed` is not a frame of its own.
    Python,
}

impl Dialect {
    /// The dialect of an execution record's events, from their spellings: a Python server
    /// writes `*.initialized`, `execution.started` or a native `step.exit` /
    /// `step_completed` / `step_started` (its first event is already one of them); the
    /// Rust control plane writes none of these.
    pub fn of_record_types<'a>(types: impl IntoIterator<Item = &'a str>) -> Self {
        let python = types.into_iter().any(|t| {
            matches!(
                t.trim().to_ascii_lowercase().replace('_', ".").as_str(),
                "playbook.initialized"
                    | "workflow.initialized"
                    | "execution.started"
                    | "step.exit"
                    | "step.completed"
                    | "step.started"
            )
        });
        if python {
            Self::Python
        } else {
            Self::Rust
        }
    }
}

/// Maps every server's event names onto one vocabulary: lower case, `_` → `.`, then
///
/// | raw (after `_` → `.`) | normalised |
/// |---|---|
/// | `command.completed` | `step.exit` ([`Dialect::Rust`]); unchanged, so not forwarded ([`Dialect::Python`]) |
/// | `step.completed` | `step.exit` |
/// | `command.failed`, `call.error` | `step.failed` |
/// | `step.started` | `step.enter` |
/// | `playbook.initialized`, `workflow.initialized`, `workflow.started`, `execution.started` | `playbook.started` |
/// | `workflow.completed`, `execution.completed` | `playbook.completed` |
/// | `workflow.failed`, `execution.failed` | `playbook.failed` |
/// | `workflow.cancelled`, `execution.cancelled` | `playbook.cancelled` |
///
/// Idempotent: a normalised name maps to itself.
pub fn normalize_event_type(raw: &str, dialect: Dialect) -> String {
    let dotted: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c == '_' {
                '.'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let mapped = match dotted.as_str() {
        "command.completed" if dialect == Dialect::Rust => "step.exit",
        "step.completed" => "step.exit",
        "command.failed" | "call.error" => "step.failed",
        "step.started" => "step.enter",
        "playbook.initialized"
        | "workflow.initialized"
        | "workflow.started"
        | "execution.started" => "playbook.started",
        "workflow.completed" | "execution.completed" => "playbook.completed",
        "workflow.failed" | "execution.failed" => "playbook.failed",
        "workflow.cancelled" | "execution.cancelled" => "playbook.cancelled",
        _ => return dotted,
    };
    mapped.to_owned()
}

/// The event types the bridge forwards (normalised names), from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardList(HashSet<String>);

impl ForwardList {
    /// Builds the list; each configured name is normalised, so `playbook_started` and
    /// `playbook.started` mean the same entry.
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self(
            names
                .into_iter()
                .map(|n| normalize_event_type(n.as_ref(), Dialect::Rust))
                .filter(|n| !n.is_empty())
                .collect(),
        )
    }

    /// True if frames are produced for this normalised event type.
    pub fn allows(&self, event_type: &str) -> bool {
        self.0.contains(event_type)
    }
}

impl Default for ForwardList {
    fn default() -> Self {
        Self::new(DEFAULT_FORWARD)
    }
}

/// An allow-listed execution event, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionEvent {
    /// Exact decimal text (or the server's own string id), checked once on parse.
    pub execution_id: ExecutionId,
    /// Normalised event type (`step.exit`, `playbook.completed`, …).
    pub event_type: String,
    /// The step (`node_name`) for step-level events; `None` for playbook-level ones, whose
    /// `node_name` is the playbook path, not a step.
    pub step_name: Option<String>,
    /// The event row's own status (`COMPLETED`, `FAILED`, …), when it has one.
    pub status: Option<String>,
    /// When NoETL recorded the event, as RFC 3339 UTC; `None` if the event has no
    /// readable time (the shell then uses the time it saw the message).
    pub at: Option<String>,
    /// NoETL's `event_id` as exact text, when present (the identity used to decide which
    /// event owns an execution's terminal frame).
    pub event_id: Option<String>,
    /// Which server family wrote it ([`exit_failure_key`] applies to Python servers only).
    pub dialect: Dialect,
}

/// What a message turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An allow-listed event: look up interest and produce frames.
    Forward(ExecutionEvent),
    /// A well-formed event of a type that is not forwarded (acked, nothing else).
    Ignored {
        /// Its normalised type, for debug logs.
        event_type: String,
    },
}

/// The fields the bridge reads; the other ~35 columns of a Rust row are skipped unparsed
/// into values (serde ignores unknown keys).
#[derive(Deserialize)]
struct RawEvent {
    #[serde(default)]
    event_type: Option<Value>,
    #[serde(default)]
    execution_id: Option<Value>,
    #[serde(default)]
    event_id: Option<Value>,
    #[serde(default)]
    node_name: Option<Value>,
    #[serde(default)]
    step_name: Option<Value>,
    #[serde(default)]
    step: Option<Value>,
    #[serde(default)]
    status: Option<Value>,
    #[serde(default)]
    event_time: Option<Value>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    created_at: Option<Value>,
}

/// Parses one message from `subject` (under `prefix`, e.g. `noetl.events.`).
///
/// Forwarded events must name a usable execution; ignored ones only need a type, so a
/// chatty internal event with an odd id is not reported as malformed.
pub fn parse_event(
    subject: &str,
    payload: &[u8],
    prefix: &str,
    forward: &ForwardList,
) -> Result<Parsed, Malformed> {
    let shape = classify_subject(subject, prefix)?;
    // serde would also read a struct from a JSON array; an event is an object.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Malformed::NotJson("not a JSON object".into()));
    }
    let raw: RawEvent =
        serde_json::from_slice(payload).map_err(|e| Malformed::NotJson(short_error(&e)))?;
    let (subject_type, subject_execution, dialect) = match shape {
        SubjectShape::Rust { event_type } => (Some(event_type), None, Dialect::Rust),
        SubjectShape::Python { execution_id, .. } => (None, Some(execution_id), Dialect::Python),
    };
    read_event(raw, subject_type, subject_execution, dialect, forward)
}

/// Parses one event of NoETL's execution record (`GET /api/executions/{id}`, its `events`
/// array) of `execution_id`, read the same way as a NATS payload ([`parse_event`]); the
/// record's own execution id fills an event that does not name one.
pub fn parse_record_event(
    event: &Value,
    execution_id: &ExecutionId,
    dialect: Dialect,
    forward: &ForwardList,
) -> Result<Parsed, Malformed> {
    if !event.is_object() {
        return Err(Malformed::NotJson("not a JSON object".into()));
    }
    let raw = RawEvent::deserialize(event).map_err(|e| Malformed::NotJson(short_error(&e)))?;
    read_event(raw, None, Some(execution_id.as_str()), dialect, forward)
}

/// The fields of one event, whichever way it arrived: `subject_type` / `subject_execution`
/// fill what the payload lacks.
fn read_event(
    raw: RawEvent,
    subject_type: Option<&str>,
    subject_execution: Option<&str>,
    dialect: Dialect,
    forward: &ForwardList,
) -> Result<Parsed, Malformed> {
    let raw_type = match (text(&raw.event_type), subject_type) {
        (Some(t), _) => t,
        (None, Some(t)) => t.to_owned(),
        (None, None) => return Err(Malformed::NoEventType),
    };
    if raw_type.is_empty()
        || raw_type.len() > MAX_EVENT_TYPE_LEN
        || !raw_type.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Malformed::BadEventType);
    }
    let event_type = normalize_event_type(&raw_type, dialect);
    if !forward.allows(&event_type) {
        return Ok(Parsed::Ignored { event_type });
    }

    let execution_id = match (&raw.execution_id, subject_execution) {
        (Some(v), _) if !v.is_null() => exact_id(v).ok_or(Malformed::BadExecutionId)?,
        (_, Some(id)) => id.to_owned(),
        _ => return Err(Malformed::NoExecutionId),
    };
    let execution_id =
        ExecutionId::try_from(execution_id).map_err(|_| Malformed::BadExecutionId)?;

    let step_name = if event_type.starts_with("playbook.") {
        None
    } else {
        text(&raw.node_name)
            .or_else(|| text(&raw.step_name))
            .or_else(|| text(&raw.step))
    };
    let at = [&raw.event_time, &raw.timestamp, &raw.created_at]
        .into_iter()
        .find_map(|v| text(v).and_then(|t| normalize_time(&t)));
    Ok(Parsed::Forward(ExecutionEvent {
        execution_id,
        event_type,
        step_name,
        status: text(&raw.status),
        at,
        event_id: raw.event_id.as_ref().and_then(exact_id),
        dialect,
    }))
}

/// A short, payload-free description of a JSON error (serde's messages quote at most a
/// field name or a type, never the input).
fn short_error(e: &serde_json::Error) -> String {
    let mut s = e.to_string();
    s.truncate(160);
    s
}

/// A non-empty string field, or a number's text (some rows carry numeric names).
fn text(v: &Option<Value>) -> Option<String> {
    match v.as_ref()? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An id as exact text: an unsigned integer of any size `u64` holds, or a string. Never
/// through `f64`: a float (or an integer too big for `u64`, which serde_json reads as a
/// float) is refused rather than rounded.
pub fn exact_id(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_u64().map(|u| u.to_string()),
        Value::String(s) => {
            let s = s.trim();
            (!s.is_empty()).then(|| s.to_owned())
        }
        _ => None,
    }
}

/// RFC 3339 with any offset, or a naive ISO timestamp (Python rows) taken as UTC →
/// RFC 3339 UTC with microseconds. `None` if unreadable.
pub fn normalize_time(s: &str) -> Option<String> {
    let parsed = DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
                .ok()
                .map(|n| n.and_utc())
        })?;
    Some(parsed.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Whether an event's frames depend on the run's confirmed status.
pub fn needs_status(event_type: &str) -> bool {
    matches!(event_type, "step.failed" | "playbook.completed")
}

/// What the shell learned when it asked NoETL for the run's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCheck {
    /// The event does not need one ([`needs_status`] is false).
    NotNeeded,
    /// NoETL answered.
    Known(RunStatus),
    /// NoETL could not answer now (unreachable, timeout, 5xx): worth retrying.
    Unavailable,
    /// Retrying stopped (too old, or NoETL said the execution does not exist): use what
    /// the event itself claims.
    GaveUp,
}

/// The frames one event becomes, in publishing order: an optional progress frame, then an
/// optional terminal frame (which the shell sends only if this event wins the
/// execution's one terminal slot).
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    /// A non-terminal frame (the event itself).
    pub progress: Option<PlaybookState>,
    /// The execution's final frame (`terminal: true`).
    pub terminal: Option<PlaybookState>,
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Publish these (boxed: the variants differ a lot in size).
    Frames(Box<Frames>),
    /// The status is needed and not final or not known yet: retry the event later
    /// (nothing has been published for it).
    WaitForStatus,
}

/// The frames for `ev` given what is known about the run (`at` fills a missing time).
///
/// | event | status | frames |
/// |---|---|---|
/// | `step.failed` | RUNNING, or gave up | step.failed |
/// | `step.failed` | FAILED / COMPLETED / CANCELLED | step.failed, then the matching terminal |
/// | `playbook.completed` | FAILED / COMPLETED / CANCELLED | the matching terminal (the true status) |
/// | `playbook.completed` | gave up | playbook.completed, as the event claims |
/// | either | RUNNING (completed only) or unavailable | wait |
/// | `playbook.failed` / `playbook.cancelled` | — | that terminal |
/// | anything else | — | the event as a progress frame |
pub fn resolve(ev: &ExecutionEvent, check: StatusCheck, at: &str) -> Resolution {
    let frame = |event_type: &str, step_name: Option<String>, status: Option<String>, terminal| {
        PlaybookState {
            execution_id: ev.execution_id.to_string(),
            event_type: event_type.to_owned(),
            step_name,
            status,
            at: ev.at.clone().unwrap_or_else(|| at.to_owned()),
            terminal,
        }
    };
    let progress = || {
        Some(frame(
            &ev.event_type,
            ev.step_name.clone(),
            ev.status.clone(),
            false,
        ))
    };
    let terminal_of = |s: RunStatus| {
        s.terminal()
            .map(|(t, status)| frame(t, None, Some(status.to_owned()), true))
    };
    let claimed_status = |default: &str| {
        Some(
            ev.status
                .as_deref()
                .map(str::to_ascii_uppercase)
                .unwrap_or_else(|| default.to_owned()),
        )
    };
    let frames = match (ev.event_type.as_str(), check) {
        ("step.failed" | "playbook.completed", StatusCheck::Unavailable)
        | ("playbook.completed", StatusCheck::Known(RunStatus::Running)) => {
            return Resolution::WaitForStatus
        }
        ("step.failed", StatusCheck::Known(s)) => Frames {
            progress: progress(),
            terminal: terminal_of(s),
        },
        ("playbook.completed", StatusCheck::Known(s)) => Frames {
            progress: None,
            terminal: terminal_of(s),
        },
        ("playbook.completed", _) => Frames {
            progress: None,
            terminal: Some(frame(
                "playbook.completed",
                None,
                claimed_status("COMPLETED"),
                true,
            )),
        },
        ("playbook.failed", _) => Frames {
            progress: None,
            terminal: Some(frame(
                "playbook.failed",
                None,
                claimed_status("FAILED"),
                true,
            )),
        },
        ("playbook.cancelled", _) => Frames {
            progress: None,
            terminal: Some(frame(
                "playbook.cancelled",
                None,
                claimed_status("CANCELLED"),
                true,
            )),
        },
        _ => Frames {
            progress: progress(),
            terminal: None,
        },
    };
    Resolution::Frames(Box::new(frames))
}

/// Why an event could not be finished now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// No client has recorded interest yet (executePlaybook records it only after
    /// NoETL's `/api/execute` answered, so the first events can arrive first).
    NoInterest,
    /// The run's status is needed and NoETL says it is not final yet.
    StatusNotFinal,
    /// The run's status is needed and NoETL could not answer.
    NoetlUnavailable,
    /// The K/V store could not be read or written.
    StoreUnavailable,
    /// A frame could not be published.
    BusUnavailable,
    /// An earlier event of the same execution is waiting for its redelivery.
    WaitingBehind,
}

/// What to do with an event that wants a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryVerdict {
    /// Retry after [`retry_delay`].
    Retry,
    /// Stop: drop the event (no interest came in time).
    Drop,
    /// Stop waiting for the status and use what the event claims.
    UseEventClaim,
}

/// The retry limits, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryLimits {
    /// Events with no interest older than this are dropped.
    pub max_interest_wait: Duration,
    /// Status confirmation stops after this; the event's own claim is used.
    pub max_confirm_wait: Duration,
}

/// Whether an event of `age` (since NATS stored it, or since the HTTP fallback first
/// tried it) is retried again for `reason`. Infrastructure failures (store, bus) are
/// retried without limit: the stream (or NoETL's record) still holds the event.
pub fn retry_verdict(reason: RetryReason, age: Duration, limits: &RetryLimits) -> RetryVerdict {
    match reason {
        RetryReason::NoInterest if age >= limits.max_interest_wait => RetryVerdict::Drop,
        RetryReason::StatusNotFinal | RetryReason::NoetlUnavailable
            if age >= limits.max_confirm_wait =>
        {
            RetryVerdict::UseEventClaim
        }
        _ => RetryVerdict::Retry,
    }
}

/// The delay before the next attempt. Waiting for interest, a status or an earlier event
/// uses the base delay, the same for every event, so redeliveries come back in stream
/// order; infrastructure failures back off four times longer to spare a struggling
/// service.
pub fn retry_delay(reason: RetryReason, base: Duration) -> Duration {
    match reason {
        RetryReason::NoInterest | RetryReason::StatusNotFinal | RetryReason::WaitingBehind => base,
        RetryReason::NoetlUnavailable
        | RetryReason::StoreUnavailable
        | RetryReason::BusUnavailable => base * 4,
    }
}

/// Keeps one execution's frames in order within a replica while some of its events wait
/// for a redelivery.
///
/// Without it, a late interest record reorders frames: event 1 is retried (no interest
/// yet), the interest appears, event 2 arrives fresh and is forwarded, then event 1 comes
/// back. So while an earlier event (lower sequence) of the same execution is parked, a
/// later one is parked behind it. Redeliveries come back in stream order (the server
/// sorts them and serves them before new messages), so the queue drains in order.
///
/// A parked entry is forgotten once it is overdue (its redelivery went to another replica
/// after a change of reader, or the shell dropped it), so a lost entry delays its
/// successors by at most that long. Across replicas the order holds because one replica
/// reads at a time (the reader lease, `source`).
#[derive(Debug, Default)]
pub struct OrderGuard {
    parked: HashMap<ExecutionId, BTreeMap<u64, Instant>>,
    last_sweep: Option<Instant>,
}

/// How often [`OrderGuard`] forgets overdue entries of executions no longer seen.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl OrderGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if an earlier event (lower `seq`) of `execution_id` is still parked at `now`:
    /// the caller must retry this one too (and [`park`](Self::park) it).
    pub fn must_wait(&mut self, execution_id: &ExecutionId, seq: u64, now: Instant) -> bool {
        self.sweep(now);
        let Some(seqs) = self.parked.get_mut(execution_id) else {
            return false;
        };
        seqs.retain(|_, overdue_at| *overdue_at > now);
        let earlier = seqs.range(..seq).next().is_some();
        if seqs.is_empty() {
            self.parked.remove(execution_id);
        }
        earlier
    }

    /// Records that `seq` will come back; it counts as parked until `overdue_at`.
    pub fn park(&mut self, execution_id: &ExecutionId, seq: u64, overdue_at: Instant) {
        self.parked
            .entry(execution_id.clone())
            .or_default()
            .insert(seq, overdue_at);
    }

    /// `seq` is finished (forwarded or dropped).
    pub fn release(&mut self, execution_id: &ExecutionId, seq: u64) {
        if let Some(seqs) = self.parked.get_mut(execution_id) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.parked.remove(execution_id);
            }
        }
    }

    /// How many events are parked (for tests and logs).
    pub fn len(&self) -> usize {
        self.parked.values().map(BTreeMap::len).sum()
    }

    /// True if nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.parked.retain(|_, seqs| {
            seqs.retain(|_, overdue_at| *overdue_at > now);
            !seqs.is_empty()
        });
    }
}

/// The worker (of `workers`, ≥ 1) that handles every event of `execution_id`.
///
/// A fixed hash (FNV-1a, then a 64-bit finaliser so the low bits mix in every byte), the
/// same in every process and every run: what matters is that one execution always maps to
/// one worker, whose queue keeps its events in delivery order.
pub fn worker_for(execution_id: &ExecutionId, workers: usize) -> usize {
    let mut h = fnv1a(execution_id.as_str());
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h % workers.max(1) as u64) as usize
}

/// FNV-1a, 64 bits: a fixed hash, the same in every process and every run.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// True for event types that end a run or report a failed step: after an execution's
/// terminal frame these are dropped; everything else is still forwarded.
pub fn is_terminal_or_failure(event_type: &str) -> bool {
    matches!(
        event_type,
        "step.failed" | "playbook.completed" | "playbook.failed" | "playbook.cancelled"
    )
}

/// Whether an event is skipped because its execution's terminal frame was already claimed
/// (`owner` is the claim's stored event key, `None` while unclaimed).
///
/// After the terminal frame only events that would make another terminal (or repeat
/// step.failed: NoETL sends call.error and command.failed for one step) are skipped. A
/// plain lifecycle event handled late by another replica — a step.exit racing the
/// playbook.completed — is still forwarded: order across replicas is not guaranteed, and a
/// lost frame is worse than a late one. The claim's own event (a redelivery) is not skipped.
pub fn skipped_after_terminal(owner: Option<&[u8]>, event_key: &str, event_type: &str) -> bool {
    owner.is_some_and(|o| o != event_key.as_bytes()) && is_terminal_or_failure(event_type)
}

/// True if the claim whose stored owner is `owner` belongs to `event_key` (a redelivery of
/// the event that created it still owns it).
pub fn owns_claim(owner: Option<&[u8]>, event_key: &str) -> bool {
    owner.is_some_and(|o| o == event_key.as_bytes())
}

/// Why an event whose status [`resolve`] is waiting for is retried.
pub fn wait_reason(check: StatusCheck) -> RetryReason {
    if check == StatusCheck::Unavailable {
        RetryReason::NoetlUnavailable
    } else {
        RetryReason::StatusNotFinal
    }
}

/// What NoETL's status answer means for [`resolve`]. A 4xx or an unreadable reply cannot
/// get better by asking again (the event's own claim is used); anything else that failed
/// (unreachable, timeout, 5xx) is worth retrying.
pub fn status_check(reply: Result<&Value, &NoetlError>) -> StatusCheck {
    match reply {
        Ok(reply) => StatusCheck::Known(RunStatus::from_reply(reply)),
        Err(NoetlError::Status {
            status: 400..=499, ..
        })
        | Err(NoetlError::BadResponse(_)) => StatusCheck::GaveUp,
        Err(_) => StatusCheck::Unavailable,
    }
}

/// How long a retried event counts as parked in its worker's [`OrderGuard`]: two retry
/// periods (and a margin), after which its redelivery went elsewhere.
pub fn overdue_after(reason: RetryReason, base: Duration) -> Duration {
    retry_delay(reason, base) * 2 + Duration::from_millis(500)
}

/// The NAK delay at shutdown for an event queued behind one waiting for its redelivery:
/// longer than any retry's, so it comes back behind that one.
pub fn give_back_delay(base: Duration) -> Duration {
    retry_delay(RetryReason::BusUnavailable, base) + base
}

/// The frames one event publishes, in order, once its claims are known.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishPlan<'a> {
    /// Publish these, in this order.
    pub frames: Vec<&'a PlaybookState>,
    /// True when a frame was left out because another event owns its claim (for logs).
    pub skipped_any: bool,
}

/// Which of `frames` this event publishes, given its claims: `terminal` on the execution's
/// terminal frame ([`terminal_key`]; `None` when there is no terminal frame), `failure` on
/// the failed step ([`failure_key`]; `None` when there is no such frame).
///
/// Exactly one event publishes each claimed frame, across replicas: the claims are made
/// (create-if-absent) before anything is published. An event that lost the terminal
/// publishes nothing — the winner sends its own step.failed and the terminal, in that
/// order, and nothing may follow the terminal. An event that lost only the step's failure
/// still sends the terminal it won (the failure was reported while the run still looked
/// RUNNING).
pub fn publish_plan<'a>(
    frames: &'a Frames,
    terminal: Option<bool>,
    failure: Option<bool>,
) -> PublishPlan<'a> {
    if terminal == Some(false) {
        return PublishPlan {
            frames: Vec::new(),
            skipped_any: true,
        };
    }
    let progress = frames.progress.as_ref().filter(|_| failure != Some(false));
    let terminal = frames.terminal.as_ref().filter(|_| terminal == Some(true));
    PublishPlan {
        frames: progress.into_iter().chain(terminal).collect(),
        skipped_any: failure == Some(false),
    }
}

/// The K/V key (bucket `interest`) whose creation claims a failed step's `step.failed`
/// frame, when `frames` has one: NoETL reports one failure twice (call.error and
/// command.failed), and only one of them may reach the client. The step name is hashed,
/// so any name makes a valid key. `None` for other frames or a step without a name.
pub fn failure_key(frames: &Frames) -> Option<String> {
    let f = frames.progress.as_ref()?;
    step_failure_key(&f.execution_id, &f.event_type, f.step_name.as_deref())
}

/// The failure claim a `step.failed` event would take ([`failure_key`] of its frames),
/// for an event skipped after the terminal frame: if it owns that claim, its own
/// step.failed was never sent (its publish failed and the terminal's winner left the
/// frame to it), so it still sends it — late, not lost.
pub fn event_failure_key(ev: &ExecutionEvent) -> Option<String> {
    step_failure_key(
        ev.execution_id.as_str(),
        &ev.event_type,
        ev.step_name.as_deref(),
    )
}

/// For a Python server's native `step.exit`: the failure claim of the same step. NoETL 4.x
/// reports a failed step's end as `step.exit` with status COMPLETED after its `call.error`;
/// a step whose failure was claimed does not also exit, so the shell drops a `step.exit`
/// while this key exists. The Rust control plane's `step.exit` is its `command.completed`,
/// which a failed step never sends: no lookup (a K/V read per step spared on that path).
pub fn exit_failure_key(ev: &ExecutionEvent) -> Option<String> {
    if ev.event_type != "step.exit" || ev.dialect != Dialect::Python {
        return None;
    }
    step_failure_key(
        ev.execution_id.as_str(),
        "step.failed",
        ev.step_name.as_deref(),
    )
}

fn step_failure_key(execution_id: &str, event_type: &str, step: Option<&str>) -> Option<String> {
    if event_type != "step.failed" {
        return None;
    }
    Some(format!("failed.{execution_id}.{:016x}", fnv1a(step?)))
}

/// The K/V key (bucket `interest`) whose creation claims an execution's terminal frame.
pub fn terminal_key(execution_id: &ExecutionId) -> String {
    format!("terminal.{execution_id}")
}

/// The K/V key (bucket `interest`) of the durable reader's lease: the replica holding it
/// pulls NoETL's events; the others stand by.
pub const READER_LEASE_KEY: &str = "bridge.reader";

/// The K/V key (bucket `interest`) a reader writes when it gives the lease up cleanly (it
/// handed back everything it held): the next reader starts at once instead of waiting for
/// a crashed reader's deliveries to come back first.
pub const READER_HANDOVER_KEY: &str = "bridge.handover";

/// The K/V key (bucket `interest`) of the HTTP fallback's lease on an execution: the
/// replica holding it follows the run.
pub fn lease_key(execution_id: &ExecutionId) -> String {
    format!("lease.{execution_id}")
}

/// The K/V key (bucket `interest`) of the HTTP fallback's cursor on an execution: the key
/// of the last event of its record that was handled.
pub fn cursor_key(execution_id: &ExecutionId) -> String {
    format!("poll.{execution_id}")
}

/// What a key of the `interest` bucket is, for the HTTP fallback's watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterestKey {
    /// An interest record: somebody wants this execution's frames.
    Execution(ExecutionId),
    /// A replica's lease on following it ([`lease_key`]).
    Lease(ExecutionId),
    /// Its terminal frame was claimed ([`terminal_key`]): nothing left to follow.
    Terminal(ExecutionId),
    /// Anything else (other claims, cursors).
    Other,
}

/// Classifies a key of the `interest` bucket (execution ids never contain a dot).
pub fn interest_key_kind(key: &str) -> InterestKey {
    let id = |s: &str| ExecutionId::parse(s).ok();
    match key.split_once('.') {
        None => id(key).map_or(InterestKey::Other, InterestKey::Execution),
        Some(("lease", rest)) => id(rest).map_or(InterestKey::Other, InterestKey::Lease),
        Some(("terminal", rest)) => id(rest).map_or(InterestKey::Other, InterestKey::Terminal),
        Some(_) => InterestKey::Other,
    }
}

/// The key of one event of an execution record: its exact `event_id`, or its position
/// (`pos-<i>`) when it has none (the record only grows at the end).
pub fn record_event_key(event: &Value, position: usize) -> String {
    event
        .get("event_id")
        .and_then(exact_id)
        .unwrap_or_else(|| format!("pos-{position}"))
}

/// A record's events oldest first: sorted by their numeric `event_id` when every event has
/// one (NoETL's ids grow with time; 4.x lists newest first), else in the record's order.
pub fn oldest_first(events: &[Value]) -> Vec<&Value> {
    let ids: Option<Vec<u128>> = events
        .iter()
        .map(|e| e.get("event_id").and_then(exact_id)?.parse().ok())
        .collect();
    let mut v: Vec<(usize, &Value)> = events.iter().enumerate().collect();
    if let Some(ids) = ids {
        v.sort_by_key(|(i, _)| ids[*i]);
    }
    v.into_iter().map(|(_, e)| e).collect()
}

/// Which events of a record (by their [`record_event_key`]s, in the record's order) are new
/// given `cursor`, the key of the last one handled: everything after the cursor's
/// position; when the cursor is not in the record (a record that lists only its latest
/// events), those whose id is above it (NoETL's ids grow with time).
pub fn unseen_events(keys: &[String], cursor: Option<&str>) -> Vec<usize> {
    let Some(cursor) = cursor else {
        return (0..keys.len()).collect();
    };
    if let Some(at) = keys.iter().position(|k| k == cursor) {
        return (at + 1..keys.len()).collect();
    }
    // Ids compare with ids and positions with positions; anything else counts as new.
    let order = |k: &str| -> Option<(bool, u128)> {
        match k.strip_prefix("pos-") {
            Some(p) => p.parse().ok().map(|n| (true, n)),
            None => k.parse().ok().map(|n| (false, n)),
        }
    };
    let Some((positional, c)) = order(cursor) else {
        return (0..keys.len()).collect();
    };
    (0..keys.len())
        .filter(|&i| match order(&keys[i]) {
            Some((p, k)) if p == positional => k > c,
            _ => true,
        })
        .collect()
}

/// The execution a NoETL message on core NATS names (the HTTP fallback's wake-ups): the
/// subject's execution token (Python servers), else the payload's `execution_id`.
pub fn execution_of(subject: &str, payload: &[u8], prefix: &str) -> Option<ExecutionId> {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        execution_id: Option<Value>,
    }
    match classify_subject(subject, prefix).ok()? {
        SubjectShape::Python { execution_id, .. } => ExecutionId::parse(execution_id).ok(),
        SubjectShape::Rust { .. } => {
            let named: Named = serde_json::from_slice(payload).ok()?;
            ExecutionId::try_from(exact_id(named.execution_id.as_ref()?)?).ok()
        }
    }
}

/// The K/V key (bucket `interest`) whose creation claims an execution's one
/// `playbook.started` frame: NoETL 4.x reports a start twice (`playbook.initialized` or
/// `workflow.initialized`, then `execution.started`), and the SPA expects one.
pub fn started_key(execution_id: &ExecutionId) -> String {
    format!("started.{execution_id}")
}

/// True for the frames sent once per execution through [`started_key`].
pub fn is_start(event_type: &str) -> bool {
    event_type == "playbook.started"
}

/// The bus key of the frame of type `event_type` that the event `event_key` produces
/// (one event can produce two: a step's failure and the terminal state). The same event
/// handled twice gives the same keys, so the bus stores its frames once.
pub(super) fn frame_key(event_key: &str, event_type: &str) -> String {
    format!("bridge.{event_key}.{event_type}")
}

#[cfg(test)]
mod tests {
    use super::*;
    const MAX_EXECUTION_ID_LEN: usize = ExecutionId::MAX_LEN;
    use proptest::prelude::*;
    use serde_json::json;

    const PREFIX: &str = "noetl.events.";

    fn eid(s: &str) -> ExecutionId {
        ExecutionId::parse(s).expect("a valid execution id")
    }
    const BIG: &str = "612345678901234567";

    fn parse(subject: &str, payload: Value) -> Result<Parsed, Malformed> {
        let bytes = serde_json::to_vec(&payload).expect("json");
        parse_event(subject, &bytes, PREFIX, &ForwardList::default())
    }

    fn forwarded(subject: &str, payload: Value) -> ExecutionEvent {
        match parse(subject, payload) {
            Ok(Parsed::Forward(ev)) => ev,
            other => panic!("expected a forwarded event, got {other:?}"),
        }
    }

    /// A Rust-shape row: the subject is the raw event type, the payload the whole row.
    fn rust_row(event_type: &str, node: &str, status: &str) -> (String, Value) {
        let payload = format!(
            r#"{{"event_id": 612345678901234999, "event_type": "{event_type}",
                "execution_id": {BIG}, "catalog_id": 480000000000000001,
                "node_name": "{node}", "node_type": "http", "status": "{status}",
                "result": {{"status": "ok"}}, "meta": {{}}, "error": null,
                "event_time": "2026-11-22T10:00:00.123456Z", "worker_id": "w1"}}"#
        );
        (
            format!("noetl.events.{event_type}"),
            serde_json::from_str(&payload).expect("valid json"),
        )
    }

    fn event(event_type: &str, status: Option<&str>) -> ExecutionEvent {
        ExecutionEvent {
            execution_id: ExecutionId::parse(BIG).expect("valid"),
            event_type: event_type.into(),
            step_name: event_type.starts_with("step.").then(|| "s1".to_owned()),
            status: status.map(str::to_owned),
            at: Some("2026-11-22T10:00:00.000000Z".into()),
            event_id: Some("1".into()),
            dialect: Dialect::Rust,
        }
    }

    fn frames(r: Resolution) -> Frames {
        match r {
            Resolution::Frames(f) => *f,
            Resolution::WaitForStatus => panic!("expected frames"),
        }
    }

    #[test]
    fn rust_shape_rows_parse_with_exact_big_ids() {
        // Parse from raw text: a JSON number above 2^53 must keep every digit.
        let raw = format!(
            r#"{{"event_id":612345678901234999,"event_type":"command.completed","execution_id":{BIG},"node_name":"step_1","status":"COMPLETED","event_time":"2026-11-22T10:00:00.5+01:00"}}"#
        );
        let parsed = parse_event(
            "noetl.events.command.completed",
            raw.as_bytes(),
            PREFIX,
            &ForwardList::default(),
        );
        let Ok(Parsed::Forward(ev)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(ev.execution_id, BIG);
        assert_eq!(ev.event_id.as_deref(), Some("612345678901234999"));
        assert_eq!(ev.event_type, "step.exit");
        assert_eq!(ev.step_name.as_deref(), Some("step_1"));
        assert_eq!(ev.status.as_deref(), Some("COMPLETED"));
        assert_eq!(ev.at.as_deref(), Some("2026-11-22T09:00:00.500000Z"));
    }

    #[test]
    fn ids_at_the_edges_of_u64_stay_exact_and_floats_are_refused() {
        for id in [(1u64 << 53) + 1, u64::MAX] {
            let raw = format!(
                r#"{{"event_type":"playbook_started","execution_id":{id},"node_name":"demo/x"}}"#
            );
            let p = parse_event(
                "noetl.events.playbook_started",
                raw.as_bytes(),
                PREFIX,
                &ForwardList::default(),
            );
            assert!(
                matches!(&p, Ok(Parsed::Forward(ev)) if ev.execution_id == id.to_string().as_str()),
                "{p:?}"
            );
        }
        for bad in ["6.1e17", "18446744073709551616", "-5", "1.5"] {
            let raw = format!(r#"{{"event_type":"playbook_started","execution_id":{bad}}}"#);
            let p = parse_event(
                "noetl.events.playbook_started",
                raw.as_bytes(),
                PREFIX,
                &ForwardList::default(),
            );
            assert_eq!(p, Err(Malformed::BadExecutionId), "{bad}");
        }
    }

    #[test]
    fn python_shape_reads_the_payload_and_falls_back_to_the_subject() {
        let subject = format!("noetl.events.default.default.{BIG}.0");
        let ev = forwarded(
            &subject,
            json!({"event_id": 5, "event_type": "step_completed", "execution_id": BIG,
                   "node_name": "step_2", "status": "COMPLETED",
                   "timestamp": "2026-11-22T10:00:01.25",
                   "payload": {"node_type": "http", "result": {"x": 1}}}),
        );
        assert_eq!(ev.execution_id, BIG);
        assert_eq!(ev.event_type, "step.exit");
        assert_eq!(ev.step_name.as_deref(), Some("step_2"));
        assert_eq!(ev.at.as_deref(), Some("2026-11-22T10:00:01.250000Z"));
        // The execution id may be missing from a Python payload: the subject has it.
        let ev = forwarded(
            &subject,
            json!({"event_type": "step_started", "node_name": "a"}),
        );
        assert_eq!(ev.execution_id, BIG);
        assert_eq!(ev.event_type, "step.enter");
        // …but the event type must be in the payload (the subject does not carry one).
        assert_eq!(
            parse(&subject, json!({"execution_id": BIG})),
            Err(Malformed::NoEventType)
        );
    }

    #[test]
    fn subjects_are_classified_into_the_two_shapes() {
        assert_eq!(
            classify_subject("noetl.events.command.completed", PREFIX),
            Ok(SubjectShape::Rust {
                event_type: "command.completed"
            })
        );
        assert_eq!(
            classify_subject("noetl.events.calendar.event.touched", PREFIX),
            Ok(SubjectShape::Rust {
                event_type: "calendar.event.touched"
            })
        );
        assert_eq!(
            classify_subject("noetl.events.t1.o1.42.3", PREFIX),
            Ok(SubjectShape::Python {
                tenant: "t1",
                org: "o1",
                execution_id: "42",
                shard: "3"
            })
        );
        assert_eq!(
            classify_subject("other.events.x", PREFIX),
            Err(Malformed::ForeignSubject)
        );
        assert_eq!(
            classify_subject("noetl.events.", PREFIX),
            Err(Malformed::ForeignSubject)
        );
    }

    #[test]
    fn the_rust_subject_names_the_type_when_the_row_does_not() {
        let ev = forwarded(
            "noetl.events.playbook_cancelled",
            json!({"execution_id": 7, "node_name": "demo/slow"}),
        );
        assert_eq!(ev.event_type, "playbook.cancelled");
        assert_eq!(ev.step_name, None, "playbook events carry no step");
    }

    #[test]
    fn event_names_normalise_per_the_protocol_table() {
        let table = [
            ("playbook_started", "playbook.started"),
            ("playbook_cancelled", "playbook.cancelled"),
            ("playbook.completed", "playbook.completed"),
            ("playbook_completed", "playbook.completed"),
            ("playbook_failed", "playbook.failed"),
            ("command.completed", "step.exit"),
            ("command.failed", "step.failed"),
            ("call.error", "step.failed"),
            ("step_started", "step.enter"),
            ("step_completed", "step.exit"),
            ("step_failed", "step.failed"),
            ("step.enter", "step.enter"),
            ("command.issued", "command.issued"),
            ("call.done", "call.done"),
            ("calendar.event.touched", "calendar.event.touched"),
            ("PLAYBOOK_STARTED", "playbook.started"),
            // NoETL 4.x's spellings.
            ("playbook.initialized", "playbook.started"),
            ("workflow.initialized", "playbook.started"),
            ("execution.started", "playbook.started"),
            ("workflow.completed", "playbook.completed"),
            ("workflow.failed", "playbook.failed"),
            ("execution.completed", "playbook.completed"),
            ("execution.failed", "playbook.failed"),
            ("execution.cancelled", "playbook.cancelled"),
            ("workflow.cancelled", "playbook.cancelled"),
            ("step.exit", "step.exit"),
            ("command.heartbeat", "command.heartbeat"),
        ];
        for (raw, want) in table {
            assert_eq!(normalize_event_type(raw, Dialect::Rust), want, "{raw}");
            if raw != "command.completed" {
                assert_eq!(normalize_event_type(raw, Dialect::Python), want, "{raw}");
            }
        }
        // A Python server emits step.exit itself: its command.completed is not a second one.
        assert_eq!(
            normalize_event_type("command.completed", Dialect::Python),
            "command.completed"
        );
        assert!(!ForwardList::default().allows("command.completed"));
    }

    #[test]
    fn the_dialect_of_a_record_is_read_from_its_spellings() {
        assert_eq!(
            Dialect::of_record_types(["playbook_started", "command.issued", "step.enter"]),
            Dialect::Rust
        );
        for python in [
            "playbook.initialized",
            "workflow.initialized",
            "step.exit",
            "step_completed",
            "EXECUTION_STARTED",
        ] {
            assert_eq!(
                Dialect::of_record_types(["command.issued", python]),
                Dialect::Python,
                "{python}"
            );
        }
        assert_eq!(Dialect::of_record_types([]), Dialect::Rust);
    }

    #[test]
    fn a_v4_envelope_on_a_sharded_subject_is_read_and_its_command_completed_not_doubled() {
        // NoETL 4.x: sorted compact keys, tenant and organisation sanitised into the
        // subject, shard = execution id % shard count, ids as integers above 2^53.
        let subject = format!("noetl.events.acme-EU-west.org-1.{BIG}.3");
        let envelope = |event_type: &str, node: &str, status: &str| {
            json!({"created_at": "2026-05-18 20:00:00.5+00:00", "event_id": 612_345_678_901_234_567_u64,
                   "event_type": event_type, "execution_id": BIG.parse::<u64>().unwrap(),
                   "node_name": node, "organization_id": "org/1", "status": status,
                   "tenant_id": "acme/EU west"})
        };
        let ev = forwarded(&subject, envelope("step.exit", "fetch", "COMPLETED"));
        assert_eq!(ev.execution_id, BIG);
        assert_eq!(ev.event_type, "step.exit");
        assert_eq!(ev.step_name.as_deref(), Some("fetch"));
        assert_eq!(ev.event_id.as_deref(), Some("612345678901234567"));
        assert_eq!(ev.at.as_deref(), Some("2026-05-18T20:00:00.500000Z"));
        assert_eq!(
            parse(
                &subject,
                envelope("command.completed", "fetch", "COMPLETED")
            ),
            Ok(Parsed::Ignored {
                event_type: "command.completed".into()
            }),
            "the native step.exit is the step's end"
        );
        for (raw, want) in [
            ("workflow.initialized", "playbook.started"),
            ("playbook.initialized", "playbook.started"),
            ("workflow.failed", "playbook.failed"),
            ("execution.cancelled", "playbook.cancelled"),
        ] {
            let ev = forwarded(&subject, envelope(raw, "demo/steps", "X"));
            assert_eq!(ev.event_type, want, "{raw}");
            assert_eq!(ev.step_name, None, "{raw}: playbook events carry no step");
        }
        // The Rust control plane's command.completed is still the step's end.
        let (subject, row) = rust_row("command.completed", "fetch", "COMPLETED");
        assert!(
            matches!(parse(&subject, row), Ok(Parsed::Forward(ev)) if ev.event_type == "step.exit")
        );
    }

    #[test]
    fn the_fallback_reads_its_keys_and_finds_new_events_after_the_cursor() {
        let id = ExecutionId::parse(BIG).unwrap();
        assert_eq!(interest_key_kind(BIG), InterestKey::Execution(id.clone()));
        assert_eq!(
            interest_key_kind(&lease_key(&id)),
            InterestKey::Lease(id.clone())
        );
        assert_eq!(
            interest_key_kind(&terminal_key(&id)),
            InterestKey::Terminal(id.clone())
        );
        for other in [
            cursor_key(&id),
            started_key(&id),
            format!("failed.{BIG}.ab"),
            "lease.a.b".into(),
        ] {
            assert_eq!(interest_key_kind(&other), InterestKey::Other, "{other}");
        }

        let keys: Vec<String> = [
            json!({"event_id": 10_u64}),
            json!({"event_id": "11"}),
            json!({"event_type": "x"}),
            json!({"event_id": 612_345_678_901_234_567_u64}),
        ]
        .iter()
        .enumerate()
        .map(|(i, e)| record_event_key(e, i))
        .collect();
        assert_eq!(keys, ["10", "11", "pos-2", "612345678901234567"]);
        assert_eq!(unseen_events(&keys, None), [0, 1, 2, 3]);
        let newest_first = [
            json!({"event_id": 30}),
            json!({"event_id": "20"}),
            json!({"event_id": 10}),
        ];
        let ids: Vec<String> = oldest_first(&newest_first)
            .iter()
            .map(|e| e["event_id"].to_string())
            .collect();
        assert_eq!(ids, ["10", "\"20\"", "30"]);
        let unnumbered = [
            json!({"event_id": 3}),
            json!({"x": 1}),
            json!({"event_id": 1}),
        ];
        assert_eq!(
            oldest_first(&unnumbered)[0],
            &unnumbered[0],
            "kept as listed"
        );
        assert_eq!(unseen_events(&keys, Some("11")), [2, 3]);
        assert_eq!(
            unseen_events(&keys, Some("612345678901234567")),
            Vec::<usize>::new()
        );
        // A cursor no longer in the record: by id.
        assert_eq!(unseen_events(&keys, Some("10000")), [2, 3]);
        assert_eq!(unseen_events(&keys, Some("not-a-number")), [0, 1, 2, 3]);
    }

    #[test]
    fn a_wake_up_names_its_execution_by_subject_or_payload() {
        let p = PREFIX;
        assert_eq!(
            execution_of(&format!("noetl.events.t.o.{BIG}.0"), b"garbage", p)
                .as_ref()
                .map(ExecutionId::as_str),
            Some(BIG)
        );
        let payload = format!(r#"{{"event_type":"command.issued","execution_id":{BIG}}}"#);
        assert_eq!(
            execution_of("noetl.events.command.issued", payload.as_bytes(), p)
                .as_ref()
                .map(ExecutionId::as_str),
            Some(BIG)
        );
        assert_eq!(execution_of("noetl.events.command.issued", b"{}", p), None);
        assert_eq!(execution_of("other.x", payload.as_bytes(), p), None);
    }

    #[test]
    fn only_a_python_servers_step_exit_is_checked_against_its_steps_failure() {
        let mut ev = event("step.exit", Some("COMPLETED"));
        assert_eq!(
            exit_failure_key(&ev),
            None,
            "Rust: command.completed never follows a failure"
        );
        ev.dialect = Dialect::Python;
        let failed = event("step.failed", Some("FAILED"));
        assert_eq!(exit_failure_key(&ev), event_failure_key(&failed));
        assert!(exit_failure_key(&ev).is_some());
        assert_eq!(exit_failure_key(&event("step.enter", None)), None);
    }

    #[test]
    fn a_record_event_is_read_like_a_payload() {
        let id = ExecutionId::parse(BIG).unwrap();
        let fwd = ForwardList::default();
        let ev = json!({"event_id": 612_345_678_901_234_567_u64, "event_type": "command.completed",
                        "node_name": "s1", "status": "COMPLETED",
                        "created_at": "2026-11-22T10:00:00Z", "result": {"x": 1}, "error": null});
        match parse_record_event(&ev, &id, Dialect::Rust, &fwd) {
            Ok(Parsed::Forward(e)) => {
                assert_eq!(e.execution_id, BIG);
                assert_eq!(e.event_type, "step.exit");
                assert_eq!(e.event_id.as_deref(), Some("612345678901234567"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_record_event(&ev, &id, Dialect::Python, &fwd),
            Ok(Parsed::Ignored { .. })
        ));
        assert_eq!(
            parse_record_event(&json!([1]), &id, Dialect::Rust, &fwd),
            Err(Malformed::NotJson("not a JSON object".into()))
        );
        assert_eq!(
            parse_record_event(&json!({"node_name": "x"}), &id, Dialect::Rust, &fwd),
            Err(Malformed::NoEventType)
        );
    }

    #[test]
    fn only_allow_listed_types_are_forwarded() {
        let fwd = ForwardList::default();
        for t in DEFAULT_FORWARD {
            assert!(fwd.allows(t), "{t}");
        }
        for t in [
            "command.issued",
            "command.claimed",
            "command.started",
            "call.done",
            "step.skipped",
        ] {
            assert!(!fwd.allows(&normalize_event_type(t, Dialect::Rust)), "{t}");
        }
        let (subject, row) = rust_row("command.issued", "step_1", "PENDING");
        assert_eq!(
            parse(&subject, row),
            Ok(Parsed::Ignored {
                event_type: "command.issued".into()
            })
        );
        // Configured names are normalised too, and the list is configurable.
        let custom = ForwardList::new(["playbook_started", " step.exit "]);
        assert!(custom.allows("playbook.started") && custom.allows("step.exit"));
        assert!(!custom.allows("step.enter"));
    }

    #[test]
    fn ignored_types_need_no_usable_execution_id() {
        assert_eq!(
            parse("noetl.events.call.done", json!({"execution_id": 1.5})),
            Ok(Parsed::Ignored {
                event_type: "call.done".into()
            })
        );
    }

    #[test]
    fn malformed_payloads_are_reported_not_panicked_on() {
        let cases: Vec<(&str, &[u8], Malformed)> = vec![
            (
                "noetl.events.x",
                b"not json",
                Malformed::NotJson(String::new()),
            ),
            (
                "noetl.events.x",
                b"[1,2]",
                Malformed::NotJson(String::new()),
            ),
            ("noetl.events.x", b"", Malformed::NotJson(String::new())),
            (
                "noetl.events.step.enter",
                br#"{"node_name":"a"}"#,
                Malformed::NoExecutionId,
            ),
            (
                "noetl.events.step.enter",
                br#"{"execution_id":"a b"}"#,
                Malformed::BadExecutionId,
            ),
            (
                "noetl.events.step.enter",
                br#"{"execution_id":{"n":1}}"#,
                Malformed::BadExecutionId,
            ),
            (
                "noetl.events.t.o.42.0",
                br#"{"event_type":""}"#,
                Malformed::NoEventType,
            ),
            (
                "noetl.events.x",
                br#"{"event_type":"a b"}"#,
                Malformed::BadEventType,
            ),
        ];
        for (subject, payload, want) in cases {
            let got = parse_event(subject, payload, PREFIX, &ForwardList::default());
            match (&got, &want) {
                (Err(Malformed::NotJson(_)), Malformed::NotJson(_)) => {}
                _ => assert_eq!(got, Err(want), "{subject} {payload:?}"),
            }
        }
    }

    #[test]
    fn a_missing_or_unreadable_time_is_left_to_the_shell() {
        let ev = forwarded(
            "noetl.events.playbook_started",
            json!({"execution_id": 1, "event_time": "yesterday"}),
        );
        assert_eq!(ev.at, None);
        let f = frames(resolve(&ev, StatusCheck::NotNeeded, "2026-01-01T00:00:00Z"));
        assert_eq!(
            f.progress.map(|p| p.at).as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
    }

    #[test]
    fn plain_events_become_one_progress_frame() {
        for t in [
            "playbook.started",
            "step.enter",
            "step.exit",
            "calendar.event.touched",
        ] {
            let f = frames(resolve(
                &event(t, Some("RUNNING")),
                StatusCheck::NotNeeded,
                "now",
            ));
            let p = f.progress.expect("a progress frame");
            assert_eq!(p.event_type, t);
            assert!(!p.terminal);
            assert_eq!(p.execution_id, BIG);
            assert!(f.terminal.is_none(), "{t}");
        }
    }

    #[test]
    fn a_failed_step_of_a_failed_run_adds_the_missing_playbook_failed() {
        let f = frames(resolve(
            &event("step.failed", Some("FAILED")),
            StatusCheck::Known(RunStatus::Failed),
            "now",
        ));
        let p = f.progress.expect("the step.failed frame");
        assert_eq!((p.event_type.as_str(), p.terminal), ("step.failed", false));
        assert_eq!(p.step_name.as_deref(), Some("s1"));
        let t = f.terminal.expect("a terminal frame");
        assert_eq!(t.event_type, "playbook.failed");
        assert_eq!(t.status.as_deref(), Some("FAILED"));
        assert!(t.terminal);
        assert_eq!(t.step_name, None);
    }

    #[test]
    fn a_failed_step_of_a_running_run_is_only_a_step_frame() {
        for check in [StatusCheck::Known(RunStatus::Running), StatusCheck::GaveUp] {
            let f = frames(resolve(&event("step.failed", Some("FAILED")), check, "now"));
            assert_eq!(
                f.progress.map(|p| p.event_type).as_deref(),
                Some("step.failed")
            );
            assert!(f.terminal.is_none(), "{check:?}");
        }
    }

    #[test]
    fn a_lying_playbook_completed_becomes_playbook_failed() {
        let f = frames(resolve(
            &event("playbook.completed", Some("COMPLETED")),
            StatusCheck::Known(RunStatus::Failed),
            "now",
        ));
        assert!(f.progress.is_none());
        let t = f.terminal.expect("terminal");
        assert_eq!(t.event_type, "playbook.failed");
        assert_eq!(t.status.as_deref(), Some("FAILED"));
        // An honest one stays completed.
        let f = frames(resolve(
            &event("playbook.completed", Some("COMPLETED")),
            StatusCheck::Known(RunStatus::Completed),
            "now",
        ));
        let t = f.terminal.expect("terminal");
        assert_eq!(
            (t.event_type.as_str(), t.status.as_deref()),
            ("playbook.completed", Some("COMPLETED"))
        );
    }

    #[test]
    fn status_dependent_events_wait_while_the_status_is_unknown_or_not_final() {
        for (t, check) in [
            ("playbook.completed", StatusCheck::Known(RunStatus::Running)),
            ("playbook.completed", StatusCheck::Unavailable),
            ("step.failed", StatusCheck::Unavailable),
        ] {
            assert_eq!(
                resolve(&event(t, None), check, "now"),
                Resolution::WaitForStatus,
                "{t}"
            );
        }
        // After giving up, the event's own claim is used.
        let f = frames(resolve(
            &event("playbook.completed", None),
            StatusCheck::GaveUp,
            "now",
        ));
        let t = f.terminal.expect("terminal");
        assert_eq!(
            (t.event_type.as_str(), t.status.as_deref()),
            ("playbook.completed", Some("COMPLETED"))
        );
    }

    #[test]
    fn failed_and_cancelled_events_are_terminal_as_they_stand() {
        for (t, status) in [
            ("playbook.failed", "FAILED"),
            ("playbook.cancelled", "CANCELLED"),
        ] {
            let f = frames(resolve(&event(t, None), StatusCheck::NotNeeded, "now"));
            assert!(f.progress.is_none());
            let term = f.terminal.expect("terminal");
            assert_eq!(term.event_type, t);
            assert_eq!(term.status.as_deref(), Some(status));
            assert!(term.terminal);
        }
        assert!(needs_status("step.failed") && needs_status("playbook.completed"));
        assert!(!needs_status("playbook.failed") && !needs_status("step.exit"));
    }

    #[test]
    fn retries_stop_at_the_configured_ages() {
        let limits = RetryLimits {
            max_interest_wait: Duration::from_secs(10),
            max_confirm_wait: Duration::from_secs(30),
        };
        let s = Duration::from_secs;
        let v = |r, age| retry_verdict(r, age, &limits);
        assert_eq!(v(RetryReason::NoInterest, s(9)), RetryVerdict::Retry);
        assert_eq!(v(RetryReason::NoInterest, s(10)), RetryVerdict::Drop);
        assert_eq!(v(RetryReason::StatusNotFinal, s(29)), RetryVerdict::Retry);
        assert_eq!(
            v(RetryReason::StatusNotFinal, s(30)),
            RetryVerdict::UseEventClaim
        );
        assert_eq!(
            v(RetryReason::NoetlUnavailable, s(31)),
            RetryVerdict::UseEventClaim
        );
        // The stream (or the record) still holds the event: infrastructure failures never drop it.
        assert_eq!(v(RetryReason::BusUnavailable, s(3600)), RetryVerdict::Retry);
        assert_eq!(
            v(RetryReason::StoreUnavailable, s(3600)),
            RetryVerdict::Retry
        );
        assert_eq!(v(RetryReason::WaitingBehind, s(3600)), RetryVerdict::Retry);
        let base = Duration::from_millis(500);
        assert_eq!(retry_delay(RetryReason::NoInterest, base), base);
        assert_eq!(retry_delay(RetryReason::WaitingBehind, base), base);
        assert_eq!(retry_delay(RetryReason::BusUnavailable, base), base * 4);
    }

    #[test]
    fn the_order_guard_parks_later_events_behind_earlier_ones() {
        let t0 = Instant::now();
        let due = t0 + Duration::from_secs(2);
        let mut g = OrderGuard::new();
        assert!(!g.must_wait(&eid("x"), 10, t0));
        g.park(&eid("x"), 10, due);
        assert!(g.must_wait(&eid("x"), 11, t0), "11 waits behind 10");
        assert!(!g.must_wait(&eid("x"), 10, t0), "10 itself does not wait");
        assert!(
            !g.must_wait(&eid("y"), 11, t0),
            "other executions are unaffected"
        );
        g.park(&eid("x"), 11, due);
        g.release(&eid("x"), 10);
        assert!(!g.must_wait(&eid("x"), 11, t0), "11 goes once 10 is done");
        g.release(&eid("x"), 11);
        assert!(g.is_empty());
        // An entry whose redelivery never came back here stops blocking once overdue.
        g.park(&eid("x"), 20, due);
        assert!(g.must_wait(&eid("x"), 21, t0 + Duration::from_secs(1)));
        assert!(!g.must_wait(&eid("x"), 21, due + Duration::from_millis(1)));
        assert_eq!(g.len(), 0);
    }

    #[test]
    fn the_order_guard_forgets_overdue_executions_it_no_longer_sees() {
        let t0 = Instant::now();
        let mut g = OrderGuard::new();
        assert!(!g.must_wait(&eid("a"), 1, t0));
        for i in 0..100u64 {
            g.park(&eid(&format!("e{i}")), i, t0 + Duration::from_secs(1));
        }
        assert_eq!(g.len(), 100);
        assert!(!g.must_wait(&eid("a"), 1, t0 + SWEEP_EVERY + Duration::from_secs(1)));
        assert!(g.is_empty());
    }

    #[test]
    fn an_execution_always_maps_to_one_worker_and_executions_spread_over_all() {
        assert_eq!(worker_for(&eid(BIG), 32), worker_for(&eid(BIG), 32));
        assert_eq!(worker_for(&eid("anything"), 1), 0);
        assert_eq!(worker_for(&eid("anything"), 0), 0, "no division by zero");
        // Consecutive snowflake-like ids (what NoETL hands out) spread evenly.
        for workers in [7usize, 32, 64] {
            let mut counts = vec![0usize; workers];
            let n = 20_000 * workers;
            for i in 0..n as u64 {
                let w = worker_for(&eid(&(612_345_678_901_234_567 + i).to_string()), workers);
                assert!(w < workers);
                counts[w] += 1;
            }
            let mean = n / workers;
            for c in &counts {
                assert!(
                    c.abs_diff(mean) < mean / 10,
                    "{workers} workers: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn after_the_terminal_claim_only_other_terminal_and_failure_events_are_skipped() {
        let other = Some(&b"ev-1"[..]);
        assert!(skipped_after_terminal(other, "ev-2", "step.failed"));
        assert!(skipped_after_terminal(other, "ev-2", "playbook.completed"));
        assert!(
            !skipped_after_terminal(other, "ev-2", "step.exit"),
            "late, not lost"
        );
        assert!(
            !skipped_after_terminal(other, "ev-1", "playbook.failed"),
            "its own redelivery"
        );
        assert!(
            !skipped_after_terminal(None, "ev-2", "playbook.failed"),
            "unclaimed"
        );
    }

    #[test]
    fn a_claim_is_owned_by_the_event_that_stored_it() {
        assert!(owns_claim(Some(b"ev-1"), "ev-1"));
        assert!(!owns_claim(Some(b"ev-1"), "ev-2"));
        assert!(!owns_claim(None, "ev-1"));
    }

    #[test]
    fn noetl_answers_are_classified_for_resolve() {
        let reply = json!({ "status": "FAILED" });
        assert_eq!(
            status_check(Ok(&reply)),
            StatusCheck::Known(RunStatus::Failed)
        );
        let not_found = NoetlError::Status {
            status: 404,
            message: String::new(),
        };
        assert_eq!(status_check(Err(&not_found)), StatusCheck::GaveUp);
        let unreadable = NoetlError::BadResponse("not json".into());
        assert_eq!(status_check(Err(&unreadable)), StatusCheck::GaveUp);
        let down = NoetlError::Status {
            status: 503,
            message: String::new(),
        };
        assert_eq!(status_check(Err(&down)), StatusCheck::Unavailable);
        assert_eq!(
            wait_reason(StatusCheck::Unavailable),
            RetryReason::NoetlUnavailable
        );
        assert_eq!(
            wait_reason(StatusCheck::Known(RunStatus::Running)),
            RetryReason::StatusNotFinal
        );
    }

    #[test]
    fn parked_events_go_overdue_after_two_retries_and_given_back_ones_come_back_last() {
        let base = Duration::from_millis(500);
        assert_eq!(
            overdue_after(RetryReason::NoInterest, base),
            Duration::from_millis(1500)
        );
        assert_eq!(
            overdue_after(RetryReason::StoreUnavailable, base),
            Duration::from_millis(4500)
        );
        let every = [
            RetryReason::NoInterest,
            RetryReason::StatusNotFinal,
            RetryReason::NoetlUnavailable,
            RetryReason::StoreUnavailable,
            RetryReason::BusUnavailable,
            RetryReason::WaitingBehind,
        ];
        for reason in every {
            assert!(
                give_back_delay(base) > retry_delay(reason, base),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn only_the_winner_of_the_terminal_claim_publishes_and_its_step_failed_comes_first() {
        let f = frames(resolve(
            &event("step.failed", Some("FAILED")),
            StatusCheck::Known(RunStatus::Failed),
            "now",
        ));
        let (step, terminal) = (f.progress.as_ref().unwrap(), f.terminal.as_ref().unwrap());
        let won = publish_plan(&f, Some(true), Some(true));
        assert_eq!(won.frames, [step, terminal]);
        assert!(!won.skipped_any);
        let lost = publish_plan(&f, Some(false), None);
        assert!(lost.frames.is_empty() && lost.skipped_any);
        // The failure went out while the run still looked RUNNING: only the terminal.
        let late = publish_plan(&f, Some(true), Some(false));
        assert_eq!(late.frames, [terminal]);
        assert!(late.skipped_any);
    }

    #[test]
    fn a_failure_without_a_terminal_is_sent_once_and_plain_frames_always() {
        let running = frames(resolve(
            &event("step.failed", Some("FAILED")),
            StatusCheck::Known(RunStatus::Running),
            "now",
        ));
        let step = running.progress.as_ref().unwrap();
        assert_eq!(publish_plan(&running, None, Some(true)).frames, [step]);
        assert!(publish_plan(&running, None, Some(false)).frames.is_empty());
        let exit = frames(resolve(
            &event("step.exit", None),
            StatusCheck::NotNeeded,
            "now",
        ));
        assert_eq!(
            publish_plan(&exit, None, None).frames,
            [exit.progress.as_ref().unwrap()]
        );
        let completed = frames(resolve(
            &event("playbook.completed", None),
            StatusCheck::Known(RunStatus::Completed),
            "now",
        ));
        assert_eq!(
            publish_plan(&completed, Some(true), None).frames,
            [completed.terminal.as_ref().unwrap()]
        );
    }

    #[test]
    fn only_a_named_failed_step_has_a_failure_key() {
        let failed = frames(resolve(
            &event("step.failed", Some("FAILED")),
            StatusCheck::Known(RunStatus::Running),
            "now",
        ));
        let key = failure_key(&failed).expect("a named failed step");
        assert!(key.starts_with(&format!("failed.{BIG}.")), "{key}");
        let mut unnamed = event("step.failed", Some("FAILED"));
        unnamed.step_name = None;
        let unnamed = frames(resolve(
            &unnamed,
            StatusCheck::Known(RunStatus::Running),
            "now",
        ));
        assert_eq!(failure_key(&unnamed), None);
        let exit = frames(resolve(
            &event("step.exit", None),
            StatusCheck::NotNeeded,
            "now",
        ));
        assert_eq!(failure_key(&exit), None);
        let lying = frames(resolve(
            &event("playbook.completed", None),
            StatusCheck::Known(RunStatus::Failed),
            "now",
        ));
        assert_eq!(failure_key(&lying), None);
    }

    #[test]
    fn an_event_names_the_same_failure_claim_its_frames_take() {
        let failed = event("step.failed", Some("FAILED"));
        for check in [
            StatusCheck::Known(RunStatus::Running),
            StatusCheck::Known(RunStatus::Failed),
            StatusCheck::GaveUp,
        ] {
            let f = frames(resolve(&failed, check, "now"));
            assert_eq!(event_failure_key(&failed), failure_key(&f), "{check:?}");
            assert!(event_failure_key(&failed).is_some());
        }
        assert_eq!(event_failure_key(&event("playbook.failed", None)), None);
        assert_eq!(event_failure_key(&event("step.exit", None)), None);
    }

    #[test]
    fn the_terminal_key_is_a_valid_store_key_for_every_usable_id() {
        let longest = "9".repeat(MAX_EXECUTION_ID_LEN);
        assert!(crate::store::is_valid_key(&terminal_key(&eid(&longest))));
        assert!(crate::store::is_valid_key(&terminal_key(&eid(BIG))));
    }

    #[test]
    fn the_failure_key_is_a_valid_store_key_for_every_usable_id_and_any_step_name() {
        let mut ev = event("step.failed", Some("FAILED"));
        for (id, step) in [
            ("9".repeat(MAX_EXECUTION_ID_LEN), "s1".to_owned()),
            (
                BIG.to_owned(),
                "a step.with spaces/and ünïcode*>".to_owned(),
            ),
            (BIG.to_owned(), "x".repeat(10_000)),
        ] {
            ev.execution_id = ExecutionId::try_from(id).expect("valid");
            ev.step_name = Some(step);
            let f = frames(resolve(&ev, StatusCheck::Known(RunStatus::Running), "now"));
            let key = failure_key(&f).expect("a named failed step");
            assert!(crate::store::is_valid_key(&key), "{key}");
        }
        // Two steps of one run are two claims.
        ev.execution_id = ExecutionId::parse(BIG).expect("valid");
        let key_of = |step: &str| {
            let mut e = ev.clone();
            e.step_name = Some(step.into());
            failure_key(&frames(resolve(
                &e,
                StatusCheck::Known(RunStatus::Running),
                "now",
            )))
        };
        assert_ne!(key_of("a"), key_of("b"));
        assert_eq!(key_of("a"), key_of("a"));
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent_and_leaves_no_underscore(raw in "[A-Za-z_.]{0,40}") {
            for dialect in [Dialect::Rust, Dialect::Python] {
                let once = normalize_event_type(&raw, dialect);
                prop_assert_eq!(normalize_event_type(&once, dialect), once.clone());
                prop_assert!(!once.contains('_'));
            }
            let once = normalize_event_type(&raw, Dialect::Rust);
            prop_assert!(!once.contains('_'));
        }

        #[test]
        fn any_u64_execution_id_round_trips_exactly(id in any::<u64>(), step in "[a-z_0-9]{1,20}") {
            let raw = format!(r#"{{"event_type":"command.completed","execution_id":{id},"node_name":"{step}"}}"#);
            let p = parse_event("noetl.events.command.completed", raw.as_bytes(), PREFIX, &ForwardList::default());
            match p {
                Ok(Parsed::Forward(ev)) => {
                    prop_assert_eq!(ev.execution_id.as_str(), id.to_string());
                    prop_assert_eq!(ev.step_name, Some(step));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn python_subjects_carry_any_u64_id(id in any::<u64>(), tenant in "[a-z]{1,8}") {
            let subject = format!("noetl.events.{tenant}.org.{id}.0");
            let p = parse_event(&subject, br#"{"event_type":"playbook_completed"}"#, PREFIX, &ForwardList::default());
            match p {
                Ok(Parsed::Forward(ev)) => prop_assert_eq!(ev.execution_id.as_str(), id.to_string()),
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_parser(payload in proptest::collection::vec(any::<u8>(), 0..256),
                                                   tail in "[a-z0-9._]{0,30}") {
            let _ = parse_event(&format!("noetl.events.{tail}"), &payload, PREFIX, &ForwardList::default());
        }

        #[test]
        fn parsed_ids_are_always_usable_keys(id in "\\PC{0,40}") {
            let raw = serde_json::to_vec(&json!({"event_type": "step.enter", "execution_id": id}))
                .expect("json");
            if let Ok(Parsed::Forward(ev)) = parse_event("noetl.events.step.enter", &raw, PREFIX, &ForwardList::default()) {
                prop_assert!(crate::store::is_valid_key(ev.execution_id.as_str()));
                prop_assert!(crate::store::is_valid_key(&terminal_key(&ev.execution_id)));
            }
        }
    }
}

//! SSE frames and callback bodies: the realtime wire protocol (PROTOCOL.md §3–§4).
//!
//! A frame on `/events` is `id: <client_id>.<n>` ([`EventId`]), `event: <name>` and one
//! `data:` line holding a JSON-RPC 2.0 object (compat with existing SPA clients). The JSON
//! is produced once per frame by the functions here and shared as bytes between every
//! writer; only the short `id:`/`event:` prefix is written per connection ([`sse_frame`]).
//!
//! Ids: `execution_id` is always a JSON string (NoETL ids exceed 2^53); callback bodies
//! accept a number or a string and keep its exact digits.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::ClientId;
use crate::session::string_or_number;

/// The `retry:` (ms) the gateway sends: how long a browser's EventSource waits before it
/// reconnects by itself — after a stream ends, and after a refusal the edge or the origin
/// answered with [`unavailable_stream`].
pub const RETRY_MS: u32 = 2000;

/// SSE event names.
pub mod event {
    /// The init frame (once per connection, first).
    pub const MESSAGE: &str = "message";
    /// Heartbeat.
    pub const PING: &str = "ping";
    /// Execution lifecycle (from the NATS bridge).
    pub const STATE: &str = "playbook/state";
    /// A playbook's result (from an async callback).
    pub const RESULT: &str = "playbook/result";
    /// A playbook's progress report.
    pub const PROGRESS: &str = "playbook/progress";
    /// The requested `Last-Event-ID` is older than retention: re-read state.
    pub const RESET: &str = "stream/reset";
    /// This connection fell too far behind and is closed; reconnect with `Last-Event-ID`.
    pub const EVICTED: &str = "stream/evicted";
    /// The stream's session was revoked (logout) or expired: the last frame, then close.
    pub const SESSION_ENDED: &str = "session/ended";
    /// The stream could not be opened for a moment (the origin restarting, NATS away):
    /// the only frame of a 200 answer that ends at once, so a browser's EventSource
    /// retries after `retry:` instead of giving up as it does on an error status.
    pub const UNAVAILABLE: &str = "stream/unavailable";
    /// A service's event for the client (`params: {service, event, data}`).
    pub const SERVICE_EVENT: &str = "service/event";
    /// A human-in-the-loop question (`params`: [`super::QuestionParams`]).
    pub const QUESTION: &str = "question";
    /// A question was answered, here or in another tab (`params: {question_id, answer}`).
    pub const QUESTION_ANSWERED: &str = "question/answered";
    /// A question expired unanswered (`params: {question_id}`).
    pub const QUESTION_EXPIRED: &str = "question/expired";
}

/// The SSE `id:` of a frame on `/events`, and what a reconnect brings back as
/// `Last-Event-ID`: `<client_id>.<n>` — the client the stream belongs to and the bus id of
/// the last frame it carried (`0`: none of the client's frames yet; the init frame of a
/// stream says where it starts).
///
/// The client's name is in every id so that a reconnect repeating only the URL and this
/// header — what a browser's own EventSource does — resumes the same client instead of
/// starting a new one that silently misses frames. The name is a claim, not a credential:
/// the origin resumes only a client whose recorded owner is the caller (PROTOCOL §3).
/// `.` is not in the client-id alphabet, so the split is unambiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    /// The client whose stream the frame was on.
    pub client: ClientId,
    /// The last frame's bus id; 0 when the stream had carried none of the client's frames.
    pub seq: u64,
}

/// What a `Last-Event-ID` says, once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastEventId {
    /// `<client_id>.<n>`: the gateway's own id.
    Client(EventId),
    /// A bare number: an id from a gateway before client-named ids (a page that kept it
    /// across the upgrade); it can only be resumed together with `?client_id=`.
    Bare(u64),
}

impl EventId {
    /// The longest id [`EventId::parse`] reads: a client id, the dot, a `u64`.
    pub const MAX_LEN: usize = ClientId::MAX_LEN + 1 + 20;

    /// The id as it goes on the `id:` line.
    pub fn format(client: &ClientId, seq: u64) -> String {
        format!("{client}.{seq}")
    }

    /// Reads a `Last-Event-ID` (header or `?last_event_id=`, surrounding spaces ignored).
    /// `None` for anything else: junk is no position.
    pub fn parse(raw: &str) -> Option<LastEventId> {
        let raw = raw.trim();
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return None;
        }
        match raw.split_once('.') {
            None => raw.parse().ok().map(LastEventId::Bare),
            Some((client, seq)) => {
                // Digits only: `u64::from_str` would also take a leading `+`.
                if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let seq = seq.parse().ok()?;
                let client = ClientId::parse(client).ok()?;
                Some(LastEventId::Client(EventId { client, seq }))
            }
        }
    }
}

/// A JSON-RPC 2.0 notification: `{"jsonrpc":"2.0","method":…,"params":…}`.
pub fn notification<P: Serialize>(method: &str, params: &P) -> Vec<u8> {
    #[derive(Serialize)]
    struct N<'a, P> {
        jsonrpc: &'static str,
        method: &'a str,
        params: &'a P,
    }
    serde_json::to_vec(&N {
        jsonrpc: "2.0",
        method,
        params,
    })
    .expect("frame params are plain data and always serialise")
}

/// One request the client is still waiting for, listed in the init frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRequest {
    /// The gateway's request id.
    pub request_id: String,
    /// NoETL's execution id (string).
    pub execution_id: String,
    /// The playbook path.
    pub playbook_path: String,
}

/// A human-in-the-loop question as the client sees it: the `question` frame's params and
/// an entry of the init frame's `pendingQuestions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuestionParams {
    /// The question's id (`q-` and 32 hex digits).
    pub question_id: String,
    /// What the service asks.
    pub prompt: String,
    /// The answers it accepts; empty: any text.
    pub options: Vec<String>,
    /// When it expires unanswered (RFC 3339, UTC).
    pub expires_at: String,
    /// The asking service.
    pub service: String,
    /// The client it was asked of; `None` for a question to all of a user's clients.
    pub client_id: Option<String>,
}

/// The init frame's data: a JSON-RPC response with id 1 (compat).
pub fn init_message(
    client_id: &str,
    server_version: &str,
    pending: &[PendingRequest],
    questions: &[QuestionParams],
) -> Vec<u8> {
    let v = serde_json::json!({
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "clientId": client_id,
            "protocolVersion": "2024-11-05",
            "serverInfo": {"name": "noetl-edge-gateway", "version": server_version},
            "capabilities": {"playbooks": true, "callbacks": true, "playbookState": true, "replay": true, "questions": true},
            "pendingRequests": pending,
            "pendingQuestions": questions,
        }
    });
    serde_json::to_vec(&v).expect("a JSON value always serialises")
}

/// `playbook/state` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaybookState {
    /// Execution id as a string.
    pub execution_id: String,
    /// Normalised event name, e.g. `step.exit`, `playbook.completed`.
    pub event_type: String,
    /// The step (NoETL `node_name`), when the event is about one.
    pub step_name: Option<String>,
    /// NoETL's status for the event, when it has one.
    pub status: Option<String>,
    /// When NoETL recorded the event (RFC 3339).
    pub at: String,
    /// True for the one final frame of an execution (completed / failed / cancelled).
    pub terminal: bool,
}

/// The error of a failed result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResultError {
    /// A machine code (NoETL's, or `PLAYBOOK_FAILED`).
    #[serde(default)]
    pub code: Option<String>,
    /// What went wrong.
    #[serde(default)]
    pub message: Option<String>,
    /// Extra detail from the playbook.
    #[serde(default)]
    pub data: Option<Value>,
}

/// `playbook/result` params (camelCase: compat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaybookResult {
    /// The gateway's request id.
    pub request_id: String,
    /// The execution id, when known.
    pub execution_id: Option<String>,
    /// `COMPLETED`, `FAILED`, or what the playbook reported.
    pub status: String,
    /// The result data (absent on failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// The error (only on failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ResultError>,
}

/// `playbook/progress` params (camelCase: compat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaybookProgress {
    /// The gateway's request id.
    pub request_id: String,
    /// The execution id, when known.
    pub execution_id: Option<String>,
    /// The step reporting.
    pub step: Option<String>,
    /// A human-readable message.
    pub message: Option<String>,
    /// 0.0..=1.0, when the playbook reports one.
    pub progress: Option<f64>,
}

/// The body NoETL's playbooks POST to `/api/internal/callback{,/async}` (PROTOCOL §4).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallbackBody {
    /// The request this answers.
    pub request_id: String,
    /// The execution, as a number or a string.
    #[serde(default, deserialize_with = "opt_string_or_number")]
    pub execution_id: Option<String>,
    /// The step that sent it.
    #[serde(default)]
    pub step: Option<String>,
    /// `success`, `COMPLETED`, `FAILED`, `error`, …
    pub status: String,
    /// The result data.
    #[serde(default)]
    pub data: Option<Value>,
    /// The error, on failure.
    #[serde(default)]
    pub error: Option<ResultError>,
}

impl CallbackBody {
    /// Failure iff `status` is `FAILED`/`failed`/`error` in any case, or `error` is present.
    pub fn is_failure(&self) -> bool {
        self.error.is_some()
            || self.status.eq_ignore_ascii_case("failed")
            || self.status.eq_ignore_ascii_case("error")
    }

    /// The `playbook/result` params this callback becomes.
    pub fn to_result(&self) -> PlaybookResult {
        if self.is_failure() {
            let error = self.error.clone().unwrap_or(ResultError {
                code: Some("PLAYBOOK_FAILED".into()),
                message: Some(format!("playbook reported status {}", self.status)),
                data: self.data.clone(),
            });
            PlaybookResult {
                request_id: self.request_id.clone(),
                execution_id: self.execution_id.clone(),
                status: "FAILED".into(),
                data: None,
                error: Some(error),
            }
        } else {
            PlaybookResult {
                request_id: self.request_id.clone(),
                execution_id: self.execution_id.clone(),
                status: if self.status.eq_ignore_ascii_case("success") {
                    "COMPLETED".into()
                } else {
                    self.status.to_ascii_uppercase()
                },
                data: self.data.clone(),
                error: None,
            }
        }
    }
}

/// The body of `/api/internal/progress`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProgressBody {
    /// The request this reports on.
    pub request_id: String,
    /// The execution, as a number or a string.
    #[serde(default, deserialize_with = "opt_string_or_number")]
    pub execution_id: Option<String>,
    /// The step reporting.
    #[serde(default)]
    pub step: Option<String>,
    /// A human-readable message.
    #[serde(default)]
    pub message: Option<String>,
    /// 0.0..=1.0.
    #[serde(default)]
    pub progress: Option<f64>,
}

fn opt_string_or_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct W(#[serde(deserialize_with = "string_or_number")] String);
    Option::<W>::deserialize(d).map(|o| o.map(|w| w.0))
}

/// One SSE frame on the wire: optional `retry:`, optional `id:`, `event:`, one `data:` line.
///
/// `data` must be compact JSON (no newline), which every producer here guarantees; a
/// newline would split the frame, so it is refused by a debug assertion and escaped in
/// release builds rather than trusted.
pub fn sse_frame(id: Option<&str>, event: &str, data: &[u8], retry_ms: Option<u32>) -> Vec<u8> {
    debug_assert!(!data.contains(&b'\n'), "SSE data must be one line");
    let mut out = Vec::with_capacity(data.len() + event.len() + 48);
    if let Some(r) = retry_ms {
        out.extend_from_slice(format!("retry: {r}\n").as_bytes());
    }
    if let Some(id) = id {
        out.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(b"\n\n");
    out
}

/// Whether an `/events` request refused with `status` is answered with
/// [`unavailable_stream`] instead: the passing failures (502, 503, 504). Anything else —
/// 401 (the session is over), 403, 429 — stays an error status, which makes a browser's
/// EventSource stop, as it should. One rule for the edge and the origin.
pub fn answers_as_unavailable_stream(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// The whole body of a `200 text/event-stream` answer to an `/events` request that cannot
/// be served right now (`code`/`message`: the error it stands for): `retry:` and one
/// `stream/unavailable` frame, after which the stream ends.
///
/// A browser's EventSource gives up for good on any status but 200 and reconnects by
/// itself after a stream that ends; so a passing failure (the origin unreachable or
/// restarting, NATS away) is said this way — by the edge, and by the origin — and the
/// browser comes back after [`RETRY_MS`] with its `Last-Event-ID`, as it would after a
/// network error. The frame has no `id:`, so the browser's `Last-Event-ID` is kept.
pub fn unavailable_stream(code: &str, message: &str) -> Vec<u8> {
    let data = notification(
        event::UNAVAILABLE,
        &serde_json::json!({ "code": code, "message": message }),
    );
    sse_frame(None, event::UNAVAILABLE, &data, Some(RETRY_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sse_frame_has_id_event_and_one_data_line() {
        let f = sse_frame(Some("c-1.7"), event::STATE, br#"{"a":1}"#, Some(2000));
        assert_eq!(
            String::from_utf8(f).unwrap(),
            "retry: 2000\nid: c-1.7\nevent: playbook/state\ndata: {\"a\":1}\n\n"
        );
    }

    #[test]
    fn an_event_id_names_its_client_and_a_bare_number_is_the_old_form() {
        let c = ClientId::parse("4b1c2e3f-aaaa-bbbb-cccc-0123456789ab").unwrap();
        let id = EventId::format(&c, 42);
        assert_eq!(id, "4b1c2e3f-aaaa-bbbb-cccc-0123456789ab.42");
        assert_eq!(
            EventId::parse(&id),
            Some(LastEventId::Client(EventId {
                client: c.clone(),
                seq: 42
            }))
        );
        assert_eq!(
            EventId::parse(&format!(" {c}.0 ")),
            Some(LastEventId::Client(EventId { client: c, seq: 0 }))
        );
        assert_eq!(EventId::parse("17"), Some(LastEventId::Bare(17)));
        let max = format!("{}.{}", "a".repeat(ClientId::MAX_LEN), u64::MAX);
        assert!(matches!(EventId::parse(&max), Some(LastEventId::Client(_))));
        for junk in [
            "",
            " ",
            "a.",
            ".1",
            "a.b",
            "a.1.2",
            "a b.1",
            "a.+1",
            "a.-1",
            "é.1",
            "abc",
            &format!("{}.1", "a".repeat(ClientId::MAX_LEN + 1)),
            &format!("a.{}0", u64::MAX),
        ] {
            assert_eq!(EventId::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn an_unavailable_stream_says_retry_and_why_in_one_frame() {
        let body = String::from_utf8(unavailable_stream("origin_unreachable", "down")).unwrap();
        let frame = body.strip_suffix("\n\n").expect("one whole frame");
        assert!(!frame.contains("\n\n"), "exactly one frame: {body:?}");
        assert!(body.starts_with(&format!(
            "retry: {RETRY_MS}\nevent: stream/unavailable\ndata: "
        )));
        assert!(
            !body.contains("id:"),
            "no id: the browser keeps its Last-Event-ID"
        );
        let data: Value =
            serde_json::from_str(body.lines().nth(2).unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(data["method"], "stream/unavailable");
        assert_eq!(data["params"]["code"], "origin_unreachable");
        assert_eq!(data["params"]["message"], "down");
        for s in [502, 503, 504] {
            assert!(answers_as_unavailable_stream(s), "{s}");
        }
        for s in [200, 400, 401, 403, 404, 429, 500, 501, 505] {
            assert!(!answers_as_unavailable_stream(s), "{s}");
        }
    }

    #[test]
    fn a_notification_is_json_rpc() {
        let v: Value =
            serde_json::from_slice(&notification("ping", &serde_json::json!({}))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"jsonrpc":"2.0","method":"ping","params":{}})
        );
    }

    #[test]
    fn callbacks_fail_on_status_or_error_and_keep_big_ids_exact() {
        let cb: CallbackBody = serde_json::from_str(
            r#"{"request_id":"r1","execution_id":612345678901234567,"status":"success","data":{"x":1}}"#,
        )
        .unwrap();
        assert!(!cb.is_failure());
        let r = cb.to_result();
        assert_eq!(r.status, "COMPLETED");
        assert_eq!(r.execution_id.as_deref(), Some("612345678901234567"));
        for status in ["FAILED", "failed", "Error"] {
            let cb: CallbackBody =
                serde_json::from_value(serde_json::json!({"request_id":"r","status":status}))
                    .unwrap();
            assert!(cb.is_failure(), "{status}");
            assert_eq!(cb.to_result().status, "FAILED");
        }
        let cb: CallbackBody = serde_json::from_value(
            serde_json::json!({"request_id":"r","status":"COMPLETED","error":{"message":"x"}}),
        )
        .unwrap();
        assert!(cb.is_failure());
        let v = serde_json::to_value(cb.to_result()).unwrap();
        assert_eq!(v["requestId"], "r");
        assert!(v.get("data").is_none());
    }

    #[test]
    fn client_ids_are_short_and_subject_safe() {
        use crate::ids::ClientId;
        assert!(ClientId::is_valid("0b9f6a1e-3c2d-4f5a-9b8c-7d6e5f4a3b2c"));
        assert!(!ClientId::is_valid(""));
        assert!(!ClientId::is_valid("a.b"));
        assert!(!ClientId::is_valid("a>"));
        assert!(!ClientId::is_valid(&"a".repeat(10_000)));
    }

    proptest::proptest! {
        /// Every id the gateway writes reads back as itself; nothing read panics or names
        /// a client that is not a valid client id.
        #[test]
        fn event_ids_round_trip_and_parsing_never_panics(
            client in "[A-Za-z0-9_-]{1,64}",
            seq in proptest::prelude::any::<u64>(),
            junk in "\\PC{0,120}",
        ) {
            let c = ClientId::parse(&client).unwrap();
            proptest::prop_assert_eq!(
                EventId::parse(&EventId::format(&c, seq)),
                Some(LastEventId::Client(EventId { client: c, seq }))
            );
            if let Some(LastEventId::Client(e)) = EventId::parse(&junk) {
                proptest::prop_assert!(ClientId::is_valid(e.client.as_str()));
            }
        }
    }
}

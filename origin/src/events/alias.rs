//! `GET /api/v1/events/{client_id}`: the source design's event names over the same stream.
//!
//! The alias is `/events?client_id={client_id}` — the same authentication, ownership
//! check, resume with `Last-Event-ID`, replay, eviction and quotas — whose frames are
//! renamed for clients written against the source design (PROTOCOL.md §3): the init frame
//! is `connection.established`, a service's event carries its own name (`run.start`,
//! `node.complete`, …) with its `data` as the frame's data, questions are `question`,
//! `question.answered`, `question.expired`, NoETL's frames become `run.*` and `node.*`
//! ones, and the ping is `heartbeat`. Frame ids are unchanged, so a reconnect resumes
//! exactly as on `/events`. Pure: frame in, frame out.

use gateway_shared::frames::event;
use serde_json::{json, Value};

/// Which names a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `/events`: the protocol's frames as they are.
    Native,
    /// `/api/v1/events/{client_id}`: the source design's names.
    SourceDesign,
}

/// The alias's init frame data.
pub fn established(
    client_id: &str,
    pending_requests: &Value,
    pending_questions: &Value,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "client_id": client_id,
        "pending_requests": pending_requests,
        "pending_questions": pending_questions,
    }))
    .expect("a JSON value always serialises")
}

/// The heartbeat frame's data.
pub fn heartbeat(now_ms: u128) -> Vec<u8> {
    format!("{{\"ts\":{now_ms}}}").into_bytes()
}

/// A bus frame (`event`, its JSON-RPC notification `data`) under the source design's
/// name, with its data. A frame whose data is not a notification keeps its name and data.
pub fn rename(name: &str, data: &[u8]) -> (String, Vec<u8>) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return (name.to_owned(), data.to_vec());
    };
    let params = v.get("params").cloned().unwrap_or(Value::Null);
    let out = |n: &str, d: &Value| {
        (
            n.to_owned(),
            serde_json::to_vec(d).expect("a JSON value always serialises"),
        )
    };
    match name {
        event::SERVICE_EVENT => {
            let own = params["event"].as_str().unwrap_or("message");
            out(own, &params["data"])
        }
        event::QUESTION => out("question", &params),
        event::QUESTION_ANSWERED => out("question.answered", &params),
        event::QUESTION_EXPIRED => out("question.expired", &params),
        event::STATE => out(state_name(&params), &params),
        event::RESULT => {
            let failed = params["status"].as_str().is_some_and(|s| {
                !s.eq_ignore_ascii_case("completed") && !s.eq_ignore_ascii_case("success")
            }) || params.get("error").is_some_and(|e| !e.is_null());
            out(if failed { "run.error" } else { "run.complete" }, &params)
        }
        event::PROGRESS => out("run.progress", &params),
        _ => out(name, &params),
    }
}

/// A `playbook/state` frame's source-design name, from its `event_type` and `status`.
fn state_name(params: &Value) -> &'static str {
    let kind = params["event_type"].as_str().unwrap_or_default();
    let failed = params["status"]
        .as_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("failed") || s.eq_ignore_ascii_case("error"));
    if kind.starts_with("step.") || kind.starts_with("node.") || kind.starts_with("action.") {
        if failed {
            "node.error"
        } else if kind.ends_with("exit") || kind.ends_with("completed") || kind.ends_with("done") {
            "node.complete"
        } else {
            "run.progress"
        }
    } else if kind.ends_with(".started") || kind.ends_with(".initialized") {
        "run.start"
    } else if failed {
        "run.error"
    } else {
        "run.progress"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::frames::notification;

    fn renamed(name: &str, params: Value) -> (String, Value) {
        let (n, d) = rename(name, &notification(name, &params));
        (n, serde_json::from_slice(&d).unwrap())
    }

    #[test]
    fn a_service_event_carries_its_own_name_and_data() {
        let (n, d) = renamed(
            event::SERVICE_EVENT,
            json!({"service": "demo", "event": "run.progress", "data": {"pct": 40}}),
        );
        assert_eq!((n.as_str(), d), ("run.progress", json!({"pct": 40})));
    }

    #[test]
    fn questions_and_noetl_frames_get_the_source_design_names() {
        assert_eq!(
            renamed(event::QUESTION, json!({"question_id": "q"})).0,
            "question"
        );
        assert_eq!(
            renamed(event::QUESTION_EXPIRED, json!({})).0,
            "question.expired"
        );
        for (params, name) in [
            (json!({"event_type": "playbook.started"}), "run.start"),
            (
                json!({"event_type": "step.exit", "status": "COMPLETED"}),
                "node.complete",
            ),
            (
                json!({"event_type": "step.exit", "status": "FAILED"}),
                "node.error",
            ),
            (json!({"event_type": "step.enter"}), "run.progress"),
            (
                json!({"event_type": "playbook.failed", "status": "FAILED"}),
                "run.error",
            ),
            (
                json!({"event_type": "playbook.completed", "status": "COMPLETED"}),
                "run.progress",
            ),
        ] {
            assert_eq!(renamed(event::STATE, params.clone()).0, name, "{params}");
        }
        assert_eq!(
            renamed(event::RESULT, json!({"status": "COMPLETED", "data": {}})).0,
            "run.complete"
        );
        assert_eq!(
            renamed(
                event::RESULT,
                json!({"status": "FAILED", "error": {"message": "x"}})
            )
            .0,
            "run.error"
        );
    }

    #[test]
    fn data_that_is_not_a_notification_passes_as_it_is() {
        assert_eq!(
            rename("x", b"not json"),
            ("x".to_owned(), b"not json".to_vec())
        );
    }
}

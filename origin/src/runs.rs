//! What an execution *is*, independent of who asks: the run status NoETL reports. The
//! bridge and GraphQL both read runs through it, so they agree. (Which execution ids are
//! usable as store keys and subjects is `gateway_shared::ids::ExecutionId`'s rule.)

use serde_json::Value;

/// An execution's state as NoETL's `/api/executions/{id}/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Still going (also any status this module does not know: not final is the safe read).
    Running,
    /// Ended well.
    Completed,
    /// Ended badly.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl RunStatus {
    /// Reads the `status` field of a status reply or an execution record
    /// (case-insensitive; `CANCELED` and `SUCCESS`/`ERROR` accepted as synonyms). NoETL 4.x's
    /// `/status` has no `status` field but booleans: `failed`, `cancelled`, `completed`
    /// (a failed or cancelled run is also "completed" there, so those are read first).
    pub fn from_reply(reply: &Value) -> Self {
        let Some(s) = reply.get("status").and_then(Value::as_str) else {
            let flag = |k: &str| reply.get(k).and_then(Value::as_bool) == Some(true);
            return if flag("failed") {
                Self::Failed
            } else if flag("cancelled") || flag("canceled") {
                Self::Cancelled
            } else if flag("completed") {
                Self::Completed
            } else {
                Self::Running
            };
        };
        match s.to_ascii_uppercase().as_str() {
            "COMPLETED" | "SUCCESS" | "SUCCEEDED" => Self::Completed,
            "FAILED" | "ERROR" => Self::Failed,
            "CANCELLED" | "CANCELED" => Self::Cancelled,
            _ => Self::Running,
        }
    }

    /// The terminal event type and status for a final state; `None` while running.
    pub fn terminal(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Running => None,
            Self::Completed => Some(("playbook.completed", "COMPLETED")),
            Self::Failed => Some(("playbook.failed", "FAILED")),
            Self::Cancelled => Some(("playbook.cancelled", "CANCELLED")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_statuses_are_read_leniently() {
        let s = |v: Value| RunStatus::from_reply(&json!({ "status": v }));
        assert_eq!(s(json!("COMPLETED")), RunStatus::Completed);
        assert_eq!(s(json!("failed")), RunStatus::Failed);
        assert_eq!(s(json!("CANCELED")), RunStatus::Cancelled);
        assert_eq!(s(json!("RUNNING")), RunStatus::Running);
        assert_eq!(s(json!("QUEUED")), RunStatus::Running);
        assert_eq!(s(json!(3)), RunStatus::Running);
        // NoETL 4.x's /status: booleans, no status field.
        let b = |v: Value| RunStatus::from_reply(&v);
        assert_eq!(
            b(json!({"completed": false, "failed": false})),
            RunStatus::Running
        );
        assert_eq!(
            b(json!({"completed": true, "failed": false})),
            RunStatus::Completed
        );
        assert_eq!(
            b(json!({"completed": true, "failed": true})),
            RunStatus::Failed
        );
        assert_eq!(
            b(json!({"completed": true, "cancelled": true})),
            RunStatus::Cancelled
        );
        assert_eq!(RunStatus::from_reply(&json!({})), RunStatus::Running);
    }

    #[test]
    fn usable_execution_ids_are_short_tokens_of_key_safe_characters() {
        use gateway_shared::ids::ExecutionId;
        const MAX: usize = ExecutionId::MAX_LEN;
        // `terminal.<id>` must stay a valid store key (≤ 256).
        assert_eq!(MAX, 200);
        assert!(ExecutionId::is_valid("612345678901234567"));
        assert!(ExecutionId::is_valid("exec_1-a"));
        assert!(ExecutionId::is_valid(&"9".repeat(MAX)));
        for bad in ["", "a.b", "a b", "a*", "é", &"9".repeat(MAX + 1)] {
            assert!(!ExecutionId::is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_final_statuses_have_a_terminal_frame() {
        assert_eq!(RunStatus::Running.terminal(), None);
        assert_eq!(
            RunStatus::Completed.terminal(),
            Some(("playbook.completed", "COMPLETED"))
        );
        assert_eq!(
            RunStatus::Failed.terminal(),
            Some(("playbook.failed", "FAILED"))
        );
        assert_eq!(
            RunStatus::Cancelled.terminal(),
            Some(("playbook.cancelled", "CANCELLED"))
        );
    }
}

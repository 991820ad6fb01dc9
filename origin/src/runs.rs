//! What an execution *is*, independent of who asks: the run status NoETL reports and
//! which execution ids are usable as store keys and subjects. The bridge, the interest
//! records and GraphQL all read runs through these, so they agree on both.

use serde_json::Value;

/// Longest execution id accepted. Keeps `terminal.<id>` a valid store key (≤ 256).
pub const MAX_EXECUTION_ID_LEN: usize = 200;

/// True if `id` can name an execution in store keys and subjects: 1..=200 characters of
/// `[A-Za-z0-9_-]` (a real id is all digits).
pub fn is_usable_execution_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_EXECUTION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

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
    /// Reads the `status` field of a status reply (case-insensitive; `CANCELED` and
    /// `SUCCESS`/`ERROR` accepted as synonyms).
    pub fn from_reply(reply: &Value) -> Self {
        let s = reply
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default();
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
        assert_eq!(RunStatus::from_reply(&json!({})), RunStatus::Running);
    }

    #[test]
    fn usable_execution_ids_are_short_tokens_of_key_safe_characters() {
        assert!(is_usable_execution_id("612345678901234567"));
        assert!(is_usable_execution_id("exec_1-a"));
        assert!(is_usable_execution_id(&"9".repeat(MAX_EXECUTION_ID_LEN)));
        for bad in [
            "",
            "a.b",
            "a b",
            "a*",
            "é",
            &"9".repeat(MAX_EXECUTION_ID_LEN + 1),
        ] {
            assert!(!is_usable_execution_id(bad), "{bad:?}");
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

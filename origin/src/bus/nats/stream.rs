//! The frames stream's settings: what [`super::NatsBus::open`] creates when there is no
//! stream, and how an existing one differs from that (reported, never changed).

use super::super::{BusError, Retention};
use super::{unavailable, FRAMES_SUBJECTS, RUNS_SUBJECTS};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self as js, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};

/// A NATS limit as the server stores it: zero or negative is "unlimited" (-1).
pub(super) fn limit(value: i64) -> i64 {
    if value <= 0 {
        -1
    } else {
        value
    }
}

/// The stream this bus creates when there is none.
pub(super) fn stream_config(name: &str, retention: &Retention) -> js::Config {
    js::Config {
        name: name.to_owned(),
        description: Some("NoETL edge gateway: recent frames per client, for SSE replay".into()),
        subjects: vec![FRAMES_SUBJECTS.to_owned(), RUNS_SUBJECTS.to_owned()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age: retention.max_age,
        max_messages_per_subject: limit(
            i64::try_from(retention.max_frames_per_client).unwrap_or(i64::MAX),
        ),
        // Subscriptions read single frames with direct gets (`reader`).
        allow_direct: true,
        ..Default::default()
    }
}

/// True if a stream with `subjects` captures every subject under `wanted`.
pub(super) fn covers(subjects: &[String], wanted: &str) -> bool {
    subjects
        .iter()
        .any(|s| s == wanted || s == "gateway.>" || s == ">")
}

/// True if the stream holds exactly the clients' and the runs' subjects, so its sequence
/// has no holes but deletions (the router can then see frames leave before delivery).
pub(super) fn exact(subjects: &[String]) -> bool {
    let mut s: Vec<&str> = subjects.iter().map(String::as_str).collect();
    s.sort_unstable();
    s == [FRAMES_SUBJECTS, RUNS_SUBJECTS]
}

/// How an existing stream differs from what this bus would create, in words.
pub(super) fn config_mismatches(wanted: &js::Config, existing: &js::Config) -> Vec<String> {
    let name = &existing.name;
    let mut out = Vec::new();
    if existing.max_age != wanted.max_age {
        out.push(format!(
            "stream {name}: existing max_age {:?} differs from the configured {:?} (kept)",
            existing.max_age, wanted.max_age
        ));
    }
    if limit(existing.max_messages_per_subject) != limit(wanted.max_messages_per_subject) {
        out.push(format!(
            "stream {name}: existing max_messages_per_subject {} differs from the configured {} (kept)",
            limit(existing.max_messages_per_subject),
            limit(wanted.max_messages_per_subject)
        ));
    }
    for wanted in [FRAMES_SUBJECTS, RUNS_SUBJECTS] {
        if !covers(&existing.subjects, wanted) {
            out.push(format!(
                "stream {name}: subjects {:?} do not cover {wanted}: publishing will fail",
                existing.subjects
            ));
        }
    }
    if existing.retention != RetentionPolicy::Limits {
        out.push(format!(
            "stream {name}: retention {:?} removes frames before they expire: replay may miss them",
            existing.retention
        ));
    }
    if existing.discard != DiscardPolicy::Old {
        out.push(format!(
            "stream {name}: discard {:?} refuses new frames when full instead of dropping the oldest",
            existing.discard
        ));
    }
    if existing.storage != wanted.storage {
        out.push(format!(
            "stream {name}: storage {:?}: frames do not survive a server restart",
            existing.storage
        ));
    }
    out
}

/// The stream's settings and state, or `None` if it does not exist.
pub(super) async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<js::Info>, BusError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(unavailable(format!("stream {name} lookup"), e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_created_stream_follows_the_retention_and_zero_means_unlimited() {
        let r = Retention {
            max_age: Duration::from_secs(600),
            max_frames_per_client: 1000,
        };
        let c = stream_config("S", &r);
        assert_eq!(c.subjects, [FRAMES_SUBJECTS, RUNS_SUBJECTS]);
        assert!(exact(&c.subjects));
        assert!(!exact(&[FRAMES_SUBJECTS.to_owned()]));
        assert!(!exact(&[">".to_owned()]));
        assert_eq!(c.max_age, r.max_age);
        assert_eq!(c.max_messages_per_subject, 1000);
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.discard, DiscardPolicy::Old);
        let unlimited = stream_config(
            "S",
            &Retention {
                max_frames_per_client: 0,
                ..r
            },
        );
        assert_eq!(unlimited.max_messages_per_subject, -1);
        assert!(config_mismatches(&c, &c).is_empty());
        assert!(config_mismatches(
            &unlimited,
            &js::Config {
                max_messages_per_subject: 0,
                ..unlimited.clone()
            }
        )
        .is_empty());
    }

    #[test]
    fn every_difference_that_changes_delivery_is_reported() {
        let wanted = stream_config("S", &Retention::default());
        let existing = js::Config {
            max_age: Duration::from_secs(60),
            max_messages_per_subject: 10,
            subjects: vec!["other.>".into()],
            retention: RetentionPolicy::WorkQueue,
            discard: DiscardPolicy::New,
            storage: StorageType::Memory,
            ..wanted.clone()
        };
        let m = config_mismatches(&wanted, &existing);
        assert_eq!(m.len(), 7, "{m:?}");
        assert!(m[0].contains("60s") && m[0].contains("600s"), "{m:?}");
        let wide = js::Config {
            subjects: vec![">".into()],
            ..wanted.clone()
        };
        assert!(config_mismatches(&wanted, &wide).is_empty());
    }
}

//! A run that ends without its result still resolves its client: when an execution the
//! gateway started ends FAILED or CANCELLED and no result callback has arrived, the gateway
//! synthesises the one `playbook/result` the client's `executePlaybook` is waiting for
//! (PROTOCOL.md §3).
//!
//! Why: a playbook calls the gateway back from a step of its own, so a run that fails before
//! that step (an HTTP step that cannot connect, as observed on NoETL 3.54) or is cancelled
//! never calls back, and the page would wait for its own timeout. The bridge already knows,
//! confirmed with NoETL, that the run ended: the event that won the execution's terminal
//! claim (once across replicas) publishes the terminal frame and then hands the run to
//! [`Settler::after_terminal`].
//!
//! Flow: the owner record (`exec/<id>` names the request that started the run; no record or
//! no request → a run the gateway did not start: nothing) → the request entry (its client;
//! none → nothing) → the `delivered` marker (a callback got there first → nothing) → NoETL's
//! execution record for the error (scrubbed, bounded; unreadable → a generic message, never
//! a held-back result) → the claim: the same create-if-absent of `delivered.<request_id>` a
//! callback makes, so exactly one of {callback, synthesised result} produces a frame, on any
//! replica → one frame on the client's bus subject → the marker says `settled` → the request
//! leaves the client's pending list (the init frame's `pendingRequests`). A callback that
//! arrives later is a duplicate (200 `{status:"duplicate"}`, no frame).
//!
//! Failures: a store or bus failure is returned and the bridge NAKs its event; the
//! redelivery (the same event, so it still owns the terminal claim and the `settling`
//! marker it may have taken) carries on — late, never lost. A failed publish also gives the
//! marker back, so a callback arriving meanwhile delivers instead.
//!
//! The frame is a callback's failed result, field for field (`requestId`, `executionId`,
//! `status`, `error:{code, message, data}`); what tells it apart is its error code,
//! [`FAILED_CODE`] or [`CANCELLED_CODE`], which no callback is given by the gateway.

use std::sync::Arc;

use bytes::Bytes;
use gateway_shared::frames::{event, notification, PlaybookResult, PlaybookState, ResultError};
use gateway_shared::ids::{ExecutionId, RequestId};
use serde_json::{json, Value};

use crate::bus::{Bus, BusError};
use crate::clients;
use crate::noetl::NoetlClient;
use crate::owners::Owners;
use crate::requests::{self, Delivered};
use crate::runs::RunStatus;
use crate::scrub::Scrubber;
use crate::store::{KvStore, StoreError};

/// The error code of a synthesised result for a run that FAILED.
pub const FAILED_CODE: &str = "EXECUTION_FAILED";
/// The error code of a synthesised result for a run that was CANCELLED.
pub const CANCELLED_CODE: &str = "EXECUTION_CANCELLED";
/// The longest error message a synthesised result carries, in characters (NoETL's error
/// text is unbounded: a step may fail with a whole response body).
pub const MAX_MESSAGE_CHARS: usize = 1000;
/// The longest step name it carries, in characters.
const MAX_STEP_CHARS: usize = 256;
/// How deep an error object is searched for its message.
const MAX_ERROR_DEPTH: usize = 4;

/// What [`Settler::settle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// One `playbook/result` went to the requesting client.
    Delivered,
    /// Nothing was owed, and why.
    Nothing(Skip),
}

/// Why nothing was synthesised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The run did not end FAILED or CANCELLED (a completed run has its callback).
    NotAFailure,
    /// The gateway did not start the run: no owner record, or one without its request.
    NotStartedHere,
    /// The request entry expired, or names another execution.
    NoRequest,
    /// The request named no client to deliver to.
    NoClient,
    /// A callback delivered the result, or it was synthesised already.
    AlreadyDelivered,
}

/// Why a result owed could not be delivered now; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The K/V store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The frame could not be published.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// What NoETL said about how the run ended, scrubbed and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// NoETL could not be asked (unreachable, slow, a bad answer).
    Unreadable,
    /// NoETL's record holds no error.
    Nothing,
    /// The last error in the run's events.
    Error {
        /// The step it came from (`node_name`), if named.
        step: Option<String>,
        /// Its text.
        message: String,
    },
}

/// Synthesises results for runs that ended without one: the stores, the bus, NoETL, and
/// the scrubber for what NoETL says.
#[derive(Clone)]
pub struct Settler {
    kv: Arc<dyn KvStore>,
    bus: Arc<dyn Bus>,
    noetl: NoetlClient,
    owners: Owners,
    scrubber: Scrubber,
}

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settler").finish_non_exhaustive()
    }
}

impl Settler {
    /// A settler over the shared stores and bus; `scrubber` is applied to NoETL's error
    /// before any of it reaches a client (the gateway's: it derives callback tokens).
    pub fn new(
        kv: Arc<dyn KvStore>,
        bus: Arc<dyn Bus>,
        noetl: NoetlClient,
        scrubber: Scrubber,
    ) -> Self {
        Self {
            owners: Owners::new(kv.clone(), Vec::new()),
            kv,
            bus,
            noetl,
            scrubber,
        }
    }

    /// After the execution's terminal frame `terminal` was published by the event that owns
    /// it: settles the run if the frame says it FAILED or was CANCELLED ([`ending`]).
    pub async fn after_terminal(
        &self,
        execution_id: &ExecutionId,
        terminal: &PlaybookState,
    ) -> Result<Settled, SettleError> {
        match ending(terminal) {
            Some(status) => self.settle(execution_id, status).await,
            None => Ok(Settled::Nothing(Skip::NotAFailure)),
        }
    }

    /// Delivers one synthesised `playbook/result` with `status` to the client whose request
    /// started `execution_id`, unless a result was delivered already (module docs).
    /// `status` must be confirmed: anything but FAILED or CANCELLED settles nothing.
    pub async fn settle(
        &self,
        execution_id: &ExecutionId,
        status: RunStatus,
    ) -> Result<Settled, SettleError> {
        if !matches!(status, RunStatus::Failed | RunStatus::Cancelled) {
            return Ok(Settled::Nothing(Skip::NotAFailure));
        }
        let kv = self.kv.as_ref();
        let Some(request_id) = self
            .owners
            .owner(execution_id)
            .await?
            .and_then(|o| o.request_id)
        else {
            return Ok(Settled::Nothing(Skip::NotStartedHere));
        };
        let Some(entry) = requests::get(kv, &request_id)
            .await?
            .filter(|e| e.execution_id.as_ref().is_none_or(|x| x == execution_id))
        else {
            return Ok(Settled::Nothing(Skip::NoRequest));
        };
        let Some(client_id) = entry.client_id else {
            return Ok(Settled::Nothing(Skip::NoClient));
        };
        // Read first, so a run whose callback came in does not cost a NoETL call; the
        // claim below is what decides.
        if matches!(
            requests::delivered(kv, &request_id).await?,
            Delivered::ByCallback | Delivered::Settled
        ) {
            return Ok(Settled::Nothing(Skip::AlreadyDelivered));
        }
        let reported = self.reported(execution_id, &request_id).await;
        let result = synthesised_result(&request_id, execution_id, status, reported);
        if !requests::claim_settlement(kv, &request_id).await? {
            return Ok(Settled::Nothing(Skip::AlreadyDelivered));
        }
        let data = Bytes::from(notification(event::RESULT, &result));
        if let Err(e) = self.bus.publish(&client_id, event::RESULT, data).await {
            if let Err(u) = requests::unmark_delivered(kv, &request_id).await {
                tracing::warn!(request = %request_id, error = %u, "settle: claim not given back; the retry still owns it");
            }
            return Err(e.into());
        }
        if let Err(e) = requests::mark_settled(kv, &request_id).await {
            tracing::warn!(request = %request_id, error = %e, "settle: result published but not marked settled; a redelivery may publish it again");
        }
        if let Err(e) = clients::remove_pending(kv, &client_id, &request_id).await {
            tracing::warn!(request = %request_id, error = %e, "settle: pending list not updated");
        }
        tracing::info!(request = %request_id, client = %client_id, execution_id = %execution_id, status = %result.status, "settle: the run ended without a result callback; result synthesised");
        Ok(Settled::Delivered)
    }

    /// NoETL's last error for the run ([`report`]).
    async fn reported(&self, execution_id: &ExecutionId, request_id: &RequestId) -> Reported {
        let record = match self.noetl.execution_record(execution_id.as_str()).await {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(execution_id = %execution_id, error = %e, "settle: NoETL's record unavailable; the result carries a generic message");
                return Reported::Unreadable;
            }
        };
        report(&self.scrubber, request_id, &record)
    }
}

/// [`Reported`] from an execution record: its [`last_error`], scrubbed together with the
/// record's workload and `request_id` (so a value the workload held — what the gateway
/// injected — or the request's callback token is redacted from the error's text too), then
/// bounded.
pub fn report(scrubber: &Scrubber, request_id: &RequestId, record: &Value) -> Reported {
    let Some((step, error)) = last_error(record) else {
        return Reported::Nothing;
    };
    let mut doc = json!({
        "request_id": request_id.as_str(),
        "workload": record.get("workload"),
        "step": step,
        "error": error,
    });
    scrubber.scrub(&mut doc);
    Reported::Error {
        step: doc["step"].as_str().map(|s| bounded(s, MAX_STEP_CHARS)),
        message: bounded(&error_text(&doc["error"], 0), MAX_MESSAGE_CHARS),
    }
}

/// The run's ending per its terminal frame: FAILED for `playbook.failed`, CANCELLED for
/// `playbook.cancelled` (the bridge gives those names the status NoETL confirmed, or that
/// NoETL's own terminal event stated); `None` for anything else.
pub fn ending(terminal: &PlaybookState) -> Option<RunStatus> {
    match (terminal.terminal, terminal.event_type.as_str()) {
        (true, "playbook.failed") => Some(RunStatus::Failed),
        (true, "playbook.cancelled") => Some(RunStatus::Cancelled),
        _ => None,
    }
}

/// The last event of an execution record (`events`, oldest first) that carries an error:
/// its `node_name` and its `error` (text, maybe JSON in it, or an object).
pub fn last_error(record: &Value) -> Option<(Option<&str>, &Value)> {
    record["events"].as_array()?.iter().rev().find_map(|ev| {
        let error = ev.get("error")?;
        let present = match error {
            Value::Null => false,
            Value::String(s) => !s.trim().is_empty() && s.trim() != "null",
            Value::Object(m) => !m.is_empty(),
            _ => true,
        };
        present.then(|| (ev["node_name"].as_str(), error))
    })
}

/// An error's human text: the `message` (or `error`, `detail`, `reason`) of an error
/// object — also one encoded in a string, as NoETL's text column holds it — else the text
/// itself or the object's JSON.
pub fn error_text(error: &Value, depth: usize) -> String {
    match error {
        Value::String(s) => {
            let t = s.trim_start();
            if depth < MAX_ERROR_DEPTH && (t.starts_with('{') || t.starts_with('[')) {
                if let Ok(inner) = serde_json::from_str::<Value>(t) {
                    return error_text(&inner, depth + 1);
                }
            }
            s.trim().to_owned()
        }
        Value::Object(m) if depth < MAX_ERROR_DEPTH => {
            for key in ["message", "error", "detail", "reason"] {
                match m.get(key) {
                    Some(Value::String(s)) if !s.trim().is_empty() => {
                        return error_text(&m[key], depth + 1)
                    }
                    Some(v @ Value::Object(_)) => return error_text(v, depth + 1),
                    _ => {}
                }
            }
            error.to_string()
        }
        other => other.to_string(),
    }
}

/// `text` cut to at most `max` characters (the last one `…` when cut).
fn bounded(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The `playbook/result` params for a run that ended `status` (FAILED or CANCELLED)
/// without a callback: a failed callback's shape, with [`FAILED_CODE`] or
/// [`CANCELLED_CODE`], NoETL's error as the message when it gave one, and the step in
/// `error.data`.
pub fn synthesised_result(
    request_id: &RequestId,
    execution_id: &ExecutionId,
    status: RunStatus,
    reported: Reported,
) -> PlaybookResult {
    let cancelled = status == RunStatus::Cancelled;
    let (step, message) = match reported {
        Reported::Error { step, message } if !message.is_empty() => (step, message),
        _ if cancelled => (None, "the run was cancelled".to_owned()),
        Reported::Unreadable => (
            None,
            "the run failed without a result; NoETL's error could not be read".to_owned(),
        ),
        Reported::Error { step, .. } => (
            step,
            "the run failed without a result; NoETL reported no error".to_owned(),
        ),
        Reported::Nothing => (
            None,
            "the run failed without a result; NoETL reported no error".to_owned(),
        ),
    };
    PlaybookResult {
        request_id: request_id.to_string(),
        execution_id: Some(execution_id.to_string()),
        status: if cancelled { "CANCELLED" } else { "FAILED" }.to_owned(),
        data: None,
        error: Some(ResultError {
            code: Some(
                if cancelled {
                    CANCELLED_CODE
                } else {
                    FAILED_CODE
                }
                .to_owned(),
            ),
            message: Some(message),
            data: step.map(|s| json!({ "step": s })),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::bus::{Retention, StartAt};
    use crate::owners::OwnerRecord;
    use crate::requests::{CallbackTokens, RequestEntry};
    use crate::store::memory::MemoryKv;
    use crate::store::BucketTtls;
    use futures::StreamExt;
    use gateway_shared::ids::ClientId;
    use std::time::Duration;

    const EXEC: &str = "612345678901234567";

    fn state(event_type: &str, terminal: bool) -> PlaybookState {
        PlaybookState {
            execution_id: EXEC.into(),
            event_type: event_type.into(),
            step_name: None,
            status: None,
            at: "2026-01-01T00:00:00Z".into(),
            terminal,
        }
    }

    #[test]
    fn only_a_failed_or_cancelled_terminal_frame_settles() {
        assert_eq!(
            ending(&state("playbook.failed", true)),
            Some(RunStatus::Failed)
        );
        assert_eq!(
            ending(&state("playbook.cancelled", true)),
            Some(RunStatus::Cancelled)
        );
        assert_eq!(ending(&state("playbook.completed", true)), None);
        assert_eq!(ending(&state("step.failed", false)), None);
        assert_eq!(ending(&state("playbook.failed", false)), None);
    }

    #[test]
    fn the_last_error_in_the_events_is_the_runs() {
        let record = json!({"events": [
            {"event_type": "call.error", "node_name": "a", "error": "first"},
            {"event_type": "command.failed", "node_name": "fetch",
             "error": "{\"message\": \"connection refused\", \"status_code\": null}"},
            {"event_type": "step.exit", "node_name": "x", "error": null},
            {"event_type": "playbook.failed", "node_name": "p", "error": ""},
        ]});
        let (step, error) = last_error(&record).expect("an error");
        assert_eq!(step, Some("fetch"));
        assert_eq!(error_text(error, 0), "connection refused");
        assert_eq!(last_error(&json!({"events": []})), None);
        assert_eq!(last_error(&json!({"status": "FAILED"})), None);
    }

    #[test]
    fn an_errors_text_is_its_message_wherever_noetl_put_it() {
        assert_eq!(error_text(&json!("plain text "), 0), "plain text");
        assert_eq!(
            error_text(&json!({"error": {"message": "deep"}}), 0),
            "deep"
        );
        assert_eq!(error_text(&json!({"detail": "why"}), 0), "why");
        assert_eq!(
            error_text(
                &json!("{\"error\": \"{\\\"message\\\": \\\"twice\\\"}\"}"),
                0
            ),
            "twice"
        );
        assert_eq!(error_text(&json!({"code": 7}), 0), r#"{"code":7}"#);
        assert_eq!(error_text(&json!("{not json"), 0), "{not json");
        assert_eq!(error_text(&json!(42), 0), "42");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let cut = bounded(&"é".repeat(50), 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn a_synthesised_result_is_a_failed_callbacks_frame() {
        let request = RequestId::parse("r1").unwrap();
        let exec = ExecutionId::parse(EXEC).unwrap();
        let reported = Reported::Error {
            step: Some("fetch".into()),
            message: "connection refused".into(),
        };
        let r = synthesised_result(&request, &exec, RunStatus::Failed, reported);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({
                "requestId": "r1",
                "executionId": EXEC,
                "status": "FAILED",
                "error": {"code": FAILED_CODE, "message": "connection refused", "data": {"step": "fetch"}},
            })
        );
        let r = synthesised_result(&request, &exec, RunStatus::Cancelled, Reported::Nothing);
        assert_eq!(r.status, "CANCELLED");
        let e = r.error.unwrap();
        assert_eq!(e.code.as_deref(), Some(CANCELLED_CODE));
        assert_eq!(e.message.as_deref(), Some("the run was cancelled"));
        let r = synthesised_result(&request, &exec, RunStatus::Failed, Reported::Unreadable);
        assert!(r
            .error
            .unwrap()
            .message
            .unwrap()
            .contains("could not be read"));
    }

    #[test]
    fn nothing_injected_reaches_the_message() {
        let tokens = CallbackTokens::new(Some("a-secret-for-this-test-only"));
        let request = RequestId::parse("0123456789abcdef0123456789abcdef").unwrap();
        let token = tokens.token_for(request.as_str());
        let scrubber = Scrubber::for_gateway("http://gw.internal:8091".into(), tokens);
        let error = format!(
            "POST http://gw.internal:8091/api/internal/callback/async with Bearer {token} for {} failed; session sess-secret-value-123",
            request.as_str()
        );
        let record = json!({
            "workload": {"session_token": "sess-secret-value-123", "request_id": request.as_str()},
            "events": [{"node_name": "callback", "error": json!({"message": error}).to_string()}],
        });
        let Reported::Error { step, message } = report(&scrubber, &request, &record) else {
            panic!("an error");
        };
        assert_eq!(step.as_deref(), Some("callback"));
        for secret in [
            token.as_str(),
            "gw.internal",
            request.as_str(),
            "sess-secret-value-123",
        ] {
            assert!(!message.contains(secret), "{secret} in {message}");
        }
        assert!(message.contains("[redacted]"), "{message}");
        let huge = json!({"events": [{"error": "x".repeat(100_000)}]});
        let Reported::Error { message, .. } = report(&scrubber, &request, &huge) else {
            panic!("an error");
        };
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS);
    }

    /// The memory bus, refusing publishes while `down`.
    struct FlakyBus {
        inner: MemoryBus,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Bus for FlakyBus {
        async fn publish(
            &self,
            client_id: &ClientId,
            event: &str,
            data: Bytes,
        ) -> Result<u64, BusError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(BusError::Unavailable("down for the test".into()));
            }
            self.inner.publish(client_id, event, data).await
        }

        async fn publish_once(
            &self,
            client_id: &ClientId,
            event: &str,
            data: Bytes,
            _key: &str,
        ) -> Result<u64, BusError> {
            self.publish(client_id, event, data).await
        }

        async fn publish_external(
            &self,
            subject: &str,
            data: Bytes,
            msg_id: &str,
        ) -> Result<(), BusError> {
            self.inner.publish_external(subject, data, msg_id).await
        }

        fn has_external_subjects(&self) -> bool {
            false
        }

        fn unwatched(&self, _client_id: &ClientId) -> Option<std::ops::RangeInclusive<u64>> {
            None
        }

        async fn publish_run(
            &self,
            execution_id: &ExecutionId,
            event: &str,
            data: Bytes,
            key: &str,
        ) -> Result<u64, BusError> {
            self.inner.publish_run(execution_id, event, data, key).await
        }

        async fn watch(
            &self,
            client_id: &ClientId,
            execution_id: &ExecutionId,
        ) -> Result<(), BusError> {
            self.inner.watch(client_id, execution_id).await
        }

        async fn subscribe_with(
            &self,
            client_id: &ClientId,
            start: StartAt,
            watching: &[ExecutionId],
        ) -> Result<crate::bus::Subscription, BusError> {
            self.inner.subscribe_with(client_id, start, watching).await
        }

        async fn is_healthy(&self) -> bool {
            true
        }
    }

    struct World {
        kv: Arc<MemoryKv>,
        bus: Arc<FlakyBus>,
        settler: Settler,
        exec: ExecutionId,
        request: RequestId,
        client: ClientId,
    }

    /// A run started by the gateway for `client`; NoETL is unreachable (the message is
    /// then the generic one).
    async fn world() -> World {
        let kv = Arc::new(MemoryKv::new(BucketTtls::default()));
        let bus = Arc::new(FlakyBus {
            inner: MemoryBus::new(Retention::default()),
            down: false.into(),
        });
        let noetl = NoetlClient::new(
            "http://127.0.0.1:1/".parse().unwrap(),
            Duration::from_millis(200),
            Duration::from_millis(200),
            0,
            "/api/health".into(),
        )
        .unwrap();
        let settler = Settler::new(kv.clone(), bus.clone(), noetl, Scrubber::default());
        let exec = ExecutionId::parse(EXEC).unwrap();
        let request = requests::new_request_id();
        let client = ClientId::parse("client-1").unwrap();
        requests::put(
            kv.as_ref(),
            &RequestEntry {
                request_id: request.clone(),
                client_id: Some(client.clone()),
                user_id: "u1".into(),
                execution_id: Some(exec.clone()),
                playbook_path: "demo/fail".into(),
                created_at: 1_700_000_000,
            },
        )
        .await
        .unwrap();
        World {
            kv,
            bus,
            settler,
            exec,
            request,
            client,
        }
    }

    impl World {
        async fn own(&self, request_id: Option<RequestId>) {
            Owners::new(self.kv.clone(), Vec::new())
                .record(&OwnerRecord {
                    execution_id: EXEC.into(),
                    user_id: "u1".into(),
                    playbook_path: "demo/fail".into(),
                    started_at: 1_700_000_000,
                    request_id,
                })
                .await
                .unwrap();
        }

        /// Every `playbook/result` published to the client so far (a marker frame ends the
        /// read, so nothing is waited for).
        async fn results(&self) -> Vec<Value> {
            self.bus
                .publish(&self.client, "test/end", Bytes::from_static(b"{}"))
                .await
                .unwrap();
            let sub = self
                .bus
                .subscribe(&self.client, StartAt::Retained)
                .await
                .unwrap();
            let frames: Vec<_> = sub
                .frames
                .map(|f| f.unwrap())
                .take_while(|f| std::future::ready(f.event != "test/end"))
                .collect()
                .await;
            frames
                .into_iter()
                .filter(|f| f.event == event::RESULT)
                .map(|f| serde_json::from_slice(&f.data).unwrap())
                .collect()
        }
    }

    #[tokio::test]
    async fn a_failed_run_without_a_callback_gets_one_result_and_a_late_callback_is_a_duplicate() {
        let w = world().await;
        w.own(Some(w.request.clone())).await;
        assert_eq!(
            w.settler.settle(&w.exec, RunStatus::Failed).await.unwrap(),
            Settled::Delivered
        );
        assert_eq!(
            w.settler.settle(&w.exec, RunStatus::Failed).await.unwrap(),
            Settled::Nothing(Skip::AlreadyDelivered),
            "a redelivery after the publish sends nothing"
        );
        assert!(
            !requests::mark_delivered(w.kv.as_ref(), &w.request)
                .await
                .unwrap(),
            "the real callback is a duplicate"
        );
        let results = w.results().await;
        assert_eq!(results.len(), 1, "{results:?}");
        let p = &results[0]["params"];
        assert_eq!(p["status"], "FAILED");
        assert_eq!(p["requestId"], w.request.as_str());
        assert_eq!(p["executionId"], EXEC);
        assert_eq!(p["error"]["code"], FAILED_CODE);
        assert!(p["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be read"));
    }

    #[tokio::test]
    async fn nothing_is_synthesised_when_not_owed() {
        let w = world().await;
        // Not started by the gateway (no owner record, or one without its request).
        assert_eq!(
            w.settler.settle(&w.exec, RunStatus::Failed).await.unwrap(),
            Settled::Nothing(Skip::NotStartedHere)
        );
        w.own(None).await;
        assert_eq!(
            w.settler.settle(&w.exec, RunStatus::Failed).await.unwrap(),
            Settled::Nothing(Skip::NotStartedHere)
        );

        let w = world().await;
        w.own(Some(w.request.clone())).await;
        assert_eq!(
            w.settler
                .settle(&w.exec, RunStatus::Completed)
                .await
                .unwrap(),
            Settled::Nothing(Skip::NotAFailure)
        );
        // The callback came first.
        assert!(requests::mark_delivered(w.kv.as_ref(), &w.request)
            .await
            .unwrap());
        assert_eq!(
            w.settler
                .settle(&w.exec, RunStatus::Cancelled)
                .await
                .unwrap(),
            Settled::Nothing(Skip::AlreadyDelivered)
        );
        assert!(w.results().await.is_empty());
    }

    #[tokio::test]
    async fn a_failed_publish_is_retried_and_leaves_the_result_to_whoever_comes_first() {
        let w = world().await;
        w.own(Some(w.request.clone())).await;
        let down = |v: bool| w.bus.down.store(v, std::sync::atomic::Ordering::SeqCst);
        down(true);
        assert!(matches!(
            w.settler.settle(&w.exec, RunStatus::Failed).await,
            Err(SettleError::Bus(_))
        ));
        assert_eq!(
            requests::delivered(w.kv.as_ref(), &w.request)
                .await
                .unwrap(),
            Delivered::No,
            "the claim was given back: a callback now could still deliver"
        );
        down(false);
        assert_eq!(
            w.settler.settle(&w.exec, RunStatus::Failed).await.unwrap(),
            Settled::Delivered,
            "the bridge's retry delivers"
        );
        assert_eq!(w.results().await.len(), 1);
    }
}

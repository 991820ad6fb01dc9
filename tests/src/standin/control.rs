//! Test control, under `/_standin/` (not part of NoETL): call counters per route
//! template, the trace headers of recent calls, injected faults, the callback log and
//! event counters.
//!
//! [`observe_api`] wraps every `/api/*` route (health included: a slow NoETL is slow
//! everywhere). It counts the call first, then applies the faults, so a test can assert
//! both "the gateway called validate exactly once" and "the gateway survived a 503".

use super::http::{ApiError, JsonBody};
use super::state::Shared;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The longest injectable delay (10 minutes).
const MAX_DELAY_MS: u64 = 600_000;

/// Faults applied to every `/api/*` call until cleared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Sleep this long before answering.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Answer this status (400–599) with a NoETL-shaped error instead of the real reply.
    #[serde(default)]
    pub fail_status: Option<u16>,
}

impl Faults {
    /// Checks the values a test sent.
    pub fn validate(self) -> Result<Self, String> {
        if self.delay_ms.is_some_and(|d| d > MAX_DELAY_MS) {
            return Err(format!("delay_ms must be at most {MAX_DELAY_MS}"));
        }
        if let Some(s) = self.fail_status {
            if !(400..=599).contains(&s) {
                return Err("fail_status must be 400..=599".into());
            }
        }
        Ok(self)
    }
}

/// How many calls' trace headers `/_standin/traces` keeps (the oldest go first).
pub const MAX_TRACES: usize = 1000;

/// The trace headers one `/api/*` call carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedCall {
    /// `"<METHOD> <route template>"`, as counted.
    pub call: String,
    /// The request path (no query).
    pub path: String,
    /// The `traceparent` header, if any.
    pub traceparent: Option<String>,
    /// The `x-request-id` header, if any.
    pub request_id: Option<String>,
}

/// Call counters, recent calls' trace headers and current faults.
#[derive(Debug, Default)]
pub struct Control {
    calls: Mutex<BTreeMap<String, u64>>,
    traces: Mutex<std::collections::VecDeque<TracedCall>>,
    faults: Mutex<Faults>,
}

impl Control {
    fn count(&self, key: String) {
        *lock(&self.calls).entry(key).or_default() += 1;
    }

    fn trace(&self, call: TracedCall) {
        let mut traces = lock(&self.traces);
        if traces.len() >= MAX_TRACES {
            traces.pop_front();
        }
        traces.push_back(call);
    }

    fn faults(&self) -> Faults {
        *lock(&self.faults)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters and a Copy struct: a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Middleware on `/api/*`: counts `"<METHOD> <route template>"`, then applies faults.
pub async fn observe_api(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    tracing::debug!(method = %req.method(), route = %template, "api call");
    let call = format!("{} {template}", req.method());
    st.control.trace(TracedCall {
        call: call.clone(),
        path: req.uri().path().to_owned(),
        traceparent: header(req.headers(), "traceparent"),
        request_id: header(req.headers(), "x-request-id"),
    });
    st.control.count(call);
    let faults = st.control.faults();
    if let Some(ms) = faults.delay_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = faults
        .fail_status
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        return ApiError::Status(code, format!("injected fault: {code}")).into_response();
    }
    next.run(req).await
}

fn header(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `GET /_standin/calls`.
pub async fn calls(State(st): State<Shared>) -> Json<BTreeMap<String, u64>> {
    Json(lock(&st.control.calls).clone())
}

/// `GET /_standin/traces`: the trace headers of the last [`MAX_TRACES`] `/api/*` calls,
/// oldest first.
pub async fn traces(State(st): State<Shared>) -> Json<Vec<TracedCall>> {
    Json(lock(&st.control.traces).iter().cloned().collect())
}

/// `POST /_standin/reset-calls` (the counters and the trace log).
pub async fn reset_calls(State(st): State<Shared>) -> Json<Value> {
    lock(&st.control.calls).clear();
    lock(&st.control.traces).clear();
    Json(json!({ "status": "ok" }))
}

/// `POST /_standin/faults {delay_ms?, fail_status?}`; `{}` clears them.
pub async fn set_faults(
    State(st): State<Shared>,
    JsonBody(faults): JsonBody<Faults>,
) -> Result<Json<Faults>, ApiError> {
    let faults = faults.validate().map_err(ApiError::BadRequest)?;
    *lock(&st.control.faults) = faults;
    tracing::info!(?faults, "faults set");
    Ok(Json(faults))
}

/// `GET /_standin/faults`.
pub async fn get_faults(State(st): State<Shared>) -> Json<Faults> {
    Json(st.control.faults())
}

/// `GET /_standin/callbacks`: every callback attempt, oldest first.
pub async fn callbacks(State(st): State<Shared>) -> Json<Vec<Value>> {
    Json(st.callbacks.log())
}

/// `GET /_standin/stats`: event publishing counters.
pub async fn stats(State(st): State<Shared>) -> Json<Value> {
    Json(json!({ "events": st.events.stats().snapshot() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_values_are_checked() {
        let ok = Faults {
            delay_ms: Some(10),
            fail_status: Some(503),
        };
        assert_eq!(ok.validate(), Ok(ok));
        assert!(Faults {
            fail_status: Some(200),
            ..Faults::default()
        }
        .validate()
        .is_err());
        assert!(Faults {
            delay_ms: Some(u64::MAX),
            ..Faults::default()
        }
        .validate()
        .is_err());
        assert_eq!(Faults::default().validate(), Ok(Faults::default()));
    }
}

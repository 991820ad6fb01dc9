//! `/health` (liveness: the process serves requests) and `/ready` (readiness: NATS and
//! NoETL are reachable, so this replica can do useful work).
//!
//! Kubernetes restarts a pod whose liveness fails and stops routing to one whose readiness
//! fails; so `/health` never checks dependencies (a NoETL outage must not restart every
//! gateway pod) and `/ready` checks them with short timeouts (a probe must not hang).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use crate::app::AppState;
use crate::error::json_response;

/// How long `/ready` waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: 200 while the process can answer.
pub async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Readiness: 200 when every configured dependency answers, else 503 naming the failures.
pub async fn ready(State(state): State<AppState>) -> Response {
    let nats = match &state.nats {
        None => "embedded".to_owned(),
        Some(client) => match client.connection_state() {
            async_nats::connection::State::Connected => {
                match tokio::time::timeout(CHECK_TIMEOUT, state.kv.is_healthy()).await {
                    Ok(true) => "ok".to_owned(),
                    Ok(false) => "jetstream unavailable".to_owned(),
                    Err(_) => "jetstream timed out".to_owned(),
                }
            }
            other => format!("{other:?}").to_lowercase(),
        },
    };
    let noetl = match state.noetl.health(CHECK_TIMEOUT).await {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    let ok = (nats == "ok" || nats == "embedded") && noetl == "ok";
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !ok {
        tracing::warn!(%nats, %noetl, "not ready");
    }
    json_response(
        status,
        &json!({"status": if ok { "ready" } else { "not_ready" }, "checks": {"nats": nats, "noetl": noetl}}),
    )
}

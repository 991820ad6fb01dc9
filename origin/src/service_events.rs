//! `POST /api/internal/events` (internal listener): a backend service's event for a client,
//! for every active client of a user, or for everyone watching a NoETL execution
//! (PROTOCOL.md §4).
//!
//! The event becomes a `service/event` frame on each target client's stream — the same
//! bus, so the same ids, replay after `Last-Event-ID` and eviction rules as every other
//! frame, on whichever replica holds the stream. `/api/v1/events/{client_id}` shows it under
//! its own name (`run.progress`, `node.complete`, …).
//!
//! Auth: `Authorization: Bearer <GATEWAY_INTERNAL_TOKEN>` (constant-time); no token
//! configured → 503, never a permissive default. The body is bounded by
//! `CALLBACK_BODY_LIMIT` (as lowered to what one NATS message carries); a target that names
//! no client the gateway knows is 404 `client_not_found`, so a service learns of its mistake.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use gateway_shared::ct::secrets_equal;
use gateway_shared::frames::notification;
use gateway_shared::ids::{ClientId, ExecutionId};
use gateway_shared::session::bearer_token;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::bus::Bus;
use crate::clients;
use crate::config::Secret;
use crate::error::{json_response, AppError};
use crate::extract::{read_json, BodyLimit};
use crate::store::KvStore;

/// The frame's event name on `/events`.
pub const SERVICE_EVENT: &str = gateway_shared::frames::event::SERVICE_EVENT;

/// The most clients one event is published to (a user's clients are capped by
/// `USER_MAX_CLIENTS`; an execution's watchers by the interest record).
const MAX_TARGETS: usize = 256;

/// What the route needs.
#[derive(Clone)]
pub struct ServiceEventsState {
    /// Client records, user indexes, interest.
    pub kv: Arc<dyn KvStore>,
    /// Where frames go.
    pub bus: Arc<dyn Bus>,
    /// `GATEWAY_INTERNAL_TOKEN`.
    pub service_token: Option<Secret>,
    /// The largest body.
    pub body_limit: BodyLimit,
}

/// The route (internal listener).
pub fn router() -> Router<ServiceEventsState> {
    Router::new().route("/api/internal/events", post(publish))
}

/// Checks `Authorization: Bearer` against the service token in constant time: 403 for a
/// wrong one, 503 when no token is configured.
pub fn check_service_token(headers: &HeaderMap, token: Option<&Secret>) -> Result<(), AppError> {
    let Some(token) = token else {
        return Err(AppError::Unavailable {
            code: "service_token_not_configured",
            message: "GATEWAY_INTERNAL_TOKEN is not set: services cannot be authenticated".into(),
        });
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or_default();
    if secrets_equal(presented.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(AppError::forbidden(
            "invalid_service_token",
            "service token refused",
        ))
    }
}

/// True for an event name a service may use: `[a-z0-9._-]{1,64}`.
pub fn is_valid_event_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// The body of `POST /api/internal/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    service: String,
    event: String,
    #[serde(default)]
    data: Value,
    client_id: Option<String>,
    user_id: Option<String>,
    execution_id: Option<String>,
}

/// Who a service addresses: a client (of a user, when both are named), a user's active
/// clients, or an execution's watchers; resolved to client ids, at most 256.
pub async fn resolve_targets(
    kv: &dyn KvStore,
    client_id: Option<&str>,
    user_id: Option<&str>,
    execution_id: Option<&str>,
) -> Result<Vec<ClientId>, AppError> {
    let not_found = || AppError::not_found("client_not_found", "no such client of that user");
    let mut out = match (client_id, user_id, execution_id) {
        (Some(c), user, None) => {
            let id = ClientId::parse(c).map_err(|_| not_found())?;
            let record = clients::get(kv, &id).await?.ok_or_else(not_found)?;
            if user.is_some_and(|u| u != record.user_id) {
                return Err(not_found());
            }
            vec![id]
        }
        (None, Some(u), None) => clients::active_clients_of(kv, u).await?,
        (None, None, Some(e)) => {
            let id = ExecutionId::parse(e).map_err(|_| {
                AppError::bad_request("invalid_execution_id", "execution_id is not an id")
            })?;
            crate::interest::interested_clients(kv, &id).await?
        }
        _ => {
            return Err(AppError::bad_request(
                "invalid_target",
                "name exactly one of client_id, user_id or execution_id (client_id may come with its user_id)",
            ))
        }
    };
    out.truncate(MAX_TARGETS);
    Ok(out)
}

/// Documentation of `POST /api/internal/events`'s body.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct EventDoc {
    /// The service (`[a-z0-9_-]`).
    service: String,
    /// The event's name (`[a-z0-9._-]`, 1–64: `run.start`, `node.complete`, …).
    event: String,
    /// Any JSON.
    #[schema(value_type = Option<Object>)]
    data: Option<Value>,
    /// One client (with `user_id`: it must be that user's).
    client_id: Option<String>,
    /// Every active client of the user.
    user_id: Option<String>,
    /// Everyone watching this NoETL execution.
    execution_id: Option<String>,
}

/// Documentation of the answer.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct PublishedDoc {
    /// How many clients the frame was published for.
    delivered_to: u64,
}

#[utoipa::path(
    post, path = "/api/internal/events", tag = "internal",
    request_body = EventDoc,
    security(("callback_token" = [])),
    responses(
        (status = 202, description = "Published as a `service/event` frame to each target client's stream (retained, replayed)", body = PublishedDoc),
        (status = 400, description = "`invalid_json`, `invalid_service`, `invalid_event`, `invalid_target`, `invalid_execution_id`", body = gateway_shared::error::ErrorBody),
        (status = 403, description = "`invalid_service_token`", body = gateway_shared::error::ErrorBody),
        (status = 404, description = "`client_not_found`", body = gateway_shared::error::ErrorBody),
        (status = 413, description = "`payload_too_large`", body = gateway_shared::error::ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = gateway_shared::error::ErrorBody),
        (status = 503, description = "`service_token_not_configured`, `store_unavailable`, `bus_unavailable`", body = gateway_shared::error::ErrorBody),
    )
)]
pub(crate) async fn publish(
    State(state): State<ServiceEventsState>,
    req: Request,
) -> Result<Response, AppError> {
    let refused = |e: AppError| {
        crate::metrics::global().service_event("rejected");
        e
    };
    check_service_token(req.headers(), state.service_token.as_ref()).map_err(refused)?;
    let b: EventBody = read_json(req, state.body_limit.0).await.map_err(refused)?;
    if !crate::services::is_valid_name(&b.service) {
        return Err(refused(AppError::bad_request(
            "invalid_service",
            "service must be a service name ([a-z0-9_-], at most 32)",
        )));
    }
    if !is_valid_event_name(&b.event) {
        return Err(refused(AppError::bad_request(
            "invalid_event",
            "event must be 1–64 characters of [a-z0-9._-]",
        )));
    }
    let targets = resolve_targets(
        state.kv.as_ref(),
        b.client_id.as_deref(),
        b.user_id.as_deref(),
        b.execution_id.as_deref(),
    )
    .await
    .map_err(refused)?;
    let frame = Bytes::from(notification(
        SERVICE_EVENT,
        &json!({"service": b.service, "event": b.event, "data": b.data}),
    ));
    let mut delivered = 0usize;
    for client in &targets {
        if let Err(e) = state
            .bus
            .publish(client, SERVICE_EVENT, frame.clone())
            .await
        {
            crate::metrics::global().service_event("failed");
            tracing::warn!(client = %client, service = %b.service, error = %e, "service event not published");
            return Err(AppError::Unavailable {
                code: "bus_unavailable",
                message: format!(
                    "published to {delivered} of {} clients, then: {e}",
                    targets.len()
                ),
            });
        }
        delivered += 1;
    }
    crate::metrics::global().service_event("published");
    tracing::info!(service = %b.service, event = %b.event, clients = delivered, "service event published");
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "delivered_to": delivered }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_lowercase_dotted_tokens() {
        for ok in ["run.start", "node.complete", "heartbeat", "a-b_c.1"] {
            assert!(is_valid_event_name(ok), "{ok}");
        }
        for bad in ["", "Run", "a/b", "a b", &"x".repeat(65), "stream/reset"] {
            assert!(!is_valid_event_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_service_token_is_required_and_compared() {
        let token: Secret = "0123456789abcdef0123".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(check_service_token(&h, None).unwrap_err().status(), 503);
        assert_eq!(
            check_service_token(&h, Some(&token)).unwrap_err().status(),
            403
        );
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef0123".parse().unwrap(),
        );
        assert!(check_service_token(&h, Some(&token)).is_ok());
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef0124".parse().unwrap(),
        );
        assert!(check_service_token(&h, Some(&token)).is_err());
    }
}

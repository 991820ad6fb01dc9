//! Playbook callbacks on the internal listener (PROTOCOL.md §4): results and progress that
//! NoETL's playbooks POST back, turned into frames for the waiting client.
//!
//! Nothing that arrives is lost: a result is published to the client's bus subject, which
//! retains it, so a client that is offline gets it when it (re)connects — whichever
//! replica handled the callback. A repeated callback for a delivered request is a no-op
//! (an atomic marker in the request store), so NoETL may retry freely. If the frame cannot
//! be published, the marker is removed and the callback answered 503, so NoETL's retry
//! delivers it later. A marker whose creation failed is removed too: a create that timed
//! out while NATS was away may still be carried out when the connection comes back (the
//! client sends what it buffered), and a marker left that way would answer NoETL's retry
//! "duplicate" for a result never delivered. The removal is sent after the create on the
//! same connection, so it lands after it.
//!
//! Auth: `Authorization: Bearer` with either the service token (`GATEWAY_INTERNAL_TOKEN`) or
//! the request's own callback token (HMAC over the request id); both compared in constant
//! time. No service token configured and no valid request token → 503 (never a permissive
//! default). The header is checked before any of the body is read: the service token
//! passes, and a token that cannot be a request token (64 hex digits) is refused at once;
//! a request token is checked against the body's `request_id` before anything else is done.
//!
//! Size: every body admitted can be published. The limit is `CALLBACK_BODY_LIMIT`, lowered
//! at start to what one NATS message carries ([`effective_body_limit`]: the server's
//! `max_payload` less the frame's headers and [`FRAME_RESERVE`]); a declared
//! `Content-Length` over it is refused before the body is read; and a frame that still
//! comes out too large (the JSON-RPC envelope around it) is refused too. All of these are
//! 413 — never the 503 that NoETL retries forever.
//!
//! Order: the result is a request's last frame. Progress for a request whose result was
//! delivered (its `delivered` marker exists) is refused 409 `request_finished` and not
//! published.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use gateway_shared::ct::secrets_equal;
use gateway_shared::error::ErrorBody;
use gateway_shared::frames::{event, notification, CallbackBody, PlaybookProgress, ProgressBody};
use gateway_shared::ids::{ExecutionId, RequestId};
use gateway_shared::session::bearer_token;
use serde_json::json;

use crate::bus::Bus;
use crate::clients;
use crate::config::Secret;
use crate::error::{json_response, AppError};
use crate::extract::{is_json_content_type, parse_json, read_body_limited, BodyLimit};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::requests::{self, CallbackTokens, RequestEntry};
use crate::scrub::Scrubber;
use crate::store::{Bucket, KvStore};

/// What the callback routes need, and nothing else.
#[derive(Clone)]
pub struct CallbackState {
    /// Request entries, `delivered` markers, sync results.
    pub kv: Arc<dyn KvStore>,
    /// Where result and progress frames go.
    pub bus: Arc<dyn Bus>,
    /// This replica's open streams (a result for an online client is logged as such).
    pub hub: Arc<Hub>,
    /// Per-request callback tokens (HMAC over the request id).
    pub tokens: CallbackTokens,
    /// `GATEWAY_INTERNAL_TOKEN`, the service token, if configured.
    pub service_token: Option<Secret>,
    /// `CALLBACK_BODY_LIMIT`.
    pub body_limit: BodyLimit,
    /// Counts callbacks (`gateway_callbacks_total{outcome}`).
    pub metrics: Arc<Metrics>,
}

/// The callback routes (internal listener only), each answer counted by its outcome.
pub fn router() -> Router<CallbackState> {
    Router::new()
        .route("/api/internal/callback", post(sync_callback))
        .route("/api/internal/callback/async", post(async_callback))
        .route("/api/internal/progress", post(progress))
        .route_layer(middleware::from_fn(count_outcome))
}

/// A callback answered as a duplicate (a response extension [`count_outcome`] reads).
#[derive(Debug, Clone, Copy)]
struct Duplicate;

/// Counts each callback by outcome: `rejected` (any error answer), `kept` (202: the client
/// is offline, the frame waits on the bus), `duplicate`, else `delivered`.
async fn count_outcome(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let outcome = if resp.extensions().get::<Duplicate>().is_some() {
        "duplicate"
    } else if resp.status().is_client_error() || resp.status().is_server_error() {
        "rejected"
    } else if resp.status() == StatusCode::ACCEPTED {
        "kept"
    } else {
        "delivered"
    };
    crate::metrics::global().callback(outcome);
    resp
}

/// What the `Authorization` header showed before the body was read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Presented {
    /// The service token: any request id.
    Service,
    /// A token shaped like a request's own (checked against the body's `request_id`).
    RequestToken(String),
}

/// Checks the bearer token as far as the headers allow, before any of the body is read:
/// the service token passes; a token that cannot be any request's token (a callback token
/// is 64 hex digits) is refused as [`authorize`] would refuse it.
fn pre_authorize(state: &CallbackState, parts: &Parts) -> Result<Presented, AppError> {
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if let (Some(token), Some(service)) = (presented, &state.service_token) {
        if secrets_equal(token.as_bytes(), service.expose().as_bytes()) {
            return Ok(Presented::Service);
        }
    }
    match presented {
        Some(token) if token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Presented::RequestToken(token.to_owned()))
        }
        _ => Err(refusal(state)),
    }
}

/// The refusal for a token that is neither the service token nor the request's: 403, or
/// 503 when no service token is configured (never a permissive default).
fn refusal(state: &CallbackState) -> AppError {
    if state.service_token.is_none() {
        return AppError::Unavailable {
            code: "callbacks_not_configured",
            message: "GATEWAY_INTERNAL_TOKEN is not set and no valid request token was presented"
                .into(),
        };
    }
    AppError::forbidden("invalid_callback_token", "callback token refused")
}

/// Checks the token (as far as the headers allow), then reads a JSON body within the
/// callback limit (`read_body_limited` refuses a declared `Content-Length` over it before
/// any byte is read, as `app.rs`'s declared-limit layer already has).
async fn read_json<T: serde::de::DeserializeOwned>(
    state: &CallbackState,
    req: Request,
) -> Result<(Presented, T), AppError> {
    let (parts, body) = req.into_parts();
    let presented = pre_authorize(state, &parts)?;
    if !is_json_content_type(&parts.headers) {
        return Err(AppError::UnsupportedMediaType);
    }
    let bytes = read_body_limited(body, state.body_limit.0).await?;
    Ok((presented, parse_json(&bytes)?))
}

/// Checks the presented token against the request: the service token passed already; a
/// request token must be the HMAC of this request id.
fn authorize(
    state: &CallbackState,
    presented: &Presented,
    request_id: &str,
) -> Result<(), AppError> {
    match presented {
        Presented::Service => Ok(()),
        Presented::RequestToken(token) if state.tokens.verify(request_id, token) => Ok(()),
        Presented::RequestToken(_) => Err(refusal(state)),
    }
}

/// The callback body limit: `CALLBACK_BODY_LIMIT`, lowered so that every body it admits
/// fits one bus frame (NATS `max_payload` less the frame's headers and [`FRAME_RESERVE`]).
/// Logged when lowered. Read at start, from the server the bus is connected to.
pub fn effective_body_limit(configured: usize, bus: &dyn Bus) -> BodyLimit {
    let max = [event::RESULT, event::PROGRESS]
        .into_iter()
        .filter_map(|e| bus.max_data_len(e))
        .min();
    let Some(max) = max else {
        return BodyLimit(configured);
    };
    let fits = max.saturating_sub(FRAME_RESERVE);
    if fits < configured {
        tracing::warn!(
            configured,
            effective = fits,
            nats_max_data = max,
            "CALLBACK_BODY_LIMIT lowered to what one NATS message can carry (max_payload less the frame's envelope); raise max_payload to accept larger callbacks"
        );
        return BodyLimit(fits);
    }
    BodyLimit(configured)
}

/// What a frame adds to a callback body at most, besides its size: the JSON-RPC envelope,
/// the request and execution ids, and the K/V headers of a sync result (well under this).
pub const FRAME_RESERVE: usize = 1024;

/// 413 unless `data` fits one frame of `event` on the bus.
fn check_frame_fits(state: &CallbackState, event: &str, data: &[u8]) -> Result<(), AppError> {
    match state.bus.max_data_len(event) {
        Some(max) if data.len() > max => Err(AppError::PayloadTooLarge { limit: max as u64 }),
        _ => Ok(()),
    }
}

/// The body's `request_id`, checked once here: every later use takes the [`RequestId`].
fn parse_request_id(request_id: &str) -> Result<RequestId, AppError> {
    RequestId::parse(request_id)
        .map_err(|_| AppError::bad_request("invalid_field", "request_id is not a valid request id"))
}

async fn entry_for(
    state: &CallbackState,
    request_id: &RequestId,
) -> Result<RequestEntry, AppError> {
    requests::get(state.kv.as_ref(), request_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no pending request {request_id}")))
}

/// A callback's or progress report's acknowledgement.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct CallbackAck {
    /// `delivered`, `queued` (202: the client is offline) or `duplicate`.
    pub status: String,
}

/// `POST /api/internal/callback/async`: a playbook's result for an SSE client.
#[utoipa::path(
    post, path = "/api/internal/callback/async", tag = "internal",
    request_body = CallbackBody,
    security(("callback_token" = [])),
    responses(
        (status = 200, description = "`delivered`, or `duplicate` for a result already delivered", body = CallbackAck),
        (status = 202, description = "`queued`: the client is offline; the frame is delivered when it reconnects", body = CallbackAck),
        (status = 400, description = "`invalid_json`, `invalid_field` (`request_id`)", body = ErrorBody),
        (status = 403, description = "`invalid_callback_token`: neither the service token nor the request's callback token", body = ErrorBody),
        (status = 404, description = "`not_found`: no pending request with this `request_id`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: over `CALLBACK_BODY_LIMIT` or what one NATS message carries", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "The bus or store is unavailable (retry), or no service token is configured", body = ErrorBody),
    )
)]
async fn async_callback(
    State(state): State<CallbackState>,
    req: Request,
) -> Result<Response, AppError> {
    let (presented, body): (_, CallbackBody) = read_json(&state, req).await?;
    authorize(&state, &presented, &body.request_id)?;
    let kv = state.kv.as_ref();
    // The entry read and the `delivered` marker are independent round trips: made
    // concurrently, so the frame leaves one round trip sooner. An unknown request's marker
    // is taken back, so it cannot block a later, real callback.
    let request_id = parse_request_id(&body.request_id)?;
    let (entry, first) = tokio::join!(
        entry_for(&state, &request_id),
        requests::mark_delivered(kv, &request_id)
    );
    let entry = match entry {
        Ok(entry) => entry,
        Err(e) => {
            match first {
                Ok(true) => {
                    let _ = requests::unmark_delivered(kv, &request_id).await;
                }
                Err(_) => forget_unknown_marker(&state, &request_id),
                Ok(false) => {}
            }
            return Err(e);
        }
    };
    let first = match first {
        Ok(first) => first,
        Err(e) => {
            forget_unknown_marker(&state, &entry.request_id);
            return Err(e.into());
        }
    };
    if !first {
        tracing::info!(request = %entry.request_id, "duplicate callback ignored");
        let mut resp = json_response(StatusCode::OK, &json!({"status": "duplicate"}));
        resp.extensions_mut().insert(Duplicate);
        return Ok(resp);
    }
    let mut result = body.to_result();
    // A playbook may echo its workload: the client never gets what the gateway injected.
    scrubber_for(&state, &entry.request_id).scrub_result(&mut result);
    if result.execution_id.is_none() {
        result.execution_id = entry.execution_id.as_ref().map(ToString::to_string);
    }
    let Some(client_id) = entry.client_id.clone() else {
        tracing::info!(request = %entry.request_id, "result for a request without a client; nothing to deliver");
        return Ok(json_response(
            StatusCode::OK,
            &json!({"status": "delivered", "client": null}),
        ));
    };
    let data = Bytes::from(notification(event::RESULT, &result));
    // Too big for one NATS message: 413, which NoETL does not retry (a 503 would loop).
    if let Err(e) = check_frame_fits(&state, event::RESULT, &data) {
        let _ = requests::unmark_delivered(kv, &entry.request_id).await;
        tracing::warn!(request = %entry.request_id, frame = data.len(), "result too large for one frame; refused");
        return Err(e);
    }
    if let Err(e) = state.bus.publish(&client_id, event::RESULT, data).await {
        let _ = requests::unmark_delivered(kv, &entry.request_id).await;
        return Err(AppError::Unavailable {
            code: "bus_unavailable",
            message: format!("result not stored, retry: {e}"),
        });
    }
    // The client's pending list is bookkeeping for its next init frame, not delivery: it
    // is updated after the answer (a read-modify-write, two round trips), so NoETL's
    // callback — and the next one a playbook runner sends — does not wait for it.
    {
        let (kv, client_id, request_id) = (
            state.kv.clone(),
            client_id.clone(),
            entry.request_id.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = clients::remove_pending(kv.as_ref(), &client_id, &request_id).await {
                tracing::warn!(error = %e, request = %request_id, "pending list not updated");
            }
        });
    }
    let online = state.hub.is_connected(&client_id)
        || clients::is_present(kv, &client_id).await.unwrap_or(false);
    tracing::info!(request = %entry.request_id, client = %client_id, online, status = %result.status, "result published");
    Ok(if online {
        json_response(StatusCode::OK, &json!({"status": "delivered"}))
    } else {
        json_response(StatusCode::ACCEPTED, &json!({"status": "queued"}))
    })
}

/// Removes the `delivered` marker of a create whose outcome is unknown (it failed, maybe
/// only by timing out), without holding the callback's answer: the delete may itself wait
/// for NATS to come back.
fn forget_unknown_marker(state: &CallbackState, request_id: &RequestId) {
    let kv = state.kv.clone();
    let request_id = request_id.clone();
    tokio::spawn(async move {
        if let Err(e) = requests::unmark_delivered(kv.as_ref(), &request_id).await {
            tracing::warn!(request = %request_id, error = %e, "delivered marker of a failed create not removed");
        }
    });
}

/// `POST /api/internal/callback`: the answer a gateway request is waiting for (auth
/// playbooks). Stored under `result.<request_id>`; the waiting replica watches that key.
#[utoipa::path(
    post, path = "/api/internal/callback", tag = "internal",
    request_body = CallbackBody,
    security(("callback_token" = [])),
    responses(
        (status = 200, description = "`delivered`, or `duplicate` for a result already stored", body = CallbackAck),
        (status = 400, description = "`invalid_json`, `invalid_field` (`request_id`)", body = ErrorBody),
        (status = 403, description = "`invalid_callback_token`: neither the service token nor the request's callback token", body = ErrorBody),
        (status = 404, description = "`not_found`: no pending request with this `request_id`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: over `CALLBACK_BODY_LIMIT` or what one NATS message carries", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "The bus or store is unavailable (retry), or no service token is configured", body = ErrorBody),
    )
)]
async fn sync_callback(
    State(state): State<CallbackState>,
    req: Request,
) -> Result<Response, AppError> {
    let (presented, body): (_, serde_json::Value) = read_json(&state, req).await?;
    let request_id = body["request_id"].as_str().unwrap_or_default().to_owned();
    authorize(&state, &presented, &request_id)?;
    let entry = entry_for(&state, &parse_request_id(&request_id)?).await?;
    let value = Bytes::from(body.to_string());
    // The K/V value is one NATS message too (its headers are within FRAME_RESERVE).
    if let Some(max) = state.bus.max_data_len(event::RESULT) {
        if value.len() > max.saturating_sub(FRAME_RESERVE / 2) {
            return Err(AppError::PayloadTooLarge { limit: max as u64 });
        }
    }
    let created = state
        .kv
        .create(
            Bucket::Requests,
            &format!("result.{}", entry.request_id),
            value,
        )
        .await?;
    let status = if created { "delivered" } else { "duplicate" };
    let mut resp = json_response(StatusCode::OK, &json!({"status": status}));
    if !created {
        resp.extensions_mut().insert(Duplicate);
    }
    Ok(resp)
}

/// What a request's frames are scrubbed with: secret keys, and the request's own callback
/// token wherever it appears (a playbook may render it into its data or messages).
fn scrubber_for(state: &CallbackState, request_id: &RequestId) -> Scrubber {
    Scrubber::deriving_tokens(state.tokens.clone())
        .also(state.tokens.token_for(request_id.as_str()))
}

/// `POST /api/internal/progress`: a `playbook/progress` frame for the request's client.
#[utoipa::path(
    post, path = "/api/internal/progress", tag = "internal",
    request_body = ProgressBody,
    security(("callback_token" = [])),
    responses(
        (status = 200, description = "`delivered`", body = CallbackAck),
        (status = 202, description = "`queued`: the client is offline", body = CallbackAck),
        (status = 409, description = "`request_finished`: the request's result was already delivered", body = ErrorBody),
        (status = 400, description = "`invalid_json`, `invalid_field` (`request_id`)", body = ErrorBody),
        (status = 403, description = "`invalid_callback_token`: neither the service token nor the request's callback token", body = ErrorBody),
        (status = 404, description = "`not_found`: no pending request with this `request_id`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: over `CALLBACK_BODY_LIMIT` or what one NATS message carries", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "The bus or store is unavailable (retry), or no service token is configured", body = ErrorBody),
    )
)]
async fn progress(State(state): State<CallbackState>, req: Request) -> Result<Response, AppError> {
    let (presented, body): (_, ProgressBody) = read_json(&state, req).await?;
    authorize(&state, &presented, &body.request_id)?;
    let entry = entry_for(&state, &parse_request_id(&body.request_id)?).await?;
    // The result is the request's last frame: progress after it would confuse the client.
    if requests::is_delivered(state.kv.as_ref(), &entry.request_id).await? {
        return Ok(json_response(
            StatusCode::CONFLICT,
            &ErrorBody::new(
                "request_finished",
                format!(
                    "request {} already has its result; progress refused",
                    entry.request_id
                ),
            ),
        ));
    }
    let Some(client_id) = entry.client_id else {
        return Ok(json_response(
            StatusCode::OK,
            &json!({"status": "delivered", "client": null}),
        ));
    };
    let mut message = body.message;
    if let Some(m) = message.as_mut() {
        scrubber_for(&state, &entry.request_id).redact_text(m);
    }
    let params = PlaybookProgress {
        request_id: entry.request_id.to_string(),
        execution_id: body
            .execution_id
            .or(entry.execution_id.map(ExecutionId::into_string)),
        step: body.step,
        message,
        progress: body
            .progress
            .filter(|p| p.is_finite())
            .map(|p| p.clamp(0.0, 1.0)),
    };
    let data = Bytes::from(notification(event::PROGRESS, &params));
    check_frame_fits(&state, event::PROGRESS, &data)?;
    state
        .bus
        .publish(&client_id, event::PROGRESS, data)
        .await
        .map_err(|e| AppError::Unavailable {
            code: "bus_unavailable",
            message: format!("progress not stored, retry: {e}"),
        })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "delivered"}),
    ))
}

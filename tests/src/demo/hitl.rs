//! The human-in-the-loop side: `/ask` puts a question to a user's client through the
//! gateway, `/answers` takes the gateway's deliveries and `GET /answers/{id}` shows what
//! arrived; `/emit` sends a service event through the gateway. `/_demo/*` is test control
//! (every delivery, and where the gateway is).
//!
//! What the service tells the gateway about the user comes only from the identity header
//! the gateway set (`x-noetl-user-id`), never from the body: the gateway then refuses a
//! question for a client that is not that user's.

use super::answers::{Delivery, Refusals};
use super::app::Shared;
use super::config::check_http_url;
use super::error::{DemoError, JsonBody};
use super::gateway::{Relayed, Target};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The identity header the gateway sets on every proxied request.
pub const USER_ID_HEADER: &str = "x-noetl-user-id";

/// Body of `POST /ask`.
#[derive(Debug, Deserialize)]
pub struct AskBody {
    /// The client (an `/events` stream of the calling user) that gets the question.
    pub client_id: String,
    /// The question.
    pub prompt: String,
    /// The allowed answers (none: any text).
    pub options: Option<Vec<String>>,
    /// How long the question stays open (the gateway's default when absent).
    pub timeout_seconds: Option<u64>,
    /// Free-form context shown with the question.
    pub context: Option<Value>,
}

/// `POST /ask`: asks through the gateway's `POST /api/internal/questions` with `service` =
/// this service's name, `user_id` = the `x-noetl-user-id` header received and
/// `reply_to.url` = `<public-url>/answers`; relays the gateway's answer (201
/// `{"question_id","expires_at"}`, or its error with its status). Without the header: 401
/// `missing_identity` (call it through the gateway).
pub async fn ask(
    State(state): State<Shared>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AskBody>,
) -> Result<Response, DemoError> {
    let user_id = match headers.get(USER_ID_HEADER).map(|v| v.to_str()) {
        Some(Ok(id)) if !id.is_empty() => id.to_owned(),
        Some(_) => {
            return Err(DemoError::bad_request(
                "invalid_identity",
                format!("{USER_ID_HEADER} is not a readable string"),
            ))
        }
        None => {
            return Err(DemoError::new(
                StatusCode::UNAUTHORIZED,
                "missing_identity",
                format!("no {USER_ID_HEADER} header: call this route through the gateway"),
            ))
        }
    };
    let mut question = json!({
        "service": state.name,
        "client_id": body.client_id,
        "user_id": user_id,
        "prompt": body.prompt,
        "reply_to": {"url": format!("{}/answers", state.public_url)},
    });
    if let Some(options) = body.options {
        question["options"] = json!(options);
    }
    if let Some(t) = body.timeout_seconds {
        question["timeout_seconds"] = json!(t);
    }
    if let Some(c) = body.context {
        question["context"] = c;
    }
    let relayed = state
        .gateway
        .post("/api/internal/questions", &question)
        .await?;
    tracing::info!(
        client_id = %body.client_id,
        %user_id,
        status = relayed.status.as_u16(),
        question_id = relayed.body["question_id"].as_str().unwrap_or(""),
        "asked"
    );
    Ok(relay(relayed))
}

/// `POST /answers`: one delivery from the gateway (`idempotency-key` header, body
/// `{"question_id","status":"answered"|"expired",…}`); recorded, 200. A body without a
/// `question_id` or a known `status` is 400 `invalid_delivery` and not recorded; while
/// refusals are pending (`POST /_demo/refuse-answers`), a delivery is answered
/// `delivery_refused` with the asked status and not recorded.
pub async fn receive_answer(
    State(state): State<Shared>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, DemoError> {
    let key = headers
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let question_id = body["question_id"].as_str().unwrap_or("").to_owned();
    let status = body["status"].as_str().unwrap_or("").to_owned();
    let refused = state
        .refusals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(code) = refused {
        tracing::info!(%question_id, code, "delivery refused, as asked");
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Err(DemoError::new(
            code,
            "delivery_refused",
            "refused on purpose (POST /_demo/refuse-answers)",
        ));
    }
    state
        .answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(key.clone(), body)
        .map_err(|e| DemoError::bad_request("invalid_delivery", e))?;
    tracing::info!(%question_id, %status, idempotency_key = key.as_deref().unwrap_or(""), "answer delivered");
    Ok(Json(
        json!({"question_id": question_id, "status": "recorded"}),
    ))
}

/// `GET /answers/{question_id}`: 200 `{"question_id","status":"answered","answer","user",…}`
/// (`user` = `{user_id, email}`) or `{…,"status":"expired","answer":null,"user":null}`;
/// 404 `answer_not_found` while nothing was delivered.
pub async fn answer_of(
    State(state): State<Shared>,
    Path(question_id): Path<String>,
) -> Result<Json<Value>, DemoError> {
    let answers = state.answers.lock().unwrap_or_else(|p| p.into_inner());
    answers
        .outcome(&question_id)
        .map(|o| Json(o.to_json()))
        .ok_or_else(|| {
            DemoError::not_found(
                "answer_not_found",
                format!("no answer to {question_id:?} has arrived"),
            )
        })
}

/// Body of `POST /emit`: the target (exactly one of the three, or `user_id` with
/// `client_id`; the gateway decides), the event name and its data.
#[derive(Debug, Deserialize)]
pub struct EmitBody {
    /// One client.
    pub client_id: Option<String>,
    /// Every client of a user (or, with `client_id`, that client only if it is theirs).
    pub user_id: Option<String>,
    /// Everyone watching a run.
    pub execution_id: Option<String>,
    /// The event name (`[a-z0-9._-]{1,64}`, checked by the gateway).
    pub event: String,
    /// Any JSON (null when absent).
    #[serde(default)]
    pub data: Value,
}

/// `POST /emit`: relays the event to the gateway's `POST /api/internal/events` with
/// `service` = this service's name; answers what the gateway answered (202
/// `{"delivered_to":n}`, or its error with its status).
pub async fn emit(
    State(state): State<Shared>,
    JsonBody(body): JsonBody<EmitBody>,
) -> Result<Response, DemoError> {
    let mut event = Map::new();
    event.insert("service".into(), json!(state.name));
    for (k, v) in [
        ("client_id", body.client_id),
        ("user_id", body.user_id),
        ("execution_id", body.execution_id),
    ] {
        if let Some(v) = v {
            event.insert(k.into(), json!(v));
        }
    }
    event.insert("event".into(), json!(body.event));
    event.insert("data".into(), body.data);
    let relayed = state
        .gateway
        .post("/api/internal/events", &Value::Object(event))
        .await?;
    tracing::info!(event = %body.event, status = relayed.status.as_u16(), "emitted");
    Ok(relay(relayed))
}

/// `GET /_demo/deliveries`: `[{question_id, idempotency_key, body}]`, every delivery kept,
/// oldest first, duplicates included.
pub async fn deliveries(State(state): State<Shared>) -> Json<Vec<Delivery>> {
    Json(
        state
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deliveries(),
    )
}

/// Body of `POST /_demo/gateway`.
#[derive(Debug, Deserialize)]
pub struct GatewayBody {
    /// The gateway's internal listener, e.g. `http://127.0.0.1:8091`.
    pub url: String,
    /// Its service token.
    pub token: Option<String>,
}

/// `POST /_demo/gateway` `{"url","token"?}`: aims `/ask` and `/emit` at that gateway
/// (test control: the origin's internal URL is known only after the origin started,
/// which needs this service's URL first). 200 `{"url"}`; a URL that is not http(s) is 400.
pub async fn set_gateway(
    State(state): State<Shared>,
    JsonBody(body): JsonBody<GatewayBody>,
) -> Result<Json<Value>, DemoError> {
    check_http_url(&body.url).map_err(|e| DemoError::bad_request("invalid_url", e))?;
    let url = body.url.trim_end_matches('/').to_owned();
    state.gateway.set_target(Target {
        url: url.clone(),
        token: body.token,
    });
    tracing::info!(%url, "gateway set");
    Ok(Json(json!({"url": url})))
}

/// Body of `POST /_demo/refuse-answers`.
#[derive(Debug, Deserialize)]
pub struct RefuseBody {
    /// How many of the next deliveries to refuse (0 stops refusing).
    pub count: u32,
    /// The status to answer them (400–599; default 503).
    pub status: Option<u16>,
}

/// `POST /_demo/refuse-answers` `{"count","status"?}`: the next `count` deliveries to
/// `POST /answers` fail with `status` and are not recorded (test control: the gateway must
/// retry until one is taken). 200 `{"remaining","status","refused"}`.
pub async fn refuse_answers(
    State(state): State<Shared>,
    JsonBody(body): JsonBody<RefuseBody>,
) -> Result<Json<Refusals>, DemoError> {
    let status = body.status.unwrap_or(503);
    if !(400..=599).contains(&status) {
        return Err(DemoError::bad_request(
            "invalid_status",
            "status is an error status, 400 to 599",
        ));
    }
    let mut refusals = state.refusals.lock().unwrap_or_else(|p| p.into_inner());
    refusals.refuse_next(body.count, status);
    Ok(Json(*refusals))
}

/// `GET /_demo/refuse-answers`: `{"remaining","status","refused"}`.
pub async fn refusals(State(state): State<Shared>) -> Json<Refusals> {
    Json(*state.refusals.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The gateway's answer as this service's answer: same status, same JSON body.
fn relay(relayed: Relayed) -> Response {
    (relayed.status, Json(relayed.body)).into_response()
}

//! The auth REST API (PROTOCOL.md §1): login, validate, check-access, logout.
//!
//! Handlers only translate HTTP to [`SessionService`](super::session::SessionService)
//! calls and back; the field names are the compat ones existing SPA clients use.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use gateway_shared::session::{is_well_formed_token, SessionHash, SessionRecord, User};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;

use super::session::PERMISSIONS;
use crate::app::AppState;
use crate::edge::EdgeIdentity;
use crate::error::{json_response, AppError};
use crate::extract::{
    is_json_content_type, parse_json, read_body_limited, request_token, JsonBody,
};

/// Longest playbook path accepted in an access check.
const MAX_PLAYBOOK_PATH: usize = 512;

/// The auth routes, mounted on the public listener.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/auth/login", post(login))
        .route("/api/auth/validate", post(validate))
        .route("/api/auth/check-access", post(check_access))
        .route("/api/auth/logout", post(logout))
}

#[derive(Debug, Deserialize)]
struct LoginBody {
    auth0_token: Option<String>,
    /// Newer clients' name for the same token.
    id_token: Option<String>,
    #[allow(dead_code)] // accepted for compat; the gateway does not refresh Auth0 tokens
    auth0_refresh_token: Option<String>,
    #[allow(dead_code)]
    client_user_agent: Option<String>,
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Response, AppError> {
    let token = body
        .auth0_token
        .or(body.id_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AppError::bad_request("missing_token", "auth0_token is required"))?;
    let ok = state.sessions.login(&token, &peer.ip().to_string()).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "status": "authenticated",
            "session_token": ok.session_token,
            "user": ok.record.user,
            "expires_at": ok.record.expires_at,
            "message": "Authentication successful",
        }),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct TokenBody {
    session_token: Option<String>,
}

/// The session token from a JSON body (optional: it may come in a header instead) or the
/// request's header, cookie or query.
async fn body_or_request_token<T>(
    state: &AppState,
    req: Request,
) -> Result<(T, Option<String>), AppError>
where
    T: for<'de> Deserialize<'de> + Default + HasToken,
{
    let (parts, body) = req.into_parts();
    let bytes = read_body_limited(body, state.config.auth_body_limit).await?;
    let parsed: T = if bytes.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else if is_json_content_type(&parts.headers) {
        parse_json(&bytes)?
    } else {
        return Err(AppError::UnsupportedMediaType);
    };
    let token = parsed.token().or_else(|| request_token(&parts));
    Ok((parsed, token))
}

trait HasToken {
    fn token(&self) -> Option<String>;
}

impl HasToken for TokenBody {
    fn token(&self) -> Option<String> {
        self.session_token.clone().filter(|t| !t.is_empty())
    }
}

async fn validate(State(state): State<AppState>, req: Request) -> Result<Response, AppError> {
    state.metrics.validate_requests.inc();
    let (_, token) = body_or_request_token::<TokenBody>(&state, req).await?;
    let record = match token.filter(|t| is_well_formed_token(t)) {
        Some(t) => state.sessions.validate(&t).await?,
        None => {
            return Ok(invalid_session(
                "missing_token",
                "no session token in the request",
            ))
        }
    };
    Ok(match record {
        Some(r) => json_response(
            StatusCode::OK,
            &json!({"valid": true, "user": r.user, "expires_at": r.expires_at, "message": "Session is valid"}),
        ),
        None => invalid_session(
            "invalid_session",
            "session is invalid, expired or logged out",
        ),
    })
}

/// The validate route's 401: the compat fields plus the protocol's error object.
fn invalid_session(code: &str, message: &str) -> Response {
    json_response(
        StatusCode::UNAUTHORIZED,
        &json!({
            "valid": false, "user": null, "expires_at": null, "message": message,
            "error": {"code": code, "message": message},
        }),
    )
}

#[derive(Debug, Default, Deserialize)]
struct AccessBody {
    session_token: Option<String>,
    playbook_path: Option<String>,
    #[serde(alias = "action")]
    permission_type: Option<String>,
}

impl HasToken for AccessBody {
    fn token(&self) -> Option<String> {
        self.session_token.clone().filter(|t| !t.is_empty())
    }
}

async fn check_access(State(state): State<AppState>, req: Request) -> Result<Response, AppError> {
    let (body, token) = body_or_request_token::<AccessBody>(&state, req).await?;
    let path = body
        .playbook_path
        .filter(|p| is_valid_playbook_path(p))
        .ok_or_else(|| {
            AppError::bad_request(
                "invalid_field",
                "playbook_path is required: 1-512 printable characters",
            )
        })?;
    let permission = body.permission_type.unwrap_or_else(|| "execute".into());
    if !PERMISSIONS.contains(&permission.as_str()) {
        return Err(AppError::bad_request(
            "invalid_field",
            "permission_type must be one of execute, view, modify",
        ));
    }
    let (token, record) = require_session(&state, token).await?;
    let reply = state
        .sessions
        .check_access(&token, &record, &path, &permission)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "allowed": reply.allowed, "user": record.user, "playbook_path": path,
            "permission_type": permission, "message": reply.message,
        }),
    ))
}

async fn logout(State(state): State<AppState>, req: Request) -> Result<Response, AppError> {
    let (_, token) = body_or_request_token::<TokenBody>(&state, req).await?;
    let token = token.filter(|t| is_well_formed_token(t)).ok_or_else(|| {
        AppError::unauthorized("missing_token", "no session token in the request")
    })?;
    state.sessions.logout(&token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A playbook path: 1..=512 characters, no control characters.
pub fn is_valid_playbook_path(p: &str) -> bool {
    !p.is_empty() && p.len() <= MAX_PLAYBOOK_PATH && !p.chars().any(char::is_control)
}

/// The valid session of a request, or 401.
pub async fn require_session(
    state: &AppState,
    token: Option<String>,
) -> Result<(String, SessionRecord), AppError> {
    let token = token
        .filter(|t| is_well_formed_token(t))
        .ok_or_else(|| AppError::unauthorized("missing_token", "a session token is required"))?;
    match state.sessions.validate(&token).await? {
        Some(record) => Ok((token, record)),
        None => Err(AppError::unauthorized(
            "invalid_session",
            "session is invalid, expired or logged out",
        )),
    }
}

/// The caller of a request: the edge's verified assertion when there is one (no second
/// validation), else the session token (header, cookie or query) validated here.
///
/// An assertion is bound to its session: when the request also carries a token, its hash
/// must be the assertion's `sid`, so an assertion cannot lend its identity to another token.
pub async fn require_request_session(
    state: &AppState,
    parts: &Parts,
) -> Result<(String, SessionRecord), AppError> {
    let token = request_token(parts);
    if let Some(EdgeIdentity(claims)) = parts.extensions.get::<EdgeIdentity>() {
        if !claims.sub.is_empty() {
            if let Some(t) = &token {
                if SessionHash::of(t).as_str() != claims.sid {
                    return Err(AppError::unauthorized(
                        "assertion_session_mismatch",
                        "the edge assertion names another session",
                    ));
                }
            }
            let record = SessionRecord {
                user: User {
                    user_id: claims.sub.clone(),
                    email: claims.email.clone(),
                    display_name: String::new(),
                    roles: claims.roles.clone(),
                },
                expires_at: chrono::DateTime::from_timestamp(claims.session_exp, 0)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default(),
                expires_at_unix: claims.session_exp,
                is_active: true,
            };
            if !record.is_honoured(crate::auth::session::now_unix()) {
                return Err(AppError::unauthorized(
                    "invalid_session",
                    "session is expired",
                ));
            }
            return Ok((token.unwrap_or_default(), record));
        }
    }
    require_session(state, token).await
}

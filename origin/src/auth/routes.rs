//! The auth REST API (PROTOCOL.md §1): login, validate, check-access, logout.
//!
//! Handlers only translate HTTP to [`SessionService`]
//! calls and back; the field names are the compat ones existing SPA clients use.
//!
//! Each route's first extractor is its rate limit (`Limited`), per client address
//! ([`ClientIp::key`]): `LOGIN_RATE_LIMIT` for logins, `AUTH_RATE_LIMIT` for the others. A
//! refused request costs a map lookup — no body read, no token hashed, no NoETL call.
//! Requests the edge vouched for (a verified `x-gateway-assertion`, anonymous or not) are
//! not counted here: the edge counted them by the real client address, and its own
//! validations reach the origin from the edge's addresses, which many users share.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::{request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use gateway_shared::error::ErrorBody;
use gateway_shared::session::{is_well_formed_token, SESSION_REFUSED_CHALLENGE};
use serde::Deserialize;
use serde_json::json;

use super::caller::{request_token, Caller};
use super::edge::EdgeIdentity;
use super::session::{is_valid_playbook_path, SessionService, PERMISSIONS};
use crate::error::{json_response, AppError, SESSION_REFUSED_CODE};
use crate::extract::{is_json_content_type, parse_json, read_body_limited, BodyLimit, JsonBody};
use crate::metrics::Metrics;
use crate::ratelimit::{ClientIp, KeyedLimiter};

/// What the auth routes need, and nothing else.
#[derive(Clone, FromRef)]
pub struct AuthRoutesState {
    /// Login, validation, access checks, logout.
    pub sessions: Arc<SessionService>,
    /// `AUTH_BODY_LIMIT`.
    pub body_limit: BodyLimit,
    /// Counts validations (the edge's KV cache should keep them rare) and refusals.
    pub metrics: Arc<Metrics>,
    /// The per-address limits.
    pub limits: AuthLimits,
}

/// The auth routes' limits per client address (cheap to clone: shared state).
#[derive(Debug, Clone)]
pub struct AuthLimits {
    /// `AUTH_RATE_LIMIT`: validate, check-access, logout.
    pub auth: KeyedLimiter<IpAddr>,
    /// `LOGIN_RATE_LIMIT`: login.
    pub login: KeyedLimiter<IpAddr>,
}

impl AuthLimits {
    /// Limits for the two specs (`None`: that limit is off).
    pub fn new(
        auth: Option<crate::ratelimit::RateSpec>,
        login: Option<crate::ratelimit::RateSpec>,
    ) -> Self {
        Self {
            auth: KeyedLimiter::new(auth),
            login: KeyedLimiter::new(login),
        }
    }
}

/// Extractor: the request is within its route's limit (`LOGIN`: the login limit). Placed
/// first, so a refusal happens before the body is read.
struct Limited<const LOGIN: bool>;

impl<const LOGIN: bool> FromRequestParts<AuthRoutesState> for Limited<LOGIN> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AuthRoutesState,
    ) -> Result<Self, Self::Rejection> {
        if parts.extensions.get::<EdgeIdentity>().is_some() {
            return Ok(Self);
        }
        let ip = ClientIp::from_request_parts(parts, state).await?;
        let (limiter, counter, what) = if LOGIN {
            (
                &state.limits.login,
                &state.metrics.rate_limited_login,
                "logins from this address",
            )
        } else {
            (
                &state.limits.auth,
                &state.metrics.rate_limited_auth,
                "auth requests from this address",
            )
        };
        limiter.check(&ip.key()).map_err(|wait| {
            counter.inc();
            wait.into_error(what)
        })?;
        Ok(Self)
    }
}

/// The auth routes, mounted on the public listener.
pub fn router() -> Router<AuthRoutesState> {
    Router::new()
        .route("/api/auth/login", post(login))
        .route("/api/auth/validate", post(validate))
        .route("/api/auth/check-access", post(check_access))
        .route("/api/auth/logout", post(logout))
}

/// `POST /api/auth/login` → 200.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct LoginResponse {
    /// Always `authenticated`.
    pub status: String,
    /// The gateway session token: send it as `Authorization: Bearer`, the `session_token`
    /// cookie, or `?session_token=` (EventSource).
    pub session_token: String,
    /// The user.
    pub user: gateway_shared::session::User,
    /// When the session ends (RFC 3339).
    pub expires_at: String,
    /// A human-readable message.
    pub message: String,
}

/// `POST /api/auth/validate` → 200.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ValidateResponse {
    /// Always `true`.
    pub valid: bool,
    /// The session's user.
    pub user: gateway_shared::session::User,
    /// When the session ends (RFC 3339).
    pub expires_at: String,
    /// A human-readable message.
    pub message: String,
}

/// `POST /api/auth/validate` → 401: the compat fields plus the protocol's error object.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ValidateRefused {
    /// Always `false`.
    pub valid: bool,
    /// Always `null`.
    pub user: Option<gateway_shared::session::User>,
    /// Always `null`.
    pub expires_at: Option<String>,
    /// A human-readable message.
    pub message: String,
    /// `missing_token` or `invalid_session`.
    pub error: gateway_shared::error::ErrorDetail,
}

/// `POST /api/auth/check-access` → 200.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct CheckAccessResponse {
    /// Whether the user may.
    pub allowed: bool,
    /// The session's user.
    pub user: gateway_shared::session::User,
    /// The playbook asked about.
    pub playbook_path: String,
    /// `execute`, `view` or `modify`.
    pub permission_type: String,
    /// NoETL's explanation.
    pub message: String,
}

/// `POST /api/auth/login`'s body (PROTOCOL §1).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = LoginRequest)]
struct LoginBody {
    /// The Auth0 ID token (**compat** name).
    auth0_token: Option<String>,
    /// Newer clients' name for the same token.
    id_token: Option<String>,
    /// Accepted for compat; the gateway does not refresh Auth0 tokens.
    #[allow(dead_code)]
    auth0_refresh_token: Option<String>,
    /// Accepted for compat.
    #[allow(dead_code)]
    client_user_agent: Option<String>,
}

/// Exchanges an Auth0 ID token for a gateway session.
#[utoipa::path(
    post, path = "/api/auth/login", tag = "auth",
    request_body = LoginBody,
    responses(
        (status = 200, description = "Authenticated", body = LoginResponse),
        (status = 400, description = "`missing_token`, `invalid_json`", body = ErrorBody),
        (status = 401, description = "The ID token is refused (`invalid_token`, …)", body = ErrorBody),
        (status = 413, description = "`payload_too_large` (`AUTH_BODY_LIMIT`)", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 429, description = "`rate_limited` (`LOGIN_RATE_LIMIT`), with `Retry-After`", body = ErrorBody),
        (status = 502, description = "NoETL unreachable or answered badly", body = ErrorBody),
        (status = 503, description = "NoETL unavailable, `auth_busy`", body = ErrorBody),
        (status = 504, description = "NoETL too slow", body = ErrorBody),
    )
)]
async fn login(
    _: Limited<true>,
    State(state): State<AuthRoutesState>,
    ClientIp(client): ClientIp,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Response, AppError> {
    let token = body
        .auth0_token
        .or(body.id_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AppError::bad_request("missing_token", "auth0_token is required"))?;
    let ok = state.sessions.login(&token, &client.to_string()).await?;
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

/// A body naming a session token (validate, logout); the token may come in
/// `Authorization: Bearer`, the `session_token` cookie or `?session_token=` instead.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(as = TokenRequest)]
struct TokenBody {
    /// The session token.
    session_token: Option<String>,
}

/// A body that may be empty or JSON (the token may come in a header instead), with the
/// request's parts.
async fn optional_json_body<T>(limit: BodyLimit, req: Request) -> Result<(Parts, T), AppError>
where
    T: for<'de> Deserialize<'de> + Default,
{
    let (parts, body) = req.into_parts();
    let bytes = read_body_limited(body, limit.0).await?;
    let parsed: T = if bytes.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else if is_json_content_type(&parts.headers) {
        parse_json(&bytes)?
    } else {
        return Err(AppError::UnsupportedMediaType);
    };
    Ok((parts, parsed))
}

/// The session token of a body (when it names one) or of the request's header, cookie or
/// query.
fn body_or_request_token(body: &impl HasToken, parts: &Parts) -> Option<String> {
    body.token().or_else(|| request_token(parts))
}

trait HasToken {
    fn token(&self) -> Option<String>;
}

impl HasToken for TokenBody {
    fn token(&self) -> Option<String> {
        self.session_token.clone().filter(|t| !t.is_empty())
    }
}

/// Validates a session token.
#[utoipa::path(
    post, path = "/api/auth/validate", tag = "auth",
    request_body(content = Option<TokenBody>, description = "Optional: the token may come in a header, cookie or query instead"),
    responses(
        (status = 200, description = "The session is valid", body = ValidateResponse),
        (status = 401, description = "Missing, invalid, expired or logged-out session (`missing_token`, `invalid_session`; the latter with `WWW-Authenticate: Bearer error=\"invalid_token\"`)", body = ValidateRefused),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "A non-empty body that is not JSON", body = ErrorBody),
        (status = 429, description = "`rate_limited` (`AUTH_RATE_LIMIT`), with `Retry-After`", body = ErrorBody),
        (status = 502, description = "NoETL unreachable", body = ErrorBody),
        (status = 503, description = "`revocations_unavailable` (with `Retry-After: 1`), `auth_busy`, NoETL unavailable", body = ErrorBody),
        (status = 504, description = "NoETL too slow", body = ErrorBody),
    )
)]
async fn validate(
    _: Limited<false>,
    State(state): State<AuthRoutesState>,
    req: Request,
) -> Result<Response, AppError> {
    state.metrics.validate_requests.inc();
    let (parts, body) = optional_json_body::<TokenBody>(state.body_limit, req).await?;
    let token = body_or_request_token(&body, &parts);
    if !token.as_deref().is_some_and(is_well_formed_token) {
        return Ok(invalid_session(
            "missing_token",
            "no session token in the request",
        ));
    }
    match Caller::from_token(&state.sessions, token).await {
        Ok(caller) => Ok(json_response(
            StatusCode::OK,
            &json!({"valid": true, "user": caller.record.user, "expires_at": caller.record.expires_at, "message": "Session is valid"}),
        )),
        Err(e) if e.status() == StatusCode::UNAUTHORIZED => Ok(invalid_session(
            SESSION_REFUSED_CODE,
            "session is invalid, expired or logged out",
        )),
        Err(e) => Err(e),
    }
}

/// The validate route's 401: the compat fields plus the protocol's error object.
/// A refused session carries the `invalid_token` challenge, a missing token does not.
fn invalid_session(code: &str, message: &str) -> Response {
    let mut response = json_response(
        StatusCode::UNAUTHORIZED,
        &json!({
            "valid": false, "user": null, "expires_at": null, "message": message,
            "error": {"code": code, "message": message},
        }),
    );
    if code == SESSION_REFUSED_CODE {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static(SESSION_REFUSED_CHALLENGE),
        );
    }
    response
}

/// `POST /api/auth/check-access`'s body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(as = CheckAccessRequest)]
struct AccessBody {
    /// The session token (or in a header, cookie or query).
    session_token: Option<String>,
    /// The playbook's catalog path: 1–512 printable characters.
    playbook_path: Option<String>,
    /// `execute` (default), `view` or `modify`; `action` is accepted as an alias.
    #[serde(alias = "action")]
    permission_type: Option<String>,
}

impl HasToken for AccessBody {
    fn token(&self) -> Option<String> {
        self.session_token.clone().filter(|t| !t.is_empty())
    }
}

/// Asks whether the session's user may act on a playbook.
#[utoipa::path(
    post, path = "/api/auth/check-access", tag = "auth",
    request_body = AccessBody,
    responses(
        (status = 200, description = "The answer (allowed or not)", body = CheckAccessResponse),
        (status = 400, description = "`invalid_field` (`playbook_path`, `permission_type`), `invalid_json`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_session`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "A non-empty body that is not JSON", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 502, description = "NoETL unreachable", body = ErrorBody),
        (status = 503, description = "NoETL unavailable, `revocations_unavailable`", body = ErrorBody),
        (status = 504, description = "NoETL too slow", body = ErrorBody),
    )
)]
async fn check_access(
    _: Limited<false>,
    State(state): State<AuthRoutesState>,
    req: Request,
) -> Result<Response, AppError> {
    let (parts, body) = optional_json_body::<AccessBody>(state.body_limit, req).await?;
    let body_token = body.token();
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
    let caller = Caller::resolve(&state.sessions, &parts, body_token).await?;
    let reply = state
        .sessions
        .check_access(&caller.token, &caller.record, &path, &permission)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "allowed": reply.allowed, "user": caller.record.user, "playbook_path": path,
            "permission_type": permission, "message": reply.message,
        }),
    ))
}

/// Ends the session: revoked on every replica until its expiry, forgotten at the edge.
#[utoipa::path(
    post, path = "/api/auth/logout", tag = "auth",
    request_body(content = Option<TokenBody>, description = "Optional: the token may come in a header, cookie or query instead"),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "`missing_token`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "A non-empty body that is not JSON", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "The revocation could not be recorded", body = ErrorBody),
    )
)]
async fn logout(
    _: Limited<false>,
    State(state): State<AuthRoutesState>,
    req: Request,
) -> Result<Response, AppError> {
    let (parts, body) = optional_json_body::<TokenBody>(state.body_limit, req).await?;
    let token = body_or_request_token(&body, &parts)
        .filter(|t| is_well_formed_token(t))
        .ok_or_else(|| {
            AppError::unauthorized("missing_token", "no session token in the request")
        })?;
    state.sessions.logout(&token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

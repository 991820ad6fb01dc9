//! NoETL's auth, as data and as REST routes.
//!
//! [`login`], [`validate`] and [`check_access`] compute the `data` part of the replies; the
//! REST handlers below wrap it in the synchronous routes' envelope (`AUTH_MODE=rest`), and
//! the auth playbooks wrap the very same data in a `/api/internal/callback` body
//! (`AUTH_MODE=playbook`), so both modes always agree. Raw session tokens are never logged.

use super::http::JsonBody;
use super::idp::DevIdp;
use super::sessions::{decide_access, Session, SessionStore};
use super::state::Shared;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// The `data` of a successful login: `{status:"authenticated", session_token, user,
/// expires_at}`; on failure `Err` holds `{error:"invalid_token", message}`.
pub fn login(idp: &DevIdp, sessions: &SessionStore, auth0_token: &str) -> Result<Value, Value> {
    match idp.verify(auth0_token) {
        Ok(identity) => {
            let (token, session) = sessions.create(&identity);
            tracing::info!(email = %session.user.email, "session created");
            Ok(json!({
                "status": "authenticated",
                "session_token": token,
                "user": session.user,
                "expires_at": session.expires_at_rfc3339(),
            }))
        }
        Err(e) => {
            tracing::info!(error = %e, "login refused");
            Err(json!({ "error": "invalid_token", "message": e.to_string() }))
        }
    }
}

/// `{valid:true, user, expires_at}` for a live session, else `{valid:false}`.
pub fn validate(sessions: &SessionStore, session_token: &str) -> Value {
    match sessions.validate(session_token) {
        Some(s) => valid_session(&s),
        None => json!({ "valid": false }),
    }
}

fn valid_session(s: &Session) -> Value {
    json!({ "valid": true, "user": s.user, "expires_at": s.expires_at_rfc3339() })
}

/// `{allowed, message, user}` for a live session, `{allowed:false, message:"invalid
/// session"}` otherwise.
pub fn check_access(
    sessions: &SessionStore,
    session_token: &str,
    playbook_path: &str,
    action: &str,
) -> Value {
    match sessions.validate(session_token) {
        Some(s) => {
            let d = decide_access(&s.user, playbook_path, action);
            json!({ "allowed": d.allowed, "message": d.message, "user": s.user })
        }
        None => json!({ "allowed": false, "message": "invalid session" }),
    }
}

/// Body of `POST /api/auth/login`.
#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    /// The Auth0 (here: dev IdP) ID token; `id_token` accepted as an alias.
    #[serde(alias = "id_token")]
    pub auth0_token: String,
    /// Ignored: the stand-in trusts only its own IdP (real NoETL: only its Auth0 tenant).
    #[serde(default)]
    pub auth0_domain: Option<String>,
    /// Logged only.
    #[serde(default)]
    pub client_ip: Option<String>,
}

/// Body of the session routes.
#[derive(Debug, Deserialize)]
pub struct SessionRequest {
    /// The raw session token.
    pub session_token: String,
}

/// Body of `POST /api/auth/check-playbook-access`.
#[derive(Debug, Deserialize)]
pub struct AccessRequest {
    /// The raw session token.
    pub session_token: String,
    /// The playbook the caller wants to act on.
    pub playbook_path: String,
    /// `execute|view|modify` (`permission_type` accepted as an alias); default `execute`.
    #[serde(default, alias = "permission_type")]
    pub action: Option<String>,
}

/// `POST /api/auth/login`: 200 `{status:"success", data}` or 401 `{status:"error", data}`.
pub async fn login_route(
    State(st): State<Shared>,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Response {
    tracing::debug!(client_ip = ?req.client_ip, auth0_domain = ?req.auth0_domain, "login");
    match login(&st.idp, &st.sessions, &req.auth0_token) {
        Ok(data) => Json(json!({ "status": "success", "data": data })).into_response(),
        Err(data) => (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "status": "error", "data": data })),
        )
            .into_response(),
    }
}

/// `POST /api/auth/session/validate`: always 200 `{status:"ok", valid, user?, expires_at?}`.
pub async fn validate_route(
    State(st): State<Shared>,
    JsonBody(req): JsonBody<SessionRequest>,
) -> Json<Value> {
    let mut reply = validate(&st.sessions, &req.session_token);
    if let Some(obj) = reply.as_object_mut() {
        obj.insert("status".into(), "ok".into());
    }
    Json(reply)
}

/// `POST /api/auth/check-playbook-access`: always 200 `{status:"ok", data}`.
pub async fn check_access_route(
    State(st): State<Shared>,
    JsonBody(req): JsonBody<AccessRequest>,
) -> Json<Value> {
    let action = req.action.as_deref().unwrap_or("execute");
    let data = check_access(&st.sessions, &req.session_token, &req.playbook_path, action);
    Json(json!({ "status": "ok", "data": data }))
}

/// `POST /api/auth/logout`: ends the session (unknown tokens too: logout is idempotent).
pub async fn logout_route(
    State(st): State<Shared>,
    JsonBody(req): JsonBody<SessionRequest>,
) -> Json<Value> {
    let ended = st.sessions.end(&req.session_token);
    tracing::info!(ended, "logout");
    Json(json!({ "status": "ok" }))
}

//! Who is calling: the one place a request's caller is decided.
//!
//! Every public route that needs a user gets it from here — as the [`Caller`] extractor, or
//! through [`Caller::resolve`] / [`Caller::from_token`] where the token may also come from a
//! body (the auth REST API, PROTOCOL.md §1) or a WebSocket `connection_init` payload
//! (`/graphql/ws`). A caller is decided from, in this order:
//!
//! 1. a verified edge assertion ([`EdgeIdentity`], put in the request's extensions by
//!    [`super::edge::admit`]): an assertion is bound to its session — a token
//!    alongside it must hash to the assertion's `sid`, so an assertion cannot lend its
//!    identity to another token — and its session must not be revoked (the replica's
//!    in-memory set); with the token alongside, NoETL is asked again at most once per
//!    `SESSION_CACHE_TTL` per replica ([`SessionService::reconfirm_asserted`]), so a session
//!    NoETL ended by itself does not live on behind the edge's cache;
//! 2. else the session token — the body's where the protocol allows one, else
//!    `Authorization: Bearer`, the `session_token` cookie or `?session_token=` — validated by
//!    the [`SessionService`] (cache, revocations, NoETL).
//!
//! Either way the session must be neither expired nor revoked: the replica's revocation set
//! ([`super::revocations`]) is consulted for an asserted session too (its `sid` is the
//! session hash), so a logout binds the edge's callers within the set's propagation time.
//! A refused session is 401 `invalid_session` (with `WWW-Authenticate: Bearer
//! error="invalid_token"`, which tells the edge to forget it); a set that is not current
//! refuses an assertion-only caller with 503 `revocations_unavailable`.
//!
//! Anything that should refuse a caller (revocation, expiry, a mismatch) is decided in this
//! file, so a new rule is a change in one place.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::{header, request::Parts};
use gateway_shared::session::{
    bearer_token, is_well_formed_token, SessionHash, SessionRecord, User,
};
use serde_json::Value;

use super::edge::EdgeIdentity;
use super::session::{now_unix, SessionService};
use crate::error::{AppError, SESSION_REFUSED_CODE};

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerSource {
    /// A session token validated at the origin.
    Token,
    /// The edge's signed assertion (the edge validated the session).
    EdgeAssertion,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The raw session token, when the request carried one (a secret: for NoETL's access
    /// checks, never logged). Empty for an edge-asserted caller whose request carried no
    /// token.
    pub token: String,
    /// The caller's session.
    pub record: SessionRecord,
    /// The session's hash (`hex(sha256(token))`, the assertion's `sid`): what revocations
    /// and open connections are keyed by.
    pub session: SessionHash,
    /// How the caller was established.
    pub source: CallerSource,
}

impl Caller {
    /// The caller's user.
    pub fn user(&self) -> &User {
        &self.record.user
    }

    /// The caller of a request: the edge's assertion if there is a verified one, else the
    /// session token — `body_token` when the route takes one from its body, else the
    /// request's header, cookie or query.
    pub async fn resolve(
        sessions: &SessionService,
        parts: &Parts,
        body_token: Option<String>,
    ) -> Result<Self, AppError> {
        let token = body_token
            .filter(|t| !t.is_empty())
            .or_else(|| request_token(parts));
        if let Some(EdgeIdentity(claims)) = parts.extensions.get::<EdgeIdentity>() {
            if !claims.sub.is_empty() {
                let session = SessionHash::parse(&claims.sid).ok_or_else(|| {
                    AppError::unauthorized(
                        "assertion_invalid_sid",
                        "the edge assertion names no valid session",
                    )
                })?;
                if let Some(t) = &token {
                    if SessionHash::of(t) != session {
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
                if !record.is_honoured(now_unix()) {
                    return Err(AppError::unauthorized(
                        SESSION_REFUSED_CODE,
                        "session is expired",
                    ));
                }
                sessions.check_not_revoked(&session)?;
                if let Some(t) = &token {
                    if !sessions.reconfirm_asserted(&session, t).await? {
                        return Err(AppError::unauthorized(
                            SESSION_REFUSED_CODE,
                            "session is invalid, expired or logged out",
                        ));
                    }
                }
                return Ok(Self {
                    token: token.unwrap_or_default(),
                    record,
                    session,
                    source: CallerSource::EdgeAssertion,
                });
            }
        }
        Self::from_token(sessions, token).await
    }

    /// The caller behind a session token alone (a `connection_init` payload, a body token):
    /// 401 `missing_token` without a well-formed one, 401 `invalid_session` when the session
    /// is unknown, expired or logged out.
    pub async fn from_token(
        sessions: &SessionService,
        token: Option<String>,
    ) -> Result<Self, AppError> {
        let token = token.filter(|t| is_well_formed_token(t)).ok_or_else(|| {
            AppError::unauthorized("missing_token", "a session token is required")
        })?;
        match sessions.validate(&token).await? {
            Some(record) => Ok(Self {
                session: SessionHash::of(&token),
                token,
                record,
                source: CallerSource::Token,
            }),
            None => Err(AppError::unauthorized(
                SESSION_REFUSED_CODE,
                "session is invalid, expired or logged out",
            )),
        }
    }

    /// Whether a long-lived caller (a WebSocket that outlives its upgrade request) still
    /// holds: its session is neither expired nor logged out.
    pub async fn still_valid(&self, sessions: &SessionService) -> Result<bool, AppError> {
        if !self.record.is_honoured(now_unix()) {
            return Ok(false);
        }
        match self.source {
            CallerSource::Token => Ok(sessions.validate(&self.token).await?.is_some()),
            CallerSource::EdgeAssertion => match sessions.check_not_revoked(&self.session) {
                Ok(()) => Ok(true),
                Err(e) if e.status().as_u16() == 401 => Ok(false),
                Err(e) => Err(e),
            },
        }
    }
}

/// The session token a request carries: `Authorization: Bearer`, the `session_token` cookie,
/// or `?session_token=` (PROTOCOL.md §3, compat), in that order.
pub fn request_token(parts: &Parts) -> Option<String> {
    let h = |name: header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    gateway_shared::session::extract_token(
        h(header::AUTHORIZATION),
        h(header::COOKIE),
        parts.uri.query(),
    )
}

/// The upgrade request's token from `Authorization: Bearer` or `?session_token=`, never
/// from the cookie (see the module docs).
pub fn socket_upgrade_token(parts: &Parts) -> Option<String> {
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    gateway_shared::session::extract_token(auth, None, parts.uri.query())
}

/// The session token of a WebSocket's `connection_init` (`/graphql/ws`): the one the payload names (`session_token`,
/// or `authorization: "Bearer …"`, at the top level or under `headers`), else the upgrade
/// request's. A payload that names a token decides, even when it is malformed (`None`).
pub fn socket_init_token(payload: &Value, upgrade_token: Option<String>) -> Option<String> {
    let scopes = [Some(payload), payload.get("headers")];
    for fields in scopes.into_iter().flatten().filter_map(Value::as_object) {
        for (name, value) in fields {
            if name == "session_token" {
                return value
                    .as_str()
                    .filter(|t| is_well_formed_token(t))
                    .map(str::to_owned);
            }
            if name.eq_ignore_ascii_case("authorization") {
                return value.as_str().and_then(bearer_token).map(str::to_owned);
            }
        }
    }
    upgrade_token
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<SessionService>: FromRef<S>,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let sessions = Arc::<SessionService>::from_ref(state);
        Self::resolve(&sessions, parts, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_init_payload_token_wins_and_a_malformed_one_is_not_replaced() {
        let cookie = || Some("cookie-token".to_owned());
        assert_eq!(
            socket_init_token(&json!({"session_token": "abc"}), cookie()).as_deref(),
            Some("abc")
        );
        assert_eq!(
            socket_init_token(&json!({"Authorization": "Bearer xyz"}), None).as_deref(),
            Some("xyz")
        );
        assert_eq!(
            socket_init_token(&json!({"headers": {"authorization": "bearer h"}}), None).as_deref(),
            Some("h")
        );
        assert_eq!(
            socket_init_token(&json!({"authorization": "Basic x"}), cookie()),
            None
        );
        assert_eq!(
            socket_init_token(&json!({"session_token": 5}), cookie()),
            None
        );
        assert_eq!(
            socket_init_token(&json!({"session_token": "a b"}), cookie()),
            None
        );
        assert_eq!(
            socket_init_token(&Value::Null, cookie()).as_deref(),
            Some("cookie-token")
        );
        assert_eq!(
            socket_init_token(&json!({"other": 1}), cookie()).as_deref(),
            Some("cookie-token")
        );
    }
}

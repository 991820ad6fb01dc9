//! One error type for the origin, mapped to HTTP in exactly one place.
//!
//! Every handler returns `Result<_, AppError>`; [`AppError::into_response`] turns it into
//! the protocol's `{"error":{"code","message"}}` body with the right status. Messages are
//! written for the caller and never contain a token or an upstream body verbatim.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use gateway_shared::error::ErrorBody;

use crate::noetl::NoetlError;
use crate::store::StoreError;

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed (bad field, bad path, missing parameter).
    #[error("{message}")]
    BadRequest {
        /// Machine code, e.g. `invalid_field`.
        code: &'static str,
        /// What is wrong, for the caller.
        message: String,
    },
    /// The body is not valid JSON or not the expected shape.
    #[error("malformed JSON body: {0}")]
    InvalidJson(String),
    /// The body is not `application/json`.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// The body is larger than the route allows.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The request body did not arrive whole within `BODY_READ_TIMEOUT` (408; the
    /// connection is closed, since the rest of the body may still come).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// The request took longer than `REQUEST_TIMEOUT` to answer (504).
    #[error("the request was not answered within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// Too many requests are being answered at once: shed with 503 and `Retry-After`.
    #[error("the server is overloaded, try again shortly")]
    Overloaded,
    /// No valid credentials.
    #[error("{message}")]
    Unauthorized {
        /// Machine code, e.g. `invalid_session`.
        code: &'static str,
        /// Why, for the caller.
        message: String,
    },
    /// Authenticated, but not allowed.
    #[error("{message}")]
    Forbidden {
        /// Machine code, e.g. `proxy_route_forbidden`.
        code: &'static str,
        /// Why, for the caller.
        message: String,
    },
    /// No such route or resource.
    #[error("{0}")]
    NotFound(String),
    /// No such resource, with a more precise code (`service_not_found`,
    /// `question_not_found`, `client_not_found`).
    #[error("{message}")]
    Missing {
        /// Machine code.
        code: &'static str,
        /// What is missing, for the caller.
        message: String,
    },
    /// The resource is not in a state that allows the request (409), e.g. a question
    /// already answered.
    #[error("{message}")]
    Conflict {
        /// Machine code, e.g. `question_closed`.
        code: &'static str,
        /// Why, for the caller.
        message: String,
    },
    /// A registered backend service failed (unreachable: 502, slow: 504).
    #[error(transparent)]
    Service(#[from] crate::upstream::UpstreamError),
    /// The route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// NoETL failed (unreachable, slow, or an error answer).
    #[error(transparent)]
    Noetl(#[from] NoetlError),
    /// The shared store (NATS K/V) failed where it is required.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Over a rate or count limit; answered 429 with `Retry-After`.
    #[error("{message}")]
    TooManyRequests {
        /// Machine code, e.g. `rate_limited`.
        code: &'static str,
        /// Which limit, for the caller.
        message: String,
        /// Seconds until a retry may succeed (the `Retry-After` header), at least 1.
        retry_after: u64,
    },
    /// A dependency or feature is not available right now.
    #[error("{message}")]
    Unavailable {
        /// Machine code, e.g. `jwks_unavailable`.
        code: &'static str,
        /// What is unavailable, for the caller.
        message: String,
    },
    /// A bug or an unexpected state; details go to the log, not the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    /// A 400 with a code and message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// A 401 with a code and message.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        AppError::Unauthorized {
            code,
            message: message.into(),
        }
    }

    /// A 404 with a code and message.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        AppError::Missing {
            code,
            message: message.into(),
        }
    }

    /// A 409 with a code and message.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        AppError::Conflict {
            code,
            message: message.into(),
        }
    }

    /// A 403 with a code and message.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        AppError::Forbidden {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } | AppError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            AppError::RequestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            AppError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            AppError::Forbidden { .. } => StatusCode::FORBIDDEN,
            AppError::NotFound(_) | AppError::Missing { .. } => StatusCode::NOT_FOUND,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::Service(e) => match e {
                crate::upstream::UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                crate::upstream::UpstreamError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            },
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Noetl(e) => match e {
                NoetlError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                NoetlError::Status { status: 503, .. } => StatusCode::SERVICE_UNAVAILABLE,
                NoetlError::Status { status: 404, .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            },
            AppError::Store(_) | AppError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest { code, .. }
            | AppError::Unauthorized { code, .. }
            | AppError::Forbidden { code, .. }
            | AppError::Unavailable { code, .. }
            | AppError::Missing { code, .. }
            | AppError::Conflict { code, .. }
            | AppError::TooManyRequests { code, .. } => code,
            AppError::InvalidJson(_) => "invalid_json",
            AppError::UnsupportedMediaType => "unsupported_media_type",
            AppError::PayloadTooLarge { .. } => "payload_too_large",
            AppError::BodyTimeout(_) => "body_timeout",
            AppError::RequestTimeout(_) => "request_timeout",
            AppError::Overloaded => "overloaded",
            AppError::NotFound(_) => "not_found",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::Noetl(e) => e.code(),
            AppError::Service(crate::upstream::UpstreamError::Timeout { .. }) => "service_timeout",
            AppError::Service(crate::upstream::UpstreamError::Unreachable { .. }) => {
                "service_unavailable"
            }
            AppError::Store(_) => "store_unavailable",
            AppError::Internal(_) => "internal_error",
        }
    }

    /// The error as the protocol's JSON body.
    pub fn body(&self) -> ErrorBody {
        let message = match self {
            // Internal details stay in the log.
            AppError::Internal(_) => "internal error".to_owned(),
            AppError::Store(_) => "shared state is unavailable, try again shortly".to_owned(),
            other => other.to_string(),
        };
        ErrorBody::new(self.code(), message)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request refused");
        }
        let refused_session =
            matches!(&self, AppError::Unauthorized { code, .. } if *code == SESSION_REFUSED_CODE);
        let retry_after = match &self {
            AppError::Unavailable { code, .. }
                if *code == REVOCATIONS_UNAVAILABLE_CODE || *code == AUTH_BUSY_CODE =>
            {
                Some(1)
            }
            AppError::Overloaded => Some(1),
            AppError::TooManyRequests { retry_after, .. } => Some((*retry_after).max(1)),
            _ => None,
        };
        // The rest of an unread body may still come: the connection cannot be reused.
        let close = matches!(&self, AppError::BodyTimeout(_));
        let mut response = json_response(status, &self.body());
        if let Some(secs) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        if close {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if refused_session {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(
                    gateway_shared::session::SESSION_REFUSED_CHALLENGE,
                ),
            );
        }
        response
    }
}

/// The 401 code for a session that is unknown, expired, logged out or revoked. Its response
/// carries `WWW-Authenticate: Bearer error="invalid_token"`
/// ([`gateway_shared::session::SESSION_REFUSED_CHALLENGE`]), which is what tells the edge to
/// forget the session; no other 401 does.
pub const SESSION_REFUSED_CODE: &str = "invalid_session";

/// The 503 code for "whether this session is revoked cannot be told right now" (the
/// replica's revocation set is not current and K/V cannot be read): retryable, sent with
/// `Retry-After: 1`. Never a 200 on doubt.
pub const REVOCATIONS_UNAVAILABLE_CODE: &str = "revocations_unavailable";

/// The 503 code for an auth playbook run refused because `AUTH_PLAYBOOK_CONCURRENCY` runs
/// are already in flight on the replica; answered with `Retry-After: 1`.
pub const AUTH_BUSY_CODE: &str = "auth_busy";

/// A JSON response with a status; the one place bodies are serialised for errors.
pub fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "response did not serialise");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noetl_failures_map_to_gateway_statuses() {
        assert_eq!(
            AppError::Noetl(NoetlError::Timeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            AppError::Noetl(NoetlError::Unreachable("refused".into())).status(),
            StatusCode::BAD_GATEWAY
        );
        let overloaded = NoetlError::Status {
            status: 503,
            message: "busy".into(),
        };
        assert_eq!(
            AppError::Noetl(overloaded).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let broken = NoetlError::Status {
            status: 500,
            message: "boom".into(),
        };
        assert_eq!(AppError::Noetl(broken).status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn internal_details_do_not_reach_the_body() {
        let body = AppError::Internal("db password wrong".into()).body();
        assert_eq!(body.error.code, "internal_error");
        assert!(!body.error.message.contains("password"));
    }
}

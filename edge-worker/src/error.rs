//! The edge's one error type, mapped to HTTP in exactly one place.
//!
//! Every refusal the edge makes itself — a missing or invalid session, a denied route, a
//! rate limit, an origin that cannot be reached — is an [`EdgeError`], and every one
//! leaves as `{"error":{"code","message"}}` ([`gateway_shared::error::ErrorBody`]) with
//! its status. Nothing at the edge panics on input; a failure of the platform itself
//! (a JS exception from a binding) becomes [`EdgeError::Internal`].

use gateway_shared::error::ErrorBody;
use std::fmt;

/// Why the edge answered instead of the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeError {
    /// A session route without a well-formed session token.
    MissingToken,
    /// The token is unknown, expired or logged out (the origin said so, now or recently).
    InvalidSession,
    /// Denied routes (`/api/internal/*`, `/metrics`) and nothing else.
    NotFound,
    /// A method the edge does not forward (CONNECT, TRACE, anything unknown).
    MethodNotAllowed,
    /// Over a rate limit; the client may retry after this many seconds.
    RateLimited {
        /// Seconds for `Retry-After`.
        retry_after_secs: u64,
    },
    /// The origin could not be reached or answered something the edge cannot use.
    OriginUnreachable(String),
    /// The origin said it is temporarily unable to validate sessions (its own 503).
    OriginUnavailable,
    /// The origin did not answer in time.
    OriginTimeout,
    /// The worker's configuration is unusable (a missing or malformed variable).
    Misconfigured(String),
    /// The platform failed in a way the client cannot fix.
    Internal(String),
}

impl EdgeError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            EdgeError::MissingToken | EdgeError::InvalidSession => 401,
            EdgeError::NotFound => 404,
            EdgeError::MethodNotAllowed => 405,
            EdgeError::RateLimited { .. } => 429,
            EdgeError::OriginUnreachable(_) => 502,
            EdgeError::OriginUnavailable => 503,
            EdgeError::OriginTimeout => 504,
            EdgeError::Misconfigured(_) | EdgeError::Internal(_) => 500,
        }
    }

    /// The machine code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            EdgeError::MissingToken => "missing_token",
            EdgeError::InvalidSession => "invalid_session",
            EdgeError::NotFound => "not_found",
            EdgeError::MethodNotAllowed => "method_not_allowed",
            EdgeError::RateLimited { .. } => "rate_limited",
            EdgeError::OriginUnreachable(_) => "origin_unreachable",
            EdgeError::OriginUnavailable => "origin_unavailable",
            EdgeError::OriginTimeout => "origin_timeout",
            EdgeError::Misconfigured(_) => "edge_misconfigured",
            EdgeError::Internal(_) => "edge_internal_error",
        }
    }

    /// The human message. Never contains a token; details of internal failures are logged,
    /// not sent.
    pub fn message(&self) -> String {
        match self {
            EdgeError::MissingToken => "a session token is required".into(),
            EdgeError::InvalidSession => "session is invalid, expired or logged out".into(),
            EdgeError::NotFound => "no such route".into(),
            EdgeError::MethodNotAllowed => "this method is not supported".into(),
            EdgeError::RateLimited { retry_after_secs } => {
                format!("too many requests; retry after {retry_after_secs} s")
            }
            EdgeError::OriginUnreachable(_) => "the origin could not be reached".into(),
            EdgeError::OriginUnavailable => "the origin cannot validate sessions right now".into(),
            EdgeError::OriginTimeout => "the origin did not answer in time".into(),
            EdgeError::Misconfigured(what) => format!("the edge is misconfigured: {what}"),
            EdgeError::Internal(_) => "the edge failed to handle the request".into(),
        }
    }

    /// `Retry-After` seconds, for the errors that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            EdgeError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.message())
    }
}

impl fmt::Display for EdgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EdgeError::OriginUnreachable(d) | EdgeError::Internal(d) => {
                write!(f, "{}: {d}", self.code())
            }
            _ => write!(f, "{}: {}", self.code(), self.message()),
        }
    }
}

#[cfg(target_arch = "wasm32")]
impl From<worker::Error> for EdgeError {
    fn from(e: worker::Error) -> Self {
        EdgeError::Internal(e.to_string())
    }
}

#[cfg(target_arch = "wasm32")]
impl EdgeError {
    /// The error as a response: JSON body, its status, `Retry-After` when it has one.
    /// Internal details are logged here, once, and never sent.
    pub fn into_response(self) -> worker::Response {
        if matches!(
            self,
            EdgeError::Internal(_) | EdgeError::OriginUnreachable(_) | EdgeError::Misconfigured(_)
        ) {
            worker::console_error!("{self}");
        }
        let resp = crate::reply::json(self.status(), self.body().to_json());
        if let Some(secs) = self.retry_after() {
            let _ = resp.headers().set("retry-after", &secs.to_string());
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_status_a_code_and_a_protocol_body() {
        let all = [
            EdgeError::MissingToken,
            EdgeError::InvalidSession,
            EdgeError::NotFound,
            EdgeError::MethodNotAllowed,
            EdgeError::RateLimited {
                retry_after_secs: 10,
            },
            EdgeError::OriginUnreachable("connection refused".into()),
            EdgeError::OriginUnavailable,
            EdgeError::OriginTimeout,
            EdgeError::Misconfigured("ORIGIN_URL is not set".into()),
            EdgeError::Internal("boom".into()),
        ];
        for e in all {
            assert!((400..=599).contains(&e.status()), "{e}");
            let v: serde_json::Value = serde_json::from_str(&e.body().to_json()).unwrap();
            assert_eq!(v["error"]["code"], e.code());
            assert!(!e.message().is_empty());
        }
    }

    #[test]
    fn only_rate_limits_carry_retry_after_and_internal_details_stay_private() {
        assert_eq!(
            EdgeError::RateLimited {
                retry_after_secs: 7
            }
            .retry_after(),
            Some(7)
        );
        assert_eq!(EdgeError::InvalidSession.retry_after(), None);
        let e = EdgeError::OriginUnreachable("dns error for 10.0.0.1".into());
        assert!(!e.message().contains("10.0.0.1"));
        assert!(e.to_string().contains("10.0.0.1"), "but it is logged");
    }
}

//! The edge's one error type, mapped to HTTP in exactly one place.
//!
//! Every refusal the edge makes itself — a missing or invalid session, a denied route, a
//! rate limit, an origin that cannot be reached — is an [`EdgeError`], and every one
//! leaves as `{"error":{"code","message"}}` ([`gateway_shared::error::ErrorBody`]) with
//! its status. Nothing at the edge panics on input; a failure of the platform itself
//! (a JS exception from a binding) becomes [`EdgeError::Internal`], and so does a panic:
//! the fetch entry runs inside [`CatchPanic`], so no runtime error page, stack trace or
//! source path ever reaches a client — the detail is logged with the request id, the
//! client gets `500 {"error":{"code":"edge_internal_error"}}` and the `x-request-id` to
//! quote.

use gateway_shared::error::ErrorBody;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

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
    /// A declared body larger than the route's limit (the origin's, mirrored).
    PayloadTooLarge {
        /// The route's limit in bytes.
        limit: u64,
    },
    /// The origin could not be reached or answered something the edge cannot use.
    OriginUnreachable(String),
    /// The origin refused the edge itself on its validate call — a 401 or 403 that is not
    /// about the session (an assertion that does not verify: a key rotation or a
    /// misconfigured key). Never cached as a refused session.
    OriginRefusedEdge(String),
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
            EdgeError::PayloadTooLarge { .. } => 413,
            EdgeError::RateLimited { .. } => 429,
            EdgeError::OriginUnreachable(_) | EdgeError::OriginRefusedEdge(_) => 502,
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
            EdgeError::PayloadTooLarge { .. } => "payload_too_large",
            EdgeError::RateLimited { .. } => "rate_limited",
            EdgeError::OriginUnreachable(_) => "origin_unreachable",
            EdgeError::OriginRefusedEdge(_) => "origin_refused_edge",
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
            EdgeError::PayloadTooLarge { limit } => {
                format!("request body larger than {limit} bytes")
            }
            EdgeError::OriginUnreachable(_) => "the origin could not be reached".into(),
            EdgeError::OriginRefusedEdge(_) => {
                "the origin did not accept the edge's credentials; try again later".into()
            }
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
            EdgeError::OriginUnreachable(d)
            | EdgeError::OriginRefusedEdge(d)
            | EdgeError::Internal(d) => {
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
    /// Internal details are logged here, once, with the request id, and never sent.
    pub fn into_response(self, rid: &str) -> worker::Response {
        if matches!(
            self,
            EdgeError::Internal(_)
                | EdgeError::OriginUnreachable(_)
                | EdgeError::OriginRefusedEdge(_)
                | EdgeError::Misconfigured(_)
        ) {
            worker::console_error!("request {rid}: {self}");
        }
        let resp = crate::reply::json(self.status(), self.body().to_json());
        if let Some(secs) = self.retry_after() {
            let _ = resp.headers().set("retry-after", &secs.to_string());
        }
        resp
    }
}

/// A future that turns a panic while it is polled into `Err(EdgeError::Internal)` with
/// the panic's message (logged, never sent). The release build unwinds (`panic =
/// "unwind"`), so the panic stops here instead of reaching the runtime as an exception.
pub struct CatchPanic<F>(Pin<Box<F>>);

impl<F> CatchPanic<F> {
    /// Guards `future`.
    pub fn new(future: F) -> Self {
        Self(Box::pin(future))
    }
}

impl<F, T> Future for CatchPanic<F>
where
    F: Future<Output = Result<T, EdgeError>>,
{
    type Output = Result<T, EdgeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                Poll::Ready(Err(EdgeError::Internal(format!("panicked: {what}"))))
            }
        }
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
            EdgeError::PayloadTooLarge { limit: 10 },
            EdgeError::OriginUnreachable("connection refused".into()),
            EdgeError::OriginRefusedEdge("validate answered 401".into()),
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

#[cfg(test)]
mod catch_tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn a_panic_becomes_an_internal_error_whose_detail_is_not_sent() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let out: Result<(), EdgeError> = block_on(CatchPanic::new(async {
            let v: Vec<u8> = Vec::new();
            let _ = v[3];
            Ok(())
        }));
        std::panic::set_hook(hook);
        let e = out.unwrap_err();
        assert_eq!(e.status(), 500);
        assert_eq!(e.code(), "edge_internal_error");
        assert!(e.to_string().contains("index out of bounds"), "{e}");
        let body = e.body().to_json();
        assert!(
            !body.contains("index out of bounds") && !body.contains(".rs"),
            "{body}"
        );
    }

    #[test]
    fn answers_and_errors_pass_through_untouched() {
        assert_eq!(
            block_on(CatchPanic::new(async { Ok::<_, EdgeError>(7) })).unwrap(),
            7
        );
        let e = block_on(CatchPanic::new(async { Err::<(), _>(EdgeError::NotFound) }));
        assert_eq!(e.unwrap_err(), EdgeError::NotFound);
    }
}

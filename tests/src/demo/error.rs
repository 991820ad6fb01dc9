//! The demo service's one error type, mapped to a response in exactly one place with the
//! gateway's body `{"error":{"code","message"}}`, and the extractors that turn hostile input
//! into such an error instead of a panic.

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::json;

/// Every error a demo handler answers itself (an error the gateway answered is relayed
/// as it came, not through this type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine-readable `error.code`.
    pub code: &'static str,
    /// The human-readable `error.message`.
    pub message: String,
}

impl DemoError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 with `code`.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl IntoResponse for DemoError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// A JSON body parsed whatever the content type, within the router's body limit: too
/// large is 413 `payload_too_large`, unparseable or ill-typed is 400 `invalid_json`.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = DemoError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "invalid_body"
            };
            DemoError::new(status, code, e.body_text())
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| DemoError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
    }
}

/// A query string parsed into `T`; a bad value is 400 `invalid_query`.
#[derive(Debug, Clone)]
pub struct QueryParams<T>(pub T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = DemoError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e| DemoError::bad_request("invalid_query", e.body_text()))
    }
}

/// The JSON 404 for routes that do not exist.
pub async fn not_found(uri: axum::http::Uri) -> DemoError {
    DemoError::not_found("route_not_found", format!("no route for {}", uri.path()))
}

/// The JSON 405 for known routes called with the wrong method.
pub async fn method_not_allowed() -> DemoError {
    DemoError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    )
}

//! HTTP plumbing shared by every handler: the one error type (mapped to a response in
//! exactly one place) and extractors that turn hostile input into a 400 JSON error.
//!
//! Errors use the real NoETL server's shape, `{"error": "<message>", "status": <code>}`
//! (its unknown-playbook reply is `{"error":"Playbook not found: x","status":404}`), not the
//! gateway's `{"error":{code,message}}`: the stand-in imitates NoETL.

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::json;

/// Every error a stand-in handler can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// Unparseable or ill-typed input (400).
    BadRequest(String),
    /// Unknown playbook, execution or route (404).
    NotFound(String),
    /// The request conflicts with the current state, e.g. cancelling a finished run (409).
    Conflict(String),
    /// Any other status (injected faults, 405).
    Status(StatusCode, String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &str) {
        match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Self::Conflict(m) => (StatusCode::CONFLICT, m),
            Self::Status(s, m) => (*s, m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = self.parts();
        let body = json!({ "error": message, "status": status.as_u16() });
        (status, Json(body)).into_response()
    }
}

/// A JSON body parsed with serde_json whatever the content type (NoETL's clients are not
/// all careful with headers); anything unparseable is a 400 JSON error, never a panic.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::Status(e.status(), e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// A query string parsed into `T`; a bad value is a 400 JSON error.
#[derive(Debug, Clone)]
pub struct QueryParams<T>(pub T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// The JSON 404 for routes that do not exist.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

/// The JSON 405 for known routes called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::Status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
}

//! Request extractors that treat every input as hostile: JSON bodies with a size limit and
//! a content-type check. (Who is calling is decided in [`crate::auth::caller`].)
//!
//! axum's own `Json` answers rejections in plain text; these answer in the protocol's JSON
//! error shape (400 malformed, 413 too large, 415 wrong content type).

use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::{header, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use crate::error::AppError;

/// The body limit of the routes a state serves: what [`JsonBody`] reads at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit(pub usize);

/// A JSON body of type `T`, read with the state's [`BodyLimit`].
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
    BodyLimit: FromRef<S>,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let BodyLimit(limit) = BodyLimit::from_ref(state);
        if !is_json_content_type(req.headers()) {
            return Err(AppError::UnsupportedMediaType);
        }
        let bytes = read_body_limited(req.into_body(), limit).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// True if `Content-Type` is `application/json` (parameters such as charset allowed).
pub fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a whole body, refusing it with 413 as soon as it passes `limit` bytes (a lying
/// or absent Content-Length does not help an attacker: the count is of bytes received).
pub async fn read_body_limited(body: Body, limit: usize) -> Result<bytes::Bytes, AppError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(AppError::PayloadTooLarge {
                limit: limit as u64,
            })
        }
        Err(e) => Err(AppError::bad_request(
            "body_read_failed",
            format!("could not read the request body: {e}"),
        )),
    }
}

/// Parses JSON, turning serde's message (which names the field and position, never the
/// value) into a 400.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(bytes).map_err(|e| AppError::InvalidJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_even_without_content_length() {
        let body = Body::from(vec![b'x'; 2049]);
        let err = read_body_limited(body, 2048).await.unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        let ok = read_body_limited(Body::from(vec![b'x'; 2048]), 2048)
            .await
            .unwrap();
        assert_eq!(ok.len(), 2048);
    }

    #[test]
    fn content_type_must_be_json() {
        let mut h = HeaderMap::new();
        assert!(!is_json_content_type(&h));
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json_content_type(&h));
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(!is_json_content_type(&h));
    }
}

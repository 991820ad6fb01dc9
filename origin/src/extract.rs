//! Request extractors that treat every input as hostile: JSON bodies with a size limit and
//! a content-type check, and the read deadline every request body carries. (Who is calling
//! is decided in [`crate::auth::caller`].)
//!
//! axum's own `Json` answers rejections in plain text; these answer in the protocol's JSON
//! error shape (400 malformed, 408 too slow, 413 too large, 415 wrong content type). A body
//! whose declared length is over the limit is refused before a byte of it is read; one that
//! does not arrive whole within `BODY_READ_TIMEOUT` ([`DeadlineBody`], put on every request
//! body by the listener) is refused when the deadline passes, whatever reads it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
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
        read_json(req, limit).await.map(JsonBody)
    }
}

/// The request's JSON body as `T`: 415 unless `Content-Type` is JSON, 413 past `limit`
/// bytes ([`read_body_limited`]), 400 for malformed JSON or the wrong shape.
pub async fn read_json<T: DeserializeOwned>(req: Request, limit: usize) -> Result<T, AppError> {
    if !is_json_content_type(req.headers()) {
        return Err(AppError::UnsupportedMediaType);
    }
    let bytes = read_body_limited(req.into_body(), limit).await?;
    parse_json(&bytes)
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
/// or absent Content-Length does not help an attacker: the count is of bytes received),
/// and at once, before reading, when its declared length is already over. A body that
/// misses its [`DeadlineBody`] deadline is 408.
pub async fn read_body_limited(body: Body, limit: usize) -> Result<bytes::Bytes, AppError> {
    let too_large = || AppError::PayloadTooLarge {
        limit: limit as u64,
    };
    // hyper's body hints the declared Content-Length: refuse before waiting for it.
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => match find_body_timeout(&*e) {
            Some(t) => Err(AppError::BodyTimeout(t.0)),
            None => Err(AppError::bad_request(
                "body_read_failed",
                format!("could not read the request body: {e}"),
            )),
        },
    }
}

/// The error a [`DeadlineBody`] fails with once its deadline has passed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// The [`BodyTimeout`] somewhere in `e`'s chain of sources (bodies wrap their errors).
pub fn find_body_timeout(e: &(dyn std::error::Error + 'static)) -> Option<BodyTimeout> {
    std::iter::successors(Some(e), |e| e.source())
        .find_map(|e| e.downcast_ref::<BodyTimeout>())
        .copied()
}

/// A request body that fails with [`BodyTimeout`] if it has not ended within its time,
/// counted from when it was wrapped (the end of the request head). The timer is made on
/// the first poll that has to wait, so a body that is all there costs none.
pub struct DeadlineBody<B> {
    inner: B,
    deadline: tokio::time::Instant,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> DeadlineBody<B> {
    /// `inner`, which must end within `timeout` from now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            timer: None,
        }
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(this.timeout).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

    /// A body that never yields a byte but declares its `.0` bytes (as a Content-Length would).
    struct Declared(u64);

    impl http_body::Body for Declared {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0)
        }
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_413_before_any_byte_is_read() {
        let read = read_body_limited(Body::new(Declared(8 << 20)), 2 << 20);
        let err = tokio::time::timeout(Duration::from_secs(1), read)
            .await
            .expect("answered without waiting for the body")
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        // Through the deadline wrapper the listener puts on every body, too.
        let wrapped = Body::new(DeadlineBody::new(
            Declared(8 << 20),
            Duration::from_secs(60),
        ));
        let err = tokio::time::timeout(Duration::from_secs(1), read_body_limited(wrapped, 2 << 20))
            .await
            .expect("answered without waiting for the body")
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_misses_its_deadline_is_408_and_one_in_time_is_read() {
        let stalled = Body::new(DeadlineBody::new(Declared(10), Duration::from_secs(2)));
        let started = tokio::time::Instant::now();
        let err = read_body_limited(stalled, 1024).await.unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.code(), "body_timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let body = Body::new(DeadlineBody::new(Body::from("{}"), Duration::from_secs(2)));
        assert_eq!(read_body_limited(body, 1024).await.unwrap(), "{}");
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
